"""Embedding throughput: tokens/s and sequences/s through `LLM.embed`, against a baseline measured in the same
run on the same texts.

Workloads: batch x length 1x32, 32x128, 128x256, and a variable-length mix (lengths uniform in 16-512). Shapes:
MiniLM-L6 (the embedded default's real weights), BERT-base and XLM-R-large (random weights, saved once to a
temporary folder so that both sides load the same ones). Texts are built from single-token words, so each
tokenizes to exactly the length asked for.

Baselines: on CPU, sentence-transformers `encode` (float32, its own length sorting and padding per batch);
on a GPU, HF transformers `AutoModel` in float16 with sdpa attention on padded batches (the reference of the
issue: BERT-base 128x256 2.17 M tok/s, XLM-R-large 688 k tok/s on an H100).

    python scripts/bench_embed.py [--models minilm bert-base xlmr-large] [--mix-sequences N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from _harness import markdown_table, provenance, provenance_lines, write_docs_section

from jaxserve import LLM
from jaxserve.model_source import DEFAULT_POOLING_MODEL, resolve_model

FIXED = [(1, 32), (32, 128), (128, 256)]
MIX_LENGTHS = (16, 512)
SHAPES = {
    "bert-base": dict(
        architectures=["BertModel"], model_type="bert", hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, vocab_size=30522, max_position_embeddings=512,
    ),
    "xlmr-large": dict(
        architectures=["XLMRobertaModel"], model_type="xlm-roberta", hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, intermediate_size=4096, vocab_size=250002, max_position_embeddings=514,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    ),
}  # fmt: skip


def random_model_folder(name: str, tokenizer_folder: Path) -> Path:
    """An HF folder with random weights of the shape, and MiniLM's tokenizer (inputs stay inside its vocab)."""
    import shutil

    import transformers

    folder = Path(tempfile.mkdtemp(prefix=f"jaxserve-{name}-"))
    config = transformers.AutoConfig.for_model(**SHAPES[name])
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    for file in tokenizer_folder.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(file, folder)
    return folder


def single_token_words(llm: LLM) -> list[str]:
    hf = llm.get_tokenizer().hf
    words = [w for w in hf.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    return [w for w in sorted(words) if len(hf.encode(w, add_special_tokens=False)) == 1][:5000]


def texts_of(words: list[str], lengths, rng) -> list[str]:
    """Texts that tokenize to exactly `length` tokens, [CLS] and [SEP] included."""
    return [" ".join(rng.choice(words, size=length - 2)) for length in lengths]


def jaxserve_seconds(llm: LLM, texts: list[str], repeats: int) -> float:
    llm.embed(texts, use_tqdm=False)
    began = time.perf_counter()
    for _ in range(repeats):
        llm.embed(texts, use_tqdm=False)
    return (time.perf_counter() - began) / repeats


def baseline(folder: Path, on_gpu: bool):
    """(name, seconds(texts, batch_size, repeats)) of the comparison this device calls for."""
    import torch

    if not on_gpu:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu")

        def st_seconds(texts, batch_size, repeats):
            st.encode(texts, batch_size=batch_size)
            began = time.perf_counter()
            for _ in range(repeats):
                st.encode(texts, batch_size=batch_size)
            return (time.perf_counter() - began) / repeats

        return "sentence-transformers fp32", st_seconds

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = (
        transformers.AutoModel.from_pretrained(folder, dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
    )

    def hf_seconds(texts, batch_size, repeats):
        batches = [
            tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt").to("cuda")
            for i in range(0, len(texts), batch_size)
        ]
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(repeats):
                for batch in batches:
                    model(**batch)
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / repeats

    return "HF transformers fp16 sdpa", hf_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base", "xlmr-large"],
                        choices=["minilm", "bert-base", "xlmr-large"])  # fmt: skip
    parser.add_argument("--mix-sequences", type=int, help="texts in the variable-length mix (4096 on GPU, 256 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()

    on_gpu = jax.default_backend() != "cpu"
    mix_count = args.mix_sequences or (4096 if on_gpu else 256)
    device = jax.devices()[0]
    results = dict(**provenance(f"{device.platform}: {device.device_kind}"), host=platform.node(), runs=[])
    minilm = resolve_model(DEFAULT_POOLING_MODEL)
    rng = np.random.default_rng(0)
    for name in args.models:
        folder = minilm if name == "minilm" else random_model_folder(name, minilm)
        llm = LLM(str(folder), runner="pooling", max_num_seqs=256, max_num_batched_tokens=8192 if on_gpu else 4096,
                  progress=False)  # fmt: skip
        longest = min(MIX_LENGTHS[1], llm.engine.max_model_len)  # MiniLM takes 256 tokens
        words = single_token_words(llm)
        baseline_name, baseline_seconds = baseline(folder, on_gpu)
        workloads = [(f"{b}x{n}", texts_of(words, [n] * b, rng), b) for b, n in FIXED]
        mix = texts_of(words, rng.integers(MIX_LENGTHS[0], longest + 1, size=mix_count), rng)
        workloads.append((f"mix {mix_count} x {MIX_LENGTHS[0]}-{longest}", mix, 128))
        print(f"{name} on {results['device']} (startup {llm.engine.startup}); baseline: {baseline_name}")
        for label, texts, batch_size in workloads:
            tokens = sum(len(llm.get_tokenizer().encode(t)) for t in texts)
            ours = jaxserve_seconds(llm, texts, args.repeats)
            theirs = baseline_seconds(texts, batch_size, args.repeats)
            run = dict(model=name, workload=label, sequences=len(texts), tokens=tokens, seconds=ours,
                       tok_s=tokens / ours, seq_s=len(texts) / ours, baseline=baseline_name,
                       baseline_seconds=theirs, baseline_tok_s=tokens / theirs, ratio=theirs / ours)  # fmt: skip
            results["runs"].append(run)
            print(f"  {label:24s} {run['tok_s']:12,.0f} tok/s {run['seq_s']:10,.1f} seq/s "
                  f"({ours * 1e3:9.1f} ms) | baseline {run['baseline_tok_s']:12,.0f} tok/s | x{run['ratio']:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.docs:
        table = markdown_table([
            {"model": r["model"], "workload": r["workload"], "jaxserve tok/s": f"{r['tok_s']:,.0f}",
             "baseline tok/s": f"{r['baseline_tok_s']:,.0f}", "ratio": f"{r['ratio']:.2f}"}
            for r in results["runs"]
        ])  # fmt: skip
        body = f"{provenance_lines(results)}\n- Baseline: {results['runs'][0]['baseline']}\n\n{table}"
        write_docs_section(f"embed-{jax.default_backend()}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
