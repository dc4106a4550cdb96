"""Building blocks shared by the model families. Parameters keep Hugging Face's names and layouts
(`weight` is [out_features, in_features]), so a module's state path is the checkpoint's tensor name."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INIT_STD = 0.02

# The logical axes parameters name their dimensions with (`logical_axes` metadata), once per layer type; an
# engine over a device mesh maps them to its axis (jaxserve/parallel.py). None: the dimension is never split.
LOGICAL_AXES = ("heads", "kv_heads", "mlp", "vocab", "experts")


def param(value: jax.Array, axes: tuple[str | None, ...] = ()) -> nnx.Param:
    """A parameter whose dimensions are named by logical `axes` (empty: whole on every device)."""
    return nnx.Param(value, logical_axes=tuple(axes)) if any(axes) else nnx.Param(value)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    return (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """`axes` are the logical axes of the weight's (out, in) dimensions: ("heads", None) splits the output
    features over a mesh (column-parallel), (None, "heads") the input features (row-parallel); the bias follows the
    output features."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype,
        rngs: nnx.Rngs,
        axes: tuple[str | None, str | None] = (None, None),
    ):
        self.weight = param(_normal(rngs, (out_features, in_features), dtype), axes)
        self.bias = param(jnp.zeros((out_features,), dtype), axes[:1]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y + self.bias[...] if self.bias is not None else y


class Embedding(nnx.Module):
    """`axis`: the logical axis of the rows ("vocab" for token embeddings, which a mesh splits by vocabulary)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs, axis: str | None = None):
        self.weight = param(_normal(rngs, (num_embeddings, features), dtype), (axis, None))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection, accumulated in float32."""
        return jnp.einsum("...h,vh->...v", x, self.weight[...], preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """Normalizes in float32 and casts back before the scale, as HF's Llama/Qwen norms do; with `unit_offset`
    (Gemma) scales by 1 + weight in float32 and casts back after, as HF's Gemma norms do."""

    def __init__(self, features: int, *, eps: float, dtype, unit_offset: bool = False):
        self.weight = nnx.Param(jnp.full((features,), 0.0 if unit_offset else 1.0, dtype))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm in float32, cast back to the input dtype (`bias=False`: no shift, as ModernBERT's norms)."""

    def __init__(self, features: int, *, eps: float, dtype, bias: bool = True):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype)) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            out = out + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    """A Hugging Face `hidden_act` by name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"Activation {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)}).")
    return _ACTIVATIONS[name]


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "ntk")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding as transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py) compute it: `default`;
    `linear` (frequencies divided by `factor`); `dynamic` (NTK: HF grows the base only for sequences longer than
    max_position_embeddings, which jaxserve never serves, so its tables are the default ones); `yarn` (a
    `beta_fast` / `beta_slow` ramp between original and interpolated frequencies, `truncate`, an attention factor
    from `factor` or `mscale` / `mscale_all_dim`); `longrope` (per-frequency `short_factor` / `long_factor`, see
    `max_model_len`, and an attention factor); `llama3` (frequency-dependent scaling of long wavelengths); or `ntk`
    (fixed NTK scaling as gte's `new` models configure it: `factor`, and `mixed_b` for its mixed form).
    `partial_rotary_factor` < 1 rotates only the first dimensions of each head (`rotary_dim`)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    mixed_b: float | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int | None = None
    attention_factor: float | None = None  # yarn / longrope: given, instead of derived from `factor`
    beta_fast: float | None = None  # yarn: None (or 0) is 32, as in HF
    beta_slow: float | None = None  # yarn: None (or 0) is 1
    mscale: float | None = None  # yarn (DeepSeek): with mscale_all_dim, the attention factor's ratio
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range outwards to whole dimensions
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    # longrope: the longest sequence served. HF picks the long factors for a forward pass whose positions run past
    # original_max_position_embeddings (and Phi-3's `generate` recomputes its cache once a sequence does), which a
    # paged cache cannot follow; as vLLM, every position takes the long factors when this (None: the
    # max_position_embeddings) exceeds original_max_position_embeddings, and the short ones otherwise
    max_model_len: int | None = None

    @classmethod
    def from_hf(cls, hf_config, theta: float | None = None, layer_type: str | None = None) -> RopeConfig:
        """From `rope_parameters` / `rope_scaling` (as transformers standardizes them: Phi-3's top-level
        `original_max_position_embeddings` first; a missing yarn / longrope `factor` is max_position_embeddings
        over it); `theta` overrides the base where a family names it otherwise. Parameters given per layer type
        (Gemma 3: `{"full_attention": ..., "sliding_attention": ...}`) are read for `layer_type` (full by default)."""
        params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        if layer_type is not None or set(params) & set(LAYER_TYPES):  # transformers 5's per-layer-type parameters
            params = dict(params.get(layer_type or LAYER_TYPES[0]) or {})
        theta = theta or params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} is not supported yet (supported: {', '.join(ROPE_TYPES)}).")
        fields = {f.name for f in dataclasses.fields(cls)} - {"theta", "rope_type", "max_position_embeddings"}
        values = {k: params[k] for k in fields - {"max_model_len"} if params.get(k) is not None}
        values.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
        max_positions = getattr(hf_config, "max_position_embeddings", None)
        if rope_type in ("llama3", "yarn", "longrope"):
            original = getattr(hf_config, "original_max_position_embeddings", None)
            original = original or values.get("original_max_position_embeddings") or max_positions
            if original:
                values["original_max_position_embeddings"] = int(original)
                if rope_type != "llama3" and "factor" not in values and max_positions:
                    values["factor"] = max_positions / original
        for key in ("short_factor", "long_factor"):
            if key in values:
                values[key] = tuple(float(f) for f in values[key])
        if rope_type == "longrope" and not ("short_factor" in values and "long_factor" in values):
            raise ValueError("RoPE type 'longrope' needs both short_factor and long_factor.")
        values["max_model_len"] = getattr(hf_config, "max_model_len", None)  # set by the generation engine
        return cls(theta=float(theta), rope_type=rope_type, max_position_embeddings=max_positions, **values)

    def rotary_dim(self, head_dim: int) -> int:
        """How many of a head's dimensions rotate, as HF counts them: int(head_dim * partial_rotary_factor)."""
        return int(head_dim * self.partial_rotary_factor)

    @property
    def uses_long_factors(self) -> bool:
        """longrope: whether the long factors serve (see `max_model_len`)."""
        longest = self.max_model_len or self.max_position_embeddings or 0
        return longest > self.original_max_position_embeddings

    @property
    def attention_scaling(self) -> float:
        """What cos and sin are multiplied by: yarn's and longrope's attention factor (HF's `attention_scaling`)."""
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.rope_type == "longrope":
            if self.factor <= 1.0:
                return 1.0
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))

        def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim))
        return yarn_mscale(self.factor)

    def inverse_frequencies(self, rotary_dim: int) -> np.ndarray:
        """[rotary_dim / 2] float32, computed in float32 as HF's init function for the type computes them."""
        exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
        if self.rope_type == "longrope":
            factors = np.asarray(self.long_factor if self.uses_long_factors else self.short_factor, np.float32)
            return (1.0 / (factors * self.theta**exponents)).astype(np.float32)
        theta = self.theta * self.factor if self.rope_type == "ntk" and self.mixed_b is None else self.theta
        if self.rope_type == "dynamic" and self.max_position_embeddings:
            # HF's base for a sequence of max_position_embeddings: the default one, rounding aside
            seq_len = max_positions = self.max_position_embeddings
            theta *= ((self.factor * seq_len / max_positions) - (self.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        inv_freq = 1.0 / (theta**exponents)
        if self.rope_type == "linear":
            return (inv_freq / self.factor).astype(np.float32)
        if self.rope_type == "yarn":
            return self._yarn(theta**exponents, rotary_dim)
        if self.rope_type == "ntk":
            if self.mixed_b is None:
                return (inv_freq / self.factor ** (2 / rotary_dim)).astype(np.float32)
            a = math.log(self.factor) / (rotary_dim / 2) ** self.mixed_b
            return (inv_freq / np.exp(a * np.arange(1, rotary_dim // 2 + 1, dtype=np.float64) ** self.mixed_b)).astype(
                np.float32
            )
        if self.rope_type == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv_freq = np.where(medium, smoothed, scaled)
        return inv_freq.astype(np.float32)

    def _yarn(self, base_powers: np.ndarray, rotary_dim: int) -> np.ndarray:
        """YaRN: original frequencies for dimensions that turn more than `beta_fast` times over the original
        context, interpolated ones (divided by `factor`) under `beta_slow` turns, a linear ramp between."""

        def correction_dim(rotations: float) -> float:
            turns = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return rotary_dim * math.log(turns) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast or 32), correction_dim(self.beta_slow or 1)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        original, interpolated = 1.0 / base_powers, 1.0 / (self.factor * base_powers)
        return (interpolated * (1 - extrapolation) + original * extrapolation).astype(np.float32)

    def cos_sin(self, positions: jax.Array, rotary_dim: int) -> tuple[jax.Array, jax.Array]:
        """The cos/sin tables [T, rotary_dim] of `positions`, attention factor included."""
        return rotary_cos_sin(positions, self.inverse_frequencies(rotary_dim), self.attention_scaling)


LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' `layer_types` names


def rotary_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [T, rotary_dim] in float32 for the rotate-half convention, times `scale` (yarn's and
    longrope's attention factor, `RopeConfig.attention_scaling`, as HF multiplies them)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if scale != 1.0:
        return jnp.cos(emb) * scale, jnp.sin(emb) * scale
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, H, D]; rotate-half RoPE as in HF transformers, in x's dtype. Tables narrower than D (partial rotary,
    [T, R]) rotate the first R dimensions and pass the rest through."""
    if cos.shape[-1] < x.shape[-1]:
        rotary = cos.shape[-1]
        return jnp.concatenate([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin
