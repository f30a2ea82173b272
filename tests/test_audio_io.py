"""Tests for musicssl.audio.io: decoding, partial reads, resampling, bad files, file discovery."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import types
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musicssl.audio import io as aio
from musicssl.audio.io import (
    AUDIO_EXTENSIONS,
    AudioInfo,
    audio_info,
    check_finite,
    find_audio_files,
    load_audio,
    resample,
    to_mono,
)
from musicssl.errors import AudioDecodeError, AudioInputError, OffsetPastEndError

DATA = Path(__file__).parent / "data"
CLIP = DATA / "soundtrack_cut.flac"  # 3 s, 16 kHz mono
HAVE_FFMPEG = shutil.which("ffmpeg") is not None
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="needs an ffmpeg binary on the PATH")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def clip() -> np.ndarray:
    """The reference samples of the soundtrack cut, (S,) float32 at 16 kHz."""
    x, sr = sf.read(CLIP, dtype="float32")
    assert sr == 16000
    return x


@pytest.fixture(scope="session")
def encoded(tmp_path_factory: pytest.TempPathFactory, clip: np.ndarray) -> dict[str, Path]:
    """The soundtrack cut in every libsndfile format, written here rather than committed."""
    folder = tmp_path_factory.mktemp("encoded")
    formats = {
        "flac": {},
        "wav": {"subtype": "PCM_16"},
        "ogg": {"format": "OGG", "subtype": "VORBIS"},
        "opus": {"format": "OGG", "subtype": "OPUS"},
        "mp3": {"format": "MP3"},
    }
    paths = {}
    for ext, kwargs in formats.items():
        paths[ext] = folder / f"clip.{ext}"
        sf.write(paths[ext], clip, 16000, **kwargs)
    return paths


@pytest.fixture()
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither torchcodec nor ffmpeg/ffprobe can be found."""
    monkeypatch.setattr(aio.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)


def write_wav_bytes(path: Path, raw: np.ndarray, width: int, sr: int = 8000, channels: int = 1) -> None:
    """Write integer PCM with the stdlib, so the expected scaling does not depend on soundfile."""
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(raw.tobytes())


def snr_db(x: np.ndarray, ref: np.ndarray) -> float:
    n = min(len(x), len(ref))
    return float(10 * np.log10(np.sum(ref[:n] ** 2) / np.sum((x[:n] - ref[:n]) ** 2)))


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("ext", "min_corr", "min_snr"),
    [("flac", 1.0, np.inf), ("wav", 1.0, np.inf), ("ogg", 0.99, 15), ("opus", 0.98, 10), ("mp3", 0.99, 15)],
)
def test_decode_formats(encoded, clip, ext, min_corr, min_snr):
    x, sr = load_audio(encoded[ext])
    assert sr == 16000 and x.dtype == np.float32 and x.shape == clip.shape
    assert x.flags.c_contiguous
    # lossy decoders overshoot a little on a clip that peaks at full scale
    assert np.abs(x).max() <= (1.0 if min_snr == np.inf else 1.3)
    if min_snr == np.inf:
        np.testing.assert_array_equal(x, clip)
    else:
        assert np.corrcoef(x, clip)[0, 1] >= min_corr
        assert snr_db(x, clip) >= min_snr
    info = audio_info(encoded[ext])
    assert info == AudioInfo(16000, len(clip), 1, len(clip) / 16000, "soundfile")


@pytest.mark.parametrize(
    ("name", "seconds", "f0"),
    [("piano_note.flac", 4.0, 440 * 2 ** (1 / 12)), ("snare_hit.flac", 2.0, None)],
)
def test_real_clips(name, seconds, f0):
    x, sr = load_audio(DATA / name)
    assert sr == 16000 and x.shape == (round(seconds * sr),) and np.isfinite(x).all()
    assert 0.05 < np.abs(x).max() <= 1.0
    if f0 is not None:  # the piano note is MIDI 70: its spectral peak sits at its fundamental
        spectrum = np.abs(np.fft.rfft(x[: 2 * sr]))
        assert abs(np.fft.rfftfreq(2 * sr, 1 / sr)[np.argmax(spectrum)] - f0) < 2


@pytest.mark.parametrize("ext", ["wav", "flac"])
@pytest.mark.parametrize(("offset", "duration"), [(0.0, 1.0), (0.5, 0.25), (1.2345, None), (2.9, 5.0)])
def test_partial_read_equals_slice(encoded, clip, ext, offset, duration):
    x, _ = load_audio(encoded[ext], offset=offset, duration=duration)
    start = round(offset * 16000)
    stop = None if duration is None else start + round(duration * 16000)
    np.testing.assert_array_equal(x, clip[start:stop])


def test_partial_read_of_lossy_format_matches(encoded):
    full, _ = load_audio(encoded["ogg"])
    part, _ = load_audio(encoded["ogg"], offset=1.0, duration=0.5)
    assert part.shape == (8000,)
    np.testing.assert_allclose(part, full[16000:24000], atol=1e-3)


def test_partial_read_seeks(tmp_path, monkeypatch):
    sr, seconds = 8000, 120
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, sr * seconds).astype(np.float32)
    path = tmp_path / "long.flac"
    sf.write(path, noise, sr, subtype="PCM_24")
    ref, _ = sf.read(path, dtype="float32")
    read_sizes, seeks = [], []
    real_read, real_seek = aio._readf, sf.SoundFile.seek

    def spy_read(f, out):
        n = real_read(f, out)
        read_sizes.append(n)
        return n

    def spy_seek(self, frames, whence=os.SEEK_SET):
        if whence == os.SEEK_SET:  # tell() is seek(0, SEEK_CUR): not a jump
            seeks.append(frames)
        return real_seek(self, frames, whence)

    monkeypatch.setattr(aio, "_readf", spy_read)
    monkeypatch.setattr(sf.SoundFile, "seek", spy_seek)
    x, _ = load_audio(path, offset=119.0, duration=0.5)
    np.testing.assert_array_equal(x, ref[119 * sr : 119 * sr + sr // 2])
    assert seeks == [119 * sr]  # one jump to the span
    assert sum(read_sizes) == sr // 2  # only the span was decoded, not the 2 minutes before it


def test_tiny_duration_reads_one_sample(encoded, clip):
    x, _ = load_audio(encoded["wav"], offset=1.0, duration=1e-6)
    np.testing.assert_array_equal(x, clip[16000:16001])


def test_offset_past_end_is_a_clear_error(encoded):
    with pytest.raises(AudioDecodeError, match="past its end") as err:
        load_audio(encoded["flac"], offset=3.0)
    assert "clip.flac" in str(err.value) and "3.000 s" in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"offset": -1.0}, {"offset": float("nan")}, {"duration": 0.0}, {"duration": -2.0}, {"sr": 0}, {"sr": 22050.5}],
)
def test_bad_arguments(encoded, kwargs):
    with pytest.raises(AudioInputError):
        load_audio(encoded["flac"], **kwargs)


