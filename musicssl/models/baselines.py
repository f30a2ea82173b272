"""Baseline features that need no weights: log-mel frames and MFCCs with deltas.

Every music benchmark reports them, so they are the floor a learned encoder must beat, and they let
the whole pipeline (load, embed, CLI) run offline with no download. They are registered like any
model and are the default model until a trained self-supervised default ships.
"""

from __future__ import annotations

import torch

from musicssl.audio.frontends import MFCC, AmplitudeToDB, MelSpectrogram, deltas
from musicssl.models.base import Encoder, conv_frames
from musicssl.registry import ModelSpec, register_family, register_model


class _FrameFeatures(Encoder):
    """A single-layer encoder of signal-processing frames: (B, S) -> [(B, T, n_feat)]."""

    def _setup(self, sample_rate: int, hop_length: int, embed_dim: int, context_seconds: float) -> None:
        self.sample_rate, self.hop_length, self.embed_dim = sample_rate, hop_length, embed_dim
        self.frame_offset, self.num_layers = 0.0, 1
        # Frames are local, so windows need only enough overlap to hide the STFT/delta edges.
        self.context_seconds, self.overlap_seconds = context_seconds, 0.5

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_frames(lengths, self.hop_length)



@register_family("logmel")
class LogMel(_FrameFeatures):
    """Log-mel power spectrogram in dB (Slaney mel, 10 log10, no top_db clipping so windows agree)."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 1024, hop_length: int = 320, n_mels: int = 128,
                 f_min: float = 0.0, f_max: float | None = None, context_seconds: float = 10.0):
        super().__init__()
        self.args = dict(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                         f_min=f_min, f_max=f_max, context_seconds=context_seconds)
        self._setup(sample_rate, hop_length, n_mels, context_seconds)
        self.mel = MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                                  f_min=f_min, f_max=f_max, pad_mode="constant")
        self.db = AmplitudeToDB(stype="power", top_db=None)

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        return [self.db(self.mel(wav.float())).transpose(1, 2)]


@register_family("mfcc")
class Mfcc(_FrameFeatures):
    """MFCCs (DCT-II of dB mel) with deltas and delta-deltas stacked: (n_mfcc * (1 + deltas))-d frames."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 1024, hop_length: int = 320, n_mels: int = 128,
                 n_mfcc: int = 20, deltas: int = 2, context_seconds: float = 10.0):
        super().__init__()
        self.args = dict(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                         n_mfcc=n_mfcc, deltas=deltas, context_seconds=context_seconds)
        self._setup(sample_rate, hop_length, n_mfcc * (1 + deltas), context_seconds)
        self.n_deltas = deltas
        self.mfcc = MFCC(sample_rate, n_mfcc=n_mfcc, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                         top_db=None, pad_mode="constant")

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        c = self.mfcc(wav.float())  # (B, n_mfcc, T)
        # Repeat each item's last valid frame over the batch padding before every delta, so the
        # deltas are the ones the item gets alone (edge replication) whatever it is batched with.
        last = (self.frame_lengths(lengths) - 1).to(c.device)
        t = torch.minimum(torch.arange(c.shape[-1], device=c.device)[None, :], last[:, None])
        t = t[:, None, :].expand_as(c)
        parts = [c]
        for _ in range(self.n_deltas):
            parts.append(deltas(torch.gather(parts[-1], 2, t)))
        return [torch.cat(parts, dim=1).transpose(1, 2)]


def _baseline_spec(name: str, family: str, dim: int, description: str) -> ModelSpec:
    return ModelSpec(
        name=name, family=family, sample_rate=16000, frame_rate=50.0, embed_dim=dim, num_layers=1,
        recommended_layer=0, context_seconds=10.0, needs_weights=False, license="n/a",
        source="musicssl (signal processing, no training)", description=description,
    )


@register_model(_baseline_spec("logmel", "logmel", 128, "128-band log-mel spectrogram in dB, 50 frames/s."))
def logmel(**kwargs) -> LogMel:
    return LogMel(**kwargs)


@register_model(_baseline_spec("mfcc", "mfcc", 60, "20 MFCCs with deltas and delta-deltas, 50 frames/s."))
def mfcc(**kwargs) -> Mfcc:
    return Mfcc(**kwargs)
