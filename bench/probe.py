"""Linear probes over frozen clip embeddings on the labelled tasks of the dev set.

    python bench/probe.py --data ../shared/data/dev --models mfcc logmel jepa-tiny:random runs/release

Each model embeds every clip once (mean over frames of its last layer); a logistic regression
(scikit-learn, standardised features fitted on the training folds) is trained on folds 0-3 and
scored on fold 4, as the dev set's README prescribes (clips of one track/kit/score share a fold).
Fold 4 holds only 27-160 clips per task, so a second table rotates the held-out fold over all five
(5-fold cross-validation, mean accuracy): less noisy when two models are close.
`NAME:random` is the registered architecture at random initialisation (seed 0).
Prints both tables of test accuracies and writes them as JSON with --json.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

import musicssl

TASKS = {  # csv -> label column
    "soundtrack": "source_pkg",
    "notes": "family",
    "drums": "drum_class",
    "chorales": "mode",
}


def load_model(spec: str) -> musicssl.Encoder:
    if spec.endswith(":random"):
        torch.manual_seed(0)
        return musicssl.load(spec[: -len(":random")], pretrained=False)
    return musicssl.load(spec)


def read_task(data: Path, name: str) -> tuple[list[Path], list[str], np.ndarray]:
    with open(data / f"{name}.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [data / r["path"] for r in rows], [r[TASKS[name]] for r in rows], np.array([int(r["fold"]) for r in rows])


def embed_all(enc: musicssl.Encoder, paths: list[Path], batch: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(paths), batch):
        out.append(enc.embed(paths[i : i + batch], batch_size=batch).clip.numpy())
    return np.concatenate(out)


def probe(x: np.ndarray, labels: list[str], folds: np.ndarray, test_fold: int = 4) -> float:
    """Accuracy on `test_fold` of a logistic regression fitted on the other folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array(labels)
    train, test = folds != test_fold, folds == test_fold
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    clf.fit(x[train], y[train])
    return float((clf.predict(x[test]) == y[test]).mean())


def print_table(title: str, results: dict[str, dict[str, float]], cols: list[str]) -> None:
    print(f"\n{title}\n| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for spec, row in results.items():
        print(f"| {spec} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/dev", type=Path)
    p.add_argument("--models", nargs="+", default=["mfcc", "logmel"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    split: dict[str, dict[str, float]] = {}
    cv: dict[str, dict[str, float]] = {}
    for spec in a.models:
        enc, t0 = load_model(spec), time.perf_counter()
        split[spec], cv[spec] = {}, {}
        for task in a.tasks:
            paths, labels, folds = read_task(a.data, task)
            x = embed_all(enc, paths)
            split[spec][task] = probe(x, labels, folds)
            cv[spec][task] = float(np.mean([probe(x, labels, folds, k) for k in np.unique(folds)]))
        for row in (split[spec], cv[spec]):
            row["mean"] = float(np.mean([row[t] for t in a.tasks]))
        print(f"{spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    cols = [*a.tasks, "mean"]
    print_table("Test accuracy, folds 0-3 -> fold 4 (the dev set's split)", split, cols)
    print_table("Mean accuracy over the five held-out folds (5-fold cross-validation)", cv, cols)
    if a.json:
        a.json.write_text(json.dumps({"split": split, "cv": cv}, indent=2))


if __name__ == "__main__":
    main()
