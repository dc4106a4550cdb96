"""Whisper's timestamp rules that depend on a sequence's past tokens, as HF's `WhisperTimeStampLogitsProcessor`
(after OpenAI's `ApplyTimestampRules`) applies them, written as the bitmask row of the tokens that may come next.
The rule that depends on the logits (timestamps outweighing every text token) is the sampler's
(`sampler.TokenRules.timestamp_begin`).

Tokens from `timestamp_begin` on are timestamps (<|0.00|>, <|0.02|>, ...). <|notimestamps|> is never sampled; the
first output is a timestamp, at most `max_initial_timestamp_index` steps in; timestamps come in pairs (a segment's
end, then the next one's start) unless the text ends; and they never go back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TimestampRules:
    timestamp_begin: int
    eos_token_id: int
    no_timestamps_token_id: int
    vocab_size: int
    max_initial_timestamp_index: int | None = None

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any], vocab_size: int) -> TimestampRules | None:
        """A Whisper generation_config.json's rules; None for a model without timestamp tokens."""
        no_timestamps = generation_config.get("no_timestamps_token_id")
        eos = generation_config.get("eos_token_id")
        if no_timestamps is None or eos is None:
            return None
        return cls(
            timestamp_begin=no_timestamps + 1,
            eos_token_id=eos if isinstance(eos, int) else eos[0],
            no_timestamps_token_id=no_timestamps,
            vocab_size=vocab_size,
            max_initial_timestamp_index=generation_config.get("max_initial_timestamp_index"),
        )

    def allowed(self, outputs: list[int]) -> np.ndarray:
        """[vocab_size] bool: the tokens that may follow a sequence's sampled `outputs`."""
        begin = self.timestamp_begin
        allowed = np.ones(self.vocab_size, np.bool_)
        allowed[self.no_timestamps_token_id] = False
        if not outputs:
            allowed[:begin] = False
            if self.max_initial_timestamp_index is not None:
                allowed[begin + self.max_initial_timestamp_index + 1 :] = False
            return allowed
        last_was_timestamp = outputs[-1] >= begin
        penultimate_was_timestamp = len(outputs) < 2 or outputs[-2] >= begin
        if last_was_timestamp:
            if penultimate_was_timestamp:
                allowed[begin:] = False  # a pair is closed: text (or the end) next
            else:
                allowed[: self.eos_token_id] = False  # a segment's end: its pair, or the end
        stamps = [token for token in outputs if token >= begin]
        if stamps:
            floor = stamps[-1] if last_was_timestamp and not penultimate_was_timestamp else stamps[-1] + 1
            allowed[begin:floor] = False
        return allowed

    def bitmask(self, outputs: list[int], width: int) -> np.ndarray:
        """`allowed` packed as a bitmask row of `width` int32 words (token t at bit t % 32 of word t // 32)."""
        bits = np.zeros(width * 32, np.bool_)
        bits[: self.vocab_size] = self.allowed(outputs)
        return np.packbits(bits, bitorder="little").view(np.int32)
