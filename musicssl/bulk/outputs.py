"""Per-file outputs (npz, npy, safetensors) written atomically, and the run's table of clip embeddings.

Shapes: frames (T, D), or (L, T, D) for several layers; timestamps (T,) in seconds (frame centres);
clip (D,) or (L, D). Every file is written to a hidden temporary name in its final folder and
renamed, so a reader (or a killed run) never sees a partial output. Per-file outputs are not
fsynced one by one (the run syncs once at its end); `looks_complete` catches what a machine crash
mid-run can leave.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from musicssl.errors import OutputPathError

FORMATS = {"npz": ".npz", "npy": ".npy", "safetensors": ".safetensors"}
TEMP_SUFFIX = ".part"


def make_out_dir(path: Path, flag: str = "-o/out") -> None:
    """An output folder, made before any work: a file in its place, or a folder that cannot be
    written, is said once (`flag` names the option that gave it)."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"the output folder {path} is a file: give {flag} a folder (made if missing)")
    if path.is_symlink() and not path.exists():  # mkdir would say only "File exists"
        raise OutputPathError(f"the output folder {path} is a link to {os.readlink(path)}, which leads nowhere (an "
                              f"unmounted disk, or a loop of links): mount it or point the link again, or give "
                              f"{flag} another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot make the output folder {path}: {err.strerror}; give {flag} a folder "
                              "you may write to") from err
    try:  # a real write, not os.access: that one says "permission denied" for a read-only filesystem too
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputPathError(f"cannot write to the output folder {path}: {err.strerror}; give {flag} a "
                              "folder you may write to") from err


