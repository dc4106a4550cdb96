"""The synchronous engine core: requests in, one ragged step at a time, outputs out.

    add_request() ─ validate ─ Sequences ─► Scheduler.schedule() ─► ModelRunner.prepare() ─► dispatch()
    core_step() returns EngineCoreOutputs (tokens, length/EOS/stop-token finishes) ◄─ ModelRunner.fetch()
    step() returns RequestOutputs ◄─ OutputProcessor (detokenize, stop strings, logprob entries) ◄─ core_step()

Under async scheduling (`--async-scheduling`) a step is dispatched before the previous step's results are
read: the host plans and prepares step N + 1 and processes step N's tokens while the device runs N + 1.

`LLM` drives it directly; `AsyncEngine` drives it from a background thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import numpy as np
from flax import nnx

from . import reasoning
from .beam_search import BeamSearch, BeamSearchParams, clamped, step_params
from .config import EngineConfig, sampling_defaults
from .engine_core import EngineCore, InFlight, StartupTimes
from .errors import PromptTooLongError
from .kv_pages import PagePool
from .models.registry import causal_lm_class, create_causal_lm
from .output_processor import EngineCoreOutput, OutputProcessor, RowResult
from .outputs import RequestOutput, RequestStateStats
from .request import EngineRequest
from .runner import ModelRunner, RunnerShape, StepInputs, StepRows
from .sampler import NUM_BIAS_SLOTS, TokenRules
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig, StepPlan
from .sequence import Sequence, SequenceStatus
from .stats import EngineStats
from .structured_outputs import GrammarCompiler, token_bitmask
from .timestamp_rules import TimestampRules

logger = logging.getLogger(__name__)


class LLMEngine(EngineCore):
    """Generation: paged KV cache, continuous batching, sampling."""

    runner_kind = "generate"

    def __init__(self, config: EngineConfig):
        began = time.perf_counter()
        super().__init__(config)
        self.generation_config = config.read_generation_config(self.model_folder)
        self.sampling_defaults = sampling_defaults(self.generation_config)
        self.eos_token_id, self.extra_eos_token_ids = self._eos_ids()
        text_config = self.hf_config.get_text_config()  # a multimodal checkpoint's text model (Gemma 3's)
        # an encoder-decoder (Whisper) generates with its decoder, whose context is its own
        self.is_encoder_decoder = bool(getattr(self.hf_config, "is_encoder_decoder", False))
        key = "max_target_positions" if self.is_encoder_decoder else "max_position_embeddings"
        positions = getattr(text_config, key)
        self.max_model_len = config.resolved_max_model_len(positions, f"{key}={positions} in model's config.json")
        max_num_seqs, max_num_batched_tokens = config.resolved_limits()
        text_config.max_model_len = self.max_model_len  # longrope picks its factors by it, as vLLM (RopeConfig)

        derive = getattr(causal_lm_class(self.hf_config), "derived_tensors", None)  # tensors transformed (stacked)
        model = self.load_model(
            lambda: create_causal_lm(
                self.hf_config, dtype=self.dtype, rngs=nnx.Rngs(config.seed), kernels=self.kernels
            ),
            extra=derive(self.model_folder, self.hf_config) if derive else None,
            aliases=lambda m: getattr(m, "CHECKPOINT_ALIASES", {}),
            renames=lambda m: getattr(m, "CHECKPOINT_RENAMES", {}),
        )
        load_seconds = time.perf_counter() - began

        pages_per_seq = -(-self.max_model_len // config.page_size)
        encoder = {}  # an encoder-decoder's sequences also hold the pages of their encoding's keys and values
        if self.is_encoder_decoder:
            input_shape, frames = model.encoder_geometry
            encoder = dict(
                cross_pages=-(-frames // config.page_size), encoder_frames=frames, encoder_input_shape=input_shape
            )
        compiled = self.compiled_for_here()
        num_pages = self.num_kv_pages(model, pages_per_seq + encoder.get("cross_pages", 0), max_num_seqs, compiled)
        self.vocab_size = text_config.vocab_size
        # --max-logprobs -1: the whole vocabulary may be asked for
        self.max_logprobs = self.vocab_size if config.max_logprobs == -1 else config.max_logprobs
        shape = RunnerShape(
            max_num_seqs,
            max_num_batched_tokens,
            config.resolved_min_token_rung(),
            pages_per_seq=pages_per_seq,
            vocab_size=self.vocab_size,
            num_top_logprobs=self.max_logprobs,
            **encoder,
        )
        # generation_config.json's token rules, as HF's generate applies them (Whisper's): tokens never sampled,
        # tokens not sampled first, and the timestamp rules of requests that ask for timestamps
        self.begin_suppress_tokens = list(self.generation_config.get("begin_suppress_tokens") or ())
        self.timestamp_rules = (
            TimestampRules.from_generation_config(self.generation_config, self.vocab_size)
            if self.is_encoder_decoder
            else None
        )
        rules = TokenRules(
            suppress_tokens=tuple(self.generation_config.get("suppress_tokens") or ()),
            timestamp_begin=self.timestamp_rules.timestamp_begin if self.timestamp_rules else None,
        )
        self.runner = ModelRunner(
            model,
            shape,
            num_pages,
            config.page_size,
            self.dtype,
            compile_only=self.target is not None,
            rules=rules,
            mesh=self.mesh,
        )
        compile_seconds = self.runner.warm_up(strict=config.strict_compile, progress=config.progress)
        self.startup = StartupTimes(load_seconds, compile_seconds)
        limits = {"max_model_len": self.max_model_len, "page_size": config.page_size, "num_kv_pages": num_pages}
        self.after_warm_up(self.runner.programs, {**limits, **dataclasses.asdict(shape)}, compiled)

        # an encoder-decoder's decoder pages depend on its encoder input, not on its tokens alone: never shared
        caching = config.enable_prefix_caching and not self.is_encoder_decoder
        self.page_pool = PagePool(num_pages, config.page_size, caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs,
                max_num_batched_tokens,
                self.max_model_len,
                config.scheduling_policy,
                sliding_window=getattr(model.cfg, "kv_window", None),
                cross_pages=shape.cross_pages,
            ),
            self.page_pool,
        )
        self._requests: dict[str, list[Sequence]] = {}  # the core's: each request's samples still running
        self.grammar_compiler = GrammarCompiler(
            self.tokenizer.hf, self.vocab_size, self.eos_token_ids, config.structured_outputs_config
        )
        self._constrained: set[Sequence] = set()  # sequences held to a grammar, until they finish
        self._allowing: set[Sequence] = set()  # sequences limited to their `allowed_token_ids`, until they finish
        self._timestamped: set[Sequence] = set()  # sequences sampling Whisper's timestamps, until they finish
        # a reasoning model's grammar starts after its thinking: these tokens end it
        self._reasoning_end = (
            self.tokenizer.encode(reasoning.END, add_special_tokens=False) if config.reasoning_parser else None
        )
        self.output_processor = OutputProcessor(self.tokenizer)  # for callers of step(); AsyncEngine has its own
        self._seq_ids = itertools.count()
        logger.info(
            "Engine ready: %s, %s, max_model_len %d, %d KV pages of %d tokens, load %.1f s, compile %.1f s",
            self.model_folder,
            np.dtype(self.dtype).name,
            self.max_model_len,
            num_pages,
            config.page_size,
            load_seconds,
            compile_seconds,
        )

    # --- requests ---------------------------------------------------------------------------------------

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults (vLLM's `get_default_sampling_params`)."""
        return SamplingParams(**self.sampling_defaults)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        encoder_input: np.ndarray | None = None,
    ) -> None:
        """Queue a request whose outputs `step()` returns (validated here; ValueError in vLLM's words)."""
        request = self.process_request(
            request_id,
            prompt_token_ids,
            params,
            prompt=prompt,
            priority=priority,
            cache_salt=cache_salt,
            encoder_input=encoder_input,
        )
        self.add_engine_request(request)
        self.output_processor.add_request(request)

    def process_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | BeamSearchParams,
        *,
        prompt: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        encoder_input: np.ndarray | None = None,
    ) -> EngineRequest:
        """The request validated (ValueError as vLLM words it) and resolved: its output cap, the model's further
        EOS ids among its stop tokens, or for beam search its max_tokens cut to the context. `priority` orders it
        under the priority policy (lower first); `cache_salt` keeps its pages from being shared with requests
        that bring another salt (or none). An encoder-decoder's request brings its `encoder_input` (Whisper: the
        log-mel features of up to 30 s of audio)."""
        encoder_input = self._check_encoder_input(encoder_input)
        if isinstance(params, BeamSearchParams):
            search = BeamSearch(params, self.eos_token_ids)
            self._validate(prompt_token_ids, step_params(search).clone(max_tokens=params.max_tokens), priority)
            if encoder_input is not None:
                raise ValueError("Beam search is not supported for encoder-decoder models yet.")
            clamp = clamped(params, len(prompt_token_ids), self.max_model_len)
            return EngineRequest(request_id, list(prompt_token_ids), clamp, prompt, priority, cache_salt)
        max_tokens = self._validate(prompt_token_ids, params, priority)
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammar_compiler.compile(params.structured_outputs)
        if not params.ignore_eos:
            params = params.clone(stop_token_ids=params.stop_token_ids + self.extra_eos_token_ids)
        return EngineRequest(
            request_id,
            list(prompt_token_ids),
            params,
            prompt,
            priority,
            cache_salt,
            max_tokens,
            grammar=grammar,
            encoder_input=encoder_input,
        )

    def _check_encoder_input(self, encoder_input: np.ndarray | None) -> np.ndarray | None:
        """An encoder-decoder takes one encoder input of its shape per request; other models take none."""
        if not self.is_encoder_decoder:
            if encoder_input is not None:
                raise ValueError("This model is not an encoder-decoder: it takes no encoder input (audio).")
            return None
        expected = self.runner.shape.encoder_input_shape
        if encoder_input is None:
            raise ValueError(f"This encoder-decoder model needs an encoder input (audio features {expected}).")
        encoder_input = np.asarray(encoder_input, np.float32)
        if encoder_input.shape != expected:
            raise ValueError(f"Encoder input must have shape {expected}, got {encoder_input.shape}.")
        return encoder_input

    def add_engine_request(self, request: EngineRequest) -> None:
        """Queue a processed request in the engine core only: `core_step()` returns its token-level outputs,
        which the caller's own `OutputProcessor` turns into text (AsyncEngine, in the event loop)."""
        request_id, params = request.request_id, request.params
        if request_id in self._requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        # prompt logprobs (sample 0's) need every prompt position computed; penalties read token histories that
        # a step builds from the tokens it computes
        penalized = params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0
        stats = RequestStateStats()  # queued now; the scheduler stamps its first scheduling and counts preemptions
        seqs = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=i,
                token_ids=list(request.prompt_token_ids),
                num_prompt_tokens=len(request.prompt_token_ids),
                params=params,
                seed=(params.seed + i if params.seed is not None else self._rng.getrandbits(32)) % (1 << 32),
                max_tokens=request.max_tokens,
                wants_prompt_logprobs=params.prompt_logprobs is not None and i == 0,
                priority=request.priority,
                cache_salt=request.cache_salt,
                reads_prefix_cache=not penalized and not (params.prompt_logprobs is not None and i == 0),
                stats=stats,
                encoder_input=request.encoder_input,
            )
            for i in range(params.n)
        ]
        for seq in seqs[1:]:
            seq.leader = seqs[0]
        if request.grammar is not None:
            end = self._reasoning_end
            thinking = end is not None and not _contains(request.prompt_token_ids, end)
            for seq in seqs:
                seq.matcher = self.grammar_compiler.matcher(request.grammar, waits_for=end if thinking else None)
            self._constrained.update(seqs)
        if params.allowed_token_ids:
            self._allowing.update(seqs)
        if params.return_timestamps:
            self._timestamped.update(seqs)
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> int:
        """Check a request before any device work; returns its output cap. Raises ValueError as vLLM words it."""
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("The decoder prompt cannot be empty")
        if max(prompt_token_ids) >= self.vocab_size or min(prompt_token_ids) < 0:
            bad = max(prompt_token_ids) if max(prompt_token_ids) >= self.vocab_size else min(prompt_token_ids)
            raise ValueError(f"Token id {bad} is out of vocabulary")
        if num_prompt >= self.max_model_len:
            raise PromptTooLongError(self.max_model_len, num_prompt)
        if params.max_tokens is not None and params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} cannot be greater than max_model_len={self.max_model_len}. "
                "Please request fewer output tokens."
            )
        for kind, count in (("sample", params.logprobs), ("prompt", params.prompt_logprobs)):
            if count is not None:
                wanted = self.vocab_size if count == -1 else count
                if wanted > self.max_logprobs:
                    raise ValueError(
                        f"Requested {kind} logprobs of {wanted}, which is greater than max allowed: "
                        f"{self.config.max_logprobs}"
                    )
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stops:
            raise ValueError(f"stop_token_ids must be token ids in [0, {self.vocab_size}), got {bad_stops}.")
        biased = list(params.logit_bias or ())
        if any(not 0 <= t < self.vocab_size for t in biased):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {biased}.")
        bans = len(params.stop_token_ids) + len(self.extra_eos_token_ids) + 1 if params.min_tokens else 0
        bans += len(self.begin_suppress_tokens)
        if len(biased) + bans > NUM_BIAS_SLOTS:
            raise ValueError(
                f"logit_bias and the stop-token and begin-suppress bans take at most {NUM_BIAS_SLOTS} tokens, "
                f"got {len(biased)} + {bans}."
            )
        if params.return_timestamps and self.timestamp_rules is None:
            raise ValueError("return_timestamps needs a model with timestamp tokens (Whisper).")
        allowed = params.allowed_token_ids
        if allowed is not None and not allowed:
            raise ValueError("allowed_token_ids is not None and empty!")
        if allowed and any(not 0 <= t < self.vocab_size for t in allowed):
            raise ValueError("allowed_token_ids contains out-of-vocab token id!")
        if allowed and set(allowed) <= set(self.runner.rules.suppress_tokens):
            raise ValueError("allowed_token_ids holds only tokens the model never samples (its suppress_tokens).")
        room = self.max_model_len - num_prompt
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.min_tokens > max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {params.min_tokens}."
            )
        return max_tokens

    def abort_request(self, request_id: str) -> bool:
        self.output_processor.abort_request(request_id)
        seqs = self._requests.pop(request_id, None)
        for seq in seqs or ():
            self.scheduler.finish(seq)
        return seqs is not None

    def finish_sequence(self, request_id: str, index: int) -> None:
        """End one sample that the front end finished (a stop string); its pages are freed before the next step."""
        for seq in self._requests.get(request_id, ()):
            if seq.index == index:
                self._finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token that ends a sequence unless `ignore_eos`: the tokenizer's EOS and generation_config's."""
        return ([self.eos_token_id] if self.eos_token_id is not None else []) + self.extra_eos_token_ids

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (`POST /reset_prefix_cache`); running requests keep theirs."""
        self.scheduler.reset_prefix_cache()

    def stats(self) -> EngineStats:
        running = {seq.request_id for seq in list(self.scheduler.running)}
        load = EngineStats(
            num_requests_running=len(running),
            num_requests_waiting=max(0, len(self._requests) - len(running)),
            kv_cache_usage=self.page_pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
            max_num_seqs=self.scheduler.config.max_num_seqs,
            prefix_cache_queries=self.scheduler.prefix_cache_stats.queries,
            prefix_cache_hits=self.scheduler.prefix_cache_stats.hits,
            compiles_after_warmup=self.compile_watch.count,
        )
        return self._startup_stats(load)

    # --- the step ---------------------------------------------------------------------------------------

    def _step(self) -> list[RequestOutput]:
        """A core step, with its outputs turned into RequestOutputs for the requests added by `add_request`."""
        outputs, to_finish = self.output_processor.process(self._core_step())
        for request_id, index in to_finish:
            self.finish_sequence(request_id, index)
        return outputs

    def _schedule(self) -> StepPlan | None:
        return self.scheduler.schedule()

    def _needs_previous_tokens(self) -> bool:
        """A constrained (or timestamped) sequence's next bitmask needs its last token on the host: with one in
        flight, the next step waits for it (under async scheduling the steps of such requests do not overlap)."""
        if not self._constrained and not self._timestamped:
            return False
        self._constrained = {seq for seq in self._constrained if seq.status is not SequenceStatus.FINISHED}
        self._timestamped = {seq for seq in self._timestamped if seq.status is not SequenceStatus.FINISHED}
        return any(seq.num_pending_tokens for seq in self._constrained | self._timestamped)

    def _dispatch(self, plan: StepPlan) -> InFlight:
        if self.is_encoder_decoder:
            self._encode(plan)
        inputs, rows = self.runner.prepare(plan, self._step_biases(plan))
        step = InFlight(plan, self.runner.dispatch(inputs, self._grammar_bitmask(plan, rows, inputs)), rows)
        self.scheduler.commit(plan)
        self.iteration_tokens.observe(plan.num_tokens)
        return step

    def _encode(self, plan: StepPlan) -> None:
        """Fill the cross pages of the plan's sequences that have none yet (admitted this step, or again after a
        preemption), ahead of the step that reads them."""
        fresh = [chunk.seq for chunk in plan.chunks if not chunk.seq.encoded]
        if fresh:
            self.runner.encode(fresh)
            for seq in fresh:
                seq.encoded = True

    def _process(self, step: InFlight) -> list[EngineCoreOutput]:
        """A step's sampled tokens into its sequences, with the stops that depend on token ids only (length,
        EOS, stop tokens). A sequence that finished (or was aborted) since the step was dispatched discards its
        token. Its outputs carry the time its tokens reached the host (under async scheduling, while the next
        step already runs)."""
        out = self.runner.fetch(step.out)
        now = time.monotonic()
        tokens, logprobs, ranks = out.tokens.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        chunks = step.plan.chunks
        outputs: dict[int, EngineCoreOutput] = {}
        for r, (chunk_index, is_sample) in enumerate(zip(step.rows.chunk_index.tolist(), step.rows.is_sample.tolist())):
            seq = chunks[chunk_index].seq
            if seq.status is SequenceStatus.FINISHED:
                continue
            output = outputs.get(seq.seq_id)
            if output is None:
                output = outputs[seq.seq_id] = EngineCoreOutput(
                    seq.request_id, seq.index, num_cached_tokens=seq.num_cached_tokens, stats=seq.stats, timestamp=now
                )
            wants_row = not is_sample or seq.params.logprobs is not None
            row = (
                RowResult(tokens[r], logprobs[r], ranks[r], out.top_ids[r], out.top_logprobs[r]) if wants_row else None
            )
            if not is_sample:
                output.new_prompt_logprobs.append(row)
                continue
            token = tokens[r]
            seq.token_ids.append(token)
            seq.num_pending_tokens -= 1
            output.new_token_ids.append(token)
            if row is not None:
                output.new_logprobs.append(row)
            stop = self._stop(seq, token)
            if seq.matcher is not None:
                seq.matcher.accept(token)
                if stop is None and seq.matcher.is_terminated:  # the grammar is complete: nothing more may follow
                    stop, output.grammar_complete = ("stop", None), True
            if stop is not None:
                output.finish_reason, output.stop_reason = stop
                self._finish(seq)
        return list(outputs.values())

    def _stop(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        """(finish reason, stop token) if `token` ends the sequence: the length cap first, then, once min_tokens
        are out, EOS and the stop tokens (generation_config's further EOS ids among them)."""
        num_outputs = len(seq.token_ids) - seq.num_prompt_tokens  # the host's: the next step's token is pending
        if len(seq.token_ids) >= self.max_model_len or num_outputs >= seq.max_tokens:
            return "length", None
        if num_outputs >= seq.params.min_tokens:
            if not seq.params.ignore_eos and token == self.eos_token_id:
                return "stop", None
            if token in seq.params.stop_token_ids:
                return "stop", token
        return None

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        seqs = self._requests.get(seq.request_id)
        if seqs is not None and all(s.status is SequenceStatus.FINISHED for s in seqs):
            del self._requests[seq.request_id]

    def _grammar_bitmask(self, plan: StepPlan, rows: StepRows, inputs: StepInputs) -> np.ndarray | None:
        """The tokens each sampling row of the step may sample: its grammar's, of them only its request's
        `allowed_token_ids`, and what Whisper's timestamp rules allow after its outputs (None: no row is limited)."""
        if not self._constrained and not self._allowing and not self._timestamped:
            return None
        self._allowing = {seq for seq in self._allowing if seq.status is not SequenceStatus.FINISHED}
        watched = self._constrained | self._allowing | self._timestamped
        limited = [
            (r, seq)
            for r, (chunk_index, is_sample) in enumerate(zip(rows.chunk_index.tolist(), rows.is_sample.tolist()))
            if is_sample and (seq := plan.chunks[chunk_index].seq) in watched
        ]
        constrained = [(seq.matcher, r) for r, seq in limited if seq.matcher is not None and seq.matcher.active]
        if not constrained and not any(seq not in self._constrained for _, seq in limited):
            return None
        bitmask = self.runner.unconstrained(len(inputs.logits_indices))
        if constrained:
            self.grammar_compiler.fill_bitmask(constrained, bitmask)
        for r, seq in limited:
            if seq.params.allowed_token_ids:
                bitmask[r] &= token_bitmask(seq.params.allowed_token_ids, bitmask.shape[1])
            if seq.params.return_timestamps:
                bitmask[r] &= self.timestamp_rules.bitmask(seq.output_token_ids, bitmask.shape[1])
        return bitmask

    def _step_biases(self, plan) -> dict[int, list[tuple[int, float]]]:
        """Each sampling row's sparse logit biases: the request's `logit_bias`, -inf on the begin-suppressed
        tokens for a first output, and while a sequence has fewer than `min_tokens` outputs, -inf on EOS and the
        stop tokens."""
        biases = {}
        for chunk in plan.chunks:
            seq = chunk.seq
            if not chunk.sample:
                continue
            bias = list((seq.params.logit_bias or {}).items())
            if seq.num_output_tokens == 0:
                bias += [(t, -np.inf) for t in self.begin_suppress_tokens]
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = list(seq.params.stop_token_ids)
                if not seq.params.ignore_eos and self.eos_token_id is not None:
                    banned.append(self.eos_token_id)
                bias += [(t, -np.inf) for t in dict.fromkeys(banned)]
            if bias:
                biases[seq.seq_id] = bias
        return biases

    # --- set-up helpers ---------------------------------------------------------------------------------

    def _eos_ids(self) -> tuple[int | None, list[int]]:
        """The tokenizer's EOS, and the further EOS ids generation_config.json lists (added as stop tokens)."""
        configured = self.generation_config.get("eos_token_id")
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        primary = self.tokenizer.eos_token_id
        if primary is None and configured:
            primary = configured[0]
        return primary, [t for t in configured if t != primary]


def _contains(tokens: list[int], part: list[int]) -> bool:
    """Whether `part` occurs in `tokens` (a reasoning prompt that already closed its thinking)."""
    n = len(part)
    return any(tokens[i : i + n] == part for i in range(len(tokens) - n + 1))
