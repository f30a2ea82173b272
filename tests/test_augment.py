"""Tests for musicssl.audio.augment: every op's contract, its measured effect, chains and views."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musicssl.audio import augment as A

SR = 16000
HAVE_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device here")),
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sine(freq: float | list[float], seconds: float = 1.0, sr: int = SR) -> torch.Tensor:
    """(B, S) float32 sines, one row per frequency (Hz)."""
    freqs = torch.tensor([freq] if isinstance(freq, (int, float)) else freq, dtype=torch.float64)
    t = torch.arange(round(seconds * sr), dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freqs[:, None] * t).float()


def peak_hz(x: torch.Tensor, sr: int = SR) -> torch.Tensor:
    """Frequency (Hz) of the largest spectral peak of each row, to 1/8 of an FFT bin."""
    n = 8 * x.shape[-1]
    spec = torch.fft.rfft(x.double() * torch.hann_window(x.shape[-1], dtype=torch.float64), n=n)
    return spec.abs().argmax(-1).double() * sr / n


def db(ratio: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(ratio)


def power(x: torch.Tensor) -> torch.Tensor:
    return x.double().square().mean(-1)


def music(batch: int = 4, seconds: float = 0.25, seed: int = 0) -> torch.Tensor:
    """A (B, S) test batch: a few partials with different levels per row, plus a little noise."""
    g = gen(seed)
    t = torch.arange(round(seconds * SR)) / SR
    freqs = 100 + 900 * torch.rand(batch, 3, generator=g)
    amps = torch.rand(batch, 3, 1, generator=g)
    x = (amps * torch.sin(2 * math.pi * freqs[..., None] * t)).sum(1)
    return (x + 0.01 * torch.randn(batch, len(t), generator=g)).float()


# Every op as f(x, gen) -> (y, amount or None), with settings that make it do something.
OPS: dict[str, Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]] = {
    "crop": lambda x, g: (A.random_crop(x, x.shape[1] // 2, g), None),
    "gain": lambda x, g: A.random_gain(x, g),
    "polarity": lambda x, g: A.random_polarity(x, g),
    "noise_white": lambda x, g: A.add_noise(x, g),
    "noise_pink": lambda x, g: A.add_noise(x, g, color="pink"),
    "eq": lambda x, g: A.random_eq(x, SR, g),
    "time_mask": lambda x, g: A.time_mask(x, g, max_fraction=0.2, n_masks=2),
    "mix": lambda x, g: A.mix(x, x.flip(0), g),
    "pitch": lambda x, g: A.random_pitch_shift(x, SR, g, max_semitones=3.0),
    "stretch": lambda x, g: A.random_time_stretch(x, g, n_fft=512),
    "views": lambda x, g: A.ViewMaker(A.default_augment(SR), crop_samples=2000)(x, g),
}
SAME_LENGTH = {"crop": False, "views": False}


def amounts_equal(a: Any, b: Any) -> bool:
    if a is None:
        return b is None
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(amounts_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Contracts shared by every op


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("device", DEVICES)
def test_op_keeps_layout_and_is_deterministic(name: str, device: str) -> None:
    x = music().to(device)
    y, amount = OPS[name](x, gen(1))
    assert y.device == x.device and y.dtype == torch.float32
    if SAME_LENGTH.get(name, True):
        assert y.shape == x.shape
    assert bool(torch.isfinite(y).all())
    y2, amount2 = OPS[name](x, gen(1))
    assert torch.equal(y, y2) and amounts_equal(amount, amount2)
    y3, _ = OPS[name](x, gen(2))
    assert not torch.equal(y, y3)


@pytest.mark.parametrize("name", ["gain", "noise_pink", "eq", "pitch", "stretch", "time_mask"])
def test_per_example_generators_make_views_independent_of_the_batch(name: str) -> None:
    """With one generator per example, half a batch gets exactly the views of the whole batch."""
    x = music(batch=4)
    whole, _ = OPS[name](x, A.example_generators(range(4), seed=3))
    first, _ = OPS[name](x[:2], A.example_generators(range(2), seed=3))
    second, _ = OPS[name](x[2:], A.example_generators(range(2, 4), seed=3))
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=0)


def test_example_generators_are_seeded_by_seed_and_key() -> None:
    draw = [torch.rand(1, generator=g).item() for g in A.example_generators(torch.tensor([5, 6]))]
    again = [torch.rand(1, generator=g).item() for g in A.example_generators([5, 6])]
    other = [torch.rand(1, generator=g).item() for g in A.example_generators([5, 6], seed=1)]
    assert draw == again and draw != other and draw[0] != draw[1]


@pytest.mark.parametrize(
    "op",
    [
        partial(A.random_gain, p=0.0),
        partial(A.random_polarity, p=0.0),
        partial(A.add_noise, p=0.0),
        partial(A.random_eq, sr=SR, p=0.0),
        partial(A.time_mask, p=0.0),
        partial(A.mix, other=None, p=0.0),
        partial(A.random_pitch_shift, sr=SR, p=0.0),
        partial(A.random_time_stretch, p=0.0),
    ],
)
def test_p_zero_leaves_the_batch_unchanged_with_identity_amounts(op: partial) -> None:
    x = music()
    y, amount = op(x, gen=gen())
    assert torch.equal(y, x)
    identity = {
        "random_gain": 0.0, "random_polarity": 1.0, "add_noise": math.inf, "mix": math.inf,
        "random_pitch_shift": 0.0, "random_time_stretch": 1.0,
    }
    name = op.func.__name__
    if name in identity:
        assert bool((amount == identity[name]).all())
    elif name == "random_eq":
        assert bool((amount["peak_db"] == 0).all() and (amount["high_hz"] == math.inf).all())
    else:  # time_mask
        assert not bool(amount.any())


def test_half_precision_keeps_dtype() -> None:
    x = music().to(torch.bfloat16)
    for name in ("gain", "noise_pink", "eq", "pitch", "stretch"):
        y, _ = OPS[name](x, gen())
        assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all()), name


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        A.random_gain(torch.zeros(10), gen())
    with pytest.raises(ValueError, match="probability"):
        A.random_gain(music(), gen(), p=1.5)
    with pytest.raises(TypeError, match="one per example"):
        A.random_gain(music(batch=4), A.example_generators(range(3)))
    with pytest.raises(ValueError, match="one value per example"):
        A.pitch_shift(music(batch=4), SR, torch.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        A.time_stretch(music(batch=1), torch.tensor([0.0]))


# --------------------------------------------------------------------------------------------------
# What each op does, measured


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**31))
def test_random_crop_takes_windows_of_the_input(s: int, n: int, seed: int) -> None:
    x = torch.arange(1, 3 * s + 1, dtype=torch.float32).reshape(3, s)
    y = A.random_crop(x, n, gen(seed))
    assert y.shape == (3, n)
    for row, src in zip(y, x):
        if s >= n:
            start = int(row[0]) - int(src[0])
            assert torch.equal(row, src[start : start + n])
        else:  # the whole input, somewhere inside zeros
            nz = row.nonzero().squeeze(1)
            assert len(nz) == s and torch.equal(row[nz[0] : nz[0] + s], src)


def test_gain_changes_power_by_the_drawn_db() -> None:
    x = music(batch=8)
    y, gain_db = A.random_gain(x, gen(), min_db=-10, max_db=10)
    assert gain_db.shape == (8,) and bool((gain_db.abs() <= 10).all()) and gain_db.std() > 1
    torch.testing.assert_close(db(power(y) / power(x)).float(), gain_db, atol=1e-3, rtol=0)


def test_polarity_flips_sign_where_drawn() -> None:
    x = music(batch=16)
    y, sign = A.random_polarity(x, gen(), p=0.5)
    assert set(sign.tolist()) == {-1.0, 1.0}
    assert torch.equal(y, x * sign[:, None])


@pytest.mark.parametrize("color", ["white", "pink"])
def test_noise_hits_the_drawn_snr(color: str) -> None:
    x = music(batch=8)
    y, snr = A.add_noise(x, gen(), snr_db=(0.0, 30.0), color=color)
    measured = db(power(x) / power(y - x)).float()
    assert bool(((measured - snr).abs() < 0.5).all()), (measured, snr)
    if color == "pink":  # -3 dB per octave: a 4x band has about a quarter of the power per bin
        spec = torch.fft.rfft(y - x).abs().square()
        low, high = spec[:, 100:200].mean(), spec[:, 400:800].mean()
        assert 2.5 < float(low / high) < 6.5


def test_noise_and_mix_are_silence_safe() -> None:
    x = torch.zeros(2, 1000)
    y, _ = A.add_noise(x, gen())
    assert torch.equal(y, x)
    y, _ = A.mix(x, music(batch=2, seconds=1000 / SR), gen())
    assert torch.equal(y, x)


def test_mix_sets_the_drawn_level_ratio() -> None:
    x, other = music(batch=6, seed=1), music(batch=6, seed=2)
    y, ratio = A.mix(x, other, gen(), min_ratio_db=-5, max_ratio_db=15)
    measured = db(power(x) / power(y - x)).float()
    torch.testing.assert_close(measured, ratio, atol=1e-3, rtol=0)
    rolled, _ = A.mix(x, None, gen())
    scale = ((rolled - x) / x.roll(1, 0)).median(dim=1).values  # the other clip is x rolled by one
    torch.testing.assert_close(rolled - x, x.roll(1, 0) * scale[:, None], atol=1e-5, rtol=0)


def test_eq_attenuates_out_of_band_and_passes_in_band() -> None:
    tones = sine([50.0, 1225.0, 7500.0])
    y, params = A.random_eq(tones, SR, gen(), low_hz=(500, 500), high_hz=(3000, 3000),
                            peak_db=(0, 0))
    assert params["low_hz"].tolist() == pytest.approx([500.0] * 3)
    change = db(power(y) / power(tones))
    assert change[0] < -38  # 50 Hz: 3.3 octaves below a 12 dB/octave high-pass (-40 dB)
    assert abs(change[1]) < 0.5  # mid-band (-0.24 dB from the two skirts)
    assert change[2] < -15  # 1.3 octaves above the low-pass (-16 dB)
    # A peaking band boosts by its gain at its centre.
    boosted = A.equalize(sine(1000.0), SR, torch.tensor([0.0]), torch.tensor([math.inf]),
                         torch.tensor([1000.0]), torch.tensor([9.0]), torch.tensor([1.0]))
    assert float(db(power(boosted) / power(sine(1000.0)))) == pytest.approx(9.0, abs=0.1)


def test_time_mask_zeros_exactly_the_masked_spans() -> None:
    x = music(batch=8) + 2.0  # no zeros in the input
    y, masked = A.time_mask(x, gen(), max_fraction=0.3, n_masks=2)
    assert masked.shape == x.shape and masked.dtype == torch.bool
    assert bool((y[masked] == 0).all()) and torch.equal(y[~masked], x[~masked])
    assert 0 < int(masked.sum()) <= 8 * 2 * 0.3 * x.shape[1]


def test_pitch_shift_octave_up_doubles_the_frequency() -> None:
    y = A.pitch_shift(sine(440.0), SR, torch.tensor([12.0]))
    assert float(peak_hz(y)[0]) == pytest.approx(880.0, abs=1.0)


def test_pitch_shift_batch_with_different_amounts() -> None:
    semitones = torch.tensor([-12.0, -5.0, 0.0, 3.5, 7.0, 12.0])
    x = sine([440.0] * 6)
    y = A.pitch_shift(x, SR, semitones)
    expected = 440.0 * 2 ** (semitones.double() / 12)
    torch.testing.assert_close(peak_hz(y), expected, atol=1.0, rtol=0)
    assert torch.equal(y[2], x[2])  # 0 semitones is the identity
    # Shifting down reads only the middle of the input: no zeros. Up leaves zeros at the ends.
    assert float(y[0, :100].abs().max()) > 0.5 and float(y[-1, :100].abs().max()) < 1e-3
    # With a longer input and out_samples, shifting up fills the whole output.
    long = A.pitch_shift(sine(440.0, seconds=2.0), SR, torch.tensor([12.0]), out_samples=SR)
    assert long.shape == (1, SR) and float(long[0, :100].abs().max()) > 0.5


def test_random_pitch_shift_returns_the_amount_it_applied() -> None:
    x = sine([330.0] * 5)
    y, semitones = A.random_pitch_shift(x, SR, gen(), max_semitones=6.0)
    assert bool((semitones.abs() <= 6).all()) and semitones.std() > 0.5
    measured = 12 * torch.log2(peak_hz(y) / 330.0)
    torch.testing.assert_close(measured.float(), semitones, atol=0.03, rtol=0)


def test_pitch_shift_resampling_does_not_alias() -> None:
    """A partial that shifting up would push past Nyquist is removed, not folded back."""
    x = sine(6000.0) + sine(500.0)
    y = A.pitch_shift(x, SR, torch.tensor([12.0]))
    spec = torch.fft.rfft(y[0, SR // 4 : 3 * SR // 4]).abs()
    freqs = torch.fft.rfftfreq(SR // 2, 1 / SR)
    alias = spec[(freqs > 3000) & (freqs < 5000)].max()  # 12 kHz folds back to 4 kHz
    assert float(alias / spec.max()) < 1e-3


def test_time_stretch_changes_tempo_and_keeps_pitch() -> None:
    t = torch.arange(SR) / SR
    burst = torch.sin(2 * math.pi * 440 * t) * ((t - 0.5).abs() < 0.125)  # 0.25 s tone, centred
    rates = torch.tensor([0.5, 1.0, 2.0])
    y = A.time_stretch(burst.repeat(3, 1), rates)
    frames = y.abs().unfold(1, 160, 160).amax(-1)  # 10 ms envelope
    durations = (frames > 0.5).sum(-1) * 0.01
    torch.testing.assert_close(durations, 0.25 / rates, atol=0.03, rtol=0)
    torch.testing.assert_close(peak_hz(y), torch.full((3,), 440.0, dtype=torch.float64), atol=2.0,
                               rtol=0)
    middle = y[:, SR // 2 - 500 : SR // 2 + 500].abs().amax(-1)  # level kept (phase locking)
    torch.testing.assert_close(middle, torch.ones(3), atol=0.1, rtol=0)


def test_random_time_stretch_returns_rates_in_range() -> None:
    y, rate = A.random_time_stretch(music(batch=6), gen(), min_rate=0.5, max_rate=2.0)
    assert y.shape == (6, music().shape[1])
    assert bool(((rate >= 0.5) & (rate <= 2.0)).all()) and rate.std() > 0.1


# --------------------------------------------------------------------------------------------------
# Chains and views


def test_compose_collects_amounts_by_name() -> None:
    chain = A.Compose({
        "gain": partial(A.random_gain, min_db=-3, max_db=3),
        "eq": partial(A.random_eq, sr=SR),
        "crop": partial(A.random_crop, n_samples=1000),
    })
    y, info = chain(music(), gen())
    assert y.shape == (4, 1000)
    assert set(info) == {"gain", "eq.low_hz", "eq.high_hz", "eq.peak_hz", "eq.peak_db",
                         "eq.peak_octaves"}
    assert "random_gain(min_db=-3" in repr(chain)
    with pytest.raises(ValueError, match="unique"):
        A.Compose([("a", A.random_gain), ("a", A.random_gain)])


def test_view_maker_makes_different_views_with_their_amounts() -> None:
    chain = A.Compose({"pitch": partial(A.random_pitch_shift, sr=SR, max_semitones=2.0)})
    views, info = A.ViewMaker(chain, n_views=3, crop_samples=1500)(music(batch=5), gen())
    assert views.shape == (3, 5, 1500)
    assert info["pitch"].shape == (3, 5) and info["crop_start"].shape == (3, 5)
    assert not torch.equal(views[0], views[1])
    assert not torch.equal(info["pitch"][0], info["pitch"][1])
    plain, info = A.ViewMaker(n_views=2)(music(batch=5), gen())
    assert torch.equal(plain[0], music(batch=5)) and info == {}


@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device here: the CPU/GPU comparison needs one")
def test_cpu_generator_gives_the_same_views_on_gpu() -> None:
    x = music()
    for name in ("gain", "noise_white", "eq", "pitch", "stretch", "views"):
        cpu, amount_cpu = OPS[name](x, gen(7))
        gpu, amount_gpu = OPS[name](x.cuda(), gen(7))
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


# --- edge cases a helper's hostile pass found ----------------------------------------------------
def test_clips_of_no_samples_do_not_hang_the_eq() -> None:
    """equalize padded to a fast FFT length found by a loop that never ended at 0."""
    x = torch.zeros(2, 0)
    assert A.random_eq(x, 16000, torch.Generator().manual_seed(0))[0].shape == (2, 0)
    assert A.default_augment(16000)(x, torch.Generator().manual_seed(0))[0].shape == (2, 0)
    with pytest.raises(ValueError, match="0 samples: there is nothing to stretch"):
        A.time_stretch(x, 1.2)


def test_a_batch_of_one_mixes_in_nothing() -> None:
    """The batch rolled by one is the clip itself: mixing it in is a gain change, not a mix."""
    x = torch.randn(1, 1600)
    y, ratio = A.mix(x, None, torch.Generator().manual_seed(0))
    assert torch.equal(y, x) and ratio.item() == math.inf


def test_float64_input_draws_what_float32_input_draws() -> None:
    x = torch.randn(2, 16000) * 0.1
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ya, _ = A.add_noise(x, a)
    yb, _ = A.add_noise(x.double(), b)
    assert torch.rand(1, generator=a) == torch.rand(1, generator=b)
    torch.testing.assert_close(yb.float(), ya, rtol=1e-4, atol=1e-6)


def test_user_mistakes_are_said_plainly() -> None:
    x, gen = torch.randn(2, 16000), torch.Generator().manual_seed(0)
    assert A.add_noise(x, gen, snr_db=20)[1].tolist() in ([20.0, 20.0], [20.0, math.inf], [math.inf, 20.0], [math.inf] * 2)
    assert A.random_crop(x, 8000.0, gen).shape == (2, 8000)  # a whole float, as seconds * sr gives
    assert A.random_crop(x, np.int64(8000), gen).shape == A.random_crop(x, torch.tensor(8000), gen).shape == (2, 8000)
    assert A.add_noise(x, gen, snr_db=np.array([5.0, 20.0]))[0].shape == x.shape
    with pytest.raises(ValueError, match=r"n_samples must be a whole number >= 1, got 8000.5 \(round it"):
        A.random_crop(x, 8000.5, gen)
    for bad in (None, 0):
        with pytest.raises(TypeError, match="gen must be a torch.Generator"):
            A.random_gain(x, bad)
    with pytest.raises(ValueError, match="out_samples must be a whole number >= 1"):
        A.pitch_shift(x, 16000, 2.0, out_samples=-1)
    with pytest.raises(ValueError, match="n_masks must be a whole number >= 0"):
        A.time_mask(x, gen, 0.1, -1)
    with pytest.raises(ValueError, match="sr must be the audio's sample rate"):
        A.random_eq(x, 0, gen)
    assert A.random_eq(x, 16000, gen, low_hz=50)[0].shape == x.shape
