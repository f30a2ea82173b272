"""PESTO: frame-wise pitch estimation with a transposition-equivariant network.

Riou, Lattner, Hadjeres and Peeters, "PESTO: Pitch Estimation with Self-supervised
Transposition-equivariant Objective", ISMIR 2023 (reference code: SonyCSLParis/pesto, LGPL-3.0;
this file is a re-implementation that keeps its module names, so upstream state dicts load through
`checkpoint_filter_fn`; `pesto-mir1k` is upstream's released `mir-1k_g7` model, converted from the
pesto-pitch 2.0.1 wheel and checked against it frame by frame).

Each 10 ms frame is processed on its own: VQT log power (fmin 27.5 Hz, 3 bins per semitone, gamma 7;
the signal reflected at both ends, as upstream) -> the central bins (a margin of `crop_bins` on each
side is what the training recipe shifts into view) -> LayerNorm over the bins -> 1-D convolutions along frequency (a residual
"prefilter" stack, then 1x1 channel mixers) -> a Toeplitz fully connected head to `output_dim`
pitch logits -> softmax. Convolutions and the Toeplitz head commute with shifts along frequency, so
transposing the input by k bins moves the logits by k bins (away from the edges): pitch is learnt
up to a constant offset, the `shift` buffer, which `calibrate_shift` sets from synthetic tones;
as upstream, outputs are rolled by it in whole bins, so output bin b reads MIDI b / bins_per_semitone.
A small classifier on the linear power spectrum gives a voicing confidence per frame.

As an `Encoder` the hidden states are [pitch logits, pitch distribution], both (B, T, output_dim),
at 100 frames/s of 16 kHz audio; `pitch()` returns f0 in Hz and the confidence, computed at the
audio's own sample rate as upstream does.
"""

from __future__ import annotations

import collections
import logging
import math
import tempfile
import typing
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musicssl.audio.frontends import VQT, AmplitudeToDB
from musicssl.convert import pick_file, read_checkpoint
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.base import AudioLike, Encoder, conv_frames, init_args
from musicssl.registry import ModelSpec, register_family, register_model

log = logging.getLogger(__name__)

CITATION = (
    "Riou, A., Lattner, S., Hadjeres, G. and Peeters, G. (2023). PESTO: Pitch Estimation with "
    "Self-supervised Transposition-equivariant Objective. ISMIR."
)

# dB -> natural log of power (2 ln|X|): upstream feeds its network the dB values scaled by ln(10) / 10.
DB_TO_LN_POWER = math.log(10) / 10

# A narrower network than upstream's (22k parameters instead of 130k) for quick CPU training; the
# front-end, depth, kernels and output layout are upstream's. Its three 39-bin convolutions see 115
# bins (over 3 octaves), enough to take in a tone's harmonics: with two 15-bin ones (29 bins) our
# short runs often keyed on different partials in different registers (octave jumps).
TINY = dict(n_chan_layers=[16, 16, 8, 2], n_prefilt_layers=3, prefilt_kernel_size=39)


