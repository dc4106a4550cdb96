"""Tool-call parsers (`--tool-call-parser NAME`): each turns a model's output in its family's format into content
and OpenAI tool calls, whole or streamed (base.py). A new format joins with one file here that registers its
`ToolParser` subclass."""

from __future__ import annotations

from .base import ExtractedToolCalls, FunctionCall, ToolCallStream, ToolParser, tool_call_id

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register(parser: type[ToolParser]) -> type[ToolParser]:
    TOOL_PARSERS[parser.name] = parser
    return parser


from . import hermes, llama3_json, mistral, pythonic  # noqa: E402,F401  (each registers its parser)

__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "FunctionCall", "ToolCallStream", "ToolParser", "tool_call_id"]
