"""Whisper's speech-to-text front end: from an upload to the engine's inputs, and from its tokens to text, segments
and subtitles. The server's `/v1/audio/transcriptions` and `/v1/audio/translations` (server/speech.py) run it; no
JAX here, since the server imports it.

The decoder prompt is Whisper's own: `<|startoftranscript|>`, the language and the task, `<|notimestamps|>`, with a
request's `prompt` before it as `<|startofprev|>` and the prompt's last 223 tokens (openai-whisper's cut, half the
448-token context less one). English-only models (`.en`) take `<|startoftranscript|><|notimestamps|>`, as
openai-whisper and HF's `generate` prompt them: they were trained without language and task tokens. A multilingual
model told no language detects it with one engine call (vLLM's): the prompt `<|startoftranscript|>`, one greedy
token among the language tokens.

Audio longer than 30 s is split where vLLM splits it (`audio.split_audio`); each chunk is its own engine request,
except a silent one (under -60 dBFS), which is not transcribed at all, since Whisper hallucinates words in silence.
The chunk texts are stripped and joined by a space (nothing for Japanese and Chinese, vLLM's
`asr_inter_chunk_separator`). At temperature 0 a whole (not streamed) response falls back as openai-whisper does:
a window whose text repeats itself or whose tokens are unlikely is decoded again at 0.2, 0.4, ... 1.0 until one
passes (`FALLBACK_TEMPERATURES`). The formats made of segments (verbose_json, srt, vtt) decode with timestamps: the
prompt leaves out `<|notimestamps|>`, the engine samples by Whisper's timestamp rules (`return_timestamps`), and each
pair of timestamp tokens (20 ms steps from the chunk's start) bounds a segment, as openai-whisper reads them. A
segment carries its window's mean logprob and zlib compression ratio (openai-whisper's); `no_speech_prob` is 0.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from .audio import HOP_LENGTH, SAMPLE_RATE, decode_audio, log_mel_spectrogram, split_audio
from .outputs import CompletionOutput
from .sampling_params import RequestOutputKind, SamplingParams
from .tokenizer import Tokenizer

Task = Literal["transcribe", "translate"]

PROMPT_TOKENS_KEPT = 223  # openai-whisper keeps the last n_ctx // 2 - 1 prompt tokens after <|startofprev|>
NO_SPACE_LANGUAGES = frozenset({"ja", "zh"})  # vLLM's SupportsTranscription.no_space_languages: chunks joined by ""
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # log-mel frames a second: the unit of `seek` and of audio "tokens"
TIME_PRECISION = 0.02  # seconds between consecutive timestamp tokens
SILENCE_DBFS = -60.0  # a chunk quieter than this (RMS, dB below full scale) is silence
# openai-whisper's temperature fallback: a greedy window whose text compresses too well (repetition) or whose
# tokens are too unlikely is decoded again at each of these temperatures in turn, until one passes
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0


class UnsupportedLanguageError(ValueError):
    """A `language` the model does not take; `param` names the request field (a 400 at the server)."""

    param = "language"


class SpeechModel(BaseModel):
    """What the speech endpoints need to know of a Whisper model: its special tokens, the languages it takes (code →
    language token) and its log-mel width. Built from the tokenizer and generation_config.json, as HF's `generate`
    reads them."""

    model_config = ConfigDict(frozen=True)

    start_of_transcript: int
    start_of_prev: int
    no_timestamps: int
    end_of_text: int
    tasks: dict[str, int]  # "transcribe" / "translate" → task token
    languages: dict[str, int]  # ISO-639-1 code → language token; only "en" on an English-only model
    multilingual: bool
    num_mel_bins: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, generation_config: Mapping[str, Any], hf_config: Any) -> SpeechModel:
        """Read from generation_config.json where it says (HF's keys), else from the tokenizer's special tokens."""
        hf = tokenizer.hf

        def token(name: str, key: str | None = None) -> int:
            if key is not None and generation_config.get(key) is not None:
                return int(generation_config[key])
            token_id = hf.convert_tokens_to_ids(name)
            if token_id is None or (token_id == hf.unk_token_id and name != hf.unk_token):
                raise ValueError(f"The tokenizer has no {name} token: not a Whisper tokenizer.")
            return token_id

        lang_to_id = generation_config.get("lang_to_id") or {}
        multilingual = bool(generation_config.get("is_multilingual", bool(lang_to_id)))
        if multilingual:
            languages = {name.strip("<|>"): int(token_id) for name, token_id in lang_to_id.items()}
        else:
            languages = {"en": token("<|en|>")}
        task_to_id = generation_config.get("task_to_id") or {}
        tasks = {task: int(task_to_id[task]) if task in task_to_id else token(f"<|{task}|>") for task in get_args(Task)}
        return cls(
            start_of_transcript=token("<|startoftranscript|>", "decoder_start_token_id"),
            start_of_prev=token("<|startofprev|>", "prev_sot_token_id"),
            no_timestamps=token("<|notimestamps|>", "no_timestamps_token_id"),
            end_of_text=token("<|endoftext|>"),
            tasks=tasks,
            languages=languages,
            multilingual=multilingual,
            num_mel_bins=int(getattr(hf_config, "num_mel_bins", 80)),
        )

    def check_language(self, language: str | None) -> str | None:
        """The request's `language` if the model takes it (None: to be detected, or English on an English-only
        model); UnsupportedLanguageError otherwise, in vLLM's words."""
        if language is None or language in self.languages:
            return language
        raise UnsupportedLanguageError(f"Unsupported language: {language!r}.  Must be one of {list(self.languages)}.")

    @property
    def timestamp_begin(self) -> int:
        """The first timestamp token, <|0.00|>."""
        return self.no_timestamps + 1

    def decoder_prompt(
        self, tokenizer: Tokenizer, language: str, task: Task, prompt: str = "", timestamps: bool = False
    ) -> list[int]:
        """The decoder's prompt for one chunk: the request's `prompt` as `<|startofprev|>` and its last 223 tokens
        (encoded with a leading space, as openai-whisper and HF's `get_prompt_ids` encode it), then the start of the
        transcript, language, task and, unless it is to sample `timestamps`, `<|notimestamps|>`."""
        head = [self.start_of_transcript]
        if self.multilingual:
            head += [self.languages[language], self.tasks[task]]
        if not timestamps:
            head.append(self.no_timestamps)
        if not prompt.strip():
            return head
        previous = tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
        return [self.start_of_prev, *previous[-PROMPT_TOKENS_KEPT:], *head]

    def language_detection(self) -> tuple[list[int], SamplingParams]:
        """The prompt and parameters of vLLM's language detection: after `<|startoftranscript|>`, the most likely
        of the language tokens."""
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=sorted(self.languages.values()),
            output_kind=RequestOutputKind.DELTA,
        )
        return [self.start_of_transcript], params

    def detected_language(self, token_id: int) -> str:
        """The code of the language token that detection sampled."""
        return next(code for code, language_token in self.languages.items() if language_token == token_id)


