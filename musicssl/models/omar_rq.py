"""OMAR-RQ: a Conformer trained by masked token prediction on mel or waveform patches.

Alonso-Jimenez, Ramoneda, Araz, Poltronieri and Bogdanov, "OMAR-RQ: Open Music Audio Representation
Model Trained with Multi-Feature Masked Token Prediction", ACM Multimedia 2025, arXiv:2507.03482.
Reference code: github.com/MTG/omar-rq (AGPL-3.0); released weights: Hub ``mtg-upf/omar-rq-*``
(CC BY-NC-SA 4.0). This file is an independent re-implementation written from a description of the
network; parity with the reference package (omar-rq 0.2.1) is checked numerically in
tests/test_parity_omar_rq.py. Upstream's files are only read: `config.gin` for the settings (parsed
by `read_gin`, no gin-config needed) and `model.ckpt` for the weights (`checkpoint_filter_fn`).

The network, for an input of S samples:

- Input: ``mel`` (16 kHz models): power STFT (n_fft 512, hop 256, periodic Hann, centred with
  reflect padding) -> 96 Slaney mel bands (Slaney-normalised) -> ``log10(1 + 1e4 x)`` ->
  ``(x - mean) / std``; whole columns of 4 frames (96 x 4, flattened band-major) are the patches, a
  partial last patch is dropped. ``waveform`` (24 kHz models): ``(x - mean) / std`` (when the config
  gives statistics), then non-overlapping patches of `patch` samples, a partial last one dropped.
- A linear patch embedding to `embed_dim`; no positional embedding, no subsampling.
- `depth` Conformer blocks, each (x: (B, T, D))::

      x = x + 4.0 * FFN1(x)                        # FFN = LN -> Linear(D, 4D) -> GELU -> Linear(4D, D)
      x = LN(alpha * x + CausalMHSA(x))            # DeepNorm post-norm; no pre-norm on attention
      x = x + ConvModule(x)                        # LN -> 1x1 (D -> 2D) -> GLU -> depthwise k31 -> BN -> GELU -> 1x1
      x = LN(x + 4.0 * FFN2(x))

  The attention is *causal* (token t attends to tokens <= t; upstream trained that way), with
  fused bias-free q/k/v, an output projection with bias, and rotary embeddings on q and k after the
  projection, rotating interleaved pairs (x0, x1), (x2, x3), ... of each head (base 10000,
  positions 0..T-1). The inner LayerNorms and the BatchNorm use eps 6.1e-5, the DeepNorm and block
  LayerNorms 1e-5. The depthwise kernel is 31 whatever the config says (upstream hard-codes it).

`forward_features` returns the `depth` block outputs in order, so layer i here is upstream's
``extract_embeddings(x, layers=[i])``. Upstream runs one clip at a time with no padding mask; to keep
that exact, items of different lengths in one batch are run separately (each at its own length).
"""

from __future__ import annotations

import ast
import io
import math
import tokenize
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from musicssl.audio.frontends import Log10OnePlus, MelSpectrogram, Standardize
from musicssl.convert import pick_file, read_checkpoint
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.base import Encoder, init_args
from musicssl.models.conformer import ConvModule, FeedForward
from musicssl.registry import ModelSpec, register_family, register_model

LICENSE = "CC-BY-NC-SA-4.0"
SOURCE = "https://github.com/MTG/omar-rq"
CITATION = """@inproceedings{alonso2025omar,
  title = {{OMAR-RQ}: Open Music Audio Representation Model Trained with Multi-Feature Masked Token Prediction},
  author = {Alonso-Jim{\\'e}nez, Pablo and Ramoneda, Pedro and Araz, R. Oguz and Poltronieri, Andrea and Bogdanov, Dmitry},
  booktitle = {ACM Multimedia Conference (ACMMM), Open Source Track},
  year = {2025},
  doi = {10.1145/3746027.3756871},
}"""

FFN_EPS = 6.1e-5  # LayerNorms inside the FFN and conv modules, and the conv module's BatchNorm
BLOCK_EPS = 1e-5  # the DeepNorm LayerNorm and the block's closing LayerNorm


# --------------------------------------------------------------------------------------------------
# Blocks

