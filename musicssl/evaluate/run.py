"""`evaluate()`: embed a task once per model, probe the chosen layers, pick the best layer on valid."""

from __future__ import annotations

import json
import logging
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from musicssl import __version__
from musicssl.devices import check_device
from musicssl.errors import OutputPathError
from musicssl.evaluate import metrics
from musicssl.evaluate.cache import EmbeddingCache, default_cache
from musicssl.evaluate.probes import PROBES, Fit, make_problem, run_probe
from musicssl.evaluate.tasks import Task, load_task
from musicssl.models.base import Encoder, check_batch_size
from musicssl.registry import model_info

log = logging.getLogger(__name__)

ModelArg = Union[str, os.PathLike, Encoder]
RANDOM_SUFFIX = ":random"  # "jepa-tiny:random": the registered architecture at random init (seeded)


@dataclass
class ModelResult:
    """One model on one task: fits[layer][probe], and the layer each probe picked on valid."""

    model: str
    layers: list[int]
    fits: dict[int, dict[str, Fit]]
    best_layer: dict[str, int]
    embed_seconds: float

    def best(self, probe: str) -> Fit:
        return self.fits[self.best_layer[probe]][probe]


@dataclass
class EvalResult:
    """Every model's probes on one task, with the settings that made them."""

    task: dict[str, Any]
    primary: str
    models: list[ModelResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "primary": self.primary, "settings": self.settings,
                "models": [_model_dict(m) for m in self.models]}


def evaluate(
    task: str | os.PathLike | Task,
    models: ModelArg | Sequence[ModelArg],
    *,
    layers: str | int | Sequence[int] = "recommended",
    probes: Sequence[str] = PROBES,
    pool: str = "mean",
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    offline: bool | None = None,
    **task_options: Any,
) -> EvalResult:
    """Probe frozen clip embeddings of each model on a task; the same inputs give the same numbers.

    task: a task CSV, a folder per class, or a `Task`; `task_options` go to `load_task` (root,
        kind, label); `seed` also seeds the splits it makes.
    models: one model or a list: registry names, "hf-hub:" ids, release folders, "NAME:random", or encoders.
    layers: "recommended" (each model's card), "last", "all" (each probed; the best on valid
        is reported) or indices.
    cache: where embeddings are kept (default `<musicssl cache>/embeddings`).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be a whole number in [0, 2**32) (numpy and torch take those), got {seed!r}")
    if not isinstance(task, Task):
        task = load_task(task, seed=seed, **task_options)
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; choose from {', '.join(PROBES)}")
    if isinstance(models, (str, os.PathLike, Encoder)):  # one model, not the letters of its name
        models = [models]
    _check_names(models)
    check_device(device)
    check_batch_size(batch_size)
    y = task.targets()
    results = []
    for m in models:
        enc, name = _load(m, device, dtype, offline, seed)
        keep = _resolve_layers(enc, layers)
        start = time.perf_counter()
        x = EmbeddingCache(cache or default_cache(), enc, name, pool).get(task.paths, keep, batch_size)
        embed_seconds = time.perf_counter() - start
        del enc
        results.append(_probe_model(name, task, x, y, probes, seed, embed_seconds))
    settings = {"layers": layers if isinstance(layers, (str, int)) else list(layers), "probes": list(probes),
                "pool": pool, "seed": seed, "musicssl_version": __version__, "torch_version": torch.__version__}
    return EvalResult(task.summary(), metrics.PRIMARY[task.kind], results, settings)


def _check_names(models: Sequence[ModelArg]) -> None:
    """Registry names are checked before the first model runs, so a typo in the last one does not
    cost the others' embedding time (hub ids and folders are checked when they load)."""
    from musicssl.factory import is_registry_name

    for m in models:
        if isinstance(m, str) and is_registry_name(m):
            model_info(m.removesuffix(RANDOM_SUFFIX))


