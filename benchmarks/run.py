"""Evaluate every model that has weights here on the benchmark tasks and rewrite the README table.

    python benchmarks/run.py --data ../shared/data/dev            # all tasks, all available models
    python benchmarks/run.py --data DIR --models mfcc,simclr-mini --no-readme

Models: the baselines, every registered model whose weights load here (the bundled default, ports
whose weights are cached; `--download` fetches the others first), and `simclr-mini:random` (the
default's architecture at random initialisation). Layers: all, the best chosen on valid. Probes:
linear, MLP, kNN. Results: `benchmarks/results/<task>.json` (everything) and `results.md` (the
tables); the README's table shows the linear probe. `--finetune` also fine-tunes the default model
on each task, or the tasks it lists (`musicssl finetune`, all layers trained), for the row that
compares it with its probe.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import musicssl
from musicssl.errors import MusicsslError
from musicssl.evaluate import evaluate, format_table, write_outputs

HERE = Path(__file__).resolve().parent
TASKS = ["soundtrack-source", "notes-family", "notes-pitch", "notes-velocity", "drums-class", "chorales-key",
         "chorales-instruments"]
RANDOM = "simclr-mini:random"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
log = logging.getLogger("benchmarks")


def available_models(offline: bool) -> tuple[list[str], dict[str, str]]:
    """Registered models whose weights load here, and why the others do not."""
    ready, missing = [], {}
    for name in musicssl.list_models():
        try:
            musicssl.load(name, offline=offline)
            ready.append(name)
        except MusicsslError as err:
            missing[name] = str(err).splitlines()[0][:160]
    return ready, missing


def run_eval(tasks: list[str], models: list[str], data: Path, out: Path, cache: Path | None) -> dict[str, dict]:
    results = {}
    for t in tasks:
        start = time.perf_counter()
        r = evaluate(HERE / f"{t}.csv", models, layers="all", root=data, cache=cache)
        write_outputs(r, out)
        log.info("%s done in %.0f s\n%s\n", t, time.perf_counter() - start, format_table(r))
        results[t] = r.to_dict()
    return results


def run_finetune(tasks: list[str], data: Path, out: Path) -> dict[str, dict]:
    from musicssl.finetune import finetune

    done = {}
    for t in tasks:
        r = finetune(HERE / f"{t}.csv", model=musicssl.registry.DEFAULT_MODEL, out=out / "finetuned" / t, root=data)
        done[t] = {"test": r.test, "valid": r.valid, "epochs": r.epochs}
        (out / "finetuned" / f"{t}.json").write_text(json.dumps(done[t], indent=1, sort_keys=True) + "\n")
    return done


def table(results: dict[str, dict], tuned: dict[str, dict], missing: dict[str, str]) -> str:
    """Markdown: a row per model, the linear probe's test metric per task (best layer on valid)."""
    tasks = list(results)
    models = [m["model"] for m in next(iter(results.values()))["models"]]
    head = [f"{t}<br>{results[t]['primary']}" for t in tasks]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(tasks)]
    for i, m in enumerate(models):
        cells = [f"{results[t]['models'][i]['best']['linear']['test'][results[t]['primary']]:.3f}" for t in tasks]
        lines.append(f"| `{m}` linear probe | " + " | ".join(cells) + " |")
    if tuned:
        cells = [f"{tuned[t]['test'][results[t]['primary']]:.3f}" if t in tuned else "-" for t in tasks]
        lines.append(f"| `{musicssl.registry.DEFAULT_MODEL}` fine-tuned | " + " | ".join(cells) + " |")
    note = ("\n\nNot run (weights not available on the machine that made the table): "
            + ", ".join(f"`{n}`" for n in sorted(missing)) + "." if missing else "")
    return "\n".join(lines) + note


def rewrite_readme(readme: Path, text: str) -> None:
    body = readme.read_text()
    if START not in body or END not in body:
        sys.exit(f"{readme} has no {START} ... {END} section to fill")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", body, flags=re.S)
    readme.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "dev",
                   help="the dev set's folder (holds audio/)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--models", default=None, help="comma-separated (default: baselines, everything loadable, "
                                                  f"{RANDOM})")
    p.add_argument("--download", action="store_true",
                   help="download the weights of models not cached yet (default: cached and bundled only)")
    p.add_argument("--finetune", nargs="?", const="all", default=None, metavar="TASKS",
                   help="also fine-tune the default model on these tasks (comma-separated; default: all)")
    p.add_argument("--cache", type=Path, default=None, help="embedding cache (default: musicssl's)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tasks = a.tasks.split(",")
    missing: dict[str, str] = {}
    if a.models:
        models = a.models.split(",")
    else:
        ready, missing = available_models(offline=not a.download)
        models = ready + [RANDOM]
    results = run_eval(tasks, models, a.data, a.out, a.cache)
    tuned = run_finetune(tasks if a.finetune == "all" else a.finetune.split(","), a.data, a.out) if a.finetune else {}
    text = table(results, tuned, missing)
    (a.out / "results.md").write_text(text + "\n\n" + "\n\n".join(
        format_table_from_json(r) for r in results.values()) + "\n")
    print(text)
    if not a.no_readme:
        rewrite_readme(a.readme, text)


def format_table_from_json(result: dict) -> str:
    """Every probe's numbers for one task, from its JSON record."""
    t = result["task"]
    lines = [f"### {t['name']} ({t['kind']}; {t['train']} train / {t['valid']} valid / {t['test']} test)", "",
             "| model | linear | layer | MLP | layer | kNN | layer |", "|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        cells = []
        for probe in ("linear", "mlp", "knn"):
            cells += [f"{m['best'][probe]['test'][result['primary']]:.3f}", str(m["best_layer"][probe])]
        lines.append(f"| `{m['model']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
