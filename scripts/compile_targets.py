"""Compile every bucket program of the embedded defaults and of the Llama-3.2-1B, Llama-3.1-8B and BERT-large
shapes (and Llama-3.1-8B split over 8 chips, `llama-8b-tp8`, for the 8-chip targets) for each accelerator target, on this machine, whether or not the chip is here (`jaxserve compile`), and
print the table target x model x bucket: compiled or the compiler's error, seconds, the program's scratch.

The large shapes need no checkpoint: a tiny test model's folder (its tokenizer) with the real architecture laid
over its config by --hf-overrides, since a compile reads no weights. Needs libtpu and the CUDA plugin:
scripts/compile_targets.sh installs both into a separate venv and runs this.

    python scripts/compile_targets.py [--targets tpu-v5e h200] [--models llama-1b] [--docs] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from _harness import ROOT, provenance, provenance_lines, write_docs_section

sys.path.insert(0, str(ROOT))

from jaxserve.model_source import DEFAULT_GENERATE_MODEL, DEFAULT_POOLING_MODEL  # noqa: E402
from jaxserve.precompile import compile_model, table  # noqa: E402
from jaxserve.targets import get_target  # noqa: E402
from scripts.make_test_models import build_test_models  # noqa: E402

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True,
)  # fmt: skip
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip
BERT_LARGE = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, vocab_size=30522,
    max_position_embeddings=512,
)  # fmt: skip

SERVING = dict(max_num_seqs=256, max_num_batched_tokens=2048)  # the accelerator defaults, written out


def model_specs(test_models: Path) -> dict[str, tuple[str, dict]]:
    """name -> (model, engine args beyond the defaults)."""
    folders = build_test_models(test_models, ["tiny-llama", "tiny-bert-classifier"])
    return {
        "smollm2-135m": (DEFAULT_GENERATE_MODEL, dict(max_model_len=2048)),
        "minilm-l6": (DEFAULT_POOLING_MODEL, {}),
        "llama-1b": (str(folders["tiny-llama"]), dict(hf_overrides=LLAMA_1B, max_model_len=8192)),
        "llama-8b": (str(folders["tiny-llama"]), dict(hf_overrides=LLAMA_8B, max_model_len=8192)),
        # over the 8 chips of a slice (a 2x4 target): one program for all of them
        "llama-8b-tp8": (
            str(folders["tiny-llama"]),
            dict(hf_overrides=LLAMA_8B, max_model_len=8192, tensor_parallel_size=8),
        ),
        "bert-large": (str(folders["tiny-bert-classifier"]), dict(hf_overrides=BERT_LARGE, runner="pooling")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["tpu-v5e", "tpu-v6e", "h100", "h200"])
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m", "minilm-l6", "llama-1b", "llama-8b", "bert-large"]
    )
    parser.add_argument("--cache", type=Path, default=ROOT / "results" / "compile-cache", help="one folder per target")
    parser.add_argument("--json", type=Path, help="write every manifest entry here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()

    specs = model_specs(ROOT / ".cache" / "test-models")
    results = []
    for target in args.targets:
        for name in args.models:
            model, extra = specs[name]
            began = time.perf_counter()
            engine_args = {**SERVING, **extra, "progress": False, "compile_cache_dir": str(args.cache / target)}
            result = dataclasses.replace(compile_model(model, get_target(target), engine_args), model=name)
            results.append(result)
            status = "ok" if result.ok else f"FAILED: {result.error or 'a bucket did not compile'}"
            print(f"{target} {name}: {status} in {time.perf_counter() - began:.0f} s", flush=True)
    body = table(results)
    print(body)
    record = provenance(f"this machine's CPU compiling for {', '.join(args.targets)}")
    if args.json:
        entries = [dataclasses.asdict(r.compiled) if r.compiled else {"error": r.error} for r in results]
        args.json.write_text(json.dumps({**record, "results": entries}, indent=1))
    if args.docs:
        write_docs_section("compile-targets", f"{provenance_lines(record)}\n\n{body}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
