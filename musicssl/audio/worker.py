"""The decoding process of a bulk run (musicssl/bulk/decoders.py starts it and calls `main`): it
decodes the files it is sent and hands back their samples. It imports no torch, so it starts in a
fraction of a second.

Protocol on its socket (multiprocessing Connection): in, (index, path, slot) or None to stop; out,
the item without its audio plus "samples" (S) and "in_slot": whether the (S,) float32 samples are in
slot `slot` of the shared memory the run handed it (memory the run owns, so a crash on the next file
cannot take them back), or follow on the socket as raw bytes because they do not fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from musicssl.errors import describe


def decode_one(path: str, sample_rate: int) -> dict[str, Any]:
    """{"audio" (S,) float32 mono at `sample_rate`, "error" ("" if none), "warning" (what the decoder
    warned of, e.g. a truncated file decoded in part; "" if nothing), "seconds"}. Whatever the
    decoders raise becomes the file's error."""
    from musicssl.audio.io import load_audio

    start = time.perf_counter()
    with _warnings_of("musicssl.audio") as warned:
        try:
            audio, _ = load_audio(path, sr=sample_rate, mono=True)
            audio, error = np.ascontiguousarray(audio, dtype=np.float32), ""
        except Exception as err:  # noqa: BLE001 -- any cause is this one file's error
            audio, error = np.empty(0, np.float32), describe(err)
    return {"audio": audio, "error": error, "warning": " ".join(warned), "seconds": time.perf_counter() - start}


class _Collect(logging.Handler):
    """Warnings logged by the thread that made it: a run decodes several files at once on threads
    (`--num-workers 0`), and one file's warning must not land in another's manifest line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(" ".join(record.getMessage().split()))


@contextlib.contextmanager
def _warnings_of(logger: str) -> Iterator[list[str]]:
    """The warnings `logger` logs inside the block (they are still printed as usual): a run keeps
    them in its manifest, where a decoding process's stderr would lose them."""
    handler = _Collect()
    logging.getLogger(logger).addHandler(handler)
    try:
        yield handler.messages
    finally:
        logging.getLogger(logger).removeHandler(handler)


def serve(conn: Connection, sample_rate: int, slots: np.ndarray, decode: Callable[[str, int], dict[str, Any]]) -> None:
    """Decode what `conn` sends until None, or until the run is gone (its end closes).
    slots: (n, L) float32 shared with the run."""
    while True:
        try:
            task = conn.recv()
            if task is None:
                return
            index, path, slot = task
            item = decode(path, sample_rate)
            audio = item.pop("audio")
            fits = len(audio) <= slots.shape[1]
            if fits:
                slots[slot, : len(audio)] = audio
            conn.send({"index": index, **item, "samples": len(audio), "in_slot": fits})
            if not fits:
                conn.send_bytes(audio)
        except (EOFError, OSError):  # the run ended or was killed
            return


def shared_slots(fd: int, n: int, length: int) -> np.ndarray:
    """(n, length) float32 over the shared memory file `fd` (the run's and its process's view)."""
    return np.frombuffer(mmap.mmap(fd, n * length * 4), np.float32).reshape(n, length)


def main(spec: str) -> None:
    """Entry point: `spec` is JSON {"fd", "slots_fd", "slots": [n, L], "sample_rate", "decode":
    "module:name", "parent": pid}."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, a scheduler's SIGTERM: the run's to handle; it stops us
        signal.signal(sig, signal.SIG_IGN)
    args = json.loads(spec)
    _die_with(args["parent"])
    module, name = args["decode"].split(":")
    decode = getattr(importlib.import_module(module), name)
    serve(Connection(args["fd"]), args["sample_rate"], shared_slots(args["slots_fd"], *args["slots"]), decode)


def _die_with(parent: int) -> None:
    """Be killed when the run dies (Linux), even while stuck in a read that never returns: a run
    killed with SIGKILL cannot stop us, and its socket's end closing reaches us only between files."""
    with contextlib.suppress(Exception):  # no prctl outside Linux: there the socket's end is all we have
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we asked
        os._exit(0)

