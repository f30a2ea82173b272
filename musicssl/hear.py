"""The HEAR 2021 API (https://hearbenchmark.com/hear-api.html) over any musicssl encoder.

    from musicssl import hear
    model = hear.load_model(name="mert-v1-95m")     # or load_model("path/to/release/folder")
    frames, ms = hear.get_timestamp_embeddings(audio, model)  # audio (n_sounds, n_samples) at model.sample_rate
    scene = hear.get_scene_embeddings(audio, model)

Every registered model works: one whose own rate is not a HEAR rate declares a HEAR rate above it
(`hear_sample_rate`: 24000 Hz models take 48000 Hz audio) and resamples to its own rate inside. The official validator checks
this module: `hear-validator musicssl.hear [-m MODEL_FILE_PATH]`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from musicssl.errors import AudioInputError
from musicssl.models.base import Embeddings, Encoder
from musicssl.registry import DEFAULT_MODEL

# Input rates a HEAR model may declare, ascending. The HEAR 2021 rules also list 32000 Hz, but the
# official validator (hearvalidator 2021.0.2) rejects it, so it is never chosen.
SAMPLE_RATES = (16000, 22050, 44100, 48000)


class HearModel(nn.Module):
    """An encoder behind the HEAR API; made by `load_model` or `wrap`.

    sample_rate: Hz of the audio the HEAR functions take (one of SAMPLE_RATES): the encoder's own
        rate when allowed, else a rate above it (`hear_sample_rate`), resampled to the encoder's inside.
    scene_embedding_size, timestamp_embedding_size: D of the outputs, the encoder's embed_dim.
    layer: the hidden state returned, 0-based into `encoder.forward_features` (as `embed(layers=)`).
    """

    def __init__(self, encoder: Encoder, layer: int | None = None) -> None:
        if not isinstance(encoder, Encoder):
            raise TypeError(f"wrap() takes a musicssl Encoder (from musicssl.load), not a {type(encoder).__name__}")
        super().__init__()
        self.encoder = encoder
        self.layer = _resolve_layer(encoder, layer)
        self.sample_rate = hear_sample_rate(encoder.sample_rate)
        self.scene_embedding_size = int(encoder.embed_dim)
        self.timestamp_embedding_size = int(encoder.embed_dim)

    def extra_repr(self) -> str:
        return f"sample_rate={self.sample_rate}, layer={self.layer}"


def hear_sample_rate(sr: int) -> int:
    """The HEAR input rate (Hz) for an encoder running at `sr` Hz: `sr` when allowed; else the lowest
    allowed whole multiple of it, so resampling is plain decimation (24000 -> 48000); else the lowest
    allowed rate above it; else the highest (models above 48000 Hz get band-limited audio)."""
    if sr in SAMPLE_RATES:
        return sr
    above = [r for r in SAMPLE_RATES if r > sr]
    multiples = [r for r in above if r % sr == 0]
    return (multiples or above or [SAMPLE_RATES[-1]])[0]


def _resolve_layer(encoder: Encoder, layer: int | None) -> int:
    """`layer`, or the spec's recommended layer (the last without a spec), as a 0-based index."""
    n, spec = encoder.num_layers, encoder.spec
    if layer is None:
        layer = spec.recommended_layer if spec is not None else -1
        what = f"the recommended layer {layer} of {spec.name!r}" if spec is not None else "layer -1"
    else:
        what = f"layer={layer!r}"
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{what} is not one layer index: pass layer=... (0..{n - 1}, or -1 for the last)")
    try:
        return encoder.layer_indices(layer)[0]
    except ValueError as err:  # out of range: say which layer was asked for and how to choose another
        raise ValueError(f"{what}: {err}; pass layer=... to choose one") from err


def wrap(encoder: Encoder, layer: int | None = None) -> HearModel:
    """Any musicssl Encoder (loaded, fine-tuned or built in memory) as a HEAR model.

    The encoder is put in eval mode: HEAR embeddings must not depend on dropout.
    layer: the hidden state to return (negative counts from the end); default the model's
        recommended layer (`musicssl.model_info(name).recommended_layer`), or the last.
    """
    return HearModel(encoder, layer).eval()


def load_model(
    model_file_path: str | os.PathLike = "", name: str = DEFAULT_MODEL, *, layer: int | None = None, **kw: Any
) -> HearModel:
    """The HEAR model of a musicssl encoder, in eval mode.

    model_file_path: "" loads the registered weights of `name`. Otherwise a release folder
        (config.json + model.safetensors, as `musicssl export` and `musicssl.save_pretrained` write
        it) or anything else `musicssl.load` accepts ("hf-hub:org/repo@rev", a registry name).
        HEAR tools pass it first: `hear-validator musicssl.hear -m PATH`.
    name: a registered model (`musicssl list`), used when `model_file_path` is empty.
    layer: as in `wrap`.
    kw: passed to `musicssl.load`: device, dtype, offline; pretrained=False (with constructor
        overrides) builds a registered architecture with random weights.
    """
    from musicssl.factory import load

    path = os.fspath(model_file_path)
    if path and name != DEFAULT_MODEL:
        raise ValueError(f"give either model_file_path ({path!r}) or name ({name!r}), not both")
    return wrap(load(path or name, **kw), layer=layer)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame embeddings of each sound.

    audio: (n_sounds, n_samples) float, mono at `model.sample_rate` Hz, in [-1, 1], on any device.
    Returns embeddings (n_sounds, n_timestamps, D) float32 and timestamps (n_sounds, n_timestamps)
    float32, in milliseconds from the start of each sound to the centre of each frame; both on the
    device of `audio`.
    """
    out = _embed(audio, model, pool=None)
    ms = out.timestamps * 1000.0
    return out.frames.to(audio.device), ms.repeat(len(audio), 1).to(audio.device)


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """One embedding per sound, the mean of its frame embeddings.

    audio: (n_sounds, n_samples) float, mono at `model.sample_rate` Hz, on any device.
    Returns (n_sounds, D) float32 on the device of `audio`.
    """
    return _embed(audio, model, pool="mean").clip.to(audio.device)


def _embed(audio: torch.Tensor, model: HearModel, pool: str | None) -> Embeddings:
    """Check the HEAR inputs, then `embed()`: it resamples, windows long audio and runs the
    encoder on its own device; outputs come back on the CPU."""
    if not isinstance(model, HearModel):
        raise TypeError(f"model must come from musicssl.hear.load_model() or wrap(), not a {type(model).__name__}")
    if not isinstance(audio, torch.Tensor):
        raise AudioInputError(f"HEAR audio is a torch tensor (n_sounds, n_samples), not a {type(audio).__name__}")
    if audio.ndim != 2 or not audio.is_floating_point():
        raise AudioInputError(f"HEAR audio is a float tensor (n_sounds, n_samples) at {model.sample_rate} Hz, "
                              f"not a {audio.dtype} tensor of shape {tuple(audio.shape)}")
    if audio.numel() == 0:
        raise AudioInputError(f"HEAR audio of shape {tuple(audio.shape)} holds no samples")
    # As a list of (n_samples,) clips: the layout is given, so 16 sounds of 8 samples are not
    # taken for soundfile's (samples, channels), as a (16, 8) array given to embed() would be.
    return model.encoder.embed(list(audio), sr=model.sample_rate, layers=model.layer, pool=pool)
