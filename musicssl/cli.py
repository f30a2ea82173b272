"""The `musicssl` command: argparse over the public API. `main(argv) -> int` for tests."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from typing import Any, Sequence

from musicssl import __version__, signals
from musicssl.registry import DEFAULT_MODEL

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

log = logging.getLogger("musicssl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musicssl", description="Self-supervised music audio encoders.")
    p.add_argument("--version", action="version", version=f"musicssl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_model_parsers(sub)
    add_embed_parser(sub)
    add_train_parsers(sub)
    add_eval_parser(sub)
    add_finetune_parser(sub)
    return p


def add_model_parsers(sub: Any) -> None:
    """list, info, download and convert."""
    s = sub.add_parser("list", help="list models", description="List registered models.")
    s.add_argument("pattern", nargs="?", default="*",
                   help="glob over names, e.g. 'jepa-*'; without * ? or [ a part of the name, e.g. mert")
    s.add_argument("--all", action="store_true", help="include architectures without released weights")
    s.add_argument("--json", action="store_true", help="print the model specs as JSON")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table (as in the README)")
    s.add_argument("--verbose", "-v", action="store_true",
                   help="also show each model's weights licence (non-commercial ones marked) and source")

    s = sub.add_parser("info", help="show one model's spec",
                       description="Show a model's spec as JSON; for a release, what its config.json says "
                                   "(its weights are not downloaded).")
    s.add_argument("name", help="registry name, hf-hub:org/repo[@rev] or release folder")

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


def add_embed_parser(sub: Any) -> None:
    s = sub.add_parser(
        "embed", help="embed audio files or whole collections",
        description="Embed audio files, folders (recursive) and lists of files into OUT, mirroring their tree: "
                    "IN/a/x.wav -> OUT/a/x.wav.npz with frames (T, D), timestamps (T,) s, clip (D,) and metadata "
                    "((L, T, D) and (L, D) with several --layers). "
                    "Finished outputs are skipped, so a killed run resumes where it stopped; OUT/manifest.jsonl "
                    "gets a line per input and OUT/run.json says how the outputs were made. Bad files are "
                    "listed in OUT/failed.txt; the exit code is 1 if any failed, a folder could not be read, or the "
                    "run stopped early (--fail-fast, a full disk). "
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
                   help="decoding processes (default: up to 8 on a GPU; on CPU 1, or 0 with two cores or "
                        "fewer, where a decoder beside the model slows it more than it saves; by default more "
                        "are added while the run waits for decoded audio). In a process, a file that crashes or "
                        "hangs its decoder fails alone; 0 decodes in the main process")
    s.add_argument("--decode-timeout", type=_seconds_or_none, default=600.0, metavar="SECONDS",
                   help="with decoding processes: stop and fail a file whose decoding takes longer "
                        "(default 600; 0: no limit). With --num-workers 0 the file is named in the log instead")
    s.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile, batches padded to a few shapes so it compiles once")
    s.add_argument("--shard", metavar="K/N", help="embed only shard K of N (K from 0), split deterministically "
                                                  "by relative path: N jobs cover every file exactly once")
    s.add_argument("--overwrite", action="store_true", help="redo inputs whose output already exists")
    s.add_argument("--fail-fast", action="store_true", help="stop at the first input that fails")
    s.add_argument("--offline", action="store_true", help="never use the network (weights must be cached)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal; otherwise a log line every --log-every s)")
    s.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS", help="seconds between log lines (default 30)")


def add_train_parsers(sub: Any) -> None:
    """train and export."""
    s = sub.add_parser(
        "train", help="train an encoder with a self-supervised recipe",
        description="Train with a recipe. Settings come from --preset, then KEY=VALUE overrides (values "
                    "parsed as JSON: steps=2000 lr=3e-4 'backbone_args={\"depth\": 6}'). Re-running with the "
                    "same --out resumes from its checkpoint. Under torchrun, one process per device (DDP).",
    )
    s.add_argument("recipe", help="simclr | byol | vicreg | mae | jepa | pesto")
    s.add_argument("--data", default="synthetic", help="audio folder or file list (.txt/.csv); default 'synthetic': "
                                                       "tones made on the fly, for trying a recipe out")
    s.add_argument("--preset", default=None, help="named settings, e.g. jepa-tiny (see musicssl train RECIPE --presets)")
    s.add_argument("--out", default=None, help="run folder (checkpoint.pt, config.json, log.jsonl); required "
                                               "unless --presets")
    s.add_argument("--presets", action="store_true", help="list the recipe's presets and exit")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    s = sub.add_parser("export", help="turn a training run into a release folder",
                       description="Keep only the encoder of a run (for BYOL/JEPA the EMA target) and write "
                                   "config.json, model.safetensors and a model card that musicssl.load() reads.")
    s.add_argument("run", help="run folder written by musicssl train")
    s.add_argument("--out", required=True, help="release folder to write")
    s.add_argument("--name", default=None, help="model name in the card (default: the folder name)")
    s.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")


def add_eval_parser(sub: Any) -> None:
    s = sub.add_parser(
        "eval", help="probe frozen embeddings of models on labelled tasks",
        description="Evaluate models on tasks with probes on frozen clip embeddings (linear, MLP, kNN). A task "
                    "is a CSV with columns path,label[,split][,group] (labels: a class, classes joined by ';' "
                    "for multi-label, or a number for regression; an optional TASK.json beside it may say "
                    "{\"kind\": \"pitch\"}) or a folder with a subfolder per class. Missing splits are made "
                    "(stratified, seeded; whole groups). Hyper-parameters and the best layer are chosen on "
                    "valid, metrics reported on test. Embeddings are cached, so re-runs only probe. Writes "
                    "OUT/<task>.json and OUT/<task>.png (with matplotlib).",
    )
    s.add_argument("tasks", nargs="+", metavar="TASK", help="task CSV files or class folders")
    s.add_argument("--models", default=DEFAULT_MODEL,
                   help=f"comma-separated names, hf-hub ids, folders or NAME:random (default {DEFAULT_MODEL})")
    s.add_argument("--layers", default="recommended",
                   help="'recommended' (default: each model's card), 'last', 'all' or indices like '4,8,-1'")
    s.add_argument("--probes", default="linear,mlp,knn", help="comma-separated from linear, mlp, knn (default all)")
    s.add_argument("-o", "--out", default=None, help="folder for the JSON results and plots (default: print only)")
    add_task_options(s)
    s.add_argument("--pool", choices=["mean", "max"], default="mean", help="clip pooling of frames (default mean)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the probes and of made splits (default 0)")
    s.add_argument("--cache", default=None, help="embedding cache folder (default <musicssl cache>/embeddings)")
    s.add_argument("--device", default=None, help="torch device for embedding (default: cuda if available)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="backbone precision (default float32)")
    s.add_argument("--batch-size", type=int, default=8, help="files embedded per batch (default 8)")
    s.add_argument("--offline", action="store_true", help="never use the network (weights must be cached)")


def add_task_options(s: argparse.ArgumentParser) -> None:
    """How `eval` and `finetune` read a task file."""
    s.add_argument("--root", default=None, help="folder that relative paths in task CSVs start from "
                                                "(default: each CSV's folder)")
    s.add_argument("--kind", choices=["classification", "multilabel", "regression", "pitch"], default=None,
                   help="task kind (default: from TASK.json, else read from the labels)")
    s.add_argument("--label", default=None, help="label column of the CSV (default 'label')")
    s.add_argument("--group", default=None, help="column naming what must stay in one split when splits are made "
                                                 "(a track, a kit, a fold; default 'group')")


def add_finetune_parser(sub: Any) -> None:
    s = sub.add_parser(
        "finetune", help="fine-tune a model on a labelled task",
        description="Fine-tune a model on a task (a CSV with columns path,label[,split][,group], or a folder "
                    "with a subfolder per class): a head over a learned weighted sum of the model's layers, "
                    "trained on random crops of its context window and scored on whole clips. The head first "
                    "trains alone (--head-epochs), then with the blocks --freeze opens, each block at a learning "
                    "rate decayed by depth (--llrd). Stops early when the validation score (accuracy, mAP, R2 or "
                    "raw pitch accuracy) stops improving, keeps the best weights and prints the test metrics. "
                    "OUT is a release folder: musicssl.load(OUT) gives "
                    "the classifier (backbone + head, .predict(audio)); OUT also holds metrics.json and log.jsonl.",
    )
    s.add_argument("task", help="task CSV or class folder")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"name, hf-hub:org/repo or folder (default {DEFAULT_MODEL})")
    s.add_argument("-o", "--out", required=True, help="run folder to write (a release folder that musicssl.load reads)")
    s.add_argument("--freeze", default="full", help="what trains besides the head: 'frozen' (nothing), 'last-N' (the "
                                                    "last N blocks, e.g. last-2) or 'full' (everything; default)")
    s.add_argument("--epochs", type=int, default=30, help="most passes over the training clips in fine-tuning, "
                                                          "after the --head-epochs (default 30)")
    s.add_argument("--patience", type=int, default=10,
                   help="stop after this many epochs in which neither the validation score nor the validation "
                        "loss improved (default 10); the weights of the best validation score are kept")
    s.add_argument("--head-epochs", type=int, default=5,
                   help="unless frozen, epochs of training the head alone first, at 1e-3 (default 5; 0: none)")
    s.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the head and the last block (default 1e-3 frozen, else 3e-4)")
    s.add_argument("--llrd", type=float, default=0.75,
                   help="layer-wise decay: block i of L trains at lr * llrd^(L - i) (default 0.75; 1 = none)")
    s.add_argument("--batch-size", type=int, default=16, help="crops per step (default 16)")
    s.add_argument("--layers", default="all", help="layers mixed by learned weights: 'all' (default), 'last' or "
                                                   "indices like '4,8,-1'")
    s.add_argument("--pool", choices=["mean", "max"], default="mean", help="pooling over frames (default mean)")
    s.add_argument("--hidden", type=int, default=0, help="width of a hidden layer in the head (default 0: linear)")
    add_task_options(s)
    s.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    s.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="training precision: auto (bfloat16 autocast on CUDA, float32 elsewhere; default), "
                        "float32, bfloat16 or float16 (autocast with loss scaling); weights stay float32")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the head, the crops and their order (default 0)")
    s.add_argument("--offline", action="store_true", help="never use the network (weights must be cached)")


def _seconds_or_none(text: str) -> float | None:
    """--decode-timeout: seconds > 0, or 0 for no limit."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (0: no limit), not {text!r}")
    return value or None