def rope_freqs(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary angular frequencies (head_dim // 2,), float32: theta ** (-2i / head_dim)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of the last axis by the angles whose cos/sin
    are given, (..., T, d) with cos, sin (T, d // 2) -> (..., T, d) in x's dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


class PreNormFeedForward(nn.Module):
    """LayerNorm, then conformer.py's FeedForward (Linear(dim, hidden) -> GELU -> Linear(hidden, dim)).
    (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=FFN_EPS)
        self.mlp = FeedForward(dim, hidden, activation="gelu", bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with rotary q/k. (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(ctx.transpose(1, 2).reshape(B, T, D))


class ConformerBlock(nn.Module):
    """OMAR-RQ's Conformer block (see the module docstring). (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ffn_scale: float, deepnorm_alpha: float,
                 conv_kernel: int) -> None:
        super().__init__()
        self.ffn_scale, self.deepnorm_alpha = ffn_scale, deepnorm_alpha
        self.ff1 = PreNormFeedForward(dim, int(dim * mlp_ratio))
        self.attn = CausalSelfAttention(dim, num_heads)
        self.attn_norm = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.conv = ConvModule(dim, conv_kernel, activation="gelu", bias=True, ln_eps=FFN_EPS, bn_eps=FFN_EPS)
        self.ff2 = PreNormFeedForward(dim, int(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim, eps=BLOCK_EPS)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.ffn_scale * self.ff1(x)
        x = self.attn_norm(self.deepnorm_alpha * x + self.attn(x, cos, sin))
        x = x + self.conv(x)
        return self.norm(x + self.ffn_scale * self.ff2(x))


# --------------------------------------------------------------------------------------------------
# Encoder

@register_family("omar_rq")
class OmarRQ(Encoder):
    """OMAR-RQ encoder. wav (B, S) at `sample_rate` -> per block (B, T, embed_dim).

    The defaults are the released `omar-rq-base` (mel input, 15.625 frames/s).

    Args:
        input_type: "mel" (spectrogram patches of n_mels x `patch` frames) or "waveform" (`patch` samples).
        sample_rate: Hz the model expects (upstream: 16 kHz for mel, 24 kHz for waveform models).
        patch: frames (mel) or samples (waveform) per token.
        norm_mean, norm_std: input statistics, applied to the log-mel or the waveform; None for neither.
        n_fft, mel_hop, n_mels, mel_scale ("slaney" or "htk"), mel_norm ("slaney" or None): the mel
            front-end (window n_fft, periodic Hann, centred with reflect padding; unused for "waveform").
        embed_dim, depth, num_heads, mlp_ratio: Conformer size (FFN width embed_dim * mlp_ratio).
        ffn_scale: weight of the two FFN residual branches (upstream `mlp_residual_factor`).
        deepnorm_alpha: the DeepNorm residual weight of the attention branch.
        conv_kernel: depthwise kernel (upstream always builds 31).
        rope_theta: rotary base.
        context_seconds: window of `embed()` (upstream trained on 30 s crops).
        overlap_seconds: how much adjacent windows share. Attention is causal, so the first frames of
            a window see little context; a generous overlap leaves 5 s of history before the kept part.
    """

    def __init__(
        self,
        input_type: str = "mel",
        sample_rate: int = 16000,
        patch: int = 4,
        norm_mean: float | None = 2.06755686098554,
        norm_std: float | None = 1.268292820667291,
        n_fft: int = 512,
        mel_hop: int = 256,
        n_mels: int = 96,
        mel_scale: str = "slaney",
        mel_norm: str | None = "slaney",
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        ffn_scale: float = 4.0,
        deepnorm_alpha: float = 2.6321480259049848,
        conv_kernel: int = 31,
        rope_theta: float = 10000.0,
        context_seconds: float = 30.0,
        overlap_seconds: float = 10.0,
    ) -> None:
        super().__init__()
        if input_type not in ("mel", "waveform"):
            raise ValueError(f"input_type must be 'mel' or 'waveform', not {input_type!r}")
        if mel_scale not in ("slaney", "htk"):
            raise ValueError(f"mel_scale must be 'slaney' or 'htk', not {mel_scale!r}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError(f"embed_dim {embed_dim} must split into {num_heads} heads of even size (for RoPE)")
        if (norm_mean is None) != (norm_std is None):
            raise ValueError("give both norm_mean and norm_std, or neither")
        self.args = init_args(locals())
        self.input_type, self.patch, self.mel_hop = input_type, patch, mel_hop
        self.sample_rate = sample_rate
        self.context_seconds, self.overlap_seconds = context_seconds, overlap_seconds
        self.embed_dim, self.num_layers = embed_dim, depth
        self.head_dim, self.rope_theta = embed_dim // num_heads, rope_theta
        stages: list[nn.Module] = []
        if input_type == "mel":
            # Token i covers STFT frames patch*i .. patch*i + patch - 1 (centred on mel_hop * frame).
            self.hop_length, self.frame_offset = mel_hop * patch, mel_hop * (patch - 1) / 2
            stages += [MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=mel_hop, n_mels=n_mels, power=2.0,
                                      htk=mel_scale == "htk", norm=mel_norm, pad_mode="reflect"),
                       Log10OnePlus(1e4)]
            patch_dim = n_mels * patch
        else:
            self.hop_length, self.frame_offset = patch, (patch - 1) / 2
            patch_dim = patch
        if norm_mean is not None:
            stages.append(Standardize(norm_mean, norm_std))
        self.frontend = nn.Sequential(*stages)
        self.patch_embed = nn.Linear(patch_dim, embed_dim)
        self.blocks = nn.ModuleList(
            ConformerBlock(embed_dim, num_heads, mlp_ratio, ffn_scale, deepnorm_alpha, conv_kernel)
            for _ in range(depth)
        )

    # --- Encoder contract ---------------------------------------------------------------------
    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.input_type == "mel":  # centred STFT frames, then whole patches only
            return torch.div(torch.div(lengths, self.mel_hop, rounding_mode="floor") + 1, self.patch,
                             rounding_mode="floor")
        return torch.div(lengths, self.patch, rounding_mode="floor")

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        sizes = lengths.tolist()
        if len(set(sizes)) == 1:
            return self._blocks(wav[:, : sizes[0]])
        # No padding mask upstream: run each length on its own so padding never leaks into an item
        # (through the reflect padding of the STFT and the non-causal depthwise convolutions).
        n_frames, dtype = int(self.frame_lengths(lengths).max()), self.patch_embed.weight.dtype
        out = [wav.new_zeros(len(sizes), n_frames, self.embed_dim, dtype=dtype) for _ in range(self.num_layers)]
        for n in sorted(set(sizes)):
            rows = [i for i, s in enumerate(sizes) if s == n]
            hidden = self._blocks(wav[rows, :n])
            for layer, h in zip(out, hidden):
                layer[rows, : h.shape[1]] = h
        return out

    def tokens(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, S) -> patch embeddings (B, T, embed_dim); no token for a partial last patch."""
        B, S = wav.shape
        T = int(self.frame_lengths(torch.tensor(S)))
        if self.input_type == "mel":
            feats = self.frontend(wav)[..., : T * self.patch]  # (B, n_mels, T * patch)
            patches = feats.unflatten(-1, (T, self.patch)).transpose(1, 2).flatten(2)  # band-major
        else:
            patches = self.frontend(wav)[:, : T * self.patch].reshape(B, T, self.patch)
        return self.patch_embed(patches.to(self.patch_embed.weight.dtype))

    def _blocks(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """Equal-length batch wav (B, S) -> the output of every block, each (B, T, embed_dim)."""
        B = wav.shape[0]
        if int(self.frame_lengths(torch.tensor(wav.shape[-1]))) == 0:  # too short for one patch
            empty = wav.new_zeros(B, 0, self.embed_dim, dtype=self.patch_embed.weight.dtype)
            return [empty] * self.num_layers
        x = self.tokens(wav)
        # RoPE angles in float32 whatever the backbone's dtype (positions past 256 are not exact in bf16).
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, rope_freqs(self.head_dim, self.rope_theta).to(x.device))
        cos, sin = angles.cos(), angles.sin()
        hidden = []
        for block in self.blocks:
            x = block(x, cos, sin)
            hidden.append(x)
        return hidden

    # --- upstream weights ---------------------------------------------------------------------
    def load_upstream(self, files: dict[str, Any]) -> None:
        """Check `config.gin` against this model's args, then load `model.ckpt` strictly."""
        gin_path = pick_file(files, (".gin",), "gin config")
        ckpt_path = pick_file(files, (".ckpt",), "checkpoint")
        check_config(self.args, args_from_gin(read_gin(gin_path.read_text()), where=gin_path), where=gin_path)
        state = read_checkpoint(ckpt_path)
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ReleaseFormatError(f"{ckpt_path} is not a flat dict of tensors (`net.*`, `embedding_layer.*`)")
        try:
            state = checkpoint_filter_fn(state, head_dim=self.head_dim, rope_theta=self.rope_theta)
        except ReleaseFormatError as err:
            raise ReleaseFormatError(f"{ckpt_path}: {err}") from err
        load_state_strict(self, state, where=str(ckpt_path))


# --------------------------------------------------------------------------------------------------
# Upstream checkpoint: keys -> ours

# Block sub-module names, upstream -> ours. Upstream's conv module is one nn.Sequential:
# 0 pointwise, 1 GLU, 2 depthwise, 3 BatchNorm, 4 GELU, 5 pointwise, 6 dropout (Conv1d pointwise
# convolutions, like conformer.py's ConvModule); its FFNs likewise
# (0 LayerNorm, 1 Linear, 2 GELU, 3 dropout, 4 Linear, 5 dropout).
_BLOCK_RENAMES = {
    "ff1.module.0.": "ff1.norm.", "ff1.module.1.": "ff1.mlp.intermediate_dense.",
    "ff1.module.4.": "ff1.mlp.output_dense.",
    "ff2.module.0.": "ff2.norm.", "ff2.module.1.": "ff2.mlp.intermediate_dense.",
    "ff2.module.4.": "ff2.mlp.output_dense.",
    "attention.qkv.": "attn.qkv.", "attention.proj.": "attn.proj.",
    "norm1.layer_norm.": "attn_norm.",
    "conv_block.layer_norm.": "conv.layer_norm.",
    "conv_block.module.0.": "conv.pointwise_conv1.", "conv_block.module.2.": "conv.depthwise_conv.",
    "conv_block.module.3.": "conv.batch_norm.", "conv_block.module.5.": "conv.pointwise_conv2.",
    "norm2.": "norm.",
}
# Training-only parts of upstream's MaskingModel, dropped if a checkpoint carries them: the SSL
# classifier, the target quantizers, and the front-ends' (recomputed) window/filterbank buffers.
_TRAINING_ONLY = ("linear.", "quantizers.", "representation.", "input_rep.")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], head_dim: int,
                         rope_theta: float = 10000.0) -> dict[str, torch.Tensor]:
    """Upstream `model.ckpt` state (``net.layers.{i}.*``, ``embedding_layer.*``) -> OmarRQ keys.

    The saved rotary frequencies (a frozen parameter per block) are checked against the ones this
    port computes and dropped. Keys it does not know are passed through unchanged, so the strict
    load names them.
    """
    expected_freqs = rope_freqs(head_dim, rope_theta)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_TRAINING_ONLY):
            continue
        if key.startswith("embedding_layer."):
            out["patch_embed." + key[len("embedding_layer."):]] = value
            continue
        if not key.startswith("net.layers."):
            out[key] = value
            continue
        index, _, rest = key[len("net.layers."):].partition(".")
        if rest == "attention.rotary_emb.freqs":
            if value.shape != expected_freqs.shape or not torch.allclose(value.float(), expected_freqs, rtol=1e-6):
                raise ReleaseFormatError(
                    f"{key} holds rotary frequencies {tuple(value.shape)} that differ from RoPE base "
                    f"{rope_theta:g} over {head_dim}-dim heads; this port computes them and cannot load others"
                )
            continue
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                out[f"blocks.{index}.{new}{rest[len(old):]}"] = value
                break
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Upstream config.gin

