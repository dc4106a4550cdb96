"""The FastAPI app: routes, middleware and error handlers over a registry of served models.

build_app(ModelRegistry, ServerSettings) → FastAPI
  /v1/completions, /v1/chat/completions        → completions.py, chat.py (generation models)
  /v1/responses (and GET .../{id})              → responses.py (generation models, through chat.py)
  /v1/embeddings, /pooling, /classify, /score, /rerank → pooling.py (pooling models)
  /v1/audio/transcriptions, /v1/audio/translations → speech.py (speech-to-text models: Whisper)
  /tokenize, /detokenize, /v1/models            → here (every model)
  /health, /ping, /version, /load, /metrics     → here
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, TypeVar

from fastapi import Body, Depends, FastAPI, Form, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse

from .chat import check_template_trust, create_chat_completion, render_chat_prompt
from .completions import create_completion
from .context import RequestContext, random_id
from .errors import APIError, install_error_handlers
from .metrics import ServerMetrics
from .middleware import AuthMiddleware, RequestBodyMiddleware, RequestIdMiddleware, RootPathMiddleware
from .openapi import install_openapi, ok
from .pooling import (
    create_classification,
    create_cohere_embedding,
    create_embedding,
    create_pooling,
    create_rerank,
    create_score,
)
from .pooling_protocol import (
    ClassificationRequest,
    CohereEmbedRequest,
    CohereEmbedResponse,
    EmbeddingRequest,
    ListResponse,
    PoolingRequest,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
)
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from .responses import ResponseStore, create_response
from .responses_protocol import ResponsesRequest, ResponsesResponse
from .served_models import ModelRegistry, Runner, ServedModel
from .settings import ServerSettings
from .speech import TEXT_MEDIA_TYPES, create_transcription, create_translation, transcribes
from .speech_protocol import (
    SpeechRequest,
    TranscriptionResponse,
    TranscriptionStreamResponse,
    TranscriptionVerboseResponse,
    TranslationResponse,
    TranslationStreamResponse,
    TranslationVerboseResponse,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)


def jaxserve_version() -> str:
    try:
        return version("jaxserve")
    except PackageNotFoundError:
        return "0.0.0"


@dataclasses.dataclass
class ServerState:
    registry: ModelRegistry
    settings: ServerSettings
    metrics: ServerMetrics
    responses: ResponseStore  # what /v1/responses stored


def state_of(raw: Request) -> ServerState:
    return raw.app.state.server


async def require_json(raw: Request) -> None:
    """vLLM's media-type check on JSON routes: 400, not 415."""
    content_type = raw.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError("1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed")


async def until_disconnect(raw: Request, work: Awaitable[T]) -> T | Response:
    """Run `work`, cancelling it if the client goes away first (which aborts its engine requests)."""

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)


def build_app(registry: ModelRegistry, settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics(lambda: {m.name: m.engine.replica_stats() for m in registry.models})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.launched_at is not None:
            report_startup(time.time() - settings.launched_at, registry, metrics)
        yield

    app = FastAPI(title="jaxserve", version=jaxserve_version(), lifespan=lifespan)
    app.state.server = ServerState(registry, settings, metrics, ResponseStore(settings.max_stored_responses))
    install_error_handlers(app)
    streams = (
        CompletionStreamResponse,
        ChatCompletionStreamResponse,
        TranscriptionStreamResponse,
        TranslationStreamResponse,
    )
    install_openapi(app, stream_models=streams)
    if registry.any(_is_generative):
        _add_generation_routes(app)
    if registry.any(lambda model: model.runner == "pooling"):
        _add_pooling_routes(app, registry)
    if registry.any(transcribes):
        _add_speech_routes(app)
    _add_invocations_route(app)
    _add_utility_routes(app)
    if settings.enable_tokenizer_info_endpoint:
        _add_tokenizer_info_route(app)
    # the last added is the outermost: the root path, request ids (on every response, 401 and 413 included), then auth (before
    # any body is read), then the body (its size limit and deadline), then CORS
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_methods=settings.allowed_methods,
        allow_headers=settings.allowed_headers,
        allow_credentials=settings.allow_credentials,
    )
    app.add_middleware(
        RequestBodyMiddleware, max_bytes=settings.max_request_bytes, timeout_s=settings.request_body_timeout
    )
    if settings.api_keys:
        app.add_middleware(
            AuthMiddleware,
            api_keys=settings.api_keys,
            all_routes=settings.api_key_all_routes,
        )
    if settings.enable_request_id_headers:
        app.add_middleware(RequestIdMiddleware)
    if settings.root_path:
        app.add_middleware(RootPathMiddleware, root_path=settings.root_path)
    return app


