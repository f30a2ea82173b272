"""`musicssl.extract()`: embed a whole collection into a folder of outputs, resumably.

    result = musicssl.extract(["music/"], "feats/", model="mert-v1-95m", layers="all", num_workers=4)
    result.failed, result.manifest            # how many inputs failed, and where each is described

One run: plan the jobs (plan.py), skip finished outputs, decode the rest in worker processes, embed
their windows in batches packed across files (pipeline.py), write each output atomically
(outputs.py) and a manifest line per input (manifest.py). Under torchrun each process takes its
share and rank 0 merges the records (distributed.py).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from musicssl import __version__, signals
from musicssl.audio.io import AUDIO_EXTENSIONS, audio_suffixes
from musicssl.bulk import distributed
from musicssl.bulk.manifest import (MANIFEST, RUN_INFO, Claim, RecordSink, check_compatible, earlier_root,
                                    merge_parts, now, read_view, settings_id, write_failed, write_run_info)
from musicssl.bulk.outputs import (FORMATS, looks_complete, made_from, make_out_dir, read_clip, sync_outputs,
                                   unmade_if_unused, write_output, write_table)
from musicssl.bulk.decoders import DecoderPool
from musicssl.bulk.growth import Growth
from musicssl.bulk.pipeline import BatchRunner, LoopThreads, OpenFile, Stopwatch, WindowPacker
from musicssl.bulk.plan import Job, parse_shard, plan_jobs, take_shard
from musicssl.bulk.trail import Trail, left_by_dead_runs
from musicssl.bulk.writer import BackgroundWriter
from musicssl.devices import check_device
from musicssl.errors import OutputPathError, first_line
from musicssl.models.base import Encoder, LayersArg, RunningPool, check_batch_size, is_single_layer
from musicssl.registry import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """Counts over this run's inputs (all ranks under torchrun) and where to look next."""

    ok: int
    skipped: int
    failed: int
    out_dir: Path
    root: Path
    manifest: Path
    failed_list: Path | None  # the failed inputs, one per line (a --files-from list); None if none failed
    tables: list[Path] = field(default_factory=list)
    audio_seconds: float = 0.0  # audio embedded by this run
    wall_seconds: float = 0.0
    stopped_early: bool = False  # --fail-fast stopped at the first failure, or the output disk is full
    errors: list[tuple[str, str]] = field(default_factory=list)  # (input, reason); under torchrun the first 10 of each rank
    # Where this process's time went, in seconds: "model" (starting batches and waiting for their
    # results), "decoding" (waiting for decoded audio), "writing" (waiting for the writer threads and
    # the final sync), "host" (the rest: stitching, bookkeeping).
    stages: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""  # why this process stopped early, e.g. "at the first failure: --fail-fast"
    warned: int = 0  # embedded, but decoding warned (e.g. a damaged file used up to the damage): see the manifest
    planned: int = 0  # this run's inputs (this shard's, over all ranks); more than `total` when it stopped early
    found: int = 0  # inputs found before --shard took its part
    # (path, reason): folders whose search failed, audio files that could not be looked at (a link
    # that leads nowhere): what they hold was not embedded
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + self.skipped + self.failed

    @property
    def exit_code(self) -> int:
        """1 when an input failed, a folder could not be searched, the run stopped early, or there was no input."""
        return 1 if self.failed or self.unreadable or self.stopped_early or not self.found else 0


class _Stop(Exception):
    """The run ends early: --fail-fast at the first failure, or an output disk that is full."""


# Threads that decode files when the run decodes in its own process (local.py), one per core up to
# this: the run holds a group of decoded files at once.
LOCAL_THREADS = 4

