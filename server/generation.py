"""What completions and chat share: request fields → `SamplingParams` (docs/architecture.md §7 precedence: the request,
then the model's generation_config, then OpenAI's defaults), running several engine requests as one stream,
metrics per engine request, and SSE framing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from jaxserve import truncation
from jaxserve.beam_search import BeamSearchParams
from jaxserve.outputs import RequestOutput
from jaxserve.request import EngineRequest
from jaxserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

from .context import RequestContext
from .errors import APIError, error_body, from_exception
from .protocol import GenerationRequest, ResponseFormat, UsageInfo
from .served_models import ServedModel

SYSTEM_FINGERPRINT = "jaxserve"
OPENAI_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
UNSUPPORTED = {
    "allowed_token_ids": "allowed_token_ids",
    "bad_words": "bad_words",
}
STRUCTURED_FIELDS = tuple(field.name for field in dataclasses.fields(StructuredOutputsParams))
# the fields of vLLM's older guided decoding, still honoured: field → StructuredOutputsParams field
GUIDED_ALIASES = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}


@dataclasses.dataclass
class Prompt:
    token_ids: list[int]
    text: str | None


def sampling_params(
    request: GenerationRequest,
    model: ServedModel,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams | BeamSearchParams:
    """The engine's parameters for a request (beam search's with `use_beam_search`); raises APIError/ValueError
    (400) on what vLLM rejects."""
    for field, what in UNSUPPORTED.items():
        if getattr(request, field):
            raise APIError(f"{what} is not supported by jaxserve.", param=field)
    constraint = structured_outputs(request)
    if request.cache_salt is not None and not request.cache_salt:
        raise APIError("Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt")
    if request.stream_options is not None and not request.stream:
        raise APIError("Stream options can only be defined when `stream=True`.", param="stream_options")
    if request.use_beam_search:
        if constraint is not None:
            raise APIError("Structured outputs are not supported with beam search.", param="use_beam_search")
        return _beam_search_params(request, model, max_tokens, logprobs, prompt_logprobs)
    defaults = model.sampling_defaults
    values = {
        key: getattr(request, key) if getattr(request, key) is not None else defaults.get(key, default)
        for key, default in OPENAI_DEFAULTS.items()
    }
    skip_special_tokens = request.skip_special_tokens
    if skip_special_tokens is None:
        skip_special_tokens = defaults.get("skip_special_tokens", True)
    if max_tokens is None:
        max_tokens = defaults.get("max_tokens")
    if model.max_tokens_cap is not None:
        max_tokens = model.max_tokens_cap if max_tokens is None else min(max_tokens, model.max_tokens_cap)
    return SamplingParams(
        n=request.n,
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        include_stop_str_in_output=request.include_stop_str_in_output,
        ignore_eos=request.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else request.prompt_logprobs,
        logit_bias=_logit_bias(request.logit_bias),
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=constraint,
        **values,
    )


def structured_outputs(request: GenerationRequest) -> StructuredOutputsParams | None:
    """The request's output constraint, as vLLM reads it: `structured_outputs`, else `response_format`
    (`json_object`, `json_schema`, `structural_tag`; `text` is none), else the older `guided_*` fields."""
    try:
        if request.structured_outputs is not None:
            given = request.structured_outputs.model_dump(by_alias=True, exclude_unset=True)
            return StructuredOutputsParams(**{key: given[key] for key in STRUCTURED_FIELDS if key in given})
        if request.response_format is not None:
            return _from_response_format(request.response_format)
        guided = {
            name: getattr(request, alias, None)
            for alias, name in GUIDED_ALIASES.items()
            if getattr(request, alias, None) is not None
        }
        if set(guided) - {"whitespace_pattern"}:
            return StructuredOutputsParams(**guided)
    except (TypeError, ValueError) as exc:
        raise APIError(str(exc), param="structured_outputs") from None
    return None


def _from_response_format(response_format: ResponseFormat) -> StructuredOutputsParams | None:
    kind = response_format.type
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.json_schema is None:
            raise APIError("response_format of type json_schema needs `json_schema.schema`.", param="response_format")
        schema = response_format.json_schema
        return StructuredOutputsParams(json=schema.json_schema, disable_additional_properties=schema.strict is True)
    if kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=json.dumps(response_format.model_dump(exclude={"json_schema"})))
    return None


def _beam_search_params(
    request: GenerationRequest, model: ServedModel, max_tokens: int | None, logprobs: int | None, prompt_logprobs
) -> BeamSearchParams:
    """`n` beams; without max_tokens, as many as the context leaves (the engine cuts it to that)."""
    if logprobs is not None or prompt_logprobs is not None or request.prompt_logprobs is not None:
        raise APIError("logprobs are not supported with beam search by jaxserve.", param="logprobs")
    return BeamSearchParams(
        beam_width=request.n,
        max_tokens=max_tokens or model.max_model_len,
        ignore_eos=request.ignore_eos,
        length_penalty=request.length_penalty,
        early_stopping=request.early_stopping,
        include_stop_str_in_output=request.include_stop_str_in_output,
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise APIError(f"logit_bias keys must be token ids, got {list(bias)}.", param="logit_bias") from None


def truncate_prompt(
    token_ids: list[int], truncate: int | None, max_model_len: int, side: str | None = None
) -> list[int]:
    """`truncate_prompt_tokens`: keep k tokens (-1: as many as the model takes), the last ones unless
    `truncation_side` is "right"."""
    try:
        return truncation.truncate(token_ids, truncate, max_model_len, side=side or "left")
    except ValueError as exc:
        raise APIError(str(exc), param="truncate_prompt_tokens") from None


def engine_requests(
    model: ServedModel,
    prompts: list[Prompt],
    params: SamplingParams | BeamSearchParams,
    request: GenerationRequest,
    ctx: RequestContext,
) -> list[EngineRequest]:
    """Every prompt as an engine request, each validated once (ValueError → 400) before any is sent: the
    request's id with a `-{index}` suffix when there are several."""
    if request.n > ctx.settings.max_n:
        raise APIError(f"n must be at most {ctx.settings.max_n}, got {request.n}.", param="n")
    options = {"priority": request.priority, "cache_salt": request.cache_salt}
    return [
        model.engine.process(
            prompt.token_ids, params, ctx.engine_id if len(prompts) == 1 else f"{ctx.engine_id}-{i}", prompt.text,
            **options,
        )
        for i, prompt in enumerate(prompts)
    ]  # fmt: skip


