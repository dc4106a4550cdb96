"""The `jaxserve` command line."""

from __future__ import annotations

import argparse

import pytest

from jaxserve.cli import build_parser, dotted_json_args, engine_kwargs, json_flags, main, parse_bytes
from jaxserve.config import parse_flag


def test_generate_prints_each_prompt_and_its_completion(tiny_models, capsys):
    argv = ["generate", "--model", str(tiny_models["tiny-qwen3"]), "--temperature", "0", "--max-tokens", "8",
            "--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
            "--min-token-rung", "64", "--kv-cache-memory", "4MiB", "--chat", "Say hi", "Count to three"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert ">>> Say hi\n" in printed and ">>> Count to three\n" in printed


def test_engine_flags_use_vllm_names():
    args = build_parser().parse_args(
        ["generate", "x", "--dtype", "bfloat16", "--max-num-seqs", "4", "--override-generation-config", '{"top_k": 5}']
    )
    assert (args.dtype, args.max_num_seqs, args.override_generation_config) == ("bfloat16", 4, {"top_k": 5})


def test_pooling_flags_reach_the_engine_config():
    args = build_parser().parse_args(
        [
            "generate",
            "x",
            "--runner",
            "pooling",
            "--pooler-config",
            '{"pooling_type": "MEAN", "dimensions": 16}',
            "--hf-overrides",
            '{"matryoshka_dimensions": [16, 32]}',
        ]
    )
    kwargs = engine_kwargs(args)
    assert kwargs["runner"] == "pooling"
    assert kwargs["pooler_config"] == {"pooling_type": "MEAN", "dimensions": 16}
    assert kwargs["hf_overrides"] == {"matryoshka_dimensions": [16, 32]}


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--min-token-rung", "0", "min_token_rung must be at least 1"),
        ("--page-size", "24", "page_size must be a power"),
    ],
)
def test_engine_flag_values_the_config_refuses_are_usage_errors(flag, value, message):
    args = build_parser().parse_args(["generate", "x", flag, value])
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        engine_kwargs(args)
    assert engine_kwargs(build_parser().parse_args(["generate", "x", "--min-token-rung", "64"]))["min_token_rung"] == 64


def test_json_flags_take_vllms_dotted_form():
    argv = dotted_json_args(
        ["generate", "x", "--pooler-config", '{"dimensions": 16}', "--pooler-config.task=token_classify",
         "--pooler-config.normalize", "false", "--hf-overrides.text_config.vocab_size=4"],
        json_flags(),
    )  # fmt: skip
    kwargs = engine_kwargs(build_parser().parse_args(argv))
    assert kwargs["pooler_config"] == {"dimensions": 16, "task": "token_classify", "normalize": False}
    assert kwargs["hf_overrides"] == {"text_config": {"vocab_size": 4}}


@pytest.mark.parametrize("text, value", [("1024", 1024), ("2GiB", 2 << 30), ("512M", 512 << 20), ("1.5k", 1536)])
def test_sizes(text, value):
    assert parse_bytes(text) == value


def test_bad_size():
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")


def test_flag_text_from_elsewhere_reads_as_the_command_line_does():
    """`serve run jaxserve.ray_serve:build_app key=value` hands strings: each becomes what `--key value` would."""
    argv = ["generate", "x", "--max-num-seqs", "4", "--kv-cache-memory", "2GiB", "--no-enable-prefix-caching",
            "--hf-overrides", '{"a": 1}']  # fmt: skip
    kwargs = engine_kwargs(build_parser().parse_args(argv))
    texts = {
        "max_num_seqs": "4",
        "kv_cache_memory": "2GiB",
        "enable_prefix_caching": "false",
        "hf_overrides": '{"a": 1}',
    }
    assert {name: parse_flag(name, text) for name, text in texts.items()} == {name: kwargs[name] for name in texts}
    assert parse_flag("max_model_len", "none") is None
    with pytest.raises(ValueError, match="true or false"):
        parse_flag("enable_prefix_caching", "maybe")
    with pytest.raises(ValueError, match="not an engine flag"):
        parse_flag("device_ids", "[0]")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "2"], "go together"),
        (["--distributed-coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
    ],
)
def test_contradicting_multi_process_flags_are_a_usage_error(flags, message):
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        main(["serve", "x", *flags])
