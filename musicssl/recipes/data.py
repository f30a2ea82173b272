"""Training data: random crops of audio files, a synthetic source for tests, and a resumable loader.

Every item is ``{"audio": (S,) float32, "index": int, ...}`` with S = round(crop_seconds * sr).
An item is a pure function of (seed, epoch, index): nothing depends on which worker decodes it,
how many workers there are, or what came before, so a resumed or re-sharded run sees the same
data. `make_loader` turns a dataset into an infinite stream of batches indexed by the global
step; decoding and collation run in DataLoader worker processes.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from musicssl.audio.io import AUDIO_EXTENSIONS, AudioInfo, audio_info, find_audio_files, load_audio
from musicssl.errors import AudioDecodeError, OffsetPastEndError

__all__ = ["AudioCrops", "SyntheticMusic", "default_collate_audio", "make_loader"]

log = logging.getLogger(__name__)

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
Item = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Audio files


class AudioCrops(Dataset[Item]):
    """Random crops of ``crop_seconds`` from audio files, decoded and resampled to ``sample_rate``.

    ``source`` is a folder (searched recursively), a ``.csv`` file with a ``path`` column, any
    other text file with one path per line (blank lines and lines starting with "#" skipped), or a
    list of paths. Relative paths in a CSV or text file are relative to that file's folder.

    Each file's length is read once here from its header; unreadable files are skipped with a
    warning. Item ``i`` comes from file ``i % n_files`` (``length`` may exceed the number of
    files, to draw several crops per file and epoch); its offset is drawn from
    ``np.random.default_rng([seed, epoch, i])`` and only that span is decoded. Files shorter than
    the crop are zero-padded at a drawn position. A file that fails to decode later is logged and
    replaced by the next file's crop, so a long run never stops on one bad file.

    Items: ``{"audio": (S,) float32 mono, "index": i}``, S = round(crop_seconds * sample_rate).
    """

    def __init__(
        self,
        source: Source,
        sample_rate: int,
        crop_seconds: float,
        *,
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        if not (isinstance(sample_rate, int) and sample_rate > 0):
            raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
        if not (math.isfinite(crop_seconds) and crop_seconds > 0):
            raise ValueError(f"crop_seconds must be a positive number, got {crop_seconds!r}")
        self.sample_rate = sample_rate
        self.crop_seconds = float(crop_seconds)
        self.crop_samples = round(crop_seconds * sample_rate)
        if self.crop_samples < 1:
            raise ValueError(f"a crop of {crop_seconds} s at {sample_rate} Hz holds no sample")
        self.seed = int(seed)
        self.epoch = 0
        candidates = _list_source(source)
        if not candidates:
            raise ValueError(f"No audio files listed in {_describe_source(source)}.")
        self.files, self.infos = _read_infos(candidates)
        if not self.files:
            raise AudioDecodeError(
                f"None of the {len(candidates)} audio files in {_describe_source(source)} can be "
                f"read (see the warnings above for each file's reason)."
            )
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = len(self.files) if length is None else int(length)
        self._bad: set[int] = set()  # files a crop of which failed in this process: warned of once

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops `__getitem__` returns (offsets are drawn per epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        n_files = len(self.files)
        for attempt in range(n_files):
            # Fall back to the items after `index`, so the substitute is deterministic too.
            i = index + attempt
            k = i % n_files
            try:
                audio = self._crop(k, np.random.default_rng([self.seed, self.epoch, i]))
            except (AudioDecodeError, OSError) as err:
                # Tried again when drawn again: a file damaged part-way still gives its intact crops,
                # so what an item holds never depends on what this process drew before (a resume).
                if k not in self._bad:
                    self._bad.add(k)
                    log.warning("Skipping undecodable audio of %s (using another file's crop instead; said "
                                "once): %s", self.files[k], err)
                continue
            return {"audio": torch.from_numpy(audio), "index": index}
        raise AudioDecodeError(
            f"None of the {n_files} audio files of this dataset decode any more (first: "
            f"{self.files[0]}); see the warnings above for the reasons."
        )

    def _crop(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """The crop of file k: (crop_samples,) float32, decoding only the span it needs."""
        info, n = self.infos[k], self.crop_samples
        # A few file frames of margin so resampling always yields n samples; trimmed below.
        span = math.ceil(self.crop_seconds * info.sample_rate) + math.ceil(
            info.sample_rate / self.sample_rate) + 2
        if info.frames > span:
            start = int(rng.integers(0, info.frames - span + 1))
            try:
                audio, _ = load_audio(self.files[k], sr=self.sample_rate,
                                      offset=start / info.sample_rate,
                                      duration=span / info.sample_rate)
            except OffsetPastEndError:
                audio = np.zeros(0, dtype=np.float32)
            if len(audio) >= n:
                return _fit(audio, n, 0)
            # The length was a header's estimate past the real end (ADTS AAC, an MP3 behind junk):
            # a window of the whole file instead, drawn next from the same generator, so the item
            # still depends on nothing but (seed, epoch, index) and the file.
        audio, _ = load_audio(self.files[k], sr=self.sample_rate, offset=0.0, duration=None)
        # A short file: a random window of it, or all of it at a random place in the crop.
        return _fit(audio, n, int(rng.integers(0, abs(len(audio) - n) + 1)))

    def __repr__(self) -> str:
        return (f"AudioCrops({len(self.files)} files, {self.length} items, "
                f"{self.crop_seconds} s at {self.sample_rate} Hz, seed={self.seed})")


def _fit(audio: np.ndarray, n: int, shift: int) -> np.ndarray:
    """Exactly n samples: ``audio[shift:shift + n]``, or audio placed at ``shift`` when shorter."""
    out = np.zeros(n, dtype=np.float32)
    if len(audio) >= n:
        out[:] = audio[shift : shift + n]
    else:
        out[shift : shift + len(audio)] = audio
    return out


def _list_source(source: Source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return find_audio_files(path)
        if not path.is_file():
            raise FileNotFoundError(f"Audio source '{path}' is neither a folder nor a file.")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _read_csv(path)
        if suffix in AUDIO_EXTENSIONS:
            return [path]
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a Windows editor's BOM is no path
        except UnicodeDecodeError as err:
            raise ValueError(f"cannot read the list {path}: it is not UTF-8 text (byte {err.start}: {err.reason}); "
                             "save it as UTF-8") from err
        entries = [line.strip() for line in lines]
        return [_resolve(e, path.parent) for e in entries if e and not e.startswith("#")]
    return [Path(p).expanduser() for p in source]


def _read_csv(path: Path) -> list[Path]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(
                f"CSV file '{path}' needs a 'path' column; its header is {reader.fieldnames}."
            )
        return [_resolve(row["path"].strip(), path.parent) for row in reader if row["path"]]


def _resolve(entry: str, base: Path) -> Path:
    p = Path(entry).expanduser()
    return p if p.is_absolute() else base / p


def _describe_source(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{Path(source)}'"
    return f"the list of {len(source)} paths"


def _read_infos(paths: list[Path]) -> tuple[list[Path], list[AudioInfo]]:
    """Header info of each path, in order; unreadable or empty files are left out with a warning."""

    def probe(path: Path) -> AudioInfo | Exception:
        try:
            return audio_info(path)
        except (AudioDecodeError, OSError) as err:
            return err

    # Header reads are I/O-bound and soundfile releases the GIL: threads help on big folders.
    workers = min(8, max(1, len(paths) // 64))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(probe, paths))
    else:
        results = [probe(p) for p in paths]
    files, infos = [], []
    for path, result in zip(paths, results):
        if isinstance(result, Exception):
            log.warning("Skipping unreadable audio file %s: %s", path, result)
        elif result.frames <= 0:
            log.warning("Skipping audio file %s: it holds no samples", path)
        else:
            files.append(path)
            infos.append(result)
    return files, infos


# --------------------------------------------------------------------------------------------------
# Synthetic music


class SyntheticMusic(Dataset[Item]):
    """Harmonic tones with known pitch, deterministic per (seed, index): test data for every recipe.

    Each item is a note (70 %) or a two-note chord (30 %, the second note 3 to 12 semitones
    above) with a pitch uniform in MIDI between ``f0_range`` (Hz), 1 to 12 harmonics whose random
    amplitudes decay with the harmonic number (the fundamental is always the loudest partial of
    its note), random phases, an onset in the first quarter, a 5-50 ms attack and an exponential
    decay, plus white noise 30-50 dB below the tone and a peak level of -12 to -3 dBFS.

    Items: ``{"audio": (S,) float32, "index": i, "f0": Hz of the (lower) note, "midi": float}``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        crop_seconds: float = 2.0,
        length: int = 256,
        seed: int = 0,
        f0_range: tuple[float, float] = (55.0, 880.0),
    ) -> None:
        low, high = f0_range
        if not 0 < low <= high < sample_rate / 2:
            raise ValueError(f"f0_range must lie in (0, {sample_rate / 2}) Hz, got {f0_range}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.sample_rate = sample_rate
        self.crop_samples = round(crop_seconds * sample_rate)
        self.length = length
        self.seed = seed
        self.midi_range = (_hz_to_midi(low), _hz_to_midi(high))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, index])
        sr, n = self.sample_rate, self.crop_samples
        midi = float(rng.uniform(*self.midi_range))
        notes = [(midi, 1.0)]
        if rng.random() < 0.3:
            notes.append((midi + int(rng.integers(3, 13)), float(rng.uniform(0.5, 1.0))))
        t = np.arange(n) / sr
        tone = np.zeros(n)
        for note, level in notes:
            tone += level * _harmonic_tone(rng, _midi_to_hz(note), t, sr)
        onset = rng.uniform(0.0, 0.25) * n / sr
        attack = rng.uniform(0.005, 0.05)
        decay = rng.uniform(0.5, 4.0)  # time constant in seconds
        after = np.clip(t - onset, 0.0, None)
        envelope = np.minimum(after / attack, 1.0) * np.exp(-after / decay) * (t >= onset)
        audio = tone * envelope
        power = np.mean(audio**2)
        audio += rng.standard_normal(n) * np.sqrt(power / 10 ** (rng.uniform(30, 50) / 10))
        audio *= 10 ** (rng.uniform(-12, -3) / 20) / max(np.abs(audio).max(), 1e-12)
        return {
            "audio": torch.from_numpy(audio.astype(np.float32)),
            "index": index,
            "f0": _midi_to_hz(midi),
            "midi": midi,
        }


