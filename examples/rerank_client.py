"""The /rerank route with plain HTTP: rank documents by relevance to a query and keep the best `top_n`.

Posts `{"model", "query", "documents", "top_n"}` to /rerank (also served as /v1/rerank and /v2/rerank, the
Jina and Cohere spellings) and prints the results, best first, each with its index in the request. Documents may
be strings or `{"text": ...}` objects; this script sends one of each kind.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/rerank_client.py
"""

from __future__ import annotations

import argparse
import sys

import httpx

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are rich in potassium.",
    "The capital of Germany is Berlin.",
    {"text": "The capital of France is Paris."},
    "Paris is known for the Eiffel Tower.",
    "Horses and donkeys are closely related.",
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
    parser.add_argument("--top-n", type=int, default=3, help="results to return (default 3; 0: all)")
    args = parser.parse_args()

    body = {"model": args.model, "query": QUERY, "documents": DOCUMENTS, "top_n": args.top_n}
    reply = post(f"http://{args.host}:{args.port}/rerank", body)
    print(f"query: {QUERY!r}; top {args.top_n} of {len(DOCUMENTS)} documents")
    for rank, result in enumerate(reply["results"], 1):
        print(f"  {rank}. {result['relevance_score']:7.4f}  [{result['index']}] {result['document']['text']!r}")
    print(f"usage: prompt_tokens={reply['usage']['prompt_tokens']}")


if __name__ == "__main__":
    main()
