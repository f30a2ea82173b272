"""Music2Latent port vs upstream's music2latent 0.1.8 (random weights, float32, CPU).

The reference is upstream's `models.Encoder` (its only size: hparams are module constants) run
through upstream's own `inference.encode_audio_inference`, which crops, computes the compressed
STFT and divides the latent by 0.06. `EncoderDecoder()` is never built: it downloads the weights.
Upstream zero-initialises every residual `conv2` and attention `out_proj`, so the reference is
re-randomised before its state dict goes through `checkpoint_filter_fn`.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from musicssl.convert import read_checkpoint
from musicssl.errors import ReleaseFormatError
from musicssl.models.music2latent import (
    TINY, CompressedSTFT, Music2Latent, checkpoint_filter_fn, numpy_scalar_globals,
)
from references import padded, randomize_, rel_err, require
from upstream_hub import load_through_hub

SR = 44100
TOL = 1e-5


def _upstream() -> types.ModuleType:
    require("music2latent")
    import music2latent.inference

    return music2latent


def _reference_encoder(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = _upstream().models.Encoder()
    return randomize_(encoder, seed=seed).eval()


def _reference_encode(encoder: nn.Module, wav: torch.Tensor | np.ndarray, extract_features: bool,
                      max_seconds: float = 60.0) -> torch.Tensor:
    """Upstream's encode path on (C, S) audio -> (C, T, D): each channel an item, as upstream."""
    gen = nn.Module()
    gen.encoder = encoder
    device = str(wav.device) if isinstance(wav, torch.Tensor) else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast(device_type="cuda") on a CPU-only torch warns
        out = _upstream().inference.encode_audio_inference(
            wav, types.SimpleNamespace(gen=gen), int(SR * max_seconds), 1, device=device,
            extract_features=extract_features)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _decoder_keys() -> tuple[str, ...]:
    """Every key of upstream's consistency model outside `encoder.` (built on the meta device)."""
    with torch.device("meta"):
        unet = _upstream().models.UNet()
    return tuple(k for k in unet.state_dict() if not k.startswith("encoder."))


def _upstream_format(encoder: nn.Module) -> dict[str, Any]:
    """What `music2latent.pt` holds (inferred from upstream's loader and the Hub's pickle scan): the
    whole consistency model's state under `gen_state_dict` plus numpy scalars. The decoder side is
    represented by every real key name with a 1-element tensor (it is dropped on load)."""
    state = {k: torch.zeros(1) for k in _decoder_keys()}
    state.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    return {"gen_state_dict": state, "it": np.int64(321000), "best_loss": np.float32(0.0123)}


def _converted(encoder: nn.Module, output: str, **kwargs: Any) -> Music2Latent:
    ours = Music2Latent(output=output, **kwargs).eval()
    ours.load_state_dict(checkpoint_filter_fn(_upstream_format(encoder), output=output), strict=True)
    return ours


def _music(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * rng.uniform(80, 900) * k * t) / k for k in range(1, 5))
    return (0.2 * x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def ref() -> nn.Module:
    return _reference_encoder()


# --- numerical parity --------------------------------------------------------------------------
def test_frontend_matches_upstream():
    audio = _upstream().audio
    x = torch.from_numpy(np.stack([_music(0.4, 1), np.zeros(int(0.4 * SR), np.float32)]))
    n = 4096 * 3 + 1536
    ref_spec = audio.to_representation_encoder(x[:, :n])
    ours = CompressedSTFT()(x[:, :n])
    assert ours.shape == ref_spec.shape == (2, 2, 1024, 24)
    err = rel_err(ours[0], ref_spec[0])
    print(f"music2latent compressed STFT rel err {err:.2e}")
    assert err < TOL
    assert (ours[1] == 0).all() and (ref_spec[1] == 0).all()  # silence: no NaN from the phase


@pytest.mark.parametrize("output", ["features", "latent"])
def test_every_output_matches_upstream_on_a_padded_batch(ref, output):
    """Two items of different lengths in one padded batch, each against upstream alone."""
    ours = _converted(ref, output)  # every key of upstream's UNet through the filter, strictly
    assert sum(p.numel() for p in ours.parameters()) == {"features": 5_729_152, "latent": 16_261_568}[output]
    items = [_music(0.45, 2), _music(0.2, 3)]
    wav, lengths = padded(items)
    with torch.inference_mode():
        got = ours.forward_features(wav, lengths)
    assert len(got) == ours.num_layers == 1
    for i, x in enumerate(items):
        expected = _reference_encode(ref, x, extract_features=output == "features")[0]
        n = int(ours.frame_lengths(lengths[i : i + 1])[0])
        assert expected.shape == (n, ours.embed_dim)
        err = rel_err(got[0][i, :n], expected)
        print(f"music2latent {output}: item {i} ({n} frames) rel err {err:.2e}")
        assert err < TOL
        assert (got[0][i, n:] == 0).all()


# --- loading upstream's file -------------------------------------------------------------------
class _Numpy1Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Names numpy's scalar reconstructor `numpy.core.multiarray.scalar`, as numpy 1.x wrote
    upstream's file (2024); numpy 2 writes `numpy._core.multiarray.scalar`."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is numpy_scalar_globals()[0][0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _upstream_bytes(checkpoint: dict[str, Any], numpy1: bool = True) -> bytes:
    buf = io.BytesIO()
    module = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="pickle") if numpy1 else pickle
    torch.save(checkpoint, buf, pickle_module=module)
    return buf.getvalue()


