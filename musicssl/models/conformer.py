"""MusicFM and MuQ: 128-band log-mel -> 2-D conv subsampling -> 12 rotary Conformer blocks, 25 Hz.

Won, Hung and Le, "A Foundation Model for Music Informatics", ICASSP 2024 (github.com/minzwon/musicfm,
MIT); Zhu et al., "MuQ: Self-Supervised Music Representation Learning with Mel Residual Vector
Quantization", arXiv:2501.01108 (github.com/tencent-ailab/MuQ, code MIT, weights CC-BY-NC-4.0).
Both are BEST-RQ-style masked token models on the same network: MuQ's package carries MusicFM's
modules, and its backbone is transformers' `Wav2Vec2ConformerEncoder` with rotary positions, as
MusicFM's. This file re-implements that network in plain torch (no code copied); the module names
are upstream's, so `checkpoint_filter_fn` only strips prefixes and drops training-only entries.

The path, as verified against the `muq` 0.1.0 package with transformers 5.23 (tests/test_parity_conformer.py):

- 24 kHz mono -> power mel spectrogram as torchaudio's defaults give it: n_fft 2048, hop 240, periodic
  Hann, centred with reflect padding, 128 HTK mels over 0-12 kHz without area normalisation ->
  10 log10(max(x, 1e-10)) (no top_db) -> the last frame dropped (S // 240 frames, 100 Hz) ->
  (x - mean) / std with one scalar pair read from the upstream statistics (`msd_stats.json` /
  `fma_stats.json`, MuQ's config.json `stat`), kept in the state dict as `norm.mean` / `norm.std`.
- Two residual 3x3 conv blocks (BatchNorm, ReLU, strided shortcut conv), each halving frequency and
  time: (B, 1, 128, T) -> (B, conv_dim, 32, T/4); channels x frequency flattened channel-major and
  projected to embed_dim by one Linear (16384 -> 1024 at full size).
- 12 Conformer blocks (`ConformerBlock`): half-step FFN, rotary self-attention, convolution module,
  half-step FFN, LayerNorm; then one more LayerNorm over the last block's output.

`forward_features` returns the 13 states upstream's `hidden_states` holds, in its order: [0] the
subsampling output, [i] block i's output for i = 1..11, [12] block 12's output after the final
LayerNorm (MuQ's `last_hidden_state`). Token i is centred on sample 960 i (25 Hz, frame_offset 0).

Deviations from upstream, all outside the numbers it computes for a single clip: items of a batch
with different lengths run in groups of equal length, so each gives what it would alone (upstream
would mix in padding); clips shorter than 1025 samples (the reflect padding needs more) are
zero-padded to that length instead of raising. The dropouts of upstream's training are left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from musicssl.audio.frontends import AmplitudeToDB, MelSpectrogram, Standardize
from musicssl.convert import pick_file, read_checkpoint, take
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.base import Encoder, init_args
from musicssl.models.layers import conv_bn
from musicssl.registry import ModelSpec, register_family, register_model

MUSICFM_CITATION = (
    "@inproceedings{won2023musicfm, title={A Foundation Model for Music Informatics}, author={Won, Minz and "
    "Hung, Yun-Ning and Le, Duc}, booktitle={ICASSP}, year={2024}, note={arXiv:2311.03318}}"
)
MUQ_CITATION = (
    "@article{zhu2025muq, title={MuQ: Self-Supervised Music Representation Learning with Mel Residual Vector "
    "Quantization}, author={Zhu, Haina and Zhou, Yizhi and Chen, Hangting and Yu, Jianwei and Ma, Ziyang and "
    "Gu, Rongzhi and Luo, Yi and Tan, Wei and Chen, Xie}, journal={arXiv preprint arXiv:2501.01108}, year={2025}}"
)

# MusicFM's and MuQ's default statistics (MSD, `melspec_2048_{mean,std}`); only for models built without
# upstream files: a conversion always takes the pair from the files it converts.
MSD_MEAN, MSD_STD = 6.768444971712967, 18.417922652295623
SAMPLE_RATE = 24000

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, not {name!r}")
    return _ACTIVATIONS[name]()


# --- Conformer pieces (reusable: activation, biases and norm epsilons are switches) ---------------
class FeedForward(nn.Module):
    """Position-wise MLP: Linear(dim -> hidden) -> activation -> Linear(hidden -> dim). (B, T, dim) -> same."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", bias: bool = True) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = _activation(activation)
        self.output_dense = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class ConvModule(nn.Module):
    """Conformer convolution module (Gulati et al. 2020): LayerNorm -> pointwise conv to 2 dim -> GLU ->
    depthwise conv (odd `kernel_size`, same length) -> BatchNorm -> activation -> pointwise conv.
    (B, T, dim) -> (B, T, dim), without the residual. wav2vec2-conformer has no conv biases
    (`bias=False`); other Conformers have them."""

    def __init__(
        self, dim: int, kernel_size: int = 31, activation: str = "silu", bias: bool = False,
        ln_eps: float = 1e-5, bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the length, got {kernel_size}")
        self.layer_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)
        self.batch_norm = nn.BatchNorm1d(dim, eps=bn_eps)
        self.act = _activation(activation)
        self.pointwise_conv2 = nn.Conv1d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pointwise_conv1(self.layer_norm(x).transpose(1, 2)), dim=1)
        x = self.act(conv_bn(self.depthwise_conv, self.batch_norm, x))
        return self.pointwise_conv2(x).transpose(1, 2)


