"""Start-up: buckets compiled in the background while the engine already serves (padding up to a compiled
bucket), and the persistent compile cache keyed by the program (the same engine again compiles nothing new; a
changed model or dtype does)."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.compiled import BucketPrograms, first_rungs

from .conftest import TINY_ENGINE, TINY_POOLING

PROMPTS = ["The quick brown fox", "Once upon a time there was a", "1 2 3"]


def test_first_rungs_are_the_decode_buckets_and_the_largest():
    assert first_rungs([1, 2, 4, 8, 16, 32, 64], max_num_seqs=8) == [1, 2, 4, 8, 64]
    assert first_rungs([16, 32, 64, 128, 256, 512, 1024, 1536, 2048], 256) == [16, 32, 64, 128, 256, 2048]
    assert first_rungs([16], 256) == [16]


def test_steps_pad_up_to_a_compiled_bucket_until_the_rest_are_ready(monkeypatch):
    """Hold the background compilation: a 3-token step uses the largest rung; release it: the 4-token rung."""
    programs = BucketPrograms(jax.jit(lambda x: x * 2), [1, 2, 4, 8], "test")
    release = threading.Event()
    original = programs._compile_in_background

    def held(*args):
        release.wait()
        original(*args)

    monkeypatch.setattr(programs, "_compile_in_background", held)
    programs.compile(lambda t: (jax.ShapeDtypeStruct((t,), jnp.float32),), first=[1, 8], progress=False)
    assert programs.ready_rungs == (1, 8)
    assert (programs.rung_for(1), programs.rung_for(3)) == (1, 8)
    assert list(programs(8, jnp.ones(8))) == [2.0] * 8
    release.set()
    programs.wait()
    assert programs.ready_rungs == (1, 2, 4, 8)
    assert programs.rung_for(3) == 4


def test_stop_ends_background_compilation_after_the_bucket_in_progress(monkeypatch):
    programs = BucketPrograms(jax.jit(lambda x: x + 1), [1, 2, 4, 8], "test")
    release = threading.Event()
    original = programs._compile_in_background
    monkeypatch.setattr(programs, "_compile_in_background", lambda *args: (release.wait(), original(*args)))
    programs.compile(lambda t: (jax.ShapeDtypeStruct((t,), jnp.float32),), first=[1, 8], progress=False)
    threading.Timer(0.5, release.set).start()
    programs.stop()  # asks first, then waits: the background thread sees the request once released
    assert programs.ready_rungs == (1, 8)


@pytest.mark.parametrize("kind", ["generate", "pooling"])
def test_engine_serves_while_compiling_in_the_background(tiny_models, llm_cache, kind):
    """strict_compile=False: the engine returns with its first buckets compiled, answers exactly as the
    strictly compiled engine does, and ends with every bucket compiled and nothing compiled on its step path."""
    if kind == "generate":
        folder, defaults = tiny_models["tiny-llama"], TINY_ENGINE
    else:
        folder, defaults = tiny_models["tiny-bert-mean"], TINY_POOLING
    strict = llm_cache(folder, defaults)
    eager = LLM(str(folder), **defaults, strict_compile=False)
    programs = eager.engine.runner.programs
    assert set(first_rungs(programs.rungs, eager.engine.runner.shape.max_num_seqs)) <= set(programs.ready_rungs)
    if kind == "generate":
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params, use_tqdm=False)]
        assert got == [o.outputs[0].token_ids for o in strict.generate(PROMPTS, params, use_tqdm=False)]
    else:
        got = [o.outputs.embedding for o in eager.embed(PROMPTS, use_tqdm=False)]
        want = [o.outputs.embedding for o in strict.embed(PROMPTS, use_tqdm=False)]
        assert jnp.allclose(jnp.array(got), jnp.array(want), atol=1e-5)
    programs.wait()
    assert programs.ready_rungs == tuple(programs.rungs)
    stats = eager.engine.stats()
    assert stats.buckets_compiled == stats.buckets_total == len(programs.rungs)
    assert stats.load_seconds > 0 and stats.compile_seconds > 0
    assert eager.engine.compile_watch.count == 0


def test_compile_cache_is_keyed_by_model_and_dtype(tiny_models, tmp_path):
    """The same engine built again adds nothing to the persistent cache; another dtype or model adds programs."""
    cache = tmp_path / "xla"

    def entries() -> set[str]:
        return {p.name for p in cache.iterdir()}

    args = dict(TINY_ENGINE, max_num_batched_tokens=16, compile_cache_dir=str(cache))
    LLM(str(tiny_models["tiny-llama"]), **args)
    first = entries()
    assert first
    LLM(str(tiny_models["tiny-llama"]), **args)
    assert entries() == first
    LLM(str(tiny_models["tiny-llama"]), **args, dtype="bfloat16")
    with_bf16 = entries()
    assert with_bf16 > first
    LLM(str(tiny_models["tiny-qwen2"]), **args)
    assert entries() > with_bf16
