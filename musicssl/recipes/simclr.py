"""SimCLR (Chen et al., ICML 2020): NT-Xent between projections of two views of each crop.
With the SampleCNN raw-waveform backbone (preset `clmr`) this is CLMR (Spijkervet & Burgoyne, ISMIR 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from musicssl.recipes.base import TwoViewConfig, TwoViewRecipe, build_backbone, clip_embedding
from musicssl.recipes.heads import MLPHead
from musicssl.recipes.losses import nt_xent

CLMR_SECONDS = 59049 / 22050  # one SampleCNN frame


@dataclass
class SimCLRConfig(TwoViewConfig):
    temperature: float = 0.1


class SimCLR(TwoViewRecipe):
    """Backbone + projector; the views' projections attract, the rest of the batch repels."""

    Config = SimCLRConfig
    NEGATIVES_IN_BATCH = True
    PRESETS: dict[str, dict[str, Any]] = {
        "simclr-tiny": {"backbone": "jepa-tiny"},
        "clmr": {"backbone": "clmr-samplecnn", "crop_seconds": 3 * CLMR_SECONDS, "view_seconds": CLMR_SECONDS,
                 "projector_hidden": 512, "projector_out": 128, "temperature": 0.5, "max_semitones": 0.0},
    }

    def __init__(self, cfg: SimCLRConfig):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        self.projector = MLPHead(self.backbone.embed_dim, cfg.projector_hidden, cfg.projector_out, n_layers=2)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z1 = self.projector(clip_embedding(self.backbone, batch["view1"]))
        z2 = self.projector(clip_embedding(self.backbone, batch["view2"]))
        return {"loss": nt_xent(z1, z2, self.cfg.temperature)}
