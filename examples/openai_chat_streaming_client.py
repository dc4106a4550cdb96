"""Streamed chat completion with the official `openai` client against jaxserve.

Asks /v1/chat/completions for a streamed reply (`stream=True`) and prints each content delta as it arrives. With
`stream_options={"include_usage": True}` the server ends the stream with one more chunk that has no choices and
carries the token usage of the whole request, which is printed last.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/openai_chat_streaming_client.py
"""

from __future__ import annotations

import sys

from _common import make_client, make_parser, pick_model, run


def main() -> None:
    parser = make_parser(__doc__, default_temperature=0.0)
    parser.add_argument("--prompt", default="Write a haiku about the sea.", help="the user message")
    args = parser.parse_args()

    client = make_client(args)
    model = pick_model(client, args.model)
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": args.prompt},
        ],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )

    print(f"model: {model}")
    print(f"user: {args.prompt}")
    print("assistant: ", end="", flush=True)
    usage = None
    finish_reason = None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                print(choice.delta.content, end="", flush=True)
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
        if chunk.usage is not None:  # only the final chunk carries usage
            usage = chunk.usage
    print()
    print(f"finish_reason: {finish_reason}")
    if usage is not None:
        print(
            f"usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
            f"total_tokens={usage.total_tokens}"
        )
    else:
        print("usage: the stream ended without a usage chunk")


if __name__ == "__main__":
    sys.exit(run(main))
