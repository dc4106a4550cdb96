"""Parity with HF transformers in float32, for each decoder architecture: logits for chunked prefill and every
decode step over the paged cache, and greedy generation token for token; both again with the Pallas kernels
forced on (run by Pallas' interpreter on CPU)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve import SamplingParams
from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels, kv_cache_shape, select_kernels
from jaxserve.model_source import load_hf_config
from jaxserve.models.batch import RaggedBatch
from jaxserve.models.registry import causal_lm_class, create_causal_lm
from jaxserve.weights import load_weights

from .conftest import DECODERS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a small village by the sea, there lived",
    "1 2 3",
    "café naïve 日本語 and more words to make this prompt the longest of them all by some margin",
]


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, **processors) -> list[list[int]]:
    """HF `generate`, greedy, never stopping early. The model's own generation_config is replaced, since
    `generate` would otherwise merge its defaults (tiny-llama's has a repetition penalty) into ours."""
    model.generation_config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **processors
    )
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        with torch.no_grad():
            outputs.append(model.generate(ids)[0, ids.shape[1] :].tolist())
    return outputs


def jax_model(folder, kernels: Kernels = REFERENCE_KERNELS):
    config = load_hf_config(folder)  # as the engine reads it (InternLM2's remote-code config too)
    skeleton = nnx.eval_shape(lambda: create_causal_lm(config, dtype=jnp.float32, rngs=nnx.Rngs(0), kernels=kernels))
    derive = getattr(causal_lm_class(config), "derived_tensors", None)  # as the engine loads (MoE experts stacked)
    extra = derive(folder, config) if derive else None
    aliases, renames = getattr(skeleton, "CHECKPOINT_ALIASES", {}), getattr(skeleton, "CHECKPOINT_RENAMES", {})
    return load_weights(skeleton, folder, jnp.float32, extra=extra, aliases=aliases, renames=renames, progress=False)


def run_steps(model, token_ids: list[int], chunks: list[int], page_size: int = 16) -> np.ndarray:
    """Feed `token_ids` through the paged model in chunks of the given sizes; logits of every position."""
    num_layers, num_kv_heads, head_dim = model.kv_geometry
    pages_per_seq = 16
    pages = [jnp.zeros(kv_cache_shape(40, page_size, num_kv_heads, head_dim)) for _ in range(num_layers)]
    # scattered, non-contiguous pages, so page-table indirection is exercised
    table = np.array([[37, 2, 21, 9, 30, 14, 5, 26, 11, 33, 0, 18, 7, 24, 3, 39]], np.int32)
    logits, done = [], 0
    for size in chunks:
        padded = 32  # padding tokens ride along in every step
        ids = np.zeros(padded, np.int32)
        ids[:size] = token_ids[done : done + size]
        positions = np.zeros(padded, np.int32)
        positions[:size] = np.arange(done, done + size)
        batch = RaggedBatch(
            token_ids=jnp.asarray(ids),
            positions=jnp.asarray(positions),
            kv_lens=jnp.asarray([done + size, 0], jnp.int32),
            block_table=jnp.asarray(np.concatenate([table, np.zeros((1, pages_per_seq), np.int32)])),
            cu_q_lens=jnp.asarray([0, size, size], jnp.int32),
            num_seqs=jnp.asarray([1], jnp.int32),
        )
        hidden, pages = model(batch, pages)
        logits.append(np.asarray(model.logits(hidden[:size])))
        done += size
    return np.concatenate(logits)


