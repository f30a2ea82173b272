"""Where a GPU's time goes for each model named: the forward pass alone on 16 full windows in bf16
(x-realtime, FLOPs counted on CUDA, TFLOP/s), its top CUDA kernels, then `embed()` of 24 one-minute
clips at batch 16 and its top host-side ops; the gap between the two rates is embed()'s own work.

    python bench/gpu_profile.py mert-v1-330m musicfm-msd
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import musicssl

BATCH = 16


def seconds_per_call(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def forward_alone(enc: musicssl.Encoder) -> None:
    W = int(enc.context_seconds * enc.sample_rate)
    wav = torch.randn(BATCH, W, device="cuda") * 0.1
    n = torch.full((BATCH,), W, device="cuda")
    audio_s = BATCH * enc.context_seconds
    with torch.inference_mode():
        t = seconds_per_call(lambda: enc.forward_features(wav, n))
        with FlopCounterMode(display=False) as counter:
            enc.forward_features(wav, n)
        flops = counter.get_total_flops()
        print(f"forward only, {BATCH} x {enc.context_seconds:g} s: {audio_s / t:.0f}x realtime, "
              f"{flops / audio_s / 1e9:.1f} GFLOP per audio second (counted on CUDA), {flops / t / 1e12:.0f} TFLOP/s")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            enc.forward_features(wav, n)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def embed_overhead(enc: musicssl.Encoder) -> None:
    clips = [(0.1 * np.random.default_rng(i).standard_normal(60 * enc.sample_rate)).astype(np.float32)
             for i in range(24)]
    enc.embed(clips[:2], sr=enc.sample_rate, batch_size=BATCH)
    start = time.perf_counter()
    enc.embed(clips, sr=enc.sample_rate, batch_size=BATCH)
    print(f"embed() of 24 min at batch {BATCH}: {24 * 60 / (time.perf_counter() - start):.0f}x realtime")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        enc.embed(clips, sr=enc.sample_rate, batch_size=BATCH)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)  # the models to profile are the arguments: none given, nothing would run
    for name in sys.argv[1:]:
        torch.manual_seed(0)
        enc = musicssl.load(name, pretrained=False, device="cuda", dtype=torch.bfloat16)
        print(f"== {name}")
        forward_alone(enc)
        embed_overhead(enc)


if __name__ == "__main__":
    main()
