"""The `musicssl` command: argparse over the public API. `main(argv) -> int` for tests."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
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
        "embed", help="embed audio files or whole collections",
        description="Embed audio files, folders (recursive) and lists of files into OUT, mirroring their tree: "
                    "IN/a/x.wav -> OUT/a/x.wav.npz with frames (T, D), timestamps (T,) s, clip (D,) and metadata. "
                    "Finished outputs are skipped, so a killed run resumes where it stopped; OUT/manifest.jsonl "
                    "gets a line per input and OUT/run.json says how the outputs were made. Bad files are "
                    "listed in OUT/failed.txt and the exit code is 1 if any failed. "
                    "Many jobs: --shard K/N, or torchrun --nproc-per-node G -m musicssl embed ... (one per GPU).",
    )
    s.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files or folders (searched recursively)")
    s.add_argument("-o", "--out", required=True, help="output folder (mirrors the input tree)")
    s.add_argument("--files-from", metavar="LIST", help="also embed the paths in LIST, one per line ('-' reads stdin)")
    s.add_argument("--root", help="outputs mirror paths relative to this folder (default: the deepest folder "
                                  "holding every input)")
    s.add_argument("--ext", help="extensions searched in folders, comma-separated (default: every audio "
                                 "extension musicssl decodes)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"name, hf-hub:org/repo or folder (default {DEFAULT_MODEL})")
    s.add_argument("--layers", default="last", help="'last', 'all', or indices like '4,8,-1' (default last)")
    s.add_argument("--pool", choices=["none", "mean", "max"], default="none",
                   help="'mean'/'max' store only the pooled clip embedding (default none: frames too)")
    s.add_argument("--format", choices=["npz", "npy", "safetensors"], default="npz",
                   help="npz (default: frames, timestamps, clip, metadata), npy (one array: frames, or the clip "
                        "with --pool), safetensors (the npz arrays, metadata in the header)")
    s.add_argument("--table", action="store_true",
                   help="also write the clip embeddings of every input as one table: OUT/clips.parquet "
                        "(with pyarrow) or OUT/clips.npy + OUT/clips.index.tsv")
    s.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: cuda if available)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="backbone precision (default float32)")
    s.add_argument("--batch-size", type=int, default=8, help="context windows per forward pass, packed across files (default 8)")
    s.add_argument("--num-workers", type=int, default=None,
                   help="decoding processes (default 1 on CPU, up to 8 on a GPU; 0 decodes in the main process)")
    s.add_argument("--shard", metavar="K/N", help="embed only shard K of N (K from 0), split deterministically "
                                                  "by relative path: N jobs cover every file exactly once")
    s.add_argument("--overwrite", action="store_true", help="redo inputs whose output already exists")
    s.add_argument("--fail-fast", action="store_true", help="stop at the first input that fails")
    s.add_argument("--offline", action="store_true", help="never use the network (weights must be cached)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal; otherwise a log line every --log-every s)")
    s.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS", help="seconds between log lines (default 30)")

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

    from musicssl.bulk import extract

    if not args.inputs and args.files_from is None:
        raise SystemExit("musicssl embed: give audio files or folders, or --files-from LIST")
    if args.batch_size < 1:
        raise SystemExit("musicssl embed: --batch-size must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = extract(
        args.inputs, args.out, args.model, files_from=args.files_from, root=args.root,
        extensions=args.ext.split(",") if args.ext else None, layers=parse_layers(args.layers),
        pool=None if args.pool == "none" else args.pool, format=args.format, table=args.table,
        batch_size=args.batch_size, num_workers=args.num_workers, device=device,
        dtype=getattr(torch, DTYPES[args.dtype]), overwrite=args.overwrite, shard=args.shard,
        fail_fast=args.fail_fast, offline=args.offline or None, progress=args.progress, log_every=args.log_every,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        print_summary(result, args)
    return 1 if result.total == 0 else result.exit_code


def print_summary(r: Any, args: argparse.Namespace) -> None:
    """The last lines of `musicssl embed`: counts, speed, and where the failures are listed."""
    if r.total == 0:
        print(f"no audio files found in {', '.join(args.inputs) or args.files_from}", file=sys.stderr)
        return
    for path, reason in r.errors[:10]:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if len(r.errors) > 10:
        print(f"... and {len(r.errors) - 10} more errors", file=sys.stderr)
    speed = f", {r.audio_seconds / r.wall_seconds:.1f}x realtime" if r.audio_seconds else ""
    stop = " (stopped at the first failure: --fail-fast)" if r.stopped_early else ""
    print(f"{r.ok} embedded, {r.skipped} skipped, {r.failed} failed of {r.total} inputs{stop} "
          f"in {r.wall_seconds:.1f} s{speed} -> {r.out_dir}")
    for t in r.tables:
        print(f"clip table: {t}")
    if r.failed_list:
        print(f"failed inputs: {r.failed_list} (reasons in {r.manifest}); retry them with "
              f"musicssl embed --files-from {shlex.quote(str(r.failed_list))} --root {shlex.quote(str(r.root))} "
              f"-o {shlex.quote(str(r.out_dir))} --model {shlex.quote(args.model)}")


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
