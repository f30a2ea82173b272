"""The one training loop every recipe runs in (readable top to bottom, nanoGPT style).

AdamW with linear warm-up and cosine decay, bf16/fp16 autocast on GPU, gradient clipping, the
recipe's EMA hook, self-describing checkpoints with RNG state and exact resume, a progress line with
loss and throughput, and DDP when launched with `torchrun` (gloo on CPU, NCCL on GPU).

    run_dir = train("jepa", data="path/to/music", out="runs/jepa-tiny", preset="jepa-tiny", steps=2000)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import pickle
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from musicssl import __version__, signals
from musicssl.bulk.manifest import lock
from musicssl.bulk.outputs import atomic_write, make_out_dir, unmade_if_unused
from musicssl.devices import check_device
from musicssl.errors import DivergedError, OutputPathError, first_line
from musicssl.optim import PRECISIONS, autocast_dtype, decay_groups, optimizer_step, warmup_cosine
from musicssl.recipes import RECIPES

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOCK_FILE = ".train.lock"  # held by the process training the run
# What a run folder holds (a checkpoint being written, under a temporary name, too).
_RUN_FILES = {CHECKPOINT, CHECKPOINT + ".part", "config.json", "log.jsonl", LOCK_FILE}


@dataclass
class TrainConfig:
    """Loop settings; the recipe's own settings live in its Config dataclass."""

    recipe: str = "jepa"
    data: str = "synthetic"  # a folder, a file list (.txt/.csv), or "synthetic"
    out: str = "runs/run"
    preset: str | None = None
    steps: int = 1000
    batch_size: int = 32  # global: split across DDP ranks
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    data_length: int = 4096  # items of the synthetic source

    def __post_init__(self) -> None:
        at_least = {"steps": 1, "batch_size": 1, "log_every": 1, "ckpt_every": 1, "data_length": 1,
                    "warmup_steps": 0, "num_workers": 0}
        low = [f"{k} must be >= {n}, got {getattr(self, k)}" for k, n in at_least.items() if getattr(self, k) < n]
        if self.lr <= 0 or self.clip_grad < 0:
            low.append(f"lr must be > 0 and clip_grad >= 0 (0: no clipping), got {self.lr} and {self.clip_grad}")
        if not 0 <= self.min_lr_ratio <= 1:
            low.append(f"min_lr_ratio (the last step's share of lr) must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", *PRECISIONS):
            low.append(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if low:
            raise ValueError("; ".join(low))


def recipe_class(name: str) -> type:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    module, cls = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_configs(recipe: str, preset: str | None, overrides: dict[str, Any]) -> tuple[TrainConfig, Any]:
    """(TrainConfig, recipe Config) from a preset plus `key=value` overrides, each key routed to the
    dataclass that has it."""
    cls = recipe_class(recipe)
    if preset is not None and preset not in cls.PRESETS:
        raise ValueError(f"recipe {recipe!r} has no preset {preset!r}; presets: {sorted(cls.PRESETS)}")
    values = {**(cls.PRESETS.get(preset, {}) if preset else {}), **overrides}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe_keys = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(values) - train_keys - recipe_keys)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; loop settings: {sorted(train_keys)}; "
                         f"{recipe} settings: {sorted(recipe_keys)}")
    values = {**_typed(TrainConfig, values), **_typed(cls.Config, values)}
    tcfg = TrainConfig(recipe=recipe, preset=preset, **{k: v for k, v in values.items() if k in train_keys})
    rcfg = cls.Config(**{k: v for k, v in values.items() if k in recipe_keys})
    if "seed" in values:
        rcfg.seed = tcfg.seed = values["seed"]
    return tcfg, rcfg