def _seed(text: str) -> int:
    """--seed: a whole number in [0, 2**32), as numpy and torch both take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), not {text}")
    return value


def parse_layers(text: str, command: str = "embed", named: tuple[str, ...] = ("last", "all")) -> Any:
    if text in named:
        return text
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers takes {', '.join(map(repr, named))} or comma-separated integers, "
                         f"not {text!r}") from None


def cmd_list(args: argparse.Namespace) -> int:
    from musicssl.registry import list_models, model_info

    names = list_models(args.pattern, pretrained=not args.all)
    if args.json:
        print(json.dumps([model_info(n).to_dict() for n in names], indent=2))
        return 0
    if args.markdown:
        print(markdown_table(names))
        return 0
    if not names:
        hint = "" if args.all else "; --all also lists architectures without weights"
        print(f"no model matches {args.pattern!r}{hint}", file=sys.stderr)
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
    from musicssl.factory import is_registry_name, release_info
    from musicssl.registry import model_info

    info = model_info(args.name).to_dict() if is_registry_name(args.name) else release_info(args.name)
    print(json.dumps(info, indent=2))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from musicssl import hub
    from musicssl.registry import model_info

    if hub.is_offline():  # offline means no requests, for this command too
        raise ValueError(f"musicssl is offline ({hub.offline_reason(None)}): unset it to download {args.name}")
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
    from musicssl.devices import default_device

    if not args.inputs and args.files_from is None:
        raise ValueError("give audio files or folders, or --files-from LIST")
    device = args.device or default_device()
    result = extract(
        args.inputs, args.out, args.model, files_from=args.files_from, root=args.root,
        extensions=[e.strip() for e in args.ext.split(",") if e.strip()] if args.ext else None,
        layers=parse_layers(args.layers),
        pool=None if args.pool == "none" else args.pool, format=args.format, table=args.table,
        batch_size=args.batch_size, num_workers=args.num_workers, decode_timeout=args.decode_timeout, device=device,
        dtype=getattr(torch, DTYPES[args.dtype]), overwrite=args.overwrite, shard=args.shard,
        fail_fast=args.fail_fast, offline=args.offline or None, progress=args.progress, log_every=args.log_every,
        compile=args.compile,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        try:
            print_summary(result, args)
            if sys.stdout is not None:
                sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as err:  # stdout on a full disk
            from musicssl.errors import OutputPathError

            raise OutputPathError(f"cannot write the summary to standard output ({err.strerror or err}); the run "
                                  f"itself ended: its manifest {result.manifest} says what was done") from err
    return result.exit_code


# ExtractResult.stages, as the summary names them: what bounds a run.
STAGES = {"model": "model", "decoding": "waiting for decoded audio", "writing": "waiting for writes",
          "host": "stitching and bookkeeping"}


def print_summary(r: Any, args: argparse.Namespace) -> None:
    """The last lines of `musicssl embed`: counts, speed, and where the failures are listed."""
    if r.found and not r.planned:  # a shard that got no files: its share of the work is done
        print(f"0 of {r.found} inputs fall in shard {args.shard}: nothing to do -> {r.out_dir}")
        _say_unreadable(r)
        return
    if r.found == 0:  # the run said so in a warning
        _say_unreadable(r)
        return
    from musicssl.bulk.outputs import printable

    for path, reason in r.errors[:10]:  # reasons mostly name their file already
        print(printable(f"error: {reason if reason.startswith(path) else f'{path}: {reason}'}"), file=sys.stderr)
    if len(r.errors) > 10:
        print(f"... and {len(r.errors) - 10} more errors", file=sys.stderr)
    if r.audio_seconds and sum(r.stages.values()) > 0:
        total = sum(r.stages.values())
        shares = sorted(((v, k) for k, v in r.stages.items() if k in STAGES), reverse=True)  # the bound first
        print("time: " + ", ".join(f"{STAGES[k]} {100 * v / total:.0f} %" for v, k in shares))
    speed = f", {r.audio_seconds / r.wall_seconds:.1f}x realtime" if r.audio_seconds else ""
    stop = f" (stopped {r.stop_reason or 'early'})" if r.stopped_early else ""
    left = f", {r.planned - r.total} not started" if r.planned > r.total else ""
    print(f"{r.ok} embedded, {r.skipped} skipped, {r.failed} failed of {r.planned} inputs{left}{stop} "
          f"in {r.wall_seconds:.1f} s{speed} -> {r.out_dir}")
    for t in r.tables:
        print(f"clip table: {t}")
    if r.warned:
        print(f"{r.warned} of the embedded inputs decoded with a warning (e.g. damaged, used up to the damage): "
              f"their manifest lines say what, in \"warning\" ({r.manifest})")
    if left:
        print(f"the same command carries on with the {r.planned - r.total} inputs not started")
    _say_unreadable(r)
    if r.failed_list:
        print(f"failed inputs: {r.failed_list} (reasons in {r.manifest}); retry them with "
              f"musicssl embed --files-from {shlex.quote(str(r.failed_list))} --root {shlex.quote(str(r.root))} "
              f"-o {shlex.quote(str(r.out_dir))} --model {shlex.quote(args.model)}{settings_flags(args)}")


def _say_unreadable(r: Any) -> None:
    """What the search of the input folders could not read, and so did not embed."""
    from musicssl.bulk.outputs import printable

    if not r.unreadable:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in r.unreadable[:5])
    more = f"; and {len(r.unreadable) - 5} more (in the log above)" if len(r.unreadable) > 5 else ""
    print(printable(f"{len(r.unreadable)} folders or files in the inputs could not be read, so what they hold was "
                    f"not embedded: {shown}{more}. Make them readable and run the same command again (finished "
                    "outputs are skipped)"), file=sys.stderr)


def settings_flags(args: argparse.Namespace) -> str:
    """The options of an `embed` run that its output folder holds it to (SAME_RUN_KEYS), as given."""
    given = {"--layers": (args.layers, "last"), "--pool": (args.pool, "none"), "--format": (args.format, "npz"),
             "--dtype": (DTYPES[args.dtype], "float32")}
    return "".join(f" {flag} {shlex.quote(value)}" for flag, (value, default) in given.items() if value != default)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from musicssl.devices import default_device
    from musicssl.evaluate import evaluate, format_table, write_outputs

    models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))  # each once
    if not models:
        raise ValueError("--models names no model")
    layers = parse_layers(args.layers, "eval", ("recommended", "last", "all"))
    device = args.device or default_device()
    missing = [t for t in args.tasks if not os.path.exists(os.path.expanduser(t))]
    if missing:  # said before the first task's work (and before -o is made), not after it
        raise ValueError(f"task {missing[0]} does not exist{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                         "give a task CSV (its TASK.json, if any, beside it) or a folder with a subfolder per class")
    if args.out:
        from pathlib import Path

        from musicssl.bulk.outputs import make_out_dir

        make_out_dir(Path(args.out).expanduser(), "-o")  # before the work, not after it
    used: set[str] = set()
    for task in args.tasks:
        result = evaluate(
            task, models, layers=layers, probes=[p.strip() for p in args.probes.split(",")], pool=args.pool,
            seed=args.seed, cache=args.cache, device=device, dtype=getattr(torch, DTYPES[args.dtype]),
            batch_size=args.batch_size, offline=args.offline or None, root=args.root, kind=args.kind,
            label=args.label, group=args.group,
        )
        print(format_table(result) + "\n")
        if args.out:
            unique = _unused_name(result.task["name"], used)  # two tasks both named task.csv
            for path in write_outputs(result, args.out, unique).values():
                print(f"wrote {path}")
    return 0



def _unused_name(name: str, used: set[str]) -> str:
    """`name`, or name-2, name-3, ... the first that no earlier task of the run took; taken into `used`."""
    n, unique = 1, name
    while unique in used:
        n += 1
        unique = f"{name}-{n}"
    used.add(unique)
    return unique


def cmd_finetune(args: argparse.Namespace) -> int:
    from musicssl.finetune import finetune, format_metrics

    layers = parse_layers(args.layers, "finetune")
    r = finetune(
        args.task, model=args.model, out=args.out, freeze=args.freeze, epochs=args.epochs, lr=args.lr,
        llrd=args.llrd, head_epochs=args.head_epochs, batch_size=args.batch_size, device=args.device,
        seed=args.seed, patience=args.patience, kind=args.kind, label=args.label, root=args.root, group=args.group,
        pool=args.pool,
        layers=layers, hidden=args.hidden, precision=args.dtype, offline=args.offline or None,
    )
    t = r.task
    print(f"fine-tuned {r.settings['model']} on {t['name']} ({t['kind']}, {t['train']} train / {t['valid']} valid / "
          f"{t['test']} test clips, freeze={args.freeze}): best validation {r.primary} at epoch {r.best_epoch} "
          f"of {r.epochs}")
    print(format_metrics(r))
    print(f"saved: {r.out} (load with musicssl.load({str(r.out)!r}))")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from musicssl.recipes.train import parse_overrides, recipe_class, train

    if args.presets:
        for name, values in recipe_class(args.recipe).PRESETS.items():
            print(f"{name}: {json.dumps(values)}")
        return 0
    if args.out is None:
        raise ValueError("--out RUN_DIR is required: the run folder to write (or resume)")
    overrides = parse_overrides(args.overrides)
    given = sorted(set(overrides) & {"recipe", "preset", "data", "out"})
    if given:
        raise ValueError(f"{', '.join(f'{k}=' for k in given)}: give these as the recipe argument and --preset, "
                         "--data, --out, not as KEY=VALUE settings")
    run = train(args.recipe, preset=args.preset, data=args.data, out=args.out, **overrides)
    print(f"trained: {run} (export with: musicssl export {run} --out RELEASE_DIR)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from musicssl.recipes.export import export_run

    folder = export_run(args.run, args.out, name=args.name, dtype=torch.float16 if args.fp16 else None)
    print(f"exported: {folder} (load with musicssl.load({str(folder)!r}))")
    return 0


COMMANDS = {"list": cmd_list, "info": cmd_info, "download": cmd_download, "convert": cmd_convert,
            "embed": cmd_embed, "train": cmd_train, "export": cmd_export, "eval": cmd_eval,
            "finetune": cmd_finetune}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Errors meant for users print one line, not a traceback."""
    from musicssl.errors import MusicsslError

    parser = build_parser()
    # KEY=VALUE overrides of `train` may come after its options, where argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        unknown = [e for e in extra if args.command != "train" or e.startswith("-") or "=" not in e]
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        raise  # a reader that stopped reading: run() ends quietly
    except (MusicsslError, OSError, ValueError) as err:  # OSError: a disk, a permission, a missing file
        print(f"musicssl {args.command}: error: {err}", file=sys.stderr)
        return 2


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `command`, whose usage line an error about its options should print."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices.get(command, parser)


