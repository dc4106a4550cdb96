"""The output parsers on recorded outputs. Each tool-call parser in its format: the right calls and content,
plain content for broken calls, and streamed in small pieces the same content and calls as whole (each call sent
once, whole). Each reasoning parser: thinking and answer apart, a truncated thinking, an answer without any, and
streamed in pieces of every size the same split as whole."""

from __future__ import annotations

import json

import pytest

from jaxserve.reasoning import REASONING_PARSERS
from jaxserve.server.tool_parsers import TOOL_PARSERS, FunctionCall, ToolCallStream

WEATHER = FunctionCall("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))
TIME = FunctionCall("get_time", json.dumps({"zone": "CET"}))

# parser: [(recorded output, expected content, expected calls)]
CASES = {
    "hermes": [
        (
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
            "Let me check.\n",
            [WEATHER, TIME],
        ),
        ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}', None, [TIME]),  # no closing tag
        (
            '<tool_call>\n{"name": "get_time", "arguments": {broken</tool_call>',
            '<tool_call>\n{"name": "get_time", "arguments": {broken</tool_call>',
            [],
        ),
        ("Just text, with a < sign.", "Just text, with a < sign.", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [WEATHER]),
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
            '{"name": "get_time", "parameters": {"zone": "CET"}}',
            None,
            [WEATHER, TIME],
        ),
        (
            '{"name": "get_weather", "parameters": {"city": "Par',
            '{"name": "get_weather", "parameters": {"city": "Par',
            [],
        ),
        ("The weather is fine.", "The weather is fine.", []),
    ],
    "mistral": [
        (
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
            '{"name": "get_time", "arguments": {"zone": "CET"}}]',
            None,
            [WEATHER, TIME],
        ),
        ('Sure.[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', "Sure.", [TIME]),
        ("[TOOL_CALLS][{oops", "[TOOL_CALLS][{oops", []),
        ("No tools needed.", "No tools needed.", []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", unit="celsius"), get_time(zone="CET")]', None, [WEATHER, TIME]),
        ("[get_time(zone='CET')]", None, [TIME]),
        ("[get_time(zone=", "[get_time(zone=", []),
        ("[1, 2, 3] are numbers.", "[1, 2, 3] are numbers.", []),
    ],
}


def _same_calls(got: list[FunctionCall], expected: list[FunctionCall]) -> bool:
    return [(c.name, json.loads(c.arguments)) for c in got] == [(c.name, json.loads(c.arguments)) for c in expected]


@pytest.mark.parametrize(
    "name, text, content, calls",
    [(name, *case) for name, cases in CASES.items() for case in cases],
    ids=[f"{name}-{i}" for name, cases in CASES.items() for i in range(len(cases))],
)
def test_whole_and_streamed_outputs_give_the_same_content_and_calls(name, text, content, calls):
    parser = TOOL_PARSERS[name]()
    whole = parser.extract(text)
    assert whole.content == content and _same_calls(whole.calls, calls)

    stream = ToolCallStream(parser)
    streamed_content, streamed_calls = "", []
    for i in range(0, len(text), 3):
        piece, new = stream.feed(text[i : i + 3])
        streamed_content += piece
        streamed_calls += new
    piece, new = stream.finish()
    streamed_content += piece
    streamed_calls += new
    assert streamed_content == (content or "") and _same_calls(streamed_calls, calls)


def test_every_parser_is_registered():
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(TOOL_PARSERS)


# parser: [(recorded output, expected reasoning, expected content)]
REASONING_CASES = {
    "deepseek_r1": [
        (
            "The user wants a number.\nI pick 7.\n</think>\n\nSeven.",
            "The user wants a number.\nI pick 7.\n",
            "\n\nSeven.",
        ),
        ("<think>Short.</think>Answer", "Short.", "Answer"),
        ("Still thinking when the tokens ran out <", "Still thinking when the tokens ran out <", None),
    ],
    "qwen3": [
        ("<think>\nPlan: add.\n</think>\n\n2 + 2 = 4.", "\nPlan: add.\n", "\n\n2 + 2 = 4."),
        ("No thinking here (enable_thinking false).", None, "No thinking here (enable_thinking false)."),
        ("<think>cut off", "cut off", None),
        ("<thin", None, "<thin"),
    ],
}


@pytest.mark.parametrize(
    "name, text, reasoning, content",
    [(name, *case) for name, cases in REASONING_CASES.items() for case in cases],
    ids=[f"{name}-{i}" for name, cases in REASONING_CASES.items() for i in range(len(cases))],
)
def test_reasoning_splits_the_same_whole_and_streamed(name, text, reasoning, content):
    parser = REASONING_PARSERS[name]
    assert parser.split(text) == (reasoning, content)
    for size in (1, 2, 5):
        stream = parser.stream()
        pieces = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)] + [stream.finish()]
        assert "".join(p[0] for p in pieces) == (reasoning or "") and "".join(p[1] for p in pieces) == (content or "")
