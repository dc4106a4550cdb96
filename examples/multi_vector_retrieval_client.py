"""Multi-vector embeddings (one vector per token, as late-interaction retrieval uses) from /pooling with plain HTTP.

Posts a batch of four texts to /pooling without a `task`; an embedding model then answers with its token-level
output (`token_embed`), one [num_tokens, dim] matrix per text, and this script prints each matrix's shape.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/multi_vector_retrieval_client.py
"""

from __future__ import annotations

import argparse
import sys

import httpx

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [
    "The capital of France is Paris.",
    "Paris",
    "Late interaction keeps one embedding per token and matches queries to documents token by token.",
    "The Eiffel Tower was completed in 1889.",
]


def post(url: str, body: dict) -> dict:
    """POST `body` as JSON; exits with a one-line message if the server cannot be reached or answers an error."""
    try:
        response = httpx.post(url, json=body, timeout=120)
    except httpx.HTTPError as error:
        sys.exit(f"error: cannot reach {url} ({error}). Is `jaxserve serve` running?")
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        sys.exit(f"error: HTTP {response.status_code} from {url}: {message}")
    return response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost", help="server host (default localhost)")
    parser.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedding model (default {DEFAULT_MODEL})")
    args = parser.parse_args()

    reply = post(f"http://{args.host}:{args.port}/pooling", {"model": args.model, "input": TEXTS})
    for item in reply["data"]:
        matrix = item["data"]
        print(f"{TEXTS[item['index']]!r}\n  -> [{len(matrix)}, {len(matrix[0])}]  ([num_tokens, dim])")
    print(f"usage: prompt_tokens={reply['usage']['prompt_tokens']}")


if __name__ == "__main__":
    main()
