"""Audio front-ends in plain torch: STFT, mel filterbanks, dB/log compressions, MFCC, Kaldi fbank.

Every front-end is an `nn.Module` that maps a waveform ``(..., S)`` (S samples) to features
``(..., n_bins, T)`` (T frames): leading batch/channel dims are kept, frequency comes before time as
in librosa. That holds for `KaldiFbank` too, although Kaldi itself writes ``(T, n_mels)``.

Front-ends always compute in float32: the input is cast inside ``forward`` and their filterbanks and
windows (non-persistent buffers, so they follow ``.to(device)`` but stay out of state dicts) keep
float32 when the module is cast with ``.to(torch.bfloat16)`` or ``.half()``, and autocast is off
inside them. An encoder can therefore run its backbone in bf16/fp16 without quantising its front-end.

Conventions follow librosa 0.11 (periodic windows, Slaney or HTK mel scale, dB with ``top_db``,
orthonormal DCT-II) and Kaldi's ``compute-fbank-feats`` (see `KaldiFbank`); the tests check parity
with librosa and kaldi-native-fbank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "AmplitudeToDB",
    "KaldiFbank",
    "Log",
    "Log10OnePlus",
    "MFCC",
    "MelSpectrogram",
    "Spectrogram",
    "Standardize",
    "deltas",
    "dct_matrix",
    "get_window",
    "hz_to_mel",
    "mel_filterbank",
    "mel_to_hz",
]


class _Float32Module(nn.Module):
    """Base for front-ends: float32 buffers stay float32 under ``.to(dtype)``, ``.half()``, ``.bfloat16()``.

    Device moves still apply. Only floating-point casts of float32 tensors are refused, so a
    front-end inside a bf16 encoder keeps full-precision windows and filterbanks.
    """

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        # Autocast would run filterbank matmuls in fp16/bf16 on float32 input, and fp16 overflows
        # on loud audio (a mel power of 1e5 and more): front-ends run with it off.
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return super().__call__(*args, **kwargs)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype != torch.float32 and out.is_floating_point():
                # Redo the move from the original so no precision is lost on the way.
                return t.to(device=out.device)
            return out

        return super()._apply(keep_float32, recurse)


def _flatten_batch(x: Tensor) -> tuple[Tensor, torch.Size]:
    """(..., S) -> (B, S) and the leading shape to restore."""
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


# --------------------------------------------------------------------------------------------------
# STFT


def get_window(window: str | Tensor, win_length: int) -> Tensor:
    """Periodic (DFT-even) analysis window of ``win_length`` samples, float32.

    Same as ``scipy.signal.get_window(name, win_length, fftbins=True)``, which librosa uses.
    ``window`` is "hann", "hamming", "blackman" or "rectangular" (alias "boxcar", "ones"), or a
    tensor of length ``win_length`` used as given.
    """
    if isinstance(window, Tensor):
        if window.shape != (win_length,):
            raise ValueError(f"window has shape {tuple(window.shape)}, expected ({win_length},)")
        return window.detach().to(torch.float32).clone()
    makers = {
        "hann": torch.hann_window,
        "hamming": torch.hamming_window,
        "blackman": torch.blackman_window,
    }
    if window in ("rectangular", "boxcar", "ones"):
        return torch.ones(win_length, dtype=torch.float32)
    if window not in makers:
        raise ValueError(f"unknown window {window!r}; use one of {sorted(makers)} or 'rectangular'")
    return makers[window](win_length, periodic=True, dtype=torch.float64).to(torch.float32)


def squared_magnitude(spec: Tensor) -> Tensor:
    """|X|^2 of a complex tensor, same shape, real. re^2 + im^2 avoids abs()'s sqrt-then-square; as two
    planes, not a sum over view_as_real's last axis of 2, which took twice an STFT's own time on CPU."""
    return spec.real.square() + spec.imag.square()


class Spectrogram(_Float32Module):
    """Short-time Fourier transform, as ``librosa.stft`` followed by ``abs() ** power``.

    Args:
        n_fft: FFT size in samples; gives ``n_fft // 2 + 1`` frequency bins.
        hop_length: samples between frames; default ``win_length // 4`` (librosa's default).
        win_length: window length in samples, <= n_fft; default n_fft. A shorter window is
            zero-padded on both sides to n_fft (centred), as librosa and torch do.
        window: window name (see `get_window`, periodic) or a tensor of ``win_length`` samples.
        power: 2.0 power spectrogram, 1.0 magnitude, None complex STFT, other exponents of |X|.
        center: pad ``n_fft // 2`` samples on both sides so that frame t is centred on sample
            ``t * hop_length``; T = 1 + S // hop_length. Without centring T = 1 + (S - n_fft) // hop.
        pad_mode: padding used when centring: "constant" (zeros, default, so a signal's frames do
            not depend on how much zero padding follows it in a batch) or "reflect" (both as librosa).

    Shapes: waveform (..., S) -> (..., n_fft // 2 + 1, T), float32 (complex64 when power is None).
    """

    window: Tensor

    def __init__(
        self,
        n_fft: int = 2048,
        hop_length: int | None = None,
        win_length: int | None = None,
        window: str | Tensor = "hann",
        power: float | None = 2.0,
        center: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        win_length = n_fft if win_length is None else win_length
        if not 0 < win_length <= n_fft:
            raise ValueError(f"win_length must be in [1, n_fft={n_fft}], got {win_length}")
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = win_length // 4 if hop_length is None else hop_length
        if self.hop_length < 1:
            raise ValueError(f"hop_length must be at least 1 sample, got {self.hop_length}"
                             + (f" (win_length // 4 of {win_length})" if hop_length is None else ""))
        self.power = power
        self.center = center
        self.pad_mode = pad_mode
        self.register_buffer("window", get_window(window, win_length), persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        self._check_length(waveform.shape[-1])
        x, lead = _flatten_batch(waveform.to(torch.float32))
        spec = torch.stft(
            x,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(torch.float32),
            center=self.center,
            pad_mode=self.pad_mode,
            return_complex=True,
        )
        spec = spec.reshape(*lead, *spec.shape[-2:])
        if self.power is None:
            return spec
        if self.power == 2.0:
            return squared_magnitude(spec)
        if self.power == 1.0:
            return spec.abs()
        return spec.abs().pow(self.power)

    def _check_length(self, n: int) -> None:
        """Refuse clips torch.stft cannot frame, saying why (its own error names padding internals)."""
        need = self.n_fft // 2 + 1 if self.center and self.pad_mode == "reflect" else 1 if self.center else self.n_fft
        if n < need:
            raise ValueError(f"a clip of {n} samples is too short for this spectrogram: it needs at least {need} "
                             f"(n_fft={self.n_fft}, center={self.center}, pad_mode={self.pad_mode!r})")

    def extra_repr(self) -> str:
        return (
            f"n_fft={self.n_fft}, hop_length={self.hop_length}, win_length={self.win_length}, "
            f"power={self.power}, center={self.center}, pad_mode={self.pad_mode!r}"
        )


# --------------------------------------------------------------------------------------------------
# Mel scale and filterbank

_SLANEY_F_SP = 200.0 / 3  # Hz per mel on the linear part (below 1 kHz)
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP  # = 15 mel
_SLANEY_LOGSTEP = math.log(6.4) / 27.0  # log-Hz per mel above 1 kHz


def hz_to_mel(freq: Tensor, htk: bool = False) -> Tensor:
    """Frequency in Hz -> mel: HTK ``2595 log10(1 + f / 700)``, or Slaney (Auditory Toolbox),
    linear below 1 kHz and logarithmic above (librosa's default)."""
    if htk:
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    # Clamp so the unused branch of `where` never takes log(0).
    ratio = freq.clamp(min=_SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ
    log_part = _SLANEY_MIN_LOG_MEL + torch.log(ratio) / _SLANEY_LOGSTEP
    return torch.where(freq >= _SLANEY_MIN_LOG_HZ, log_part, freq / _SLANEY_F_SP)


def mel_to_hz(mel: Tensor, htk: bool = False) -> Tensor:
    """Inverse of `hz_to_mel` (mel -> Hz)."""
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    log_part = _SLANEY_MIN_LOG_HZ * torch.exp(_SLANEY_LOGSTEP * (mel - _SLANEY_MIN_LOG_MEL))
    return torch.where(mel >= _SLANEY_MIN_LOG_MEL, log_part, mel * _SLANEY_F_SP)


def mel_filterbank(
    sample_rate: float,
    n_fft: int,
    n_mels: int = 128,
    f_min: float = 0.0,
    f_max: float | None = None,
    htk: bool = False,
    norm: Literal["slaney"] | None = "slaney",
) -> Tensor:
    """Triangular mel filterbank, as ``librosa.filters.mel``: (n_mels, n_fft // 2 + 1) float32.

    Triangles have corners at ``n_mels + 2`` points equally spaced in mel between ``f_min`` and
    ``f_max`` (Hz, default sample_rate / 2), evaluated at the FFT bin frequencies ``k * sr / n_fft``.
    ``norm="slaney"`` divides each triangle by its width in Hz (``2 / (f_right - f_left)``) so that
    every filter has unit area, which keeps energy per band comparable; None leaves peaks at 1.
    With many mels and a small n_fft some filters can be empty (all zero), as in librosa.
    """
    if norm not in ("slaney", None):
        raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
    f_max = sample_rate / 2.0 if f_max is None else f_max
    if not 0 <= f_min < f_max:
        raise ValueError(f"the mel band runs from f_min={f_min} to f_max={f_max} Hz: give 0 <= f_min < f_max")
    if f_max > sample_rate / 2.0:
        log.warning("mel filters above f_max=%s Hz are past the Nyquist frequency of %s Hz audio (%s Hz) and stay "
                    "empty: give f_max <= %s", f_max, sample_rate, sample_rate / 2.0, sample_rate / 2.0)
    f64 = torch.float64
    fft_freqs = torch.arange(n_fft // 2 + 1, dtype=f64) * (sample_rate / n_fft)
    mel_edges = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min, dtype=f64), htk)),
        float(hz_to_mel(torch.tensor(f_max, dtype=f64), htk)),
        n_mels + 2,
        dtype=f64,
    )
    hz_edges = mel_to_hz(mel_edges, htk)
    widths = hz_edges.diff()  # (n_mels + 1,)
    ramps = hz_edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_freqs)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if norm == "slaney":
        weights = weights * (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]
    return weights.to(torch.float32)


