"""Write the benchmark task files from the dev set's CSVs (run once; the outputs are committed).

    python benchmarks/build_tasks.py --data ../shared/data/dev

Each task is `benchmarks/<task>.csv` (path,label,split,group; paths relative to the dev set) and a
`<task>.json` with its kind and description. Fold 4 is the test split, folds 0-3 are for fitting (the
dev set's own rule); `musicssl eval` carves valid out of them by whole groups (a track, a kit, a
score, an instrument-pitch pair), so no source straddles train and valid either.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# General MIDI names of the programs the chorales use (GM 1 sound set, programs counted from 0).
GM_NAMES = {0: "piano", 6: "harpsichord", 19: "church_organ", 24: "nylon_guitar", 40: "violin", 41: "viola",
            42: "cello", 43: "contrabass", 48: "string_ensemble", 52: "choir", 56: "trumpet", 57: "trombone",
            58: "tuba", 60: "french_horn", 68: "oboe", 70: "bassoon", 71: "clarinet", 73: "flute"}


def instruments(row: dict[str, str]) -> str:
    return ";".join(sorted({GM_NAMES[int(p)] for p in row["gm_programs"].split()}))


# name -> (source csv, kind, label of a row, group of a row, keep the row?, description)
TASKS = {
    "soundtrack-source": ("soundtrack", "classification", lambda r: r["source_pkg"], lambda r: r["source_file"],
                          None, "which of 16 games a 10 s excerpt of its soundtrack comes from (composer/style)"),
    "notes-family": ("notes", "classification", lambda r: r["family"], lambda r: f"{r['gm_program']}:{r['pitch']}",
                     None, "General MIDI instrument family (10) of a 4 s single note"),
    "notes-pitch": ("notes", "pitch", lambda r: r["pitch"], lambda r: f"{r['gm_program']}:{r['pitch']}",
                    lambda r: r["pitch_check"] == "ok",
                    "MIDI pitch of a single note (rows whose label passed the dev set's f0 check); "
                    "raw pitch accuracy within 50 cents"),
    "notes-velocity": ("notes", "regression", lambda r: r["velocity"], lambda r: f"{r['gm_program']}:{r['pitch']}",
                       None, "MIDI velocity (75, 100 or 127) of a single note, as a number (R^2)"),
    "drums-class": ("drums", "classification", lambda r: r["drum_class"], lambda r: r["kit"], None,
                    "drum class (8) of a 2 s one-shot from 14 real kits; test kits are unseen"),
    "chorales-key": ("chorales", "classification", lambda r: r["key"], lambda r: r["source_file"], None,
                     "key (24 classes) of 15 s of a transposed Bach chorale"),
    "chorales-instruments": ("chorales", "multilabel", instruments, lambda r: r["source_file"], None,
                             "which General MIDI instruments play a chorale (multi-label, 18 instruments)"),
}


def build(data: Path, out: Path) -> None:
    for name, (source, kind, label, group, keep, description) in TASKS.items():
        with open(data / f"{source}.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if keep is None or keep(r)]
        with open(out / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["path", "label", "split", "group"])
            for r in sorted(rows, key=lambda r: r["path"]):
                w.writerow([r["path"], label(r), "test" if r["fold"] == "4" else "train", group(r)])
        meta = {"name": name, "kind": kind, "description": description,
                "data": f"musicssl dev set: {source}.csv (licences in its license column)"}
        (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "dev")
    p.add_argument("--out", type=Path, default=HERE)
    a = p.parse_args()
    build(a.data, a.out)
