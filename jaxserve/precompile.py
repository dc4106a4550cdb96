"""`jaxserve compile`: every bucket program of a model, compiled for a chip that need not be attached, into
the persistent compilation cache, with a manifest (`compile_manifest`).

The engine is built as for serving, with the same limits and so the same programs, but only as shapes
(`EngineConfig.target`): no weights are read and nothing is allocated, so an 8B model compiles for an H200 or
a TPU v6e on a laptop. `jaxserve serve --compile-cache-dir DIR` on that chip then loads every program.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from typing import Any

from .compile_manifest import CompiledModel
from .compiled import error_line
from .config import EngineConfig
from .targets import Target, TargetUnavailable

logger = logging.getLogger(__name__)

MIB = 1 << 20


@dataclasses.dataclass
class CompileResult:
    target: str
    model: str
    compiled: CompiledModel | None
    error: str | None = None  # why the engine could not be built for the target at all

    @property
    def ok(self) -> bool:
        return self.error is None and self.compiled is not None and all(b.error is None for b in self.compiled.buckets)


def compile_model(model: str, target: Target, engine_args: dict[str, Any]) -> CompileResult:
    """Build `model`'s engine for `target` as shapes and compile every bucket; a bucket the compiler rejects is
    recorded with its error rather than stopping the others."""
    from .llm import create_engine

    config = EngineConfig(model=model, **{**engine_args, "target": target.name, "strict_compile": True})
    try:
        with target.lowering():
            engine = create_engine(config)
    except TargetUnavailable as error:
        return CompileResult(target.name, model, None, str(error))
    except Exception as error:  # the engine could not be set up for this target: reported, the others go on
        logger.debug("Building %s for %s failed:\n%s", model, target.name, traceback.format_exc())
        return CompileResult(target.name, model, None, error_line(error))
    return CompileResult(target.name, model, engine.compiled)


def table(results: list[CompileResult]) -> str:
    """Markdown: target × model × bucket, compiled or the compiler's error, seconds, the program's scratch and
    the largest kernel scratch (TPU VMEM)."""
    rows = [
        "| target | model | runner | bucket T | result | seconds | temp MiB | kernel VMEM MiB |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for result in results:
        if result.compiled is None:
            rows.append(f"| {result.target} | {result.model} | | | {result.error} | | | |")
            continue
        for bucket in result.compiled.buckets:
            status = "compiled" if bucket.error is None else bucket.error
            temp, scratch = (
                "" if n is None else f"{n / MIB:.1f}" for n in (bucket.temp_bytes, bucket.kernel_scratch_bytes)
            )
            rows.append(
                f"| {result.target} | {result.model} | {result.compiled.runner} | {bucket.tokens} | {status} "
                f"| {bucket.seconds:.1f} | {temp} | {scratch} |"
            )
    return "\n".join(rows)
