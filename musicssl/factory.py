"""`load()` and `save_pretrained()`: one factory for registry names, Hub repos and release folders.

A release folder is `config.json` (family, constructor args, spec, provenance) + `model.safetensors`
+ `README.md` (the model card). The same folder on the Hub loads as `hf-hub:org/repo@rev`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Sequence

import torch

from musicssl import __version__, hub
from musicssl.devices import check_device
from musicssl.errors import OutputPathError, ReleaseFormatError, WeightsUnavailableError, first_line
from musicssl.models.base import Encoder
from musicssl.registry import DEFAULT_MODEL, ModelSpec, builder, family_class, is_registered, model_info

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def load(
    name: str | os.PathLike = DEFAULT_MODEL,
    *,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    offline: bool | None = None,
    **overrides: Any,
) -> Encoder:
    """A ready encoder in eval mode.

    name: a registry name ("jepa-base"), "hf-hub:org/repo[@revision]", or a release folder;
        default `musicssl.registry.DEFAULT_MODEL`, the embedded default.
    pretrained: False builds a registered architecture with random weights.
    device, dtype: where and in which precision the backbone runs (front-ends stay float32).
    offline: never touch the network (default: MUSICSSL_OFFLINE / HF_HUB_OFFLINE at call time).
    overrides: constructor arguments for registered architectures built with pretrained=False.
    """
    device = check_device(device)  # before any download
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"load() takes a model name, 'hf-hub:org/repo' or a release folder, not {name!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.bfloat16, not {dtype!r}")
    source = os.fspath(name)
    if not source.strip():  # Path("") is the working folder: an unset variable would load from there
        raise ValueError("load() got an empty model name (an unset variable?): give a name such as "
                         f"{DEFAULT_MODEL!r}, 'hf-hub:org/repo' or a release folder")
    if not is_registry_name(source):
        if not pretrained or overrides:  # a release is rebuilt from its own config.json
            given = ["pretrained=False"] * (not pretrained) + [f"{k}=" for k in sorted(overrides)]
            raise ValueError(f"load({source!r}, {', '.join(given)}): pretrained=False and constructor arguments apply "
                             f"only to registry names, and {source} is a release, loaded as saved. Build an "
                             "architecture with musicssl.load(NAME, pretrained=False, ...) instead.")
        _say_if_hidden(source)
        model = load_release(hub.fetch_release(source, offline=offline))
    else:
        model = _load_registered(source, pretrained, offline, overrides)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def is_registry_name(source: str) -> bool:
    """Whether `load(source)` looks it up in the registry rather than on the Hub or on disk:
    registry names never hold a path separator, so anything that does is meant as a folder. A
    folder in the working directory named like a model (`musicssl embed ... -o logmel --model
    logmel` makes one) hides the model only if it is a release (holds config.json)."""
    if source.startswith("hf-hub:") or "/" in source or os.sep in source:
        return False
    if not Path(source).is_dir():
        return True
    return is_registered(source) and not (Path(source) / "config.json").is_file()


def _say_if_hidden(source: str) -> None:
    """Warn where `source` is a registered name that a release folder in the working folder hides:
    otherwise it goes unnoticed."""
    if is_registered(source):  # registry names hold no path separator: "./name" is never one
        log.warning("using the release folder %s in the working folder, not the registered model %r of that name "
                    "(write './%s' to mean the folder, or move it)", os.path.abspath(source), source, source)


def _load_registered(name: str, pretrained: bool, offline: bool | None, overrides: dict[str, Any]) -> Encoder:
    spec = model_info(name)
    _check_overrides(spec, overrides)
    if overrides and pretrained and spec.needs_weights:
        raise ValueError(f"constructor overrides {sorted(overrides)} only apply with pretrained=False")
    if not pretrained or not spec.needs_weights:
        model = builder(spec.name)(**overrides)
        model.spec = _random_weights_spec(spec, model) if spec.needs_weights else spec
        return model
    if spec.weights is None:
        raise WeightsUnavailableError(
            f"{spec.name!r} is a registered architecture with no released weights yet. "
            f"For a randomly initialised model use musicssl.load({spec.name!r}, pretrained=False); "
            f"to get weights, train them with a musicssl recipe and load the exported folder "
            f"(musicssl.load('path/to/release')). `musicssl list` shows the models with weights."
        )
    if spec.converted:
        from musicssl.convert import load_converted

        return load_converted(spec, offline=offline)
    folder = hub.fetch_release(
        spec.weights, revision=spec.revision, files=spec.files, offline=offline,
        download_hint=f"musicssl download {spec.name}",
    )
    model = load_release(folder)
    model.spec = spec
    return model


def _random_weights_spec(spec: ModelSpec, model: Encoder) -> ModelSpec:
    """The spec of `spec`'s architecture built with random weights: no weights to name (run.json and
    releases must not pass it off as the trained model), and the shapes the overrides gave it."""
    return dataclasses.replace(
        spec, weights=None, revision=None, files={}, upstream=False, sample_rate=model.sample_rate,
        frame_rate=model.frame_rate, embed_dim=model.embed_dim, num_layers=model.num_layers,
        recommended_layer=spec.recommended_layer if spec.recommended_layer < model.num_layers else -1,
        context_seconds=model.context_seconds, args=dict(model.args),
        description=f"random weights (pretrained=False) of this architecture. {spec.description}".strip(),
    )


def _check_overrides(spec: ModelSpec, overrides: dict[str, Any]) -> None:
    """Refuse keywords that neither load() nor the architecture's constructor takes (a typo such as
    `offlin=True` would otherwise read as a constructor override)."""
    params = inspect.signature(family_class(spec.family).__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        takes = ", ".join(k for k in params if k != "self")
        raise TypeError(f"load() got unknown keyword arguments {unknown} for {spec.name!r}: load() takes pretrained, "
                        f"device, dtype and offline, and with pretrained=False the constructor arguments {takes}")


def release_info(source: str, *, offline: bool | None = None) -> dict[str, Any]:
    """What `musicssl info` shows for a release ('hf-hub:org/repo[@rev]' or a folder), read from its
    config.json alone: the weights are not downloaded."""
    _say_if_hidden(source)
    path = hub.fetch_release_config(source, offline=offline)
    config = read_config(path.parent)
    # A saved spec's own weights fields describe a registry entry, not this release: say where it is.
    shown = {k: v for k, v in config.get("spec", {}).items() if k not in _REGISTRY_ONLY}
    shown.setdefault("family", config["family"])
    shown.setdefault("args", config["args"])
    shown["release"] = source
    if source.startswith("hf-hub:"):
        shown["commit"] = path.parent.name
    shown.update({k: config[k] for k in ("musicssl_version", "provenance") if k in config})
    return shown


_REGISTRY_ONLY = ("weights", "revision", "files", "needs_weights", "upstream", "pretrained", "pinning")


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a release folder, checked for the keys `load` needs."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReleaseFormatError(f"cannot read {path}: {err}. A release folder is written by musicssl.save_pretrained().") from err
    missing = [k for k in ("family", "args") if k not in config] if isinstance(config, dict) else ["family", "args"]
    if missing:
        raise ReleaseFormatError(f"{path} lacks {missing}; it was not written by musicssl.save_pretrained()")
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ReleaseFormatError(f"{path} has format_version {config['format_version']}, newer than this musicssl "
                                 f"reads ({FORMAT_VERSION}): upgrade musicssl (pip install -U musicssl)")
    wrong = [k for k in ("args", "spec") if k in config and not isinstance(config[k], dict)]
    if wrong:
        raise ReleaseFormatError(f"{path}: {wrong} must be JSON objects; it was not written by musicssl.save_pretrained()")
    return config


def load_release(folder: str | os.PathLike) -> Encoder:
    """Rebuild the encoder a release folder describes and load its weights strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as err:
        raise ReleaseFormatError(f"cannot read {weights}: {err}. Download or export it again.") from err
    try:
        with skip_weight_init():  # the strict load below overwrites every parameter and buffer
            model: Encoder = family_class(config["family"])(**config["args"])
        spec = ModelSpec.from_dict(config["spec"]) if "spec" in config else None
    except (TypeError, ValueError) as err:  # arguments this family's constructor (or ModelSpec) does not take
        raise ReleaseFormatError(f"{folder / 'config.json'} does not describe a {config['family']!r} model this "
                                 f"musicssl builds: {err}. Export it again with musicssl.save_pretrained().") from err
    load_state_strict(model, state, where=str(weights))
    if spec is not None:
        model.spec = spec
    return model


