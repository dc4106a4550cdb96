"""Whisper through the generation engine, on the real tiny.en (the embedded default, converted from its CTranslate2
folder): the offline API transcribes the espeak-ng fixtures with the tokens HF's `generate` picks on the same
weights and a word error rate within 20%; sequences preempted for want of pages (their cross pages freed, their
audio encoded again) give the same transcripts; `allowed_token_ids` limits what is sampled."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.audio import decode_audio, log_mel_spectrogram
from jaxserve.model_source import resolve_model

from .conftest import TINY_ENGINE

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures" / "speech"
TRANSCRIPTS = json.loads((FIXTURES / "transcripts.json").read_text())
PROMPT = "<|startoftranscript|><|notimestamps|>"
GREEDY = SamplingParams(temperature=0, max_tokens=120)
# tiny.en's 94 cross pages per sequence (1500 frames of 16-token pages) beside its decoder's
WHISPER_ENGINE = dict(TINY_ENGINE, max_num_seqs=4, num_kv_pages=4 * 98)


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    return resolve_model("openai/whisper-tiny.en")


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {name: decode_audio((FIXTURES / name).read_bytes(), name) for name in TRANSCRIPTS}


def transcribe(llm, clips: dict[str, np.ndarray]) -> dict[str, list[int]]:
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"audio": (audio, 16000)}} for audio in clips.values()]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return {name: output.outputs[0].token_ids for name, output in zip(clips, outputs)}


def test_tiny_en_transcribes_as_hf_generate(tiny_en, clips, llm_cache):
    llm = llm_cache(tiny_en, WHISPER_ENGINE)
    got = transcribe(llm, clips)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_en, dtype=torch.float32).eval()
    tokenizer = llm.engine.tokenizer.hf
    for name, audio in clips.items():
        features = torch.from_numpy(log_mel_spectrogram(audio))[None]
        with torch.no_grad():  # the sampled tokens: transformers 5 returns neither the decoder prompt nor the EOT
            expected = model.generate(features, max_new_tokens=120)[0].tolist()
        assert got[name] == [*expected, tokenizer.eos_token_id], name
    texts = [tokenizer.decode(got[name], skip_special_tokens=True).strip() for name in clips]
    error_rate = jiwer.wer([TRANSCRIPTS[name].lower() for name in clips], [t.lower() for t in texts])
    assert error_rate <= 0.2, (error_rate, texts)


def test_timestamps_follow_whisper_rules_as_hf_generate(tiny_en, clips, llm_cache):
    """With `return_timestamps` (and a prompt without <|notimestamps|>), the same tokens as HF's
    `generate(return_timestamps=True)`: segments opened and closed by timestamps that never go back."""
    llm = llm_cache(tiny_en, WHISPER_ENGINE)
    audio = clips["story.wav"]
    prompt = {"prompt": "<|startoftranscript|>", "multi_modal_data": {"audio": (audio, 16000)}}
    params = SamplingParams(temperature=0, max_tokens=200, return_timestamps=True)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_en, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(
            torch.from_numpy(log_mel_spectrogram(audio))[None], return_timestamps=True, max_new_tokens=200
        )[0].tolist()
    assert got == [*expected, llm.engine.tokenizer.hf.eos_token_id]
    begin = llm.engine.timestamp_rules.timestamp_begin
    stamps = [t for t in got if t >= begin]
    assert len(stamps) >= 6 and stamps == sorted(stamps)  # several segments, in order


def test_preempted_transcriptions_are_encoded_again_and_equal(tiny_en, clips, llm_cache):
    """Two sequences' cross pages fill the cache but for 3 pages: decoding, one is preempted (its pages, cross
    pages included, go back), and is later admitted again and encoded anew."""
    whole = transcribe(llm_cache(tiny_en, WHISPER_ENGINE), clips)
    tight = llm_cache(tiny_en, WHISPER_ENGINE, num_kv_pages=2 * 94 + 3)
    assert transcribe(tight, clips) == whole
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.page_pool.num_free == 2 * 94 + 3


def test_allowed_token_ids_limit_the_samples(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"])
    allowed = [5, 17, 42]
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=20, ignore_eos=True, allowed_token_ids=allowed)
    output = llm.generate(["The quick brown fox"], params, use_tqdm=False)[0].outputs[0]
    assert set(output.token_ids) <= set(allowed) and len(set(output.token_ids)) > 1
    with pytest.raises(ValueError, match="out-of-vocab"):
        llm.generate(["x"], SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)
