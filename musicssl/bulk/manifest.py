"""What a run leaves beside its outputs: `manifest.jsonl` (one line per input per run), `run.json`
(how the outputs were made), the list of failed inputs, and claims that keep two runs on one OUT
from embedding the same file at once.

Appends to the manifest hold an exclusive lock on it, so concurrent runs on one machine (or on a
filesystem with working locks) interleave whole lines; a line cut short by a kill is skipped on read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go on unlocked (see `lock`)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
RUN_INFO = "run.json"
# Keys of run.json that must agree for a new run to add to (and skip on) existing outputs.
# layer_axis: whether frames carry a layer axis (--layers 5 gives (1, T, D) where "last" gives (T, D)).
SAME_RUN_KEYS = ("model_sha256", "layers", "layer_axis", "pool", "format", "dtype")


def settings_id(info: dict[str, Any]) -> str:
    """A short digest of run.json's SAME_RUN_KEYS, stamped on each output's manifest line: a run
    tells outputs made with other settings (by an --overwrite run over part of the inputs, or one
    cut short) from its own."""
    return hashlib.sha256(json.dumps([info.get(k) for k in SAME_RUN_KEYS]).encode()).hexdigest()[:16]


def earlier_root(out_dir: Path) -> Path | None:
    """The root an earlier run into `out_dir` laid its outputs out from (run.json), if any."""
    try:
        root = json.loads((out_dir / RUN_INFO).read_text())["root"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(root) if isinstance(root, str) and os.path.isabs(root) else None


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append JSON lines under an exclusive lock, starting on a fresh line if a killed run left half a line."""
    if not records:
        return
    data = json_lines(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        lock(fd, wait=True)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)  # closing releases the lock


def json_lines(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The manifest's records in order; damaged lines (cut short by a killed run, garbled) are skipped."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for line in fh:
            try:
                yield json.loads(line)  # its lines are ASCII (json escapes): other bytes are damage
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue


@dataclass
class ManifestView:
    """What a run needs of the manifest, from one pass over it.

    stamps: output (its name in OUT) -> the settings stamp of its latest `ok` record ("" for a
        record older than stamps). By output, not input: where an input's output goes depends on
        the root.
    owners: output -> the input that made it: of its latest `ok` record, else (a manifest lost
        and made again by skips) of its latest `skipped` one.
    latest: input -> its latest record.
    newest: input -> the output its latest `ok` or `skipped` record names (an input laid out
        anew under another root has an older output elsewhere).
    """

    stamps: dict[str, str] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    newest: dict[str, str] = field(default_factory=dict)

    def newest_by_real_path(self) -> dict[str, str]:
        """`newest` keyed by the inputs' real paths (one realpath per distinct input)."""
        return {os.path.realpath(i): o for i, o in self.newest.items()}


def read_view(path: Path) -> ManifestView:
    view, skipped_by = ManifestView(), {}
    for r in read_records(path):
        if "input" not in r:
            continue
        view.latest[r["input"]] = r
        status, out = r.get("status"), r.get("output")
        if out is None or status not in ("ok", "skipped"):
            continue
        view.newest[r["input"]] = out
        if status == "ok":
            view.stamps[out], view.owners[out] = r.get("settings", ""), r["input"]
        else:
            skipped_by[out] = r["input"]
    view.owners = {**skipped_by, **view.owners}
    return view


def check_compatible(out_dir: Path, info: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix outputs of different models or settings in one OUT (unless `overwrite`, which
    only says what stays as it was)."""
    path = out_dir / RUN_INFO
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # unreadable: written by something else; the outputs themselves carry metadata
    diff = [k for k in SAME_RUN_KEYS if k in old and old[k] != info.get(k)]
    if "model_sha256" in diff and old.get("model") != info.get("model"):
        diff.insert(0, "model")  # the names say more than the digests
    if not diff:
        return
    shown = ", ".join(f"{k}: {old.get(k)!r} there, {info.get(k)!r} now" for k in diff)
    if overwrite:
        log.warning("%s holds embeddings made with other settings (%s): --overwrite redoes this run's inputs; "
                    "outputs of other inputs stay as they were, and a later run over them makes them again",
                    out_dir, shown)
        return
    raise ValueError(
        f"{out_dir} holds embeddings made with other settings ({shown}); existing outputs would be "
        f"skipped and mixed with new ones. Use another -o, or --overwrite to redo every file."
    )


def write_run_info(out_dir: Path, info: dict[str, Any]) -> None:
    from musicssl.bulk.outputs import atomic_write

    atomic_write(out_dir / RUN_INFO, lambda fh: fh.write(json.dumps(info, indent=2) + "\n"), mode="w")


def write_failed(path: Path, inputs: list[str]) -> None:
    """One failed input per line: a list file that `--files-from` takes to retry them."""
    from musicssl.bulk.outputs import atomic_write

    # As bytes: a name that is not UTF-8 (an old Latin-1 share) comes back as it was (read_list).
    atomic_write(path, lambda fh: fh.write(b"".join(os.fsencode(p) + b"\n" for p in inputs)))


class Claim:
    """An exclusive, non-blocking lock on `.NAME.lock` beside an output, held while it is made.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one.
    """

    def __init__(self, output: Path) -> None:
        self.path = output.parent / f".{output.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not lock(fd, wait=False):
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


# What flock raises on filesystems without locks (some FUSE and object-store mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)
_warned_no_locks: list[bool] = []


def lock(fd: int, wait: bool) -> bool:
    """An exclusive flock on `fd`: False if another process holds it (only when not `wait`ing). Where
    the filesystem has no locks the run goes on unlocked, saying once what that risks."""
    try:
        if fcntl is None:
            raise OSError(errno.ENOSYS, "this system has no flock")
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
        if not _warned_no_locks:
            _warned_no_locks.append(True)
            log.warning("this filesystem has no file locks (%s): the run goes on, but two runs on the same "
                        "output folder at once could embed a file twice or interleave manifest lines; "
                        "give each its own --shard", err.strerror)
    return True


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RecordSink:
    """Where a process writes its records: the shared manifest (locked per append), or, under
    torchrun, a part file this process holds locked until the run ends (then merged by rank 0)."""

    def __init__(self, path: Path, hold: bool = False) -> None:
        self.path, self.fd = path, None
        if hold:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            lock(self.fd, wait=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.fd is None:
            append_records(self.path, records)
        elif records:
            os.write(self.fd, json_lines(records))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def merge_parts(out_dir: Path) -> int:
    """Append every finished part file (`.manifest.*.part.jsonl` that no live process holds) to the
    manifest and delete it; returns how many were merged."""
    merged = 0
    for part in sorted(out_dir.glob(".manifest.*.part.jsonl")):
        fd = os.open(part, os.O_RDONLY)
        try:
            if not lock(fd, wait=False):
                continue  # still being written by a live run
            append_records(out_dir / MANIFEST, list(read_records(part)))
            part.unlink()
            merged += 1
        finally:
            os.close(fd)
    return merged
