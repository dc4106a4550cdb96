"""jaxserve: language models served from JAX/XLA behind a vLLM-compatible API."""

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import LLMEngine
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "LLM",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]
