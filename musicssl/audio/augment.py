"""Batched waveform augmentations in torch, for making self-supervised training views.

Every op takes waveforms ``x`` shaped (B, S) (B examples of S samples, float32 or float64; half
precision is computed in float32 and cast back) and returns the same layout on ``x``'s device, so
the ops run in DataLoader workers on the CPU or on a GPU batch alike. Each example gets its own
parameters.

Randomness: ``gen`` is a `torch.Generator` (normally on the CPU) or a sequence of B generators, one
per example. Parameters are drawn on the generator's device and then moved to ``x``'s device, so a
CPU generator gives the same draws whether ``x`` is on the CPU or a GPU. With one generator per
example (see `example_generators`) an example's views depend only on that example and its
generator, not on the rest of the batch: a batch split across DDP ranks gets the views it would
get on one process (`mix` with ``other=None`` is the exception: it mixes neighbours).

Return values: the ``random_*`` ops, `add_noise`, `mix` and `time_mask` return ``(y, amount)``,
where amount is what was drawn per example in the op's unit (dB, semitones, playback rate, or a
dict of such tensors for `random_eq`). Each of them takes a probability ``p``; an example left
alone has the identity amount (0 dB, 0 semitones, rate 1, sign +1, SNR +inf) and comes back
unchanged, bit for bit. `random_crop` returns the crop only.

`Compose` chains ops and collects their amounts; `ViewMaker` makes several views of a batch with
a chain, as the contrastive, BYOL and VICReg collators need.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Compose",
    "Generators",
    "ViewMaker",
    "add_noise",
    "default_augment",
    "equalize",
    "example_generators",
    "mix",
    "pitch_shift",
    "random_crop",
    "random_eq",
    "random_gain",
    "random_pitch_shift",
    "random_polarity",
    "random_time_stretch",
    "time_mask",
    "time_stretch",
]

Generators = torch.Generator | Sequence[torch.Generator]

# Guard band (samples) of zeros between the end of a clip and its periodic repeat in the FFT
# resampler, so that the tails of the band-limiting kernel never wrap onto the clip.
_RESAMPLE_GUARD = 1024
# Fraction of the kept band over which the FFT resampler rolls off to zero (raised cosine): a
# gentle edge instead of a brick wall keeps the resampling kernel short (no audible ringing).
_RESAMPLE_TAPER = 0.05


# --------------------------------------------------------------------------------------------------
# Random draws


def example_generators(keys: Iterable[int] | Tensor, seed: int = 0) -> list[torch.Generator]:
    """One CPU generator per key (e.g. the items' global sample numbers), seeded from (seed, key).

    Keys and seed are non-negative integers. Passing these as ``gen`` makes each example's
    augmentation a pure function of (seed, key), whatever batch or process it lands in.
    """
    if isinstance(keys, Tensor):
        keys = keys.reshape(-1).tolist()
    gens = []
    for key in keys:
        state = np.random.SeedSequence([int(seed), int(key)]).generate_state(1, np.uint64)[0]
        gens.append(torch.Generator().manual_seed(int(state)))
    return gens


def _rand(gen: Generators, batch: int) -> Tensor:
    """(batch,) uniform draws in [0, 1), float64 on the CPU; one per example."""
    if isinstance(gen, torch.Generator):
        return torch.rand(batch, generator=gen, dtype=torch.float64, device=gen.device).cpu()
    gens = _check_gens(gen, batch)
    return torch.cat([
        torch.rand(1, generator=g, dtype=torch.float64, device=g.device).cpu() for g in gens
    ])


def _randn(gen: Generators, batch: int, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(batch, n) standard normal noise on ``device``, drawn on the generator's device."""
    # Drawn in float32 whatever `dtype`: a float64 draw uses the generator up differently, and an
    # example's views must depend only on the example and its generator.
    if isinstance(gen, torch.Generator):
        return torch.randn(batch, n, generator=gen, device=gen.device).to(device, dtype)
    gens = _check_gens(gen, batch)
    return torch.stack([torch.randn(n, generator=g, device=g.device).to(device, dtype) for g in gens])


def _check_gens(gens: Sequence[torch.Generator], batch: int) -> Sequence[torch.Generator]:
    if not isinstance(gens, Sequence) or len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        got = f"{type(gens).__name__} of length {len(gens)}" if isinstance(gens, Sequence) else repr(gens)
        raise TypeError(
            f"gen must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a sequence of {batch} "
            f"generators (one per example), got {got}"
        )
    return gens


def _uniform(gen: Generators, batch: int, low: float, high: float, what: str) -> Tensor:
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{what} range must be finite with low <= high, got ({low}, {high})")
    return low + (high - low) * _rand(gen, batch)


def _bounds(value: float | Sequence[float], what: str) -> tuple[float, float]:
    """A (low, high) range from a pair (list, tuple, array, tensor); one number is the range of that value alone."""
    try:
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        flat = np.zeros(0)
    if flat.size not in (1, 2):
        raise ValueError(f"{what} must be a number or a (low, high) pair, got {value!r}")
    return float(flat[0]), float(flat[-1])


def _count(n: Any, what: str, minimum: int) -> int:
    """A whole number of samples (or masks) >= minimum: an int of any kind (numpy's, a 0-d
    tensor's), or an integral float (16000 * 3.0)."""
    try:
        whole = operator.index(n) if not isinstance(n, bool) else None
    except TypeError:
        whole = int(n) if isinstance(n, numbers.Real) and float(n).is_integer() else None
    if whole is None or whole < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {n!r}"
                         + (" (round it, e.g. int(seconds * sr))" if isinstance(n, float) else ""))
    return whole


