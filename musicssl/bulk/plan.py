"""Which files a run embeds and where each output goes.

Inputs are files, folders (searched recursively, filtered by extension) and list files (one path per
line, "-" for stdin). Each input file gets a relative path `rel` under a root folder (default: the
deepest folder holding every input), and its output is `OUT/rel + suffix`: the tree is mirrored and
the source extension stays in the name, so `a/x.wav`, `b/x.wav` and `a/x.mp3` all survive (a name
too long for a file once the suffix is added is shortened with a hash: `fitting_name`). `rel`
also picks the shard, so N jobs over the same inputs split them the same way on any machine.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Job:
    source: Path  # the input file, absolute, as named (symlinks not resolved)
    rel: str  # POSIX path relative to the root: names the output and picks the shard
    output: Path  # the output file inside OUT


def read_list(list_file: str | os.PathLike) -> list[str]:
    """Paths from a list file (one per line, blank lines ignored; "-" reads stdin). Relative paths
    are relative to the current folder, as with `tar -T`."""
    if os.fspath(list_file) == "-":
        if sys.stdin is None:
            raise ValueError("--files-from -: standard input is closed; pipe the list in, or give a list file")
        stdin = getattr(sys.stdin, "buffer", None)  # None where stdin was replaced by a text stream
        raw = stdin.read() if stdin is not None else os.fsencode(sys.stdin.read())
    else:
        try:
            raw = Path(list_file).expanduser().read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"cannot read the list of inputs {list_file}: {err}") from err
    # Bytes to names as the OS does, so names that are not UTF-8 survive; a UTF-8 byte-order mark
    # (Windows editors write one) is not part of the first name. Only line ends (\n or \r\n) are
    # stripped: a path may begin or end with spaces.
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if b"\0" in raw:
        raise ValueError(f"the list of inputs {list_file} holds NUL bytes, so it is not a text list: give "
                         "--files-from a file with one path per line (e.g. made by `find DIR -name '*.mp3' > list.txt`)")
    return [os.fsdecode(line) for line in raw.splitlines() if line.strip()]


def gather(inputs: Sequence[str | os.PathLike], listed: Sequence[str], extensions: Iterable[str] | None,
           unreadable: list[tuple[Path, str]] | None = None) -> tuple[list[Path], list[Path]]:
    """(audio files, folders searched): files and folders given, folders expanded, all absolute.
    Listed paths are kept even when missing (they become per-file errors); a missing input given
    on the command line is an error at once; what a folder's search could not read goes to
    `unreadable` (`find_audio_files`)."""
    from musicssl.audio.io import AUDIO_EXTENSIONS, find_audio_files

    files, folders = [], []
    for given in inputs:
        path = Path(os.path.abspath(Path(given).expanduser()))
        if path.is_dir():
            folders.append(path)
            files.extend(Path(os.path.abspath(f)) for f in find_audio_files(path, extensions or AUDIO_EXTENSIONS,
                                                                                  unreadable))
        elif path.exists():
            files.append(path)
        elif path.is_symlink():
            raise FileNotFoundError(f"input {given} is a link to {os.readlink(path)}, which leads nowhere (missing, "
                                    "or a loop of links): point it at the file again, or leave it out")
        else:
            raise FileNotFoundError(f"input {given} does not exist (give audio files, folders, or --files-from LIST)")
    files.extend(Path(os.path.abspath(Path(p).expanduser())) for p in listed)
    return files, folders


def default_root(files: Sequence[Path], folders: Sequence[Path]) -> Path:
    """The deepest folder holding every input: a folder given counts itself, a file its parent."""
    anchors = [str(f) for f in folders] + [str(f.parent) for f in files]
    return Path(os.path.commonpath(anchors)) if anchors else Path.cwd()


def plan_jobs(
    inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, suffix: str, *,
    files_from: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
    extensions: Iterable[str] | None = None, earlier_root: str | os.PathLike | None = None,
    unreadable: list[tuple[Path, str]] | None = None,
) -> tuple[list[Job], Path]:
    """One job per distinct input file (by real path; the first name wins), sorted by `rel`, and the root used.

    earlier_root: the root of an earlier run into the same OUT, kept (without `root`) when every
    input lies inside it, so that a run over part of a collection, or one that adds a folder beside
    it, writes where the earlier run did instead of laying OUT out anew.
    unreadable: gets what the search of a folder could not read (`find_audio_files`).
    """
    listed = read_list(files_from) if files_from is not None else []
    files, folders = gather(inputs, listed, extensions, unreadable)
    if root is not None:
        base = Path(os.path.abspath(os.path.expanduser(root)))
        if base.is_file():
            raise ValueError(f"--root {root} is a file: give the folder that holds every input")
    elif earlier_root is not None and files and all(Path(f).is_relative_to(earlier_root) for f in files):
        base = Path(earlier_root)
    else:
        base = default_root(files, folders)
    out_dir = Path(os.path.abspath(out_dir))
    jobs: dict[str, Job] = {}
    seen: set[str] = set()
    for f in sorted(files, key=os.fspath):  # of two names of one file, the first in order wins, whatever the input order
        real = os.path.realpath(f)
        if real in seen:
            continue
        seen.add(real)
        rel = relative_name(f, base)
        jobs.setdefault(rel, Job(f, rel, output_path(out_dir, rel, suffix)))
    return [jobs[k] for k in sorted(jobs)], base


def relative_name(path: Path, root: Path) -> str:
    """`path` relative to `root` as a POSIX string with no "..": the name its output mirrors."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ValueError(f"input {path} is not inside the root folder {root}; pass a --root that holds every input") from None
    if not rel.parts:
        raise ValueError(f"input {path} is the root folder itself, not a file")
    return rel.as_posix()


def output_path(out_dir: Path, rel: str, suffix: str) -> Path:
    """OUT/rel + suffix (the name shortened if too long, see `fitting_name`), refusing anything that
    would land outside OUT."""
    folder, _, name = rel.rpartition("/")
    target = Path(os.path.normpath(out_dir / folder / fitting_name(name, suffix)))
    if os.path.commonpath([out_dir, target]) != str(out_dir) or target == out_dir:
        raise ValueError(f"refusing to write {target}: it is outside the output folder {out_dir}")
    return target


# File names may hold 255 bytes (Linux, macOS); an output's claim adds ".NAME.lock" and ".NAME.part".
NAME_BYTES = 255 - len("..lock")


def fitting_name(name: str, suffix: str) -> str:
    """name + suffix, or where that exceeds NAME_BYTES, as much of the name as fits, "~" and 16 hex
    digits of the name's sha256, then suffix: the same input always gets the same output name."""
    raw = os.fsencode(name)
    if len(raw) + len(suffix) <= NAME_BYTES:
        return name + suffix
    tag = f"~{hashlib.sha256(raw).hexdigest()[:16]}{suffix}"
    return raw[: NAME_BYTES - len(tag)].decode("utf-8", "ignore") + tag  # "ignore": a character cut in two


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" -> (K, N) with 0 <= K < N: this job takes shard K of N (K counts from 0, as SLURM array ids do)."""
    try:
        k, n = (int(t) for t in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes K/N, e.g. 0/4 for the first of four shards, not {text!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {text}: K must be in 0..N-1 (shards count from 0), e.g. 0/{max(n, 1)}")
    return k, n


def shard_of(rel: str, n: int) -> int:
    """Stable shard of a relative path: a file keeps its shard when others are added or removed."""
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n


def take_shard(jobs: list[Job], k: int, n: int) -> list[Job]:
    return [j for j in jobs if shard_of(j.rel, n) == k]
