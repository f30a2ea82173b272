"""Turn whatever a user passes to `embed()` into mono float32 clips at the model's sample rate."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from musicssl.errors import AudioInputError

# More channels than any music layout (7.1): a trailing axis this short is channels, not samples.
_MAX_CHANNELS = 8
_INT_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


def is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def prepare_items(audio: Any, sr: int | None, target_sr: int) -> list[np.ndarray]:
    """Paths, arrays, tensors or lists of them -> list of (S,) float32 clips at `target_sr` Hz.

    Arrays: (S,) is one clip, (B, S) a batch of mono clips, (B, C, S) a batch of C-channel clips.
    List items: each (S,) or (C, S). Integer PCM is scaled to [-1, 1]; channels are averaged.
    A trailing axis of at most 8 after a longer one is (S, C) and refused, not read as 8-sample clips.
    """
    from musicssl.audio.io import check_rate

    sr = None if sr is None else check_rate(sr, "sr")
    if is_path(audio):
        return [_load_path(audio, target_sr)]
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        arr = _channels_first(_as_numpy(audio, "the audio"), "the audio", sr)
        if arr.ndim >= 2 and arr.shape[0] == 0:
            raise AudioInputError(f"the audio has shape {tuple(arr.shape)}: an empty batch; pass at least one clip")
        if arr.ndim == 1:
            clips = [arr]
        elif arr.ndim == 2:
            clips = list(arr)
        elif arr.ndim == 3:
            _check_channels(arr.shape[1], f"the audio, shape {tuple(arr.shape)},")
            clips = [c.mean(axis=0) for c in arr]
        else:
            raise AudioInputError(
                f"audio array has shape {tuple(arr.shape)}; pass (samples,), (batch, samples) or "
                "(batch, channels, samples), or a list of (samples,) / (channels, samples) clips"
            )
        return [_finish(c, sr, target_sr, f"item {i}") for i, c in enumerate(clips)]
    if isinstance(audio, Sequence) and not isinstance(audio, (bytes, bytearray)):
        if len(audio) == 0:
            raise AudioInputError("the audio is an empty list: pass at least one path or clip")
        return [_one_item(x, sr, target_sr, i) for i, x in enumerate(audio)]
    raise AudioInputError(
        f"the audio is a {type(audio).__name__}, which cannot be embedded: pass a path, a numpy array or torch tensor "
        "with sr=..., or a list of those"
    )


def _one_item(x: Any, sr: int | None, target_sr: int, i: int) -> np.ndarray:
    if is_path(x):
        return _load_path(x, target_sr)
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise AudioInputError(f"item {i} of the list is a {type(x).__name__}; expected a path, array or tensor")
    arr = _channels_first(_as_numpy(x, f"item {i}"), f"item {i}", sr)
    if arr.ndim == 2:
        _check_channels(arr.shape[0], f"item {i}, shape {tuple(arr.shape)},")
        arr = arr.mean(axis=0)
    elif arr.ndim != 1:
        raise AudioInputError(f"item {i} has shape {tuple(arr.shape)}; list items are (samples,) or (channels, samples)")
    return _finish(arr, sr, target_sr, f"item {i}")


def _load_path(path: Any, target_sr: int) -> np.ndarray:
    from musicssl.audio.io import load_audio

    x, _ = load_audio(path, sr=target_sr, mono=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_numpy(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise AudioInputError(f"{what} is a complex tensor; pass real-valued samples")
        if x.device.type == "meta":
            raise AudioInputError(f"{what} is a tensor on the 'meta' device, which holds shapes but no samples")
        x = x.detach().to("cpu")
        x = x.float() if x.is_floating_point() and x.dtype != torch.float64 else x  # float64: its level is checked first
        x = x.numpy()
    arr = np.asarray(x)
    if not arr.dtype.isnative:  # big-endian PCM read straight from AIFF or network bytes ('>i2')
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype in _INT_SCALE:
        return arr.astype(np.float32) / np.float32(_INT_SCALE[arr.dtype])
    if arr.dtype == np.uint8:  # 8-bit WAV convention: unsigned, centred on 128
        return (arr.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(arr.dtype, np.integer):  # int64 is what np.array([...]) of ints gives: its scale is unknown
        raise AudioInputError(f"{what} has dtype {arr.dtype}, which is no PCM format: pass float samples in "
                              "[-1, 1], or int8/int16/int32/uint8 PCM (x.astype(np.int16) if it holds 16-bit samples)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise AudioInputError(f"{what} has dtype {arr.dtype}; pass float samples in [-1, 1] or integer PCM")
    _check_level(arr, what)
    return arr.astype(np.float32, copy=False)


def _check_level(arr: np.ndarray, what: str) -> None:
    from musicssl.audio.io import check_level

    check_level(arr, what, AudioInputError, "scale it, e.g. x / np.abs(x).max()",
                "integer PCM passed as floats? Divide it by its scale (32768 for 16-bit)")


def _channels_first(arr: np.ndarray, what: str, sr: int | None) -> np.ndarray:
    """Refuse (..., samples, channels), the layout soundfile.read returns: taken as channels first,
    it would silently become thousands of clips of 2 samples. A trailing axis is channels when it
    is at most 8 after a longer one, or (a multichannel recording) shorter than 10 ms at `sr`
    after one more than 4 times as long."""
    if arr.ndim < 2 or arr.shape[-1] == 0:  # no samples: said as such later
        return arr
    n, before = arr.shape[-1], arr.shape[-2]
    if n <= _MAX_CHANNELS < before or (sr is not None and n < sr / 100 and before > 4 * n):
        raise AudioInputError(
            f"{what} has shape {tuple(arr.shape)}, which looks like (samples, channels), the layout "
            f"soundfile.read returns; embed() takes channels before samples: pass x.T for one clip "
            f"(x.transpose(0, 2, 1) for a batch), or x.mean(axis=-1) for mono"
        )
    return arr


def _check_channels(n: int, what: str) -> None:
    if n == 0:  # averaging no channels would give NaN, said as if the user's samples held it
        raise AudioInputError(f"{what} has 0 channels: pass (channels, samples) with at least one channel")


def _finish(x: np.ndarray, sr: int | None, target_sr: int, what: str) -> np.ndarray:
    from musicssl.audio.io import check_finite, resample

    if sr is None:
        raise AudioInputError(
            f"{what}: arrays and tensors need their sample rate, e.g. embed(x, sr=44100); "
            f"this model runs at {target_sr} Hz and resamples for you"
        )
    if x.shape[-1] == 0:
        raise AudioInputError(f"{what} has no samples")
    check_finite(x, what)
    return np.ascontiguousarray(resample(x, sr, target_sr), dtype=np.float32)