def _harmonic_tone(rng: np.random.Generator, f0: float, t: np.ndarray, sr: int) -> np.ndarray:
    """Sum of 1-12 harmonics below 0.45 sr, amplitudes u_k * k**-alpha (fundamental 1)."""
    n_harmonics = int(rng.integers(1, 13))
    alpha = rng.uniform(0.7, 2.0)
    out = np.zeros_like(t)
    for k in range(1, n_harmonics + 1):
        amplitude = 1.0 if k == 1 else rng.uniform(0.2, 1.0) * k**-alpha
        phase = rng.uniform(0, 2 * np.pi)
        if k * f0 < 0.45 * sr:
            out += amplitude * np.sin(2 * np.pi * k * f0 * t + phase)
    return out


def _hz_to_midi(hz: float) -> float:
    return 69.0 + 12.0 * math.log2(hz / 440.0)


def _midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


# --------------------------------------------------------------------------------------------------
# Batches


def default_collate_audio(items: list[Item]) -> dict[str, torch.Tensor]:
    """Stack items: {"audio": (B, S) float32, "index": (B,) int64}, plus any other numeric keys.

    Other keys whose values are all numbers (e.g. SyntheticMusic's "f0" and "midi") become (B,)
    tensors, float32 or int64; anything else is dropped.
    """
    if not items:
        raise ValueError("cannot collate an empty list of items")
    lengths = {int(item["audio"].shape[-1]) for item in items}
    if len(lengths) > 1:
        raise ValueError(
            f"items hold audio of different lengths {sorted(lengths)}; crop them to one length"
        )
    batch = {
        "audio": torch.stack([torch.as_tensor(it["audio"], dtype=torch.float32) for it in items]),
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
    }
    for key in items[0]:
        if key in batch:
            continue
        values = [item.get(key) for item in items]
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.int64)
        elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                 for v in values):
            batch[key] = torch.tensor([float(v) for v in values], dtype=torch.float32)
    return batch


