"""jaxserve/audio.py: uploads decoded in every format the transcription endpoints take, the errors a client sees for
bad or oversized ones, Whisper's log-mel features against transformers' `WhisperFeatureExtractor`, and long audio
split where vLLM splits it. The audio is the espeak-ng speech of tests/fixtures/speech/ (scripts/make_speech_fixtures.py),
encoded into each format here."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf

from jaxserve import audio as audio_module
from jaxserve.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    AudioTooLargeError,
    check_audio_size,
    decode_audio,
    log_mel_spectrogram,
    log_mel_spectrogram_batch,
    split_audio,
)
from scripts.make_speech_fixtures import CLIPS, FIXTURES, load_clip, long_speech


@pytest.fixture(scope="module")
def hello() -> np.ndarray:
    return load_clip("hello")


def encode(audio: np.ndarray, rate: int, format: str, subtype: str | None = None) -> bytes:
    """`audio` (frames, or frames x channels) as a file of `format`, written by soundfile."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def encode_pyav(audio: np.ndarray, container: str, codec: str, rate: int) -> bytes:
    """16 kHz mono `audio` encoded with `codec` at `rate` into `container`, written by PyAV (FFmpeg)."""
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        context = stream.codec_context
        resampler = av.AudioResampler(context.format.name, "mono", rate, frame_size=context.frame_size or None)
        for converted in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def best_lag_correlation(decoded: np.ndarray, original: np.ndarray, max_lag: int = 2048) -> float:
    """The correlation of `decoded` with `original` shifted by the lag, up to `max_lag` samples, that matches best:
    lossy codecs delay the signal by their priming samples."""
    n = min(len(decoded), len(original)) - max_lag
    lag = int(np.argmax(np.correlate(decoded[: n + max_lag], original[:n], mode="valid")))
    return float(np.corrcoef(decoded[lag : lag + n], original[:n])[0, 1])


def test_fixtures_are_transcribed_16khz_mono():
    transcripts = json.loads((FIXTURES / "transcripts.json").read_text())
    assert transcripts == {f"{name}.wav": text for name, text in CLIPS.items()}
    durations = {}
    for name in transcripts:
        info = sf.info(FIXTURES / name)
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        durations[name] = info.duration
    assert 3 < durations["hello.wav"] < 5 and 15 < durations["story.wav"] < 25, durations
    assert sum(path.stat().st_size for path in FIXTURES.iterdir()) < 1.5 * 1024**2


@pytest.mark.parametrize(
    "format, subtype, min_correlation",
    [("WAV", "PCM_16", 1.0), ("FLAC", "PCM_16", 1.0), ("OGG", "VORBIS", 0.99), ("MP3", "MPEG_LAYER_III", 0.99)],
)
def test_decodes_soundfile_formats(hello, format, subtype, min_correlation):
    decoded = decode_audio(encode(hello, SAMPLE_RATE, format, subtype), f"hello.{format.lower()}")
    assert decoded.dtype == np.float32 and decoded.shape == hello.shape
    if min_correlation == 1.0:
        np.testing.assert_array_equal(decoded, hello)  # lossless, and the fixture is 16-bit already
    else:
        assert best_lag_correlation(decoded, hello) > min_correlation


# AAC at 22.05 kHz: its 1024 priming samples then delay the 16 kHz output by a whole number of samples (743.04)
@pytest.mark.parametrize("container, codec, rate", [("ipod", "aac", 22_050), ("webm", "libopus", 48_000)])
def test_decodes_containers_through_pyav(hello, container, codec, rate):
    data = encode_pyav(hello, container, codec, rate)
    with pytest.raises(sf.LibsndfileError):
        sf.info(io.BytesIO(data))  # soundfile cannot: this is PyAV's work
    decoded = decode_audio(data, f"hello.{'m4a' if container == 'ipod' else container}")
    assert decoded.dtype == np.float32 and abs(len(decoded) - len(hello)) < 0.2 * SAMPLE_RATE
    assert best_lag_correlation(decoded, hello) > 0.99


