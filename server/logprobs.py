"""Logprobs in each API's own shape: completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) and chat's list of `{token, logprob, bytes, top_logprobs}` entries."""

from __future__ import annotations

from jaxserve.outputs import Logprob, TokenLogprobs
from jaxserve.tokenizer import Tokenizer

from .protocol import ChatLogProb, ChatLogProbs, ChatLogProbsContent, CompletionLogProbs

NEG_INF_LOGPROB = -9999.0  # JSON has no -inf


def _value(logprob: float) -> float:
    return max(logprob, NEG_INF_LOGPROB)


def _token(token_id: int, logprob: Logprob | None, tokenizer: Tokenizer, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.token_text(token_id, skip_special_tokens=False)


def prompt_logprobs_json(entries: list[TokenLogprobs | None] | None) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position (None for the first), the prompt token's and the top
    alternatives' `{logprob, rank, decoded_token}` by token id."""
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            str(token): {"logprob": _value(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token, lp in entry.items()
        }
        for entry in entries
    ]


def completion_logprobs(
    token_ids: list[int],
    entries: list[TokenLogprobs | None],
    tokenizer: Tokenizer,
    text_offset: int,
    as_ids: bool = False,
) -> CompletionLogProbs:
    """One token per position; an entry of None (a prompt's first token) has no logprob. Every field is set
    explicitly, so that a stream chunk (serialized without unset fields) carries them."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) if entry else None
        token = _token(token_id, chosen, tokenizer, as_ids)
        tokens.append(token)
        token_logprobs.append(_value(chosen.logprob) if chosen else None)
        top_logprobs.append(
            {_token(t, lp, tokenizer, as_ids): _value(lp.logprob) for t, lp in entry.items()} if entry else None
        )
        offsets.append(text_offset)
        text_offset += len(token)
    return CompletionLogProbs(
        text_offset=offsets, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=top_logprobs
    )


def chat_logprobs(
    token_ids: list[int], entries: list[TokenLogprobs], num_top: int, tokenizer: Tokenizer, as_ids: bool = False
) -> ChatLogProbs:
    """The sampled token of each position, with the `num_top` most likely alternatives by rank (-1: all)."""
    limit = float("inf") if num_top == -1 else num_top
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        token = _token(token_id, chosen, tokenizer, as_ids)
        top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= limit), key=_rank)
        content.append(
            ChatLogProbsContent(
                token=token,
                logprob=_value(chosen.logprob),
                bytes=list(token.encode()),
                top_logprobs=[_chat_entry(t, lp, tokenizer, as_ids) for t, lp in top],
            )
        )
    return ChatLogProbs(content=content)


def _rank(item: tuple[int, Logprob]) -> int:
    return item[1].rank


def _chat_entry(token_id: int, logprob: Logprob, tokenizer: Tokenizer, as_ids: bool) -> ChatLogProb:
    token = _token(token_id, logprob, tokenizer, as_ids)
    return ChatLogProb(token=token, logprob=_value(logprob.logprob), bytes=list(token.encode()))