def language_name(code: str) -> str:
    """The language's name as OpenAI's verbose_json gives it: "english" for "en"."""
    return LANGUAGES.get(code, code)


def chunk_separator(language: str) -> str:
    """What joins the texts of two chunks: a space, but nothing for languages written without spaces."""
    return "" if language.lower() in NO_SPACE_LANGUAGES else " "


class SpeechChunk(NamedTuple):
    """One piece of the audio, at most 30 s, as the encoder takes it; its span in the audio in seconds."""

    mel: np.ndarray  # [num_mel_bins, 3000] float32
    start_s: float
    end_s: float


class SpeechAudio(NamedTuple):
    duration_s: float
    chunks: list[SpeechChunk]


def prepare_audio(data: bytes, filename: str | None, num_mel_bins: int) -> SpeechAudio:
    """An upload decoded, split into Whisper-sized chunks (vLLM's split) and each turned into log-mel features;
    silent chunks (`is_silent`) are left out, so silence transcribes as nothing. Raises `audio.AudioDecodeError` /
    `audio.AudioTooLargeError` for what cannot be transcribed."""
    audio = decode_audio(data, filename)
    chunks = [
        SpeechChunk(log_mel_spectrogram(chunk.audio, num_mel_bins), chunk.start_s, chunk.start_s + len(chunk.audio) / SAMPLE_RATE)
        for chunk in split_audio(audio)
        if not is_silent(chunk.audio)
    ]  # fmt: skip
    return SpeechAudio(len(audio) / SAMPLE_RATE, chunks)


def is_silent(audio: np.ndarray) -> bool:
    """Whether the audio's RMS level is below `SILENCE_DBFS`: Whisper, given silence, hallucinates a word (tiny.en
    says " you") with a confidence openai-whisper's no-speech test does not reject, so silence never reaches it."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0
    return rms < 10 ** (SILENCE_DBFS / 20)


def audio_frames(duration_s: float) -> int:
    """The audio's log-mel frames, what vLLM counts as a Whisper request's audio tokens."""
    return math.ceil(duration_s * FRAMES_PER_SECOND)


def compression_ratio(text: str) -> float:
    """openai-whisper's: UTF-8 bytes over their zlib-compressed size (above 2.4 suggests a repetition loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


class Segment(BaseModel):
    """A segment of a verbose_json response, in OpenAI's shape."""

    id: int
    seek: int  # where the segment's window starts, in log-mel frames (100 a second), as openai-whisper counts it
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


