"""Clip embeddings cached per (model, layer, pool), so probing many layers or tasks embeds once.

Layout: `CACHE/<model>-<sha256 prefix>/<pool>/layer<i>.npz` with `keys` (N,) and `x` (N, D) float32.
A file's key hashes its real path, size and modification time, so an edited file is embedded again.
The model part hashes the weights (`musicssl.bulk.run.model_sha256`): two models never share rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from musicssl import signals
from musicssl.bulk.outputs import atomic_write
from musicssl.bulk.run import model_sha256
from musicssl.errors import AudioDecodeError, AudioInputError, TaskFormatError, first_line
from musicssl.models.base import Encoder

log = logging.getLogger(__name__)

SAVE_EVERY = 60.0  # seconds between cache writes during a long embedding run, so a crash keeps work


def default_cache() -> Path:
    """`<musicssl cache>/embeddings` (MUSICSSL_CACHE, else XDG, else ~/.cache)."""
    from musicssl.hub import cache_dir

    return cache_dir() / "embeddings"


def file_key(path: Path) -> str:
    """sha1 of the real path, size and mtime (ns) of an audio file: 20 hex digits."""
    st = os.stat(path)
    text = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class EmbeddingCache:
    """Clip embeddings of one model under one pooling, one `.npz` per layer."""

    def __init__(self, root: str | os.PathLike, encoder: Encoder, model_name: str, pool: str = "mean") -> None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(model_name.rstrip("/\\")) or "model")
        self.dir = Path(root) / f"{slug}-{model_sha256(encoder)[:16]}" / pool
        self.encoder, self.pool = encoder, pool

    def get(self, paths: Sequence[Path], layers: Sequence[int], batch_size: int = 8) -> dict[int, np.ndarray]:
        """Embeddings of `paths` for each of `layers` (non-negative indices): layer -> (N, D) float32.

        Missing rows are embedded (all missing layers in one pass) and written back. Files that
        cannot be decoded are named together in one TaskFormatError, after the rest are cached.
        """
        keys = [file_key(p) for p in paths]
        tables = {l: self._read(l) for l in layers}
        todo = sorted({i for l in layers for i, k in enumerate(keys) if k not in tables[l]})
        bad = self._embed(paths, keys, todo, tables, batch_size) if todo else []
        if bad:
            shown = "; ".join(f"{p}: {e}" for p, e in bad[:5])
            raise TaskFormatError(f"{len(bad)} task files cannot be decoded ({shown}). Fix or remove their rows; "
                                  f"what was embedded is cached, so the next run only embeds what is missing.")
        return {l: np.stack([tables[l][k] for k in keys]) for l in layers}

    def _path(self, layer: int) -> Path:
        return self.dir / f"layer{layer}.npz"

    def _read(self, layer: int) -> dict[str, np.ndarray]:
        path = self._path(layer)
        if not path.exists():
            return {}
        try:
            with np.load(path) as z:
                return dict(zip(z["keys"].tolist(), z["x"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # a damaged cache: lost time
            log.warning("ignoring unreadable embedding cache %s (%s)", path, err)
            return {}

    def _write(self, tables: dict[int, dict[str, np.ndarray]]) -> None:
        """Keep `tables`; a cache that cannot be written is only time lost next run, said once."""
        if getattr(self, "unwritable", False):
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for layer, table in tables.items():
                merged = {**self._read(layer), **table}  # keep rows another run added meanwhile
                keys = np.array(sorted(merged))
                x = np.stack([merged[k] for k in keys]).astype(np.float32) if len(keys) else np.zeros((0, 0), np.float32)
                atomic_write(self._path(layer), lambda fh: np.savez(fh, keys=keys, x=x), "wb")
        except OSError as err:
            self.unwritable = True
            log.warning("cannot keep embeddings in the cache %s (%s): the results stand, but the next run embeds "
                        "again; give --cache (or MUSICSSL_CACHE) a folder you may write to", self.dir,
                        err.strerror or err)

    def _embed(self, paths: Sequence[Path], keys: list[str], todo: list[int],
               tables: dict[int, dict[str, np.ndarray]], batch_size: int) -> list[tuple[Path, str]]:
        layers = sorted(tables)
        bad: list[tuple[Path, str]] = []
        last_save = time.monotonic()
        bar = _bar(len(todo), f"embedding with {self.dir.parent.name}")
        try:
            for start in range(0, len(todo), batch_size):
                signals.check()  # a Ctrl-C whose KeyboardInterrupt was lost (musicssl.signals)
                chunk = todo[start : start + batch_size]
                for i, row in zip(chunk, self._embed_chunk([paths[i] for i in chunk], layers, bad)):
                    for j, layer in enumerate(layers if row is not None else []):
                        tables[layer][keys[i]] = row[j]
                bar.update(len(chunk))
                if time.monotonic() - last_save > SAVE_EVERY:
                    self._write(tables)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            with signals.held():  # a second Ctrl-C must not cut the cache file short
                self._write(tables)  # what was embedded is kept, as the command's last line says
            raise
        bar.close()
        self._write(tables)
        return bad

    def _embed_chunk(self, files: list[Path], layers: list[int], bad: list[tuple[Path, str]]) -> list[np.ndarray | None]:
        """(L, D) per file, None for one that cannot be read (named in `bad`); a failing batch is
        redone file by file so one broken file costs only itself."""
        try:
            return list(self._clips(files, layers))
        except (AudioDecodeError, AudioInputError):
            pass
        out: list[np.ndarray | None] = []
        for f in files:
            try:
                out.append(self._clips([f], layers)[0])
            except (AudioDecodeError, AudioInputError) as err:
                bad.append((f, first_line(err)))
                out.append(None)
        return out

    def _clips(self, files: list[Path], layers: list[int]) -> np.ndarray:
        return self.encoder.embed(files, layers=layers, pool=self.pool, batch_size=len(files)).clip.float().numpy()


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not sys.stderr.isatty(), leave=False)
