"""Ported encoders vs their upstream references: forward time on the same CPU input, and peak memory
of `embed()` on a long track.

    python bench/parity_speed.py                       # every port whose reference is installed
    python bench/parity_speed.py --models hubert dasheng --repeats 5
    python bench/parity_speed.py --memory --seconds 600  # also peak RSS of embed() on 10 min of audio

Speed: each family's parity test module (tests/test_parity_FAMILY.py) provides
`make_pair(full=True) -> (ours, reference, input)`, both at the released size with the same random
weights. The two forwards run alternately in one process (these machines are noisy), after one
warm-up each, alternating which goes first; the table gives the median time and the ratio ours / reference (< 1: ours is faster).
Memory: each registered port is built at its released size with random weights in a fresh process,
which embeds `--seconds` of noise through `enc.embed()` (windows of the model's context, batch 1);
the table gives the peak resident memory of that process and the part added by embed().
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["hubert", "conformer", "omar_rq", "dasheng", "pesto", "music2latent", "htsat"]
MODELS = ["mert-v1-95m", "mert-v1-330m", "musicfm-msd", "muq-msd", "omar-rq-base", "omar-rq-multifeature-25hz-fsq",
          "dasheng-base", "pesto-mir1k", "music2latent", "clap-music"]


def _timed(fn, x) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - start


def time_family(family: str, repeats: int) -> dict | None:
    """Median forward seconds of ours and of the reference, alternated, on the same input."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        module = importlib.import_module(f"test_parity_{family}")
        ours, ref, x = module.make_pair(full=True)
    except BaseException as err:  # noqa: BLE001 -- a missing reference (pytest.skip) is reported, not fatal
        print(f"{family}: skipped ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
              file=sys.stderr)
        return None
    _timed(ours, x), _timed(ref, x)
    t_ours, t_ref = [], []
    for i in range(repeats):  # alternate which goes first, so neither always runs on a warmer cache
        if i % 2:
            t_ref.append(_timed(ref, x))
            t_ours.append(_timed(ours, x))
        else:
            t_ours.append(_timed(ours, x))
            t_ref.append(_timed(ref, x))
    return {"family": family, "ours": statistics.median(t_ours), "ref": statistics.median(t_ref),
            "input": "x".join(str(s) for s in getattr(x, "shape", ()))}


def memory_child(name: str, seconds: float) -> None:
    """Runs in a fresh process: print JSON with RSS after building `name` and peak RSS after embed()."""
    import numpy as np

    import musicssl

    enc = musicssl.load(name, pretrained=False)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * enc.sample_rate))).astype(np.float32)
    start = time.perf_counter()
    out = enc.embed(audio, sr=enc.sample_rate, batch_size=1)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"name": name, "load_mb": after_load, "peak_mb": peak, "frames": int(out.lengths[0]),
                      "seconds": wall}))


def memory_table(names: list[str], seconds: float) -> None:
    print(f"\npeak resident memory of embed() on {seconds:g} s of audio (fresh process per model, batch 1)")
    print(f"{'model':<32} {'after build MB':>15} {'peak MB':>9} {'added MB':>9} {'frames':>7} {'wall s':>7}")
    for name in names:
        cmd = [sys.executable, __file__, "--memory-child", name, "--seconds", str(seconds)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=checkout.child_env())
        if res.returncode != 0:
            print(f"{name:<32} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name:<32} {r['load_mb']:>15.0f} {r['peak_mb']:>9.0f} {r['peak_mb'] - r['load_mb']:>9.0f} "
              f"{r['frames']:>7} {r['seconds']:>7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=FAMILIES, help="families to time (default all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="also measure embed() memory per registered port")
    p.add_argument("--memory-models", nargs="*", default=MODELS)
    p.add_argument("--seconds", type=float, default=600.0, help="track length for --memory (default 10 min)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.seconds)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} alternated runs")
    print(f"{'family':<14} {'input':>14} {'ours s':>9} {'reference s':>12} {'ours/ref':>9}")
    for family in args.models:
        r = time_family(family, args.repeats)
        if r:
            print(f"{r['family']:<14} {r['input']:>14} {r['ours']:>9.3f} {r['ref']:>12.3f} {r['ours'] / r['ref']:>9.2f}")
    if args.memory:
        memory_table(args.memory_models, args.seconds)


if __name__ == "__main__":
    main()
