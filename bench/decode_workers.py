"""`musicssl embed` with decoding in the run's own process (--num-workers 0), one file at a time or
several on threads, against decoding processes (--num-workers N), which isolate a file that crashes
or hangs its decoder.

    python bench/decode_workers.py                     # soundtrack FLACs as they are, and as 44.1 kHz stereo MP3
    python bench/decode_workers.py --setups 0/1 0 1 2 --minutes 10

A setup is "N" (N decoding processes; with 0, the run's own threads, as many as it picks) or "0/T"
(in the run's process, T files at a time). For each codec, `musicssl.extract(folder, OUT, model)`
runs once per setup per round, in alternating order, `--rounds` times in one process (medians: these
machines are noisy). The model's threads are what the run gives it (`model_threads`: one core left
per decoding process). Each run starts its own processes, so their start (~0.2 s) is in the time, as
it is in a real run.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import musicssl
from musicssl.bulk import extract
from musicssl.bulk import run as bulk_run
from musicssl.heap import keep_freed_memory

from extract_speed import DATA, encoder, pick_files, stage


def compare(folder: Path, enc: musicssl.Encoder, setups: list[str], rounds: int, tmp: Path) -> dict[str, list[float]]:
    """Wall seconds of the whole run per setup, alternating the order every round."""
    times: dict[str, list[float]] = {s: [] for s in setups}
    files = len(list(folder.iterdir()))
    default_threads = bulk_run.LOCAL_THREADS
    for r in range(rounds):
        for setup in setups if r % 2 == 0 else setups[::-1]:
            workers, _, threads = setup.partition("/")
            bulk_run.LOCAL_THREADS = int(threads) if threads else default_threads
            out = tmp / f"out-{r}"
            start = time.perf_counter()
            res = extract([folder], out, enc, num_workers=int(workers), progress=False)
            times[setup].append(time.perf_counter() - start)
            assert res.ok == files, f"{res.failed} files failed"
            shutil.rmtree(out)
    bulk_run.LOCAL_THREADS = default_threads
    return times


def label(setup: str) -> str:
    workers, _, threads = setup.partition("/")
    if threads:
        return f"in the run, {threads} at once"
    return "in the run" if workers == "0" else f"{workers} processes"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=musicssl.registry.DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--codecs", nargs="+", default=["copy", "mp3"], choices=["copy", "mp3", "opus"])
    p.add_argument("--setups", nargs="+", default=["0/1", "0", "1"], help="N processes, or 0/T threads in the run")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    keep_freed_memory()
    enc, weights = encoder(args.model, "cpu", torch.float32)  # random weights where none are cached: the same compute
    setups = args.setups
    print(f"{args.model} ({weights} weights), {args.minutes:g} min of audio, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} alternated runs (s), x-realtime, and time against the first")
    print(f"{'codec':>6} " + " ".join(f"{label(s):>22}" for s in setups))
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs:
            folder = Path(tmp) / codec
            files = pick_files(args.data, args.minutes)
            stage(files, folder, codec)
            seconds = sum(musicssl.audio.io.audio_info(f).duration for f in folder.iterdir())
            extract([folder], Path(tmp) / "warm", enc, num_workers=0, progress=False)  # warm-up
            shutil.rmtree(Path(tmp) / "warm")
            t = {s: statistics.median(v) for s, v in compare(folder, enc, setups, args.rounds, Path(tmp)).items()}
            cells = [f"{t[s]:.2f} s {seconds / t[s]:.0f}x {t[s] / t[setups[0]]:.2f}" for s in setups]
            print(f"{codec:>6} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