def report_startup(seconds: float, registry: ModelRegistry, metrics: ServerMetrics) -> None:
    """Log how long start-up took, split by model into loading and compiling, and export the total."""
    metrics.startup_seconds.set(seconds)
    for model in registry.models:
        stats = model.engine.stats()
        logger.info(
            "%s: weights loaded in %.1f s, %d of %d buckets compiled in %.1f s%s",
            model.name, stats.load_seconds, stats.buckets_compiled, stats.buckets_total, stats.compile_seconds,
            "" if stats.buckets_compiled == stats.buckets_total else " (the rest compile in the background)",
        )  # fmt: skip
    logger.info("Ready in %.1f s after launch", seconds)


async def _serve(
    raw: Request,
    body,
    runner: Runner,
    api: str,
    prefix: str,
    create,
    supports: Callable[[ServedModel], bool] | None = None,
) -> Response:
    """Find the model, admit the request (503 when its queue is full), run `create` until the client leaves,
    and count the request out when its response (streamed or whole) is done."""
    state = state_of(raw)
    model = state.registry.get(body.model, runner, api, supports)
    release = model.admit(state.settings.max_num_queued_reqs)
    try:
        ctx = RequestContext.of(raw, prefix, getattr(body, "request_id", None))  # the speech forms have none
        response = await until_disconnect(raw, create(body, model, ctx))
    except BaseException:
        release()
        raise
    if isinstance(response, StreamingResponse):
        response.body_iterator = _then(response.body_iterator, release)
    else:
        release()
    return response


