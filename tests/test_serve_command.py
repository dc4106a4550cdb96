"""`jaxserve serve` as a user runs it: a subprocess serving two models, the examples/ scripts against it, and
SIGTERM draining the requests in flight before the process exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.cli import build_parser, served_names, server_settings
from jaxserve.server.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
ENGINE_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                "--min-token-rung", "16", "--kv-cache-memory", "64MiB"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_models):
    port = free_port()
    argv = [sys.executable, "-m", "jaxserve.cli", "serve", str(tiny_models["tiny-qwen3"]),
            str(tiny_models["tiny-bert-mean"]), "--served-model-name", "qwen3", "bert", "--port", str(port),
            "--host", "127.0.0.1", "--api-key", "sk-test", "--disable-uvicorn-access-log", *ENGINE_FLAGS]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    yield url, process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    "script", ["openai_chat_client.py", "openai_completion_client.py", "openai_chat_streaming_client.py"]
)
def test_examples_run_against_the_server(server, script):
    url, _ = server
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--base-url", f"{url}/v1", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAXSERVE_API_KEY": "sk-test"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "qwen3" in result.stdout


def test_startup_is_timed_and_exported(server):
    """Start-up time since launch, and each model's loading and compiling, are on /metrics; without
    --strict-compile at least the first buckets are compiled, and (having served already) soon all of them."""
    url, _ = server
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    (total,) = families["jaxserve:startup_seconds"].samples
    assert total.value > 0
    for name in ("jaxserve:startup_load_seconds", "jaxserve:startup_compile_seconds"):
        samples = {s.labels["model_name"]: s.value for s in families[name].samples}
        assert set(samples) == {"qwen3", "bert"} and all(0 < v < total.value for v in samples.values())
    compiled = {s.labels["model_name"]: s.value for s in families["jaxserve:buckets_compiled"].samples}
    buckets = {s.labels["model_name"]: s.value for s in families["jaxserve:buckets_total"].samples}
    assert all(1 <= compiled[m] <= buckets[m] for m in ("qwen3", "bert"))


def test_both_models_are_listed_and_sigterm_drains_a_stream(server, tiny_models):
    url, process = server
    st_config = json.loads((tiny_models["tiny-bert-mean"] / "sentence_bert_config.json").read_text())
    headers = {"Authorization": "Bearer sk-test"}
    models = httpx.get(f"{url}/v1/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["qwen3", "bert"]
    assert models["data"][0]["max_model_len"] == 256
    assert models["data"][1]["max_model_len"] == st_config["max_seq_length"]  # its own, not --max-model-len

    body = {"model": "qwen3", "prompt": "Once", "max_tokens": 120, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as response:
        lines = response.iter_lines()
        events.append(next(lines))
        process.send_signal(signal.SIGTERM)
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
    log = process.stdout.read()
    assert "Ready in" in log and "weights loaded in" in log and "buckets compiled in" in log


def test_served_names_and_settings_from_flags(monkeypatch):
    assert served_names(["a"], None) == [["a"]]
    assert served_names(["a"], ["x", "y"]) == [["x", "y"]]
    assert served_names(["a", "b"], ["x", "y"]) == [["x"], ["y"]]
    with pytest.raises(SystemExit, match="one name per model"):
        served_names(["a", "b"], ["x"])
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    args = build_parser().parse_args(
        ["serve", "--allowed-origins", '["*"]', "--max-num-queued-reqs", "4", "--max-request-size", "1MiB"]
    )
    settings = server_settings(args)
    assert settings.api_keys == ["from-env"]
    assert settings.allowed_origins == ["*"] and settings.max_num_queued_reqs == 4
    assert settings.max_request_bytes == 1 << 20
    assert args.port == 8000 and args.models == []
