"""BYOL (Grill et al., NeurIPS 2020): an online network with a predictor regresses the projection of
the other view by an EMA target network. `export_encoder()` releases the target backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from musicssl.recipes.base import (TwoViewConfig, TwoViewRecipe, build_backbone, check_ema, clip_embedding,
                                   frozen_copy)
from musicssl.recipes.heads import MLPHead
from musicssl.recipes.losses import byol_loss, cosine_schedule, ema_update


@dataclass
class BYOLConfig(TwoViewConfig):
    ema_start: float = 0.99
    ema_end: float = 1.0


class BYOL(TwoViewRecipe):
    """Online backbone + projector + predictor; target backbone + projector follow by EMA."""

    Config = BYOLConfig
    PRESETS: dict[str, dict[str, Any]] = {
        "byol-tiny": {"backbone": "jepa-tiny"},
        "byol-base": {"backbone": "jepa-base", "projector_hidden": 4096, "projector_out": 256, "ema_start": 0.996},
    }

    def __init__(self, cfg: BYOLConfig):
        super().__init__(cfg)
        check_ema(cfg)
        self.backbone = build_backbone(cfg)
        self.projector = MLPHead(self.backbone.embed_dim, cfg.projector_hidden, cfg.projector_out, n_layers=2)
        self.predictor = MLPHead(cfg.projector_out, cfg.projector_hidden, cfg.projector_out, n_layers=2)
        self.target = nn.ModuleDict({"backbone": frozen_copy(self.backbone), "projector": frozen_copy(self.projector)})

    def _target(self, wav: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target["projector"](clip_embedding(self.target["backbone"], wav))

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = batch["view1"], batch["view2"]
        p1 = self.predictor(self.projector(clip_embedding(self.backbone, v1)))
        p2 = self.predictor(self.projector(clip_embedding(self.backbone, v2)))
        loss = byol_loss(p1, self._target(v2)) + byol_loss(p2, self._target(v1))  # symmetrised, as the paper
        return {"loss": loss}

    def after_step(self, step: int, total_steps: int) -> None:
        tau = cosine_schedule(step, total_steps, self.cfg.ema_start, self.cfg.ema_end)
        ema_update(self.target["backbone"], self.backbone, tau)
        ema_update(self.target["projector"], self.projector, tau)

    def export_encoder(self):
        return self.target["backbone"]
