"""scripts/_harness.py: how benchmark scripts write their results into docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _harness import markdown_table, provenance, write_docs_section  # noqa: E402


def test_a_section_is_appended_once_then_replaced_in_place(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Kernels\n\nprose\n")
    write_docs_section("kernels-gpu", "first run", docs)
    write_docs_section("other", "another figure", docs)
    write_docs_section("kernels-gpu", "second run\nwith two lines", docs)
    text = docs.read_text()
    assert text.count("<!-- results:kernels-gpu -->") == 1 and "first run" not in text
    assert "<!-- results:kernels-gpu -->\nsecond run\nwith two lines\n<!-- /results:kernels-gpu -->" in text
    assert text.index("second run") < text.index("another figure")  # replaced where it was
    assert text.startswith("# Benchmarks\n\n## Kernels\n\nprose\n")


def test_table_and_provenance():
    assert markdown_table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |"
    record = provenance("cpu")
    assert record["device"].startswith("CPU, ") and "cores" in record["device"]
    assert set(record) == {"device", "date", "commit", "command"}
    assert provenance("NVIDIA H100 80GB HBM3")["device"] == "NVIDIA H100 80GB HBM3"
