"""Registry: names, filters, specs, suggestions, and the registry <-> weights_cards mapping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import musicssl
from musicssl.errors import UnknownModelError
from musicssl.factory import skip_weight_init
from musicssl.registry import canonical, model_info

CARDS = Path(__file__).resolve().parent.parent / "weights_cards"


def test_list_models_filters_on_weights_and_pattern():
    ready = musicssl.list_models()
    every = musicssl.list_models(pretrained=False)
    assert {"logmel", "mfcc"} <= set(ready)
    assert "jepa-base" in every and "jepa-base" not in ready  # no released weights yet
    assert set(ready) <= set(every)
    assert musicssl.list_models("jepa-*", pretrained=False) == ["jepa-base", "jepa-small", "jepa-tiny"]
    assert musicssl.list_models("JEPA_*", pretrained=False) == ["jepa-base", "jepa-small", "jepa-tiny"]
    # Without a wildcard, a part of the name: `musicssl list mert` found nothing.
    assert musicssl.list_models("mert") == ["mert-v1-330m", "mert-v1-95m"]
    assert musicssl.list_models("mfcc") == ["mfcc"] and musicssl.list_models("mert-v1-95m") == ["mert-v1-95m"]


@pytest.mark.parametrize("licence, nc", [
    ("CC-BY-NC-4.0", True), ("cc-by-nc-sa-4.0", True), ("CC BY-NC-ND 4.0", True), ("research, non-commercial", True),
    ("Apache-2.0", False), ("CC-BY-4.0", False), ("MIT", False), ("n/a", False), ("CC0-1.0", False),
])
def test_noncommercial_licences_are_recognised(licence, nc):
    spec = dataclasses.replace(model_info("jepa-tiny"), license=licence)
    assert spec.noncommercial is nc and spec.to_dict()["noncommercial"] is nc


@pytest.mark.parametrize("alias", ["jepa-tiny", "JEPA-TINY", "jepa_tiny", " Jepa_Tiny "])
def test_names_are_case_and_separator_insensitive(alias):
    assert model_info(alias).name == "jepa-tiny"


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownModelError) as err:
        musicssl.model_info("jepa-tinny")
    assert "'jepa-tiny'" in str(err.value) and "musicssl list" in str(err.value)


@pytest.mark.parametrize("name", musicssl.list_models(pretrained=False))
def test_spec_is_json_serialisable_and_consistent(name):
    spec = model_info(name)
    d = json.loads(json.dumps(spec.to_dict()))
    for key in ("sample_rate", "frame_rate", "embed_dim", "num_layers", "recommended_layer", "context_seconds",
                "license", "source", "revision", "files", "citation", "pretrained"):
        assert key in d
    with skip_weight_init():  # builds the released size (up to 600M parameters) without filling it
        enc = musicssl.load(name, pretrained=False)
    assert (enc.sample_rate, enc.embed_dim, enc.num_layers) == (spec.sample_rate, spec.embed_dim, spec.num_layers)
    assert enc.frame_rate == pytest.approx(spec.frame_rate)
    assert enc.context_seconds == pytest.approx(spec.context_seconds)
    assert -spec.num_layers <= spec.recommended_layer < spec.num_layers


def test_registry_and_weights_cards_are_one_to_one():
    cards = {p.stem for p in CARDS.glob("*.md")}
    names = set(musicssl.list_models(pretrained=False))
    assert cards == names, f"cards without a model: {cards - names}; models without a card: {names - cards}"
    for name in names:
        text = (CARDS / f"{name}.md").read_text()
        assert text.startswith("---\n") and f"model_name: {name}\n" in text
        for heading in ("## Model details", "## Intended use", "## Training data", "## Evaluation",
                        "## Limitations", "## Licence"):
            assert heading in text, f"{name}.md lacks {heading}"


def test_canonical():
    assert canonical("MERT_v1-95M") == "mert-v1-95m"