# Write errors that every later output would meet too.
_OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def extract(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] = (),
    out: str | os.PathLike = "embeddings",
    model: str | os.PathLike | Encoder = DEFAULT_MODEL,
    *,
    files_from: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    extensions: Iterable[str] | None = None,
    layers: LayersArg = "last",
    pool: str | None = None,
    format: str = "npz",
    table: bool = False,
    batch_size: int = 8,
    num_workers: int | None = None,
    decode_timeout: float | None = 600.0,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    shard: str | None = None,
    fail_fast: bool = False,
    offline: bool | None = None,
    progress: bool | None = None,
    log_every: float = 30.0,
    compile: bool = False,
) -> ExtractResult:
    """Embed every audio file of `inputs` (a file or folder, or a list of them) and `files_from` (a
    list file, "-" for stdin) into `out`, mirroring their tree under `root` (default: the deepest
    folder holding them, or an earlier run's root in `out` when it holds them all).

    model: a registry name, "hf-hub:org/repo", a release folder, or a loaded Encoder.
    layers, pool: as in `Encoder.embed`; format: "npz", "npy" or "safetensors"; table: also write
        the clip embeddings of every output in `out` made with these settings (a shard's: its own)
        as one table (Parquet, or .npy plus an index).
    device, dtype: where and in what precision the model runs (default: a GPU when there is one;
        the model's own dtype); outputs are stored in float32 whatever the dtype.
    batch_size: windows per forward pass, packed across files; num_workers: decoding processes
        (default up to 8 with a GPU; on CPU 1, or 0 with two cores or fewer; by default more are added
        while the run waits for decoded audio; 0 decodes in this process). In a decoding process, a
        file that crashes or hangs its decoder fails alone.
    decode_timeout: with decoding processes, seconds one file may take to decode before it is
        stopped and failed (None: no limit); decoding in this process, the file is named in a warning.
    compile: run the model through `torch.compile` with padded batches (`Encoder.compile_windows`).
    shard: "K/N" takes the K-th of N deterministic parts (K from 0); under torchrun each process
        then takes its share of that.
    progress: a bar (default: when stderr is a terminal); otherwise a log line every `log_every` s.
    """
    inputs = _check_inputs(inputs)
    _check_settings(out, batch_size, num_workers, decode_timeout, format, pool, device, dtype, shard, log_every)
    out = os.path.expanduser(out)  # "~/feats" as load() and the inputs read it, not a folder named "~"
    ranks = distributed.from_env()
    if files_from is not None and os.fspath(files_from) == "-" and ranks:
        raise ValueError("--files-from - under torchrun: every process would read the one standard input, and "
                         "most would get none of it; write the list to a file and give its path")
    if ranks:
        distributed.start(ranks)
    try:
        with unmade_if_unused(out):  # a run that never began (a bad model) leaves no folder
            run = _Run(inputs, out, files_from, root, extensions, shard, ranks, format, overwrite)
            if not run.found:  # no model loaded, no folder made
                return run.nothing_found(inputs, files_from, extensions)
            return run.execute(model, layers=layers, pool=pool, table=table, batch_size=batch_size,
                               num_workers=num_workers, decode_timeout=decode_timeout, device=device, dtype=dtype,
                               fail_fast=fail_fast, offline=offline, progress=progress, log_every=log_every,
                               compile=compile)
    finally:
        if ranks:
            distributed.stop()


