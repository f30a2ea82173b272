"""musicssl.hear: the HEAR 2021 API for every registered model, held to the checks of the official
validator (hearvalidator 2021.0.2), restated here and also run as they are, in process and as its CLI."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import musicssl
from musicssl import hear, hub
from musicssl.errors import AudioInputError
from musicssl.registry import DEFAULT_MODEL
from test_embed import ARCHS, SHRINK

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path(__file__).resolve().parent / "stubs"  # tensorflow stand-in for the validator only
ALL = musicssl.list_models(pretrained=False)
# The validator's warning that frames more than 50 ms apart are coarse for transcription: true of
# most models here, and no failure.
COARSE = "ignore:We suggest a interval between timestamps"


def registered(name: str) -> hear.HearModel:
    """load_model for a registered architecture with random weights, shrunk as in test_embed (a
    shrunk model returns its last layer: its recommended layer may no longer exist)."""
    shrink = SHRINK.get(musicssl.model_info(name).family, {})
    torch.manual_seed(0)
    return hear.load_model(name=name, pretrained=False, layer=-1 if shrink else None, **shrink)


def noise(model: hear.HearModel, n_sounds: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """White noise in [-1, 1] at the model's HEAR rate, as the validator makes it: (n_sounds, S)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_sounds, int(seconds * model.sample_rate), generator=gen) * 2 - 1


@pytest.fixture(scope="module", params=ALL)
def model(request) -> hear.HearModel:
    return registered(request.param)


@pytest.fixture(scope="module")
def validator() -> ModuleType:
    """hearvalidator.validate, imported with the tensorflow stub, which is then taken off sys.path and
    out of sys.modules again so no other test sees a fake tensorflow."""
    if importlib.util.find_spec("hearvalidator") is None:
        pytest.skip("hearvalidator is not installed: pip install --no-deps -r tests/requirements-reference.txt")
    had_tf = "tensorflow" in sys.modules
    sys.path.insert(0, str(STUBS))
    try:
        return importlib.import_module("hearvalidator.validate")
    finally:
        sys.path.remove(str(STUBS))
        if not had_tf:
            sys.modules.pop("tensorflow", None)


# --- the validator's checks, restated, for every registered model -----------------------------------


def test_attributes(model):
    enc = model.encoder
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.sample_rate in hear.SAMPLE_RATES and model.sample_rate == hear.hear_sample_rate(enc.spec.sample_rate)
    assert type(model.scene_embedding_size) is int and model.scene_embedding_size == enc.embed_dim
    assert type(model.timestamp_embedding_size) is int and model.timestamp_embedding_size == enc.embed_dim


def test_timestamp_embeddings(model):
    audio = noise(model, 3, 1.5)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    enc = model.encoder
    # As many frames as the encoder makes from the audio resampled to its own rate.
    T = int(enc.frame_lengths(torch.tensor([round(audio.shape[1] * enc.sample_rate / model.sample_rate)]))[0])
    assert emb.shape == (3, T, model.timestamp_embedding_size) and ts.shape == (3, T)
    assert emb.dtype == ts.dtype == torch.float32 and emb.device == ts.device == audio.device
    assert torch.isfinite(emb).all()
    # Milliseconds at frame centres, evenly spaced, the same for every sound; within the sound.
    step = 1000 / enc.frame_rate
    diff = torch.diff(ts)
    assert torch.all((diff - diff.mean()).abs() < 1e-3)  # the validator's regularity test
    torch.testing.assert_close(diff, torch.full_like(diff, step), rtol=0, atol=1e-3)
    assert (ts == ts[:1]).all()
    assert 0 <= ts[0, 0] < step and ts[0, -1] <= 1500 + step


def test_scene_embeddings_are_the_mean_frame(model):
    audio = noise(model, 2, 1.3, seed=1)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (2, model.scene_embedding_size) and scene.dtype == torch.float32
    assert scene.device == audio.device
    emb, _ = hear.get_timestamp_embeddings(audio, model)
    torch.testing.assert_close(scene, emb.mean(1), rtol=1e-5, atol=1e-5)


def test_batch_independent_and_deterministic(model):
    audio = noise(model, 3, 1.2, seed=2)
    together, _ = hear.get_timestamp_embeddings(audio, model)
    alone, _ = hear.get_timestamp_embeddings(audio[1:2], model)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-4)
    again, _ = hear.get_timestamp_embeddings(audio, model)
    torch.testing.assert_close(together, again, rtol=0, atol=0)


# --- the official validator itself ------------------------------------------------------------------


@pytest.mark.filterwarnings(COARSE)
@pytest.mark.parametrize("name", ARCHS)
def test_official_validator_checks(validator, name):
    """ValidateModel's checks (its batches of 16 x 2 s and 8 x 3.74 s) on one model per family;
    the model is handed in because registered weights would need downloads."""
    check = validator.ValidateModel("musicssl.hear", "", device="cpu")
    check.module, check.model, check.model_type = hear, registered(name), "torch"
    check.validate_model()


@pytest.mark.filterwarnings(COARSE)
@pytest.mark.parametrize("path", ["", "release folder"])
def test_official_validator_loads_the_default(validator, path, monkeypatch):
    monkeypatch.setenv("MUSICSSL_OFFLINE", "1")  # bundled: no network either way
    folder = str(hub.bundled_dir(DEFAULT_MODEL)) if path else ""
    validator.ValidateModel("musicssl.hear", folder, device="cpu")()


