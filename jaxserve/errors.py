"""Errors the engine raises that a caller (the server) tells apart. Free of JAX, so the server can import it."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine loop has died; no request can be served any more."""


class PromptTooLongError(ValueError):
    """vLLM's message for a prompt longer than the model takes; `param` names the offending request field."""

    param = "input_tokens"

    def __init__(self, max_model_len: int, num_tokens: int):
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{num_tokens} input tokens, which exceeds this limit even without any output tokens. Please reduce the "
            f"length of the input prompt. (parameter=input_tokens, value={num_tokens})"
        )
