"""The pooling engine: embedding, classification, scoring and reward models (docs/architecture.md §2, pooling).

How requests are batched is a strategy. `PackedBatches` (encoders, and any model without prefix caching):
each step packs whole waiting sequences back to back into one token-budget batch (no KV cache, no padding
between them), padded only at the end to a bucket rung. `PagedPoolingBatches` (causal decoders with prefix
caching on: `paged_pooling.py`): the generation scheduler over the paged KV cache, so that prompts sharing a
prefix share its pages. Either way the model, its poolers and heads run on the device in one compiled program
per rung; the host copies back the outputs of the tasks present in the step, and slices them per request.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import deque

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .bucket_runner import BucketRunner
from .buckets import BucketShape, seq_rung
from .config import EngineConfig
from .engine_core import EngineCore, InFlight, StartupTimes
from .errors import PromptTooLongError
from .kv_pages import PagePool
from .models.batch import PackedBatch
from .models.registry import pooling_model_class
from .outputs import PoolingOutput, PoolingRequestOutput, RequestStateStats
from .paged_pooling import PagedPoolingBatches, PagedPoolingRunner, PagedPoolingShape, PooledSequence
from .pooler import (
    PoolerSpec,
    PoolingInputs,
    PoolingModel,
    build_spec,
    classifier_from_tokens,
    head_tensors,
    resolve_pooler_config,
)
from .pooling_params import TASKS, PoolingParams, PoolingPrompt
from .request import EngineRequest
from .scheduler import SchedulerConfig, StepPlan
from .st_config import read_st_config
from .stats import EngineStats
from .tokenizer import load_chat_template
from .truncation import max_length, truncate

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PoolingRequest:
    request_id: str
    token_ids: list[int]
    token_type_ids: list[int] | None
    pooled: PooledSequence
    stats: RequestStateStats = dataclasses.field(default_factory=RequestStateStats)  # queued when made


def empty_pooling_inputs(shape: BucketShape, num_tokens: int) -> PoolingInputs:
    s = seq_rung(num_tokens, shape.max_num_seqs)
    return PoolingInputs(
        batch=PackedBatch(
            token_ids=np.zeros(num_tokens, np.int32),
            positions=np.zeros(num_tokens, np.int32),
            token_type_ids=np.zeros(num_tokens, np.int32),
            cu_seqlens=np.zeros(s + 1, np.int32),
            num_seqs=np.zeros(1, np.int32),
        ),
        tasks=np.full(s, -1, np.int32),
        start_offsets=np.zeros(s, np.int32),
        dimensions=np.zeros(s, np.int32),
        activate=np.zeros(s, np.bool_),
    )


def fill_pooling_step(requests: list[PoolingRequest], shape: BucketShape, rung: int) -> PoolingInputs:
    """Host arrays for a batch of whole sequences, packed, padded to the bucket `rung`."""
    inputs = empty_pooling_inputs(shape, rung)
    b = inputs.batch
    offset = 0
    for i, request in enumerate(requests):
        n = len(request.token_ids)
        b.token_ids[offset : offset + n] = request.token_ids
        b.positions[offset : offset + n] = np.arange(n)
        if request.token_type_ids is not None:
            b.token_type_ids[offset : offset + n] = request.token_type_ids
        offset += n
        b.cu_seqlens[i + 1] = offset
        inputs.tasks[i] = TASKS.index(request.pooled.task)
        inputs.start_offsets[i] = request.pooled.start_offset
        inputs.dimensions[i] = request.pooled.dimensions
        inputs.activate[i] = request.pooled.activate
    b.cu_seqlens[len(requests) + 1 :] = offset
    b.num_seqs[0] = len(requests)
    return inputs


class PoolingRunner(BucketRunner):
    """The pooling runner: no device state; a step's outputs are the pooled results of each task."""

    def __init__(self, model: PoolingModel, shape: BucketShape, compile_only: bool = False, mesh: Mesh | None = None):
        self.shape = shape
        self.spec = model.spec
        super().__init__(model, shape.token_rungs, shape.max_num_seqs, "pooling", (), compile_only, mesh)

    def _step_fn(self, params, inputs: PoolingInputs) -> dict[str, jax.Array]:
        return self.keep_layout((), nnx.merge(self.graphdef, params)(inputs))[1]

    def example_args(self, rung: int) -> tuple:
        return (empty_pooling_inputs(self.shape, rung),)

    def dispatch(self, inputs: PoolingInputs, tasks: set[str]) -> dict[str, jax.Array]:
        """Start the step and the copy of the outputs of `tasks` to the host; returns without waiting."""
        self.announce("dispatch", inputs, tasks)
        outputs = self.launch(inputs.batch.token_ids.shape[0], inputs)
        return self.start_copy({task: outputs[task] for task in tasks})


