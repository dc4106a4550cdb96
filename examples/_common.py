"""Code the example scripts share: their command-line flags, the `openai` client, and which model to ask for.

Not an example itself; the scripts next to it import it with `from _common import ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import openai
from openai import OpenAI

DEFAULT_BASE_URL = "http://localhost:8000/v1"


def default_api_key() -> str:
    """The key `jaxserve serve` reads from the environment, or a placeholder when it runs without one."""
    return os.environ.get("JAXSERVE_API_KEY") or os.environ.get("VLLM_API_KEY") or "EMPTY"


def make_parser(description: str | None, default_temperature: float) -> argparse.ArgumentParser:
    """The flags every example takes; a script can add its own before parsing."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"server URL (default {DEFAULT_BASE_URL})")
    parser.add_argument(
        "--api-key",
        default=default_api_key(),
        help="API key (default: $JAXSERVE_API_KEY, else $VLLM_API_KEY, else 'EMPTY' for a server without one)",
    )
    parser.add_argument(
        "--model",
        help="model name (default: the first model /v1/models lists; a plain `jaxserve serve` lists its "
        "generation model, SmolLM2-135M-Instruct, before the embedding model)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=default_temperature,
        help=f"sampling temperature (default {default_temperature:g})",
    )
    return parser


def make_client(args: argparse.Namespace) -> OpenAI:
    return OpenAI(base_url=args.base_url, api_key=args.api_key)


def pick_model(client: OpenAI, requested: str | None) -> str:
    """`requested` if given, else the first model the server lists."""
    if requested:
        return requested
    models = client.models.list().data
    if not models:
        raise SystemExit("error: the server lists no models; pass --model")
    return models[0].id


def run(main: Callable[[], None]) -> int:
    """Call `main`, turning the client's errors into a short message and exit status 1."""
    try:
        main()
    except openai.APIConnectionError as error:
        print(f"error: cannot reach the server ({error}). Is `jaxserve serve` running?", file=sys.stderr)
        return 1
    except openai.APIStatusError as error:
        hint = " (pass --api-key, or set $JAXSERVE_API_KEY / $VLLM_API_KEY)" if error.status_code == 401 else ""
        print(f"error: {error.message}{hint}", file=sys.stderr)  # e.g. "Error code: 404 - The model `x` does not ..."
        return 1
    return 0