def rotary_tables(length: int, head_dim: int, base: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_dim) of rotary positions 0..length-1, float32, in the rotate-half layout:
    angle[t, j] = t / base^(2 (j mod head_dim/2) / head_dim)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (-x[d/2:], x[:d/2]) along the last axis."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention of wav2vec2-conformer with rotary positions (Su et al. 2021).

    The rotation acts on the block's normalised *input*, head chunk by head chunk (rotate-half
    layout), before the query and key projections; values see the unrotated input. Separate q/k/v/out
    projections with biases; scaled dot-product attention, bidirectional.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); cos, sin (T, head_dim) in x's dtype; attn_mask (B, 1, 1, T) bool, True = attend."""
        B, T, D = x.shape
        heads = x.view(B, T, self.num_heads, self.head_dim)
        rotated = (heads * cos[:, None, :] + rotate_half(heads) * sin[:, None, :]).view(B, T, D)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.linear_q(rotated)), split(self.linear_k(rotated)), split(self.linear_v(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.linear_out(y.transpose(1, 2).reshape(B, T, D))


class ConformerBlock(nn.Module):
    """wav2vec2-conformer block: x + FFN(LN x)/2 -> x + MHSA(LN x) -> x + Conv(x) -> x + FFN(LN x)/2 -> LN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, kernel_size: int = 31, activation: str = "silu") -> None:
        super().__init__()
        self.ffn1_layer_norm = nn.LayerNorm(dim)
        self.ffn1 = FeedForward(dim, ffn_dim, activation)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = RotarySelfAttention(dim, num_heads)
        self.conv_module = ConvModule(dim, kernel_size, activation)
        self.ffn2_layer_norm = nn.LayerNorm(dim)
        self.ffn2 = FeedForward(dim, ffn_dim, activation)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(self.ffn1_layer_norm(x))
        x = x + self.self_attn(self.self_attn_layer_norm(x), cos, sin, attn_mask)
        x = x + self.conv_module(x)
        x = x + 0.5 * self.ffn2(self.ffn2_layer_norm(x))
        return self.final_layer_norm(x)


class Conformer(nn.Module):
    """A stack of `ConformerBlock`s and a final LayerNorm. (B, T, dim) -> depth + 1 states (B, T, dim):
    the input, each block's output, the last one replaced by its LayerNorm."""

    def __init__(self, dim: int, depth: int, num_heads: int, ffn_dim: int, kernel_size: int = 31,
                 activation: str = "silu", rotary_base: float = 10000.0, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.rotary_base = rotary_base
        self.layers = nn.ModuleList(ConformerBlock(dim, num_heads, ffn_dim, kernel_size, activation) for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        head_dim = self.layers[0].self_attn.head_dim
        cos, sin = (t.to(x.dtype) for t in rotary_tables(x.shape[1], head_dim, self.rotary_base, x.device))
        hidden = [x]
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask)
            hidden.append(x)
        hidden[-1] = self.layer_norm(x)
        return hidden


# --- the 2-D convolutional front -------------------------------------------------------------------
class Res2d(nn.Module):
    """Residual block: relu(BN(conv3x3(relu(BN(conv3x3 x)))) + shortcut), the first conv and the
    shortcut (a BN'd 3x3 conv, present when channels or stride change) strided. (B, C, F, T) -> (B, C', F', T')."""

    def __init__(self, in_ch: int, out_ch: int, stride: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = in_ch != out_ch or stride[0] > 1
        if self.shortcut:
            self.conv3 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
            self.bn3 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_bn(self.conv2, self.bn2, F.relu(conv_bn(self.conv1, self.bn1, x)))
        skip = conv_bn(self.conv3, self.bn3, x) if self.shortcut else x
        return F.relu(out + skip)


class ConvSubsampling(nn.Module):
    """Two `Res2d` blocks (frequency and time stride 2 each) and a Linear over channels x frequency:
    features (B, n_mels, T) -> tokens (B, ceil(T / 4), out_dim)."""

    def __init__(self, hidden: int, out_dim: int, n_mels: int) -> None:
        super().__init__()
        if n_mels % 4:
            raise ValueError(f"n_mels must be a multiple of 4, got {n_mels}")
        self.conv = nn.Sequential(Res2d(1, hidden, (2, 2)), Res2d(hidden, hidden, (2, 2)))
        self.linear = nn.Linear(hidden * n_mels // 4, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None]
        if x.is_cuda:
            # cuDNN's tensor-core convolutions work channels-last: from the default layout it
            # transposes around every convolution (a third of MusicFM's GPU time went to the front).
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv(x)  # (B, C, F', T')
        return self.linear(x.permute(0, 3, 1, 2).flatten(2))  # channel-major (c f), as upstream


# --- the encoder -----------------------------------------------------------------------------------
@register_family("conformer")
class MusicFM(Encoder):
    """MusicFM / MuQ encoder. wav (B, S) at 24 kHz -> depth + 1 states (B, T, embed_dim), T = ceil((S // 240) / 4).

    Args:
        n_fft, mel_hop, n_mels: the mel front-end (samples; 128 HTK mels over 0-12 kHz).
        norm_mean, norm_std: dB statistics of the training data (a conversion sets them from the
            upstream files; the defaults are MusicFM's MSD statistics).
        conv_dim: channels of the two conv blocks; embed_dim, depth, num_heads, ffn_dim, kernel_size,
            rotary_base, layer_norm_eps (of the final LayerNorm): the Conformer.
        context_seconds, overlap_seconds: windows of `embed()` (30 s: upstream's training crops).
    """

    def __init__(
        self,
        n_fft: int = 2048,
        mel_hop: int = 240,
        n_mels: int = 128,
        norm_mean: float = MSD_MEAN,
        norm_std: float = MSD_STD,
        conv_dim: int = 512,
        embed_dim: int = 1024,
        depth: int = 12,
        num_heads: int = 16,
        ffn_dim: int = 4096,
        kernel_size: int = 31,
        rotary_base: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        context_seconds: float = 30.0,
        overlap_seconds: float = 5.0,
    ) -> None:
        super().__init__()
        self.args = init_args(locals())
        self.sample_rate, self.mel_hop = SAMPLE_RATE, mel_hop
        self.hop_length, self.frame_offset = 4 * mel_hop, 0.0
        self.context_seconds, self.overlap_seconds = context_seconds, overlap_seconds
        self.embed_dim, self.num_layers = embed_dim, depth + 1
        # The filterbank and the statistics are computed and checked on the CPU even under a `meta` or
        # CUDA default device (e.g. `with torch.device("meta")` to list a full-size model's shapes).
        with torch.device("cpu"):
            self.melspec = MelSpectrogram(SAMPLE_RATE, n_fft=n_fft, hop_length=mel_hop, n_mels=n_mels, htk=True,
                                          norm=None, pad_mode="reflect")
            self.norm = Standardize(norm_mean, norm_std, persistent=True)
        self.to_db = AmplitudeToDB("power", ref=1.0, amin=1e-10, top_db=None)
        self.conv = ConvSubsampling(conv_dim, embed_dim, n_mels)
        self.conformer = Conformer(embed_dim, depth, num_heads, ffn_dim, kernel_size, "silu", rotary_base, layer_norm_eps)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """ceil((S // mel_hop) / 4) tokens; at least one for a non-empty clip (see `_forward_equal`)."""
        mel_frames = torch.div(lengths, self.mel_hop, rounding_mode="floor")
        tokens = torch.div(mel_frames + 3, 4, rounding_mode="floor")
        return torch.where(lengths > 0, tokens.clamp(min=1), tokens)

    def finetune_blocks(self) -> list[nn.Module]:
        return list(self.conformer.layers)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, S) -> normalised dB mel (B, n_mels, S // mel_hop), float32."""
        return self.norm(self.to_db(self.melspec(wav.float()))[..., :-1])

    def _forward_equal(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """Items of one length, as upstream runs them. Clips of n_fft / 2 samples or fewer, which the
        reflect-padded STFT refuses, are zero-padded to n_fft / 2 + 1 and keep their `frame_lengths` frames."""
        n, shortest = wav.shape[-1], self.melspec.spectrogram.n_fft // 2 + 1
        if n < shortest:
            wav = F.pad(wav, (0, shortest - n))
        dtype = self.conv.linear.weight.dtype
        hidden = self.conformer(self.conv(self.log_mel(wav).to(dtype)))
        if n < shortest:
            t = int(self.frame_lengths(torch.tensor(n)))
            hidden = [h[:, :t] for h in hidden]
        return hidden

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        lengths = lengths.to(wav.device)
        S = wav.shape[-1]
        if bool((lengths == S).all()):
            return self._forward_equal(wav)
        n_out = int(self.frame_lengths(torch.tensor(S)))
        out: list[torch.Tensor] | None = None
        for n in sorted(set(lengths.tolist()), reverse=True):
            idx = (lengths == n).nonzero().squeeze(1)
            hidden = self._forward_equal(wav[idx, :n])
            if out is None:
                out = [h.new_zeros(wav.shape[0], n_out, h.shape[-1]) for h in hidden]
            t = int(self.frame_lengths(torch.tensor(n)))
            for o, h in zip(out, hidden):
                o[idx, :t] = h[:, :t]
        assert out is not None
        return out

    # --- upstream weights -------------------------------------------------------------------
    def load_upstream(self, files: dict[str, Any]) -> None:
        """MusicFM (`pretrained_*.pt` + `*_stats.json`) or MuQ (`model.safetensors` + `config.json`)."""
        files = {name: Path(p) for name, p in files.items()}
        if any(name.endswith(".safetensors") for name in files):
            path = pick_file(files, [".safetensors"], "MuQ weights")
            mean, std = _muq_config_stats(pick_file(files, ["config.json"], "MuQ config"), self.args)
            state = _read_safetensors(path)
        else:
            path = pick_file(files, [".pt"], "MusicFM checkpoint")
            mean, std = _stats_json(pick_file(files, ["_stats.json"], "MusicFM statistics"))
            ckpt = read_checkpoint(path, allow=[set])
            if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
                raise ReleaseFormatError(f"{path} holds no 'state_dict' dict: not a MusicFM checkpoint")
            state = dict(ckpt["state_dict"])
        load_state_strict(self, checkpoint_filter_fn(state, mean, std), where=str(path))
        self.args.update(norm_mean=mean, norm_std=std)


# Entries of upstream state dicts (after the "model." prefix) that only serve training or are
# recomputed here: the CLS token, BEST-RQ quantizers (MusicFM `quantizer_melspec_2048_0`, MuQ
# `quantizer_melspec_2048` or the Mel-RVQ `rvq`), the token-prediction head, MuQ's optional mel
# reconstruction head, MusicFM's torchaudio window and filterbank, the rotary frequencies, and the
# convolutional position embedding that transformers builds but never calls with rotary positions.
DROP_KEYS = frozenset({"cls_token", "conformer.embed_positions.inv_freq"})
DROP_PREFIXES = ("quantizer_melspec_2048", "rvq.", "linear.", "recon_proj.", "preprocessor_melspec_2048.",
                 "conformer.pos_conv_embed.")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], norm_mean: float, norm_std: float,
                         prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Upstream MusicFM/MuQ state dict (keys under `prefix`) -> this module's state dict.

    The names under `conv.` and `conformer.` are kept; training-only entries (DROP_KEYS,
    DROP_PREFIXES) are dropped; the scalar statistics become `norm.mean` / `norm.std`. Keys outside
    `prefix` or unknown ones stay, so the strict load reports them.
    """
    out: dict[str, torch.Tensor] = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    for key, value in take(state_dict, prefix).items():
        if key in DROP_KEYS or key.startswith(DROP_PREFIXES):
            continue
        out[key] = value
    out["norm.mean"] = torch.tensor(float(norm_mean))
    out["norm.std"] = torch.tensor(float(norm_std))
    return out


def _stats_json(path: Path) -> tuple[float, float]:
    try:
        stats = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReleaseFormatError(f"cannot read the statistics {path}: {err}") from err
    return _mel_stats(stats, path)


def _mel_stats(stats: Any, path: Path) -> tuple[float, float]:
    try:
        mean, std = float(stats["melspec_2048_mean"]), float(stats["melspec_2048_std"])
    except (KeyError, TypeError, ValueError) as err:
        raise ReleaseFormatError(f"{path} has no numeric melspec_2048_mean / melspec_2048_std") from err
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ReleaseFormatError(f"{path}: melspec_2048 statistics mean={mean}, std={std} are not usable")
    return mean, std


def _muq_config_stats(path: Path, args: Mapping[str, Any]) -> tuple[float, float]:
    """MuQ's config.json: check that it describes the network we build; return its mel statistics."""
    try:
        config = json.loads(path.read_text())
        w2v = config["w2v2_config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ReleaseFormatError(f"cannot read a MuQ config (with w2v2_config) from {path}: {err}") from err
    # MuQConfig's defaults stand for keys config.json leaves out.
    expected = {
        "label_rate": (config.get("label_rate", 25), 25),
        "features": (config.get("features", ["melspec_2048"]), ["melspec_2048"]),
        "hop_length": (config.get("hop_length", 240), args["mel_hop"]),
        "n_mels": (config.get("n_mels", 128), args["n_mels"]),
        "conv_dim": (config.get("conv_dim", 512), args["conv_dim"]),
        "encoder_dim": (config.get("encoder_dim", 1024), args["embed_dim"]),
        "encoder_depth": (config.get("encoder_depth", 12), args["depth"]),
        "w2v2_config.position_embeddings_type": (w2v.get("position_embeddings_type"), "rotary"),
        "w2v2_config.hidden_act": (w2v.get("hidden_act") in ("swish", "silu"), True),
        "w2v2_config.num_attention_heads": (w2v.get("num_attention_heads"), args["num_heads"]),
        "w2v2_config.intermediate_size": (w2v.get("intermediate_size"), args["ffn_dim"]),
        "w2v2_config.conv_depthwise_kernel_size": (w2v.get("conv_depthwise_kernel_size"), args["kernel_size"]),
        "w2v2_config.rotary_embedding_base": (w2v.get("rotary_embedding_base"), args["rotary_base"]),
        "w2v2_config.layer_norm_eps": (w2v.get("layer_norm_eps"), args["layer_norm_eps"]),
    }
    wrong = {k: got for k, (got, want) in expected.items() if got != want}
    if wrong:
        raise ReleaseFormatError(
            f"{path} describes a network this port does not build: {wrong} "
            f"(expected {({k: want for k, (_, want) in expected.items() if k in wrong})})"
        )
    return _mel_stats(config.get("stat"), path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ReleaseFormatError(f"cannot read {path}: {err}. Download it again if it may be truncated.") from err


# --- registry --------------------------------------------------------------------------------------
def _spec(name: str, **fields: Any) -> ModelSpec:
    return ModelSpec(
        name=name, family="conformer", sample_rate=SAMPLE_RATE, frame_rate=25.0, embed_dim=1024, num_layers=13,
        context_seconds=30.0, upstream=True, revision=None, args={}, **fields,
    )


def _musicfm_spec(data: str, data_name: str) -> ModelSpec:
    return _spec(
        f"musicfm-{data}",
        recommended_layer=7,
        weights="hf-hub:minzwon/MusicFM",
        files={f"pretrained_{data}.pt": None, f"{data}_stats.json": None},
        license="MIT",
        source="https://github.com/minzwon/musicfm",
        citation=MUSICFM_CITATION,
        description=f"MusicFM ({data_name}): BEST-RQ on 128-band log-mel, 2 conv blocks + 12x1024 rotary "
                    "Conformer; 1024-d at 25 Hz, 13 layers (upstream uses layer 7).",
    )


@register_model(_musicfm_spec("msd", "Million Song Dataset"))
def musicfm_msd(**kwargs: Any) -> MusicFM:
    return MusicFM(**kwargs)


@register_model(_musicfm_spec("fma", "FMA-large"))
def musicfm_fma(**kwargs: Any) -> MusicFM:
    return MusicFM(**kwargs)


@register_model(_spec(
    "muq-msd",
    recommended_layer=-1,
    weights="hf-hub:OpenMuQ/MuQ-large-msd-iter",
    files={"config.json": None, "model.safetensors": None},
    license="CC-BY-NC-4.0",
    source="https://github.com/tencent-ailab/MuQ",
    citation=MUQ_CITATION,
    description="MuQ large (MSD, iterative Mel-RVQ targets): MusicFM's network, 1024-d at 25 Hz, 13 layers "
                "(no layer advised upstream; the last is the default here).",
))
def muq_msd(**kwargs: Any) -> MusicFM:
    return MusicFM(**kwargs)
