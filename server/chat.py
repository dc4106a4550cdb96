"""`POST /v1/chat/completions`: messages rendered through the chat template, then generation; and the
template rendering that `/tokenize` shares."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response, StreamingResponse

from jaxserve.beam_search import BeamSearchParams
from jaxserve.outputs import CompletionOutput
from jaxserve.reasoning import ReasoningParser
from jaxserve.request import EngineRequest
from jaxserve.sampling_params import SamplingParams

from .chat_utils import last_message_text, prepare_messages
from .context import RequestContext
from .errors import APIError
from .generation import (
    SYSTEM_FINGERPRINT,
    Prompt,
    engine_requests,
    generate_all,
    json_response,
    sampling_params,
    sse,
    sse_stream,
    truncate_prompt,
    usage,
)
from .logprobs import chat_logprobs, prompt_logprobs_json
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatTemplateFields,
    DeltaMessage,
)
from .served_models import ServedModel
from .tool_calls import ToolCalling

# template arguments set by top-level request fields, which win over chat_template_kwargs
TOP_LEVEL_TEMPLATE_ARGS = ("add_generation_prompt", "continue_final_message", "tools", "documents", "chat_template")


def render_chat_prompt(model: ServedModel, fields: ChatTemplateFields, default_kwargs: dict[str, Any]) -> Prompt:
    """The conversation as the model sees it: template text and its token ids. Runs off the event loop."""
    template = fields.chat_template or model.tokenizer.chat_template
    messages = prepare_messages(fields.messages, model.content_format, template)
    kwargs = {**default_kwargs, **(fields.chat_template_kwargs or {})}
    for key in TOP_LEVEL_TEMPLATE_ARGS:
        kwargs.pop(key, None)
    text = model.tokenizer.render_chat(
        messages,
        chat_template=fields.chat_template,
        add_generation_prompt=fields.add_generation_prompt,
        continue_final_message=fields.continue_final_message,
        tools=fields.tools,
        documents=fields.documents,
        chat_template_kwargs=kwargs,
    )
    return Prompt(model.tokenizer.encode(text, add_special_tokens=fields.add_special_tokens), text)


def check_template_trust(chat_template: str | None, trusted: bool) -> None:
    if chat_template is not None and not trusted:
        raise APIError(
            "Chat template is passed with request, but --trust-request-chat-template is not set. "
            "Refused request with untrusted chat template.",
            param="chat_template",
        )


async def create_chat_completion(request: ChatCompletionRequest, model: ServedModel, ctx: RequestContext) -> Response:
    chat = await prepare_chat(request, model, ctx)
    if request.stream:
        return StreamingResponse(sse_stream(chat.stream()), media_type="text/event-stream")
    return json_response(await chat.whole())


async def prepare_chat(request: ChatCompletionRequest, model: ServedModel, ctx: RequestContext) -> ChatGeneration:
    """A chat checked, rendered and made into its engine request (the Responses API runs its requests as these);
    400 for what cannot be served."""
    calling = ToolCalling.of(request, ctx.settings)
    check_template_trust(request.chat_template, ctx.settings.trust_request_chat_template)
    if request.top_logprobs and not request.logprobs:
        raise APIError("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    if not request.messages:
        raise APIError("messages must not be empty.", param="messages")
    prompt = await asyncio.to_thread(render_chat_prompt, model, request, ctx.settings.default_chat_template_kwargs)
    if request.truncate_prompt_tokens is not None:
        ids = truncate_prompt(
            prompt.token_ids, request.truncate_prompt_tokens, model.max_model_len, request.truncation_side
        )
        prompt = Prompt(ids, prompt.text)
    num_top = request.top_logprobs or 0
    logprobs = num_top if request.logprobs else None
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    params = _with_tool_constraint(sampling_params(request, model, max_tokens, logprobs), calling)
    (engine_request,) = engine_requests(model, [prompt], params, request, ctx)
    role = ctx.settings.response_role if request.add_generation_prompt else request.messages[-1].get("role", "user")
    echo = ""
    if request.echo and request.messages[-1].get("role") == role:
        echo = last_message_text(request.messages)
    return ChatGeneration(
        request, model, prompt, engine_request, params, ctx, role, echo, logprobs, calling, model.reasoning_parser
    )


def _with_tool_constraint(params: SamplingParams | BeamSearchParams, calling: ToolCalling):
    """`params` holding the output to the tools' schemas, for tool_choice "required" or a named function."""
    constraint = calling.constraint()
    if constraint is None:
        return params
    if isinstance(params, BeamSearchParams):
        raise APIError('tool_choice "required" or a named function is not supported with beam search.')
    if params.structured_outputs is not None:
        raise APIError(
            'tool_choice "required" or a named function cannot be combined with structured outputs or response_format.',
            param="tool_choice",
        )
    return params.clone(structured_outputs=constraint)