# --------------------------------------------------------------------------- resampling and channels


def test_resample_keeps_frequency_and_length():
    sr_in, sr_out, f0 = 44100, 16000, 1000.0
    t = np.arange(sr_in * 2) / sr_in
    x = (0.5 * np.sin(2 * np.pi * f0 * t)).astype(np.float32)
    y = resample(x, sr_in, sr_out)
    assert y.dtype == np.float32 and abs(len(y) - 2 * sr_out) <= 1
    freqs = np.fft.rfftfreq(len(y), 1 / sr_out)
    assert abs(freqs[np.argmax(np.abs(np.fft.rfft(y)))] - f0) <= sr_out / len(y)
    core = slice(1000, -1000)  # away from the filter's edges
    assert np.abs(y[core]).max() == pytest.approx(0.5, abs=0.01)


def test_resample_multichannel_and_identity():
    x = np.random.default_rng(1).standard_normal((3, 4410)).astype(np.float64)
    y = resample(x, 44100, 16000)
    assert y.shape == (3, 1600) and y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y[1], resample(x[1], 44100, 16000), atol=1e-6)
    same = resample(x, 16000, 16000)
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, x.astype(np.float32))


def test_resample_never_loses_a_short_clip():
    one = np.array([0.5], dtype=np.float32)
    assert resample(one, 44100, 16000).tolist() == [0.5]
    assert resample(np.full((2, 2), 0.25, np.float32), 48000, 8000).shape == (2, 1)


@pytest.mark.parametrize("rate", [0, -16000, 1.5, "16000", None, True, float("inf")])
def test_resample_rejects_bad_rates(rate):
    with pytest.raises(AudioInputError, match="positive integer"):
        resample(np.zeros(10, np.float32), rate, 16000)
    with pytest.raises(AudioInputError, match="positive integer"):
        resample(np.zeros(10, np.float32), 16000, rate)


def test_load_with_resampling(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 880 * t)], axis=1) * 0.3
    path = tmp_path / "stereo44k.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    x, sr = load_audio(path, sr=16000, mono=False)
    assert sr == 16000 and x.shape == (2, 16000) and x.dtype == np.float32
    peaks = [np.argmax(np.abs(np.fft.rfft(ch))) for ch in x]  # 1 Hz bins
    assert peaks == [440, 880]


def load_traced(path, **kwargs):
    """load_audio(path, **kwargs) and the peak of the memory Python and numpy allocated meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        audio, sr = load_audio(path, **kwargs)
        return audio, sr, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_long_file_is_mixed_and_resampled_block_by_block(tmp_path):
    """Many read blocks: the same samples as decoding whole and resampling in one go, while the
    memory held is the 16 kHz mono result and a few blocks, not the file's 48 kHz stereo."""
    rng = np.random.default_rng(5)
    path = tmp_path / "long.wav"  # 3 min: 33 blocks of 2**18 frames
    sf.write(path, rng.uniform(-0.5, 0.5, (48000 * 180, 2)).astype(np.float32), 48000, subtype="PCM_16")
    stereo, _ = sf.read(path, dtype="float32")
    whole = soxr.resample((stereo[:, 0] + stereo[:, 1]) / 2, 48000, 16000, quality="HQ")
    mono, sr, peak = load_traced(path, sr=16000)
    np.testing.assert_array_equal(mono, whole)
    assert sr == 16000 and mono.flags.c_contiguous
    # 11.5 MB and one 2 MB read block with what it makes; joining the blocks at the end would take
    # 23 MB, the file decoded whole 69 MB.
    assert peak < mono.nbytes + 5e6
    both, _ = load_audio(path, sr=16000, mono=False, offset=7.5, duration=20.0)
    np.testing.assert_array_equal(both, soxr.resample(stereo[360000:1320000], 48000, 16000, quality="HQ").T)


def test_nan_in_a_late_block_is_counted(tmp_path):
    data = np.zeros(3 * (1 << 18), np.float32)
    data[[5, 1 << 19]] = np.nan
    path = tmp_path / "late nan.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="'.*late nan.wav': 2 decoded samples are NaN or Inf"):
        load_audio(path, sr=8000)


