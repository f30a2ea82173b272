"""PESTO against upstream (pesto-pitch 2.0.1, its released `mir-1k_g7` model) on real audio.

The reference is the installed package, run as its `predict()` runs it; its CLI's `torchaudio.load`
is the only use of torchaudio, so a bare module stands in while it is imported. Our `pesto-mir1k`
is converted from the real checkpoint the package ships (read through `importlib.resources`, served
on the loopback fake Hub inside a wheel-shaped zip), never from the network.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.resources
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile as sf
import torch
from references import randomize_, rel_err, require, stub_module
from upstream_hub import load_through_hub

import musicssl
from musicssl import convert
from musicssl.audio.io import resample
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models import pesto as ours_mod
from musicssl.registry import model_info

NAME = "pesto-mir1k"
WHEEL = "pesto_pitch-2.0.1-py3-none-any.whl"
G7_SHA256 = "16c32e06ddd950e3e4866dfa3c7f8a87c4988f8adf43e57977b189f031f26f3e"
CLIP = Path(__file__).parent / "data" / "piano_note.flac"  # 4 s, 16 kHz, MIDI 70 (466.16 Hz)
TOL = 1e-5


def upstream() -> Any:
    """The pesto package, imported with a bare `torchaudio` (removed again if it was not there)."""
    if "pesto" in sys.modules:
        return sys.modules["pesto"]
    stubbed = "torchaudio" not in sys.modules
    if stubbed:
        stub_module("torchaudio")
    try:
        return require("pesto")
    finally:
        if stubbed:
            sys.modules.pop("torchaudio", None)


def checkpoint_path(name: str = "mir-1k_g7.ckpt") -> Path:
    upstream()
    return Path(str(importlib.resources.files("pesto") / "weights" / name))


def wheel_bytes() -> bytes:
    """A zip laid out as the pesto-pitch wheel: the real checkpoint at `pesto/weights/mir-1k_g7.ckpt`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pesto_pitch-2.0.1.dist-info/WHEEL", "Wheel-Version: 1.0\n")
        z.writestr(ours_mod.WHEEL_MEMBER, checkpoint_path().read_bytes())
        z.writestr("pesto/__init__.py", "")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model() -> ours_mod.PESTO:
    """pesto-mir1k converted from the real checkpoint (bare .ckpt path, as `musicssl convert` passes it)."""
    return convert.convert_files(model_info(NAME), {WHEEL: checkpoint_path()})


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    assert sf.info(CLIP).samplerate == 16000
    return on_clip()[0]


