"""The optimisation steps that self-supervised training (`recipes.train`) and fine-tuning share:
AdamW parameter groups, one clipped (and for fp16 loss-scaled) step, the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


# Training precision names -> the autocast dtype (None: no autocast, float32).
PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """"auto" (bf16 on CUDA, float32 elsewhere) or a name of PRECISIONS -> the dtype to autocast to."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    return PRECISIONS[precision]


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two AdamW groups (either may be empty): weight decay on matrices and kernels, none on biases,
    norms and other 1-D parameters; `extra` (lr, ...) goes into both."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra}]


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: Iterable[nn.Parameter], scaler: Any,
                   clip_grad: float) -> torch.Tensor:
    """Backward through `loss`, clip the gradient norm of `params` to `clip_grad` and step, through
    `scaler` (a GradScaler, for fp16) when given -> the norm before clipping (inf/NaN when fp16
    overflowed: the scaler then skips the step). clip_grad 0 means no clipping."""
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    # A max norm of 0 would scale every gradient to zero, so 0 stands for "no clipping".
    grad_norm = nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
    scaler.step(opt) if scaler else opt.step()
    if scaler:
        scaler.update()
    return grad_norm


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Factor of the peak learning rate at `step` (from 0) of `total`: a linear warm-up over `warmup`
    steps to 1, then a cosine down to `min_ratio` at the last step (and after it)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
