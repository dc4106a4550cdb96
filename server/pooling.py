"""The pooling routes: /v1/embeddings (and Cohere's /v2/embed), /pooling, /classify, /score (/v1/score) and
/rerank (/v1, /v2).

Each request's inputs become `PoolingPrompt`s off the event loop (tokenized, or rendered through the chat
template first), go to the engine together as separate engine requests, and come back as one response."""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import ml_dtypes
import numpy as np
from fastapi.responses import Response

from jaxserve.inputs import batch_prompts
from jaxserve.pooling_params import PoolingParams, PoolingPrompt
from jaxserve.scoring import pair_up

from .chat import check_template_trust, render_chat_prompt
from .context import RequestContext
from .errors import APIError
from .generation import json_response, usage
from .pooling_protocol import (
    ClassificationData,
    ClassificationRequest,
    CohereEmbeddings,
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereMeta,
    CohereTokens,
    EmbeddingData,
    EmbeddingRequest,
    EncodingFields,
    ListResponse,
    PoolingData,
    PoolingInputFields,
    PoolingRequest,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoringFields,
)
from .protocol import ChatTemplateFields
from .served_models import ServedModel

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


# --- inputs and the engine ------------------------------------------------------------------------------------


def _prepare(request: PoolingInputFields, model: ServedModel, default_kwargs: dict) -> list[PoolingPrompt]:
    """Every input of the request as a pooling prompt. Runs off the event loop."""
    truncation = {"truncate_prompt_tokens": request.truncate_prompt_tokens, "truncation_side": request.truncation_side}
    if request.messages is not None:
        messages = request.messages
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not conversations or not all(conversations):
            raise APIError("messages must not be empty.", param="messages")
        prompts = []
        for conversation in conversations:
            fields = ChatTemplateFields(
                messages=conversation,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                add_special_tokens=bool(request.add_special_tokens),
                chat_template=request.chat_template,
                chat_template_kwargs=request.chat_template_kwargs,
            )
            rendered = render_chat_prompt(model, fields, default_kwargs)
            prompts.append(model.engine.prepare(rendered.token_ids, **truncation))
        return prompts
    try:
        raw = batch_prompts(request.input)
    except ValueError as exc:
        raise APIError(str(exc), param="input") from None
    if request.add_special_tokens is False:
        raw = [
            model.tokenizer.encode(item, add_special_tokens=False) if isinstance(item, str) else item for item in raw
        ]
    return [model.engine.prepare(item, **truncation) for item in raw]


async def _pool(
    model: ServedModel, prompts: list[PoolingPrompt], params: PoolingParams, ctx: RequestContext
) -> list[np.ndarray]:
    """The pooled outputs of `prompts`, in order. Every input is validated before any is sent."""
    requests = [
        model.engine.process(
            p.token_ids, params, f"{ctx.engine_id}-{i}", token_type_ids=p.token_type_ids, start_offset=p.start_offset
        )
        for i, p in enumerate(prompts)
    ]
    recorder = ctx.metrics.start_request(model.name, sum(len(p.token_ids) for p in prompts))
    finish_reason = "abort"
    try:
        outputs = await asyncio.gather(*(model.engine.encode_request(r) for r in requests))
        finish_reason = "stop"
        for output in outputs:
            if output.metrics is not None:
                recorder.engine_finished(output.metrics, pooling=True)
    finally:
        recorder.finish(finish_reason)
    return [output.outputs.data for output in outputs]


async def _inputs(request: PoolingInputFields, model: ServedModel, ctx: RequestContext) -> list[PoolingPrompt]:
    if request.messages is not None:
        check_template_trust(request.chat_template, ctx.settings.trust_request_chat_template)
    return await asyncio.to_thread(_prepare, request, model, ctx.settings.default_chat_template_kwargs)


def _usage(prompts: list[PoolingPrompt]):
    return usage(sum(len(p.token_ids) for p in prompts), 0)


# --- encodings ------------------------------------------------------------------------------------------------


def _raw_bytes(data: np.ndarray, encoding: EncodingFields) -> bytes:
    array = np.ascontiguousarray(data, dtype=np.float32).astype(DTYPES[encoding.embed_dtype])
    native = sys.byteorder
    if encoding.endianness != "native" and encoding.endianness != native:
        array = array.byteswap()
    return array.tobytes()


