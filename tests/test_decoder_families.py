"""Granite (its embedding, attention, residual and logit multipliers), OLMo 2 (norms after each block, Q/K norms
over the whole projection), SmolLM3 (a layer without RoPE), InternLM2 (its names and grouped `wqkv`; remote code on
the Hub, so compared with its weights unpacked into HF's Llama) and a Gemma 3 multimodal checkpoint served as its
text model, against HF transformers in float32: logits over chunked prefill and decode on scattered pages, and
greedy generation through the engine; the logits again on the Pallas kernels (Pallas' interpreter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxserve.kernels_pallas import REFERENCE_KERNELS, select_kernels
from scripts.make_test_models import internlm2_llama_twin

from .test_hf_parity import check_greedy_generation_matches_hf, check_logits_match_hf

pytest.importorskip("torch")
pytest.importorskip("transformers")

FAMILIES = ["tiny-granite", "tiny-olmo2", "tiny-smollm3", "tiny-internlm2"]


@pytest.fixture(scope="module")
def references(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The folder HF loads for each test model: its own, or for InternLM2 a Llama twin."""
    twin = internlm2_llama_twin(tiny_models["tiny-internlm2"], tmp_path_factory.mktemp("internlm2-as-llama"))
    return {name: folder for name, folder in tiny_models.items()} | {"tiny-internlm2": twin}


@pytest.mark.parametrize("name", [*FAMILIES, "tiny-gemma3-mm"])
def test_logits_match_hf_for_chunked_prefill_and_decode(tiny_models, references, name):
    check_logits_match_hf(tiny_models[name], REFERENCE_KERNELS, reference=references[name])


@pytest.mark.parametrize("name", [*FAMILIES, "tiny-gemma3-mm"])
def test_greedy_generation_matches_hf_generate(tiny_models, references, make_llm, name):
    check_greedy_generation_matches_hf(tiny_models[name], make_llm(tiny_models[name]), reference=references[name])


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
@pytest.mark.parametrize("name", FAMILIES)
def test_pallas_kernels_in_interpret_mode_match_hf(tiny_models, references, name):
    check_logits_match_hf(tiny_models[name], select_kernels("interpret"), reference=references[name])