class ToeplitzLinear(nn.Conv1d):
    """A linear map whose weight depends only on the index difference: ``y_j = sum_i w[i - j + out - 1] x_i``.

    Shifting x by k positions shifts y by k (exactly, for content that stays inside both ends):
    the transposition-equivariant head of PESTO. x (N, in_features) -> (N, out_features).
    Stored as a 1-channel Conv1d (weight (1, 1, in + out - 1)), as upstream, but applied as the
    (out, in) matrix it defines: the same numbers, ~40x faster than a 1-channel conv on CPU.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(1, 1, kernel_size=in_features + out_features - 1, padding=out_features - 1, bias=False)
        self.in_features, self.out_features = in_features, out_features

    def matrix(self) -> torch.Tensor:
        """The (out_features, in_features) matrix M[j, i] = w[i - j + out_features - 1]."""
        # Row j is the window w[out - 1 - j : out - 1 - j + in]. Windows (unfold) rather than an
        # index gather: the gather's backward accumulates in a thread-dependent order on CPU.
        return self.weight.view(-1).unfold(0, self.in_features, 1).flip(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix())


def _block(c_in: int, c_out: int, kernel: int, a_lrelu: float, p_dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.LeakyReLU(a_lrelu), nn.Dropout(p_dropout)
    )


class PitchNet(nn.Module):
    """The per-frame network (upstream `Resnet1d`): dB bins (N, n_bins_in) -> pitch logits (N, output_dim).

    LayerNorm over the bins; ``conv1`` (1 -> n_chan_layers[0] channels, kernel over frequency) and
    ``n_prefilt_layers - 1`` more such layers, residual when `residual`; then 1x1 convolutions
    through ``n_chan_layers[1:]``; every conv followed by LeakyReLU and dropout. The last channel
    count times n_bins_in, flattened channel-major, feeds the Toeplitz head. Upstream appends a
    final 1-channel layer when given fewer than 5 channel counts; here the list is used as given.
    """

    def __init__(
        self, n_bins_in: int, n_chan_layers: Sequence[int], n_prefilt_layers: int, prefilt_kernel_size: int,
        residual: bool, output_dim: int, a_lrelu: float, p_dropout: float,
    ) -> None:
        super().__init__()
        ch = list(n_chan_layers)
        if prefilt_kernel_size % 2 == 0:
            raise ValueError(f"prefilt_kernel_size must be odd to keep the bins aligned, got {prefilt_kernel_size}")
        if n_prefilt_layers < 1 or len(ch) < 1:
            raise ValueError("PitchNet needs at least one prefilter layer and one channel count")
        self.residual = residual
        # Upstream normalises over (1 channel, bins) with a (1, n_bins_in) affine; the same op over the
        # bins alone keeps the affine 1-D, so optimisers treat it as a norm (no weight decay).
        self.layernorm = nn.LayerNorm(n_bins_in)
        self.conv1 = _block(1, ch[0], prefilt_kernel_size, a_lrelu, p_dropout)
        self.prefilt_layers = nn.ModuleList(
            _block(ch[0], ch[0], prefilt_kernel_size, a_lrelu, p_dropout) for _ in range(n_prefilt_layers - 1)
        )
        mixers: list[nn.Module] = []
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            mixers.extend(_block(c_in, c_out, 1, a_lrelu, p_dropout))
        self.conv_layers = nn.Sequential(*mixers)
        self.fc = ToeplitzLinear(n_bins_in * ch[-1], output_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_bins_in) -> conv features (N, n_chan_layers[-1], n_bins_in), aligned with the bins."""
        x = self.conv1(self.layernorm(x)[:, None, :])
        for layer in self.prefilt_layers:
            x = x + layer(x) if self.residual else layer(x)
        return self.conv_layers(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class ConfidenceHead(nn.Module):
    """Voicing confidence in [0, 1] from the linear power spectrum of a frame (upstream
    `ConfidenceClassifier`): a strided conv over the bins, plus the spectral flatness, into a
    logistic unit. power (N, n_bins) -> (N,)."""

    def __init__(self, n_bins: int, kernel: int = 39, stride: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel, stride=stride)
        self.linear = nn.Linear((n_bins - kernel) // stride + 2, 1)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        geometric = power.log().mean(dim=-1, keepdim=True).exp()
        flatness = geometric / power.mean(dim=-1, keepdim=True).clamp(min=1e-8)
        x = F.relu(self.conv(power[:, None, :]).squeeze(1))
        return torch.sigmoid(self.linear(torch.cat([x, flatness], dim=-1))).squeeze(-1)


@register_family("pesto")
class PESTO(Encoder):
    """PESTO pitch encoder. wav (B, S) at 16 kHz -> [logits, pitch distribution], each (B, T, output_dim).

    The network's bin b stands for ``b / bins_per_semitone - shift`` MIDI semitones once
    calibrated; the outputs are rolled down by `roll_bins` (`shift` in whole bins), so output bin b
    reads ``b / bins_per_semitone``, as upstream's activations. The defaults are the architecture of
    upstream's released `mir-1k_g7` weights (`pesto-mir1k`).

    Args:
        sample_rate, hop_length: Hz and samples; 160 at 16 kHz gives 10 ms frames.
        fmin: Hz of the centre of semitone 0 (A0); with `center_bins` each semitone's middle bin
            sits on it (bin 1 for 3 bins per semitone), as upstream.
        bins_per_semitone, n_bins, gamma: the VQT (see `musicssl.audio.frontends.VQT`).
        crop_bins: bins dropped at each end before the network: it sees n_bins - 2 crop_bins bins.
        n_chan_layers, n_prefilt_layers, prefilt_kernel_size, residual, a_lrelu, p_dropout: `PitchNet`.
        output_dim: pitch bins of the output (384 = 128 semitones at 3 per semitone).
        reduction: how `pitch()` reads a distribution: "alwa" (argmax-local weighted average), "argmax", "mean".
        context_seconds, overlap_seconds: windows of `embed()`; frames see only +-70 ms of signal.
    """

    shift: torch.Tensor

    def __init__(
        self,
        sample_rate: int = 16000,
        hop_length: int = 160,
        fmin: float = 27.5,
        bins_per_semitone: int = 3,
        n_bins: int = 251,
        gamma: float = 7.0,
        center_bins: bool = True,
        crop_bins: int = 16,
        n_chan_layers: Sequence[int] = (40, 30, 30, 10, 3),
        n_prefilt_layers: int = 3,
        prefilt_kernel_size: int = 39,
        residual: bool = True,
        output_dim: int = 384,
        a_lrelu: float = 0.3,
        p_dropout: float = 0.2,
        reduction: str = "alwa",
        context_seconds: float = 10.0,
        overlap_seconds: float = 0.5,
    ) -> None:
        super().__init__()
        if reduction not in ("alwa", "argmax", "mean"):
            raise ValueError(f"reduction must be 'alwa', 'argmax' or 'mean', not {reduction!r}")
        if not 0 <= crop_bins < n_bins // 2:
            raise ValueError(f"crop_bins must be in [0, {n_bins // 2}), got {crop_bins}")
        self.args = init_args(locals())
        self.args["n_chan_layers"] = list(n_chan_layers)  # JSON-friendly
        self.sample_rate, self.hop_length, self.frame_offset = sample_rate, hop_length, 0.0
        self.context_seconds, self.overlap_seconds = context_seconds, overlap_seconds
        self.embed_dim, self.num_layers = output_dim, 2
        self.bins_per_semitone, self.crop_bins, self.reduction = bins_per_semitone, crop_bins, reduction
        self.n_bins_in = n_bins - 2 * crop_bins
        # Shift fmin down by (bps - 1) / 2 bins so the middle bin of each semitone is on it.
        bin0 = fmin / 2 ** ((bins_per_semitone - 1) / (24 * bins_per_semitone)) if center_bins else fmin
        self.frontend = VQT(sample_rate, hop_length, fmin=bin0, bins_per_semitone=bins_per_semitone,
                            n_bins=n_bins, gamma=gamma)
        self.to_db = AmplitudeToDB("magnitude", ref=1.0, amin=torch.finfo(torch.float32).eps, top_db=None)
        self.encoder = PitchNet(self.n_bins_in, n_chan_layers, n_prefilt_layers, prefilt_kernel_size, residual,
                                output_dim, a_lrelu, p_dropout)
        self.confidence = ConfidenceHead(n_bins)
        # MIDI offset of the network's bin 0, in semitones (upstream's name and sign: pitch = b / bps - shift).
        self.register_buffer("shift", torch.zeros(()), persistent=True)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # `shift` is a pitch offset of ~20 semitones: keep it float32 when the model is cast to bf16.
        shift = self.shift
        super()._apply(fn, recurse)
        if self.shift.dtype != torch.float32:
            self.shift = shift.to(device=self.shift.device)
        return self

    # --- the pieces the recipe uses ----------------------------------------------------------
    def spectrum(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (..., S) -> VQT magnitude in dB (..., n_bins, T), float32, all bins (uncropped).

        The signal is zero-padded here, so the frames within `_edge_frames` of either end see the
        padding: the recipe drops them; inference reflects the signal first (`_reflected`)."""
        return self.to_db(self.frontend(wav))

    def crop(self, spec: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        """Bins the network sees, (..., n_bins, T) -> (..., n_bins_in, T), from bin `offset`
        (default `crop_bins`, the centred crop used at inference)."""
        offset = self.crop_bins if offset is None else offset
        return spec[..., offset : offset + self.n_bins_in, :]

    def logits(self, frames: torch.Tensor) -> torch.Tensor:
        """Cropped dB frames (N, n_bins_in) -> pitch logits (N, output_dim) in the backbone's dtype.

        The network reads the natural log of the power (dB times ln(10) / 10), as upstream's does."""
        return self.encoder(frames.mul(DB_TO_LN_POWER).to(self.encoder.fc.weight.dtype))

    @property
    def roll_bins(self) -> int:
        """Whole bins the outputs are rolled down by: `shift` rounded to a bin (half to even), as upstream."""
        return round(float(self.shift) * self.bins_per_semitone)

    # --- Encoder contract ---------------------------------------------------------------------
    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_frames(lengths, self.hop_length)

    def finetune_blocks(self) -> list[nn.Module]:
        net = self.encoder
        return [net.conv1, *net.prefilt_layers, *(m for m in net.conv_layers if isinstance(m, nn.Conv1d)), net.fc]

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """wav (B, S) at `sample_rate` -> [logits, distribution] (B, T, output_dim), rolled so that
        bin b is MIDI b / bins_per_semitone. Each item is reflected at its own end (`lengths`)."""
        edge = _edge_frames(self.frontend)
        spec = self.spectrum(_reflected(wav, lengths, edge * self.hop_length))
        spec = self.crop(spec[..., edge : spec.shape[-1] - edge])  # (B, n_bins_in, T)
        B, _, T = spec.shape
        logits = self.logits(spec.transpose(1, 2).reshape(B * T, -1)).view(B, T, -1)
        logits = logits.float().roll(-self.roll_bins, dims=-1)
        return [logits, logits.softmax(dim=-1)]

    # --- pitch --------------------------------------------------------------------------------
    def frame_pitch(
        self, wav: torch.Tensor, sr: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """wav (S,) at `sr` Hz (default `sample_rate`) -> (MIDI semitones (T,), confidence (T,),
        distribution (T, output_dim), rolled as in `forward_features`).

        At another rate the VQT is built for that rate with a hop of the same duration (rounded to
        a sample), so T = S // hop + 1, as upstream (which never resamples). Runs in chunks of
        `context_seconds`, each with `edge_frames` of signal around it, so the result equals one pass
        over the whole signal in bounded memory.
        """
        frontend, hop = self._frontend_at(sr or self.sample_rate, wav.device)
        n_frames = wav.shape[-1] // hop + 1
        chunk = max(int(self.context_seconds * frontend.sample_rate) // hop, 1)
        edge = _edge_frames(frontend)
        padded = _reflected(wav.float()[None], torch.tensor([wav.shape[-1]], device=wav.device), edge * hop)[0]
        probs, conf = [], []
        for t0 in range(0, n_frames, chunk):
            n = min(chunk, n_frames - t0)
            spec = self.to_db(frontend(padded[t0 * hop : (t0 + n + 2 * edge) * hop]))[:, edge : edge + n].T
            probs.append(self.logits(spec[:, self.crop_bins : self.crop_bins + self.n_bins_in]).float().softmax(-1))
            power = spec.mul(DB_TO_LN_POWER).exp()  # dB of magnitude -> |X|^2
            conf.append(self.confidence(power.to(self.confidence.linear.weight.dtype)).float())
        p = torch.cat(probs).roll(-self.roll_bins, dims=-1)
        return reduce_activations(p, self.bins_per_semitone, self.reduction), torch.cat(conf), p

    def _frontend_at(self, sr: int, device: torch.device) -> tuple[VQT, int]:
        """The VQT for audio at `sr` Hz and its hop (10 ms at the defaults), built once per rate."""
        if sr == self.sample_rate:
            return self.frontend, self.hop_length
        cache = self.__dict__.setdefault("_native_frontends", {})
        if sr not in cache:
            hop = int(self.hop_length * sr / self.sample_rate + 0.5)  # upstream's rounding of the step
            f = self.frontend
            with torch.inference_mode(False):  # plain buffers, usable in and out of inference mode
                cache[sr] = VQT(sr, hop, fmin=f.fmin, bins_per_semitone=f.bins_per_semitone, n_bins=f.n_bins,
                                gamma=f.gamma)
        cache[sr] = cache[sr].to(device)
        return cache[sr], cache[sr].hop_length

    @torch.inference_mode()
    def pitch(self, audio: AudioLike | Sequence[AudioLike], sr: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 in Hz and voicing confidence in [0, 1] of every 10 ms frame: (B, T) each.

        audio and sr as for `embed()` (channels averaged), but nothing is resampled: as upstream,
        the VQT runs at the audio's own rate (`frame_pitch`), so frame t is centred on
        ``t * hop / sr`` seconds with ``hop = round(hop_length * sr / sample_rate)`` (221 samples at
        22.05 kHz); items shorter than the longest are zero past their ``S // hop + 1`` frames.
        Hz are absolute only once `shift` is calibrated (released weights, or `calibrate_shift`);
        the confidence head is not trained by the SSL recipe.
        """
        items = _native_items(audio, sr, self.sample_rate)
        out = [self.frame_pitch(torch.from_numpy(x).to(self.device), rate) for x, rate in items]
        n = max(len(m) for m, _, _ in out)
        f0, conf = torch.zeros(len(out), n), torch.zeros(len(out), n)
        for i, (midi, c, _) in enumerate(out):
            f0[i, : len(midi)] = 440.0 * 2 ** ((midi.cpu() - 69) / 12)
            conf[i, : len(c)] = c.cpu()
        return f0, conf

    @torch.no_grad()
    def calibrate_shift(self, midi: Sequence[int] = tuple(range(60, 72)), seconds: float = 1.0, seed: int = 0) -> float:
        """Set `shift` so harmonic tones at `midi` read back as those pitches; returns it (semitones).

        The network knows pitch only up to a transposition; upstream PESTO calibrates the same way
        (median over one octave of 5-harmonic tones). The value is kept as measured; outputs apply it
        rounded to a whole bin (`roll_bins`). Runs in eval mode and restores the mode.
        """
        was_training = self.training
        self.eval()
        self.shift.zero_()
        errors = []
        for i, m in enumerate(midi):
            tone = harmonic_tone(440.0 * 2 ** ((m - 69) / 12), seconds, self.sample_rate, seed=seed + i)
            semitones, _, _ = self.frame_pitch(torch.from_numpy(tone).to(self.device))
            errors.append(semitones - m)  # read with no shift
        errors_t = torch.cat(errors)
        self.shift.fill_(float(errors_t.median()))
        log.info("PESTO shift %.3f semitones (spread %.3f)", float(self.shift), float(errors_t.std()))
        self.train(was_training)
        return float(self.shift)

    # --- upstream weights ---------------------------------------------------------------------
    def load_upstream(self, files: dict[str, Any]) -> None:
        """Load upstream's checkpoint: the pesto-pitch wheel (its `pesto/weights/mir-1k_g7.ckpt`) or
        a bare Lightning checkpoint of that format. Its hparams and VQT settings must be this
        model's architecture; the state dict is mapped by `checkpoint_filter_fn` and loaded strictly."""
        path = pick_file(files, (".whl", ".ckpt"), "PESTO wheel or checkpoint")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_path, where = _checkpoint_in(path, Path(tmp))
            ckpt = read_upstream_checkpoint(ckpt_path, where)
        check_upstream_config(self, ckpt, where)
        load_state_strict(self, checkpoint_filter_fn(ckpt["state_dict"]), where=where)


def _edge_frames(frontend: VQT) -> int:
    """Frames at each end whose kernels reach past the signal: ceil((longest kernel / 2 + 1) / hop)."""
    return -(-(frontend.max_kernel_length // 2 + 1) // frontend.hop_length)


def _reflected(wav: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, S) -> (B, pad + S + pad), each item mirrored about its first and last valid sample
    (``lengths``), as ``F.pad(mode="reflect")`` on the item alone; an item shorter than `pad` + 1
    is mirrored once and then zero-padded (upstream fails there). Samples past an item's end,
    beyond its reflection, are zero."""
    n = lengths.to(wav.device)[:, None]
    j = torch.arange(-pad, wav.shape[-1] + pad, device=wav.device)[None]  # position in the item
    src = torch.where(j < 0, -j, j)
    src = torch.where(j >= n, 2 * (n - 1) - j, src)
    ok = (src >= 0) & (src < n)
    return wav.gather(1, src.clamp(0, wav.shape[-1] - 1).expand(wav.shape[0], -1)) * ok


def _native_items(audio: Any, sr: int | None, default_sr: int) -> list[tuple[np.ndarray, int]]:
    """Items as `embed()` takes them -> [(mono float32 (S,), its own sample rate)], not resampled."""
    from musicssl.audio.inputs import is_path, prepare_items
    from musicssl.audio.io import load_audio

    if not is_path(audio) and (not isinstance(audio, Sequence) or isinstance(audio, (bytes, bytearray))):
        return [(x, int(sr)) for x in prepare_items(audio, sr, sr or default_sr)]
    items = [audio] if is_path(audio) else list(audio)
    if not items:
        prepare_items(items, sr, default_sr)  # raises its error for an empty list
    out = []
    for x in items:
        if is_path(x):
            y, rate = load_audio(x, mono=True)
            out.append((np.ascontiguousarray(y, dtype=np.float32), int(rate)))
        else:
            out.extend((y, int(sr)) for y in prepare_items([x], sr, sr or default_sr))
    return out


def reduce_activations(probs: torch.Tensor, bins_per_semitone: int, reduction: str = "alwa") -> torch.Tensor:
    """Pitch distributions (..., n_out) -> position in semitones (bin / bins_per_semitone), (...).

    "argmax": the most likely bin; "mean": the expectation over all bins; "alwa": the weighted
    average of the bins within bins_per_semitone - 1 of the argmax (as CREPE and PESTO do).
    """
    n_out = probs.shape[-1]
    bins = torch.arange(n_out, dtype=probs.dtype, device=probs.device)
    if reduction == "argmax":
        return probs.argmax(dim=-1).to(probs.dtype) / bins_per_semitone
    if reduction == "mean":
        return (probs @ bins) / probs.sum(-1).clamp(min=1e-12) / bins_per_semitone
    if reduction != "alwa":
        raise ValueError(f"reduction must be 'alwa', 'argmax' or 'mean', not {reduction!r}")
    window = torch.arange(1 - bins_per_semitone, bins_per_semitone, device=probs.device)
    index = (probs.argmax(dim=-1, keepdim=True) + window).clamp(0, n_out - 1)
    weights = probs.gather(-1, index)
    return (weights * bins[index]).sum(-1) / weights.sum(-1).clamp(min=1e-12) / bins_per_semitone


def harmonic_tone(f0: float, seconds: float, sample_rate: int, n_harmonics: int = 5, seed: int = 0) -> np.ndarray:
    """A steady tone of `n_harmonics` partials at k * f0 Hz (those below Nyquist) with random phases
    and amplitudes (the fundamental at 1), peak-normalised to 0.5: (S,) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    amps = rng.uniform(0.1, 1.0, n_harmonics)
    amps[0] = 1.0
    x = sum(a * np.cos(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
            for k, a in enumerate(amps, start=1) if k * f0 < sample_rate / 2)
    x = np.asarray(x, dtype=np.float64)
    return (0.5 * x / max(np.abs(x).max(), 1e-9)).astype(np.float32)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream PESTO state dict (pesto-pitch `PESTO.state_dict()`, or the ``state_dict`` of its
    checkpoints) -> this class's. The module names are the same; the LayerNorm affine (1, n_bins)
    becomes (n_bins,); the VQT kernels upstream may hold (``preprocessor.*``) are computed here."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("preprocessor."):
            continue
        if key in ("encoder.layernorm.weight", "encoder.layernorm.bias"):
            value = value.reshape(-1)
        out[key] = value
    return out


# --- upstream's checkpoint -------------------------------------------------------------------
# The released model ships inside the pesto-pitch wheel on PyPI (LGPL-3.0).
WHEEL_URL = (
    "https://files.pythonhosted.org/packages/55/85/46cc8ad5bf44a8f8626336ad3ffcd171c60002189b8b6dd0fdb80a7d444d/"
    "pesto_pitch-2.0.1-py3-none-any.whl"
)
WHEEL_SHA256 = "2eb1e5ac1c2f78f7563f4800cccd73daf04d52717ff0d95ea30257a56f3f9d37"
WHEEL_MEMBER = "pesto/weights/mir-1k_g7.ckpt"
WHEEL_MEMBER_SHA256 = "16c32e06ddd950e3e4866dfa3c7f8a87c4988f8adf43e57977b189f031f26f3e"
# The checkpoint taken out of the pinned wheel is the pinned weights too (`musicssl convert pesto FILE.ckpt`).
PESTO.pinned_members = {WHEEL_URL.rsplit("/", 1)[1]: WHEEL_MEMBER_SHA256}
# Its hparams are omegaconf containers: they unpickle as inert stand-ins (omegaconf is never imported).
OMEGACONF_CLASSES = (
    "omegaconf.listconfig.ListConfig", "omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode",
    "omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata",
)


def _checkpoint_in(path: Path, tmp: Path) -> tuple[Path, str]:
    """(the checkpoint file, how to name it in errors) for a wheel (its member extracted to `tmp`)
    or a bare checkpoint."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            names = wheel.namelist()
            if WHEEL_MEMBER in names:
                target = tmp / Path(WHEEL_MEMBER).name
                target.write_bytes(wheel.read(WHEEL_MEMBER))
                return target, f"{path}!{WHEEL_MEMBER}"
            if any(n.endswith(".dist-info/WHEEL") for n in names):
                raise ReleaseFormatError(f"{path} is a wheel without {WHEEL_MEMBER}: is it pesto-pitch 2.0.1?")
    return path, str(path)


def read_upstream_checkpoint(path: Path, where: str | None = None) -> dict[str, Any]:
    """A pesto-pitch Lightning checkpoint -> {"state_dict", "hparams", "hcqt_params", ...}, with the
    omegaconf containers of its hparams turned into plain dicts and lists. Reads with
    ``weights_only=True`` (`musicssl.convert.read_checkpoint`)."""

    where = where or str(path)
    try:
        ckpt = read_checkpoint(path, allow=[typing.Any, collections.defaultdict, dict, list, int],
                               stand_ins=OMEGACONF_CLASSES)
    except ReleaseFormatError as err:
        raise ReleaseFormatError(f"{where}: {err}") from err
    missing = [k for k in ("state_dict", "hparams", "hcqt_params") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ReleaseFormatError(f"{where} is not a PESTO checkpoint: it has no {missing} (keys: {_keys(ckpt)})")
    return {k: (v if k == "state_dict" else _plain(v)) for k, v in ckpt.items()}


def _keys(obj: Any) -> list[str]:
    return sorted(map(str, obj)) if isinstance(obj, dict) else [type(obj).__name__]


def _plain(obj: Any) -> Any:
    """omegaconf stand-ins (their pickled state: containers hold ``_content``, nodes ``_val``) and
    containers of them -> plain dicts, lists and values."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    state = obj.__dict__.get("state") if type(obj).__module__.startswith("omegaconf.") else None
    if isinstance(state, dict) and "_content" in state:
        return _plain(state["_content"])
    if isinstance(state, dict) and "_val" in state:
        return _plain(state["_val"])
    return obj


def check_upstream_config(model: PESTO, ckpt: dict[str, Any], where: str) -> None:
    """Raise ReleaseFormatError unless the checkpoint's network (hparams) and VQT (hcqt_params) are
    `model`'s. Settings upstream ignores at inference (dropout, reduction) are not compared."""
    a = model.args
    enc, crop, hcqt = ckpt["hparams"].get("encoder", {}), ckpt["hparams"].get("pitch_shift", {}), ckpt["hcqt_params"]
    channels = list(enc.get("n_chan_layers", []))
    channels += [1] * (len(channels) < 5)  # upstream's Resnet1d appends a 1-channel layer to short lists
    expected = {
        "encoder.n_chan_input": (enc.get("n_chan_input"), 1),
        "encoder.n_chan_layers": (channels, list(a["n_chan_layers"])),
        "encoder.n_prefilt_layers": (enc.get("n_prefilt_layers"), a["n_prefilt_layers"]),
        "encoder.prefilt_kernel_size": (enc.get("prefilt_kernel_size"), a["prefilt_kernel_size"]),
        "encoder.residual": (enc.get("residual"), a["residual"]),
        "encoder.n_bins_in": (enc.get("n_bins_in"), model.n_bins_in),
        "encoder.output_dim": (enc.get("output_dim"), a["output_dim"]),
        "encoder.activation_fn": (enc.get("activation_fn", "leaky"), "leaky"),
        "encoder.a_lrelu": (enc.get("a_lrelu"), a["a_lrelu"]),
        "pitch_shift.max_steps": (crop.get("max_steps"), a["crop_bins"]),
        "pitch_shift.min_steps": (crop.get("min_steps"), -a["crop_bins"]),
        "hcqt_params.harmonics": (list(hcqt.get("harmonics", [])), [1]),
        "hcqt_params.fmin": (hcqt.get("fmin"), a["fmin"]),
        "hcqt_params.fmax": (hcqt.get("fmax"), None),
        "hcqt_params.bins_per_semitone": (hcqt.get("bins_per_semitone"), a["bins_per_semitone"]),
        "hcqt_params.n_bins": (hcqt.get("n_bins"), a["n_bins"]),
        "hcqt_params.center_bins": (hcqt.get("center_bins"), a["center_bins"]),
        "hcqt_params.gamma": (hcqt.get("gamma", 0), a["gamma"]),
        "hcqt_params.center": (hcqt.get("center", True), True),
    }
    wrong = [f"{k}: checkpoint {got!r} vs model {want!r}" for k, (got, want) in expected.items() if got != want]
    if wrong:
        raise ReleaseFormatError(
            f"{where} is a PESTO checkpoint of another architecture than this model's: " + "; ".join(wrong)
        )


def _spec(name: str, args: dict[str, Any], description: str, **upstream: Any) -> ModelSpec:
    return ModelSpec(**{
        "name": name,
        "family": "pesto",
        "sample_rate": 16000,
        "frame_rate": 100.0,
        "embed_dim": 384,
        "num_layers": 2,
        "recommended_layer": -1,
        "context_seconds": 10.0,
        "weights": None,
        "license": "n/a",
        "source": "musicssl (train with the PESTO recipe)",
        "citation": CITATION,
        "description": description,
        "args": dict(args),
        **upstream,
    })


@register_model(_spec(
    "pesto-tiny", TINY,
    "PESTO pitch estimator, small (22k parameters): VQT (3 bins/semitone) -> 1-D conv stack -> Toeplitz "
    "transposition-equivariant head; 384-bin pitch distribution every 10 ms.",
))
def pesto_tiny(**kwargs: Any) -> PESTO:
    return PESTO(**{**TINY, **kwargs})


# The released upstream model: its architecture is PESTO's defaults, spelt out.
MIR1K_G7 = dict(
    fmin=27.5, bins_per_semitone=3, n_bins=251, gamma=7.0, crop_bins=16, n_chan_layers=[40, 30, 30, 10, 3],
    n_prefilt_layers=3, prefilt_kernel_size=39, residual=True, output_dim=384,
)


@register_model(_spec(
    "pesto-mir1k", MIR1K_G7,
    "PESTO pitch estimator as released (mir-1k_g7, 130k parameters, self-supervised on MIR-1K): 384-bin "
    "pitch distribution every 10 ms (bin b = MIDI b/3) and, with pitch(), f0 in Hz and voicing confidence.",
    weights=WHEEL_URL, upstream=True, files={WHEEL_URL.rsplit("/", 1)[1]: WHEEL_SHA256}, license="LGPL-3.0",
    source="https://github.com/SonyCSLParis/pesto (PyPI pesto-pitch 2.0.1, pesto/weights/mir-1k_g7.ckpt)",
))
def pesto_mir1k(**kwargs: Any) -> PESTO:
    return PESTO(**{**MIR1K_G7, **kwargs})
