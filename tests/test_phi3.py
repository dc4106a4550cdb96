"""Phi-3 (and yarn RoPE on Llama) against HF transformers in float32: logits over the paged cache (prefill chunks
and decode steps, across the 48-token sliding window), greedy generation, the Pallas kernels.

tiny-phi3's longrope switches at 32 positions (`original_max_position_embeddings`). HF picks the long factors for
a forward pass whose positions run past 32 (and `Phi3ForCausalLM.generate` recomputes its cache when a sequence
first does); jaxserve, as vLLM, serves every position with the long factors when its longest sequence
(`RopeConfig.max_model_len`, by default max_position_embeddings: 256) runs past 32. So HF is run on sequences
longer than 32 tokens, and the short factors are checked with a model built for 32 positions."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve import SamplingParams
from jaxserve.kernels_pallas import REFERENCE_KERNELS, select_kernels
from jaxserve.models.llama import DecoderConfig, LlamaForCausalLM
from jaxserve.weights import load_weights

from .test_hf_parity import PROMPTS, check_logits_match_hf, hf_greedy, hf_model, run_steps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ORIGINAL_POSITIONS = 32  # tiny-phi3's original_max_position_embeddings
# every prompt longer than ORIGINAL_POSITIONS tokens, so that HF's generate runs on the long factors throughout
LONG_PROMPTS = [f"{prompt} {PROMPTS[3]}" for prompt in PROMPTS]


def test_logits_match_hf_for_chunked_prefill_and_decode(tiny_models):
    """70 tokens: HF takes the long factors, and the attention factor sqrt(1 + ln 8 / ln 32), for all of them."""
    check_logits_match_hf(tiny_models["tiny-phi3"], REFERENCE_KERNELS)


def test_short_factors_below_the_original_length(tiny_models):
    """A model served for at most 32 positions takes the short factors, as HF does for a 32-token pass; and they
    differ from the long ones."""
    folder = tiny_models["tiny-phi3"]
    config = transformers.AutoConfig.from_pretrained(folder)
    cfg = DecoderConfig.from_hf(config)
    assert cfg.rotary_dim == 12 and cfg.rope.uses_long_factors
    cfg = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, max_model_len=ORIGINAL_POSITIONS))
    assert not cfg.rope.uses_long_factors
    skeleton = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    model = load_weights(skeleton, folder, jnp.float32, progress=False)

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = (tokenizer(PROMPTS[1] + " " + PROMPTS[3]).input_ids * 2)[:70]
    hf = hf_model(folder)
    with torch.no_grad():
        short = hf(torch.tensor([ids[:ORIGINAL_POSITIONS]])).logits[0].numpy()
        long = hf(torch.tensor([ids])).logits[0, :ORIGINAL_POSITIONS].numpy()
    got = run_steps(model, ids[:ORIGINAL_POSITIONS], [13, 9] + [1] * 10)
    scale = np.abs(short).max()
    np.testing.assert_allclose(got, short, atol=2e-5 * scale, rtol=0)
    assert np.abs(long - short).max() > 0.05 * scale  # the long factors change the same positions' logits


def test_greedy_generation_matches_hf_generate(tiny_models, make_llm):
    folder = tiny_models["tiny-phi3"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert min(len(tokenizer(p).input_ids) for p in LONG_PROMPTS) > ORIGINAL_POSITIONS
    expected = hf_greedy(hf_model(folder), tokenizer, LONG_PROMPTS, 32)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = make_llm(folder, max_num_seqs=4, max_num_batched_tokens=32)  # few buckets: a quick compile
    got = [o.outputs[0].token_ids for o in llm.generate(LONG_PROMPTS, params, use_tqdm=False)]
    assert got == expected
    assert len({tuple(e) for e in expected}) == len(LONG_PROMPTS)


def test_yarn_logits_match_hf(tiny_models):
    """tiny-llama-yarn: yarn's ramped frequencies and its attention factor 1 + 0.1 ln 4 through the paged cache."""
    check_logits_match_hf(tiny_models["tiny-llama-yarn"], REFERENCE_KERNELS)


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
def test_pallas_kernels_in_interpret_mode_match_hf(tiny_models):
    """Partial rotary, the attention factor and the sliding window through ragged paged attention's Pallas kernel."""
    check_logits_match_hf(tiny_models["tiny-phi3"], select_kernels("interpret"))