def _encoded(data: np.ndarray, encoding: EncodingFields) -> list | str:
    if encoding.encoding_format == "float":
        return data.tolist()
    return base64.b64encode(_raw_bytes(data, encoding)).decode()


def _bytes_response(body: ListResponse, arrays: list[np.ndarray], encoding: EncodingFields) -> Response:
    """`bytes` / `bytes_only`: the raw arrays back to back; `bytes` adds their layout in a `metadata` header."""
    chunks, items, offset = [], [], 0
    for index, array in enumerate(arrays):
        raw = _raw_bytes(array, encoding)
        chunks.append(raw)
        items.append(
            {
                "index": index,
                "embed_dtype": encoding.embed_dtype,
                "endianness": encoding.endianness,
                "start": offset,
                "end": offset + len(raw),
                "shape": list(array.shape),
            }
        )
        offset += len(raw)
    headers = {}
    if encoding.encoding_format == "bytes":
        metadata = {
            "id": body.id,
            "created": body.created,
            "model": body.model,
            "data": items,
            "usage": {"prompt_tokens": body.usage.prompt_tokens, "total_tokens": body.usage.total_tokens},
        }
        headers["metadata"] = json.dumps(metadata)
    return Response(b"".join(chunks), media_type="application/octet-stream", headers=headers)


def _list_response(
    ctx: RequestContext, model: ServedModel, prompts, arrays: list[np.ndarray], encoding: EncodingFields, item
) -> Response:
    """An embeddings or pooling list response in the requested encoding; `item(index, encoded)` makes a row."""
    body = ListResponse(id=ctx.response_id, created=ctx.created, model=model.name, data=[], usage=_usage(prompts))
    if encoding.encoding_format in ("bytes", "bytes_only"):
        return _bytes_response(body, arrays, encoding)
    body.data = [item(i, _encoded(array, encoding)) for i, array in enumerate(arrays)]
    return json_response(body)


# --- routes ---------------------------------------------------------------------------------------------------


async def create_embedding(request: EmbeddingRequest, model: ServedModel, ctx: RequestContext) -> Response:
    task = "token_embed" if model.default_pooling_task == "token_embed" else "embed"
    model.check_task(task)
    params = PoolingParams(task=task, dimensions=request.dimensions, use_activation=request.activation)
    prompts = await _inputs(request, model, ctx)
    if task == "embed" and model.chunked_embed_len is not None:
        arrays = await _pool_in_windows(model, prompts, params, ctx)
    else:
        arrays = await _pool(model, prompts, params, ctx)
    return _list_response(ctx, model, prompts, arrays, request, lambda i, e: EmbeddingData(index=i, embedding=e))


async def _pool_in_windows(
    model: ServedModel, prompts: list[PoolingPrompt], params: PoolingParams, ctx: RequestContext
) -> list[np.ndarray]:
    """vLLM's chunked processing (`--pooler-config` enable_chunked_processing): each input in consecutive windows
    of the model's length, each window embedded as an input of its own, and the input's embedding the windows'
    mean weighted by their token counts (not normalized again)."""
    windows, owners = [], []
    for index, prompt in enumerate(prompts):
        ids = prompt.token_ids
        if len(ids) > model.chunked_embed_len:
            raise APIError(
                f"This model's maximum embedding input length is {model.chunked_embed_len} tokens. However, you "
                f"requested {len(ids)} tokens in the input for embedding generation. Please reduce the length of "
                "the input.",
                param="input",
            )
        for start in range(0, max(len(ids), 1), model.max_model_len):
            end = start + model.max_model_len
            types = prompt.token_type_ids[start:end] if prompt.token_type_ids is not None else None
            windows.append(PoolingPrompt(ids[start:end], types, max(0, prompt.start_offset - start)))
            owners.append(index)
    pooled = await _pool(model, windows, params, ctx)
    sums = [np.zeros_like(pooled[0], dtype=np.float64) for _ in prompts]
    counts = [0] * len(prompts)
    for owner, window, vector in zip(owners, windows, pooled):
        sums[owner] += vector.astype(np.float64) * len(window.token_ids)
        counts[owner] += len(window.token_ids)
    return [(total / count).astype(np.float32) for total, count in zip(sums, counts)]


