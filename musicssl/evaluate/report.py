"""Readable results: a table per task, the JSON record, and a metric-per-layer plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from musicssl.bulk.outputs import atomic_write

if TYPE_CHECKING:
    from musicssl.evaluate.run import EvalResult

log = logging.getLogger(__name__)


def format_table(result: EvalResult) -> str:
    """A Markdown table: a row per model and probe with the best layer (chosen on valid) and its
    test metrics."""
    metrics = sorted({k for m in result.models for p in m.best_layer for k in m.best(p).test},
                     key=lambda k: (k != result.primary, k))
    head = ["model", "probe", "layer", *[f"test {k}" for k in metrics], f"valid {result.primary}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result.models:
        for probe, layer in m.best_layer.items():
            fit = m.best(probe)
            cells = [m.model, probe, str(layer), *[_num(fit.test.get(k)) for k in metrics],
                     _num(fit.valid[result.primary])]
            rows.append("| " + " | ".join(cells) + " |")
    t = result.task
    title = f"{t['name']} ({t['kind']}, {t['train']} train / {t['valid']} valid / {t['test']} test)"
    return title + "\n\n" + "\n".join(rows)


def _num(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def write_json(result: EvalResult, path: Path) -> Path:
    """The result as strict JSON: an undefined metric (NaN) is null, which every JSON reader takes."""
    text = json.dumps(finite_json(result.to_dict()), indent=1, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text), "w")
    return path


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float made None (JSON null), in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def plot_layers(result: EvalResult, path: Path) -> Path | None:
    """Test metric per layer, a line per model and a panel per probe, the layer picked on valid
    circled. None (and a log line) when matplotlib is not installed."""
    try:
        # A Figure of its own, not pyplot: no window, no display needed, and the caller's backend
        # (a notebook's, say) left as it was.
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    probes = list(result.models[0].best_layer) if result.models else []
    fig = Figure(figsize=(4.5 * max(len(probes), 1), 3.6))
    axes = fig.subplots(1, max(len(probes), 1), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        for m in result.models:
            ys = [m.fits[l][probe].test[result.primary] for l in m.layers]
            (line,) = ax.plot(m.layers, ys, marker=".", label=m.model)
            best = m.best_layer[probe]
            ax.plot([best], [m.fits[best][probe].test[result.primary]], "o", mfc="none", ms=10, color=line.get_color())
        ax.set(title=probe, xlabel="layer", ylabel=f"test {result.primary}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(result.task["name"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), "wb")
    return path
