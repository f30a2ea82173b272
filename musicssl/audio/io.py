"""Decode audio files, resample, mix to mono and find audio files.

soundfile (libsndfile) decodes wav, flac, ogg/vorbis, opus, mp3, aiff and friends. Containers that
libsndfile cannot read (m4a, aac, wma, webm, ...) go to an optional fallback: ``torchcodec`` when it
imports, else an ``ffmpeg`` binary on the PATH. Neither is required; without them such files raise
an :class:`~musicssl.errors.AudioDecodeError` that says what to install.

Layouts: a decoded file is float32 in [-1, 1] (integer PCM is scaled), shaped (S,) when mixed to mono
and (C, S) otherwise; S counts samples per channel, C channels. Rates are in Hz, times in seconds.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
import soxr

from musicssl.audio.mpeg import has_length_tag, mpeg_samples
from musicssl.audio.ogg import ogg_chained, ogg_cut_short
from musicssl.audio.sink import MAX_RATE, MIN_RATE, FrameSink, ImplausibleRate, mix_down
from musicssl.audio.wav import open_unsized
from musicssl.errors import AudioDecodeError, AudioInputError, OffsetPastEndError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
T = TypeVar("T")

AUDIO_EXTENSIONS: frozenset[str] = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".mp2", ".aiff", ".aif", ".aifc", ".au",
    ".caf", ".w64", ".m4a", ".m4b", ".aac", ".wma", ".webm", ".mka", ".mp4",
})

# libsndfile never reads these containers: skip the doomed soundfile attempt.
_FALLBACK_ONLY = frozenset({".m4a", ".m4b", ".aac", ".wma", ".webm", ".mka", ".mp4"})

_INSTALL_HINT = (
    "install torchcodec (`pip install torchcodec`) or an ffmpeg binary "
    "(`apt-get install ffmpeg`, `conda install -c conda-forge ffmpeg` or `brew install ffmpeg`)"
)

# Frames per soundfile read, and per re-read after an error (finer, to keep more good frames).
_READ_BLOCK = 1 << 18
_SALVAGE_BLOCK = 1 << 12

# libsndfile's names for RIFF WAVE files (WAVEX: WAVE_FORMAT_EXTENSIBLE, as 24-bit and multichannel
# recorders write them).
_WAV_FORMATS = ("WAV", "WAVEX")

# WAV data sizes that streaming writers use for "length unknown", not a truncation.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF)

_SNDFILE_ERRORS = (sf.SoundFileError, RuntimeError, OSError)
_SNDFILE_NOT_A_FILE = "File does not exist or is not a regular file"
# libsndfile's frame count for a stream whose header leaves the length open (SF_COUNT_MAX).
_UNKNOWN_FRAMES = 1 << 62
_OGG_SUFFIXES = (".ogg", ".oga", ".opus")
# Frames an MP3 may decode short of its length tag without being cut: two frames (encoder padding).
_MPEG_SLACK = 2 * 1152


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, read from its header (no decoding where the backend allows).

    ``frames`` counts samples per channel; for files read by a fallback decoder it may be an
    estimate from the header (an MP3 without a length header is counted from its frame headers).
    ``backend`` is "soundfile", "torchcodec", "ffprobe" or "ffmpeg".
    """

    sample_rate: int
    frames: int
    channels: int
    duration: float
    backend: str


class _BackendFailed(Exception):
    """A fallback backend could not decode a file; never escapes this module."""


# --------------------------------------------------------------------------- public API


def audio_info(path: PathLike) -> AudioInfo:
    """Sample rate (Hz), frames, channels and duration (s) of an audio file."""
    p = _check_path(path)
    ffmpeg = shutil.which("ffmpeg") if _chained_ogg(p) else None
    if ffmpeg is not None:  # ffmpeg decodes every stream in the chain (as load_audio): count them
        return _run_fallbacks(p, None, [("ffmpeg", lambda: _info_ffmpeg(ffmpeg, p))])
    sndfile_err: Exception | None = None
    if p.suffix.lower() not in _FALLBACK_ONLY:
        try:
            info = sf.info(_sf_path(p))
            if info.format in _WAV_FORMATS and info.frames == 0:  # perhaps an unfinished header
                with _open_soundfile(p) as f:
                    return _make_info(f.samplerate, f.frames, f.channels, "soundfile")
        except _SNDFILE_ERRORS as err:
            sndfile_err = err
        else:
            return _make_info(info.samplerate, _true_frames(p, info), info.channels, "soundfile")
    attempts: list[tuple[str, Callable[[], AudioInfo]]] = []
    decoder_cls = _torchcodec_decoder()
    if decoder_cls is not None:
        attempts.append(("torchcodec", lambda: _info_torchcodec(decoder_cls, p)))
    ffprobe, ffmpeg = shutil.which("ffprobe"), shutil.which("ffmpeg")
    if ffprobe is not None:
        attempts.append(("ffprobe", lambda: _info_ffprobe(ffprobe, p)))
    if ffmpeg is not None:
        # Without ffprobe the only way to count frames is to decode them all.
        attempts.append(("ffmpeg", lambda: _info_ffmpeg(ffmpeg, p)))
    try:
        return _run_fallbacks(p, sndfile_err, attempts)
    except ImplausibleRate as err:
        raise _implausible(p, err) from None


