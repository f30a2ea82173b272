"""musicssl.recipes.losses against the papers' formulas written out in numpy loops, plus the
invariances each loss must have, its shape checks, finite gradients and the EMA helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from musicssl.recipes.losses import (
    byol_loss,
    cosine_schedule,
    ema_update,
    jepa_loss,
    masked_reconstruction_loss,
    nt_xent,
    vicreg_loss,
)

TOL = dict(rtol=1e-5, atol=1e-5)
ALL = torch.ones(2, 3, dtype=torch.bool)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# Reference formulations, one term at a time -------------------------------------------------------


def ref_nt_xent(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """SimCLR eq. 1: l(i, j) = -log exp(sim(i, j) / t) / sum_{k != i} exp(sim(i, k) / t), mean over 2B."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    n = len(z)
    B = n // 2

    def sim(a: int, b: int) -> float:
        return float(z[a] @ z[b] / (np.linalg.norm(z[a]) * np.linalg.norm(z[b])))

    total = 0.0
    for i in range(n):
        j = (i + B) % n
        denom = sum(math.exp(sim(i, k) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(sim(i, j) / t) / denom)
    return total / n


def ref_byol(p: np.ndarray, z: np.ndarray) -> float:
    """BYOL eq. 2: || p/|p| - z/|z| ||^2, averaged over the batch."""
    out = 0.0
    for a, b in zip(p.astype(np.float64), z.astype(np.float64)):
        out += float(np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2))
    return out / len(p)


def ref_vicreg_terms(z: np.ndarray, eps: float) -> tuple[float, float]:
    """VICReg eqs. 1-4 for one branch: v(Z) and c(Z), by their definitions."""
    z = z.astype(np.float64)
    n, d = z.shape
    mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
    v = 0.0
    for j in range(d):
        var = sum((z[i, j] - mean[j]) ** 2 for i in range(n)) / (n - 1)
        v += max(0.0, 1.0 - math.sqrt(var + eps))
    c = 0.0
    for a in range(d):
        for b in range(d):
            if a != b:
                cov = sum((z[i, a] - mean[a]) * (z[i, b] - mean[b]) for i in range(n)) / (n - 1)
                c += cov**2
    return v / d, c / d


def ref_vicreg(z1: np.ndarray, z2: np.ndarray, lam: float, mu: float, nu: float, eps: float) -> dict[str, float]:
    n, d = z1.shape
    inv = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    v1, c1 = ref_vicreg_terms(z1, eps)
    v2, c2 = ref_vicreg_terms(z2, eps)
    var, cov = (v1 + v2) / 2, c1 + c2
    return {"loss": lam * inv + mu * var + nu * cov, "invariance": inv, "variance": var, "covariance": cov}


def ref_mae(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, normalize: bool) -> float:
    """MAE: per-patch MSE over masked patches, target normalised by its patch's mean and unbiased var."""
    total, count = 0.0, 0
    B, N, P = pred.shape
    for b in range(B):
        for n in range(N):
            if not mask[b, n]:
                continue
            t = target[b, n].astype(np.float64)
            if normalize:
                t = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
            total += sum((pred[b, n, k] - t[k]) ** 2 for k in range(P)) / P
            count += 1
    return total / max(count, 1)


def ref_jepa(pred: np.ndarray, target: np.ndarray) -> float:
    """Smooth-L1 (beta 1) against the target layer-normed (biased var, eps 1e-5), mean over elements."""
    out, count = 0.0, 0
    for p_vec, t_vec in zip(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])):
        t_vec = t_vec.astype(np.float64)
        t_vec = (t_vec - t_vec.mean()) / math.sqrt(t_vec.var() + 1e-5)
        for a, b in zip(p_vec, t_vec):
            d = abs(float(a) - float(b))
            out += 0.5 * d * d if d < 1 else d - 0.5
            count += 1
    return out / count


# Against the references ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_reference(dtype: torch.dtype, temperature: float) -> None:
    z1, z2 = randn(6, 5, seed=1, dtype=dtype), randn(6, 5, seed=2, dtype=dtype)
    got = nt_xent(z1, z2, temperature)
    assert got.ndim == 0
    np.testing.assert_allclose(got.item(), ref_nt_xent(z1.numpy(), z2.numpy(), temperature), **TOL)