@pytest.mark.parametrize("numpy1", [True, False])
def test_numpy_scalars_read_with_weights_only(tmp_path, numpy1):
    path = tmp_path / "music2latent.pt"
    path.write_bytes(_upstream_bytes({"gen_state_dict": {"encoder.w": torch.ones(2)}, "it": np.int64(7),
                                      "loss": np.float32(0.5)}, numpy1=numpy1))
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert ("numpy.core.multiarray.scalar" if numpy1 else "numpy._core.multiarray.scalar") in names
    with pytest.raises(ReleaseFormatError, match="music2latent.pt"):
        read_checkpoint(path)  # weights_only=True refuses numpy globals that are not allowed
    ckpt = read_checkpoint(path, allow=numpy_scalar_globals())
    assert ckpt["it"] == 7 and ckpt["loss"] == np.float32(0.5)
    torch.testing.assert_close(ckpt["gen_state_dict"]["encoder.w"], torch.ones(2))


def test_registry_names_load_upstream_file_through_the_hub(ref, fake_hub, monkeypatch):
    data = _upstream_bytes(_upstream_format(ref))
    x = _music(0.4, 4)
    for name, features in (("music2latent", True), ("music2latent-latent", False)):
        first, second = load_through_hub(fake_hub, monkeypatch, name, files={"music2latent.pt": data})
        expected = _reference_encode(ref, x, extract_features=features)[0]
        for enc in (first, second):
            out = enc.embed(x, sr=SR)
            assert out.frames.shape == (1, *expected.shape)
            err = rel_err(out.frames[0], expected)
            print(f"{name} through the fake Hub, embed(): rel err {err:.2e}")
            assert err < TOL
        assert second.args["output"] == ("features" if features else "latent")


def _tiny_checkpoint(tmp_path, edit: Callable[[dict], None] | None = None):
    torch.manual_seed(0)
    state = {f"encoder.{k}": v for k, v in Music2Latent(output="latent", **TINY).state_dict().items()}
    state["decoder.conv_inp.weight"] = torch.zeros(1)
    ckpt = {"gen_state_dict": state, "it": np.int64(1)}
    if edit:
        edit(ckpt)
    path = tmp_path / "music2latent.pt"
    path.write_bytes(_upstream_bytes(ckpt))
    return {"music2latent.pt": path}


def test_tiny_checkpoint_loads_for_both_outputs(tmp_path):
    files = _tiny_checkpoint(tmp_path)
    for output in ("features", "latent"):
        Music2Latent(output=output, **TINY).load_upstream(files)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["gen_state_dict"].pop("encoder.conv_inp.bias"), r"missing \['conv_inp.bias'\]"),
        (lambda c: c["gen_state_dict"].__setitem__("ema.encoder.conv_inp.bias", torch.zeros(1)), "ema.encoder"),
        (lambda c: c.__setitem__("gen_state_dict", {}) or c.pop("gen_state_dict"), "no 'gen_state_dict'"),
        (lambda c: c["gen_state_dict"].__setitem__("encoder.gain.scale", torch.ones(3)), "shape"),
    ],
    ids=["missing", "unknown", "no-gen-state", "shape"],
)
def test_bad_checkpoints_are_refused_naming_the_file(tmp_path, edit, match):
    files = _tiny_checkpoint(tmp_path, edit)
    with pytest.raises(ReleaseFormatError, match=match) as err:
        Music2Latent(output="latent", **TINY).load_upstream(files)
    assert "music2latent.pt" in str(err.value)


