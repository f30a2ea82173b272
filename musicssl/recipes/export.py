"""Turn a training run into a release folder that `musicssl.load()` reads (audiocraft's export idea):
only the encoder is kept -- for BYOL and JEPA the EMA target, as the papers evaluate it."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path
from typing import Any

import torch

from musicssl.bulk.outputs import make_out_dir, unmade_if_unused
from musicssl.factory import card_stub, check_release_out, save_pretrained
from musicssl.registry import ModelSpec
from musicssl.recipes.train import CHECKPOINT, load_checkpoint, recipe_from_checkpoint, resolve_configs

# Loop settings that say where a run lives, not how it trains: left out of the card's command.
_PLACE = ("recipe", "preset", "data", "out")


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write RUN's encoder to OUT (config.json, model.safetensors, README.md pre-filled from the run)."""
    out = Path(out).expanduser()
    ckpt = load_checkpoint(run)
    if (Path(out) / CHECKPOINT).exists():  # its config.json would become the release's
        raise ValueError(f"--out {out} is a training run (it holds {CHECKPOINT}): export into a new folder")
    check_release_out(Path(out), "--out")
    encoder = recipe_from_checkpoint(ckpt).export_encoder().eval()
    with unmade_if_unused(out):  # a release that cannot be written leaves no empty folder
        make_out_dir(Path(out), "--out")  # named as the command names it (save_pretrained would say "folder=")
        return _write_release(ckpt, encoder, out, name, dtype)


def _write_release(ckpt: dict[str, Any], encoder: Any, out: str | os.PathLike, name: str | None,
                   dtype: torch.dtype | None) -> Path:
    """save_pretrained with the run's facts as provenance and its card."""
    tcfg, rcfg = ckpt["train_config"], ckpt["recipe_config"]
    release = name or Path(out).name
    provenance = {
        "recipe": tcfg["recipe"], "preset": tcfg["preset"], "steps": ckpt["step"], "data": tcfg["data"],
        "train_config": tcfg, "recipe_config": rcfg, "train_seconds": round(ckpt["elapsed_seconds"], 1),
        "hardware": ckpt.get("hardware", "not recorded"), "trained_with": ckpt["musicssl_version"],
        "segments": ckpt.get("segments") or [[0, tcfg["steps"]]],
    }
    encoder.spec = _run_spec(encoder, release, provenance)
    folder = save_pretrained(encoder, out, name=release, provenance=provenance, dtype=dtype)
    (folder / "README.md").write_text(_card(encoder, release, provenance))
    return folder


def _run_spec(encoder: Any, name: str, prov: dict[str, Any]) -> ModelSpec:
    """The release's spec. The backbone's registry text describes an architecture (and the licence
    of weights it never had), so the run's own facts replace it; the licence is the releaser's call."""
    from musicssl.factory import _release_spec

    arch = encoder.spec.name if encoder.spec else encoder.family
    return dataclasses.replace(
        _release_spec(encoder, name), license="unspecified", citation="",
        source=f"musicssl (trained with `musicssl train {prov['recipe']}`)",
        description=f"The {arch} architecture trained with the {prov['recipe']} recipe, {prov['steps']} steps "
                    f"on {Path(str(prov['data'])).name}.",
    )


def _card(encoder: Any, name: str, prov: dict[str, Any]) -> str:
    """The house card outline with the training facts filled in."""
    from musicssl.factory import _release_spec

    card = card_stub(_release_spec(encoder, name))
    preset = f" --preset {prov['preset']}" if prov["preset"] else ""
    training = (
        f"Recipe `{prov['recipe']}` (preset `{prov['preset']}`), {prov['steps']} steps on `{prov['data']}`, "
        f"{prov['train_seconds']:g} s on {prov['hardware']}.\n\n"
        f"    musicssl train {prov['recipe']} --data {shlex.quote(str(prov['data']))}{preset} --out RUN "
        f"{train_overrides(prov)}\n"
    )
    if len(prov["segments"]) > 1:
        stretches = ", then ".join(f"steps={steps} from step {start}" for start, steps in prov["segments"])
        training += (f"\nThe run was resumed with other `steps` ({stretches}): each setting's learning-rate "
                     "schedule held from where it took over, so the command above, one run with the last "
                     "setting, gives other weights.\n")
    return card.replace("## Training data\n(to be filled in)", "## Training data\n" + training)


def train_overrides(prov: dict[str, Any]) -> str:
    """The KEY=VALUE arguments that turn the preset into the run's configuration (JSON values,
    shell-quoted), so the card's command reproduces the run."""
    tdef, rdef = resolve_configs(prov["recipe"], prov["preset"], {})
    defaults = {**dataclasses.asdict(rdef), **dataclasses.asdict(tdef)}
    used = {**prov["recipe_config"], **prov["train_config"]}
    return " ".join(
        shlex.quote(f"{k}={_arg_text(v)}") for k, v in used.items()
        if k not in _PLACE and json.dumps(v) != json.dumps(defaults.get(k))
    )


def _arg_text(value: Any) -> str:
    """A setting as `parse_overrides` reads it back: JSON, but bare where a string stays a string."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)