@dataclasses.dataclass
class ChunkTranscript:
    """One chunk's output as its deltas arrive: text, sampled tokens and, when asked for, their logprobs."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    def add(self, output: CompletionOutput) -> None:
        self.text += output.text
        self.token_ids += output.token_ids
        self.logprobs += [entry[token].logprob for token, entry in zip(output.token_ids, output.logprobs or ())]
        self.finish_reason = output.finish_reason

    @property
    def avg_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    def needs_fallback(self, speech: SpeechModel, tokenizer: Tokenizer) -> bool:
        """openai-whisper's test of a failed decode: its text (timestamps left out) compresses more than 2.4 times,
        or its mean logprob is under -1."""
        text = tokenizer.decode([t for t in self.token_ids if t < speech.timestamp_begin], skip_special_tokens=True)
        too_repetitive = compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD
        return bool(text.strip()) and (too_repetitive or self.avg_logprob < LOGPROB_THRESHOLD)

    def segments(
        self, first_id: int, chunk: SpeechChunk, temperature: float, speech: SpeechModel, tokenizer: Tokenizer
    ) -> list[Segment]:
        """The chunk's segments, numbered from `first_id`: the text between each timestamp pair (times from the
        chunk's start), and text after the last timestamp up to the chunk's end; without timestamps, the chunk as
        one segment. Each carries the window's mean logprob (`<|endoftext|>` included, as openai-whisper averages)
        and compression ratio."""
        tokens = self.token_ids[:-1] if self.token_ids[-1:] == [speech.end_of_text] else self.token_ids
        begin = speech.timestamp_begin
        spans: list[tuple[float, float, list[int]]] = []
        opened, words = None, []
        for token in tokens:
            if token < begin:
                words.append(token)
                continue
            at = chunk.start_s + (token - begin) * TIME_PRECISION
            if opened is not None and words:
                spans.append((opened, at, words))
                opened, words = None, []
            else:
                opened = at
        if words:
            spans.append((chunk.start_s if opened is None else opened, chunk.end_s, words))
        texts = [tokenizer.decode(words, skip_special_tokens=True) for _, _, words in spans]
        avg_logprob = self.avg_logprob
        ratio = compression_ratio("".join(texts))
        return [
            Segment(
                id=first_id + i,
                seek=round(chunk.start_s * FRAMES_PER_SECOND),
                start=start,
                end=end,
                text=text,
                tokens=words,
                temperature=temperature,
                avg_logprob=avg_logprob,
                compression_ratio=ratio,
                no_speech_prob=0.0,
            )
            for i, ((start, end, words), text) in enumerate(zip(spans, texts))
            if text.strip()
        ]


class TranscriptJoiner:
    """The chunks' texts joined, delta by delta, exactly as the whole text is: each chunk's text stripped, and the
    separator before every chunk with text that follows one with text. Streamed and whole responses both go through
    it, so they agree; whitespace that may end a chunk is held back until text follows it."""

    def __init__(self, separator: str):
        self.separator = separator
        self.any_text = False  # some chunk has given text
        self.in_chunk = False  # this chunk has given text
        self.held = ""  # trailing whitespace of this chunk, not yet known to be inside its text

    def add(self, delta: str) -> str:
        """The part of the joined text this delta of the current chunk adds."""
        prefix = ""
        if not self.in_chunk:
            delta = delta.lstrip()
            if not delta:
                return ""
            prefix = self.separator if self.any_text else ""
            self.in_chunk = self.any_text = True
        pending = self.held + delta
        text = pending.rstrip()
        self.held = pending[len(text) :]
        return prefix + text

    def end_chunk(self) -> None:
        self.in_chunk, self.held = False, ""


def join_transcripts(texts: list[str], separator: str) -> str:
    """The whole text of the chunks' texts, as `TranscriptJoiner` streams it."""
    joiner = TranscriptJoiner(separator)
    parts = []
    for text in texts:
        parts.append(joiner.add(text))
        joiner.end_chunk()
    return "".join(parts)


def _timestamp(seconds: float, decimal: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal}{milliseconds:03d}"


def to_srt(segments: list[Segment]) -> str:
    """SubRip: numbered blocks `1`, `00:00:01,000 --> 00:00:02,500`, the text; blank lines between (vLLM's layout)."""
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}"
        for i, s in enumerate(segments, 1)
    ]
    return "\n\n".join(blocks) + "\n" if blocks else ""


def to_vtt(segments: list[Segment]) -> str:
    """WebVTT: the `WEBVTT` header, then blocks `00:00:01.000 --> 00:00:02.500` and the text (vLLM's layout)."""
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}" for s in segments]
    return "\n\n".join(["WEBVTT", *blocks]) + "\n"