def default_pooling_task(model: ServedModel) -> str:
    """/pooling without a task: the token-level output where the model has one (multi-vector embeddings,
    per-token rewards), else its sequence output."""
    if "token_embed" in model.pooling_tasks:
        return "token_embed"
    return model.default_pooling_task


async def create_pooling(request: PoolingRequest, model: ServedModel, ctx: RequestContext) -> Response:
    params = PoolingParams(
        task=request.task or default_pooling_task(model),
        dimensions=request.dimensions,
        use_activation=request.activation,
    )
    model.check_task(params.task)
    prompts = await _inputs(request, model, ctx)
    arrays = await _pool(model, prompts, params, ctx)
    return _list_response(ctx, model, prompts, arrays, request, lambda i, e: PoolingData(index=i, data=e))


async def create_classification(request: ClassificationRequest, model: ServedModel, ctx: RequestContext) -> Response:
    model.check_task("classify")
    params = PoolingParams(task="classify", use_activation=request.activation)
    prompts = await _inputs(request, model, ctx)
    arrays = await _pool(model, prompts, params, ctx)
    data = [
        ClassificationData(
            index=i,
            label=model.id2label.get(int(np.argmax(probs))),
            probs=probs.tolist(),
            num_classes=len(probs),
        )
        for i, probs in enumerate(arrays)
    ]
    return json_response(
        ListResponse(id=ctx.response_id, created=ctx.created, model=model.name, data=data, usage=_usage(prompts))
    )


async def _scores(
    request: ScoringFields, model: ServedModel, queries, documents: list[str], ctx: RequestContext
) -> tuple[list[float], int]:
    """Scores of the pairs of `queries` (one, or one per document) and `documents`, and the tokens pooled."""
    if not model.can_score:
        raise APIError(
            f"The model `{model.name}` does not support the Score API (it needs an embedding model or a "
            f"classifier with one label; its tasks are: {', '.join(model.pooling_tasks)}).",
            param="model",
        )
    for field in ("max_tokens_per_query", "max_tokens_per_doc"):
        limit = getattr(request, field)
        if limit is not None and limit <= 0:
            raise APIError(f"{field} must be a positive integer", param=field)
        if limit is not None and limit >= model.max_model_len:
            raise APIError(f"{field} ({limit}) must be less than max_model_len ({model.max_model_len}).", param=field)

    def cut(texts, limit: int | None):
        """Each text cut to its first `limit` tokens (vLLM's max_tokens_per_query / max_tokens_per_doc)."""
        if not limit:
            return texts
        if isinstance(texts, str):
            return model.tokenizer.truncate_text(texts, limit)
        return [model.tokenizer.truncate_text(text, limit) for text in texts]

    def plan():
        pairs = pair_up(cut(queries, request.max_tokens_per_query), cut(documents, request.max_tokens_per_doc))
        return model.engine.plan_scores(pairs, request.truncate_prompt_tokens, request.instruction)

    score_plan = await asyncio.to_thread(plan)
    params = PoolingParams(task=score_plan.task, use_activation=request.activate)
    pooled = await _pool(model, score_plan.prompts, params, ctx)
    return score_plan.scores(pooled), score_plan.num_prompt_tokens


async def create_score(request: ScoreRequest, model: ServedModel, ctx: RequestContext) -> Response:
    queries, documents = request.sides()
    documents = [documents] if isinstance(documents, str) else documents
    scores, num_tokens = await _scores(request, model, queries, documents, ctx)
    data = [ScoreData(index=i, score=score) for i, score in enumerate(scores)]
    return json_response(
        ListResponse(id=ctx.response_id, created=ctx.created, model=model.name, data=data, usage=usage(num_tokens, 0))
    )


async def create_rerank(request: RerankRequest, model: ServedModel, ctx: RequestContext) -> Response:
    texts = [d if isinstance(d, str) else d.get("text") for d in request.documents]
    if any(not isinstance(t, str) for t in texts):
        raise APIError('documents must be strings or objects with a "text" string.', param="documents")
    scores, num_tokens = await _scores(request, model, request.query, texts, ctx)
    order = sorted(range(len(texts)), key=lambda i: -scores[i])
    if 0 < request.top_n < len(order):
        order = order[: request.top_n]
    results = [
        RerankResult(
            index=i,
            document=RerankDocument(text=texts[i]) if request.return_documents else None,
            relevance_score=scores[i],
        )
        for i in order
    ]
    return json_response(
        RerankResponse(
            id=ctx.response_id,
            model=model.name,
            usage=RerankUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
            results=results,
        )  # fmt: skip
    )


