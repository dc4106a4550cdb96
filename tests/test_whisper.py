"""Whisper against HF `WhisperForConditionalGeneration` in float32 on a tiny random-weight model: the encoder's
outputs, and the decoder's logits over a 4-token prompt and 30 decode steps on scattered cache pages, with the
cross-attention read from the pages `encode` filled (two audios at once, so a sequence reading another's pages
would show); again on the Pallas kernels (Pallas' interpreter)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels, kv_cache_shape, select_kernels
from jaxserve.models.batch import EncoderDecoderBatch
from jaxserve.models.whisper import WhisperForConditionalGeneration
from jaxserve.weights import load_weights
from scripts.make_test_models import _init_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAGE_SIZE = 16
NUM_PAGES = 256


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    config = transformers.WhisperConfig(
        vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(config).to(torch.float32).eval()
    _init_weights(model, seed=41)
    folder = tmp_path_factory.mktemp("tiny-whisper")
    model.save_pretrained(folder)
    return folder, model


def jax_whisper(folder, kernels: Kernels) -> WhisperForConditionalGeneration:
    config = transformers.AutoConfig.from_pretrained(folder)
    skeleton = nnx.eval_shape(
        lambda: WhisperForConditionalGeneration.from_hf_config(
            config, dtype=jnp.float32, rngs=nnx.Rngs(0), kernels=kernels
        )
    )
    return load_weights(skeleton, folder, jnp.float32, progress=False)


def features(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 80, 3000)).astype(np.float32)


def test_encoder_matches_hf(tiny_whisper):
    folder, hf = tiny_whisper
    mels = features(0)
    with torch.no_grad():
        expected = hf.model.encoder(torch.from_numpy(mels)).last_hidden_state.numpy()
    got = np.asarray(jax_whisper(folder, REFERENCE_KERNELS).model.encoder(jnp.asarray(mels)))
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # the two audios encode differently


def decode_steps(model, mels: np.ndarray, tokens: np.ndarray, chunks: list[int]) -> np.ndarray:
    """Encode both audios into cross pages, then feed each sequence's tokens in `chunks` (both sequences in every
    step, on scattered pages); the logits of every position [2, n, V]."""
    num_layers, heads, head_dim = model.kv_geometry
    pages = [jnp.zeros(kv_cache_shape(NUM_PAGES, PAGE_SIZE, heads, head_dim)) for _ in range(num_layers)]
    cross_pages = model.cfg.cross_pages(PAGE_SIZE)
    order = np.random.default_rng(1).permutation(NUM_PAGES).astype(np.int32)
    cross_table = order[: 2 * cross_pages].reshape(2, cross_pages)
    self_table = order[2 * cross_pages : 2 * cross_pages + 8].reshape(2, 4)
    frames = model.cfg.max_source_positions
    offsets = np.arange(frames)
    slots = cross_table[:, offsets // PAGE_SIZE] * PAGE_SIZE + offsets % PAGE_SIZE
    pages = model.encode(jnp.asarray(mels), jnp.asarray(slots), pages)
    logits, done = [], 0
    for size in chunks:
        ids = np.zeros(2 * size + 5, np.int32)  # padding tokens ride along
        ids[: 2 * size] = tokens[:, done : done + size].reshape(-1)
        positions = np.zeros_like(ids)
        positions[: 2 * size] = np.tile(np.arange(done, done + size), 2)
        batch = EncoderDecoderBatch(
            token_ids=jnp.asarray(ids),
            positions=jnp.asarray(positions),
            kv_lens=jnp.asarray([done + size] * 2 + [0], jnp.int32),
            block_table=jnp.asarray(np.concatenate([self_table, np.zeros((1, 4), np.int32)])),
            cu_q_lens=jnp.asarray([0, size, 2 * size, 2 * size], jnp.int32),
            num_seqs=jnp.asarray([2], jnp.int32),
            cross_kv_lens=jnp.asarray([frames, frames, 0], jnp.int32),
            cross_block_table=jnp.asarray(np.concatenate([cross_table, np.zeros((1, cross_pages), np.int32)])),
        )
        hidden, pages = model(batch, pages)
        logits.append(np.asarray(model.logits(hidden[: 2 * size])).reshape(2, size, -1))
        done += size
    return np.concatenate(logits, axis=1)


def check_decoder_logits_match_hf(tiny_whisper, kernels: Kernels) -> None:
    folder, hf = tiny_whisper
    mels = features(2)
    tokens = np.random.default_rng(3).integers(1, 320, size=(2, 34)).astype(np.int32)
    with torch.no_grad():
        expected = hf(input_features=torch.from_numpy(mels), decoder_input_ids=torch.from_numpy(tokens).long())
    expected = expected.logits.numpy()
    got = decode_steps(jax_whisper(folder, kernels), mels, tokens, [4] + [1] * 30)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    assert expected.std(axis=-1).min() > 1.0
    assert np.abs(expected[0] - expected[1]).max() > 1.0  # each sequence reads its own audio


def test_decoder_logits_match_hf_over_prompt_and_30_steps(tiny_whisper):
    check_decoder_logits_match_hf(tiny_whisper, REFERENCE_KERNELS)


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
def test_pallas_kernels_in_interpret_mode_match_hf(tiny_whisper):
    check_decoder_logits_match_hf(tiny_whisper, select_kernels("interpret"))
