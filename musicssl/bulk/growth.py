"""More decoding processes while a run waits for decoded audio (`musicssl embed` without --num-workers)."""

from __future__ import annotations

import logging
import time
from typing import Callable

from musicssl.bulk.decoders import DecoderPool
from musicssl.bulk.pipeline import LoopThreads

log = logging.getLogger(__name__)

# A run that waits for decoded audio more than GROW_SHARE of GROW_EVERY seconds adds a process.
GROW_EVERY, GROW_SHARE = 5.0, 0.2


class Growth:
    """Adds decoding processes while the run waits for decoded audio: how many a machine needs depends
    on its cores, the files' format and the model, which no fixed default knows (one MP3 decoder
    gives ~600x realtime; the default model on many cores can take more).

    Every GROW_EVERY seconds of the run, if it waited for decoded audio more than GROW_SHARE of that
    time, one process is added, up to `cap`, and the model gets one thread fewer (a core per decoder,
    as at the start). Once an added process does not raise the rate of decoded audio by a tenth
    (judged over the interval after the one it started in; the cores may be all busy), no more are
    added. `waited`: the run's seconds spent waiting so far.
    """

    def __init__(self, pool: DecoderPool, cap: int, waited: Callable[[], float], threads: LoopThreads) -> None:
        self.pool, self.cap, self.waited, self.threads = pool, cap, waited, threads
        self.since: float | None = None  # the start of this interval (from the first file: not the processes' start)
        self.waited_before, self.decoded_before = 0.0, 0  # at its start
        self.rate_before: float | None = None  # samples decoded per s in the interval before the last process came
        self.settled, self.warming = cap <= len(pool.workers), False

    def check(self) -> None:
        """After each file handed out."""
        if self.settled:
            return
        now = time.perf_counter()
        if self.since is not None:
            if now - self.since < GROW_EVERY:
                return
            span = now - self.since
            self._look(now, (self.pool.decoded - self.decoded_before) / span, (self.waited() - self.waited_before) / span)
        self.since, self.waited_before, self.decoded_before = now, self.waited(), self.pool.decoded

    def _look(self, now: float, rate: float, share: float) -> None:
        if self.warming:  # the interval in which the last process started and filled its queue
            self.warming = False
            return
        if self.rate_before is not None and rate < 1.1 * self.rate_before:
            self.settled = True
            log.info("another decoding process did not speed the run up: %d decoding processes", len(self.pool.workers))
            return
        self.rate_before = None
        if share > GROW_SHARE and self.pool.grow():
            self.threads.one_fewer()
            self.rate_before, self.warming, self.settled = rate, True, len(self.pool.workers) >= self.cap
            log.info("waited for decoded audio %.0f %% of the last %.0f s: %d decoding processes now, %d "
                     "threads for the model", 100 * share, now - self.since, len(self.pool.workers),
                     self.threads.model_threads)
