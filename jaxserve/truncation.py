"""The one truncation rule of prompts, for generation and pooling alike (vLLM's `truncate_prompt_tokens`).

`truncate_prompt_tokens` k keeps k tokens of a prompt (-1: as many as the model takes, `max_model_len`);
`truncation_side` "left" keeps the last k, "right" the first k. Generation truncates on the left (the end of a
prompt is what the next token follows); pooling on the tokenizer's side unless the request names one. A k
above `max_model_len` is an error in vLLM's words. Text pairs are truncated by the tokenizer itself, to the
same length (`max_length`), since only it knows how to share the cut between the two texts.
"""

from __future__ import annotations

SIDES = ("left", "right")


def max_length(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The number of tokens to keep, or None for no truncation. Raises ValueError as vLLM words it."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens < -1:
        raise ValueError(f"truncate_prompt_tokens must be -1 or a positive integer, got {truncate_prompt_tokens}.")
    if truncate_prompt_tokens > max_model_len:
        raise ValueError(
            f"truncate_prompt_tokens value ({truncate_prompt_tokens}) is greater than max_model_len "
            f"({max_model_len}). Please, select a smaller truncation size."
        )
    return max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens


def truncate(
    token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int, side: str = "left"
) -> list[int]:
    """`token_ids` cut to `truncate_prompt_tokens` on `side`."""
    if side not in SIDES:
        raise ValueError(f"truncation_side must be 'left' or 'right', got {side!r}.")
    keep = max_length(truncate_prompt_tokens, max_model_len)
    if keep is None or len(token_ids) <= keep:
        return list(token_ids)
    return token_ids[len(token_ids) - keep :] if side == "left" else token_ids[:keep]
