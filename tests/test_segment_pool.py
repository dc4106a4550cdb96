"""Segment pooling against a float64 NumPy reference that loops over the segments.

Every case is a packed batch of segments of mixed lengths (length 1 included) with padded segments and padded
token rows poisoned with NaN, so that any leak shows up as a NaN or wrong real row or a non-zero padded row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels_pallas import POOLING_MODES, segment_pool, segment_pool_reference
from jaxserve.kernels_pallas.segment_pool import segment_pool_pallas

LENS = [5, 1, 12, 3, 8, 2]
OFFSETS = [2, 0, 11, 3, 7, 0]  # prompts: some tokens left out, none, all but one, all of them, ...
HIDDEN = 48


@dataclasses.dataclass
class PoolCase:
    lens: list[int]
    hidden: np.ndarray  # [T, H]
    cu_seqlens: np.ndarray  # [S + 1]
    num_seqs: np.ndarray  # [1]

    @property
    def num_real(self) -> int:
        return sum(self.lens)

    def args(self) -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(a) for a in (self.hidden, self.cu_seqlens, self.num_seqs))


def make_case(
    rng: np.random.Generator,
    lens: list[int] = LENS,
    *,
    hidden_size: int = HIDDEN,
    pad_tokens: int = 5,
    pad_seqs: int = 2,
    dtype=np.float32,
) -> PoolCase:
    """Random hidden states (with a per-segment offset, so segments differ in mean) for segments `lens`; padded
    rows hold NaN, padded cu_seqlens entries repeat the last real value."""
    num_real = sum(lens)
    seg = np.repeat(np.arange(len(lens)), lens)
    real = rng.standard_normal((num_real, hidden_size)) + 0.5 * rng.standard_normal((len(lens), hidden_size))[seg]
    hidden = np.concatenate([real, np.full((pad_tokens, hidden_size), np.nan)]).astype(dtype)
    cu_seqlens = np.concatenate([[0], np.cumsum(lens), np.full(pad_seqs, num_real)]).astype(np.int32)
    return PoolCase(lens, hidden, cu_seqlens, np.array([len(lens)], np.int32))


def padded(values: list, pad_seqs: int, fill) -> np.ndarray:
    return np.array(list(values) + [fill] * pad_seqs)


def naive_pool(case: PoolCase, mode: str, *, start_offsets=None, dimensions=None, normalize=None) -> np.ndarray:
    """Float64 NumPy model: a loop over the real segments, zeros for the padded ones."""
    num_segments = case.cu_seqlens.shape[0] - 1
    out = np.zeros((num_segments, case.hidden.shape[1]), np.float64)
    x = np.asarray(case.hidden, np.float64)
    for s, n in enumerate(case.lens):
        rows = x[case.cu_seqlens[s] : case.cu_seqlens[s] + n]
        pooled = rows[0 if start_offsets is None else min(int(start_offsets[s]), n) :]
        if mode == "cls":
            out[s] = rows[0]
        elif mode == "last":
            out[s] = rows[-1]
        elif len(pooled) == 0:
            out[s] = 0.0
        elif mode == "mean":
            out[s] = pooled.mean(axis=0)
        elif mode == "max":
            out[s] = pooled.max(axis=0)
        elif mode == "mean_sqrt_len":
            out[s] = pooled.sum(axis=0) / np.sqrt(len(pooled))
        if dimensions is not None:
            out[s, int(dimensions[s]) :] = 0.0
        if normalize is not None and normalize[s]:
            out[s] /= max(np.linalg.norm(out[s]), 1e-12)
    return out


def check(case: PoolCase, out, mode: str, **kwargs) -> np.ndarray:
    out = np.asarray(out)
    ref = naive_pool(case, mode, **kwargs)
    s = len(case.lens)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:s], ref[:s], rtol=1e-5, atol=1e-5)
    assert np.all(out[s:] == 0.0), "padded segments must come out as exact zeros"
    return ref


pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("no_persistent_compile_cache")]

IMPLEMENTATIONS = {
    "reference": segment_pool,
    "pallas": jax.jit(
        functools.partial(segment_pool_pallas, interpret=True, platform="gpu"), static_argnames=("mode",)
    ),  # the Pallas kernel as launched on GPU, run by the interpreter on CPU
}
# the TPU launch in the TPU interpreter: its own test below (each interpreted program costs a compile on CPU)
TPU_KERNEL = jax.jit(functools.partial(segment_pool_pallas, interpret=True, platform="tpu"), static_argnames=("mode",))


@pytest.fixture(params=list(IMPLEMENTATIONS))
def pool(request):
    return IMPLEMENTATIONS[request.param]


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offsets", [False, True], ids=["whole-segments", "start-offsets"])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_modes_match_numpy(pool, mode, offsets):
    case = make_case(np.random.default_rng(1))
    kwargs = dict(start_offsets=jnp.asarray(padded(OFFSETS, 2, 0), jnp.int32)) if offsets else {}
    out = pool(*case.args(), mode=mode, **kwargs)
    ref = check(case, out, mode, **kwargs)
    s = len(case.lens)
    if offsets and mode in ("cls", "last"):  # the prompt does not move the first / last token
        np.testing.assert_array_equal(np.asarray(out), np.asarray(pool(*case.args(), mode=mode)))
    elif offsets:  # the prompt tokens really are left out: 0, 2, 4 change, 3 pools nothing, 1 and 5 keep all
        plain = naive_pool(case, mode)
        assert np.abs(ref[[0, 2, 4]] - plain[[0, 2, 4]]).max(axis=1).min() > 1e-3
        assert np.all(np.asarray(out)[3] == 0.0)
        np.testing.assert_allclose(ref[[1, 5]], plain[[1, 5]], rtol=1e-12)
    else:  # the modes really differ from one another on multi-token segments
        others = [naive_pool(case, m) for m in POOLING_MODES if m != mode]
        assert all(np.abs(ref[:s] - o[:s]).max() > 1e-2 for o in others)


def test_mean_of_single_token_segments_is_the_token(pool):
    case = make_case(np.random.default_rng(2), [1, 1, 1], pad_tokens=3, pad_seqs=1)
    for mode in ("cls", "last", "mean", "max"):
        out = np.asarray(pool(*case.args(), mode=mode))
        np.testing.assert_array_equal(out[:3], case.hidden[:3])


def test_prompt_tokens_never_reach_the_pool(pool):
    """include_prompt=False: huge values in the left-out prompt tokens change nothing (max included)."""
    case = make_case(np.random.default_rng(3))
    offsets = padded(OFFSETS, 2, 0)
    loud = case.hidden.copy()
    for s in range(len(case.lens)):
        lo = case.cu_seqlens[s]
        loud[lo + 1 : lo + min(OFFSETS[s], case.lens[s])] = 1e30  # keep the cls token as it is
    loud_case = dataclasses.replace(case, hidden=loud)
    for mode in ("mean", "max", "mean_sqrt_len"):
        want = pool(*case.args(), mode=mode, start_offsets=jnp.asarray(offsets, jnp.int32))
        got = pool(*loud_case.args(), mode=mode, start_offsets=jnp.asarray(offsets, jnp.int32))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_dimensions_then_normalize(pool, mode):
    """Matryoshka: the first d features kept, the rest zero, and the kept ones unit-norm where normalize is set."""
    case = make_case(np.random.default_rng(4))
    dims = padded([8, HIDDEN, 16, 1, 100, 3], 2, 5)  # 100 > H keeps everything
    norm = padded([True, True, False, True, True, False], 2, True)
    kwargs = dict(dimensions=jnp.asarray(dims, jnp.int32), normalize=jnp.asarray(norm))
    out = np.asarray(pool(*case.args(), mode=mode, **kwargs))
    check(case, out, mode, dimensions=dims, normalize=norm)
    for s in range(len(case.lens)):
        d = min(int(dims[s]), HIDDEN)
        assert np.all(out[s, d:] == 0.0)
        if norm[s]:
            np.testing.assert_allclose(np.linalg.norm(out[s, :d]), 1.0, rtol=1e-5)
    # without dimensions: normalize alone is unit-norm over all features; normalize off is plain pooling
    alone = np.asarray(pool(*case.args(), mode=mode, normalize=jnp.asarray(norm)))
    check(case, alone, mode, normalize=norm)
    plain = naive_pool(case, mode)
    np.testing.assert_allclose(alone[2], plain[2], rtol=1e-5, atol=1e-6)
    # only dimensions: a truncation of the plain pool
    cut = np.asarray(pool(*case.args(), mode=mode, dimensions=jnp.asarray(dims, jnp.int32)))
    check(case, cut, mode, dimensions=dims)


def test_normalize_zero_vector_stays_zero(pool):
    """A row with nothing pooled (all tokens left out) normalizes to 0, not NaN (eps 1e-12)."""
    case = make_case(np.random.default_rng(5), [3, 4], pad_tokens=2, pad_seqs=1)
    out = pool(
        *case.args(),
        mode="mean",
        start_offsets=jnp.asarray([3, 1, 0], jnp.int32),
        normalize=jnp.asarray([True, True, True]),
    )
    out = np.asarray(out)
    assert np.all(out[0] == 0.0) and np.all(out[2] == 0.0)
    np.testing.assert_allclose(np.linalg.norm(out[1]), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_bf16_hidden_pools_in_float32(pool, mode):
    case = make_case(np.random.default_rng(6), dtype=np.float32)
    bf16 = jnp.asarray(case.hidden, jnp.bfloat16)
    out = pool(bf16, *case.args()[1:], mode=mode, start_offsets=jnp.asarray(padded(OFFSETS, 2, 0), jnp.int32))
    assert out.dtype == jnp.float32
    # exactly the float64 pool of the bf16 values: no bf16 rounding of the sum
    as_f32 = dataclasses.replace(case, hidden=np.asarray(bf16.astype(jnp.float32)))
    check(as_f32, out, mode, start_offsets=padded(OFFSETS, 2, 0))


@pytest.mark.targets
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_tpu_launch_matches_numpy(mode):
    """The TPU launch (feature-block slabs in VMEM, scalars in SMEM): start offsets, bf16 hidden states pooled in
    float32, NaN padding rows and padded segments."""
    offsets = jnp.asarray(padded(OFFSETS, 3, 1), jnp.int32)
    case = make_case(np.random.default_rng(8), pad_tokens=9, pad_seqs=3)
    check(case, TPU_KERNEL(*case.args(), mode=mode, start_offsets=offsets), mode, start_offsets=np.asarray(offsets))
    case = make_case(np.random.default_rng(6), dtype=np.float32)
    bf16 = jnp.asarray(case.hidden, jnp.bfloat16)
    out = TPU_KERNEL(bf16, *case.args()[1:], mode=mode)
    check(dataclasses.replace(case, hidden=np.asarray(bf16.astype(jnp.float32))), out, mode)


def test_padding_never_leaks(pool):
    """Same real tokens with and without NaN padding rows / padded segments, and with garbage cu_seqlens entries
    past num_seqs: identical real rows, zero padded rows."""
    case = make_case(np.random.default_rng(7), pad_tokens=9, pad_seqs=3)
    n, s = case.num_real, len(case.lens)
    clean = dataclasses.replace(case, hidden=case.hidden[:n], cu_seqlens=case.cu_seqlens[: s + 1])
    junk = dataclasses.replace(case, cu_seqlens=np.concatenate([case.cu_seqlens[: s + 1], [0, n + 9, 2]]))
    offsets = jnp.asarray(padded(OFFSETS, 3, 1), jnp.int32)
    for mode in POOLING_MODES:
        out = np.asarray(pool(*case.args(), mode=mode, start_offsets=offsets))
        check(case, out, mode, start_offsets=np.asarray(offsets))
        np.testing.assert_array_equal(out[:s], np.asarray(pool(*clean.args(), mode=mode, start_offsets=offsets[:s])))
        np.testing.assert_array_equal(np.asarray(pool(*junk.args(), mode=mode, start_offsets=offsets)), out)


def test_all_padding_call_gives_zeros(pool):
    case = make_case(np.random.default_rng(8), [4, 2], pad_tokens=3, pad_seqs=2)
    case = dataclasses.replace(
        case, lens=[], hidden=np.full_like(case.hidden, np.nan), num_seqs=np.array([0], np.int32)
    )
    for mode in POOLING_MODES:
        out = np.asarray(pool(*case.args(), mode=mode, normalize=jnp.ones(4, bool)))
        assert out.shape == (4, HIDDEN) and np.all(out == 0.0)


def test_jit_matches_eager_and_reuses_one_compile():
    """Under jax.jit the reference gives the same rows as eager, and a second layout of the same shapes (other
    lengths, offsets, dimensions) runs on the same compiled program."""
    a = make_case(np.random.default_rng(9))
    b = make_case(np.random.default_rng(10), [10, 2, 2, 11, 1, 5])
    assert [x.shape for x in a.args()] == [x.shape for x in b.args()]
    jitted = jax.jit(functools.partial(segment_pool_reference, mode="mean"))
    for case, offs, dims in ((a, OFFSETS, [8] * 6), (b, [1, 0, 2, 4, 0, 3], [HIDDEN, 4, 9, 2, 16, 30])):
        kwargs = dict(
            start_offsets=jnp.asarray(padded(offs, 2, 0), jnp.int32),
            dimensions=jnp.asarray(padded(dims, 2, 0), jnp.int32),
            normalize=jnp.asarray(padded([True, False] * 3, 2, False)),
        )
        out = jitted(*case.args(), **kwargs)
        check(case, out, "mean", **{k: np.asarray(v) for k, v in kwargs.items()})
        np.testing.assert_array_equal(
            np.asarray(out), np.asarray(segment_pool_reference(*case.args(), mode="mean", **kwargs))
        )
    assert jitted._cache_size() == 1


def test_unknown_mode_is_refused():
    case = make_case(np.random.default_rng(11))
    with pytest.raises(ValueError, match="pooling mode"):
        segment_pool_reference(*case.args(), mode="median")
