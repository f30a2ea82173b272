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
    """Measured dense matmul rate in TFLOP/s: n x n x n (n = 8192 on GPU, 4096 on CPU; 1024 for
    float16 on CPU, which has no fp16 matrix units: a 4096 cube takes minutes there)."""
    n = 8192 if device.startswith("cuda") else 1024 if dtype == torch.float16 else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats) / 1e12


def dtypes_for(device: str, chosen: list[str] | None) -> list[str]:
    """The dtypes timed on `device`: those given, else all three on a GPU and float32 + bfloat16 on
    a CPU (float16 matmuls on a CPU run ~100x slower than bfloat16: no one would embed in it there)."""
    if chosen:
        return chosen
    return list(DTYPES) if device.startswith("cuda") else ["float32", "bfloat16"]


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
    """Clips of about a minute that cut into exactly two full batches of whole windows: a clip of
    W + (k - 1) * step samples holds k windows of W, none of them short (a short last window would
    go into a batch of its own, and the rate said to be batch B's would be smaller batches')."""
    W, step, _ = enc.window_plan()
    per_clip = max(1, round((CLIP_SECONDS * enc.sample_rate - W) / step) + 1)
    counts = [per_clip] * (2 * batch // per_clip) + ([2 * batch % per_clip] if 2 * batch % per_clip else [])
    return [noise((W + (k - 1) * step) / enc.sample_rate, enc.sample_rate, seed=i) for i, k in enumerate(counts)]


def x_realtime(enc: musicssl.Encoder, device: str, batch: int, repeats: int) -> float:
    clips = clips_for(enc, batch)
    seconds = sum(len(c) for c in clips) / enc.sample_rate
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


# Relative error under which the two sides' outputs count as equal (the parity tests hold 1e-5 at
# small sizes; the released sizes sum over more terms).
EQUAL_OUTPUTS = 1e-4


def reference_ratio(name: str, device: str, repeats: int) -> dict | None:
    """Forward time of the upstream reference / ours on the same input, float32, alternated runs."""
    family = REFERENCE.get(name)
    if family is None:
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        with torch.device(device):  # weights, and tensors the pair's closures make, on the device
            ours, ref, x = importlib.import_module(f"test_parity_{family}").make_pair(full=True)
    except BaseException as err:  # noqa: BLE001 -- a reference not installed (pytest.skip) is reported
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    for m in _modules(ours) + _modules(ref):
        m.to(device)
    try:
        t_ours, t_ref, err = alternate_times(ours, ref, x.to(device), device, repeats)
    except RuntimeError as err:  # a reference that cannot run on this device
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    res = {"family": family, "ours_s": statistics.median(t_ours), "reference_s": statistics.median(t_ref),
           "rel_err": err}
    if not err <= EQUAL_OUTPUTS:  # a speed-up of unequal outputs says nothing
        return {**res, "unequal": f"outputs differ by {err:.1e} (more than {EQUAL_OUTPUTS:g})"}
    return {**res, "speedup": statistics.median(t_ref) / statistics.median(t_ours)}


def _modules(fn) -> list[torch.nn.Module]:
    """The module `fn` is, or those its closure holds (a make_pair may return a function over one)."""
    if isinstance(fn, torch.nn.Module):
        return [fn]
    return [c.cell_contents for c in getattr(fn, "__closure__", None) or () if isinstance(c.cell_contents, torch.nn.Module)]


def alternate_times(ours, ref, x: torch.Tensor, device: str, repeats: int) -> tuple[list[float], list[float], float]:
    """Alternated timed calls of both sides (the first round a warm-up) and the relative error of
    ours against the reference on the warm-up's outputs."""
    t_ours: list[float] = []
    t_ref: list[float] = []
    outputs = {}
    with torch.inference_mode():
        for i in range(repeats + 1):  # which side goes first alternates
            for fn, out in [(ours, t_ours), (ref, t_ref)][:: 1 if i % 2 else -1]:
                start = time.perf_counter()
                y = fn(x)
                sync(device)
                if i:
                    out.append(time.perf_counter() - start)
                else:
                    outputs[fn] = y
    return t_ours, t_ref, output_error(outputs[ours], outputs[ref])


def output_error(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over every tensor both return (hidden states as a list or stacked);
    where one side returns only the last hidden state, over that one."""
    a, b = _tensors(ours), _tensors(ref)
    if sum(t.numel() for t in a) != sum(t.numel() for t in b):
        a, b = a[-1:], b[-1:]
    va = torch.cat([t.detach().double().flatten().cpu() for t in a])
    vb = torch.cat([t.detach().double().flatten().cpu() for t in b])
    if va.shape != vb.shape:
        return math.inf
    return float((va - vb).norm() / vb.norm().clamp_min(1e-30))


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    hidden = getattr(out, "hidden_states", None) or getattr(out, "last_hidden_state", None)
    return _tensors(hidden) if hidden is not None else []


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
    musicssl.list_models()  # imports every family: the import time is its own figure
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
        for dtype in dtypes_for(device, a.dtypes):
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
        row["memory"][device].update(dtype=a.memory_dtype, batch=a.memory_batch)  # one run, whatever the row's dtype
        row.setdefault("reference", {})[device] = reference_ratio(name, device, a.repeats) if a.reference else None
    return row


def table(rows: list[dict], a: argparse.Namespace) -> str:
    long_minutes, of = a.long_minutes, f"{a.memory_dtype}, batch {a.memory_batch}"
    head = (f"| model | device | dtype | x-rt batch 1 | x-rt best (batch) | drift vs fp32 | GFLOP/audio-s | TFLOP/s | "
            f"% matmul peak | peak MiB 1 min ({of}) | peak MiB {long_minutes:g} min ({of}) | load s | ref. speed-up |")
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
                f"{format(ref['speedup'], '.2f') if 'speedup' in ref else 'unequal' if 'unequal' in ref else '-'} |")
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
    p.add_argument("--dtypes", nargs="*", default=None, choices=list(DTYPES),
                   help="default: all three on a GPU, float32 and bfloat16 on a CPU")
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
    info["import_models_s"] = import_seconds("import musicssl; musicssl.list_models()", a.import_repeats)  # + the zoo
    peaks = {d: {t: matmul_peak(d, DTYPES[t]) for t in dtypes_for(d, a.dtypes)} for d in a.devices}
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
    print(table(rows, a))


if __name__ == "__main__":
    main()
