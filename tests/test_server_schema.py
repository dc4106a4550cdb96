"""The server fuzzed from its own `/openapi.json` by schemathesis (as vLLM's own schema test does): every
operation, valid and invalid inputs, every check schemathesis has (no 5xx, statuses, content types and bodies as
documented, invalid input rejected, unsupported methods answered with `Allow`), and the server healthy after."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from jaxserve import AsyncEngine
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel
from jaxserve.server.settings import ServerSettings

from .conftest import ROOT, TINY_ENGINE, TINY_POOLING

pytestmark = pytest.mark.optimized  # thousands of requests: the programs are compiled with optimizations

MODELS = {  # served name: (test model, engine arguments)
    "llama": ("tiny-llama", dict(TINY_ENGINE, min_token_rung=16)),
    "bert": ("tiny-bert-mean", dict(TINY_POOLING, min_token_rung=16)),
    "cross": ("tiny-xlmr-cross-encoder", dict(TINY_POOLING, min_token_rung=16)),
    "classifier": ("tiny-bert-classifier", dict(TINY_POOLING, min_token_rung=16)),
}
EXAMPLES_PER_OPERATION = 50


@pytest.fixture(scope="module")
def base_url(tiny_models, llm_cache):
    served = [
        ServedModel.from_engine(
            [name], str(tiny_models[folder]), AsyncEngine(llm_cache(tiny_models[folder], args).engine), "auto"
        )
        for name, (folder, args) in MODELS.items()
    ]
    # few samples and a small body limit keep each generated request cheap on a CPU
    with background_server(served, ServerSettings(max_n=2, max_request_bytes=64 << 10)) as base:
        yield base
    for model in served:
        model.engine.shutdown()


def test_every_operation_answers_as_documented(base_url, tmp_path):
    # every check but one: a body the schema allows may still be refused with a 400 (a score request needs exactly
    # one pair of inputs, a chat needs a known tool_choice, ...), which `positive_data_acceptance` counts as a fault
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--mode", "all", "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "1", "--workers", "1", "--no-shrink",
        "--request-timeout", "60", "--report-dir", str(tmp_path), "--generation-database", "none",
    ]  # fmt: skip
    hooks = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=hooks, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert httpx.get(f"{base_url}/health").status_code == 200
    body = {"model": "llama", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{base_url}/v1/completions", json=body).status_code == 200