def test_hear_validator_cli(validator):
    """`hear-validator musicssl.hear` as CI runs it (the same main(), through this interpreter)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STUBS), os.environ.get("PYTHONPATH", "")]),
           "MUSICSSL_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "hearvalidator.validate", "musicssl.hear", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Model sample rate is: 16000" in run.stdout and run.stdout.rstrip().endswith("Looks good!")


# --- loading, layers, sample rates, inputs --------------------------------------------------------


def test_load_model_default_and_by_path(monkeypatch):
    monkeypatch.setenv("MUSICSSL_OFFLINE", "1")
    default = hear.load_model()
    assert default.encoder.spec.name == DEFAULT_MODEL and not default.training
    assert default.layer == default.encoder.num_layers - 1  # its recommended layer is -1
    audio = noise(default, 2, 3.0)
    expected = hear.get_scene_embeddings(audio, default)
    for other in (hear.load_model(name=DEFAULT_MODEL), hear.load_model(str(hub.bundled_dir(DEFAULT_MODEL)))):
        torch.testing.assert_close(hear.get_scene_embeddings(audio, other), expected)
    with pytest.raises(ValueError, match="not both"):
        hear.load_model(str(hub.bundled_dir(DEFAULT_MODEL)), name="logmel")


def test_layer_defaults_to_the_recommended_one():
    torch.manual_seed(0)
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=3)
    enc.spec = dataclasses.replace(enc.spec, recommended_layer=1)
    audio = noise(hear.wrap(enc), 1, 2.0)
    for layer, expected in ((None, 1), (0, 0), (-1, enc.num_layers - 1)):
        model = hear.wrap(enc, layer=layer)
        assert model.layer == expected
        emb, _ = hear.get_timestamp_embeddings(audio, model)
        torch.testing.assert_close(emb, enc.embed(audio, sr=16000, layers=expected).frames)
    with pytest.raises(ValueError, match="out of range"):
        hear.wrap(enc, layer=enc.num_layers)
    enc.spec = dataclasses.replace(enc.spec, recommended_layer=7)
    with pytest.raises(ValueError, match="recommended layer 7 .* layer="):
        hear.wrap(enc)
    with pytest.raises(TypeError, match="Encoder"):
        hear.wrap(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("own, expected", [
    (16000, 16000), (22050, 22050), (44100, 44100), (48000, 48000),
    (24000, 48000), (8000, 16000), (32000, 44100), (96000, 48000),
])
def test_hear_sample_rate(own, expected):
    assert hear.hear_sample_rate(own) == expected


def test_other_rates_resample_inside():
    """A 24 kHz model takes 48 kHz audio: a tone given at 48 kHz embeds as the same tone given to
    the encoder at its own rate."""
    torch.manual_seed(0)
    enc = musicssl.load("mert-v1-95m", pretrained=False, **SHRINK["hubert"])
    model = hear.wrap(enc, layer=-1)
    assert (enc.sample_rate, model.sample_rate) == (24000, 48000)
    t48, t24 = (torch.arange(2 * sr) / sr for sr in (48000, 24000))
    tone48, tone24 = (0.3 * torch.sin(2 * torch.pi * 440 * t)[None] for t in (t48, t24))
    emb, _ = hear.get_timestamp_embeddings(tone48, model)
    ref = enc.embed(tone24, sr=24000).frames
    assert emb.shape == ref.shape
    assert (emb - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("audio, match", [
    (torch.zeros(16000), "shape \\(16000,\\)"),
    (torch.zeros(1, 1, 16000), "shape \\(1, 1, 16000\\)"),
    (torch.zeros(2, 16000, dtype=torch.int16), "torch.int16"),
    (torch.zeros(2, 16000).numpy(), "ndarray"),
    (torch.zeros(0, 16000), "no samples"),
    (torch.full((1, 16000), float("nan")), "NaN"),
])
def test_bad_audio_is_refused_clearly(audio, match):
    model = hear.wrap(musicssl.load("logmel"))
    with pytest.raises(AudioInputError, match=match):
        hear.get_timestamp_embeddings(audio, model)
    with pytest.raises(AudioInputError, match=match):
        hear.get_scene_embeddings(audio, model)


def test_many_short_sounds_are_sounds_not_channels():
    """HEAR's layout is (n_sounds, n_samples): 16 sounds of 8 samples are not (samples, channels)."""
    model = hear.wrap(musicssl.load("logmel"))
    assert hear.get_scene_embeddings(0.1 * torch.randn(16, 8), model).shape == (16, 128)


def test_model_must_come_from_load_model():
    with pytest.raises(TypeError, match="load_model"):
        hear.get_scene_embeddings(torch.zeros(1, 16000), musicssl.load("logmel"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_outputs_follow_the_audio_device():
    model = hear.wrap(musicssl.load("logmel")).to("cuda")
    audio = noise(model, 2, 1.0).cuda()
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    scene = hear.get_scene_embeddings(audio, model)
    assert emb.device == ts.device == scene.device == audio.device
    torch.testing.assert_close(scene.cpu(), hear.get_scene_embeddings(audio.cpu(), model.cpu()))