def test_container_without_pyav_names_the_extra(hello, monkeypatch):
    data = encode_pyav(hello, "ipod", "aac", SAMPLE_RATE)
    monkeypatch.setattr(audio_module, "av", None)
    with pytest.raises(AudioDecodeError, match=r"'voice\.m4a'.*needs PyAV: pip install 'jaxserve\[av\]'"):
        decode_audio(data, "voice.m4a")


@pytest.mark.parametrize("rate", [44_100, 48_000])
def test_resamples_to_16khz(rate):
    """A 440 Hz tone at 44.1 or 48 kHz comes back as the same tone at 16 kHz, librosa's length."""
    seconds = np.arange(2 * rate) / rate
    decoded = decode_audio(encode(0.5 * np.sin(2 * np.pi * 440 * seconds), rate, "WAV", "FLOAT"), "tone.wav")
    assert len(decoded) == math.ceil(2 * rate * SAMPLE_RATE / rate) == 2 * SAMPLE_RATE
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(decoded)) / SAMPLE_RATE)
    np.testing.assert_allclose(decoded[800:-800], expected[800:-800], atol=1e-3)  # away from the filter's edges


def test_decodes_as_librosa_load_does(tmp_path):
    """Channels averaged, soxr's HQ resampler, librosa's length: transformers' soundfile loader, which is
    `librosa.load`'s steps (what vLLM decodes uploads with), gives the same samples."""
    transformers_audio = pytest.importorskip("transformers.audio_utils")
    story = load_clip("story")
    path = tmp_path / "story.wav"
    sf.write(path, np.stack([story, 0.3 * story], axis=1), 44_100, subtype="PCM_16")  # a stereo 44.1 kHz header
    expected = transformers_audio.load_audio(str(path), SAMPLE_RATE, backend="soundfile")
    np.testing.assert_array_equal(decode_audio(path.read_bytes(), path.name), expected)


def test_stereo_averages_to_mono(hello):
    stereo = np.stack([hello, np.zeros_like(hello)], axis=1)
    np.testing.assert_allclose(decode_audio(encode(stereo, SAMPLE_RATE, "WAV", "FLOAT")), 0.5 * hello, atol=1e-7)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(48_000) / 48_000)
    decoded = decode_audio(encode(np.stack([tone, -tone], axis=1), 48_000, "FLAC", "PCM_24"), "cancels.flac")
    assert len(decoded) == SAMPLE_RATE and np.abs(decoded).max() < 1e-6


