"""Linear probes over frozen clip embeddings on the labelled tasks of the dev set.

    python bench/probe.py --data ../shared/data/dev --models mfcc logmel jepa-tiny:random runs/release

Each model embeds every clip once (mean over frames of its last layer); a logistic regression
(scikit-learn, standardised features fitted on the training folds) is trained on folds 0-3 and
scored on fold 4, as the dev set's README prescribes (clips of one track/kit/score share a fold).
`NAME:random` is the registered architecture at random initialisation (seed 0).
Prints a table of test accuracies and writes it as JSON with --json.
"""

from __future__ import annotations

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


def probe(x: np.ndarray, labels: list[str], folds: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array(labels)
    train, test = folds < 4, folds == 4
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    clf.fit(x[train], y[train])
    return float((clf.predict(x[test]) == y[test]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/dev", type=Path)
    p.add_argument("--models", nargs="+", default=["mfcc", "logmel"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    results: dict[str, dict[str, float]] = {}
    for spec in a.models:
        enc, t0 = load_model(spec), time.perf_counter()
        results[spec] = {}
        for task in a.tasks:
            paths, labels, folds = read_task(a.data, task)
            results[spec][task] = probe(embed_all(enc, paths), labels, folds)
        results[spec]["mean"] = float(np.mean([results[spec][t] for t in a.tasks]))
        print(f"{spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    cols = [*a.tasks, "mean"]
    print("| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for spec, row in results.items():
        print(f"| {spec} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
