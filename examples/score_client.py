"""The /score route with plain HTTP: how well each of several documents matches one query.

Posts `{"model", "queries": "...", "documents": [...]}` to /score and prints one score per document. With an
embedding model (the default, all-MiniLM-L6-v2) the score is the cosine similarity of the two embeddings; with a
cross-encoder (a classifier with one label) it is the model's output for the pair.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/score_client.py
"""

from __future__ import annotations

import argparse
import sys

import httpx

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The capital of France is Paris.",
    "Paris is known for the Eiffel Tower.",
    "The capital of Germany is Berlin.",
    "Bananas are rich in potassium.",
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

    body = {"model": args.model, "queries": QUERY, "documents": DOCUMENTS}
    reply = post(f"http://{args.host}:{args.port}/score", body)
    print(f"query: {QUERY!r}")
    for item in reply["data"]:
        print(f"  {item['score']:7.4f}  {DOCUMENTS[item['index']]!r}")
    print(f"usage: prompt_tokens={reply['usage']['prompt_tokens']}")


if __name__ == "__main__":
    main()