class _GlobalSamples(Dataset[Item]):
    """Maps a global sample number g to an item of ``dataset``.

    Epoch e = g // N and position g % N in that epoch's seeded permutation of the N items give
    the dataset index i; the dataset's `set_epoch` (if any) is called with e right before
    ``dataset[i]``, in whatever process does the decoding. The item's "index" becomes g (unique
    over the run, so collators seeding from it draw fresh views every epoch); the dataset's own
    index is kept as "dataset_index".
    """

    def __init__(self, dataset: Dataset[Item], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.size = len(dataset)  # type: ignore[arg-type]
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # workers move forward: keep this epoch and the last
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._orders[epoch]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, g: int) -> Item:
        epoch, position = divmod(int(g), self.size)
        i = int(self.order(epoch)[position])
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        item = dict(self.dataset[i])
        item["dataset_index"] = item.get("index", i)
        item["index"] = int(g)
        return item


class _StepBatches:
    """Batches of global sample numbers for steps start_step, start_step + 1, ... on one rank."""

    def __init__(self, batch_size: int, rank: int, world_size: int, start_step: int) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1


def _seed_worker(worker_id: int, seed: int, rank: int) -> None:
    """Seed torch, numpy and random in a worker from (seed, rank, worker id). The worker leaves
    Ctrl-C and SIGTERM (sent to the whole process group) to the training process, which finishes
    its step and saves a checkpoint; a worker that died of them would fail the next batch instead."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    state = np.random.SeedSequence([seed, rank, worker_id]).generate_state(2, np.uint32)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))


def make_loader(
    dataset: Dataset[Item],
    batch_size: int,
    *,
    collate: Callable[[list[Item]], dict[str, torch.Tensor]] = default_collate_audio,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> Iterable[dict[str, torch.Tensor]]:
    """An infinite stream of batches, one per global step, resumable and shardable exactly.

    The batch for step t on rank r holds global samples ``(t * world_size + r) * batch_size + j``
    for j < batch_size. Sample g is item ``order_e[g % N]`` of epoch ``e = g // N``, where order_e
    is a permutation of the dataset's N items seeded by (seed, e), and the dataset is set to epoch
    e before the item is read. So a batch depends only on (seed, step, rank, world_size,
    batch_size): ``start_step`` resumes exactly where an uninterrupted run would be, the worker
    count changes which items nothing (a collate's float rounding may differ with the threads a
    worker runs: ~1e-8), and ranks 0..W-1 together see what one process with W times the batch
    sees (rank r holds the r-th slice). Items arrive with "index" = g and "dataset_index" = i.

    ``collate`` (list of items -> dict of tensors) runs in the workers. ``drop_last`` is accepted
    for familiarity with `DataLoader`; the stream wraps across epochs, so every batch is full.
    Iterating the result again restarts at ``start_step``.
    """
    del drop_last  # every batch of a wrapping stream is full
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if len(dataset) < 1:  # type: ignore[arg-type]
        raise ValueError("the dataset is empty")
    return DataLoader(
        _GlobalSamples(dataset, seed),
        batch_sampler=_StepBatches(batch_size, rank, world_size, start_step),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=partial(_seed_worker, seed=seed, rank=rank) if num_workers > 0 else None,
        pin_memory=pin_memory,
    )
