"""Outputs written on background threads, so file I/O (and its fsync) overlaps the next batches."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class BackgroundWriter:
    """Runs tasks on `threads` threads, with at most `limit` waiting (each holds a file's arrays).

    Several threads because file I/O waits on the disk: with one writer thread an H100 run of 10 s
    MP3s was capped at ~60 files/s whatever the model (~600x realtime), with 8 at ~130. Tasks must
    not depend on each other's order. An exception in a task is re-raised in the caller's thread by
    the next `submit` or by `close`.
    """

    def __init__(self, limit: int = 32, threads: int = 8) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="musicssl-writer")
        self.slots = threading.BoundedSemaphore(limit)
        self.failure: BaseException | None = None
        self.waited = 0.0  # seconds `submit` waited for a free slot: the writers were behind

    def submit(self, task: Callable[..., None], *args: Any) -> None:
        self.check()
        start = time.perf_counter()
        self.slots.acquire()
        self.waited += time.perf_counter() - start
        self.pool.submit(self._run, task, args)

    def _run(self, task: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            task(*args)
        except BaseException as err:  # noqa: BLE001 -- handed to the caller's thread by check()
            self.failure = self.failure or err
        finally:
            self.slots.release()

    def check(self) -> None:
        if self.failure is not None:
            err, self.failure = self.failure, None
            raise err

    def close(self, check: bool = True) -> None:
        """Wait for every task; then re-raise a task's exception if `check`."""
        self.pool.shutdown(wait=True)
        if check:
            self.check()
