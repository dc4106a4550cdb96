"""LangChain's `ChatOpenAI` against jaxserve: structured output (both methods), tools, streaming and the
Responses API, unchanged from how it talks to OpenAI or vLLM. Needs `pip install langchain-openai`.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/langchain_client.py
"""

from __future__ import annotations

import sys

import pydantic
from _common import make_parser

try:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
except ImportError:
    raise SystemExit("error: this example needs langchain-openai (pip install langchain-openai)") from None


class City(pydantic.BaseModel):
    """Facts about a city."""

    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)


@tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return "sunny"


def main() -> int:
    parser = make_parser(__doc__, default_temperature=0.0)
    parser.set_defaults(max_tokens=80)
    args = parser.parse_args()
    base = dict(base_url=args.base_url, api_key=args.api_key, temperature=args.temperature, max_tokens=args.max_tokens)
    model = args.model or "HuggingFaceTB/SmolLM2-135M-Instruct"
    llm = ChatOpenAI(model=model, **base)

    for method in ("json_schema", "function_calling"):
        print(
            f"with_structured_output({method}):",
            repr(llm.with_structured_output(City, method=method).invoke("Describe Paris.")),
        )
    bound = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True)
    print("bind_tools:", bound.invoke("What is the weather in Paris?").tool_calls)
    chunks = list(bound.stream("What is the weather in Paris?"))
    print("bind_tools, streamed:", sum(chunks[1:], chunks[0]).tool_calls)
    print("stream:", "".join(chunk.content for chunk in llm.stream("Say hi.")))
    responses = ChatOpenAI(model=model, use_responses_api=True, **base)
    print("Responses API:", responses.invoke("Say hi.").text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