def test_mono_averages_channels(tmp_path):
    rng = np.random.default_rng(2)
    stereo = rng.uniform(-0.5, 0.5, (1000, 2)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    mono, _ = load_audio(path)
    both, _ = load_audio(path, mono=False)
    np.testing.assert_allclose(mono, stereo.mean(axis=1), atol=1e-7)
    np.testing.assert_array_equal(both, stereo.T)
    np.testing.assert_allclose(to_mono(both), mono, atol=1e-7)


def test_mono_file_with_mono_false_is_one_channel(encoded, clip):
    x, _ = load_audio(encoded["flac"], mono=False)
    assert x.shape == (1, len(clip))


def test_eight_channels(tmp_path):
    frames = np.stack([np.full(500, (c + 1) / 10) for c in range(8)], axis=1).astype(np.float32)
    path = tmp_path / "octo.wav"
    sf.write(path, frames, 48000, subtype="FLOAT")
    x, sr = load_audio(path, mono=False)
    assert sr == 48000 and x.shape == (8, 500)
    np.testing.assert_allclose(x[:, 0], np.arange(1, 9) / 10, rtol=1e-6)
    mono, _ = load_audio(path, sr=16000)
    assert abs(len(mono) - 500 / 3) <= 1
    np.testing.assert_allclose(load_audio(path)[0], np.full(500, 0.45), rtol=1e-6)
    assert audio_info(path).channels == 8


def test_to_mono_shapes():
    x = np.arange(6, dtype=np.float32)
    assert to_mono(x) is x
    np.testing.assert_array_equal(to_mono(np.array([[0.0, 2.0], [1.0, 4.0]])), [0.5, 3.0])
    assert to_mono(np.zeros((2, 5), np.float32)).dtype == np.float32
    with pytest.raises(AudioInputError, match="shape"):
        to_mono(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("rate", [8000, 192000])
def test_extreme_sample_rates(tmp_path, rate):
    t = np.arange(rate // 2) / rate
    path = tmp_path / f"tone{rate}.flac"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 1000 * t), rate, subtype="PCM_24")
    x, sr = load_audio(path)
    assert sr == rate and x.shape == (rate // 2,)
    y, sr16 = load_audio(path, sr=16000)
    assert sr16 == 16000 and abs(len(y) - 8000) <= 1
    assert np.argmax(np.abs(np.fft.rfft(y))) == 500  # 2 Hz bins: 1 kHz survives either way


# --------------------------------------------------------------------------- integer PCM, edge content


@pytest.mark.parametrize(
    ("width", "raw", "expected"),
    [
        (1, np.array([0, 64, 128, 192, 255], "u1"), [-1.0, -0.5, 0.0, 0.5, 127 / 128]),
        (2, np.array([-32768, -16384, 0, 16384, 32767], "<i2"), [-1.0, -0.5, 0.0, 0.5, 32767 / 32768]),
        (4, np.array([-(2**31), -(2**30), 0, 2**30, 2**31 - 1], "<i4"), [-1.0, -0.5, 0.0, 0.5, 1.0]),
    ],
    ids=["uint8", "int16", "int32"],
)
def test_integer_pcm_is_scaled(tmp_path, width, raw, expected):
    path = tmp_path / f"pcm{8 * width}.wav"
    write_wav_bytes(path, raw, width)
    x, sr = load_audio(path)
    assert sr == 8000 and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, atol=1e-7)
    assert np.abs(x).max() <= 1.0


def test_int24_pcm_is_scaled(tmp_path):
    values = np.array([-(2**23), -(2**22), 0, 2**22, 2**23 - 1])
    raw = np.frombuffer(b"".join(int(v).to_bytes(3, "little", signed=True) for v in values), "u1")
    path = tmp_path / "pcm24.wav"
    write_wav_bytes(path, raw, 3)
    np.testing.assert_allclose(load_audio(path)[0], [-1.0, -0.5, 0.0, 0.5, 1.0], atol=1e-6)


def test_silence(tmp_path):
    path = tmp_path / "silence.flac"
    sf.write(path, np.zeros(16000, np.int16), 16000)
    x, _ = load_audio(path, sr=22050)
    assert x.shape == (22050,) and not x.any()


def test_one_sample(tmp_path):
    path = tmp_path / "one.wav"
    write_wav_bytes(path, np.array([16384], "<i2"), 2, sr=16000)
    x, sr = load_audio(path)
    assert sr == 16000 and x.shape == (1,) and x[0] == 0.5
    assert load_audio(path, mono=False)[0].shape == (1, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_file(tmp_path, bad):
    data = np.zeros(100, np.float32)
    data[37] = bad
    path = tmp_path / "broken float.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="NaN or Inf") as err:
        load_audio(path)
    assert "broken float.wav" in str(err.value)


# --------------------------------------------------------------------------- bad files


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(AudioDecodeError, match="empty") as err:
        load_audio(path)
    assert "empty.wav" in str(err.value)
    with pytest.raises(AudioDecodeError, match="empty.wav"):
        audio_info(path)


def test_header_only_wav(tmp_path):
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    assert path.stat().st_size > 0 and audio_info(path).frames == 0
    with pytest.raises(AudioDecodeError, match="contains no audio samples") as err:
        load_audio(path)
    assert "header_only.wav" in str(err.value)


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_truncated_file_decodes_the_prefix_and_warns(encoded, clip, tmp_path, caplog, ext):
    path = truncate(encoded[ext], tmp_path / f"cut.{ext}", 0.5)
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        x, _ = load_audio(path)
    assert 0 < len(x) < len(clip)
    np.testing.assert_array_equal(x, clip[: len(x)])
    assert "truncated" in caplog.text and f"cut.{ext}" in caplog.text


@pytest.mark.parametrize("ext", ["mp3", "ogg", "opus"])
def test_truncated_compressed_file_decodes_what_is_there_and_warns(encoded, clip, tmp_path, caplog, ext):
    """libsndfile decodes such a file to the cut without complaint: an MP3's length tag promises
    more, an Ogg stream lacks its last page."""
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        whole, _ = load_audio(encoded[ext])
    assert not caplog.text  # whole files do not warn
    path = truncate(encoded[ext], tmp_path / f"cut.{ext}", 0.5)
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        x, _ = load_audio(path)
    assert 0 < len(x) < 0.8 * len(whole)
    assert "truncated" in caplog.text and f"cut.{ext}" in caplog.text


def test_flac_streamed_without_its_length_decodes_whole(encoded, clip, tmp_path, caplog):
    """A FLAC written to a pipe has 0 in its STREAMINFO total (libsndfile: 2**63 - 1 frames); it
    used to fail as "array is too big", and reading to its end as damage."""
    data = bytearray(encoded["flac"].read_bytes())
    assert data[:4] == b"fLaC"
    fields = int.from_bytes(data[18:26], "big")  # rate 20 bits, channels 3, bits 5, total 36
    data[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    path = tmp_path / "piped.flac"
    path.write_bytes(bytes(data))
    assert sf.info(path).frames > 1 << 62
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        x, _ = load_audio(path)
        part, _ = load_audio(path, offset=1.0, duration=0.5)
    np.testing.assert_array_equal(x, clip)
    np.testing.assert_array_equal(part, clip[16000:24000])
    assert audio_info(path).frames == len(clip) and not caplog.text
    with pytest.raises(AudioDecodeError, match="past its end"):
        load_audio(path, offset=len(clip) / 16000 + 5)


def test_flac_cut_inside_its_header(encoded, tmp_path):
    path = truncate(encoded["flac"], tmp_path / "stub.flac", 0.0005)  # ~40 bytes
    with pytest.raises(AudioDecodeError) as err:
        load_audio(path)
    assert "stub.flac" in str(err.value)
    assert err.value.__cause__ is not None  # the backend's error is chained, not lost


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.wav", b"this is a text file, not audio\n" * 20),
        ("picture.flac", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        ("lyrics.mp3", b"this is a text file, not audio\n" * 80),
    ],
    ids=["text", "png", "text-as-mp3"],
)
def test_non_audio_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioDecodeError) as err:
        load_audio(path)
    message = str(err.value)
    assert name in message and "not audio" in message and "libsndfile" in message
    assert "does not exist" not in message  # libsndfile's words for files it cannot parse, untrue here
    assert not isinstance(err.value.__cause__, AudioDecodeError)
    with pytest.raises(AudioDecodeError, match=name):
        audio_info(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "ghost.flac"
    with pytest.raises(AudioDecodeError, match="no such file") as err:
        load_audio(path)
    assert "ghost.flac" in str(err.value)
    with pytest.raises(AudioDecodeError, match="ghost.flac"):
        audio_info(path)


def test_dangling_link(tmp_path):
    link = tmp_path / "take1.wav"
    link.symlink_to(tmp_path / "moved" / "take1.wav")
    for read in (load_audio, audio_info):
        with pytest.raises(AudioDecodeError, match="link to .*moved.*which does not exist") as err:
            read(link)
        assert "take1.wav" in str(err.value)


def test_directory(tmp_path):
    folder = tmp_path / "album.flac"
    folder.mkdir()
    with pytest.raises(AudioDecodeError, match="folder") as err:
        load_audio(folder)
    assert "album.flac" in str(err.value) and "find_audio_files" in str(err.value)


def test_permission_denied(encoded, tmp_path, monkeypatch):
    path = tmp_path / "locked.flac"
    shutil.copy(encoded["flac"], path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: simulate the refusal
        monkeypatch.setattr(aio.os, "access", lambda *a, **k: False)
    with pytest.raises(AudioDecodeError, match="permission denied") as err:
        load_audio(path)
    assert "locked.flac" in str(err.value) and "chmod" in str(err.value)


def test_unicode_path_with_spaces(encoded, clip, tmp_path):
    folder = tmp_path / "my music" / "Ибица"
    folder.mkdir(parents=True)
    path = folder / "Café del Mar – 01.flac"
    shutil.copy(encoded["flac"], path)
    x, _ = load_audio(path, offset=1.0, duration=1.0)
    np.testing.assert_array_equal(x, clip[16000:32000])
    assert audio_info(path).frames == len(clip)
    assert find_audio_files(tmp_path) == [path]


# --------------------------------------------------------------------------- fallback decoders


def test_no_fallback_for_m4a_names_both_options(encoded, tmp_path, no_fallback):
    path = tmp_path / "Track 01.m4a"
    shutil.copy(encoded["flac"], path)  # never opened: libsndfile does not read .m4a
    for call in (load_audio, audio_info):
        with pytest.raises(AudioDecodeError) as err:
            call(path)
        message = str(err.value)
        assert "Track 01.m4a" in message and "no fallback decoder" in message
        assert "pip install torchcodec" in message and "apt-get install ffmpeg" in message


def test_no_fallback_for_unreadable_wav_names_both_options(tmp_path, no_fallback):
    path = tmp_path / "odd.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 8)
    with pytest.raises(AudioDecodeError) as err:
        load_audio(path)
    message = str(err.value)
    assert "odd.wav" in message and "libsndfile could not read it" in message
    assert "pip install torchcodec" in message and "ffmpeg" in message
    assert err.value.__cause__ is not None


class FakeAudioDecoder:
    """Stands in for torchcodec.decoders.AudioDecoder (same calls, decoded by soundfile)."""

    def __init__(self, source: str):
        self.source = source
        info = sf.info(source)  # raises a RuntimeError subclass on bad files, as torchcodec does
        self.metadata = types.SimpleNamespace(
            sample_rate=info.samplerate, num_channels=info.channels, duration_seconds_from_header=info.duration
        )

    def get_samples_played_in_range(self, start_seconds: float = 0.0, stop_seconds: float | None = None):
        x, sr = sf.read(self.source, dtype="float32", always_2d=True)
        stop = None if stop_seconds is None else round(stop_seconds * sr)
        data = torch.from_numpy(np.ascontiguousarray(x[round(start_seconds * sr) : stop].T))
        return types.SimpleNamespace(data=data, sample_rate=sr)


@pytest.fixture()
def fake_torchcodec(monkeypatch: pytest.MonkeyPatch) -> None:
    package, decoders = types.ModuleType("torchcodec"), types.ModuleType("torchcodec.decoders")
    decoders.AudioDecoder = FakeAudioDecoder
    package.decoders = decoders
    monkeypatch.setitem(sys.modules, "torchcodec", package)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    monkeypatch.setattr(aio.shutil, "which", lambda name, *a, **k: None)


def test_torchcodec_fallback(encoded, clip, tmp_path, fake_torchcodec):
    path = tmp_path / "song.m4a"
    shutil.copy(encoded["flac"], path)
    x, sr = load_audio(path)
    assert sr == 16000 and x.shape == clip.shape
    np.testing.assert_array_equal(x, clip)
    part, _ = load_audio(path, sr=8000, offset=1.0, duration=0.5, mono=False)
    assert part.shape == (1, 4000) and part.flags.c_contiguous
    assert audio_info(path) == AudioInfo(16000, len(clip), 1, 3.0, "torchcodec")
    with pytest.raises(AudioDecodeError, match="past its end") as err:
        load_audio(path, offset=10.0)
    assert "song.m4a" in str(err.value)


def test_torchcodec_failure_is_reported(tmp_path, fake_torchcodec):
    path = tmp_path / "junk.webm"
    path.write_bytes(b"not a webm" * 50)
    with pytest.raises(AudioDecodeError, match="every decoder failed") as err:
        load_audio(path)
    assert "junk.webm" in str(err.value) and "torchcodec:" in str(err.value)


@pytest.fixture(scope="session")
def m4a(encoded, tmp_path_factory) -> Path:
    """An AAC file made by ffmpeg, at a path that needs quoting and contains a colon."""
    path = tmp_path_factory.mktemp("m4a") / "Café del Mar – 01: live.m4a"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", encoded["wav"], "-c:a", "aac", "-b:a", "96k",
         "file:" + os.fspath(path)],
        check=True,
    )
    return path


@needs_ffmpeg
def test_ffmpeg_fallback_decodes_m4a(m4a, clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    x, sr = load_audio(m4a)
    assert sr == 16000 and x.dtype == np.float32
    assert len(clip) <= len(x) <= len(clip) + 2048  # AAC pads to whole 1024-sample frames
    assert np.corrcoef(x[: len(clip)], clip)[0, 1] > 0.98
    part, sr = load_audio(m4a, sr=22050, offset=1.0, duration=1.0, mono=False)
    assert sr == 22050 and part.shape[0] == 1 and abs(part.shape[1] - 22050) <= 2
    ref = resample(clip[16000:32000], 16000, 22050)
    assert np.corrcoef(part[0, 500:-500], ref[500:-500])[0, 1] > 0.95
    with pytest.raises(AudioDecodeError, match="past its end") as err:
        load_audio(m4a, offset=60.0)
    assert m4a.name in str(err.value)


@needs_ffmpeg
def test_ffmpeg_fallback_streams_a_long_file(tmp_path, monkeypatch):
    """ffmpeg's output is read block by block: the same samples as taking it whole, without holding
    the file's 48 kHz stereo (66 MB for these 3 minutes)."""
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    path = tmp_path / "long mix.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=48000:duration=180", "-af", "aeval=val(0)|0.5*val(0)",
                    "-ac", "2", "-c:a", "aac", "file:" + os.fspath(path)], check=True)
    whole = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", "file:" + os.fspath(path), "-map",
                            "0:a:0", "-fflags", "+bitexact", "-f", "f32le", "-"], capture_output=True, check=True)
    stereo = np.frombuffer(whole.stdout, dtype="<f4").reshape(-1, 2)
    expected = soxr.resample((stereo[:, 0] + stereo[:, 1]) / 2, 48000, 16000, quality="HQ")
    del whole, stereo
    mono, sr, peak = load_traced(path, sr=16000)
    np.testing.assert_array_equal(mono, expected)
    assert sr == 16000 and peak < 3 * mono.nbytes  # 11.5 MB: blocks joined at the end, and a read block


