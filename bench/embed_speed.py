"""Throughput and memory of `embed()` for every registered architecture at random init, on CPU.

    python bench/embed_speed.py [--models logmel jepa-tiny] [--seconds 60] [--repeats 3]

Prints import times, then one table: x-realtime (seconds of audio per wall second, median of repeats after a warm-up)
at batch 1 (one window per forward pass) and batched (8 windows), in float32 and bfloat16; then peak
memory for a 30-second and a 10-minute input, each measured in its own fresh process (peak RSS, and
the increase over the RSS just before `embed()`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import musicssl


def x_realtime(enc, audio: np.ndarray, sr: int, batch_size: int, repeats: int) -> float:
    enc.embed(audio[: sr * 2], sr=sr, batch_size=batch_size)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        enc.embed(audio, sr=sr, batch_size=batch_size)
        times.append(time.perf_counter() - t0)
    return len(audio) / sr / statistics.median(times)


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB. VmHWM belongs to this process's own
    memory map, unlike ru_maxrss, which Linux carries over from the parent across fork and exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, seconds: float, batch_size: int) -> None:
    """Run in a fresh process: embed `seconds` of noise, print peak and increase in MiB as JSON."""
    enc = musicssl.load(name, pretrained=False)
    sr = enc.sample_rate
    audio = (np.random.default_rng(0).standard_normal(int(seconds * sr)) * 0.1).astype(np.float32)
    before = status_mb("VmRSS")
    enc.embed(audio, sr=sr, batch_size=batch_size)
    peak = status_mb("VmHWM")
    print(json.dumps({"peak": peak, "increase": peak - before}))


def memory(name: str, seconds: float, batch_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, str(seconds), str(batch_size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_seconds(code: str, repeats: int = 5) -> float:
    """Median wall time of a fresh interpreter running `code`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--seconds", type=float, default=60.0, help="audio per timing run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass for the batched column")
    p.add_argument("--mem-batch", type=int, default=4,
                   help="batch for the memory runs: 30 s of audio makes 4 windows of a 10 s model, so at 4 both "
                        "inputs fill the batch alike and the ratio shows what duration costs (default 4)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        memory_child(a.child[0], float(a.child[1]), int(a.child[2]))
        return
    names = a.models or musicssl.list_models(pretrained=False)
    t_torch = import_seconds("import torch")
    t_ours = import_seconds("import torch, musicssl")
    t_load = import_seconds("import torch, musicssl; musicssl.load('logmel')")
    print(f"import: torch {t_torch:.2f} s; torch + musicssl {t_ours:.2f} s (+{t_ours - t_torch:.2f} s); "
          f"+ load('logmel') {t_load:.2f} s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.seconds:g} s of audio per run; "
          f"memory at batch {a.mem_batch}: peak RSS and its increase over the RSS before embed()")
    print(f"{'model':<12} {'dtype':<9} {'batch 1':>9} {'batch ' + str(a.batch):>9} "
          f"{'peak 30s':>9} {'peak 10m':>9} {'ratio':>6} {'+30s':>7} {'+10m':>7} {'ratio':>6}")
    for name in names:
        mem30, mem600 = memory(name, 30, a.mem_batch), memory(name, 600, a.mem_batch)
        for dtype in (torch.float32, torch.bfloat16):
            enc = musicssl.load(name, pretrained=False, dtype=dtype)
            sr = enc.sample_rate
            audio = (np.random.default_rng(0).standard_normal(int(a.seconds * sr)) * 0.1).astype(np.float32)
            r1 = x_realtime(enc, audio, sr, 1, a.repeats)
            rb = x_realtime(enc, audio, sr, a.batch, a.repeats)
            mem = (f"{mem30['peak']:>8.0f}M {mem600['peak']:>8.0f}M {mem600['peak'] / mem30['peak']:>6.2f} "
                   f"{mem30['increase']:>6.0f}M {mem600['increase']:>6.0f}M "
                   f"{mem600['increase'] / max(mem30['increase'], 1):>6.2f}") if dtype == torch.float32 else ""
            print(f"{name:<12} {str(dtype).replace('torch.', ''):<9} {r1:>8.1f}x {rb:>8.1f}x {mem}", flush=True)


if __name__ == "__main__":
    main()
