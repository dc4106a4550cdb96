"""Finding a model: a folder, a GGUF, the local HF cache, the embedded packages, or a clear error."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import constants

from jaxserve.model_source import resolve_model


def test_a_folder_is_used_as_is(tiny_models):
    assert resolve_model(tiny_models["tiny-llama"]) == tiny_models["tiny-llama"]


def test_hub_name_resolves_through_the_local_hf_cache(tiny_models, tmp_path, monkeypatch):
    repo = tmp_path / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_models["tiny-qwen2"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("acme/tiny-chat") == snapshot


def test_missing_model_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        resolve_model("nobody/nothing")
    message = str(error.value)
    assert "'nobody/nothing' was not found" in message
    assert "no such folder or .gguf file" in message
    assert str(tmp_path) in message


def test_a_folder_with_one_gguf_is_converted(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("jaxserve.model_source._from_gguf", lambda path: calls.append(path) or tmp_path)
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"")
    assert resolve_model(tmp_path) == tmp_path
    assert calls == [tmp_path / "model.Q4_0.gguf"]
