"""The Encoder contract and `embed()`: any audio in, frame and clip embeddings out.

A family subclasses `Encoder`, sets its audio facts (sample rate, frame hop, context) and implements
`forward_features(wav, lengths) -> list[Tensor]`. Everything else -- decoding, resampling, cutting long
audio into overlapping windows, batching windows across items, stitching, pooling -- lives here once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import nn

from musicssl.errors import AudioInputError
from musicssl.registry import ModelSpec

AudioLike = Union[str, os.PathLike, np.ndarray, torch.Tensor]
LayersArg = Union[str, int, Sequence[int]]


@dataclass
class Embeddings:
    """What `embed()` returns.

    frames: (B, T, D) for one layer or (B, L, T, D) for several; zero past each item's `lengths`;
        None when `pool` was given.
    timestamps: (T,) seconds, the centre of each frame.
    lengths: (B,) number of valid frames of each item.
    clip: (B, D) or (B, L, D), pooled over each item's valid frames.
    layers: the layer indices (0-based, into `forward_features`) that were kept.
    """

    frames: torch.Tensor | None
    timestamps: torch.Tensor
    lengths: torch.Tensor
    clip: torch.Tensor
    layers: list[int]
    sample_rate: int
    frame_rate: float


@dataclass(frozen=True)
class Window:
    """One context window of one input item (`Encoder.plan_windows`)."""

    item: int  # index of the input item
    index: int  # window number within the item
    start: int  # first sample
    length: int  # valid samples


@dataclass
class Launched:
    """A batch of windows started through the model (`Encoder.launch_windows`)."""

    stacked: torch.Tensor  # (b, T, L, D) float32 on the CPU, or (b, 2, L, D) pooled; being copied until `done`
    n_valid: list[int]  # valid frames of each window
    done: torch.cuda.Event | None = None

    def result(self) -> tuple[torch.Tensor, list[int]]:
        """Wait for the copy back, if one is under way -> (stacked, n_valid)."""
        if self.done is not None:
            self.done.synchronize()
        return self.stacked, self.n_valid


class Encoder(nn.Module):
    """Base class of every musicssl encoder: a plain nn.Module with `embed()`.

    Subclasses set in `__init__`: `sample_rate` (Hz), `hop_length` (samples between output frames),
    `frame_offset` (samples from the start to the centre of frame 0), `context_seconds`,
    `overlap_seconds` (how much adjacent windows share; their edges are discarded when stitching),
    `embed_dim`, `num_layers`, and `args` (the constructor arguments, written to config.json).
    """

    family: str = ""
    sample_rate: int
    hop_length: int
    frame_offset: float = 0.0
    context_seconds: float
    overlap_seconds: float
    embed_dim: int
    num_layers: int
    args: dict[str, Any]
    spec: ModelSpec | None = None
    # Ports whose pinned upstream file is an archive: {its name: sha256 of the checkpoint inside it
    # that `load_upstream` takes as well}, so converting that checkpoint counts as the pinned weights.
    pinned_members: dict[str, str] = {}

    # --- what a family implements -------------------------------------------------------------
    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """wav (B, S) float32 at `sample_rate`, lengths (B,) valid samples -> per layer (B, T, D)."""
        raise NotImplementedError

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for inputs of `lengths` samples (B,) -> (B,)."""
        raise NotImplementedError

    def load_upstream(self, files: dict[str, Any]) -> None:
        """Load weights from upstream files (name -> local path) through the family's converter."""
        raise NotImplementedError(f"the {self.family!r} family has no converter for upstream weights")

    def finetune_blocks(self) -> list[nn.Module]:
        """The network's blocks in order, input to output, for freezing and layer-wise learning rates
        (`musicssl.finetune.layer_groups`); a parameter outside them belongs with the block registered
        before it, or with the front end when none is. Default: `self.blocks`, where most families
        keep them."""
        blocks = getattr(self, "blocks", None)
        return list(blocks) if isinstance(blocks, nn.ModuleList) else []

    # --- derived facts ------------------------------------------------------------------------
    @property
    def frame_rate(self) -> float:
        """Output frames per second."""
        return self.sample_rate / self.hop_length

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """wav (B, S) -> last hidden state (B, T, D); for fine-tuning and tracing."""
        if lengths is None:
            lengths = torch.full((wav.shape[0],), wav.shape[-1], dtype=torch.long, device=wav.device)
        return self.forward_features(wav, lengths)[-1]

    # --- embed --------------------------------------------------------------------------------
    def embed(
        self,
        audio: AudioLike | Sequence[AudioLike],
        sr: int | None = None,
        *,
        layers: LayersArg = "last",
        pool: str | None = None,
        batch_size: int = 8,
        dtype: torch.dtype = torch.float32,
    ) -> Embeddings:
        """Embed paths, arrays or tensors of any length, channel count and sample rate, in eval mode
        (a model in training mode is put back in it afterwards).

        audio: a path; a list of paths; a 1-D (S,) clip; a 2-D (B, S) batch of mono clips; a 3-D
            (B, C, S) batch; or a list of clips of different lengths, each (S,) or (C, S). Channels
            come before samples: soundfile's (S, C) is refused with the fix (x.T).
        sr: sample rate of arrays/tensors in Hz (required for them; paths carry their own).
        layers: "last", "all", an index or a list of indices (negative counts from the end).
        pool: None keeps frames; "mean" or "max" returns only the pooled clip embedding.
        batch_size: the most windows of `context_seconds` run through the model at once; a window
            under BATCH_MIN_SHARE of its batch's longest starts the next batch instead of being padded.
        """
        from musicssl.audio.inputs import prepare_items

        if pool not in (None, "mean", "max"):
            raise ValueError(f"pool must be None, 'mean' or 'max', not {pool!r}")
        check_batch_size(batch_size)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype is the returned embeddings' floating dtype (e.g. torch.float16), not {dtype!r}; "
                             "the model's own precision is set by load(..., dtype=...) or enc.to(dtype=...)")
        keep = self.layer_indices(layers)
        items = prepare_items(audio, sr, self.sample_rate)
        self._check_one_frame(items)
        with torch.inference_mode(), evaluating(self):
            frames, lengths = self._embed_items(items, keep, batch_size, pooled=pool is not None)
        return self.assemble(frames, lengths, keep, pool, dtype, single_layer=is_single_layer(layers))

    def _check_one_frame(self, items: list[np.ndarray]) -> None:
        """Refuse items too short for one frame: their clip embedding would be 0 / 0 (NaN), or the
        max of nothing (-inf)."""
        lengths = self.frame_lengths(torch.tensor([len(x) for x in items])).tolist()
        short = [i for i, n in enumerate(lengths) if n == 0]
        if not short:
            return
        lo, hi = 1, self.window_plan()[0]  # the fewest samples that give a frame, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if int(self.frame_lengths(torch.tensor([mid]))[0]) else (mid + 1, hi)
        first, more = short[0], f" (and {len(short) - 1} more)" if len(short) > 1 else ""
        raise AudioInputError(
            f"item {first}{more} holds {len(items[first]) / self.sample_rate * 1000:.1f} ms of audio, too short for one "
            f"frame of this model, which needs {lo / self.sample_rate * 1000:.1f} ms ({lo} samples at "
            f"{self.sample_rate} Hz): drop it, or pad it with silence to that length"
        )

    def layer_indices(self, layers: LayersArg) -> list[int]:
        """`layers` as `embed()` takes it ("last", "all", an int or a list; negative from the end)
        -> the layer numbers, each in 0..num_layers-1."""
        n = self.num_layers
        if isinstance(layers, (np.ndarray, torch.Tensor)):  # np.arange(3): its truth value is ambiguous
            layers = layers.tolist()
        if layers == "last":
            chosen: list[int] = [n - 1]
        elif layers == "all":
            chosen = list(range(n))
        elif _is_int(layers):
            chosen = [int(layers)]
        elif isinstance(layers, (list, tuple)) and layers and all(_is_int(i) for i in layers):
            chosen = [int(i) for i in layers]
        else:
            raise ValueError(f"layers must be 'last', 'all', an int or a list of ints, not {layers!r}")
        bad = [i for i in chosen if not -n <= i < n]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: this model has {n} layers (0..{n - 1}, or -1 for the last)")
        return [i % n for i in chosen]

    # --- windowing ----------------------------------------------------------------------------
    # embed() cuts audio into windows, runs them in batches and stitches their frames. `musicssl
    # embed` (bulk/pipeline.py) drives the same steps itself, packing windows of many files:
    # plan_windows -> stack_windows -> launch_windows -> place_window -> assemble.
    def window_plan(self) -> tuple[int, int, int]:
        """(window samples W, step samples, frames to drop at the start of a non-first window)."""
        W = max(int(round(self.context_seconds * self.sample_rate)), self.hop_length)
        ov = int(round(self.overlap_seconds * self.sample_rate))
        # The step is a whole number of frame hops so every window's frames fall on one global grid.
        step = max((W - ov) // self.hop_length, 1) * self.hop_length
        frames_full = int(self.frame_lengths(torch.tensor([W]))[0])
        frames_step = step // self.hop_length
        return W, step, max((frames_full - frames_step) // 2, 0)

    def plan_windows(self, n_items_lengths: list[int]) -> list[Window]:
        """Items of these lengths (samples) -> their windows: every item's in order, the last of each
        shorter where its audio ends."""
        W, step, _ = self.window_plan()
        out = []
        for i, n in enumerate(n_items_lengths):
            k = 0
            while True:
                start = k * step
                out.append(Window(i, k, start, min(W, n - start)))
                if start + W >= n:
                    break
                k += 1
        return out

    def _embed_items(self, items: list[np.ndarray], keep: list[int], batch_size: int,
                     pooled: bool = False) -> tuple[torch.Tensor | list[RunningPool], torch.Tensor]:
        """Run all windows of all items, longest first, stitched in place -> frames (B, T, L, D)
        (`pooled`: a RunningPool per item instead), lengths (B,)."""
        with torch.inference_mode(False):  # returned as ordinary tensors: autograd and in-place edits work on them
            lengths = self.frame_lengths(torch.tensor([len(x) for x in items]))
            if pooled:  # only the clip is returned: memory must not grow with the audio
                frames: Any = [RunningPool(int(n), len(keep), self.embed_dim) for n in lengths]
            else:
                frames = torch.zeros(len(items), int(lengths.max()), len(keep), self.embed_dim)
        windows = self.plan_windows([len(x) for x in items])
        last_window = {w.item: w.index for w in windows}
        # Longest first: batches then hold windows of similar length and pad little.
        order = sorted(windows, key=lambda w: -w.length)
        plan = self.window_plan()

        def place(batch: list[Window], launched: Launched) -> None:
            stacked, n_valid = launched.result()
            for j, w in enumerate(batch):
                if pooled:
                    frames[w.item].add(stacked[j])
                else:
                    self.place_window(frames[w.item], w, w.index == last_window[w.item], stacked[j], n_valid[j], plan)

        pending, overlap = None, self.device.type == "cuda"  # a CPU has nothing to overlap
        # A compiled model pads every batch to full windows anyway: splitting by length would only add batches.
        min_share = 0.0 if getattr(self, "_compiled_features", None) is not None else BATCH_MIN_SHARE
        for batch in _length_batches(order, batch_size, min_share):
            wav = self.stack_windows([items[w.item] for w in batch], batch)
            rows = self.rows_to_pool(batch, [w.index == last_window[w.item] for w in batch], plan) if pooled else None
            launched = self.launch_windows(wav, [w.length for w in batch], keep, rows)
            if pending:  # stitched while the device runs the batch just launched
                place(*pending)
            pending = batch, launched
            if not overlap:
                place(*pending)
                pending = None
        if pending:
            place(*pending)
        return frames, lengths

    def stack_windows(self, audio: Sequence[np.ndarray | torch.Tensor], windows: Sequence[Window]) -> torch.Tensor:
        """Each window's samples of its item's audio (S,), zero-padded -> (b, S_max); in pinned memory
        when the model is on a GPU, so the copy there does not wait for the device."""
        wav = torch.zeros(len(windows), max(w.length for w in windows), pin_memory=self.device.type == "cuda")
        for j, (x, w) in enumerate(zip(audio, windows)):
            wav[j, : w.length] = torch.as_tensor(x[w.start : w.start + w.length])
        return wav

    def launch_windows(self, wav: torch.Tensor, n_samples: list[int], keep: list[int],
                       pool_rows: Sequence[tuple[int, int]] | None = None) -> Launched:
        """Start padded windows wav (b, S) through the model; the result is the hidden states of `keep`
        (b, T, L, D) float32 on the CPU and the valid frames of each window. With `pool_rows` (each
        window's rows [lo, hi) that its item keeps, `window_rows`), the result is their sum and max
        (b, 2, L, D), reduced on the model's device: only that much is copied back.

        On a GPU nothing here waits for the device (unless the model reads its lengths back): the
        caller prepares or stitches another batch while this one runs, then asks for the result.
        """
        device, rows = self.device, len(n_samples)
        compiled = getattr(self, "_compiled_features", None)
        if compiled is not None:
            wav, n_samples = self._pad_for_compile(wav, n_samples)
        n = torch.tensor(n_samples)
        n_valid = self.frame_lengths(n[:rows]).tolist()
        if device.type != "cuda":
            hidden = (compiled or self.forward_features)(wav.to(device), n.to(device))
            stacked = _pool_rows(torch.stack([hidden[i][:rows] for i in keep], dim=2).float(), pool_rows)
            return Launched(stacked.cpu(), n_valid)
        # From pinned memory, with non_blocking, the copies in are queued rather than waited for.
        wav, n = wav if wav.is_pinned() else wav.pin_memory(), n.pin_memory()
        hidden = (compiled or self.forward_features)(wav.to(device, non_blocking=True), n.to(device, non_blocking=True))
        stacked = _pool_rows(torch.stack([hidden[i][:rows] for i in keep], dim=2).float(), pool_rows)
        # Into pinned host memory (non_blocking allocates it): a copy into pageable memory runs at
        # about a third of the rate, and took longer than the model itself (bench/RESULTS.md).
        host = stacked.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(stacked.device))
        return Launched(host, n_valid, done)

    def compile_windows(self, **compile_kwargs: Any) -> "Encoder":
        """Run `embed()` (and `musicssl embed`) through `torch.compile(forward_features)`; returns self.

        Each batch is then padded to the full window (`context_seconds`) and to a power-of-two number
        of windows, so a run compiles a few shapes once (batches of 1, 2, 4, ... up to the batch size,
        each with and without a short window) instead of once per file length. compile_kwargs go to
        `torch.compile` (e.g. mode="max-autotune", backend=...).
        """
        self._compiled_features = torch.compile(self.forward_features, dynamic=False, **compile_kwargs)
        return self

    def _pad_for_compile(self, wav: torch.Tensor, n_samples: list[int]) -> tuple[torch.Tensor, list[int]]:
        """(b, S) -> (2^k >= b, W) with W the window; the added rows are silence of full length."""
        W = self.window_plan()[0]
        rows = 1 << (len(n_samples) - 1).bit_length()
        out = torch.zeros(rows, W, pin_memory=wav.is_pinned())
        out[: wav.shape[0], : wav.shape[1]] = wav
        return out, list(n_samples) + [W] * (rows - len(n_samples))

    def place_window(self, frames: torch.Tensor, w: Window, last: bool, window: torch.Tensor, n_valid: int,
                     plan: tuple[int, int, int]) -> None:
        """Stitch one window's frames (T_w, L, D) into its item's frames (T, L, D) in place; `plan` is
        `window_plan()`, computed once by the caller."""
        g0, lo, hi = self.window_rows(w, last, n_valid, plan)
        frames[g0 + lo : g0 + hi] = window[lo:hi]

    def rows_to_pool(self, windows: Sequence[Window], last: Sequence[bool],
                     plan: tuple[int, int, int]) -> list[tuple[int, int]]:
        """Each window's rows [lo, hi) that its item keeps: `launch_windows(pool_rows=...)`."""
        n_valid = self.frame_lengths(torch.tensor([w.length for w in windows])).tolist()
        return [self.window_rows(w, is_last, n, plan)[1:] for w, is_last, n in zip(windows, last, n_valid)]

    def window_rows(self, w: Window, last: bool, n_valid: int, plan: tuple[int, int, int]) -> tuple[int, int, int]:
        """(g0, lo, hi): window `w` gives its item frames g0 + lo .. g0 + hi from its rows [lo, hi)."""
        _, step, trim = plan
        frames_step = step // self.hop_length
        # Keep the middle of each window; the first and last keep their outer edges too.
        lo = 0 if w.index == 0 else trim
        hi = n_valid if last else min(trim + frames_step, n_valid)
        return w.index * frames_step, lo, hi

    def assemble(
        self, frames: torch.Tensor, lengths: torch.Tensor, keep: list[int], pool: str | None,
        dtype: torch.dtype, single_layer: bool,
    ) -> Embeddings:
        """frames (B, T, L, D) zero past `lengths` (or a RunningPool per item) -> Embeddings with clip
        pooled over valid frames."""
        if isinstance(frames, list):
            clip = torch.stack([f.clip(pool) for f in frames])
            return self._embeddings(None, clip[:, 0] if single_layer else clip, lengths, int(lengths.max()), keep,
                                    pool, dtype)
        T = frames.shape[1]
        clip = masked_pool(frames, lengths, pool or "mean")
        frames = frames.transpose(1, 2)  # (B, L, T, D), a view
        if single_layer:
            frames, clip = frames[:, 0], clip[:, 0]
        return self._embeddings(frames, clip, lengths, T, keep, pool, dtype)

    def _embeddings(self, frames: torch.Tensor | None, clip: torch.Tensor, lengths: torch.Tensor, T: int,
                    keep: list[int], pool: str | None, dtype: torch.dtype) -> Embeddings:
        timestamps = (self.frame_offset + torch.arange(T, dtype=torch.float64) * self.hop_length) / self.sample_rate
        return Embeddings(
            frames=None if pool else frames.to(dtype),
            timestamps=timestamps.float(),
            lengths=lengths,
            clip=clip.to(dtype),
            layers=keep,
            sample_rate=self.sample_rate,
            frame_rate=self.frame_rate,
        )


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode (no dropout, BatchNorm's running statistics, left unchanged), then
    put back each submodule's own mode (a frozen backbone may sit in eval inside a training model)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def init_args(local_vars: dict[str, Any]) -> dict[str, Any]:
    """An encoder's constructor arguments from its `locals()`, taken before it sets any other local:
    what `Encoder.args` keeps for config.json."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}


def masked_pool(frames: torch.Tensor, lengths: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """frames (B, T, ...) and each item's valid frames (B,) -> (B, ...): the mean or max over them.
    Frames past `lengths` are ignored whatever they hold (NaN too); an item with none gives zeros."""
    B, T = frames.shape[:2]
    n = lengths.to(frames.device).long().clamp(min=0, max=T)
    if frames.requires_grad:  # one masked pass: a slice per item would each take a full-size gradient
        per_item = (B,) + (1,) * (frames.dim() - 2)
        valid = (torch.arange(T, device=frames.device)[None, :] < n[:, None]).view(B, T, *per_item[1:])
        if how == "max":
            pooled = frames.masked_fill(~valid, float("-inf")).amax(dim=1)
            return torch.where(n.view(per_item) > 0, pooled, torch.zeros_like(pooled))
        return frames.masked_fill(~valid, 0).sum(dim=1) / n.clamp(min=1).view(per_item).to(frames.dtype)
    # Item by item over views: no masked copy of frames, which may be hours long.
    empty = frames.new_zeros(frames.shape[2:])
    pooled = [(frames[i, :k].amax(dim=0) if how == "max" else frames[i, :k].mean(dim=0)) if k > 0 else empty
              for i, k in enumerate(n.tolist())]
    return torch.stack(pooled)


class RunningPool:
    """Stands in for one item's frames (T, L, D) when only its clip is kept: `add` takes each window's
    rows reduced to a sum and max, so memory does not grow with the audio."""

    def __init__(self, n_frames: int, layers: int, dim: int) -> None:
        self.shape = (n_frames, layers, dim)
        self.sum = torch.zeros(layers, dim)
        self.max = torch.full((layers, dim), float("-inf"))
        self.nbytes = self.sum.nbytes + self.max.nbytes

    def add(self, pooled: torch.Tensor) -> None:
        """A window's rows already reduced (`launch_windows(pool_rows=...)`): (2, L, D) sum and max."""
        self.sum += pooled[0]
        torch.maximum(self.max, pooled[1], out=self.max)

    def clip(self, pool: str | None) -> torch.Tensor:
        """(L, D): the max, or the mean over the item's frames."""
        return self.max.clone() if pool == "max" else self.sum / self.shape[0]


def _pool_rows(stacked: torch.Tensor, rows: Sequence[tuple[int, int]] | None) -> torch.Tensor:
    """stacked (b, T, L, D) -> (b, 2, L, D): sum and max over each window's rows [lo, hi); None: as is.
    A window that gives its item no rows (hi <= lo) gives a sum of 0 and a max of -inf."""
    if rows is None:
        return stacked
    out = stacked.new_empty((stacked.shape[0], 2, *stacked.shape[2:]))
    out[:, 0], out[:, 1] = 0.0, float("-inf")
    # Window by window over views: a mask over the batch would copy it twice, and rows past a
    # window's end may hold anything (NaN from a masked softmax) that a product with 0 would keep.
    for j, (lo, hi) in enumerate(rows):
        if hi > lo:
            torch.sum(stacked[j, lo:hi], dim=0, out=out[j, 0])
            torch.amax(stacked[j, lo:hi], dim=0, out=out[j, 1])
    return out


def is_single_layer(layers: LayersArg) -> bool:
    """Whether `layers` asks for one layer as such ("last" or an int, a 0-d array or tensor too):
    embed() then drops the L axis."""
    if isinstance(layers, (np.ndarray, torch.Tensor)) and layers.ndim == 0:
        layers = layers.item()
    return (isinstance(layers, str) and layers == "last") or isinstance(layers, (int, np.integer))


def conv_frames(lengths: torch.Tensor, hop: int, patch: int = 1) -> torch.Tensor:
    """Frames of a centred STFT with `hop` (S // hop + 1), grouped by `patch` (ceil)."""
    return torch.div(torch.div(lengths, hop, rounding_mode="floor") + 1 + patch - 1, patch, rounding_mode="floor")


def _is_int(x: Any) -> bool:
    """An int or numpy integer, not a bool (True would quietly mean layer 1)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# A window joins a batch only if it is at least this share of the batch's longest: padding is compute
# thrown away (a 60 s clip's 10 s last window padded to 30 s beside two full ones costs 90 s, not 70),
# and on a CPU a larger batch gains little. Sorted windows of similar length still share batches.
BATCH_MIN_SHARE = 0.8


def _length_batches(windows: list[Window], batch_size: int, min_share: float) -> list[list[Window]]:
    """Windows sorted longest first -> batches of at most `batch_size`, none shorter than `min_share`
    of its batch's first."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or w.length < min_share * last[0].length:
            batches.append([w])
        else:
            last.append(w)
    return batches


def check_batch_size(batch_size: Any) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, not {batch_size!r}")
