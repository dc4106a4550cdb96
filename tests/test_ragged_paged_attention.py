"""Ragged paged attention against a naive float64 NumPy reference.

Every case is a flat batch built from (cached_len, new_len) pairs: decode rows, prefill chunks that continue a
cache, and fresh prefills in one call, on scattered pages, with padded tokens and padded sequences poisoned so
that any leak shows up as a wrong real output, a non-zero padded output, or a page slot that changed. The
behaviour tests run on the dispatcher (the reference on CPU) and on the Pallas kernel in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels_pallas import kv_cache_shape, ragged_paged_attention, ragged_paged_attention_reference
from jaxserve.kernels_pallas.ragged_paged_attention import (
    default_block_q,
    default_num_splits,
    default_pages_per_block,
    ragged_paged_attention_pallas,
)

rpa_module = importlib.import_module("jaxserve.kernels_pallas.ragged_paged_attention")

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("no_persistent_compile_cache")]

STATIC = ("sm_scale", "sliding_window", "soft_cap", "causal", "block_q", "num_splits", "pages_per_block")
pallas_interpret = jax.jit(
    functools.partial(ragged_paged_attention_pallas, interpret=True, platform="gpu"), static_argnames=STATIC
)
# the TPU kernel (pages in HBM, DMA'd into VMEM), in the TPU interpreter, which models the DMAs and semaphores
pallas_tpu_interpret = jax.jit(
    functools.partial(ragged_paged_attention_pallas, interpret=True, platform="tpu"), static_argnames=STATIC
)
KERNELS = {
    "reference": ragged_paged_attention_reference,
    "dispatcher": ragged_paged_attention,
    "pallas": pallas_interpret,
    "pallas-tpu": pallas_tpu_interpret,
}
# what the behaviour tests run: the dispatcher (the reference on CPU) and the Pallas kernels in interpret mode
ATTENTION = {"dispatcher": ragged_paged_attention, "pallas": pallas_interpret, "pallas-tpu": pallas_tpu_interpret}


def _with_marks(names):
    """The TPU kernel's cases carry the `targets` mark: `make test` runs them in a process of their own."""
    return [pytest.param(n, marks=pytest.mark.targets) if n.endswith("-tpu") else n for n in names]


@pytest.fixture(params=_with_marks(ATTENTION))
def attention(request):
    return ATTENTION[request.param]


# (Hq, Hkv, head_dim, page_size): GQA ratios 1/4/8 each meet both head dims and both page sizes, and every
# (head_dim, page_size) pair appears, without running the full 3 x 2 x 2 product.
CONFIGS = [
    (8, 8, 64, 16),
    (8, 8, 128, 32),
    (8, 2, 128, 16),
    (8, 2, 64, 32),
    (8, 1, 64, 32),
    (8, 1, 128, 16),
]
CONFIG_IDS = [f"hq{hq}-hkv{hkv}-d{d}-ps{ps}" for hq, hkv, d, ps in CONFIGS]


def mixed_seqs(page_size: int) -> list[tuple[int, int]]:
    """(cached_len, new_len) for a mixed step; every kind of boundary relative to `page_size`."""
    ps = page_size
    return [
        (4 * ps + 13, 1),  # decode, long cache, ends mid-page
        (2 * ps + 5, 2 * ps - 3),  # prefill chunk continuing a cache, crosses two page boundaries, ends mid-page
        (0, ps + 7),  # fresh prefill, crosses one boundary
        (3 * ps - 1, 1),  # decode filling the last slot of a page
        (2 * ps, 1),  # decode opening a new page
        (ps - 3, 3),  # continuation ending exactly on a page boundary
        (0, 1),  # fresh single-token prompt
    ]


