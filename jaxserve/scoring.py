"""Scoring a query against documents: vLLM's pairing rules, and the bi-encoder and late-interaction scores
(the cross-encoder score is the classifier's own output)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

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
