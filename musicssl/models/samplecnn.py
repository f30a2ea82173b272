"""SampleCNN: the raw-waveform CNN of Lee et al. (2017), the backbone of CLMR (Spijkervet & Burgoyne, 2021).

A strided conv stem (kernel 3, stride 3) and nine blocks of conv(3) + BN + ReLU + max-pool(3) shrink a
3^10 = 59049-sample segment (2.68 s at 22.05 kHz) to a single position; a last conv(3) + BN + ReLU
block gives the 512-d vector that CLMR calls the representation (the input of its `fc`).

Frames. The network sees one segment at a time and maps it to one vector, so an output frame *is* a
segment: consecutive, non-overlapping 59049-sample segments from the start of the audio
(`hop_length` = 59049, the frame centred on its segment), the last partial segment zero-padded, so
an input of S samples gives ceil(S / 59049) frames. That is how CLMR embeds a whole track (it cuts it
into non-overlapping 59049-sample crops and averages their vectors; it drops the partial tail, which
we keep so that audio shorter than 2.68 s still gets a frame). Segments never see each other, so
`embed()` windows are exactly one segment with no overlap, and in eval mode (BatchNorm on running
statistics) a segment's vector is independent of what it is batched with.

Layers. `forward_features` returns the two stages whose width is `embed_dim` (512): the output of the
ninth (last pooled) block and the output of the final block (CLMR's representation, the default
layer). Earlier blocks are 128/256 wide and longer than one position per segment; they are not
returned, so that every layer has the same width.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from musicssl.models.base import Encoder
from musicssl.registry import ModelSpec, register_family, register_model

# Output widths of the nine pooled blocks in CLMR's SampleCNN (the 3^9 model of Lee et al.).
CLMR_CHANNELS = (128, 128, 256, 256, 256, 256, 256, 256, 512)


def _conv_block(c_in: int, c_out: int, stride: int = 1, pool: bool = True) -> nn.Sequential:
    """conv(3) + BN + ReLU [+ max-pool(3)]; the index layout matches CLMR's state dict."""
    layers: list[nn.Module] = [
        nn.Conv1d(c_in, c_out, kernel_size=3, stride=stride, padding=0 if stride > 1 else 1),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool1d(3, stride=3))
    return nn.Sequential(*layers)