@dataclasses.dataclass
class RaggedCase:
    """One call's inputs as NumPy arrays, plus the (cached_len, new_len) of each real sequence."""

    seqs: list[tuple[int, int]]
    q: np.ndarray  # [T, Hq, D] float32
    k: np.ndarray  # [T, Hkv, D]
    v: np.ndarray  # [T, Hkv, D]
    kv_pages: np.ndarray  # [P, page_size, 2Hkv, D]
    kv_lens: np.ndarray  # [S]
    block_table: np.ndarray  # [S, pages_per_seq]
    cu_q_lens: np.ndarray  # [S + 1]
    num_seqs: np.ndarray  # [1]

    @property
    def num_real(self) -> int:
        return int(self.cu_q_lens[len(self.seqs)])

    @property
    def sm_scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def args(self) -> tuple[jax.Array, ...]:
        return tuple(
            jnp.asarray(a)
            for a in (
                self.q,
                self.k,
                self.v,
                self.kv_pages,
                self.kv_lens,
                self.block_table,
                self.cu_q_lens,
                self.num_seqs,
            )
        )

    def value_scale(self) -> float:
        """Largest |V| any real query can see: the bound the absolute tolerance is scaled by."""
        return float(max(np.abs(self.v[: self.num_real]).max(initial=0.0), np.abs(self.kv_pages[:, :, 1::2]).max()))


