"""The `musicssl` command: argparse over the public API. `main(argv) -> int` for tests."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from musicssl import __version__
from musicssl.registry import DEFAULT_MODEL

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

log = logging.getLogger("musicssl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musicssl", description="Self-supervised music audio encoders.")
    p.add_argument("--version", action="version", version=f"musicssl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list models", description="List registered models.")
    s.add_argument("pattern", nargs="?", default="*", help="glob over names, e.g. 'jepa-*'")
    s.add_argument("--all", action="store_true", help="include architectures without released weights")
    s.add_argument("--json", action="store_true", help="print the model specs as JSON")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table (as in the README)")
    s.add_argument("--verbose", "-v", action="store_true",
                   help="also show each model's weights licence (non-commercial ones marked) and source")

    s = sub.add_parser("info", help="show one model's spec", description="Show a model's spec as JSON.")
    s.add_argument("name")

    s = sub.add_parser("download", help="fetch weights into the cache",
                       description="Download a model's pinned weights into the cache, for offline use later.")
    s.add_argument("name", help="registry name or hf-hub:org/repo[@rev]")

    s = sub.add_parser(
        "convert", help="convert an upstream checkpoint you hold into a release folder",
        description="Convert upstream weights files (e.g. MERT's pytorch_model.bin) into a musicssl release "
                    "folder (config.json, model.safetensors, README.md) that musicssl.load(OUT) reads. No network.",
    )
    s.add_argument("model", help="registry name (mert-v1-95m), family (hubert) or name prefix (mert): the fitting size is found")
    s.add_argument("files", nargs="+", metavar="FILE", help="the upstream file(s), e.g. a checkpoint and its stats json")
    s.add_argument("--out", required=True, help="release folder to write")

    s = sub.add_parser(
        "embed", help="embed audio files into .npz files",
        description="Embed audio files or folders. Each input gets OUT/<relative path>.npz with "
                    "frames (T, D), timestamps (T,) in seconds, clip (D,) and a JSON metadata string.",
    )
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files or folders (searched recursively)")
    s.add_argument("-o", "--out", required=True, help="output folder (mirrors the input tree)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"name, hf-hub:org/repo or folder (default {DEFAULT_MODEL})")
    s.add_argument("--layers", default="last", help="'last', 'all', or indices like '4,8,-1' (default last)")
    s.add_argument("--pool", choices=["none", "mean", "max"], default="none",
                   help="'mean'/'max' store only the pooled clip embedding (default none: frames too)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="backbone precision")
    s.add_argument("--batch-size", type=int, default=8, help="context windows per forward pass (default 8)")
    s.add_argument("--overwrite", action="store_true", help="redo inputs whose output already exists")
    s.add_argument("--offline", action="store_true", help="never use the network (weights must be cached)")

    s = sub.add_parser(
        "train", help="train an encoder with a self-supervised recipe",
        description="Train with a recipe. Settings come from --preset, then KEY=VALUE overrides (values "
                    "parsed as JSON: steps=2000 lr=3e-4 'backbone_args={\"depth\": 6}'). Re-running with the "
                    "same --out resumes from its checkpoint. Under torchrun, one process per device (DDP).",
    )
    s.add_argument("recipe", help="simclr | byol | vicreg | mae | jepa | pesto")
    s.add_argument("--data", default="synthetic", help="audio folder, file list (.txt/.csv), or 'synthetic'")
    s.add_argument("--preset", default=None, help="named settings, e.g. jepa-tiny (see musicssl train RECIPE --presets)")
    s.add_argument("--out", required=True, help="run folder (checkpoint.pt, config.json, log.jsonl)")
    s.add_argument("--presets", action="store_true", help="list the recipe's presets and exit")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    s = sub.add_parser("export", help="turn a training run into a release folder",
                       description="Keep only the encoder of a run (for BYOL/JEPA the EMA target) and write "
                                   "config.json, model.safetensors and a model card that musicssl.load() reads.")
    s.add_argument("run", help="run folder written by musicssl train")
    s.add_argument("--out", required=True, help="release folder to write")
    s.add_argument("--name", default=None, help="model name in the card (default: the folder name)")
    s.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    return p


def parse_layers(text: str) -> Any:
    if text in ("last", "all"):
        return text
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise SystemExit(f"musicssl embed: --layers takes 'last', 'all' or comma-separated integers, not {text!r}")


def cmd_list(args: argparse.Namespace) -> int:
    from musicssl.registry import list_models, model_info

    names = list_models(args.pattern, pretrained=not args.all)
    if args.json:
        print(json.dumps([model_info(n).to_dict() for n in names], indent=2))
        return 0
    if args.markdown:
        print(markdown_table(names))
        return 0
    for n in names:
        spec = model_info(n)
        ready = "  (default)" if n == DEFAULT_MODEL else "" if spec.pretrained else "  (no weights yet)"
        line = f"{spec.name:<20} {spec.embed_dim:>5}-d {spec.frame_rate:>7.2f} fps {spec.sample_rate:>6} Hz"
        if args.verbose:
            line += f"  licence: {licence_text(spec)}  source: {spec.source}  weights: {spec.pinning}"
        print(line + ready)
    return 0


def licence_text(spec: Any) -> str:
    """The weights' licence as the CLI shows it, with non-commercial terms called out."""
    if not spec.needs_weights:
        return "none (no weights)"
    return f"{spec.license} (NON-COMMERCIAL use only)" if spec.noncommercial else spec.license


