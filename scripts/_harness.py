"""What the benchmark scripts share: the provenance every figure carries (device, date, commit, command), a
Markdown table, writing a script's results into its section of docs/benchmarks.md, and launching `jaxserve
serve` in a subprocess timed until /health answers."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: str) -> dict:
    """Device (for a CPU, its core count), date, commit and the command line of this run."""
    return {
        "device": f"CPU, {os.cpu_count()} cores ({platform.machine()})" if device.lower() == "cpu" else device,
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
    }


def markdown_table(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(row[h]) for h in head) + " |" for row in rows]
    return "\n".join(lines)


def write_docs_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Put `body` between the markers `<!-- results:NAME -->` and `<!-- /results:NAME -->` of docs/benchmarks.md,
    replacing what a previous run wrote there; without the markers, append them with the body at the end."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    text = docs.read_text()
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    docs.write_text(text)


def provenance_lines(record: dict) -> str:
    return f"- Device: {record['device']}\n- Command: `{record['command']}`\n- Date: {record['date']}, commit {record['commit']}."


@contextlib.contextmanager
def launched_server(args: list[str], port: int, timeout: float = 900) -> Iterator[tuple[str, float]]:
    """`jaxserve serve ARGS --port PORT` in a subprocess; yields (base URL, seconds from launch until /health
    answered 200), and stops the server (SIGTERM) afterwards. Its output goes to this process's stderr."""
    argv = [sys.executable, "-m", "jaxserve.cli", "serve", *args, "--port", str(port), "--host", "127.0.0.1",
            "--disable-uvicorn-access-log"]  # fmt: skip
    began = time.perf_counter()
    process = subprocess.Popen(argv, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it answered")
            if time.perf_counter() - began > timeout:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url, time.perf_counter() - began
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
