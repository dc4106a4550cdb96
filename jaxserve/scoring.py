"""Scoring a query against documents: vLLM's pairing rules, which inputs a model scores them from, and the
bi-encoder and late-interaction scores (the cross-encoder score is the classifier's own output). Shared by
`LLM.score` and the server's /score and /rerank; free of JAX."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from .pooling_params import PoolingPrompt

T = TypeVar("T")


def pair_up(queries: T | Sequence[T], documents: T | Sequence[T]) -> list[tuple[T, T]]:
    """1:1, 1:N (the query repeated) or N:N (zipped, not a cross product)."""
    queries = [queries] if isinstance(queries, (str, dict)) else list(queries)
    documents = [documents] if isinstance(documents, (str, dict)) else list(documents)
    if not queries:
        raise ValueError("At least one text element must be given")
    if not documents:
        raise ValueError("At least one text_pair element must be given")
    if len(queries) == 1:
        queries = queries * len(documents)
    if len(queries) != len(documents):
        raise ValueError("Input lengths must be either 1:1, 1:N or N:N")
    return list(zip(queries, documents))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def max_sim(query_tokens: np.ndarray, document_tokens: np.ndarray) -> float:
    """Late interaction (ColBERT): for each query token the best dot product over the document's tokens, summed."""
    return float(np.max(query_tokens @ document_tokens.T, axis=1).sum())


@dataclasses.dataclass
class ScorePlan:
    """What to pool for a list of (query, document) pairs, and how the pooled rows become one score per pair.

    Cross-encoders pool each pair jointly (task classify); bi-encoders embed every distinct text once (embed,
    then cosine); late-interaction models embed every token (token_embed, then MaxSim)."""

    prompts: list[PoolingPrompt]
    task: str
    pair_inputs: list[tuple[int, int]]  # per pair: indices into `prompts` (the same index twice for a joint pair)
    measure: Callable[[np.ndarray, np.ndarray], float] | None  # None: the pooled value is the score

    def scores(self, pooled: list[np.ndarray]) -> list[float]:
        if self.measure is None:
            return [float(pooled[i][0]) for i, _ in self.pair_inputs]
        return [self.measure(pooled[q], pooled[d]) for q, d in self.pair_inputs]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)


def plan_scores(
    engine, pairs: list[tuple[str, str]], truncate_prompt_tokens: int | None = None, instruction: str | None = None
) -> ScorePlan:
    """The plan for `engine` (a PoolingEngine), by its task. A cross-encoder with a score template (its
    `--chat-template`) reads each pair through it, with `instruction`; else as a tokenizer text pair. Raises
    ValueError for a model that cannot score."""
    task = engine.spec.default_task
    if task == "classify":
        if engine.spec.num_labels != 1:
            raise ValueError("Score API is only enabled for num_labels == 1.")
        if engine.score_template is not None:
            prompts = [engine.score_prompt(q, d, instruction, truncate_prompt_tokens) for q, d in pairs]
        else:
            prompts = [engine.prepare(q, text_pair=d, truncate_prompt_tokens=truncate_prompt_tokens) for q, d in pairs]
        return ScorePlan(prompts, "classify", [(i, i) for i in range(len(pairs))], None)
    if task not in ("embed", "token_embed"):
        raise ValueError(f"Score API is not supported for a model whose task is {task}.")
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    index = {t: i for i, t in enumerate(texts)}
    prompts = [engine.prepare(t, truncate_prompt_tokens=truncate_prompt_tokens) for t in texts]
    measure = cosine if task == "embed" else max_sim
    return ScorePlan(prompts, task, [(index[q], index[d]) for q, d in pairs], measure)
