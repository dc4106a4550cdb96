"""Structured output with the official `openai` client against jaxserve: a JSON object of a given schema.

Asks `/v1/chat/completions` for a city's facts with `client.chat.completions.parse(response_format=City)`: the
server holds the reply to City's JSON schema (structured outputs), so it always parses. Prints the parsed
object, then the same with vLLM's `structured_outputs` field (`extra_body`) and a regex.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/structured_output_client.py
"""

from __future__ import annotations

import sys

import pydantic
from _common import make_client, make_parser, pick_model, run


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population_millions: int = pydantic.Field(ge=0, le=100)
    landmarks: list[str] = pydantic.Field(max_length=3)


def main() -> None:
    parser = make_parser(__doc__, default_temperature=0.0)
    parser.add_argument("--prompt", default="Describe Paris as JSON.", help="the user message")
    parser.set_defaults(max_tokens=200)
    args = parser.parse_args()

    client = make_client(args)
    model = pick_model(client, args.model)
    messages = [{"role": "user", "content": args.prompt}]
    reply = client.chat.completions.parse(
        model=model, messages=messages, response_format=City, max_tokens=args.max_tokens, temperature=args.temperature
    )
    choice = reply.choices[0]
    print(f"parsed: {choice.message.parsed!r} (finish_reason {choice.finish_reason})")

    date = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "When did the Eiffel Tower open? Give the date."}],
        max_tokens=20,
        temperature=args.temperature,
        extra_body={"structured_outputs": {"regex": r"\d{4}-\d{2}-\d{2}"}},
    )
    print(f"date: {date.choices[0].message.content}")


if __name__ == "__main__":
    sys.exit(run(main))