class PoolingEngine(EngineCore):
    runner_kind = "pooling"

    def __init__(self, config: EngineConfig):
        began = time.perf_counter()
        super().__init__(config)
        model_class = pooling_model_class(self.hf_config)
        # what vLLM's per-architecture config classes fix: config keys published under other names (NomicBERT), the
        # labels of Qwen2's reward models (`verify_and_update_config`), and pooler defaults (`POOLER_DEFAULTS`)
        if hasattr(model_class, "verify_and_update_config"):
            model_class.verify_and_update_config(self.hf_config)
        self.st_config = read_st_config(self.model_folder)
        pooler_config = resolve_pooler_config(config.pooler_config, getattr(model_class, "POOLER_DEFAULTS", None))
        extra = {}
        if getattr(self.hf_config, "classifier_from_token", None):
            extra = classifier_from_tokens(self.model_folder, self.hf_config, self.tokenizer)
        if hasattr(model_class, "derived_tensors"):  # checkpoint tensors the model needs transformed (merged, packed)
            extra |= model_class.derived_tensors(self.model_folder, self.hf_config)
        self.spec: PoolerSpec = build_spec(
            model_class, self.hf_config, self.model_folder, self.st_config, pooler_config
        )
        # a classifier's --chat-template formats score pairs (vLLM's score templates: messages with the roles
        # "query" and "document", and the request's `instruction`)
        self.score_template = load_chat_template(config.chat_template) if "classify" in self.spec.tasks else None
        self.default_params = PoolingParams(
            use_activation=pooler_config.get("use_activation"), dimensions=pooler_config.get("dimensions")
        )
        # --pooler-config enable_chunked_processing: embedding inputs longer than the model's window are embedded in
        # windows and averaged (by the server, as vLLM's embeddings route does), up to this many tokens
        self.chunked_embed_len: int | None = None
        if pooler_config.get("enable_chunked_processing"):
            if "embed" not in self.spec.tasks:
                raise ValueError(f"enable_chunked_processing is for embedding models; this one does {self.spec.tasks}.")
            self.chunked_embed_len = pooler_config.get("max_embed_len") or sys.maxsize

        def build():
            rngs = nnx.Rngs(config.seed)
            backbone = model_class.from_hf_config(self.hf_config, dtype=self.dtype, rngs=rngs, kernels=self.kernels)
            return PoolingModel(backbone, self.spec, dtype=self.dtype, rngs=rngs, kernels=self.kernels)

        model = self.load_model(
            build,
            extra=head_tensors(self.spec, self.model_folder, self.st_config) | extra,
            aliases=lambda m: m.checkpoint_aliases,
            renames=lambda m: getattr(m.backbone, "CHECKPOINT_RENAMES", {}),
        )
        load_seconds = time.perf_counter() - began

        positions = model.backbone.cfg.max_tokens
        limit, source = positions, f"the model's {positions} positions"
        if self.st_config and self.st_config.max_seq_length:
            limit = min(limit, self.st_config.max_seq_length)
            source += f" and max_seq_length={self.st_config.max_seq_length} in sentence_bert_config.json"
        self.max_model_len = config.resolved_max_model_len(limit, source)
        max_num_seqs, max_num_batched_tokens = config.resolved_limits()
        # whole sequences are packed, so the budget must hold the longest one
        max_num_batched_tokens = max(max_num_batched_tokens, self.max_model_len)
        shape = BucketShape(max_num_seqs, max_num_batched_tokens, config.resolved_min_token_rung())
        compiled = self.compiled_for_here()
        compile_only = self.target is not None
        limits = {"max_model_len": self.max_model_len}
        if config.enable_prefix_caching and hasattr(model.backbone, "kv_geometry"):
            # a causal backbone: the paged cache, so that prompts sharing a prefix share its pages
            pages_per_seq = -(-self.max_model_len // config.page_size)
            num_pages = self.num_kv_pages(model.backbone, pages_per_seq, max_num_seqs, compiled)
            paged_shape = PagedPoolingShape(
                max_num_seqs, max_num_batched_tokens, shape.min_token_rung, pages_per_seq=pages_per_seq
            )
            self.runner = PagedPoolingRunner(
                model, paged_shape, num_pages, config.page_size, self.dtype, compile_only, self.mesh
            )
            self.page_pool = PagePool(num_pages, config.page_size)
            scheduling = SchedulerConfig(max_num_seqs, max_num_batched_tokens, self.max_model_len)
            self.batches = PagedPoolingBatches(self.spec, self.runner, scheduling, self.page_pool)
            limits |= {"page_size": config.page_size, "num_kv_pages": num_pages, **dataclasses.asdict(paged_shape)}
        else:
            self.runner = PoolingRunner(model, shape, compile_only=compile_only, mesh=self.mesh)
            self.page_pool = None
            self.batches = PackedBatches(self.runner)
            limits |= dataclasses.asdict(shape)
        compile_seconds = self.runner.warm_up(strict=config.strict_compile, progress=config.progress)
        self.startup = StartupTimes(load_seconds, compile_seconds)
        self.after_warm_up(self.runner.programs, limits, compiled)
        self.vocab_size = self.hf_config.vocab_size
        logger.info(
            "Pooling engine ready: %s, tasks %s (default %s), max_model_len %d, load %.1f s, compile %.1f s",
            self.model_folder, ", ".join(self.spec.tasks), self.spec.default_task, self.max_model_len,
            load_seconds, compile_seconds,
        )  # fmt: skip

    def id2label(self, index: int) -> str | None:
        labels = getattr(self.hf_config, "id2label", None) or {}
        return labels.get(index, labels.get(str(index)))

    def resolve(self, num_tokens: int, params: PoolingParams) -> PoolingParams:
        """The request's task, activation and width, checked (vLLM's wording). Raises ValueError."""
        task = params.task or self.spec.default_task
        if task not in self.spec.tasks:
            raise ValueError(f"Unsupported task: {task!r} Supported tasks: {self.spec.tasks}")
        if num_tokens == 0:
            raise ValueError("The decoder prompt cannot be empty")
        if num_tokens > self.max_model_len:
            raise PromptTooLongError(self.max_model_len, num_tokens)
        use_activation = (
            params.use_activation if params.use_activation is not None else self.default_params.use_activation
        )
        dimensions = params.dimensions if params.dimensions is not None else self.default_params.dimensions
        if dimensions is not None:
            self._check_dimensions(task, dimensions)
        return params.clone(task=task, use_activation=use_activation is not False, dimensions=dimensions)

    def _check_dimensions(self, task: str, dimensions: int) -> None:
        name = self.config.model
        if task != "embed":
            raise ValueError(f"Task {task} does not support the dimensions parameter.")
        if not self.spec.is_matryoshka:
            raise ValueError(
                f'Model "{name}" does not support matryoshka representation, changing output dimensions '
                "will lead to poor results."
            )
        allowed = self.spec.matryoshka_dimensions
        if allowed is not None and dimensions not in allowed:
            raise ValueError(
                f'Model "{name}" only supports {list(allowed)} matryoshka dimensions, use other output '
                "dimensions will lead to poor results."
            )
        if not 1 <= dimensions <= self.spec.embed_dim:
            raise ValueError("Dimensions must be greater than 0")

    def prepare(
        self,
        prompt: str | list[int],
        *,
        text_pair: str | None = None,
        truncate_prompt_tokens: int | None = None,
        truncation_side: str | None = None,
        prompt_name: str | None = None,
    ) -> PoolingPrompt:
        """Tokenize a text (or text pair) or take token ids, with a sentence-transformers prompt prepended and
        truncation to `truncate_prompt_tokens` (-1: the model's maximum) applied."""
        if not isinstance(prompt, str):
            return PoolingPrompt(
                truncate(
                    list(prompt), truncate_prompt_tokens, self.max_model_len, truncation_side or self.tokenizer.side
                )
            )
        keep = max_length(truncate_prompt_tokens, self.max_model_len)
        prefix, start_offset = self._st_prompt(prompt_name)
        ids, type_ids = self.tokenizer.encode_pooling(prefix + prompt, text_pair, keep, truncation_side)
        return PoolingPrompt(ids, type_ids, start_offset)

    def score_prompt(
        self, query: str, document: str, instruction: str | None = None, truncate_prompt_tokens: int | None = None
    ) -> PoolingPrompt:
        """A (query, document) pair through the score template."""
        text = self.tokenizer.render_chat(
            [{"role": "query", "content": query}, {"role": "document", "content": document}],
            chat_template=self.score_template,
            add_generation_prompt=False,
            chat_template_kwargs={"instruction": instruction} if instruction else None,
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.prepare(ids, truncate_prompt_tokens=truncate_prompt_tokens)

    def _st_prompt(self, name: str | None) -> tuple[str, int]:
        """(prompt text, tokens of it that the pool leaves out) for a sentence-transformers prompt name."""
        st = self.st_config
        name = name or (st.default_prompt_name if st else None)
        if name is None:
            return "", 0
        if st is None or name not in st.prompts:
            raise ValueError(f"Prompt name {name!r} not found; the model has {sorted(st.prompts) if st else []}.")
        text = st.prompts[name]
        # as sentence-transformers counts it: the prompt's tokens without the trailing separator
        left_out = 0 if st.include_prompt else len(self.tokenizer.encode_pooling(text)[0]) - 1
        return text, left_out

    def add_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: PoolingParams,
        token_type_ids: list[int] | None = None,
        start_offset: int = 0,
    ) -> None:
        """Queue a request (validated here; ValueError in vLLM's words)."""
        request = self.process_request(
            request_id, token_ids, params, token_type_ids=token_type_ids, start_offset=start_offset
        )
        self.add_engine_request(request)

    def process_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: PoolingParams,
        *,
        token_type_ids: list[int] | None = None,
        start_offset: int = 0,
    ) -> EngineRequest:
        """The request validated and its parameters resolved: task, activation, width (`resolve`)."""
        params = self.resolve(len(prompt_token_ids), params)
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary")
        return EngineRequest(
            request_id, list(prompt_token_ids), params, token_type_ids=token_type_ids, start_offset=start_offset
        )

    def add_engine_request(self, request: EngineRequest) -> None:
        """Queue a processed request."""
        params = request.params
        dimensions = params.dimensions or self.spec.output_dim(params.task)
        pooled = PooledSequence(params.task, params.use_activation, dimensions, request.start_offset)
        self.batches.add(request, pooled)

    def abort_request(self, request_id: str) -> bool:
        return self.batches.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.batches.has_requests() or self._in_flight is not None

    def reset_prefix_cache(self) -> None:
        if self.page_pool is not None:
            self.batches.scheduler.reset_prefix_cache()

    def stats(self) -> EngineStats:
        scheduler = getattr(self.batches, "scheduler", None)
        load = EngineStats(
            num_requests_running=len(scheduler.running) if scheduler else 0,
            num_requests_waiting=len(scheduler.waiting) if scheduler else self.batches.num_waiting,
            kv_cache_usage=self.page_pool.usage if self.page_pool else 0.0,
            num_preemptions=scheduler.num_preemptions if scheduler else 0,
            max_num_seqs=self.runner.shape.max_num_seqs,
            compiles_after_warmup=self.compile_watch.count,
            prefix_cache_queries=scheduler.prefix_cache_stats.queries if scheduler else 0,
            prefix_cache_hits=scheduler.prefix_cache_stats.hits if scheduler else 0,
        )
        return self._startup_stats(load)

    def _schedule(self):
        return self.batches.schedule()

    def _dispatch(self, plan) -> InFlight:
        step = self.batches.dispatch(plan)
        tokens = plan.num_tokens if isinstance(plan, StepPlan) else sum(len(r.token_ids) for r in plan)
        self.iteration_tokens.observe(tokens)
        return step

    def _process(self, step: InFlight) -> list[PoolingRequestOutput]:
        return self.batches.process(step)


