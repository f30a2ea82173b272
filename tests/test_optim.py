"""The optimisation step that training and fine-tuning share: groups, clipping, the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from musicssl.optim import decay_groups, optimizer_step, warmup_cosine


def _model_and_loss() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    return model, (model(torch.randn(16, 4)) ** 2).mean() * 100  # a large gradient, to be clipped


def test_no_weight_decay_on_biases_and_norms():
    model, _ = _model_and_loss()
    decay, rest = decay_groups(model.parameters(), 0.05, lr=1e-3)
    assert [p.ndim for p in decay["params"]] == [2, 2] and all(p.ndim == 1 for p in rest["params"])
    assert (decay["weight_decay"], rest["weight_decay"], rest["lr"]) == (0.05, 0.0, 1e-3)


@pytest.mark.parametrize("clip_grad", [0.0, 1e-3])
def test_a_step_clips_to_clip_grad_and_zero_means_no_clipping(clip_grad):
    """clip_grad 0 went straight to clip_grad_norm_ in fine-tuning, which zeroes every gradient: no
    step trained anything."""
    model, loss = _model_and_loss()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    norm = optimizer_step(loss, opt, list(model.parameters()), None, clip_grad)
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before)))
    assert norm > 1.0  # the norm before clipping
    assert moved == pytest.approx(clip_grad or float(norm), rel=1e-4)  # SGD at lr 1 moves by the gradient


def test_warm_up_then_cosine_to_the_floor():
    assert warmup_cosine(0, 100, 10, 0.01) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.01) == pytest.approx(0.505)  # half-way down the cosine
    assert warmup_cosine(100, 100, 10, 0.01) == warmup_cosine(500, 100, 10, 0.01) == pytest.approx(0.01)