def _load(model: ModelArg, device: Any, dtype: Any, offline: bool | None, seed: int) -> tuple[Encoder, str]:
    import musicssl

    if isinstance(model, Encoder):
        name = model.spec.name if model.spec else model.family
        return model.to(device=device, dtype=dtype).eval(), name
    name = os.fspath(model)
    if name.endswith(RANDOM_SUFFIX):
        torch.manual_seed(seed)
        return musicssl.load(name[: -len(RANDOM_SUFFIX)], pretrained=False, device=device, dtype=dtype), name
    return musicssl.load(name, device=device, dtype=dtype, offline=offline), name


def _resolve_layers(enc: Encoder, layers: str | int | Sequence[int]) -> list[int]:
    if layers == "recommended":
        layers = [enc.spec.recommended_layer if enc.spec else -1]
    elif isinstance(layers, int):
        layers = [layers]
    return enc.layer_indices(layers)


def _probe_model(name: str, task: Task, x: dict[int, np.ndarray], y: np.ndarray, probes: Sequence[str],
                 seed: int, embed_seconds: float) -> ModelResult:
    fits: dict[int, dict[str, Fit]] = {}
    for layer, feats in x.items():
        problem = make_problem(task.kind, feats, y, task.split, len(task.classes), seed)
        fits[layer] = {p: run_probe(p, problem) for p in probes}
        log.info("%s layer %d: %s", name, layer,
                 ", ".join(f"{p} {f.test[problem.primary]:.3f}" for p, f in fits[layer].items()))
    primary = metrics.PRIMARY[task.kind]
    # The first layer wins ties, so the pick does not depend on dictionary order.
    best = {p: max(sorted(fits), key=lambda l: metrics.rank_value(fits[l][p].valid[primary])) for p in probes}
    return ModelResult(name, sorted(fits), fits, best, embed_seconds)


def _model_dict(m: ModelResult) -> dict[str, Any]:
    return {"model": m.model, "layers": m.layers, "best_layer": m.best_layer, "embed_seconds": m.embed_seconds,
            "best": {p: asdict(m.best(p)) for p in m.best_layer},
            "per_layer": {str(l): {p: asdict(f) for p, f in fs.items()} for l, fs in m.fits.items()}}


def write_outputs(result: EvalResult, out: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
    """`OUT/<name>.json` and, with matplotlib, `OUT/<name>.png` (name: the task's by default);
    returns what was written."""
    from musicssl.evaluate.report import plot_layers, write_json

    out, name = Path(out).expanduser(), name or result.task["name"]
    _check_replaceable(out / f"{name}.json", out / f"{name}.png")
    written: dict[str, Path] = {}
    try:
        written["json"] = write_json(result, out / f"{name}.json")
        png = plot_layers(result, out / f"{name}.png")
    except OSError as err:
        done = f"; {written['json']} was written" if written else ""
        raise OutputPathError(f"cannot write the results of {name} in {out}: {err.strerror or err}{done}; free "
                              "space, or give -o another folder (the embeddings are cached: a rerun only probes)") from err
    if png is not None:
        written["png"] = png
    return written


def _check_replaceable(json_path: Path, png_path: Path) -> None:
    """Refuse to replace files that are not an earlier result (a task's TASK.json beside its CSV,
    with `-o` the task's folder; a picture of the same name). A picture is taken for a result's
    only beside the result's JSON."""
    try:
        held = json.loads(json_path.read_text()) if json_path.exists() else None
    except (OSError, ValueError):
        held = "unreadable"
    earlier = isinstance(held, dict) and {"task", "primary", "models"} <= held.keys()
    taken = [p for p, mine in ((json_path, held is None or earlier), (png_path, earlier)) if p.exists() and not mine]
    if taken:
        raise OutputPathError(f"{taken[0]} is not an evaluation result (a task's TASK.json?), so writing this "
                              "task's result would replace it: give -o another folder (the embeddings are cached: "
                              "a rerun only probes)")
