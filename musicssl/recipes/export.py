"""Turn a training run into a release folder that `musicssl.load()` reads (audiocraft's export idea):
only the encoder is kept -- for BYOL and JEPA the EMA target, as the papers evaluate it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musicssl.factory import card_stub, save_pretrained
from musicssl.recipes.train import hardware, load_checkpoint, recipe_from_checkpoint


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write RUN's encoder to OUT (config.json, model.safetensors, README.md pre-filled from the run)."""
    ckpt = load_checkpoint(run)
    encoder = recipe_from_checkpoint(ckpt).export_encoder().eval()
    tcfg, rcfg = ckpt["train_config"], ckpt["recipe_config"]
    release = name or Path(out).name
    provenance = {
        "recipe": tcfg["recipe"], "preset": tcfg["preset"], "steps": ckpt["step"], "data": tcfg["data"],
        "train_config": tcfg, "recipe_config": rcfg, "train_seconds": round(ckpt["elapsed_seconds"], 1),
        "hardware": hardware(), "trained_with": ckpt["musicssl_version"],
    }
    folder = save_pretrained(encoder, out, name=release, provenance=provenance, dtype=dtype)
    (folder / "README.md").write_text(_card(encoder, release, provenance))
    return folder


def _card(encoder: Any, name: str, prov: dict[str, Any]) -> str:
    """The house card outline with the training facts filled in."""
    from musicssl.factory import _release_spec

    card = card_stub(_release_spec(encoder, name))
    overrides = " ".join(f"{k}={v}" for k, v in prov["train_config"].items()
                         if k in ("steps", "batch_size", "lr", "seed"))
    training = (
        f"Recipe `{prov['recipe']}` (preset `{prov['preset']}`), {prov['steps']} steps on `{prov['data']}`, "
        f"{prov['train_seconds']:g} s on {prov['hardware']}.\n\n"
        f"    musicssl train {prov['recipe']} --data {prov['data']} --preset {prov['preset']} --out RUN {overrides}\n"
    )
    return card.replace("## Training data\n(to be filled in)", "## Training data\n" + training)
