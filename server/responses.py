"""`POST /v1/responses` (OpenAI's Responses API, as vLLM serves it for models without a Harmony format), and
`GET /v1/responses/{id}` for stored responses.

A request becomes a chat completion: `instructions` a system message, the input items messages (text, parts,
`function_call` as an assistant's tool calls, `function_call_output` as a tool message), `previous_response_id`
the stored conversation before them, function `tools` and `tool_choice` the chat's, `text.format` a
`response_format`, `reasoning.effort` the template's `reasoning_effort`. The chat's output comes back as output
items: `reasoning` (with --reasoning-parser), `message` (`output_text`), and one `function_call` per tool call.
Streamed, it is the typed event sequence (`response.created`, `response.in_progress`, per item
`response.output_item.added` ... `.done` with its parts and deltas, `response.completed`), each event an SSE
`event: <type>` with a `sequence_number`. Responses are kept (`store`, the default) in memory, the oldest
dropped past `--max-stored-responses`."""

from __future__ import annotations

import collections
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response, StreamingResponse

from .chat import ChatGeneration, prepare_chat
from .context import RequestContext
from .errors import APIError, not_found
from .generation import json_response
from .protocol import ChatCompletionRequest, ChatCompletionResponse, DeltaMessage
from .responses_protocol import (
    InputTokensDetails,
    OutputTokensDetails,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
)
from .served_models import ServedModel


@dataclasses.dataclass
class StoredResponse:
    response: ResponsesResponse
    messages: list[dict[str, Any]]  # the conversation up to and with this response, for previous_response_id


class ResponseStore:
    """Stored responses by id, in memory; past `capacity` the oldest go."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._responses: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        self._responses[stored.response.id] = stored
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        stored = self._responses.get(response_id)
        if stored is None:
            raise not_found(f"Response with id '{response_id}' not found.", param="response_id")
        return stored


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- request → chat ----------------------------------------------------------------------------------------


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(
                    part.get("text", "")
                    for part in content
                    if part.get("type") in ("input_text", "output_text", "text")
                )
            messages.append({"role": item.get("role", "user"), "content": content})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind != "reasoning":  # earlier reasoning is not shown to the model again
            raise APIError(f"Input items of type {kind!r} are not supported.", param="input")
    return messages


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    chat_tools = []
    for tool in tools:
        if tool.get("type") != "function":
            raise APIError(f"Only function tools are supported, got {tool.get('type')!r}.", param="tools")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        chat_tools.append({"type": "function", "function": function})
    return chat_tools or None


def _tool_choice(choice: str | dict[str, Any], has_tools: bool) -> str | dict[str, Any] | None:
    if not has_tools:
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    return None


def to_chat(request: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat completion a Responses request amounts to, and its conversation (without instructions)."""
    if request.background:
        raise APIError("background responses are not supported; send the request and wait for it.", param="background")
    if request.prompt is not None:
        raise APIError("prompt template is not supported", param="prompt")
    if request.structured_outputs is not None and _response_format(request.text):
        raise APIError("Cannot specify both structured_outputs and text.format", param="text")
    conversation = [*history, *_messages(request.input)]
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    tools = _tools(request.tools)
    effort = (request.reasoning or {}).get("effort")
    fields: dict[str, Any] = {
        "model": request.model,
        "messages": [*system, *conversation],
        "max_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
        "seed": request.seed,
        "stop": request.stop,
        "ignore_eos": request.ignore_eos,
        "logit_bias": request.logit_bias,
        "skip_special_tokens": request.skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "tools": tools,
        "tool_choice": _tool_choice(request.tool_choice, tools is not None),
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": _response_format(request.text),
        "stream": bool(request.stream),
        "request_id": request.request_id,
        "priority": request.priority,
        "cache_salt": request.cache_salt,
        "chat_template_kwargs": {"reasoning_effort": effort} if effort else None,
    }
    if request.structured_outputs is not None:
        fields["structured_outputs"] = request.structured_outputs.model_dump(by_alias=True, exclude_unset=True)
    return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None}), conversation


# --- chat → response ---------------------------------------------------------------------------------------


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    parts = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": parts}


