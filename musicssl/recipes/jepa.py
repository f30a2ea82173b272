"""JEPA on log-mel patches: predict the EMA target encoder's latents of masked time-frequency blocks
from the visible context (I-JEPA, Assran et al., CVPR 2023; audio JEPA / MATPAC set-up).

Masks come from the collator (data side). `export_encoder()` releases the EMA target encoder, as the
paper evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from musicssl.recipes.base import Recipe, RecipeConfig, build_backbone, check_ema, frozen_copy, full_lengths
from musicssl.recipes.losses import cosine_schedule, ema_update, jepa_loss
from musicssl.recipes.masking import apply_masks, collate_masks, jepa_mask_counts
from musicssl.recipes.predictor import MaskedPredictor


@dataclass
class JEPAConfig(RecipeConfig):
    backbone: str = "jepa-tiny"
    crop_seconds: float = 6.39  # 640 mel frames = 40 whole time patches
    predictor_dim: int = 192
    predictor_depth: int = 4
    predictor_heads: int = 4
    n_targets: int = 4
    ema_start: float = 0.996
    ema_end: float = 1.0


class JEPA(Recipe):
    """Context encoder + predictor trained against an EMA target encoder."""

    Config = JEPAConfig
    BACKBONE_FAMILIES = ("spec_vit",)  # masks spectrogram patches
    PRESETS: dict[str, dict[str, Any]] = {
        "jepa-tiny": {"backbone": "jepa-tiny", "predictor_dim": 192, "predictor_depth": 4, "predictor_heads": 4},
        "jepa-small": {"backbone": "jepa-small", "predictor_dim": 256, "predictor_depth": 6, "predictor_heads": 4},
        "jepa-base": {"backbone": "jepa-base", "predictor_dim": 512, "predictor_depth": 8, "predictor_heads": 8},
    }

    def __init__(self, cfg: JEPAConfig):
        super().__init__(cfg)
        check_ema(cfg)
        self.encoder = build_backbone(cfg)
        self.target = frozen_copy(self.encoder)
        self.predictor = MaskedPredictor(
            self.encoder.embed_dim, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads,
            self.encoder.embed_dim, self.encoder.n_freq,
        )
        n_samples = round(cfg.crop_seconds * self.encoder.sample_rate)
        self.n_time = int(self.encoder.frame_lengths(torch.tensor([n_samples]))[0])
        jepa_mask_counts(self.n_time, self.encoder.n_freq, n_targets=cfg.n_targets)  # refused here, not mid-run

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().collate(items)
        context, targets = collate_masks(
            self.n_time, self.encoder.n_freq, [(self.cfg.seed, int(i)) for i in batch["index"]],
            n_targets=self.cfg.n_targets,
        )
        batch.update(context=context, targets=targets)
        return batch

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        wav, context, targets = batch["audio"], batch["context"], batch["targets"]  # targets (B, M, Nt)
        B, M, Nt = targets.shape
        mel = self.encoder.log_mel(wav, full_lengths(wav))  # no learned parameters: shared by both
        with torch.no_grad():
            latents = self.target.encode(self.target.patchify(mel))[-1]
        z = self.encoder.encode(apply_masks(self.encoder.patchify(mel), context))[-1]
        # One predictor pass per target block, batched: the context repeated M times.
        pred = self.predictor(
            z.repeat_interleave(M, dim=0), context.repeat_interleave(M, dim=0), targets.reshape(B * M, Nt), self.n_time
        )
        goal = apply_masks(latents, targets.reshape(B, M * Nt)).reshape(B * M, Nt, -1)
        loss = jepa_loss(pred, goal)
        return {"loss": loss, "target_std": latents.float().std(dim=1).mean().detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.target, self.encoder, cosine_schedule(step, total_steps, self.cfg.ema_start, self.cfg.ema_end))

    def export_encoder(self):
        return self.target
