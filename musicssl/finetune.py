"""Fine-tuning: a head on any encoder over a learnable weighted sum of its layers, freeze policies,
layer-wise learning-rate decay, early stopping on validation, and a run folder that loads back.

    result = finetune("drums.csv", model="simclr-mini", out="runs/drums", freeze="full")
    clf = musicssl.load("runs/drums")         # a Classifier: backbone + head, an Encoder like any other
    clf.predict("kick.wav").labels            # ['kick']

Training sees random crops of the encoder's context (shorter clips zero-padded, with their lengths);
validation and test see whole clips, every window of the context pooled together. The head first
trains alone on the frozen encoder, then with the blocks the freeze policy opens (linear probing
before fine-tuning, Kumar et al. 2022). While fine-tuning, the layer mix (softmax weights over
layer-normed hidden states, as SUPERB's weighted sum) and the head train at `lr`, block i of L at
``lr * llrd ** (L - i)`` (the front end is block 0), as in BEiT.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musicssl.bulk.outputs import atomic_write, make_out_dir, unmade_if_unused
from musicssl.devices import check_device, default_device
from musicssl.errors import DivergedError
from musicssl.factory import check_release_out
from musicssl.models.base import AudioLike, Encoder, LayersArg, evaluating, masked_pool
from musicssl.optim import autocast_dtype, decay_groups, optimizer_step, warmup_cosine
from musicssl.registry import DEFAULT_MODEL, ModelSpec, family_class, register_family

log = logging.getLogger(__name__)

# evaluate.tasks.KINDS, written out: importing it would load the evaluation package with every model.
KINDS = ("classification", "multilabel", "regression", "pitch")
POOLS = ("mean", "max")
# The epochs of a run under way; renamed to log.jsonl once the run is written, so that an interrupted
# rerun into a finished run's folder leaves that run whole.
PARTIAL_LOG = "log.partial.jsonl"
CACHE_BYTES = 2 * 2**30  # decoded task audio kept in memory up to this size; beyond it, read per use


# --------------------------------------------------------------------------- the model


@dataclass
class Prediction:
    """What `Classifier.predict` returns.

    scores: (B, C) class probabilities (softmax; sigmoid for multilabel), (B,) values for regression.
    labels: per item the class name, the tuple of classes scored >= 0.5 (multilabel), the value
        (regression) or the MIDI number of the likeliest semitone (pitch).
    classes: the names of the C columns of `scores`.
    """

    scores: torch.Tensor
    labels: list[Any]
    classes: list[str]


@register_family("classifier")
class Classifier(Encoder):
    """A head on an encoder. wav (B, S) -> logits (B, C), or values (B,) for regression.

    The classifier is itself an Encoder: its audio facts, `forward_features` and hence `embed()` are
    the backbone's, so everything that takes an encoder takes a fine-tuned one.

    encoder: the backbone, or {"family", "args"[, "spec"]} to build one (how a release rebuilds it).
    num_classes: outputs of the head (1 for regression).
    pool: "mean" or "max" over each window's valid frames.
    layers: hidden states mixed by learned softmax weights: "all", "last", or indices.
    kind: "classification", "multilabel", "regression" or "pitch" (classes are semitones, `values`).
    hidden: width of one hidden GELU layer in the head; 0 for a linear head.
    dropout: before the last linear layer of the head.
    classes: names of the outputs (default "0", "1", ...).
    values: MIDI number of each class of a pitch head.
    target_mean, target_std: a regression head predicts (y - mean) / std; outputs are in y's units.
    """

    def __init__(
        self,
        encoder: Encoder | dict[str, Any],
        num_classes: int,
        *,
        pool: str = "mean",
        layers: LayersArg = "all",
        kind: str = "classification",
        hidden: int = 0,
        dropout: float = 0.1,
        classes: Sequence[str] | None = None,
        values: Sequence[float] | None = None,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(num_classes)]
        _check_head(kind, pool, num_classes, classes, values)
        self.backbone = _build_backbone(encoder)
        b = self.backbone
        self.sample_rate, self.hop_length, self.frame_offset = b.sample_rate, b.hop_length, b.frame_offset
        self.context_seconds, self.overlap_seconds = b.context_seconds, b.overlap_seconds
        self.embed_dim, self.num_layers = b.embed_dim, b.num_layers
        self.layer_ids = self.layer_indices(layers)
        self.kind, self.pool, self.classes = kind, pool, classes
        self.values = [float(v) for v in values] if values is not None else None
        self.target_mean, self.target_std = float(target_mean), float(target_std)
        self.args = {
            "encoder": {"family": b.family, "args": b.args, **({"spec": b.spec.to_dict()} if b.spec else {})},
            "num_classes": num_classes, "pool": pool, "layers": _json_layers(layers),
            "kind": kind, "hidden": hidden, "dropout": dropout, "classes": classes, "values": self.values,
            "target_mean": self.target_mean, "target_std": self.target_std,
        }
        self.layer_weights = nn.Parameter(torch.zeros(len(self.layer_ids)))
        self.head = _make_head(b.embed_dim, num_classes, hidden, dropout)
        self.spec = _classifier_spec(b, kind)

    # --- the Encoder contract, from the backbone ------------------------------------------------
    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_features(wav, lengths)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.backbone.frame_lengths(lengths)

    def finetune_blocks(self) -> list[nn.Module]:
        return self.backbone.finetune_blocks()

    # --- the head ------------------------------------------------------------------------------
    def features(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One window per row, wav (B, S), lengths (B,) -> (pooled layer mix (B, D) float32, valid frames (B,))."""
        # A frozen backbone needs no graph: no activations are kept for it.
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(track):
            hidden = self.backbone.forward_features(wav, lengths)
        w = self.layer_weights.float().softmax(0)
        D = self.embed_dim
        x = sum(w[k] * F.layer_norm(hidden[i].float(), (D,)) for k, i in enumerate(self.layer_ids))
        n = self.backbone.frame_lengths(lengths.to(x.device)).clamp(max=x.shape[1])
        return masked_pool(x, n, self.pool), n

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) -> logits (B, C); regression: values (B,) in the targets' units."""
        out = self.head(pooled.to(self.head[-1].weight.dtype)).float()
        if self.kind == "regression":
            return out[:, 0] * self.target_std + self.target_mean
        return out

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """wav (B, S) at `sample_rate`, one window each -> logits (B, C), or values (B,) for regression."""
        if lengths is None:
            lengths = torch.full((wav.shape[0],), wav.shape[-1], dtype=torch.long, device=wav.device)
        return self.classify(self.features(wav, lengths)[0])

    def clip_logits(self, clips: Sequence[np.ndarray], batch_size: int = 8) -> torch.Tensor:
        """Whole clips of any length, each (S,) float32 at `sample_rate` -> logits (N, C) (regression: (N,)),
        float32 on the CPU. Each clip is cut into windows of `context_seconds`, the last one ending at
        the clip's end (so every window is as long as the training crops); the windows' pooled features
        are combined (mean: weighted by valid frames; max: the max) before the head."""
        W = max(round(self.context_seconds * self.sample_rate), 1)
        windows = [(i, s, min(W, len(x))) for i, x in enumerate(clips) for s in _window_starts(len(x), W)]
        windows.sort(key=lambda w: -w[2])  # similar lengths share a batch
        total = torch.zeros(len(clips), self.embed_dim)
        frames = torch.zeros(len(clips))
        if self.pool == "max":
            total.fill_(float("-inf"))
        device = self.device
        for b in range(0, len(windows), batch_size):
            batch = windows[b : b + batch_size]
            wav = torch.zeros(len(batch), max(max(n for _, _, n in batch), 1))
            for j, (i, s, n) in enumerate(batch):
                wav[j, :n] = torch.from_numpy(np.asarray(clips[i][s : s + n], dtype=np.float32))
            lengths = torch.tensor([max(n, 1) for _, _, n in batch])
            pooled, n_frames = self.features(wav.to(device), lengths.to(device))
            pooled, n_frames = pooled.float().cpu(), n_frames.cpu().float()
            for j, (i, _, _) in enumerate(batch):
                if self.pool == "max":
                    total[i] = torch.maximum(total[i], pooled[j])
                else:
                    total[i] += pooled[j] * n_frames[j]
                frames[i] += n_frames[j]
        pooled = total if self.pool == "max" else total / frames.clamp(min=1)[:, None]
        return self.classify(pooled.to(device)).float().cpu()

    @torch.inference_mode()
    def predict(self, audio: AudioLike | Sequence[AudioLike], sr: int | None = None, *,
                batch_size: int = 8) -> Prediction:
        """Labels and scores of paths, arrays or tensors of any length (as `embed()` takes them), in
        eval mode (a model in training mode is put back in it afterwards)."""
        from musicssl.audio.inputs import prepare_items

        items = prepare_items(audio, sr, self.sample_rate)
        with evaluating(self):  # inference mode: the decorator
            return self.prediction(self.clip_logits(items, batch_size))

    def prediction(self, logits: torch.Tensor) -> Prediction:
        """Logits (N, C) of `clip_logits` -> Prediction."""
        if self.kind == "regression":
            return Prediction(logits, [float(v) for v in logits], self.classes)
        if self.kind == "multilabel":
            p = logits.sigmoid()
            return Prediction(p, [tuple(c for c, s in zip(self.classes, row) if s >= 0.5) for row in p.tolist()],
                              self.classes)
        p = logits.softmax(-1)
        best = p.argmax(-1).tolist()
        if self.kind == "pitch":
            return Prediction(p, [self.values[k] for k in best], self.classes)
        return Prediction(p, [self.classes[k] for k in best], self.classes)


