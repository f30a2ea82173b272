"""Blocks shared by the families: pre-LN ViT block with SDPA, 2-D sin-cos positions, conv + BatchNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (flash/efficient on GPU)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D); attn_mask (B, 1, 1, N) bool, True where a key may be attended."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def conv_bn(conv: nn.Conv1d | nn.Conv2d, bn: nn.BatchNorm1d | nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)). At inference on running statistics the norm is a per-channel affine, folded
    into the convolution's weights and bias (in float32): one pass over the output, not two."""
    if bn.training or torch.is_grad_enabled() or bn.running_var is None or bn.running_mean is None:
        return bn(conv(x))
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    shift = -bn.running_mean.float() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.float(), shift * bn.weight.float() + bn.bias.float()
    bias = shift if conv.bias is None else shift + conv.bias.float() * scale
    weight = conv.weight.float() * scale.view(-1, *[1] * (conv.weight.dim() - 1))
    return conv._conv_forward(x, weight.to(conv.weight.dtype), bias.to(conv.weight.dtype))


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """positions (N,) -> (N, dim) sin/cos features with wavelengths up to 10000 (Vaswani et al.)."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(n_time: int, n_freq: int, dim: int) -> torch.Tensor:
    """Fixed 2-D positions for a time-major grid -> (n_time * n_freq, dim): half time, half frequency.

    Fixed rather than learned, so a model runs on any number of time patches (MAE, Dasheng).
    """
    t = sincos_1d(torch.arange(n_time).repeat_interleave(n_freq), dim // 2)
    f = sincos_1d(torch.arange(n_freq).repeat(n_time), dim // 2)
    return torch.cat([t, f], dim=1)
