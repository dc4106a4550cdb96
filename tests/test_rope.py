"""`RopeConfig` against transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py): the inverse frequencies and
attention factor of every RoPE type, partial rotary included, and the cos/sin tables against HF's rotary
embedding modules (which multiply them by the attention factor). Fast: no engines, no checkpoints."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.layers import ROPE_TYPES, RopeConfig
from jaxserve.models.llama import DecoderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM = 64
SHAPE = dict(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)


def llama(rope_parameters: dict, max_position_embeddings: int = 4096, **extra):
    return transformers.LlamaConfig(
        **SHAPE, max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope_parameters), **extra
    )


def phi3(rope_scaling: dict | None, original: int = 4096, max_position_embeddings: int = 131072, **extra):
    """A Phi-3 config as config.json spells it (Phi-3.5-mini: `rope_scaling` with `type`, the original length at
    the top level; Phi-4-mini: a top-level `partial_rotary_factor` too)."""
    return transformers.Phi3Config(
        **SHAPE,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=original,
        rope_scaling=None if rope_scaling is None else dict(rope_scaling),
        **extra,
    )


def factors(n: int, top: float) -> list[float]:
    return [float(f) for f in np.round(np.geomspace(1.0, top, n), 4)]


CASES = {
    "default": lambda: llama({"rope_type": "default", "rope_theta": 10000.0}),
    "default-partial": lambda: phi3(None, max_position_embeddings=4096, partial_rotary_factor=0.5),
    "linear": lambda: llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "linear-partial": lambda: llama(
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.25}
    ),
    "dynamic": lambda: llama({"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 3.3}),
    "dynamic-partial": lambda: llama(
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5}, 3000
    ),
    "yarn": lambda: llama(  # Qwen2.5 / Qwen3's long-context recipe
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 1024}
    ),
    "yarn-untruncated": lambda: llama(
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        }  # fmt: skip
    ),
    "yarn-mscale": lambda: llama(  # DeepSeek's: the attention factor a ratio of two mscales
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        163840,  # fmt: skip
    ),
    "yarn-attention-factor": lambda: llama(
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 2048,
            "attention_factor": 0.9,
            "partial_rotary_factor": 0.5,
        }  # fmt: skip
    ),
    "yarn-implicit-factor": lambda: llama(  # no factor: max_position_embeddings / original
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None, "original_max_position_embeddings": 1024}
    ),
    "llama3": lambda: llama(
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        }  # fmt: skip
    ),
    "longrope": lambda: phi3(  # Phi-3.5-mini
        {"type": "longrope", "short_factor": factors(32, 1.3), "long_factor": factors(32, 40.0)}
    ),
    "longrope-partial": lambda: phi3(  # Phi-4-mini
        {"type": "longrope", "short_factor": factors(24, 1.2), "long_factor": factors(24, 30.0)},
        partial_rotary_factor=0.75,
    ),
    "longrope-explicit": lambda: phi3(
        {
            "type": "longrope",
            "short_factor": factors(32, 1.1),
            "long_factor": factors(32, 8.0),
            "factor": 6.0,
            "attention_factor": 1.25,
        }  # fmt: skip
    ),
}


def hf_rope(config, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    params = config.rope_parameters
    if params["rope_type"] == "default":  # Phi-3's: the one default that honours partial_rotary_factor
        fn = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding.compute_default_rope_parameters
        inv_freq, scaling = fn(config, "cpu")
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq.numpy(), float(scaling)


def ours(config, **replace) -> tuple[RopeConfig, np.ndarray]:
    rope = RopeConfig.from_hf(config)
    rope = dataclasses.replace(rope, **replace)
    return rope, rope.inverse_frequencies(rope.rotary_dim(HEAD_DIM))


def test_every_transformers_rope_type_is_covered():
    # proportional is Gemma 4's; the rest are in CASES
    assert set(ROPE_INIT_FUNCTIONS) - {"proportional"} <= set(ROPE_TYPES)
    assert {CASES[name]().rope_parameters["rope_type"] for name in CASES} == set(ROPE_TYPES) - {"ntk"}


@pytest.mark.parametrize("name", [name for name in CASES if not name.startswith("longrope")])
def test_inverse_frequencies_and_attention_factor_match_hf(name):
    config = CASES[name]()
    rope, inv_freq = ours(config)
    expected, scaling = hf_rope(config)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == expected.shape
    assert rope.rotary_dim(HEAD_DIM) == 2 * len(expected)
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(scaling, rel=1e-12)


@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("longrope")])
def test_longrope_factors_as_hf_picks_them_for_the_longest_sequence(name):
    """HF: the short factors up to `original_max_position_embeddings` positions, the long ones past it. jaxserve
    picks by the longest sequence it serves (max_model_len, by default max_position_embeddings)."""
    config = CASES[name]()
    original = config.rope_parameters["original_max_position_embeddings"]
    long_rope, long_freq = ours(config)
    assert long_rope.uses_long_factors
    long_expected, long_scaling = hf_rope(config, seq_len=original + 1)
    np.testing.assert_allclose(long_freq, long_expected, rtol=1e-6, atol=0)
    for served in (original, original // 2):
        short_rope, short_freq = ours(config, max_model_len=served)
        assert not short_rope.uses_long_factors
        for seq_len in (None, served):
            short_expected, short_scaling = hf_rope(config, seq_len=seq_len)
            np.testing.assert_allclose(short_freq, short_expected, rtol=1e-6, atol=0)
            assert short_rope.attention_scaling == pytest.approx(short_scaling, rel=1e-12)
    assert long_rope.attention_scaling == pytest.approx(long_scaling, rel=1e-12)
    assert np.abs(long_freq / short_freq - 1).max() > 0.5


@pytest.mark.parametrize("name", ["dynamic", "dynamic-partial"])
def test_dynamic_ntk_is_the_default_within_max_position_embeddings(name):
    """HF grows dynamic NTK's base only for a sequence longer than max_position_embeddings (which max_model_len
    never exceeds); at every served length its frequencies are these."""
    config = CASES[name]()
    _, inv_freq = ours(config)
    limit = config.max_position_embeddings
    for seq_len in (1, 100, limit // 2, limit - 1, limit):
        np.testing.assert_allclose(inv_freq, hf_rope(config, seq_len=seq_len)[0], rtol=1e-6, atol=0)
    default = RopeConfig(theta=config.rope_parameters["rope_theta"]).inverse_frequencies(len(inv_freq) * 2)
    np.testing.assert_allclose(inv_freq, default, rtol=1e-6, atol=0)
    assert np.abs(hf_rope(config, seq_len=2 * limit)[0] / inv_freq - 1).max() > 0.01  # where they would part


def hf_cos_sin(config, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF's rotary embedding module of the family: cos and sin times its attention factor."""
    if config.model_type == "phi3":
        module = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(config)
    else:
        module = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.zeros(1, len(positions), HEAD_DIM)
    with torch.no_grad():
        cos, sin = module(x, torch.tensor(positions)[None])
    return cos[0].numpy(), sin[0].numpy()


