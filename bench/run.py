"""One table for the zoo: speed, precision drift, FLOP rate, memory, import and load time, and the
ratio to each port's upstream reference, on CPU and (when present) on a CUDA device.

    python -m bench                                   # every model with an architecture, CPU (+ CUDA)
    python -m bench --models simclr-mini mert-v1-95m --devices cpu --long-minutes 60
    python -m bench --devices cuda --dtypes bfloat16 float16 --json bench/results/h100.json

Prints one table and writes JSON (--json). The method (warm-up, medians, what is counted) is in
bench/README.md; figures and the machines they came from are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` from anywhere imports the checkout's musicssl
    sys.path.insert(0, str(ROOT))

import musicssl  # noqa: E402

# Each port's parity test builds it and its upstream reference at the released size (make_pair).
REFERENCE = {"mert-v1-95m": "hubert", "musicfm-msd": "conformer", "omar-rq-base": "omar_rq",
             "dasheng-base": "dasheng", "pesto-mir1k": "pesto", "music2latent": "music2latent",
             "clap-music": "htsat"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_SECONDS = 60.0  # timing input: clips of one minute, as many as two full batches need


# --- the machine ------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured dense matmul rate in TFLOP/s: n x n x n (n = 8192 on GPU, 4096 on CPU)."""
    n = 8192 if device.startswith("cuda") else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats) / 1e12


def hardware(devices: list[str]) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "musicssl": musicssl.__version__, "python": platform.python_version()}
    if any(d.startswith("cuda") for d in devices):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- one model --------------------------------------------------------------------------------
