"""End-to-end extraction vs the model alone, on real compressed music.

    python bench/extract_speed.py                                    # default model, soundtrack FLACs
    python bench/extract_speed.py --model mert-v1-95m --minutes 5    # a large port (random weights if none cached)
    python bench/extract_speed.py --codec mp3                        # transcode to 44.1 kHz stereo MP3 first (ffmpeg)
    python bench/extract_speed.py --data MP3_FOLDER --device cuda --dtype bfloat16  # any folder of music, as is

Model only: every file decoded beforehand (not timed), then `enc.embed(all clips, batch_size=B)`.
End to end: `musicssl.extract(folder, OUT, enc, batch_size=B)` -- what `musicssl embed` runs once the
model is loaded: decoding in worker processes, windows packed across files, outputs and manifest
written. Both run alternately `--repeats` times in one process (medians; these machines are noisy),
with the allocator setting of the `musicssl` command (`musicssl.heap`),
and the table gives x-realtime (seconds of audio per second) and their ratio (the target: >= 0.8),
with the rate of decoding + resampling alone, in one process and in the run's decoding processes
(where the latter is not far above the model's, the run is decode-bound on this machine).
On a GPU, the mean GPU utilisation during the end-to-end runs is sampled too (needs pynvml). The
last line splits the end-to-end runs' time into what `ExtractResult.stages` names: the model
(starting batches and waiting for them), waiting for decoded audio, waiting for writes, and the
rest of the host's work (stitching, bookkeeping): the largest is what bounds the run.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import musicssl
from musicssl.audio.io import audio_info, find_audio_files, load_audio
from musicssl.bulk import extract
from musicssl.bulk.decoders import DecoderPool
from musicssl.bulk.run import LOCAL_THREADS, _cores, default_workers
from musicssl.heap import keep_freed_memory

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dev" / "audio" / "soundtrack"


def pick_files(folder: Path, minutes: float) -> list[Path]:
    files, total = [], 0.0
    for f in find_audio_files(folder):
        if total >= minutes * 60:
            break
        files.append(f)
        total += audio_info(f).duration
    return files


def stage(files: list[Path], dest: Path, codec: str) -> None:
    """Copy (`copy`) or transcode (mp3/opus, 44.1 kHz stereo like ripped music) the files into `dest`."""
    if codec != "copy" and shutil.which("ffmpeg") is None:
        sys.exit(f"--codec {codec} transcodes with ffmpeg, which is not on PATH: install it (apt-get install ffmpeg), "
                 "or give --data a folder of such files with --codec copy")
    dest.mkdir(parents=True)
    for f in files:
        if codec == "copy":
            shutil.copy(f, dest / f.name)
            continue
        out = dest / f"{f.stem}.{codec}"
        args = ["-c:a", "libmp3lame", "-b:a", "192k"] if codec == "mp3" else ["-c:a", "libopus", "-b:a", "96k"]
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(f), "-ac", "2", "-ar", "44100" if codec == "mp3" else "48000",
                        *args, str(out)], check=True)


def parallel_decode_rate(files: list[Path], sr: int, workers: int) -> float:
    """x-realtime of decoding + resampling alone, as the run decodes (no model): in its decoding
    processes, or with none on its own threads."""
    start, samples = time.perf_counter(), 0
    with DecoderPool([str(f) for f in files], sr, workers, threads=min(LOCAL_THREADS, _cores())) as pool:
        for item in pool:
            samples += len(item["audio"])
    return samples / sr / (time.perf_counter() - start)


def encoder(name: str, device: str, dtype: torch.dtype) -> tuple[musicssl.Encoder, str]:
    try:
        enc, weights = musicssl.load(name, offline=True), "released"
    except musicssl.errors.MusicsslError:  # weights not cached here: the same network, random weights
        enc, weights = musicssl.load(name, pretrained=False), "random (same compute)"
    return enc.to(device=device, dtype=dtype).eval(), weights


class GpuSampler:
    """Mean GPU utilisation (%) over a block, sampled every 0.2 s; None without CUDA or pynvml."""

    def __enter__(self) -> "GpuSampler":
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if torch.cuda.is_available():
            self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # noqa: BLE001 -- pynvml missing: no figure
                return

    def __exit__(self, *exc) -> None:
        self.stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=musicssl.registry.DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=DATA, help="folder of music (default: the dev soundtrack clips)")
    p.add_argument("--minutes", type=float, default=20.0, help="audio to use (default 20 min)")
    p.add_argument("--codec", choices=["copy", "mp3", "opus"], default="copy",
                   help="copy the files as they are (default), or transcode them with ffmpeg first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=None, help="decoding processes (default: extract's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    heap = keep_freed_memory()  # as the `musicssl` command does; both sides below run with it
    enc, weights = encoder(args.model, args.device, getattr(torch, args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "music"
        stage(pick_files(args.data, args.minutes), folder, args.codec)
        files = sorted(folder.iterdir())
        start = time.perf_counter()
        clips = [load_audio(f, sr=enc.sample_rate)[0] for f in files]
        decode_t = time.perf_counter() - start
        seconds = sum(len(c) for c in clips) / enc.sample_rate
        workers = args.num_workers if args.num_workers is not None else default_workers(torch.device(args.device))
        decode_par = parallel_decode_rate(files, enc.sample_rate, workers)
        enc.embed(clips[:2], sr=enc.sample_rate, batch_size=args.batch_size)  # warm-up
        model_t, e2e_t, util, stages = [], [], [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            enc.embed(clips, sr=enc.sample_rate, batch_size=args.batch_size)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            model_t.append(time.perf_counter() - start)
            out = Path(tmp) / f"out{i}"
            with GpuSampler() as gpu:
                start = time.perf_counter()
                res = extract([folder], out, enc, batch_size=args.batch_size, num_workers=args.num_workers,
                              progress=False)
                e2e_t.append(time.perf_counter() - start)
            util.append(gpu.mean)
            stages.append(res.stages)
            assert res.ok == len(files), f"{res.failed} files failed"
            shutil.rmtree(out)
    m, e = seconds / statistics.median(model_t), seconds / statistics.median(e2e_t)
    print(f"{args.model} ({weights} weights), {args.device} {args.dtype}, batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, freed memory kept: {heap}")
    print(f"{len(files)} {args.codec} files, {seconds / 60:.1f} min of audio; median of {args.repeats} alternated runs")
    print(f"{'decode x-rt (1 process)':>24} {f'decode x-rt ({workers} workers)':>26} {'model only x-rt':>16} "
          f"{'end to end x-rt':>16} {'ratio':>6}" + ("  GPU util %" if util[0] else ""))
    print(f"{seconds / decode_t:>24.1f} {decode_par:>26.1f} {m:>16.1f} {e:>16.1f} {e / m:>6.2f}"
          + (f"  {statistics.mean(util):.0f}" if util[0] else ""))
    spent = {k: statistics.median(st[k] for st in stages) for k in stages[0]}
    print("end to end, the loop's time (median): " + ", ".join(
        f"{k} {100 * v / sum(spent.values()):.0f} %" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
