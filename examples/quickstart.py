"""Embed the example audio with a model and compare the clips by cosine similarity.

    python examples/quickstart.py [MODEL]        # default: mfcc (needs no download)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import musicssl

AUDIO = Path(__file__).resolve().parent / "audio"


def main(model: str = "mfcc") -> None:
    enc = musicssl.load(model)
    files = sorted(p for p in AUDIO.rglob("*") if p.suffix in {".flac", ".ogg", ".wav", ".mp3"})
    out = enc.embed(files)  # decoded, resampled to enc.sample_rate, windowed and batched
    print(f"{model}: {enc.embed_dim}-d frames at {enc.frame_rate:g} /s; frames {tuple(out.frames.shape)}")
    for f, n in zip(files, out.lengths.tolist()):
        print(f"  {f.relative_to(AUDIO)}: {n} frames, last centred at {out.timestamps[n - 1]:.2f} s")
    # Standardise clip embeddings over the set, then cosine similarity between every pair.
    z = (out.clip - out.clip.mean(0)) / (out.clip.std(0) + 1e-8)
    sim = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(z, dim=1).T
    names = [f.stem[:12] for f in files]
    print(" " * 14 + "".join(f"{n:>14}" for n in names))
    for name, row in zip(names, sim.tolist()):
        print(f"{name:>14}" + "".join(f"{v:>14.2f}" for v in row))


if __name__ == "__main__":
    main(*sys.argv[1:2])