def make_case(
    rng: np.random.Generator,
    seqs: list[tuple[int, int]],
    *,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    page_size: int = 16,
    pad_tokens: int = 5,
    pad_seqs: int = 2,
    poison: str = "nan",
    kv_pages: np.ndarray | None = None,
    block_rows: np.ndarray | None = None,
    spare_pages: int = 6,
) -> RaggedCase:
    """A random ragged step for `seqs` = [(cached_len, new_len), ...].

    Pages are handed out from a random permutation, so every block table is scattered and non-contiguous;
    table entries past a sequence's last page point at other sequences' pages. The cache starts full of random
    values (stale data everywhere), unless `kv_pages` / `block_rows` continue an earlier call. Padding is
    poisoned: padded q/k/v rows hold NaN or +-1e30 (`poison`), padded block-table rows point at real pages,
    padded kv_lens are garbage (huge, negative, int32 max)."""
    num_real = sum(new for _, new in seqs)
    num_tokens = num_real + pad_tokens
    need = [-(-(cached + new) // page_size) for cached, new in seqs]

    if kv_pages is None:
        num_pages = sum(need) + spare_pages
        kv_pages = (1.5 * rng.standard_normal(kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim))).astype(
            np.float32
        )
    num_pages = kv_pages.shape[0]
    if block_rows is None:
        pages_per_seq = max(need) + 2
        order = rng.permutation(num_pages)
        block_rows = rng.integers(0, num_pages, (len(seqs), pages_per_seq)).astype(np.int32)  # stray tails
        used = 0
        for s, n in enumerate(need):
            block_rows[s, :n] = order[used : used + n]
            used += n
    pages_per_seq = block_rows.shape[1]
    assert all(n <= pages_per_seq for n in need)

    def rows(n: int, heads: int, std: float) -> np.ndarray:
        real = std * rng.standard_normal((num_real, heads, head_dim))
        if poison == "nan":
            pad = np.full((n - num_real, heads, head_dim), np.nan)
        else:
            pad = np.where(rng.random((n - num_real, heads, head_dim)) < 0.5, 1e30, -1e30)
        return np.concatenate([real, pad]).astype(np.float32)

    q, k, v = (
        rows(num_tokens, num_q_heads, 1.5),
        rows(num_tokens, num_kv_heads, 1.5),
        rows(num_tokens, num_kv_heads, 1.0),
    )

    real_pages = block_rows[:, 0].tolist()
    block_table = np.concatenate(
        [block_rows, rng.choice(real_pages, (pad_seqs, pages_per_seq)).astype(np.int32)]
    ).astype(np.int32)
    garbage = np.array([10**6, -7, 2**31 - 1, 3, 12345], np.int64)
    kv_lens = np.array([c + n for c, n in seqs] + [int(garbage[i % 5]) for i in range(pad_seqs)], np.int64).astype(
        np.int32
    )
    cu_q_lens = np.concatenate([[0], np.cumsum([n for _, n in seqs]), np.full(pad_seqs, num_real)]).astype(np.int32)
    return RaggedCase(seqs, q, k, v, kv_pages, kv_lens, block_table, cu_q_lens, np.array([len(seqs)], np.int32))


def naive_attention(
    q, k_all, v_all, first_pos, *, sm_scale, sliding_window=None, soft_cap=None, causal=True
) -> np.ndarray:
    """Float64 attention of one sequence's new queries over its whole K/V history.

    q [n, Hq, D] are the queries at positions first_pos .. first_pos + n - 1; k_all/v_all [L, Hkv, D] hold the
    keys/values at positions 0 .. L - 1. Query head h uses KV head h // (Hq // Hkv). A query at position p sees
    keys at positions j with j <= p (every key when not causal) and, with a sliding window W, p - j < W. Plain
    full softmax, no blocking."""
    q, k_all, v_all = (np.asarray(a, np.float64) for a in (q, k_all, v_all))
    group = q.shape[1] // k_all.shape[1]
    k_rep, v_rep = np.repeat(k_all, group, axis=1), np.repeat(v_all, group, axis=1)
    scores = np.einsum("nhd,lhd->hnl", q, k_rep) * sm_scale
    if soft_cap:
        scores = soft_cap * np.tanh(scores / soft_cap)
    q_pos = first_pos + np.arange(q.shape[0])[:, None]
    k_pos = np.arange(k_all.shape[0])[None, :]
    mask = k_pos <= q_pos if causal else np.ones((q.shape[0], k_all.shape[0]), bool)
    if sliding_window:
        mask &= q_pos - k_pos < sliding_window
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", weights, v_rep)


def naive_ragged_paged_attention(case: RaggedCase, *, sliding_window=None, soft_cap=None):
    """Float64 NumPy model of one ragged step: (out [T, Hq, D], expected kv_pages after the write).

    Loops over the real sequences: gathers the cached K/V of positions 0 .. cached_len - 1 slot by slot from the
    sequence's pages (K of head h in row 2h, V in row 2h + 1), appends the new K/V, and runs `naive_attention`.
    Padded output rows stay 0; the expected cache is the old one with exactly the new tokens' slots set."""
    pages = case.kv_pages.astype(np.float64)
    page_size = pages.shape[1]
    expected_pages = pages.copy()
    out = np.zeros(case.q.shape, np.float64)
    for s, (cached, new) in enumerate(case.seqs):
        lo = int(case.cu_q_lens[s])
        pos = np.arange(cached + new)
        page, offset = case.block_table[s, pos // page_size], pos % page_size
        old = pages[page[:cached], offset[:cached]]  # [cached, 2Hkv, D]
        k_new, v_new = case.k[lo : lo + new].astype(np.float64), case.v[lo : lo + new].astype(np.float64)
        k_all = np.concatenate([old[:, 0::2], k_new])
        v_all = np.concatenate([old[:, 1::2], v_new])
        expected_pages[page[cached:], offset[cached:], 0::2] = k_new
        expected_pages[page[cached:], offset[cached:], 1::2] = v_new
        out[lo : lo + new] = naive_attention(
            case.q[lo : lo + new],
            k_all,
            v_all,
            cached,
            sm_scale=case.sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        )
    return out, expected_pages


def check(case: RaggedCase, out, kv_pages, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Assert a kernel result equals the NumPy model: real rows to tolerance, padded rows exactly 0, pages exact."""
    out, kv_pages = np.asarray(out), np.asarray(kv_pages)
    ref_out, ref_pages = naive_ragged_paged_attention(case, sliding_window=sliding_window, soft_cap=soft_cap)
    n = case.num_real
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert kv_pages.shape == case.kv_pages.shape and kv_pages.dtype == case.kv_pages.dtype
    np.testing.assert_allclose(out[:n], ref_out[:n], rtol=1e-4, atol=2e-5 * case.value_scale())
    assert np.all(out[n:] == 0.0), "padded tokens must come out as exact zeros"
    # exact: old contents everywhere, the new K/V (interleaved per head) in exactly the written slots
    changed = np.any(kv_pages != case.kv_pages, axis=(2, 3))
    expected_changed = np.any(ref_pages.astype(np.float32) != case.kv_pages, axis=(2, 3))
    np.testing.assert_array_equal(np.argwhere(changed), np.argwhere(expected_changed))
    np.testing.assert_array_equal(kv_pages, ref_pages.astype(np.float32))
    return ref_out


def run(case: RaggedCase, kernel, **kwargs):
    return kernel(*case.args(), sm_scale=case.sm_scale, **kwargs)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,page_size", CONFIGS, ids=CONFIG_IDS)
def test_mixed_batch_matches_numpy(attention, num_q_heads, num_kv_heads, head_dim, page_size):
    rng = np.random.default_rng(1000 + head_dim + page_size + num_kv_heads)
    case = make_case(
        rng,
        mixed_seqs(page_size),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
    )
    # the layout really is what the test claims: scattered pages, mixed kinds, padded tails
    assert case.q.shape[0] > case.num_real and case.kv_lens.shape[0] > len(case.seqs)
    assert any(np.any(np.diff(row[: -(-sum(sq) // page_size)]) != 1) for row, sq in zip(case.block_table, case.seqs))
    out, pages = run(case, attention)
    check(case, out, pages)


@pytest.mark.parametrize("kernel", _with_marks(KERNELS))
def test_every_kernel_agrees_with_numpy(kernel):
    case = make_case(np.random.default_rng(7), mixed_seqs(16), num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
    out, pages = run(case, KERNELS[kernel])
    check(case, out, pages)


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_padding_never_leaks(attention, poison):
    """Same real tokens with and without poisoned padding: identical real outputs, zero padded rows, same pages."""
    seqs = [(37, 1), (20, 9), (0, 12)]
    rng = np.random.default_rng(11)
    case = make_case(rng, seqs, pad_tokens=11, pad_seqs=3, poison=poison)
    # padded block-table rows alias real pages, and a padded kv_len is int32 max
    assert set(case.block_table[len(seqs) :].ravel()) <= set(case.block_table[: len(seqs)].ravel())
    assert 2**31 - 1 in case.kv_lens.tolist()
    n, s = case.num_real, len(seqs)
    clean = dataclasses.replace(
        case,
        q=case.q[:n],
        k=case.k[:n],
        v=case.v[:n],
        kv_lens=case.kv_lens[:s],
        block_table=case.block_table[:s],
        cu_q_lens=case.cu_q_lens[: s + 1],
    )
    out, pages = run(case, attention)
    clean_out, clean_pages = run(clean, attention)
    check(case, out, pages)
    np.testing.assert_allclose(np.asarray(out)[:n], np.asarray(clean_out), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pages), np.asarray(clean_pages))


def test_all_padding_step_is_a_no_op(attention):
    """num_seqs = 0 (a warm-up / empty bucket): every output row is 0 and no page changes."""
    case = make_case(np.random.default_rng(3), [(5, 3)], pad_tokens=6, pad_seqs=3)
    case = dataclasses.replace(case, seqs=[], num_seqs=np.array([0], np.int32), cu_q_lens=np.zeros_like(case.cu_q_lens))
    out, pages = run(case, attention)
    assert np.all(np.asarray(out) == 0.0)
    np.testing.assert_array_equal(np.asarray(pages), case.kv_pages)


@pytest.mark.parametrize("block_pages", [1, 3], ids=["one-page-blocks", "three-page-blocks"])
def test_blocked_online_softmax(monkeypatch, block_pages):
    """Shrink the gather bound so the kv walk takes several blocks (three pages: with a ragged last block)."""
    seqs = [(5 * 16 + 3, 1), (2 * 16 + 9, 7), (0, 16 + 5)]
    case = make_case(np.random.default_rng(21), seqs, num_kv_heads=2, head_dim=64, page_size=16, pad_tokens=3)
    num_tokens, (_, page_size, two_hkv, head_dim) = case.q.shape[0], case.kv_pages.shape
    pages_per_seq = case.block_table.shape[1]
    monkeypatch.setattr(rpa_module, "_MAX_GATHERED_ELEMENTS", block_pages * num_tokens * page_size * two_hkv * head_dim)
    assert rpa_module._kv_block_pages(num_tokens, page_size, pages_per_seq, two_hkv * head_dim) == block_pages
    assert pages_per_seq % block_pages != 0 or block_pages == 1  # the padded-table path is taken for 3
    out, pages = run(case, ragged_paged_attention_reference)
    check(case, out, pages)
    out_w, pages_w = run(case, ragged_paged_attention_reference, sliding_window=7, soft_cap=5.0)
    check(case, out_w, pages_w, sliding_window=7, soft_cap=5.0)


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,page_size",
    [CONFIGS[0], CONFIGS[2], CONFIGS[4]],
    ids=[CONFIG_IDS[0], CONFIG_IDS[2], CONFIG_IDS[4]],
)
def test_pages_written_by_an_earlier_call(attention, num_q_heads, num_kv_heads, head_dim, page_size):
    """Prefill, then decode / continue / start a new sequence on the returned cache; the second call must equal
    attention over each sequence's full K/V history (from the inputs of both calls, not from pages)."""
    rng = np.random.default_rng(5 + page_size)
    ps = page_size
    dims = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=ps)
    # final lengths decide the pages; the first call fills a prefix of them
    first = [(0, 2 * ps + 3), (0, ps - 1), (0, ps)]
    second = [(2 * ps + 3, 1), (ps - 1, ps + 4), (ps, 1), (0, 6)]  # decode, continuation over a boundary, decode, fresh
    final = [c + n for c, n in second]
    pages_per_seq = max(-(-f // ps) for f in final) + 1
    num_pages = sum(-(-f // ps) for f in final) + 4
    order = rng.permutation(num_pages)
    block_rows = rng.integers(0, num_pages, (len(second), pages_per_seq)).astype(np.int32)
    used = 0
    for s, f in enumerate(final):
        n = -(-f // ps)
        block_rows[s, :n] = order[used : used + n]
        used += n
    cache = (1.5 * rng.standard_normal(kv_cache_shape(num_pages, ps, num_kv_heads, head_dim))).astype(np.float32)

    call1 = make_case(rng, first, kv_pages=cache, block_rows=block_rows[: len(first)], **dims)
    out1, pages1 = run(call1, attention)
    check(call1, out1, pages1)

    call2 = make_case(rng, second, kv_pages=np.asarray(pages1), block_rows=block_rows, pad_tokens=4, pad_seqs=1, **dims)
    out2, pages2 = run(call2, attention)
    ref2 = check(call2, out2, pages2)

    # independent of the page bookkeeping: attention over the concatenated inputs of both calls
    for s, (cached, new) in enumerate(second):
        k_hist, v_hist = [], []
        if s < len(first):
            lo = call1.cu_q_lens[s]
            k_hist.append(call1.k[lo : lo + first[s][1]])
            v_hist.append(call1.v[lo : lo + first[s][1]])
        lo = call2.cu_q_lens[s]
        k_hist.append(call2.k[lo : lo + new])
        v_hist.append(call2.v[lo : lo + new])
        want = naive_attention(
            call2.q[lo : lo + new], np.concatenate(k_hist), np.concatenate(v_hist), cached, sm_scale=call2.sm_scale
        )
        np.testing.assert_allclose(ref2[lo : lo + new], want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(out2)[lo : lo + new], want, rtol=1e-4, atol=2e-5 * call2.value_scale())


def window_case(page_size: int = 16) -> RaggedCase:
    ps = page_size
    seqs = [
        (2 * ps + 1, 1),  # decode at 2ps+1: window 2ps-5 .. 2ps+1 crosses a page boundary
        (ps - 4, 9),  # chunk straddling a boundary; early queries see cache, later ones only new tokens
        (0, ps + 6),  # fresh prefill longer than the window
        (3 * ps + 10, 1),  # decode with the window entirely inside one page, far from the cache start
    ]
    return make_case(np.random.default_rng(99), seqs, num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=ps)


def test_sliding_window_changes_result_and_matches_numpy(attention):
    case = window_case()
    full, _ = run(case, attention)
    windowed, pages = run(case, attention, sliding_window=7)
    check(case, windowed, pages, sliding_window=7)
    n = case.num_real
    assert np.abs(np.asarray(windowed)[:n] - np.asarray(full)[:n]).max() > 0.1
    # a window covering every context is no window at all
    wide, _ = run(case, attention, sliding_window=10_000)
    np.testing.assert_allclose(np.asarray(wide), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_window_of_one_returns_own_value(attention):
    """sliding_window=1: every query sees only itself, so out = its own V (shared by the group's heads)."""
    case = window_case()
    out, pages = run(case, attention, sliding_window=1)
    check(case, out, pages, sliding_window=1)
    n, group = case.num_real, case.q.shape[1] // case.k.shape[1]
    np.testing.assert_allclose(np.asarray(out)[:n], np.repeat(case.v[:n], group, axis=1), rtol=1e-6, atol=1e-6)


def test_soft_cap_changes_result_and_matches_numpy(attention):
    case = window_case()
    full, _ = run(case, attention)
    capped, pages = run(case, attention, soft_cap=5.0)
    check(case, capped, pages, soft_cap=5.0)
    n = case.num_real
    assert np.abs(np.asarray(capped)[:n] - np.asarray(full)[:n]).max() > 0.1
    both, pages = run(case, attention, sliding_window=7, soft_cap=5.0)
    check(case, both, pages, sliding_window=7, soft_cap=5.0)


@pytest.mark.parametrize("kernel", _with_marks(KERNELS))
def test_jit_matches_eager_and_reuses_one_compile(kernel):
    """Under jax.jit (static kwargs bound by partial): same results, and a second ragged layout with the same
    array shapes runs on the same compiled program."""
    ps = 16
    kwargs = dict(sliding_window=7, soft_cap=5.0)
    a = make_case(np.random.default_rng(31), mixed_seqs(ps), page_size=ps, pad_tokens=4, pad_seqs=2)
    # another layout with identical shapes: same T, S, pages, pages_per_seq, different raggedness
    seqs_b = [(ps + 2, 1), (0, a.num_real - 6), (3 * ps, 5)]
    b = make_case(np.random.default_rng(32), seqs_b, page_size=ps, pad_tokens=4, pad_seqs=len(a.seqs) + 2 - len(seqs_b))
    b = dataclasses.replace(
        b, kv_pages=np.pad(b.kv_pages, ((0, a.kv_pages.shape[0] - b.kv_pages.shape[0]), (0, 0), (0, 0), (0, 0)))
    )
    b = dataclasses.replace(
        b, block_table=np.pad(b.block_table, ((0, 0), (0, a.block_table.shape[1] - b.block_table.shape[1])))
    )
    assert [x.shape for x in a.args()] == [x.shape for x in b.args()]

    jitted = jax.jit(functools.partial(KERNELS[kernel], sm_scale=a.sm_scale, **kwargs))
    for case in (a, b):
        out, pages = jitted(*case.args())
        check(case, out, pages, **kwargs)
        eager_out, eager_pages = run(case, ragged_paged_attention_reference, **kwargs)
        np.testing.assert_allclose(np.asarray(out), np.asarray(eager_out), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(pages), np.asarray(eager_pages))
    assert jitted._cache_size() == 1


@pytest.mark.parametrize("stale", [np.nan, np.inf])
def test_stale_values_in_reused_pages_never_leak(attention, stale):
    """Slots past a sequence's length (left over from an earlier request) may hold anything, NaN included."""
    case = make_case(np.random.default_rng(21), [(20, 3), (5, 9), (0, 4)], page_size=16)
    poisoned = case.kv_pages.copy()
    written = np.zeros(poisoned.shape[:2], bool)
    for s, (cached, new) in enumerate(case.seqs):
        pos = np.arange(cached + new)
        written[case.block_table[s, pos // 16], pos % 16] = True
    poisoned[~written] = stale
    case = dataclasses.replace(case, kv_pages=poisoned)
    out, _ = run(case, attention)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(
        np.asarray(out)[: case.num_real], naive_ragged_paged_attention(case)[0][: case.num_real], rtol=1e-4, atol=1e-4
    )


def test_non_causal_read_only_attends_to_every_cached_key(attention):
    """Cross-attention (Whisper's decoder over its encoder's K/V): causal=False, k = v = None. Every query token of
    a sequence, decode (1) or prefill-like (> 1), sees all kv_len keys of its pages with no mask; nothing is
    written. kv_len 300 (Whisper's 1500 scaled down) ends mid-page, and the slots past it hold NaN."""
    seqs = [(300 - 1, 1), (300 - 9, 9), (300 - 1, 1), (300 - 20, 20), (131 - 3, 3)]  # (cached, q_len): kv_len - q_len
    case = make_case(np.random.default_rng(61), seqs, num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
    page_size, kv_lens = case.kv_pages.shape[1], case.kv_lens[: len(seqs)]
    stale = np.ones(case.kv_pages.shape[:2], bool)
    for s, kv_len in enumerate(kv_lens):
        pos = np.arange(kv_len)
        stale[case.block_table[s, pos // page_size], pos % page_size] = False
    case = dataclasses.replace(case, kv_pages=np.where(stale[:, :, None, None], np.nan, case.kv_pages))
    q, _, _, *cache_args = case.args()
    out, pages = attention(q, None, None, *cache_args, sm_scale=case.sm_scale, causal=False)

    np.testing.assert_array_equal(np.asarray(pages), case.kv_pages)  # NaN where NaN was: unchanged
    want = np.zeros(case.q.shape)
    for s, kv_len in enumerate(kv_lens):
        lo, hi = case.cu_q_lens[s], case.cu_q_lens[s + 1]
        pos = np.arange(kv_len)
        kv = case.kv_pages[case.block_table[s, pos // page_size], pos % page_size]  # [kv_len, 2Hkv, D]
        want[lo:hi] = naive_attention(case.q[lo:hi], kv[:, 0::2], kv[:, 1::2], 0, sm_scale=case.sm_scale, causal=False)
    n = case.num_real
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    np.testing.assert_allclose(np.asarray(out)[:n], want[:n], rtol=1e-4, atol=2e-5)
    assert np.all(np.asarray(out)[n:] == 0.0), "padded tokens must come out as exact zeros"


@pytest.mark.parametrize("kernel", ["reference", "pallas"])
def test_non_causal_takes_no_new_keys_and_no_window(kernel):
    case = make_case(np.random.default_rng(67), [(20, 2)])
    q, k, v, *cache_args = case.args()
    call = functools.partial(KERNELS[kernel], sm_scale=case.sm_scale)
    with pytest.raises(ValueError, match="k=None and v=None"):
        call(q, k, v, *cache_args, causal=False)
    with pytest.raises(ValueError, match="no sliding window"):
        call(q, None, None, *cache_args, causal=False, sliding_window=8)
    with pytest.raises(ValueError, match="needs k and v"):
        call(q, None, None, *cache_args)


# --- the Pallas kernel's own parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block_q,num_splits,pages_per_block",
    [(1, 1, 1), (2, 4, 2), (8, 3, 3), (32, 1, 8)],
    ids=["one-token-one-page", "split-k-4", "split-k-3-uneven", "blocks-longer-than-sequences"],
)
def test_pallas_tiling(block_q, num_splits, pages_per_block):
    """Any tiling gives the same attention and the same pages: query blocks shorter than, equal to and longer
    than sequences; more splits than a context has pages; cache blocks of one page, of a number of pages that
    does not divide the block table (read past its end), and longer than any context."""
    case = make_case(np.random.default_rng(41), mixed_seqs(16), num_q_heads=8, num_kv_heads=2, page_size=16)
    tiling = dict(block_q=block_q, num_splits=num_splits, pages_per_block=pages_per_block)
    for kwargs in ({}, dict(sliding_window=7, soft_cap=5.0)):
        out, pages = run(case, pallas_interpret, **tiling, **kwargs)
        check(case, out, pages, **kwargs)


def test_pallas_split_k_decode_over_long_contexts():
    """The decode shape split-K is for: one token per sequence over contexts of many pages, the splits' outputs
    merged by their log-sum-exps (a split may see no key at all: the short context)."""
    ps = 16
    seqs = [(40 * ps + 5, 1), (17 * ps, 1), (3, 1), (25 * ps - 1, 1)]
    case = make_case(np.random.default_rng(43), seqs, num_q_heads=8, num_kv_heads=1, head_dim=128, page_size=ps)
    assert default_num_splits(default_block_q(case.q.shape[0], case.kv_lens.shape[0], 8), 1) > 1
    for num_splits in (None, 8):
        out, pages = run(case, pallas_interpret, num_splits=num_splits)
        check(case, out, pages)


def test_pallas_bfloat16_cache_matches_the_reference():
    """bf16 queries and cache (matmuls in bf16, softmax in float32): close to the float32 model; the pages
    written are exactly the bf16 K/V, as the reference writes them."""
    case = make_case(np.random.default_rng(47), mixed_seqs(16), num_q_heads=8, num_kv_heads=2, page_size=16)
    args = [jnp.asarray(a).astype(jnp.bfloat16) if a.dtype == np.float32 else jnp.asarray(a) for a in case.args()]
    out, pages = pallas_interpret(*args, sm_scale=case.sm_scale)
    ref_out, ref_pages = ragged_paged_attention_reference(*args, sm_scale=case.sm_scale)
    assert out.dtype == pages.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(pages, np.float32), np.asarray(ref_pages, np.float32))
    n = case.num_real
    want = naive_ragged_paged_attention(case)[0][:n]
    np.testing.assert_allclose(np.asarray(out, np.float32)[:n], want, atol=0.05 * case.value_scale())
    assert np.all(np.asarray(out, np.float32)[n:] == 0.0)


def test_pallas_writes_the_donated_cache_in_place():
    """Under jit with the cache donated, the kernel's aliased output is the cache buffer itself."""
    case = make_case(np.random.default_rng(53), mixed_seqs(16), num_q_heads=8, num_kv_heads=2, page_size=16)
    step = jax.jit(
        functools.partial(ragged_paged_attention_pallas, sm_scale=case.sm_scale, interpret=True), donate_argnums=3
    )
    args = list(case.args())
    pointer = args[3].unsafe_buffer_pointer()
    out, pages = step(*args)
    check(case, out, pages)
    assert args[3].is_deleted() and pages.unsafe_buffer_pointer() == pointer


def test_pallas_default_tiling():
    """Decode buckets (T == S) get one token per block, raised to 16 query rows; prefill buckets get their
    tokens per sequence slot, capped at 128 rows; small grids are split up to about 512 programs; cache steps
    are 64 tokens of whole pages on GPU, 256 tokens of DMA'd pages on TPU."""
    assert default_block_q(64, 64, group=4) == 4
    assert default_block_q(64, 64, group=16) == 1
    assert default_block_q(2048, 256, group=4) == 8
    assert default_block_q(2048, 16, group=4) == 32
    assert default_block_q(2048, 1, group=8) == 16
    assert default_num_splits(num_blocks=64, num_kv_heads=8) == 1
    assert default_num_splits(num_blocks=1, num_kv_heads=8) == 16
    assert default_num_splits(num_blocks=16, num_kv_heads=8) == 4
    assert (default_pages_per_block(16, "gpu"), default_pages_per_block(32, "gpu")) == (4, 2)
    assert (default_pages_per_block(128, "gpu"), default_pages_per_block(16, "tpu")) == (1, 16)


def test_tpu_cache_pads_the_head_dim_and_attention_ignores_the_padding(attention):
    """On TPU the cache's head dim is padded to 128 lanes; attention zero-pads q/k/v to it, writes the padded
    rows, and returns the model's head dim: the same result and the same used lanes as an unpadded cache."""
    assert kv_cache_shape(4, 16, 2, 64, "tpu") == (4, 16, 4, 128)
    assert kv_cache_shape(4, 16, 2, 64, "gpu") == (4, 16, 4, 64)
    case = make_case(np.random.default_rng(59), mixed_seqs(16), num_q_heads=8, num_kv_heads=2, head_dim=64)
    want, want_pages = run(case, attention)
    padded = dataclasses.replace(case, kv_pages=np.pad(case.kv_pages, ((0, 0), (0, 0), (0, 0), (0, 64))))
    out, pages = run(padded, attention)
    assert out.shape == case.q.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pages)[..., :64], np.asarray(want_pages))
    assert not np.asarray(pages)[..., 64:].any()