def check_logits_match_hf(folder, kernels: Kernels, atol: float = 2e-5, reference=None) -> None:
    """`atol`: the tolerance, as a fraction of the largest |logit|; `reference`: the folder HF loads, where it is
    not `folder` (a remote-code family's weights as an HF architecture)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPTS[3] + " " + PROMPTS[1]).input_ids
    ids = (ids * 3)[:70]  # 70 tokens: crosses pages, and Mistral's 32-token sliding window
    with torch.no_grad():
        expected = hf_model(reference or folder)(torch.tensor([ids])).logits[0].numpy()
    # a 23-token prefill chunk, a 17-token chunk, then one decode step per token
    got = run_steps(jax_model(folder, kernels), ids, [23, 17] + [1] * 30)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=atol * scale, rtol=0)
    assert expected.std(axis=-1).min() > 1.0  # the logits really differ between tokens


def check_greedy_generation_matches_hf(folder, llm, reference=None) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = hf_greedy(hf_model(reference or folder), tokenizer, PROMPTS, 32)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == expected
    assert len({tuple(e) for e in expected}) == len(PROMPTS)
    for output, tokens in zip(outputs, got):
        # the same text, except that bytes of a character the last token left unfinished are never emitted
        text, whole = output.outputs[0].text, tokenizer.decode(tokens, skip_special_tokens=True)
        assert whole.startswith(text) and set(whole[len(text) :]) <= {"\ufffd"}
        assert output.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("name", DECODERS)
def test_logits_match_hf_for_chunked_prefill_and_decode(tiny_models, name):
    check_logits_match_hf(tiny_models[name], REFERENCE_KERNELS)


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_matches_hf_generate(tiny_models, make_llm, name):
    check_greedy_generation_matches_hf(tiny_models[name], make_llm(tiny_models[name]))


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
# the kernels see grouped-query attention, full and sliding-window (Mistral's layers are both, by position);
# RoPE scalings and Qwen2/3's biases and norms are the model's, around the same kernel calls
@pytest.mark.parametrize("name", ["tiny-mistral"])
def test_pallas_kernels_in_interpret_mode_match_hf(tiny_models, make_llm, name):
    """The same parity with ragged paged attention (and every other kernel) on the Pallas kernels."""
    check_logits_match_hf(tiny_models[name], select_kernels("interpret"))
    llm = make_llm(tiny_models[name], attention_backend="interpret")
    assert llm.engine.kernels.backend == "interpret"
    check_greedy_generation_matches_hf(tiny_models[name], llm)


def test_repetition_penalty_matches_hf(tiny_models, make_llm):
    """vLLM's repetition penalty (prompt and output tokens, divide positive logits, multiply negative ones)
    is HF's RepetitionPenaltyLogitsProcessor."""
    folder = tiny_models["tiny-llama"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = hf_greedy(hf_model(folder), tokenizer, PROMPTS, 24, repetition_penalty=1.8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.8)
    got = [o.outputs[0].token_ids for o in make_llm(folder).generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert got != [o.outputs[0].token_ids for o in make_llm(folder).generate(PROMPTS, plain, use_tqdm=False)]


def test_sliding_window_pages_are_released_and_generation_still_matches_hf(tiny_models, make_llm):
    """tiny-mistral attends within 32 tokens on every layer: generating far past the window, each sequence holds a
    bounded number of pages (those behind the window go back to the pool and are reused by the other sequence),
    and the tokens still equal HF's."""
    folder = tiny_models["tiny-mistral"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = PROMPTS[:2]
    expected = hf_greedy(hf_model(folder), tokenizer, prompts, 200)
    engine = make_llm(folder, num_kv_pages=16).engine  # 2 x 15 pages without release: reuse or preempt
    assert engine.scheduler.config.sliding_window == 32
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), tokenizer(prompt).input_ids, params)
    results, most_held = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        held = [len(s.pages) - s.num_released_pages for s in engine.scheduler.running]
        most_held = max([most_held, *held])
    assert [results[str(i)] for i in range(len(prompts))] == expected
    # 32 tokens of window plus a step's tokens span at most 4 pages of 16 (without release: 15 by the end)
    assert most_held <= 4 and engine.scheduler.num_preemptions == 0
    pool = engine.page_pool
    assert pool.num_free == pool.num_pages and not any(pool.ref_counts)
