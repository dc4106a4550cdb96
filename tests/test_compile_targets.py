"""The Pallas kernels compile for real chips that are not here, at the shapes they serve: TPU v5e and v6e through
libtpu's compile-only topologies (Mosaic's alignment and scoped-VMEM checks are real), H100 through the CUDA
plugin when it is installed. Each test skips, saying why, when its compiler is absent.

Shapes: Llama-3.2-1B (32 query heads, 8 KV heads, head_dim 64) and Llama-3.1-8B (head_dim 128) layers in bf16,
256 sequences of up to 8,192 tokens over a 32 GiB-class cache (one layer's share), in a decode and a prefill
bucket; BERT-large (16 heads of 64, hidden 1024) over 16 segments of 512 tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from jaxserve.kernels_pallas import kv_cache_shape
from jaxserve.kernels_pallas.ragged_paged_attention import ragged_paged_attention_pallas
from jaxserve.kernels_pallas.segment_pool import segment_pool_pallas
from jaxserve.kernels_pallas.varlen_attention import varlen_attention_pallas
from jaxserve.targets import TargetUnavailable, get_target

pytestmark = [pytest.mark.targets, pytest.mark.usefixtures("no_persistent_compile_cache")]

GIB = 1 << 30
NUM_SEQS, CONTEXT, PAGE = 256, 8192, 16
LLAMA = {"1b": (16, 64), "8b": (32, 128)}  # layers, head_dim; both 32 query heads over 8 KV heads
BERT_TOKENS, BERT_SEGMENTS = 16 * 512, 16


def device_for(name: str):
    try:
        return get_target(name).device()
    except TargetUnavailable as error:
        pytest.skip(str(error))


def ragged_case(model: str, num_tokens: int, platform: str, causal: bool = True):
    """The jitted kernel and its argument shapes; not causal, the read-only call (cross-attention): no k, v, and
    the cache not donated, since nothing is written."""
    layers, head_dim = LLAMA[model]
    page_bytes = PAGE * 16 * kv_cache_shape(1, PAGE, 8, head_dim, platform)[-1] * 2
    num_pages = 32 * GIB // layers // page_bytes
    sds = jax.ShapeDtypeStruct
    new_kv = sds((num_tokens, 8, head_dim), jnp.bfloat16) if causal else None
    args = (
        sds((num_tokens, 32, head_dim), jnp.bfloat16),
        new_kv,
        new_kv,
        sds(kv_cache_shape(num_pages, PAGE, 8, head_dim, platform), jnp.bfloat16),
        sds((NUM_SEQS,), jnp.int32),
        sds((NUM_SEQS, CONTEXT // PAGE), jnp.int32),
        sds((NUM_SEQS + 1,), jnp.int32),
        sds((1,), jnp.int32),
    )
    kernel = functools.partial(ragged_paged_attention_pallas, sm_scale=head_dim**-0.5, soft_cap=50.0, causal=causal)
    return jax.jit(kernel, donate_argnums=3 if causal else ()), args


def bert_cases():
    sds = jax.ShapeDtypeStruct
    q = sds((BERT_TOKENS, 16, 64), jnp.bfloat16)
    cu, num_seqs = sds((BERT_SEGMENTS + 1,), jnp.int32), sds((1,), jnp.int32)
    hidden = sds((BERT_TOKENS, 1024), jnp.bfloat16)
    varlen = functools.partial(varlen_attention_pallas, sm_scale=0.125, causal=False)
    yield "varlen", jax.jit(varlen), (q, q, q, cu, num_seqs)
    for mode in ("cls", "mean", "max"):
        yield f"pool-{mode}", jax.jit(functools.partial(segment_pool_pallas, mode=mode)), (hidden, cu, num_seqs)


TPU_TARGETS = ["tpu-v5e", "tpu-v6e"]
# (model, tokens, causal): the non-causal entry is the read-only call of a decode bucket (cross-attention)
RAGGED = [(model, tokens, True) for model in LLAMA for tokens in (NUM_SEQS, 2048)] + [("1b", NUM_SEQS, False)]
RAGGED_IDS = [f"{m}-T{t}" + ("" if causal else "-noncausal") for m, t, causal in RAGGED]


@pytest.mark.parametrize("target", TPU_TARGETS)
@pytest.mark.parametrize("model,num_tokens,causal", RAGGED, ids=RAGGED_IDS)
def test_ragged_paged_attention_compiles_for_tpu_with_the_cache_in_place(target, model, num_tokens, causal):
    """The pages stay in HBM and the cache is updated (or, read-only, read) where it lies: no copy of it in the
    program's scratch."""
    device_for(target)
    with get_target(target).lowering():
        function, args = ragged_case(model, num_tokens, "tpu", causal)
        compiled = function.lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 << 20


@pytest.mark.parametrize("target", TPU_TARGETS)
def test_bert_kernels_compile_for_tpu(target):
    device_for(target)
    with get_target(target).lowering():
        for _, function, args in bert_cases():
            function.lower(*args).compile()


def test_kernels_compile_for_h100():
    """Triton's shared-memory and register limits are checked by the compile (skips without the CUDA plugin)."""
    device_for("h100")
    with get_target("h100").lowering():
        for model, num_tokens, causal in RAGGED:
            function, args = ragged_case(model, num_tokens, "gpu", causal)
            function.lower(*args).compile()
        for _, function, args in bert_cases():
            function.lower(*args).compile()


def test_unknown_target_and_missing_compiler_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown compile target 'tpu-v9'"):
        get_target("tpu-v9")
    try:
        get_target("h100").device()
    except TargetUnavailable as error:
        assert "pip install 'jax[cuda13]" in str(error)
