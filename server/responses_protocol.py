"""Request and response bodies of the Responses API (`POST /v1/responses`), with OpenAI's and vLLM's field names.
Input and output items stay JSON objects (`server/responses.py` reads and writes them)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from .protocol import RequestBody, ResponseBody, StructuredOutputs


class ResponsesRequest(RequestBody):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    model: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool | None = True
    reasoning: dict[str, Any] | None = None  # {"effort": ...}: reaches the chat template as reasoning_effort
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    background: bool | None = False
    include: list[str] | None = None
    metadata: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = "disabled"
    top_logprobs: int | None = 0
    max_tool_calls: int | None = None
    service_tier: str | None = "auto"
    user: str | None = None
    prompt: dict[str, Any] | None = None
    # vLLM's extras
    request_id: str | None = None
    priority: int = 0
    cache_salt: str | None = None
    structured_outputs: StructuredOutputs | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class InputTokensDetails(ResponseBody):
    cached_tokens: int = 0


class OutputTokensDetails(ResponseBody):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseBody):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponsesResponse(ResponseBody):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress", "cancelled", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = "auto"
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: str | None = "disabled"
    user: str | None = None
    background: bool = False
