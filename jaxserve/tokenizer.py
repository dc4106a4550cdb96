"""Tokenizer, chat templates and incremental detokenization.

The tokenizer comes from `transformers.AutoTokenizer` (configs and tokenizers are all jaxserve takes from
transformers). Detokenization streams through `tokenizers`' `DecodeStream`, which holds back bytes until
they form whole UTF-8 characters, so no half character is ever emitted.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase

NO_TEMPLATE_MESSAGE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
    "template if the tokenizer does not define one."
)
PRIMING_TOKENS = 6  # prompt tokens replayed into a fresh DecodeStream so the first output detokenizes in context


def load_chat_template(template: str | Path | None) -> str | None:
    """A `--chat-template` value: a file path, or the template text itself."""
    if template is None:
        return None
    path = Path(template)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:
        pass
    if any(c in str(template) for c in "{}\n"):
        return str(template)
    raise ValueError(f"The supplied chat template ({template}) looks like a file path, but it failed to be opened.")


class Tokenizer:
    def __init__(self, folder: Path, chat_template: str | None = None):
        # never the folder's own code: a tokenizer only remote code defines (InternLM2's, over a SentencePiece
        # tokenizer.model) is built by transformers from the model file, without asking on standard input
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.chat_template = chat_template or self.hf.chat_template
        self._backend = self.hf.backend_tokenizer
        self._truncation_lock = threading.Lock()

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def side(self) -> str:
        """The side the tokenizer truncates on ("right" unless its config says otherwise)."""
        return self.hf.truncation_side

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def encode_pooling(
        self, text: str, text_pair: str | None = None, max_length: int | None = None, side: str | None = None
    ) -> tuple[list[int], list[int] | None]:
        """(token ids, token type ids) of a text or a text pair, with special tokens; truncated to
        `max_length` on `side` (the tokenizer's own side by default), special tokens kept."""
        if side is not None and side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {side!r}.")
        with self._truncation_lock:  # the side is tokenizer state, and fast tokenizers set truncation per call
            default_side = self.hf.truncation_side
            self.hf.truncation_side = side or default_side
            try:
                encoded = self.hf(text, text_pair, truncation=max_length is not None, max_length=max_length)
            finally:
                self.hf.truncation_side = default_side
        return encoded["input_ids"], encoded.get("token_type_ids")

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """The start of `text` that tokenizes to at most `max_tokens` tokens (special tokens not counted)."""
        offsets = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(NO_TEMPLATE_MESSAGE)
        if add_generation_prompt and continue_final_message:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self.hf.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            **(chat_template_kwargs or {}),
        )

    def token_text(self, token_id: int, skip_special_tokens: bool = True) -> str:
        """How one token reads on its own (the `decoded_token` of a logprob entry)."""
        return self.hf.decode([token_id], skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_token_ids: list[int], skip_special_tokens: bool, spaces_between_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """With `skip_special_tokens` off and `spaces_between_special_tokens` on, added tokens (chat markers and
        the like) are set apart from the text around them by a space, as HF's slow decoding (and vLLM's) does."""
        spaced = frozenset(self.hf.added_tokens_decoder) if spaces_between_special_tokens else frozenset()
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in prompt_token_ids[-PRIMING_TOKENS:]:
            stream.step(self._backend, token_id)
        return IncrementalDetokenizer(self._backend, stream, frozenset() if skip_special_tokens else spaced)


class IncrementalDetokenizer:
    """Turns output tokens into text one token at a time, never splitting a UTF-8 character."""

    def __init__(self, backend, stream: DecodeStream, spaced_tokens: frozenset[int]):
        self._backend = backend
        self._stream = stream
        self._spaced = spaced_tokens
        self._after_spaced = False
        self._started = False

    def step(self, token_id: int) -> str:
        text = self._stream.step(self._backend, token_id) or ""
        spaced = token_id in self._spaced
        if text and self._started and (spaced or self._after_spaced):
            text = " " + text
        self._after_spaced = spaced if text or spaced else self._after_spaced
        self._started = self._started or bool(text)
        return text
