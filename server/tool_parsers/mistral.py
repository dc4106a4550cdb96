"""Mistral: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}` (v0.3 tokenizers), or
`[TOOL_CALLS]name[ARGS]{...}` once per call (v11+ tokenizers)."""

from __future__ import annotations

from . import register
from .base import FunctionCall, ToolParser, arguments_json, call_from_json, json_values, marker_holdback

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


@register
class MistralToolParser(ToolParser):
    name = "mistral"

    def call_start(self, text: str) -> int | None:
        start = text.find(TOOL_CALLS)
        return None if start < 0 else start

    def holdback(self, text: str) -> int:
        return marker_holdback(text, (TOOL_CALLS,))

    def parse_calls(self, text: str, final: bool) -> list[FunctionCall] | None:
        parts = [part for part in text.split(TOOL_CALLS) if part.strip()]
        calls: list[FunctionCall] = []
        for index, part in enumerate(parts):
            last = final or index < len(parts) - 1
            if ARGS in part:
                name, _, arguments = part.partition(ARGS)
                values = json_values(arguments, last)
                if values is None:
                    return None
                if values:
                    calls.append(FunctionCall(name.strip(), arguments_json(values[0])))
                continue
            values = json_values(part, last)
            if values is None:
                return None
            for value in values:
                for item in value if isinstance(value, list) else [value]:
                    call = call_from_json(item)
                    if call is None:
                        return None
                    calls.append(call)
        return calls
