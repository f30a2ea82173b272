"""Self-supervised losses as pure functions, and the EMA helpers of the teacher-student recipes.

Each loss cites the equation it implements, checks its shapes (ValueError on a mismatch) and is
computed in at least float32: half-precision inputs are upcast, and the similarity and covariance
matrices are formed with autocast off, so mixed precision rounds only the inputs. Distributed
training is the caller's business: a loss sees the tensors it is given (gather across ranks first
where the method needs the global batch, as VICReg and SimCLR do).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def _check_same(a: str, x: torch.Tensor, b: str, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{a} and {b} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen, Kornblith, Norouzi
    and Hinton, ICML 2020, eq. 1).

    z1, z2 (B, D): two views, row i of each from the same example. The 2B embeddings are compared by
    cosine similarity / temperature; anchor k's positive is its other view and its negatives the
    other 2B - 2 embeddings (itself excluded). Returns the mean over all 2B anchors, a scalar.
    """
    _check("z1", z1, 2, "(B, D)")
    _check_same("z1", z1, "z2", z2)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    B = z1.shape[0]
    z = F.normalize(_f32(torch.cat([z1, z2])), dim=1)
    with torch.autocast(z.device.type, enabled=False):
        logits = (z @ z.T) / temperature
    self_pair = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    positive = torch.arange(2 * B, device=z.device).roll(B)  # k <-> k + B
    return F.cross_entropy(logits, positive)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss 2 - 2 cos(p, z), averaged over the batch (Grill et al., NeurIPS 2020,
    eq. 2). Symmetrise by calling it twice with the views swapped.

    p (B, D): the online network's prediction. z (B, D): the target network's projection; pass it
    detached (the target gets no gradient in BYOL); it is not detached here.
    """
    _check("p", p, 2, "(B, D)")
    _check_same("p", p, "z", z)
    return (2 - 2 * F.cosine_similarity(_f32(p), _f32(z), dim=1, eps=1e-8)).mean()


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m.masked_select(~torch.eye(m.shape[0], dtype=torch.bool, device=m.device))


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """VICReg (Bardes, Ponce and LeCun, ICLR 2022, eqs. 1-6), z1, z2 (B, D) with B >= 2.

    invariance  s = mean squared error between z1 and z2 (eq. 5 sums over the D features instead of
                averaging them; the authors' code averages, and its weights go with that);
    variance    v(Z) = mean_j max(0, 1 - sqrt(Var(Z_j) + eps)), unbiased variance over the batch (eq. 1);
    covariance  c(Z) = sum of the squared off-diagonal entries of Cov(Z), divided by D (eqs. 3-4).

    As in the authors' released code (facebookresearch/vicreg), "variance" is the mean of v over the
    two branches and "covariance" the sum of c over them: eq. 6 writes mu [v(Z) + v(Z')], which
    is the same loss with var_weight doubled. The default weights (25, 25, 1) are the paper's.
    Returns {"loss", "invariance", "variance", "covariance"}, each a scalar; the parts unweighted.
    """
    _check("z1", z1, 2, "(B, D)")
    _check_same("z1", z1, "z2", z2)
    B, D = z1.shape
    if B < 2:
        raise ValueError(f"vicreg_loss needs a batch of at least 2 to estimate variances, got {B}")
    z1, z2 = _f32(z1), _f32(z2)
    invariance = F.mse_loss(z1, z2)
    variance, covariance = z1.new_zeros(()), z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + eps)
        variance = variance + F.relu(1 - std).mean() / 2
        with torch.autocast(z.device.type, enabled=False):
            cov = (z.T @ z) / (B - 1)
        covariance = covariance + _off_diagonal(cov).pow(2).sum() / D
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


def masked_reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize_target: bool = True
) -> torch.Tensor:
    """MAE reconstruction loss (He et al., CVPR 2022, sec. 3 "Reconstruction target"): the mean
    squared error per patch, averaged over the masked patches only.

    pred, target (B, N, P): P values per patch. mask (B, N) bool, True where the patch was hidden
    from the encoder (those are scored). With `normalize_target`, each target patch is normalised by
    the mean and (unbiased) variance of its own P values, eps 1e-6 inside the square root, as in
    the authors' code; P must then be at least 2. No masked patch at all gives 0.
    """
    _check("pred", pred, 3, "(B, N, P)")
    _check_same("pred", pred, "target", target)
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must be (B, N) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = masked), got {mask.dtype}")
    target = _f32(target)
    if normalize_target:
        if target.shape[-1] < 2:
            raise ValueError("normalize_target needs at least 2 values per patch")
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = (_f32(pred) - target).pow(2).mean(dim=-1)
    # clamp: an all-visible batch scores 0 rather than 0/0, without a host sync to check for it.
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def jepa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """JEPA latent regression: smooth-L1 (beta 1) between predicted and target latents, averaged
    over every element, the target first layer-normed over the feature dim without affine
    parameters (I-JEPA, Assran et al., CVPR 2023, eq. 1 with the smooth-L1 and target layer norm of
    the authors' code; the audio JEPA of Riou et al. 2024 and MATPAC, Quelennec et al. 2025, use
    the same smooth-L1).

    pred, target (B, N, D): the predictor's outputs and the target encoder's latents at the same N
    positions. Pass the target detached (it comes from the EMA encoder); it is not detached here.
    """
    _check("pred", pred, 3, "(B, N, D)")
    _check_same("pred", pred, "target", target)
    target = F.layer_norm(_f32(target), (target.shape[-1],))
    return F.smooth_l1_loss(_f32(pred), target)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place, every parameter: target <- momentum * target + (1 - momentum) * online (BYOL, Grill
    et al., NeurIPS 2020, eq. 1). Buffers are left alone: a target run in train mode keeps its own
    normalisation statistics. The two modules must have the same parameter names and shapes."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        diff = sorted(t_params.keys() ^ o_params.keys())
        raise ValueError(f"target and online modules differ in parameters: {diff[:5]}")
    for name, t in t_params.items():
        o = o_params[name]
        if t.shape != o.shape:
            raise ValueError(f"parameter {name}: target {tuple(t.shape)} vs online {tuple(o.shape)}")
        t.lerp_(o.to(t.dtype), 1.0 - momentum)


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """Cosine ramp from `start` at step 0 to `end` at step `total` (clamped outside [0, total]):
    end - (end - start) (cos(pi step / total) + 1) / 2. With start = tau0 and end = 1 it is BYOL's
    target momentum 1 - (1 - tau0)(cos(pi k / K) + 1) / 2 (Grill et al. 2020, sec. 3.2)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    k = min(max(step, 0), total)
    return end - (end - start) * (math.cos(math.pi * k / total) + 1) / 2


# --------------------------------------------------------------------------------------------------
# PESTO (Riou, Lattner, Hadjeres and Peeters, ISMIR 2023, sec. 3, as computed by pesto-full). The
# losses take pitch distributions p = softmax(logits), (N, D): N frames over D pitch bins.


def _check_pair(a: torch.Tensor, b: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (N, D) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if shift is not None and shift.shape != a.shape[:1]:
        raise ValueError(f"shift must be (N,) = ({a.shape[0]},), got {tuple(shift.shape)}")


def pesto_cross_entropy(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of pesto-full: ``-sum_j target_j log softmax(probs)_j``, mean over rows.

    pesto-full applies torch's CrossEntropyLoss to the network's softmax output, i.e. it takes the
    probabilities as logits. Since they lie in [0, 1], this is ``-<target, probs> + log sum_j
    exp(probs_j)``: it rewards agreement with the target and sharpens the distributions. We keep it
    because it is what trains: in our runs on synthetic tones the textbook ``-sum target log probs``
    with detached targets left the distributions nearly flat (entropy ~5.7 of 5.95 nats) and
    without detaching them they collapsed to a constant; with this one the pitch shifts were
    learnt within ~50 steps. probs, target (N, D); the target is not detached here.
    """
    _check_pair(probs, target)
    return -(target.float() * F.log_softmax(probs.float(), dim=-1)).sum(-1).mean()


def invariance_loss(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """L_inv between two views with the same pitch (x and its augmented copy x~), symmetrised with
    stop-gradient targets as pesto-full's config does: ``(CE(p_a, sg p_b) + CE(p_b, sg p_a)) / 2``
    with CE = `pesto_cross_entropy`. (N, D), (N, D) -> ()."""
    _check_pair(probs_a, probs_b)
    return (pesto_cross_entropy(probs_a, probs_b.detach()) + pesto_cross_entropy(probs_b, probs_a.detach())) / 2


def shifted_cross_entropy(
    probs_a: torch.Tensor, probs_b: torch.Tensor, shift: torch.Tensor, max_shift: int
) -> torch.Tensor:
    """L_SCE: view b is view a transposed up by ``shift`` (N,) bins, |shift| <= max_shift, so p_b
    should be p_a moved up by shift. As pesto-full's `ShiftCrossEntropy`: both are set in a margin
    of max_shift empty bins on each side (D + 2 max_shift classes) so no mass falls off an end,
    ``a[m] = p_a[m - P]`` and ``b[m] = p_b[m - P + k]``, and compared both ways with stop-gradient
    targets: ``(CE(a, sg b) + CE(b, sg a)) / 2``, CE = `pesto_cross_entropy`.
    (N, D), (N, D), (N,) -> (). Dropping the mass that leaves [0, D) instead would let a network
    lower the loss by piling its mass at an end, which is what our runs did.
    """
    _check_pair(probs_a, probs_b, shift)
    P, D = max_shift, probs_a.shape[1]
    a = F.pad(probs_a, (P, P))
    index = shift[:, None].to(probs_b.device) + torch.arange(D + 2 * P, device=probs_b.device) + P
    b = F.pad(probs_b, (2 * P, 2 * P)).gather(1, index)
    return (pesto_cross_entropy(a, b.detach()) + pesto_cross_entropy(b, a.detach())) / 2


def huber(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Elementwise Huber function h_tau: x^2 / 2 where |x| <= tau, else tau |x| - tau^2 / 2."""
    a = x.abs()
    return torch.where(a <= tau, a.square() / 2, tau * a - tau * tau / 2)


def power_series(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """phi(y) = sum_i alpha^(i - D + 1) y_i, (N, D) -> (N,): a shift of y by k bins multiplies phi by
    alpha^k (for mass that stays in range). Powers run from -(D - 1) to 0, as in pesto-full, so
    phi stays within (0, 1] for a distribution."""
    D = probs.shape[-1]
    powers = torch.arange(D, device=probs.device, dtype=torch.float64) - (D - 1)
    return probs.float() @ (alpha ** powers).to(torch.float32)


def equivariance_loss(
    probs_a: torch.Tensor, probs_b: torch.Tensor, shift: torch.Tensor, alpha: float, tau: float
) -> torch.Tensor:
    """L_equiv: with b transposed up by k = ``shift`` bins, phi(p_b) / phi(p_a) should be alpha^k,
    alpha = 2 ** (1 / bins_per_octave) (the frequency ratio of one bin); compared by the Huber
    function h_tau, symmetrised as in pesto-full's `PowerSeries`:
    ``mean_n (h(phi_b / phi_a - alpha^k) + h(phi_a / phi_b - alpha^-k)) / 2``.
    probs_a, probs_b (N, D) distributions (gradients flow through both); shift (N,) bins -> ()."""
    _check_pair(probs_a, probs_b, shift)
    za, zb = power_series(probs_a, alpha), power_series(probs_b, alpha)
    ratio = alpha ** shift.to(torch.float64)
    ratio = ratio.to(za.device, torch.float32)
    return ((huber(zb / za - ratio, tau) + huber(za / zb - 1 / ratio, tau)) / 2).mean()
