"""Probes on frozen clip embeddings: linear, a small MLP and kNN, with hyper-parameters chosen on
the validation split and scores reported on the test split.

Every probe sees features standardised with the train split's mean and deviation. A probe returns
class scores (N, C) for classification, multilabel and pitch (pitch as classification over the
semitones seen in training) and predictions (N,) for regression, which `metrics.compute` scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musicssl.evaluate import metrics

PROBES = ("linear", "mlp", "knn")
LINEAR_DECAY = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 weight on the mean loss, strongest tried first
RIDGE_ALPHA = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # per training item, on standardised features
MLP_DECAY = (1e-4, 1e-2)
KNN_K = (1, 3, 5, 10, 20, 50)


@dataclass
class Split:
    """Features and targets of one split: x (N, D) float32, y as `Task.targets()` gives them."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Problem:
    """What a probe needs: the kind, the three splits, the number of outputs and, for pitch, the
    MIDI number of each class."""

    kind: str
    train: Split
    valid: Split
    test: Split
    num_classes: int = 0
    values: np.ndarray | None = None
    seed: int = 0

    @property
    def primary(self) -> str:
        return metrics.PRIMARY[self.kind]

    def score(self, split: Split, output: np.ndarray) -> dict[str, float]:
        return metrics.compute(self.kind, split.y, output, self.values)


@dataclass
class Fit:
    """A probe's result: the chosen hyper-parameters and the metrics on valid and test."""

    probe: str
    params: dict[str, Any]
    valid: dict[str, float]
    test: dict[str, float]
    seconds: float = 0.0
    tried: list[dict[str, Any]] = field(default_factory=list)