@needs_ffmpeg
@pytest.mark.parametrize("with_ffprobe", [True, False])
def test_ffmpeg_fallback_info(m4a, monkeypatch, with_ffprobe):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    which = shutil.which
    if not with_ffprobe:
        monkeypatch.setattr(aio.shutil, "which", lambda name, *a, **k: None if name == "ffprobe" else which(name))
    elif which("ffprobe") is None:
        pytest.skip("needs ffprobe")
    info = audio_info(m4a)
    assert info.backend == ("ffprobe" if with_ffprobe else "ffmpeg")
    assert info.sample_rate == 16000 and info.channels == 1
    assert abs(info.frames - 48000) <= 2048 and info.duration == pytest.approx(3.0, abs=0.15)


@needs_ffmpeg
def test_ffmpeg_rejects_non_audio(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    path = tmp_path / "fake.m4a"
    path.write_bytes(b"hello" * 100)
    with pytest.raises(AudioDecodeError, match="every decoder failed") as err:
        load_audio(path)
    assert "fake.m4a" in str(err.value) and "ffmpeg:" in str(err.value)


# --------------------------------------------------------------------------- check_finite


def test_check_finite():
    check_finite(np.zeros(4, np.float32), "clip")
    check_finite(np.arange(4), "ints")
    check_finite(torch.zeros(2, 3), "tensor")
    with pytest.raises(AudioInputError, match=r"audio\[2\] contains 1 NaN and 0 Inf"):
        check_finite(np.array([0.0, np.nan, 1.0]), "audio[2]")
    with pytest.raises(AudioInputError, match="my tensor contains 0 NaN and 2 Inf"):
        check_finite(torch.tensor([[0.0, float("inf")], [-float("inf"), 1.0]]), "my tensor")


# --------------------------------------------------------------------------- find_audio_files


def test_find_audio_files(tmp_path):
    root = tmp_path / "library"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    for rel in ["a.wav", "b/Song.FLAC", "b/deep/c.mp3", "b/notes.txt", ".secret.wav",
                ".hidden_dir/x.wav", "b/cover.png", "z.M4a"]:
        (root / rel).write_bytes(b"x")
    (root / "b" / "link_to_a.wav").symlink_to(root / "a.wav")  # the same real file again
    (root / "b" / "deep" / "loop").symlink_to(root / "b", target_is_directory=True)  # a cycle
    (root / "dangling.ogg").symlink_to(root / "missing.ogg")
    found = find_audio_files(root)
    assert found == [root / "a.wav", root / "b/Song.FLAC", root / "b/deep/c.mp3", root / "z.M4a"]
    assert find_audio_files(root, extensions=["WAV", ".mp3"]) == [root / "a.wav", root / "b/deep/c.mp3"]
    assert find_audio_files(root / "b" / "notes.txt") == [root / "b" / "notes.txt"]  # a file is taken as given
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        find_audio_files(root / "nothing-here")


def test_audio_extensions():
    wanted = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".mp2", ".m4a", ".aac", ".wma", ".webm", ".mka"}
    assert wanted <= AUDIO_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in AUDIO_EXTENSIONS)


