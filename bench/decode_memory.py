"""Peak memory and time of decoding long files to a model's input (`load_audio(path, sr)`, mono).

    python bench/decode_memory.py                       # 10 and 60 min of 44.1 kHz stereo, MP3 and FLAC
    python bench/decode_memory.py --files a.m4a b.mp3 --sr 24000

Each file is decoded in a fresh process; the peak is that process's peak resident set (VmHWM) less
its resident set before the call, set beside the size of the result (float32 at `--sr`). Decoding
mixes and resamples block by block, so the peak should stay near the result, not the file's own
channels at its own rate. Generated files are noise over a tone, written with soundfile.
"""

from __future__ import annotations

import checkout  # noqa: F401 -- first: this checkout's musicssl, not an installed copy
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

CHILD = """
import sys, time
from musicssl.audio.io import load_audio

def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

load_audio(sys.argv[2], sr=int(sys.argv[1]), duration=1.0)  # imports and libraries in place
before = kib("VmRSS:")
start = time.perf_counter()
audio, _ = load_audio(sys.argv[2], sr=int(sys.argv[1]))
print(time.perf_counter() - start, (kib("VmHWM:") - before) / 1024, audio.nbytes / 2**20, len(audio) / int(sys.argv[1]))
"""


def make(path: Path, minutes: int) -> Path:
    """`minutes` of 44.1 kHz stereo, a tone under noise, written a minute at a time."""
    rng, sr = np.random.default_rng(0), 44100
    t = np.arange(60 * sr) / sr
    with sf.SoundFile(path, "w", sr, 2) as f:
        for m in range(minutes):
            tone = 0.3 * np.sin(2 * np.pi * (220 + m) * t)
            f.write((tone[:, None] + 0.05 * rng.standard_normal((len(t), 2))).astype(np.float32))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="*", type=Path, help="files to decode (default: generated ones)")
    p.add_argument("--sr", type=int, default=16000, help="rate to decode to (Hz)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or [make(Path(tmp) / f"{m}min.{x}", m) for x in ("mp3", "flac") for m in (10, 60)]
        print("| file | MB on disk | minutes | seconds to decode | x-realtime | peak MiB | result MiB | peak / result |")
        print("|---|---|---|---|---|---|---|---|")
        for f in files:
            res = subprocess.run([sys.executable, "-c", CHILD, str(args.sr), str(f)], capture_output=True,
                                 text=True, env=checkout.child_env())
            if res.returncode:  # the decoder's own words, e.g. an undecodable file
                print(f"| {f.name} | failed: {(res.stderr.strip().splitlines() or ['no message'])[-1]} |")
                continue
            seconds, peak, result, audio_s = map(float, res.stdout.split())
            print(f"| {f.name} | {f.stat().st_size / 1e6:.0f} | {audio_s / 60:.0f} | {seconds:.1f} | "
                  f"{audio_s / seconds:.0f} | {peak:.0f} | {result:.0f} | {peak / result:.1f} |")


if __name__ == "__main__":
    main()
