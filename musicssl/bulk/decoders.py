"""Files decoded in our own processes (musicssl/audio/worker.py) and handed over in order.

A decoder that raises, crashes (a segfault in a C library, the kernel's out-of-memory kill) or hangs
on one file fails only that file: its process is replaced and the run goes on. An item is
{"index", "audio" (S,) float32 mono at the run's rate, "error" ("" if none), "warning" (what the
decoder warned of; "" if nothing), "seconds" spent decoding it}.

The processes are fresh interpreters that import no torch (~0.2 s to start), not forks of the run:
a forked child shares the run's memory copy-on-write, and on a 2-core machine that alone made the
model ~10 % slower for as long as the child lived. Nor are they multiprocessing's spawn: that imports
the caller's main script again in every process. With no processes (workers=0, or Windows, where
they cannot be started this way) files are decoded in the run's own process, without isolation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import numpy as np
import torch

from musicssl.audio.worker import decode_one, shared_slots
from musicssl.bulk.local import LocalDecoding
from musicssl.bulk.trail import Trail
from musicssl.errors import describe

# Files decoded here at once: up to GROUP_FILES per thread, beyond one per thread only while their
# size on disk stays under GROUP_BYTES (the run holds a group's audio, ~3x an MP3's size, at once).
GROUP_FILES, GROUP_BYTES = 4, 32 << 20
AHEAD = 4  # files queued per decoding process when decoding runs beside the model
SLOT = 1 << 22  # samples of one slot of shared memory (16 MiB: 4.4 min at 16 kHz); longer audio takes the socket
ISOLATED = os.name == "posix"  # pass_fds and fork-free process starts
log = logging.getLogger(__name__)
# A process's whole program: our path (so the same musicssl, and `decode`'s module, are found), then the worker.
BOOT = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
        "from musicssl.audio.worker import main; main(sys.argv[2])")


@dataclass
class _Worker:
    slots_fd: int  # shared memory for its slots (kept across restarts)
    slots: np.ndarray  # (n, SLOT) float32, one slot per file it may hold
    process: Any = None  # subprocess.Popen
    conn: Any = None  # multiprocessing.connection.Connection, our end
    tasks: deque[tuple[int, int]] = field(default_factory=deque)  # (index, slot) sent, in decoding order
    sent: int = 0  # tasks sent so far: the next one takes slot `sent % n`
    started: float = 0.0  # when it began the first of `tasks` (as far as we can tell)
    served: bool = False  # its process has handed back a file


class DecoderPool:
    """Decodes `paths` in `workers` processes and hands out their items in order.

    workers >= 1: each process keeps `AHEAD` files queued, decoding while the model runs.
    workers == 0: files are decoded here when asked for, `threads` at a time (local.LocalDecoding).
    On two cores that is fastest (a decoder beside the model preempts its threads, and a process
    costs ~1 ms per file to talk to), but a decoder that crashes or hangs takes the run with it.
    timeout: seconds a file may take to decode before its process is killed (None: no limit); a file
        decoded here that takes longer is named in a warning instead.
    decode: path, rate -> item without its index; a module-level function, imported by the processes.
    trail: where to name each file decoded in this process, for the next run should it crash here.
    threads: files decoded at once in this process.
    Use as a context manager, so that its processes stop with the run.
    """

    def __init__(self, paths: list[str], sample_rate: int, workers: int, timeout: float | None = None,
                 decode: Callable[[str, int], dict[str, Any]] = decode_one, trail: Trail | None = None,
                 threads: int = 1) -> None:
        self.paths, self.sample_rate, self.timeout, self.decode = paths, sample_rate, timeout, decode
        self.trail, self.threads = trail, threads
        self.here: LocalDecoding | None = None  # made when the first file is decoded in this process
        self.workers: list[_Worker] = []
        try:
            for _ in range(min(workers, len(paths)) if ISOLATED else 0):
                self.workers.append(self._start(_new_worker(AHEAD)))
        except OSError as err:  # no interpreter to start (embedded Python), no fds left, ...
            log.warning("decoding in the main process: could not start a decoding process (%s)", describe(err))
            self.close()
        self.done: dict[int, dict[str, Any]] = {}
        self.decoded = 0  # samples decoded so far (here, or as the processes hand files back)
        self.next_task = 0  # the first file not yet sent
        self.position = 0  # the next file to hand out

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> DecoderPool:
        return self

    def __next__(self) -> dict[str, Any]:
        index = self.position
        if index == len(self.paths):
            raise StopIteration
        self.position += 1
        if self.workers:
            self._send_tasks(index)
        while self.workers and index not in self.done:
            self._collect(index)
        if index in self.done:
            return self.done.pop(index)
        return self._decode_here(index)  # no processes (left)

    def _decode_here(self, index: int) -> dict[str, Any]:
        """Decode `index` here, and with it the next files, one per thread."""
        if self.here is None:
            self.here = LocalDecoding(self.sample_rate, self.decode, self.threads, self.timeout, self.trail)
        wanted = [k for k in self._group(index) if k not in self.done]
        for k, decoded in zip(wanted, self.here.decode([self.paths[k] for k in wanted])):
            self.done[k] = _as_item(k, decoded)
            self.decoded += len(decoded["audio"])
        return self.done.pop(index)

    def _group(self, index: int) -> range:
        """The files decoded here with `index`: one per thread, then more up to GROUP_FILES per thread
        while their size on disk allows (GROUP_BYTES): a group's start costs ~1 ms, and a few 10 s
        clips per thread take 2-4 ms each."""
        end, size = index, 0
        while end < len(self.paths) and end - index < self.threads * GROUP_FILES:
            size += _size(self.paths[end])
            if end - index >= self.threads and size > GROUP_BYTES:
                break
            end += 1
        return range(index, end)

    def close(self) -> None:
        """Stop the processes: idle ones are told to end (not waited for: subprocess reaps them);
        busy ones, left by a run that stopped early, are killed. Safe to call again."""
        if self.here:
            self.here.close()
            self.here = None
        workers, self.workers = self.workers, []
        for w in workers:
            if w.tasks:
                _stop(w.process)
            with contextlib.suppress(OSError):
                w.conn.send(None)
            w.conn.close()
            os.close(w.slots_fd)

    def grow(self) -> bool:
        """Start one more decoding process (it takes files from the next one queued); False if none
        can be started, or this pool decodes in its own process."""
        if not self.workers:
            return False
        try:
            self.workers.append(self._start(_new_worker(AHEAD)))
        except OSError as err:  # out of processes or fds: the ones running go on
            log.warning("could not start another decoding process (%s)", describe(err))
            return False
        return True

    # --- handing out files -------------------------------------------------------------------
    def _start(self, w: _Worker) -> _Worker:
        """(Re)start `w`'s process and send it the files it still holds."""
        ours, theirs = socket.socketpair()
        spec = {"fd": theirs.fileno(), "slots_fd": w.slots_fd, "slots": list(w.slots.shape),
                "sample_rate": self.sample_rate, "decode": f"{self.decode.__module__}:{self.decode.__qualname__}",
                "parent": os.getpid()}
        w.process = subprocess.Popen(
            [sys.executable, "-c", BOOT, json.dumps([p for p in sys.path if isinstance(p, str)]), json.dumps(spec)],
            pass_fds=(theirs.fileno(), w.slots_fd), stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C at a terminal is for the run, which then stops its processes
        )
        theirs.close()
        w.conn, w.started, w.served = Connection(ours.detach()), time.monotonic(), False
        for task in w.tasks:
            self._post(w, task)
        return w

    def _post(self, w: _Worker, task: tuple[int, int]) -> None:
        try:
            w.conn.send((task[0], self.paths[task[0]], task[1]))
        except OSError:  # it died between files: a new one takes its queue (this task included)
            _stop(w.process)
            w.conn.close()
            self._start(w)

    def _send_tasks(self, wanted: int) -> None:
        """Queue files from `wanted` on, as far ahead as the processes' queues allow."""
        last = wanted + AHEAD * len(self.workers) - 1
        while self.next_task <= min(last, len(self.paths) - 1):
            w = min(self.workers, key=lambda x: len(x.tasks))
            if len(w.tasks) == len(w.slots):
                return
            if not w.tasks:
                w.started = time.monotonic()
            task = self.next_task, w.sent % len(w.slots)
            w.tasks.append(task)
            w.sent += 1
            self.next_task += 1
            self._post(w, task)

    # --- taking items back -------------------------------------------------------------------
    def _collect(self, wanted: int) -> None:
        """Wait until some process answers, dies, or (for the one decoding `wanted`) runs out of time."""
        busy = [w for w in self.workers if w.tasks]
        holder = next(w for w in busy if w.tasks[0][0] == wanted)
        left = None if self.timeout is None else max(0.0, holder.started + self.timeout - time.monotonic())
        ready = wait([w.conn for w in busy], left)
        for w in busy:
            if w.conn in ready and not self._receive(w):  # it died: the file it was on failed
                self._died(w, w.process.wait())
        if not ready and self.workers:
            _stop(holder.process)
            self._fail_head(holder, (
                f"decoding did not finish within {self.timeout:g} s and was stopped (a stalled read, or a "
                "decoder stuck on damaged data); if the file is only very long or its disk slow, raise "
                "--decode-timeout"))

    def _receive(self, w: _Worker) -> bool:
        """Take `w`'s next item; False if its process is gone."""
        try:
            item = w.conn.recv()
            audio = torch.empty(item.pop("samples"))
            if item.pop("in_slot"):
                audio.numpy()[:] = w.slots[w.tasks[0][1], : len(audio)]
            else:
                w.conn.recv_bytes_into(audio.numpy())
        except (EOFError, OSError):
            return False
        w.tasks.popleft()
        self.done[item["index"]] = {**item, "audio": audio}
        self.decoded += len(audio)
        w.started, w.served = time.monotonic(), True
        return True

    def _died(self, w: _Worker, code: int) -> None:
        """A process that exits on its own before any file cannot start here (an interpreter that is
        not Python, a path without musicssl): decode in this process instead of failing every file."""
        if code > 0 and not w.served and self.workers:
            log.warning("decoding in the main process: decoding processes exit at start here (exit code %d; "
                        "their error is above)", code)
            self.close()
        elif self.workers:
            self._fail_head(w, _crash_reason(code))

    def _fail_head(self, w: _Worker, reason: str) -> None:
        """`w`'s process is gone while on its first file: that file failed; a new process takes the rest."""
        index, _ = w.tasks.popleft()
        self.done[index] = _as_item(index, {"audio": np.empty(0, np.float32), "error": f"{self.paths[index]}: {reason}",
                                            "warning": "", "seconds": 0.0})
        w.conn.close()
        self._start(w)


def _new_worker(slots: int) -> _Worker:
    """A worker with `slots` slots of shared memory (anonymous where the system allows: no /dev/shm
    size limit, as in containers, applies)."""
    size = slots * SLOT * 4
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("musicssl-decode")
    else:
        fd, name = tempfile.mkstemp(prefix="musicssl-decode-")
        os.unlink(name)
    os.ftruncate(fd, size)  # sparse: memory is taken only where samples are written
    return _Worker(fd, shared_slots(fd, slots, SLOT))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # decoding it will say why
        return 0


def _as_item(index: int, decoded: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, **decoded, "audio": torch.from_numpy(decoded["audio"])}


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def _crash_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        if name == "SIGKILL":
            return ("its decoding process was killed (SIGKILL, as the kernel's out-of-memory killer does): "
                    "decoding it needed more memory than was free")
        return (f"the decoder crashed on this file ({name}); it is skipped and the run goes on. Check that "
                "it plays, or convert it to FLAC or WAV (ffmpeg -i FILE OUT.flac) and embed that")
    return f"its decoding process exited unexpectedly (exit code {code})"