def load_audio(
    path: PathLike,
    sr: int | None = None,
    *,
    mono: bool = True,
    offset: float = 0.0,
    duration: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode an audio file to float32 samples in [-1, 1] and its sample rate.

    Returns ``(samples, rate)``: samples (S,) when ``mono`` (channels averaged) else (C, S); rate is
    ``sr`` when given (resampled with soxr) else the file's. ``offset`` and ``duration`` (s) select
    a span: only those frames are read. A span running past the end stops at the end; an offset at
    or past the end raises. A truncated file yields the samples before the damage, with a logged
    warning naming the file; if none decode, it raises.
    """
    if sr is not None:
        sr = check_rate(sr, "sr")
    _check_span(offset, duration)
    p = _check_path(path)
    # Blocks are mixed (before resampling: both are linear, and one channel is cheaper to resample
    # than C) and resampled as they are decoded, so a long file is never held whole at its own rate.
    try:
        sink, file_sr, backend = _decode(p, offset, duration, FrameSink(mono, sr))
    except ImplausibleRate as err:
        raise _implausible(p, err) from None
    if sink.bad:
        raise AudioDecodeError(
            f"Cannot use audio file '{p}': {sink.bad} decoded samples are NaN or Inf (backend: "
            f"{backend}). The file holds invalid floating-point data: re-export it from its source, "
            f"or re-encode it with `ffmpeg -i '{p}' out.flac`."
        )
    x = sink.result()
    check_level(x, f"audio file '{p}'", AudioDecodeError, f"normalise it, e.g. `sox '{p}' out.flac norm`",
                "a float file written without scaling?")
    return (x if mono else np.ascontiguousarray(x.T)), sr if sr is not None else file_sr


def resample(x: np.ndarray, sr_in: int, sr_out: int, *, quality: str = "HQ") -> np.ndarray:
    """Resample (S,) or (C, S) audio from ``sr_in`` to ``sr_out`` Hz with soxr; float32 out.

    Output length is about S * sr_out / sr_in. Equal rates return the input as float32.
    """
    sr_in, sr_out = check_rate(sr_in, "sr_in"), check_rate(sr_out, "sr_out")
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise AudioInputError(f"resample expects audio shaped (S,) or (C, S), got shape {x.shape}.")
    if sr_in == sr_out:
        return np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        y = _soxr(x, sr_in, sr_out, quality)
    else:  # soxr wants frames first: (S, C).
        y = np.ascontiguousarray(_soxr(x.T, sr_in, sr_out, quality).T)
    if y.shape[-1] == 0 and x.shape[-1] > 0:
        # Shorter than one output sample: keep its mean rather than lose the audio altogether.
        y = np.asarray(x, dtype=np.float32).mean(axis=-1, keepdims=True)
    return y


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average (C, S) audio over channels to (S,); (S,) comes back unchanged."""
    x = np.asarray(x)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise AudioInputError(f"to_mono expects audio shaped (S,) or (C, S), got shape {x.shape}.")
    return mix_down(x.T)


# Float samples beyond MAX_PEAK are refused: a model's float32 arithmetic (a power spectrum) overflows
# on them and gives NaN embeddings. Beyond LOUD_PEAK they are warned of: far outside [-1, 1].
MAX_PEAK, LOUD_PEAK = 1e10, 16.0


def check_level(x: np.ndarray, what: str, error: type[Exception], fix: str, guess: str) -> None:
    """Raise `error` naming `what` and `fix` if float samples `x` exceed MAX_PEAK; warn (with
    `guess`, what it may be) past LOUD_PEAK. NaN and Inf are left to check_finite."""
    if not x.size or x.dtype.kind != "f":
        return
    peak = max(float(x.max()), -float(x.min()))  # no |x| copy: a 60 min file's would double its memory
    if not np.isfinite(peak):
        return
    if peak > MAX_PEAK:
        raise error(f"{what} has samples up to {peak:.3g}: float audio is expected in [-1, 1], and levels this far "
                    f"beyond it overflow a model's float32 arithmetic (NaN embeddings); {fix}")
    if peak > LOUD_PEAK:
        log.warning("%s has samples up to %.6g, far outside [-1, 1]: %s; models trained on [-1, 1] audio embed it as "
                    "very loud", what, peak, guess)


def check_finite(x: Any, what: str) -> None:
    """Raise AudioInputError naming ``what`` if array or tensor ``x`` holds NaN or Inf."""
    if hasattr(x, "isfinite") and not isinstance(x, np.ndarray):
        # A torch tensor: test on its own device and copy to host only to describe a failure.
        if bool(x.isfinite().all()):
            return
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fc":
        return  # integers and booleans cannot hold NaN or Inf
    finite = np.isfinite(arr)
    if finite.all():
        return
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    n_inf = arr.size - int(np.count_nonzero(finite)) - n_nan
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise AudioInputError(
        f"{what} contains {n_nan} NaN and {n_inf} Inf values (first at index {first}); "
        f"audio must be finite: fix or drop it before embedding (e.g. np.nan_to_num)."
    )


def audio_suffixes(extensions: Iterable[str] | str) -> tuple[str, ...]:
    """Extensions as find_audio_files matches them: lower case with a dot, sorted ("flac" is one, not
    its letters)."""
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple(sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}))


