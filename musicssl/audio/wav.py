"""WAV files whose data chunk declares 0 bytes but holds the samples after it.

A recorder that dies before it patches its header leaves such a file (and some streaming writers
never patch it). libsndfile reads it as empty; ffmpeg reads to the end of the file. So do we: the
samples run from the data chunk's header to the end, read with libsndfile's RAW reader.
"""

from __future__ import annotations

import io
from pathlib import Path

import soundfile as sf

# Sample encodings libsndfile's RAW reader takes as they are stored in a WAV (little-endian).
RAW_SUBTYPES = frozenset({"PCM_U8", "PCM_S8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"})


def unsized_data_start(path: Path) -> int | None:
    """Byte offset of the samples when the file's data chunk declares 0 bytes and bytes follow it;
    None for any other file."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = fh.seek(0, io.SEEK_END)
        pos = 12
        while pos + 8 <= size:
            fh.seek(pos)
            chunk = fh.read(8)
            length = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                return pos + 8 if length == 0 and not _only_chunks_after(fh, pos + 8, size) else None
            pos += 8 + length + (length & 1)  # chunks are padded to even sizes
    return None


def _only_chunks_after(fh: io.BufferedReader, pos: int, size: int) -> bool:
    """Whether nothing but whole chunks (LIST, id3, ...) follow an empty data chunk at `pos`: a
    file that really is empty, not one whose samples were never counted."""
    while pos + 8 <= size:
        fh.seek(pos)
        chunk = fh.read(8)
        if not all(32 <= c < 127 for c in chunk[:4]):  # chunk ids are printable ASCII
            return False
        length = int.from_bytes(chunk[4:], "little")
        pos += 8 + length + (length & 1)
    return pos in (size, size + 1)  # writers often leave out the last chunk's pad byte


def open_unsized(path: Path, header: sf.SoundFile) -> sf.SoundFile | None:
    """A RAW reader over the samples of an unsized WAV (see the module), in the encoding `header`
    (libsndfile's handle on the same file) names; None when the file is not one. RuntimeError when
    its encoding is compressed (ADPCM, GSM), which only a fallback decoder reads without a size."""
    start = unsized_data_start(path)
    if start is None:
        return None
    if header.subtype not in RAW_SUBTYPES:
        raise RuntimeError(f"the WAV header declares no audio data, and its {header.subtype} samples cannot be "
                           "read without their size")
    window = _ByteWindow(open(path, "rb"), start)
    try:
        return _RawWav(window, header)
    except BaseException:
        window.close()
        raise


class _RawWav(sf.SoundFile):
    """libsndfile's RAW reader that closes the file it reads when it is closed (soundfile leaves a
    file object it was given open)."""

    def __init__(self, window: "_ByteWindow", header: sf.SoundFile) -> None:
        self._window = window
        super().__init__(window, format="RAW", samplerate=header.samplerate, channels=header.channels,
                         subtype=header.subtype, endian="LITTLE")

    def close(self) -> None:
        super().close()
        self._window.close()


class _ByteWindow(io.RawIOBase):
    """A binary file from byte `start` on, as if the file began there: soundfile takes a RAW
    stream's length (and so its frame count) from the whole file it is given."""

    def __init__(self, fh: io.BufferedReader, start: int) -> None:
        self._fh, self._start = fh, start
        fh.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        return self._fh.readinto(buf)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            offset += self._start
        return self._fh.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._fh.tell() - self._start

    def close(self) -> None:
        self._fh.close()
        super().close()