class PackedBatches:
    """The requests of a pooling engine without a KV cache: whole sequences packed back to back, first come
    first served, while the sequence cap and the token budget hold them."""

    def __init__(self, runner: PoolingRunner):
        self.runner = runner
        self.spec = runner.spec
        self._waiting: deque[PoolingRequest] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, request: EngineRequest, pooled: PooledSequence) -> None:
        if any(r.request_id == request.request_id for r in self._waiting):
            raise ValueError(f"Request id {request.request_id!r} is already in use.")
        self._waiting.append(
            PoolingRequest(request.request_id, request.prompt_token_ids, request.token_type_ids, pooled)
        )

    def abort(self, request_id: str) -> bool:
        for request in self._waiting:
            if request.request_id == request_id:
                self._waiting.remove(request)
                return True
        return False

    def has_requests(self) -> bool:
        return bool(self._waiting)

    def schedule(self) -> list[PoolingRequest] | None:
        shape = self.runner.shape
        batch: list[PoolingRequest] = []
        tokens = 0
        while (
            self._waiting
            and len(batch) < shape.max_num_seqs
            and tokens + len(self._waiting[0].token_ids) <= shape.max_num_batched_tokens
        ):
            batch.append(self._waiting.popleft())
            tokens += len(batch[-1].token_ids)
        now = time.monotonic()
        for request in batch:
            request.stats.scheduled_ts = now
        return batch or None

    def dispatch(self, batch: list[PoolingRequest]) -> InFlight:
        tokens = sum(len(r.token_ids) for r in batch)
        inputs = fill_pooling_step(batch, self.runner.shape, self.runner.programs.rung_for(tokens))
        return InFlight(batch, self.runner.dispatch(inputs, {r.pooled.task for r in batch}))

    def process(self, step: InFlight) -> list[PoolingRequestOutput]:
        """Each request's slice of its task's output: [dim] (or `dimensions`), or [num_tokens, dim] for token
        tasks."""
        outputs = self.runner.fetch(step.out)
        now = time.monotonic()
        results, offset = [], 0
        for i, request in enumerate(step.plan):
            n, task = len(request.token_ids), request.pooled.task
            if task.startswith("token_"):
                data = self.spec.token_rows(task, outputs[task][offset : offset + n], request.token_ids)
            else:
                data = outputs[task][i, : request.pooled.dimensions]
            offset += n
            request.stats.first_token_ts = request.stats.last_token_ts = now
            results.append(
                PoolingRequestOutput(
                    request.request_id, request.token_ids, PoolingOutput(data), task, metrics=request.stats
                )
            )
        return results
