"""scripts/bench_speech.py: its jaxserve side transcribes two short fixtures with tiny engine limits (no baseline),
the default clips split into the same windows for every side, and `--device gpu --dry-run` builds the large-v3
config folder. Nothing here asserts on speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_speech  # noqa: E402


@pytest.mark.optimized  # decodes Whisper: programs compiled with optimizations
def test_jaxserve_side_transcribes_two_clips(tmp_path, capsys):
    out = tmp_path / "speech.json"
    argv = ["--clips", "2", "--repeats", "1", "--baselines", "--max-num-seqs", "2", "--max-num-batched-tokens", "8",
            "--json", str(out)]  # fmt: skip
    assert bench_speech.main(argv) == 0
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["system"] == "jaxserve" and (record["clips"], record["windows"]) == (2, 2)
    assert row["RTF"] > 0 and row["tokens"] > 0 and float(row["WER"]) < 0.2
    assert set(record["jaxserve_startup_s"]) == {"total", "load", "compile"}
    assert "| jaxserve |" in capsys.readouterr().out


def test_default_clips_mix_lengths_and_split_long_ones():
    clips = bench_speech.speech_clips(8)
    assert all(c.text for c in clips) and len(clips[7].audio) == 70 * 16_000
    assert len({len(c.audio) for c in clips}) == 5  # the four fixtures and the 70 s join
    windows, owners = bench_speech.windows_of(clips)
    assert owners == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]  # the 70 s join in three windows, as vLLM splits it
    assert all(len(w) <= 30 * 16_000 for w in windows)
    assert bench_speech.clip_texts(["a", " b", "c ", ""], [0, 1, 1, 2], 3) == ["a", "b c", ""]
    assert bench_speech.word_error_rate(["Hello, World!"], ["hello world"]) == 0.0


def test_gpu_dry_run_builds_the_large_v3_config(tmp_path, capsys):
    folder = tmp_path / "large-v3"
    assert bench_speech.main(["--device", "gpu", "--dry-run", "--model-dir", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert json.loads(capsys.readouterr().out)["folder"] == str(folder)
    shape = {k: config[k] for k in bench_speech.LARGE_V3}
    assert shape == bench_speech.LARGE_V3 and (config["d_model"], config["num_mel_bins"]) == (1280, 128)
    assert {p.name for p in folder.iterdir()} == {"config.json", *bench_speech.TINY_EN_FILES}
