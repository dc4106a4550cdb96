"""Two processes on loopback, joined by jax.distributed (4 forced CPU devices each, gloo collectives), serve one
8-way tensor-parallel model: `jaxserve serve` as a user runs it on two hosts. Process 0 serves HTTP; killing
process 1 turns /health into 503 at once and requests fail fast instead of hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from jaxserve import SamplingParams
from jaxserve.server.launch import free_port

from ..conftest import CACHE
from .test_tensor_parallel import ENGINE

PROMPTS = ["Hello there, how are you today", "The quick brown fox", "1 2 3 4"]
FLAGS = ["--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "4", "--min-token-rung", "4",
         "--num-kv-pages", "64"]  # fmt: skip


@pytest.fixture(scope="module")
def two_hosts(tiny_models, tmp_path_factory):
    coordinator, port = f"127.0.0.1:{free_port()}", free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAXSERVE_CACHE_DIR": str(CACHE / "jaxserve"),
    }
    logs = tmp_path_factory.mktemp("hosts")
    processes = []
    for process_id in (1, 0):
        command = [
            sys.executable, "-m", "jaxserve.cli", "serve", str(tiny_models["tiny-llama-8h"]), "--served-model-name",
            "llama", "--tensor-parallel-size", "8", "--distributed-coordinator", coordinator, "--num-processes", "2",
            "--process-id", str(process_id), "--port", str(port), "--disable-uvicorn-access-log", *FLAGS,
        ]  # fmt: skip
        log = open(logs / f"process-{process_id}.log", "w")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    follower, leader = processes
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            for p in processes:
                p.kill()
            pytest.fail("the two processes did not start serving:\n" + (logs / "process-0.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url, follower, leader
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()


def test_tensor_parallel_over_two_processes_answers_as_one_device(two_hosts, tiny_models, llm_cache):
    url, _, _ = two_hosts
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    got = [
        client.completions.create(model="llama", prompt=p, max_tokens=8, temperature=0).choices[0].text for p in PROMPTS
    ]
    one_device = llm_cache(tiny_models["tiny-llama-8h"], ENGINE)
    expected = [o.outputs[0].text for o in one_device.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))]
    assert got == expected


def test_a_dead_process_makes_the_server_unhealthy(two_hosts):
    url, follower, leader = two_hosts
    follower.send_signal(signal.SIGKILL)
    follower.wait()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/health still 200 after 10 s"
        time.sleep(0.2)
    began = time.monotonic()
    response = httpx.post(
        f"{url}/v1/completions", json={"model": "llama", "prompt": "Hello", "max_tokens": 4}, timeout=30
    )
    assert response.status_code == 500 and time.monotonic() - began < 5  # refused at once, not hanging
    assert leader.poll() is None  # the leader still answers