def test_bad_uploads_raise_a_decode_error_naming_the_problem(hello):
    with pytest.raises(AudioDecodeError, match="'empty.wav' is empty"):
        decode_audio(b"", "empty.wav")
    text = b"These are meeting notes, not a recording.\n" * 20
    with pytest.raises(AudioDecodeError, match=r"cannot decode 'notes\.wav' as audio \(soundfile: Format not recog"):
        decode_audio(text, "notes.wav")
    mp3 = encode(hello, SAMPLE_RATE, "MP3")
    with pytest.raises(AudioDecodeError, match=r"'cut\.mp3' is truncated: its header declares 3\.84 s of audio"):
        decode_audio(mp3[: len(mp3) // 2], "cut.mp3")
    with pytest.raises(AudioDecodeError, match="the audio file"):
        decode_audio(mp3[:64])  # no filename: the message still says what failed
    assert issubclass(AudioDecodeError, ValueError) and issubclass(AudioTooLargeError, ValueError)


def test_size_limit_is_vllms(hello, monkeypatch):
    monkeypatch.delenv("VLLM_MAX_AUDIO_CLIP_FILESIZE_MB", raising=False)
    check_audio_size(25 * 1024**2)
    with pytest.raises(AudioTooLargeError, match=r"Maximum file size exceeded.*25 MB") as error:
        decode_audio(bytes(25 * 1024**2 + 1), "huge.wav")  # refused before decoding: this is not audio at all
    assert (error.value.parameter, error.value.limit) == ("audio_filesize_mb", 25)
    monkeypatch.setenv("VLLM_MAX_AUDIO_CLIP_FILESIZE_MB", "1")
    data = encode(np.tile(hello, 9), SAMPLE_RATE, "WAV", "PCM_16")
    with pytest.raises(AudioTooLargeError, match=r"the audio is 1\.1 MB, the limit is 1 MB") as error:
        decode_audio(data, "long.wav")
    assert error.value.value == pytest.approx(len(data) / 1024**2)


def test_duration_limit(hello, monkeypatch):
    monkeypatch.setenv("VLLM_MAX_AUDIO_DECODE_DURATION_S", "3")
    for data in (encode(hello, SAMPLE_RATE, "FLAC"), encode_pyav(hello, "webm", "libopus", 48_000)):
        with pytest.raises(AudioTooLargeError, match=r"Maximum audio duration exceeded.*limit is 3 s") as error:
            decode_audio(data, "hello")
        assert error.value.parameter == "audio_duration_s"
    monkeypatch.setenv("VLLM_MAX_AUDIO_DECODE_DURATION_S", "0")
    assert len(decode_audio(encode(hello, SAMPLE_RATE, "FLAC"))) == len(hello)


@pytest.mark.parametrize("num_mel_bins", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(hello, num_mel_bins):
    transformers = pytest.importorskip("transformers")
    extractor = transformers.WhisperFeatureExtractor(feature_size=num_mel_bins)
    noise = np.random.default_rng(0).standard_normal(35 * SAMPLE_RATE).astype(np.float32) * 0.1  # cut to 30 s
    for audio in (hello, noise):
        expected = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        features = log_mel_spectrogram(audio, num_mel_bins)
        assert features.shape == (num_mel_bins, 3000) and features.dtype == np.float32
        np.testing.assert_allclose(features, expected, atol=1e-4, rtol=0)
    batch = log_mel_spectrogram_batch([hello, noise[: 7 * SAMPLE_RATE]], num_mel_bins)
    expected = extractor([hello, noise[: 7 * SAMPLE_RATE]], sampling_rate=SAMPLE_RATE, return_tensors="np")
    np.testing.assert_allclose(batch, expected.input_features, atol=1e-4, rtol=0)


def test_long_speech_splits_in_its_silences():
    """70 s of speech with silence over 29-30 s and 58-59 s: cut at the first silent window of each search span,
    29.0 s and 29 s after that, into contiguous chunks whose offsets are where they start."""
    speech, text = long_speech()
    assert len(speech) == 70 * SAMPLE_RATE and text.startswith(CLIPS["story"])
    chunks = split_audio(speech)
    assert [chunk.start_s for chunk in chunks] == [0.0, 29.0, 58.0]
    assert [len(chunk.audio) / SAMPLE_RATE for chunk in chunks] == [29.0, 29.0, 12.0]
    np.testing.assert_array_equal(np.concatenate([chunk.audio for chunk in chunks]), speech)
    for chunk in chunks[1:]:
        cut = round(chunk.start_s * SAMPLE_RATE)
        assert not speech[cut - 1600 : cut + 1600].any()  # no word is cut


def test_short_audio_is_one_chunk(hello):
    ten_seconds = np.resize(load_clip("weather"), 10 * SAMPLE_RATE)
    for audio in (hello, ten_seconds, np.resize(ten_seconds, 30 * SAMPLE_RATE)):
        [chunk] = split_audio(audio)
        assert chunk.start_s == 0.0 and np.array_equal(chunk.audio, audio)


def test_split_takes_the_quietest_window_vllm_examines():
    """In noise, the cut goes to a 100 ms hush: one at 29.5 s is found; one at 29.9 s is not, as in vLLM, whose
    windows stop one short of the search span's end; with none, the quietest noise window between 29.0 and 29.9 s."""
    noise = np.random.default_rng(1).uniform(-0.5, 0.5, 45 * SAMPLE_RATE).astype(np.float32)
    hushed = noise.copy()
    hushed[round(29.5 * SAMPLE_RATE) : round(29.6 * SAMPLE_RATE)] *= 0.01
    assert [chunk.start_s for chunk in split_audio(hushed)] == [0.0, 29.5]
    hushed = noise.copy()
    hushed[round(29.9 * SAMPLE_RATE) : 30 * SAMPLE_RATE] = 0.0
    [first, second] = split_audio(hushed)
    assert 29.0 <= second.start_s < 29.9 and second.start_s == split_audio(noise)[1].start_s