def find_audio_files(root: PathLike, extensions: Iterable[str] = AUDIO_EXTENSIONS,
                     unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Audio files under ``root``, sorted; a file given as ``root`` comes back alone.

    Folders are searched recursively; extensions match case-insensitively (".wav" or "wav"); files
    and folders whose names start with "." are skipped; symlinks are followed, and a real file
    reached by several paths is listed once, under the first path in sorted order.
    unreadable: where given, gets (path, reason) for each folder that could not be searched and each
    audio file that could not be looked at (a link that leads nowhere); either way they are logged.
    """
    base = Path(root).expanduser()
    if base.is_file():
        return [base]
    if not base.is_dir():
        raise FileNotFoundError(f"Cannot search '{base}' for audio files: no such file or folder.")
    suffixes = audio_suffixes(extensions)
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()

    def skip(path: Any, what: str, err: OSError) -> None:
        log.warning("Skipping %s%s: %s", what, path, err.strerror)
        if unreadable is not None:
            unreadable.append((Path(path), err.strerror or str(err)))

    def on_error(err: OSError) -> None:
        skip(err.filename, "unreadable folder ", err)

    for dirpath, dirnames, filenames in os.walk(base, onerror=on_error, followlinks=True):
        st = os.stat(dirpath)
        # Symlinked folders can form cycles or repeat a tree: walk each real folder once.
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and name.lower().endswith(suffixes)
        )
    files: list[Path] = []
    seen_files: set[tuple[int, int]] = set()
    for path in sorted(found):
        try:
            st = path.stat()
        except OSError as err:  # e.g. a link that leads nowhere
            skip(path, "", err)
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen_files:
            continue
        seen_files.add((st.st_dev, st.st_ino))
        files.append(path)
    return files


# --------------------------------------------------------------------------- checks


def check_rate(sr: Any, name: str) -> int:
    """A positive integer rate in Hz (integral floats such as 16000.0 are accepted)."""
    ok = isinstance(sr, numbers.Integral) and not isinstance(sr, (bool, np.bool_))
    if isinstance(sr, (float, np.floating)) and float(sr).is_integer():  # np.float32(16000) too
        ok = True
    if not ok or sr <= 0:
        raise AudioInputError(f"{name} must be a positive integer sample rate in Hz, got {sr!r}.")
    if sr < MIN_RATE:
        raise AudioInputError(f"{name}={sr!r} Hz is not an audio sample rate (the lowest taken is {MIN_RATE} Hz): "
                              f"rates are in Hz, e.g. 48000 rather than 48.")
    if sr > MAX_RATE:
        raise AudioInputError(f"{name}={sr!r} Hz is not an audio sample rate (the highest taken is {MAX_RATE} Hz): "
                              f"rates are in Hz, e.g. 48000.")
    return int(sr)


def _check_span(offset: float, duration: float | None) -> None:
    if not (isinstance(offset, numbers.Real) and np.isfinite(offset) and offset >= 0):
        raise AudioInputError(f"offset must be a finite number of seconds >= 0, got {offset!r}.")
    if duration is not None and not (
        isinstance(duration, numbers.Real) and np.isfinite(duration) and duration > 0
    ):
        raise AudioInputError(
            f"duration must be a finite number of seconds > 0 (or None for the rest of the file), "
            f"got {duration!r}."
        )


def _check_path(path: PathLike) -> Path:
    """The path as a readable, non-empty regular file, or an AudioDecodeError saying why not."""
    if not isinstance(path, (str, os.PathLike)):
        raise AudioInputError(f"an audio file is named by a path (str or pathlib.Path), not a {type(path).__name__}"
                              + ("; write encoded audio bytes to a file first" if isinstance(path, bytes) else ""))
    if re.match(r"[a-z][a-z0-9+.-]*://", os.fsdecode(path), re.IGNORECASE):
        raise AudioDecodeError(f"Cannot read audio file '{os.fsdecode(path)}': a URL is not fetched; download "
                               "the file first and pass its path.")
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError as err:
        if p.is_symlink():
            raise AudioDecodeError(
                f"Cannot read audio file '{p}': it is a link to '{os.readlink(p)}', which does not exist. "
                f"Point the link at the file again, or remove it."
            ) from err
        raise AudioDecodeError(
            f"Cannot read audio file '{p}': no such file. Check the path (relative paths start "
            f"from {Path.cwd()})."
        ) from err
    except OSError as err:
        raise AudioDecodeError(
            f"Cannot read audio file '{p}': {err.strerror}. Check the path and its permissions."
        ) from err
    if stat.S_ISDIR(st.st_mode):
        raise AudioDecodeError(
            f"Cannot read audio file '{p}': it is a folder. Pass one file, or list the audio files "
            f"in it with musicssl.audio.io.find_audio_files('{p}')."
        )
    if not stat.S_ISREG(st.st_mode):
        raise AudioDecodeError(
            f"Cannot read audio file '{p}': it is not a regular file. Copy the audio to a file first."
        )
    if not os.access(p, os.R_OK):
        raise AudioDecodeError(
            f"Cannot read audio file '{p}': permission denied. Make it readable "
            f"(e.g. `chmod a+r '{p}'`) or run as a user who may read it."
        )
    if st.st_size == 0:
        raise AudioDecodeError(
            f"Cannot decode audio file '{p}': the file is empty (0 bytes), probably an interrupted "
            f"copy or download. Re-create or re-download it, or remove it from the input."
        )
    return p


def _implausible(p: Path, err: ImplausibleRate) -> AudioDecodeError:
    return AudioDecodeError(f"Cannot decode audio file '{p}': {err}. The header is damaged: re-export the file "
                            "from its source, or remove it from the input.")


def _no_samples(p: Path, backend: str) -> AudioDecodeError:
    return AudioDecodeError(
        f"Audio file '{p}' contains no audio samples (0 frames; backend: {backend}). "
        f"Re-export it from its source, or remove it from the input."
    )


def _offset_past_end(p: Path, offset: float, file_seconds: float | None) -> OffsetPastEndError:
    length = "" if file_seconds is None else f" (it lasts {file_seconds:.3f} s)"
    return OffsetPastEndError(
        f"Cannot read audio file '{p}' from offset {offset:.3f} s: that is at or past its end"
        f"{length}. Use a smaller offset."
    )


# --------------------------------------------------------------------------- decoding


def _decode(p: Path, offset: float, duration: float | None, sink: FrameSink) -> tuple[FrameSink, int, str]:
    """Decode the span of ``p`` into ``sink`` (or a fresh one like it, from a fallback decoder); the
    sink that holds it, the file's rate in Hz and the backend's name."""
    chained = _chained_ogg(p)
    ffmpeg = shutil.which("ffmpeg") if chained else None
    if ffmpeg is not None:
        return _decode_chained(ffmpeg, p, offset, duration, sink)
    sndfile_err: Exception | None = None
    if p.suffix.lower() not in _FALLBACK_ONLY:
        try:
            f = _open_soundfile(p)
        except _SNDFILE_ERRORS as err:
            sndfile_err = err
            log.debug("libsndfile cannot open %s (%s); trying fallbacks", p, _cause(err))
        else:
            with f:
                return _decode_soundfile(f, p, offset, duration, sink, chained)
    fresh = FrameSink(sink.mono, sink.sr)
    sr, backend = _run_fallbacks(p, sndfile_err, _fallback_decoders(p, offset, duration, fresh))
    return fresh, sr, backend


def _decode_soundfile(
    f: sf.SoundFile, p: Path, offset: float, duration: float | None, sink: FrameSink, chained: bool
) -> tuple[FrameSink, int, str]:
    """The span through libsndfile's handle `f`, or through a fallback decoder where libsndfile
    stops before the end of an MP3's frames; as _decode."""
    if f.format == "RAW":
        log.warning("%s: its WAV header declares no audio data, but %d frames follow it (a recording "
                    "whose header was never finished); reading them", p, f.frames)
    sink.start(f.samplerate, f.channels)
    # libsndfile cannot seek past its estimate of an MP3's length, whatever is there.
    beyond = f.format == "MP3" and round(offset * f.samplerate) >= f.frames
    if not beyond:
        _read_soundfile(f, p, offset, duration, sink)
    short = _mpeg_cut_short(f, p, offset, duration, sink.frames)
    if short is not None:
        return _decode_whole_mpeg(p, offset, duration, sink, f.samplerate, short)
    if beyond:
        raise _offset_past_end(p, offset, f.frames / f.samplerate)
    if chained:
        log.warning("%s chains several Ogg streams (tracks joined end to end) and libsndfile decodes only "
                    "the first; install ffmpeg to decode them all", p)
    return sink, f.samplerate, "soundfile"


def _decode_chained(
    ffmpeg: str, p: Path, offset: float, duration: float | None, sink: FrameSink
) -> tuple[FrameSink, int, str]:
    """A chained Ogg file's span through ffmpeg, which decodes every stream in the chain; as _decode.

    Not torchcodec: whether it reads past the first stream is untested here.
    """
    fresh = FrameSink(sink.mono, sink.sr)
    # ffmpeg seeks in a chain only within its first stream: decode from the start, cut the span here.
    attempt = ("ffmpeg", lambda: _decode_ffmpeg(ffmpeg, p, offset, duration, fresh, seek_input=False))
    sr, backend = _run_fallbacks(p, None, [attempt])
    if ogg_cut_short(p):
        _warn_ogg_cut(p)
    return fresh, sr, backend


def _chained_ogg(p: Path) -> bool:
    """Whether `p` is an Ogg file (by its name, or its first bytes) that chains several streams."""
    if p.suffix.lower() not in _OGG_SUFFIXES:
        try:
            with open(p, "rb") as fh:
                if fh.read(4) != b"OggS":
                    return False
        except OSError:
            return False
    return ogg_chained(p)


def _fallback_decoders(
    p: Path, offset: float, duration: float | None, sink: FrameSink, seek_input: bool = True
) -> list[tuple[str, Callable[[], tuple[int, str]]]]:
    """The decoders installed besides libsndfile, best first, as (name, decode the span into `sink`
    and give its rate and the decoder's name); `seek_input` as in _decode_ffmpeg."""
    attempts: list[tuple[str, Callable[[], tuple[int, str]]]] = []
    decoder_cls = _torchcodec_decoder()
    if decoder_cls is not None:
        attempts.append(
            ("torchcodec", lambda: _whole_into(sink, *_decode_torchcodec(decoder_cls, p, offset, duration)))
        )
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is not None:
        attempts.append(("ffmpeg", lambda: _decode_ffmpeg(ffmpeg, p, offset, duration, sink, seek_input=seek_input)))
    return attempts


def _whole_into(sink: FrameSink, frames: np.ndarray, sr: int, backend: str) -> tuple[int, str]:
    """A decoder's whole output (S, C) into `sink`, afresh."""
    sink.start(sr, frames.shape[1])
    sink.add(frames)
    return sr, backend


def _mpeg_cut_short(f: sf.SoundFile, p: Path, offset: float, duration: float | None, got: int) -> str | None:
    """Why libsndfile stopped short of the end of an MP3 (its length header is missing and its
    estimate too low, or parts joined with another channel count stop it), or None when it did not."""
    start, sr = round(offset * f.samplerate), f.samplerate
    reached = start + got
    if f.format != "MP3" or (duration is not None and got >= round(duration * sr)):
        return None
    if f.frames - _MPEG_SLACK <= reached < f.frames:  # it ended where its estimate said: the usual case
        return None
    held = mpeg_samples(p)  # at its estimate, or well short of it: count the frames
    if held is None or held <= reached + 1152:  # a frame's worth: the encoder's padding
        return None
    why = ("its length (Xing/Info) header covers only the first of MP3 files joined end to end" if has_length_tag(p)
           else "its frames go on past where libsndfile stops (a VBR MP3 without a length (Xing/Info) header, "
           "or MP3s joined end to end)")
    return f"libsndfile decodes {reached / sr:.1f} s of '{p}', whose frames hold {held / sr:.1f} s: {why}"


def _decode_whole_mpeg(
    p: Path, offset: float, duration: float | None, sink: FrameSink, sr: int, short: str
) -> tuple[FrameSink, int, str]:
    """The span through a fallback decoder, which reads to the real end; without one, what
    libsndfile gave (in `sink`), with a warning that says what is missing and how to get it."""
    fresh = FrameSink(sink.mono, sink.sr)
    attempts = _fallback_decoders(p, offset, duration, fresh, seek_input=False)  # its seeks land a frame off
    if attempts:
        try:
            return fresh, *_run_fallbacks(p, None, attempts)
        except OffsetPastEndError:  # the fallback read to the real end: the offset is past it
            raise
        except AudioDecodeError as err:
            log.debug("fallbacks failed on %s: %s", p, err)
    fix = f"Install ffmpeg (or torchcodec) to decode all of it, or re-encode it with `ffmpeg -i '{p}' out.flac`"
    if not sink.frames:
        raise AudioDecodeError(f"Cannot read from offset {offset:.3f} s: {short}. {fix}.")
    log.warning("%s; using that part. %s", short, fix)
    return sink, sr, "soundfile"


def _open_soundfile(p: Path) -> sf.SoundFile:
    """libsndfile's handle on `p`; for a WAV whose header declares no data but has samples after
    it, a RAW reader over them (musicssl.audio.wav)."""
    f = sf.SoundFile(_sf_path(p))
    if f.format not in _WAV_FORMATS or f.frames != 0:
        return f
    try:
        raw = open_unsized(p, f)
    except BaseException:
        f.close()
        raise
    if raw is None:  # really empty: the header's handle says so
        return f
    f.close()
    return raw


def _read_soundfile(f: sf.SoundFile, p: Path, offset: float, duration: float | None, sink: FrameSink) -> None:
    """Seek to ``offset`` and read the span into ``sink``, cut short where the file is damaged."""
    sr, known = f.samplerate, _length_is_known(f)
    total = f.frames
    if known and total <= 0:
        raise _no_samples(p, "soundfile")
    start = round(offset * sr)
    if known and start >= total:
        raise _offset_past_end(p, offset, total / sr)
    # A positive duration shorter than one sample still reads one sample.
    limit = None if duration is None else max(1, round(duration * sr))
    # Without a known length (the header's is a guess, or 2**63 - 1) read to the end, or to `limit`.
    want = (total - start if limit is None else min(limit, total - start)) if known else limit
    guess = want if want is not None else (total - start if total < _UNKNOWN_FRAMES else None)
    if guess is not None and guess > 0:
        sink.expect(guess)  # an MP3's guess may be short (no length tag): the rest still fits in
    got, err = _read_into(f, start, sink, want, _READ_BLOCK)
    if err is not None and got == 0 and not known and start > 0:
        raise _offset_past_end(p, offset, None) from err
    if err is not None:
        # libsndfile drops a whole request when a block inside it is damaged: re-read the rest
        # in small blocks from a fresh handle to keep every frame before the damage.
        try:
            with _open_soundfile(p) as again:
                more, err = _read_into(again, start + got, sink, None if want is None else want - got, _SALVAGE_BLOCK)
                got += more
        except _SNDFILE_ERRORS as reopen_err:
            err = reopen_err
    if err is not None:
        if got == 0:
            raise AudioDecodeError(
                f"Cannot decode audio file '{p}' (backend: soundfile): {_cause(err)}. The file is "
                f"probably truncated or damaged: re-create or re-download it, or re-encode what "
                f"is left with `ffmpeg -i '{p}' out.flac`."
            ) from err
        of = f" of {want}" if want is not None else ""
        log.warning(
            "%s: decoding stopped after %d%s frames (%s); the file is probably truncated or "
            "damaged, using the frames before the damage", p, got, of, _cause(err),
        )
    elif known and got < want:
        log.warning(
            "%s: the header promises %d frames but only %d decode; the file is probably "
            "truncated, using the frames present", p, want, got,
        )
    elif limit is None or got < limit:  # read to the end: did the file end where its stream does?
        _warn_if_cut_short(f, p, start + got)
    if got == 0:
        raise _no_samples(p, "soundfile")


def _read_into(
    f: sf.SoundFile, frame: int, sink: FrameSink, limit: int | None, block: int
) -> tuple[int, Exception | None]:
    """Read from ``frame`` on into ``sink``, `block` frames at a time, up to `limit` frames (None: to
    the end); the frames read, and the error that stopped it."""
    buf = np.empty((block if limit is None else max(1, min(block, limit)), f.channels), dtype=np.float32)
    got = 0
    try:
        if frame and f.seekable():  # every caller hands a fresh handle, at frame 0
            f.seek(frame)
        elif frame:  # codecs libsndfile cannot seek in (GSM 6.10, G.72x): read up to the frame
            _discard(f, frame)
        while limit is None or got < limit:
            n = _readf(f, buf if limit is None else buf[: limit - got])
            if n == 0:
                break
            sink.add(buf[:n])
            got += n
    except _SNDFILE_ERRORS as err:
        return got, err
    return got, None


def _discard(f: sf.SoundFile, frames: int) -> None:
    """Read and drop the next `frames` frames (or up to the end)."""
    buf = np.empty((max(1, min(frames, _READ_BLOCK)), f.channels), dtype=np.float32)
    while frames > 0:
        n = _readf(f, buf[: min(frames, len(buf))])
        if n == 0:
            return
        frames -= n


def _readf(f: sf.SoundFile, out: np.ndarray) -> int:
    """libsndfile's sf_readf_float into `out` (n, C) float32: the frames read, 0 at the end.

    soundfile's own read clips every request to the header's length, which for MP3 is an estimate
    (a VBR file without a Xing header read as a third of its length), and seeks after every read,
    which fails at the end of a stream whose length is open. Its C binding reads past both.
    """
    readf = getattr(getattr(sf, "_snd", None), "sf_readf_float", None)
    if readf is None:  # a soundfile that no longer exposes its binding: its own read, clipped
        return len(f.read(out=out))
    n = readf(f._file, sf._ffi.cast("float *", out.ctypes.data), len(out))
    if f._errorcode:
        raise sf.LibsndfileError(f._errorcode, prefix="Error reading: ")
    return int(n)


def _true_frames(p: Path, info: Any) -> int:
    """The frame count of `sf.info`, where it is an estimate (an MP3 without a length header) or
    open (a piped FLAC) counted from the frame headers or by decoding."""
    if info.frames >= _UNKNOWN_FRAMES:
        return _count_frames(p)
    held = mpeg_samples(p) if info.format == "MP3" else None
    return info.frames if held is None else held


def _count_frames(p: Path) -> int:
    """Frames of a file whose header leaves its length open, by decoding it (block by block)."""
    with sf.SoundFile(_sf_path(p)) as f:
        block, n, total = np.empty((_READ_BLOCK, f.channels), dtype=np.float32), 1, 0
        while n:
            n = _readf(f, block)
            total += n
    return total


def _length_is_known(f: sf.SoundFile) -> bool:
    """Whether libsndfile's frame count is the file's length: for MP3 it is estimated from the file
    size and the first frame's bitrate unless a Xing/Info header gives it, and a stream written to
    a pipe (a FLAC without its total) reports 2**63 - 1."""
    return f.format != "MP3" and f.frames < _UNKNOWN_FRAMES


def _warn_if_cut_short(f: sf.SoundFile, p: Path, end: int) -> None:
    """Warn when a file read to its end (frame `end`) holds less than it should: a WAV whose
    header claims more, an MP3 whose length tag does, an Ogg stream without its last page."""
    if f.format in _WAV_FORMATS and end == f.frames:
        _warn_if_wav_truncated(f, p)
    elif f.format == "MP3" and end + _MPEG_SLACK < f.frames and has_length_tag(p):
        log.warning("%s: its length tag promises %d frames but only %d decode; the file is probably "
                    "truncated, using the frames present", p, f.frames, end)
    elif f.format == "OGG" and ogg_cut_short(p):
        _warn_ogg_cut(p)


def _warn_ogg_cut(p: Path) -> None:
    log.warning("%s: the Ogg stream stops without its last page; the file is probably truncated, "
                "using the frames present", p)



def _warn_if_wav_truncated(f: sf.SoundFile, p: Path) -> None:
    """Warn when a WAV header claims more data than the file holds.

    libsndfile silently shortens such files to the data present; its log (``extra_info``) keeps
    the claim as "data : <claimed> (should be <present>)".
    """
    match = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", f.extra_info, re.MULTILINE)
    if match is None:
        return
    claimed, present = int(match[1]), int(match[2])
    if claimed > present and claimed not in _UNKNOWN_WAV_SIZES:
        log.warning(
            "%s: the WAV header declares %d bytes of audio but the file holds %d; the file is "
            "probably truncated, using the frames present", p, claimed, present,
        )


def _sf_path(p: Path) -> str | bytes:
    """The path for soundfile: as bytes on POSIX, where it would encode a str as strict UTF-8 and
    fail on names that are not (Latin-1 files on old shares); Windows wants str."""
    return os.fspath(p) if os.name == "nt" else os.fsencode(p)


def _cause(err: BaseException) -> str:
    """The backend's own words, without the file path soundfile prepends."""
    text = getattr(err, "error_string", None) or str(err) or type(err).__name__
    if text.startswith(_SNDFILE_NOT_A_FILE):
        # libsndfile says so of regular files it cannot parse too (text named .mp3); paths are checked first.
        return "it does not recognise the data as audio in this format"
    return text.strip().rstrip(".")


def _run_fallbacks(
    p: Path, sndfile_err: Exception | None, attempts: list[tuple[str, Callable[[], T]]]
) -> T:
    """Try fallback backends in order; raise one error that names the file and every cause."""
    causes = [f"libsndfile: {_cause(sndfile_err)}"] if sndfile_err is not None else []
    last: Exception | None = sndfile_err
    for name, attempt in attempts:
        try:
            result = attempt()
        except _BackendFailed as err:
            causes.append(f"{name}: {err}")
            last = err
            log.debug("%s cannot decode %s: %s", name, p, err)
        else:
            log.debug("decoded %s with %s", p, name)
            return result
    if not attempts:
        said = (
            f"libsndfile could not read it ({causes[0].split(': ', 1)[1]})"
            if causes
            else f"libsndfile cannot read '{p.suffix}' files"
        )
        raise AudioDecodeError(
            f"Cannot decode audio file '{p}': {said}, and no fallback decoder is available. "
            f"If it is audio in a format libsndfile lacks, {_INSTALL_HINT}, or convert it to FLAC "
            f"with `ffmpeg -i '{p}' out.flac`. If it is damaged or not audio, re-create it or "
            f"remove it from the input."
        ) from last
    raise AudioDecodeError(
        f"Cannot decode audio file '{p}': every decoder failed ({'; '.join(causes)}). The file is "
        f"probably damaged or not audio: check it with `ffprobe '{p}'`, re-encode it with "
        f"`ffmpeg -i '{p}' out.flac`, or remove it from the input."
    ) from last


def _torchcodec_decoder() -> Any | None:
    """torchcodec's AudioDecoder class, or None when torchcodec (or its FFmpeg) is missing."""
    try:
        from torchcodec.decoders import AudioDecoder
    except (ImportError, OSError, RuntimeError) as err:
        # torchcodec raises RuntimeError/OSError at import when its FFmpeg libraries are absent.
        log.debug("torchcodec unavailable: %s", err)
        return None
    return AudioDecoder


def _decode_torchcodec(
    decoder_cls: Any, p: Path, offset: float, duration: float | None
) -> tuple[np.ndarray, int, str]:
    try:
        decoder = decoder_cls(os.fspath(p))
        file_seconds = decoder.metadata.duration_seconds_from_header
    except (RuntimeError, ValueError, OSError) as err:
        raise _BackendFailed(_cause(err)) from err
    if file_seconds is not None and offset >= file_seconds:
        raise _offset_past_end(p, offset, file_seconds)
    stop = None if duration is None else offset + duration
    try:
        samples = decoder.get_samples_played_in_range(start_seconds=offset, stop_seconds=stop)
        data = samples.data.numpy()  # (C, S) float32
        sr = int(samples.sample_rate)
    except (RuntimeError, ValueError, OSError) as err:
        raise _BackendFailed(_cause(err)) from err
    if data.shape[-1] == 0:
        raise _offset_past_end(p, offset, None) if offset > 0 else _no_samples(p, "torchcodec")
    return np.asarray(data, dtype=np.float32).T, sr, "torchcodec"


def _info_torchcodec(decoder_cls: Any, p: Path) -> AudioInfo:
    try:
        metadata = decoder_cls(os.fspath(p)).metadata
        sr, seconds = int(metadata.sample_rate), metadata.duration_seconds_from_header
    except (RuntimeError, ValueError, OSError) as err:
        raise _BackendFailed(_cause(err)) from err
    if seconds is None:  # the header does not say: count by decoding
        data, sr, _ = _decode_torchcodec(decoder_cls, p, 0.0, None)
        return _make_info(sr, data.shape[0], data.shape[1], "torchcodec")
    return _make_info(sr, round(seconds * sr), int(metadata.num_channels), "torchcodec")


def _decode_ffmpeg(
    ffmpeg: str, p: Path, offset: float, duration: float | None, sink: FrameSink, *, seek_input: bool = True
) -> tuple[int, str]:
    """Decode with the ffmpeg binary to a float32 WAV on stdout, read into `sink` block by block (a
    long file is never held whole); the rate in Hz and "ffmpeg".

    The WAV header gives the rate and channel count without ffprobe; its size fields are
    placeholders on a pipe, so the samples are everything after the data chunk header.
    With `seek_input` the span is cut before decoding (nothing before `offset` is decoded), else
    from the decoded stream by sample counts at its rate: slower, for inputs ffmpeg cannot seek in
    exactly (chained Ogg, joined MP3).
    """
    span = ["-ss", f"{offset:.6f}"] if offset > 0 else []
    span += ["-t", f"{duration:.6f}"] if duration is not None else []
    if not seek_input:  # by sample counts: ffmpeg's own times drift where a chain's rate changes
        sink, span = _SpanOf(sink, offset, duration), []
    # "file:" keeps ffmpeg from reading a path such as "a:b.m4a" as a protocol.
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *span, "-i", "file:" + os.fspath(p.absolute()),
           "-map", "0:a:0", "-map_metadata", "-1", "-fflags", "+bitexact", "-f", "wav", "-acodec", "pcm_f32le", "-"]
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: ffmpeg never blocks on it
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        except OSError as err:
            raise _BackendFailed(f"could not run {ffmpeg}: {err.strerror}") from err
        with proc:
            sr, unreadable = 0, None
            try:
                sr = _pipe_into(proc.stdout, sink)
            except _BackendFailed as err:
                unreadable = err
            whole = getattr(sink, "done", False)
            if whole:  # the span is in: the rest of the file is not decoded
                proc.kill()
            code = proc.wait()
        if code != 0 and not whole:  # ffmpeg's own message says more than an unreadable stream
            stderr.seek(0)
            text = stderr.read().decode("utf-8", "replace").strip()
            if "matches no streams" in text:  # our -map 0:a:0 found none: a video without sound, say
                raise _BackendFailed("it holds no audio stream")
            raise _BackendFailed(" / ".join(text.splitlines()[-3:]) or f"exit status {code}")
    if unreadable is not None:
        raise unreadable
    if sink.frames == 0:
        raise _offset_past_end(p, offset, None) if offset > 0 else _no_samples(p, "ffmpeg")
    return sr, "ffmpeg"