def _log_uniform(gen: Generators, batch: int, low: float, high: float, what: str) -> Tensor:
    if not (0 < low <= high < math.inf):
        raise ValueError(f"{what} range must be positive with low <= high, got ({low}, {high})")
    return torch.exp(_uniform(gen, batch, math.log(low), math.log(high), what))


def _applied(gen: Generators, batch: int, p: float) -> Tensor:
    """(batch,) bool: the examples an op touches. Always draws: the stream never depends on p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    return _rand(gen, batch) < p


# --------------------------------------------------------------------------------------------------
# Checks and small helpers


def _check_batch(x: Tensor, what: str = "x") -> tuple[int, int]:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a floating-point tensor shaped (B, S), got {shape}")
    return x.shape[0], x.shape[1]


def _amounts(
    values: Tensor | Sequence[float] | float, batch: int, what: str, *, allow_inf: bool = False
) -> Tensor:
    """Per-example amounts as (batch,) float64 on the CPU; a scalar is broadcast."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{what} must hold one value per example ({batch}), got {t.numel()}")
    ok = ~torch.isnan(t) if allow_inf else torch.isfinite(t)
    if not bool(ok.all()):
        raise ValueError(f"{what} must be {'numbers' if allow_inf else 'finite'}, got {t.tolist()}")
    return t.clone()


def _work_dtype(x: Tensor) -> torch.dtype:
    """Compute dtype: float64 stays, all else (incl. bf16/fp16, which FFTs lack) is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(mask: Tensor, device: torch.device) -> Tensor:
    """A (B,) CPU bool tensor as a (B, 1) column on ``device``, for `torch.where` over samples."""
    return mask.to(device)[:, None]


def _out(amount: Tensor, x: Tensor) -> Tensor:
    """A drawn amount as returned to callers: float32 on x's device."""
    return amount.to(device=x.device, dtype=torch.float32)


def _power(x: Tensor) -> Tensor:
    """Mean power per example, (B,)."""
    return x.square().mean(dim=1)


def _add_at_ratio(x: Tensor, other: Tensor, ratio_db: Tensor) -> Tensor:
    """x + other scaled so that power(x) / power(scaled other) = ratio_db (B,) in dB; a silent
    ``other`` adds nothing. (B, S) work-dtype tensors -> (B, S)."""
    target = _power(x) / (10.0 ** (ratio_db / 10.0)).to(device=x.device, dtype=x.dtype)
    p_other = _power(other)
    scale = torch.where(p_other > 0, (target / p_other.clamp(min=1e-30)).sqrt(), 0.0)
    return x + other * scale[:, None]


def _take(x: Tensor, starts: Tensor, n: int) -> Tensor:
    """Windows ``x[b, starts[b] : starts[b] + n]``; positions outside [0, S) read as zeros."""
    _, s = x.shape
    pad_left = int(max(0, -int(starts.min())))
    pad_right = int(max(0, int(starts.max()) + n - s))
    xp = F.pad(x, (pad_left, pad_right)) if pad_left or pad_right else x
    idx = (starts.to(x.device) + pad_left)[:, None] + torch.arange(n, device=x.device)
    return xp.gather(1, idx)


