"""Hermes / Qwen2.5 / Qwen3 / SmolLM3: each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
after any content."""

from __future__ import annotations

import json
import re

from . import register
from .base import FunctionCall, ToolParser, call_from_json, marker_holdback

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@register
class HermesToolParser(ToolParser):
    name = "hermes"

    def call_start(self, text: str) -> int | None:
        start = text.find(OPEN)
        return None if start < 0 else start

    def holdback(self, text: str) -> int:
        return marker_holdback(text, (OPEN,))

    def parse_calls(self, text: str, final: bool) -> list[FunctionCall] | None:
        bodies = BLOCK.findall(text)
        rest = text[text.rfind(CLOSE) + len(CLOSE) :] if CLOSE in text else text
        if final and rest.strip().startswith(OPEN):  # a last call whose closing tag never came
            bodies.append(rest.strip()[len(OPEN) :])
        calls = []
        for body in bodies:
            try:
                call = call_from_json(json.loads(body))
            except json.JSONDecodeError:
                return None
            if call is None:
                return None
            calls.append(call)
        return calls
