"""The audio front half of speech recognition: uploads decoded to Whisper's input, log-mel features, long audio split.

Decoding follows vLLM's speech-to-text endpoint (`librosa.load` at the model's rate: soundfile, channels averaged,
soxr's high-quality resampler), with PyAV (FFmpeg) for the containers libsndfile cannot read (M4A, MP4, WebM) when it
is installed (`pip install 'jaxserve[av]'`). The log-mel spectrogram is transformers' `WhisperFeatureExtractor`
computed with transformers' own numpy helpers, so no torch is needed. Long audio is split where vLLM splits it: at
the quietest 100 ms before each 30 s boundary.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from pathlib import PurePath
from typing import NamedTuple

import numpy as np
import soundfile as sf
import soxr
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

try:
    import av
except ImportError:
    av = None

SAMPLE_RATE = 16_000  # Whisper's, and the rate every function here takes and returns
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH_S = 30  # Whisper's window: features are padded or cut to this (3000 frames)

# vLLM's SpeechToTextConfig defaults, which Whisper keeps (max_audio_clip_s is its feature extractor's chunk_length)
MAX_CLIP_S = 30
SPLIT_SEARCH_S = 1  # overlap_chunk_second: the cut is sought in the last second before each 30 s boundary
SPLIT_WINDOW = 1600  # min_energy_split_window_size: RMS windows of 100 ms at 16 kHz

# the containers that need PyAV: named in the error when it is missing
_PYAV_SUFFIXES = {".m4a", ".mp4", ".m4v", ".mov", ".webm", ".mkv", ".aac", ".3gp"}
# a header that promises more audio than the data holds means an upload cut short, not a file to transcribe in part;
# the allowance covers encoder delay and size-estimated MP3 lengths
_TRUNCATION_ALLOWANCE_S = 0.5
_TRUNCATION_ALLOWANCE = 0.05


class AudioDecodeError(ValueError):
    """The upload is not audio this server can decode: empty, not a known format, corrupt or cut short."""


class AudioTooLargeError(ValueError):
    """The upload is over a configured limit; `parameter`, `value` and `limit` name it as vLLM's 400 error does."""

    def __init__(self, message: str, parameter: str, value: float, limit: float):
        super().__init__(message)
        self.parameter = parameter
        self.value = value
        self.limit = limit


class AudioChunk(NamedTuple):
    """A piece of a long audio and where it starts in it, which segment timestamps add."""

    audio: np.ndarray
    start_s: float


def max_audio_filesize_mb() -> int:
    """`VLLM_MAX_AUDIO_CLIP_FILESIZE_MB` (default 25), read as vLLM's envs.py reads it."""
    return int(os.environ.get("VLLM_MAX_AUDIO_CLIP_FILESIZE_MB", "25"))


def max_audio_decode_duration_s() -> int:
    """`VLLM_MAX_AUDIO_DECODE_DURATION_S` (default 600, 0 for none): compressed audio can expand into gigabytes."""
    return int(os.environ.get("VLLM_MAX_AUDIO_DECODE_DURATION_S", "600"))


def check_audio_size(num_bytes: int) -> None:
    """Reject an upload over `VLLM_MAX_AUDIO_CLIP_FILESIZE_MB` MiB before any decoding, as vLLM does."""
    size_mb = num_bytes / 1024**2
    limit = max_audio_filesize_mb()
    if size_mb > limit:
        raise AudioTooLargeError(
            f"Maximum file size exceeded: the audio is {size_mb:.1f} MB, the limit is {limit} MB "
            "(VLLM_MAX_AUDIO_CLIP_FILESIZE_MB)",
            parameter="audio_filesize_mb",
            value=size_mb,
            limit=limit,
        )


def _check_duration(duration_s: float) -> None:
    limit = max_audio_decode_duration_s()
    if limit and duration_s > limit:
        raise AudioTooLargeError(
            f"Maximum audio duration exceeded: the audio is {duration_s:.1f} s, the limit is {limit} s "
            "(VLLM_MAX_AUDIO_DECODE_DURATION_S)",
            parameter="audio_duration_s",
            value=duration_s,
            limit=limit,
        )


def _check_complete(name: str, declared_s: float, decoded_s: float) -> None:
    if declared_s - decoded_s > max(_TRUNCATION_ALLOWANCE_S, _TRUNCATION_ALLOWANCE * declared_s):
        raise AudioDecodeError(
            f"{name} is truncated: its header declares {declared_s:.2f} s of audio but only {decoded_s:.2f} s "
            "could be decoded"
        )


def _decode_soundfile(data: bytes, name: str) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        _check_duration(f.frames / f.samplerate)
        audio = f.read(dtype="float32", always_2d=True)
        _check_complete(name, f.frames / f.samplerate, len(audio) / f.samplerate)
        return audio.mean(axis=1), f.samplerate


def _decode_pyav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise AudioDecodeError(f"{name} has no audio stream")
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # planar float32 at the stream's own rate: soxr resamples
        pieces: list[np.ndarray] = []
        samples, rate = 0, stream.rate
        for frame in container.decode(stream):
            for converted in to_float.resample(frame):
                pieces.append(converted.to_ndarray())
                samples, rate = samples + converted.samples, converted.sample_rate
            _check_duration(samples / rate)
        pieces += [converted.to_ndarray() for converted in to_float.resample(None)]
        if not pieces:
            raise AudioDecodeError(f"{name} contains no audio samples")
        audio = np.concatenate(pieces, axis=1).mean(axis=0)
        if stream.duration is not None and stream.time_base is not None:
            _check_complete(name, float(stream.duration * stream.time_base), len(audio) / rate)
        return audio, rate


