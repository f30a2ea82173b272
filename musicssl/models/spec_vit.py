"""Spectrogram transformer: log-mel patches through ViT blocks (the JEPA and MAE recipes' backbone).

The log-mel front-end lives inside the model, so `model(wav)` needs nothing else. The defaults are
the audio-JEPA / MATPAC configuration: 16 kHz, 80 mels over 50-8000 Hz (n_fft 400, hop 160), 16x16
patches. One output frame per time patch (mean over the frequency patches): 6.25 frames/s.
Padding is exact: frames past each item's length are zeroed and their patches masked out of
attention, so an item gives the same frames whatever it is batched with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from musicssl.audio.frontends import MelSpectrogram
from musicssl.models.base import Encoder, conv_frames, init_args
from musicssl.models.layers import Block, sincos_2d
from musicssl.registry import ModelSpec, register_family, register_model

SIZES = {
    # mini: the embedded default's size (a few MB in fp16), trained and used on 3.2 s windows.
    "mini": dict(embed_dim=192, depth=6, num_heads=3, context_seconds=3.2, overlap_seconds=0.64),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


@register_family("spec_vit")
class SpecViT(Encoder):
    """Log-mel ViT encoder. wav (B, S) at `sample_rate` -> per block (B, T, embed_dim)."""

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 80,
        f_min: float = 50.0,
        f_max: float = 8000.0,
        patch_freq: int = 16,
        patch_time: int = 16,
        norm_mean: float = -5.0,
        norm_std: float = 4.0,
        context_seconds: float = 10.0,
        overlap_seconds: float = 1.0,
    ):
        super().__init__()
        if n_mels % patch_freq:
            raise ValueError(f"n_mels ({n_mels}) must be a multiple of patch_freq ({patch_freq})")
        self.args = init_args(locals())
        self.sample_rate, self.mel_hop, self.patch_time = sample_rate, hop_length, patch_time
        self.hop_length = hop_length * patch_time
        self.frame_offset = (patch_time - 1) / 2 * hop_length
        self.context_seconds, self.overlap_seconds = context_seconds, overlap_seconds
        self.embed_dim, self.num_layers, self.n_freq = embed_dim, depth, n_mels // patch_freq
        self.norm_mean, self.norm_std = norm_mean, norm_std
        self.frontend = MelSpectrogram(
            sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, f_min=f_min, f_max=f_max,
            power=2.0, pad_mode="constant",
        )
        self.patch_embed = nn.Conv2d(1, embed_dim, kernel_size=(patch_freq, patch_time), stride=(patch_freq, patch_time))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(_init_weights)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_frames(lengths, self.mel_hop, self.patch_time)

    def log_mel(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """wav (B, S) -> normalised log-mel (B, n_mels, T), T a multiple of patch_time, zero past lengths."""
        x = (torch.log(self.frontend(wav.float()) + 1e-6) - self.norm_mean) / self.norm_std
        n_frames = conv_frames(lengths, self.mel_hop)
        x = x * (torch.arange(x.shape[-1], device=x.device) < n_frames[:, None])[:, None, :]
        pad = -x.shape[-1] % self.patch_time
        return nn.functional.pad(x, (0, pad))

    def patchify(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) -> tokens (B, T' * F', D), time-major, with fixed 2-D positions added."""
        w = self.patch_embed.weight
        x = self.patch_embed(mel[:, None].to(w.dtype))  # (B, D, F', T')
        n_time = x.shape[-1]
        x = x.permute(0, 3, 2, 1).flatten(1, 2)
        return x + self.positions(n_time).to(x.device, x.dtype)

    def patch_values(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) -> the log-mel values of each patch (B, T' * F', patch_freq * patch_time),
        in the token order of `patchify` (the reconstruction target of masked modelling)."""
        B, n_mels, T = mel.shape
        pf, pt = n_mels // self.n_freq, self.patch_time
        x = mel.reshape(B, self.n_freq, pf, T // pt, pt)  # (B, F', pf, T', pt)
        return x.permute(0, 3, 1, 2, 4).reshape(B, (T // pt) * self.n_freq, pf * pt)

    def positions(self, n_time: int) -> torch.Tensor:
        """Fixed positions of a grid of n_time x F' tokens (N, D), time-major like `patchify`."""
        return sincos_2d(n_time, self.n_freq, self.embed_dim)

    def encode(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """tokens (B, N, D) -> the output of every block (B, N, D); the last one normed."""
        hidden = []
        for blk in self.blocks:
            tokens = blk(tokens, attn_mask)
            hidden.append(tokens)
        hidden[-1] = self.norm(hidden[-1])
        return hidden

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        mel = self.log_mel(wav, lengths)
        tokens = self.patchify(mel)
        B, n_time = wav.shape[0], mel.shape[-1] // self.patch_time
        n_valid = self.frame_lengths(lengths)
        attn_mask = None
        if bool((n_valid < n_time).any()):
            t_index = torch.arange(n_time, device=wav.device).repeat_interleave(self.n_freq)
            attn_mask = (t_index[None, :] < n_valid[:, None])[:, None, None, :]
        hidden = self.encode(tokens, attn_mask)
        return [h.view(B, n_time, self.n_freq, self.embed_dim).mean(dim=2) for h in hidden]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _spec(size: str, **fields: Any) -> ModelSpec:
    s = SIZES[size]
    base = ModelSpec(
        name=f"jepa-{size}",
        family="spec_vit",
        sample_rate=16000,
        frame_rate=6.25,
        embed_dim=s["embed_dim"],
        num_layers=s["depth"],
        recommended_layer=-1,
        context_seconds=s.get("context_seconds", 10.0),
        weights=None,
        license="n/a",
        source="musicssl (train with the JEPA recipe)",
        description=f"Spectrogram ViT-{size} (16x16 patches of 80-band log-mel), the backbone of the JEPA recipe.",
        args=dict(s),
    )
    return dataclasses.replace(base, **fields)


# The embedded default (`musicssl.load()`): ViT-mini trained with the SimCLR recipe on ~18 h of
# music, shipped in fp16 inside the package; weights_cards/simclr-mini.md says how and how well.
@register_model(_spec(
    "mini", name="simclr-mini", weights="bundled:simclr-mini",
    files={"config.json": "0d3c14571cba8bb897231c9802f23933d36bef20e065f40858987fc938fb212b",
           "model.safetensors": "7e3110b0620a9ce653673cf0f5652541dde2867d707af7d7c603c356a2475d23"},
    license="Apache-2.0", source="musicssl (SimCLR recipe, weights_cards/simclr-mini.md)",
    description="Spectrogram ViT-mini (192-d, 6 blocks, 3.2 s windows) trained with SimCLR: the default model.",
))
def simclr_mini(**kwargs) -> SpecViT:
    return SpecViT(**{**SIZES["mini"], **kwargs})


@register_model(_spec("tiny"))
def jepa_tiny(**kwargs) -> SpecViT:
    return SpecViT(**{**SIZES["tiny"], **kwargs})


@register_model(_spec("small"))
def jepa_small(**kwargs) -> SpecViT:
    return SpecViT(**{**SIZES["small"], **kwargs})


@register_model(_spec("base"))
def jepa_base(**kwargs) -> SpecViT:
    return SpecViT(**{**SIZES["base"], **kwargs})