class MelSpectrogram(_Float32Module):
    """Mel spectrogram, as ``librosa.feature.melspectrogram``: `Spectrogram` then `mel_filterbank`.

    Args: see `Spectrogram` (n_fft, hop_length and win_length in samples; power 2 = power, 1 =
    magnitude) and `mel_filterbank` (f_min, f_max in Hz; htk mel scale; norm "slaney" or None).

    Shapes: waveform (..., S) -> (..., n_mels, T), float32, linear (not log) scale.
    """

    fb: Tensor

    def __init__(
        self,
        sample_rate: int,
        n_fft: int = 2048,
        hop_length: int | None = None,
        win_length: int | None = None,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: float | None = None,
        power: float = 2.0,
        htk: bool = False,
        norm: Literal["slaney"] | None = "slaney",
        center: bool = True,
        pad_mode: str = "constant",
        window: str | Tensor = "hann",
    ) -> None:
        super().__init__()
        if power is None:
            raise ValueError("MelSpectrogram needs a real power (2.0 power, 1.0 magnitude), not None")
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.spectrogram = Spectrogram(n_fft, hop_length, win_length, window, power, center, pad_mode)
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, htk, norm)
        self.register_buffer("fb", fb, persistent=False)

    @property
    def hop_length(self) -> int:
        return self.spectrogram.hop_length

    def forward(self, waveform: Tensor) -> Tensor:
        spec = self.spectrogram(waveform)
        return torch.matmul(self.fb.to(torch.float32), spec)


