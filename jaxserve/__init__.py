"""jaxserve: language models served from JAX/XLA behind a vLLM-compatible API."""

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import LLMEngine
from .llm import LLM
from .outputs import CompletionOutput, Logprob, PoolingRequestOutput, RequestOutput
from .pooling_engine import PoolingEngine
from .pooling_params import PoolingParams
from .sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "AsyncEngine",
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
]
