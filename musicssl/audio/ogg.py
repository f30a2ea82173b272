"""Whether an Ogg file (Vorbis, Opus, FLAC in Ogg) ends where its stream does.

libsndfile takes an Ogg file's length from the last page it finds, so a file cut short decodes to
the cut without complaint. The last page of a whole stream carries the end-of-stream flag.
"""

from __future__ import annotations

from pathlib import Path

_TAIL_BYTES = 1 << 16  # an Ogg page holds at most 65 307 bytes, so the last page starts within this
_EOS = 0x04  # header_type flag of a stream's last page


def ogg_cut_short(path: Path) -> bool:
    """True when the file's last whole page is not an end-of-stream page (or a page is cut off)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
    pos = tail.rfind(b"OggS")
    while pos != -1:
        end = _page_end(tail, pos)
        if end is not None:  # the last page whose header is sound
            return end != len(tail) or not tail[pos + 5] & _EOS
        pos = tail.rfind(b"OggS", 0, pos)
    return False  # no page found: not ours to judge


def _page_end(data: bytes, pos: int) -> int | None:
    """Where the page starting at `pos` ends by its segment table, or None if no page starts there."""
    if pos + 27 > len(data) or data[pos + 4] != 0:  # capture pattern, then stream structure version 0
        return None
    segments = data[pos + 26]
    if pos + 27 + segments > len(data):
        return len(data) + 1  # the header itself is cut off: a cut file
    return pos + 27 + segments + sum(data[pos + 27 : pos + 27 + segments])