# --------------------------------------------------------------------------------------------------
# Compressions


def _feature_dims(x: Tensor) -> tuple[int, ...]:
    """The last two dims (freq, time) of one example; all dims for 0-d/1-d input."""
    return tuple(range(max(x.ndim - 2, 0), x.ndim))


class AmplitudeToDB(_Float32Module):
    """Decibels, as ``librosa.power_to_db`` (stype "power") or ``librosa.amplitude_to_db`` ("magnitude").

    ``db = m * log10(max(amin, x)) - m * log10(max(amin, ref))`` with m = 10 for power and 20 for
    magnitude; then, if ``top_db`` is set, ``db = max(db, db.max() - top_db)``.

    Args:
        stype: "power" (|X|^2) or "magnitude" (|X|).
        ref: reference value (0 dB), in the input's units, or "max" for each example's maximum
            (librosa's ``ref=np.max``).
        amin: floor in the input's units. Note librosa.amplitude_to_db defaults to amin=1e-5;
            pass that to match it on magnitudes.
        top_db: dynamic range kept below the peak, in dB; None keeps everything.

    The peak for ``top_db`` and ``ref="max"`` is taken per example over its last two dims
    (freq, time), so a batch gives the same result as its items one by one. librosa takes it over
    the whole array it is given, which is the same for a single (freq, time) example.

    Shapes: (..., F, T) -> (..., F, T), float32. Complex input is taken by its modulus.
    """

    def __init__(
        self,
        stype: Literal["power", "magnitude"] = "power",
        ref: float | Literal["max"] = 1.0,
        amin: float = 1e-10,
        top_db: float | None = 80.0,
    ) -> None:
        super().__init__()
        if stype not in ("power", "magnitude"):
            raise ValueError(f"stype must be 'power' or 'magnitude', got {stype!r}")
        if amin <= 0:
            raise ValueError(f"amin must be positive, got {amin}")
        if top_db is not None and top_db < 0:
            raise ValueError(f"top_db must be non-negative, got {top_db}")
        self.stype = stype
        self.ref = ref
        self.amin = amin
        self.top_db = top_db
        self.multiplier = 10.0 if stype == "power" else 20.0

    def forward(self, x: Tensor) -> Tensor:
        x = x.abs() if x.is_complex() else x
        x = x.to(torch.float32)
        if self.stype == "magnitude":
            x = x.abs()
        db = self.multiplier * torch.log10(x.clamp(min=self.amin))
        if self.ref == "max":
            peak = x.amax(dim=_feature_dims(x), keepdim=True)
            db = db - self.multiplier * torch.log10(peak.clamp(min=self.amin))
        else:
            db = db - self.multiplier * math.log10(max(self.amin, abs(float(self.ref))))
        if self.top_db is not None:
            db = torch.maximum(db, db.amax(dim=_feature_dims(db), keepdim=True) - self.top_db)
        return db

    def extra_repr(self) -> str:
        return f"stype={self.stype!r}, ref={self.ref!r}, amin={self.amin}, top_db={self.top_db}"


