"""Music2Latent: the encoder of a consistency autoencoder for music, as feature extractor.

Pasini, Lattner and Fazekas, "Music2Latent: Consistency Autoencoders for Latent Audio
Compression", ISMIR 2024 (reference code: SonyCSLParis/music2latent, CC BY-NC 4.0; this file is a
re-implementation that keeps upstream's module names, so the `encoder.*` part of upstream's
`music2latent.pt` loads through `checkpoint_filter_fn`).

Front end (44.1 kHz, no centring): frames of 2048 samples every 512, periodic Hann window, rfft,
the Nyquist bin dropped (1024 bins), then a complex power law ``0.34 |X|^0.65 e^{i angle X}`` with
real and imaginary parts as two channels. The input is first cut to ``4096 k + 1536`` samples,
exactly the 8k STFT frames that give k output frames. The encoder is the down path of a 2-D U-Net
(64-128-256-256-256 channels; frequency / 4 at the first level, then frequency and time / 2 three
times; self-attention along frequency within each frame at the three lowest levels), a GroupNorm,
and the 256 channels x 32 bins flattened channel-major into 8192-d features per frame: 4096
samples, ~10.77 frames/s. A 1-D bottleneck (1x1 conv to 512, 4 residual blocks, GroupNorm, SiLU,
1x1 conv to 64, tanh) gives the 64-d latent that upstream's decoder reconstructs audio from.

The two outputs have different widths, while an `Encoder`'s layers share one `embed_dim`, so
they are two registry entries over one upstream file: `music2latent` gives the 8192-d features
(``encode(..., extract_features=True)``, which upstream's README recommends for downstream tasks),
`music2latent-latent` the 64-d latent scaled as upstream's ``encode()`` returns it (tanh / 0.06).

GroupNorm statistics are taken over the whole time axis, so every frame depends on the length of
the clip it is computed in (as upstream); items of a batch are therefore encoded at their own
lengths. Upstream encodes audio in chunks of 645 frames (59.94 s) without shared context; so do
the `embed()` windows here, except that consecutive windows share one frame (see
`Music2Latent` for why), and the last window is encoded at its own length where upstream pads it
with the start of the track. Audio up to 59.94 s gives exactly upstream's numbers.
"""

from __future__ import annotations

import codecs
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musicssl.audio.frontends import Spectrogram
from musicssl.convert import pick_file, read_checkpoint
from musicssl.factory import load_state_strict
from musicssl.models.base import Encoder
from musicssl.registry import ModelSpec, register_family, register_model

CITATION = (
    "@inproceedings{pasini2024music2latent,\n"
    "  title     = {Music2Latent: Consistency Autoencoders for Latent Audio Compression},\n"
    "  author    = {Pasini, Marco and Lattner, Stefan and Fazekas, George},\n"
    "  booktitle = {Proceedings of the International Society for Music Information Retrieval Conference (ISMIR)},\n"
    "  year      = {2024}, pages = {111--119}, doi = {10.5281/zenodo.14877289},\n"
    "  eprint    = {2408.06500}, archivePrefix = {arXiv}\n"
    "}"
)

STFT_HOP = 512  # samples between STFT frames; the window is 4 hops
ALPHA, BETA = 0.65, 0.34  # complex power-law compression of the STFT
LATENT_SCALE = 1 / 0.06  # upstream's encode() divides the tanh latent by sigma_rescale = 0.06
CHUNK_FRAMES = 645  # output frames of upstream's 60 s encoding chunk: (44100 * 60 // 512) // 8

# What a checkpoint's `gen_state_dict` holds besides `encoder.*`: the consistency model's decoder
# side (dropped). Anything else is an unknown key and an error.
DECODER_PREFIXES = ("decoder.", "down_layers.", "up_layers.", "emb_proj.", "scale_inp.", "scale_out.", "conv_inp.",
                    "conv_decoded.", "norm_out.", "conv_out.")
# Encoder parts after the 8192-d features: only the latent output needs them.
BOTTLENECK_PREFIXES = ("bottleneck_layers.", "norm_out.", "conv_out.")

# A narrow network of the same layout with 4-frame (0.41 s) windows, for fast tests of everything
# but the released numbers: musicssl.load("music2latent", pretrained=False, **TINY).
TINY = dict(base_channels=8, bottleneck_base_channels=32, num_bottleneck_layers=1,
            context_seconds=(4 * 4096 + 1536) / 44100)


