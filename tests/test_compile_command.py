"""`jaxserve compile`: every bucket of a model compiled for a target into the compilation cache, with a manifest;
an engine on that cache loads every bucket, adopts the compiled KV page count, and says why when the cache does
not apply (another chip, other limits)."""

from __future__ import annotations

import logging

import pytest

from jaxserve import LLM, cli
from jaxserve.compile_manifest import read_manifest
from jaxserve.targets import TargetUnavailable, get_target

pytestmark = pytest.mark.targets

LIMITS = ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "4"]
ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=4, progress=False)


@pytest.fixture(scope="module")
def cpu_cache(tiny_models, tmp_path_factory):
    """tiny-llama compiled for this CPU, 24 KV pages (of the 32 its limits use at most), into a fresh cache folder."""
    folder = tmp_path_factory.mktemp("compiled-cpu")
    args = ["compile", str(tiny_models["tiny-llama"]), "--target", "cpu", "--compile-cache-dir", str(folder)]
    assert cli.main([*args, *LIMITS, "--num-kv-pages", "24"]) == 0
    return folder


def test_compile_writes_every_bucket_and_a_manifest(cpu_cache, tiny_models, capsys):
    [entry] = read_manifest(cpu_cache)
    assert (entry.model, entry.runner, entry.target) == (str(tiny_models["tiny-llama"]), "generate", "cpu")
    assert [b.tokens for b in entry.buckets] == [1, 2, 4]
    assert all(b.error is None and b.seconds > 0 and b.temp_bytes is not None for b in entry.buckets)
    assert entry.limits["num_kv_pages"] == 24 and entry.limits["max_model_len"] == 128
    assert entry.limits["dtype"] == "float32" and entry.jax and entry.jaxlib
    assert len(list(cpu_cache.glob("jit__step_fn-*"))) == 3


def test_engine_on_the_compiled_cache_loads_every_bucket(cpu_cache, tiny_models, caplog):
    """No bucket compiles, and the KV page count is the compiled one (nothing in the engine's flags fixes it)."""
    with caplog.at_level(logging.INFO, logger="jaxserve"):
        llm = LLM(str(tiny_models["tiny-llama"]), compile_cache_dir=str(cpu_cache), **ENGINE)
    reports = llm.engine.runner.programs.reports
    assert sorted(reports) == [1, 2, 4] and all(b.cache_hit for b in reports.values())
    assert llm.engine.page_pool.num_pages == 24
    assert "All 3 buckets came from the compile cache" in caplog.text
    params = llm.get_default_sampling_params().clone(max_tokens=5, temperature=0.0, ignore_eos=True)
    assert len(llm.generate(["hello there"], params)[0].outputs[0].token_ids) == 5


