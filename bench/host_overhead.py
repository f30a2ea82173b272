"""What `musicssl embed` costs per file besides the model: the ceiling of any run on this machine.

    python bench/host_overhead.py                               # outputs shaped like simclr-mini and mert-v1-330m
    python bench/host_overhead.py --like mert-v1-95m --device cuda --num-workers 8

A stand-in model that does no work (its frames are strided input samples, written out at the full
size of the named model's frames: its rate, width and windows) runs through `musicssl.extract` on
`--minutes` of music, so what is left is the pipeline's own work: decoding, packing windows,
stitching frames, pooling the clip, writing outputs and the manifest. The table gives milliseconds
per file, the x-realtime that caps a run of a real model on these files, and the loop's time split
as `ExtractResult.stages` names it (decoding: waiting for decoded audio; writing: waiting for the
writer threads; host: the rest of the loop's own work). On a GPU the stand-in's frames are made on
the device and copied back as a real model's are; a real model on that machine runs at most at the
rate given here, so when its model-only rate is near this, the host is what bounds it.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from musicssl.audio.io import audio_info
from musicssl.bulk import extract
from musicssl.heap import keep_freed_memory
from musicssl.models.base import Encoder, conv_frames
from musicssl.registry import DEFAULT_MODEL, model_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_speed import DATA, pick_files, stage  # noqa: E402 -- a script beside this one


class NullEncoder(Encoder):
    """No compute: frames (B, T, D) of a named model's rate, width and window, from strided input
    samples (so they differ per file and the clip is not constant)."""

    family = "null"

    def __init__(self, like: str):
        super().__init__()
        spec = model_info(like)
        self.sample_rate, self.embed_dim, self.num_layers = spec.sample_rate, spec.embed_dim, 1
        self.hop_length = round(spec.sample_rate / spec.frame_rate)
        self.context_seconds, self.overlap_seconds = spec.context_seconds, 0.0
        self.args = {"like": like}
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so .to(device) moves something

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_frames(lengths, self.hop_length)

    def forward_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        T = int(self.frame_lengths(torch.tensor([wav.shape[1]]))[0])
        x = torch.nn.functional.pad(wav[:, :: self.hop_length], (0, T))[:, :T]
        return [x[:, :, None].expand(-1, T, self.embed_dim).contiguous()]


def run_once(folder: Path, out: Path, enc: NullEncoder, args: argparse.Namespace) -> tuple[float, dict[str, float], int]:
    start = time.perf_counter()
    res = extract([folder], out, enc, batch_size=args.batch_size, num_workers=args.num_workers, format=args.format,
                  layers="last", progress=False)
    spent = time.perf_counter() - start
    assert res.ok and not res.failed, f"{res.failed} files failed"
    return spent, res.stages, res.ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", nargs="+", default=[DEFAULT_MODEL, "mert-v1-330m"],
                   help="models whose output shapes the stand-in takes (default: the default model and MERT-330M)")
    p.add_argument("--data", type=Path, default=DATA, help="folder of music (default: the dev soundtrack clips)")
    p.add_argument("--minutes", type=float, default=20.0, help="audio to use (default 20 min)")
    p.add_argument("--codec", choices=["copy", "mp3", "opus"], default="copy",
                   help="copy the files as they are (default), or transcode them with ffmpeg first")
    p.add_argument("--format", choices=["npz", "npy", "safetensors"], default="npz")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=None, help="decoding processes (default: extract's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    heap = keep_freed_memory()  # as the `musicssl` command does
    print(f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.format}, freed memory kept: {heap}; median of {args.repeats} runs")
    print("| outputs like | frames per file | files | ms per file | x-realtime cap | decoding | writing | host | model |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "music"
        stage(pick_files(args.data, args.minutes), folder, args.codec)
        seconds = sum(audio_info(f).duration for f in folder.iterdir())
        for like in args.like:
            enc = NullEncoder(like).to(args.device).eval()
            run_once(folder, Path(tmp) / "warm", enc, args)  # warm-up: imports, allocator, page cache
            shutil.rmtree(Path(tmp) / "warm")
            times, stages = [], []
            for i in range(args.repeats):
                spent, split, n = run_once(folder, Path(tmp) / f"out{i}", enc, args)
                times.append(spent)
                stages.append(split)
                shutil.rmtree(Path(tmp) / f"out{i}")
            t = statistics.median(times)
            share = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in ("decoding", "writing", "host", "model")}
            total = sum(share.values()) or 1.0
            frames = enc.frame_rate * seconds / n
            print(f"| {like} | {frames:.0f} x {enc.embed_dim} | {n} | {1000 * t / n:.2f} | {seconds / t:.0f} | "
                  + " | ".join(f"{100 * v / total:.0f} %" for v in share.values()) + " |")


if __name__ == "__main__":
    main()