@pytest.mark.parametrize(
    "name", ["default-partial", "linear", "dynamic", "yarn", "yarn-mscale", "yarn-attention-factor", "llama3"]
)
def test_cos_sin_tables_match_hf_modules(name):
    config = CASES[name]()
    positions = np.arange(0, 200, 3)
    rope = RopeConfig.from_hf(config)
    cos, sin = rope.cos_sin(jnp.asarray(positions), rope.rotary_dim(HEAD_DIM))
    expected_cos, expected_sin = hf_cos_sin(config, positions)
    np.testing.assert_allclose(np.asarray(cos), expected_cos, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), expected_sin, rtol=0, atol=2e-5)


def test_longrope_cos_sin_tables_match_phi3_module_in_both_regimes():
    """Phi3RotaryEmbedding switches to the long factors for positions past the original length; cos and sin
    carry the attention factor sqrt(1 + ln(256 / 48) / ln 48) in both regimes. Partial rotary: 48 of 64."""
    config = phi3(
        {"type": "longrope", "short_factor": factors(24, 1.5), "long_factor": factors(24, 12.0)},
        original=48,
        max_position_embeddings=256,
        partial_rotary_factor=0.75,
    )
    rope = RopeConfig.from_hf(config)
    assert rope.attention_scaling == pytest.approx(np.sqrt(1 + np.log(256 / 48) / np.log(48)))
    for served, table in ((48, dataclasses.replace(rope, max_model_len=48)), (256, rope)):
        positions = np.arange(served)
        cos, sin = table.cos_sin(jnp.asarray(positions), table.rotary_dim(HEAD_DIM))
        expected_cos, expected_sin = hf_cos_sin(config, positions)
        assert expected_cos.shape == (served, 48)
        np.testing.assert_allclose(np.asarray(cos), expected_cos, rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(sin), expected_sin, rtol=0, atol=2e-5)


def test_phi_configs_as_published():
    """Phi-3.5-mini's and Phi-4-mini's config.json layouts: DecoderConfig's packed projections, rotary width,
    sliding window and longrope."""
    mini = phi3(
        {"type": "longrope", "short_factor": factors(24, 1.2), "long_factor": factors(24, 30.0)},
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        sliding_window=262144,
    )
    cfg = DecoderConfig.from_hf(mini)
    assert (cfg.fused_qkv, cfg.fused_gate_up, cfg.tie_word_embeddings) == ("stacked", True, True)
    assert (cfg.head_dim, cfg.rotary_dim, len(cfg.rope.long_factor)) == (64, 48, 24)
    assert (cfg.rope.rope_type, cfg.rope.original_max_position_embeddings) == ("longrope", 4096)
    assert cfg.rope.factor == 32.0 and cfg.layer_windows == (262144,)
    phi4 = DecoderConfig.from_hf(phi3(None, max_position_embeddings=16384, original=16384, rope_theta=250000.0))
    assert (phi4.rope.rope_type, phi4.rope.theta, phi4.rotary_dim, phi4.layer_windows) == ("default", 250000.0, 64, ())
    llama_cfg = DecoderConfig.from_hf(CASES["yarn"]())
    assert (llama_cfg.fused_qkv, llama_cfg.fused_gate_up) == (None, False)
    # HF's Llama-family modules other than Phi-3's rotate whole heads whatever partial_rotary_factor says
    partial = llama({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    assert RopeConfig.from_hf(partial).rotary_dim(HEAD_DIM) == 32 and DecoderConfig.from_hf(partial).rotary_dim == 64


def test_unsupported_rope_types_are_refused():
    config = llama({"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="'proportional' is not supported"):
        RopeConfig.from_hf(config)


def test_rope_scaling_given_by_hf_overrides_keeps_the_models_base(tiny_models):
    """`--hf-overrides '{"rope_scaling": ...}'` (vLLM's way to extend a model's context): transformers 5 replaces its
    rope_parameters whole, so the model's rope_theta is carried over."""
    from jaxserve.model_source import load_hf_config

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    rope = RopeConfig.from_hf(load_hf_config(tiny_models["tiny-qwen2"], {"rope_scaling": scaling}))
    assert (rope.rope_type, rope.factor, rope.theta) == ("yarn", 4.0, 10000.0)
