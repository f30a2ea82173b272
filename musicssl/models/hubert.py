"""HuBERT-style waveform transformer, with the MERT-v1 weights (m-a-p/MERT-v1-95M and -330M).

Li, Yuan, Zhang, Ma, Chen, Yin, Lin, Ragni, Benetos, Gyenge, Dannenberg, Liu, Chen, Xia, Shi, Huang,
Guo and Fu, "MERT: Acoustic Music Understanding Model with Large-Scale Self-supervised Training",
ICLR 2024 (arXiv:2306.00107). Upstream runs the model through Hugging Face remote code built on
transformers' HuBERT classes; this file is our own implementation of the inference path. It keeps the
upstream module names, so MERT's ``pytorch_model.bin`` loads through `checkpoint_filter_fn` with only
the positional convolution's weight norm folded and the training-only mask token dropped.

The network, at 24 kHz:
- waveform, standardised per window over its valid samples ((x - mean) / sqrt(var + 1e-7), what
  MERT's preprocessor (transformers' Wav2Vec2FeatureExtractor, ``do_normalize``) does per clip);
- 7 bias-free convolutions (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2: hop 320 = 75 frames/s,
  receptive field 400 samples, no padding), GELU after each; the first is followed by a per-channel
  norm over time (GroupNorm with one group per channel);
- LayerNorm + Linear to the model width; a grouped convolution over time (128 taps, 16 groups,
  weight-normalised upstream, folded here) + GELU added as relative position;
- transformer layers: post-LN for the 95M model (a LayerNorm before the first layer, then
  LN(x + attn(x)), LN(x + ffn(x))), pre-LN ("stable layer norm") for the 330M model (x + attn(LN x),
  x + ffn(LN x), one LayerNorm after the last layer).

Hidden states, as upstream's ``output_hidden_states`` (transformers 4.x, which MERT's code targets):
the input of the first layer, then each layer's output; for pre-LN the last one is after the final
LayerNorm. 13 states for 95M, 25 for 330M.

Verified in tests/test_parity_hubert.py against transformers' `HubertModel` with MERT's settings
(random weights, both layer-norm placements): every hidden state to < 1e-5 relative error, and the
state-dict layout against the key list of MERT's released file. Batched windows of different lengths
give each item exactly its unbatched result: padding is zeroed, kept out of the first norm's
statistics and masked out of attention (upstream's batched path lets padding into that norm).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from musicssl.convert import fold_weight_norm, pick_file, read_checkpoint, take, unwrap_state
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.base import Encoder, init_args
from musicssl.registry import ModelSpec, register_family, register_model

CITATION = (
    "Li, Y., Yuan, R., Zhang, G., Ma, Y., Chen, X., Yin, H., Lin, C., Ragni, A., Benetos, E., Gyenge, N., "
    "Dannenberg, R., Liu, R., Chen, W., Xia, G., Shi, Y., Huang, W., Guo, Y. and Fu, J. (2024). MERT: "
    "Acoustic Music Understanding Model with Large-Scale Self-supervised Training. ICLR. arXiv:2306.00107."
)

# Keys of upstream checkpoints that inference never uses, dropped by name.
log = logging.getLogger(__name__)

TRAINING_ONLY_KEYS = ("masked_spec_embed",)  # the learned mask token of masked prediction
POS_CONV = "encoder.pos_conv_embed.conv."
BASE = "hubert."  # transformers' prefix for the encoder inside a fine-tuned HubertFor... model


class ConvLayer(nn.Module):
    """Conv1d (no padding) -> optional per-channel norm over time -> GELU: (B, C_in, T) -> (B, C_out, T')."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.GroupNorm(c_out, c_out) if norm else None

    def forward(self, x: torch.Tensor, n_valid: torch.Tensor | None) -> torch.Tensor:
        """n_valid (B,) valid output frames, or None when no item is padded."""
        if self.layer_norm is not None and x.shape[1] == 1 and not torch.is_grad_enabled():
            return F.gelu(self._conv_norm_folded(x, n_valid))
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self._norm(x, n_valid)
        return F.gelu(x)

    def _norm(self, x: torch.Tensor, n_valid: torch.Tensor | None) -> torch.Tensor:
        # Statistics over each item's valid frames only, in float32 (it sums over up to ~10^5 frames).
        gn = self.layer_norm
        args = (gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps)
        if n_valid is None:
            return F.group_norm(x.float(), *args).to(x.dtype)
        out = torch.zeros_like(x)
        for b, n in enumerate(n_valid.tolist()):
            out[b, :, :n] = F.group_norm(x[b : b + 1, :, :n].float(), *args)[0].to(x.dtype)
        return out

    def _conv_norm_folded(self, x: torch.Tensor, n_valid: torch.Tensor | None) -> torch.Tensor:
        """conv + per-channel norm of a one-channel input as one batched matmul: (B, 1, S) -> (B, C, T').

        The conv is linear in the input frames f_t (kernel samples each), so channel c's mean over
        time is w_c . mean(f) (+ bias) and its variance w_c^T Cov(f) w_c: the norm's statistics come
        from a kernel x kernel covariance in float64 and fold into the weights. This skips the
        (B, C, T') intermediate that the norm would read twice (the slowest step of the model on CPU).
        """
        conv, gn = self.conv, self.layer_norm
        frames = x[:, 0].unfold(-1, conv.kernel_size[0], conv.stride[0])  # (B, T', kernel), a view
        T = frames.shape[1]
        n = n_valid if n_valid is not None else torch.full((x.shape[0],), T, device=x.device)
        valid = (torch.arange(T, device=x.device)[None, :] < n[:, None]).double()[..., None]  # (B, T', 1)
        f64, count = frames.double() * valid, n.double().clamp(min=1)[:, None]
        mean = f64.sum(1) / count  # (B, kernel)
        cov = torch.einsum("btk,btl->bkl", f64, f64) / count[..., None] - mean[:, :, None] * mean[:, None, :]
        w = conv.weight[:, 0].double()  # (C, kernel)
        var = torch.einsum("ck,bkl,cl->bc", w, cov, w).clamp(min=0)
        scale = gn.weight.double() / torch.sqrt(var + gn.eps)  # (B, C)
        # The conv's bias shifts each channel and its mean alike, so it drops out of the norm.
        shift = gn.bias.double() - (mean @ w.T) * scale
        # The shift rides as one more weight on a row of ones, so the output is written once
        # (baddbmm would first fill it with the broadcast shift: a pass over (B, C, T')).
        weights = torch.cat([w * scale[..., None], shift[..., None]], dim=-1).to(x.dtype)  # (B, C, kernel + 1)
        rows = torch.cat([frames, frames.new_ones(frames.shape[:2] + (1,))], dim=-1)  # (B, T', kernel + 1)
        out = torch.bmm(weights, rows.transpose(1, 2))
        if n_valid is not None:
            for b, nb in enumerate(n_valid.tolist()):
                out[b, :, nb:] = 0
        return out


class FeatureEncoder(nn.Module):
    """The convolution stack: standardised wave (B, S) -> (B, conv_dim[-1], T)."""

    def __init__(self, conv_dim: Sequence[int], kernels: Sequence[int], strides: Sequence[int], bias: bool) -> None:
        super().__init__()
        widths = [1, *conv_dim]
        self.conv_layers = nn.ModuleList(
            ConvLayer(widths[i], widths[i + 1], kernels[i], strides[i], bias, norm=i == 0) for i in range(len(kernels))
        )

    def forward(self, wav: torch.Tensor, n_first: torch.Tensor | None) -> torch.Tensor:
        """n_first: valid frames after the first layer (the only one with a norm), or None if unpadded."""
        x = wav[:, None]
        for layer in self.conv_layers:
            x = layer(x, n_first)
        return x


class FeatureProjection(nn.Module):
    """LayerNorm over conv channels, then Linear to the model width: (B, T, C) -> (B, T, D)."""

    def __init__(self, c_in: int, dim: int, eps: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_in, eps=eps)
        self.projection = nn.Linear(c_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class PositionalConv(nn.Module):
    """Relative position from a grouped convolution over time: (B, T, D) -> (B, T, D), GELU applied.

    An even kernel with padding kernel // 2 gives T + 1 outputs; the last is dropped (as upstream).
    """

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))[..., : x.shape[1]]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections, through SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D); attn_mask (B, 1, 1, T) bool, True where a key may be attended."""
        B, T, D = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           attn_mask=attn_mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class TransformerLayer(nn.Module):
    """One encoder layer; `pre_ln` picks the norm placement (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float, pre_ln: bool) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.attention = SelfAttention(dim, num_heads)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.feed_forward = FeedForward(dim, hidden)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attention(self.layer_norm(x), attn_mask)
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x, attn_mask))
        return self.final_layer_norm(x + self.feed_forward(x))


