"""Varlen (packed, block-diagonal) attention against a naive float64 NumPy reference.

Every case is a flat batch of whole segments of mixed lengths (length 1 included), causal or bidirectional,
with padded tokens and padded cu_seqlens entries poisoned so that any leak shows up as a wrong real output or a
non-zero padded output.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels_pallas import varlen_attention, varlen_attention_reference
from jaxserve.kernels_pallas.varlen_attention import varlen_attention_pallas

varlen_module = importlib.import_module("jaxserve.kernels_pallas.varlen_attention")

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("no_persistent_compile_cache")]

KERNELS = {"reference": varlen_attention_reference, "dispatcher": varlen_attention}
# what the behaviour tests run: the dispatcher (the reference on CPU) and the Pallas kernel in interpret mode
STATIC = ("sm_scale", "causal", "sliding_window", "soft_cap")
ATTENTION = {
    "dispatcher": varlen_attention,
    "pallas": jax.jit(
        functools.partial(varlen_attention_pallas, interpret=True, platform="gpu"), static_argnames=STATIC
    ),
}
# the TPU kernel in the TPU interpreter: its own tests below (each interpreted program costs a compile on CPU)
TPU_KERNEL = jax.jit(functools.partial(varlen_attention_pallas, interpret=True, platform="tpu"), static_argnames=STATIC)


@pytest.fixture(params=list(ATTENTION))
def attention(request):
    return ATTENTION[request.param]


# (Hq, Hkv, head_dim): GQA ratios 1/4/8, each head dim with more than one ratio
CONFIGS = [(8, 8, 128), (8, 2, 64), (8, 2, 128), (8, 1, 64)]
CONFIG_IDS = [f"hq{hq}-hkv{hkv}-d{d}" for hq, hkv, d in CONFIGS]

MIXED = [1, 23, 40, 1, 9, 3, 17]  # segment lengths: singles, one segment longer than the small test blocks


@dataclasses.dataclass
class VarlenCase:
    """One call's inputs as NumPy arrays, plus the length of each real segment."""

    lens: list[int]
    q: np.ndarray  # [T, Hq, D] float32
    k: np.ndarray  # [T, Hkv, D]
    v: np.ndarray  # [T, Hkv, D]
    cu_seqlens: np.ndarray  # [S + 1]
    num_seqs: np.ndarray  # [1]

    @property
    def num_real(self) -> int:
        return sum(self.lens)

    @property
    def sm_scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def args(self) -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(a) for a in (self.q, self.k, self.v, self.cu_seqlens, self.num_seqs))

    def value_scale(self) -> float:
        return float(np.abs(self.v[: self.num_real]).max(initial=0.0))


def make_case(
    rng: np.random.Generator,
    lens: list[int],
    *,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    pad_tokens: int = 5,
    pad_seqs: int = 2,
    poison: str = "nan",
) -> VarlenCase:
    """A random packed batch of segments `lens`. q and k have std 1.5, so with sm_scale = D**-0.5 the scores have
    std ~2.25 and the softmax weights are far from uniform. Padded q/k/v rows hold NaN or +-1e30 (`poison`);
    padded cu_seqlens entries repeat the last real value."""
    num_real = sum(lens)
    num_tokens = num_real + pad_tokens

    def rows(heads: int, std: float) -> np.ndarray:
        real = std * rng.standard_normal((num_real, heads, head_dim))
        if poison == "nan":
            pad = np.full((pad_tokens, heads, head_dim), np.nan)
        else:
            pad = np.where(rng.random((pad_tokens, heads, head_dim)) < 0.5, 1e30, -1e30)
        return np.concatenate([real, pad]).astype(np.float32)

    q, k, v = rows(num_q_heads, 1.5), rows(num_kv_heads, 1.5), rows(num_kv_heads, 1.0)
    cu_seqlens = np.concatenate([[0], np.cumsum(lens), np.full(pad_seqs, num_real)]).astype(np.int32)
    assert q.shape[0] == num_tokens
    return VarlenCase(lens, q, k, v, cu_seqlens, np.array([len(lens)], np.int32))


