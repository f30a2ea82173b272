"""Masked autoencoding of log-mel patches (MAE, He et al., CVPR 2022; Audio-MAE, Huang et al. 2022):
encode the visible patches, reconstruct the masked ones with a light decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from musicssl.recipes.base import Recipe, RecipeConfig, build_backbone, full_lengths
from musicssl.recipes.losses import masked_reconstruction_loss
from musicssl.recipes.masking import apply_masks, mae_masks, seed_generator
from musicssl.recipes.predictor import MaskedPredictor


@dataclass
class MAEConfig(RecipeConfig):
    backbone: str = "jepa-tiny"
    crop_seconds: float = 6.39  # 640 mel frames = 40 whole time patches
    mask_ratio: float = 0.8  # Audio-MAE masks 80 %
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    normalize_target: bool = True


class MAE(Recipe):
    """Encoder on visible patches, MaskedPredictor decoder to patch values; exports the encoder."""

    BACKBONE_FAMILIES = ("spec_vit",)  # masks spectrogram patches

    Config = MAEConfig
    PRESETS: dict[str, dict[str, Any]] = {
        "mae-tiny": {"backbone": "jepa-tiny"},
        "mae-small": {"backbone": "jepa-small", "decoder_dim": 256, "decoder_depth": 4},
        "mae-base": {"backbone": "jepa-base", "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16},
    }

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.encoder = build_backbone(cfg)
        patch_size = (self.encoder.args["n_mels"] // self.encoder.n_freq) * self.encoder.patch_time
        self.decoder = MaskedPredictor(
            self.encoder.embed_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, patch_size, self.encoder.n_freq
        )
        n_samples = round(cfg.crop_seconds * self.encoder.sample_rate)
        self.n_time = int(self.encoder.frame_lengths(torch.tensor([n_samples]))[0])
        n_tokens = self.n_time * self.encoder.n_freq
        if not 0 < round(cfg.mask_ratio * n_tokens) < n_tokens:  # all visible: no loss; all hidden: no encoder
            raise ValueError(f"mask_ratio={cfg.mask_ratio} hides {round(cfg.mask_ratio * n_tokens)} of the {n_tokens} "
                             "patches of a crop; it must leave some hidden and some visible (Audio-MAE: 0.8)")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().collate(items)
        n_tokens = self.n_time * self.encoder.n_freq
        # One generator per example, seeded by its index: the same masks on one process or on many.
        batch["mask"] = torch.cat([
            mae_masks(1, n_tokens, self.cfg.mask_ratio, seed_generator(self.cfg.seed, int(i))) for i in batch["index"]
        ])
        return batch

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        wav, mask = batch["audio"], batch["mask"]  # mask (B, N) True = hidden
        mel = self.encoder.log_mel(wav, full_lengths(wav))
        n_hidden = int(mask[0].sum())
        order = torch.argsort(mask.int(), dim=1, stable=True)  # visible first, each in grid order
        visible, hidden = order[:, : mask.shape[1] - n_hidden], order[:, mask.shape[1] - n_hidden :]
        z = self.encoder.encode(apply_masks(self.encoder.patchify(mel), visible))[-1]
        pred = self.decoder(z, visible, hidden, self.n_time)
        target = apply_masks(self.encoder.patch_values(mel), hidden)
        loss = masked_reconstruction_loss(
            pred, target, torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device), self.cfg.normalize_target
        )
        return {"loss": loss}

    def export_encoder(self):
        return self.encoder
