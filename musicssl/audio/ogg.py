"""Whether an Ogg file (Vorbis, Opus, FLAC in Ogg) ends where its stream does, and whether it
chains several streams.

libsndfile takes an Ogg file's length from the last page it finds, so a file cut short decodes to
the cut without complaint. The last page of a whole stream carries the end-of-stream flag.
libsndfile also stops at the end of the first logical stream: in a chained file (tracks joined end
to end, as `cat a.ogg b.ogg` or a stream recorder writes them) the rest is never decoded.
"""

from __future__ import annotations

import mmap
from pathlib import Path

_TAIL_BYTES = 1 << 16  # an Ogg page holds at most 65 307 bytes, so the last page starts within this
_EOS = 0x04  # header_type flag of a stream's last page
_BOS = 0x02  # header_type flag of a stream's first page


def ogg_cut_short(path: Path) -> bool:
    """True when the file's last whole page is not an end-of-stream page (or a page is cut off)."""
    tail, pos, end = _last_page(path)
    if pos is None:
        return False  # no page found: not ours to judge
    return end != len(tail) or not tail[pos + 5] & _EOS


def ogg_chained(path: Path) -> bool:
    """True when a stream begins after another's pages: a chain (the streams of a multiplexed
    file, Ogg Skeleton with Vorbis say, all begin at its start). Every page header is walked, so
    chains that reuse a serial number (`cat a.ogg a.ogg`) are found too; about 10 ms an hour."""
    with open(path, "rb") as fh:
        try:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            return False
    with data:
        pos, opening = data.find(b"OggS"), True
        while pos != -1:
            end = _page_end(data, pos)
            if end is None or end > len(data):  # not a page, or one cut off: look for the next
                pos = data.find(b"OggS", pos + 1)
                continue
            begins = bool(data[pos + 5] & _BOS)
            if begins and not opening:
                return True
            opening = opening and begins
            pos = end if data[end : end + 4] == b"OggS" else data.find(b"OggS", end)
    return False


def _last_page(path: Path) -> tuple[bytes, int | None, int]:
    """The file's last _TAIL_BYTES, where its last page with a sound header starts in them (None if
    none does) and where that page ends (past the end when it is cut off)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
    pos = tail.rfind(b"OggS")
    while pos != -1:
        end = _page_end(tail, pos)
        if end is not None:
            return tail, pos, end
        pos = tail.rfind(b"OggS", 0, pos)
    return tail, None, 0


def _page_end(data: bytes, pos: int) -> int | None:
    """Where the page starting at `pos` ends by its segment table, or None if no page starts there."""
    if pos + 27 > len(data) or data[pos + 4] != 0:  # capture pattern, then stream structure version 0
        return None
    segments = data[pos + 26]
    if pos + 27 + segments > len(data):
        return len(data) + 1  # the header itself is cut off: a cut file
    return pos + 27 + segments + sum(data[pos + 27 : pos + 27 + segments])
