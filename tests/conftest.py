"""Shared fixtures: the tiny random-weight models, engines built on them, and the compile guard.

Every engine a test builds through `make_llm` is checked at teardown: a JAX compile inside any of its steps
(after warm-up) fails the test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("JAXSERVE_TEST_CACHE", ROOT / ".cache"))
os.environ.setdefault("JAXSERVE_CACHE_DIR", str(CACHE / "jaxserve"))
# processes the tests start (`jaxserve serve`, `jaxserve compile`) compile as the tests do (see pytest_runtest_setup)
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
sys.path.insert(0, str(ROOT))

from scripts.make_test_models import build_test_models  # noqa: E402

DECODERS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]

# One token bucket and a small cache: an engine compiles one program (a compile costs seconds, a padded step on a
# tiny model little); tests of several buckets, and tests that decode for long (Whisper), set min_token_rung
TINY_ENGINE = dict(
    max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_kv_pages=128, min_token_rung=64, progress=False
)
TINY_POOLING = dict(runner="pooling", max_num_seqs=16, max_num_batched_tokens=256, min_token_rung=256, progress=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Most tests compile programs to run them a few times: without XLA's backend optimizations (LLVM's passes)
    they compile in about two thirds of the time. Tests marked `optimized` run theirs for long (Whisper decoding,
    fuzzing, the soak), which unoptimized programs would make slower than the compile saves. Set before the
    test's fixtures, module-scoped servers included, compile anything."""
    import jax

    jax.config.update("jax_disable_most_optimizations", item.get_closest_marker("optimized") is None)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    return build_test_models(CACHE / "test-models")


@pytest.fixture(scope="session")
def llm_cache():
    """Engines shared across tests, keyed by their arguments; each is compile-checked at the end."""
    from jaxserve import LLM

    engines: dict[tuple, LLM] = {}

    def get(model: Path, defaults: dict, **overrides) -> LLM:
        args = {**defaults, **overrides}
        key = (str(model), repr(sorted(args.items())))
        if key not in engines:
            engines[key] = LLM(str(model), **args)
        return engines[key]

    yield get
    compiled = {
        key[0]: llm.engine.compile_watch.count for key, llm in engines.items() if llm.engine.compile_watch.count
    }
    assert not compiled, f"engines compiled after warm-up: {compiled}"


def _checked_engines(llm_cache, defaults: dict):
    used = []

    def get(model: Path, **overrides):
        llm = llm_cache(model, defaults, **overrides)
        used.append((llm, llm.engine.compile_watch.count))
        return llm

    yield get
    for llm, before in used:
        assert llm.engine.compile_watch.count == before, "a step compiled after warm-up"


@pytest.fixture
def make_llm(llm_cache):
    """A generation engine for (model folder, engine args), reused across tests; fails the test if a step
    compiled."""
    yield from _checked_engines(llm_cache, TINY_ENGINE)


@pytest.fixture
def make_pooling_llm(llm_cache):
    """The same for pooling engines."""
    yield from _checked_engines(llm_cache, TINY_POOLING)


@pytest.fixture(scope="module")
def no_persistent_compile_cache():
    """Compile in memory only. XLA:CPU crashes serializing some of the Pallas interpreter's programs into the
    persistent cache (which any engine built earlier in the session turns on), so the kernel tests keep theirs out
    of it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
