"""Ray Serve: jaxserve's OpenAI app as a Ray Serve application (`pip install "jaxserve[ray]"`, Ray >= 2.47).

One deployment per model. Each replica is a Ray actor, a process of its own, that builds the model's engine
(`create_serving_engine(EngineConfig(...))`, as `jaxserve serve` does) and the same FastAPI app over it
(`server.app.build_app`); Ray's HTTP proxy routes each request to a replica, which answers it with that app.
The app reaches Ray through `serve.ingress` given a builder function (Ray >= 2.47): Ray calls it inside the
replica, when the replica starts, so neither the engine nor the app is ever pickled; only the engine config,
the served names and the server settings travel to the replicas.

Accelerators: a replica claims the devices its engine spans (`tensor_parallel_size` x `data_parallel_size`)
through its actor options: `num_gpus` on GPU, the `TPU` resource on TPU (1, 2, 4 or 8 chips of one host), and
nothing on CPU, where JAX is held to the CPU (`JAX_PLATFORMS=cpu`) so that a CPU replica never takes an
accelerator on the host. Ray sets `CUDA_VISIBLE_DEVICES` or `TPU_VISIBLE_CHIPS` for each replica, so the JAX in
a replica sees only its own devices.

Scaling: `num_replicas`, or an `autoscaling_config` (Ray's dict: min_replicas, max_replicas,
target_ongoing_requests, ...). A replica takes up to `max_ongoing_requests` requests at once (default: the
engine's `max_num_seqs`, else 256), so that its engine batches them; the rest wait in Ray's router for a
replica with room.

When a replica stops (scale-down, redeploy, `serve.delete`, `serve shutdown`), Ray calls its `__del__` after the
app's lifespan has ended: the engines are shut down there.

Entry points:
  serve run jaxserve.ray_serve:build_app model=Qwen/Qwen3-0.6B accelerator=gpu tensor_parallel_size=2 num_replicas=2
  serve.run(jaxserve.ray_serve.deployment("Qwen/Qwen3-0.6B", accelerator="gpu", num_replicas=2), route_prefix="/")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import typing
from pathlib import PurePosixPath
from typing import Any, Literal

from ray import serve
from ray.serve import Application

from .config import EngineConfig, parse_flag
from .server.settings import ServerSettings

if typing.TYPE_CHECKING:
    from fastapi import FastAPI

Accelerator = Literal["cpu", "gpu", "tpu"]
DEFAULT_MAX_ONGOING_REQUESTS = 256  # the engine's max_num_seqs on GPU/TPU when not given

logger = logging.getLogger("ray.serve")  # Ray's logger: in a replica it writes to the replica's log file


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """What a replica needs to build its engine and app: plain data, pickled to the replicas."""

    config: EngineConfig
    names: tuple[str, ...]  # the served model names; the first is the name in responses and metrics
    settings: ServerSettings
    content_format: str = "auto"  # --chat-template-content-format


def deployment(
    model: str,
    *,
    num_replicas: int | str | None = None,
    autoscaling_config: dict[str, Any] | None = None,
    accelerator: Accelerator = "cpu",
    served_model_name: str | list[str] | None = None,
    max_ongoing_requests: int | None = None,
    server_settings: dict[str, Any] | None = None,
    chat_template_content_format: str = "auto",
    ray_actor_options: dict[str, Any] | None = None,
    **engine_args: Any,
) -> Application:
    """A Ray Serve application of one deployment serving `model` with jaxserve's OpenAI API, for `serve.run`.

    `num_replicas` (default 1, or Ray's "auto") or `autoscaling_config`, not both. `accelerator` says what each
    replica claims (see the module docstring); `ray_actor_options` is merged over that. `server_settings` are
    `ServerSettings` fields (api_keys, tool_call_parser, ...); `engine_args` are `EngineConfig` fields, as
    `jaxserve serve`'s engine flags (max_model_len, tensor_parallel_size, ...). The engine config is checked here,
    before any replica starts."""
    if num_replicas is not None and autoscaling_config is not None:
        raise ValueError("Give num_replicas or autoscaling_config, not both.")
    # as `jaxserve serve`: answer once the main buckets are compiled, the rest compile in the background
    engine_args = {"strict_compile": False, "progress": False, **engine_args}
    config = EngineConfig(model=model, **engine_args)
    if isinstance(served_model_name, str):
        served_model_name = [served_model_name]
    names = tuple(served_model_name or [model])
    spec = ReplicaSpec(config, names, ServerSettings(**(server_settings or {})), chat_template_content_format)
    devices = config.tensor_parallel_size * config.data_parallel_size
    options: dict[str, Any] = {
        "name": deployment_name(names[0]),
        "ray_actor_options": {**replica_resources(accelerator, devices), **(ray_actor_options or {})},
        "max_ongoing_requests": max_ongoing_requests or config.max_num_seqs or DEFAULT_MAX_ONGOING_REQUESTS,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = 1 if num_replicas is None else num_replicas
    return serve.deployment(_replica_class(spec), **options).bind()


def build_app(args: dict[str, Any]) -> Application:
    """Ray's application builder: `serve run jaxserve.ray_serve:build_app model=... key=value ...`, or `args:` in a
    Serve config file. Keys are `deployment`'s arguments and `EngineConfig`'s fields (`tensor_parallel_size` or
    `tensor-parallel-size`). Values from the command line are strings: numbers, booleans and JSON (dicts,
    `served_model_name='["a","b"]'`) are read by the field's type; values from a config file may be typed."""
    args = {key.replace("-", "_"): value for key, value in args.items()}
    model = args.pop("model", None)
    if not model:
        raise ValueError("build_app needs model=<HF folder, .gguf file or hub name>.")
    num_replicas = args.pop("num_replicas", None)
    if isinstance(num_replicas, str) and num_replicas != "auto":
        num_replicas = int(num_replicas)
    max_ongoing = args.pop("max_ongoing_requests", None)
    names = args.pop("served_model_name", None)
    if isinstance(names, str) and names.lstrip().startswith("["):
        names = json.loads(names)
    return deployment(
        str(model),
        num_replicas=num_replicas,
        autoscaling_config=_json(args.pop("autoscaling_config", None)),
        accelerator=args.pop("accelerator", "cpu"),
        served_model_name=names,
        max_ongoing_requests=None if max_ongoing is None else int(max_ongoing),
        server_settings=_json(args.pop("server_settings", None)),
        chat_template_content_format=args.pop("chat_template_content_format", "auto"),
        ray_actor_options=_json(args.pop("ray_actor_options", None)),
        **{name: parse_flag(name, value) if isinstance(value, str) else value for name, value in args.items()},
    )


def replica_resources(accelerator: str, devices: int) -> dict[str, Any]:
    """The actor options by which a replica claims `devices` accelerators."""
    if accelerator == "gpu":
        return {"num_gpus": devices}
    if accelerator == "tpu":
        return {"resources": {"TPU": devices}}
    if accelerator == "cpu":
        return {"runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}}
    raise ValueError(f"accelerator must be cpu, gpu or tpu, got {accelerator!r}.")


def deployment_name(served_name: str) -> str:
    """A deployment name from a served model name: its last path part, in characters Ray takes."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", PurePosixPath(served_name).name or served_name) or "jaxserve"


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def build_replica_app(spec: ReplicaSpec) -> FastAPI:
    """In the replica: the engine, then the app over it (the one `jaxserve serve` runs under uvicorn)."""
    from .data_parallel import create_serving_engine
    from .server.app import build_app as build_fastapi_app
    from .server.served_models import ModelRegistry, ServedModel

    settings = spec.settings
    if settings.launched_at is None:
        settings = dataclasses.replace(settings, launched_at=time.time())  # the app logs its start-up time
    engine = create_serving_engine(spec.config)
    model = ServedModel.from_engine(list(spec.names), spec.config.model, engine, spec.content_format)
    return build_fastapi_app(ModelRegistry([model]), settings)


def _replica_class(spec: ReplicaSpec) -> type:
    """The deployment class of one model: Ray pickles it with `spec` and builds the app in each replica."""

    def build_asgi_app() -> FastAPI:
        return build_replica_app(spec)

    @serve.ingress(build_asgi_app)
    class JaxServeReplica:
        def __del__(self) -> None:
            """Ray calls this when the replica stops, after the app's lifespan has ended."""
            app = getattr(self, "app", None)  # None when the engine failed to build
            if app is not None:
                for model in app.state.server.registry.models:
                    model.engine.shutdown()
                logger.info("jaxserve engines stopped")

    return JaxServeReplica
