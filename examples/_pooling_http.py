"""What the plain-HTTP pooling examples share: their flags and a JSON POST that fails with one clear line."""

from __future__ import annotations

import argparse
import sys

import httpx

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="localhost", help="server host (default localhost)")
    parser.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"pooling model (default {DEFAULT_MODEL})")
    return parser


def post(url: str, body: dict) -> dict:
    """POST `body` as JSON; exits with a one-line message if the server cannot be reached or answers an error."""
    try:
        response = httpx.post(url, json=body, timeout=120)
    except httpx.HTTPError as error:
        sys.exit(f"error: cannot reach {url} ({error}). Is `jaxserve serve` running?")
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        sys.exit(f"error: HTTP {response.status_code} from {url}: {message}")
    return response.json()
