"""Pooling parameters (vLLM's `PoolingParams`) and the pooling tasks."""

from __future__ import annotations

import dataclasses

TASKS = ("embed", "token_embed", "classify", "token_classify")
REMOVED_TASKS = {
    "score": "`score` task was removed; use `classify` instead.",
    "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead.",
}


@dataclasses.dataclass
class PoolingParams:
    """`use_activation`: L2-normalize embeddings, or apply the classifier's activation (None: the model's
    default, on). `normalize` is the older spelling for embeddings, still accepted. `dimensions` truncates a
    Matryoshka embedding, which is then normalized. `truncate_prompt_tokens`: keep that many tokens
    (-1: as many as the model takes)."""

    task: str | None = None
    dimensions: int | None = None
    use_activation: bool | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task in REMOVED_TASKS:
            raise ValueError(REMOVED_TASKS[self.task])
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Unknown pooling task: {self.task}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < -1:
            raise ValueError(
                f"truncate_prompt_tokens must be -1 or a positive integer, got {self.truncate_prompt_tokens}."
            )
        if self.use_activation is None:
            self.use_activation = self.normalize

    def clone(self, **changes) -> PoolingParams:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class PoolingPrompt:
    """A pooling input ready for `add_request`: token ids, token type ids of a text pair, and how many leading
    tokens (a sentence-transformers prompt) the pool leaves out."""

    token_ids: list[int]
    token_type_ids: list[int] | None = None
    start_offset: int = 0