@contextlib.contextmanager
def unmade_if_unused(path: str | os.PathLike | None) -> Iterator[None]:
    """Run the block; if it fails, remove the folders it made for `path` (it and missing parents,
    deepest first) that are still empty: a refused run leaves nothing behind. None: no folder."""
    target = Path(os.path.abspath(path)) if path is not None else None
    made = [p for p in (target, *target.parents) if not p.exists()] if target is not None else []
    try:
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # one the run has written to stays
                folder.rmdir()
        raise


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb", temp: Path | None = None,
                 durable: bool = True) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`.

    temp: a fixed temporary name, for writers that hold the output's claim (a killed run's leftover
    is then simply overwritten); by default a unique name.
    durable: fsync before the rename, so a machine crash cannot leave an empty file under the final
    name. A run's per-file outputs skip it (an fsync per file, ~10 ms on a virtual disk, is the
    likeliest cap of a GPU run at ~130 files/s); the run syncs once at its end instead.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if temp is None:
        # The host and pid in the name say who owns it; the rename is atomic on one filesystem.
        prefix = f".{path.name}.{socket.gethostname()}.{os.getpid()}."
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=TEMP_SUFFIX)
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; outputs get the usual permissions (POSIX)
            os.fchmod(fd, usual_mode())
    else:
        fd, tmp = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), str(temp)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_outputs(out_dir: Path) -> None:
    """Flush what the run wrote to disk: on Linux only the filesystem holding `out_dir` (syncfs),
    so that a shared machine's other disks, busy with other jobs, are not waited for; elsewhere
    every filesystem (sync); on Windows nothing (no call for it)."""
    syncfs = getattr(ctypes.CDLL(None), "syncfs", None) if os.name == "posix" else None
    if syncfs is not None:
        try:
            fd = os.open(out_dir, os.O_RDONLY)
        except OSError:  # the folder is gone: nothing of ours is left to flush
            return
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    if hasattr(os, "sync"):  # no syncfs (macOS), or it failed
        os.sync()


@functools.lru_cache(maxsize=1)
def usual_mode() -> int:
    """The mode a plain open() gives a new file (0666 less the process umask), read once: reading
    the umask means setting it, which other threads could see."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def claimed_temp(path: Path) -> Path:
    """The temporary name of an output whose claim is held (see manifest.Claim)."""
    return path.parent / f".{path.name}{TEMP_SUFFIX}"


def write_output(fmt: str, path: Path, frames: np.ndarray | None, timestamps: np.ndarray | None,
                 clip: np.ndarray, meta: dict[str, Any]) -> None:
    """One file's embeddings -> `path` in `fmt`, through its claimed temporary name (hold the claim).
    npy holds one array: the frames, or the clip when frames were not kept (pooled runs); the
    metadata then lives in the manifest and run.json."""
    arrays = {"clip": clip}
    if frames is not None:
        arrays |= {"frames": frames, "timestamps": timestamps}
    temp = claimed_temp(path)
    if fmt == "npz":
        atomic_write(path, lambda fh: np.savez(fh, metadata=np.array(json.dumps(meta)), **arrays), temp=temp,
                     durable=False)
    elif fmt == "npy":
        atomic_write(path, lambda fh: np.save(fh, frames if frames is not None else clip), temp=temp, durable=False)
    elif fmt == "safetensors":
        from safetensors.numpy import save

        blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"metadata": json.dumps(meta)})
        atomic_write(path, lambda fh: fh.write(blob), temp=temp, durable=False)
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {sorted(FORMATS)}")


def looks_complete(fmt: str, path: Path) -> bool:
    """Whether an existing output is whole: the size its own header promises (npy, safetensors) or a
    readable zip directory, which sits at the end of the file (npz). A file cut short or left empty
    by a machine crash fails; the run then makes it again."""
    try:
        if fmt == "npz":
            import zipfile

            return zipfile.is_zipfile(path)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if fmt == "npy":
                major, _ = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(fh)
                return fh.tell() + int(np.prod(shape)) * dtype.itemsize == size
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            return 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_clip(fmt: str, path: Path, pooled: bool) -> np.ndarray:
    """The clip embedding (D,) or (L, D) stored in an output file. An npy holds the clip when the run
    was `pooled`, else the frames, whose mean over time is the clip of a run without --pool."""
    if fmt == "npz":
        with np.load(path) as z:
            return z["clip"]
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))["clip"]
    arr = np.load(path)
    return arr if pooled else arr.mean(axis=-2)


def made_from(fmt: str, path: Path) -> str | None:
    """The input an npz or safetensors output says it was made from (its metadata's source); None
    for npy, which holds no metadata, or an output that cannot be read."""
    try:
        if fmt == "npz":
            with np.load(path) as z:
                return json.loads(str(z["metadata"]))["source"]
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                return json.loads(f.metadata()["metadata"])["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def write_table(out_dir: Path, name: str, rows: Sequence[tuple[str, str, np.ndarray]], layers: list[int],
                clip: tuple[int, ...]) -> list[Path]:
    """The clip embeddings of every row (input path, output rel path, clip shaped `clip`: (D,) or
    (L, D)) as one table: `name.parquet` (columns path, output, clip or clip_layer{i}) when pyarrow
    is installed, else `name.npy` (N, D) or (N, L, D) with `name.index.tsv` (path and output per
    row, in order). No rows give an empty table of that shape."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return _write_table_npy(out_dir, name, rows, clip)
    columns: dict[str, Any] = {"path": [table_name(r[0]) for r in rows], "output": [table_name(r[1]) for r in rows]}
    clips = _clip_matrix(rows, clip)
    if clips.ndim == 2:
        columns["clip"] = _fixed_lists(pa, clips)
    else:
        for j, layer in enumerate(layers):
            columns[f"clip_layer{layer}"] = _fixed_lists(pa, clips[:, j])
    table = pa.table(columns)
    path = out_dir / f"{name}.parquet"
    atomic_write(path, lambda fh: pq.write_table(table, fh))
    return [path]


def printable(text: str) -> str:
    """Text holding file names, as valid UTF-8 for Parquet strings and terminals: bytes of a name
    that is not UTF-8 show as \\xe9 escapes (the manifest and failed.txt keep the name exactly)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def table_name(text: str) -> str:
    """A file name as a table key: `printable`, with a backslash written as two, so that a Latin-1
    `caf\\xe9` and a name holding the characters `caf\\\\xe9` never meet (POSIX names rarely hold one)."""
    return printable(text.replace("\\", "\\\\"))


def _clip_matrix(rows: Sequence[tuple[str, str, np.ndarray]], clip: tuple[int, ...]) -> np.ndarray:
    """The rows' clips stacked: (N, D) or (N, L, D) float32."""
    if not rows:
        return np.zeros((0, *clip), np.float32)
    odd = next((r for r in rows if r[2].shape != rows[0][2].shape), None)
    if odd is not None:
        raise ValueError(f"{printable(odd[1])} holds a clip shaped {odd[2].shape} and {printable(rows[0][1])} one "
                         f"shaped {rows[0][2].shape}: they were made with other settings. Make them again with "
                         "the same settings (--overwrite) before writing a table of them.")
    return np.stack([r[2] for r in rows]).astype(np.float32)


def _fixed_lists(pa: Any, matrix: np.ndarray) -> Any:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _write_table_npy(out_dir: Path, name: str, rows: Sequence[tuple[str, str, np.ndarray]],
                     clip: tuple[int, ...]) -> list[Path]:
    matrix = _clip_matrix(rows, clip)
    index = "".join(f"{_tsv_field(r[0])}\t{_tsv_field(r[1])}\n" for r in rows)
    npy, tsv = out_dir / f"{name}.npy", out_dir / f"{name}.index.tsv"
    atomic_write(npy, lambda fh: np.save(fh, matrix))
    atomic_write(tsv, lambda fh: fh.write(("path\toutput\n" + index).encode()))
    return [npy, tsv]


def _tsv_field(text: str) -> str:
    """A name as one TSV field: as Parquet stores it (`table_name`), with a tab, line feed or carriage
    return written \\t, \\n, \\r (read it with quoting off: pandas' quoting=csv.QUOTE_NONE)."""
    return table_name(text).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
