"""Pitch accuracy of `pesto-mir1k` (upstream's released PESTO) on synthetic tones and real notes.

    python bench/pesto_accuracy.py [--weights pesto_pitch-2.0.1-py3-none-any.whl | mir-1k_g7.ckpt]
                                   [--notes /work/shared/data/dev/notes.csv] [--threads 1]

Prints markdown tables: the share of tones (or notes) whose median f0 over the steady frames is
within 50 cents of the true pitch, the frame-level raw pitch accuracy (RPA: frames within 50 cents),
the median absolute error in cents, and the octave errors.

- Synthetic: tones from MIDI 40 to 84 in quarter-semitone steps (177 pitches, 1 s each, 16 kHz) in
  three timbres: a sine, 5 harmonics of random amplitude and phase, and 10 harmonics falling as 1/k.
  Then the 5-harmonic tones at 44.1 kHz, read at that rate (`pitch()`, as upstream) and after
  resampling to 16 kHz (what `embed()` sees).
- Real notes: the single-note set of the dev data (notes.csv: 4 s FluidR3 soundfont notes of 10
  instrument families, labelled with their MIDI pitch); frames 0.1-2.5 s (the held part).
Without --weights the model comes from `musicssl.load("pesto-mir1k")` (downloads the wheel once).
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

import musicssl
from musicssl.audio.io import load_audio, resample
from musicssl.models.pesto import harmonic_tone

DEV_NOTES = Path("/work/shared/data/dev/notes.csv")


def load_model(weights: str | None) -> musicssl.Encoder:
    if weights is None:
        return musicssl.load("pesto-mir1k")
    from musicssl.convert import convert_files
    from musicssl.registry import model_info

    spec = model_info("pesto-mir1k")
    return convert_files(spec, {next(iter(spec.files)): Path(weights)})


def tone(midi: float, kind: str, sr: int, seed: int, seconds: float = 1.0) -> np.ndarray:
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    if kind == "5 harmonics":
        return harmonic_tone(f0, seconds, sr, seed=seed)
    t = np.arange(int(seconds * sr)) / sr
    partials = 1 if kind == "sine" else 10
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, partials + 1) if k * f0 < sr / 2)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def cents(f0: torch.Tensor, midi: float) -> np.ndarray:
    """Error of each frame in cents (f0 in Hz > 0)."""
    return (1200 * np.log2(f0.clamp_min(1e-3).numpy() / (440.0 * 2 ** ((midi - 69) / 12)))).astype(np.float64)


def score(errors: list[np.ndarray]) -> dict[str, float]:
    """Per item: frame errors (cents). The item's estimate is the median frame's."""
    med = np.array([np.median(e) for e in errors])
    frames = np.concatenate(errors)
    octave = np.abs(med) > 50
    octave &= np.abs(med - 1200 * np.round(med / 1200)) <= 50
    return {
        "n": len(errors),
        "acc50": float(np.mean(np.abs(med) <= 50)),
        "rpa": float(np.mean(np.abs(frames) <= 50)),
        "median_abs_cents": float(np.median(np.abs(med))),
        "octave_errors": int(octave.sum()),
    }


def row(name: str, s: dict[str, float]) -> str:
    return (f"| {name} | {s['n']} | {100 * s['acc50']:.1f}% | {100 * s['rpa']:.1f}% | "
            f"{s['median_abs_cents']:.1f} | {s['octave_errors']} |")


HEADER = ("| set | items | median f0 within 50 cents | frames within 50 cents (RPA) | median abs error (cents) "
          "| octave errors |\n|---|---|---|---|---|---|")


def synthetic(model: musicssl.Encoder) -> None:
    grid = np.arange(40, 84.001, 0.25)
    print("\n### Synthetic tones, MIDI 40-84 in quarter semitones, 1 s each\n")
    print(HEADER)
    for kind in ("sine", "5 harmonics", "10 harmonics 1/k"):
        f0, _ = model.pitch([tone(m, kind, 16000, seed=i) for i, m in enumerate(grid)], sr=16000)
        print(row(f"{kind}, 16 kHz", score([cents(f[10:-10], m) for f, m in zip(f0, grid)])))
    x44 = [tone(m, "5 harmonics", 44100, seed=i) for i, m in enumerate(grid)]
    native, _ = model.pitch(x44, sr=44100)
    resampled, _ = model.pitch([resample(x, 44100, 16000) for x in x44], sr=16000)
    e_native = [cents(f[10:-10], m) for f, m in zip(native, grid)]
    e_res = [cents(f[10:-10], m) for f, m in zip(resampled, grid)]
    print(row("5 harmonics, 44.1 kHz, VQT at 44.1 kHz (pitch())", score(e_native)))
    print(row("5 harmonics, 44.1 kHz, resampled to 16 kHz (embed())", score(e_res)))
    gap = np.abs(np.array([np.median(a) for a in e_native]) - np.array([np.median(b) for b in e_res]))
    print(f"\nNative-rate vs resampled readings of the same tones: median |difference| {np.median(gap):.2f} cents, "
          f"max {gap.max():.2f} cents.")


def real_notes(model: musicssl.Encoder, notes_csv: Path) -> None:
    rows = list(csv.DictReader(notes_csv.open()))
    errors, t0 = [], time.time()
    for r in rows:
        x, sr = load_audio(notes_csv.parent / r["path"])
        f0, _ = model.pitch(x, sr=sr)
        errors.append(cents(f0[0, 10:251], float(r["pitch"])))  # frames 0.1-2.5 s
    print(f"\n### Real notes: {notes_csv} ({len(rows)} notes, {time.time() - t0:.0f} s)\n")
    print(HEADER)
    # MIDI 26-98 is what the network sees (VQT bins 16..234: 36.7-2442 Hz, cropped as upstream).
    groups = {
        "all notes": [True] * len(rows),
        "label checked (pitch_check ok)": [r["pitch_check"] == "ok" for r in rows],
        "MIDI 40-84": [40 <= int(r["pitch"]) <= 84 for r in rows],
        "MIDI 40-84, pitch_check ok": [40 <= int(r["pitch"]) <= 84 and r["pitch_check"] == "ok" for r in rows],
        "MIDI < 40": [int(r["pitch"]) < 40 for r in rows],
        "MIDI > 84": [int(r["pitch"]) > 84 for r in rows],
    }
    for family in sorted({r["family"] for r in rows}):
        groups[f"{family} (MIDI 40-84)"] = [r["family"] == family and 40 <= int(r["pitch"]) <= 84 for r in rows]
    for name, keep in groups.items():
        chosen = [e for e, k in zip(errors, keep) if k]
        if chosen:
            print(row(name, score(chosen)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="the pesto-pitch 2.0.1 wheel or mir-1k_g7.ckpt (default: musicssl.load)")
    p.add_argument("--notes", type=Path, default=DEV_NOTES, help="notes.csv of the dev set (skipped if absent)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.weights).eval()
    print(f"pesto-mir1k: shift {float(model.shift):.4f} semitones (outputs rolled by {model.roll_bins} bins)")
    synthetic(model)
    if args.notes.is_file():
        real_notes(model, args.notes)
    else:
        print(f"\n(no real notes: {args.notes} not found)")


if __name__ == "__main__":
    main()
