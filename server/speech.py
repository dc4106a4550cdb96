"""`POST /v1/audio/transcriptions` and `/v1/audio/translations` (multipart/form-data, vLLM's fields): an upload →
Whisper's engine requests, one per 30 s chunk, all sent at once so the engine batches them → the text joined in the
chunks' order, whole (json, text, verbose_json, srt, vtt) or streamed (SSE `transcription.chunk` /
`translation.chunk` chunks, then `[DONE]`). The speech side (prompts, languages, chunks, segments, subtitles) is
jaxserve/speech.py."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator
from http import HTTPStatus

from fastapi import UploadFile
from fastapi.responses import Response, StreamingResponse

from jaxserve.audio import AudioDecodeError, AudioTooLargeError, check_audio_size, max_audio_filesize_mb
from jaxserve.outputs import RequestOutput
from jaxserve.request import EngineRequest
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.speech import (
    FALLBACK_TEMPERATURES,
    ChunkTranscript,
    SpeechAudio,
    SpeechModel,
    Task,
    TranscriptJoiner,
    audio_frames,
    chunk_separator,
    join_transcripts,
    language_name,
    prepare_audio,
    to_srt,
    to_vtt,
)

from .context import RequestContext
from .errors import APIError
from .generation import generate_all, json_response, sse, sse_stream, usage
from .served_models import ServedModel
from .speech_protocol import (
    DurationUsage,
    SpeechDelta,
    SpeechRequest,
    SpeechStreamChoice,
    TranscriptionResponse,
    TranscriptionStreamResponse,
    TranscriptionVerboseResponse,
    TranslationResponse,
    TranslationStreamResponse,
    TranslationVerboseResponse,
)

API_NAMES = {"transcribe": "Transcriptions API", "translate": "Translations API"}
SEGMENT_FORMATS = ("verbose_json", "srt", "vtt")  # the formats built from segments, which are not streamed
TEXT_MEDIA_TYPES = {
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
STREAM_OPTIONS = ("stream_include_usage", "stream_continuous_usage_stats")


def transcribes(model: ServedModel) -> bool:
    """Whether the model serves the speech routes (and, being speech-to-text only, no others)."""
    return model.speech is not None


async def create_transcription(request: SpeechRequest, model: ServedModel, ctx: RequestContext) -> Response:
    return await _create(request, model, ctx, "transcribe")


async def create_translation(request: SpeechRequest, model: ServedModel, ctx: RequestContext) -> Response:
    return await _create(request, model, ctx, "translate")


async def _create(request: SpeechRequest, model: ServedModel, ctx: RequestContext, task: Task) -> Response:
    speech = model.speech
    if speech is None:
        name = request.model or model.name
        raise APIError(f"The model `{name}` does not support the {API_NAMES[task]}.", param="model")
    _check_options(request)
    language = speech.check_language(request.language)
    segmented = request.response_format in SEGMENT_FORMATS
    params = _sampling_params(request, model, segmented)
    data = await _read_upload(request.file)
    audio = await asyncio.to_thread(_prepare, data, request.file.filename, speech)
    if language is None:
        spoken = speech.multilingual and audio.chunks
        language = await _detect_language(model, speech, audio, ctx) if spoken else "en"
    prompt = speech.decoder_prompt(model.tokenizer, language, task, request.prompt, timestamps=segmented)
    engine_reqs = [
        model.engine.process(prompt, params, ctx.engine_id if len(audio.chunks) == 1 else f"{ctx.engine_id}-{i}",
                             encoder_input=chunk.mel)
        for i, chunk in enumerate(audio.chunks)
    ]  # fmt: skip
    separator = chunk_separator("en" if task == "translate" else language)
    if request.stream:
        chunks = _stream(request, model, engine_reqs, audio, separator, task, ctx)
        return StreamingResponse(sse_stream(chunks), media_type="text/event-stream")
    return await _whole(request, model, engine_reqs, audio, language, separator, task, ctx)


def _check_options(request: SpeechRequest) -> None:
    """What the form allows but this server does not do, or vLLM refuses: 400 naming the field."""
    if request.use_beam_search:
        raise APIError("Beam search is not supported for speech models by jaxserve.", param="use_beam_search")
    if "word" in request.timestamp_granularities:
        raise APIError(
            "Word timestamps are not supported yet: `timestamp_granularities[]` takes only `segment`.",
            param="timestamp_granularities[]",
        )
    if not request.stream:
        for option in STREAM_OPTIONS:
            if getattr(request, option):
                raise APIError("Stream options can only be defined when `stream=True`.", param=option)
    elif request.response_format in SEGMENT_FORMATS:
        raise APIError(f"{request.response_format} format doesn't support streaming case", param="response_format")


async def _read_upload(file: UploadFile) -> bytes:
    """The upload's bytes; over `VLLM_MAX_AUDIO_CLIP_FILESIZE_MB` a 413, decided from the size the form parser
    recorded, or else after reading at most the limit and one byte."""
    limit = max_audio_filesize_mb() * 1024**2
    try:
        if file.size is not None:
            check_audio_size(file.size)
        data = await file.read(limit + 1)
        check_audio_size(len(data))
    except AudioTooLargeError as exc:
        raise _too_large(exc) from None
    return data


def _too_large(exc: AudioTooLargeError) -> APIError:
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    return APIError(str(exc), status, status.phrase, param=exc.parameter)


def _prepare(data: bytes, filename: str | None, speech: SpeechModel) -> SpeechAudio:
    """Decode and split the upload (in a worker thread); what cannot be transcribed is a 400 naming the problem,
    what is over a limit a 413."""
    try:
        return prepare_audio(data, filename, speech.num_mel_bins)
    except AudioTooLargeError as exc:
        raise _too_large(exc) from None
    except AudioDecodeError as exc:
        raise APIError(str(exc), param="file") from None


async def _detect_language(model: ServedModel, speech: SpeechModel, audio: SpeechAudio, ctx: RequestContext) -> str:
    """The language spoken in the first chunk: one greedy token among the language tokens (vLLM's detection)."""
    prompt, params = speech.language_detection()
    request = model.engine.process(prompt, params, f"{ctx.engine_id}-lang", encoder_input=audio.chunks[0].mel)
    tokens = []
    async for _, output in generate_all(model, [request], ctx):
        tokens += output.outputs[0].token_ids
    return speech.detected_language(tokens[0])


def _sampling_params(request: SpeechRequest, model: ServedModel, segmented: bool) -> SamplingParams:
    """vLLM's speech sampling: the request's values, else the model's generation_config, else OpenAI's defaults;
    temperature 0 unless asked. The output cap is `max_completion_tokens` (at most the context), else whatever the
    context leaves after the prompt. Segments come from timestamps (`return_timestamps`); they and the temperature
    fallback (greedy and whole) read each sampled token's logprob (`logprobs=0`)."""
    defaults = model.sampling_defaults

    def pick(value: float | None, key: str, fallback: float) -> float:
        return value if value is not None else defaults.get(key, fallback)

    max_tokens = request.max_completion_tokens
    if max_tokens is not None:
        max_tokens = min(max_tokens, model.max_model_len)
    if model.max_tokens_cap is not None:
        max_tokens = model.max_tokens_cap if max_tokens is None else min(max_tokens, model.max_tokens_cap)
    return SamplingParams(
        temperature=request.temperature,
        top_p=pick(request.top_p, "top_p", 1.0),
        top_k=pick(request.top_k, "top_k", 0),
        min_p=pick(request.min_p, "min_p", 0.0),
        repetition_penalty=pick(request.repetition_penalty, "repetition_penalty", 1.0),
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        seed=request.seed,
        max_tokens=max_tokens,
        logprobs=0 if segmented or (request.temperature == 0 and not request.stream) else None,
        return_timestamps=segmented,
        output_kind=RequestOutputKind.DELTA,
    )


async def _whole(
    request: SpeechRequest,
    model: ServedModel,
    engine_reqs: list[EngineRequest],
    audio: SpeechAudio,
    language: str,
    separator: str,
    task: Task,
    ctx: RequestContext,
) -> Response:
    chunks = await _transcripts(model, engine_reqs, ctx)
    temperatures = [request.temperature] * len(chunks)
    if request.temperature == 0:
        for temperature in FALLBACK_TEMPERATURES:
            failed = [i for i, chunk in enumerate(chunks) if chunk.needs_fallback(model.speech, model.tokenizer)]
            if not failed:
                break
            again = [
                model.engine.process(
                    engine_reqs[i].prompt_token_ids, engine_reqs[i].params.clone(temperature=temperature),
                    f"{ctx.engine_id}-{i}-t{temperature}", encoder_input=engine_reqs[i].encoder_input,
                )
                for i in failed
            ]  # fmt: skip
            for i, chunk in zip(failed, await _transcripts(model, again, ctx)):
                chunks[i], temperatures[i] = chunk, temperature
    fmt = request.response_format
    seconds = DurationUsage(seconds=math.ceil(audio.duration_s))
    if fmt not in SEGMENT_FORMATS:
        text = join_transcripts([chunk.text for chunk in chunks], separator)
        if fmt == "text":
            return Response(text, media_type=TEXT_MEDIA_TYPES[fmt])
        return json_response(
            TranscriptionResponse(text=text, usage=seconds) if task == "transcribe" else TranslationResponse(text=text)
        )
    segments, texts = [], []
    for transcript, chunk, temperature in zip(chunks, audio.chunks, temperatures):
        found = transcript.segments(len(segments), chunk, temperature, model.speech, model.tokenizer)
        segments += found
        texts.append("".join(segment.text for segment in found))
    text = join_transcripts(texts, separator)
    if fmt == "srt":
        return Response(to_srt(segments), media_type=TEXT_MEDIA_TYPES[fmt])
    if fmt == "vtt":
        return Response(to_vtt(segments), media_type=TEXT_MEDIA_TYPES[fmt])
    if task == "translate":
        return json_response(TranslationVerboseResponse(duration=audio.duration_s, text=text, segments=segments))
    verbose = TranscriptionVerboseResponse(
        language=language_name(language), duration=audio.duration_s, text=text, segments=segments, usage=seconds
    )
    return json_response(verbose)


async def _transcripts(
    model: ServedModel, engine_reqs: list[EngineRequest], ctx: RequestContext
) -> list[ChunkTranscript]:
    """Each request's whole output (the requests run together)."""
    chunks = [ChunkTranscript() for _ in engine_reqs]
    async for i, output in generate_all(model, engine_reqs, ctx):
        chunks[i].add(output.outputs[0])
    return chunks


async def _in_chunk_order(
    outputs: AsyncIterator[tuple[int, RequestOutput]], count: int
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of `count` concurrent requests reordered: every output of request 0 until it finishes, then
    request 1's (those that arrived meanwhile first), and so on; the engine runs them all at once."""
    waiting: dict[int, collections.deque[RequestOutput]] = {i: collections.deque() for i in range(count)}
    current = 0
    async for index, output in outputs:
        waiting[index].append(output)
        while current < count and waiting[current]:
            ready = waiting[current].popleft()
            yield current, ready
            if ready.finished:
                current += 1


async def _stream(
    request: SpeechRequest,
    model: ServedModel,
    engine_reqs: list[EngineRequest],
    audio: SpeechAudio,
    separator: str,
    task: Task,
    ctx: RequestContext,
) -> AsyncIterator[str]:
    """Deltas of chunk 0, then of chunk 1, ...; each chunk's last delta carries its finish reason (vLLM's stream).
    Usage counts vLLM's way: every chunk's decoder prompt and the audio's log-mel frames as prompt tokens."""
    chunk_class = TranscriptionStreamResponse if task == "transcribe" else TranslationStreamResponse
    include_usage = ctx.settings.enable_force_include_usage or bool(request.stream_include_usage)
    continuous = include_usage and bool(request.stream_continuous_usage_stats)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in engine_reqs) + audio_frames(audio.duration_s)
    completion_tokens = 0
    joiner = TranscriptJoiner(separator)
    async for _, output in _in_chunk_order(generate_all(model, engine_reqs, ctx), len(engine_reqs)):
        out = output.outputs[0]
        completion_tokens += len(out.token_ids)
        text = joiner.add(out.text)
        if out.finished:
            joiner.end_chunk()
        elif not text:
            continue
        choice = SpeechStreamChoice(delta=SpeechDelta(content=text), finish_reason=out.finish_reason)
        if out.finished:
            choice.stop_reason = out.stop_reason
        chunk = chunk_class(id=ctx.response_id, created=ctx.created, model=model.name, choices=[choice])
        if continuous:
            chunk.usage = usage(prompt_tokens, completion_tokens)
        yield sse(chunk)
    if include_usage:
        final = usage(prompt_tokens, completion_tokens)
        yield sse(chunk_class(id=ctx.response_id, created=ctx.created, model=model.name, choices=[], usage=final))
