"""The one normalizer of prompt inputs, for the offline API and the server's routes alike.

A prompt is a text, a list of token ids, or (offline) a dict `{"prompt": text}` / `{"prompt_token_ids": ids}`,
optionally with a `cache_salt`. A request carries one prompt or a list of them; `batch_prompts` turns either
into a list (vLLM's `parse_and_batch_prompt`), and `text_and_ids` splits one into its text and token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

PromptType = str | list[int] | dict[str, Any]


def batch_prompts(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt or several, as a list; a flat list of ints is one prompt of token ids."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    items = list(prompts)
    if not items:
        raise ValueError("You must pass at least one prompt")
    if all(isinstance(t, int) for t in items):
        return [items]
    return items


def text_and_ids(prompt: PromptType, encode: Callable[[str], list[int]]) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt; a text is tokenized with `encode`, token ids are taken as given."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return text_and_ids(prompt["prompt"], encode)
    if isinstance(prompt, str):
        return prompt, encode(prompt)
    return None, list(prompt)


def text_or_ids(prompt: PromptType) -> str | list[int]:
    """The text of a prompt, or its token ids when it brings them (pooling tokenizes texts itself)."""
    if isinstance(prompt, dict):
        return list(prompt["prompt_token_ids"]) if "prompt_token_ids" in prompt else prompt["prompt"]
    return prompt
