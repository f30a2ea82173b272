"""musicssl.load() end to end through the real huggingface_hub client against the loopback fake Hub:
a release made by save_pretrained, loaded by hf-hub: source and by a pinned registry name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import musicssl
from musicssl import registry
from musicssl.cli import main
from musicssl.errors import ChecksumError, WeightsNotCachedError
from musicssl.registry import ModelSpec


def release_bytes(tmp_path: Path, seed: int = 3) -> tuple[musicssl.Encoder, dict[str, bytes]]:
    torch.manual_seed(seed)
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=2)
    folder = musicssl.save_pretrained(enc, tmp_path / "release")
    return enc, {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def pinned_model(fake_hub, tmp_path):
    """Registers 'hubtest-tiny', pinned to a commit and sha256s on the fake Hub, for one test."""
    enc, files = release_bytes(tmp_path)
    commit = fake_hub.add_repo("musicssl/hubtest-tiny", files)
    spec = ModelSpec(
        name="hubtest-tiny", family="spec_vit", sample_rate=16000, frame_rate=6.25, embed_dim=192,
        num_layers=2, recommended_layer=-1, context_seconds=10.0, weights="hf-hub:musicssl/hubtest-tiny",
        revision=commit, files={n: hashlib.sha256(files[n]).hexdigest() for n in ("config.json", "model.safetensors")},
        license="apache-2.0",
    )
    registry.register_model(spec)(lambda **kw: None)
    yield enc, files, commit
    registry._MODELS.pop("hubtest-tiny")


def audio() -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(3 * 16000)).astype(np.float32)


def test_hf_hub_source_loads_the_release(fake_hub, tmp_path):
    enc, files = release_bytes(tmp_path)
    commit = fake_hub.add_repo("someone/my-jepa", files)
    loaded = musicssl.load(f"hf-hub:someone/my-jepa@{commit}")
    torch.testing.assert_close(loaded.embed(audio(), sr=16000).frames, enc.embed(audio(), sr=16000).frames)
    fake_hub.clear_requests()
    musicssl.load(f"hf-hub:someone/my-jepa@{commit}")  # pinned commit, cached: no request at all
    assert fake_hub.requests == []


def test_registry_name_downloads_once_then_loads_offline(pinned_model, fake_hub, monkeypatch):
    enc, _, _ = pinned_model
    ref = enc.embed(audio(), sr=16000).frames
    torch.testing.assert_close(musicssl.load("hubtest-tiny").embed(audio(), sr=16000).frames, ref)
    fake_hub.clear_requests()
    monkeypatch.setenv("MUSICSSL_OFFLINE", "1")
    torch.testing.assert_close(musicssl.load("hubtest-tiny").embed(audio(), sr=16000).frames, ref)
    assert fake_hub.requests == []


def test_offline_miss_names_the_download_command(pinned_model, fake_hub):
    with pytest.raises(WeightsNotCachedError) as err:
        musicssl.load("hubtest-tiny", offline=True)
    assert "musicssl download hubtest-tiny" in str(err.value)
    assert fake_hub.requests == []


def test_cli_download_then_offline_embed(pinned_model, fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUSICSSL_OFFLINE", "1")  # offline means no requests, for `download` too
    assert main(["download", "hubtest-tiny"]) == 2
    assert "offline (MUSICSSL_OFFLINE is set): unset it to download" in capsys.readouterr().err
    assert fake_hub.requests == []
    monkeypatch.delenv("MUSICSSL_OFFLINE")
    assert main(["download", "hubtest-tiny"]) == 0
    assert Path(capsys.readouterr().out.strip()).exists()
    fake_hub.stop()  # from now on any request would fail
    clip = Path(__file__).resolve().parent.parent / "examples" / "audio" / "notes" / "piano-midi46.flac"
    assert main(["embed", str(clip), "-o", str(tmp_path / "o"), "--model", "hubtest-tiny", "--offline"]) == 0
    assert (tmp_path / "o" / "piano-midi46.flac.npz").exists()


def test_weights_changed_on_the_server_are_refused(fake_hub, tmp_path):
    """A pin to a branch name plus sha256s: when the branch moves to other bytes, load refuses."""
    _, files = release_bytes(tmp_path)
    fake_hub.add_repo("musicssl/moving", files)
    pins = {n: hashlib.sha256(files[n]).hexdigest() for n in ("config.json", "model.safetensors")}
    _, other = release_bytes(tmp_path / "other", seed=4)
    fake_hub.move_ref("musicssl/moving", other)
    spec = ModelSpec(
        name="moving-tiny", family="spec_vit", sample_rate=16000, frame_rate=6.25, embed_dim=192, num_layers=2,
        recommended_layer=-1, context_seconds=10.0, weights="hf-hub:musicssl/moving", revision="main", files=pins,
    )
    registry.register_model(spec)(lambda **kw: None)
    try:
        with pytest.raises(ChecksumError) as err:
            musicssl.load("moving-tiny")
        assert pins["model.safetensors"] in str(err.value)
    finally:
        registry._MODELS.pop("moving-tiny")


def test_a_ports_upstream_repository_names_the_port_before_downloading(fake_hub):
    """hf-hub:m-a-p/MERT-v1-95M is upstream's format, which only the registered port converts."""
    for source in ("hf-hub:m-a-p/MERT-v1-95M", "hf-hub:M-A-P/mert-v1-95m@main"):
        with pytest.raises(musicssl.errors.ReleaseFormatError, match="converts them as 'mert-v1-95m'") as err:
            musicssl.load(source)
        assert "musicssl.load('mert-v1-95m')" in str(err.value)
    assert main(["download", "hf-hub:minzwon/MusicFM"]) == 2  # two ports share this repository
    assert main(["info", "hf-hub:minzwon/MusicFM"]) == 2
    assert fake_hub.requests == []


def test_info_on_a_release_reads_only_its_config(fake_hub, tmp_path, capsys):
    enc, files = release_bytes(tmp_path)
    commit = fake_hub.add_repo("someone/my-jepa", files)
    assert main(["info", "hf-hub:someone/my-jepa"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["release"] == "hf-hub:someone/my-jepa" and shown["commit"] == commit
    assert shown["family"] == "spec_vit" and shown["num_layers"] == 2 and "weights" not in shown
    paths = [path for _, path in fake_hub.requests]
    assert any(p.endswith("/config.json") for p in paths) and not any("model.safetensors" in p for p in paths)
    assert main(["info", str(tmp_path / "release")]) == 0
    assert json.loads(capsys.readouterr().out)["args"] == enc.args
    assert main(["info", str(tmp_path)]) == 2
    assert "is not a musicssl release: it lacks config.json" in capsys.readouterr().err