def noise(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """float32 noise drawn as float32: a float64 draw would add twice the audio to the peak memory."""
    x = np.random.default_rng(seed).standard_normal(int(seconds * sr), dtype=np.float32)
    x *= 0.1
    return x


def clips_for(enc: musicssl.Encoder, batch: int) -> list[np.ndarray]:
    """Enough one-minute clips for two full batches of windows."""
    per_clip = max(1, math.ceil(CLIP_SECONDS / (enc.context_seconds - enc.overlap_seconds)))
    n = max(1, math.ceil(2 * batch / per_clip))
    return [noise(CLIP_SECONDS, enc.sample_rate, seed=i) for i in range(n)]


def x_realtime(enc: musicssl.Encoder, device: str, batch: int, repeats: int) -> float:
    clips = clips_for(enc, batch)
    seconds = CLIP_SECONDS * len(clips)
    return seconds / median_seconds(lambda: enc.embed(clips, sr=enc.sample_rate, batch_size=batch), device, repeats)


def best_batch(enc: musicssl.Encoder, device: str, batches: list[int], repeats: int,
               rate_at_1: float) -> tuple[int, float]:
    """Largest rate over `batches` (ascending, after batch 1); stops at the first that is not 3 %
    faster, or at out-of-memory."""
    best = (1, rate_at_1)
    for b in (b for b in batches if b > 1):
        try:
            rate = x_realtime(enc, device, b, repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if rate < best[1] * 1.03:
            break
        best = (b, rate)
    return best


def drift(enc: musicssl.Encoder, reference: torch.Tensor) -> float:
    """Relative error ||E - E_ref|| / ||E_ref|| of the frame embeddings of one clip against CPU float32."""
    frames = enc.embed(noise(CLIP_SECONDS, enc.sample_rate, seed=99), sr=enc.sample_rate).frames.double()
    return float((frames - reference).norm() / reference.norm())


def gflop_per_second(enc: musicssl.Encoder) -> float:
    """Model FLOPs per second of audio, counted by torch's FlopCounterMode on one minute of audio:
    matmuls, convolutions and attention (2 per multiply-add); norms and activations are not counted.
    Attention runs through SDPA's math path here, which the counter sees (it has no formula for the
    CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        enc.embed(noise(CLIP_SECONDS, enc.sample_rate), sr=enc.sample_rate, batch_size=1)
    return counter.get_total_flops() / CLIP_SECONDS / 1e9


def reference_ratio(name: str, device: str, repeats: int) -> dict | None:
    """Forward time of the upstream reference / ours on the same input, float32, alternated runs."""
    family = REFERENCE.get(name)
    if family is None:
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        ours, ref, x = importlib.import_module(f"test_parity_{family}").make_pair(full=True)
    except BaseException as err:  # noqa: BLE001 -- a reference not installed (pytest.skip) is reported
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    for m in (ours, ref):
        if isinstance(m, torch.nn.Module):
            m.to(device)
    try:
        t_ours, t_ref = alternate_times(ours, ref, x.to(device), device, repeats)
    except RuntimeError as err:  # a reference that cannot run on this device
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    return {"family": family, "ours_s": statistics.median(t_ours), "reference_s": statistics.median(t_ref),
            "speedup": statistics.median(t_ref) / statistics.median(t_ours)}


def alternate_times(ours, ref, x: torch.Tensor, device: str, repeats: int) -> tuple[list[float], list[float]]:
    t_ours: list[float] = []
    t_ref: list[float] = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first round is the warm-up; which side goes first alternates
            for fn, out in [(ours, t_ours), (ref, t_ref)][:: 1 if i % 2 else -1]:
                start = time.perf_counter()
                fn(x)
                sync(device)
                if i:
                    out.append(time.perf_counter() - start)
    return t_ours, t_ref


# --- fresh processes: memory, import, load ----------------------------------------------------
def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB (VmHWM is this process's own, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, device: str, dtype: str, minutes: float, batch: int) -> dict:
    """Peak memory of embed() on `minutes` of audio: host RSS (and GPU allocator) above what was
    held before the call, and the size of the returned frames (float32), in MiB."""
    enc = musicssl.load(name, pretrained=False, device=device, dtype=DTYPES[dtype])
    audio = noise(minutes * 60, enc.sample_rate)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    try:  # start the peak (VmHWM) from here: building the model and the audio passed through more
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = status_mb("VmRSS")
    out = enc.embed(audio, sr=enc.sample_rate, batch_size=batch)
    res = {"host_mb": status_mb("VmHWM") - before, "output_mb": out.frames.numel() * 4 / 2**20}
    if device.startswith("cuda"):
        res["gpu_mb"] = (torch.cuda.max_memory_allocated() - gpu_before) / 2**20
    return res


def load_child(folder: str) -> dict:
    start = time.perf_counter()
    musicssl.load(folder)
    return {"load_s": time.perf_counter() - start}


def import_seconds(code: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_seconds(name: str, repeats: int = 3) -> float:
    """`load()` of a release folder already on disk (what a cached Hub download is), fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        musicssl.save_pretrained(musicssl.load(name, pretrained=False), tmp)
        return statistics.median(child(["load", tmp])["load_s"] for _ in range(repeats))


# --- the run ----------------------------------------------------------------------------------
def measure_run(enc: musicssl.Encoder, device: str, dtype: str, compiled: bool, a: argparse.Namespace,
                gflop: float, reference: torch.Tensor, peak: float) -> dict:
    """One table row: rates at batch 1 and the best batch, drift, FLOP rate. A compiled model's
    first call (its compile, which the rates' warm-up absorbs) is timed on its own."""
    batches = a.cpu_batches if device == "cpu" else a.gpu_batches
    start = time.perf_counter()
    if compiled:
        for b in [1] + [b for b in batches if b > 1]:
            enc.embed(clips_for(enc, b), sr=enc.sample_rate, batch_size=b)
    compile_s = time.perf_counter() - start
    b1 = x_realtime(enc, device, 1, a.repeats)
    bb, rate = best_batch(enc, device, batches, a.repeats, b1)
    print(f"  {device} {dtype}{' compiled' if compiled else ''}: {b1:.1f}x at batch 1, {rate:.1f}x at batch {bb}",
          file=sys.stderr, flush=True)
    return {"device": device, "dtype": dtype, "compiled": compiled, "compile_s": compile_s if compiled else None,
            "x_rt_batch1": b1, "best_batch": bb, "x_rt_best": rate, "drift": drift(enc, reference),
            "tflops": gflop * rate / 1e3, "peak_fraction": gflop * rate / 1e3 / peak}


def measure_model(name: str, a: argparse.Namespace, peaks: dict) -> dict:
    row: dict = {"model": name, "load_s": load_seconds(name)}
    torch.manual_seed(0)
    cpu32 = musicssl.load(name, pretrained=False)  # every run below is a copy: the drift compares like with like
    row["gflop_per_audio_s"] = gflop_per_second(cpu32)
    reference = cpu32.embed(noise(CLIP_SECONDS, cpu32.sample_rate, seed=99), sr=cpu32.sample_rate).frames.double()
    row["runs"] = []
    for device in a.devices:
        for dtype in a.dtypes:
            for compiled in (False, True) if a.compile else (False,):
                enc = copy.deepcopy(cpu32).to(device=device, dtype=DTYPES[dtype])
                if compiled:
                    enc.compile_windows()
                row["runs"].append(measure_run(enc, device, dtype, compiled, a, row["gflop_per_audio_s"], reference,
                                               peaks[device][dtype]))
                del enc
        row.setdefault("memory", {})[device] = {
            f"{m:g}min": child(["memory", name, device, a.memory_dtype, str(m), str(a.memory_batch)])
            for m in (1, a.long_minutes)}
        row.setdefault("reference", {})[device] = reference_ratio(name, device, a.repeats) if a.reference else None
    return row


def table(rows: list[dict], long_minutes: float) -> str:
    head = (f"| model | device | dtype | x-rt batch 1 | x-rt best (batch) | drift vs fp32 | GFLOP/audio-s | TFLOP/s | "
            f"% matmul peak | peak MiB 1 min | peak MiB {long_minutes:g} min | load s | ref. speed-up |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        for run in r["runs"]:
            mem = r["memory"][run["device"]]
            ref = (r.get("reference") or {}).get(run["device"]) or {}
            lines.append(
                f"| {r['model']} | {run['device']} | {run['dtype']}{' compiled' if run.get('compiled') else ''} | "
                f"{run['x_rt_batch1']:.1f} | "
                f"{run['x_rt_best']:.1f} ({run['best_batch']}) | {run['drift']:.1e} | {r['gflop_per_audio_s']:.1f} | "
                f"{run['tflops']:.2f} | {100 * run['peak_fraction']:.0f} | {memory_cell(mem['1min'])} | "
                f"{memory_cell(mem[f'{long_minutes:g}min'])} | {r['load_s']:.2f} | "
                f"{format(ref['speedup'], '.2f') if 'speedup' in ref else '-'} |")
    return "\n".join(lines)


def memory_cell(m: dict) -> str:
    """Peak added by embed() (GPU allocator on CUDA, else host RSS), and the frames' own share."""
    if "error" in m:
        return "failed"
    return f"{m.get('gpu_mb', m['host_mb']):.0f} (frames {m['output_mb']:.0f})"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, help="default: every registered architecture")
    p.add_argument("--devices", nargs="*", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--cpu-batches", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--gpu-batches", type=int, nargs="*", default=[1, 4, 16, 32, 64, 128])
    p.add_argument("--long-minutes", type=float, default=60.0, help="the long input of the memory figure")
    p.add_argument("--memory-dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--memory-batch", type=int, default=1,
                   help="windows per forward pass of the memory runs (at a fixed batch, the peak must not grow "
                        "with the length)")
    p.add_argument("--compile", action="store_true", help="also time each dtype under Encoder.compile_windows()")
    p.add_argument("--import-repeats", type=int, default=5, help="fresh interpreters per import time (median)")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["--child"]:
        kind, *rest = sys.argv[2:]
        res = memory_child(rest[0], rest[1], rest[2], float(rest[3]), int(rest[4])) if kind == "memory" \
            else load_child(rest[0])
        print(json.dumps(res))
        return
    a = parse(argv)
    names = a.models or musicssl.list_models(pretrained=False)
    info = hardware(a.devices)
    info["import_torch_s"] = import_seconds("import torch", a.import_repeats)
    info["import_musicssl_s"] = import_seconds("import musicssl", a.import_repeats)  # lazy: torch comes later
    info["import_models_s"] = import_seconds("import musicssl.factory", a.import_repeats)  # torch and the zoo
    peaks = {d: {t: matmul_peak(d, DTYPES[t]) for t in a.dtypes} for d in a.devices}
    info["matmul_peak_tflops"] = peaks
    print(json.dumps(info), file=sys.stderr, flush=True)
    rows = []
    for name in names:
        rows.append(measure_model(name, a, peaks))
        if a.json:  # after every model, so a run stopped part-way keeps what it measured
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"hardware": info, "models": rows}, indent=1) + "\n")
    print(f"{info['cpu']} ({info['cores']} cores){', ' + info['gpu'] if 'gpu' in info else ''}; torch {info['torch']}; "
          f"import musicssl {info['import_musicssl_s']:.2f} s, with torch and the zoo "
          f"{info['import_models_s']:.2f} s (torch alone {info['import_torch_s']:.2f} s); "
          "matmul peak TFLOP/s " + ", ".join(f"{d} {t} {v:.2f}" for d, p in peaks.items() for t, v in p.items()))
    print(table(rows, a.long_minutes))


if __name__ == "__main__":
    main()