def test_mpeg_layer_2(tmp_path):
    """Broadcast archives keep MPEG-1/2 layer II (.mp2): found in folders and decoded (libsndfile's
    mpg123), the encoder's 481-sample delay aside, like the source."""
    src = DATA / "soundtrack_cut.mp2"  # the first 2 s of soundtrack_cut.flac, 32 kb/s (ffmpeg's mp2)
    (tmp_path / "a").mkdir()
    shutil.copy(src, tmp_path / "a" / "x.mp2")
    assert find_audio_files(tmp_path) == [tmp_path / "a" / "x.mp2"]
    x, sr = load_audio(src)
    ref, _ = load_audio(DATA / "soundtrack_cut.flac", duration=2.0)
    assert sr == 16000 and abs(len(x) - len(ref)) <= 1152  # whole frames of 1152 samples
    lag = max(range(0, 1200), key=lambda k: float(np.dot(x[k : k + 30000], ref[:30000])))
    assert np.corrcoef(x[lag : lag + 30000], ref[:30000])[0, 1] > 0.98


# --------------------------------------------------------------------------- property


@settings(max_examples=25, deadline=None)
@given(
    frames=st.integers(1, 3000),
    channels=st.integers(1, 3),
    rate=st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
    subtype=st.sampled_from(["PCM_16", "PCM_U8", "FLOAT"]),
    mono=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_wav_loads_at_16k(tmp_path_factory, frames, channels, rate, subtype, mono, seed):
    data = np.random.default_rng(seed).uniform(-1, 1, (frames, channels))
    path = tmp_path_factory.mktemp("prop") / "x.wav"
    sf.write(path, data, rate, subtype=subtype)
    x, sr = load_audio(path, sr=16000, mono=mono)
    assert sr == 16000 and x.dtype == np.float32 and np.isfinite(x).all()
    assert x.ndim == (1 if mono else 2) and (mono or x.shape[0] == channels)
    assert abs(x.shape[-1] - frames * 16000 / rate) <= 1


@pytest.fixture()
def vbr_without_length(tmp_path: Path) -> Path:
    """A VBR MP3 whose Xing header is blanked (as some cutters and streams leave them): loud noise
    first, then silence, so libsndfile's estimate from the first frame's bitrate is far too short."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-0.9, 0.9, 16000), np.zeros(9 * 16000)]).astype(np.float32)
    path = tmp_path / "vbr.mp3"
    sf.write(path, x, 16000, format="MP3", bitrate_mode="VARIABLE", compression_level=0.5)
    data = path.read_bytes()
    assert b"Xing" in data[:2000]
    path.write_bytes(data.replace(b"Xing", bytes(4), 1))
    assert sf.info(path).frames < 5 * 16000  # what libsndfile would stop at
    return path


def test_mpeg_frames_are_counted_without_decoding(vbr_without_length, encoded):
    from musicssl.audio.mpeg import mpeg_samples

    held = mpeg_samples(vbr_without_length)
    assert 10 * 16000 <= held <= 10 * 16000 + 2 * 1152  # whole frames of 576 samples at 16 kHz
    assert mpeg_samples(encoded["mp3"]) is None  # a length header: libsndfile's count is exact
    assert audio_info(vbr_without_length).frames == held


@needs_ffmpeg
def test_vbr_mp3_without_a_length_header_decodes_whole(vbr_without_length, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    x, _ = load_audio(vbr_without_length)
    assert len(x) >= 10 * 16000 and np.abs(x[:16000]).mean() > 0.1
    part, _ = load_audio(vbr_without_length, offset=8.0, duration=1.0)  # past libsndfile's estimate
    assert len(part) == 16000


def test_vbr_mp3_without_a_length_header_and_no_fallback_warns(vbr_without_length, no_fallback, caplog):
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        x, _ = load_audio(vbr_without_length)
    assert 0 < len(x) < 5 * 16000
    assert "vbr.mp3" in caplog.text and "without a length (Xing/Info) header" in caplog.text
    assert "Install ffmpeg" in caplog.text
    with pytest.raises(AudioDecodeError, match="offset 8.000 s.*Install ffmpeg"):
        load_audio(vbr_without_length, offset=8.0)


# --------------------------------------------------------------------------- unusual but valid files


def test_codecs_libsndfile_cannot_seek_in_decode_and_read_spans(tmp_path, clip):
    """GSM 6.10 (and G.72x): libsndfile refuses seek() and even tell() on them; they still decode."""
    path = tmp_path / "gsm.wav"
    sf.write(path, soxr.resample(clip, 16000, 8000), 8000, subtype="GSM610")
    assert not sf.SoundFile(path).seekable()
    whole, sr = load_audio(path)
    assert sr == 8000 and len(whole) == audio_info(path).frames >= 3 * 8000 - 320
    assert np.corrcoef(whole[:8000], soxr.resample(clip, 16000, 8000)[:8000])[0, 1] > 0.9
    part, _ = load_audio(path, offset=1.0, duration=0.5)
    np.testing.assert_array_equal(part, whole[8000:12000])


def _unfinished_wav(path: Path, clip: np.ndarray, fmt: str = "WAV") -> None:
    """A WAV as a recorder leaves it when it dies before patching its header: sizes of 0."""
    sf.write(path, clip, 16000, format=fmt, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[4:8] = (36).to_bytes(4, "little")
    data[at + 4 : at + 8] = bytes(4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["WAV", "WAVEX"])  # WAVEX: WAVE_FORMAT_EXTENSIBLE
def test_a_wav_whose_header_was_never_finished_is_read_to_its_end(fmt, tmp_path, clip, caplog, no_fallback):
    path = tmp_path / "unfinished.wav"
    _unfinished_wav(path, clip, fmt)
    assert sf.info(path).frames == 0  # what libsndfile makes of it
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        x, _ = load_audio(path)
    np.testing.assert_allclose(x, clip, atol=1 / 32768)
    assert "declares no audio data, but 48000 frames follow it" in caplog.text
    assert audio_info(path).frames == len(clip)
    part, _ = load_audio(path, offset=1.0, duration=0.5)
    np.testing.assert_array_equal(part, x[16000:24000])
    # A WAV that really is empty, with a LIST chunk after its empty data chunk, stays empty, whether
    # or not its writer padded the chunk to an even size.
    empty = tmp_path / "empty.wav"
    for info in (b"INFOISFT\x06\x00\x00\x00Lavf\x00\x00", b"INFOISFT\x05\x00\x00\x00Lavf\x00"):
        sf.write(empty, np.zeros(0, np.float32), 16000, subtype="PCM_16")
        empty.write_bytes(empty.read_bytes() + b"LIST" + len(info).to_bytes(4, "little") + info)
        with pytest.raises(AudioDecodeError, match="contains no audio samples"):
            load_audio(empty)


def test_an_mp3_behind_several_id3_tags_is_counted_whole(vbr_without_length, tmp_path):
    """Retagged libraries carry ID3v2 tags in a row; the frames after all of them are counted."""
    from musicssl.audio.mpeg import _head, mpeg_samples

    def id3(size: int) -> bytes:  # an ID3v2.3 tag of `size` bytes of padding (sizes are 7 bits per byte)
        return b"ID3\x03\x00\x00" + bytes(((size >> s) & 0x7F) for s in (21, 14, 7, 0)) + bytes(size)

    tagged = tmp_path / "tagged.mp3"
    tagged.write_bytes(id3(200_000) + id3(100_000) + vbr_without_length.read_bytes())
    assert _head(tagged)[0] == 200_010 + 100_010  # the audio starts after both tags (10-byte headers)
    assert mpeg_samples(tagged) == mpeg_samples(vbr_without_length) >= 10 * 16000
    assert audio_info(tagged).frames == audio_info(vbr_without_length).frames


def _two_parts(tmp_path: Path, ext: str, **kwargs: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """Two 3 s files (noise, then a quieter sine) joined byte for byte, as `cat a b > ab` does; the
    joined path and both parts' samples at 16 kHz."""
    rng = np.random.default_rng(1)
    a = rng.uniform(-0.5, 0.5, 3 * 16000).astype(np.float32)
    b = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * 16000) / 16000)).astype(np.float32)
    for name, x in (("a", a), ("b", b)):
        sf.write(tmp_path / f"{name}.{ext}", x, 16000, **kwargs)
    joined = tmp_path / f"ab.{ext}"
    joined.write_bytes((tmp_path / f"a.{ext}").read_bytes() + (tmp_path / f"b.{ext}").read_bytes())
    assert len(sf.read(joined)[0]) <= 3 * 16000 + 1152  # libsndfile alone stops after the first
    return joined, a, b