def naive_segment_attention(q, k, v, *, sm_scale, causal, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Float64 attention within one segment: q [n, Hq, D], k/v [n, Hkv, D]; query head h uses KV head h // G.

    Query i sees key j when j <= i (causal) or always (bidirectional), and with a window W when i - j < W (causal)
    or |i - j| < W (bidirectional). Plain full softmax, no blocking."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("nhd,lhd->hnl", q, k_rep) * sm_scale
    if soft_cap:
        scores = soft_cap * np.tanh(scores / soft_cap)
    i = np.arange(q.shape[0])[:, None]
    j = np.arange(k.shape[0])[None, :]
    mask = j <= i if causal else np.ones((q.shape[0], k.shape[0]), bool)
    if sliding_window:
        mask &= np.abs(i - j) < sliding_window
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", weights, v_rep)


def naive_varlen_attention(case: VarlenCase, **kwargs) -> np.ndarray:
    """Float64 NumPy model of one call: each real segment on its own, padded rows 0."""
    out = np.zeros(case.q.shape, np.float64)
    lo = 0
    for n in case.lens:
        sl = slice(lo, lo + n)
        out[sl] = naive_segment_attention(case.q[sl], case.k[sl], case.v[sl], sm_scale=case.sm_scale, **kwargs)
        lo += n
    return out


def check(case: VarlenCase, out, *, causal, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Assert a kernel result equals the NumPy model: real rows to tolerance, padded rows exactly 0."""
    out = np.asarray(out)
    ref = naive_varlen_attention(case, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap)
    n = case.num_real
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    np.testing.assert_allclose(out[:n], ref[:n], rtol=1e-4, atol=2e-5 * case.value_scale())
    assert np.all(out[n:] == 0.0), "padded tokens must come out as exact zeros"
    return ref


def run(case: VarlenCase, kernel=varlen_attention, **kwargs):
    """One call; by default through the jitted dispatcher, so cases of one shape share a compile."""
    return kernel(*case.args(), sm_scale=case.sm_scale, **kwargs)


CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])

# ---------------------------------------------------------------------------------------------------------------


@CAUSAL
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", CONFIGS, ids=CONFIG_IDS)
def test_mixed_segments_match_numpy(attention, num_q_heads, num_kv_heads, head_dim, causal):
    rng = np.random.default_rng(100 + head_dim + num_kv_heads + causal)
    case = make_case(rng, MIXED, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    out = run(case, attention, causal=causal)
    ref = check(case, out, causal=causal)
    if causal:  # a segment's first token sees only itself
        group = num_q_heads // num_kv_heads
        firsts = case.cu_seqlens[: len(case.lens)]
        np.testing.assert_allclose(ref[firsts], np.repeat(case.v[firsts], group, axis=1), rtol=1e-12, atol=1e-12)


def test_causal_and_bidirectional_differ(attention):
    """Bidirectional attention is not causal attention: every row but a segment's last changes."""
    case = make_case(np.random.default_rng(5), MIXED)
    causal, bidir = (np.asarray(run(case, attention, causal=c)) for c in (True, False))
    lasts = case.cu_seqlens[1 : len(case.lens) + 1] - 1
    np.testing.assert_allclose(causal[lasts], bidir[lasts], rtol=1e-5, atol=1e-5)
    others = np.setdiff1d(np.arange(case.num_real), lasts)
    assert np.all(np.abs(causal[others] - bidir[others]).max(axis=(1, 2)) > 1e-3)


@CAUSAL
@pytest.mark.parametrize(
    "block,kwargs",
    [(16, {}), (7, dict(sliding_window=6, soft_cap=5.0))],
    ids=["16-token-blocks", "7-token-blocks-window-cap"],
)
def test_blocked_online_softmax(monkeypatch, block, kwargs, causal):
    """Shrink the key block so segments span several blocks and block edges fall inside segments, with a ragged
    last block."""
    case = make_case(np.random.default_rng(21 + block), MIXED, pad_tokens=3)
    monkeypatch.setattr(varlen_module, "_MAX_BLOCK_TOKENS", block)
    assert max(case.lens) > 2 * block and case.q.shape[0] % block != 0
    # a fresh jit traces with the patched block size (the dispatcher may hold a trace made with the default)
    kernel = jax.jit(functools.partial(varlen_attention_reference, causal=causal, **kwargs), static_argnames="sm_scale")
    jaxpr = str(jax.make_jaxpr(functools.partial(kernel, sm_scale=case.sm_scale))(*case.args()))
    key_blocks = f"slice_sizes=(2, {block}, 64)"  # a block of the head-major keys [Hkv, T, D]
    assert key_blocks in jaxpr, "the key walk did not take the patched block size"
    check(case, run(case, kernel), causal=causal, **kwargs)


@CAUSAL
def test_sliding_window_changes_result_and_matches_numpy(attention, causal):
    case = make_case(np.random.default_rng(99), MIXED)
    full = np.asarray(run(case, attention, causal=causal))
    windowed = run(case, attention, causal=causal, sliding_window=5)
    check(case, windowed, causal=causal, sliding_window=5)
    n = case.num_real
    assert np.abs(np.asarray(windowed)[:n] - full[:n]).max() > 0.1
    # a window covering every segment is no window at all
    wide = run(case, attention, causal=causal, sliding_window=10_000)
    np.testing.assert_allclose(np.asarray(wide), full, rtol=1e-6, atol=1e-6)


@CAUSAL
def test_window_of_one_returns_own_value(attention, causal):
    """sliding_window=1: every query sees only itself, so out = its own V (shared by the group's heads)."""
    case = make_case(np.random.default_rng(98), MIXED)
    out = run(case, attention, causal=causal, sliding_window=1)
    check(case, out, causal=causal, sliding_window=1)
    n, group = case.num_real, case.q.shape[1] // case.k.shape[1]
    np.testing.assert_allclose(np.asarray(out)[:n], np.repeat(case.v[:n], group, axis=1), rtol=1e-6, atol=1e-6)


@CAUSAL
def test_soft_cap_changes_result_and_matches_numpy(attention, causal):
    case = make_case(np.random.default_rng(97), MIXED)
    full = np.asarray(run(case, attention, causal=causal))
    capped = run(case, attention, causal=causal, soft_cap=5.0)
    check(case, capped, causal=causal, soft_cap=5.0)
    n = case.num_real
    assert np.abs(np.asarray(capped)[:n] - full[:n]).max() > 0.1
    both = run(case, attention, causal=causal, sliding_window=5, soft_cap=5.0)
    check(case, both, causal=causal, sliding_window=5, soft_cap=5.0)


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_padding_never_leaks(attention, poison):
    """Same real tokens with and without poisoned padding (tokens and cu_seqlens entries): identical real rows,
    zero padded rows, both causal and bidirectional."""
    lens = [7, 1, 12]
    case = make_case(np.random.default_rng(11), lens, pad_tokens=11, pad_seqs=3, poison=poison)
    n, s = case.num_real, len(lens)
    clean = dataclasses.replace(case, q=case.q[:n], k=case.k[:n], v=case.v[:n], cu_seqlens=case.cu_seqlens[: s + 1])
    # entries past num_seqs that are not even a repeat of the last value are ignored as well
    junk = dataclasses.replace(case, cu_seqlens=np.concatenate([case.cu_seqlens[: s + 1], [0, 2**31 - 1, 3]]))
    for causal in (True, False):
        out = np.asarray(run(case, attention, causal=causal))
        check(case, out, causal=causal)
        np.testing.assert_allclose(out[:n], np.asarray(run(clean, attention, causal=causal)), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(run(junk, attention, causal=causal)), out)


@pytest.mark.targets
@CAUSAL
def test_tpu_kernel_matches_numpy(causal):
    """The TPU kernel (head-major tiles of 128 tokens, K/V of a head resident): mixed segments with GQA, a window
    with a soft cap, and NaN padding that must not leak."""
    rng = np.random.default_rng(31 + causal)
    case = make_case(rng, MIXED, num_q_heads=8, num_kv_heads=2, head_dim=64)
    check(case, run(case, TPU_KERNEL, causal=causal), causal=causal)
    both = run(case, TPU_KERNEL, causal=causal, sliding_window=5, soft_cap=5.0)
    check(case, both, causal=causal, sliding_window=5, soft_cap=5.0)
    poisoned = make_case(rng, [7, 1, 12], num_q_heads=4, num_kv_heads=4, head_dim=128, pad_tokens=11, pad_seqs=3)
    check(poisoned, run(poisoned, TPU_KERNEL, causal=causal), causal=causal)


def test_all_padding_call_gives_zeros():
    """num_seqs = 0 (a warm-up / empty bucket): every output row is 0, even with NaN queries and the cu_seqlens
    of a real batch left in place past num_seqs."""
    case = make_case(np.random.default_rng(3), MIXED)  # the shapes of the other tests: their compiles serve
    case = dataclasses.replace(case, lens=[], q=np.full_like(case.q, np.nan), num_seqs=np.array([0], np.int32))
    for kernel in (*KERNELS.values(), ATTENTION["pallas"]):
        for causal in (True, False):
            out = np.asarray(run(case, kernel, causal=causal))
            assert out.shape == case.q.shape and np.all(out == 0.0)


@pytest.mark.parametrize("kernel", list(KERNELS), ids=list(KERNELS))
def test_jit_matches_eager_and_reuses_one_compile(kernel):
    """Under jax.jit (static kwargs bound by partial): same results as eager, and a second segment layout with the
    same array shapes runs on the same compiled program."""
    kwargs = dict(causal=False, sliding_window=6, soft_cap=5.0)
    a = make_case(np.random.default_rng(31), MIXED, pad_tokens=4, pad_seqs=2)
    lens_b = [a.num_real - 10, 1, 4, 5]
    b = make_case(np.random.default_rng(32), lens_b, pad_tokens=4, pad_seqs=len(MIXED) + 2 - len(lens_b))
    assert [x.shape for x in a.args()] == [x.shape for x in b.args()]

    jitted = jax.jit(functools.partial(KERNELS[kernel], sm_scale=a.sm_scale, **kwargs))
    for case in (a, b):
        out = jitted(*case.args())
        check(case, out, **kwargs)
        np.testing.assert_allclose(np.asarray(out), np.asarray(run(case, **kwargs)), rtol=1e-5, atol=1e-6)
    assert jitted._cache_size() == 1


def test_bf16_inputs_come_back_in_bf16(attention):
    case = make_case(np.random.default_rng(41), MIXED, pad_tokens=2)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (case.q, case.k, case.v)]
    out = attention(
        *bf16, jnp.asarray(case.cu_seqlens), jnp.asarray(case.num_seqs), sm_scale=case.sm_scale, causal=True
    )
    assert out.dtype == jnp.bfloat16
    as_f32 = dataclasses.replace(case, **{name: np.asarray(x.astype(jnp.float32)) for name, x in zip("qkv", bf16)})
    ref = naive_varlen_attention(as_f32, causal=True)
    n = case.num_real
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[:n], ref[:n], rtol=2e-2, atol=2e-2)
    assert np.all(np.asarray(out.astype(jnp.float32))[n:] == 0.0)
