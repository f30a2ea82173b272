"""PESTO: self-supervised pitch estimation by transposition equivariance (Riou, Lattner, Hadjeres
and Peeters, ISMIR 2023; training code SonyCSLParis/pesto-full).

Each frame's VQT is cropped twice along frequency, at first bins k apart: a pitch shift of exactly
k bins with no resampling. The clean crop (view x), an augmented copy (x~) and an augmented crop
shifted by k (x~(k)) go through the network, and three losses shape its pitch distributions:
invariance (x vs x~), equivariance through a power-series projection (x~ vs x~(k)) and a shifted
cross-entropy (x~ vs x~(k)). Shifts (one per frame) and augmentations (gain, white noise) are drawn
on the data side by `collate`, seeded by the items' indices.

The losses are pure functions in `recipes/losses.py` (cited, shape-checked, float32). The loss
weights are fixed here; pesto-full rebalances them from gradient norms at the last layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from musicssl.models.pesto import PESTO as PESTOEncoder
from musicssl.recipes.base import Recipe, RecipeConfig, build_backbone
from musicssl.recipes.losses import equivariance_loss, invariance_loss, shifted_cross_entropy


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
