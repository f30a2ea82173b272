"""The error types users catch.

Every error says what went wrong, on which file or model, and what to do about it.
"""

from __future__ import annotations


class MusicsslError(Exception):
    """Base class of every error raised on purpose by musicssl."""


class AudioDecodeError(MusicsslError, ValueError):
    """An audio file could not be read or decoded (names the file and the backend)."""


class OffsetPastEndError(AudioDecodeError):
    """A span of a file was asked for from an offset at or past its end."""


class AudioInputError(MusicsslError, ValueError):
    """Audio given as an array or tensor is unusable (shape, sample rate, NaN/Inf)."""


class UnknownModelError(MusicsslError, LookupError):
    """A model name is not in the registry (the message suggests the closest names)."""


class WeightsUnavailableError(MusicsslError, LookupError):
    """A registered architecture has no released weights yet."""


class WeightsNotCachedError(MusicsslError, FileNotFoundError):
    """Offline mode is on and the pinned weights are not in the local cache."""


class ChecksumError(MusicsslError, ValueError):
    """A downloaded or cached file does not have the pinned sha256."""


class DownloadError(MusicsslError, OSError):
    """Weights could not be fetched (unknown repo, revision or file; server unreachable)."""


class ReleaseFormatError(MusicsslError, ValueError):
    """A release folder or its config.json is malformed, or its weights do not fit the model."""


class TaskFormatError(MusicsslError, ValueError):
    """A task file or folder is malformed (names the file, the row and what to fix)."""


class DeviceError(MusicsslError, ValueError):
    """A device name torch does not know, or a device this machine or this torch build lacks."""


class OutputPathError(MusicsslError, OSError):
    """The output folder cannot be made or written (names the path and the cause)."""


def first_line(err: BaseException) -> str:
    """The first non-blank line of an error's message, or its type's name when it says nothing."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def describe(err: BaseException) -> str:
    """One line for a manifest: our own errors already name the file, cause and fix."""
    # Line breaks only: runs of spaces may belong to a file's name.
    text = " ".join(str(err).splitlines()).strip() or repr(err)
    return text if isinstance(err, MusicsslError) else f"{type(err).__name__}: {text}"


class DivergedError(MusicsslError, FloatingPointError):
    """Training stopped because its loss became NaN or infinite."""
