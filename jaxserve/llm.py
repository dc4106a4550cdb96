"""The offline API, as in vLLM: `LLM(model).generate(prompts, SamplingParams(...))`, `LLM.chat(messages)`, and
for pooling models (`runner="pooling"`, or a pooling architecture) `embed`, `encode`, `classify`, `score` and
`reward`."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .audio import SAMPLE_RATE, log_mel_spectrogram, resample
from .beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, run_beam_searches, search_output
from .config import EngineConfig
from .engine import LLMEngine
from .inputs import PromptType, batch_prompts, text_and_ids, text_or_ids
from .model_source import DEFAULT_GENERATE_MODEL, DEFAULT_POOLING_MODEL, load_hf_config, resolve_model
from .models.registry import is_generative
from .outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from .pooling_engine import PoolingEngine
from .pooling_params import PoolingParams, PoolingPrompt
from .sampling_params import RequestOutputKind, SamplingParams
from .scoring import pair_up, plan_scores
from .tokenizer import Tokenizer, load_chat_template

Message = dict[str, Any]


def create_engine(config: EngineConfig) -> LLMEngine | PoolingEngine:
    """A generation or a pooling engine, by `runner` ("auto": by the model's architecture)."""
    if config.data_parallel_size > 1:
        raise ValueError(
            "One engine runs one replica: data_parallel_size > 1 is for `jaxserve serve` (data_parallel.py)."
        )
    runner = config.runner
    if runner == "auto":
        hf_config = load_hf_config(resolve_model(config.model), config.hf_overrides)
        runner = "generate" if is_generative(hf_config) else "pooling"
    return LLMEngine(config) if runner == "generate" else PoolingEngine(config)


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        """With no model, the embedded default of the runner (SmolLM2 for generation, MiniLM for pooling)."""
        if model is None:
            model = DEFAULT_POOLING_MODEL if engine_args.get("runner") == "pooling" else DEFAULT_GENERATE_MODEL
        self.engine = create_engine(EngineConfig(model=model, **engine_args))
        self._request_ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self._generator("get_default_sampling_params").default_sampling_params()

    def _generator(self, method: str) -> LLMEngine:
        if not isinstance(self.engine, LLMEngine):
            raise ValueError(
                f"LLM.{method}() is only supported for generative models. Try passing `--runner generate` to use "
                "the model as a generative model."
            )
        return self.engine

    def _pooler(self, method: str) -> PoolingEngine:
        if not isinstance(self.engine, PoolingEngine):
            raise ValueError(
                f"LLM.{method}() is only supported for pooling models. Try passing `--runner pooling` to use the "
                "model as a pooling model."
            )
        return self.engine

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in prompt order. `priority` (one per prompt) orders them
        under `scheduling_policy="priority"`. A prompt dict may carry a `cache_salt`, and for Whisper, as in vLLM,
        its audio: `{"prompt": "<|startoftranscript|><|notimestamps|>", "multi_modal_data": {"audio": (samples,
        sample_rate)}}` (up to 30 s)."""
        engine = self._generator("generate")
        prompt_list = batch_prompts(prompts)
        items = [self._tokenize(p) for p in prompt_list]
        salts = [p.get("cache_salt") if isinstance(p, dict) else None for p in prompt_list]
        audio = [_audio_features(p, engine) for p in prompt_list]
        return self._run(items, sampling_params, use_tqdm, priority, salts, audio)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate."""
        self._generator("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = load_chat_template(chat_template)
        tokenizer = self.engine.tokenizer
        items = []
        for conversation in conversations:
            text = tokenizer.render_chat(
                conversation,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                chat_template_kwargs=chat_template_kwargs,
            )
            items.append((text, tokenizer.encode(text, add_special_tokens=False)))
        return self._run(items, sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if getattr(self.engine, "is_encoder_decoder", False):  # Whisper's prompt is its special tokens, as written
            return text_and_ids(prompt, functools.partial(self.engine.tokenizer.encode, add_special_tokens=False))
        return text_and_ids(prompt, self.engine.tokenizer.encode)

    def _run(
        self, items, sampling_params, use_tqdm: bool, priority=None, salts=None, encoder_inputs=None
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = (
            [sampling_params] * len(items) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(items):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        priority = [0] * len(items) if priority is None else list(priority)
        if len(priority) != len(items):
            raise ValueError("The lengths of prompts and priority must be the same.")
        salts = salts or [None] * len(items)
        encoder_inputs = encoder_inputs or [None] * len(items)
        requests = [
            self.engine.process_request(
                str(next(self._request_ids)), ids, params.clone(output_kind=RequestOutputKind.FINAL_ONLY),
                prompt=text, priority=rank, cache_salt=salt, encoder_input=features,
            )
            for (text, ids), params, rank, salt, features in zip(items, params_list, priority, salts, encoder_inputs)
        ]  # fmt: skip
        order = {request.request_id: i for i, request in enumerate(requests)}
        for request in requests:  # every one validated before any runs
            self.engine.add_engine_request(request)
            self.engine.output_processor.add_request(request)
        results: list[RequestOutput | None] = [None] * len(items)
        with tqdm(total=len(items), desc="Generating", unit="prompt", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    results[order[output.request_id]] = output
                    bar.update()
        return results

    def beam_search(
        self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams, *, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (vLLM's `LLM.beam_search`): `params.beam_width` sequences per prompt,
        best first, ranked as HF transformers' `generate(num_beams=...)` ranks them."""
        engine = self._generator("beam_search")
        items = [self._tokenize(p) for p in batch_prompts(prompts)]
        requests = [engine.process_request("beam", ids, params) for _, ids in items]
        searches = [(r.prompt_token_ids, BeamSearch(r.params, engine.eos_token_ids)) for r in requests]
        run_beam_searches(
            searches, lambda requests, sampling: self._run([(None, r) for r in requests], sampling, use_tqdm)
        )
        return [search_output(ids, search, engine.tokenizer) for ids, search in searches]

    # --- pooling ----------------------------------------------------------------------------------------

    def encode(
        self,
        prompts: PromptType | Seq[PromptType],
        pooling_params: PoolingParams | None = None,
        *,
        task: str | None = None,
        truncate_prompt_tokens: int | None = None,
        truncation_side: str | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """The raw pooled output of each prompt for `task` (embed, token_embed, classify, token_classify;
        default: the model's task): [dim] or, for token tasks, [num_tokens, dim] arrays in `outputs.data`."""
        params = (pooling_params or PoolingParams()).clone(task=task or (pooling_params and pooling_params.task))
        engine = self._pooler("encode")
        inputs = [
            engine.prepare(
                text_or_ids(p),
                truncate_prompt_tokens=_first(truncate_prompt_tokens, params.truncate_prompt_tokens),
                truncation_side=truncation_side,
            )
            for p in batch_prompts(prompts)
        ]
        return self._pool(inputs, params, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Seq[PromptType],
        *,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
        truncation_side: str | None = None,
        prompt_name: str | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt. `prompt_name` picks a sentence-transformers prompt (e.g. "query")."""
        engine = self._pooler("embed")
        params = (pooling_params or PoolingParams()).clone(task="embed")
        inputs = [
            engine.prepare(
                text_or_ids(p),
                truncate_prompt_tokens=_first(truncate_prompt_tokens, params.truncate_prompt_tokens),
                truncation_side=truncation_side,
                prompt_name=prompt_name,
            )
            for p in batch_prompts(prompts)
        ]
        return [
            EmbeddingRequestOutput(o.request_id, o.prompt_token_ids, EmbeddingOutput(o.outputs.data.tolist()))
            for o in self._pool(inputs, params, use_tqdm)
        ]

    def classify(
        self,
        prompts: PromptType | Seq[PromptType],
        *,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (raw logits with use_activation=False), with the top label."""
        outputs = self.encode(
            prompts, (pooling_params or PoolingParams()).clone(task="classify"),
            truncate_prompt_tokens=truncate_prompt_tokens, use_tqdm=use_tqdm,
        )  # fmt: skip
        engine = self._pooler("classify")
        return [
            ClassificationRequestOutput(
                o.request_id,
                o.prompt_token_ids,
                ClassificationOutput(o.outputs.data.tolist(), engine.id2label(int(np.argmax(o.outputs.data)))),
            )
            for o in outputs
        ]

    def reward(
        self,
        prompts: PromptType | Seq[PromptType],
        *,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """Per-token rewards of a reward model ([num_tokens, 1] in `outputs.data`)."""
        return self.encode(
            prompts, (pooling_params or PoolingParams()).clone(task="token_classify"),
            truncate_prompt_tokens=truncate_prompt_tokens, use_tqdm=use_tqdm,
        )  # fmt: skip

    def score(
        self,
        queries: str | Seq[str],
        documents: str | Seq[str],
        *,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
        instruction: str | None = None,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """Relevance of each (query, document) pair, paired 1:1, 1:N or N:N. A cross-encoder scores each pair
        jointly (through its score template, with `instruction`, when it has one); an embedding model gives the
        cosine of the two embeddings; a token-embedding model MaxSim."""
        engine = self._pooler("score")
        truncate_prompt_tokens = _first(
            truncate_prompt_tokens, pooling_params and pooling_params.truncate_prompt_tokens
        )
        plan = plan_scores(engine, pair_up(queries, documents), truncate_prompt_tokens, instruction)
        outputs = self._pool(plan.prompts, (pooling_params or PoolingParams()).clone(task=plan.task), use_tqdm)
        scores = plan.scores([o.outputs.data for o in outputs])
        return [
            ScoringRequestOutput(
                str(i),
                outputs[q].prompt_token_ids + (outputs[d].prompt_token_ids if d != q else []),
                ScoringOutput(score),
            )
            for i, ((q, d), score) in enumerate(zip(plan.pair_inputs, scores))
        ]

    def _pool(self, inputs: list[PoolingPrompt], params: PoolingParams, use_tqdm: bool) -> list[PoolingRequestOutput]:
        engine = self._pooler("encode")
        requests = [
            engine.process_request(
                str(next(self._request_ids)), item.token_ids, params, token_type_ids=item.token_type_ids,
                start_offset=item.start_offset,
            )
            for item in inputs
        ]  # fmt: skip
        order = {request.request_id: i for i, request in enumerate(requests)}
        for request in requests:  # every one validated before any runs
            engine.add_engine_request(request)
        results: list[PoolingRequestOutput | None] = [None] * len(inputs)
        with tqdm(total=len(inputs), desc="Pooling", unit="prompt", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    results[order[output.request_id]] = output
                    bar.update()
        return results


def _first(*values):
    """The first value that is not None (a keyword argument before the same field of the params)."""
    return next((v for v in values if v is not None), None)


def _audio_features(prompt: PromptType, engine: LLMEngine) -> np.ndarray | None:
    """A prompt's `multi_modal_data` audio (samples, or (samples, sample_rate); 16 kHz when no rate is given) as
    the encoder-decoder's input features."""
    audio = prompt.get("multi_modal_data", {}).get("audio") if isinstance(prompt, dict) else None
    if audio is None:
        return None
    samples, rate = audio if isinstance(audio, tuple) else (audio, SAMPLE_RATE)
    if not engine.is_encoder_decoder:
        raise ValueError("This model takes no audio: multi_modal_data audio is for encoder-decoders (Whisper).")
    num_mel_bins = engine.runner.shape.encoder_input_shape[0]
    return log_mel_spectrogram(resample(np.asarray(samples, np.float32), rate), num_mel_bins)