def markdown_table(names: list[str]) -> str:
    """The README's model table: one row per registered name."""
    from musicssl.registry import model_info

    rows = ["| model | weights | sample rate | frames/s | dim | layers | context | weights licence |",
            "|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = model_info(n)
        weights = "none needed" if not s.needs_weights else (s.weights or "not released yet")
        if weights.startswith(("https://", "http://")):  # a long URL: show its file name as the link text
            weights = f"[{weights.rstrip('/').rsplit('/', 1)[-1]}]({weights})"
        rows.append(f"| `{s.name}` | {weights} | {s.sample_rate} Hz | {s.frame_rate:g} | {s.embed_dim} | "
                    f"{s.num_layers} | {s.context_seconds:g} s | {licence_text(s)} |")
    return "\n".join(rows)


def cmd_info(args: argparse.Namespace) -> int:
    from musicssl.registry import model_info

    print(json.dumps(model_info(args.name).to_dict(), indent=2))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from musicssl import hub
    from musicssl.registry import model_info

    if args.name.startswith("hf-hub:"):
        path = hub.fetch_release(args.name, offline=False)
    else:
        spec = model_info(args.name)
        if not spec.needs_weights:
            print(f"{spec.name} needs no weights")
            return 0
        if spec.weights is None:
            print(f"{spec.name} has no released weights to download", file=sys.stderr)
            return 1
        if spec.converted:  # upstream files: download, convert once, keep the converted release
            from musicssl.convert import converted_folder, load_converted

            load_converted(spec, offline=False)
            path = converted_folder(spec)
        else:
            path = hub.download(spec, offline=False)
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from musicssl.convert import convert_local

    spec, folder = convert_local(args.model, args.files, args.out)
    print(f"converted {', '.join(args.files)} as {spec.name}: {folder} (load with musicssl.load({str(folder)!r}))")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from musicssl.extract import embed_jobs, plan_jobs
    from musicssl.factory import load

    if args.batch_size < 1:
        raise SystemExit("musicssl embed: --batch-size must be at least 1")
    layers = parse_layers(args.layers)
    jobs = plan_jobs(args.inputs, args.out)
    if not jobs:
        print(f"no audio files found in {', '.join(args.inputs)}", file=sys.stderr)
        return 1
    dtype = getattr(torch, DTYPES[args.dtype])
    encoder = load(args.model, device=args.device, dtype=dtype, offline=args.offline or None)
    counts = {"ok": 0, "skipped": 0, "error": 0}
    records = embed_jobs(encoder, jobs, layers=layers, pool=None if args.pool == "none" else args.pool,
                         batch_size=args.batch_size, overwrite=args.overwrite, model_name=args.model)
    for rec in _progress(records, total=len(jobs)):
        counts[rec["status"]] += 1
        if rec["status"] == "error":
            print(f"error: {rec['input']}: {rec['reason']}", file=sys.stderr)
    print(f"{counts['ok']} embedded, {counts['skipped']} skipped (already done), {counts['error']} failed -> {args.out}")
    return 1 if counts["error"] else 0


def _progress(records, total: int):
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(records, total=total, unit="file")
    else:
        for i, rec in enumerate(records, 1):
            log.info("%d/%d %s %s", i, total, rec["status"], rec["input"])
            yield rec


def cmd_train(args: argparse.Namespace) -> int:
    from musicssl.recipes.train import parse_overrides, recipe_class, train

    if args.presets:
        for name, values in recipe_class(args.recipe).PRESETS.items():
            print(f"{name}: {json.dumps(values)}")
        return 0
    run = train(args.recipe, preset=args.preset, data=args.data, out=args.out, **parse_overrides(args.overrides))
    print(f"trained: {run} (export with: musicssl export {run} --out RELEASE_DIR)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from musicssl.recipes.export import export_run

    folder = export_run(args.run, args.out, name=args.name, dtype=torch.float16 if args.fp16 else None)
    print(f"exported: {folder} (load with musicssl.load({str(folder)!r}))")
    return 0


COMMANDS = {"list": cmd_list, "info": cmd_info, "download": cmd_download, "convert": cmd_convert,
            "embed": cmd_embed, "train": cmd_train, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Errors meant for users print one line, not a traceback."""
    from musicssl.errors import MusicsslError

    parser = build_parser()
    # KEY=VALUE overrides of `train` may come after its options, where argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except (MusicsslError, FileNotFoundError, ValueError) as err:
        print(f"musicssl {args.command}: error: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
