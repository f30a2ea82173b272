"""PESTO: self-supervised pitch estimation by transposition equivariance (Riou, Lattner, Hadjeres
and Peeters, ISMIR 2023; training code SonyCSLParis/pesto-full).

Each frame's VQT is cropped twice along frequency, at first bins k apart: a pitch shift of exactly
k bins with no resampling. The clean crop (view x), an augmented copy (x~) and an augmented crop
shifted by k (x~(k)) go through the network, and three losses shape its pitch distributions:
invariance (x vs x~), equivariance through a power-series projection (x~ vs x~(k)) and a shifted
cross-entropy (x~ vs x~(k)). Shifts (one per frame) and augmentations (gain, white noise) are drawn
on the data side by `collate`, seeded by the items' indices.

The losses are pure functions at the top of this file: cited, shape-checked, float32. The loss
weights are fixed here; pesto-full rebalances them from gradient norms at the last layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from musicssl.models.pesto import PESTO as PESTOEncoder
from musicssl.recipes.base import Recipe, RecipeConfig, build_backbone

# --------------------------------------------------------------------------------------------------
# Losses (Riou et al., ISMIR 2023, sec. 3, as computed by pesto-full). They take the pitch
# distributions p = softmax(logits), (N, D), N frames over D pitch bins.


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


# --------------------------------------------------------------------------------------------------
# Recipe


@dataclass
class PESTOConfig(RecipeConfig):
    """PESTO settings. Crops are cut at the backbone's sample rate; frames whose VQT kernel reaches
    past a crop's ends are not trained on, so a crop needs at least ~0.15 s."""

    backbone: str = "pesto-tiny"
    crop_seconds: float = 0.5
    max_shift: int = 16  # bins (16 = 5 1/3 semitones, pesto-full's); at most the backbone's crop_bins
    gain_db: tuple[float, float] = (-6.0, 6.0)  # nearly a no-op: the LayerNorm over dB bins removes gain
    p_gain: float = 0.7
    snr_db: tuple[float, float] = (-6.0, 20.0)  # white noise on the waveform (pesto-full: 0.1-2 x std in dB)
    p_noise: float = 0.7
    w_invariance: float = 1.0
    w_equivariance: float = 1.0
    w_shift_ce: float = 1.0
    tau: float = 2 ** (1 / 6) - 1  # Huber threshold of L_equiv (pesto-full)
    calibrate_every: int = 500  # steps between settings of the encoder's absolute-pitch `shift` (0: never)


class PESTO(Recipe):
    """The PESTO training objective around a `musicssl.models.pesto.PESTO` backbone."""

    Config = PESTOConfig
    PRESETS: dict[str, dict[str, Any]] = {
        "pesto-tiny": {"backbone": "pesto-tiny", "crop_seconds": 0.5, "max_shift": 16},
    }

    def __init__(self, cfg: PESTOConfig):
        super().__init__(cfg)
        self.backbone: PESTOEncoder = build_backbone(cfg)
        if not isinstance(self.backbone, PESTOEncoder):
            raise ValueError(f"the PESTO recipe needs a PESTO backbone (e.g. 'pesto-tiny'), not {cfg.backbone!r}")
        if not 0 <= cfg.max_shift <= self.backbone.crop_bins:
            raise ValueError(f"max_shift must be in [0, crop_bins={self.backbone.crop_bins}], got {cfg.max_shift}")
        hop = self.backbone.hop_length
        n_frames = int(self.backbone.frame_lengths(torch.tensor(round(cfg.crop_seconds * self.backbone.sample_rate))))
        # Frames whose kernel would reach into the zero padding around the crop are left out.
        self.edge = -(-(self.backbone.frontend.max_kernel_length // 2 + 1) // hop)
        if n_frames <= 2 * self.edge:
            raise ValueError(f"crop_seconds={cfg.crop_seconds} leaves no frame clear of the VQT kernel "
                             f"({2 * self.edge + 1} frames needed)")
        self.alpha = 2 ** (1 / (12 * self.backbone.bins_per_semitone))
        # The voicing-confidence head is not part of the SSL objective (upstream trains it apart):
        # frozen, it gets no gradient, which DDP would otherwise reject as unused parameters.
        self.backbone.confidence.requires_grad_(False)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """audio (B, S) crops -> + views (B, 2, S) (gain and noise drawn independently per view) and
        shift (B, T) pitch shifts in bins, uniform in [-max_shift, max_shift], one per frame."""
        from musicssl.audio.augment import add_noise, example_generators, random_gain

        batch = super().collate(items)
        gens = example_generators(batch["index"], self.cfg.seed)
        m, n_frames = self.cfg.max_shift, int(self.backbone.frame_lengths(torch.tensor(batch["audio"].shape[-1])))
        shift = torch.stack([torch.randint(-m, m + 1, (n_frames,), generator=g) for g in gens])
        views = []
        for _ in range(2):
            view, _ = random_gain(batch["audio"], gens, *self.cfg.gain_db, p=self.cfg.p_gain)
            view, _ = add_noise(view, gens, tuple(self.cfg.snr_db), p=self.cfg.p_noise)
            views.append(view)
        batch.update(views=torch.stack(views, dim=1), shift=shift)
        return batch

    def frames(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, V, S) crops -> dB VQT of the frames clear of the edges, (B, V, T', n_bins), float32."""
        spec = self.backbone.spectrum(wav)  # (B, V, n_bins, T)
        return spec[..., self.edge : spec.shape[-1] - self.edge].transpose(-1, -2)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        wav = torch.cat([batch["audio"][:, None], batch["views"]], dim=1)  # (B, 3, S): x, x~, x~ to shift
        spec = self.frames(wav)  # the VQT, once for all three
        shift = batch["shift"][:, self.edge : self.edge + spec.shape[2]].reshape(-1)  # (N,)
        x, xa, xs = (spec[:, v].reshape(-1, spec.shape[-1]) for v in range(3))  # (N, n_bins) each
        c, n = self.backbone.crop_bins, self.backbone.n_bins_in
        # Starting k bins lower shows every partial k bins higher: x~(k) is x~ transposed up by k.
        first = (c - shift).to(xs.device)
        views = torch.cat([x[:, c : c + n], xa[:, c : c + n], xs.gather(1, first[:, None] + torch.arange(n, device=xs.device))])
        y, ya, yk = self.backbone.logits(views).float().softmax(dim=-1).chunk(3)
        inv = invariance_loss(y, ya)
        equiv = equivariance_loss(ya, yk, shift, self.alpha, self.cfg.tau)
        sce = shifted_cross_entropy(ya, yk, shift, self.cfg.max_shift)
        loss = self.cfg.w_invariance * inv + self.cfg.w_equivariance * equiv + self.cfg.w_shift_ce * sce
        return {"loss": loss, "invariance": inv.detach(), "equivariance": equiv.detach(), "shift_ce": sce.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        """Every `calibrate_every` steps and after the last one, set the backbone's `shift` from
        synthetic harmonic tones so the exported encoder's `pitch()` reads absolute Hz (PESTO does
        this at each validation). It depends only on the weights and draws no torch random numbers,
        so resumed runs stay exact; training never reads `shift`."""
        every, done = self.cfg.calibrate_every, step + 1
        if every > 0 and (done % every == 0 or done == total_steps):
            self.backbone.calibrate_shift()

    def export_encoder(self) -> PESTOEncoder:
        return self.backbone