def predict(x: torch.Tensor, sr: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's (f0 Hz, confidence, activations) as its `pesto.predict` gives them."""
    _, f0, conf, act = upstream().predict(x, sr)
    return f0, conf, act


@functools.cache
def on_clip(sr: int = 16000, samples: int | None = None) -> tuple[torch.Tensor, ...]:
    """(the first `samples` of the clip at 16 kHz, resampled to `sr`, then upstream's f0, confidence
    and activations on it); computed once per session."""
    x = sf.read(CLIP, dtype="float32")[0][:samples]
    x = torch.from_numpy(resample(x, 16000, sr))
    return (x, *predict(x, sr))


# --------------------------------------------------------------------------------------------------
# The checkpoint


def test_checkpoint_reads_without_omegaconf_and_matches_the_architecture():
    path = checkpoint_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == G7_SHA256
    had_omegaconf = "omegaconf" in sys.modules
    ckpt = ours_mod.read_upstream_checkpoint(path)
    assert had_omegaconf or "omegaconf" not in sys.modules
    assert ckpt["hparams"]["encoder"]["n_chan_layers"] == [40, 30, 30, 10, 3]
    assert ckpt["hparams"]["pitch_shift"] == {"min_steps": -16, "max_steps": 16}
    assert ckpt["hcqt_params"] == {"harmonics": [1], "fmin": 27.5, "fmax": None, "bins_per_semitone": 3,
                                   "n_bins": 251, "center_bins": True, "gamma": 7, "center": True}
    assert float(ckpt["state_dict"]["shift"]) == pytest.approx(6.678, abs=1e-3)
    enc = ours_mod.pesto_mir1k()
    ours_mod.check_upstream_config(enc, ckpt, str(path))
    assert sum(p.numel() for p in enc.parameters()) == 130_574


# --------------------------------------------------------------------------------------------------
# Parity on real audio


def test_activations_f0_and_confidence_match_upstream_at_16khz(model, clip):
    """Every frame of the 4 s piano note, the first and last included (both reflect the signal)."""
    _, f0_ref, conf_ref, act_ref = on_clip()
    layers = model.embed(clip.numpy(), sr=16000, layers="all").frames[0]
    assert layers.shape == (2, len(clip) // 160 + 1, 384) == (2, *act_ref.shape)
    assert rel_err(layers[1], act_ref) < TOL
    per_frame = (layers[1] - act_ref).norm(dim=-1) / act_ref.norm(dim=-1)
    assert float(per_frame[:8].max()) < TOL and float(per_frame[-8:].max()) < TOL  # the edge frames
    torch.testing.assert_close(layers[0].softmax(-1), layers[1])
    f0, conf = model.pitch(clip.numpy(), sr=16000)
    assert rel_err(f0[0], f0_ref) < TOL and rel_err(conf[0], conf_ref) < TOL
    assert abs(float(f0_ref[100:300].median()) - 466.16) < 1.0  # MIDI 70: the weights are the real ones


@pytest.mark.parametrize("sr, hop", [(22050, 221), (44100, 441)])
def test_pitch_runs_at_the_native_rate_as_upstream(model, sr, hop):
    """Upstream never resamples: it rebuilds its CQT for the input's rate (hop 10 ms rounded to a
    sample). `pitch()` does the same; `embed()` keeps its fixed 16 kHz contract. (2 s of the clip.)"""
    x, f0_ref, conf_ref, act_ref = on_clip(sr, 32_000)
    _, conf, act = model.frame_pitch(x, sr)
    assert act.shape == act_ref.shape == (len(x) // hop + 1, 384)
    assert rel_err(act, act_ref) < TOL and rel_err(conf, conf_ref) < TOL
    f0, conf = model.pitch(x.numpy(), sr=sr)
    assert rel_err(f0[0], f0_ref) < TOL and rel_err(conf[0], conf_ref) < TOL
    assert model.embed(x.numpy(), sr=sr).frames.shape == (1, len(resample(x.numpy(), sr, 16000)) // 160 + 1, 384)


def test_windows_chunks_and_batches_equal_upstream_in_one_pass(model):
    """embed() windows (stitched) and frame_pitch() chunks reflect only at the true ends; a shorter
    item in a batch reflects at its own end, not at the zeros after it. (2 s of the clip.)"""
    enc = copy.deepcopy(model)
    enc.context_seconds, enc.overlap_seconds = 0.8, 0.4
    x, _, _, act_ref = on_clip(16000, 32_000)
    assert rel_err(enc.embed(x.numpy(), sr=16000).frames[0], act_ref) < TOL
    assert rel_err(enc.frame_pitch(x)[2], act_ref) < TOL
    short, _, _, act_short = on_clip(16000, 12_000)
    both = model.embed([x.numpy(), short.numpy()], sr=16000, batch_size=2)
    assert rel_err(both.frames[1, : len(act_short)], act_short) < TOL
    assert (both.frames[1, len(act_short):] == 0).all()


def test_random_weights_every_hidden_state_matches(clip):
    """Upstream's PESTO with every parameter randomised (its converter path: state dict ->
    checkpoint_filter_fn -> strict load): logits and distribution, and the shift rounded half to
    even (3.5 semitones = 10.5 bins -> 10) before the roll. (With much larger random weights, e.g.
    scale 0.3, the logits differ by ~3e-5: the two VQTs agree to ~2e-7 in magnitude, but bins
    100 dB below the peak differ by up to 0.1 dB in float32, and such weights amplify it.)"""
    ref = upstream().load_model("mir-1k_g7", 10.0, sampling_rate=16000)
    randomize_(ref, seed=1)
    ref.shift.fill_(3.5)
    enc = ours_mod.pesto_mir1k().eval()
    load_state_strict(enc, ours_mod.checkpoint_filter_fn(ref.state_dict()), where="random")
    assert enc.roll_bins == 10
    x = clip[:16_000]
    logits_ref = []
    hook = ref.encoder.fc.register_forward_hook(lambda m, i, o: logits_ref.append(o))
    with torch.inference_mode():
        _, conf_ref, _, act_ref = ref(x, sr=16000)
        hidden = enc.forward_features(x[None], torch.tensor([len(x)]))
    hook.remove()
    assert rel_err(hidden[0][0], logits_ref[0].roll(-10, -1)) < TOL
    assert rel_err(hidden[1][0], act_ref) < TOL
    assert rel_err(enc.frame_pitch(x)[1], conf_ref) < TOL


# --------------------------------------------------------------------------------------------------
# Loading


def test_load_through_fake_hub_from_the_wheel(fake_hub, monkeypatch, clip):
    first, second = load_through_hub(fake_hub, monkeypatch, NAME, files={WHEEL: wheel_bytes()})
    act_ref = on_clip()[3]
    for enc in (first, second):
        assert rel_err(enc.embed(clip.numpy(), sr=16000).frames[0], act_ref) < TOL


def test_convert_cli_takes_the_bare_checkpoint(tmp_path, clip, model, caplog):
    """The checkpoint inside the pinned wheel is the pinned weights: no warning that it is another
    file, and the release records pinned: true."""
    with caplog.at_level("WARNING", logger="musicssl"):
        spec, folder = convert.convert_local("pesto", [checkpoint_path()], tmp_path / "out")
    assert spec.name == NAME and "is not the" not in caplog.text
    assert json.loads((folder / "config.json").read_text())["provenance"]["pinned"] is True
    back = musicssl.load(folder)
    for u, v in zip(back.pitch(clip.numpy(), sr=16000), model.pitch(clip.numpy(), sr=16000)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_other_architecture_and_extra_keys_are_refused(tmp_path):
    enc = ours_mod.pesto_mir1k()
    legacy = checkpoint_path("mir-1k.ckpt")  # the 2023 model: 296 bins, kernel 15
    with pytest.raises(ReleaseFormatError, match=r"mir-1k\.ckpt.*another architecture.*hcqt_params\.n_bins"):
        enc.load_upstream({WHEEL: legacy})
    ckpt = ours_mod.read_upstream_checkpoint(checkpoint_path())
    ckpt["state_dict"]["encoder.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "extra.ckpt"
    torch.save({k: ckpt[k] for k in ("state_dict", "hparams", "hcqt_params")}, bad)
    with pytest.raises(ReleaseFormatError, match=r"extra\.ckpt.*unexpected \['encoder\.extra\.weight'\]"):
        enc.load_upstream({WHEEL: bad})
    other = tmp_path / WHEEL
    other.write_bytes(wheel_bytes())
    with zipfile.ZipFile(other) as z, zipfile.ZipFile(tmp_path / "w2.whl", "w") as out:
        for n in z.namelist():
            if n != ours_mod.WHEEL_MEMBER:
                out.writestr(n, z.read(n))
    with pytest.raises(ReleaseFormatError, match=r"w2\.whl is a wheel without pesto/weights/mir-1k_g7\.ckpt"):
        enc.load_upstream({WHEEL: tmp_path / "w2.whl"})


# --------------------------------------------------------------------------------------------------
# What the weights are for


def test_synthetic_tones_read_within_50_cents(model):
    """Harmonic tones (random timbre: 3-10 partials, random decay and phases) at 45 pitches, MIDI
    40-84 plus a random detune of up to +-0.4 semitone: the median f0 of at least 95% is within
    50 cents. (bench/pesto_accuracy.py: 100% of a finer grid in three timbres.)"""
    rng = np.random.default_rng(0)
    midi = np.arange(40, 85) + rng.uniform(-0.4, 0.4, 45)
    tones = []
    for i, m in enumerate(midi):
        n = int(rng.integers(3, 11))
        amps = rng.uniform(0.3, 1.0, n) * np.arange(1, n + 1) ** -rng.uniform(0.3, 1.5)
        t = np.arange(4000) / 16000
        f = 440.0 * 2 ** ((m - 69) / 12)
        x = sum(a * np.sin(2 * np.pi * k * f * t + rng.uniform(0, 2 * np.pi)) for k, a in enumerate(amps, 1))
        tones.append((x / np.abs(x).max() * rng.uniform(0.1, 0.9)).astype(np.float32))
    f0, conf = model.pitch(tones, sr=16000)
    est = 69 + 12 * np.log2(f0[:, 5:-5].median(dim=1).values.numpy() / 440)
    assert np.mean(np.abs(est - midi) <= 0.5) >= 0.95, np.round(100 * (est - midi))
    assert float(conf[:, 5:-5].median()) > 0.5


# --------------------------------------------------------------------------------------------------
# For bench/parity_speed.py


Forward = Callable[[torch.Tensor], torch.Tensor]


def make_pair(full: bool) -> tuple[Forward, Forward, torch.Tensor]:
    """(ours, upstream, input): the real mir-1k_g7 model on both sides, one batch of real audio at
    16 kHz (the piano note, tiled to 10 s when `full`, 1 s otherwise) -> pitch distributions
    (1, T, 384). PESTO has one released size; `full` only sets the input length."""
    x, _ = sf.read(CLIP, dtype="float32")
    x = torch.from_numpy(np.tile(x, 3)[: 160_000] if full else x[:16_000])[None]
    ours = convert.convert_files(model_info(NAME), {WHEEL: checkpoint_path()})
    ref = upstream().load_model("mir-1k_g7", 10.0, sampling_rate=16000)
    lengths = torch.tensor([x.shape[-1]])

    def run_ours(wav: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ours.forward_features(wav, lengths.to(wav.device))[-1]

    def run_ref(wav: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ref.to(wav.device)(wav, sr=16000)[3]

    return run_ours, run_ref, x
