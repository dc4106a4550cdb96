"""Chat completion with the official `openai` client against jaxserve.

Sends a system and a user message to /v1/chat/completions and prints the reply and the token usage.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/openai_chat_client.py
"""

from __future__ import annotations

import sys

from _common import make_client, make_parser, pick_model, run


def main() -> None:
    parser = make_parser(__doc__, default_temperature=0.0)
    parser.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    args = parser.parse_args()

    client = make_client(args)
    model = pick_model(client, args.model)
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": args.prompt},
        ],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )

    choice = response.choices[0]
    print(f"model: {response.model}")
    print(f"user: {args.prompt}")
    print(f"{choice.message.role}: {choice.message.content}")
    print(f"finish_reason: {choice.finish_reason}")
    usage = response.usage
    if usage is not None:
        print(
            f"usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
            f"total_tokens={usage.total_tokens}"
        )


if __name__ == "__main__":
    sys.exit(run(main))
