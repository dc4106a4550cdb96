"""Llama 3.1 / 3.2 JSON tool calls: the output is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`), several separated by `;`."""

from __future__ import annotations

from . import register
from .base import FunctionCall, WholeOutputToolParser, call_from_json, json_values

PYTHON_TAG = "<|python_tag|>"


@register
class Llama3JsonToolParser(WholeOutputToolParser):
    name = "llama3_json"
    openers = (PYTHON_TAG, "{")

    def parse_calls(self, text: str, final: bool) -> list[FunctionCall] | None:
        values = json_values(text.lstrip().removeprefix(PYTHON_TAG), final)
        if values is None:
            return None
        calls = [call_from_json(value) for value in values]
        return None if any(call is None for call in calls) else calls
