"""Time the probes of `musicssl eval` on 10,000 cached embeddings of dimension 768.

    OMP_NUM_THREADS=2 python bench/probe_speed.py [--n 10000] [--dim 768] [--classes 10]

The embeddings are synthetic (class clusters in noise; 80/10/10 train/valid/test), as a cache of
real clip embeddings would hold them: the probes see only the matrix. Each probe includes its full
hyper-parameter search on valid. Prints seconds per probe and kind, and the accuracy reached.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import time

import numpy as np
import torch

from musicssl.evaluate import PROBES, make_problem, run_probe


def synthetic(kind: str, n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.05  # hard enough that no probe is perfect
    c = rng.integers(0, classes, n)
    x = (centres[c] + rng.normal(size=(n, dim))).astype(np.float32)
    if kind == "multilabel":
        return x, (np.eye(classes)[c] + (rng.random((n, classes)) < 0.1)).clip(0, 1).astype(np.float32)
    if kind == "regression":
        return x, centres[c, 0] * 10 + rng.normal(size=n) * 0.1
    return x, c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=10)
    a = p.parse_args()
    split = np.array(["train"] * 8 + ["valid"] + ["test"], dtype=object)[np.arange(a.n) % 10]
    print(f"{a.n} x {a.dim} embeddings, {a.classes} classes, torch threads {torch.get_num_threads()}\n")
    print("| kind | probe | seconds | chosen | test primary |\n|---|---|---|---|---|")
    total = 0.0
    for kind in ("classification", "multilabel", "regression"):
        x, y = synthetic(kind, a.n, a.dim, a.classes)
        problem = make_problem(kind, x, y, split, a.classes)
        for probe in PROBES:
            start = time.perf_counter()
            fit = run_probe(probe, problem)
            seconds = time.perf_counter() - start
            total += seconds
            print(f"| {kind} | {probe} | {seconds:.1f} | {fit.params} | {fit.test[problem.primary]:.3f} |")
    print(f"\nall probes, all kinds: {total:.1f} s")


if __name__ == "__main__":
    main()
