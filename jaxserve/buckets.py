"""The fixed shapes XLA compiles (docs/architecture.md §3). One token budget B and one sequence cap define them
all: token counts T are padded to a rung (powers of two from 16 to 512, then multiples of 512, and B itself
last; on CPU, where padding rows cost compute rather than nothing, the powers of two start at 1),
and the sequence/logits-row dimension of a program follows its token rung: S = min(T, max_num_seqs).
A step never has more sequences or logits rows than tokens, so one program per T rung covers every step."""

from __future__ import annotations

import dataclasses

ACCELERATOR_MIN_RUNG = 16
CPU_MIN_RUNG = 1
POW2_LIMIT = 512


def token_rungs(max_num_batched_tokens: int, min_rung: int = ACCELERATOR_MIN_RUNG) -> list[int]:
    budget = max_num_batched_tokens
    rungs = []
    rung = min_rung
    while rung < budget and rung <= POW2_LIMIT:
        rungs.append(rung)
        rung *= 2
    rung = 2 * POW2_LIMIT
    while rung < budget:
        rungs.append(rung)
        rung += POW2_LIMIT
    rungs.append(budget)
    return rungs


def seq_rung(token_rung: int, max_num_seqs: int) -> int:
    return min(token_rung, max_num_seqs)


@dataclasses.dataclass(frozen=True)
class BucketShape:
    """What fixes a runner's rungs: the sequence cap, the token budget and the smallest rung."""

    max_num_seqs: int
    max_num_batched_tokens: int
    min_token_rung: int

    @property
    def token_rungs(self) -> list[int]:
        return token_rungs(self.max_num_batched_tokens, self.min_token_rung)
