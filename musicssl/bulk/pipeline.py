"""The moving parts of a run once files are decoded (bulk/decoders.py): their windows packed into
batches across files, batches run with a fallback to smaller batches, and frames stitched back per file.

Sizes: audio (S,) float32 at the model's rate; a window is at most `context_seconds` of it; a batch
is (b, S_max) zero-padded; a file's frames buffer is (T, L, D) with L the kept layers.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from musicssl.errors import describe
from musicssl.models.base import Encoder, Launched, RunningPool, Window


@dataclass(eq=False)
class OpenFile:
    """A decoded file whose windows are being embedded."""

    index: int  # into the run's job list
    seq: int  # arrival order
    audio: torch.Tensor  # (S,)
    frames: torch.Tensor | RunningPool  # (T, L, D), filled window by window (pooled: a running sum and max)
    windows_left: int
    last_window: int
    seconds: float  # time spent on it so far (decode + its share of batches)
    error: str = ""
    warning: str = ""  # from decoding: kept in the manifest


@dataclass
class WindowPacker:
    """Pools the windows of open files and hands out batches of `batch_size`, padding little.

    A batch goes out as soon as `batch_size` windows of one length wait: full-context windows, or the
    equal last windows of equal-length files. Other windows wait for company of their length. When
    more than `max_open` files, or files holding more than `max_bytes` of audio and frames, wait on
    windows, the oldest file's windows go first, joined by the waiting windows nearest to them in
    length, so its buffers are freed. (Taking the longest windows of the few files at hand padded
    14-32 % of MERT's compute on folders of 1-600 s files; this pads 2-9 %, bench/packing.py.)
    """

    batch_size: int
    max_open: int
    max_bytes: int = 1 << 30
    pool: list[tuple[OpenFile, Window]] = field(default_factory=list)  # longest first, then oldest
    waiting: dict[int, int] = field(default_factory=dict)  # id(file) -> its windows in the pool
    held: int = 0  # bytes of audio and frames of the files in `waiting`

    def add(self, f: OpenFile, windows: list[Window]) -> None:
        for w in windows:
            bisect.insort(self.pool, (f, w), key=_longest_first)
        self.waiting[id(f)] = len(windows)
        self.held += _nbytes(f)

    def open_files(self) -> int:
        return len(self.waiting)

    def crowded(self) -> bool:
        return len(self.waiting) > self.max_open or self.held > self.max_bytes

    def ready(self) -> bool:
        return self.crowded() or self._equal_run() is not None

    def _equal_run(self) -> int | None:
        """Where in the pool `batch_size` windows of one length start (longest such), or None."""
        start = 0
        for _, run in itertools.groupby(p[1].length for p in self.pool):
            n = sum(1 for _ in run)
            if n >= self.batch_size:
                return start
            start += n
        return None

    def take(self) -> list[tuple[OpenFile, Window]]:
        for f, _ in [p for p in self.pool if p[0].error]:
            self._drop(f, 1)
        self.pool = [p for p in self.pool if not p[0].error]
        if not self.pool:
            return []
        if self.crowded():
            batch = self._oldest_first()
        else:  # a batch of one length, or (when the run drains the pool) the longest windows
            start = self._equal_run() or 0
            batch = self.pool[start : start + self.batch_size]
        taken = {id(p) for p in batch}
        self.pool = [p for p in self.pool if id(p) not in taken]
        for f, _ in batch:
            self._drop(f, 1)
        return batch

    def _oldest_first(self) -> list[tuple[OpenFile, Window]]:
        """The oldest file's windows, then the waiting windows nearest to its first in length."""
        oldest = min(self.pool, key=lambda p: (p[0].seq, p[1].index))
        own = [p for p in self.pool if p[0] is oldest[0]][: self.batch_size]
        others = sorted((p for p in self.pool if p[0] is not oldest[0]),
                        key=lambda p: (abs(p[1].length - oldest[1].length), p[0].seq, p[1].index))
        return own + others[: self.batch_size - len(own)]

    def _drop(self, f: OpenFile, n: int) -> None:
        self.waiting[id(f)] -= n
        if not self.waiting[id(f)]:
            del self.waiting[id(f)]
            self.held -= _nbytes(f)


def _longest_first(p: tuple[OpenFile, Window]) -> tuple[int, int, int]:
    return -p[1].length, p[0].seq, p[1].index


def _nbytes(f: OpenFile) -> int:
    return f.audio.nbytes + f.frames.nbytes


class Stopwatch:
    """Seconds of a loop spent per stage (`with watch("model"): ...`), to say what bounds a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def each(self, stage: str, items: Iterable[Any]) -> Iterator[Any]:
        """The items of `items`, the time spent waiting for each counted to `stage`."""
        it = iter(items)
        while True:
            with self(stage):
                item = next(it, _END)
            if item is _END:
                return
            yield item


_END = object()


class LoopThreads:
    """torch's threads in the run's loop: one for its own work on the host (stacking windows,
    stitching frames, pooling clips), `model` of them only while the model runs.

    torch's thread pool waits at every parallel op for its slowest thread, and the loop's ops are
    small: while the cores are busy (decoders, writer threads, other jobs) each waited milliseconds
    for a thread to be scheduled. One thread copies a file's frames in a fraction of a millisecond
    (bench/host_overhead.py). `model`: the cores the decoders leave on CPU, one on a GPU.
    """

    def __init__(self, model: int) -> None:
        self.model_threads, self.before = max(1, model), torch.get_num_threads()

    def __enter__(self) -> "LoopThreads":
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        """The model's threads for the block (setting them costs well under a microsecond)."""
        torch.set_num_threads(self.model_threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def one_fewer(self) -> None:
        """A core less for the model: a decoding process took it."""
        self.model_threads = max(1, self.model_threads - 1)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class BatchRunner:
    """Runs packed windows through the encoder and stitches their frames into their files.

    On a GPU, `run` starts a batch and then stitches the batch started before it, so the host's work
    overlaps the device's; `flush` stitches the last one. A batch that fails (out of memory, or an
    error from one file's audio) is split in halves and retried; a single window that still fails
    marks its file as failed.
    """

    encoder: Encoder
    keep: list[int]
    on_split: Callable[[int, BaseException], None] = lambda n, err: None
    watch: Stopwatch = field(default_factory=Stopwatch)  # "model": starting batches and waiting for them
    threads: LoopThreads | None = None  # the model's threads, while it runs (None: as they are)
    pending: tuple[list[tuple[OpenFile, Window]], Launched, float] | None = None  # (batch, launched, s to start)

    def __post_init__(self) -> None:
        self.plan = self.encoder.window_plan()

    def run(self, batch: list[tuple[OpenFile, Window]]) -> None:
        batch = [(f, w) for f, w in batch if not f.error]
        if not batch:
            return
        if self.encoder.device.type != "cuda":
            self.flush()  # nothing to overlap on a CPU: stitch first, and hold one batch's frames, not two
        start = time.perf_counter()
        try:
            wav = self.encoder.stack_windows([f.audio for f, _ in batch], [w for _, w in batch])
            rows = None  # pooled files: their windows are reduced on the model's device (launch_windows)
            if isinstance(batch[0][0].frames, RunningPool):
                rows = self.encoder.rows_to_pool([w for _, w in batch], [w.index == f.last_window for f, w in batch],
                                                 self.plan)
            with self.watch("model"), self.threads.model() if self.threads else contextlib.nullcontext():
                launched = self.encoder.launch_windows(wav, [w.length for _, w in batch], self.keep, rows)
        except Exception as err:  # noqa: BLE001 -- split to isolate the cause; see the class docstring
            self.flush()
            self._recover(batch, err)
            return
        spent = time.perf_counter() - start
        self.flush()
        self.pending = batch, launched, spent

    def flush(self) -> None:
        """Stitch the batch started last, if any, into its files."""
        if self.pending is None:
            return
        (batch, launched, spent), self.pending = self.pending, None
        start = time.perf_counter()
        try:
            with self.watch("model"):
                stacked, n_valid = launched.result()
        except Exception as err:  # noqa: BLE001 -- as in run()
            self._recover(batch, err)
            return
        # Time spent starting it and waiting for it, not the other batches' time in between.
        share = (spent + time.perf_counter() - start) / len(batch)
        for j, (f, w) in enumerate(batch):
            if isinstance(f.frames, RunningPool):
                f.frames.add(stacked[j])
            else:
                self.encoder.place_window(f.frames, w, w.index == f.last_window, stacked[j], n_valid[j], self.plan)
            f.windows_left -= 1
            f.seconds += share

    def _recover(self, batch: list[tuple[OpenFile, Window]], err: Exception) -> None:
        oom = is_out_of_memory(err)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            f = batch[0][0]
            f.error = ("out of memory even for one window: use a smaller model, --dtype bf16 or another device"
                       if oom else f"embedding failed: {describe(err)}")
            return
        self.on_split(len(batch), err)
        half = len(batch) // 2
        self.run(batch[:half])
        self.run(batch[half:])
        self.flush()
