"""scripts/bench_kernels.py end to end on tiny shapes (`--smoke`; Pallas in interpret mode on CPU): every workload
runs on both kernels and the JSON record holds what docs/benchmarks.md needs. It measures nothing here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts import their harness
import bench_kernels  # noqa: E402

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("no_persistent_compile_cache")]


def test_smoke_run_writes_every_workload(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--smoke", "--repeats", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert {"device", "date", "commit", "command", "copy_GBps", "matmul_TFLOPs"} <= set(record)
    rows = record["results"]
    workloads = {row["workload"] for row in rows}
    assert {"decode-4x40", "prefill-2x24", "mixed", "varlen-bert", "pool-mean"} <= workloads
    assert {row["kernel"] for row in rows} >= {"pallas", "reference"}
    assert all(row["ms"] > 0 and row["GB/s"] >= 0 for row in rows)
    assert "| workload | kernel |" in capsys.readouterr().out
