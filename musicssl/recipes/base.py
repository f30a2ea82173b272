"""What the recipes share: a config with a backbone, building that backbone, and the step contract."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from musicssl.models.base import Encoder


@dataclass
class RecipeConfig:
    """Fields every recipe has. `backbone` is a registered architecture, `backbone_args` overrides
    its constructor arguments; crops of `crop_seconds` at the backbone's sample rate are the data."""

    backbone: str = "jepa-tiny"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    crop_seconds: float = 4.0
    seed: int = 0


def build_backbone(cfg: RecipeConfig) -> Encoder:
    """A randomly initialised registered architecture, in training mode."""
    from musicssl.factory import load

    enc = load(cfg.backbone, pretrained=False, **cfg.backbone_args)
    return enc.train()


def check_ema(cfg: Any) -> None:
    """`ema_start` and `ema_end` are the EMA target's momentum: a share of the old weights kept."""
    for key in ("ema_start", "ema_end"):
        value = getattr(cfg, key)
        if not 0 <= value <= 1:
            raise ValueError(f"{key} must be in [0, 1] (the EMA target's momentum, e.g. 0.996), got {value}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy for an EMA target: same weights, no gradients."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def full_lengths(wav: torch.Tensor) -> torch.Tensor:
    """(B, S) crops with no padding -> lengths (B,) all S."""
    return torch.full((wav.shape[0],), wav.shape[-1], dtype=torch.long, device=wav.device)


def clip_embedding(encoder: Encoder, wav: torch.Tensor) -> torch.Tensor:
    """(B, S) crops -> (B, D): the last layer averaged over frames (crops are unpadded)."""
    return encoder.forward_features(wav, full_lengths(wav))[-1].mean(dim=1)


class Recipe(nn.Module):
    """The step contract of `musicssl.recipes` (see its docstring); `forward` is `training_step`
    so DDP's gradient hooks fire."""

    Config = RecipeConfig
    PRESETS: dict[str, dict[str, Any]] = {}
    MIN_BATCH = 1  # items per process that a step needs
    BACKBONE_FAMILIES: tuple[str, ...] | None = None  # None: any trainable encoder
    NEGATIVES_IN_BATCH = False  # the loss pushes a batch's other items away (a file twice repels itself)

    def __init__(self, cfg: RecipeConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def sample_rate(self) -> int:
        return self.export_encoder().sample_rate

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.training_step(batch)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (EMA updates); nothing by default."""

    def export_encoder(self) -> Encoder:
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Default data side: stack the crops."""
        return {
            "audio": torch.stack([torch.as_tensor(it["audio"]) for it in items]),
            "index": torch.tensor([int(it["index"]) for it in items]),
        }


@dataclass
class TwoViewConfig(RecipeConfig):
    """Joint-embedding recipes (SimCLR, BYOL, VICReg): two augmented views of each crop."""

    crop_seconds: float = 6.0  # each view is cut from the crop at its own position
    view_seconds: float = 3.0
    max_semitones: float = 2.0  # pitch-shift range of the views (0: none)
    projector_hidden: int = 1024
    projector_out: int = 256


class TwoViewRecipe(Recipe):
    """Shared data side of the joint-embedding recipes: `collate` adds view1/view2 (B, S_view)."""

    MIN_BATCH = 2  # the losses compare items of a batch, and the projectors' BatchNorm needs two

    def __init__(self, cfg: TwoViewConfig):
        super().__init__(cfg)
        if not 0 < cfg.view_seconds <= cfg.crop_seconds:  # a longer view would be mostly zero padding
            raise ValueError(f"view_seconds={cfg.view_seconds} must be > 0 and at most crop_seconds="
                             f"{cfg.crop_seconds} (each view is cut from the crop)")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from musicssl.audio.augment import ViewMaker, default_augment, example_generators

        batch = super().collate(items)
        sr = self.backbone.sample_rate
        maker = ViewMaker(default_augment(sr, max_semitones=self.cfg.max_semitones), n_views=2,
                          crop_samples=round(self.cfg.view_seconds * sr))
        views, _ = maker(batch["audio"], example_generators(batch["index"], self.cfg.seed))
        batch.update(view1=views[0], view2=views[1])
        return batch

    def export_encoder(self) -> Encoder:
        return self.backbone