@register_family("samplecnn")
class SampleCNN(Encoder):
    """Sample-level CNN over raw waveform. wav (B, S) -> per layer (B, ceil(S / segment), channels[-1]).

    sample_rate: Hz of the input (22050 for CLMR).
    stem_channels: width of the strided stem conv.
    channels: output widths of the pooled blocks; n blocks make a segment of 3^(n+1) samples.
    """

    def __init__(
        self,
        sample_rate: int = 22050,
        stem_channels: int = 128,
        channels: tuple[int, ...] | list[int] = CLMR_CHANNELS,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("channels must name at least one block")
        self.args = dict(sample_rate=sample_rate, stem_channels=stem_channels, channels=list(channels))
        self.segment_length = 3 ** (len(channels) + 1)  # samples that shrink to one position
        self.sample_rate, self.hop_length = sample_rate, self.segment_length
        self.frame_offset = self.segment_length / 2
        self.context_seconds, self.overlap_seconds = self.segment_length / sample_rate, 0.0
        self.embed_dim, self.num_layers = channels[-1], 2
        self.stem = _conv_block(1, stem_channels, stride=3, pool=False)
        widths = (stem_channels, *channels)
        self.blocks = nn.ModuleList(_conv_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.blocks.append(_conv_block(channels[-1], channels[-1], pool=False))
        self.apply(_init_weights)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.segment_length - 1, self.segment_length, rounding_mode="floor")

    def encode_segments(self, segments: torch.Tensor) -> list[torch.Tensor]:
        """segments (N, segment_length) -> [last pooled block (N, D), final block (N, D)]."""
        x = self.stem(segments[:, None].to(self.stem[0].weight.dtype))
        for blk in self.blocks[:-1]:
            x = blk(x)
        pooled = x
        return [pooled.squeeze(-1), self.blocks[-1](pooled).squeeze(-1)]

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        B, S = wav.shape
        n = self.frame_lengths(lengths.to(wav.device))
        T = max(-(-S // self.segment_length), 1)
        # Zero everything past each item's length, whatever the caller padded with, then cut into
        # segments and run only the valid ones: padding neither costs compute nor enters BN statistics.
        valid_samples = torch.arange(T * self.segment_length, device=wav.device)[None, :] < lengths[:, None].to(wav.device)
        x = nn.functional.pad(wav.float(), (0, T * self.segment_length - S)) * valid_samples
        valid = torch.arange(T, device=wav.device)[None, :] < n[:, None]  # (B, T)
        hidden = self.encode_segments(x.view(B, T, self.segment_length)[valid])
        out = []
        for h in hidden:
            frames = h.new_zeros(B, T, self.embed_dim)
            frames[valid] = h
            out.append(frames)
        return out

    def forward_clip(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """wav (B, S) -> (B, D): the final layer averaged over each item's segments.

        For a crop of exactly one segment (CLMR's 59049 samples) this is CLMR's representation h,
        the vector a contrastive recipe feeds to its projector.
        """
        if lengths is None:
            lengths = torch.full((wav.shape[0],), wav.shape[-1], dtype=torch.long, device=wav.device)
        frames = self.forward_features(wav, lengths)[-1]
        n = self.frame_lengths(lengths.to(frames.device)).clamp(min=1)
        return frames.sum(dim=1) / n[:, None].to(frames.dtype)


def _init_weights(m: nn.Module) -> None:
    # He init: keeps activations near unit scale through the 11 conv layers of a randomly initialised
    # model in eval mode (PyTorch's default init shrinks them ~6x per layer until only biases remain).
    if isinstance(m, nn.Conv1d):
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(m.bias)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLMR SampleCNN weights -> this module's keys.

    Accepts a PyTorch Lightning checkpoint's `state_dict` (keys `model.encoder.sequential.*`), an
    encoder saved inside a wrapper (`encoder.sequential.*`) or a bare SampleCNN (`sequential.*`).
    `sequential.0` is the stem and `sequential.i` block i-1; CLMR's `fc` (a task head, or an Identity
    during pre-training) and everything outside the encoder (projector, optimiser state) are dropped.
    """
    for prefix in ("model.encoder.", "encoder.", ""):
        picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "sequential.")}
        if picked:
            break
    out = {}
    for key, value in picked.items():
        m = re.match(r"sequential\.(\d+)\.(.+)", key)
        if m is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        out[f"stem.{rest}" if i == 0 else f"blocks.{i - 1}.{rest}"] = value
    return out


_CITATION = (
    "Spijkervet, J. and Burgoyne, J. A. (2021). Contrastive Learning of Musical Representations. ISMIR. "
    "Lee, J., Park, J., Kim, K. L. and Nam, J. (2017). Sample-level Deep Convolutional Neural Networks "
    "for Music Auto-tagging Using Raw Waveforms. SMC."
)


@register_model(
    ModelSpec(
        name="clmr-samplecnn",
        family="samplecnn",
        sample_rate=22050,
        frame_rate=22050 / 3**10,
        embed_dim=512,
        num_layers=2,
        recommended_layer=-1,
        context_seconds=3**10 / 22050,
        weights=None,
        license="n/a",
        source="musicssl (train with the SimCLR recipe, i.e. CLMR)",
        citation=_CITATION,
        description="SampleCNN on 22.05 kHz raw waveform (the CLMR backbone): one 512-d frame per "
        "non-overlapping 59049-sample (2.68 s) segment.",
        args=dict(sample_rate=22050, stem_channels=128, channels=list(CLMR_CHANNELS)),
    )
)
def clmr_samplecnn(**kwargs) -> SampleCNN:
    return SampleCNN(**kwargs)
