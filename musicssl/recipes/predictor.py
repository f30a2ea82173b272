"""The narrow transformer that predicts tokens at masked positions from encoded context tokens:
the JEPA predictor (Assran et al., CVPR 2023) and the MAE decoder (He et al., CVPR 2022)."""

from __future__ import annotations

import torch
from torch import nn

from musicssl.models.layers import Block, sincos_2d


class MaskedPredictor(nn.Module):
    """Context tokens (B, K, in_dim) at grid positions `context_idx` (B, K) -> predictions
    (B, Q, out_dim) at positions `query_idx` (B, Q), for a time-major grid of n_time x n_freq."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, out_dim: int, n_freq: int):
        super().__init__()
        self.n_freq, self.dim = n_freq, dim
        self.proj_in = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self, context: torch.Tensor, context_idx: torch.Tensor, query_idx: torch.Tensor, n_time: int
    ) -> torch.Tensor:
        pos = sincos_2d(n_time, self.n_freq, self.dim).to(context.device, context.dtype)
        h = self.proj_in(context) + pos[context_idx]
        q = self.mask_token.to(h.dtype).expand(query_idx.shape[0], query_idx.shape[1], -1) + pos[query_idx]
        x = torch.cat([h, q], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj_out(self.norm(x[:, context.shape[1] :]))
