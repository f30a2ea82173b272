"""Files decoded in the run's own process (`--num-workers 0`), several at a time on threads.

The run waits for each group of files, so no decoder runs beside the model (on few cores a decoder
beside it preempts its threads), yet every core decodes: libsndfile, soxr and numpy let go of
Python's lock. On 2 cores, two threads decode 44.1 kHz MP3 1.7-1.9x as fast as one, and a run of
the default model is 12-21 % faster (bench/decode_workers.py). There is no isolation here: the trail names the files in hand for the next run should this one crash, and a
watch names a file whose decoding outlasts the timeout, which cannot be stopped here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from musicssl.bulk.trail import Trail

log = logging.getLogger(__name__)


class LocalDecoding:
    """Decodes groups of files here, one file per thread (`threads`), and returns them in order."""

    def __init__(self, sample_rate: int, decode: Callable[[str, int], dict[str, Any]], threads: int,
                 timeout: float | None, trail: Trail | None) -> None:
        self.sample_rate, self.decode_file = sample_rate, decode
        self.watch = _SlowDecodeWatch(timeout, restart_retries=trail is not None) if timeout else None
        self.notes = [n for n in (trail, self.watch) if n]  # told of each file as it begins and ends
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="musicssl-decode") if threads > 1 else None

    def decode(self, paths: list[str]) -> list[dict[str, Any]]:
        """Items of `paths` (see decoders), once all are decoded."""
        if self.pool is None or len(paths) == 1:
            return [self._one(p) for p in paths]
        return list(self.pool.map(self._one, paths))

    def _one(self, path: str) -> dict[str, Any]:
        for note in self.notes:
            note.begin(path)
        try:
            return self.decode_file(path, self.sample_rate)
        finally:
            for note in self.notes:
                note.end(path)

    def close(self) -> None:
        """Stop the watch; a thread stuck in a decode is not waited for."""
        if self.watch:
            self.watch.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class _SlowDecodeWatch:
    """Says which file is at fault when one decoded in the run's own process takes longer than the
    timeout: there it cannot be stopped (a stalled read, or a decoder stuck in C code, holds the
    process), but its name and what to do can be logged, once per file, from a thread of our own."""

    def __init__(self, timeout: float, restart_retries: bool) -> None:
        self.timeout, self.restart_retries = timeout, restart_retries
        self.current: dict[str, float] = {}  # path -> when it began, for the files being decoded
        self.stopped = threading.Event()
        threading.Thread(target=self._run, name="musicssl-decode-watch", daemon=True).start()

    def begin(self, path: str) -> None:
        self.current[path] = time.monotonic()

    def end(self, path: str) -> None:
        self.current.pop(path, None)

    def close(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        warned: set[tuple[str, float]] = set()
        while not self.stopped.wait(min(1.0, self.timeout)):  # looks once a second: free next to decoding
            now, decoding = time.monotonic(), set(self.current.items())
            for path, began in decoding - warned:
                if now - began > self.timeout:
                    warned.add((path, began))
                    log.warning("%s", self._message(path))
            warned &= decoding

    def _message(self, path: str) -> str:
        head = (f"{path}: still decoding after {self.timeout:g} s in the run's own process (--num-workers 0), "
                f"where a decode cannot be stopped. If it hangs, end the run (kill {os.getpid()})")
        if self.restart_retries:
            return (f"{head} and start it again: the new run decodes this file first in a separate process, "
                    "stops it after --decode-timeout and records it as failed. With --num-workers 1 or more, "
                    "such a file is stopped and fails without a restart")
        return f"{head} and run again with --num-workers 1 or more: such a file is then stopped and fails alone"
