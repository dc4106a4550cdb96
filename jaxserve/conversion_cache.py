"""Model folders converted once into the cache (GGUF files: gguf_convert.py; CTranslate2 Whisper folders:
ct2_convert.py). A conversion is keyed by its sources' paths, sizes and mtimes and the converter's version, written
to a temporary sibling and renamed into place with a stamp inside: a later run finds the folder complete and skips
the work, an interrupted run never leaves a half-written folder where a complete one is expected, and of two
concurrent conversions the second to finish keeps the first's folder."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

STAMP_FILE = ".complete"


def source_key(paths: list[Path], version: int) -> str:
    """A short hash of the sources (those that exist: path, size, mtime) and the converter's version."""
    identity = [str(version)]
    for path in paths:
        if path.is_file():
            stat = path.stat()
            identity += [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(identity).encode()).hexdigest()[:12]


def converted_folder(target: Path, write: Callable[[Path], None], source: str) -> Path:
    """`target`, written by `write(folder)` on the first call (a conversion of `source`, named in the logs and the
    stamp); later calls return it at once."""
    if (target / STAMP_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to a Hugging Face folder (once; later runs reuse it).", source)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is as readable as any HF folder
    try:
        write(staging)
        (staging / STAMP_FILE).write_text(f"{source}\n")
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote the conversion of %s to %s.", source, target)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Move a finished folder into place, unless a concurrent conversion got there first."""
    if target.exists() and not (target / STAMP_FILE).exists():
        shutil.rmtree(target)  # not written by this module's atomic rename; cannot be trusted
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / STAMP_FILE).exists():
            raise