def _reasoning_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text is not None else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class _Responding:
    """One Responses request over its chat generation."""

    def __init__(self, request: ResponsesRequest, chat: ChatGeneration, conversation: list[dict], store: ResponseStore):
        self.request = request
        self.chat = chat
        self.conversation = conversation
        self.store = store
        self.id = request.request_id or _id("resp")

    def response(self, output: list[dict[str, Any]], status: str, usage: ResponseUsage | None) -> ResponsesResponse:
        request, params = self.request, self.chat.params
        return ResponsesResponse(
            id=self.id,
            created_at=self.chat.ctx.created,
            status=status,
            model=self.chat.model.name,
            output=output,
            usage=usage,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=request.instructions,
            max_output_tokens=getattr(params, "max_tokens", None),
            max_tool_calls=request.max_tool_calls,
            metadata=request.metadata,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=request.previous_response_id,
            reasoning=request.reasoning,
            store=request.store is not False,
            temperature=getattr(params, "temperature", None),
            text=request.text,
            tool_choice=request.tool_choice,
            tools=request.tools,
            top_logprobs=request.top_logprobs,
            top_p=getattr(params, "top_p", None),
            truncation=request.truncation,
            user=request.user,
        )

    def usage(self, prompt_tokens: int, output_tokens: int, cached: int, reasoning: str | None) -> ResponseUsage:
        reasoning_tokens = len(self.chat.model.tokenizer.encode(reasoning, False)) if reasoning else 0
        return ResponseUsage(
            input_tokens=prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=output_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=min(reasoning_tokens, output_tokens)),
            total_tokens=prompt_tokens + output_tokens,
        )

    def finish(self, response: ResponsesResponse, content: str | None, tool_calls: list[dict]) -> ResponsesResponse:
        """Keep the response (with `store`) for `previous_response_id` and `GET /v1/responses/{id}`."""
        if self.request.store is not False:
            answer = {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls else {})}
            self.store.put(StoredResponse(response, [*self.conversation, answer]))
        return response

    async def whole(self) -> ResponsesResponse:
        answer: ChatCompletionResponse = await self.chat.whole()
        choice = answer.choices[0]
        message = choice.message
        output = []
        if message.reasoning is not None:
            output.append(_reasoning_item(_id("rs"), message.reasoning))
        if message.content:
            output.append(_message_item(_id("msg"), message.content))
        calls = [call.model_dump() for call in message.tool_calls]
        output += [
            _call_item(_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]) for call in calls
        ]
        usage = answer.usage
        cached = sum(self.chat.cached.values())
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        response = self.response(
            output, status, self.usage(usage.prompt_tokens, usage.completion_tokens, cached, message.reasoning)
        )
        return self.finish(response, message.content, calls)

    async def events(self) -> AsyncIterator[str]:
        stream = _EventStream()
        yield stream.event("response.created", response=self.response([], "in_progress", None).model_dump())
        yield stream.event("response.in_progress", response=self.response([], "in_progress", None).model_dump())
        finish = None
        async for out, delta, _ in self.chat.events():
            for event in stream.feed(delta):
                yield event
            finish = out.finish_reason or finish
        for event in stream.close():
            yield event
        status = "incomplete" if finish == "length" else "completed"
        usage = self.usage(
            len(self.chat.prompt.token_ids), self.chat.num_generated, sum(self.chat.cached.values()), stream.reasoning
        )
        response = self.finish(self.response(stream.output, status, usage), stream.content, stream.calls)
        yield stream.event("response.completed", response=response.model_dump())


class _EventStream:
    """The typed events of one streamed output: each output item opened, filled by deltas, and closed."""

    def __init__(self):
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the finished items
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._text = ""
        self.reasoning: str | None = None
        self.content: str | None = None
        self.calls: list[dict[str, Any]] = []

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"output_index": len(self.output), "item_id": self._open["id"]}

    def feed(self, delta: DeltaMessage) -> list[str]:
        events = []
        if delta.reasoning:
            events += self._ensure("reasoning")
            self._text += delta.reasoning
            events.append(
                self.event("response.reasoning_text.delta", **self._where(), content_index=0, delta=delta.reasoning)
            )
        if delta.content:
            events += self._ensure("message")
            self._text += delta.content
            events.append(
                self.event(
                    "response.output_text.delta", **self._where(), content_index=0, delta=delta.content, logprobs=[]
                )
            )
        for call in delta.tool_calls or []:
            if call.id is not None:  # a new call: its header
                events += self._close()
                self._open = _call_item(_id("fc"), call.id, call.function.name, "", "in_progress")
                events.append(self.event("response.output_item.added", output_index=len(self.output), item=self._open))
            elif call.function is not None and call.function.arguments:
                self._text += call.function.arguments
                events.append(
                    self.event("response.function_call_arguments.delta", **self._where(), delta=call.function.arguments)
                )
        return events

    def _ensure(self, kind: str) -> list[str]:
        """Open an item of `kind` unless one is open (closing another kind first)."""
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self._close()
        if kind == "reasoning":
            self._open = _reasoning_item(_id("rs"), None, "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        else:
            self._open = _message_item(_id("msg"), "", "in_progress")
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events.append(self.event("response.output_item.added", output_index=len(self.output), item=self._open))
        events.append(self.event("response.content_part.added", **self._where(), content_index=0, part=part))
        return events

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        item, text, where = self._open, self._text, self._where()
        if item["type"] == "reasoning":
            done = _reasoning_item(item["id"], text)
            self.reasoning = (self.reasoning or "") + text
            events = [
                self.event("response.reasoning_text.done", **where, content_index=0, text=text),
                self.event("response.content_part.done", **where, content_index=0, part=done["content"][0]),
            ]
        elif item["type"] == "message":
            done = _message_item(item["id"], text)
            self.content = (self.content or "") + text
            events = [
                self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                self.event("response.content_part.done", **where, content_index=0, part=done["content"][0]),
            ]
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], text)
            self.calls.append(
                {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": text}}
            )
            events = [self.event("response.function_call_arguments.done", **where, name=item["name"], arguments=text)]
        events.append(self.event("response.output_item.done", output_index=len(self.output), item=done))
        self.output.append(done)
        self._open, self._text = None, ""
        return events

    def close(self) -> list[str]:
        return self._close()


async def create_response(
    request: ResponsesRequest, model: ServedModel, ctx: RequestContext, store: ResponseStore
) -> Response:
    history = store.get(request.previous_response_id).messages if request.previous_response_id else []
    chat_request, conversation = to_chat(request, history)
    chat = await prepare_chat(chat_request, model, ctx)
    responding = _Responding(request, chat, conversation, store)
    if request.stream:
        return StreamingResponse(responding.events(), media_type="text/event-stream")
    return json_response(await responding.whole())
