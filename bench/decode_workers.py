"""`musicssl embed` with decoding in the run's own process (--num-workers 0) against decoding
processes (--num-workers N), which isolate a file that crashes or hangs its decoder.

    python bench/decode_workers.py                     # soundtrack FLACs as they are, and as 44.1 kHz stereo MP3
    python bench/decode_workers.py --workers 1 2 --minutes 10

For each codec, `musicssl.extract(folder, OUT, model)` runs once per worker count per round, in
alternating order, `--rounds` times in one process (medians: these machines are noisy). The model's
threads are what the run gives it (`_threads_beside`: one core left per decoding process). Each run
starts its own processes, so their start (~0.2 s) is in the time, as it is in a real run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import musicssl
from musicssl.bulk import extract
from musicssl.heap import keep_freed_memory

from extract_speed import DATA, pick_files, stage


def compare(folder: Path, enc: musicssl.Encoder, counts: list[int], rounds: int, tmp: Path) -> dict[int, list[float]]:
    """Wall seconds of the whole run per worker count, alternating the order every round."""
    times: dict[int, list[float]] = {n: [] for n in counts}
    files = len(list(folder.iterdir()))
    for r in range(rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            out = tmp / f"out-{n}-{r}"
            start = time.perf_counter()
            res = extract([folder], out, enc, num_workers=n, progress=False)
            times[n].append(time.perf_counter() - start)
            assert res.ok == files, f"{res.failed} files failed"
            shutil.rmtree(out)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=musicssl.registry.DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--codecs", nargs="+", default=["copy", "mp3"], choices=["copy", "mp3", "opus"])
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="process counts to set against 0")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    keep_freed_memory()
    enc = musicssl.load(args.model).eval()
    counts = [0, *args.workers]
    print(f"{args.model}, {args.minutes:g} min of audio, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} alternated runs (s), x-realtime, and time against --num-workers 0")
    print(f"{'codec':>6} " + " ".join(f"{f'{n} workers':>22}" for n in counts))
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs:
            folder = Path(tmp) / codec
            files = pick_files(args.data, args.minutes)
            stage(files, folder, codec)
            seconds = sum(musicssl.audio.io.audio_info(f).duration for f in folder.iterdir())
            extract([folder], Path(tmp) / "warm", enc, num_workers=0, progress=False)  # warm-up
            shutil.rmtree(Path(tmp) / "warm")
            t = {n: statistics.median(v) for n, v in compare(folder, enc, counts, args.rounds, Path(tmp)).items()}
            cells = [f"{t[n]:.2f} s {seconds / t[n]:.0f}x {t[n] / t[0]:.2f}" for n in counts]
            print(f"{codec:>6} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