def _pipe_into(stream: Any, sink: FrameSink) -> int:
    """Read ffmpeg's float WAV from `stream` into `sink`, `_READ_BLOCK` frames at a time; its rate."""
    head = b""
    while (parsed := _parse_pipe_wav(head)) is None:
        more = stream.read(4096)
        if not more:
            raise _BackendFailed("ffmpeg did not produce a WAV stream")
        head += more
    sr, channels, rest = parsed
    sink.start(sr, channels)
    frame_bytes = 4 * channels
    while True:
        more = stream.read(_READ_BLOCK * frame_bytes)
        rest = rest + more if rest else more
        n = len(rest) // frame_bytes
        if n:
            sink.add(np.frombuffer(rest, dtype="<f4", count=n * channels).reshape(n, channels))
            rest = rest[n * frame_bytes :]
        if not more or getattr(sink, "done", False):  # the end, or a span that is whole
            return sr


def _parse_pipe_wav(buf: bytes) -> tuple[int, int, bytes] | None:
    """(rate Hz, channels, the sample bytes that follow) of the float WAV that ffmpeg writes to a
    pipe, or None while `buf` has not reached its data chunk."""
    if len(buf) >= 12 and (buf[:4] != b"RIFF" or buf[8:12] != b"WAVE"):
        raise _BackendFailed("ffmpeg did not produce a WAV stream")
    pos, fmt = 12, None
    while pos + 8 <= len(buf):
        chunk, size = buf[pos : pos + 4], struct.unpack_from("<I", buf, pos + 4)[0]
        if chunk == b"data":
            if fmt is None:
                raise _BackendFailed("ffmpeg's WAV stream has no fmt chunk")
            return fmt[1], fmt[0], buf[pos + 8 :]
        if chunk == b"fmt ":
            if pos + 16 > len(buf):
                return None
            fmt = struct.unpack_from("<HI", buf, pos + 10)  # channels, sample rate
        pos += 8 + size + (size & 1)  # RIFF chunks are padded to even sizes
    return None


