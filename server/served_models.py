"""The models a server holds and how a request's `model` finds one (docs/architecture.md §2: several models per
server, routed by name). This is the app's engine registry, its only shared mutable state."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from jaxserve.reasoning import REASONING_PARSERS, ReasoningParser
from jaxserve.speech import SpeechModel

from .chat_utils import ContentFormat, resolve_content_format
from .errors import APIError, busy, not_found

if TYPE_CHECKING:
    from jaxserve.async_engine import AsyncEngine
    from jaxserve.data_parallel import DataParallelEngine
    from jaxserve.tokenizer import Tokenizer

Runner = Literal["generate", "pooling"]


@dataclasses.dataclass
class ServedModel:
    names: list[str]  # the first is the name in responses and metrics; the rest are aliases
    root: str  # the model as given on the command line
    runner: Runner
    engine: AsyncEngine | DataParallelEngine  # a data-parallel model's replicas serve as one engine
    tokenizer: Tokenizer
    max_model_len: int
    sampling_defaults: dict[str, Any]  # generation_config.json values that override OpenAI's defaults
    max_tokens_cap: int | None  # from --override-generation-config max_new_tokens
    content_format: ContentFormat
    pooling_tasks: tuple[str, ...] = ()  # what a pooling model can do: embed, token_embed, classify, ...
    default_pooling_task: str | None = None
    id2label: dict[int, str] = dataclasses.field(default_factory=dict)
    num_labels: int = 0
    input_type_prompts: dict[str, str] = dataclasses.field(default_factory=dict)  # Cohere input_type → prefix
    reasoning_parser: ReasoningParser | None = None  # --reasoning-parser: the <think> part of chat outputs apart
    chunked_embed_len: int | None = None  # --pooler-config enable_chunked_processing: longest input embedded in windows
    speech: SpeechModel | None = None  # a speech-to-text model (Whisper): what /v1/audio/* need of it
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # requests admitted and not yet answered in full

    @property
    def name(self) -> str:
        return self.names[0]

    @classmethod
    def from_engine(
        cls, names: list[str], root: str, engine: AsyncEngine | DataParallelEngine, content_format_flag: str
    ) -> ServedModel:
        """Read what the server needs from a running engine (an `LLMEngine` or a `PoolingEngine`)."""
        core = engine.engine
        generative = engine.runner == "generate"
        template = core.tokenizer.chat_template
        return cls(
            names=names,
            root=root,
            runner=engine.runner,
            engine=engine,
            tokenizer=core.tokenizer,
            max_model_len=core.max_model_len,
            sampling_defaults=core.sampling_defaults if generative else {},
            max_tokens_cap=(core.config.override_generation_config or {}).get("max_new_tokens"),
            content_format=resolve_content_format(content_format_flag, template),
            pooling_tasks=() if generative else tuple(core.spec.tasks),
            default_pooling_task=None if generative else core.spec.default_task,
            id2label={} if generative else _labels(core.hf_config),
            num_labels=0 if generative else core.spec.num_labels,
            input_type_prompts={} if generative else _input_type_prompts(core),
            reasoning_parser=REASONING_PARSERS.get(core.config.reasoning_parser or ""),
            chunked_embed_len=getattr(core, "chunked_embed_len", None),
            speech=_speech(core),
        )

    @property
    def can_score(self) -> bool:
        """vLLM scores with embedding and token-embedding models, and with one-label classifiers."""
        task = self.default_pooling_task
        return task in ("embed", "token_embed") or (task == "classify" and self.num_labels == 1)

    def check_task(self, task: str) -> None:
        """A task the model lacks is a 400 in vLLM's words."""
        if task not in self.pooling_tasks:
            supported = tuple(self.pooling_tasks) or ("generate",)
            raise APIError(f"Unsupported task: {task!r} Supported tasks: {supported}", param="task")

    def admit(self, max_queued: int | None) -> Callable[[], None]:
        """Count a request in (503 when `--max-num-queued-reqs` requests already wait for capacity in this
        engine); returns the call that counts it out, safe to call twice. Waiting = admitted beyond what the
        engine runs at once (its running sequences, at least `max_num_seqs`), so a burst that arrives within one
        step is not turned away while sequence slots are free."""
        if max_queued is not None:
            stats = self.engine.stats()
            waiting = self.in_flight - max(stats.num_requests_running, stats.max_num_seqs)
            if waiting >= max_queued:
                raise busy()
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release


def _speech(core) -> SpeechModel | None:
    """Whisper, an encoder-decoder generation engine, transcribes; nothing else does yet."""
    whisper = getattr(core.hf_config, "model_type", None) == "whisper"
    if not (whisper and getattr(core, "is_encoder_decoder", False)):
        return None
    return SpeechModel.of(core.tokenizer, core.generation_config, core.hf_config)


def _input_type_prompts(core) -> dict[str, str]:
    """The text prefixes a Cohere `input_type` selects, as vLLM finds them: the HF config's `task_instructions`,
    else the sentence-transformers prompts (`config_sentence_transformers.json`)."""
    instructions = getattr(core.hf_config, "task_instructions", None)
    st_config = getattr(core, "st_config", None)
    prompts = instructions if isinstance(instructions, dict) and instructions else (st_config and st_config.prompts)
    return {name: text for name, text in (prompts or {}).items() if isinstance(text, str)}


def _labels(hf_config) -> dict[int, str]:
    labels = getattr(hf_config, "id2label", None) or {}
    return {int(index): label for index, label in labels.items()}


class ModelRegistry:
    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("A server needs at least one model.")
        self.models = models
        self._by_name: dict[str, ServedModel] = {}
        for model in models:
            for name in model.names:
                if name in self._by_name:
                    raise ValueError(f"The served model name {name!r} is given to two models.")
                self._by_name[name] = model

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(
        self,
        name: str | None,
        runner: Runner | None = None,
        api: str = "",
        supports: Callable[[ServedModel], bool] | None = None,
    ) -> ServedModel:
        """The model a request names; with no name, the first model that can serve the route (`runner`, and
        `supports`). 404 if the name is unknown, 400 if the model is of the other runner."""
        if name is None:
            candidates = [
                m for m in self.models if (runner is None or m.runner == runner) and (supports is None or supports(m))
            ]
            if not candidates:
                raise APIError(f"No served model supports the {api}.")
            return candidates[0]
        model = self._by_name.get(name)
        if model is None:
            raise not_found(
                f"The model `{name}` does not exist. Valid aliases: {', '.join(self.names)}.", param="model"
            )
        if runner is not None and model.runner != runner:
            raise APIError(f"The model `{name}` does not support the {api}.", param="model")
        return model

    def any(self, supports: Callable[[ServedModel], bool]) -> bool:
        return any(supports(model) for model in self.models)

    def dead_engines(self) -> list[str]:
        return [m.name for m in self.models if m.engine.errored]