# What a setting's annotation admits; a type not named here is left to the recipe to check.
_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "dict": (dict,), "tuple": (list, tuple), "list": (list, tuple)}


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The values that are settings of dataclass `cls`, checked against their annotations (integral
    floats such as steps=1e4 become ints): `steps=abc` is said here, not as a TypeError mid-run."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        options = [t.strip().split("[")[0] for t in str(f.type).split("|")]
        if "int" in options and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not any(_admits(t, value) for t in options):
            default = json.dumps(f.default) if f.default is not dataclasses.MISSING else "..."
            raise ValueError(f"setting {f.name}={value!r} must be of type {f.type} (default: {f.name}={default})")
        out[f.name] = value
    return out


def _admits(kind: str, value: Any) -> bool:
    if kind == "None":
        return value is None
    if kind not in _KINDS:
        return True
    return isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["steps=100", "lr=3e-4", "backbone_args={\\"depth\\": 2}"] -> values parsed as JSON where possible."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value")
        key, text = pair.split("=", 1)
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


# --------------------------------------------------------------------------- distributed


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(tcfg: TrainConfig, rank: int) -> torch.device:
    if tcfg.device != "auto":
        return check_device(tcfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


# --------------------------------------------------------------------------- optimisation


def make_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and other 1-D parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(decay_groups(params, tcfg.weight_decay), lr=tcfg.lr, betas=(0.9, 0.95))


def lr_factor(step: int, tcfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine down to min_lr_ratio at the last step."""
    return warmup_cosine(step, tcfg.steps, tcfg.warmup_steps, tcfg.min_lr_ratio)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Path, recipe: nn.Module, opt: torch.optim.Optimizer, scaler: Any, step: int,
                    tcfg: TrainConfig, rcfg: Any, elapsed: float, segments: list[list[int]] | None = None,
                    data_files: dict[str, Any] | None = None) -> Path:
    """Everything needed to resume or export, written atomically: weights, optimiser, configs, RNG.
    segments: [from step, steps setting] of each stretch of a run whose resumes changed `steps` (its
    schedule), for the model card; default one stretch. data_files: what files the data held
    (`_data_files`), so that a resume can say when they changed."""
    state = {
        "step": step,
        "model": recipe.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "train_config": dataclasses.asdict(tcfg),
        "recipe_config": dataclasses.asdict(rcfg),
        "encoder": {"family": recipe.export_encoder().family, "args": recipe.export_encoder().args},
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "elapsed_seconds": elapsed,
        "segments": segments or [[0, tcfg.steps]],
        "data_files": data_files,
        "hardware": hardware(),  # where it trained, for the model card (export runs elsewhere)
        "musicssl_version": __version__,
    }
    tmp = run / (CHECKPOINT + ".part")
    try:
        torch.save(state, tmp)
        os.replace(tmp, run / CHECKPOINT)
    except (OSError, RuntimeError) as err:  # torch says a full disk as a RuntimeError of its zip writer
        tmp.unlink(missing_ok=True)  # a partial one would keep the disk full
        raise OutputPathError(f"cannot write {run / CHECKPOINT}: {first_line(err)}; free space (or give --out a "
                              "folder on another disk) and run the same command again: it resumes from the "
                              "last checkpoint") from err
    return run / CHECKPOINT


def load_checkpoint(run: str | os.PathLike) -> dict[str, Any]:
    """A run's checkpoint (tensors and plain data only: loaded with weights_only=True)."""
    path = Path(run).expanduser() / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no {CHECKPOINT} in {run}: train first (musicssl train RECIPE --out {run})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise  # says so itself
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # cut short or not a checkpoint
        # Not torch's own words: they advise loading without weights_only, which runs whatever the file holds.
        raise ValueError(f"cannot read {path}: it is damaged (cut short?) or not a checkpoint musicssl wrote: "
                         f"delete it to start {run} again, or train into another --out") from err
    missing = sorted(_CHECKPOINT_KEYS - set(ckpt)) if isinstance(ckpt, dict) else ["all"]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of `musicssl train` (it lacks {', '.join(missing)}): "
                         f"delete it to start {run} again, or train into another --out")
    return ckpt


# What every checkpoint of save_checkpoint holds.
_CHECKPOINT_KEYS = {"step", "model", "optimizer", "scaler", "train_config", "recipe_config", "rng",
                    "elapsed_seconds", "musicssl_version"}


# Settings a resumed run may change: how long it runs and how it reports, not what it computes.
RESUMABLE_CHANGES = {"steps", "log_every", "ckpt_every", "num_workers", "device"}
# Where the run lives is no setting: a run folder may be moved, or named by another path.
_PLACE = {"out"}


def check_resume(ckpt: dict[str, Any], tcfg: TrainConfig, rcfg: Any, run: Path) -> None:
    """Refuse to resume a run with settings other than those it was trained with (the run would
    mix them, and its config.json and model card would describe a run that never happened)."""
    before = {**ckpt["train_config"], **ckpt["recipe_config"]}
    now = {**dataclasses.asdict(tcfg), **dataclasses.asdict(rcfg)}
    same_data = data_key(before.get("data", "")) == now["data"]  # "music/" and its absolute path alike
    changed = sorted(k for k in now.keys() & before.keys()  # a setting added since the checkpoint is not compared
                     if k not in RESUMABLE_CHANGES | _PLACE and _json(before[k]) != _json(now[k])
                     and not (k == "data" and same_data))
    if changed:
        shown = ", ".join(f"{k}: {before[k]!r} there, {now[k]!r} now" for k in changed)
        raise ValueError(f"{run} holds a run trained with other settings ({shown}). Resume it with its own "
                         f"settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or train into "
                         "another --out")


def data_key(data: str) -> str:
    """`data` as a run records and compares it: "synthetic", or the absolute path of the folder or
    list (not resolving links: a list's relative entries start from the folder it is named in)."""
    return data if data == "synthetic" else os.path.abspath(os.path.expanduser(data))


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples and lists compare alike, as JSON saves them


def recipe_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the recipe a checkpoint describes, with its trained weights."""
    cls = recipe_class(ckpt["train_config"]["recipe"])
    try:
        recipe = cls(cls.Config(**ckpt["recipe_config"]))
        recipe.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, RuntimeError) as err:  # settings or weights this musicssl's recipe does not have
        raise ValueError(f"the checkpoint (musicssl {ckpt.get('musicssl_version', '?')}) does not fit this "
                         f"musicssl's {ckpt['train_config']['recipe']} recipe ({first_line(err)}): export it "
                         "with the musicssl that trained it") from err
    return recipe


# --------------------------------------------------------------------------- data


def build_recipe(recipe: str, rcfg: Any) -> nn.Module:
    """The recipe's model, or a ValueError naming the settings its constructors refused."""
    cls = recipe_class(recipe)
    _check_backbone(recipe, cls, rcfg.backbone)
    try:
        model = cls(rcfg)
    except (TypeError, ValueError, IndexError, KeyError) as err:  # e.g. backbone_args={"depthh": 2}
        raise ValueError(f"the {recipe} recipe cannot be built with these settings: {err}. Check backbone_args "
                         f"and the other settings (`musicssl train {recipe} --presets` shows working ones)") from err
    if not any(True for _ in model.export_encoder().parameters()):  # BYOL's exported EMA target has no gradients
        raise ValueError(f"backbone={rcfg.backbone} has no weights to train (a fixed feature baseline), so the run "
                         f"would release it unchanged; pick an architecture from `musicssl list --all`")
    return model


def _check_backbone(recipe: str, cls: type, name: str) -> None:
    """A backbone of a family the recipe is written for (MAE and JEPA mask spectrogram patches)."""
    from musicssl.registry import list_models, model_info

    families = getattr(cls, "BACKBONE_FAMILIES", None)
    family = model_info(name).family
    if families and family not in families:
        fits = [n for n in list_models(pretrained=False) if model_info(n).family in families]
        raise ValueError(f"the {recipe} recipe needs a backbone of the {' or '.join(families)} family, and "
                         f"backbone={name} is {family}; one of: {', '.join(fits)}")


def make_data(tcfg: TrainConfig, rcfg: Any, sample_rate: int):
    from musicssl.recipes.data import AudioCrops, SyntheticMusic

    if not rcfg.crop_seconds > 0:
        raise ValueError(f"crop_seconds must be > 0 (seconds of audio per training example), got {rcfg.crop_seconds}")

    if tcfg.data == "synthetic":
        log.info("training on synthetic tones made on the fly, not music (--data FOLDER or LIST for your audio)")
        return SyntheticMusic(sample_rate=sample_rate, crop_seconds=rcfg.crop_seconds, length=tcfg.data_length,
                              seed=tcfg.seed)
    crops = AudioCrops(tcfg.data, sample_rate, rcfg.crop_seconds, seed=tcfg.seed)
    hours = sum(info.duration for info in crops.infos) / 3600
    log.info("training on %d audio files (%.1f h) from %s", len(crops.files), hours, tcfg.data)
    return crops


class _Step(nn.Module):
    """Routes forward() to training_step(), so DDP sees the recipe's forward pass."""

    def __init__(self, recipe: nn.Module):
        super().__init__()
        self.recipe = recipe

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.recipe.training_step(batch)


# --------------------------------------------------------------------------- the loop


def train(recipe: str, *, preset: str | None = None, progress: bool | None = None, until: int | None = None,
          **overrides: Any) -> Path:
    """Train `recipe` and return the run folder (checkpoint.pt, config.json, log.jsonl).

    A run folder that already holds a checkpoint is resumed exactly where it stopped. `until` stops
    (with a checkpoint) after that step, as if the job had been cut there.
    """
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    # A pathlib.Path is as good as its string (settings are saved as JSON).
    overrides = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items()}
    held: list[int] = []  # the run folder's lock (`_hold_run`), let go however the run ends
    try:
        return _train(recipe, preset, progress, until, overrides, held)
    finally:
        for fd in held:
            os.close(fd)
        # A process group left to the interpreter's exit can abort it (SIGABRT, "terminate called
        # without an active exception") while gloo's threads still hold tensors: end the one we began.
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _train(recipe: str, preset: str | None, progress: bool | None, until: int | None,
           overrides: dict[str, Any], held: list[int]) -> Path:
    from musicssl.recipes.data import make_loader

    tcfg, rcfg = resolve_configs(recipe, preset, overrides)
    tcfg.data = data_key(tcfg.data)  # so a resume from another working folder finds the same data
    rank, world = _distributed()
    _check_settings(recipe, tcfg, rank, world)
    device = _device(tcfg, rank)
    torch.manual_seed(tcfg.seed)
    model = build_recipe(recipe, rcfg).to(device)  # settings it refuses leave no folder behind
    run = Path(tcfg.out).expanduser()
    ckpt = load_checkpoint(run) if (run / CHECKPOINT).exists() else None
    if ckpt is not None:  # a resume: its settings are checked before the data is read
        check_resume(ckpt, tcfg, rcfg, run)
    data = make_data(tcfg, rcfg, model.export_encoder().sample_rate)  # data it refuses leaves no folder either
    files = _data_files(data)
    before = ckpt.get("data_files") if ckpt else None
    if isinstance(before, dict) and files is not None and before != files and rank == 0:
        log.warning("the data %s holds other files than when the run began (%d now, %d then): the run goes on, but "
                    "its batches from here are not those of an uninterrupted run", tcfg.data, files["count"],
                    before.get("count", 0))
    if model.NEGATIVES_IN_BATCH and len(data) < tcfg.batch_size and rank == 0:
        log.warning("the batch of %d holds more items than the %d files of the data, so copies of one file meet in "
                    "a batch, and %s takes them for negatives of each other: give at least %d files, or a smaller "
                    "batch_size=", tcfg.batch_size, len(data), recipe, tcfg.batch_size)
    with unmade_if_unused(run):
        make_out_dir(run, "--out")
        _check_run_folder(run)
        if rank == 0:
            held.append(_hold_run(run))
        opt = make_optimizer(model, tcfg)
        amp = autocast_dtype(tcfg.precision, device)
        scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
        if ckpt is not None:
            _resume(run, ckpt, model, opt, scaler, rank)
        start, elapsed = (ckpt["step"], ckpt["elapsed_seconds"]) if ckpt else (0, 0.0)
        segments = _segments(ckpt, start, tcfg.steps)
        if rank == 0:
            _write_config(run, tcfg, rcfg, world, fresh=ckpt is None)
    step_module: nn.Module = _Step(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    loader = make_loader(data, tcfg.batch_size // world, collate=model.collate, num_workers=tcfg.num_workers,
                         seed=tcfg.seed, rank=rank, world_size=world, start_step=start)
    bar = _progress_bar(tcfg, start, rank, progress)
    model.train()
    t0 = time.perf_counter()
    last = tcfg.steps if until is None else min(until, tcfg.steps)
    batches = iter(loader)  # starting it draws from torch's generator: restore the checkpoint's after
    if ckpt is not None:
        _restore_rng(ckpt["rng"])
    saved = done = start
    stats = _StepStats()
    whole = True  # the model and optimiser hold a finished step (a checkpoint of them is sound)
    try:
        for step, batch in zip(range(start, last), batches):
            signals.check()  # a Ctrl-C or SIGTERM (held back during the step below) stops here
            whole = False
            with signals.held():
                out, grad_norm = _step(step, batch, model, step_module, opt, scaler, amp, device, tcfg)
                done = step + 1
                stats.add(out, grad_norm)
                _report(run, bar, stats, done, tcfg, world, time.perf_counter() - t0, start, rank)
                if (done % tcfg.ckpt_every == 0 or done == last) and rank == 0:
                    save_checkpoint(run, model, opt, scaler, done, tcfg, rcfg, elapsed + time.perf_counter() - t0,
                                    segments, files)
                    saved = done
            whole = True
    except KeyboardInterrupt:
        if whole and done > saved and rank == 0:  # keep the steps since the last checkpoint
            save_checkpoint(run, model, opt, scaler, done, tcfg, rcfg, elapsed + time.perf_counter() - t0, segments,
                            files)
        raise
    if world > 1:
        dist.barrier()
    return run


def _check_settings(recipe: str, tcfg: TrainConfig, rank: int, world: int) -> None:
    """Refuse batch sizes the processes or the recipe cannot use; warn of a run that is all warm-up."""
    if tcfg.batch_size % world:
        raise ValueError(f"batch_size {tcfg.batch_size} must be divisible by the {world} processes")
    least = getattr(recipe_class(recipe), "MIN_BATCH", 1) * world
    if tcfg.batch_size < least:
        raise ValueError(f"the {recipe} recipe needs batch_size >= {least} ({least // world} per process: its loss "
                         f"and the BatchNorm of its projector compare the items of a batch), got {tcfg.batch_size}")
    if tcfg.warmup_steps >= tcfg.steps and rank == 0:
        log.warning("warmup_steps=%d is not below steps=%d: the whole run is warm-up (the learning rate climbs "
                    "to lr=%g at best and never decays); set warmup_steps=%d (a tenth of the steps), say",
                    tcfg.warmup_steps, tcfg.steps, tcfg.lr, tcfg.steps // 10)


def _resume(run: Path, ckpt: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, scaler: Any,
            rank: int) -> None:
    """Load the run's checkpoint (checked to be this run's) into model, optimiser and scaler; its
    "rng" is restored by the caller once the data loader has started."""
    model.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if rank == 0:  # the one process that writes the log
        _trim_log(run / "log.jsonl", ckpt["step"])
    log.info("resuming %s at step %d", run, ckpt["step"])


def _data_files(data: Any) -> dict[str, Any] | None:
    """How many files the data holds and a digest of their names and sizes (names alone: a moved
    data folder is the same data); None for synthetic data."""
    if not hasattr(data, "files"):
        return None
    digest = hashlib.sha256()
    for name, size in sorted((Path(f).name, info.frames) for f, info in zip(data.files, data.infos)):
        digest.update(f"{name}\0{size}\n".encode("utf-8", "surrogateescape"))
    return {"count": len(data.files), "digest": digest.hexdigest()[:16]}


def _segments(ckpt: dict[str, Any] | None, start: int, steps: int) -> list[list[int]]:
    """The run's stretches ([from step, steps setting]), one more if this resume changes `steps`."""
    if ckpt is None:
        return [[0, steps]]
    segments = [list(seg) for seg in ckpt.get("segments") or [[0, ckpt["train_config"]["steps"]]]]
    if segments[-1][1] == steps:
        return segments
    if len(segments) > 1 and segments[-1][0] == start:  # the last change ran no step: this one replaces it
        segments.pop()
    return [*segments, [start, steps]]


def _hold_run(run: Path) -> int:
    """Lock RUN (the file descriptor, kept open until the run ends): two trainings into one --out
    would interleave their log and race for the checkpoint."""
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if not lock(fd, wait=False):
        os.close(fd)
        holder = (run / LOCK_FILE).read_text().strip() or "another process"
        raise ValueError(f"{run} is being trained by {holder}: wait for it to end, or train into another --out")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
    except OSError as err:  # a full disk: nothing of this run may stay behind
        os.close(fd)
        (run / LOCK_FILE).unlink(missing_ok=True)
        raise OutputPathError(f"cannot write {run / LOCK_FILE}: {err.strerror or err}; free space, or give --out "
                              "a folder you may write to") from err
    return fd


def _write_config(run: Path, tcfg: TrainConfig, rcfg: Any, world: int, fresh: bool) -> None:
    """RUN/config.json, whole or not at all (other ranks may be reading it in _check_run_folder); a
    fresh run also starts log.jsonl anew (one killed before its first checkpoint left lines)."""
    text = json.dumps({"train": dataclasses.asdict(tcfg), "recipe": dataclasses.asdict(rcfg), "world_size": world,
                       "musicssl_version": __version__, "torch_version": torch.__version__}, indent=2)
    try:
        atomic_write(run / "config.json", lambda fh: fh.write(text), "w")
        if fresh:
            (run / "log.jsonl").unlink(missing_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot write {run / 'config.json'}: {err.strerror or err}; free space, or give "
                              "--out a folder you may write to") from err


def _check_run_folder(run: Path) -> None:
    """Refuse an --out that holds something other than a run: its config.json would be replaced."""
    config = run / "config.json"
    release = (run / "model.safetensors").exists()
    if config.exists() and not (run / CHECKPOINT).exists():
        try:
            release = release or "train" not in json.loads(config.read_text())
        except (OSError, ValueError):
            release = True
    if release:
        raise ValueError(f"--out {run} holds a model release or another config.json, which a run would overwrite: "
                         "train into a new folder (a run folder holds checkpoint.pt, config.json and log.jsonl)")
    others = sorted(p.name for p in run.iterdir() if p.name not in _RUN_FILES) if not (run / CHECKPOINT).exists() else []
    if others:  # the data folder, say: its files would sit beside a run's, and its log.jsonl be trimmed
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ValueError(f"--out {run} holds {shown}, which no training run writes: train into a new or empty folder")


def _step(step: int, batch: dict[str, Any], model: nn.Module, step_module: nn.Module, opt: torch.optim.Optimizer,
          scaler: Any, amp: torch.dtype | None, device: torch.device,
          tcfg: TrainConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimiser step on `batch` -> (the recipe's outputs, the gradient norm before clipping)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for group in opt.param_groups:
        group["lr"] = tcfg.lr * lr_factor(step, tcfg)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        out = step_module(batch)
    loss = out["loss"]
    if not torch.isfinite(loss):
        fp32 = " or use precision=fp32" if amp is not None else ""
        raise DivergedError(f"the training loss became {loss.item()} at step {step + 1} (training diverged): lower "
                            f"lr (now {tcfg.lr:g}){fp32}; the run's last checkpoint is from before it")
    grad_norm = optimizer_step(loss, opt, model.parameters(), scaler, tcfg.clip_grad)
    model.after_step(step, tcfg.steps)
    return out, grad_norm


class _StepStats:
    """The scalar outputs (loss, ...) and gradient norms of the steps since the last log line,
    summed on their device; a log line gives their means. A step whose gradient norm is not finite
    (fp16's scaler skips it and lowers its scale) is counted apart, not averaged in."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, out: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        scalars = {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        g = grad_norm.detach().float()
        finite = torch.isfinite(g)
        scalars.update(grad_norm=torch.where(finite, g, 0.0), finite_grads=finite.float())
        for k, v in scalars.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1

    def take(self) -> dict[str, float | None]:
        sums = {k: float(v) for k, v in self.sums.items()}
        finite = sums.pop("finite_grads")
        means: dict[str, float | None] = {k: v / self.steps for k, v in sums.items()}
        means["grad_norm"] = sums["grad_norm"] / finite if finite else None
        if finite < self.steps:
            means["skipped_steps"] = int(self.steps - finite)
        self.sums, self.steps = {}, 0
        return means


def _report(run: Path, bar: Any, stats: _StepStats, done: int, tcfg: TrainConfig, world: int, seconds: float,
            start: int, rank: int) -> None:
    """Every log_every steps (and at the end): a line in log.jsonl and on the progress bar, with
    the means over the steps since the last line."""
    if done % tcfg.log_every == 0 or done == tcfg.steps:
        record = _log_record(stats.take(), done, tcfg, world, seconds, start)  # all ranks: it averages
        if rank == 0:
            try:
                with open(run / "log.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as err:  # a full disk between checkpoints
                raise OutputPathError(f"cannot write {run / 'log.jsonl'}: {err.strerror or err}; free space and run "
                                      "the same command again: it resumes from the last checkpoint") from err
            bar(record)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step`, the checkpoint a run resumes from: those steps are done again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _logged_step(line) <= step]
    if len(keep) < len(lines):
        path.write_text("".join(keep))


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a line cut short by a kill: kept out of the way, and dropped by nothing


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _log_record(values: dict[str, float | None], step: int, tcfg: TrainConfig, world: int, seconds: float,
                start: int) -> dict[str, Any]:
    if world > 1:  # average what each rank saw (a gradient norm, all-reduced, is None on all or none)
        keys = [k for k, v in values.items() if v is not None]
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        values = {**values, **dict(zip(keys, (t / world).tolist()))}
    samples = (step - start) * tcfg.batch_size
    return {"step": step, **values, "lr": tcfg.lr * lr_factor(step - 1, tcfg),
            "samples_per_second": samples / max(seconds, 1e-9)}


def _progress_bar(tcfg: TrainConfig, start: int, rank: int, progress: bool | None):
    """A tqdm bar on a terminal, log lines otherwise; returns the per-log-step callback."""
    import sys

    if rank != 0:
        return lambda record: None
    if progress if progress is not None else sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=start, unit="step")

        def update(record: dict[str, Any]) -> None:
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_second']:.1f}")
        return update
    return lambda record: log.info("step %d loss %.4f (%.1f samples/s)", record["step"], record["loss"],
                                   record["samples_per_second"])


def hardware() -> str:
    """One line naming where a run trained (for model cards)."""
    world = f", {dist.get_world_size()} processes" if dist.is_available() and dist.is_initialized() else ""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}{world}"
    n = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {n} thread{'s' * (n != 1)}{world})"