def _info_ffprobe(ffprobe: str, p: Path) -> AudioInfo:
    cmd = [ffprobe, "-v", "error", "-select_streams", "a:0", "-show_entries",
           "stream=sample_rate,channels,duration,duration_ts,time_base:format=duration",
           "-of", "json", "file:" + os.fspath(p.absolute())]
    try:
        run = subprocess.run(cmd, capture_output=True, check=False)
    except OSError as err:
        raise _BackendFailed(f"could not run {ffprobe}: {err.strerror}") from err
    text = run.stderr.decode("utf-8", "replace").strip()
    try:
        probe = json.loads(run.stdout)
        stream = probe["streams"][0]
        sr, channels = int(stream["sample_rate"]), int(stream["channels"])
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _BackendFailed(text or "no audio stream found") from err
    if stream.get("time_base") == f"1/{sr}" and "duration_ts" in stream:
        frames = int(stream["duration_ts"])  # exact: counted in samples
    else:
        seconds = stream.get("duration") or probe.get("format", {}).get("duration")
        if seconds in (None, "N/A"):
            raise _BackendFailed("ffprobe reports no duration")
        frames = round(float(seconds) * sr)
    return _make_info(sr, frames, channels, "ffprobe")


def _info_ffmpeg(ffmpeg: str, p: Path) -> AudioInfo:
    sink = _FrameCount(mono=True, sr=None)
    sr, _ = _decode_ffmpeg(ffmpeg, p, 0.0, None, sink)
    return _make_info(sr, sink.frames, sink.channels, "ffmpeg")


