"""Offline generation throughput: per-step decode latency and output tokens/s at batch 1, 32 and 128, with
128 prompt and 128 output tokens per request (greedy, EOS ignored), through the `LLM` API.

On CPU it runs the embedded default model (SmolLM2-135M-Instruct, float32). On a GPU it runs a random-weight
model of Llama-3.2-1B's shape in bfloat16 (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocab 128256), the shape of the HF transformers baseline in the issue (59 tok/s at batch 1, 8,981 at 128 on an
H100). Each batch size is timed twice: with max_tokens=1 (prefill plus one token) and with max_tokens=128; the
difference over 127 steps is the decode step latency. With --hf, HF transformers `generate` (eager PyTorch,
sdpa attention, same model, dtype, prompts and lengths) runs in the same process, so each figure comes with
its baseline measured side by side.

    python scripts/bench_generate.py [--model default|llama-1b] [--batches 1 32 128] [--hf] [--json out.json]
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

from jaxserve import LLM, SamplingParams
from jaxserve.model_source import DEFAULT_GENERATE_MODEL

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 128

LLAMA_1B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    eos_token_id=128001,
    bos_token_id=128000,
)


def llama_1b_folder() -> Path:
    """config.json of the 1B shape plus a small tokenizer: the weights are random (load_format=dummy)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = Path(tempfile.mkdtemp(prefix="jaxserve-llama-1b-"))
    (folder / "config.json").write_text(json.dumps(LLAMA_1B))
    vocab = {f"t{i}": i for i in range(256)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.save_pretrained(folder)
    return folder


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - began
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return elapsed


def hf_generate_seconds(
    folder: Path, dummy: bool, dtype: str, prompts: list[list[int]], max_new_tokens: int = OUTPUT_TOKENS
) -> float:
    """Seconds for HF transformers to generate `max_new_tokens` greedy tokens after each prompt, as one batch."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    if dummy:
        config = transformers.AutoConfig.from_pretrained(folder)
        config._attn_implementation = "sdpa"
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    model.generation_config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids))
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "llama-1b"], help="default on CPU, llama-1b on an accelerator")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--max-num-batched-tokens", type=int, help="engine token budget (default: the engine's)")
    parser.add_argument("--hf", action="store_true", help="also time HF transformers generate on the same work")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()

    backend = jax.default_backend()
    model = args.model or ("default" if backend == "cpu" else "llama-1b")
    largest = max(args.batches)
    engine_args = dict(max_num_seqs=largest, max_model_len=1024, progress=False)
    if args.max_num_batched_tokens:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens
    if model == "llama-1b":
        llm = LLM(str(llama_1b_folder()), load_format="dummy", dtype="bfloat16", **engine_args)
    else:
        llm = LLM(DEFAULT_GENERATE_MODEL, **engine_args)

    rng = np.random.default_rng(0)
    vocab = min(llm.engine.vocab_size, llm.get_tokenizer().vocab_size)
    device = jax.devices()[0]
    results = dict(
        **provenance(f"{device.platform}: {device.device_kind}"),
        model=model,
        dtype=np.dtype(llm.engine.dtype).name,
        host=platform.node(),
        startup=vars(llm.engine.startup),
        runs=[],
    )
    print(f"{model} on {results['device']}, {results['dtype']}; startup {llm.engine.startup}")
    timed_generate(llm, [rng.integers(3, vocab, PROMPT_TOKENS).tolist()], 4)  # first-call overheads
    for batch in args.batches:
        prompts = [rng.integers(3, vocab, PROMPT_TOKENS).tolist() for _ in range(batch)]
        prefill = timed_generate(llm, prompts, 1)
        total = timed_generate(llm, prompts, OUTPUT_TOKENS)
        step_ms = (total - prefill) / (OUTPUT_TOKENS - 1) * 1e3
        run = dict(
            batch=batch,
            total_s=total,
            prefill_s=prefill,
            step_ms=step_ms,
            output_tok_s=batch * OUTPUT_TOKENS / total,
            decode_tok_s=batch / step_ms * 1e3,
        )
        results["runs"].append(run)
        line = (
            f"batch {batch:4d}: {step_ms:8.2f} ms/step, {run['output_tok_s']:10,.0f} output tok/s end to end, "
            f"{run['decode_tok_s']:10,.0f} tok/s in decode, prefill {prefill:.2f} s"
        )
        if args.hf:
            hf = hf_generate_seconds(llm.engine.model_folder, model == "llama-1b", results["dtype"], prompts)
            run.update(hf_total_s=hf, hf_output_tok_s=batch * OUTPUT_TOKENS / hf)
            line += (
                f" | HF generate {run['hf_output_tok_s']:,.0f} output tok/s ({hf / OUTPUT_TOKENS * 1e3:.2f} ms/step)"
            )
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.docs:
        table = markdown_table([
            {"batch": r["batch"], "ms/step (decode)": f"{r['step_ms']:.2f}",
             "output tok/s (end to end)": f"{r['output_tok_s']:,.0f}",
             "HF output tok/s": f"{r['hf_output_tok_s']:,.0f}" if "hf_output_tok_s" in r else "",
             "HF ms/step": f"{r['hf_total_s'] / OUTPUT_TOKENS * 1e3:.2f}" if "hf_total_s" in r else ""}
            for r in results["runs"]
        ])  # fmt: skip
        body = f"{provenance_lines(results)}\n- Model: {model}, {results['dtype']}\n\n{table}"
        write_docs_section(f"generate-{backend}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
