"""Llama 3.1 / 3.2 JSON tool calls: the output is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`), several separated by `;`."""

from __future__ import annotations

from . import register
from .base import FunctionCall, ToolParser, call_from_json, json_values

PYTHON_TAG = "<|python_tag|>"


@register
class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith((PYTHON_TAG, "{")):
            return len(text) - len(stripped)
        return None

    def holdback(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if not stripped or PYTHON_TAG.startswith(stripped) else 0

    def parse_calls(self, text: str, final: bool) -> list[FunctionCall] | None:
        values = json_values(text.lstrip().removeprefix(PYTHON_TAG), final)
        if values is None:
            return None
        calls = [call_from_json(value) for value in values]
        return None if any(call is None for call in calls) else calls