# torch.nn.init's in-place initialisers, which nn.Linear, nn.Conv* and our families' init code call.
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)
_skipping = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_guards: dict[str, tuple[Any, Any]] = {}  # name -> (guard, the function it wraps)


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without random initialisation, in this thread only.

    Drawing random weights that a strict load then overwrites was most of `load()` for large
    models (10 of 10.2 s for omar-rq-base's 581M parameters on 2 cores). Parameters are left as
    `torch.empty` memory, so use this only where every parameter is loaded afterwards. Other
    threads building models meanwhile still initialise theirs.
    """
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            _install_init_guards()
        _patch_users += 1
    outer, _skipping.on = getattr(_skipping, "on", False), True
    try:
        yield
    finally:
        _skipping.on = outer  # a nested use leaves the outer one skipping
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                _remove_init_guards()


def _install_init_guards() -> None:
    for name in _INIT_FUNCTIONS:
        original = getattr(torch.nn.init, name)

        def guard(tensor: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> torch.Tensor:
            return tensor if getattr(_skipping, "on", False) else _original(tensor, *args, **kwargs)

        _guards[name] = (guard, original)
        setattr(torch.nn.init, name, guard)


def _remove_init_guards() -> None:
    for name, (guard, original) in _guards.items():
        if getattr(torch.nn.init, name) is guard:  # leave alone what someone else put there since
            setattr(torch.nn.init, name, original)
    _guards.clear()


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict=True), with the missing, unexpected and mis-shaped keys reported (a
    few of each, and how many) and what the file's keys start with."""
    from musicssl.convert import key_outline

    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ReleaseFormatError(f"weights in {where}: the entries {odd[:3]} are not tensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        said = "; ".join(f"{len(keys)} {what} {keys}" if len(keys) <= 3 else f"{len(keys)} {what} (e.g. {keys[:3]})"
                         for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
                         if keys)
        raise ReleaseFormatError(
            f"weights in {where} do not fit {type(model).__name__} ({len(own)} tensors): {said}; {key_outline(state)}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def check_release_out(out: Path, flag: str, inputs: Sequence[Path] = (), own: Sequence[str] = ()) -> None:
    """Refuse an output folder for a release whose files would replace others: one that holds
    anything and is not a musicssl release (a project, a Hub snapshot), or where a release file
    is one of `inputs` (converting a folder into itself), or a folder that `load()` reads weights
    from (a model's own folder in the caches or the package). `own`: names of files the caller
    writes beside a release (a run's log), which a folder may hold alone."""
    home = hub.weights_home(out)
    if home is not None:
        raise ValueError(f"{flag} {out} lies in {home}, where load() finds the weights it was given: a release "
                         "written there would replace them; give a folder of your own")
    if not out.is_dir():
        return
    for name in (*hub.RELEASE_FILES, "README.md"):  # what save_pretrained writes
        if any((out / name).exists() and os.path.samefile(out / name, p) for p in inputs):
            raise ValueError(f"{flag} {out} holds the input {out / name}, which the release would replace: "
                             "give a new folder")
    held = sorted(p.name for p in out.iterdir() if p.name not in own)
    if held and not _is_musicssl_release(out):
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"{flag} {out} holds {shown} and is not a musicssl release, so its files would be "
                         "replaced: give a new or empty folder")


def _is_musicssl_release(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "format_version" in config and "family" in config


def save_pretrained(
    encoder: Encoder, folder: str | os.PathLike, *, name: str | None = None, card: str | None = None,
    provenance: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
) -> Path:
    """Write a release folder (config.json, model.safetensors, README.md) that `load()` reads.

    dtype: store the weights in this precision (e.g. torch.float16 to halve the file); default as is.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from musicssl.bulk.outputs import TEMP_SUFFIX, make_out_dir, usual_mode

    if not isinstance(encoder, Encoder):
        raise TypeError(f"save_pretrained takes a musicssl Encoder (from musicssl.load or a recipe), not a "
                        f"{type(encoder).__name__}")
    folder = Path(folder).expanduser()
    make_out_dir(folder, "save_pretrained(folder=...)")
    spec = _release_spec(encoder, name)
    config = {
        "format_version": FORMAT_VERSION,
        "family": encoder.family,
        "args": encoder.args,
        "spec": spec.to_dict(),
        "musicssl_version": __version__,
        "provenance": provenance or {},
    }
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in encoder.state_dict().items()}
    # Each file is renamed into place: a symlink there (a Hub snapshot's) is replaced, never written
    # through, and a killed save leaves the old file whole.
    temp = folder / f".model.safetensors.{os.getpid()}{TEMP_SUFFIX}"
    try:
        save_file(state, str(temp), metadata={"format": "pt", "musicssl": __version__})
        os.chmod(temp, usual_mode())  # safetensors writes 0600: others could not load it
        os.replace(temp, folder / "model.safetensors")
    except (OSError, SafetensorError) as err:  # a full disk, said by safetensors in its own words
        raise OutputPathError(f"cannot write {folder / 'model.safetensors'}: {first_line(err)}; free space, or "
                              "give another folder") from err
    finally:
        temp.unlink(missing_ok=True)
    _write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if card is not None or not (folder / "README.md").exists():
        _write_text(folder / "README.md", card if card is not None else card_stub(spec))
    return folder


def _write_text(path: Path, text: str) -> None:
    from musicssl.bulk.outputs import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable=False)


def _release_spec(encoder: Encoder, name: str | None) -> ModelSpec:
    base = encoder.spec
    return ModelSpec(
        name=name or (base.name if base else encoder.family),
        family=encoder.family,
        sample_rate=encoder.sample_rate,
        frame_rate=encoder.frame_rate,
        embed_dim=encoder.embed_dim,
        num_layers=encoder.num_layers,
        recommended_layer=base.recommended_layer if base else -1,
        context_seconds=encoder.context_seconds,
        license=base.license if base else "unspecified",
        source=base.source if base else "musicssl",
        citation=base.citation if base else "",
        description=base.description if base else "",
        args=dict(encoder.args),
    )


def card_stub(spec: ModelSpec) -> str:
    """A model card with the house outline, to be filled in by whoever releases the weights."""
    return f"""---
library_name: musicssl
tags: [audio, music, self-supervised, musicssl]
license: other
---

# {spec.name}

## Model details
- Family: `{spec.family}`; {spec.embed_dim}-d embeddings from {spec.num_layers} layers at {spec.frame_rate:g} frames/s.
- Input: mono audio at {spec.sample_rate} Hz (musicssl resamples), windows of {spec.context_seconds:g} s.

## Intended use
Frame- and clip-level music representations: `musicssl.load("path/or/hf-hub:org/repo").embed(audio)`.

## Training data
(to be filled in)

## Evaluation
(to be filled in)

## Limitations
(to be filled in)

## Licence
Weights: {spec.license}. Code: Apache-2.0 (musicssl).
"""
