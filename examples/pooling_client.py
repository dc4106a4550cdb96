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

import json

from _pooling_http import make_parser, post


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
    parser = make_parser(__doc__)
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
