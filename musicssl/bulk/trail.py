"""The files a run decodes in its own process, written down where the next run can read them.

Decoding in the run's process (`--num-workers 0`) has no isolation: a decoder that crashes there
ends the run, and a resumed run would decode the same file first and end again. So while a run
decodes files itself, `OUT/.decoding.*` names them; the run holds that file locked while it lives.
A later run that finds such a file unlocked (its run is dead) decodes the named files once in a
decoding process first: one that crashes there too is recorded as failed and left out.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from musicssl.bulk.manifest import lock


class Trail:
    """`OUT/.decoding.<pid>.<random>`: the paths being decoded in this process, NUL-separated (no
    path holds a NUL); empty between files. Threads may begin and end files at once."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / f".decoding.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        lock(self.fd, wait=False)  # new and ours: free (or no locks here, which lock() has said)
        self.names: list[bytes] = []
        self.guard = threading.Lock()

    def begin(self, path: str) -> None:
        with self.guard:
            self.names.append(os.fsencode(path))
            self._write()

    def end(self, path: str) -> None:
        with self.guard:
            self.names.remove(os.fsencode(path))
            self._write()

    def _write(self) -> None:
        data = b"\0".join(self.names)
        os.lseek(self.fd, 0, os.SEEK_SET)  # not pwrite: Windows has none
        os.write(self.fd, data)
        os.ftruncate(self.fd, len(data))

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def left_by_dead_runs(out_dir: Path) -> set[str]:
    """The files that runs now dead were decoding in their own process when they ended (their
    trails are removed)."""
    found = set()
    for trail in out_dir.glob(".decoding.*"):
        try:
            fd = os.open(trail, os.O_RDWR)
        except FileNotFoundError:  # another run took it first
            continue
        try:
            if lock(fd, wait=False):  # its run is gone
                names = os.read(fd, 1 << 20)
                trail.unlink(missing_ok=True)
                found.update(os.fsdecode(n) for n in names.split(b"\0") if n)
        finally:
            os.close(fd)
    return found