def _sine_share(x: np.ndarray) -> float:
    """The share of the energy of 16 kHz audio within 10 Hz of _two_parts' 440 Hz sine."""
    power = np.abs(np.fft.rfft(x)) ** 2
    hz = np.fft.rfftfreq(len(x), 1 / 16000)
    return float(power[np.abs(hz - 440) <= 10].sum() / power.sum())


CHAINED = [("ogg", {"format": "OGG", "subtype": "VORBIS"}), ("opus", {"format": "OGG", "subtype": "OPUS"})]


def test_chained_and_multiplexed_ogg_are_told_apart(tmp_path, encoded):
    from musicssl.audio.ogg import ogg_chained

    joined, _, _ = _two_parts(tmp_path, "ogg", format="OGG", subtype="VORBIS")
    assert ogg_chained(joined) and not ogg_chained(tmp_path / "a.ogg") and not ogg_chained(encoded["opus"])
    twice = tmp_path / "aa.ogg"  # one file twice: both streams have the same serial number
    twice.write_bytes((tmp_path / "a.ogg").read_bytes() * 2)
    assert ogg_chained(twice)
    if HAVE_FFMPEG:  # two streams opened together (a multiplexed file) are not a chain
        mux = tmp_path / "mux.ogg"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", tmp_path / "a.ogg", "-i", tmp_path / "b.ogg",
                        "-map", "0", "-map", "1", "-c", "copy", mux], check=True)
        assert not ogg_chained(mux)