def test_byol_matches_reference() -> None:
    p, z = randn(7, 4, seed=3), randn(7, 4, seed=4)
    np.testing.assert_allclose(byol_loss(p, z).item(), ref_byol(p.numpy(), z.numpy()), **TOL)


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)])
def test_vicreg_matches_reference(weights: tuple[float, float, float]) -> None:
    z1, z2 = randn(9, 5, seed=5) * 0.7, randn(9, 5, seed=6) * 1.3
    got = vicreg_loss(z1, z2, *weights, eps=1e-4)
    ref = ref_vicreg(z1.numpy(), z2.numpy(), *weights, eps=1e-4)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key].ndim == 0
        np.testing.assert_allclose(got[key].item(), value, **TOL, err_msg=key)


@pytest.mark.parametrize("normalize", [True, False])
def test_masked_reconstruction_matches_reference(normalize: bool) -> None:
    pred, target = randn(3, 6, 4, seed=7), randn(3, 6, 4, seed=8) * 2 + 1
    mask = randn(3, 6, seed=9) > 0
    got = masked_reconstruction_loss(pred, target, mask, normalize_target=normalize)
    ref = ref_mae(pred.numpy(), target.numpy(), mask.numpy(), normalize)
    np.testing.assert_allclose(got.item(), ref, **TOL)


def test_jepa_matches_reference() -> None:
    pred, target = randn(2, 5, 6, seed=10) * 2, randn(2, 5, 6, seed=11) * 3 + 0.5  # both smooth-L1 branches
    np.testing.assert_allclose(jepa_loss(pred, target).item(), ref_jepa(pred.numpy(), target.numpy()), **TOL)


# Invariances ----------------------------------------------------------------------------------------


def test_nt_xent_prefers_matched_pairs() -> None:
    z1 = randn(16, 8, seed=12)
    z2 = z1 + 0.1 * randn(16, 8, seed=13)
    shuffled = z2[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert nt_xent(z1, z2) < nt_xent(z1, shuffled)
    # scale-free: cosine similarity ignores each embedding's norm
    torch.testing.assert_close(nt_xent(z1, z2), nt_xent(3 * z1, 0.5 * z2))


def test_nt_xent_single_pair_is_zero() -> None:
    # one pair and no negatives: the softmax has only the positive
    assert nt_xent(randn(1, 4, seed=0), randn(1, 4, seed=1)).item() == pytest.approx(0.0, abs=1e-6)


def test_byol_identical_zero_and_opposite_four() -> None:
    p = randn(5, 3, seed=14)
    assert byol_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, 2.5 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_vicreg_variance_zero_when_std_at_least_one() -> None:
    z = randn(64, 6, seed=15)
    z = z / z.std(dim=0) * 1.5
    out = vicreg_loss(z, z)
    assert out["variance"].item() == 0.0
    assert out["invariance"].item() == 0.0
    # and it penalises collapse: constant embeddings pay the full hinge (1 - sqrt(eps)) per dim
    flat = vicreg_loss(torch.ones(8, 6), torch.ones(8, 6))
    assert flat["variance"].item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-6)


