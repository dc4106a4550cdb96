"""`POST /v1/completions`: prompts (text or token ids, one or many) → choices, streamed or whole."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from fastapi.responses import Response, StreamingResponse

from jaxserve.inputs import batch_prompts
from jaxserve.outputs import TokenLogprobs
from jaxserve.request import EngineRequest

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
from .logprobs import completion_logprobs, prompt_logprobs_json
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse
from .served_models import ServedModel


async def create_completion(request: CompletionRequest, model: ServedModel, ctx: RequestContext) -> Response:
    if request.suffix is not None:
        raise APIError("suffix is not currently supported", param="suffix")
    prompts = await asyncio.to_thread(_tokenize, request, model)
    if request.echo and request.max_tokens == 0:
        return json_response(_echo_only(request, model, prompts, ctx))
    echo_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
    params = sampling_params(request, model, request.max_tokens, request.logprobs, prompt_logprobs=echo_logprobs)
    engine_reqs = engine_requests(model, prompts, params, request, ctx)
    if request.stream:
        chunks = _stream(request, model, prompts, engine_reqs, ctx)
        return StreamingResponse(sse_stream(chunks), media_type="text/event-stream")
    return json_response(await _whole(request, model, prompts, engine_reqs, ctx))


def _tokenize(request: CompletionRequest, model: ServedModel) -> list[Prompt]:
    try:
        raw = batch_prompts(request.prompt)
    except ValueError:
        raw = []
    if not raw or any(len(p) == 0 for p in raw):
        raise APIError("Prompt cannot be empty.", param="prompt")
    truncation = (request.truncate_prompt_tokens, model.max_model_len, request.truncation_side)
    prompts = []
    for item in raw:
        if isinstance(item, str):
            ids = model.tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
            prompts.append(Prompt(truncate_prompt(ids, *truncation), item))
        else:
            ids = truncate_prompt(list(item), *truncation)
            prompts.append(Prompt(ids, None))
    return prompts


@dataclasses.dataclass
class _Choice:
    """A choice as it accumulates."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


async def _whole(
    request: CompletionRequest,
    model: ServedModel,
    prompts: list[Prompt],
    engine_reqs: list[EngineRequest],
    ctx: RequestContext,
) -> CompletionResponse:
    n = request.n
    choices = {i * n + j: _Choice() for i in range(len(prompts)) for j in range(n)}
    prompt_logprobs: dict[int, list] = {}
    cached: dict[int, int] = {}
    async for i, output in generate_all(model, engine_reqs, ctx):
        if output.num_cached_tokens is not None:
            cached[i] = output.num_cached_tokens
        if output.prompt_logprobs is not None:
            prompt_logprobs[i] = output.prompt_logprobs
        for out in output.outputs:
            choice = choices[i * n + out.index]
            choice.text += out.text
            choice.token_ids += out.token_ids
            choice.logprobs += out.logprobs or []
            choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
    result = []
    for index, choice in sorted(choices.items()):
        prompt = prompts[index // n]
        prefix = _echo_text(request, model, prompt)
        logprobs = None
        if request.logprobs is not None:
            token_ids, entries = choice.token_ids, choice.logprobs
            if request.echo:
                token_ids, entries = prompt.token_ids + token_ids, prompt_logprobs[index // n] + entries
            logprobs = completion_logprobs(token_ids, entries, model.tokenizer, 0, ctx.tokens_as_ids(request))
        result.append(
            CompletionChoice(
                index=index,
                text=prefix + choice.text,
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
                token_ids=choice.token_ids if request.return_token_ids else None,
                prompt_logprobs=prompt_logprobs_json(prompt_logprobs.get(index // n)),
                prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
            )
        )
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    num_generated = sum(len(c.token_ids) for c in choices.values())
    return CompletionResponse(
        id=ctx.response_id,
        model=model.name,
        choices=result,
        system_fingerprint=SYSTEM_FINGERPRINT,
        usage=usage(num_prompt_tokens, num_generated, ctx.cached_tokens(cached)),
    )


async def _stream(
    request: CompletionRequest,
    model: ServedModel,
    prompts: list[Prompt],
    engine_reqs: list[EngineRequest],
    ctx: RequestContext,
) -> AsyncIterator[str]:
    n = request.n
    include_usage, continuous = ctx.usage_options(request.stream_options)
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    num_generated = 0
    started: set[int] = set()
    offsets: dict[int, int] = {}
    cached: dict[int, int] = {}
    async for i, output in generate_all(model, engine_reqs, ctx):
        if output.num_cached_tokens is not None:
            cached[i] = output.num_cached_tokens
        for out in output.outputs:
            index = i * n + out.index
            num_generated += len(out.token_ids)
            text = out.text
            token_ids, entries = out.token_ids, out.logprobs or []
            first = index not in started
            if first:
                started.add(index)
                text = _echo_text(request, model, prompts[i]) + text
                if request.echo and output.prompt_logprobs is not None:
                    token_ids, entries = prompts[i].token_ids + token_ids, output.prompt_logprobs + entries
            carries_tokens = out.token_ids and (request.logprobs is not None or request.return_token_ids)
            if not text and not carries_tokens and out.finish_reason is None:
                continue
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(
                    token_ids, entries, model.tokenizer, offsets.get(index, 0), ctx.tokens_as_ids(request)
                )
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs.tokens)
            choice = CompletionChoice(
                index=index,
                text=text,
                logprobs=logprobs,
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
                token_ids=out.token_ids if request.return_token_ids else None,
                prompt_token_ids=prompts[i].token_ids if request.return_token_ids and first else None,
            )
            chunk = CompletionStreamResponse(
                id=ctx.response_id, created=ctx.created, model=model.name, choices=[choice]
            )
            if continuous:
                chunk.usage = usage(num_prompt_tokens, num_generated)
            yield sse(chunk)
    if include_usage:
        final = CompletionStreamResponse(
            id=ctx.response_id,
            created=ctx.created,
            model=model.name,
            choices=[],
            usage=usage(num_prompt_tokens, num_generated, ctx.cached_tokens(cached)),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        yield sse(final)


def _echo_text(request: CompletionRequest, model: ServedModel, prompt: Prompt) -> str:
    if not request.echo:
        return ""
    return prompt.text if prompt.text is not None else model.tokenizer.decode(prompt.token_ids, False)


def _echo_only(request: CompletionRequest, model: ServedModel, prompts: list[Prompt], ctx) -> CompletionResponse:
    """`echo` with `max_tokens: 0`: the prompts back, nothing generated."""
    n = request.n
    choices = [
        CompletionChoice(index=i * n + j, text=_echo_text(request, model, p), finish_reason="length")
        for i, p in enumerate(prompts)
        for j in range(n)
    ]
    return CompletionResponse(
        id=ctx.response_id,
        model=model.name,
        choices=choices,
        system_fingerprint=SYSTEM_FINGERPRINT,
        usage=usage(sum(len(p.token_ids) for p in prompts), 0),
    )
