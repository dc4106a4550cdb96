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


def naive_segment_attention(
    q, k, v, *, sm_scale, causal, sliding_window=None, soft_cap=None, alibi_slopes=None, deberta=None
) -> np.ndarray:
    """Float64 attention within one segment: q [n, Hq, D], k/v [n, Hkv, D]; query head h uses KV head h // G.

    Query i sees key j when j <= i (causal) or always (bidirectional), and with a window W when i - j < W (causal)
    or |i - j| < W (bidirectional); ALiBi slopes [Hq] add -slope_h * |i - j| to the (capped) scores. Plain full
    softmax, no blocking."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("nhd,lhd->hnl", q, k_rep) * sm_scale
    if soft_cap:
        scores = soft_cap * np.tanh(scores / soft_cap)
    i = np.arange(q.shape[0])[:, None]
    j = np.arange(k.shape[0])[None, :]
    if alibi_slopes is not None:
        scores = scores - np.asarray(alibi_slopes, np.float64)[:, None, None] * np.abs(i - j)
    if deberta is not None:
        scores = scores + deberta_relative_scores(q, np.repeat(k, group, axis=1), sm_scale=sm_scale, **deberta)
    mask = j <= i if causal else np.ones((q.shape[0], k.shape[0]), bool)
    if sliding_window:
        mask &= np.abs(i - j) < sliding_window
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", weights, v_rep)


def log_bucket_position(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """HF DeBERTa-v2's `make_log_bucket_position`: distances within +-bucket_size / 2 as they are, farther ones
    on a log scale up to max_position (no bucketing when bucket_size <= 0)."""
    if bucket_size <= 0:
        return relative
    sign, mid = np.sign(relative), bucket_size // 2
    abs_pos = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative))
    log_pos = np.ceil(np.log(abs_pos / mid) / np.log((max_position - 1) / mid) * (mid - 1)) + mid
    return np.where(abs_pos <= mid, relative, log_pos * sign).astype(np.int64)


def deberta_relative_scores(q, k, *, sm_scale, pos_key, pos_query, bucket_size, max_position) -> np.ndarray:
    """HF's `disentangled_attention_bias` for one segment, transcribed literally (float64): q, k [n, H, D],
    pos_key / pos_query [2 span, H, D] (the projected relative embeddings, either None), scores [H, n, n]."""
    n, span = q.shape[0], (pos_key if pos_key is not None else pos_query).shape[0] // 2
    relative = log_bucket_position(np.arange(n)[:, None] - np.arange(n)[None, :], bucket_size, max_position)
    score = np.zeros((q.shape[1], n, n))
    if pos_key is not None:  # c2p: gather(q @ pos_key^T, clamp(r + span)) along the last axis
        c2p_att = np.einsum("nhd,bhd->hnb", q, np.asarray(pos_key, np.float64))
        score += np.take_along_axis(c2p_att, np.clip(relative + span, 0, 2 * span - 1)[None], axis=-1)
    if pos_query is not None:  # p2c: gather(k @ pos_query^T, clamp(-r + span)), then transposed
        p2c_att = np.einsum("nhd,bhd->hnb", k, np.asarray(pos_query, np.float64))
        gathered = np.take_along_axis(p2c_att, np.clip(-relative + span, 0, 2 * span - 1)[None], axis=-1)
        score += gathered.swapaxes(-1, -2)
    return score * sm_scale


def naive_varlen_attention(case: VarlenCase, **kwargs) -> np.ndarray:
    """Float64 NumPy model of one call: each real segment on its own, padded rows 0."""
    out = np.zeros(case.q.shape, np.float64)
    lo = 0
    for n in case.lens:
        sl = slice(lo, lo + n)
        out[sl] = naive_segment_attention(case.q[sl], case.k[sl], case.v[sl], sm_scale=case.sm_scale, **kwargs)
        lo += n
    return out


def check(case: VarlenCase, out, *, causal, sliding_window=None, soft_cap=None, alibi_slopes=None) -> np.ndarray:
    """Assert a kernel result equals the NumPy model: real rows to tolerance, padded rows exactly 0."""
    out = np.asarray(out)
    ref = naive_varlen_attention(
        case, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes
    )
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


# ALiBi slopes of 8 heads (2^-1 ... 2^-8, as for jina-embeddings-v2), in a shuffled order so that a head mix-up
# shows; over MIXED's segments of up to 40 tokens the bias reaches -20
ALIBI_SLOPES = (2.0 ** -np.array([3, 1, 8, 2, 5, 7, 4, 6])).astype(np.float32)


@CAUSAL
def test_alibi_bias_changes_result_and_matches_numpy(attention, causal):
    """ALiBi's -slope_h * |i - j| within each segment (GQA, mixed segments, NaN padding), alone and with a window
    and a soft cap."""
    case = make_case(np.random.default_rng(96), MIXED)
    slopes = jnp.asarray(ALIBI_SLOPES)
    plain = np.asarray(run(case, attention, causal=causal))
    biased = run(case, attention, causal=causal, alibi_slopes=slopes)
    check(case, biased, causal=causal, alibi_slopes=ALIBI_SLOPES)
    n = case.num_real
    assert np.abs(np.asarray(biased)[:n] - plain[:n]).max() > 0.1
    both = run(case, attention, causal=causal, sliding_window=5, soft_cap=5.0, alibi_slopes=slopes)
    check(case, both, causal=causal, sliding_window=5, soft_cap=5.0, alibi_slopes=ALIBI_SLOPES)


def test_alibi_kernel_lowers_to_triton_for_cuda():
    """The ALiBi variant of the Pallas kernel (the slope read per head) lowers to Triton, at a
    jina-embeddings-v2-base layer's shape (12 heads of 64)."""
    q = jnp.zeros((256, 12, 64), jnp.bfloat16)
    cu, num_seqs = jnp.array([0, 100, 256], jnp.int32), jnp.array([2], jnp.int32)
    kernel = functools.partial(varlen_attention_pallas, sm_scale=0.125, causal=False, platform="gpu")
    lowered = jax.jit(kernel).trace(q, q, q, cu, num_seqs, alibi_slopes=jnp.ones((12,), jnp.float32))
    assert "__gpu$xla.gpu.triton" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "bucket_size,max_position,tables,num_kv_heads",
    [(8, 16, ("c2p", "p2c"), 8), (-1, 6, ("p2c",), 2)],
    ids=["log-buckets-c2p-p2c", "span-6-p2c-gqa"],
)
def test_relative_bias_matches_deberta_formulas(monkeypatch, bucket_size, max_position, tables, num_kv_heads):
    """DeBERTa's disentangled c2p / p2c terms from per-token tables against HF's formulas on dense per-segment
    scores: log buckets (8 buckets up to 16 positions) or a plain span of 6, with segments longer than either, in
    16-token blocks (segments across block edges), with GQA and NaN padding in the tables; the Pallas dispatcher
    sends such calls to the reference."""
    rng = np.random.default_rng(44 + num_kv_heads)
    case = make_case(rng, MIXED, num_q_heads=8, num_kv_heads=num_kv_heads, head_dim=16)
    span = bucket_size // 2 * 2 if bucket_size > 0 else max_position  # HF: 2 * span relative embeddings
    pos_key, pos_query = (
        (1.5 * rng.standard_normal((2 * span, 8, 16))).astype(np.float32) if name in tables else None
        for name in ("c2p", "p2c")
    )
    sm_scale = (16 * (1 + len(tables))) ** -0.5
    reach = 50  # the table of buckets covers distances -50 ... 50, beyond the longest segment
    buckets = log_bucket_position(np.arange(-reach, reach + 1), bucket_size, max_position)
    buckets = np.clip(buckets + span, 0, 2 * span - 1)
    k_rep = np.repeat(case.k, 8 // num_kv_heads, axis=1)
    c2p, p2c = (
        None if pos is None else np.einsum("thd,bhd->thb", x, pos) * np.float32(sm_scale)
        for x, pos in ((case.q, pos_key), (k_rep, pos_query))
    )
    n = case.num_real
    for table in (c2p, p2c):
        if table is not None:
            table[n:] = np.nan  # padding rows of the tables must not reach a real row
    bias = tuple(None if t is None else jnp.asarray(t) for t in (c2p, p2c)) + (jnp.asarray(buckets, jnp.int32),)

    monkeypatch.setattr(varlen_module, "_MAX_BLOCK_TOKENS", 16)
    kernel = jax.jit(functools.partial(varlen_attention_reference, causal=False), static_argnames="sm_scale")
    out = np.asarray(kernel(*case.args(), sm_scale=sm_scale, relative_bias=bias))
    deberta = dict(pos_key=pos_key, pos_query=pos_query, bucket_size=bucket_size, max_position=max_position)
    ref, plain = np.zeros((n, *case.q.shape[1:])), np.zeros((n, *case.q.shape[1:]))
    for lo, hi in zip(case.cu_seqlens[: len(MIXED)], case.cu_seqlens[1 : len(MIXED) + 1]):
        segment = (case.q[lo:hi], case.k[lo:hi], case.v[lo:hi])
        ref[lo:hi] = naive_segment_attention(*segment, sm_scale=sm_scale, causal=False, deberta=deberta)
        plain[lo:hi] = naive_segment_attention(*segment, sm_scale=sm_scale, causal=False)
    np.testing.assert_allclose(out[:n], ref, rtol=1e-4, atol=2e-5 * case.value_scale())
    assert np.all(out[n:] == 0.0)
    assert np.abs(ref - plain).max() > 0.1  # the bias matters

    from jaxserve.kernels_pallas import INTERPRET_KERNELS, PALLAS_KERNELS

    for kernels in (PALLAS_KERNELS, INTERPRET_KERNELS):  # not lowered to Pallas (it would refuse the bias)
        routed = kernels.varlen_attention(*case.args(), sm_scale=sm_scale, causal=False, relative_bias=bias)
        np.testing.assert_allclose(np.asarray(routed)[:n], ref, rtol=1e-4, atol=2e-5 * case.value_scale())
    with pytest.raises(NotImplementedError, match="relative_bias"):
        varlen_attention_pallas(*case.args(), sm_scale=sm_scale, causal=False, relative_bias=bias, interpret=True)


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


@pytest.mark.targets
def test_tpu_kernel_with_alibi_matches_numpy_and_compiles_for_tpu():
    """The TPU kernel with ALiBi (slopes in SMEM) in the TPU interpreter against NumPy, then compiled by Mosaic for
    TPU v5e at jina-embeddings-v2-base's shape: 12 heads of 64 over 16 segments of 512 tokens, bf16."""
    case = make_case(np.random.default_rng(33), MIXED, num_q_heads=8, num_kv_heads=2, head_dim=64)
    got = run(case, TPU_KERNEL, causal=False, alibi_slopes=jnp.asarray(ALIBI_SLOPES))
    check(case, got, causal=False, alibi_slopes=ALIBI_SLOPES)

    from jaxserve.targets import TargetUnavailable, get_target

    try:
        get_target("tpu-v5e").device()
    except TargetUnavailable as error:
        pytest.skip(str(error))
    sds = jax.ShapeDtypeStruct
    q = sds((16 * 512, 12, 64), jnp.bfloat16)
    cu, num_seqs, slopes = sds((17,), jnp.int32), sds((1,), jnp.int32), sds((12,), jnp.float32)
    with get_target("tpu-v5e").lowering():
        kernel = jax.jit(functools.partial(varlen_attention_pallas, sm_scale=0.125, causal=False))
        kernel.lower(q, q, q, cu, num_seqs, alibi_slopes=slopes).compile()


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
