"""How much of the model's work `musicssl embed` spends on padding, for folders of several shapes.

    python bench/packing.py

Windows of files of the given lengths go through the run's `WindowPacker` exactly as `extract`
drives it (no audio, no model: the same test helper, `tests/test_extract.py::pack`). The table gives
the padded share of the batches' samples (the compute spent on zeros), the most files open at once
and the most bytes of audio and frames they held (float32, one layer).
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_extract import pack  # noqa: E402 -- the tests folder is not a package

FOLDERS = {  # name -> seconds of each file, seeded
    "10 s clips": lambda rng: [10.0] * 120,
    "1-60 s files": lambda rng: rng.uniform(1, 60, 400).tolist(),
    "1 s-10 min files": lambda rng: np.exp(rng.uniform(0, np.log(600), 400)).tolist(),
    "2-6 min songs": lambda rng: rng.uniform(120, 360, 60).tolist(),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["simclr-mini", "mert-v1-95m"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    args = p.parse_args()
    print("| model | folder | batch | padded | most open files | most held MiB |\n|---|---|---|---|---|---|")
    for model in args.models:
        for folder, make in FOLDERS.items():
            for batch in args.batches:
                # As extract() sets it up: 4x the batch (at least 32) files open, within 1 GiB.
                got = pack(make(np.random.default_rng(0)), batch, 4 * max(batch, 8), model=model)
                print(f"| {model} | {folder} | {batch} | {100 * got['waste']:.1f} % | {got['open']} | "
                      f"{got['held'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
