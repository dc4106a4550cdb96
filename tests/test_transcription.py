"""Whisper through the generation engine, on the real tiny.en (the embedded default, converted from its CTranslate2
folder): the offline API transcribes the espeak-ng fixtures with the tokens HF's `generate` picks on the same
weights (with and without timestamps), with sequences preempted for want of pages on the way (their cross pages
freed, their audio encoded again), and a word error rate within 20%; `allowed_token_ids` limits what is sampled. Then the same model behind a real server, through the official `openai` client: every response format,
streamed text equal to whole, and 70 s of speech split into three windows and joined."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jiwer
import numpy as np
import openai
import pytest
import soundfile as sf

from jaxserve import SamplingParams
from jaxserve.async_engine import AsyncEngine
from jaxserve.audio import decode_audio, log_mel_spectrogram
from jaxserve.model_source import resolve_model
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel
from jaxserve.server.settings import ServerSettings
from scripts.make_speech_fixtures import long_speech

from .conftest import TINY_ENGINE

pytestmark = pytest.mark.optimized  # Whisper decodes for long: its programs are compiled with optimizations

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures" / "speech"
TRANSCRIPTS = json.loads((FIXTURES / "transcripts.json").read_text())
PROMPT = "<|startoftranscript|><|notimestamps|>"
GREEDY = SamplingParams(temperature=0, max_tokens=120)
# tiny.en's 94 cross pages per sequence (1500 frames of 16-token pages), twice, and 3 pages for the decoders: two
# sequences run at once, and one is preempted when their transcripts outgrow those 3 pages
CROSS_PAGES = 94
WHISPER_ENGINE = dict(TINY_ENGINE, max_num_seqs=4, min_token_rung=16, num_kv_pages=2 * CROSS_PAGES + 3)


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


def test_tiny_en_transcribes_as_hf_generate_through_preemption(tiny_en, clips, llm_cache):
    """The transcripts equal HF's although sequences were preempted (their pages, cross pages included, given back)
    and later admitted again and encoded anew."""
    llm = llm_cache(tiny_en, WHISPER_ENGINE)
    got = transcribe(llm, clips)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.page_pool.num_free == 2 * CROSS_PAGES + 3
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


def test_allowed_token_ids_limit_the_samples(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"])
    allowed = [5, 17, 42]
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=20, ignore_eos=True, allowed_token_ids=allowed)
    output = llm.generate(["The quick brown fox"], params, use_tqdm=False)[0].outputs[0]
    assert set(output.token_ids) <= set(allowed) and len(set(output.token_ids)) > 1
    with pytest.raises(ValueError, match="out-of-vocab"):
        llm.generate(["x"], SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)


def test_generation_config_suppress_tokens_as_hf_generate_applies_them(tiny_models, make_llm):
    """generation_config.json's `begin_suppress_tokens` keep a token out of the first output only, its
    `suppress_tokens` out of every output (Whisper's rules, applied to any model as HF's `generate` does)."""
    folder, params = tiny_models["tiny-llama"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = make_llm(folder).generate(["1 2 3"], params, use_tqdm=False)[0].outputs[0].token_ids
    first, repeated = plain[0], max(set(plain), key=plain.count)
    begin = make_llm(folder, override_generation_config={"begin_suppress_tokens": [first]})
    assert begin.generate(["1 2 3"], params, use_tqdm=False)[0].outputs[0].token_ids[0] != first
    never = make_llm(folder, override_generation_config={"suppress_tokens": [repeated]})
    assert repeated not in never.generate(["1 2 3"], params, use_tqdm=False)[0].outputs[0].token_ids


# --- over HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_en, llm_cache):
    engine = AsyncEngine(llm_cache(tiny_en, WHISPER_ENGINE).engine)
    served = [ServedModel.from_engine(["whisper"], str(tiny_en), engine, "auto")]
    with background_server(served, ServerSettings(max_num_queued_reqs=None)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    engine.shutdown()


def wer(expected: str, got: str) -> float:
    return jiwer.wer(expected.lower(), got.lower().strip())


def test_every_response_format_over_http(client):
    hello = (FIXTURES / "hello.wav").read_bytes()
    expected = TRANSCRIPTS["hello.wav"]

    def create(fmt: str, **extra):
        return client.audio.transcriptions.create(
            model="whisper", file=("hello.wav", hello), response_format=fmt, **extra
        )

    whole = create("json")
    assert wer(expected, whole.text) <= 0.2 and whole.usage.seconds == 4
    assert create("text").strip() == whole.text.strip()
    verbose = create("verbose_json")
    assert verbose.language == "english" and verbose.duration == pytest.approx(3.84, abs=0.01)
    assert wer(expected, verbose.text) <= 0.2
    times = [(s.start, s.end) for s in verbose.segments]
    assert times and all(0 <= a < b <= 3.9 for a, b in times) and times == sorted(times)
    srt, vtt = create("srt"), create("vtt")
    assert srt.startswith("1\n00:00:00,000 --> ") and vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")
    assert all(verbose.segments[0].text.strip() in subtitles for subtitles in (srt, vtt))
    streamed = "".join(chunk.choices[0]["delta"]["content"] for chunk in create("json", stream=True) if chunk.choices)
    assert streamed.strip() == whole.text.strip()
    translated = client.audio.translations.create(model="whisper", file=("hello.wav", hello))
    assert translated.text.strip() == whole.text.strip()  # English-only: its transcript


def test_silence_transcribes_as_nothing(client):
    """Silence (and a faint hiss under -60 dBFS) gives an empty text, not tiny.en's hallucinated " you"."""
    for audio in (np.zeros(3 * 16000, np.float32), np.random.default_rng(0).normal(0, 3e-4, 3 * 16000)):
        upload = io.BytesIO()
        sf.write(upload, audio, 16000, format="WAV", subtype="FLOAT")
        result = client.audio.transcriptions.create(model="whisper", file=("quiet.wav", upload.getvalue()))
        assert result.text == "" and result.usage.seconds == 3


def test_seventy_seconds_split_transcribed_and_joined(client):
    audio, text = long_speech()
    upload = io.BytesIO()
    sf.write(upload, audio, 16000, format="WAV")
    result = client.audio.transcriptions.create(model="whisper", file=("long.wav", upload.getvalue()))
    assert wer(text, result.text) <= 0.2 and result.usage.seconds == 70