def _fast_len(n: int) -> int:
    """The smallest m >= max(n, 1) whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    n = max(n, 1)  # 0 would loop for ever (0 % p == 0)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


# --------------------------------------------------------------------------------------------------
# Crop, gain, polarity, noise, mix, masking


def random_crop(x: Tensor, n_samples: int, gen: Generators) -> Tensor:
    """A random window of ``n_samples`` from each example: (B, S) -> (B, n_samples).

    Each example's start is uniform over the valid offsets. Examples shorter than the window are
    placed at a uniform position inside it and zero-padded.
    """
    return _take(x, _crop_starts(x, n_samples, gen), _count(n_samples, "n_samples", 1))


def _crop_starts(x: Tensor, n: int, gen: Generators) -> Tensor:
    """(B,) int64 start of each crop in input samples; negative where the input is zero-padded."""
    b, s = _check_batch(x)
    n = _count(n, "n_samples", 1)
    positions = torch.floor(_rand(gen, b) * (abs(s - n) + 1)).long()
    return positions if s >= n else -positions


def random_gain(
    x: Tensor, gen: Generators, min_db: float = -6.0, max_db: float = 6.0, *, p: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Scale each example by a gain uniform in [min_db, max_db] dB.

    Returns ``(y, gain_db)``, gain_db (B,) in dB (0 where not applied).
    """
    b, _ = _check_batch(x)
    apply = _applied(gen, b, p)
    gain_db = torch.where(apply, _uniform(gen, b, min_db, max_db, "gain (dB)"), 0.0)
    scale = (10.0 ** (gain_db / 20.0)).to(device=x.device, dtype=_work_dtype(x))
    y = torch.where(_rows(apply, x.device), x * scale[:, None].to(x.dtype), x)
    return y, _out(gain_db, x)


def random_polarity(x: Tensor, gen: Generators, p: float = 0.5) -> tuple[Tensor, Tensor]:
    """Flip the sign of each example with probability ``p``.

    Returns ``(y, sign)``, sign (B,) holding -1 where flipped and +1 elsewhere.
    """
    b, _ = _check_batch(x)
    flip = _applied(gen, b, p)
    sign = torch.where(flip, -1.0, 1.0).double()
    return torch.where(_rows(flip, x.device), -x, x), _out(sign, x)