def read_gin(text: str) -> dict[str, Any]:
    """Parse the ``selector = value`` bindings of a gin-config file into {selector: value}.

    Enough of gin's syntax for OMAR-RQ's configs: comments, values spanning lines inside brackets,
    Python literals, ``@configurable`` references (kept as the string "@dotted.name"), and macros
    (``name = value`` defined anywhere in the file, used as ``%name``). Scoped bindings
    (``scope/Class.param``), ``import`` and ``include`` lines are skipped. A binding whose value
    cannot be read (e.g. an expression) maps to `UNREADABLE`; later bindings override earlier ones.
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError) as err:
        raise ReleaseFormatError(f"cannot tokenize the gin config: {err}") from err
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    statements: list[list[tokenize.TokenInfo]] = [[]]
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            statements.append([])
        elif tok.type not in skip:
            statements[-1].append(tok)
    raw: dict[str, list[tokenize.TokenInfo]] = {}
    for st in statements:
        eq = next((i for i, t in enumerate(st) if t.type == tokenize.OP and t.string == "="), None)
        if eq is None or not st or st[0].string in ("import", "include"):
            continue
        selector = "".join(t.string for t in st[:eq])
        if "/" not in selector:
            raw.pop(selector, None)  # re-insert so the last binding is also the last in order
            raw[selector] = st[eq + 1:]
    macros = {name: value for name, value in raw.items() if "." not in name}
    cache: dict[str, Any] = {}

    def evaluate(name: str, seen: tuple[str, ...] = ()) -> Any:
        if name not in cache:
            cache[name] = _gin_value(raw[name], lambda m: evaluate(m, seen + (name,)) if m in macros
                                     and m not in seen else _bad_macro(m))
        return cache[name]

    return {name: evaluate(name) for name in raw if "." in name}


class _Unreadable:
    def __repr__(self) -> str:
        return "<unreadable gin value>"


UNREADABLE = _Unreadable()


def _bad_macro(name: str) -> Any:
    raise ValueError(f"undefined or circular macro %{name}")


def _gin_value(toks: list[tokenize.TokenInfo], macro: Any) -> Any:
    """Tokens of one gin value -> a Python value (UNREADABLE if it is not a literal)."""
    parts: list[str] = []
    i = 0
    try:
        while i < len(toks):
            tok = toks[i]
            if tok.type == tokenize.OP and tok.string in ("@", "%"):
                j = i + 1
                while j < len(toks) and (toks[j].type == tokenize.NAME or toks[j].string == "."):
                    j += 1
                name = "".join(t.string for t in toks[i + 1:j])
                if tok.string == "@":
                    if j + 1 < len(toks) and toks[j].string == "(" and toks[j + 1].string == ")":
                        j += 2  # @ref() (an evaluated reference) reads the same for our purposes
                    parts.append(repr("@" + name))
                else:
                    parts.append(repr(macro(name)))
                i = j
                continue
            parts.append(tok.string)
            i += 1
        return ast.literal_eval(" ".join(parts))
    except (ValueError, SyntaxError, TypeError, RecursionError):
        return UNREADABLE


def gin_binding(bindings: Mapping[str, Any], configurable: str, param: str) -> Any:
    """The value bound to `configurable.param`, matched on the last name of the configurable so
    ``nets.conformer.Conformer.depth`` and ``Conformer.depth`` both count (the last one wins).
    Raises KeyError when there is none."""
    found = [v for k, v in bindings.items() if k.split(".")[-2:] == [configurable, param]]
    if not found:
        raise KeyError(f"{configurable}.{param}")
    return found[-1]


def args_from_gin(bindings: Mapping[str, Any], where: str | Path = "config.gin") -> dict[str, Any]:
    """The OmarRQ args that an upstream config.gin describes (those it determines).

    Follows what upstream's `get_model` builds for inference: a single representation is the input
    (a mel input then always uses 96 x 4 patches); with a list of representations the input is
    ``MaskingModel.input_representation`` with its configured patch size.
    """

    def get(configurable: str, param: str) -> Any:
        try:
            value = gin_binding(bindings, configurable, param)
        except KeyError:
            raise ReleaseFormatError(f"{where} binds no {configurable}.{param}, which OMAR-RQ needs") from None
        if value is UNREADABLE:
            raise ReleaseFormatError(f"{where}: cannot read the value of {configurable}.{param}")
        return value

    def ref_name(value: Any, what: str) -> str:
        if not (isinstance(value, str) and value.startswith("@")):
            raise ReleaseFormatError(f"{where}: {what} should be a @reference, got {value!r}")
        return value.rsplit(".", 1)[-1]

    representation = get("build_module", "representation")
    if isinstance(representation, (list, tuple)):
        rep = ref_name(get("MaskingModel", "input_representation"), "MaskingModel.input_representation")
        patch = tuple(get(rep, "patch_size"))
    else:
        rep = ref_name(representation, "build_module.representation")
        if rep != "MelSpectrogram":  # upstream's get_model hard-codes mel patches and knows no others
            raise ReleaseFormatError(f"{where}: a single {rep} representation has no patch size (upstream "
                                     "builds only a mel one); only mel, or a list naming its input, is supported")
        patch = (96, 4)
    if ref_name(get("build_module", "net"), "build_module.net") != "Conformer":
        raise ReleaseFormatError(f"{where}: the network is not a Conformer; only OMAR-RQ Conformers are supported")
    if rep not in ("MelSpectrogram", "Waveform"):
        raise ReleaseFormatError(f"{where}: input representation {rep!r} is not supported (mel or waveform only)")
    for param, want in (("use_deepnorm", True), ("use_rope", True)):
        if get("Conformer", param) is not want:
            raise ReleaseFormatError(f"{where}: Conformer.{param} must be {want}; this port implements only that")
    mean, std = get(rep, "norm_mean"), get(rep, "norm_std")
    if mean is None or std is None:
        mean = std = None
    args: dict[str, Any] = dict(
        input_type="mel" if rep == "MelSpectrogram" else "waveform", sample_rate=get(rep, "sr"), patch=patch[1],
        norm_mean=mean, norm_std=std, embed_dim=get("Conformer", "embed_dim"), depth=get("Conformer", "depth"),
        num_heads=get("Conformer", "num_heads"), mlp_ratio=float(get("Conformer", "mlp_ratio")),
        ffn_scale=float(get("Conformer", "mlp_residual_factor")),
        deepnorm_alpha=float(get("Conformer", "alpha_deepnorm")),
    )
    if rep == "MelSpectrogram":
        if get(rep, "power") != 2:
            raise ReleaseFormatError(f"{where}: MelSpectrogram.power must be 2 (a power spectrogram)")
        args.update(n_fft=get(rep, "win_len"), mel_hop=get(rep, "hop_len"), n_mels=get(rep, "n_mel"),
                    mel_scale=get(rep, "mel_scale"), mel_norm=get(rep, "norm"))
        if patch[0] != args["n_mels"]:
            raise ReleaseFormatError(f"{where}: patches of {patch[0]} bands over {args['n_mels']} mels; "
                                     "upstream supports only whole-spectrum patches")
    elif patch[0] != 1:
        raise ReleaseFormatError(f"{where}: a waveform patch must be (1, samples), got {patch}")
    return args


def check_config(ours: Mapping[str, Any], upstream: Mapping[str, Any], where: str | Path) -> None:
    """Raise ReleaseFormatError naming every arg where `upstream` (from config.gin) differs from `ours`."""
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
        return a == b

    diff = [f"{k}: config {v!r} vs model {ours.get(k)!r}" for k, v in upstream.items() if not same(v, ours.get(k))]
    if diff:
        raise ReleaseFormatError(
            f"{where} describes a different model than the one being loaded ({'; '.join(diff)}). "
            "Is it the config of this registry entry's weights?"
        )


# --------------------------------------------------------------------------------------------------
# Registry

BASE = dict(input_type="mel", sample_rate=16000, patch=4, norm_mean=2.06755686098554, norm_std=1.268292820667291,
            n_fft=512, mel_hop=256, n_mels=96, mel_scale="slaney", mel_norm="slaney")
MULTIFEATURE_25HZ_FSQ = dict(input_type="waveform", sample_rate=24000, patch=960, norm_mean=0.0,
                             norm_std=0.1908563740990311)
_UPSTREAM_FILES = {"config.gin": None, "model.ckpt": None}  # upstream publishes no checksums


@register_model(ModelSpec(
    name="omar-rq-base", family="omar_rq", sample_rate=16000, frame_rate=15.625, embed_dim=1024, num_layers=24,
    recommended_layer=6, context_seconds=30.0, weights="hf-hub:mtg-upf/omar-rq-base", upstream=True,
    files=dict(_UPSTREAM_FILES), license=LICENSE, source=SOURCE, citation=CITATION, args=BASE,
    description="OMAR-RQ base: 96-band log-mel patches (16 kHz) through a 24x1024 causal Conformer, "
                "trained by masked mel-token prediction; the OMAR-RQ upstream advises for semantic tasks (tagging, structure).",
))
def omar_rq_base(**kwargs: Any) -> OmarRQ:
    return OmarRQ(**{**BASE, **kwargs})


@register_model(ModelSpec(
    name="omar-rq-multifeature-25hz-fsq", family="omar_rq", sample_rate=24000, frame_rate=25.0, embed_dim=1024,
    num_layers=24, recommended_layer=6, context_seconds=30.0, weights="hf-hub:mtg-upf/omar-rq-multifeature-25hz-fsq",
    upstream=True, files=dict(_UPSTREAM_FILES), license=LICENSE, source=SOURCE, citation=CITATION,
    args=MULTIFEATURE_25HZ_FSQ,
    description="OMAR-RQ multifeature-25hz-fsq: 40 ms waveform patches (24 kHz) through a 24x1024 causal "
                "Conformer, trained to predict FSQ tokens of several features; best OMAR-RQ on pitch, chords, beats.",
))
def omar_rq_multifeature_25hz_fsq(**kwargs: Any) -> OmarRQ:
    return OmarRQ(**{**MULTIFEATURE_25HZ_FSQ, **kwargs})