class Log(_Float32Module):
    """Natural log with an additive floor: ``log(x + eps)``. Shapes: any -> same, float32."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x.to(torch.float32) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Log10OnePlus(_Float32Module):
    """``log10(1 + a * x)``, the compression of OMAR-RQ's mel front-end (a = 1e4).

    Uses ``log1p`` so small values keep their precision. Shapes: any -> same, float32.
    """

    def __init__(self, a: float = 1e4) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: Tensor) -> Tensor:
        return torch.log1p(self.a * x.to(torch.float32)) / math.log(10.0)

    def extra_repr(self) -> str:
        return f"a={self.a}"


class Standardize(_Float32Module):
    """Fixed-statistics normalisation ``(x - mean) / std`` (e.g. dataset stats shipped with weights).

    ``mean`` and ``std`` are floats or tensors broadcastable to the input (per-bin stats of shape
    (n_bins, 1) for (..., n_bins, T) features). They are non-persistent buffers unless
    ``persistent=True``, in which case they are saved in the state dict.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: float | Tensor, std: float | Tensor, persistent: bool = False) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).clone()
        std_t = torch.as_tensor(std, dtype=torch.float32).clone()
        if bool((std_t <= 0).any()):
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean_t, persistent=persistent)
        self.register_buffer("std", std_t, persistent=persistent)

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(torch.float32) - self.mean.to(torch.float32)) / self.std.to(torch.float32)


# --------------------------------------------------------------------------------------------------
# MFCC and deltas


def dct_matrix(n_out: int, n_in: int) -> Tensor:
    """Orthonormal DCT-II as a matrix (n_out, n_in), float32: ``y = D @ x`` equals
    ``scipy.fft.dct(x, type=2, norm="ortho")[:n_out]`` along the first axis."""
    if not 0 < n_out <= n_in:
        raise ValueError(f"need 0 < n_out <= n_in, got n_out={n_out}, n_in={n_in}")
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    n = torch.arange(n_in, dtype=torch.float64)[None, :]
    dct = torch.cos(math.pi / n_in * (n + 0.5) * k) * math.sqrt(2.0 / n_in)
    dct[0] /= math.sqrt(2.0)
    return dct.to(torch.float32)


def deltas(x: Tensor, width: int = 9) -> Tensor:
    """Regression deltas along the last (time) axis: (..., T) -> (..., T).

    ``d[t] = sum_{n=1..N} n (c[t+n] - c[t-n]) / (2 sum_{n=1..N} n^2)`` with ``N = (width - 1) / 2``
    (the HTK/Kaldi formula). Frames beyond either end repeat the edge frame. This equals
    ``librosa.feature.delta(x, width=width, order=1)`` on interior frames (N from each end);
    near the edges librosa fits a local polynomial instead (savgol ``mode="interp"``), so the first
    and last N frames differ.
    """
    if width < 3 or width % 2 == 0:
        raise ValueError(f"width must be odd and >= 3, got {width}")
    if x.shape[-1] == 0:
        return torch.zeros_like(x)
    half = (width - 1) // 2
    denom = 2.0 * sum(n * n for n in range(1, half + 1))
    kernel = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device) / denom
    flat = F.pad(x.reshape(-1, 1, x.shape[-1]), (half, half), mode="replicate")
    return F.conv1d(flat, kernel.view(1, 1, -1)).reshape(x.shape)


