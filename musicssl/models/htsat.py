"""HTS-AT audio tower of LAION-CLAP: 10 s of 48 kHz audio -> one 512-d audio-text embedding.

Chen et al., "HTS-AT: A Hierarchical Token-Semantic Audio Transformer for Sound Classification and
Detection", ICASSP 2022 (code RetroCirce/HTS-Audio-Transformer, MIT), as the audio branch of Wu et al.,
"Large-scale Contrastive Language-Audio Pretraining with Feature Fusion and Keyword-to-Caption
Augmentation", ICASSP 2023 (code LAION-AI/CLAP, `laion_clap` 1.1.7). This file is a re-implementation
that keeps upstream's module names, so the `audio_branch.*` / `audio_projection.*` part of a CLAP
checkpoint loads through `checkpoint_filter_fn`; tests/test_parity_htsat.py checks it against the
installed `laion_clap` package.

Per 10 s clip (480 000 samples at 48 kHz):
- power STFT (n_fft = window = 1024, hop 480, periodic Hann, centred with reflect padding) -> 1001
  frames; 64 Slaney mel bands (Slaney-normalised) over 50-14 000 Hz; 10 log10(max(x, 1e-10)) dB with
  no top_db clipping. Upstream (torchlibrosa) computes the STFT as a convolution with stored DFT
  kernels; `torch.stft` gives the same spectrum to float rounding, and the stored kernels and mel
  matrix of a checkpoint are checked against ours when it is loaded, then dropped.
- `bn0`: a BatchNorm over the mel bands (in eval a fixed per-band affine).
- time resized 1001 -> 1024 frames (bicubic, align_corners), then cut into 4 runs of 256 frames
  stacked along frequency: a 256 x 256 "image" whose row r is (run r // 64, band r % 64).
- Swin transformer: 4 x 4 patches -> 64 x 64 tokens of `width` (128); stages of depths (2, 2, 12, 2)
  with (4, 8, 16, 32) heads, 8 x 8 windows (shifted by 4 in every second block, with the usual -100
  mask across the wrap-around), patch merging (2 x 2 -> Linear 4C -> 2C) between stages; a stage
  whose grid is no larger than the window (the last, 8 x 8) uses one window and never shifts.
  Final LayerNorm, mean over the 64 tokens -> `embedding` (1024-d).
- `audio_projection`: Linear(1024, 512) - ReLU - Linear(512, 512), then L2 normalisation: the joint
  audio-text embedding (what `CLAP_Module.get_audio_embedding_from_data` returns).
Upstream's AudioSet heads (`tscam_conv`, `head`) are not part of this model.

Input handling follows upstream's embedding API (`get_audio_embedding_from_data`):
- `quantize_int16` (default on, as upstream for numpy arrays and files, and in its training data
  pipeline): clip to [-1, 1], scale by 32767, truncate to an integer, scale back.
- A clip shorter than 10 s is repeated as many whole times as fit in 10 s and zero-padded to 10 s
  ("repeatpad"), so short clips embed as upstream.
- Longer audio: upstream takes one *random* 10 s crop. Here it is cut into consecutive,
  non-overlapping 10 s windows from the start, each (the last, shorter one repeat-padded as above)
  giving one frame: `hop_length` = 480 000 samples (0.1 frames/s), the frame centred on its window,
  ceil(S / 480 000) frames. Windows never see each other, so `embed()` uses exactly one window per
  frame with no overlap. The clip embedding of `embed()` is the mean of the windows' unit vectors:
  re-normalise it before taking cosine similarities with CLAP text embeddings.

Layers: `forward_features` returns one layer, the 512-d joint embedding per window. The Swin stages
have different widths (128-1024) and time resolutions, and `embed()` needs one width per model;
`clip_outputs` gives every stage's tokens and the 1024-d pre-projection embedding for those who
want them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from musicssl.audio.frontends import AmplitudeToDB, MelSpectrogram, get_window, mel_filterbank
from musicssl.convert import pick_file, read_checkpoint
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.base import Encoder
from musicssl.registry import ModelSpec, register_family, register_model

# HTSAT-base, the audio tower of LAION-CLAP's released music checkpoints.
BASE = dict(width=128, depths=[2, 2, 12, 2], num_heads=[4, 8, 16, 32])

SHIFT_MASK_VALUE = -100.0  # upstream's additive mask across a shifted window's wrap-around


# --- Swin pieces ----------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, w * w, C): windows row-major over the grid, tokens row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).transpose(2, 3)
    return x.reshape(B, (H // w) * (W // w), w * w, C)


def window_merge(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B, nW, w * w, C) -> (B, H, W, C)."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // w, W // w, w, w, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


def relative_position_index(w: int) -> torch.Tensor:
    """(w*w, w*w) index into a ((2w - 1)^2)-row bias table for each (query, key) pair of a window:
    (dy + w - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) the query's position minus the key's."""
    y, x = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    y, x = y.flatten(), x.flatten()
    dy = y[:, None] - y[None, :] + w - 1
    dx = x[:, None] - x[None, :] + w - 1
    return dy * (2 * w - 1) + dx


def shift_mask(H: int, W: int, w: int, s: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask for windows of a grid rolled by -s: tokens that were not
    neighbours before the roll (different regions of the wrap-around) get SHIFT_MASK_VALUE."""

    def regions(n: int) -> torch.Tensor:
        # 0 up to n - w, 1 up to n - s, 2 for the last s positions (those rolled in from the start).
        pos = torch.arange(n)
        return (pos >= n - w).long() + (pos >= n - s).long()

    label = (regions(H)[:, None] * 3 + regions(W)[None, :]).float()  # (H, W)
    windows = window_partition(label[None, :, :, None], w)[0, :, :, 0]  # (nW, w*w)
    differ = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(differ.shape).masked_fill(differ, SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows, with a learned relative position bias.
    x (B, nW, w*w, C), mask (nW, w*w, w*w) or None -> (B, nW, w*w, C)."""

    relative_position_index: torch.Tensor

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, nW, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(B, nW, N, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)  # each (B, nW, h, N, C/h)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (h, N, N)
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)  # (nW, h, N, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(y.transpose(2, 3).reshape(B, nW, N, C))


class Mlp(nn.Module):
    """fc1 - exact GELU - fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-LN (shifted-)window attention block on an H x W token grid. x (B, H*W, C) -> same."""

    attn_mask: torch.Tensor | None

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int, window: int, shift: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.grid = grid
        if min(grid) <= window:  # the whole grid fits one window: nothing to shift
            window, shift = min(grid), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shift_mask(*grid, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), w, s = self.grid, self.window, self.shift
        B, L, C = x.shape
        y = self.norm1(x).view(B, H, W, C)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, w), self.attn_mask), w, H, W)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2 x 2 neighbours -> one token: concatenated in the order (0,0), (1,0), (0,1), (1,1) (row, col
    offsets), LayerNorm(4C), Linear 4C -> 2C without bias. (B, H*W, C) -> (B, H/2 * W/2, 2C)."""

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), (B, _, C) = self.grid, x.shape
        # (B, H/2, dy, W/2, dx, C) -> (B, H/2, W/2, dx, dy, C): dx-major, so dy varies fastest.
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H * W // 4, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks (every second one shifted by window // 2), then patch merging if `merge`."""

    def __init__(self, dim: int, grid: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, merge: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, grid, num_heads, window, window // 2 if i % 2 else 0, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, grid) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a 1-channel image -> LayerNormed tokens (B, (H/p)(W/p), D), row-major."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


# --- the encoder ----------------------------------------------------------------------------------
def _check_geometry(clip_samples: int, stft_hop: int, n_mels: int, spec_size: int, patch_size: int,
                    depths: list[int], num_heads: list[int], window_size: int) -> None:
    """Refuse sizes whose spectrogram image or Swin stages do not fit together (say which)."""
    if len(depths) != len(num_heads):
        raise ValueError(f"depths {depths} and num_heads {num_heads} must have the same length")
    if spec_size % n_mels:
        raise ValueError(f"spec_size ({spec_size}) must be a multiple of n_mels ({n_mels})")
    n_frames = spec_size * (spec_size // n_mels)  # frames the image holds, runs stacked along frequency
    if clip_samples // stft_hop + 1 > n_frames:
        raise ValueError(f"{clip_samples} samples give more than the {n_frames} frames the image holds")
    grid = spec_size // patch_size
    for i in range(len(depths)):
        g = grid // 2**i
        if (i < len(depths) - 1 and g % 2) or (g > window_size and g % window_size):
            raise ValueError(f"stage {i}'s {g} x {g} token grid does not halve or tile into "
                             f"{window_size} x {window_size} windows")


@register_family("htsat")
class HTSAT(Encoder):
    """LAION-CLAP audio tower. wav (B, S) at 48 kHz -> [joint embedding (B, ceil(S / clip_samples), 512)].

    Args:
        sample_rate: Hz of the input.
        clip_samples: samples per clip (480 000 = 10 s); one output frame per clip.
        n_fft, stft_hop, n_mels, f_min, f_max: the log-mel front-end (samples, Hz).
        spec_size: side of the square image the mel spectrogram is folded into; it holds
            spec_size / n_mels runs of spec_size frames.
        patch_size, width, depths, num_heads, window_size, mlp_ratio: the Swin transformer.
        projection_dim: width of the joint audio-text space.
        quantize_int16: round the waveform through 16-bit integers first, as upstream does.
    """

    def __init__(
        self,
        sample_rate: int = 48000,
        clip_samples: int = 480000,
        n_fft: int = 1024,
        stft_hop: int = 480,
        n_mels: int = 64,
        f_min: float = 50.0,
        f_max: float = 14000.0,
        spec_size: int = 256,
        patch_size: int = 4,
        width: int = 128,
        depths: Sequence[int] = (2, 2, 12, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        projection_dim: int = 512,
        quantize_int16: bool = True,
    ) -> None:
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        _check_geometry(clip_samples, stft_hop, n_mels, spec_size, patch_size, depths, num_heads, window_size)
        self.freq_ratio = spec_size // n_mels  # runs of frames stacked along frequency
        self.n_frames = spec_size * self.freq_ratio  # frames after resizing
        grid = spec_size // patch_size
        self.args = dict(
            sample_rate=sample_rate, clip_samples=clip_samples, n_fft=n_fft, stft_hop=stft_hop, n_mels=n_mels,
            f_min=f_min, f_max=f_max, spec_size=spec_size, patch_size=patch_size, width=width, depths=depths,
            num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio, projection_dim=projection_dim,
            quantize_int16=quantize_int16,
        )
        self.sample_rate, self.clip_samples, self.quantize_int16 = sample_rate, clip_samples, quantize_int16
        self.hop_length, self.frame_offset = clip_samples, clip_samples / 2
        self.context_seconds, self.overlap_seconds = clip_samples / sample_rate, 0.0
        self.embed_dim, self.num_layers = projection_dim, 1
        self.num_features = width * 2 ** (len(depths) - 1)

        self.frontend = MelSpectrogram(
            sample_rate, n_fft=n_fft, hop_length=stft_hop, n_mels=n_mels, f_min=f_min, f_max=f_max,
            power=2.0, htk=False, norm="slaney", center=True, pad_mode="reflect",
        )
        self.to_db = AmplitudeToDB("power", ref=1.0, amin=1e-10, top_db=None)
        self.bn0 = nn.BatchNorm1d(n_mels)
        self.patch_embed = PatchEmbed(patch_size, width)
        self.layers = nn.ModuleList(
            SwinStage(width * 2**i, (grid // 2**i, grid // 2**i), depth, heads, window_size, mlp_ratio,
                      merge=i < len(depths) - 1)
            for i, (depth, heads) in enumerate(zip(depths, num_heads))
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.audio_projection = nn.Sequential(
            nn.Linear(self.num_features, projection_dim), nn.ReLU(), nn.Linear(projection_dim, projection_dim)
        )
        self.apply(_init_weights)

    # --- pieces -------------------------------------------------------------------------------
    def image(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (N, clip_samples) -> the normalised log-mel folded into (N, 1, spec_size, spec_size)."""
        mel = self.to_db(self.frontend(clips))  # (N, n_mels, frames), float32
        x = self.bn0(mel.to(self.bn0.weight.dtype)).float()
        N, n_mels, frames = x.shape
        if frames < self.n_frames:
            x = F.interpolate(x[:, None], size=(n_mels, self.n_frames), mode="bicubic", align_corners=True)[:, 0]
        # (N, n_mels, runs, frames per run) -> (N, runs, n_mels, frames per run): row = run * n_mels + band.
        x = x.view(N, n_mels, self.freq_ratio, -1).transpose(1, 2)
        return x.reshape(N, 1, self.freq_ratio * n_mels, -1).to(self.patch_embed.proj.weight.dtype)

    def clip_outputs(self, clips: torch.Tensor) -> dict[str, Any]:
        """Exactly `clip_samples`-long clips (N, clip_samples), used as given (no quantisation or
        padding) -> {"stages": the tokens after each stage [(N, L_i, C_i)], upstream's layer outputs
        (after patch merging for all but the last); "embedding": (N, num_features) mean of the
        final-normed tokens; "joint": (N, projection_dim) projected and L2-normalised}."""
        if clips.shape[-1] != self.clip_samples:
            raise ValueError(f"clips must be {self.clip_samples} samples long, got {clips.shape[-1]}")
        x = self.patch_embed(self.image(clips))
        stages = []
        for stage in self.layers:
            x = stage(x)
            stages.append(x)
        embedding = self.norm(x).mean(dim=1)
        joint = F.normalize(self.audio_projection(embedding), dim=-1)
        return {"stages": stages, "embedding": embedding, "joint": joint}

    def quantize(self, wav: torch.Tensor) -> torch.Tensor:
        """Round trip through int16 as upstream: clip to [-1, 1], x * 32767 truncated, / 32767."""
        q = torch.trunc(wav.float().clamp(-1.0, 1.0) * 32767.0)
        # Upstream divides in float64 and rounds to float32; for all 65 536 int16 values that equals
        # the float32 division (checked exhaustively), which also runs where float64 does not.
        return q / 32767.0

    # --- Encoder contract ---------------------------------------------------------------------
    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.clip_samples - 1, self.clip_samples, rounding_mode="floor")

    def finetune_blocks(self) -> list[nn.Module]:
        # Each stage's patch merging joins its last Swin block.
        return [blk for stage in self.layers for blk in stage.blocks]

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        B, S = wav.shape
        n = self.clip_samples
        lengths = lengths.to(wav.device)
        T = max(-(-S // n), 1)
        starts = torch.arange(T, device=wav.device) * n
        seg_len = (lengths[:, None] - starts[None, :]).clamp(0, n)  # (B, T) valid samples per window
        valid = seg_len > 0
        x = F.pad(wav.float(), (0, T * n - S)).view(B, T, n)[valid]  # (M, n)
        clips = repeat_pad(x, seg_len[valid])
        if self.quantize_int16:
            clips = self.quantize(clips)
        joint = self.clip_outputs(clips)["joint"] if len(clips) else wav.new_zeros(0, self.embed_dim)
        frames = joint.new_zeros(B, T, self.embed_dim)
        frames[valid] = joint
        return [frames]

    # --- upstream weights ---------------------------------------------------------------------
    def load_upstream(self, files: dict[str, Any]) -> None:
        path = pick_file(files, (".pt", ".ckpt", ".pth"), "CLAP checkpoint")
        checkpoint = read_checkpoint(path, allow=_numpy_globals())
        state = checkpoint_filter_fn(checkpoint, self, where=str(path))
        load_state_strict(self, state, where=str(path))


def repeat_pad(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Upstream's "repeatpad": the first `lengths` samples of each row of x (N, S), repeated as many
    whole times as fit in S, then zeros. x (N, S), lengths (N,) in [1, S] -> (N, S)."""
    S = x.shape[-1]
    idx = torch.arange(S, device=x.device)[None, :]
    L = lengths.clamp(min=1)[:, None]
    kept = idx < (S // L) * L
    return x.gather(1, idx % L) * kept


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


# --- upstream checkpoints -------------------------------------------------------------------------
# Parts of a CLAP checkpoint that are not the audio tower: the text tower and its heads, the
# training-only MLPs after each projection, and the two temperatures.
NON_AUDIO_PREFIXES = ("text_branch.", "text_projection.", "text_transform.", "audio_transform.")
NON_AUDIO_KEYS = ("logit_scale_a", "logit_scale_t")
# HTS-AT's AudioSet classification heads: not on the embedding path.
AUDIOSET_HEADS = ("tscam_conv.", "head.")
# Fixed tensors upstream stores (frozen torchlibrosa kernels, Swin index and mask buffers), which
# this model computes itself: checked against ours, then dropped.
STFT_KERNELS = ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight")
MEL_MATRIX = "logmel_extractor.melW"


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: HTSAT | None = None,
                         where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A LAION-CLAP checkpoint -> this module's state dict.

    Accepts a training checkpoint (`{"epoch", "state_dict", "optimizer", ...}`) or a bare state
    dict, with or without DDP's `module.` prefix. Keeps `audio_branch.*` (prefix removed) and
    `audio_projection.*`; drops, by name, the text tower and everything else of NON_AUDIO_*, the
    AudioSet heads, and the fixed tensors this model computes itself. With `model` given those are
    checked against the model's own (a checkpoint made with another front-end or window geometry
    raises ReleaseFormatError). Keys of any other kind are kept, so strict loading reports them.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ReleaseFormatError(
            f"{where}: expected a state dict or a checkpoint with 'state_dict', got {type(state).__name__}"
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    fusion = sorted(k for k in state if k.startswith(("audio_branch.mel_conv", "audio_branch.fusion_model",
                                                      "audio_branch.patch_embed.mel_conv2d",
                                                      "audio_branch.patch_embed.fusion_model")))
    if fusion:
        raise ReleaseFormatError(
            f"{where} is a CLAP checkpoint trained with feature fusion ({fusion[0]}, ...); this model is "
            "the non-fusion audio tower (the music checkpoints are non-fusion)."
        )
    out: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(NON_AUDIO_PREFIXES) or key in NON_AUDIO_KEYS:
            continue
        if key.startswith("audio_projection."):
            out[key] = value
        elif key.startswith("audio_branch."):
            name = key[len("audio_branch."):]
            if name.startswith(AUDIOSET_HEADS):
                continue
            if name in STFT_KERNELS or name == MEL_MATRIX or name.endswith(("relative_position_index", "attn_mask")):
                fixed[name] = value
            else:
                out[name] = value
        else:
            out[key] = value  # unknown: load_state_strict names it
    if model is not None:
        _check_fixed(fixed, model, where)
    return out


def _check_fixed(fixed: dict[str, torch.Tensor], model: HTSAT, where: str) -> None:
    """Compare the fixed tensors a checkpoint stores with those `model` computes (or fail, naming them)."""
    ours = _fixed_tensors(model)
    unexpected = sorted(set(fixed) - set(ours))
    if unexpected:
        raise ReleaseFormatError(
            f"{where}: fixed front-end / window tensors that this model's geometry does not have: {unexpected}"
        )
    for name, stored in fixed.items():  # absent ones are not needed: this model computes them
        mine, theirs = ours[name], stored.detach().to(torch.float64)
        if theirs.shape != mine.shape:
            raise ReleaseFormatError(f"{where}: {name} has shape {tuple(theirs.shape)}, expected {tuple(mine.shape)}")
        # Index and mask buffers are exact; kernels and the mel matrix agree to float32 rounding.
        tol = 1e-5 * float(mine.abs().max().clamp(min=1e-30)) if name in STFT_KERNELS or name == MEL_MATRIX else 0.0
        if float((theirs - mine).abs().max()) > tol:
            raise ReleaseFormatError(
                f"{where}: the stored {name} differs from the one this model computes; the checkpoint was "
                "made with another front-end or window configuration"
            )


def _fixed_tensors(model: HTSAT) -> dict[str, torch.Tensor]:
    """The fixed tensors upstream stores, as `model` computes them (float64), under upstream's names."""
    spec = model.frontend.spectrogram
    n = torch.arange(spec.n_fft, dtype=torch.float64)
    k = torch.arange(spec.n_fft // 2 + 1, dtype=torch.float64)
    window = get_window("hann", spec.n_fft).double()
    phase = 2 * math.pi * k[:, None] * n[None, :] / spec.n_fft
    a = model.args
    out = {
        STFT_KERNELS[0]: (window * torch.cos(phase))[:, None, :],
        STFT_KERNELS[1]: (-window * torch.sin(phase))[:, None, :],
        MEL_MATRIX: mel_filterbank(a["sample_rate"], a["n_fft"], a["n_mels"], a["f_min"], a["f_max"],
                                   htk=False, norm="slaney").double().T,
    }
    for i, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = blk.attn.relative_position_index.double()
            if blk.attn_mask is not None:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = blk.attn_mask.double()
    return out


def _numpy_globals() -> list[Any]:
    """numpy objects a CLAP training checkpoint pickles (scalars in its metadata), under the names
    numpy 1.x wrote them with and numpy 2.x's."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allow: list[Any] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
    ]
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"):
        if dtypes is not None and hasattr(dtypes, name):
            allow.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return allow


# --- registry -------------------------------------------------------------------------------------
CITATION = (
    "Wu, Y., Chen, K., Zhang, T., Hui, Y., Berg-Kirkpatrick, T. and Dubnov, S. (2023). Large-scale "
    "Contrastive Language-Audio Pretraining with Feature Fusion and Keyword-to-Caption Augmentation. "
    "ICASSP. Chen, K., Du, X., Zhu, B., Ma, Z., Berg-Kirkpatrick, T. and Dubnov, S. (2022). HTS-AT: A "
    "Hierarchical Token-Semantic Audio Transformer for Sound Classification and Detection. ICASSP."
)


@register_model(
    ModelSpec(
        name="clap-music",
        family="htsat",
        sample_rate=48000,
        frame_rate=0.1,
        embed_dim=512,
        num_layers=1,
        recommended_layer=-1,
        context_seconds=10.0,
        weights="hf-hub:lukewys/laion_clap",
        revision=None,
        files={"music_audioset_epoch_15_esc_90.14.pt": None},
        license="CC0-1.0",
        source="https://github.com/LAION-AI/CLAP",
        citation=CITATION,
        description="LAION-CLAP music checkpoint (music + AudioSet + LAION-Audio-630k), HTSAT-base audio "
        "tower: one 512-d audio-text embedding per 10 s window at 48 kHz.",
        args=dict(BASE),
        upstream=True,
    )
)
def clap_music(**kwargs: Any) -> HTSAT:
    return HTSAT(**{**BASE, **kwargs})