async def _then(chunks: AsyncIterator, done: Callable[[], None]) -> AsyncIterator:
    """`chunks`, then `done()` however the stream ends."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        done()


JSON_BODY = [Depends(require_json)]
MULTIPART = "multipart/form-data"  # the speech forms: FastAPI would document a form model as urlencoded


def _is_generative(model: ServedModel) -> bool:
    """A text generation model; a speech-to-text one (Whisper) generates only from audio, as vLLM's
    transcription-only models, and serves only the speech routes."""
    return model.runner == "generate" and not transcribes(model)


def _embeds(model: ServedModel) -> bool:
    return bool({"embed", "token_embed"} & set(model.pooling_tasks))


def _classifies(model: ServedModel) -> bool:
    return "classify" in model.pooling_tasks


def _scores(model: ServedModel) -> bool:
    return model.runner == "pooling" and model.can_score


def _add_generation_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/completions", dependencies=JSON_BODY, responses=ok(CompletionResponse, streams=(CompletionStreamResponse,))
    )
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await _serve(raw, body, "generate", "Completions API", "cmpl", create_completion, _is_generative)

    @app.post("/v1/responses", dependencies=JSON_BODY, responses=RESPONSES_API_RESPONSES)
    async def responses(body: ResponsesRequest, raw: Request) -> Response:
        create = functools.partial(create_response, store=state_of(raw).responses)
        return await _serve(raw, body, "generate", "Responses API", "resp", create, _is_generative)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, raw: Request) -> ResponsesResponse:
        return state_of(raw).responses.get(response_id).response

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str, raw: Request) -> ResponsesResponse:
        state_of(raw).responses.get(response_id)  # 404 for an unknown id
        raise APIError("Cannot cancel a synchronous response.", param="response_id")

    @app.post(
        "/v1/chat/completions",
        dependencies=JSON_BODY,
        responses=ok(ChatCompletionResponse, streams=(ChatCompletionStreamResponse,)),
    )
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await _serve(
            raw, body, "generate", "Chat Completions API", "chatcmpl", create_chat_completion, _is_generative
        )


def _add_pooling_routes(app: FastAPI, registry: ModelRegistry) -> None:
    """Only the routes some served model can answer, as vLLM registers them by task; others are 404."""

    @app.post("/pooling", dependencies=JSON_BODY, responses=ok(ListResponse, binary=True))
    async def pooling(body: PoolingRequest, raw: Request) -> Response:
        return await _serve(raw, body, "pooling", "Pooling API", "pool", create_pooling)

    if registry.any(_embeds):

        @app.post("/v1/embeddings", dependencies=JSON_BODY, responses=ok(ListResponse, binary=True))
        async def embeddings(body: EmbeddingRequest, raw: Request) -> Response:
            return await _serve(raw, body, "pooling", "Embeddings API", "embd", create_embedding, _embeds)

        @app.post("/v2/embed", dependencies=JSON_BODY, responses=ok(CohereEmbedResponse))
        async def cohere_embed(body: CohereEmbedRequest, raw: Request) -> Response:
            return await _serve(raw, body, "pooling", "Cohere Embed API", "embd", create_cohere_embedding, _embeds)

    if registry.any(_classifies):

        @app.post("/classify", dependencies=JSON_BODY, responses=ok(ListResponse))
        async def classify(body: ClassificationRequest, raw: Request) -> Response:
            return await _serve(
                raw, body, "pooling", "Classification API", "classify", create_classification, _classifies
            )

    if registry.any(_scores):

        async def score(body: ScoreRequest, raw: Request) -> Response:
            return await _serve(raw, body, "pooling", "Score API", "score", create_score, _scores)

        async def rerank(body: RerankRequest, raw: Request) -> Response:
            return await _serve(raw, body, "pooling", "Rerank API", "score", create_rerank, _scores)

        for handler, paths, answer in (
            (score, ("/score", "/v1/score"), ListResponse),
            (rerank, ("/rerank", "/v1/rerank", "/v2/rerank"), RerankResponse),
        ):
            for path in paths:
                app.add_api_route(
                    path,
                    handler,
                    methods=["POST"],
                    dependencies=JSON_BODY,
                    operation_id=f"{handler.__name__}{path}",
                    responses=ok(answer),
                )


def _add_speech_routes(app: FastAPI) -> None:
    """Speech to text, as multipart/form-data: only when some served model transcribes (vLLM registers them for
    models with the transcription task)."""

    @app.post(
        "/v1/audio/transcriptions",
        responses=ok(
            TranscriptionResponse,
            TranscriptionVerboseResponse,
            streams=(TranscriptionStreamResponse,),
            text=tuple(TEXT_MEDIA_TYPES.values()),
        ),
    )
    async def transcriptions(body: Annotated[SpeechRequest, Form(media_type=MULTIPART)], raw: Request) -> Response:
        return await _serve(raw, body, "generate", "Transcriptions API", "trsc", create_transcription, transcribes)

    @app.post(
        "/v1/audio/translations",
        responses=ok(
            TranslationResponse,
            TranslationVerboseResponse,
            streams=(TranslationStreamResponse,),
            text=tuple(TEXT_MEDIA_TYPES.values()),
        ),
    )
    async def translations(body: Annotated[SpeechRequest, Form(media_type=MULTIPART)], raw: Request) -> Response:
        return await _serve(raw, body, "generate", "Translations API", "trsl", create_translation, transcribes)


# the Responses API streams typed events (`event: <type>` and a JSON `data`), not chunks of one model
RESPONSES_API_RESPONSES = {
    200: {
        "model": ResponsesResponse,
        "description": "Successful Response",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "event": {"type": "string"},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                }
            }
        },
    }
}
INVOCATION_RESPONSES = ok(
    CompletionResponse,
    ChatCompletionResponse,
    ListResponse,
    RerankResponse,
    streams=(CompletionStreamResponse, ChatCompletionStreamResponse),
    binary=True,
)


def _add_invocations_route(app: FastAPI) -> None:
    """`POST /invocations` (SageMaker): one route for every API, picked by the body's shape as vLLM picks it:
    `messages` is a chat (an embedding of the conversation for a pooling model), `prompt` a completion, `input`
    an embedding (a classification for a classifier, pooling otherwise), `query` with `documents` a rerank, and
    `queries` / `text_1` / `data_1` a score."""

    @app.post("/invocations", dependencies=JSON_BODY, responses=INVOCATION_RESPONSES)
    async def invocations(raw: Request) -> Response:
        body = await raw.json()
        if not isinstance(body, dict):
            raise APIError("The body of /invocations must be a JSON object.")
        model = state_of(raw).registry.get(body.get("model"))
        pooling = model.runner == "pooling"
        if "messages" in body and not pooling:
            route = (ChatCompletionRequest, "generate", "Chat Completions API", "chatcmpl", create_chat_completion)
        elif "prompt" in body and not pooling:
            route = (CompletionRequest, "generate", "Completions API", "cmpl", create_completion)
        elif "query" in body and "documents" in body:
            route = (RerankRequest, "pooling", "Rerank API", "score", create_rerank)
        elif any(key in body for key in ("queries", "text_1", "data_1")):
            route = (ScoreRequest, "pooling", "Score API", "score", create_score)
        elif ("input" in body or "messages" in body) and pooling:
            if _embeds(model):
                route = (EmbeddingRequest, "pooling", "Embeddings API", "embd", create_embedding)
            elif _classifies(model):
                route = (ClassificationRequest, "pooling", "Classification API", "classify", create_classification)
            else:
                route = (PoolingRequest, "pooling", "Pooling API", "pool", create_pooling)
        else:
            raise APIError("Cannot find a suitable handler for the request: give `messages`, `prompt`, `input`, "
                           "`query` and `documents`, or `queries` and `documents`.")  # fmt: skip
        kind, runner, api, prefix, create = route
        return await _serve(raw, kind.model_validate(body), runner, api, prefix, create)


def _add_tokenizer_info_route(app: FastAPI) -> None:
    @app.get("/tokenizer_info")
    async def tokenizer_info(raw: Request, model: str | None = None) -> dict[str, Any]:
        """The tokenizer's class, its configuration (the plain values of it) and chat template, as vLLM's
        `--enable-tokenizer-info-endpoint` gives them."""
        hf = state_of(raw).registry.get(model).tokenizer.hf
        plain = (str, int, float, bool, type(None))
        config = {k: v for k, v in hf.init_kwargs.items() if isinstance(v, plain) or _plain_list(v)}
        return {**config, "tokenizer_class": type(hf).__name__, "chat_template": hf.chat_template}


def _plain_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str | int | float | bool) for item in value)


def _add_utility_routes(app: FastAPI) -> None:
    @app.post("/tokenize", dependencies=JSON_BODY)
    async def tokenize(
        body: Annotated[TokenizeCompletionRequest | TokenizeChatRequest, Body()], raw: Request
    ) -> TokenizeResponse:
        state = state_of(raw)
        model = state.registry.get(body.model)
        if isinstance(body, TokenizeChatRequest):
            check_template_trust(body.chat_template, state.settings.trust_request_chat_template)
            prompt = await asyncio.to_thread(
                render_chat_prompt, model, body, state.settings.default_chat_template_kwargs
            )
            tokens = prompt.token_ids
        else:
            tokens = await asyncio.to_thread(model.tokenizer.encode, body.prompt, body.add_special_tokens)
        strs = model.tokenizer.hf.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=model.max_model_len, tokens=tokens, token_strs=strs)

    @app.post("/detokenize", dependencies=JSON_BODY)
    async def detokenize(body: DetokenizeRequest, raw: Request) -> DetokenizeResponse:
        model = state_of(raw).registry.get(body.model)
        if any(t >= model.tokenizer.vocab_size for t in body.tokens):
            raise APIError(f"Token ids must be below the vocabulary size {model.tokenizer.vocab_size}.", param="tokens")
        text = await asyncio.to_thread(model.tokenizer.decode, body.tokens, False)
        return DetokenizeResponse(prompt=text)

    @app.get("/v1/models")
    async def models(raw: Request) -> ModelList:
        return ModelList(data=[_card(model, name) for model in state_of(raw).registry.models for name in model.names])

    @app.get("/health")
    async def health(raw: Request) -> Response:
        return Response(status_code=503 if state_of(raw).registry.dead_engines() else 200)

    @app.get("/ping")
    @app.post("/ping", operation_id="ping_post")
    async def ping(raw: Request) -> Response:
        return await health(raw)

    @app.get("/version")
    async def server_version() -> dict[str, str]:
        return {"version": jaxserve_version()}

    @app.get("/load")
    async def load(raw: Request) -> dict[str, int]:
        return {"server_load": sum(model.in_flight for model in state_of(raw).registry.models)}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(raw: Request) -> Response:
        for model in state_of(raw).registry.models:
            model.engine.reset_prefix_cache()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(raw: Request) -> Response:
        body, content_type = state_of(raw).metrics.render()
        return Response(body, media_type=content_type)


def _card(model: ServedModel, name: str) -> ModelCard:
    return ModelCard(
        id=name,
        created=model.created,
        root=model.root,
        max_model_len=model.max_model_len,
        permission=[ModelPermission(id=f"modelperm-{random_id()}")],
    )
