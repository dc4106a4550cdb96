"""Structured outputs: output constrained to a JSON schema, a regex, a list of choices, a grammar or structural
tags, as vLLM's `StructuredOutputsParams` asks for it.

The grammar engine is llguidance (PyPI, no dependencies): from the request it builds a grammar over the model's
tokenizer, and a matcher per constrained sequence walks it token by token on the host. Before each step the
matcher of every constrained sampling row writes the tokens it allows into that row of a packed bitmask
(`[rows, ceil(vocab / 32)]` int32, bit j of word i = token 32 i + j), which the sampler unpacks on the device and
applies before it samples (`sampler.apply_token_bitmask`). After the step the sampled token advances the
matcher; a matcher that has stopped (its grammar complete, nothing more may follow) ends the sequence with
`finish_reason: "stop"`.

Why llguidance rather than xgrammar (vLLM's default): it has no dependencies where xgrammar imports torch, it
computes a mask in tens of microseconds for JSON schemas with lazy lexing and token-trie slices, it accepts JSON
schema, regex, Lark and GBNF/EBNF grammars and structural tags, and it fills a NumPy bitmask in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from .sampling_params import StructuredOutputsParams

OPTIONS = ("disable_any_whitespace", "disable_additional_properties")  # server-wide, in --structured-outputs-config


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def token_bitmask(token_ids: list[int], width: int) -> np.ndarray:
    """A bitmask row ([width] int32 words, token t at bit t % 32 of word t // 32, as llguidance packs them) that
    allows exactly `token_ids`."""
    ids = np.asarray(token_ids, np.int64)
    words = np.zeros(width, np.uint32)
    np.bitwise_or.at(words, ids // 32, np.left_shift(1, ids % 32).astype(np.uint32))
    return words.view(np.int32)


def grammar_source(params: StructuredOutputsParams) -> str:
    """The constraint as an llguidance grammar (not yet checked). ValueError for what cannot be read."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"The JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("The JSON schema must be an object.")
        if params.disable_additional_properties and isinstance(schema, dict):
            schema = _closed(schema)
        options: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
        if params.whitespace_pattern is not None:
            options["whitespace_pattern"] = params.whitespace_pattern
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        if not params.choice or not all(isinstance(c, str) for c in params.choice):
            raise ValueError("choice must be a non-empty list of strings.")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    if kind == "grammar":
        return llguidance.grammar_from("grammar", params.grammar)  # Lark, or GBNF/EBNF converted to Lark
    return _structural_tag_grammar(params.structural_tag)


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that does not say otherwise."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _structural_tag_grammar(text: str) -> str:
    """vLLM's structural tag (`{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`): free text in which
    each structure, once its trigger appears, is held to its JSON schema."""
    try:
        spec = json.loads(text) if isinstance(text, str) else text
        triggers = spec["triggers"]
        tags = []
        for structure in spec["structures"]:
            trigger = next(t for t in triggers if structure["begin"].startswith(t))
            tags.append(
                llguidance.StructTag(
                    trigger=trigger, begin=structure["begin"], grammar=structure["schema"], end=structure["end"]
                )
            )
    except (ValueError, KeyError, TypeError, StopIteration, AssertionError) as exc:
        raise ValueError(
            'structural_tag must be JSON {"structures": [{"begin", "schema", "end"}], "triggers": [...]} with each '
            f"begin starting with one of the triggers ({type(exc).__name__}: {exc})."
        ) from None
    return llguidance.StructTag.to_grammar(tags)


class GrammarCompiler:
    """One per engine: the tokenizer as llguidance sees it (built on first use, about a second) and the checks of
    grammars against it."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int], options: dict[str, Any] | None = None):
        """`options`: `--structured-outputs-config` (`backend`, and JSON options every request gets)."""
        options = dict(options or {})
        backend = options.pop("backend", "auto")
        if backend not in ("auto", "guidance"):
            raise ValueError(f"Structured outputs backend {backend!r} is not available; jaxserve has 'guidance'.")
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(
                f"Unknown structured outputs options {sorted(unknown)}; known: backend, {', '.join(OPTIONS)}."
            )
        self._forced = {name: True for name, on in options.items() if on}
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._lock = threading.Lock()

    @functools.cached_property
    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            return llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids or None
            )

    def compile(self, params: StructuredOutputsParams) -> str:
        """The checked grammar of `params`; ValueError naming what is wrong with it."""
        grammar = grammar_source(dataclasses.replace(params, **self._forced))
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ValueError(f"Invalid structured outputs {params.kind}: {error.strip()}")
        return grammar

    def matcher(self, grammar: str, waits_for: list[int] | None = None) -> Matcher:
        return Matcher(llguidance.LLMatcher(self._tokenizer, grammar, log_level=0), waits_for)

    @functools.cached_property
    def _executor(self) -> llguidance.LLExecutor:
        return llguidance.LLExecutor()

    def fill_bitmask(self, rows: list[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        """Write the tokens each matcher allows next into its row of `bitmask` (in parallel threads)."""
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(m._matcher, row) for m, row in rows], bitmask)


class Matcher:
    """A constrained sequence's place in its grammar. With `waits_for` (a reasoning model's end of thinking, as
    token ids) the grammar starts only once those tokens have been generated: until then every token is allowed."""

    def __init__(self, matcher: llguidance.LLMatcher, waits_for: list[int] | None = None):
        self._matcher = matcher
        self._waits_for = waits_for or None
        self._recent: list[int] = []

    @property
    def active(self) -> bool:
        """The grammar holds the next token."""
        return self._waits_for is None

    def accept(self, token: int) -> None:
        """Advance past a sampled token (the mask allowed it; a matcher in error allows only EOS from then on)."""
        if self._waits_for is not None:
            self._recent = [*self._recent, token][-len(self._waits_for) :]
            if self._recent == self._waits_for:
                self._waits_for = None
            return
        self._matcher.consume_token(token)

    @property
    def is_terminated(self) -> bool:
        """Nothing more may follow: the grammar is complete (or the matcher failed)."""
        return self.active and self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None
