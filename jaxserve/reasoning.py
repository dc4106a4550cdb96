"""Reasoning parsers (`--reasoning-parser NAME`, per model): a reasoning model's thinking, between `<think>` and
`</think>`, goes to the chat message's `reasoning` field and the rest to `content`, as vLLM splits it, whole and
streamed. The engine holds a structured output's grammar back until the thinking has ended (`END`).

* deepseek_r1: the chat template opens `<think>` itself, so the output starts in the reasoning (an opening tag
  in the output is dropped) and, without `</think>`, is reasoning to the end.
* qwen3: the output reasons only if it opens with `<think>` (with `enable_thinking: false` it does not, and is
  all content).

A whole output is split by streaming it in one piece, so whole and streamed always agree."""

from __future__ import annotations

import dataclasses

START, END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ReasoningParser:
    name: str
    starts_in_reasoning: bool  # the prompt opened the reasoning

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole output as (reasoning, content); None for a part it has not."""
        stream = self.stream()
        reasoning, content = stream.feed(text)
        more_reasoning, more_content = stream.finish()
        reasoning, content = reasoning + more_reasoning, content + more_content
        return (reasoning if stream.reasoned else None), (content or None)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """One streamed output: `feed` each delta, send the (reasoning, content) it returns; `finish` at the end."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self._pending = ""  # text not yet sent: a possible opening tag, or a possible start of the closing one
        self._phase = "start"  # then "reasoning" or "content"
        self.reasoned = False

    def feed(self, delta: str) -> tuple[str, str]:
        self._pending += delta
        if self._phase == "start":
            if self._pending.startswith(START):
                self._pending, self._phase, self.reasoned = self._pending[len(START) :], "reasoning", True
            elif START.startswith(self._pending):
                return "", ""  # may still become the opening tag
            else:
                self._phase = "reasoning" if self.parser.starts_in_reasoning else "content"
                self.reasoned = self.parser.starts_in_reasoning
        if self._phase == "reasoning":
            before, found, after = self._pending.partition(END)
            if not found:
                keep = next((n for n in range(len(END) - 1, 0, -1) if self._pending.endswith(END[:n])), 0)
                sent, self._pending = (
                    self._pending[: len(self._pending) - keep],
                    self._pending[len(self._pending) - keep :],
                )
                return sent, ""
            self._pending, self._phase = after, "content"
            content, self._pending = self._pending, ""
            return before, content
        content, self._pending = self._pending, ""
        return "", content

    def finish(self) -> tuple[str, str]:
        """What was held back: a closing tag's start is reasoning after all; a lone start is content."""
        rest, self._pending = self._pending, ""
        if self._phase == "reasoning":
            return rest, ""
        if self._phase == "start" and self.parser.starts_in_reasoning:
            self.reasoned = True
            return rest, ""
        return "", rest


REASONING_PARSERS = {
    parser.name: parser
    for parser in (ReasoningParser("deepseek_r1", starts_in_reasoning=True), ReasoningParser("qwen3", False))
}
