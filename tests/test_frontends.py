"""Parity of musicssl.audio.frontends with librosa and kaldi-native-fbank, plus dtype/batch contracts.

Tolerance: relative error ||ours - ref|| / ||ref|| below 1e-4 (float32 against float32 references).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from musicssl.audio.frontends import (
    MFCC,
    AmplitudeToDB,
    KaldiFbank,
    Log,
    Log10OnePlus,
    MelSpectrogram,
    Spectrogram,
    Standardize,
    dct_matrix,
    deltas,
    mel_filterbank,
)

_EXTRA = "reference package missing; install the test extra: pip install -e .[test]"

REAL_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev" / "audio"
RTOL = 1e-4


# Reference packages come as fixtures, so the contract tests still run without the test extra.
@pytest.fixture(scope="module")
def librosa() -> ModuleType:
    return pytest.importorskip("librosa", reason=_EXTRA)


@pytest.fixture(scope="module")
def knf() -> ModuleType:
    return pytest.importorskip("kaldi_native_fbank", reason=_EXTRA)


def rel_err(ours: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def chord(sr: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A minor triad with harmonics plus a little white noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    y = sum(0.2 / h * np.sin(2 * np.pi * h * f * t + h) for f in (220.0, 261.6, 329.6) for h in (1, 2, 3))
    return (y + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def sweep(sr: int, seconds: float = 1.0, f0: float = 50.0, f1: float | None = None) -> np.ndarray:
    """Exponential sine sweep from f0 to f1 Hz (default 0.45 sr)."""
    f1 = 0.45 * sr if f1 is None else f1
    t = np.arange(int(sr * seconds)) / sr
    k = np.log(f1 / f0) / seconds
    return (0.5 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)).astype(np.float32)


def kaldi_reference(knf: ModuleType, wave: np.ndarray, sr: int, **opts: object) -> np.ndarray:
    """kaldi-native-fbank output (T, n_feats) for the whole waveform at once, no dither.

    ``opts`` are FbankOptions fields, nested ones dotted: ``{"frame_opts.window_type": "hamming"}``.
    """
    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.samp_freq = sr
    for name, value in opts.items():
        group, _, key = name.rpartition(".")
        setattr(getattr(options, group) if group else options, key, value)
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(sr, wave.astype(np.float32))
    fbank.input_finished()
    return np.stack([np.asarray(fbank.get_frame(i)) for i in range(fbank.num_frames_ready)])


# --------------------------------------------------------------------------------------------------
# STFT


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize(
    ("n_fft", "hop", "win"), [(2048, 512, None), (1024, 256, 800), (512, 160, 400), (400, 100, None)]
)
@pytest.mark.parametrize("power", [2.0, 1.0])
def test_spectrogram_matches_librosa(
    pad_mode: str, n_fft: int, hop: int, win: int | None, power: float, librosa: ModuleType
) -> None:
    y = chord(22050)
    ref = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, win_length=win, pad_mode=pad_mode)) ** power
    ours = Spectrogram(n_fft, hop, win, power=power, pad_mode=pad_mode)(torch.from_numpy(y))
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) < RTOL


def test_spectrogram_complex_and_uncentred(librosa: ModuleType) -> None:
    y = sweep(16000)
    ref = librosa.stft(y, n_fft=512, hop_length=128, center=False)
    ours = Spectrogram(512, 128, power=None, center=False)(torch.from_numpy(y))
    assert ours.is_complex()
    assert rel_err(torch.view_as_real(ours), np.stack([ref.real, ref.imag], -1)) < RTOL


def test_spectrogram_hop_default_is_quarter_window() -> None:
    assert Spectrogram(1024, win_length=800).hop_length == 200


def test_constant_padding_ignores_trailing_zeros() -> None:
    y = torch.from_numpy(chord(16000, 0.5))
    padded = torch.cat([y, torch.zeros(5000)])
    spec = Spectrogram(1024, 256)
    short, long = spec(y), spec(padded)
    torch.testing.assert_close(long[..., : short.shape[-1]], short, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Mel


@pytest.mark.parametrize("htk", [False, True])
@pytest.mark.parametrize("norm", ["slaney", None])
@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmin", "fmax"),
    [
        (22050, 2048, 128, 0.0, None),
        (16000, 512, 80, 20.0, 7600.0),
        (44100, 4096, 96, 30.0, 16000.0),
        (24000, 1024, 64, 0.0, 11025.0),
    ],
)
def test_mel_filterbank_matches_librosa(
    htk: bool, norm: str | None, sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None, librosa: ModuleType
) -> None:
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm)
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm)
    assert ours.shape == (n_mels, n_fft // 2 + 1)
    assert rel_err(ours, ref) < RTOL
    assert float(np.abs(ours.numpy() - ref).max()) < 1e-6 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda: MelSpectrogram(16000, n_fft=2048), lambda: MFCC(16000),
                                  lambda: KaldiFbank(16000, input_scale=32768)], ids=["mel", "mfcc", "kaldi"])
def test_front_ends_stay_float32_under_autocast(make: Callable[[], torch.nn.Module], dtype: torch.dtype) -> None:
    """A loud tone's mel power passes fp16's 65504: a filterbank matmul that autocast ran in fp16
    gave inf, and the log of it NaN. Front-ends run with autocast off."""
    tone = 0.9 * torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000)
    fe = make()
    with torch.autocast("cpu", dtype=dtype):
        got = fe(tone)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, fe(tone), rtol=0, atol=0)


def test_impossible_mel_bands_and_frames_are_refused() -> None:
    for f_min, f_max in ((8000.0, 4000.0), (4000.0, 4000.0), (-10.0, 4000.0)):
        with pytest.raises(ValueError, match="give 0 <= f_min < f_max"):
            mel_filterbank(16000, 512, 64, f_min, f_max)
    with pytest.raises(ValueError, match="hop_length must be at least 1 sample, got 0 \\(win_length // 4 of 3\\)"):
        Spectrogram(3)
    with pytest.raises(ValueError, match="1000 samples is too short .* at least 1025"):
        Spectrogram(2048, pad_mode="reflect")(torch.zeros(1000))
    with pytest.raises(ValueError, match="0 samples is too short"):
        Spectrogram(512)(torch.zeros(2, 0))


def test_mel_filters_past_nyquist_are_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="musicssl.audio.frontends"):
        mel_filterbank(16000, 512, 64, 0.0, 20000.0)  # a 44.1 kHz setting copied to 16 kHz audio
    assert "past the Nyquist frequency of 16000 Hz audio (8000.0 Hz)" in caplog.text


def test_mel_filterbank_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="norm"):
        mel_filterbank(16000, 512, norm="l2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_fft=2048, hop_length=512, n_mels=128),
        dict(n_fft=1024, hop_length=320, n_mels=64, f_min=30.0, f_max=8000.0, htk=True, norm=None),
        dict(n_fft=512, hop_length=128, win_length=400, n_mels=80, power=1.0, pad_mode="reflect"),
    ],
)
def test_melspectrogram_matches_librosa(kwargs: dict, librosa: ModuleType) -> None:
    sr = 22050
    y = chord(sr) + sweep(sr)
    lib = {"f_min": "fmin", "f_max": "fmax"}
    ref = librosa.feature.melspectrogram(y=y, sr=sr, **{lib.get(k, k): v for k, v in kwargs.items()})
    ours = MelSpectrogram(sr, **kwargs)(torch.from_numpy(y))
    assert rel_err(ours, ref) < RTOL


# --------------------------------------------------------------------------------------------------
# Compressions


@pytest.mark.parametrize(
    ("ref", "amin", "top_db"), [(1.0, 1e-10, 80.0), (1.0, 1e-10, None), (0.5, 1e-6, 40.0), ("max", 1e-10, 80.0)]
)
def test_power_to_db_matches_librosa(ref: float | str, amin: float, top_db: float | None, librosa: ModuleType) -> None:
    spec = np.abs(librosa.stft(chord(16000), n_fft=512)) ** 2
    spec[:, :3] = 0.0  # exercise the floor
    ref_value = np.max if ref == "max" else ref
    expected = librosa.power_to_db(spec, ref=ref_value, amin=amin, top_db=top_db)
    to_db = AmplitudeToDB("power", ref=ref, amin=amin, top_db=top_db)  # type: ignore[arg-type]
    ours = to_db(torch.from_numpy(spec))
    assert rel_err(ours, expected) < RTOL


@pytest.mark.parametrize(("ref", "amin", "top_db"), [(1.0, 1e-5, 80.0), (2.0, 1e-4, None), ("max", 1e-5, 60.0)])
def test_amplitude_to_db_matches_librosa(
    ref: float | str, amin: float, top_db: float | None, librosa: ModuleType
) -> None:
    mag = np.abs(librosa.stft(sweep(16000), n_fft=512))
    ref_value = np.max if ref == "max" else ref
    expected = librosa.amplitude_to_db(mag, ref=ref_value, amin=amin, top_db=top_db)
    to_db = AmplitudeToDB("magnitude", ref=ref, amin=amin, top_db=top_db)  # type: ignore[arg-type]
    ours = to_db(torch.from_numpy(mag))
    assert rel_err(ours, expected) < RTOL


def test_top_db_and_ref_max_are_per_example() -> None:
    spec = Spectrogram(512)(torch.from_numpy(chord(16000)))
    batch = torch.stack([spec, 1e-4 * spec])
    for to_db in (AmplitudeToDB(top_db=60.0), AmplitudeToDB(ref="max", top_db=60.0)):
        out = to_db(batch)
        torch.testing.assert_close(out[0], to_db(batch[0]))
        torch.testing.assert_close(out[1], to_db(batch[1]))


def test_log_compressions_match_numpy() -> None:
    x = Spectrogram(512)(torch.from_numpy(chord(16000))).numpy()
    assert rel_err(Log10OnePlus()(torch.from_numpy(x)), np.log10(1 + 1e4 * x)) < RTOL
    assert rel_err(Log10OnePlus(a=10.0)(torch.from_numpy(x)), np.log10(1 + 10.0 * x)) < RTOL
    assert rel_err(Log(eps=1e-6)(torch.from_numpy(x)), np.log(x + 1e-6)) < RTOL


def test_standardize() -> None:
    x = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    mean, std = torch.arange(4.0)[:, None], torch.full((4, 1), 2.0)
    torch.testing.assert_close(Standardize(mean, std)(x), (x - mean) / std)
    assert Standardize(1.0, 2.0).state_dict() == {}
    assert set(Standardize(mean, std, persistent=True).state_dict()) == {"mean", "std"}


# --------------------------------------------------------------------------------------------------
# MFCC and deltas


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_mfcc=20),
        dict(n_mfcc=13, n_mels=40, n_fft=1024, hop_length=256, htk=True, lifter=22.0),
        dict(n_mfcc=30, n_mels=64, f_min=50.0, f_max=7000.0),
    ],
)
def test_mfcc_matches_librosa(kwargs: dict, librosa: ModuleType) -> None:
    sr = 16000
    y = chord(sr) + 0.5 * sweep(sr)
    lib = {"f_min": "fmin", "f_max": "fmax"}
    ref = librosa.feature.mfcc(y=y, sr=sr, **{lib.get(k, k): v for k, v in kwargs.items()})
    ours = MFCC(sr, **kwargs)(torch.from_numpy(y))
    assert rel_err(ours, ref) < RTOL


def test_dct_matrix_is_orthonormal() -> None:
    dct = dct_matrix(32, 32).double()
    torch.testing.assert_close(dct @ dct.T, torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("width", [3, 5, 9])
def test_deltas_match_librosa_on_interior_frames(width: int, librosa: ModuleType) -> None:
    feats = librosa.feature.mfcc(y=chord(16000) + sweep(16000), sr=16000, n_mfcc=20)
    half = width // 2
    ref = librosa.feature.delta(feats, width=width, order=1)
    ours = deltas(torch.from_numpy(feats), width)
    assert ours.shape == feats.shape
    assert rel_err(ours[:, half:-half], ref[:, half:-half]) < RTOL


def test_deltas_edge_replication() -> None:
    # A ramp has slope 1 inside; at the edges the replicated frames flatten it.
    ramp = torch.arange(10.0)
    out = deltas(ramp, width=5)
    torch.testing.assert_close(out[2:-2], torch.ones(6))
    # t=0: (1*(1-0) + 2*(2-0)) / 10 = 0.5
    assert out[0].item() == pytest.approx(0.5)


def test_mfcc_with_deltas_stacks_features(librosa: ModuleType) -> None:
    y = torch.from_numpy(chord(16000))
    plain = MFCC(16000, n_mfcc=13)(y)
    full = MFCC(16000, n_mfcc=13, deltas=2, delta_width=9)(y)
    assert full.shape == (39, plain.shape[-1])
    torch.testing.assert_close(full[:13], plain)
    torch.testing.assert_close(full[13:26], deltas(plain, 9))
    torch.testing.assert_close(full[26:], deltas(deltas(plain, 9), 9))
    interior = slice(4, -4)
    ref = librosa.feature.delta(plain.numpy(), width=9, order=1)
    assert rel_err(full[13:26, interior], ref[:, interior]) < RTOL


# --------------------------------------------------------------------------------------------------
# Kaldi fbank


# (sample rate, n_mels, our keyword arguments, the same options for kaldi-native-fbank)
KALDI_CASES = [
    (16000, 80, {}, {}),
    (16000, 40, {"window": "hamming"}, {"frame_opts.window_type": "hamming"}),
    (
        16000,
        80,
        {"window": "hanning", "snip_edges": False},
        {"frame_opts.window_type": "hanning", "frame_opts.snip_edges": False},
    ),
    (16000, 120, {"window": "hann"}, {"frame_opts.window_type": "hann"}),
    (
        16000,
        80,
        {"window": "blackman", "snip_edges": False, "low_freq": 60.0, "high_freq": -400.0},
        {
            "frame_opts.window_type": "blackman",
            "frame_opts.snip_edges": False,
            "mel_opts.low_freq": 60.0,
            "mel_opts.high_freq": -400.0,
        },
    ),
    (
        22050,
        64,
        {"high_freq": 8000.0, "preemphasis": 0.0, "remove_dc_offset": False},
        {"mel_opts.high_freq": 8000.0, "frame_opts.preemph_coeff": 0.0, "frame_opts.remove_dc_offset": False},
    ),
    (
        8000,
        23,
        {"round_to_power_of_two": False, "frame_length_ms": 32.0, "frame_shift_ms": 12.5},
        {
            "frame_opts.round_to_power_of_two": False,
            "frame_opts.frame_length_ms": 32.0,
            "frame_opts.frame_shift_ms": 12.5,
        },
    ),
    (16000, 80, {"use_energy": True, "energy_floor": 1.0}, {"use_energy": True, "energy_floor": 1.0}),
    (
        16000,
        80,
        {"use_power": False, "window": "rectangular"},
        {"use_power": False, "frame_opts.window_type": "rectangular"},
    ),
]


@pytest.mark.parametrize(("sr", "n_mels", "ours_kw", "knf_kw"), KALDI_CASES)
@pytest.mark.parametrize("scale", [1.0, 32768.0])
def test_kaldi_fbank_matches_kaldi_native_fbank(
    sr: int, n_mels: int, ours_kw: dict, knf_kw: dict, scale: float, knf: ModuleType
) -> None:
    wave = (chord(sr, 1.0) + sweep(sr, 1.0)) * scale
    ref = kaldi_reference(knf, wave, sr, **{"mel_opts.num_bins": n_mels, **knf_kw})
    ours = KaldiFbank(sr, n_mels=n_mels, **ours_kw)(torch.from_numpy(wave)).numpy().T  # Kaldi layout (T, n)
    assert rel_err(ours, ref) < RTOL
    # Max abs error in log units over bins within 50 dB of their frame's peak. Further down (about
    # -76 dB for the lowest 120-bin filters here) float32 rounding of the FFT dominates a bin's
    # energy: against a float64 computation both we and Kaldi are off by up to 1e-2 there.
    mels = slice(1, None) if ours_kw.get("use_energy") else slice(None)
    ours, ref = ours[:, mels], ref[:, mels]
    range_50db = np.log(1e5) / (2.0 if ours_kw.get("use_power", True) is False else 1.0)
    loud = ref > ref.max(axis=1, keepdims=True) - range_50db
    assert float(np.abs(ours - ref)[loud].max()) < 2e-4


@pytest.mark.parametrize("num_samples", [100, 250, 1234])
def test_kaldi_fbank_mirrors_short_signals_like_kaldi(num_samples: int, knf: ModuleType) -> None:
    # Without snip_edges a 25 ms frame around a 100-sample signal folds it several times.
    wave = np.random.default_rng(num_samples).standard_normal(num_samples).astype(np.float32)
    ref = kaldi_reference(knf, wave, 16000, **{"mel_opts.num_bins": 40, "frame_opts.snip_edges": False})
    ours = KaldiFbank(n_mels=40, snip_edges=False)(torch.from_numpy(wave)).numpy().T
    assert rel_err(ours, ref) < RTOL


def test_kaldi_fbank_without_log(knf: ModuleType) -> None:
    wave = chord(16000, 0.5)
    ref = kaldi_reference(knf, wave, 16000, **{"mel_opts.num_bins": 40, "use_log_fbank": False})
    ours = KaldiFbank(n_mels=40, use_log=False)(torch.from_numpy(wave)).numpy().T
    assert rel_err(ours, ref) < RTOL


def test_kaldi_fbank_allows_empty_mel_filters() -> None:
    # Kaldi refuses 128 bins with 512-point FFTs at 16 kHz (one filter is empty); torchaudio and
    # models ported from it (AST) use them, so the empty filter gives log(float32 eps) instead.
    out = KaldiFbank(n_mels=128)(torch.from_numpy(chord(16000, 0.2)))
    empty = (out == np.log(np.finfo(np.float32).eps)).all(dim=-1)
    assert empty.sum() == 1


def test_kaldi_fbank_input_scale_equals_prescaling() -> None:
    wave = torch.from_numpy(chord(16000, 0.5))
    torch.testing.assert_close(KaldiFbank(input_scale=32768.0)(wave), KaldiFbank()(wave * 32768.0))


def test_kaldi_fbank_short_input_and_frame_count() -> None:
    fbank = KaldiFbank()
    assert fbank(torch.zeros(399)).shape == (80, 0)
    assert fbank(torch.zeros(400)).shape == (80, 1)
    assert fbank(torch.zeros(1000)).shape == (80, 1 + (1000 - 400) // 160)
    assert KaldiFbank(snip_edges=False)(torch.zeros(1000)).shape == (80, (1000 + 80) // 160)
    with pytest.raises(ValueError, match="mel band"):
        KaldiFbank(low_freq=9000.0)
    with pytest.raises(ValueError, match="window"):
        KaldiFbank(window="kaiser")


# --------------------------------------------------------------------------------------------------
# Contracts: batch dims, float32 under bf16 casts, buffers outside state dicts


def _frontends() -> list[tuple[str, torch.nn.Module]]:
    return [
        ("spectrogram", Spectrogram(512, 128)),
        ("melspectrogram", MelSpectrogram(16000, 512, 160, n_mels=64)),
        ("db_mel", torch.nn.Sequential(MelSpectrogram(16000, 512, 160, n_mels=64), AmplitudeToDB())),
        ("log10_mel", torch.nn.Sequential(MelSpectrogram(16000, 512, 160, n_mels=64), Log10OnePlus())),
        ("mfcc", MFCC(16000, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40, deltas=2)),
        ("kaldi", KaldiFbank(16000, n_mels=40, snip_edges=False)),
    ]


@pytest.mark.parametrize(("name", "frontend"), _frontends())
def test_batch_dims_are_preserved(name: str, frontend: torch.nn.Module) -> None:
    x = torch.from_numpy(np.stack([chord(16000, 0.4, seed=s) for s in range(6)])).reshape(2, 3, -1)
    out = frontend(x)
    assert out.shape[:2] == (2, 3)
    single = frontend(x[1, 2])
    assert out.shape[2:] == single.shape
    torch.testing.assert_close(out[1, 2], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "frontend"), _frontends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_module_still_computes_in_float32(name: str, frontend: torch.nn.Module, dtype: torch.dtype) -> None:
    x = torch.from_numpy(chord(16000, 0.4))
    cast = copy.deepcopy(frontend).to(dtype)
    assert all(b.dtype == torch.float32 for b in cast.buffers())
    out = cast(x)
    assert out.dtype == torch.float32
    assert rel_err(out, frontend(x).numpy()) < 1e-6
    # A low-precision waveform is upcast on entry: the result is the float32 one of those samples.
    out_low = cast(x.to(dtype))
    assert out_low.dtype == torch.float32
    assert rel_err(out_low, frontend(x.to(dtype).float()).numpy()) < 1e-6


def test_buffers_are_not_in_state_dict() -> None:
    for _, frontend in _frontends():
        assert frontend.state_dict() == {}
        assert len(list(frontend.buffers())) > 0


# --------------------------------------------------------------------------------------------------
# One real clip


def test_real_clip_matches_references(librosa: ModuleType, knf: ModuleType) -> None:
    clips = sorted(REAL_AUDIO.glob("*/*.flac")) if REAL_AUDIO.is_dir() else []
    if not clips:
        pytest.skip(f"real audio not found under {REAL_AUDIO}")
    import soundfile as sf

    sr = sf.info(str(clips[0])).samplerate
    wave, _ = sf.read(clips[0], dtype="float32", frames=3 * sr, always_2d=True)
    y = wave.mean(axis=1)
    ref_mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=1024, hop_length=256, n_mels=96)
    assert rel_err(MelSpectrogram(sr, 1024, 256, n_mels=96)(torch.from_numpy(y)), ref_mel) < RTOL
    ref_fbank = kaldi_reference(knf, y * 32768.0, sr, **{"mel_opts.num_bins": 80})
    ours = KaldiFbank(sr, n_mels=80, input_scale=32768.0)(torch.from_numpy(y)).numpy().T
    assert rel_err(ours, ref_fbank) < RTOL
