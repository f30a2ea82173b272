"""Decoded frames taken block by block, mixed to mono and resampled as they arrive.

A long file is then never held as all its channels at its own rate: an hour of 44.1 kHz stereo is
1.3 GB of float32, and the 16 kHz mono a model wants is 230 MB. Decoding one such MP3 whole peaked
at 3.75 GB; where the length is known beforehand, the result is the only large buffer.
"""

from __future__ import annotations

import math

import numpy as np
import soxr


# Below this no recording is audio a model can use (telephony's 8 kHz is the lowest in use): a rate
# under it is a damaged header, or a rate given in kHz.
MIN_RATE = 1000
# Above this no rate is audio either (DXD's 352.8 kHz and ultrasound recorders' 1 MHz are the highest
# in use), and soxr takes minutes, or never returns, designing a filter for such a ratio.
MAX_RATE = 10_000_000


class ImplausibleRate(ValueError):
    """A stream's sample rate is under MIN_RATE (the caller names the file)."""


class FrameSink:
    """Collects decoded blocks (n, C) float32 at a file's rate; `result()` is (S,) mono or (S, C),
    at `sr` if given: soxr's stream, which gives the same samples as `soxr.resample` in one go."""

    def __init__(self, mono: bool, sr: int | None) -> None:
        self.mono, self.sr = mono, sr
        self.start(0, 1)

    def start(self, file_sr: int, channels: int) -> None:
        """Begin (again) for a stream of `channels` at `file_sr` Hz, dropping what came before."""
        if 0 < file_sr < MIN_RATE:  # before a buffer for its length is allocated (1 Hz: 16000x the frames)
            raise ImplausibleRate(f"its header gives a sample rate of {file_sr} Hz, which no audio has")
        self.file_sr, self.channels = file_sr, channels
        self.frames = 0  # frames received, at file_sr
        self.bad = 0  # NaN or Inf samples received
        self._buf: np.ndarray | None = None  # the result, when its length was expected
        self._filled = 0
        self._parts: list[np.ndarray] = []  # what did not fit in _buf, or all of it without one
        self._head: list[np.ndarray] = []  # the first blocks as received (see result)
        self._stream = None
        if self.sr is not None and file_sr > 0 and self.sr != file_sr:
            width = 1 if self.mono else channels
            self._stream = soxr.ResampleStream(file_sr, self.sr, width, dtype="float32", quality="HQ")

    def expect(self, frames: int) -> None:
        """About `frames` (at the file's rate) will come: write the result into one buffer as it
        arrives, rather than keep the blocks and join them at the end (twice the memory)."""
        n = frames if self._stream is None else math.ceil(frames * self.sr / self.file_sr) + 1
        self._buf = np.empty((n,) if self.mono else (n, self.channels), np.float32)

    def add(self, block: np.ndarray) -> None:
        """Take (n, C) frames; the caller may reuse `block` afterwards."""
        if not len(block):
            return
        if self.frames < _HEAD_FRAMES:
            self._head.append(block[: _HEAD_FRAMES - self.frames].copy())
        self.frames += len(block)
        if not np.isfinite(block.sum()):  # one pass and no mask in the usual, finite case
            self.bad += block.size - int(np.count_nonzero(np.isfinite(block)))
        x = block
        if self.mono:
            x = block[:, 0] if block.shape[1] == 1 else mix_down(block)
        if self._stream is not None:
            x = self._stream.resample_chunk(np.ascontiguousarray(x))
        self._keep(x, owned=not np.may_share_memory(x, block))

    def result(self) -> np.ndarray:
        """Everything received: (S,) when mono, else (S, C); float32, contiguous."""
        empty = np.zeros((0,) if self.mono else (0, self.channels), np.float32)
        if self._stream is not None:
            self._keep(self._stream.resample_chunk(empty, last=True), owned=True)
            self._stream = None
        parts = ([] if self._buf is None else [self._buf[: self._filled]]) + self._parts
        if self.frames and not sum(len(x) for x in parts):
            return self._mean_of_head()
        if len(parts) != 1:
            return np.concatenate(parts) if parts else empty
        if self._buf is not None and self._filled < 0.9 * len(self._buf):
            return parts[0].copy()  # the expected length was too long: do not keep the rest alive
        return np.ascontiguousarray(parts[0], dtype=np.float32)

    def _mean_of_head(self) -> np.ndarray:
        """Audio shorter than one sample at `sr`: its mean as that one sample (as `resample` does),
        rather than no audio at all."""
        head = np.concatenate(self._head)
        return (mix_down(head) if self.mono else head).mean(axis=0, keepdims=True).astype(np.float32)

    def _keep(self, x: np.ndarray, owned: bool) -> None:
        end = self._filled + len(x)
        if self._buf is not None and not self._parts and end <= len(self._buf):
            self._buf[self._filled : end] = x
            self._filled = end
        else:  # no buffer, or more came than expected: keep the rest as it comes
            self._parts.append(x if owned else x.copy())


# Frames kept as received at the start of a file: more than one output sample's worth at any rate.
_HEAD_FRAMES = 4096


def mix_down(frames: np.ndarray) -> np.ndarray:
    """Average (S, C) frames to (S,); adds columns so no per-frame reduction runs."""
    out = np.array(frames[:, 0], dtype=np.result_type(frames.dtype, np.float32))
    for c in range(1, frames.shape[1]):
        out += frames[:, c]
    if frames.shape[1] > 1:
        out /= frames.shape[1]
    return out
