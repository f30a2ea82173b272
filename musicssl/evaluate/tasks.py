"""Downstream tasks: a CSV (`path,label[,split]`) or a folder per class, with deterministic splits.

An optional `group` column names what items must stay together (a track, a kit, a score): splits
made here never put one group on both sides. A task CSV may have a sidecar `TASK.json` next to it with any of `kind`, `label` (the label
column), `name` and `description`. The kind, when neither the caller nor the sidecar names it, is
read from the labels: any `;` -> multilabel, all numeric -> regression, else classification; a
`pitch` task (labels in MIDI numbers, fractional allowed) is only ever named explicitly.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from musicssl.audio.io import AUDIO_EXTENSIONS, find_audio_files
from musicssl.errors import TaskFormatError

log = logging.getLogger(__name__)

KINDS = ("classification", "multilabel", "regression", "pitch")
SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                  "dev": "valid", "test": "test", "eval": "test", "evaluation": "test"}


@dataclass
class Task:
    """A labelled set of audio files.

    labels: per item a class name (classification), a tuple of class names (multilabel) or a float
        (regression; pitch in MIDI numbers, 69 = A4 = 440 Hz).
    split: (N,) "train" | "valid" | "test".
    classes: sorted class names for classification and multilabel, else empty.
    groups: per item a group name (items of one group stay in one split), or None.
    """

    name: str
    kind: str
    paths: list[Path]
    labels: list[Any]
    split: np.ndarray
    classes: list[str] = field(default_factory=list)
    source: str = ""
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def indices(self, *splits: str) -> np.ndarray:
        """Positions of the items in any of `splits`, (n,) int."""
        return np.flatnonzero(np.isin(self.split, splits))

    def targets(self) -> np.ndarray:
        """(N,) class index for classification, (N, C) 0/1 for multilabel, (N,) float for the rest."""
        if self.kind == "classification":
            index = {c: i for i, c in enumerate(self.classes)}
            return np.array([index[y] for y in self.labels], dtype=np.int64)
        if self.kind == "multilabel":
            index = {c: i for i, c in enumerate(self.classes)}
            out = np.zeros((len(self.labels), len(self.classes)), dtype=np.float32)
            for row, ys in enumerate(self.labels):
                out[row, [index[y] for y in ys]] = 1.0
            return out
        return np.asarray(self.labels, dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        """Counts for reports: kind, items per split, number of classes."""
        return {"name": self.name, "kind": self.kind, "source": self.source, "classes": len(self.classes),
                **{s: int((self.split == s).sum()) for s in SPLITS}}


def load_task(
    source: str | os.PathLike, *, kind: str | None = None, label: str | None = None,
    root: str | os.PathLike | None = None, seed: int = 0, valid_fraction: float = 0.15,
    test_fraction: float = 0.2, group: str | None = None,
) -> Task:
    """Read a task CSV or a folder per class; splits missing from it are made (stratified, seeded).

    root: folder that relative paths in the CSV start from (default: the CSV's folder).
    group: the column naming what must stay in one split (default: "group" in TASK.json, else a
        column named "group" if there is one); a blank cell ties its item to nothing.
    test_fraction: share of all items made the test split when the task gives none.
    valid_fraction: share of the training items moved to valid when the task gives none.
    """
    path = Path(source).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        raise TaskFormatError(f"{path} is a task's settings (TASK.json), not the task: give the CSV beside it, "
                              f"{path.with_suffix('.csv')}, which reads it")
    if path.is_dir():
        task = _read_folder(path)
    elif path.is_file():
        task = _read_csv(path, kind, label, root, group)
    else:
        raise TaskFormatError(f"task {path} does not exist: give a CSV (path,label[,split]) or a folder per class")
    _check_unique(task)
    made = {"valid", "test"} - set(task.split)
    _fill_splits(task, seed, valid_fraction, test_fraction)
    _check_trainable(task)
    _warn_of_untrained_classes(task)
    for name in sorted(made):
        n = int((task.split == name).sum())
        if n < _FEW:
            log.warning("task %s: the %s split made here holds %d item%s, so its scores move by %.0f points per "
                        "item; add items, or %s", task.source, name, n, "s" * (n != 1), 100 / n, _give_splits(task))
    return task


_FEW = 10  # items in a made split below which its scores are mostly noise


# --------------------------------------------------------------------------- CSV


def _read_csv(path: Path, kind: str | None, label: str | None, root: str | os.PathLike | None,
              group: str | None) -> Task:
    meta = _sidecar(path)
    label = label or meta.get("label", "label")
    group = group or meta.get("group")
    rows = _csv_rows(path, label, group)
    base = Path(root).expanduser() if root is not None else path.parent
    paths = [_resolve(base, r["path"]) for r in rows]
    _check_exist(path, paths, root is not None)
    raw = [r[label].strip() for r in rows]
    kind = kind or meta.get("kind") or _guess_kind(raw, path)
    if kind not in KINDS:
        raise TaskFormatError(f"{path}: task kind {kind!r} is not one of {', '.join(KINDS)}")
    labels = _parse_labels(path, raw, kind)
    split = np.array([_split_name(path, i, r.get("split", "")) for i, r in enumerate(rows)], dtype=object)
    group = group or ("group" if "group" in rows[0] else None)
    # A blank cell ties its item to nothing: a group of its own, not one group of every blank row.
    groups = [r[group].strip() or f"{_LOOSE}row {i + 2}" for i, r in enumerate(rows)] if group else None
    if group is not None and group == label:
        raise TaskFormatError(f"{path}: the group column is the label column {label!r}: every test item would be of "
                              "a class never trained on; name the column that ties items together (a track, a kit)")
    if group is None and any(not r.get("split", "").strip() for r in rows):
        _warn_of_grouping_columns(path, [c for c in rows[0] if c not in ("path", label, "split")])
    return Task(meta.get("name", path.stem), kind, paths, labels, split, _classes(kind, labels), str(path), groups)


def _sidecar(path: Path) -> dict[str, Any]:
    side = path.with_suffix(".json")
    if not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TaskFormatError(f"cannot read the task metadata {side}: {err}") from err
    if not isinstance(meta, dict):
        raise TaskFormatError(f"{side} must hold a JSON object with keys like kind, label, name")
    return meta


_LOOSE = "\0"  # starts the group name of an item whose group cell is blank: tied to nothing

# Column names that usually tie items together (a fold made by track, a drum kit, an album).
_GROUPING_COLUMNS = ("fold", "folds", "track", "song", "kit", "artist", "album", "piece", "score", "session")


def _warn_of_grouping_columns(path: Path, columns: list[str]) -> None:
    tied = [c for c in columns if c.strip().lower() in _GROUPING_COLUMNS]
    if tied:
        log.warning("%s: splits are made here by class alone, so items that share a %r can land in both train "
                    "and test (and score too well). To keep them apart, name the column: --group %s (or "
                    "\"group\": \"%s\" in %s)", path, tied[0], tied[0], tied[0], path.with_suffix(".json").name)


def _csv_rows(path: Path, label: str, group: str | None = None) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])  # read inside: an empty file reads it on this first use
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TaskFormatError(f"cannot read task CSV {path}: {err}") from err
    if columns and not rows:
        raise TaskFormatError(f"{path} has a header ({', '.join(columns)}) but no rows: add a row per audio file")
    for need in ("path", label, *([group] if group else [])):
        if need not in columns:
            raise TaskFormatError(
                f"{path} has no {need!r} column (columns: {columns or 'none'}); a task CSV has a header "
                f"'path,label[,split][,group]' (other columns: --label NAME, --group NAME, or \"label\", "
                f"\"group\" in {path.stem}.json)"
            )
    for i, r in enumerate(rows, start=2):
        if not any(x.strip() for x in r.get(None, [])):  # blank fields past the header ("a.wav,kick,") lose nothing
            r.pop(None, None)
        if None in r or None in r.values():  # csv's marks for fields beyond the header, and missing ones
            many = len(columns) + len(r.get(None, [])) - list(r.values()).count(None)
            raise TaskFormatError(f"{path} line {i}: {many} fields where the header has {len(columns)}; quote a "
                                  "field that holds a comma (\"rock, pop\")")
        if not (r.get("path") or "").strip() or not (r.get(label) or "").strip():
            raise TaskFormatError(f"{path} line {i}: empty path or {label!r}; every row needs both")
    return rows


def _resolve(base: Path, text: str) -> Path:
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else base / p


def _check_exist(path: Path, paths: list[Path], root_given: bool) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        hint = "" if root_given else " (relative paths start from the CSV's folder; another base: --root DIR)"
        shown = ", ".join(str(p) for p in missing[:3])
        raise TaskFormatError(f"{path}: {len(missing)} of {len(paths)} audio files do not exist, e.g. {shown}{hint}")


def _guess_kind(raw: list[str], path: Path) -> str:
    """The task kind its labels suggest: ";" in one, multilabel; all numbers, regression; else
    classification. A few whole numbers are said: they are often class ids."""
    if any(";" in y for y in raw):
        return "multilabel"
    if not all(_number(y) is not None for y in raw):
        return "classification"
    values = sorted({_number(y) for y in raw})
    if len(values) <= _FEW_IDS and all(float(v).is_integer() for v in values):
        log.warning("%s: its labels are %d whole numbers (%s), taken for a regression target; if they name "
                    "classes, say so: --kind classification (kind= in Python, or \"kind\" in TASK.json)", path,
                    len(values), ", ".join(f"{v:g}" for v in values))
    return "regression"


_FEW_IDS = 10  # whole-number labels up to this many distinct values may well be class ids


def _number(text: str) -> float | None:
    """The number a label writes, or None: Python's float() less its digit separators ("1_0")."""
    try:
        return None if "_" in text else float(text)
    except ValueError:
        return None


def _parse_labels(path: Path, raw: list[str], kind: str) -> list[Any]:
    if kind == "classification":
        return raw
    if kind == "multilabel":
        return [tuple(sorted({t.strip() for t in y.split(";") if t.strip()})) for y in raw]
    values = [_number(y) for y in raw]
    for i, (y, v) in enumerate(zip(raw, values)):
        if v is None or not np.isfinite(v):
            what = "not a number" if v is None else "not a finite number"
            raise TaskFormatError(f"{path} line {i + 2}: label {y!r} is {what}, and a {kind} task needs one per "
                                  "row; fix or drop the row")
    return values


def _split_name(path: Path, i: int, text: str) -> str:
    text = (text or "").strip().lower()
    if not text:
        return ""
    if text not in _SPLIT_ALIASES:
        raise TaskFormatError(f"{path} row {i + 2}: split {text!r} is not train, valid or test")
    return _SPLIT_ALIASES[text]


def _classes(kind: str, labels: list[Any]) -> list[str]:
    if kind == "classification":
        return sorted(set(labels))
    if kind == "multilabel":
        return sorted({y for ys in labels for y in ys})
    return []


# --------------------------------------------------------------------------- folder per class


def _read_folder(path: Path) -> Task:
    """ROOT/CLASS/*.wav, or ROOT/{train,valid,test}/CLASS/*.wav with the splits given."""
    subdirs = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_split = bool(subdirs) and {_SPLIT_ALIASES.get(d.lower()) for d in subdirs} <= set(SPLITS)
    parts = [(path / d, _SPLIT_ALIASES[d.lower()]) for d in subdirs] if by_split else [(path, "")]
    paths, labels, split = [], [], []
    for folder, name in parts:
        for cls in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
            files = find_audio_files(cls, AUDIO_EXTENSIONS)
            paths += files
            labels += [cls.name] * len(files)
            split += [name] * len(files)
    if not paths:
        raise TaskFormatError(f"no audio files under {path}/CLASS/: a folder task holds one subfolder per class")
    return Task(path.name, "classification", paths, labels, np.array(split, dtype=object),
                sorted(set(labels)), str(path))


# --------------------------------------------------------------------------- splits


def _fill_splits(task: Task, seed: int, valid_fraction: float, test_fraction: float) -> None:
    """Give every unassigned item a split; carve `test`, then `valid`, from the training items when absent."""
    _follow_groups(task)
    free = task.split == ""
    if not free.any() and {"valid", "test"} <= set(task.split):
        return
    pool = np.flatnonzero(free | (task.split == "train"))
    task.split[free] = "train"
    for name, share in (("test", test_fraction), ("valid", valid_fraction)):
        if (task.split == name).any():
            continue
        if name == "test":  # a share of every item; valid is a share of what is left to train on
            share = share * len(task) / max(len(pool), 1)
        # Items of a group move with it; the rest (no group column, or a blank cell) by class, each
        # class keeping an item in train so that every test item is of a class trained on.
        tied = np.array([task.groups is not None and not task.groups[i].startswith(_LOOSE) for i in pool], dtype=bool)
        loose, keep = pool[~tied], 1 if task.kind == "classification" else 0
        chosen = np.concatenate([grouped_pick([task.groups[i] for i in pool[tied]], pool[tied], share, seed),
                                 stratified_pick(_strata(task, loose), task.paths, loose, share, seed, keep)])
        task.split[chosen] = name
        pool = np.setdiff1d(pool, chosen)


def _follow_groups(task: Task) -> None:
    """Blank split cells of a group whose other items the CSV assigns take that split: splits made
    here keep a group on one side (it was filled apart, and most of a test group went to train). A
    group the CSV itself puts on two sides is warned of; its blank cells are filled as ungrouped."""
    if task.groups is None:
        return
    given: dict[str, set[str]] = {}
    for group, split in zip(task.groups, task.split):
        if split and not group.startswith(_LOOSE):
            given.setdefault(group, set()).add(split)
    both = sorted(g for g, s in given.items() if len(s) > 1)
    if both:
        log.warning("the split column puts %d groups on more than one side, e.g. %r in %s: items of one group "
                    "in train and test let a probe win by recognising it", len(both), both[0], sorted(given[both[0]]))
    for i, group in enumerate(task.groups):
        if task.split[i] == "" and len(given.get(group, ())) == 1:
            task.split[i] = next(iter(given[group]))


def _strata(task: Task, pool: np.ndarray) -> list[str]:
    """A stratum per item of `pool`: its class, first label, or decile of a numeric label."""
    if task.kind == "classification":
        return [task.labels[i] for i in pool]
    if task.kind == "multilabel":
        return [task.labels[i][0] if task.labels[i] else "" for i in pool]
    values = np.array([task.labels[i] for i in pool], dtype=float)
    edges = np.quantile(values, np.linspace(0, 1, 11)[1:-1]) if len(values) else []
    return [str(b) for b in np.searchsorted(edges, values)]


def stratified_pick(strata: list[str], paths: list[Path], pool: np.ndarray, share: float, seed: int,
                    keep: int = 0) -> np.ndarray:
    """`share` of `pool`, spread over its strata in proportion, chosen by a seeded shuffle of each
    stratum's items sorted by path, so the result depends on neither the row order nor the platform.
    Every stratum keeps `keep` items, so the total falls short only where strata are too small."""
    members = {s: sorted((int(i) for i, t in zip(pool, strata) if t == s), key=lambda i: str(paths[i]))
               for s in sorted(set(strata))}
    rngs = {s: np.random.default_rng([seed, zlib.crc32(s.encode())]) for s in members}
    take = _apportion({s: len(m) for s, m in members.items()}, share, {s: rngs[s].random() for s in members}, keep)
    chosen = [m[i] for s, m in members.items() for i in rngs[s].permutation(len(m))[: take[s]]]
    return np.array(sorted(chosen), dtype=np.int64)


def _apportion(sizes: dict[str, int], share: float, tiebreak: dict[str, float], keep: int) -> dict[str, int]:
    """Items to take from each stratum: `share` of its size rounded down, then the rest of
    round(share * total) one by one to the largest remainders (Hamilton's method), each stratum
    keeping `keep` items. Rounding every stratum alone took nothing from strata of 2-3 items."""
    room = {s: max(0, n - keep) for s, n in sizes.items()}
    quota = {s: share * n for s, n in sizes.items()}
    take = {s: min(int(q), room[s]) for s, q in quota.items()}
    left = round(share * sum(sizes.values())) - sum(take.values())
    ranked = sorted(sizes, key=lambda s: (take[s] - quota[s], tiebreak[s]))
    while left > 0:
        open_ = [s for s in ranked if take[s] < room[s]]
        for s in open_[:left]:
            take[s] += 1
        left = 0 if not open_ else left - len(open_[:left])
    return take


def grouped_pick(groups: list[str], pool: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Whole groups of `pool` adding up to about `share` of it: groups are tried in a seeded order of
    their sorted names and one that would overshoot the target by half is passed over, so a few
    large groups (a kit of 40 hits among kits of 10) cannot swell the split."""
    names = sorted(set(groups))
    members: dict[str, list[int]] = {g: [] for g in names}
    for i, g in zip(pool, groups):
        members[g].append(int(i))
    target = share * len(pool)
    chosen: list[int] = []
    for k in np.random.default_rng(seed).permutation(len(names)):
        if len(chosen) >= target:
            break
        group = members[names[k]]
        if len(chosen) + len(group) <= 1.5 * target and len(chosen) + len(group) < len(pool):
            chosen += group
    if not chosen and len(names) > 1:  # every group is too large: the smallest one
        chosen = min(members.values(), key=len)
    return np.array(sorted(chosen), dtype=np.int64)


def _check_unique(task: Task) -> None:
    """One row per file: a file listed twice can sit in train and test at once (and score 1.0)."""
    seen: dict[str, int] = {}
    for i, p in enumerate(task.paths):
        key = os.path.realpath(p)
        if key in seen:
            raise TaskFormatError(f"task {task.source}: {p} is listed twice (items {seen[key] + 1} and {i + 1}), so "
                                  "it could be trained and tested on at once; list each file once (several labels: "
                                  "join them with ';')")
        seen[key] = i


def _warn_of_untrained_classes(task: Task) -> None:
    """Say which classes (of a pitch task: semitones) have valid or test items but none in train:
    a head of the train classes can never name them."""
    if task.kind == "classification":
        name, what = str, "class(es)"
    elif task.kind == "pitch":  # a pitch head's classes are the semitones seen in training
        name, what = lambda y: round(float(y)), "semitone(s)"
    else:
        return
    trained = {name(task.labels[i]) for i in task.indices("train")}
    unseen = sorted({name(task.labels[i]) for i in task.indices("valid", "test")} - trained)
    if unseen:
        log.warning("task %s: %d %s have valid or test items but none in train (%s), so those items are "
                    "always wrong; move some to train (their groups may hold them all)", task.source, len(unseen),
                    what, ", ".join(map(repr, unseen[:5])) + (", ..." if len(unseen) > 5 else ""))


def _give_splits(task: Task) -> str:
    """How this task's form says its splits."""
    if Path(task.source).is_dir():
        return "give the splits as subfolders (ROOT/train/CLASS/, ROOT/valid/CLASS/, ROOT/test/CLASS/)"
    return "give a split column"


def _check_trainable(task: Task) -> None:
    for s in SPLITS:
        if not (task.split == s).any():
            why = ("splits keep whole groups, so it needs at least 3 groups" if task.groups is not None else
                   "a split made here takes items only from classes that keep one in train")
            raise TaskFormatError(f"task {task.source}: no {s} items after splitting ({len(task)} items in all; {why}); "
                                  f"add items, or {_give_splits(task)}")
    if task.kind == "classification" and len({task.labels[i] for i in task.indices("train")}) < 2:
        raise TaskFormatError(f"task {task.source}: the train split holds fewer than 2 classes")
    if task.kind in ("regression", "pitch") and len({float(task.labels[i]) for i in task.indices("train")}) < 2:
        raise TaskFormatError(f"task {task.source}: every train label is the same value, so there is nothing to "
                              "predict (and R² is undefined); check the label column")