def _cohere_inputs(request: CohereEmbedRequest, model: ServedModel) -> EmbeddingRequest:
    """The /v1/embeddings request a /v2/embed request amounts to: its texts (or one-message chats of its content
    parts) behind the prefix `input_type` selects, truncated as `truncate` says."""
    given = [name for name in ("texts", "images", "inputs") if getattr(request, name) is not None]
    if len(given) != 1:
        raise APIError("Exactly one of texts, images, or inputs must be provided.")
    images = request.images or [part for item in request.inputs or [] for part in item.content if part.type != "text"]
    if images:
        raise APIError(f"The model `{model.name}` reads text only: image inputs are not supported.", param=given[0])
    prefix = ""
    if request.input_type is not None:
        if request.input_type not in model.input_type_prompts:
            supported = ", ".join(sorted(model.input_type_prompts))
            raise APIError(
                f"Unsupported input_type {request.input_type!r}. "
                + (f"Supported values: {supported}" if supported else "This model defines no input_type prefixes."),
                param="input_type",
            )
        prefix = model.input_type_prompts[request.input_type]
    truncation = {}
    if request.truncate != "NONE":
        side = "left" if request.truncate == "START" else "right"
        truncation = {"truncate_prompt_tokens": request.max_tokens or -1, "truncation_side": side}
    fields = {"model": request.model, "dimensions": request.output_dimension, "priority": request.priority}
    if request.texts is not None:
        return EmbeddingRequest(input=[prefix + text for text in request.texts], **fields, **truncation)
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": prefix + (part.text or "")} for part in item.content]}]
        for item in request.inputs
    ]
    return EmbeddingRequest(messages=conversations, **fields, **truncation)


def _typed_embeddings(arrays: list[np.ndarray], types: list[str]) -> CohereEmbeddings:
    matrix = np.stack(arrays).astype(np.float32) if arrays else np.zeros((0, 0), np.float32)
    typed: dict[str, list] = {}
    if "float" in types:
        typed["float"] = matrix.tolist()
    if {"binary", "ubinary"} & set(types):
        if matrix.shape[1] % 8:
            raise APIError(
                f"Embedding dimension must be a multiple of 8 for binary embedding types, but got {matrix.shape[1]}.",
                param="embedding_types",
            )
        packed = np.packbits(matrix >= 0, axis=1)  # the first dimension in the highest bit
        if "ubinary" in types:
            typed["ubinary"] = packed.tolist()
        if "binary" in types:
            typed["binary"] = (packed.astype(np.int16) - 128).tolist()
    if "base64" in types:
        little = matrix.astype("<f4")
        typed["base64"] = [base64.b64encode(row.tobytes()).decode() for row in little]
    return CohereEmbeddings(**typed)


async def create_cohere_embedding(request: CohereEmbedRequest, model: ServedModel, ctx: RequestContext) -> Response:
    """Cohere's /v2/embed over the embeddings pipeline, as vLLM serves it."""
    model.check_task("embed")
    embedding = _cohere_inputs(request, model)
    prompts = await _inputs(embedding, model, ctx)
    if request.truncate == "NONE" and request.max_tokens is not None:
        longest = max((len(p.token_ids) for p in prompts), default=0)
        if longest > request.max_tokens:
            raise APIError(
                f"Input of {longest} tokens exceeds max_tokens={request.max_tokens} with truncate=NONE. "
                "Set truncate to END or START to allow truncation.",
                param="max_tokens",
            )
    params = PoolingParams(task="embed", dimensions=request.output_dimension)
    arrays = await _pool(model, prompts, params, ctx)
    tokens = CohereTokens(input_tokens=sum(len(p.token_ids) for p in prompts))
    body = CohereEmbedResponse(
        id=ctx.response_id,
        embeddings=_typed_embeddings(arrays, request.embedding_types or ["float"]),
        texts=request.texts,
        meta=CohereMeta(tokens=tokens, billed_units=tokens),
    )
    return Response(body.model_dump_json(by_alias=True, exclude_none=True), media_type="application/json")