def _check_inputs(inputs: Any) -> list[str | os.PathLike]:
    """`inputs` as a list of paths: one file or folder, or a list of them (not its characters)."""
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(i, (str, os.PathLike)) for i in inputs):
        return list(inputs)
    raise TypeError(f"inputs must be a file or folder, or a list of them (str or Path), not {_short(inputs)}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}..." if len(text) > 60 else f"{type(value).__name__} {text}"


def _check_settings(out: Any, batch_size: int, num_workers: int | None, decode_timeout: float | None,
                    format: str, pool: str | None, device: str | None, dtype: Any, shard: Any, log_every: Any) -> None:
    """Refuse bad settings before any folder is made or model loaded."""
    check_batch_size(batch_size)
    if num_workers is not None and not (isinstance(num_workers, int) and not isinstance(num_workers, bool)
                                        and num_workers >= 0):
        raise ValueError(f"num_workers must be an integer >= 0 (or None for the default), not {num_workers!r}")
    if decode_timeout is not None and not (_is_number(decode_timeout) and decode_timeout > 0):
        raise ValueError(f"decode_timeout must be seconds > 0 (or None for no limit), not {decode_timeout!r}")
    if not (_is_number(log_every) and log_every > 0):
        raise ValueError(f"log_every must be seconds > 0 between progress lines, not {log_every!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.bfloat16 (or None for the model's "
                         f"own), not {dtype!r}")
    if shard is not None:
        if not isinstance(shard, str):
            raise ValueError(f"shard takes 'K/N' as a string, e.g. '0/4' for the first of four, not {shard!r}")
        parse_shard(shard)
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be the output folder (str or Path), not {_short(out)}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, not {format!r}")
    if pool not in (None, "mean", "max"):
        raise ValueError(f"pool must be None, 'mean' or 'max', not {pool!r}")
    check_device(device)
    if not os.fspath(out):  # os.path.abspath("") is the working folder: an unset $OUT would fill it
        raise ValueError("the output folder is empty (an unset variable?): give -o/out a folder")


class _Run:
    """The state of one extraction run in one process."""

    def __init__(self, inputs: Sequence[Any], out: Any, files_from: Any, root: Any, extensions: Any,
                 shard: str | None, ranks: distributed.Ranks | None, fmt: str, overwrite: bool) -> None:
        self.out_dir = Path(os.path.abspath(out))
        self.format, self.overwrite, self.ranks, self.shard = fmt, overwrite, ranks, shard
        self.unreadable: list[tuple[Path, str]] = []  # what the search of input folders could not read
        jobs, self.root = plan_jobs(inputs, self.out_dir, FORMATS[fmt], files_from=files_from, root=root,
                                    extensions=extensions, earlier_root=earlier_root(self.out_dir),
                                    unreadable=self.unreadable)
        self.found = len(jobs)
        if shard:
            jobs = take_shard(jobs, *parse_shard(shard))
        self.jobs = jobs  # this shard's jobs: the scope of the failed list and the table
        self.mine = jobs[ranks.rank :: ranks.world] if ranks else jobs
        self.counts = {"ok": 0, "skipped": 0, "error": 0, "warned": 0}
        self.errors: list[tuple[str, str]] = []
        self.audio_seconds = 0.0
        self.started = time.perf_counter()
        self.open: list[tuple[OpenFile, Claim]] = []  # files being embedded: (file, its claim)

    # --- the run ------------------------------------------------------------------------------
    def nothing_found(self, inputs: Sequence[Any], files_from: Any, extensions: Iterable[str] | None) -> ExtractResult:
        """The result of a run whose inputs hold no audio file, said in a warning."""
        wanted = ",".join(audio_suffixes(extensions or AUDIO_EXTENSIONS))
        searched = f" (searched every subfolder for {wanted})" if inputs else ""
        where = ", ".join(map(str, inputs)) or files_from
        log.warning("no audio files found%s%s: nothing to embed", f" in {where}" if where else " (no inputs given)",
                    searched)
        return ExtractResult(ok=0, skipped=0, failed=0, out_dir=self.out_dir, root=self.root,
                             manifest=self.out_dir / MANIFEST, failed_list=None,
                             unreadable=[(str(p), why) for p, why in self.unreadable])

    def _open_out_dir(self) -> None:
        make_out_dir(self.out_dir)
        manifest = self.out_dir / MANIFEST  # appended to, not replaced: the file itself must be writable
        if manifest.exists() and not os.access(manifest, os.W_OK):
            raise OutputPathError(f"{manifest} cannot be written (permission denied), so this run could not "
                                  "record its inputs: make it writable (chmod u+w), or give -o another folder")

    def execute(self, model: Any, *, layers: LayersArg, pool: str | None, table: bool, batch_size: int,
                num_workers: int | None, decode_timeout: float | None, device: str | None,
                dtype: torch.dtype | None, fail_fast: bool, offline: bool | None, progress: bool | None,
                log_every: float, compile: bool) -> ExtractResult:
        self.pool, self.fail_fast = pool, fail_fast
        self._open_out_dir()  # before the model: a folder that cannot be written is said before any download
        self.encoder, info = self._load(model, layers, pool, device, dtype, offline)
        if compile:
            self.encoder.compile_windows()
        self.keep, self.single = self.encoder.layer_indices(layers), is_single_layer(layers)
        check_compatible(self.out_dir, info, self.overwrite)
        self._merge_left_parts()
        self.view = read_view(self.out_dir / MANIFEST)  # one pass over the manifest, for the steps below
        self.moved = self._check_names_taken()  # made again below, whatever their stamps say
        self.settings = info["settings_id"]
        if not self.ranks or self.ranks.rank == 0:
            try:
                write_run_info(self.out_dir, info)
            except OSError as err:
                raise OutputPathError(f"cannot write {self.out_dir / RUN_INFO}: {err.strerror or err}; free space "
                                      "(or make the folder writable), or give -o another folder") from err
        self.sink = RecordSink(self._records_path(), hold=bool(self.ranks))
        self.progress = _Progress(len(self.mine), progress, log_every, self.ranks)
        self.writer, self.lock, self.watch = BackgroundWriter(), threading.Lock(), Stopwatch()
        stopped, start, self.stop_reason = False, time.perf_counter(), ""
        try:
            todo = self._skip_finished()
            self._embed(todo, batch_size, *self._workers(num_workers), decode_timeout)
            with self.watch("writing"):
                self.writer.close()
        except _Stop as stop:
            stopped, self.stop_reason = True, str(stop)
        except OSError as err:  # bookkeeping (the manifest, the decoding trail) on a full disk
            if err.errno not in _OUT_OF_ROOM:
                raise
            stopped, self.stop_reason = True, self._out_of_room(err)
        finally:
            for _, claim in self.open:  # files a stop left half embedded
                claim.release()
            with self.watch("writing"):
                self.writer.close(check=False)
                sync_outputs(self.out_dir)  # the per-file outputs skip fsync (outputs.atomic_write)
            self.sink.close()
            self.progress.close()
        self.watch.seconds["writing"] += self.writer.waited
        self.watch.seconds["host"] = max(0.0, time.perf_counter() - start - sum(self.watch.seconds.values()))
        return self._finish(table, stopped)

    def _load(self, model: Any, layers: LayersArg, pool: str | None, device: str | None, dtype: torch.dtype | None,
              offline: bool | None) -> tuple[Encoder, dict[str, Any]]:
        from musicssl.factory import load

        enc = model if isinstance(model, Encoder) else load(model, offline=offline)
        self.model_name = os.fspath(model) if not isinstance(model, Encoder) else enc.spec.name if enc.spec else enc.family
        info = run_info(enc, self.model_name, layers, pool, self.format, dtype, self)
        where = distributed.device_for(device, self.ranks)
        if enc is model and _would_change(enc, where, dtype):
            enc = copy.deepcopy(enc)  # the caller's encoder keeps its mode, device and dtype
        enc.eval()
        enc.to(device=where, dtype=dtype)
        return enc, info

    def _merge_left_parts(self) -> None:
        """The records a killed torchrun run left in part files go into the manifest before this run's:
        merged after them at its end, they read as the latest (a file fixed since stayed failed)."""
        if not self.ranks or self.ranks.rank == 0:
            try:
                merged = merge_parts(self.out_dir)
            except OSError as err:  # a full disk: tried again at the end, after this run's own
                log.warning("cannot merge what an earlier run left in %s yet: %s", self.out_dir, err.strerror or err)
            else:
                if merged:
                    log.info("merged the manifest parts %d processes of an earlier run left in %s", merged,
                             self.out_dir)
        if self.ranks:
            distributed.barrier()  # no rank reads the manifest while rank 0 appends to it

    def _records_path(self) -> Path:
        if self.ranks:
            return self.out_dir / f".manifest.{self.ranks.run_id}.rank{self.ranks.rank}.part.jsonl"
        return self.out_dir / MANIFEST

    def _workers(self, num_workers: int | None) -> tuple[int, int]:
        """Decoding processes to start with, and at most (more are added while decoding holds the run
        up); a number given is kept."""
        if num_workers is not None:  # checked >= 0 by extract()
            return num_workers, num_workers
        world = self.ranks.world if self.ranks else 1
        return default_workers(self.encoder.device, world), most_workers(self.encoder.device, world)

    def _skip_finished(self) -> list[Job]:
        """Record inputs whose output exists whole as skipped; return the rest (a cut-short output,
        which only a machine crash mid-run can leave, is made again)."""
        self.remade: set[Path] = set()  # outputs made with other settings: made again
        if self.overwrite:
            return list(self.mine)
        made = self.view.stamps
        self.remade = {j.source for j in self.mine if made.get(self._key(j), "") not in ("", self.settings)}
        if self.remade:
            log.info("%d outputs in %s were made with other settings (by an --overwrite run over part of the inputs, "
                     "or one cut short): they are made again", len(self.remade), self.out_dir)
        if self.moved:
            log.info("%d outputs in %s were made from files that are no longer where they were (a moved "
                     "collection): they are made again from where they are now", len(self.moved), self.out_dir)
        self.remade |= self.moved
        todo, done = [], []
        for job in self.mine:
            (done if job.source not in self.remade and self._done(job) else todo).append(job)
        made_by = self.view.owners
        for job in done:
            other = None if self._key(job) in made_by else made_from(self.format, job.output)  # a manifest lost
            if other is None or os.path.realpath(other) == os.path.realpath(job.source):
                self._record(job, "skipped", reason="output exists (--overwrite redoes it)")
            elif not os.path.exists(other):  # a moved collection: made again from where it is now
                todo.append(job)
                self.remade.add(job.source)
            else:
                self._record(job, "error", reason=(
                    f"{job.source}: its output {self._key(job)} holds {other}'s embedding (made from another root, "
                    "its manifest lines gone): give --root a folder holding both, or another -o"))
        return todo

    def _check_names_taken(self) -> set[Path]:
        """Refuse inputs whose output name in OUT holds another file's embedding (an earlier run
        laid out from another root: `lib/a/x.ogg` and then `lib/b/x.ogg` both give `x.ogg.npz`).
        Where that other file is gone (a moved collection), the output is made again instead: those
        inputs are returned. All of this run's inputs are checked, on every rank alike."""
        made_by = self.view.owners
        taken = [(j, other) for j in self.jobs if (other := made_by.get(self._key(j))) is not None
                 and other != str(j.source) and os.path.exists(j.source)
                 and os.path.realpath(other) != os.path.realpath(j.source)]
        gone = {j.source for j, other in taken if not os.path.exists(other)}
        held = [(j, other) for j, other in taken if j.source not in gone]
        if held:
            job, other = held[0]
            raise ValueError(
                f"{len(held)} inputs would take outputs in {self.out_dir} made from other files, e.g. {job.source} -> "
                f"{self._key(job)}, which holds {other}'s embedding (an earlier run laid OUT out from "
                f"{earlier_root(self.out_dir) or 'another root'}): give --root a folder holding both, or another -o")
        newest = self.view.newest  # by the input as written; its real path only where that is not found
        real = None
        elsewhere = 0
        for j in self.jobs:
            out = newest.get(str(j.source))
            if out is None and newest:
                real = real if real is not None else self.view.newest_by_real_path()
                out = real.get(os.path.realpath(j.source))
            elsewhere += out is not None and out != self._key(j)
        if elsewhere:
            log.warning("%d inputs have outputs in %s under other names, laid out from %s: they are made again under "
                        "this run's root %s, and the table keeps their new ones (remove the old ones, or give --root "
                        "%s to keep the layout)", elsewhere, self.out_dir, earlier_root(self.out_dir), self.root,
                        earlier_root(self.out_dir))
        return gone

    def _key(self, job: Job) -> str:
        """The output's name in OUT, as the manifest records it."""
        return job.output.relative_to(self.out_dir).as_posix()

    def _done(self, job: Job) -> bool:
        try:
            return job.output.exists() and looks_complete(self.format, job.output)
        except OSError:  # a path the system cannot take: not done (claiming it says why)
            return False

    def _embed(self, todo: list[Job], batch_size: int, workers: int, most: int, timeout: float | None) -> None:
        # Enough open files that most windows find company of their length (see WindowPacker).
        packer = WindowPacker(batch_size, max_open=4 * max(batch_size, 8))
        threads = LoopThreads(model_threads(self.encoder.device, workers))
        splits = _SplitNotes()
        runner = BatchRunner(self.encoder, self.keep, on_split=splits, watch=self.watch, threads=threads)
        todo = self._retry_crashed(todo, timeout)
        paths = [str(j.source) for j in todo]
        with torch.inference_mode(), threads, contextlib.closing(Trail(self.out_dir)) as trail, \
                DecoderPool(paths, self.encoder.sample_rate, workers, timeout, trail=trail,
                            threads=min(LOCAL_THREADS, _cores())) as stream:
            growth = Growth(stream, most, waited=lambda: self.watch.seconds["decoding"], threads=threads)
            for seq, item in enumerate(self.watch.each("decoding", stream)):
                signals.check()  # a Ctrl-C or SIGTERM whose KeyboardInterrupt was lost (musicssl.signals)
                growth.check()
                self._admit(todo, item, seq, packer)
                while packer.ready():
                    runner.run(packer.take())
                    self._finish_files(todo)
            while packer.pool:
                runner.run(packer.take())
                self._finish_files(todo)
            runner.flush()
            self._finish_files(todo)
        splits.close()

    def _retry_crashed(self, todo: list[Job], timeout: float | None) -> list[Job]:
        """Files that a dead run was decoding in its own process when it ended: each is decoded once
        in a decoding process first, and left out as failed if it crashes that one too."""
        suspects = left_by_dead_runs(self.out_dir)
        keep = []
        for job in todo:
            if str(job.source) in suspects:
                with DecoderPool([str(job.source)], self.encoder.sample_rate, 1, timeout) as probe:
                    error = next(probe)["error"]
                if error:
                    self._record(job, "error", reason=f"{error} (it also ended an earlier run, which decoded "
                                                      "in its own process: --num-workers 0)")
                    continue
            keep.append(job)
        return keep

    def _admit(self, todo: list[Job], item: dict[str, Any], seq: int, packer: WindowPacker) -> None:
        """A decoded file: claim its output, then queue its windows (or record why not)."""
        job, seconds = todo[int(item["index"])], float(item["seconds"])
        if item["error"]:
            return self._record(job, "error", reason=item["error"], seconds=seconds)
        claim = Claim(job.output)
        try:
            if not claim.acquire():
                return self._record(job, "skipped", reason="another run is embedding it")
        except OSError as err:  # e.g. a path longer than the system takes: this output only
            return self._cannot_write(job, err, seconds)
        if not self.overwrite and job.source not in self.remade and self._done(job):  # another run made it since
            claim.release()
            other = made_from(self.format, job.output)
            if other is not None and os.path.exists(other) and os.path.realpath(other) != os.path.realpath(job.source):
                return self._record(job, "error", seconds=seconds, reason=(
                    f"{job.source}: its output {self._key(job)} was made meanwhile by another run from {other} (runs "
                    "into one OUT laid out from other roots): give both runs the same --root"))
            return self._record(job, "skipped", reason="output exists (--overwrite redoes it)")
        audio = item["audio"]
        n_frames = int(self.encoder.frame_lengths(torch.tensor([len(audio)]))[0])
        if n_frames == 0:
            claim.release()
            return self._record(job, "error", seconds=seconds, reason=(
                f"{job.source}: {len(audio) / self.encoder.sample_rate:.4f} s of audio is too short for one "
                f"frame of this model ({1 / self.encoder.frame_rate:.3f} s per frame)"))
        windows = self.encoder.plan_windows([len(audio)])
        shape = (n_frames, len(self.keep), self.encoder.embed_dim)
        frames = RunningPool(*shape) if self.pool else torch.zeros(shape)  # pooled: memory does not grow with length
        f = OpenFile(int(item["index"]), seq, audio, frames, len(windows), windows[-1].index, seconds,
                     warning=item["warning"])
        packer.add(f, windows)
        self.open.append((f, claim))

    def _finish_files(self, todo: list[Job]) -> None:
        """Hand files whose windows are all done to the writer threads; record failed ones."""
        still = []
        for f, claim in self.open:
            if f.windows_left and not f.error:
                still.append((f, claim))
            elif f.error:
                job = todo[f.index]
                claim.release()
                self._record(job, "error", reason=f"{job.source}: {f.error}", seconds=f.seconds)
            else:
                self.writer.submit(self._store, todo[f.index], self._outputs(f), f.seconds, claim, f.warning)
        self.open = still

    def _outputs(self, f: OpenFile) -> dict[str, Any]:
        """A finished file's arrays: frames (T, D) or (L, T, D) (None when pooled), timestamps (T,), clip."""
        n = f.frames.shape[0]
        frames = [f.frames] if isinstance(f.frames, RunningPool) else f.frames[None]
        emb = self.encoder.assemble(frames, torch.tensor([n]), self.keep, self.pool, torch.float32, self.single)
        return {"frames": None if emb.frames is None else emb.frames[0].numpy(), "timestamps": emb.timestamps.numpy(),
                "clip": emb.clip[0].numpy(), "layers": emb.layers, "duration": len(f.audio) / self.encoder.sample_rate}

    def _store(self, job: Job, out: dict[str, Any], seconds: float, claim: Claim, warning: str) -> None:
        """On a writer thread: write one output, record it (with what decoding warned of), release its claim."""
        start = time.perf_counter()
        try:
            meta = self._metadata(job, out["duration"], out["layers"])
            write_output(self.format, job.output, out["frames"], out["timestamps"], out["clip"], meta)
        except OSError as err:
            return self._cannot_write(job, err, seconds)
        finally:
            claim.release()
        shapes = {"clip": list(out["clip"].shape)}
        if out["frames"] is not None:
            shapes["frames"] = list(out["frames"].shape)
        said = {"warning": warning} if warning else {}
        self._record(job, "ok", duration=round(out["duration"], 3), shapes=shapes, settings=self.settings,
                     seconds=seconds + time.perf_counter() - start, **said)

    def _cannot_write(self, job: Job, err: OSError, seconds: float) -> None:
        """Record an output that cannot be written; stop the run if no output can be (a full disk)."""
        hint = " (use a shorter -o or --root path)" if err.errno == errno.ENAMETOOLONG else ""
        reason = f"cannot write {job.output}: {err.strerror or err}{hint}"
        if err.errno in _OUT_OF_ROOM:
            with contextlib.suppress(_Stop):  # the manifest may not fit either
                self._record(job, "error", reason=reason, seconds=seconds)
            raise _Stop(self._out_of_room(err)) from err
        self._record(job, "error", reason=reason, seconds=seconds)

    def _out_of_room(self, err: OSError) -> str:
        return (f"because {self.out_dir} takes no more outputs ({err.strerror}): free space (or remount it "
                "writable) and run again; finished outputs are kept")

    def _metadata(self, job: Job, duration: float, layers: list[int]) -> dict[str, Any]:
        spec = self.encoder.spec
        return {
            "model": self.model_name, "revision": spec.revision if spec else None,
            "sample_rate": self.encoder.sample_rate, "frame_rate": self.encoder.frame_rate,
            "layers": layers, "pool": self.pool, "source": str(job.source), "duration": round(duration, 3),
            "musicssl_version": __version__,
        }

    def _record(self, job: Job, status: str, reason: str = "", seconds: float = 0.0, **extra: Any) -> None:
        rec = {"input": str(job.source), "output": self._key(job),
               "status": status, "reason": reason, **extra, "seconds": round(seconds, 3), "time": now(),
               "host": f"{socket.gethostname()}:{os.getpid()}"}
        with self.lock:  # the main thread and the writer threads all record
            try:
                self.sink.write([rec])
            except OSError as err:
                raise _Stop(self._out_of_room(err) if err.errno in _OUT_OF_ROOM else
                            f"because its manifest cannot be written ({err.strerror or err})") from err
            self.counts[status] += 1
            self.counts["warned"] += bool(extra.get("warning"))
            self.audio_seconds += extra.get("duration", 0.0)
            self.progress.update(status, extra.get("duration", 0.0))
            if status == "error":
                self.errors.append((str(job.source), reason))
        if status == "error":
            log.info("failed: %s", reason)
            if self.fail_fast:
                raise _Stop("at the first failure: --fail-fast")

    # --- the end ------------------------------------------------------------------------------
    def _finish(self, table: bool, stopped: bool) -> ExtractResult:
        counts = [self.counts["ok"], self.counts["skipped"], self.counts["error"], self.audio_seconds, float(stopped),
                  self.counts["warned"]]
        lead = not self.ranks or self.ranks.rank == 0
        if self.ranks:
            distributed.barrier()  # every rank has closed its part of the manifest
            counts = distributed.sum_counts(counts)
            # Every rank's errors (the first 10 of each) and stop reason, for the summary rank 0 prints.
            notes = distributed.gather((self.errors[:10], self.stop_reason))
            self.errors = [e for errors, _ in notes for e in errors]
            self.stop_reason = next((why for _, why in notes if why), "")
        failed_list, tables = None, []
        if lead:
            try:
                merge_parts(self.out_dir)
                self.final = read_view(self.out_dir / MANIFEST)  # with this run's lines
                failed_list = self._failed_list()
                tables = self._table() if table else []
            except OSError as err:  # a full disk: the summary still says what happened, and the run fails
                if err.errno not in _OUT_OF_ROOM:
                    raise
                log.warning("cannot finish the manifest, the failed list or the table in %s: %s", self.out_dir,
                            err.strerror or err)
                counts[4], self.stop_reason = 1.0, self.stop_reason or self._out_of_room(err)
        if self.ranks:
            distributed.barrier()  # nobody exits before rank 0 has merged
        return ExtractResult(
            ok=int(counts[0]), skipped=int(counts[1]), failed=int(counts[2]), out_dir=self.out_dir, root=self.root,
            manifest=self.out_dir / MANIFEST, failed_list=failed_list, tables=tables, audio_seconds=counts[3],
            wall_seconds=time.perf_counter() - self.started, stopped_early=bool(counts[4]), errors=self.errors,
            stages=dict(self.watch.seconds), stop_reason=self.stop_reason, warned=int(counts[5]),
            planned=len(self.jobs), found=self.found, unreadable=[(str(p), why) for p, why in self.unreadable])

    def _suffix(self) -> str:
        return "" if not self.shard else ".shard-{}-of-{}".format(*parse_shard(self.shard))

    def _failed_list(self) -> Path | None:
        """failed.txt: this shard's inputs whose latest record is an error (None, and no file, if none)."""
        latest = self.final.latest
        failed = [str(j.source) for j in self.jobs if latest.get(str(j.source), {}).get("status") == "error"]
        unlisted = [f for f in failed if "\n" in f or "\r" in f]  # a line break would split a name in two lines
        if unlisted:
            log.warning("%d failed inputs have a line break in their name and are left out of failed.txt (their "
                        "manifest lines name them exactly), e.g. %r", len(unlisted), unlisted[0])
            failed = [f for f in failed if f not in unlisted]
        path = self.out_dir / f"failed{self._suffix()}.txt"
        if not failed:
            path.unlink(missing_ok=True)
            return None
        write_failed(path, failed)
        return path

    def _table(self) -> list[Path]:
        """The clips of the outputs made with this run's settings whose input did not fail since,
        one per input (its newest): every such output in OUT (a retry of failed.txt gives the whole
        collection's table), or this shard's."""
        made_by, made, status, newest = (self.final.owners, self.final.stamps, self.final.latest,
                                         self.final.newest_by_real_path())
        keys = [self._key(j) for j in self.jobs] if self.shard else sorted(made_by)
        rows = [(made_by[k], k, read_clip(self.format, self.out_dir / k, pooled=self.pool is not None))
                for k in keys if k in made_by and status.get(made_by[k], {}).get("status") != "error"
                and newest.get(os.path.realpath(made_by[k])) == k
                and made.get(k, "") in ("", self.settings)  # "": made before stamps, kept as _skip_finished keeps it
                and (self.out_dir / k).exists()]
        clip = (len(self.keep),) * (not self.single) + (self.encoder.embed_dim,)
        return write_table(self.out_dir, f"clips{self._suffix()}", rows, self.keep, clip)


def _would_change(enc: Encoder, device: str | None, dtype: torch.dtype | None) -> bool:
    """Whether running `enc` in eval mode on `device` in `dtype` would change it."""
    if enc.training or (device is not None and torch.device(device) != enc.device):
        return True
    floats = [p.dtype for p in enc.parameters() if p.is_floating_point()]
    return dtype is not None and bool(floats) and dtype not in floats  # front-ends stay float32 (load())


def run_info(enc: Encoder, name: str, layers: LayersArg, pool: str | None, fmt: str, dtype: torch.dtype | None,
             run: _Run) -> dict[str, Any]:
    """run.json: what made the outputs, enough to redo them."""
    spec = enc.spec
    info = {
        "model": name, "family": enc.family, "revision": spec.revision if spec else None,
        "weights": spec.weights if spec else None,  # None: random (pretrained=False), or a baseline without any
        "weights_files": dict(spec.files) if spec else {}, "model_sha256": model_sha256(enc),
        "layers": enc.layer_indices(layers), "layer_axis": not is_single_layer(layers), "pool": pool, "format": fmt,
        "dtype": str(dtype or torch.float32).replace("torch.", ""),  # as asked: one of the settings runs compare
        "model_dtype": str(dtype or _model_dtype(enc)).replace("torch.", ""),  # what the model ran in
        "sample_rate": enc.sample_rate, "frame_rate": enc.frame_rate, "context_seconds": enc.context_seconds,
        # Frame t is centred at (frame_offset + t * hop_length) / sample_rate s (the npz's timestamps).
        "frame_offset": enc.frame_offset, "hop_length": enc.hop_length,
        "root": str(run.root), "shard": run.shard, "processes": run.ranks.world if run.ranks else 1,
        "inputs": len(run.jobs), "musicssl_version": __version__, "torch_version": torch.__version__,
        "python": sys.version.split()[0], "started": now(), "command": sys.argv,
    }
    return {**info, "settings_id": settings_id(info)}


def _model_dtype(enc: Encoder) -> torch.dtype:
    """The precision an encoder runs in: its parameters' (front-ends keep float32 under a cast)."""
    floats = {p.dtype for p in enc.parameters() if p.is_floating_point()}
    return next(iter(floats - {torch.float32}), torch.float32)


def model_sha256(enc: Encoder) -> str:
    """sha256 over the family, constructor arguments and state (names, dtypes, shapes, bytes): the
    same model gives the same digest wherever it was loaded from."""
    h = hashlib.sha256(json.dumps([enc.family, enc.args], sort_keys=True, default=str).encode())
    for name, t in sorted(enc.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():  # the array itself, not a bytes copy of it (0-d tensors reshape to one element)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def default_workers(device: torch.device, world: int = 1) -> int:
    """Decoding processes for a run on `device` with `world` runs on this machine.

    A GPU needs several decoders to stay fed (MP3 decodes and resamples at ~600x realtime per core):
    up to 8, leaving a core to this loop. More did not help on a 16-core H100 machine (14 decoders:
    the same rate for MERT, 27 % less for the default model, bench/RESULTS.md). On CPU the model's
    threads use every core: with two or fewer per run, a decoding process preempts them (each stall
    holds up all of the model's threads), and decoding between batches here (on threads, local.py)
    is faster, at the price of isolation: on 2 cores, 20 min of FLAC in 2.9 s against 4.4 s with one
    process, of 44.1 kHz MP3 in 3.5 s against 4.6 s (bench/decode_workers.py).
    """
    cores = _cores() // world
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 1 if cores > 2 else 0


def most_workers(device: torch.device, world: int = 1) -> int:
    """The most decoding processes a run on `device` grows to while it waits for decoded audio
    (growth.Growth): on a GPU every core but the loop's, on CPU half the cores (the model keeps
    the rest). None are added where the run starts without (two cores or fewer)."""
    if not default_workers(device, world):
        return 0
    cores = _cores() // world
    return max(1, cores - 1) if device.type == "cuda" else max(1, cores // 2)


def model_threads(device: torch.device, workers: int) -> int:
    """torch threads for the model's forward in a run with `workers` decoding processes: on CPU one
    per core they leave free (a thread sharing a core with a busy decoder stalls all the others at
    each parallel op: with one decoder on 2 cores, zero-filling 256 KB took 3.6 ms); on a GPU one,
    as the device does the work."""
    if device.type == "cuda":
        return 1
    return max(1, min(torch.get_num_threads(), _cores() - workers))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


class _SplitNotes:
    """Says once each reason a batch failed and was retried in halves, and at the end how many more
    failed so: a model that fails on every window said it 7 times per batch of 8, all run long."""

    def __init__(self) -> None:
        self.said: set[str] = set()
        self.more = 0

    def __call__(self, n: int, err: BaseException) -> None:
        why = first_line(err)[:200]
        if why in self.said:
            self.more += 1
            return
        self.said.add(why)
        log.warning("a batch of %d windows failed (%s); retrying it in halves", n, why)

    def close(self) -> None:
        if self.more:
            log.warning("%d more batches failed for a reason said above and were retried in halves", self.more)


class _Progress:
    """A tqdm bar with files/s and x-realtime on a terminal; otherwise a log line every `every` s."""

    def __init__(self, total: int, enabled: bool | None, every: float, ranks: distributed.Ranks | None) -> None:
        self.total, self.every, self.done, self.failed, self.audio = total, every, 0, 0, 0.0
        self.start = self.last = time.perf_counter()
        self.prefix = f"[rank {ranks.rank}] " if ranks else ""
        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if show and (not ranks or ranks.rank == 0):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="file", dynamic_ncols=True, file=sys.stderr)

    def update(self, status: str, audio_seconds: float) -> None:
        self.done += 1
        self.failed += status == "error"
        self.audio += audio_seconds
        t = time.perf_counter()
        rt = self.audio / max(t - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rt:.1f}x realtime, {self.failed} failed", refresh=False)
            self.bar.update(1)
        elif t - self.last >= self.every or self.done == self.total:
            self.last = t
            log.info("%s%d/%d files, %.2f files/s, %.1fx realtime, %d failed", self.prefix, self.done, self.total,
                     self.done / max(t - self.start, 1e-9), rt, self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
