"""Tool calling in chat completions, as vLLM does it (`tool_choice`):

* "none": the tools reach the chat template, the output is content.
* "auto" (with --enable-auto-tool-choice and --tool-call-parser): the parser of the model's format finds the
  calls in the output (tool_parsers/); with calls, `finish_reason` is "tool_calls".
* "required": the output is held (structured outputs) to a JSON list of `{"name", "parameters"}` objects whose
  names and parameters are the tools' own, so it always parses into calls (one, with `parallel_tool_calls`
  false); `finish_reason` "tool_calls".
* a named function: the output is held to that function's parameters schema and is its arguments.

`ToolCalling.of(request, settings)` resolves the mode once per request; `constraint()` is its structured output,
`whole(text)` splits a finished output, and `stream()` gives a per-choice `ChoiceToolStream` that turns text
deltas into content and tool-call deltas (id, type and name first, then the arguments)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.sampling_params import StructuredOutputsParams

from .errors import APIError
from .protocol import ChatCompletionRequest, DeltaFunctionCall, DeltaToolCall, FunctionCallBody, ToolCall
from .settings import ServerSettings
from .tool_parsers import TOOL_PARSERS, FunctionCall, ToolCallStream, ToolParser, tool_call_id
from .tool_parsers.base import call_from_json, json_values

AUTO_NEEDS_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


class RequiredCallsParser(ToolParser):
    """The JSON list that "required" holds the output to."""

    name = "required"

    def call_start(self, text: str) -> int | None:
        return 0

    def parse_calls(self, text: str, final: bool) -> list[FunctionCall] | None:
        body = text.strip().removeprefix("[").rstrip()
        if body.endswith("]"):
            body = body[:-1]
        values = json_values(body, final)
        calls = [call_from_json(value, ("parameters", "arguments")) for value in values or []]
        return None if values is None or any(call is None for call in calls) else calls


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict[str, Any]]
    parser: ToolParser | None = None
    function: str | None = None  # the named function
    parallel: bool = True  # "required": several calls may come (OpenAI's parallel_tool_calls)

    @classmethod
    def of(cls, request: ChatCompletionRequest, settings: ServerSettings) -> ToolCalling:
        """The request's tool mode; 400 for a choice that cannot be served."""
        tools, choice = request.tools, request.tool_choice
        if tools is not None and not tools:
            raise APIError("`tools` must not be an empty list; leave it out instead.", param="tools")
        if choice is not None and choice != "none" and not tools:
            raise APIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if not tools or choice == "none":
            return cls("none", tools or [])
        if choice in (None, "auto"):
            if not (settings.enable_auto_tool_choice and settings.tool_call_parser):
                raise APIError(AUTO_NEEDS_FLAGS, param="tool_choice")
            return cls("auto", tools, TOOL_PARSERS[settings.tool_call_parser]())
        if choice == "required":
            return cls("required", tools, RequiredCallsParser(), parallel=request.parallel_tool_calls is not False)
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str):
            raise APIError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.',
                param="tool_choice",
            )
        if name not in {_function(tool).get("name") for tool in tools}:
            raise APIError(f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
        return cls("named", tools, function=name)

    def constraint(self) -> StructuredOutputsParams | None:
        """The structured output of "required" and of a named function."""
        if self.mode == "named":
            tool = next(_function(t) for t in self.tools if _function(t).get("name") == self.function)
            return StructuredOutputsParams(json=_parameters(tool), disable_additional_properties=_strict(tool))
        if self.mode == "required":
            options = [
                {
                    "type": "object",
                    "properties": {"name": {"const": _function(t)["name"]}, "parameters": _parameters(_function(t))},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            calls = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
            strict = all(_strict(_function(t)) for t in self.tools)
            return StructuredOutputsParams(
                json=calls if self.parallel else {**calls, "maxItems": 1}, disable_additional_properties=strict
            )
        return None

    def whole(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished output as message content and tool calls."""
        if self.mode == "named":
            return None, [_tool_call(FunctionCall(self.function, text))]
        if self.parser is None:
            return text, []
        extracted = self.parser.extract(text)
        return extracted.content, [_tool_call(call) for call in extracted.calls]

    def finish_reason(self, reason: str | None, has_calls: bool) -> str | None:
        """vLLM's: "tool_calls" when auto or required calls ended the output."""
        return "tool_calls" if has_calls and self.mode in ("auto", "required") and reason == "stop" else reason

    def stream(self) -> ChoiceToolStream:
        return ChoiceToolStream(self)


class ChoiceToolStream:
    """One choice's streamed output: content deltas and tool-call deltas."""

    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self._parsed = ToolCallStream(calling.parser) if calling.parser is not None else None
        self._named_started = False
        self.num_calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[DeltaToolCall]]:
        if self.calling.mode == "named":
            deltas = []
            if not self._named_started:
                self._named_started, self.num_calls = True, 1
                deltas.append(_header(0, self.calling.function))
            if text:
                deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text)))
            return "", deltas
        if self._parsed is None:
            return text, []
        content, calls = self._parsed.feed(text)
        if final:
            more_content, more_calls = self._parsed.finish()
            content, calls = content + more_content, calls + more_calls
        deltas = []
        for call in calls:
            deltas += [_header(self.num_calls, call.name), _arguments(self.num_calls, call.arguments)]
            self.num_calls += 1
        return content, deltas


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool) if isinstance(tool, dict) else {}


def _strict(function: dict[str, Any]) -> bool:
    """OpenAI's `strict` function: no properties beyond its schema's."""
    return function.get("strict") is True


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    return parameters if isinstance(parameters, dict) else {"type": "object"}


def _tool_call(call: FunctionCall) -> ToolCall:
    return ToolCall(id=tool_call_id(), function=FunctionCallBody(name=call.name, arguments=call.arguments))


def _header(index: int, name: str) -> DeltaToolCall:
    return DeltaToolCall(
        index=index, id=tool_call_id(), type="function", function=DeltaFunctionCall(name=name, arguments="")
    )


def _arguments(index: int, arguments: str) -> DeltaToolCall:
    return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=arguments))
