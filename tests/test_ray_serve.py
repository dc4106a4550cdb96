"""Ray Serve (jaxserve/ray_serve.py): a local Ray cluster on this machine's CPUs runs the OpenAI app as one
deployment of two replicas of a tiny model, each building its engine in a process of its own; the official
`openai` client talks to them through Ray's HTTP proxy and must get the offline engine's answers."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from jaxserve.server.launch import free_port

from .conftest import TINY_ENGINE

pytestmark = [
    pytest.mark.ray,
    # Ray starts its processes with subprocess, which JAX warns of when an engine of the session runs
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
]
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

PROMPTS = [f"Story {i}: once upon a time" for i in range(8)]
MAX_TOKENS = 8


def test_build_app_reads_command_line_strings():
    from jaxserve.ray_serve import build_app

    args = {
        "model": "Qwen/Qwen3-0.6B",
        "num_replicas": "3",
        "accelerator": "gpu",
        "tensor-parallel-size": "2",
        "max_num_seqs": "32",
        "enable_prefix_caching": "false",
        "kv_cache_memory": "1GiB",
        "hf_overrides": '{"rope_theta": 5}',
        "served_model_name": '["qwen", "qwen-alias"]',
        "server_settings": '{"api_keys": ["sk-1"]}',
    }
    bound = build_app(args)._bound_deployment  # what Ray deploys: the deployment and its options
    assert bound.name == "qwen" and bound.num_replicas == 3 and bound.max_ongoing_requests == 32
    assert bound.ray_actor_options["num_gpus"] == 2
    tpu = build_app({"model": "m", "accelerator": "tpu", "tensor_parallel_size": "4", "num_replicas": "2"})
    assert tpu._bound_deployment.ray_actor_options["resources"] == {"TPU": 4}
    scaled = build_app({"model": "m", "autoscaling_config": '{"min_replicas": 1, "max_replicas": 4}'})
    assert scaled._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4
    with pytest.raises(ValueError, match="not both"):
        build_app({"model": "m", "num_replicas": "2", "autoscaling_config": "{}"})
    with pytest.raises(ValueError, match="true or false"):
        build_app({"model": "m", "enable_prefix_caching": "maybe"})


@dataclasses.dataclass
class Served:
    url: str  # Ray's HTTP proxy
    offline: list[str]  # the offline engine's answers to PROMPTS
    logs: Path  # the replicas' log files


@pytest.fixture(scope="module")
def served(tiny_models, llm_cache, tmp_path_factory):
    """Ray on this machine, Serve's HTTP proxy on a free loopback port, and the app at "/" with two replicas, which
    build their engines while this process computes the offline answers (Ray's start-up dominates the time)."""
    from jaxserve.ray_serve import deployment

    port = free_port()
    logs = tmp_path_factory.mktemp("ray-serve-logs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # the processes Ray starts inherit the environment
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(str(tiny_models["tiny-llama"]), num_replicas=2, served_model_name="llama", **TINY_ENGINE)
        with ThreadPoolExecutor(1) as pool:
            # serve.run returns once both replicas run; the replicas and this engine share the compile cache
            deploying = pool.submit(
                serve.run, app, name="llama", route_prefix="/", logging_config={"logs_dir": str(logs)}
            )
            llm = llm_cache(tiny_models["tiny-llama"], TINY_ENGINE)
            params = llm.get_default_sampling_params().clone(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            offline = [output.outputs[0].text for output in llm.generate(PROMPTS, params, use_tqdm=False)]
            deploying.result()
        yield Served(f"http://127.0.0.1:{port}", offline, logs)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_the_offline_engine(served):
    proxy, offline = served.url, served.offline
    replicas = serve.status().applications["llama"].deployments["llama"].replica_states
    assert replicas == {"RUNNING": 2}
    models = httpx.get(f"{proxy}/v1/models", timeout=30).json()
    assert [card["id"] for card in models["data"]] == ["llama"]

    client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0, timeout=60)

    def complete(prompt: str) -> str:
        extra = {"ignore_eos": True}
        answer = client.completions.create(
            model="llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
        )
        return answer.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once, so that Ray's router spreads them over the replicas
        assert list(pool.map(complete, PROMPTS)) == offline
    stream = client.completions.create(
        model="llama",
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(chunks) > 1 and "".join(chunks) == offline[0]  # server-sent events through the proxy


def test_replicas_shut_their_engines_down_when_the_app_is_deleted(served):
    serve.delete("llama")  # returns once the application is gone
    assert "llama" not in serve.status().applications
    replica_logs = [path.read_text() for path in served.logs.glob("replica_llama_llama_*.log")]
    assert len(replica_logs) == 2
    assert all("jaxserve engines stopped" in text for text in replica_logs)
