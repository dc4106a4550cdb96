"""What every tool-call parser shares: the calls it finds, the split of a whole output into content and calls,
and the split of a streamed output (content as it comes, each call once it is complete).

A format says where the tool-call part of an output begins (`call_start`), how much of an output's end could
be the beginning of that (`holdback`, held back while streaming), and which calls a tool-call part holds
(`parse_calls`: the complete ones, or with `final` all of them; None when it is malformed, and then the whole
output is content, as vLLM's parsers fall back)."""

from __future__ import annotations

import abc
import dataclasses
import json
import uuid
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


@dataclasses.dataclass(frozen=True)
class ExtractedToolCalls:
    content: str | None
    calls: list[FunctionCall]


def tool_call_id() -> str:
    """vLLM's form of a tool call id."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def arguments_json(arguments: Any) -> str:
    """Arguments as OpenAI's JSON text: an object stays an object, a string that holds JSON is kept as it is."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


def call_from_json(value: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> FunctionCall | None:
    """`{"name": ..., "arguments": {...}}` (or `parameters`) as a call; None for anything else."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in arguments_keys if key in value), {})
    return FunctionCall(value["name"], arguments_json(arguments))


def json_values(text: str, final: bool) -> list[Any] | None:
    """The JSON values of `text` one after another (separated by whitespace, `,` or `;`). An incomplete last value
    is left out, or with `final` makes the whole None, as does anything that is not JSON."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        while position < len(text) and text[position] in " \t\r\n,;":
            position += 1
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None if final or not _could_continue(text[position:]) else values
        values.append(value)


def _could_continue(tail: str) -> bool:
    """Whether `tail` may be the start of a JSON value still being generated."""
    return tail[:1] in ("{", "[", '"') or tail[:1].isdigit() or tail[:1] == "-"


class ToolParser(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def call_start(self, text: str) -> int | None:
        """Where the tool-call part of `text` begins, if it has begun."""

    def holdback(self, text: str) -> int:
        """How many characters at the end of `text` (with no call started) may begin the tool-call part."""
        return 0

    @abc.abstractmethod
    def parse_calls(self, text: str, final: bool) -> list[FunctionCall] | None:
        """The calls in a tool-call part (from `call_start` on): the complete ones so far, or with `final` all of
        them; None when it is malformed."""

    def extract(self, text: str) -> ExtractedToolCalls:
        """A whole output as content and calls (content alone when it holds no well-formed call)."""
        start = self.call_start(text)
        calls = self.parse_calls(text[start:], final=True) if start is not None else None
        if not calls:
            return ExtractedToolCalls(text, [])
        return ExtractedToolCalls(text[:start] or None, calls)


class WholeOutputToolParser(ToolParser):
    """A format whose calls are the whole output, opening (after whitespace) with one of `openers`."""

    openers: ClassVar[tuple[str, ...]]

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(self.openers) else None

    def holdback(self, text: str) -> int:
        """All of it while it is blank or could still become an opener."""
        stripped = text.lstrip()
        return len(text) if any(opener.startswith(stripped) for opener in self.openers) else 0


class ToolCallStream:
    """One streamed output through a parser: `feed` each text delta and send what it returns (new content, new
    complete calls); `finish` once the output is done, for the rest."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self._content_sent = 0  # characters of text sent as content
        self._start: int | None = None  # where the tool-call part began
        self.calls: list[FunctionCall] = []  # the calls sent

    def feed(self, delta: str) -> tuple[str, list[FunctionCall]]:
        self.text += delta
        if self._start is None:
            self._start = self.parser.call_start(self.text)
        if self._start is None:
            return self._content(len(self.text) - self.parser.holdback(self.text)), []
        content = self._content(self._start)
        calls = self.parser.parse_calls(self.text[self._start :], final=False) or []
        return content, self._new(calls)

    def finish(self) -> tuple[str, list[FunctionCall]]:
        if self._start is None:
            return self._content(len(self.text)), []
        calls = self.parser.parse_calls(self.text[self._start :], final=True)
        if not calls and not self.calls:  # malformed: what was held back is content after all
            return self._content(len(self.text)), []
        return self._content(self._start), self._new(calls or [])

    def _content(self, end: int) -> str:
        if end <= self._content_sent:
            return ""
        piece, self._content_sent = self.text[self._content_sent : end], end
        return piece

    def _new(self, calls: list[FunctionCall]) -> list[FunctionCall]:
        new = calls[len(self.calls) :]
        self.calls += new
        return new


def marker_holdback(text: str, markers: tuple[str, ...]) -> int:
    """The longest end of `text` that is a proper prefix of one of `markers`."""
    return max(
        (size for marker in markers for size in range(1, len(marker)) if text.endswith(marker[:size])), default=0
    )
