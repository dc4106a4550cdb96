"""`jaxserve bench latency` and `jaxserve bench throughput` through the CLI on tiny models: the JSON they write
holds what they measured, with exact token counts. Nothing here asserts on speed."""

from __future__ import annotations

import json

from jaxserve.cli import main

ENGINE_FLAGS = ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
                "--min-token-rung", "32"]  # fmt: skip


def test_latency_reports_every_iteration(tiny_models, tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["bench", "latency", "--model", str(tiny_models["tiny-llama"]), "--input-len", "8", "--output-len", "4",
            "--batch-size", "3", "--num-iters-warmup", "1", "--num-iters", "3", "--output-json", str(out),
            *ENGINE_FLAGS]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert len(result["latencies"]) == 3 and all(t > 0 for t in result["latencies"])
    assert result["avg_latency"] == sum(result["latencies"]) / 3
    assert set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert (result["batch_size"], result["input_len"], result["output_len"]) == (3, 8, 4)
    assert "Avg latency:" in capsys.readouterr().out


def test_throughput_counts_exact_tokens(tiny_models, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    argv = ["bench", "throughput", "--model", str(tiny_models["tiny-llama"]), "--input-len", "6", "--output-len",
            "5", "--num-prompts", "7", "--n", "2", "--output-json", str(out), *ENGINE_FLAGS]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 7
    assert result["total_output_tokens"] == 7 * 2 * 5  # EOS ignored, n=2
    assert result["total_num_tokens"] == 7 * 6 + 7 * 2 * 5
    assert result["requests_per_second"] > 0 and result["output_tokens_per_second"] > 0
    assert "Throughput:" in capsys.readouterr().out


def test_throughput_of_a_pooling_model_embeds(tiny_models, tmp_path):
    out = tmp_path / "embed.json"
    argv = ["bench", "throughput", "--model", str(tiny_models["tiny-bert-mean"]), "--input-len", "9",
            "--num-prompts", "10", "--output-json", str(out), "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
            "--min-token-rung", "64"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["total_output_tokens"] == 0
    assert result["total_num_tokens"] == 10 * 9
    assert result["tokens_per_second"] > 0