@needs_ffmpeg
@pytest.mark.parametrize(("ext", "kwargs"), CHAINED)
def test_a_chained_ogg_decodes_every_stream(tmp_path, monkeypatch, ext, kwargs):
    """libsndfile stops at the end of the first stream; ffmpeg reads the chain to its end."""
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    joined, a, b = _two_parts(tmp_path, ext, **kwargs)
    x, _ = load_audio(joined, sr=16000)  # ffmpeg decodes Opus at 48 kHz, libsndfile at the input's rate
    assert 6 * 16000 <= len(x) <= 6 * 16000 + 600  # codec priming may add a few hundred samples
    assert _sine_share(x[16000 : 2 * 16000]) < 0.1 and _sine_share(x[-2 * 16000 :]) > 0.9  # noise, then the sine
    assert abs(audio_info(joined).duration - len(x) / 16000) < 0.05
    part, _ = load_audio(joined, sr=16000, offset=4.0, duration=1.0)  # inside the second stream
    assert len(part) == 16000 and _sine_share(part) > 0.9


@pytest.mark.parametrize(("ext", "kwargs"), CHAINED)
def test_a_chained_ogg_without_ffmpeg_gives_the_first_stream_and_says_so(tmp_path, no_fallback, caplog, ext, kwargs):
    joined, a, _ = _two_parts(tmp_path, ext, **kwargs)
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        x, _ = load_audio(joined)
    assert abs(len(x) - len(a)) <= 600
    assert f"ab.{ext} chains several Ogg streams" in caplog.text and "install ffmpeg" in caplog.text


def test_joined_mp3s_are_counted_whole(tmp_path):
    """The first part's length tag covers only itself: the frames of both are counted."""
    from musicssl.audio.mpeg import mpeg_samples

    joined, _, _ = _two_parts(tmp_path, "mp3", format="MP3")
    assert mpeg_samples(tmp_path / "a.mp3") is None  # one file: its tag covers it
    trailing = tmp_path / "tags.mp3"  # ... and trailing APEv2 and ID3v1 tags are not a next part
    trailing.write_bytes((tmp_path / "a.mp3").read_bytes() + b"APETAGEX" + bytes(2000) + b"TAG" + bytes(125))
    assert mpeg_samples(trailing) is None
    held = mpeg_samples(joined)
    assert 6 * 16000 <= held <= 6 * 16000 + 8 * 576
    assert audio_info(joined).frames == held