def decode_audio(data: bytes, filename: str | None = None) -> np.ndarray:
    """An upload as float32 mono at 16 kHz: what `librosa.load(sr=16000)` gives for it in vLLM.

    soundfile reads WAV/FLAC/OGG/MP3 and most else; PyAV, when installed, the containers it cannot (M4A, MP4, WebM).
    Channels are averaged and the rate brought to 16 kHz (`resample`). Raises `AudioTooLargeError` over the size or duration
    limits, and `AudioDecodeError`, naming `filename` and the cause, for anything that is not whole, decodable audio.
    """
    name = repr(filename) if filename else "the audio file"
    check_audio_size(len(data))
    if not data:
        raise AudioDecodeError(f"{name} is empty")
    try:
        audio, rate = _decode_soundfile(data, name)
    except sf.LibsndfileError as exc:
        if av is None:
            hint = ""
            if filename and PurePath(filename).suffix.lower() in _PYAV_SUFFIXES:
                hint = f"; {PurePath(filename).suffix} needs PyAV: pip install 'jaxserve[av]'"
            raise AudioDecodeError(f"cannot decode {name}: {exc.error_string.rstrip('.')}{hint}") from exc
        try:
            audio, rate = _decode_pyav(data, name)
        except av.FFmpegError as av_exc:
            raise AudioDecodeError(
                f"cannot decode {name} as audio (soundfile: {exc.error_string.rstrip('.')}; PyAV: {av_exc.strerror})"
            ) from av_exc
    if audio.size == 0:
        raise AudioDecodeError(f"{name} contains no audio samples")
    return resample(audio, rate)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """Mono audio at `rate` as float32 at 16 kHz: soxr's high-quality resampler, the length padded or cut to
    `ceil(frames * 16000 / rate)` as librosa does."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate != SAMPLE_RATE:
        length = -(-len(audio) * SAMPLE_RATE // rate)
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
        audio = np.pad(audio, (0, max(0, length - len(audio))))[:length]
    return np.ascontiguousarray(audio, dtype=np.float32)


@functools.cache
def _mel_filters(num_mel_bins: int) -> np.ndarray:
    return mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=num_mel_bins,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )


@functools.cache
def _window() -> np.ndarray:
    return window_function(N_FFT, "hann")


def log_mel_spectrogram(audio: np.ndarray, num_mel_bins: int = 80) -> np.ndarray:
    """Whisper's encoder input for 16 kHz mono audio: (num_mel_bins, 3000) float32, as `WhisperFeatureExtractor`.

    The audio is zero-padded or cut to 30 s; the power spectrum (400-point Hann STFT, hop 160, the last frame
    dropped) goes through Slaney mel filters, log10 with a 1e-10 floor, clamped to 8 below its maximum and scaled
    as (x + 4) / 4. Whisper large-v3 takes 128 bins, the others 80."""
    samples = CHUNK_LENGTH_S * SAMPLE_RATE
    audio = np.asarray(audio, dtype=np.float32)[:samples]
    audio = np.pad(audio, (0, samples - len(audio)))
    log_spec = spectrogram(
        audio,
        _window(),
        frame_length=N_FFT,
        hop_length=HOP_LENGTH,
        power=2.0,
        mel_filters=_mel_filters(num_mel_bins),
        log_mel="log10",
    )[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def log_mel_spectrogram_batch(audios: Sequence[np.ndarray], num_mel_bins: int = 80) -> np.ndarray:
    """`log_mel_spectrogram` of each audio stacked into (batch, num_mel_bins, 3000); each is clamped on its own
    maximum, as the feature extractor does for a batch."""
    return np.stack([log_mel_spectrogram(audio, num_mel_bins) for audio in audios])


def _find_split_point(audio: np.ndarray, start: int, end: int, window: int) -> int:
    """The start of the quietest `window` (lowest RMS, the first of equals) in audio[start:end], as vLLM's
    `find_split_point`: its windows step by `window` and stop one short of the region's end."""
    segment = audio[start:end]
    count = len(range(0, len(segment) - window, window))
    energy = np.sqrt((segment[: count * window].reshape(count, window) ** 2).mean(axis=1))
    return start + int(np.argmin(energy)) * window


def split_audio(
    audio: np.ndarray,
    max_clip_s: float = MAX_CLIP_S,
    search_s: float = SPLIT_SEARCH_S,
    window: int = SPLIT_WINDOW,
) -> list[AudioChunk]:
    """Audio at 16 kHz split into Whisper-sized pieces as vLLM's speech-to-text endpoint splits it.

    Audio up to `max_clip_s` is one chunk. Longer audio is cut, from the start, at the quietest `window` samples in
    the last `search_s` before each `max_clip_s` boundary, so no cut falls mid-word when a pause is near. The chunks
    are contiguous (vLLM's `overlap_chunk_second` is this search span, not audio shared by two chunks): every
    chunk but the last is between `max_clip_s - search_s` and `max_clip_s` long. Each chunk carries its start in
    seconds, which its timestamps are offset by (vLLM offsets the i-th by i * 30 s, drifting by up to a second per
    chunk)."""
    chunk = int(SAMPLE_RATE * max_clip_s)
    search = int(SAMPLE_RATE * search_s)
    chunks = []
    start = 0
    while start < len(audio):
        if start + chunk >= len(audio):
            chunks.append(AudioChunk(audio[start:], start / SAMPLE_RATE))
            break
        cut = _find_split_point(audio, start + chunk - search, start + chunk, window)
        chunks.append(AudioChunk(audio[start:cut], start / SAMPLE_RATE))
        start = cut
    return chunks
