"""Small heads the recipes share: MLP projectors/expanders/predictors and masked clip pooling.

Paper conventions for `MLPHead` (input = the backbone's clip vector, D):

| recipe | head | call |
|---|---|---|
| SimCLR (Chen et al., 2020) | projector g(h) = W2 ReLU(W1 h): hidden = D, out 128 (ResNet-50: 2048 -> 2048 -> 128) | `MLPHead(D, D, 128, norm=None)` |
| CLMR (Spijkervet & Burgoyne, 2021) | the SimCLR projector on SampleCNN: 512 -> 512 -> 128 (its Linears also drop the bias) | `MLPHead(512, 512, 128, norm=None)` |
| SimCLR v2 / MoCo v3 | BN in every layer, BN (no affine) on the output | `MLPHead(D, 2048, 128, 3, last_norm=True)` |
| BYOL (Grill et al., 2020) | projector and predictor, 4096 hidden with BN, out 256 | `MLPHead(D, 4096, 256)`, `MLPHead(256, 4096, 256)` |
| VICReg (Bardes et al., 2022) | expander, 3 layers of 8192 with BN | `MLPHead(D, 8192, 8192, 3)` |

Hidden layers are Linear -> norm -> ReLU, the last layer a plain Linear. A Linear followed by a norm
has no bias (the norm's shift replaces it), as in the reference implementations.
"""

from __future__ import annotations

import torch
from torch import nn

from musicssl.models.base import masked_pool

_NORMS = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}


class MLPHead(nn.Module):
    """(..., in_dim) -> (..., out_dim): (n_layers - 1) x [Linear, norm, ReLU], then Linear [, norm].

    norm: "bn" (BatchNorm1d over every leading position), "ln" (LayerNorm) or None.
    last_norm: normalise the output too; BatchNorm without affine parameters (SimCLR v2, MoCo v3)
        or LayerNorm. Needs `norm`.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 2, norm: str | None = "bn",
        last_norm: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, not {n_layers}")
        if norm is not None and norm not in _NORMS:
            raise ValueError(f"norm must be 'bn', 'ln' or None, not {norm!r}")
        if last_norm and norm is None:
            raise ValueError("last_norm=True needs norm='bn' or 'ln'")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=norm is None))
            if norm is not None:
                layers.append(_NORMS[norm](hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_norm))
        if last_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False) if norm == "bn" else nn.LayerNorm(out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected (..., {self.in_dim}) input, got {tuple(x.shape)}")
        # BatchNorm1d wants (N, C): fold leading dims (batch, frames) into N.
        return self.net(x.reshape(-1, self.in_dim)).view(*x.shape[:-1], self.out_dim)


def clip_vector(frames: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """frames (B, T, D), lengths (B,) valid frames -> (B, D): mean over each item's valid frames.

    Frames past `lengths` are ignored whatever they hold; an item with no valid frame gives zeros.
    """
    if frames.dim() != 3:
        raise ValueError(f"frames must be (B, T, D), got {tuple(frames.shape)}")
    if lengths is None:
        return frames.mean(dim=1)
    if lengths.shape != frames.shape[:1]:
        raise ValueError(f"lengths must be ({frames.shape[0]},), got {tuple(lengths.shape)}")
    return masked_pool(frames, lengths)