@needs_ffmpeg
def test_joined_mp3s_decode_whole(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    joined, _, _ = _two_parts(tmp_path, "mp3", format="MP3")
    x, _ = load_audio(joined)
    assert 6 * 16000 <= len(x) <= 6 * 16000 + 8 * 576
    assert _sine_share(x[16000 : 2 * 16000]) < 0.1 and _sine_share(x[-2 * 16000 :]) > 0.9


def test_joined_mp3s_without_ffmpeg_give_the_first_part_and_say_so(tmp_path, no_fallback, caplog):
    joined, a, _ = _two_parts(tmp_path, "mp3", format="MP3")
    with caplog.at_level(logging.WARNING, logger="musicssl.audio.io"):
        x, _ = load_audio(joined)
    assert abs(len(x) - len(a)) <= 2 * 1152
    assert "ab.mp3" in caplog.text and "covers only the first of MP3 files joined end to end" in caplog.text


@needs_ffmpeg
def test_an_offset_past_the_end_of_a_vbr_mp3_says_so(vbr_without_length, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    with pytest.raises(OffsetPastEndError, match="offset 10.500 s: that is at or past its end"):
        load_audio(vbr_without_length, offset=10.5)


@needs_ffmpeg
def test_a_rate_no_audio_has_is_named_by_info_through_ffmpeg_too(tmp_path, monkeypatch):
    path = tmp_path / "low.mka"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=sample_rate=500:duration=2",
                    "-c:a", "pcm_s16le", os.fspath(path)], check=True)
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    which = shutil.which
    monkeypatch.setattr(aio.shutil, "which", lambda name, *a, **k: None if name == "ffprobe" else which(name))
    with pytest.raises(AudioDecodeError, match="low.mka': its header gives a sample rate of 500 Hz"):
        audio_info(path)


def test_rates_no_audio_has_are_refused(tmp_path):
    with pytest.raises(AudioInputError, match="48000 rather than 48"):
        load_audio(CLIP, sr=48)
    path = tmp_path / "one-hertz.wav"
    write_wav_bytes(path, np.zeros(60, np.int16), 2, sr=1)  # a damaged header; 16000x the frames at 16 kHz
    with pytest.raises(AudioDecodeError, match="one-hertz.wav': its header gives a sample rate of 1 Hz"):
        load_audio(path, sr=16000)


@needs_ffmpeg
def test_a_video_without_sound_says_it_holds_no_audio(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    path = tmp_path / "silent film.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=duration=1:size=32x32:rate=5",
                    "-c:v", "mpeg4", os.fspath(path)], check=True)
    with pytest.raises(AudioDecodeError, match=r"silent film.mp4'.*\(ffmpeg: it holds no audio stream\)"):
        load_audio(path)


@pytest.mark.parametrize("path, says", [(b"/music/a.wav", "not a bytes; write encoded audio bytes to a file"),
                                        (None, "not a NoneType")])
def test_what_is_no_path_is_named(path, says):
    with pytest.raises(AudioInputError, match=says):
        load_audio(path)


def _joined(tmp_path: Path, ext: str, rates: tuple[int, int], **kwargs: str) -> Path:
    """3 s of noise at rates[0] then 4 s of a sine at rates[1], joined byte for byte."""
    parts = [np.random.default_rng(2).uniform(-0.5, 0.5, 3 * rates[0]),
             0.3 * np.sin(2 * np.pi * 440 * np.arange(4 * rates[1]) / rates[1])]
    for i, (x, sr) in enumerate(zip(parts, rates)):
        sf.write(tmp_path / f"p{i}.{ext}", x.astype(np.float32), sr, **kwargs)
    joined = tmp_path / f"joined.{ext}"
    joined.write_bytes((tmp_path / f"p0.{ext}").read_bytes() + (tmp_path / f"p1.{ext}").read_bytes())
    return joined


@needs_ffmpeg
@pytest.mark.parametrize(("ext", "kwargs"), [("ogg", {"format": "OGG", "subtype": "VORBIS"}), ("mp3", {"format": "MP3"})])
def test_a_span_of_a_chain_whose_rate_changes_is_that_slice_of_the_whole(tmp_path, monkeypatch, ext, kwargs):
    """ffmpeg's own -ss/-t landed 78 ms off (and 8 % short) in a chain from 44.1 to 48 kHz, and a
    frame off in joined MP3s: spans are now cut from the decoded stream by sample counts."""
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    joined = _joined(tmp_path, ext, (44100, 48000), **kwargs)
    whole, _ = load_audio(joined, sr=16000)
    assert 6.9 * 16000 < len(whole) < 7.2 * 16000
    for offset, duration in ((4.0, 1.5), (2.0, 2.0)):  # inside the second part, and across the join
        part, _ = load_audio(joined, sr=16000, offset=offset, duration=duration)
        start = round(offset * 16000)
        assert len(part) == round(duration * 16000)
        assert np.corrcoef(part[1000:-1000], whole[start + 1000 : start + len(part) - 1000])[0, 1] > 0.999
    assert abs(audio_info(joined).duration - len(whole) / 16000) < 0.15  # frames counted at each part's rate


@needs_ffmpeg
def test_untagged_mp3s_joined_mono_then_stereo_decode_whole(tmp_path, monkeypatch):
    """libsndfile stops where the channel count changes, well short of its own estimate (3 of 7 s),
    without a word; the frames are counted there too, and the rest decoded by ffmpeg."""
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    parts = []
    for name, channels, seconds in (("mono", 1, 3), ("stereo", 2, 4)):
        parts.append(tmp_path / f"{name}.mp3")
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
                        "-ac", str(channels), "-ar", "44100", "-b:a", "128k", "-write_xing", "0", parts[-1]], check=True)
    joined = tmp_path / "joined.mp3"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    x, _ = load_audio(joined, sr=16000)
    assert 6.9 * 16000 < len(x) < 7.2 * 16000
