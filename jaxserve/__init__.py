"""jaxserve: language models served from JAX/XLA behind a vLLM-compatible API.

The top-level names load lazily, so that `jaxserve.server` and the plain-data modules (sampling and pooling
parameters, outputs, the tokenizer) can be imported without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngine": ".async_engine",
    "BeamSearchParams": ".beam_search",
    "CompletionOutput": ".outputs",
    "EngineConfig": ".config",
    "LLM": ".llm",
    "LLMEngine": ".engine",
    "Logprob": ".outputs",
    "PoolingEngine": ".pooling_engine",
    "PoolingParams": ".pooling_params",
    "PoolingRequestOutput": ".outputs",
    "RequestOutput": ".outputs",
    "RequestOutputKind": ".sampling_params",
    "SamplingParams": ".sampling_params",
    "StructuredOutputsParams": ".sampling_params",
}

__all__ = [
    "AsyncEngine",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "LLM",
    "LLMEngine",
    "Logprob",
    "PoolingEngine",
    "PoolingParams",
    "PoolingRequestOutput",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
]

if TYPE_CHECKING:
    from .async_engine import AsyncEngine
    from .beam_search import BeamSearchParams
    from .config import EngineConfig
    from .engine import LLMEngine
    from .llm import LLM
    from .outputs import CompletionOutput, Logprob, PoolingRequestOutput, RequestOutput
    from .pooling_engine import PoolingEngine
    from .pooling_params import PoolingParams
    from .sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