# --- lengths and windows (tiny network: the numbers are not upstream's here) -------------------
def test_frames_timestamps_and_short_items():
    enc = Music2Latent(output="latent", **TINY).eval()
    assert enc.frame_rate == pytest.approx(10.7666, abs=1e-4) and enc.frame_offset == 2816
    lengths = torch.tensor([1, 5631, 5632, 9727, 9728, 44100])
    assert enc.frame_lengths(lengths).tolist() == [1, 1, 1, 1, 2, 10]
    out = enc.embed([np.full(n, 0.1, np.float32) for n in (1, 3000, 9728)], sr=SR)
    assert out.lengths.tolist() == [1, 1, 2] and torch.isfinite(out.frames).all()


@pytest.mark.parametrize("extra", [1536, 1537, 5632, 5633, 9000])
def test_windows_cover_every_frame_once(extra):
    """Windows of 3 frames sharing one frame's samples: any remainder gives whole frames, and each
    window's kept frames are that window encoded alone."""
    ctx, ov = (3 * 4096 + 1536) / SR, 5632 / SR
    enc = Music2Latent(output="latent", **{**TINY, "context_seconds": ctx, "overlap_seconds": ov}).eval()
    W, step, trim = enc.window_plan()
    assert (W, step, trim) == (13824, 2 * 4096, 0)
    x = _music((2 * step + extra) / SR, 5)[: 2 * step + extra]
    out = enc.embed(x, sr=SR, batch_size=2)
    assert out.lengths.tolist() == enc.frame_lengths(torch.tensor([len(x)])).tolist()
    start = 0
    with torch.inference_mode():
        while True:  # the windows of Encoder.plan_windows
            last = start + W >= len(x)
            seg = torch.from_numpy(x[start : start + W])[None]
            alone = enc.forward_features(seg, torch.tensor([seg.shape[-1]]))[0][0]
            kept = alone if last else alone[: step // 4096]
            g0 = start // 4096
            torch.testing.assert_close(out.frames[0, g0 : g0 + len(kept)], kept)
            if last:
                assert g0 + len(kept) == out.lengths[0]
                break
            start += step


def test_bfloat16_backbone_keeps_a_float32_frontend():
    torch.manual_seed(0)
    enc = Music2Latent(output="features", **TINY).eval()
    x = _music(0.5, 6)
    ref_frames = enc.embed(x, sr=SR).frames
    half = Music2Latent(output="features", **TINY).eval()
    half.load_state_dict(enc.state_dict())
    half = half.to(torch.bfloat16)
    assert half.frontend.stft.window.dtype == torch.float32
    assert rel_err(half.embed(x, sr=SR).frames, ref_frames) < 0.05


# --- benchmark pair ----------------------------------------------------------------------------
def make_pair(full: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor],
                                   torch.Tensor]:
    """(ours, reference, wav (1, S)) for bench/parity_speed.py: the released architecture (upstream
    has no other size) with random weights, features output, on 10 s (`full`) or 1 s of audio.
    Both callables take the wav and return (1, T, 8192) on its device."""
    ref = _reference_encoder()
    ours = _converted(ref, "features")
    wav = torch.from_numpy(_music(10.0 if full else 1.0, 7))[None]

    def run_ours(x: torch.Tensor) -> torch.Tensor:
        ours.to(x.device)
        with torch.inference_mode():
            return ours.forward_features(x, torch.full((x.shape[0],), x.shape[-1], device=x.device))[0]

    def run_ref(x: torch.Tensor) -> torch.Tensor:
        return _reference_encode(ref.to(x.device), x, extract_features=True)

    return run_ours, run_ref, wav