def make_problem(kind: str, x: np.ndarray, y: np.ndarray, split: np.ndarray, num_classes: int = 0,
                 seed: int = 0) -> Problem:
    """Standardise `x` (N, D) with the train rows' statistics and cut it into the three splits."""
    train = split == "train"
    mean = x[train].mean(0)
    std = x[train].std(0)
    x = ((x - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)
    parts = {s: Split(x[split == s], y[split == s]) for s in ("train", "valid", "test")}
    values = metrics.semitone_classes(parts["train"].y) if kind == "pitch" else None
    n = len(values) if values is not None else num_classes
    return Problem(kind, parts["train"], parts["valid"], parts["test"], n, values, seed)


def run_probe(name: str, problem: Problem) -> Fit:
    """Fit probe `name` for each hyper-parameter setting, keep the best on valid, score it on test."""
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; choose from {', '.join(PROBES)}")
    start = time.perf_counter()
    best: tuple[float, dict[str, Any], dict[str, float], Callable[[np.ndarray], np.ndarray]] | None = None
    tried = []
    for params, predict in _FITTERS[name](problem):
        valid = problem.score(problem.valid, predict(problem.valid.x))
        tried.append({**params, **{f"valid_{k}": v for k, v in valid.items()}})
        value = metrics.rank_value(valid[problem.primary])
        if best is None or value > best[0]:
            best = (value, params, valid, predict)
    assert best is not None
    _, params, valid, predict = best
    return Fit(name, params, valid,
               problem.score(problem.test, predict(problem.test.x)), time.perf_counter() - start, tried)


# --------------------------------------------------------------------------- linear


def _linear(problem: Problem):
    """Softmax (or per-class sigmoid) regression by L-BFGS, one fit per L2 weight, each warm-started
    from the previous (stronger) one; ridge regression in closed form for numeric targets."""
    if problem.kind == "regression":
        yield from _ridge(problem)
        return
    x = torch.from_numpy(problem.train.x).double()
    target = _class_target(problem, problem.train.y)
    w = torch.zeros(x.shape[1], problem.num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(problem.num_classes, dtype=torch.float64, requires_grad=True)
    for decay in reversed(LINEAR_DECAY):
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=100, history_size=20, tolerance_grad=1e-6,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _class_loss(problem.kind, x @ w + b, target) + 0.5 * decay * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        ww, bb = w.detach().clone(), b.detach().clone()
        yield {"l2": decay}, lambda q, ww=ww, bb=bb: (torch.from_numpy(q).double() @ ww + bb).numpy()


def _ridge(problem: Problem):
    """w(alpha) = (X'X + alpha n I)^-1 X'y for all alphas from one eigendecomposition."""
    x = problem.train.x.astype(np.float64)
    y = problem.train.y.astype(np.float64)
    y_mean = y.mean()
    s, v = np.linalg.eigh(x.T @ x)
    xty = v.T @ (x.T @ (y - y_mean))
    for alpha in RIDGE_ALPHA:
        w = v @ (xty / (s + alpha * len(x)))
        yield {"alpha": alpha}, lambda q, w=w: q.astype(np.float64) @ w + y_mean


def _class_target(problem: Problem, y: np.ndarray) -> torch.Tensor:
    if problem.kind == "multilabel":
        return torch.from_numpy(np.asarray(y, dtype=np.float64))
    if problem.kind == "pitch":
        y = metrics.nearest_class(problem.values, y)  # the nearest semitone seen in training
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def _class_loss(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1), target.to(logits.dtype))
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------- MLP


def _mlp(problem: Problem, hidden: int = 256, steps: int = 2000, every: int = 25, patience: int = 10):
    """One hidden layer (ReLU, dropout 0.1), AdamW on batches of up to 256; each setting is checked
    on valid every `every` steps and stops after `patience` checks without improvement. Counting
    steps, not epochs, gives a 300-item task as much training as a 30,000-item one."""
    regression = problem.kind == "regression"
    y_mean, y_std = (problem.train.y.mean(), problem.train.y.std() + 1e-8) if regression else (0.0, 1.0)
    target = (torch.from_numpy(((problem.train.y - y_mean) / y_std).astype(np.float32)) if regression
              else _class_target(problem, problem.train.y))
    x = torch.from_numpy(problem.train.x)
    for decay in MLP_DECAY:
        gen = torch.Generator().manual_seed(problem.seed)
        net = _mlp_net(x.shape[1], hidden, 1 if regression else problem.num_classes, gen)

        def predict(q: np.ndarray, net: nn.Module = net) -> np.ndarray:
            net.eval()
            with torch.no_grad():
                out = net(torch.from_numpy(q)).double().numpy()
            return out[:, 0] * y_std + y_mean if regression else out

        def check() -> float:
            return metrics.rank_value(problem.score(problem.valid, predict(problem.valid.x))[problem.primary])

        with torch.random.fork_rng():  # dropout draws from the global generator: seed it, then restore it
            torch.manual_seed(problem.seed)
            best_step = _train_early_stopped(net, x, target, problem.kind, decay, gen, check, steps, every, patience)
        yield {"weight_decay": decay, "hidden": hidden, "steps": best_step}, predict


def _train_early_stopped(net: nn.Module, x: torch.Tensor, target: torch.Tensor, kind: str, decay: float,
                         gen: torch.Generator, check: Callable[[], float], steps: int, every: int,
                         patience: int) -> int:
    """Train `net`, keep the weights of the best check; returns the step they come from."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=decay)
    batch = min(256, len(x))
    best, best_state, best_step, stale, step = -math.inf, None, 0, 0, 0
    while step < steps and stale < patience:
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            net.train()
            opt.zero_grad()
            _class_loss(kind, net(x[idx]), target[idx]).backward()
            opt.step()
            step += 1
            if step % every:
                continue
            value = check()
            if value > best:
                best, best_step, stale = value, step, 0
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            elif (stale := stale + 1) >= patience or step >= steps:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    return best_step


def _mlp_net(dim: int, hidden: int, out: int, gen: torch.Generator) -> nn.Module:
    net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, out))
    for m in net:
        if isinstance(m, nn.Linear):  # seeded from `gen`, not the global generator
            bound = 1.0 / math.sqrt(m.in_features)
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
    return net


# --------------------------------------------------------------------------- kNN


def _knn(problem: Problem):
    """Cosine-similarity neighbours among the train items; votes weighted by similarity."""
    train = F.normalize(torch.from_numpy(problem.train.x), dim=1)
    onehot = _neighbour_targets(problem)
    for k in (k for k in KNN_K if k <= len(train)):
        yield {"k": k}, lambda q, k=k: _knn_predict(train, onehot, q, k, problem.kind == "regression")


def _neighbour_targets(problem: Problem) -> torch.Tensor:
    """What neighbours vote with: one-hot classes (N, C), multi-hot labels, or the value (N, 1)."""
    y = problem.train.y
    if problem.kind == "regression":
        return torch.from_numpy(np.asarray(y, dtype=np.float32))[:, None]
    if problem.kind == "multilabel":
        return torch.from_numpy(np.asarray(y, dtype=np.float32))
    return F.one_hot(_class_target(problem, y), problem.num_classes).float()


def _knn_predict(train: torch.Tensor, votes: torch.Tensor, q: np.ndarray, k: int, regression: bool,
                 chunk: int = 2048) -> np.ndarray:
    """Similarity-weighted mean of the `k` nearest train items' votes: (N, C) scores, or (N,) values."""
    out = []
    for part in torch.from_numpy(q).split(chunk):
        sim, idx = (F.normalize(part, dim=1) @ train.T).topk(k, dim=1)
        weight = sim.clamp_min(0) + 1e-6  # ties and negative similarities still count a little
        out.append((weight[..., None] * votes[idx]).sum(1) / weight.sum(1, keepdim=True))
    scores = torch.cat(out).double().numpy()
    return scores[:, 0] if regression else scores


_FITTERS = {"linear": _linear, "mlp": _mlp, "knn": _knn}
