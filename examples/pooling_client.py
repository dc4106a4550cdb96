"""The /pooling route with plain HTTP: the raw output of a pooling model, for a text and for a chat conversation.

Sends two requests to /pooling and pretty-prints both responses, long float lists shortened to their shape and
first few numbers:

- completion-style: `{"model", "input": "..."}`;
- chat-style: `{"model", "messages": [...]}`, rendered with the model's chat template before pooling.

Without a `task`, an embedding model answers with its token-level output (`token_embed`): one [num_tokens, dim]
matrix per input. Pass `--task embed` for one pooled [dim] vector instead.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/pooling_client.py
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


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


def shape(value) -> list[int]:
    return [len(value), *shape(value[0])] if isinstance(value, list) and value else []


def first_numbers(value, count: int = 4) -> list[float]:
    while isinstance(value, list) and value and isinstance(value[0], list):
        value = value[0]
    return [round(x, 4) for x in value[:count]]


def shorten(value):
    """`value` with every list of numbers replaced by a line giving its shape and first numbers."""
    if isinstance(value, dict):
        return {key: shorten(item) for key, item in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], (list, float, int)):
        return f"<shape {shape(value)}, starts {first_numbers(value)} ...>"
    if isinstance(value, list):
        return [shorten(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost", help="server host (default localhost)")
    parser.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"pooling model (default {DEFAULT_MODEL})")
    parser.add_argument("--task", help="embed, token_embed, classify or token_classify (default: the server's)")
    args = parser.parse_args()

    url = f"http://{args.host}:{args.port}/pooling"
    task = {"task": args.task} if args.task else {}
    requests = {
        "completion-style": {"model": args.model, "input": "vLLM is great!", **task},
        "chat-style": {
            "model": args.model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "vLLM is great!"}]}],
            **task,
        },
    }
    for label, body in requests.items():
        print(f"--- {label} request: {json.dumps({k: v for k, v in body.items() if k != 'model'})}")
        print(json.dumps(shorten(post(url, body)), indent=2))


if __name__ == "__main__":
    main()