def _check_head(kind: str, pool: str, num_classes: int, classes: list[str], values: Sequence[float] | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be 'mean' or 'max', not {pool!r}")
    if kind == "regression" and num_classes != 1:
        raise ValueError(f"a regression head has one output, not num_classes={num_classes}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    if kind == "pitch" and (values is None or len(values) != num_classes):
        raise ValueError("a pitch head needs `values`: the MIDI number of each of its classes")


def _make_head(dim: int, num_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    """Pooled features (B, dim) -> logits (B, num_classes): linear, or an MLP of width `hidden`."""
    # Standardised by a BatchNorm without affine first, as MAE's linear probe (He et al. 2022): a
    # linear head on raw SSL features learns slowly where one shared direction dominates.
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    if hidden:
        head = nn.Sequential(norm, nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    else:
        head = nn.Sequential(norm, nn.Dropout(dropout), nn.Linear(dim, num_classes))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


def _window_starts(n: int, W: int) -> list[int]:
    """Starts of windows of W samples that cover n samples: every W, plus one ending at n."""
    if n <= W:
        return [0]
    starts = list(range(0, n - W + 1, W))
    return starts if starts[-1] + W == n else [*starts, n - W]


def _json_layers(layers: LayersArg) -> str | int | list[int]:
    if isinstance(layers, str):
        return layers
    return int(layers) if isinstance(layers, (int, np.integer)) else [int(i) for i in layers]


def _build_backbone(encoder: Encoder | dict[str, Any]) -> Encoder:
    if isinstance(encoder, Encoder):
        return encoder.backbone if isinstance(encoder, Classifier) else encoder
    if not isinstance(encoder, dict) or "family" not in encoder or "args" not in encoder:
        raise ValueError("encoder must be an Encoder or a dict with its 'family' and 'args'")
    backbone = family_class(encoder["family"])(**encoder["args"])
    if "spec" in encoder:
        backbone.spec = ModelSpec.from_dict(encoder["spec"])
    return backbone


def _classifier_spec(backbone: Encoder, kind: str) -> ModelSpec:
    """The spec a fine-tuned release inherits: the backbone's audio facts and its weights' licence."""
    base = backbone.spec
    name = base.name if base else backbone.family
    return ModelSpec(
        name=f"{name}-finetuned", family="classifier", sample_rate=backbone.sample_rate,
        frame_rate=backbone.frame_rate, embed_dim=backbone.embed_dim, num_layers=backbone.num_layers,
        recommended_layer=base.recommended_layer if base else -1, context_seconds=backbone.context_seconds,
        license=base.license if base else "unspecified", source=f"musicssl finetune of {name}",
        citation=base.citation if base else "", description=f"{name} fine-tuned with a {kind} head.",
    )


# --------------------------------------------------------------------------- layers, freezing, learning rates


def layer_groups(encoder: Encoder) -> list[list[str]]:
    """Parameter names of an encoder by depth: [front end, block 1, ..., block L].

    The blocks are `encoder.finetune_blocks()`; a parameter outside them joins the block registered
    just before it (final norms and projections join the last block), or the front end (group 0).
    Every parameter is in exactly one group.
    """
    blocks = encoder.finetune_blocks()
    owner = {id(p): k + 1 for k, blk in enumerate(blocks) for p in blk.parameters()}
    groups: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    current = 0
    for name, p in encoder.named_parameters():
        current = owner.get(id(p), current)
        groups[current].append(name)
    return groups


# (lowest, highest, whether each end is allowed, whole numbers only) of each numeric setting.
_RANGES = {
    "epochs": (1, math.inf, True, True, True), "patience": (1, math.inf, True, True, True),
    # batch_size 1: every batch would be skipped (the head's batch statistics need two items)
    "batch_size": (2, math.inf, True, True, True), "head_epochs": (0, math.inf, True, True, True),
    "hidden": (0, math.inf, True, True, True), "seed": (0, 2**32, True, False, True),
    "lr": (0, math.inf, False, False, False), "head_lr": (0, math.inf, False, False, False),
    # llrd ** (L - i) alternates in sign below 0: every other block would train backwards
    "llrd": (0, math.inf, False, False, False), "weight_decay": (0, math.inf, True, False, False),
    "clip_grad": (0, math.inf, True, False, False), "crop_seconds": (0, math.inf, False, False, False),
    "dropout": (0, 1, True, False, False), "label_smoothing": (0, 1, True, False, False),
    "warmup": (0, 1, True, True, False),
}


def _check_numbers(**settings: Any) -> dict[str, int | float]:
    """Refuse numeric settings out of their range (`_RANGES`), naming them, before any work -> the
    same settings as plain Python numbers (numpy's would not go into the run's JSON files)."""
    plain = {}
    for name, value in settings.items():
        low, high, low_in, high_in, whole = _RANGES[name]
        kind = numbers.Integral if whole else numbers.Real
        ok = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
              and (low <= value if low_in else low < value) and (value <= high if high_in else value < high))
        if not ok:
            span = f"{'>=' if low_in else '>'} {low}" if high == math.inf else \
                f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ValueError(f"{name} must be a {'whole' if whole else 'finite'} number {span}, got {value!r}")
        plain[name] = int(value) if whole else float(value)
    return plain


def check_freeze_form(policy: Any) -> re.Match[str]:
    """The policy's form, checked before a model is loaded (N against its blocks comes later)."""
    m = re.fullmatch(r"frozen|full|last-(\d+)", policy) if isinstance(policy, str) else None
    if not m:
        raise ValueError(f"freeze policy must be 'frozen', 'last-N' (e.g. last-2) or 'full', not {policy!r}")
    return m


def parse_freeze(policy: str, n_blocks: int) -> int:
    """How many of the last blocks train: "frozen" -> 0, "last-N" -> N, "full" -> every block and the
    front end (n_blocks + 1)."""
    m = check_freeze_form(policy)
    if policy == "frozen":
        return 0
    if policy == "full":
        return n_blocks + 1
    n = int(m.group(1))
    if not 1 <= n <= n_blocks:
        raise ValueError(f"freeze={policy!r}: this model has {n_blocks} blocks, so N must be in 1..{n_blocks}"
                         if n_blocks else f"freeze={policy!r}: this model has no blocks to train (use frozen or full)")
    return n


def apply_freeze(clf: Classifier, policy: str) -> list[int]:
    """Set requires_grad by `policy` ("frozen": head and layer weights only; "last-N": also the last N
    blocks; "full": everything) -> the trainable layer groups of the backbone."""
    groups = layer_groups(clf.backbone)
    n_train = parse_freeze(policy, len(groups) - 1)
    trainable = list(range(len(groups) - n_train, len(groups)))
    params = dict(clf.backbone.named_parameters())
    for g, names in enumerate(groups):
        for name in names:
            params[name].requires_grad_(g in trainable)
    for p in [clf.layer_weights, *clf.head.parameters()]:
        p.requires_grad_(True)
    return trainable


def param_groups(clf: Classifier, lr: float, llrd: float = 0.75, weight_decay: float = 0.05) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: backbone group i of L at lr * llrd ** (L - i), the head
    and the layer weights at lr; no weight decay on biases, norms and other 1-D parameters. Each
    group keeps its `lr_scale` for the schedule."""
    groups = layer_groups(clf.backbone)
    L = len(groups) - 1
    params = dict(clf.backbone.named_parameters())
    depth = [(llrd ** (L - i), [params[n] for n in names]) for i, names in enumerate(groups)]
    depth.append((1.0, [clf.layer_weights, *clf.head.parameters()]))
    return [g for scale, ps in depth
            for g in decay_groups([p for p in ps if p.requires_grad], weight_decay, lr=lr * scale, lr_scale=scale)
            if g["params"]]


def train_mode(clf: Classifier) -> None:
    """Training mode, except for modules whose parameters are all frozen: their BatchNorm statistics
    and dropout stay as loaded, so frozen features are the features the backbone was trained with."""
    clf.train()
    for m in clf.backbone.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


# --------------------------------------------------------------------------- data


class TaskAudio:
    """The audio of a task at one rate: each file decoded once and kept in memory while the whole
    task fits in `cache_bytes` (float32); beyond it, read from disk at each use (crops only decode
    their span)."""

    def __init__(self, paths: Sequence[Path], sample_rate: int, cache_bytes: int = CACHE_BYTES,
                 workers: int = 4) -> None:
        from musicssl.audio.io import audio_info, load_audio

        self.paths, self.sample_rate = list(paths), sample_rate
        infos = [audio_info(p) for p in self.paths]
        self.lengths = [max(int(i.frames * sample_rate // i.sample_rate), 1) for i in infos]
        self.cached = 4 * sum(self.lengths) <= cache_bytes
        self.audio: list[np.ndarray] | None = None
        if self.cached:
            with ThreadPoolExecutor(workers) as pool:  # soundfile and soxr release the GIL
                self.audio = list(pool.map(lambda p: load_audio(p, sr=sample_rate)[0], self.paths))
            self.lengths = [len(x) for x in self.audio]

    def __len__(self) -> int:
        return len(self.paths)

    def clip(self, i: int) -> np.ndarray:
        """The whole clip i, (S,) float32."""
        from musicssl.audio.io import load_audio

        return self.audio[i] if self.audio is not None else load_audio(self.paths[i], sr=self.sample_rate)[0]

    def crop(self, i: int, samples: int, rng: np.random.Generator) -> np.ndarray:
        """A random span of `samples` (or the whole clip when shorter), (<= samples,) float32."""
        from musicssl.audio.io import load_audio

        start = int(rng.integers(0, max(self.lengths[i] - samples, 0) + 1))
        if self.audio is not None:
            return self.audio[i][start : start + samples]
        x = load_audio(self.paths[i], sr=self.sample_rate, offset=start / self.sample_rate,
                       duration=samples / self.sample_rate)[0]
        return x[:samples]


def batch_of(crops: Sequence[np.ndarray], samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of up to `samples` -> zero-padded wav (B, samples) and lengths (B,)."""
    wav = torch.zeros(len(crops), samples)
    for j, x in enumerate(crops):
        wav[j, : len(x)] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return wav, torch.tensor([max(len(x), 1) for x in crops])


# --------------------------------------------------------------------------- targets and losses


@dataclass
class Targets:
    """What the head learns for a task: y as `metrics.compute` scores it, the head's training
    targets, and the head's class names (pitch: semitones seen in training, `values`)."""

    y: np.ndarray  # (N,) class index / value, or (N, C) 0/1 for multilabel
    train: torch.Tensor  # per item what the loss compares with
    classes: list[str]
    values: list[float] | None
    mean: float = 0.0
    std: float = 1.0


def task_targets(task: Any) -> Targets:
    y = task.targets()
    train_idx = task.indices("train")
    if task.kind == "pitch":
        from musicssl.evaluate.metrics import nearest_class, semitone_classes

        values = [float(v) for v in semitone_classes(y[train_idx])]
        nearest = nearest_class(np.asarray(values), y)
        return Targets(y, torch.from_numpy(nearest), [f"{v:g}" for v in values], values)
    if task.kind == "regression":
        mean, std = float(y[train_idx].mean()), float(y[train_idx].std()) or 1.0
        return Targets(y, torch.from_numpy(y.astype(np.float32)), [task.name or "value"], None, mean, std)
    t = torch.from_numpy(y) if task.kind == "classification" else torch.from_numpy(y.astype(np.float32))
    return Targets(y, t, list(task.classes), None)


def loss_fn(clf: Classifier, out: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The head's loss: cross-entropy (classification, pitch), binary cross-entropy (multilabel),
    mean squared error of standardised values (regression)."""
    if clf.kind == "multilabel":
        return F.binary_cross_entropy_with_logits(out, target)
    if clf.kind == "regression":
        return F.mse_loss((out - clf.target_mean) / clf.target_std, (target - clf.target_mean) / clf.target_std)
    return F.cross_entropy(out, target, label_smoothing=label_smoothing)


def score(task: Any, targets: Targets, clf: Classifier, logits: torch.Tensor, idx: np.ndarray) -> dict[str, float]:
    """metrics.compute on the items `idx`, plus the head's loss on them."""
    from musicssl.evaluate import metrics

    out = (logits.sigmoid() if clf.kind == "multilabel" else logits).numpy()
    values = np.asarray(targets.values) if targets.values is not None else None
    result = metrics.compute(task.kind, targets.y[idx], out, values)
    result["loss"] = float(loss_fn(clf, logits, targets.train[idx]))
    return result


# --------------------------------------------------------------------------- the loop


@dataclass
class FinetuneResult:
    """What `finetune` returns: the trained model (best validation weights) and how it did."""

    model: Classifier
    test: dict[str, float]
    valid: dict[str, float]
    primary: str  # the metric early stopping watched (metrics.PRIMARY of the task's kind)
    best_epoch: int
    epochs: int  # epochs run
    history: list[dict[str, Any]]
    task: dict[str, Any]
    settings: dict[str, Any]
    out: Path | None = None


def finetune(
    task: Any,
    *,
    model: str | os.PathLike | Encoder = DEFAULT_MODEL,
    out: str | os.PathLike | None = None,
    freeze: str = "full",
    epochs: int = 30,
    lr: float | None = None,
    llrd: float = 0.75,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    seed: int = 0,
    patience: int = 10,
    head_epochs: int = 5,
    head_lr: float = 1e-3,
    kind: str | None = None,
    label: str | None = None,
    root: str | os.PathLike | None = None,
    group: str | None = None,
    pool: str = "mean",
    layers: LayersArg = "all",
    hidden: int = 0,
    dropout: float = 0.1,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    label_smoothing: float = 0.1,
    clip_grad: float = 1.0,
    precision: str = "auto",
    crop_seconds: float | None = None,
    eval_batch_size: int | None = None,
    offline: bool | None = None,
    name: str | None = None,
) -> FinetuneResult:
    """Fine-tune `model` on `task`; early-stop on validation; score the best weights on test.

    task: a Task, a task CSV (`path,label[,split][,group]`) or a folder per class (see
        `musicssl.evaluate.tasks.load_task`; kind, label, root, group and seed are passed to it).
    model: a name, "hf-hub:org/repo", a release folder or an Encoder (a Classifier's backbone is reused).
        An Encoder passed in is trained in place, as torch training loops do: pass
        `copy.deepcopy(enc)` to keep the original.
    out: run folder to write: a release (config.json, model.safetensors, README.md) that
        `musicssl.load(out)` reads back, metrics.json and log.jsonl; None writes nothing.
    freeze: "frozen" (head and layer weights only), "last-N" (and the last N blocks) or "full".
    epochs: most passes over the training clips (one random crop of each per pass) of fine-tuning.
    lr: peak learning rate of the head and the last block (default 3e-4; frozen: 1e-3); linear
        warm-up over the first `warmup` share of the steps, then cosine decay to lr / 100.
    llrd: layer-wise decay: block i of L trains at lr * llrd ** (L - i), the front end (i = 0) lowest.
    patience: stop after this many epochs in which neither the validation score (the primary metric)
        nor the validation loss improved; the weights with the best score (then loss) are kept.
    head_epochs, head_lr: unless frozen, the head first trains alone for head_epochs at head_lr
        (linear probing, then fine-tuning: Kumar et al. 2022), so that fine-tuning starts from a
        head that fits the features rather than a random one that would distort them.
    clip_grad: the largest gradient norm a step takes (0: no clipping).
    precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32", "bf16" or "fp16" (loss-scaled).
    crop_seconds: training crop length (default: the encoder's context_seconds).
    """
    from musicssl.evaluate.metrics import PRIMARY
    from musicssl.evaluate.tasks import Task, load_task
    from musicssl.factory import load

    optional = {k: v for k, v in (("lr", lr), ("crop_seconds", crop_seconds)) if v is not None}
    n = _check_numbers(epochs=epochs, patience=patience, batch_size=batch_size, head_epochs=head_epochs, hidden=hidden,
                       seed=seed, head_lr=head_lr, llrd=llrd, weight_decay=weight_decay, clip_grad=clip_grad,
                       dropout=dropout, label_smoothing=label_smoothing, warmup=warmup, **optional)
    epochs, patience, batch_size, head_epochs, hidden, seed = (n[k] for k in ("epochs", "patience", "batch_size",
                                                                             "head_epochs", "hidden", "seed"))
    head_lr, llrd, weight_decay, clip_grad, dropout, label_smoothing, warmup = (
        n[k] for k in ("head_lr", "llrd", "weight_decay", "clip_grad", "dropout", "label_smoothing", "warmup"))
    lr, crop_seconds = n.get("lr"), n.get("crop_seconds")
    out = None if out is None else os.path.expanduser(out)
    _check_out(model, out, freeze)
    if not isinstance(task, Task):
        task = load_task(task, kind=kind, label=label, root=root, group=group, seed=seed)  # eval --seed's splits
    device = check_device(device or default_device())
    optim = StepSettings(llrd, weight_decay, warmup, autocast_dtype(precision, device), clip_grad, label_smoothing)
    with unmade_if_unused(out):  # a run refused before its first epoch leaves no folder
        if out is not None:
            make_out_dir(Path(out), "-o/out")  # before the model loads and the data is decoded
        torch.manual_seed(seed)
        encoder = model if isinstance(model, Encoder) else load(model, offline=offline)
        targets = task_targets(task)
        clf = Classifier(encoder, len(targets.classes), pool=pool, layers=layers, kind=task.kind, hidden=hidden,
                         dropout=dropout, classes=targets.classes, values=targets.values, target_mean=targets.mean,
                         target_std=targets.std).float().to(device)
        trainable = apply_freeze(clf, freeze)  # checks the policy before any audio is decoded
        phases = _phases(freeze, epochs, lr, head_epochs, head_lr)
        data = TrainData(TaskAudio(task.paths, clf.sample_rate), targets.train, task.indices("train"),
                         max(round((crop_seconds or clf.context_seconds) * clf.sample_rate), 1), batch_size,
                         np.random.default_rng(seed))
        valid_idx, test_idx = task.indices("valid"), task.indices("test")
        name_of_model = (encoder.spec.name if encoder.spec else encoder.family) if isinstance(model, Encoder) else model
        settings = {
            "model": os.fspath(name_of_model), "freeze": freeze, "trainable_groups": trainable, "epochs": epochs,
            "lr": phases[-1].lr, "llrd": llrd, "head_epochs": phases[0].epochs if len(phases) > 1 else 0,
            "head_lr": head_lr, "batch_size": batch_size, "seed": seed, "patience": patience, "pool": pool,
            "layers": _json_layers(layers), "hidden": hidden, "dropout": dropout, "weight_decay": weight_decay,
            "warmup": warmup, "label_smoothing": label_smoothing, "clip_grad": clip_grad,
            "precision": str(optim.amp or torch.float32).removeprefix("torch."),
            "crop_seconds": data.crop / clf.sample_rate, "device": str(device),
        }
        run = Path(out) if out is not None else None
        log.info("fine-tuning %s on %s (%s): %d train / %d valid / %d test clips, %d steps per epoch",
                 settings["model"], task.name, freeze, len(data.idx), len(valid_idx), len(test_idx), data.steps_per_epoch)

        def validate(idx: np.ndarray) -> dict[str, float]:
            return evaluate_clips(clf, task, targets, data.audio, idx, eval_batch_size or batch_size, optim.amp)

        stopper = EarlyStopping(PRIMARY[task.kind], patience)
        history = _fit(clf, phases, data, lambda: validate(valid_idx), stopper, optim, run)
        clf.load_state_dict(stopper.state)
        result = FinetuneResult(clf, validate(test_idx), stopper.valid, stopper.primary, stopper.epoch, len(history),
                                history, task.summary(), settings, run)
        if run is not None:
            write_run(result, run, name)
        return result


def _check_out(model: Any, out: str | os.PathLike | None, freeze: str) -> None:
    """Refuse a freeze policy or an -o that cannot be used, before any folder is made or model loaded."""
    check_freeze_form(freeze)
    if out is None:
        return
    if not isinstance(model, Encoder) and Path(model).is_dir() and Path(model).resolve() == Path(out).resolve():
        raise ValueError(f"-o/out {out} is the model's own folder: the classifier would replace the model it "
                         "starts from; give another folder")
    # Not a folder of other files, nor one that load() reads; an earlier run's own files, or the log
    # of one that stopped, may be there.
    check_release_out(Path(out), "-o/out", own=(PARTIAL_LOG, "log.jsonl", "metrics.json"))


@dataclass
class Phase:
    """A stretch of training under one freeze policy, with its own optimiser and schedule."""

    name: str  # "head" or "finetune"
    policy: str  # the freeze policy while it runs
    epochs: int
    lr: float  # peak learning rate


def _phases(freeze: str, epochs: int, lr: float | None, head_epochs: int, head_lr: float) -> list[Phase]:
    """The head alone first (unless frozen: then that is all there is), then the freeze policy."""
    if freeze == "frozen":
        return [Phase("head", "frozen", epochs, lr if lr is not None else 1e-3)]
    head = [Phase("head", "frozen", head_epochs, head_lr)] if head_epochs else []
    return head + [Phase("finetune", freeze, epochs, lr if lr is not None else 3e-4)]


@dataclass
class StepSettings:
    """How each step optimises, the same in every phase."""

    llrd: float
    weight_decay: float
    warmup: float  # share of a phase's steps
    amp: torch.dtype | None  # autocast dtype; None: float32
    clip_grad: float
    label_smoothing: float


def _fit(clf: Classifier, phases: list[Phase], data: TrainData, validate: Callable[[], dict[str, float]],
         stopper: EarlyStopping, optim: StepSettings, run: Path | None) -> list[dict[str, Any]]:
    """Train phase after phase -> a record of every epoch; `stopper` keeps the best weights. Patience runs
    out only in the last phase: the head phase is short and always completes."""
    history: list[dict[str, Any]] = []
    if run is not None:
        (run / PARTIAL_LOG).unlink(missing_ok=True)  # a stopped run's: the first epoch starts it anew
    for i, phase in enumerate(phases):
        apply_freeze(clf, phase.policy)
        stopper.stale = 0  # fine-tuning gets `patience` epochs of its own
        opt = torch.optim.AdamW(param_groups(clf, phase.lr, optim.llrd, optim.weight_decay), lr=phase.lr)
        scaler = torch.amp.GradScaler(clf.device.type) if optim.amp == torch.float16 else None
        schedule = _schedule(phase.epochs * data.steps_per_epoch, optim.warmup)
        for epoch in range(phase.epochs):
            t0 = time.perf_counter()
            loss = train_epoch(clf, data, opt, phase.lr, schedule, epoch * data.steps_per_epoch, optim, scaler)
            valid = validate()
            record = {"epoch": len(history) + 1, "phase": phase.name, "train_loss": loss,
                      "lr": phase.lr * schedule((epoch + 1) * data.steps_per_epoch - 1),  # at its last step
                      **{f"valid_{k}": v for k, v in valid.items()}, "seconds": time.perf_counter() - t0}
            history.append(record)
            _log_epoch(record, stopper.update(valid, clf, record["epoch"]), stopper, run)
            if i == len(phases) - 1 and stopper.stale >= stopper.patience:
                log.info("stopping: validation %s and loss have not improved for %d epochs", stopper.primary,
                         stopper.patience)
                break
    return history


def _log_epoch(record: dict[str, Any], best: bool, stopper: EarlyStopping, run: Path | None) -> None:
    """One line to the log, and one to the run's log (log.jsonl once the run is written)."""
    log.info("epoch %d (%s): train loss %.4f, valid %s %.4f, loss %.4f%s", record["epoch"], record["phase"],
             record["train_loss"], stopper.primary, record[f"valid_{stopper.primary}"], record["valid_loss"],
             " (best)" if best else "")
    if run is not None:
        with open(run / PARTIAL_LOG, "a") as fh:
            fh.write(json.dumps(record) + "\n")


@dataclass
class TrainData:
    """The training clips of a task and how an epoch draws from them."""

    audio: TaskAudio
    targets: torch.Tensor  # of every item of the task
    idx: np.ndarray  # the training items
    crop: int  # samples per crop
    batch_size: int
    rng: np.random.Generator  # order and crop positions; advanced by every epoch

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.idx) / self.batch_size)


def train_epoch(clf: Classifier, data: TrainData, opt: torch.optim.Optimizer, lr: float,
                schedule: Callable[[int], float], first_step: int, optim: StepSettings, scaler: Any) -> float:
    """One pass over the training items in a new order, a random crop of each -> the mean loss.
    Step k of the phase runs each group at lr * schedule(k) * its `lr_scale`."""
    train_mode(clf)
    device = clf.device
    params = [p for g in opt.param_groups for p in g["params"]]
    order = data.rng.permutation(data.idx)
    losses = []
    for step, b in enumerate(range(0, len(order), data.batch_size)):
        idx = order[b : b + data.batch_size]
        if len(idx) < 2:  # the head's batch statistics need two items; this one trains in another epoch
            continue
        wav, lengths = batch_of([data.audio.crop(int(i), data.crop, data.rng) for i in idx], data.crop)
        for g in opt.param_groups:
            g["lr"] = lr * schedule(first_step + step) * g["lr_scale"]
        with torch.autocast(device.type, dtype=optim.amp, enabled=optim.amp is not None):
            out = clf(wav.to(device), lengths.to(device))
        loss = loss_fn(clf, out.float(), data.targets[idx].to(device), optim.label_smoothing)
        if not torch.isfinite(loss):
            fp32 = ", or train in float32 (--dtype float32, precision='fp32')" if optim.amp is not None else ""
            raise DivergedError(f"the training loss became {loss.item()} at step {first_step + step + 1} (training "
                                f"diverged): lower the learning rate (lr={lr:g}){fp32}")
        optimizer_step(loss, opt, params, scaler, optim.clip_grad)
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


class EarlyStopping:
    """Keeps the weights of the best validation score (the primary metric, ties broken by the lower
    loss) and counts the epochs since either the metric or the loss last reached a new best: a noisy
    or saturated metric alone would stop training that still improves."""

    def __init__(self, primary: str, patience: int) -> None:
        self.primary, self.patience = primary, patience
        self.key: tuple[float, float] | None = None
        self.best_loss = math.inf
        self.state: dict[str, torch.Tensor] = {}
        self.valid: dict[str, float] = {}
        self.epoch = 0
        self.stale = 0

    def update(self, valid: dict[str, float], model: nn.Module, epoch: int) -> bool:
        """Record an epoch's validation metrics; True when its weights are the best so far (kept)."""
        metric = valid[self.primary] if math.isfinite(valid[self.primary]) else -math.inf
        key = (metric, -valid["loss"])
        better = self.key is None or key > self.key
        progress = better or metric > self.key[0] or valid["loss"] < self.best_loss
        self.best_loss = min(self.best_loss, valid["loss"])
        self.stale = 0 if progress else self.stale + 1
        if better:
            self.key, self.valid, self.epoch = key, dict(valid), epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return better


def evaluate_clips(clf: Classifier, task: Any, targets: Targets, audio: TaskAudio, idx: np.ndarray, batch_size: int,
                   amp: torch.dtype | None) -> dict[str, float]:
    """Metrics of whole clips `idx` (every window), in eval mode."""
    clf.eval()
    device = clf.device
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = clf.clip_logits([audio.clip(int(i)) for i in idx], batch_size)
    return score(task, targets, clf, logits, idx)


def _schedule(total: int, warmup: float) -> Callable[[int], float]:
    """step -> factor of the peak lr: linear warm-up over a `warmup` share of `total`, then cosine to 1/100."""
    warmup_steps = max(round(warmup * total), 1)
    return lambda step: warmup_cosine(step, total, warmup_steps, 0.01)


# --------------------------------------------------------------------------- the run folder


def write_run(result: FinetuneResult, run: Path, name: str | None = None) -> Path:
    """The release (config.json, model.safetensors, README.md), metrics.json, and the epochs' log
    moved into place as log.jsonl: until then `run` holds what it held before, whole."""
    from musicssl import __version__
    from musicssl.factory import save_pretrained

    clf = result.model
    name = name or run.resolve().name
    provenance = {"finetune": {**result.settings, "task": result.task, "best_epoch": result.best_epoch},
                  "backbone": clf.args["encoder"].get("spec", {}).get("name", clf.backbone.family)}
    save_pretrained(clf, run, name=name, card=model_card(result, name), provenance=provenance)
    metrics = {"task": result.task, "primary": result.primary, "test": result.test, "valid": result.valid,
               "best_epoch": result.best_epoch, "epochs": result.epochs, "settings": result.settings,
               "musicssl_version": __version__}
    from musicssl.evaluate.report import finite_json

    atomic_write(run / "metrics.json", lambda fh: fh.write(json.dumps(finite_json(metrics), indent=2) + "\n"), "w")
    if (run / PARTIAL_LOG).exists():
        os.replace(run / PARTIAL_LOG, run / "log.jsonl")
    return run


def format_metrics(result: FinetuneResult) -> str:
    """The valid and test metrics as a Markdown table."""
    names = [k for k in result.test if k != "loss"] + ["loss"]
    rows = [f"| split | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for split, values in (("valid", result.valid), ("test", result.test)):
        rows.append(f"| {split} | " + " | ".join(f"{values[k]:.4f}" for k in names) + " |")
    return "\n".join(rows)


def model_card(result: FinetuneResult, name: str) -> str:
    """README.md of a run folder, in the house outline, with what the run knows about itself."""
    clf, s, t = result.model, result.settings, result.task
    return f"""---
library_name: musicssl
tags: [audio, music, musicssl, fine-tuned, {clf.kind}]
license: other
---

# {name}

## Model details
- `{s['model']}` fine-tuned with a {clf.kind} head over {len(clf.classes)} output(s)
  (`musicssl finetune`, freeze={s['freeze']}, lr {s['lr']:g}, layer decay {s['llrd']:g}).
- Input: mono audio at {clf.sample_rate} Hz, windows of {clf.context_seconds:g} s; `musicssl.load(folder)`
  returns the classifier, `.predict(audio)` its labels, `.embed(audio)` the backbone's embeddings.

## Intended use
Predicting the labels of task `{t.get('name')}`: {', '.join(clf.classes[:20])}{' ...' if len(clf.classes) > 20 else ''}.

## Training data
{t.get('train')} training and {t.get('valid')} validation clips of `{t.get('source')}`.

## Evaluation
Best validation epoch {result.best_epoch} of {result.epochs}; {t.get('test')} test clips:

{format_metrics(result)}

## Limitations
- Trained and scored on this task's clips only: a small test set gives noisy scores, and clips
  unlike the training ones (other recordings, sources, sample rates) may score lower.
- The backbone's own limitations apply (see the card of `{s['model']}`).

## Licence
Weights: {clf.spec.license} (those of the backbone they derive from). Code: Apache-2.0 (musicssl).
"""