def _groups(channels: int) -> int:
    return min(channels // 4, 32)  # upstream's GroupNorm grouping


class CompressedSTFT(nn.Module):
    """wav (B, S) -> (B, 2, 2 * hop, T) real and imaginary parts of the amplitude-compressed STFT, float32.

    No padding: T = (S - 4 hop) // hop + 1 frames, frame t covering samples [hop t, hop t + 4 hop).
    """

    def __init__(self, hop: int = STFT_HOP, alpha: float = ALPHA, beta: float = BETA) -> None:
        super().__init__()
        self.hop, self.alpha, self.beta = hop, alpha, beta
        self.stft = Spectrogram(n_fft=4 * hop, hop_length=hop, power=None, center=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = self.stft(wav)[:, : 2 * self.hop]  # drop the Nyquist bin
        mag = self.beta * spec.abs().pow(self.alpha)
        phase = spec.angle()  # 0 where X = 0, so silence maps to 0
        return torch.stack([mag * phase.cos(), mag * phase.sin()], dim=1)

    def extra_repr(self) -> str:
        return f"hop={self.hop}, alpha={self.alpha}, beta={self.beta}"


class FreqGain(nn.Module):
    """A learnt gain per frequency bin: (B, C, F, T) * scale (1, 1, F, 1)."""

    def __init__(self, freq_bins: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 1, freq_bins, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class MultiheadAttention(nn.Module):
    """Self-attention with upstream's (nn.MultiheadAttention's) parameter names, run by SDPA.
    x (N, L, dim) -> (N, L, dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(N, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(N, L, D))


class FreqAttention(nn.Module):
    """Residual self-attention along frequency within each time frame: (B, C, F, T) -> same."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.mha = MultiheadAttention(channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, Fq, T = x.shape
        h = self.norm(x).permute(0, 3, 2, 1).reshape(B * T, Fq, C)
        h = self.mha(h).view(B, T, Fq, C).permute(0, 3, 2, 1)
        return x + h


class ResBlock(nn.Module):
    """Pre-activation residual block, 2-D (B, C, F, T) or 1-D (B, C, T):
    x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))) with a 1x1 conv on the skip when the width changes,
    then optional frequency attention (2-D only)."""

    def __init__(self, c_in: int, c_out: int, dims: int = 2, attention: bool = False, heads: int = 4) -> None:
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = Conv(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = Conv(c_out, c_out, 3, padding=1)
        self.res_conv = Conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.att = FreqAttention(c_out, heads) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        x = h + self.res_conv(x)
        return self.att(x) if self.att is not None else x


class Downsample(nn.Module):
    """GroupNorm, then a strided conv: frequency / 4 (kernel 5x1) or frequency and time / 2 (3x3)."""

    def __init__(self, channels: int, freq_only: bool) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        if freq_only:
            self.c = nn.Conv2d(channels, channels, (5, 1), stride=(4, 1), padding=(2, 0))
        else:
            self.c = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.norm(x))


@register_family("music2latent")
class Music2Latent(Encoder):
    """Music2Latent encoder. wav (B, S) at 44.1 kHz -> [features (B, T, 8192)] or [latent (B, T, 64)].

    The defaults are the architecture of upstream's released weights (16.26 M parameters with the
    bottleneck, 5.73 M without). Frame t stands for the 8 STFT frames over samples
    [4096 t, 4096 t + 5632) (what upstream's decoder rebuilds from it; the convolutions see
    further) and is timestamped at their centre. An item of S samples gives
    ``((S - 1536) // 512) // 8`` frames (at least 1: shorter items are zero-padded to 5632
    samples, where upstream fails).

    Args:
        output: "features" (8192-d, before the bottleneck) or "latent" (64-d, tanh / 0.06).
        sample_rate: Hz; the released weights are for 44100 (upstream notes 48 kHz works too).
        base_channels, multipliers, blocks, attention, freq_downsample, heads: the 2-D down path; level i
            has ``blocks[i]`` residual blocks of ``base_channels * multipliers[i]`` channels (with
            frequency attention when ``attention[i]``), then a downsampling (frequency / 4 where
            ``freq_downsample[i]``, else frequency and time / 2).
        bottleneck_base_channels, num_bottleneck_layers, bottleneck_channels: the 1-D bottleneck.
        context_seconds, overlap_seconds: windows of `embed()`; by default upstream's 645-frame
            encoding chunk (59.94 s), and one frame's samples (5632) shared by consecutive
            windows, so that the last window always holds at least one whole frame.
    """

    def __init__(
        self,
        output: str = "features",
        sample_rate: int = 44100,
        base_channels: int = 64,
        multipliers: Sequence[int] = (1, 2, 4, 4, 4),
        blocks: Sequence[int] = (1, 1, 1, 1, 1),
        attention: Sequence[bool] = (False, False, True, True, True),
        freq_downsample: Sequence[bool] = (True, False, False, False),
        heads: int = 4,
        bottleneck_base_channels: int = 512,
        num_bottleneck_layers: int = 4,
        bottleneck_channels: int = 64,
        context_seconds: float | None = None,
        overlap_seconds: float | None = None,
    ) -> None:
        super().__init__()
        if output not in ("features", "latent"):
            raise ValueError(f"output must be 'features' or 'latent', not {output!r}")
        n_levels = len(multipliers)
        if not (len(blocks) == len(attention) == n_levels and len(freq_downsample) == n_levels - 1):
            raise ValueError("multipliers, blocks and attention need one entry per level, freq_downsample one fewer")
        self.args = {
            "output": output, "sample_rate": sample_rate, "base_channels": base_channels,
            "multipliers": list(multipliers), "blocks": list(blocks), "attention": [bool(a) for a in attention],
            "freq_downsample": [bool(f) for f in freq_downsample], "heads": heads,
            "bottleneck_base_channels": bottleneck_base_channels, "num_bottleneck_layers": num_bottleneck_layers,
            "bottleneck_channels": bottleneck_channels, "context_seconds": context_seconds,
            "overlap_seconds": overlap_seconds,
        }
        self.output = output
        n_time_down = sum(not f for f in freq_downsample)
        freq_bins = 2 * STFT_HOP // 4 ** sum(bool(f) for f in freq_downsample) // 2**n_time_down
        self.stft_frames_per_frame = 2**n_time_down
        self.sample_rate = sample_rate
        self.hop_length = STFT_HOP * self.stft_frames_per_frame
        # Samples of one frame's STFT support: its stft_frames_per_frame frames of 4 hops each.
        self.frame_span = self.hop_length + 3 * STFT_HOP
        self.frame_offset = self.frame_span / 2
        if context_seconds is None:
            context_seconds = (CHUNK_FRAMES * self.hop_length + 3 * STFT_HOP) / sample_rate
        self.context_seconds = context_seconds
        self.overlap_seconds = self.frame_span / sample_rate if overlap_seconds is None else overlap_seconds
        self.num_layers = 1

        self.frontend = CompressedSTFT()
        c = base_channels * multipliers[0]
        self.conv_inp = nn.Conv2d(2, c, 3, padding=1)
        self.gain = FreqGain(2 * STFT_HOP)
        layers: list[nn.Module] = []
        for i, (mult, n_blocks, att) in enumerate(zip(multipliers, blocks, attention)):
            for _ in range(n_blocks):
                layers.append(ResBlock(c, base_channels * mult, attention=bool(att), heads=heads))
                c = base_channels * mult
            if i < n_levels - 1:
                layers.append(Downsample(c, freq_only=bool(freq_downsample[i])))
        self.down_layers = nn.ModuleList(layers)
        self.prenorm_1d_to_2d = nn.GroupNorm(_groups(c), c)
        self.features_dim = c * freq_bins
        if output == "latent":
            self.bottleneck_layers = nn.ModuleList(
                [nn.Conv1d(self.features_dim, bottleneck_base_channels, 1)]
                + [ResBlock(bottleneck_base_channels, bottleneck_base_channels, dims=1)
                   for _ in range(num_bottleneck_layers)]
            )
            self.norm_out = nn.GroupNorm(_groups(bottleneck_base_channels), bottleneck_base_channels)
            self.conv_out = nn.Conv1d(bottleneck_base_channels, bottleneck_channels, 1)
            self.embed_dim = bottleneck_channels
        else:
            self.embed_dim = self.features_dim

    # --- the network --------------------------------------------------------------------------
    def features(self, spec: torch.Tensor) -> torch.Tensor:
        """Compressed STFT (B, 2, 1024, 8k) -> pre-bottleneck features (B, C * F, k), index c * F + f."""
        x = self.gain(self.conv_inp(spec.to(self.conv_inp.weight.dtype)))
        for layer in self.down_layers:
            x = layer(x)
        x = self.prenorm_1d_to_2d(x)
        return x.flatten(1, 2)

    def latent(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, C * F, k) -> latent (B, bottleneck_channels, k), tanh / 0.06 as upstream's encode()."""
        x = features
        for layer in self.bottleneck_layers:
            x = layer(x)
        x = self.conv_out(F.silu(self.norm_out(x)))
        return torch.tanh(x) * LATENT_SCALE

    # --- Encoder contract ---------------------------------------------------------------------
    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        stft_frames = torch.div(lengths - 3 * STFT_HOP, STFT_HOP, rounding_mode="floor")
        return torch.div(stft_frames, self.stft_frames_per_frame, rounding_mode="floor").clamp(min=1)

    def finetune_blocks(self) -> list[nn.Module]:
        return [*self.down_layers, *getattr(self, "bottleneck_layers", [])]

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """wav (B, S), lengths (B,) -> [(B, T, embed_dim)], zero past each item's frames.

        Each item is cut to ``4096 k + 1536`` samples (its k frames) and encoded at that length;
        items of one length run together, at most one window's worth of samples at a time (as
        upstream's default batch of one 60 s chunk), which bounds the memory on long audio.
        """
        lengths = lengths.to(wav.device)
        frames = self.frame_lengths(lengths)
        out = wav.new_zeros(wav.shape[0], int(frames.max()), self.embed_dim, dtype=self.conv_inp.weight.dtype)
        budget = round(self.context_seconds * self.sample_rate)
        for k in frames.unique().tolist():
            n = k * self.hop_length + 3 * STFT_HOP
            idx = (frames == k).nonzero()[:, 0]
            step = max(budget // n, 1)
            for group in idx.split(step):
                x = F.pad(wav[group], (0, max(n - wav.shape[-1], 0)))[:, :n].float()
                valid = torch.arange(n, device=wav.device)[None] < lengths[group, None]
                h = self.features(self.frontend(x * valid))
                if self.output == "latent":
                    h = self.latent(h)
                out[group, :k] = h.transpose(1, 2)
        return [out]

    # --- upstream weights ---------------------------------------------------------------------
    def load_upstream(self, files: dict[str, Any]) -> None:
        """Load upstream's `music2latent.pt` (a pickle whose `gen_state_dict` is the whole consistency
        model): the `encoder.*` part is kept, the rest dropped by name, and loaded strictly."""
        path = pick_file(files, (".pt",), "Music2Latent checkpoint")
        ckpt = read_checkpoint(path, allow=numpy_scalar_globals())
        load_state_strict(self, checkpoint_filter_fn(ckpt, output=self.output, where=str(path)), where=str(path))


def numpy_scalar_globals() -> list[Any]:
    """What upstream's pickle names besides tensors: numpy scalars (e.g. a step counter) pickled
    under numpy 1.x (`numpy.core`) or 2.x (`numpy._core`), their dtypes, and `_codecs.encode`
    (bytes in protocol-2 pickles). Allowing these builds plain numbers; it runs no other code."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2 names it numpy.core only
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtype_classes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object())) if n.endswith("DType")]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            (codecs.encode, "_codecs.encode"), *dtype_classes]


def checkpoint_filter_fn(
    checkpoint: dict[str, Any], output: str = "features", where: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Upstream checkpoint {"gen_state_dict": UNet state, ...} -> our state dict.

    Keeps `encoder.*` without the prefix (our module names are upstream's), drops the decoder side
    (`DECODER_PREFIXES`) and, for output="features", the bottleneck (`BOTTLENECK_PREFIXES`). Any
    other key is an error; the other top-level entries (numpy step counters) are not weights.
    """
    from musicssl.errors import ReleaseFormatError

    if not isinstance(checkpoint, dict) or "gen_state_dict" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ReleaseFormatError(f"{where} has no 'gen_state_dict' (found {found}): not a music2latent.pt checkpoint")
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in checkpoint["gen_state_dict"].items():
        if key.startswith("encoder."):
            sub = key[len("encoder."):]
            if not (output == "features" and sub.startswith(BOTTLENECK_PREFIXES)):
                state[sub] = value
        elif not key.startswith(DECODER_PREFIXES):
            unknown.append(key)
    if unknown:
        raise ReleaseFormatError(f"{where}: unexpected keys in gen_state_dict: {sorted(unknown)}")
    return state


# --- registry ---------------------------------------------------------------------------------
def _spec(**fields: Any) -> ModelSpec:
    return ModelSpec(
        family="music2latent",
        sample_rate=44100,
        frame_rate=44100 / 4096,
        num_layers=1,
        recommended_layer=-1,
        context_seconds=(CHUNK_FRAMES * 8 * STFT_HOP + 3 * STFT_HOP) / 44100,
        weights="hf-hub:SonyCSLParis/music2latent",
        revision=None,
        files={"music2latent.pt": None},
        license="CC-BY-NC-4.0",
        source="https://github.com/SonyCSLParis/music2latent",
        citation=CITATION,
        upstream=True,
        **fields,
    )


@register_model(_spec(
    name="music2latent", embed_dim=8192, args={"output": "features"},
    description="Music2Latent encoder features (8192-d before the bottleneck, ~10.8 frames/s, 44.1 kHz): "
                "upstream's recommendation for downstream tasks. Non-commercial weights.",
))
def music2latent(**kwargs: Any) -> Music2Latent:
    return Music2Latent(**{"output": "features", **kwargs})


@register_model(_spec(
    name="music2latent-latent", embed_dim=64, args={"output": "latent"},
    description="Music2Latent 64-d latent (tanh / 0.06, as upstream's encode(); ~10.8 frames/s, 44.1 kHz), "
                "the code its consistency decoder turns back into audio. Non-commercial weights.",
))
def music2latent_latent(**kwargs: Any) -> Music2Latent:
    return Music2Latent(**{"output": "latent", **kwargs})