def test_vicreg_covariance_zero_for_decorrelated() -> None:
    # Columns of a Hadamard matrix, the constant one dropped: zero mean, mutually orthogonal.
    h = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    z = h[:, 1:]
    out = vicreg_loss(z, z.flip(0))
    assert out["covariance"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["variance"].item() == 0.0  # unbiased std of +-1 over 4 rows is sqrt(4/3)


def test_masked_reconstruction_scores_masked_patches_only() -> None:
    pred, target = randn(2, 5, 4, seed=16), randn(2, 5, 4, seed=17)
    mask = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    base = masked_reconstruction_loss(pred, target, mask)
    changed = pred.clone()
    changed[~mask] += 10.0
    torch.testing.assert_close(masked_reconstruction_loss(changed, target, mask), base)
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert masked_reconstruction_loss(pred, target, none).item() == 0.0


def test_masked_reconstruction_normalised_target_ignores_patch_offset_and_scale() -> None:
    pred, target = randn(2, 5, 4, seed=18), randn(2, 5, 4, seed=19)
    mask = torch.ones(2, 5, dtype=torch.bool)
    a = masked_reconstruction_loss(pred, target, mask)
    b = masked_reconstruction_loss(pred, 4.0 * target + 7.0, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_jepa_loss_zero_for_normalised_match_and_target_affine_invariant() -> None:
    target = randn(2, 3, 8, seed=20)
    normed = torch.nn.functional.layer_norm(target, (8,))
    assert jepa_loss(normed, target).item() == pytest.approx(0.0, abs=1e-7)
    assert jepa_loss(normed, 5.0 * target - 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_half_precision_inputs_give_float32() -> None:
    z1, z2 = randn(8, 4, seed=21).bfloat16(), randn(8, 4, seed=22).bfloat16()
    assert nt_xent(z1, z2).dtype == torch.float32
    assert byol_loss(z1, z2).dtype == torch.float32
    assert vicreg_loss(z1, z2)["loss"].dtype == torch.float32
    assert jepa_loss(z1[None], z2[None]).dtype == torch.float32
    assert masked_reconstruction_loss(z1[None], z2[None], torch.ones(1, 8, dtype=torch.bool)).dtype == torch.float32


# Shapes, gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 2)),
        lambda: nt_xent(torch.randn(4, 3, 1), torch.randn(4, 3, 1)),
        lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0),
        lambda: byol_loss(torch.randn(4, 3), torch.randn(5, 3)),
        lambda: byol_loss(torch.randn(3), torch.randn(3)),
        lambda: vicreg_loss(torch.randn(4, 3), torch.randn(4, 2)),
        lambda: vicreg_loss(torch.randn(1, 3), torch.randn(1, 3)),
        lambda: masked_reconstruction_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5), ALL),
        lambda: masked_reconstruction_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), ALL[:, :2]),
        lambda: masked_reconstruction_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3)),
        lambda: masked_reconstruction_loss(torch.randn(2, 3, 1), torch.randn(2, 3, 1), ALL),  # P = 1: no variance
        lambda: masked_reconstruction_loss(torch.randn(6, 4), torch.randn(6, 4), ALL.flatten()),
        lambda: jepa_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5)),
        lambda: jepa_loss(torch.randn(6, 4), torch.randn(6, 4)),
    ],
)
def test_shape_errors(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_gradients_finite() -> None:
    z1 = randn(6, 5, seed=23).requires_grad_()
    z2 = z1.detach().clone().requires_grad_()  # identical views: the edge case for cosines and logits
    losses = [
        nt_xent(z1, z2),
        byol_loss(z1, z2.detach()),
        vicreg_loss(z1, z2)["loss"],
        masked_reconstruction_loss(z1[None], z2[None].detach(), torch.ones(1, 6, dtype=torch.bool)),
        jepa_loss(z1[None], z2[None].detach()),
    ]
    for loss in losses:
        z1.grad = z2.grad = None
        loss.backward()
        assert torch.isfinite(loss)
        assert z1.grad is not None and torch.isfinite(z1.grad).all()
        assert z2.grad is None or torch.isfinite(z2.grad).all()


def test_gradient_flows_to_target_unless_caller_detaches() -> None:
    p, z = randn(4, 3, seed=24).requires_grad_(), randn(4, 3, seed=25).requires_grad_()
    byol_loss(p, z).backward()
    assert z.grad is not None  # documented: the caller passes z detached


# EMA and schedule -------------------------------------------------------------------------------------


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return target, online


@pytest.mark.parametrize("m", [0.0, 0.9, 0.996, 1.0])
def test_ema_update_math(m: float) -> None:
    target, online = _pair()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    online_before = {k: v.clone() for k, v in online.state_dict().items()}
    ema_update(target, online, m)
    for name, p in target.named_parameters():
        expected = m * before[name] + (1 - m) * online_before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        assert p.grad is None and p.grad_fn is None
    for name, b in target.named_buffers():  # buffers are the target's own
        torch.testing.assert_close(b, before[name])
    for k, v in online.state_dict().items():
        torch.testing.assert_close(v, online_before[k])


def test_ema_update_rejects_mismatch() -> None:
    target, online = _pair()
    with pytest.raises(ValueError):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(3, 4), nn.Linear(3, 5), 0.9)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4)), 0.9)


def test_cosine_schedule() -> None:
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(50, 100, 0.2, 0.8) == pytest.approx(0.5)
    assert cosine_schedule(-5, 100, 0.2, 0.8) == pytest.approx(0.2)
    assert cosine_schedule(500, 100, 0.2, 0.8) == pytest.approx(0.8)
    tau0, K = 0.99, 37
    for k in range(K + 1):  # BYOL: tau = 1 - (1 - tau0)(cos(pi k / K) + 1) / 2
        expected = 1 - (1 - tau0) * (math.cos(math.pi * k / K) + 1) / 2
        assert cosine_schedule(k, K, tau0, 1.0) == pytest.approx(expected, abs=1e-12)
    values = [cosine_schedule(k, 20, 1.0, 0.0) for k in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        cosine_schedule(0, 0, 0.0, 1.0)