class MFCC(_Float32Module):
    """Mel-frequency cepstral coefficients, as ``librosa.feature.mfcc`` (DCT type 2, norm "ortho").

    Power mel spectrogram (see `MelSpectrogram`) -> dB (`AmplitudeToDB`, ref 1, amin 1e-10,
    ``top_db`` per example) -> first ``n_mfcc`` orthonormal DCT-II coefficients over the mel axis ->
    optional liftering ``1 + lifter / 2 * sin(pi * k / lifter)``, k = 1..n_mfcc (as librosa).

    ``deltas`` = 1 appends first-order `deltas` (width ``delta_width``), 2 also appends the delta of
    the delta, along the feature axis: [c; d; dd].

    Shapes: waveform (..., S) -> (..., n_mfcc * (1 + deltas), T), float32.
    """

    dct: Tensor

    def __init__(
        self,
        sample_rate: int,
        n_mfcc: int = 20,
        n_fft: int = 2048,
        hop_length: int | None = 512,
        win_length: int | None = None,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: float | None = None,
        htk: bool = False,
        norm: Literal["slaney"] | None = "slaney",
        center: bool = True,
        pad_mode: str = "constant",
        top_db: float | None = 80.0,
        lifter: float = 0.0,
        deltas: int = 0,
        delta_width: int = 9,
    ) -> None:
        super().__init__()
        if deltas not in (0, 1, 2):
            raise ValueError(f"deltas must be 0, 1 or 2, got {deltas}")
        if lifter < 0:
            raise ValueError(f"lifter must be non-negative, got {lifter}")
        self.n_mfcc = n_mfcc
        self.deltas = deltas
        self.delta_width = delta_width
        self.melspec = MelSpectrogram(
            sample_rate, n_fft, hop_length, win_length, n_mels, f_min, f_max, 2.0, htk, norm, center, pad_mode
        )
        self.to_db = AmplitudeToDB("power", ref=1.0, amin=1e-10, top_db=top_db)
        dct = dct_matrix(n_mfcc, n_mels)
        if lifter > 0:
            k = torch.arange(1, n_mfcc + 1, dtype=torch.float64)
            dct = dct * (1.0 + lifter / 2.0 * torch.sin(math.pi * k / lifter)).to(torch.float32)[:, None]
        self.register_buffer("dct", dct, persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        coeffs = torch.matmul(self.dct.to(torch.float32), self.to_db(self.melspec(waveform)))
        parts = [coeffs]
        for _ in range(self.deltas):
            parts.append(deltas(parts[-1], self.delta_width))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else coeffs


# --------------------------------------------------------------------------------------------------
# Kaldi fbank
#
# The algorithm of Kaldi's compute-fbank-feats (feature-window.cc, feature-fbank.cc,
# mel-computations.cc; Kaldi is Apache-2.0), written here from its description, not copied.


def _kaldi_window(window: str, length: int, blackman_coeff: float = 0.42) -> Tensor:
    """Kaldi's analysis windows: symmetric (denominator N - 1) except "hann", which is periodic as in
    kaldi-native-fbank (Kaldi's own symmetric hann is "hanning"). float32, (length,)."""
    i = torch.arange(length, dtype=torch.float64)
    a = 2 * math.pi / (length - 1) if length > 1 else 0.0
    if window == "hann":
        a = 2 * math.pi / length
    if window in ("hanning", "hann"):
        w = 0.5 - 0.5 * torch.cos(a * i)
    elif window == "povey":
        # A Hann window raised to 0.85, so it does not quite reach zero at the ends.
        w = (0.5 - 0.5 * torch.cos(a * i)).pow(0.85)
    elif window == "hamming":
        w = 0.54 - 0.46 * torch.cos(a * i)
    elif window == "blackman":
        w = blackman_coeff - 0.5 * torch.cos(a * i) + (0.5 - blackman_coeff) * torch.cos(2 * a * i)
    elif window == "sine":
        w = torch.sin(0.5 * a * i)
    elif window == "rectangular":
        w = torch.ones(length, dtype=torch.float64)
    else:
        raise ValueError(
            f"unknown Kaldi window {window!r}; use povey, hamming, hanning, hann, blackman, sine or rectangular"
        )
    return w.to(torch.float32)


def _kaldi_mel(freq: Tensor) -> Tensor:
    """Kaldi's ``1127.0f * logf(1.0f + f / 700.0f)`` on float32 ``freq`` (Hz), float32 at each step.

    The log is taken in float64 and rounded once, which reproduces a correctly rounded logf
    (glibc's); torch's float32 log can be one ulp away, and that ulp moves edge weights.
    """
    return 1127.0 * torch.log((1.0 + freq / 700.0).double()).float()


def _kaldi_mel_banks(
    n_mels: int, padded_length: int, sample_rate: float, low_freq: float, high_freq: float
) -> Tensor:
    """Kaldi's triangular mel bank (n_mels, padded_length // 2 + 1), float32.

    Triangles are equally spaced in mel (1127 ln(1 + f / 700)) between ``low_freq`` and
    ``high_freq`` (Hz) and evaluated in mel, so they are not triangles in Hz as in librosa's.
    Peaks are 1 (no area normalisation) and the Nyquist bin gets no weight, as in Kaldi.

    The arithmetic is float32 in Kaldi's order of operations, as in Kaldi and kaldi-native-fbank:
    a bin just inside a triangle's edge has a tiny weight that float64 would change by ~0.2%,
    enough to move a log energy by 1e-3 when that bin is loud.

    A filter narrower than one FFT bin comes out empty (all zero, so log(eps) after the log);
    Kaldi refuses such settings ("num-mel-bins too large"), torchaudio's port allows them (e.g.
    128 bins at 16 kHz with 25 ms frames, as AST uses), and so do we.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0.0 else nyquist + high_freq
    if not (0.0 <= low_freq < nyquist and 0.0 < high <= nyquist and low_freq < high):
        raise ValueError(
            f"bad mel band: low_freq={low_freq} Hz, high_freq={high_freq} Hz (-> {high} Hz), "
            f"Nyquist {nyquist} Hz"
        )
    f32 = torch.float32
    mel_low = _kaldi_mel(torch.tensor(low_freq, dtype=f32))
    mel_high = _kaldi_mel(torch.tensor(high, dtype=f32))
    delta = (mel_high - mel_low) / (n_mels + 1)
    idx = torch.arange(n_mels, dtype=f32)[:, None]
    left, center, right = mel_low + idx * delta, mel_low + (idx + 1) * delta, mel_low + (idx + 2) * delta
    bin_width = torch.tensor(sample_rate, dtype=f32) / padded_length
    mel = _kaldi_mel(bin_width * torch.arange(padded_length // 2, dtype=f32))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = torch.where(mel <= center, up, down)
    weights = torch.where((mel > left) & (mel < right), weights, torch.zeros_like(weights))
    return F.pad(weights, (0, 1))  # zero column for the Nyquist bin


class KaldiFbank(_Float32Module):
    """Log mel filterbank energies as Kaldi's ``compute-fbank-feats`` / kaldi-native-fbank.

    Per frame of ``frame_length_ms`` every ``frame_shift_ms``: optional Gaussian dither (scaled by
    ``dither``; random, applied whenever dither > 0 as in Kaldi) -> subtract the frame's mean
    (``remove_dc_offset``) -> pre-emphasis ``y[i] = x[i] - p x[i-1]``, ``y[0] = x[0] - p x[0]`` ->
    window -> zero-pad to the next power of two (``round_to_power_of_two``) -> |FFT|^2 (or |FFT| when
    ``use_power`` is False) -> Kaldi mel bank (see `_kaldi_mel_banks`; ``high_freq <= 0`` means
    Nyquist + high_freq) -> ``log(max(x, float32 eps))`` when ``use_log``.

    Frames: with ``snip_edges`` T = 1 + (S - L) // shift whole frames (0 if S < L); without,
    T = (S + shift // 2) // shift frames centred on ``t * shift + shift // 2`` with the signal
    mirrored at its ends (``x[-1-i] = x[i]``), as Kaldi does.

    Windows (``window``): "povey" (Kaldi's default, hann ** 0.85), "hamming", "hanning" (Kaldi's
    symmetric hann), "hann" (periodic, as kaldi-native-fbank names it), "blackman" (with
    ``blackman_coeff``), "sine", "rectangular".

    ``use_energy`` prepends the log energy of the frame (after DC removal, before pre-emphasis and
    window when ``raw_energy``; floored at log(energy_floor) when energy_floor > 0) as feature 0.

    Scale: Kaldi front-ends are usually fed int16-range samples. Either pass ``x * 32768`` or set
    ``input_scale=32768`` to have the module do it; both give the same result.

    Shapes: waveform (..., S) in samples at ``sample_rate`` Hz -> (..., n_mels [+1], T), float32.
    Note the (features, time) layout, like the other front-ends here; Kaldi writes (T, n_mels),
    so transpose the last two dims to compare.
    """

    window: Tensor
    mel_banks: Tensor

    def __init__(
        self,
        sample_rate: float = 16000,
        n_mels: int = 80,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        dither: float = 0.0,
        preemphasis: float = 0.97,
        remove_dc_offset: bool = True,
        window: str = "povey",
        round_to_power_of_two: bool = True,
        snip_edges: bool = True,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        use_energy: bool = False,
        use_log: bool = True,
        use_power: bool = True,
        energy_floor: float = 0.0,
        raw_energy: bool = True,
        blackman_coeff: float = 0.42,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # Integer truncation of samp_freq * 0.001 * ms, in double precision, as Kaldi does.
        self.frame_length = int(sample_rate * 0.001 * frame_length_ms)
        self.frame_shift = int(sample_rate * 0.001 * frame_shift_ms)
        if self.frame_length < 1 or self.frame_shift < 1:
            raise ValueError(f"frame of {self.frame_length} samples every {self.frame_shift} is empty")
        self.padded_length = (
            1 << (self.frame_length - 1).bit_length() if round_to_power_of_two else self.frame_length
        )
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.dither = dither
        self.preemphasis = preemphasis
        self.remove_dc_offset = remove_dc_offset
        self.snip_edges = snip_edges
        self.use_energy = use_energy
        self.use_log = use_log
        self.use_power = use_power
        self.energy_floor = energy_floor
        self.raw_energy = raw_energy
        self.input_scale = input_scale
        self.register_buffer("window", _kaldi_window(window, self.frame_length, blackman_coeff), persistent=False)
        banks = _kaldi_mel_banks(n_mels, self.padded_length, sample_rate, low_freq, high_freq)
        self.register_buffer("mel_banks", banks, persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames T produced from ``num_samples`` samples."""
        if self.snip_edges:
            return 0 if num_samples < self.frame_length else 1 + (num_samples - self.frame_length) // self.frame_shift
        return (num_samples + self.frame_shift // 2) // self.frame_shift

    def _frame_indices(self, num_samples: int, device: torch.device) -> Tensor:
        """Sample index of every frame position, (T, frame_length), mirrored into [0, S)."""
        starts = torch.arange(self.num_frames(num_samples), device=device) * self.frame_shift
        if not self.snip_edges:
            starts = starts + self.frame_shift // 2 - self.frame_length // 2
        idx = starts[:, None] + torch.arange(self.frame_length, device=device)[None, :]
        if not self.snip_edges:
            # Symmetric reflection (edge sample repeated), folded as often as needed.
            period = 2 * num_samples
            idx = idx.remainder(period)
            idx = torch.where(idx >= num_samples, period - 1 - idx, idx)
        return idx

    def _log_energy(self, frames: Tensor) -> Tensor:
        eps = torch.finfo(torch.float32).eps
        energy = torch.log(frames.square().sum(-1).clamp(min=eps))
        if self.energy_floor > 0.0:
            energy = energy.clamp(min=math.log(self.energy_floor))
        return energy

    def forward(self, waveform: Tensor) -> Tensor:
        x = waveform.to(torch.float32)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        frames = x[..., self._frame_indices(x.shape[-1], x.device)]  # (..., T, L)
        if frames.shape[-2] == 0:  # too short for one frame; some FFT backends reject empty input
            return x.new_zeros(*x.shape[:-1], self.n_mels + int(self.use_energy), 0)
        if self.dither > 0.0:
            frames = frames + self.dither * torch.randn_like(frames)
        if self.remove_dc_offset:
            frames = frames - frames.mean(dim=-1, keepdim=True)
        energy = self._log_energy(frames) if self.use_energy and self.raw_energy else None
        if self.preemphasis != 0.0:
            # Kaldi's first sample is pre-emphasised against itself.
            first = frames[..., :1] * (1.0 - self.preemphasis)
            frames = torch.cat([first, frames[..., 1:] - self.preemphasis * frames[..., :-1]], dim=-1)
        frames = frames * self.window.to(torch.float32)
        if self.use_energy and not self.raw_energy:
            energy = self._log_energy(frames)
        spec = torch.fft.rfft(frames, n=self.padded_length)
        spec = squared_magnitude(spec)
        if not self.use_power:
            spec = spec.sqrt()
        mel = torch.matmul(spec, self.mel_banks.to(torch.float32).T)  # (..., T, n_mels)
        if self.use_log:
            mel = torch.log(mel.clamp(min=torch.finfo(torch.float32).eps))
        if energy is not None:
            mel = torch.cat([energy.unsqueeze(-1), mel], dim=-1)
        return mel.transpose(-1, -2)

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_mels={self.n_mels}, frame_length={self.frame_length}, "
            f"frame_shift={self.frame_shift}, padded_length={self.padded_length}, snip_edges={self.snip_edges}"
        )


# --------------------------------------------------------------------------------------------------
# Constant-Q and variable-Q transforms


def vqt_frequencies(fmin: float, n_bins: int, bins_per_octave: int) -> Tensor:
    """Centre frequencies in Hz of a CQT/VQT, ``fmin * 2 ** (k / bins_per_octave)``: (n_bins,) float64."""
    return fmin * 2.0 ** (torch.arange(n_bins, dtype=torch.float64) / bins_per_octave)


def vqt_lengths(
    freqs: Tensor, sample_rate: float, bins_per_octave: int, gamma: float = 0.0, filter_scale: float = 1.0
) -> Tensor:
    """Kernel length in samples of each VQT bin: ``ceil(Q * sr / (f + gamma / alpha))``, (n_bins,) float64.

    ``alpha = 2 ** (1 / bins_per_octave) - 1`` is the relative spacing of adjacent bins and
    ``Q = filter_scale / alpha``, the convention of nnAudio and PESTO; ``gamma`` (Hz) widens the low
    bins (bandwidth ``alpha * f + gamma``), which shortens their kernels; gamma 0 is the CQT.
    librosa defines alpha as ``(2 ** (2 / bpo) - 1) / (2 ** (2 / bpo) + 1)``, so its kernels are
    ~1% longer at 36 bins per octave.
    """
    alpha = 2.0 ** (1.0 / bins_per_octave) - 1.0
    q = filter_scale / alpha
    return torch.ceil(q * sample_rate / (freqs + gamma / alpha))


class VQT(_Float32Module):
    """Variable-Q transform magnitude (constant-Q with ``gamma=0``) by time-domain complex kernels.

    Bin k is centred on ``fmin * 2 ** (k / (12 * bins_per_semitone))`` Hz. Its kernel is a periodic
    window of `vqt_lengths` samples (l_k) times a complex exponential at that frequency, normalised
    to unit L1 norm, and the magnitude is multiplied by ``sqrt(l_k)``: the "librosa" normalisation
    of nnAudio, which PESTO's preprocessor uses, so a sinusoid of amplitude A at a bin's centre reads
    about ``A * sqrt(l_k) / 2`` there. Kernels are placed as nnAudio places them (sample offsets
    ``-ceil(l/2) .. floor(l/2) - 1`` around the frame centre), so magnitudes follow PESTO's `CQT`
    except at the edges, where the signal is zero-padded rather than reflected.

    Every frame is computed at full rate by ``conv1d`` (no multirate decimation, unlike librosa);
    bins are convolved one octave at a time so each group's kernels are only as wide as its longest
    (~l_k), not as wide as the lowest bin's. Compared with ``librosa.vqt`` (same fmin, bins, gamma),
    peaks fall on the same bins and magnitudes agree within a few percent away from the edges;
    the difference comes from librosa's bandwidth convention (see `vqt_lengths`), its resampling
    per octave and its reflect padding.

    Frames are centred (zero padding): frame t is centred on sample ``t * hop_length`` and
    ``T = S // hop_length + 1``, as in `Spectrogram`, so a signal's frames do not depend on the
    zeros that follow it in a batch. Computation is float32 with autocast disabled.

    Args:
        sample_rate: Hz.
        hop_length: samples between frames.
        fmin: centre frequency of bin 0, Hz.
        bins_per_semitone: bins per semitone (12 times that per octave).
        n_bins: number of bins; the top one must lie below Nyquist.
        gamma: bandwidth offset in Hz (0 = CQT; PESTO uses 7).
        filter_scale: scales every kernel length (Q).
        window: window name (see `get_window`).

    Shapes: waveform (..., S) -> (..., n_bins, T) magnitude, float32.
    """

    def __init__(
        self,
        sample_rate: int,
        hop_length: int,
        fmin: float = 27.5,
        bins_per_semitone: int = 3,
        n_bins: int = 251,
        gamma: float = 7.0,
        filter_scale: float = 1.0,
        window: str = "hann",
    ) -> None:
        super().__init__()
        if hop_length < 1 or n_bins < 1:
            raise ValueError(f"hop_length ({hop_length} samples) and n_bins ({n_bins}) must be at least 1")
        bpo = 12 * bins_per_semitone
        freqs = vqt_frequencies(fmin, n_bins, bpo)
        if float(freqs[-1]) >= sample_rate / 2:
            raise ValueError(
                f"the top VQT bin ({float(freqs[-1]):.1f} Hz) is above Nyquist ({sample_rate / 2:g} Hz): "
                "lower n_bins or fmin"
            )
        lengths = vqt_lengths(freqs, sample_rate, bpo, gamma, filter_scale)
        self.sample_rate, self.hop_length, self.n_bins = sample_rate, hop_length, n_bins
        self.fmin, self.bins_per_semitone, self.gamma, self.filter_scale = fmin, bins_per_semitone, gamma, filter_scale
        self.frequencies = freqs.to(torch.float32)
        self.lengths = lengths.to(torch.int64)
        self.register_buffer("scale", lengths.sqrt().to(torch.float32)[:, None], persistent=False)
        self.group_half_widths: list[int] = []
        for g, start in enumerate(range(0, n_bins, bpo)):
            kernels, half = _vqt_kernels(freqs[start : start + bpo], lengths[start : start + bpo], sample_rate, window)
            self.register_buffer(f"kernels_{g}", kernels, persistent=False)
            self.group_half_widths.append(half)

    @property
    def max_kernel_length(self) -> int:
        """Samples the longest kernel spans (the lowest bin's): a frame sees +- half of it."""
        return int(self.lengths.max())

    def forward(self, waveform: Tensor) -> Tensor:
        x, lead = _flatten_batch(waveform.to(torch.float32))
        n_samples, widest = x.shape[-1], max(self.group_half_widths)
        # One padded copy for all groups; each group takes the slice its kernel width needs.
        padded = F.pad(x[:, None, :], (widest, widest + 1))
        mags = []
        with torch.autocast(x.device.type, enabled=False):
            for g, half in enumerate(self.group_half_widths):
                kernels = getattr(self, f"kernels_{g}").to(torch.float32)
                segment = padded[..., widest - half : widest + half + 1 + n_samples]
                out = F.conv1d(segment, kernels, stride=self.hop_length)  # (B, 2 n_g, T)
                re, im = out.chunk(2, dim=1)
                mags.append(torch.sqrt(re.square() + im.square()))
        mag = torch.cat(mags, dim=1) * self.scale.to(torch.float32)
        return mag.reshape(*lead, *mag.shape[-2:])

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, hop_length={self.hop_length}, fmin={self.fmin:.4g}, "
            f"bins_per_semitone={self.bins_per_semitone}, n_bins={self.n_bins}, gamma={self.gamma}, "
            f"max_kernel_length={self.max_kernel_length}"
        )


def _vqt_kernels(freqs: Tensor, lengths: Tensor, sample_rate: float, window: str) -> tuple[Tensor, int]:
    """Real and imaginary kernels of a group of bins stacked as conv1d weights (2 n, 1, 2 h + 1),
    float32, with h the group's half width: tap m multiplies the sample at offset ``m - h``."""
    half = int(torch.ceil(lengths.max() / 2))
    kernels = torch.zeros(len(freqs), 2 * half + 1, dtype=torch.complex128)
    for k, (f, n) in enumerate(zip(freqs.tolist(), lengths.to(torch.int64).tolist())):
        win = get_window(window, n).to(torch.float64)
        offsets = torch.arange(n, dtype=torch.float64) - (n + 1) // 2
        # e^{-i w d}: correlation with it is the analysis X = sum x[n] w[n] e^{-i w n}.
        kernels[k, half - (n + 1) // 2 : half - (n + 1) // 2 + n] = (
            win / win.sum() * torch.exp(-2j * math.pi * f * offsets / sample_rate)
        )
    stacked = torch.cat([kernels.real, kernels.imag], dim=0)[:, None, :]
    return stacked.to(torch.float32), half
