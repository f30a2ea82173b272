"""Embed files into a folder of `.npz` outputs: the engine under `musicssl embed`.

Outputs mirror the input tree: `IN/a/x.wav` -> `OUT/a/x.wav.npz` (the source extension stays in the
name, so `x.wav` and `x.mp3` in one folder both survive). Each output is written to a temporary file
and renamed, so a killed run never leaves a partial file, and finished outputs are skipped on re-run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from musicssl import __version__
from musicssl.models.base import Embeddings, Encoder


@dataclass(frozen=True)
class Job:
    source: Path  # audio file
    output: Path  # .npz to write


def plan_jobs(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, suffix: str = ".npz") -> list[Job]:
    """Input files and folders -> one job per audio file, duplicates once, outputs inside `out_dir`."""
    from musicssl.audio.io import find_audio_files

    out_dir = Path(out_dir)
    jobs: dict[Path, Job] = {}
    targets: dict[Path, Path] = {}
    for given in inputs:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"input {root} does not exist")
        files = find_audio_files(root)
        for f in files:
            rel = f.relative_to(root) if root.is_dir() else Path(f.name)
            out = out_dir / rel.parent / (rel.name + suffix)
            key = f.resolve()
            if key in jobs:
                continue
            if out in targets:
                raise ValueError(f"{f} and {targets[out]} would both be written to {out}; embed them into separate folders")
            jobs[key], targets[out] = Job(f, out), f
    return list(jobs.values())


def embed_jobs(
    encoder: Encoder, jobs: list[Job], *, layers: Any = "last", pool: str | None = None,
    batch_size: int = 8, overwrite: bool = False, model_name: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Embed each job's file and write its output; yield one record per job (status ok/skipped/error)."""
    from musicssl.errors import AudioDecodeError, AudioInputError

    for job in jobs:
        if job.output.exists() and not overwrite:
            yield {"input": str(job.source), "output": str(job.output), "status": "skipped"}
            continue
        t0 = time.perf_counter()
        try:
            emb = encoder.embed(job.source, layers=layers, pool=pool, batch_size=batch_size)
        except (AudioDecodeError, AudioInputError) as err:
            yield {"input": str(job.source), "status": "error", "reason": str(err)}
            continue
        meta = metadata(encoder, emb, job.source, model_name)
        write_npz(job.output, emb, meta)
        yield {"input": str(job.source), "output": str(job.output), "status": "ok",
               "seconds": round(time.perf_counter() - t0, 3), "duration": meta["duration"]}


def metadata(encoder: Encoder, emb: Embeddings, source: Path, model_name: str | None) -> dict[str, Any]:
    from musicssl.audio.io import audio_info

    spec = encoder.spec
    return {
        "model": model_name or (spec.name if spec else encoder.family),
        "revision": spec.revision if spec else None,
        "sample_rate": encoder.sample_rate,
        "frame_rate": encoder.frame_rate,
        "layers": emb.layers,
        "source": str(source),
        "duration": round(audio_info(source).duration, 3),
        "musicssl_version": __version__,
    }


def write_npz(path: Path, emb: Embeddings, meta: dict[str, Any]) -> None:
    """One item's embeddings -> `path` atomically: frames (T, D) or (L, T, D), timestamps, clip, metadata."""
    arrays = {"clip": emb.clip[0].numpy(), "metadata": np.array(json.dumps(meta))}
    if emb.frames is not None:
        n = int(emb.lengths[0])
        arrays["frames"] = emb.frames[0][..., :n, :].numpy()
        arrays["timestamps"] = emb.timestamps[:n].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".npz.part")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