def add_noise(
    x: Tensor,
    gen: Generators,
    snr_db: tuple[float, float] = (10.0, 40.0),
    *,
    color: Literal["white", "pink"] = "white",
    p: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Add white or pink Gaussian noise at a signal-to-noise ratio uniform in ``snr_db`` (dB).

    The SNR is exact per example: noise power = example power / 10**(snr / 10), both measured as
    the mean square over the whole example. Pink noise has a 1/f power spectrum (-3 dB per
    octave, no DC). A silent example stays silent (its noise is scaled to zero), so nothing turns
    into NaN. Returns ``(y, snr_db)``, snr_db (B,) in dB (+inf where not applied).
    """
    b, s = _check_batch(x)
    if color not in ("white", "pink"):
        raise ValueError(f"color must be 'white' or 'pink', got {color!r}")
    apply = _applied(gen, b, p)
    snr = torch.where(apply, _uniform(gen, b, *_bounds(snr_db, "snr_db"), "snr_db"), math.inf)
    dtype = _work_dtype(x)
    noise = _randn(gen, b, s, x.device, dtype)
    if color == "pink":
        spec = torch.fft.rfft(noise)
        k = torch.arange(spec.shape[-1], device=x.device, dtype=dtype)
        spec = spec * torch.where(k > 0, k.clamp(min=1).rsqrt(), 0.0)
        noise = torch.fft.irfft(spec, n=s)
    y = _add_at_ratio(x.to(dtype), noise, snr).to(x.dtype)
    return torch.where(_rows(apply, x.device), y, x), _out(snr, x)


def mix(
    x: Tensor,
    other: Tensor | None,
    gen: Generators,
    min_ratio_db: float = 0.0,
    max_ratio_db: float = 20.0,
    *,
    p: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Mix another clip into each example, at a level ratio uniform in [min_ratio_db, max_ratio_db].

    ``other`` is (B, S) like ``x``, or None for the batch rolled by one (example b gets example
    b - 1; that depends on the batch's composition; a batch of one is left as it is). The ratio is the power of ``x`` over the
    power of the scaled ``other``, in dB; a silent ``x`` or ``other`` adds nothing. Returns
    ``(y, ratio_db)``, ratio_db (B,) in dB (+inf where not applied).
    """
    b, _ = _check_batch(x)
    alone = other is None and b == 1  # the batch rolled by one is the clip itself: a gain, not a mix
    other = x.roll(1, dims=0) if other is None else other
    if other.shape != x.shape:
        raise ValueError(f"other must have x's shape {tuple(x.shape)}, got {tuple(other.shape)}")
    apply = _applied(gen, b, p) & (not alone)
    ratio = torch.where(apply, _uniform(gen, b, min_ratio_db, max_ratio_db, "ratio (dB)"), math.inf)
    dtype = _work_dtype(x)
    y = _add_at_ratio(x.to(dtype), other.to(device=x.device, dtype=dtype), ratio).to(x.dtype)
    return torch.where(_rows(apply, x.device), y, x), _out(ratio, x)


def time_mask(
    x: Tensor, gen: Generators, max_fraction: float = 0.1, n_masks: int = 1, *, p: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Zero ``n_masks`` spans per example, each up to ``max_fraction`` of the example long.

    Each span's length is uniform in [0, max_fraction * S] samples and its start uniform over the
    positions where it fits; spans may overlap. Returns ``(y, masked)``, masked (B, S) bool, True
    on the zeroed samples.
    """
    b, s = _check_batch(x)
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    apply = _applied(gen, b, p)
    positions = torch.arange(s, device=x.device)
    masked = torch.zeros(b, s, dtype=torch.bool, device=x.device)
    for _ in range(_count(n_masks, "n_masks", 0)):
        width = torch.floor(_rand(gen, b) * (math.floor(max_fraction * s) + 1)).long()
        start = torch.floor(_rand(gen, b) * (s - width + 1)).long()
        start, end = start.to(x.device)[:, None], (start + width).to(x.device)[:, None]
        masked |= (positions >= start) & (positions < end)
    masked &= _rows(apply, x.device)
    return x.masked_fill(masked, 0.0), masked


# --------------------------------------------------------------------------------------------------
# Equalisation


def equalize(
    x: Tensor,
    sr: int,
    low_hz: Tensor,
    high_hz: Tensor,
    peak_hz: Tensor,
    peak_db: Tensor,
    peak_octaves: Tensor,
    *,
    order: int = 2,
) -> Tensor:
    """Band-pass plus one peaking band per example, as a zero-phase gain curve on the spectrum.

    The curve is the magnitude of a Butterworth high-pass at ``low_hz`` and low-pass at
    ``high_hz`` (order ``order``: -3 dB at the cut-offs, 6 * order dB per octave beyond) times a
    bell of ``peak_db`` dB centred on ``peak_hz`` whose gain falls to half (in dB) at
    ``peak_octaves / 2`` octaves either side. ``low_hz`` 0 and ``high_hz`` +inf switch the
    high-pass and low-pass off. All parameters are (B,) tensors (Hz, dB, octaves).

    Why FFT rather than biquads: one batched rfft/irfft on any device with a different curve per
    example, no sequential IIR recursion, and zero phase, so onsets do not move between views. A
    smooth curve (no brick walls) has a short impulse response, hence no ringing; the signal is
    zero-padded by up to one second before the FFT so that response does not wrap around.
    """
    b, s = _check_batch(x)
    dtype = _work_dtype(x)
    params = [
        _amounts(low_hz, b, "low_hz"),
        _amounts(high_hz, b, "high_hz", allow_inf=True),
        _amounts(peak_hz, b, "peak_hz"),
        _amounts(peak_db, b, "peak_db"),
        _amounts(peak_octaves, b, "peak_octaves"),
    ]
    if bool((params[0] < 0).any() | (params[1] <= 0).any() | (params[2] <= 0).any()
            | (params[4] <= 0).any()):
        raise ValueError("low_hz must be >= 0 and high_hz, peak_hz and peak_octaves positive")
    lo, hi, fc, gain_db, width = (v.to(device=x.device, dtype=dtype)[:, None] for v in params)
    n_fft = _fast_len(s + min(s, int(sr)))
    f = torch.fft.rfftfreq(n_fft, d=1.0 / sr, device=x.device, dtype=dtype)[None, :]
    # Butterworth magnitudes: 1 / sqrt(1 + (fc / f)^2n); f = 0 gives fc / 0 = inf, gain 0.
    high_pass = torch.where(lo > 0, (1.0 + (lo / f) ** (2 * order)).rsqrt(), 1.0)
    low_pass = (1.0 + (f / hi) ** (2 * order)).rsqrt()
    octaves = torch.log2(f.clamp(min=1e-6) / fc.clamp(min=1e-6))
    bell_db = gain_db * torch.exp(-math.log(2.0) * (octaves / (width.clamp(min=1e-6) / 2)) ** 2)
    curve = high_pass * low_pass * 10.0 ** (bell_db / 20.0)
    spec = torch.fft.rfft(x.to(dtype), n=n_fft)
    return torch.fft.irfft(spec * curve, n=n_fft)[:, :s].to(x.dtype)


def random_eq(
    x: Tensor,
    sr: int,
    gen: Generators,
    *,
    low_hz: tuple[float, float] = (20.0, 300.0),
    high_hz: tuple[float, float] = (3000.0, 8000.0),
    peak_db: tuple[float, float] = (-9.0, 9.0),
    peak_octaves: tuple[float, float] = (0.5, 2.0),
    order: int = 2,
    p: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Random band-pass and peaking EQ (see `equalize`).

    Cut-offs are log-uniform in ``low_hz`` and ``high_hz`` (Hz), the bell's centre log-uniform
    between the two cut-offs, its gain uniform in ``peak_db`` (dB) and width log-uniform in
    ``peak_octaves``. Returns ``(y, params)``: params maps "low_hz", "high_hz", "peak_hz",
    "peak_db", "peak_octaves" to (B,) tensors; where not applied low_hz is 0, high_hz +inf and
    peak_db 0.
    """
    b, _ = _check_batch(x)
    if not sr > 0:
        raise ValueError(f"sr must be the audio's sample rate in Hz, got {sr}")
    low_hz, high_hz = _bounds(low_hz, "low_hz"), _bounds(high_hz, "high_hz")
    if low_hz[1] >= high_hz[0]:
        raise ValueError(f"the low_hz range {low_hz} must lie below the high_hz range {high_hz}")
    apply = _applied(gen, b, p)
    lo = _log_uniform(gen, b, *low_hz, "low_hz")
    hi = _log_uniform(gen, b, *high_hz, "high_hz")
    fc = torch.exp(torch.log(lo) + (torch.log(hi) - torch.log(lo)) * _rand(gen, b))
    gain = _uniform(gen, b, *_bounds(peak_db, "peak_db"), "peak_db")
    width = _log_uniform(gen, b, *_bounds(peak_octaves, "peak_octaves"), "peak_octaves")
    params = {
        "low_hz": torch.where(apply, lo, 0.0),
        "high_hz": torch.where(apply, hi, math.inf),
        "peak_hz": fc,
        "peak_db": torch.where(apply, gain, 0.0),
        "peak_octaves": width,
    }
    y = equalize(x, sr, **params, order=order)
    y = torch.where(_rows(apply, x.device), y, x)
    return y, {k: _out(v, x) for k, v in params.items()}


# --------------------------------------------------------------------------------------------------
# Pitch shift and time stretch


def pitch_shift(
    x: Tensor,
    sr: int,
    semitones: Tensor | Sequence[float] | float,
    *,
    out_samples: int | None = None,
) -> Tensor:
    """Shift each example's pitch by ``semitones`` (B,) by resampling: pitch AND tempo change.

    The example is played back at speed r = 2**(semitones / 12), like a tape run faster or slower:
    +12 semitones doubles every frequency and halves every duration. This is the standard, cheap
    way to make pitch-shifted SSL views; the amount is exact, which is what an equivariant
    objective needs. The output keeps the middle of the example: output sample j reads input time
    (S - n * r) / 2 + j * r, so the centres line up. Shifting up (r > 1) needs n * r input
    samples, more than there are when n = S: the ends of the output are then zero. To avoid that,
    give a longer input (a crop of ceil(n * 2**(max_semitones / 12)) samples) and ``out_samples``.

    Method: band-limited FFT resampling per distinct amount (the spectrum is truncated or
    zero-padded and rolled off over its top 5 % with a raised cosine, which is the anti-alias
    filter when shifting up). The realised speed is M / L for integer FFT sizes, within 9 / L
    semitones of the request (about 0.001 semitone for a 1 s clip at 16 kHz). ``sr`` (Hz) does not
    change the result: the shift is relative. Returns (B, n), n = ``out_samples`` or S.
    """
    b, s = _check_batch(x)
    del sr  # a relative shift: kept so pitch_shift reads like the other ops on audio (x, sr, ...)
    shift = _amounts(semitones, b, "semitones")
    n = s if out_samples is None else _count(out_samples, "out_samples", 1)
    xw = x.to(_work_dtype(x))
    y = xw.new_empty(b, n)
    for value in torch.unique(shift).tolist():
        rows = (shift == value).nonzero().squeeze(1).to(x.device)
        y[rows] = _resample_centre(xw[rows], 2.0 ** (value / 12.0), n)
    return y.to(x.dtype)


def _resample_centre(x: Tensor, speed: float, n: int) -> Tensor:
    """Play (B, S) back at ``speed`` and keep the middle n samples (zeros beyond the input)."""
    b, s = x.shape
    if speed == 1.0:
        start = math.floor((s - n) / 2 + 0.5)
        return _take(x, torch.full((b,), start, dtype=torch.long), n)
    overhang = max(0, math.ceil(n * speed) - s)
    m = _fast_len(s + overhang + _RESAMPLE_GUARD)  # zeros after x cover both overhangs, wrapped
    length = max(1, round(m / speed))
    kept = min(m, length) // 2 + 1
    spec = torch.fft.rfft(x, n=m)[:, :kept]
    taper_bins = max(1, round(_RESAMPLE_TAPER * kept))
    taper = torch.ones(kept, dtype=x.dtype, device=x.device)
    ramp = torch.arange(1, taper_bins + 1, dtype=x.dtype, device=x.device) / taper_bins
    taper[kept - taper_bins :] = 0.5 * (1.0 + torch.cos(math.pi * ramp))
    full = torch.fft.irfft(spec * taper, n=length) * (length / m)
    # Output sample j reads input time a + j * speed; in resampled samples that is (a / speed) + j.
    a = (s - n * speed) / 2
    start = math.floor(a * length / m + 0.5)
    idx = (start + torch.arange(n, device=x.device)) % length
    return full[:, idx]


def time_stretch(
    x: Tensor,
    rate: Tensor | Sequence[float] | float,
    *,
    n_fft: int = 1024,
    hop_length: int | None = None,
    out_samples: int | None = None,
) -> Tensor:
    """Change each example's tempo by ``rate`` (B,) and keep its pitch: a phase vocoder in torch.

    rate > 1 plays faster (events come closer together), rate < 1 slower, as in
    ``librosa.effects.time_stretch``. Magnitudes are interpolated between STFT frames at the new
    times; phases advance by each bin's measured instantaneous frequency (Flanagan & Golden 1966)
    with identity phase locking (Laroche & Dolson 1999): only spectral peaks carry their own
    phase forward and the bins around a peak keep their analysed phase relative to it, so a tone
    keeps its level after silence or an onset. Transients still smear a little, which is fine
    for training views. Like `pitch_shift` the output keeps the middle: output time t reads input
    time (S - n * rate) / 2 + t * rate, and positions beyond the input are zero (give a longer
    input and ``out_samples`` to avoid that when speeding up). ``n_fft`` and ``hop_length``
    (default n_fft // 4) are in samples; the Hann window is n_fft long. Examples with rate 1 come
    back as the centre crop, unchanged. Returns (B, n), n = ``out_samples`` or S.
    """
    b, s = _check_batch(x)
    if s == 0:
        raise ValueError("x holds clips of 0 samples: there is nothing to stretch")
    rates = _amounts(rate, b, "rate")
    if bool((rates <= 0).any()):
        raise ValueError(f"rate must be positive, got {rates.tolist()}")
    n = s if out_samples is None else _count(out_samples, "out_samples", 1)
    hop = n_fft // 4 if hop_length is None else int(hop_length)
    if not 0 < hop <= n_fft:
        raise ValueError(f"hop_length must be in [1, n_fft={n_fft}], got {hop}")
    dtype = _work_dtype(x)
    window = torch.hann_window(n_fft, periodic=True, dtype=dtype, device=x.device)
    spec = torch.stft(x.to(dtype), n_fft, hop, window=window, center=True, pad_mode="constant",
                      return_complex=True)  # (B, F, T)
    n_out = 1 + math.ceil(n / hop)
    # Fractional input frame read by each output frame, (B, T_out).
    r = rates.to(device=x.device, dtype=dtype)[:, None]
    out_times = torch.arange(n_out, device=x.device, dtype=dtype)[None, :] * hop
    pos = ((s - n * r) / 2 + out_times * r) / hop
    magnitude, phase0, advance = _frames_at(spec, pos, hop, n_fft)
    phase = _locked_phases(magnitude, phase0, advance)
    out = torch.istft(torch.polar(magnitude, phase), n_fft, hop, window=window, center=True,
                      length=n)
    unchanged = rates == 1.0
    if bool(unchanged.any()):
        start = torch.full((b,), math.floor((s - n) / 2 + 0.5), dtype=torch.long)
        out = torch.where(_rows(unchanged, x.device), _take(x.to(dtype), start, n), out)
    return out.to(x.dtype)


def _frames_at(spec: Tensor, pos: Tensor, hop: int, n_fft: int) -> tuple[Tensor, Tensor, Tensor]:
    """An STFT (B, F, T) read at fractional frames `pos` (B, T_out) -> magnitudes interpolated
    between the frames either side (zero outside the input), the phase of the frame before, and
    each bin's phase advance per hop measured between the two (its instantaneous frequency)."""
    b, n_bins, n_frames = spec.shape
    valid = (pos >= 0) & (pos <= n_frames - 1)
    i0 = pos.floor().clamp(0, max(0, n_frames - 2)).long()
    i1 = (i0 + 1).clamp(max=n_frames - 1)
    alpha = (pos - i0).clamp(0, 1)[:, None, :]
    s0 = spec.gather(2, i0[:, None, :].expand(b, n_bins, pos.shape[1]))
    s1 = spec.gather(2, i1[:, None, :].expand(b, n_bins, pos.shape[1]))
    magnitude = ((1 - alpha) * s0.abs() + alpha * s1.abs()) * valid[:, None, :]
    phase0 = torch.angle(s0)
    expected = 2 * math.pi * hop * torch.arange(n_bins, device=spec.device, dtype=pos.dtype) / n_fft
    expected = expected[None, :, None]
    deviation = torch.angle(s1) - phase0 - expected
    advance = deviation - 2 * math.pi * torch.round(deviation / (2 * math.pi)) + expected
    return magnitude, phase0, advance


def _locked_phases(magnitude: Tensor, phase0: Tensor, advance: Tensor) -> Tensor:
    """Output phases (B, F, T_out) with identity phase locking: each peak's phase advances from the
    previous output frame; the bins around it keep their analysed phase relative to it."""
    owner = _nearest_peak(magnitude)  # (B, F, T_out)
    relative = phase0 - phase0.gather(1, owner)
    phases = [phase0[..., 0]]
    for j in range(1, magnitude.shape[-1]):  # sequential: a peak's phase carries over from the previous frame
        carried = phases[-1] + advance[..., j - 1]
        phases.append(carried.gather(1, owner[..., j]) + relative[..., j])
    return torch.stack(phases, dim=-1)


def _nearest_peak(magnitude: Tensor) -> Tensor:
    """For each bin of (B, F, T) magnitudes, the index of the nearest spectral peak in its frame.

    A peak is a bin louder than the bin below and at least as loud as the bin above; a frame
    without peaks (silence) maps every bin to itself.
    """
    b, f, t = magnitude.shape
    below = F.pad(magnitude, (0, 0, 1, 0), value=-1.0)[:, :-1]
    above = F.pad(magnitude, (0, 0, 0, 1), value=-1.0)[:, 1:]
    peak = (magnitude > below) & (magnitude >= above) & (magnitude > 0)
    bins = torch.arange(f, device=magnitude.device)[None, :, None].expand(b, f, t)
    prev = torch.where(peak, bins, -1).cummax(dim=1).values
    nxt = torch.where(peak, bins, 2 * f).flip(1).cummin(dim=1).values.flip(1)
    use_prev = (prev >= 0) & ((nxt >= f) | (bins - prev <= nxt - bins))
    owner = torch.where(use_prev, prev, nxt)
    return torch.where(owner >= f, bins, owner)


def random_pitch_shift(
    x: Tensor,
    sr: int,
    gen: Generators,
    max_semitones: float = 4.0,
    *,
    min_semitones: float | None = None,
    p: float = 1.0,
    out_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`pitch_shift` by an amount uniform in [min_semitones, max_semitones] (default -max to +max).

    Returns ``(y, semitones)``, semitones (B,) the shift requested per example (0 where not
    applied); the realised shift is within 0.01 semitone of it for clips of 1,000+ samples.
    """
    b, _ = _check_batch(x)
    low = -max_semitones if min_semitones is None else min_semitones
    apply = _applied(gen, b, p)
    shift = torch.where(apply, _uniform(gen, b, low, max_semitones, "semitones"), 0.0)
    return pitch_shift(x, sr, shift, out_samples=out_samples), _out(shift, x)


def random_time_stretch(
    x: Tensor,
    gen: Generators,
    min_rate: float = 0.8,
    max_rate: float = 1.25,
    *,
    p: float = 1.0,
    n_fft: int = 1024,
    hop_length: int | None = None,
    out_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`time_stretch` by a rate log-uniform in [min_rate, max_rate] (0.8 and 1.25 equally likely).

    Returns ``(y, rate)``, rate (B,) the playback rate per example (1 where not applied).
    """
    b, _ = _check_batch(x)
    apply = _applied(gen, b, p)
    rates = torch.where(apply, _log_uniform(gen, b, min_rate, max_rate, "rate"), 1.0)
    y = time_stretch(x, rates, n_fft=n_fft, hop_length=hop_length, out_samples=out_samples)
    return y, _out(rates, x)


# --------------------------------------------------------------------------------------------------
# Chains and views


Step = Callable[..., Any]


class Compose:
    """Apply named ops in order: ``Compose({"gain": partial(random_gain, p=0.5), ...})``.

    Each op is called as ``op(x, gen=gen)`` (bind everything else with `functools.partial`) and
    returns either the new batch or ``(batch, amount)``. Calling the chain returns ``(y, info)``:
    info maps each op's name to its amount; an op returning a dict of amounts contributes
    ``"name.key"`` entries (e.g. "eq.low_hz").
    """

    def __init__(self, steps: Mapping[str, Step] | Iterable[tuple[str, Step]]) -> None:
        items = list(steps.items()) if isinstance(steps, Mapping) else list(steps)
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique, got {names}")
        for name, step in items:
            if not callable(step):
                raise TypeError(f"step {name!r} is not callable: {step!r}")
        self.steps: list[tuple[str, Step]] = items

    def __call__(self, x: Tensor, gen: Generators) -> tuple[Tensor, dict[str, Tensor]]:
        info: dict[str, Tensor] = {}
        for name, step in self.steps:
            out = step(x, gen=gen)
            if isinstance(out, tuple):
                x, amount = out
                if isinstance(amount, Mapping):
                    info.update({f"{name}.{key}": value for key, value in amount.items()})
                else:
                    info[name] = amount
            else:
                x = out
        return x, info

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={_describe(step)}" for name, step in self.steps)
        return f"Compose({inner})"


def _describe(step: Step) -> str:
    if isinstance(step, partial):
        args = ", ".join(f"{k}={v!r}" for k, v in step.keywords.items())
        return f"{getattr(step.func, '__name__', step.func)}({args})"
    return getattr(step, "__name__", repr(step))


def default_augment(sample_rate: int, *, max_semitones: float = 2.0) -> Compose:
    """A CLMR-style chain (Spijkervet & Burgoyne 2021): polarity, noise, gain, EQ, pitch shift.

    Probabilities: polarity 0.5, noise 0.3 (SNR 15-40 dB), gain 0.5 (+-6 dB), EQ 0.8, pitch
    shift 0.5 (+-max_semitones; 0 turns it off). Amounts come back as "polarity", "noise",
    "gain", "eq.*" and "pitch" (semitones).
    """
    steps: dict[str, Step] = {
        "polarity": partial(random_polarity, p=0.5),
        "noise": partial(add_noise, snr_db=(15.0, 40.0), p=0.3),
        "gain": partial(random_gain, min_db=-6.0, max_db=6.0, p=0.5),
        "eq": partial(random_eq, sr=sample_rate, high_hz=(min(3000.0, 0.2 * sample_rate),
                                                          0.45 * sample_rate), p=0.8),
    }
    if max_semitones > 0:
        steps["pitch"] = partial(random_pitch_shift, sr=sample_rate, max_semitones=max_semitones,
                                 p=0.5)
    return Compose(steps)


class ViewMaker:
    """Make ``n_views`` augmented views of a batch: optional random crop, then a chain.

    ``augment`` is a `Compose` (or any ``f(x, gen) -> (y, info)``); ``crop_samples`` crops each
    view at its own random position first (CLMR-style different segments). Calling it on
    ``x`` (B, S) returns ``(views, info)``: views (V, B, n) and info mapping each amount's name to
    a (V, B, ...) tensor; with cropping, "crop_start" (V, B) holds each crop's first input sample
    (negative where a short example was zero-padded).
    """

    def __init__(
        self,
        augment: Callable[[Tensor, Generators], tuple[Tensor, dict[str, Tensor]]] | None = None,
        *,
        n_views: int = 2,
        crop_samples: int | None = None,
    ) -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        self.augment = augment
        self.n_views = n_views
        self.crop_samples = crop_samples

    def __call__(self, x: Tensor, gen: Generators) -> tuple[Tensor, dict[str, Tensor]]:
        _check_batch(x)
        views, infos = [], []
        for _ in range(self.n_views):
            view, info = x, {}
            if self.crop_samples is not None:
                starts = _crop_starts(x, self.crop_samples, gen)
                view = _take(x, starts, _count(self.crop_samples, "crop_samples", 1))
                info["crop_start"] = starts.to(x.device)
            if self.augment is not None:
                view, more = self.augment(view, gen)
                info.update(more)
            views.append(view)
            infos.append(info)
        stacked = {key: torch.stack([info[key] for info in infos]) for key in infos[0]}
        return torch.stack(views), stacked

    def __repr__(self) -> str:
        return (f"ViewMaker(n_views={self.n_views}, crop_samples={self.crop_samples}, "
                f"augment={self.augment!r})")
