"""Whisper (Flax NNX): the encoder (two convolutions, the checkpoint's sinusoidal positions, pre-norm blocks) and
the decoder (learned positions, self-attention over the paged KV cache, cross-attention over the encoder's output),
every size from tiny to large-v3 and large-v3-turbo.

The cross-attention keys and values live in the same paged cache as the self-attention's: a request holds, beside
the pages its decoder tokens fill, `cross_pages(page_size)` pages that `encode` fills once with every decoder
layer's projections of the encoder output. Each decoder step then reads them through the ragged paged attention
kernel, non-causally and without writing:

    model.encode(features [B, mels, 2 * frames], cross_slots [B, frames], kv_pages) -> kv_pages'
    model(batch: EncoderDecoderBatch, kv_pages) -> (hidden [T, d], kv_pages')
    model.logits(hidden_rows) -> [R, V] float32
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels
from jaxserve.kernels_pallas.ragged_paged_attention import padded_to_cache, write_kv_pages

from .batch import EncoderDecoderBatch
from .layers import Embedding, LayerNorm, Linear, activation


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    vocab_size: int
    d_model: int
    encoder_layers: int
    encoder_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_heads: int
    decoder_ffn_dim: int
    num_mel_bins: int
    max_source_positions: int  # encoder frames after the stride-2 convolution (1500 for 30 s)
    max_target_positions: int  # decoder positions (448)
    activation: str = "gelu"
    kernels: Kernels = REFERENCE_KERNELS

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_heads

    @property
    def max_tokens(self) -> int:
        return self.max_target_positions

    def cross_pages(self, page_size: int) -> int:
        """Cache pages that hold one request's cross-attention keys and values."""
        return -(-self.max_source_positions // page_size)

    @classmethod
    def from_hf(cls, hf, kernels: Kernels = REFERENCE_KERNELS) -> WhisperConfig:
        if hf.d_model % hf.decoder_attention_heads or hf.d_model % hf.encoder_attention_heads:
            raise ValueError(f"Whisper: d_model {hf.d_model} is not a multiple of the attention heads.")
        return cls(
            vocab_size=hf.vocab_size,
            d_model=hf.d_model,
            encoder_layers=hf.encoder_layers,
            encoder_heads=hf.encoder_attention_heads,
            encoder_ffn_dim=hf.encoder_ffn_dim,
            decoder_layers=hf.decoder_layers,
            decoder_heads=hf.decoder_attention_heads,
            decoder_ffn_dim=hf.decoder_ffn_dim,
            num_mel_bins=hf.num_mel_bins,
            max_source_positions=hf.max_source_positions,
            max_target_positions=hf.max_target_positions,
            activation=hf.activation_function,
            kernels=kernels,
        )


class Conv1d(nnx.Module):
    """HF's `nn.Conv1d` layout: weight [out, in, width], inputs [B, in, L]."""

    def __init__(self, in_channels: int, out_channels: int, width: int, *, stride: int, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (out_channels, in_channels, width), dtype) * 0.02)
        self.bias = nnx.Param(jnp.zeros((out_channels,), dtype))
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.weight.shape[-1]
        y = jax.lax.conv_general_dilated(
            x, self.weight[...], (self.stride,), [(width // 2, width // 2)], dimension_numbers=("NCH", "OIH", "NCH")
        )
        return y + self.bias[...][:, None]


class WhisperAttention(nnx.Module):
    """Q, K, V and output projections (K without a bias, as Whisper's)."""

    def __init__(self, d_model: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = Linear(d_model, d_model, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.k_proj = Linear(d_model, d_model, bias=False, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.v_proj = Linear(d_model, d_model, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.out_proj = Linear(d_model, d_model, bias=True, dtype=dtype, rngs=rngs, axes=(None, "heads"))

    def split(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def output(self, attended: jax.Array) -> jax.Array:
        return self.out_proj(attended.reshape(*attended.shape[:-2], -1))


class FeedForward(nnx.Module):
    """The `final_layer_norm`, `fc1`, activation, `fc2` block of both stacks, under HF's names (on the layer)."""

    def __init__(self, cfg: WhisperConfig, ffn_dim: int, *, dtype, rngs: nnx.Rngs):
        self.final_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, dtype=dtype)
        self.fc1 = Linear(cfg.d_model, ffn_dim, bias=True, dtype=dtype, rngs=rngs, axes=("mlp", None))
        self.fc2 = Linear(ffn_dim, cfg.d_model, bias=True, dtype=dtype, rngs=rngs, axes=(None, "mlp"))
        self.act = activation(cfg.activation)

    def feed_forward(self, x: jax.Array) -> jax.Array:
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class EncoderLayer(FeedForward):
    def __init__(self, cfg: WhisperConfig, *, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.encoder_ffn_dim, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, dtype=dtype)
        self.self_attn = WhisperAttention(cfg.d_model, cfg.encoder_heads, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cu_seqlens: jax.Array, num_seqs: jax.Array) -> jax.Array:
        """x [B * frames, d]: each audio attends within its own frames."""
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        q, (k, v) = attn.split(attn.q_proj(h)), attn.key_value(h)
        out = self.cfg.kernels.varlen_attention(
            q, k, v, cu_seqlens, num_seqs, sm_scale=attn.head_dim**-0.5, causal=False
        )
        return self.feed_forward(x + attn.output(out))


class WhisperEncoder(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, dtype, rngs: nnx.Rngs):
        self.conv1 = Conv1d(cfg.num_mel_bins, cfg.d_model, 3, stride=1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv1d(cfg.d_model, cfg.d_model, 3, stride=2, dtype=dtype, rngs=rngs)
        self.embed_positions = Embedding(cfg.max_source_positions, cfg.d_model, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.encoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, eps=1e-5, dtype=dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, mels, 2 * frames] -> hidden states [B, frames, d]."""
        x = jax.nn.gelu(self.conv1(features.astype(self.conv1.weight.dtype)), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False).transpose(0, 2, 1)
        batch, frames, d = x.shape
        x = (x + self.embed_positions.weight[...][:frames]).reshape(batch * frames, d)
        cu_seqlens = jnp.arange(batch + 1, dtype=jnp.int32) * frames
        num_seqs = jnp.array([batch], jnp.int32)
        for layer in self.layers:
            x = layer(x, cu_seqlens, num_seqs)
        return self.layer_norm(x).reshape(batch, frames, d)


class DecoderLayer(FeedForward):
    def __init__(self, cfg: WhisperConfig, *, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.decoder_ffn_dim, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, dtype=dtype)
        self.self_attn = WhisperAttention(cfg.d_model, cfg.decoder_heads, dtype=dtype, rngs=rngs)
        self.encoder_attn_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, dtype=dtype)
        self.encoder_attn = WhisperAttention(cfg.d_model, cfg.decoder_heads, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, batch: EncoderDecoderBatch, kv_pages: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernels, sm_scale = self.cfg.kernels, self.cfg.head_dim**-0.5
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        q, (k, v) = attn.split(attn.q_proj(h)), attn.key_value(h)
        out, kv_pages = kernels.ragged_paged_attention(
            q, k, v, kv_pages, batch.kv_lens, batch.block_table, batch.cu_q_lens, batch.num_seqs, sm_scale=sm_scale
        )
        x = x + attn.output(out)
        cross = self.encoder_attn
        q = cross.split(cross.q_proj(self.encoder_attn_layer_norm(x)))
        out, _ = kernels.ragged_paged_attention(
            q, None, None, kv_pages, batch.cross_kv_lens, batch.cross_block_table, batch.cu_q_lens, batch.num_seqs,
            sm_scale=sm_scale, causal=False,
        )  # fmt: skip
        return self.feed_forward(x + cross.output(out)), kv_pages


class WhisperDecoder(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs, axis="vocab")
        self.embed_positions = Embedding(cfg.max_target_positions, cfg.d_model, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.decoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, eps=1e-5, dtype=dtype)

    def __call__(self, batch: EncoderDecoderBatch, kv_pages: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        x = self.embed_tokens(batch.token_ids) + self.embed_positions(batch.positions)
        new_pages = []
        for layer, pages in zip(self.layers, kv_pages):
            x, pages = layer(x, batch, pages)
            new_pages.append(pages)
        return self.layer_norm(x), new_pages


class WhisperModel(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, dtype, rngs: nnx.Rngs):
        self.encoder = WhisperEncoder(cfg, dtype=dtype, rngs=rngs)
        self.decoder = WhisperDecoder(cfg, dtype=dtype, rngs=rngs)


class WhisperForConditionalGeneration(nnx.Module):
    """Whisper's speech-to-text model; the output projection is the decoder's token embedding (tied, as every
    Whisper checkpoint is: `proj_out.weight` is never read)."""

    def __init__(self, cfg: WhisperConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = WhisperModel(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> WhisperForConditionalGeneration:
        return cls(WhisperConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    @property
    def kv_geometry(self) -> tuple[int, int, int]:
        """(layers, KV heads, head_dim) of the decoder: what the paged cache must hold."""
        return self.cfg.decoder_layers, self.cfg.decoder_heads, self.cfg.head_dim

    @property
    def encoder_geometry(self) -> tuple[tuple[int, int], int]:
        """(the shape of one encoder input: [mels, 2 * frames], the encoder's output frames)."""
        frames = self.cfg.max_source_positions
        return (self.cfg.num_mel_bins, 2 * frames), frames

    def encode(self, features: jax.Array, cross_slots: jax.Array, kv_pages: list[jax.Array]) -> list[jax.Array]:
        """Run the encoder over `features` [B, mels, 2 * frames] and write every decoder layer's cross-attention
        keys and values into the cache at `cross_slots` [B, frames] (flat `page * page_size + offset`; rows of
        padding carry out-of-range slots and are dropped)."""
        hidden = self.model.encoder(features)
        slots = cross_slots.reshape(-1)
        new_pages = []
        for layer, pages in zip(self.model.decoder.layers, kv_pages):
            k, v = layer.encoder_attn.key_value(hidden)
            k, v = k.reshape(slots.shape[0], *k.shape[2:]), v.reshape(slots.shape[0], *v.shape[2:])
            _, k, v = padded_to_cache(k, k, v, pages.shape[-1])
            new_pages.append(write_kv_pages(pages, k, v, slots))
        return new_pages

    def __call__(self, batch: EncoderDecoderBatch, kv_pages: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        """(hidden [T, d], the updated pages) of a ragged decoder step over the cache."""
        return self.model.decoder(batch, kv_pages)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.model.decoder.embed_tokens.attend(hidden)
