"""Sentence embeddings with the official `openai` client against jaxserve.

Embeds a few sentences with one `client.embeddings.create` call (POST /v1/embeddings), prints the dimension of
each embedding and the matrix of their cosine similarities: related sentences score higher.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/openai_embedding_client.py
"""

from __future__ import annotations

import argparse
import math
import sys

from _common import default_api_key, run
from openai import OpenAI

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply today.",
    "Shares dropped steeply this afternoon.",
]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost", help="server host (default localhost)")
    parser.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedding model (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--api-key",
        default=default_api_key(),
        help="API key (default: $JAXSERVE_API_KEY, else $VLLM_API_KEY, else 'EMPTY' for a server without one)",
    )
    args = parser.parse_args()

    client = OpenAI(base_url=f"http://{args.host}:{args.port}/v1", api_key=args.api_key)
    response = client.embeddings.create(model=args.model, input=SENTENCES)
    embeddings = [item.embedding for item in response.data]

    print(f"model: {response.model}")
    for i, (sentence, embedding) in enumerate(zip(SENTENCES, embeddings)):
        print(f"[{i}] dim {len(embedding)}: {sentence!r}")
    print("cosine similarity:")
    print("     " + "".join(f"{j:>7}" for j in range(len(embeddings))))
    for i, a in enumerate(embeddings):
        print(f"[{i}]  " + "".join(f"{cosine(a, b):7.3f}" for b in embeddings))
    print(f"usage: prompt_tokens={response.usage.prompt_tokens} total_tokens={response.usage.total_tokens}")


if __name__ == "__main__":
    sys.exit(run(main))
