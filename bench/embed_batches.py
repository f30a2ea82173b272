"""`embed()` with windows batched by length against batches filled in order, side by side.

    python bench/embed_batches.py                                   # MERT-95M bf16 and the default model
    python bench/embed_batches.py --models mert-v1-95m --dtype float32 --repeats 5

`embed()` sorts windows longest first; a batch used to take the next `batch_size` of them, so a 60 s
clip's 10 s last window ran padded to 30 s beside the two full ones. It now starts a new batch when a
window is shorter than `BATCH_MIN_SHARE` of the batch's longest. Both run alternately in one process
(random weights: the compute of the released ones), at embed()'s default batch; the table gives the
padded share of the samples run, x-realtime (median) and the speed-up.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import statistics
import time

import numpy as np
import torch

import musicssl
from musicssl.models import base
from musicssl.registry import DEFAULT_MODEL

INPUTS = {  # name -> clip lengths in seconds, seeded
    "one 60 s clip": lambda rng: [60.0],
    "four 5-40 s clips": lambda rng: rng.uniform(5, 40, 4).tolist(),
}
SHARES = {"filled in order (before)": 0.0, "by length (now)": base.BATCH_MIN_SHARE}


def padded_share(enc: musicssl.Encoder, seconds: list[float], batch_size: int, min_share: float) -> float:
    """Share of the samples run through the model that are padding."""
    windows = sorted(enc.plan_windows([int(s * enc.sample_rate) for s in seconds]), key=lambda w: -w.length)
    batches = base._length_batches(windows, batch_size, min_share)
    run = sum(len(b) * b[0].length for b in batches)
    return 1 - sum(w.length for w in windows) / run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mert-v1-95m", DEFAULT_MODEL])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8, help="embed()'s default")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, batch {a.batch_size}, "
          f"median of {a.repeats} alternated runs")
    print("| model | input | batches | padded | x-rt | speed-up |\n|---|---|---|---|---|---|")
    for name in a.models:
        enc = musicssl.load(name, pretrained=False, dtype=getattr(torch, a.dtype))
        for label, make in INPUTS.items():
            seconds = make(np.random.default_rng(0))
            clips = [np.random.default_rng(i).standard_normal(int(s * enc.sample_rate)).astype(np.float32) * 0.1
                     for i, s in enumerate(seconds)]
            enc.embed(clips, sr=enc.sample_rate, batch_size=a.batch_size)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in SHARES}
            for _ in range(a.repeats):
                for k, share in SHARES.items():
                    base.BATCH_MIN_SHARE = share
                    t = time.perf_counter()
                    enc.embed(clips, sr=enc.sample_rate, batch_size=a.batch_size)
                    times[k].append(time.perf_counter() - t)
            base.BATCH_MIN_SHARE = SHARES["by length (now)"]
            rates = {}
            for k, share in SHARES.items():
                rates[k] = sum(seconds) / statistics.median(times[k])
                print(f"| {name} | {label} | {k} | {padded_share(enc, seconds, a.batch_size, share):.0%} | {rates[k]:.1f} | "
                      f"{rates[k] / rates[next(iter(SHARES))]:.2f} |")


if __name__ == "__main__":
    main()