async def generate_all(
    model: ServedModel, requests: list[EngineRequest], ctx: RequestContext
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run the engine requests; yields (prompt index, delta output) as they arrive. Closing the iterator early
    (a client that went away) aborts whatever still runs."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, request: EngineRequest) -> None:
        params = request.params
        if isinstance(params, BeamSearchParams):
            n, max_tokens = params.beam_width, params.max_tokens
        else:
            n, max_tokens = params.n, request.max_tokens
        recorder = ctx.metrics.start_request(model.name, len(request.prompt_token_ids), n=n, max_tokens=max_tokens)
        finish_reason = "abort"
        try:
            if isinstance(params, BeamSearchParams):
                outputs = _one(model.engine.beam_search(request))
            else:
                outputs = model.engine.generate_request(request)
            async for output in outputs:
                recorder.tokens_generated(sum(len(c.token_ids) for c in output.outputs))
                if output.finished:
                    finish_reason = output.outputs[-1].finish_reason or "stop"
                    if output.metrics is not None:  # beam search's merged output has no one timeline
                        recorder.engine_finished(output.metrics)
                await queue.put((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which reports it
            finish_reason = "error"
            await queue.put(exc)
        finally:
            recorder.finish(finish_reason)
            queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _one(output: Awaitable[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield await output


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
    """With `cached_tokens` (under --enable-prompt-tokens-details), `prompt_tokens_details.cached_tokens`."""
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=None if cached_tokens is None else {"cached_tokens": cached_tokens},
    )


def json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One SSE event; a chunk leaves out the fields it never set, as vLLM's do."""
    if isinstance(payload, BaseModel):
        if "object" in type(payload).model_fields:
            payload.model_fields_set.add("object")  # a default, but every chunk names what it is
        body = payload.model_dump_json(exclude_unset=True)
    else:
        body = json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frame a chunk iterator as SSE: an error after the stream began goes out as a `data: {"error": ...}`
    event, and `[DONE]` always ends it."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - the status line is already sent; the error travels in the stream
        error = from_exception(exc)
        yield sse(error_body(error.message, error.type, error.status, error.param))
    yield SSE_DONE
