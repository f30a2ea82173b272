"""The length of an MPEG audio (MP3) file, counted from its frame headers without decoding.

libsndfile takes an MP3's length from its Xing/Info/VBRI header, or without one estimates it from
the file size and the first frame's bitrate, and never decodes past that count. A VBR file without
such a header can come out at a third of its length, and MP3 files joined end to end (`cat a.mp3
b.mp3`, as audiobooks and podcasts are joined) at the first part's; this count says when that
happened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

# Bitrates in kbit/s by [MPEG-1?][layer 1..3][index]; index 0 is "free format", 15 is invalid.
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
# Sample rates in Hz by version bits: 0 MPEG-2.5, 2 MPEG-2, 3 MPEG-1 (1 is reserved).
_RATES = {0: (11025, 12000, 8000), 2: (22050, 24000, 16000), 3: (44100, 48000, 32000)}
_LENGTH_TAGS = (b"Xing", b"Info", b"VBRI")
_ID3V1_BYTES = 128  # the trailing tag that may follow the bytes a length tag declares
_NEXT_PART_BYTES = 1 << 12  # where a joined file's next part starts its frames (encoders' byte counts may be off)
_HEAD_BYTES = 1 << 16  # the first frame (and its length tag) starts within this, after any ID3v2
_FAR_BYTES = 1 << 22  # where to look when it does not


def mpeg_samples(path: Path) -> int | None:
    """Samples per channel that the file's frames hold, at the first frame's rate (joined parts
    may have others), or None when its first frame carries a length tag that covers the whole file
    (libsndfile's count is then exact) or no run of valid frames is found."""
    start, head, first = _head(path)  # the head first: most files carry a length tag
    if first is None or _tag_covers(path, start + first, head, first):
        return None
    data = Path(path).read_bytes()
    pos: int | None = start + first
    seconds, rate0 = 0.0, _rate(data, start + first)
    while pos is not None and pos + 4 <= len(data):
        frame = _frame(data, pos)
        if frame is None:  # junk between frames, or a trailing tag: look for the next frame
            pos = _first_frame(data, pos + 1)
            continue
        size, n = frame
        seconds, pos = seconds + n / _rate(data, pos), pos + size
    return round(seconds * rate0)


def _rate(data: bytes, pos: int) -> int:
    """The sample rate in Hz of the frame whose (valid) header is at `pos`."""
    return _RATES[(data[pos + 1] >> 3) & 3][(data[pos + 2] >> 2) & 3]


def has_length_tag(path: Path) -> bool:
    """Whether the first frame carries a Xing/Info/VBRI length tag (libsndfile's count is then the
    encoder's, so fewer frames decoding means the file was cut short)."""
    _, head, first = _head(path)
    return first is not None and _tagged(head, first)


def _head(path: Path) -> tuple[int, bytes, int | None]:
    """(where the audio starts, its first _HEAD_BYTES, the first frame's offset in them or None)."""
    with open(path, "rb") as fh:
        start = 0
        while skip := _skip_id3v2(fh.read(10)):  # retagged files can carry several tags in a row
            start += skip
            fh.seek(start)
        fh.seek(start)
        head = fh.read(_HEAD_BYTES)
        first = _first_frame(head, 0)
        if first is None:  # a long run of junk (or an unknown tag) before the audio: look further
            fh.seek(start)
            head = fh.read(_FAR_BYTES)
            first = _first_frame(head, 0)
    return start, head, first


def _tagged(head: bytes, first: int) -> bool:
    return any(tag in head[first : first + 200] for tag in _LENGTH_TAGS)


def _tag_covers(path: Path, audio_start: int, head: bytes, first: int) -> bool:
    """Whether the first frame's length tag covers the file: False without a tag, or when frames
    follow the bytes it declares (a joined file) rather than trailing tags or nothing."""
    if not _tagged(head, first):
        return False
    declared = _declared_bytes(head, first)
    if declared is None:  # a tag without a byte count: take its word
        return True
    end = audio_start + declared
    if os.path.getsize(path) - end <= _ID3V1_BYTES:
        return True
    with open(path, "rb") as fh:
        while skip := _skip_id3v2(_read_at(fh, end, 10)):  # the next part's own tags
            end += skip
        return _first_frame(_read_at(fh, end, _NEXT_PART_BYTES), 0) is None


def _read_at(fh: BinaryIO, pos: int, size: int) -> bytes:
    fh.seek(pos)
    return fh.read(size)


def _declared_bytes(head: bytes, first: int) -> int | None:
    """The stream size in bytes that a Xing/Info or VBRI tag declares, or None where it has none."""
    for tag in (b"Xing", b"Info"):
        at = head.find(tag, first, first + 200)
        if at != -1 and at + 16 <= len(head):
            flags, field = int.from_bytes(head[at + 4 : at + 8], "big"), at + 8
            field += 4 if flags & 1 else 0  # the frame count comes first when present
            return int.from_bytes(head[field : field + 4], "big") if flags & 2 else None
    at = head.find(b"VBRI", first, first + 200)
    if at != -1 and at + 14 <= len(head):
        return int.from_bytes(head[at + 10 : at + 14], "big")
    return None


def _skip_id3v2(data: bytes) -> int:
    """Where the audio starts after an ID3v2 tag (sizes are 7 bits per byte)."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    return 10 + size + (10 if data[5] & 0x10 else 0)  # flag 0x10: a footer follows


def _first_frame(data: bytes, start: int) -> int | None:
    """The first offset from `start` where a frame is followed by another (a lone sync pattern in
    tag or picture bytes is not a frame)."""
    pos = data.find(b"\xff", start)
    while pos != -1:
        frame = _frame(data, pos)
        if frame is not None and (pos + frame[0] >= len(data) or _frame(data, pos + frame[0]) is not None):
            return pos
        pos = data.find(b"\xff", pos + 1)
    return None


def _frame(data: bytes, pos: int) -> tuple[int, int] | None:
    """(bytes, samples per channel) of the frame whose header is at `pos`, or None if none is."""
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    version, layer_bits = (data[pos + 1] >> 3) & 3, (data[pos + 1] >> 1) & 3
    rate_index, bitrate_index = (data[pos + 2] >> 2) & 3, data[pos + 2] >> 4
    if version == 1 or layer_bits == 0 or rate_index == 3 or bitrate_index in (0, 15):
        return None  # reserved values, or free format (no length in the header)
    layer, mpeg1, padding = 4 - layer_bits, version == 3, (data[pos + 2] >> 1) & 1
    bitrate, rate = _BITRATES[mpeg1, layer][bitrate_index] * 1000, _RATES[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384
    per_frame = 1152 if mpeg1 or layer == 2 else 576
    return per_frame // 8 * bitrate // rate + padding, per_frame
