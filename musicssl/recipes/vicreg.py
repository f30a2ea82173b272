"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): invariance, variance and covariance terms on the
expanded embeddings of two views; no negatives, no EMA target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from musicssl.recipes.base import TwoViewConfig, TwoViewRecipe, build_backbone, clip_embedding
from musicssl.recipes.heads import MLPHead
from musicssl.recipes.losses import vicreg_loss


@dataclass
class VICRegConfig(TwoViewConfig):
    projector_out: int = 1024  # the paper's expander is 3 x 8192; 1024 fits small runs
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0


class VICReg(TwoViewRecipe):
    """Backbone + 3-layer expander trained with the VICReg loss."""

    Config = VICRegConfig
    PRESETS: dict[str, dict[str, Any]] = {
        "vicreg-tiny": {"backbone": "jepa-tiny"},
        "vicreg-base": {"backbone": "jepa-base", "projector_hidden": 8192, "projector_out": 8192},
    }

    def __init__(self, cfg: VICRegConfig):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        self.expander = MLPHead(self.backbone.embed_dim, cfg.projector_hidden, cfg.projector_out, n_layers=3)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z1 = self.expander(clip_embedding(self.backbone, batch["view1"]))
        z2 = self.expander(clip_embedding(self.backbone, batch["view2"]))
        return vicreg_loss(z1, z2, self.cfg.sim_weight, self.cfg.var_weight, self.cfg.cov_weight)
