"""Speak the fixed English sentences of tests/fixtures/speech/ with espeak-ng, and join them into longer audio.

The committed clips were made on Debian 12 with `apt-get install -y espeak-ng` (espeak-ng 1.51, package
1.51+dfsg-10+deb12u2), voice `en-us` at 150 words a minute: `espeak-ng -v en-us -s 150 -w OUT.wav TEXT` writes
22.05 kHz 16-bit mono, which soxr (the resampler of jaxserve/audio.py) brings to 16 kHz and soundfile writes as 16-bit
WAV. espeak-ng is deterministic: the same version and voice give the same bytes, so rerunning this script leaves the
fixtures unchanged (another version may move samples slightly; the transcripts stay the same).

    python scripts/make_speech_fixtures.py        # rewrites tests/fixtures/speech/*.wav and transcripts.json

`long_speech()` joins the committed clips at test time into 70 s of speech (kept out of the repository to keep it
small), with silence over the points where vLLM's splitting looks for a quiet place to cut long audio.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "speech"
SAMPLE_RATE = 16_000
VOICE = "en-us"
WORDS_PER_MINUTE = 150

CLIPS = {
    "hello": "Hello, this is a test of the speech recognition server.",
    "story": (
        "Once upon a time, a small robot lived in a quiet library. Every night it read a different book and learned "
        "a new word. One morning the librarian found the robot asleep on a shelf, holding a dictionary. She smiled, "
        "turned off the lights, and let it rest until the children arrived."
    ),
    "weather": (
        "Tomorrow will be sunny in the morning, with clouds arriving in the afternoon. There is a small chance of "
        "rain in the evening, so remember to bring an umbrella."
    ),
    "directions": (
        "To reach the train station, walk two blocks north, turn left at the bakery, and cross the old stone bridge."
    ),
}

# the order of the 70 s join: every clip once, then again from the start, skipping those that no longer fit
LONG_ORDER = ["story", "directions", "weather", "hello"]


def speak(text: str) -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 mono at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "-w", str(path), text], check=True)
        audio, rate = sf.read(path, dtype="float32")
    return soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def load_clip(name: str, folder: Path = FIXTURES) -> np.ndarray:
    """A committed clip as float32 mono at 16 kHz."""
    audio, rate = sf.read(folder / f"{name}.wav", dtype="float32")
    assert rate == SAMPLE_RATE, rate
    return audio


def long_speech(
    total_s: float = 70.0,
    quiet_s: tuple[float, ...] = (29.0, 58.0),
    quiet_span_s: float = 1.0,
    gap_s: float = 0.5,
    folder: Path = FIXTURES,
) -> tuple[np.ndarray, str]:
    """The committed clips joined by `gap_s` of silence into `total_s` of audio, and the text spoken.

    No clip overlaps [t - gap_s/2, t + quiet_span_s + gap_s/2] for t in `quiet_s`: with the defaults that is silence
    over the 1 s windows in which vLLM's splitting of a 70 s upload looks for its two cuts (29-30 s, and 29 s
    after the first cut), so the cuts land in silence and no word is split."""
    texts = json.loads((folder / "transcripts.json").read_text())
    clips = {name: load_clip(name, folder) for name in LONG_ORDER}
    gap = round(gap_s * SAMPLE_RATE)
    quiet = [(round(t * SAMPLE_RATE) - gap // 2, round((t + quiet_span_s) * SAMPLE_RATE) + gap // 2) for t in quiet_s]
    audio = np.zeros(round(total_s * SAMPLE_RATE), np.float32)
    spoken: list[str] = []
    end = 0
    for name in LONG_ORDER * 2:
        clip = clips[name]
        start = end + gap if spoken else 0
        for low, high in quiet:
            if start < high and start + len(clip) > low:
                start = high
        if start + len(clip) > len(audio):
            continue
        audio[start : start + len(clip)] = clip
        spoken.append(texts[f"{name}.wav"])
        end = start + len(clip)
    return audio, " ".join(spoken)


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    transcripts = {}
    for name, text in CLIPS.items():
        sf.write(FIXTURES / f"{name}.wav", speak(text), SAMPLE_RATE, subtype="PCM_16")
        transcripts[f"{name}.wav"] = text
    (FIXTURES / "transcripts.json").write_text(json.dumps(transcripts, indent=2) + "\n")


if __name__ == "__main__":
    main()
