"""The typed hand-off from a front end to the engine core: a request validated once, by the engine's
`process_request` (with vLLM's wording), and trusted from then on by `add_engine_request`."""

from __future__ import annotations

import dataclasses

import numpy as np

from .pooling_params import PoolingParams
from .sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams  # resolved: the model's EOS ids among the stop tokens, a pooling task
    prompt: str | None = None
    priority: int = 0  # lower runs first under --scheduling-policy priority
    cache_salt: str | None = None  # only requests with the same salt share prefix pages
    max_tokens: int | None = None  # generation: the output cap, clamped to what the context leaves
    grammar: str | None = None  # generation: the checked grammar of `params.structured_outputs`
    token_type_ids: list[int] | None = None  # pooling: the segments of a text pair
    start_offset: int = 0  # pooling: leading prompt tokens left out of the pool
    encoder_input: np.ndarray | None = None  # generation on an encoder-decoder: its encoder input (Whisper's log-mel)