def test_other_limits_say_why_the_cache_missed(cpu_cache, tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxserve"):
        llm = LLM(str(tiny_models["tiny-llama"]), compile_cache_dir=str(cpu_cache), **{**ENGINE, "max_model_len": 64})
    assert not any(b.cache_hit for b in llm.engine.runner.programs.reports.values())
    assert "3 of 3 buckets" in caplog.text and "max_model_len 128 vs 64" in caplog.text


def test_compile_for_tpu_then_a_cpu_engine_says_the_cache_is_for_tpu(tiny_models, tmp_path, caplog, capsys):
    """A pooling model compiled for a TPU v5e that is not here (skips without libtpu; its 64 positions raise the
    token budget to 64); a CPU engine on that cache
    says whom it was compiled for instead of silently compiling."""
    try:
        get_target("tpu-v5e").device()
    except TargetUnavailable as error:
        pytest.skip(str(error))
    model = str(tiny_models["tiny-bert-mean"])
    args = ["compile", model, "--target", "tpu-v5e", "--compile-cache-dir", str(tmp_path), "--max-num-batched-tokens"]
    assert cli.main([*args, "32", "--max-num-seqs", "4"]) == 0
    assert "| tpu-v5e | " in capsys.readouterr().out
    [entry] = read_manifest(tmp_path)
    assert (entry.target, entry.device_kind, entry.runner) == ("tpu-v5e", "TPU v5 lite", "pooling")
    assert entry.limits["dtype"] == "bfloat16" and [b.tokens for b in entry.buckets] == [16, 32, 64]
    assert all(b.error is None for b in entry.buckets)
    # the Mosaic kernels' scoped VMEM, as the TPU compiler reports it: the pooling and attention kernels' tiles
    assert all(0 < b.kernel_scratch_bytes < 64 << 20 for b in entry.buckets)
    with caplog.at_level(logging.WARNING, logger="jaxserve"):
        LLM(model, runner="pooling", compile_cache_dir=str(tmp_path), max_num_seqs=4, max_num_batched_tokens=8)
    assert "compiled for tpu-v5e (TPU v5 lite)" in caplog.text and "every bucket compiles here" in caplog.text


def test_tensor_parallel_engine_compiles_for_a_tpu_v6e_2x4_slice(tiny_models, tmp_path, capsys):
    """Eight query heads over the eight chips of a v6e 2x4 slice: the step program, the Mosaic attention kernel
    per chip under shard_map included, compiles for all of them (the Llama-3.1-8B shape: scripts/compile_targets.py
    --models llama-8b-tp8)."""
    try:
        get_target("tpu-v6e-8").device()
    except TargetUnavailable as error:
        pytest.skip(str(error))
    args = ["compile", str(tiny_models["tiny-llama-8h"]), "--target", "tpu-v6e-8", "--compile-cache-dir", str(tmp_path)]
    args += ["--max-num-batched-tokens", "16"]  # one bucket
    assert cli.main([*args, "--tensor-parallel-size", "8", "--max-model-len", "128", "--max-num-seqs", "4"]) == 0
    [entry] = read_manifest(tmp_path)
    assert entry.target == "tpu-v6e-8" and entry.buckets
    assert all(b.error is None and 0 < b.kernel_scratch_bytes < 64 << 20 for b in entry.buckets)


def test_a_target_without_its_compiler_is_reported(tiny_models, tmp_path, capsys):
    try:
        get_target("h100").device()
        pytest.skip("the CUDA plugin is installed here")
    except TargetUnavailable:
        pass
    args = ["compile", str(tiny_models["tiny-llama"]), "--target", "h100", "--compile-cache-dir", str(tmp_path)]
    assert cli.main([*args, *LIMITS]) == 1
    assert "Cannot compile for h100" in capsys.readouterr().out


def test_a_bucket_that_does_not_compile_is_reported_and_the_others_go_on():
    """Compiling for another chip keeps going past a bucket the compiler rejects, with its error line; serving
    raises."""
    import jax
    import jax.numpy as jnp

    from jaxserve.compiled import BucketPrograms

    def example_args(rung: int):
        if rung == 2:
            raise ValueError("Mosaic failed to compile TPU kernel: E2003 unaligned\nmore detail")
        return (jax.ShapeDtypeStruct((rung,), jnp.float32),)

    programs = BucketPrograms(jax.jit(lambda x: x * 2), [1, 2, 4], "test", keep_going=True)
    programs.compile(example_args, progress=False)
    assert sorted(programs.ready_rungs) == [1, 4]
    assert programs.reports[2].error == "Mosaic failed to compile TPU kernel: E2003 unaligned"
    assert programs.reports[1].error is None and programs.reports[4].error is None
    with pytest.raises(ValueError, match="E2003"):
        BucketPrograms(jax.jit(lambda x: x * 2), [1, 2], "test").compile(example_args, progress=False)


def test_unknown_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compile", "--target", "tpu-v9"])
    assert exit_.value.code == 2 and "invalid choice: 'tpu-v9'" in capsys.readouterr().err
