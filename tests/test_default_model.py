"""The embedded default: trained weights shipped inside the package, loaded with no name and no network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import musicssl
from musicssl import hub
from musicssl.cli import main
from musicssl.registry import DEFAULT_MODEL, model_info

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CLIPS = ["piano_note.flac", "snare_hit.flac", "soundtrack_cut.flac"]
REFERENCE = DATA / "default_model_clip_embeddings.npy"  # (3, D): CLIPS embedded by the release


@pytest.fixture(scope="module")
def default() -> musicssl.Encoder:
    return musicssl.load()


def test_load_without_a_name_is_the_bundled_default(default, monkeypatch):
    spec = model_info(DEFAULT_MODEL)
    assert default.spec.name == DEFAULT_MODEL and spec.weights == f"bundled:{DEFAULT_MODEL}"
    assert set(spec.files) == {"config.json", "model.safetensors"}  # both pinned by sha256
    # No network: the bundled folder is all it needs, even with the Hub unreachable.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert musicssl.load(offline=True).spec.name == DEFAULT_MODEL


def test_shipped_weights_are_small_fp16_and_pinned():
    folder = hub.bundled_dir(DEFAULT_MODEL)
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    for name, sha in model_info(DEFAULT_MODEL).files.items():
        assert hub.sha256_file(folder / name) == sha


def test_default_embeds_the_test_clips_as_released(default):
    """Clip embeddings of three real recordings, as the release gave them when it was made
    (fp16 weights run in float32): guards the weights, the front-end and the windowing."""
    out = default.embed([DATA / c for c in CLIPS])
    assert out.clip.shape == (3, default.embed_dim) and torch.isfinite(out.frames).all()
    np.testing.assert_allclose(out.clip.numpy(), np.load(REFERENCE), rtol=1e-3, atol=1e-4)


def test_card_reports_training_and_probes_against_the_baselines():
    card = (ROOT / "weights_cards" / f"{DEFAULT_MODEL}.md").read_text()
    assert "musicssl train" in card and "musicssl export" in card
    for row in ("| mfcc |", "| logmel |", "random init", f"| {DEFAULT_MODEL} |"):
        assert row in card, row
    assert (hub.bundled_dir(DEFAULT_MODEL) / "README.md").read_text() == card


def test_cli_embed_uses_the_default(tmp_path):
    out = tmp_path / "out"
    assert main(["embed", str(DATA / CLIPS[1]), "-o", str(out)]) == 0
    (npz,) = out.rglob("*.npz")
    with np.load(npz) as z:
        assert json.loads(str(z["metadata"]))["model"] == DEFAULT_MODEL