def run() -> None:
    """Console-script entry point. Ctrl-C (or SIGTERM) ends with one line and status 130 (143), as a
    shell's commands do, saying what survives (outputs are renamed into place whole, so nothing is
    left half-written)."""
    from musicssl.heap import keep_freed_memory

    # Our progress and notes at INFO; other libraries' only from WARNING (torch printed its compiler's
    # cache statistics at exit after a Ctrl-C).
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("musicssl").setLevel(logging.INFO)
    # huggingface_hub adds its own stderr handler on first use: through ours as well, each of its
    # lines (retries of a download) would print twice.
    logging.getLogger("huggingface_hub").propagate = False
    keep_freed_memory()  # this process is ours: reuse freed pages across batches (see heap.py)
    stops = signals.catch()
    try:
        code = main()
        code = _flush_stdout(code)  # here, where a closed pipe is caught below, not at exit
        signals.check()  # a signal whose KeyboardInterrupt was lost (see musicssl.signals) still ends it
        sys.exit(code)
    except KeyboardInterrupt:
        what, status = signals.STOP_SIGNALS[stops[0] if stops else signal.SIGINT]
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        print(f"\nmusicssl {command}: {what}{RESUMES.get(command, '')}", file=sys.stderr)
        sys.exit(status)
    except BrokenPipeError:  # `musicssl list | head` stopped reading: end quietly, as shell commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(128 + signal.SIGPIPE)


def _flush_stdout(code: int) -> int:
    """Flush what the command printed -> its exit code, or 1 if its report could not be written (a
    full disk): the work stands, the report is lost, and a script must not take it for success."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): nothing was printed
        return code
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        print(f"musicssl: cannot write to standard output: {err.strerror or err}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return code or 1
    return code


# What an interrupted command leaves to build on.
RESUMES = {"embed": "; finished outputs are kept, and the same command carries on from them",
           "train": "; the same command resumes from the last checkpoint",
           "eval": "; embeddings computed so far are cached for the next run",
           "finetune": "; -o keeps what it held before, and its log.partial.jsonl has this run's epochs so far"}


if __name__ == "__main__":  # `python -m musicssl.cli ...` (as `python -m musicssl ...`)
    run()
