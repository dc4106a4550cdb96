"""The first minute of a device slot: is what runs on the accelerator right, before any figure is measured?

Each Pallas kernel runs on small random inputs against its jnp reference (bf16, the mixed ragged step of the
kernel tests, BERT-like packed segments, every pooling mode), then a tiny generation engine and a tiny BERT
classifier run end to end with the Pallas kernels against the same engines on the references: greedy tokens
equal, class probabilities equal to bf16 precision. One line per check; --json writes them all; exits 1 if any check fails.

    python scripts/gpu_smoke.py [--json smoke.json]    # on CPU the Pallas kernels run interpreted
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _harness import provenance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from test_ragged_paged_attention import make_case, mixed_seqs  # noqa: E402

from jaxserve import LLM  # noqa: E402
from jaxserve.kernels_pallas.ragged_paged_attention import (  # noqa: E402
    ragged_paged_attention_pallas,
    ragged_paged_attention_reference,
)
from jaxserve.kernels_pallas.segment_pool import POOLING_MODES, segment_pool_pallas, segment_pool_reference  # noqa: E402
from jaxserve.kernels_pallas.varlen_attention import varlen_attention_pallas, varlen_attention_reference  # noqa: E402
from scripts.make_test_models import build_test_models  # noqa: E402

INTERPRET = jax.default_backend() == "cpu"
BACKEND = "interpret" if INTERPRET else "pallas"


def max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def kernel_checks():
    """(name, max |pallas - reference|, tolerance) for every kernel."""
    rng = np.random.default_rng(0)
    for head_dim in (64, 128):
        case = make_case(rng, mixed_seqs(16), num_q_heads=8, num_kv_heads=2, head_dim=head_dim, page_size=16)
        args = [jnp.asarray(a).astype(jnp.bfloat16) if a.dtype == np.float32 else jnp.asarray(a) for a in case.args()]
        kernel = jax.jit(functools.partial(ragged_paged_attention_pallas, sm_scale=case.sm_scale, interpret=INTERPRET))
        out, pages = kernel(*args)
        ref, ref_pages = ragged_paged_attention_reference(*args, sm_scale=case.sm_scale)
        n = case.num_real
        yield f"ragged d{head_dim} out", max_error(out[:n], ref[:n]), 0.05 * case.value_scale()
        yield f"ragged d{head_dim} pages", max_error(pages, ref_pages), 0.0

    cu, num_seqs = jnp.array([0, 100, 300, 301, 512], jnp.int32), jnp.array([4], jnp.int32)
    q, k, v = (jnp.asarray(rng.standard_normal((512, 12, 64)), jnp.bfloat16) for _ in range(3))
    for causal in (False, True):
        kw = dict(sm_scale=0.125, causal=causal)
        out = jax.jit(functools.partial(varlen_attention_pallas, interpret=INTERPRET, **kw))(q, k, v, cu, num_seqs)
        yield f"varlen causal={causal}", max_error(out, varlen_attention_reference(q, k, v, cu, num_seqs, **kw)), 0.05

    hidden = jnp.asarray(rng.standard_normal((512, 384)), jnp.bfloat16)
    for mode in POOLING_MODES:
        pooled = jax.jit(functools.partial(segment_pool_pallas, mode=mode, interpret=INTERPRET))(hidden, cu, num_seqs)
        yield f"pool {mode}", max_error(pooled, segment_pool_reference(hidden, cu, num_seqs, mode=mode)), 1e-2


def engine_checks(models: dict[str, Path]):
    engine = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_kv_pages=128, progress=False)
    prompts = ["The capital of France is", "1 2 3 4", "Once upon a time there was"]
    tokens = {}
    for backend in (BACKEND, "reference"):
        llm = LLM(str(models["tiny-llama"]), attention_backend=backend, **engine)
        params = llm.get_default_sampling_params().clone(max_tokens=16, temperature=0.0, ignore_eos=True)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    same = sum(a == b for a, b in zip(tokens[BACKEND], tokens["reference"]))
    yield "engine greedy tokens differing", float(len(prompts) - same), 0.0

    probs = {}
    for backend in (BACKEND, "reference"):
        llm = LLM(str(models["tiny-bert-classifier"]), runner="pooling", attention_backend=backend, progress=False)
        probs[backend] = np.array([o.outputs.probs for o in llm.classify(prompts)])
    yield "engine classifier probabilities", max_error(probs[BACKEND], probs["reference"]), 2e-2


def guarded(group: str, checks) -> list[tuple[str, float, float]]:
    """The group's checks, or one failed check saying why the group could not run (on a device nothing may
    stop the figures that follow)."""
    try:
        return list(checks())
    except Exception as error:
        print(f"{group} could not run: {type(error).__name__}: {error}")
        return [(f"{group} ({type(error).__name__})", float("inf"), 0.0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the checks here")
    args = parser.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        models = build_test_models(Path(folder), ["tiny-llama", "tiny-bert-classifier"])
        checks = [*guarded("kernels", kernel_checks), *guarded("engines", lambda: engine_checks(models))]
    failed = 0
    rows = []
    for name, error, tolerance in checks:
        ok = error <= tolerance
        failed += not ok
        rows.append({"check": name, "max_error": error, "tolerance": tolerance, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {error:.3g} (tolerance {tolerance:.3g})")
    print(f"{len(checks) - failed} passed, {failed} failed in {time.perf_counter() - began:.0f} s on {BACKEND}")
    if args.json:
        args.json.write_text(json.dumps({**provenance(jax.devices()[0].device_kind), "checks": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
