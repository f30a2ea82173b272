"""Dasheng: a general-audio ViT encoder trained as a masked autoencoder on 272k hours of sound.

Dinkel, Yan, Wang, Zhang, Wang and Wang, "Scaling up masked audio encoder learning for general audio
classification", Interspeech 2024 (reference code: XiaoMi/dasheng and the `dasheng` 0.0.9 package,
Apache-2.0; this file is a re-implementation, checked against that package by
tests/test_parity_dasheng.py).

Pipeline, all inside the model (16 kHz mono in):
  - mel power spectrogram: n_fft 512 (periodic Hann, 32 ms), hop 160 (10 ms), centred with reflect
    padding, 64 HTK mel bands over 0-8000 Hz with unit-peak triangles (no area normalisation);
    T = S // 160 + 1 frames;
  - decibels 10 log10(max(x, 1e-10)) floored at 120 dB below each item's peak;
  - BatchNorm over the 64 mel bands (eval-mode running statistics; the only normalisation);
  - patches of all 64 bands x 4 frames (40 ms) -> one token per patch, 25 tokens/s (T // 4, trailing
    frames dropped), plus a learned time position (252 of them) and a learned constant;
  - pre-LN transformer blocks (LayerNorm eps 1e-6, fused qkv with bias, exact GELU MLP, ratio 4) and
    a final LayerNorm.
Long inputs are cut into chunks of 252 tokens (10.08 s): each chunk runs through the blocks on its
own, positions restarting at 0, and the outputs are concatenated, as `dasheng` 0.0.9 does; a last
partial chunk runs unpadded. (Older upstream code and the Hugging Face port zero-pad the last chunk
to 10.08 s instead, which changes its outputs.)

Hidden states (`layers="all"`, depth + 1 of them, each (B, T // 4, D) at 25 Hz): [0] the patch
embeddings with positions, [i] the output of block i for i < depth, [depth] the final LayerNorm of
the last block's output -- what upstream returns, and the recommended layer (HEAR and upstream's
README mean-pool it). The un-normed output of the last block is not exposed on its own.

Differences from upstream, by design:
  - top_db is applied per item; torchaudio's AmplitudeToDB takes one peak over the whole batch, so
    upstream's output for an item depends on what it is batched with (only when the batch spans more
    than 120 dB). Called with one item at a time the two agree.
  - items of a batch shorter than the batch are computed as if alone (their own reflect padding and
    peak, their padding masked out of attention): token k is valid when k < (S // 160 + 1) // 4.
    Upstream, given a zero-padded batch and `x_length`, runs the STFT over the padding and keeps
    floor(S / 640) tokens.
  - `embed()` cuts long audio into windows of `context_seconds` (60.48 s = 6 chunks, no overlap), so
    its windows hold whole upstream chunks, but each window's mel spectrogram sees only its own samples: the frames
    whose 32 ms STFT window crosses a window boundary (two at a window's start, one at its end) use
    reflect padding where upstream's one pass sees the neighbouring audio. Those frames change the first and last token of each window and,
    through attention, the rest of its chunk slightly. Six chunks per window make these boundaries
    rare at little cost (chunks run independently, so memory grows only linearly); clips up to
    60.48 s and `forward_features` on a whole clip are exact.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from musicssl.audio.frontends import AmplitudeToDB, MelSpectrogram
from musicssl.convert import read_checkpoint
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.base import Encoder, init_args
from musicssl.models.layers import Block
from musicssl.registry import ModelSpec, register_family, register_model

CITATION = (
    "@inproceedings{dinkel2024dasheng,\n"
    "  title={Scaling up masked audio encoder learning for general audio classification},\n"
    "  author={Dinkel, Heinrich and Yan, Zhiyong and Wang, Yongqing and Zhang, Junbo and Wang, Yujun and Wang, Bin},\n"
    "  booktitle={Interspeech},\n"
    "  year={2024}\n"
    "}"
)

SAMPLE_RATE = 16000  # upstream hard-codes it in its mel front-end
# embed() windows hold this many upstream chunks: window edges (where the mel frames see reflect
# padding instead of the neighbouring audio) then come every 60.48 s instead of every 10.08 s.
CHUNKS_PER_WINDOW = 6
BASE = dict(embed_dim=768, depth=12, num_heads=12)

# Front-end buffers of upstream checkpoints (torchaudio's MelSpectrogram keeps them in its state
# dict); they are recomputed here, so a checkpoint's copy is compared with ours and dropped.
_FRONT_END_KEYS = ("front_end.0.spectrogram.window", "front_end.0.mel_scale.fb")


@register_family("dasheng")
class Dasheng(Encoder):
    """Dasheng encoder. wav (B, S) at 16 kHz -> depth + 1 hidden states, each (B, T, embed_dim) at 25 Hz.

    Args:
        embed_dim, depth, num_heads, mlp_ratio: the transformer (base: 768, 12, 12, 4).
        n_fft, win_length, hop_length: STFT sizes in samples at 16 kHz.
        n_mels, f_min, f_max: HTK mel bands (Hz).
        top_db: dB kept below each item's peak.
        patch_frames: mel frames per token (a token spans all n_mels bands).
        target_length: mel frames per chunk the blocks see at once (1008 = 252 tokens = 10.08 s);
            also the number of learned time positions, target_length // patch_frames.
        context_seconds: windows of `embed()`; default `CHUNKS_PER_WINDOW` chunks (6 x 10.08 s).
        overlap_seconds: overlap of `embed()` windows; 0 keeps them on upstream's chunk grid.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        n_fft: int = 512,
        win_length: int = 512,
        hop_length: int = 160,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float = 8000.0,
        top_db: float = 120.0,
        patch_frames: int = 4,
        target_length: int = 1008,
        context_seconds: float | None = None,
        overlap_seconds: float = 0.0,
    ) -> None:
        super().__init__()
        if target_length < patch_frames:
            raise ValueError(f"target_length ({target_length}) must hold at least one patch of {patch_frames} frames")
        self.args = init_args(locals())
        self.sample_rate, self.mel_hop, self.patch_frames = SAMPLE_RATE, hop_length, patch_frames
        self.hop_length = hop_length * patch_frames
        # A token covers frames 4t..4t+3, centred on samples 160 * (4t + 1.5).
        self.frame_offset = (patch_frames - 1) / 2 * hop_length
        self.chunk_tokens = target_length // patch_frames
        self.context_seconds = context_seconds or CHUNKS_PER_WINDOW * self.chunk_tokens * self.hop_length / SAMPLE_RATE
        self.overlap_seconds = overlap_seconds
        self.embed_dim, self.num_layers = embed_dim, depth + 1
        # Reflect padding needs more than n_fft // 2 samples; an item needs a whole patch of frames.
        self.min_samples = max((patch_frames - 1) * hop_length, n_fft // 2 + 1)

        self.frontend = MelSpectrogram(
            SAMPLE_RATE, n_fft=n_fft, hop_length=hop_length, win_length=win_length, n_mels=n_mels,
            f_min=f_min, f_max=f_max, power=2.0, htk=True, norm=None, center=True, pad_mode="reflect",
        )
        self.to_db = AmplitudeToDB("power", ref=1.0, amin=1e-10, top_db=top_db)
        self.init_bn = nn.BatchNorm1d(n_mels, momentum=0.01)
        self.patch_embed = nn.Conv2d(1, embed_dim, kernel_size=(n_mels, patch_frames), stride=(n_mels, patch_frames))
        self.time_pos_embed = nn.Parameter(torch.randn(1, self.chunk_tokens, embed_dim) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(_init_weights)

    # --- front-end ----------------------------------------------------------------------------
    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(torch.div(lengths, self.mel_hop, rounding_mode="floor") + 1, self.patch_frames,
                         rounding_mode="floor")

    def log_mel(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """wav (B, S) -> mel dB (B, n_mels, S // hop + 1), float32; each item computed on its own
        `lengths` samples (as if alone), zero past its frames; items too short for a token stay zero."""
        wav = wav.float()
        B, S = wav.shape
        n = lengths.tolist()
        if all(k == S for k in n) and S >= self.min_samples:
            return self.to_db(self.frontend(wav))
        out = wav.new_zeros(B, self.frontend.n_mels, S // self.mel_hop + 1)
        for i, k in enumerate(n):
            if k >= self.min_samples:
                mel = self.to_db(self.frontend(wav[i, :k]))
                out[i, :, : mel.shape[-1]] = mel
        return out

    def normalize(self, mel: torch.Tensor) -> torch.Tensor:
        """BatchNorm over the mel bands, (B, n_mels, T); in eval mode computed in float32 whatever
        the model's dtype."""
        bn = self.init_bn
        if self.training:
            return bn(mel.to(bn.weight.dtype))
        return F.batch_norm(mel, bn.running_mean.float(), bn.running_var.float(), bn.weight.float(),
                            bn.bias.float(), False, 0.0, bn.eps)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised mel (B, n_mels, T) -> tokens (B, T // patch_frames, D), without positions."""
        w = self.patch_embed.weight
        return self.patch_embed(x[:, None].to(w.dtype)).flatten(2).transpose(1, 2)

    # --- transformer --------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, n_valid: torch.Tensor) -> list[torch.Tensor]:
        """tokens (B, N, D), valid tokens per item (B,) -> every hidden state (B, N, D), the chunks of
        `chunk_tokens` run independently (all full chunks in one batch, then the partial one)."""
        B, N, D = tokens.shape
        C = self.chunk_tokens
        n_full, rest = divmod(N, C)
        parts = []
        if n_full:
            x = tokens[:, : n_full * C].reshape(B * n_full, C, D)
            starts = torch.arange(n_full, device=tokens.device) * C
            valid = (n_valid[:, None] - starts[None, :]).clamp(0, C).reshape(-1)
            parts.append([h.reshape(B, n_full * C, D) for h in self._chunk(x, valid)])
        if rest:
            parts.append(self._chunk(tokens[:, n_full * C :], (n_valid - n_full * C).clamp(0, rest)))
        hidden = [torch.cat(layer, dim=1) if len(layer) > 1 else layer[0] for layer in zip(*parts)]
        if bool((n_valid < N).any()):
            keep = (torch.arange(N, device=tokens.device)[None, :] < n_valid[:, None])[:, :, None]
            hidden = [torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device)) for h in hidden]
        return hidden

    def _chunk(self, x: torch.Tensor, n_valid: torch.Tensor) -> list[torch.Tensor]:
        """One chunk per row, x (R, L, D) with L <= chunk_tokens; n_valid (R,) -> depth + 1 states."""
        L = x.shape[1]
        x = x + self.time_pos_embed[:, :L].to(x.dtype)
        x = x + self.freq_pos_embed.to(x.dtype)
        mask = None
        if bool((n_valid < L).any()):
            keys = torch.arange(L, device=x.device)[None, :] < n_valid[:, None]
            # A chunk of padding only attends everywhere: finite values, zeroed afterwards.
            mask = (keys | (n_valid == 0)[:, None])[:, None, None, :]
        hidden = [x]
        for blk in self.blocks:
            x = blk(x, mask)
            hidden.append(x)
        hidden[-1] = self.norm(x)
        return hidden

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        n_valid = self.frame_lengths(lengths)
        N = int(self.frame_lengths(torch.tensor(wav.shape[-1])))
        if N == 0:
            empty = wav.new_zeros(wav.shape[0], 0, self.embed_dim, dtype=self.patch_embed.weight.dtype)
            return [empty] * self.num_layers
        tokens = self.patchify(self.normalize(self.log_mel(wav, lengths)))
        return self.encode(tokens, n_valid)

    # --- upstream weights ---------------------------------------------------------------------
    def load_upstream(self, files: dict[str, Any]) -> None:
        """Upstream weights: the Hugging Face `model.safetensors` (keys under ``encoder.``, with its
        `config.json`) or the Zenodo `dasheng_base.pt` (``{"model": state_dict, "config": ...}``),
        whatever the file is called."""
        weights = [Path(p) for name, p in files.items() if name != "config.json"]
        if len(weights) != 1:
            raise ReleaseFormatError(f"expected one Dasheng weights file besides config.json, got {sorted(files)}")
        path = weights[0]
        state, config = _read_weights(path)
        if "config.json" in files:
            config_path = Path(files["config.json"])
            try:
                hf_config = json.loads(config_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ReleaseFormatError(f"cannot read {config_path}: {err}") from err
            _check_config(self, hf_config.get("encoder_kwargs", {}), config_path)
        if config is not None:
            _check_config(self, config, path)
        try:
            state = checkpoint_filter_fn(state, self)
        except ReleaseFormatError as err:
            raise ReleaseFormatError(f"{path}: {err}") from err
        load_state_strict(self, state, where=str(path))


def _init_weights(m: nn.Module) -> None:
    # Upstream's initialisation (xavier-uniform linears); it matters only for training from scratch.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, upstream config or None) from a safetensors file or a torch checkpoint,
    told apart by content (`musicssl convert` may hand the Zenodo .pt under another name)."""

    with open(path, "rb") as f:
        head = f.read(1)
    if zipfile.is_zipfile(path) or head == b"\x80":  # torch zip, or a legacy pickle
        dump = read_checkpoint(path)
        if isinstance(dump, Mapping) and isinstance(dump.get("model"), Mapping):
            config = dump.get("config")
            return dict(dump["model"]), dict(config) if isinstance(config, Mapping) else None
        if isinstance(dump, Mapping) and all(isinstance(v, torch.Tensor) for v in dump.values()):
            return dict(dump), None
        raise ReleaseFormatError(
            f"{path} is a torch checkpoint but neither Dasheng's {{'model': state_dict, 'config': ...}} "
            "nor a plain state dict"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path)), None
    except (OSError, SafetensorError) as err:
        raise ReleaseFormatError(
            f"cannot read {path} as safetensors or as a torch checkpoint: {err}. Is it Dasheng's "
            "model.safetensors (Hugging Face) or dasheng_*.pt (Zenodo)?"
        ) from err


def _check_config(model: Dasheng, config: Mapping[str, Any], where: Path) -> None:
    """Refuse an upstream config (encoder kwargs) that describes another architecture."""
    a = model.args
    expected: dict[str, Any] = {
        "embed_dim": a["embed_dim"], "depth": a["depth"], "num_heads": a["num_heads"],
        "mlp_ratio": a["mlp_ratio"], "n_fft": a["n_fft"], "win_size": a["win_length"],
        "hop_size": a["hop_length"], "n_mels": a["n_mels"], "f_min": a["f_min"], "f_max": a["f_max"],
        "top_db": a["top_db"], "target_length": a["target_length"],
        "patch_size": [a["n_mels"], a["patch_frames"]], "patch_stride": [a["n_mels"], a["patch_frames"]],
        "pooling": "mean", "qkv_bias": True, "center": True, "init_values": None,
    }
    wrong = []
    for key, want in expected.items():
        if key not in config:
            continue
        got = config[key]
        got = list(got) if isinstance(got, (list, tuple)) else got
        same = got == want or (isinstance(got, (int, float)) and isinstance(want, (int, float))
                               and not isinstance(got, bool) and math.isclose(got, want))
        if key == "init_values":
            same = not got
        if not same:
            wrong.append(f"{key}={got!r} (this model: {want!r})")
    if wrong:
        raise ReleaseFormatError(f"{where} describes another Dasheng architecture: {', '.join(wrong)}")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: Dasheng) -> dict[str, torch.Tensor]:
    """Upstream Dasheng state dict (`dasheng` 0.0.9 `AudioTransformerMAE_Encoder`, the Zenodo
    checkpoint's ``model``, or the Hugging Face safetensors with its ``encoder.`` prefix) -> ours.

    The front-end buffers (window, mel filterbank) are checked against `model`'s and dropped; BN
    (``init_bn.1``), patch embedding (``patch_embed.proj``) and MLP (``fc1``/``fc2``) are renamed;
    the positions go from (1, D, 1, T) / (1, D, 1, 1) to token-major (1, T, D) / (1, 1, D).
    Keys for features this port lacks (a CLS token, LayerScale) are left in, so loading refuses them.
    """
    state = dict(state_dict)
    if state and all(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items()}
    ours = {
        _FRONT_END_KEYS[0]: model.frontend.spectrogram.window,
        _FRONT_END_KEYS[1]: model.frontend.fb.T,
    }
    for key, mine in ours.items():
        if key not in state:
            continue
        theirs = state.pop(key).float().cpu()
        mine = mine.float().cpu()
        if theirs.shape != mine.shape or not torch.allclose(theirs, mine, rtol=0.0, atol=1e-4):
            diff = f"max difference {float((theirs - mine).abs().max()):.3g}" if theirs.shape == mine.shape else (
                f"shape {tuple(theirs.shape)} vs {tuple(mine.shape)}")
            raise ReleaseFormatError(
                f"the checkpoint's front-end buffer {key} does not match this model's STFT/mel settings ({diff})"
            )
    out = {}
    for key, value in state.items():
        if key.startswith("init_bn.1."):
            key = "init_bn." + key[len("init_bn.1."):]
        elif key.startswith("patch_embed.proj."):
            key = "patch_embed." + key[len("patch_embed.proj."):]
        elif key == "time_pos_embed" and value.dim() == 4:
            value = value.flatten(2).transpose(1, 2)  # (1, D, 1, T) -> (1, T, D)
        elif key == "freq_pos_embed" and value.dim() == 4:
            value = value.flatten(2).transpose(1, 2)  # (1, D, F, 1) -> (1, F, D)
        elif key.startswith("blocks.") and ".mlp.fc" in key:
            key = key.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")
        out[key] = value.contiguous()
    return out


@register_model(ModelSpec(
    name="dasheng-base",
    family="dasheng",
    sample_rate=SAMPLE_RATE,
    frame_rate=25.0,
    embed_dim=768,
    num_layers=13,
    recommended_layer=-1,
    context_seconds=60.48,
    weights="hf-hub:mispeech/dasheng-base",
    revision="083f870225fd3a097059cb354f58c0ebb290cfe6",
    files={
        "model.safetensors": "adaa439ebec13933501242364a29b7912c2695d0354061b278c873438b2736c3",
        "config.json": None,
    },
    license="Apache-2.0",
    source="https://github.com/XiaoMi/dasheng",
    citation=CITATION,
    description=(
        "Dasheng base (86M): MAE-trained ViT on 64-band mel patches of general audio (speech, music, "
        "sound; 272k h), 768-d at 25 Hz, 10.08 s chunks; 13 layers, the last (final LayerNorm) recommended."
    ),
    args=dict(BASE),
    upstream=True,
))
def dasheng_base(**kwargs: Any) -> Dasheng:
    return Dasheng(**{**BASE, **kwargs})