class _SpanOf:
    """Passes to `sink` only the frames of a decoded stream from `offset` s for `duration` s (None:
    to the end), counted at the rate the stream starts with."""

    def __init__(self, sink: FrameSink, offset: float, duration: float | None) -> None:
        self.sink, self.offset, self.duration = sink, offset, duration
        self.skip, self.left = 0, None  # set by start(), at the stream's rate

    def start(self, file_sr: int, channels: int) -> None:
        self.sink.start(file_sr, channels)
        self.skip = round(self.offset * file_sr)
        self.left = None if self.duration is None else max(1, round(self.duration * file_sr))

    def add(self, block: np.ndarray) -> None:
        cut = min(self.skip, len(block))
        block, self.skip = block[cut:], self.skip - cut
        if self.left is not None:
            block = block[: self.left]
            self.left -= len(block)
        self.sink.add(block)

    @property
    def frames(self) -> int:
        return self.sink.frames

    @property
    def done(self) -> bool:
        """The span is whole: decoding further would only be dropped."""
        return self.left == 0


class _FrameCount(FrameSink):
    """A sink that only counts the frames it is given (an hour's decode costs no memory)."""

    def add(self, block: np.ndarray) -> None:
        self.frames += len(block)


def _make_info(sr: int, frames: int, channels: int, backend: str) -> AudioInfo:
    return AudioInfo(int(sr), int(frames), int(channels), frames / sr if sr else 0.0, backend)


# --------------------------------------------------------------------------- signal helpers


def _soxr(x: np.ndarray, sr_in: int, sr_out: int, quality: str = "HQ") -> np.ndarray:
    """soxr on (S,) or frames-first (S, C) audio; float32 contiguous in and out."""
    y = soxr.resample(np.ascontiguousarray(x, dtype=np.float32), sr_in, sr_out, quality=quality)
    return np.asarray(y, dtype=np.float32)