class TransformerEncoder(nn.Module):
    """Positional conv + layers: (B, T, D) -> every hidden state (see the module docstring)."""

    def __init__(self, dim: int, depth: int, num_heads: int, hidden: int, pos_kernel: int, pos_groups: int,
                 eps: float, pre_ln: bool) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.pos_conv_embed = PositionalConv(dim, pos_kernel, pos_groups)
        # Before the first layer for post-LN, after the last for pre-LN: one key, two places (as upstream).
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, hidden, eps, pre_ln) for _ in range(depth))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> list[torch.Tensor]:
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, attn_mask)
            hidden.append(x)
        if self.pre_ln:
            hidden[-1] = self.layer_norm(x)
        return hidden


@register_family("hubert")
class HuBERT(Encoder):
    """HuBERT-style encoder (MERT-v1). wav (B, S) at 24 kHz -> num_hidden_layers + 1 states (B, T, hidden_size).

    Frame t sees samples [320 t, 320 t + 400): T = (S - 400) // 320 + 1. Clips shorter than the
    receptive field are zero-padded to it (after standardising) and give one frame.

    Args:
        hidden_size, num_hidden_layers, num_heads, intermediate_size: the transformer.
        conv_dim, conv_kernel, conv_stride, conv_bias: the convolution stack (one entry per layer).
        pos_conv_kernel, pos_conv_groups: the positional convolution.
        stable_layer_norm: pre-LN layers with a final LayerNorm (330M) instead of post-LN (95M).
        layer_norm_eps: of every LayerNorm.
        sample_rate: Hz the model expects (24000 for MERT); `embed()` resamples to it.
        normalize: standardise each window over its valid samples (MERT's preprocessor does, per clip).
        context_seconds, overlap_seconds: windows of `embed()`; the overlap must cover the receptive field.
    """

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        conv_dim: Sequence[int] = (512,) * 7,
        conv_kernel: Sequence[int] = (10, 3, 3, 3, 3, 2, 2),
        conv_stride: Sequence[int] = (5, 2, 2, 2, 2, 2, 2),
        conv_bias: bool = False,
        pos_conv_kernel: int = 128,
        pos_conv_groups: int = 16,
        stable_layer_norm: bool = False,
        layer_norm_eps: float = 1e-5,
        sample_rate: int = 24000,
        normalize: bool = True,
        context_seconds: float = 30.0,
        overlap_seconds: float = 5.0,
    ) -> None:
        super().__init__()
        if not len(conv_dim) == len(conv_kernel) == len(conv_stride) > 0:
            raise ValueError("conv_dim, conv_kernel and conv_stride need one entry per conv layer, and at least one")
        self.args = init_args(locals())
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            self.args[k] = [int(v) for v in self.args[k]]  # JSON-friendly
        self.conv_kernel, self.conv_stride = list(conv_kernel), list(conv_stride)
        self.receptive_field = 1 + sum((k - 1) * math.prod(conv_stride[:i]) for i, k in enumerate(conv_kernel))
        self.sample_rate, self.hop_length = sample_rate, math.prod(conv_stride)
        self.frame_offset = (self.receptive_field - 1) / 2  # centre of samples [0, receptive_field)
        self.context_seconds, self.overlap_seconds = context_seconds, overlap_seconds
        if round(overlap_seconds * sample_rate) < self.receptive_field or overlap_seconds >= context_seconds:
            # embed() then never cuts a last window shorter than one frame's input.
            raise ValueError(
                f"overlap_seconds must be at least the receptive field ({self.receptive_field} samples = "
                f"{self.receptive_field / sample_rate:.4f} s) and below context_seconds; got {overlap_seconds}"
            )
        self.embed_dim, self.num_layers = hidden_size, num_hidden_layers + 1
        self.normalize = normalize
        self.feature_extractor = FeatureEncoder(conv_dim, conv_kernel, conv_stride, conv_bias)
        self.feature_projection = FeatureProjection(conv_dim[-1], hidden_size, layer_norm_eps)
        self.encoder = TransformerEncoder(hidden_size, num_hidden_layers, num_heads, intermediate_size,
                                          pos_conv_kernel, pos_conv_groups, layer_norm_eps, stable_layer_norm)
        self.apply(_init_weights)

    # --- Encoder contract ---------------------------------------------------------------------
    def _conv_lengths(self, lengths: Any) -> list[Any]:
        """Frames after each conv layer for inputs of `lengths` samples (int or tensor, >= receptive field)."""
        out = []
        for k, s in zip(self.conv_kernel, self.conv_stride):
            lengths = (lengths - k) // s + 1
            out.append(lengths)
        return out

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self._conv_lengths(lengths.clamp(min=self.receptive_field))[-1]

    def finetune_blocks(self) -> list[nn.Module]:
        blocks: list[nn.Module] = list(self.encoder.layers)
        if self.encoder.pre_ln:  # the shared norm then acts after the last layer, so it trains with it
            blocks[-1] = nn.ModuleList([blocks[-1], self.encoder.layer_norm])
        return blocks

    def standardize(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(x - mean) / sqrt(var + 1e-7) over each item's first `lengths` samples (population
        variance, float32), zero past them: (B, S) -> (B, S)."""
        valid = torch.arange(wav.shape[-1], device=wav.device)[None, :] < lengths[:, None]
        x = wav.float() * valid
        n = lengths.clamp(min=1)[:, None].float()
        mean = x.sum(-1, keepdim=True) / n
        var = ((x - mean) * valid).square().sum(-1, keepdim=True) / n
        return (x - mean) / torch.sqrt(var + 1e-7) * valid

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        lengths = lengths.to(wav.device)
        if self.normalize:
            x = self.standardize(wav, lengths)
        else:
            x = wav.float() * (torch.arange(wav.shape[-1], device=wav.device)[None, :] < lengths[:, None])
        if x.shape[-1] < self.receptive_field:
            x = F.pad(x, (0, self.receptive_field - x.shape[-1]))
        valid = self._conv_lengths(lengths.clamp(min=self.receptive_field))
        full = self._conv_lengths(x.shape[-1])
        # Masks only where some item is padded, so unpadded batches take the plain (fused) path.
        n_first = valid[0] if bool((valid[0] < full[0]).any()) else None
        dtype = self.feature_projection.projection.weight.dtype
        h = self.feature_projection(self.feature_extractor(x.to(dtype), n_first).transpose(1, 2))  # (B, T, D)
        if not bool((valid[-1] < full[-1]).any()):
            return self.encoder(h, None)
        frames = torch.arange(h.shape[1], device=h.device)[None, :] < valid[-1][:, None]  # (B, T)
        keep = frames[:, :, None].to(h.dtype)
        # Padded frames enter the positional conv as zeros, as the conv's own padding does.
        hidden = self.encoder(h * keep, frames[:, None, None, :])
        return [t * keep for t in hidden]

    # --- upstream weights ---------------------------------------------------------------------
    def load_upstream(self, files: dict[str, Any]) -> None:
        """Load MERT's ``pytorch_model.bin`` (a plain state dict, read with weights_only=True)."""
        path = pick_file({k: Path(v) for k, v in files.items()}, (".bin", ".pt", ".pth"), "checkpoint")
        state = unwrap_state(read_checkpoint(path), path)
        try:
            state = checkpoint_filter_fn(state)
        except ReleaseFormatError as err:
            raise ReleaseFormatError(f"{path}: {err}") from err
        load_state_strict(self, state, where=str(path))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MERT's ``pytorch_model.bin`` (the state dict of its remote-code MERTModel, keys without a
    prefix; the same layout as transformers' HubertModel) -> this class's keys.

    The module names are kept; `masked_spec_embed` (training only) is dropped; the positional
    conv's weight norm (``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``,
    normalised over all axes but the kernel axis, dim=2) is folded into a plain weight. Any other
    unknown key is left in, so strict loading reports it.
    """
    if not any(k.startswith("feature_extractor.") for k in state_dict) and any(k.startswith(BASE) for k in state_dict):
        heads = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(BASE)})
        log.warning("the checkpoint holds a fine-tuned model: keeping its %r encoder, dropping %s", BASE, heads)
        state_dict = take(state_dict, BASE)
    state = {k: v for k, v in state_dict.items() if k not in TRAINING_ONLY_KEYS}
    if POS_CONV + "weight" not in state:
        fold_weight_norm(state, POS_CONV, dim=2)
    return state


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv1d):
        nn.init.kaiming_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --- registry -------------------------------------------------------------------------------------
ARGS_95M = dict(hidden_size=768, num_hidden_layers=12, num_heads=12, intermediate_size=3072, stable_layer_norm=False)
ARGS_330M = dict(hidden_size=1024, num_hidden_layers=24, num_heads=16, intermediate_size=4096, stable_layer_norm=True)


def _spec(name: str, repo: str, sha256: str, revision: str | None, args: dict[str, Any], description: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="hubert",
        sample_rate=24000,
        frame_rate=75.0,
        embed_dim=args["hidden_size"],
        num_layers=args["num_hidden_layers"] + 1,
        # Upstream names no best layer ("choose empirically"; its demo learns a weighted average of
        # all of them): the last is the default, the weights card says more.
        recommended_layer=-1,
        context_seconds=30.0,
        weights=f"hf-hub:{repo}",
        revision=revision,
        files={"pytorch_model.bin": sha256},
        license="CC-BY-NC-4.0",
        source=f"https://huggingface.co/{repo}",
        citation=CITATION,
        description=description,
        args=dict(args),
        upstream=True,
    )


# Revisions are left unpinned: the one full 95M commit we know predates the licence change, and we
# could not check which file the known 330M commit holds; the sha256 pins are what is verified.
@register_model(_spec(
    "mert-v1-95m", "m-a-p/MERT-v1-95M", "a2b8b747f72c06e0595aeae41ae5473f4364938c6b39b2c58be38c48e6bd3fcd", None,
    ARGS_95M,
    "MERT-v1-95M: HuBERT-style music encoder (24 kHz waveform, 7 convs + 12 post-LN layers, 768-d at 75 Hz, "
    "13 hidden states). Non-commercial weights.",
))
def mert_v1_95m(**kwargs: Any) -> HuBERT:
    return HuBERT(**{**ARGS_95M, **kwargs})


@register_model(_spec(
    "mert-v1-330m", "m-a-p/MERT-v1-330M", "0c03774d821a6ad972cb48220b128a10ebea2c790116bd0fd35e5a013f8017f6", None,
    ARGS_330M,
    "MERT-v1-330M: HuBERT-style music encoder (24 kHz waveform, 7 convs + 24 pre-LN layers, 1024-d at 75 Hz, "
    "25 hidden states). Non-commercial weights.",
))
def mert_v1_330m(**kwargs: Any) -> HuBERT:
    return HuBERT(**{**ARGS_330M, **kwargs})
