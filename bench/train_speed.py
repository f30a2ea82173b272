"""Training throughput of every recipe at its tiny and base presets.

    python bench/train_speed.py [--recipes jepa mae] [--batch 16] [--steps 3] [--device cuda]

Times optimisation steps on a fixed synthetic batch (after one warm-up step) and prints samples/s
and seconds of audio/s; on CUDA also the model FLOP utilisation: FLOPs of one step counted by
torch.utils.flop_counter (matmuls and convolutions, forward and backward) divided by the step
time and by the device's measured bf16 matmul peak.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from musicssl.recipes.data import SyntheticMusic
from musicssl.recipes.train import recipe_class


def presets(recipe: str) -> list[str]:
    """The recipe's presets whose name ends in a size we report (or its only preset)."""
    names = list(recipe_class(recipe).PRESETS)
    chosen = [n for n in names if n.endswith(("-tiny", "-base")) or n == "clmr"]
    return chosen or names[:1]


def matmul_peak(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s of the device."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def time_step(recipe: str, preset: str, batch_size: int, steps: int, device: torch.device, amp) -> dict:
    cls = recipe_class(recipe)
    values = cls.PRESETS[preset]
    model = cls(cls.Config(**{k: v for k, v in values.items() if k in cls.Config.__dataclass_fields__})).to(device)
    sr = model.export_encoder().sample_rate
    data = SyntheticMusic(sample_rate=sr, crop_seconds=model.cfg.crop_seconds, length=batch_size)
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in model.collate([data[i] for i in range(batch_size)]).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model.training_step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(0, 100)

    step()
    flops = None
    if device.type == "cuda":
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"sps": batch_size / seconds, "audio": batch_size * model.cfg.crop_seconds / seconds,
            "flops": flops / seconds if flops else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=["simclr", "byol", "vicreg", "mae", "jepa", "pesto"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 autocast on CUDA, fp32 on CPU")
    a = p.parse_args()
    device = torch.device(a.device)
    amp = {"bf16": torch.bfloat16, "fp32": None}[a.precision or ("bf16" if device.type == "cuda" else "fp32")]
    peak = matmul_peak(device) if device.type == "cuda" else None
    print(f"device {device}, batch {a.batch}, precision {a.precision or 'default'}"
          + (f", bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print(f"{'recipe':<8} {'preset':<12} {'samples/s':>10} {'audio s/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for recipe in a.recipes:
        for preset in presets(recipe):
            r = time_step(recipe, preset, a.batch, a.steps, device, amp)
            tf = f"{r['flops'] / 1e12:>8.1f} {r['flops'] / peak:>6.1%}" if r["flops"] else f"{'-':>8} {'-':>6}"
            print(f"{recipe:<8} {preset:<12} {r['sps']:>10.2f} {r['audio']:>10.1f} {tf}", flush=True)


if __name__ == "__main__":
    main()