class _ChoiceSplit:
    """One streamed choice: its reasoning (with a reasoning parser) apart, then its content and tool calls."""

    def __init__(self, reasoner: ReasoningParser | None, calling: ToolCalling):
        self.reasoning = reasoner.stream() if reasoner is not None else None
        self.tools = calling.stream()

    def feed(self, text: str, final: bool) -> DeltaMessage:
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if final:
                more_reasoning, more_text = self.reasoning.finish()
                reasoning, text = reasoning + more_reasoning, text + more_text
        content, tool_calls = self.tools.feed(text, final=final)
        return DeltaMessage(reasoning=reasoning or None, content=content, tool_calls=tool_calls or None)


def _only_set(delta: DeltaMessage) -> DeltaMessage:
    """The delta as sent: reasoning and tool calls only when there are some, content unless tool calls came
    alone."""
    fields = delta.model_dump(exclude_none=True)
    if fields.get("content") == "" and ("tool_calls" in fields or "reasoning" in fields):
        del fields["content"]
    return DeltaMessage(**{key: getattr(delta, key) for key in fields})


@dataclasses.dataclass
class ChatGeneration:
    """One chat's generation: whole (`whole`), as chat chunks (`stream`), or as each choice's parsed deltas
    (`events`, which the streamed Responses API reads)."""

    request: ChatCompletionRequest
    model: ServedModel
    prompt: Prompt
    engine_request: EngineRequest
    params: SamplingParams | BeamSearchParams
    ctx: RequestContext
    role: str
    echo: str
    num_top: int | None
    calling: ToolCalling
    reasoner: ReasoningParser | None
    num_generated: int = 0  # output tokens so far, over all choices
    cached: dict[int, int] = dataclasses.field(default_factory=dict)  # prompt tokens the prefix cache served

    def _logprobs(self, token_ids, entries):
        if self.num_top is None:
            return None
        as_ids = self.ctx.tokens_as_ids(self.request)
        return chat_logprobs(token_ids, entries, self.num_top, self.model.tokenizer, as_ids)

    def _outputs(self):
        return generate_all(self.model, [self.engine_request], self.ctx)

    async def whole(self) -> ChatCompletionResponse:
        n = self.request.n
        texts, token_ids, entries = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * n
        prompt_logprobs = None
        async for _, output in self._outputs():
            prompt_logprobs = output.prompt_logprobs or prompt_logprobs
            if output.num_cached_tokens is not None:
                self.cached[0] = output.num_cached_tokens
            for out in output.outputs:
                texts[out.index] += out.text
                token_ids[out.index] += out.token_ids
                self.num_generated += len(out.token_ids)
                entries[out.index] += out.logprobs or []
                finish[out.index] = (out.finish_reason, out.stop_reason)
        choices = []
        for i in range(n):
            reasoning, text = self.reasoner.split(texts[i]) if self.reasoner is not None else (None, texts[i])
            content, tool_calls = self.calling.whole(text) if text is not None else (None, [])
            if self.echo:
                content = self.echo + (content or "")
            choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=ChatMessage(
                        role=self.role,
                        content=content,
                        tool_calls=tool_calls,
                        reasoning=reasoning if self.request.include_reasoning else None,
                    ),
                    logprobs=self._logprobs(token_ids[i], entries[i]),
                    finish_reason=self.calling.finish_reason(finish[i][0], bool(tool_calls)),
                    stop_reason=finish[i][1],
                    token_ids=token_ids[i] if self.request.return_token_ids else None,
                )
            )
        return ChatCompletionResponse(
            id=self.ctx.response_id,
            created=self.ctx.created,
            model=self.model.name,
            choices=choices,
            system_fingerprint=SYSTEM_FINGERPRINT,
            usage=usage(len(self.prompt.token_ids), self.num_generated, self.ctx.cached_tokens(self.cached)),
            prompt_logprobs=prompt_logprobs_json(prompt_logprobs),
            prompt_token_ids=self.prompt.token_ids if self.request.return_token_ids else None,
        )

    def _chunk(self, choice: ChatCompletionStreamChoice, **fields) -> str:
        chunk = ChatCompletionStreamResponse(
            id=self.ctx.response_id, created=self.ctx.created, model=self.model.name, choices=[choice], **fields
        )
        return sse(chunk)

    async def events(self) -> AsyncIterator[tuple[CompletionOutput, DeltaMessage, bool]]:
        """Each engine output of each choice with what it adds once parsed: reasoning (with a reasoning parser),
        content and tool-call deltas; and whether the choice has made tool calls so far."""
        splits = [_ChoiceSplit(self.reasoner, self.calling) for _ in range(self.request.n)]
        async for _, output in self._outputs():
            if output.num_cached_tokens is not None:
                self.cached[0] = output.num_cached_tokens
            for out in output.outputs:
                self.num_generated += len(out.token_ids)
                split = splits[out.index]
                delta = split.feed(out.text, final=out.finish_reason is not None)
                if not self.request.include_reasoning:
                    delta.reasoning = None
                yield out, delta, split.tools.num_calls > 0

    async def stream(self) -> AsyncIterator[str]:
        include_usage, continuous = self.ctx.usage_options(self.request.stream_options)
        num_prompt = len(self.prompt.token_ids)

        def running_usage() -> dict:
            return {"usage": usage(num_prompt, self.num_generated)} if continuous else {}

        prompt_ids = {"prompt_token_ids": self.prompt.token_ids} if self.request.return_token_ids else {}
        for i in range(self.request.n):
            delta = DeltaMessage(role=self.role, content="")
            yield self._chunk(
                ChatCompletionStreamChoice(index=i, delta=delta, logprobs=None, finish_reason=None),
                **running_usage(),
                **prompt_ids,
            )
            if self.echo:
                echo = ChatCompletionStreamChoice(index=i, delta=DeltaMessage(content=self.echo), logprobs=None)
                yield self._chunk(echo, **running_usage())
        async for out, delta, called in self.events():
            carries_tokens = out.token_ids and (self.num_top is not None or self.request.return_token_ids)
            says_something = delta.content or delta.reasoning or delta.tool_calls
            if not says_something and not carries_tokens and out.finish_reason is None:
                continue
            choice = ChatCompletionStreamChoice(
                index=out.index,
                delta=_only_set(delta),
                logprobs=self._logprobs(out.token_ids, out.logprobs or []),
                finish_reason=self.calling.finish_reason(out.finish_reason, called),
            )
            if out.finish_reason is not None:
                choice.stop_reason = out.stop_reason
            if self.request.return_token_ids:
                choice.token_ids = out.token_ids
            yield self._chunk(choice, **running_usage())
        if include_usage:
            final = ChatCompletionStreamResponse(
                id=self.ctx.response_id,
                created=self.ctx.created,
                model=self.model.name,
                choices=[],
                usage=usage(num_prompt, self.num_generated, self.ctx.cached_tokens(self.cached)),
            )
            yield sse(final)
