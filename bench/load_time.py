"""`load()` of a cached release folder, against building the model with random weights first.

    python bench/load_time.py                                   # the default model and four large ones
    python bench/load_time.py --models omar-rq-base --repeats 5

`load()` used to build the architecture with torch's random initialisation and then copy the
file's weights over it; for large models most of its time went on drawing those random weights.
It now builds without initialising (`musicssl.factory.skip_weight_init`). Each figure is the
median wall time of a fresh process (so the file comes from the page cache, as a cached Hub
download does on a second run); the two ways alternate, so both see the same machine.

A release loaded from the Hub cache (`hf-hub:` or a registry name) also had its weights file
hashed on every load; `musicssl.hub.file_sha256` now remembers the sha256 of a file that has not
changed since. The last two columns time that check on the same file (median, in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/load_time.py` from anywhere imports the checkout's musicssl
    sys.path.insert(0, str(ROOT))

import musicssl  # noqa: E402
from musicssl import hub  # noqa: E402
from musicssl.registry import DEFAULT_MODEL  # noqa: E402

MODELS = [DEFAULT_MODEL, "jepa-base", "mert-v1-95m", "mert-v1-330m", "omar-rq-base"]


def child(way: str, folder: str) -> float:
    """Seconds one fresh process spends loading `folder` the given way (torch already imported)."""
    out = subprocess.run([sys.executable, __file__, "--child", way, folder],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_with_init(folder: str) -> None:
    """What `load()` did before: build with random weights, then load the file strictly."""
    from safetensors.torch import load_file

    from musicssl.factory import load_state_strict, read_config
    from musicssl.registry import family_class

    config = read_config(folder)
    model = family_class(config["family"])(**config["args"])
    load_state_strict(model, load_file(str(Path(folder) / "model.safetensors")), where=folder)


def run_child(way: str, folder: str) -> None:
    import musicssl.factory  # noqa: F401  (torch and the zoo, outside the timing)

    start = time.perf_counter()
    if way == "init":
        load_with_init(folder)
    else:
        musicssl.load(folder)
    print(json.dumps(time.perf_counter() - start))


def measure(name: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache:
        os.environ["MUSICSSL_CACHE"] = cache  # the remembered sha256 goes here, not in the user's cache
        enc = musicssl.load(name, pretrained=False)
        params = sum(p.numel() for p in enc.parameters())
        musicssl.save_pretrained(enc, tmp)
        del enc
        times: dict[str, list[float]] = {"init": [], "load": [], "hash": [], "memo": []}
        weights = Path(tmp) / "model.safetensors"
        old = time.time() - 60  # file_sha256 remembers files that were not written just now
        os.utime(weights, (old, old))
        hub.file_sha256(weights)  # the first load after a download hashes and remembers
        for _ in range(repeats):
            for way in ("init", "load"):
                times[way].append(child(way, tmp))
            for way, check in (("hash", hub.sha256_file), ("memo", hub.file_sha256)):
                start = time.perf_counter()
                check(weights)
                times[way].append(time.perf_counter() - start)
    return {"model": name, "params_m": params / 1e6, **{way: statistics.median(t) for way, t in times.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per figure (median)")
    a = p.parse_args(argv)
    print("| model | parameters (M) | random init + load s (before) | load() s (now) | speed-up | "
          "Hub cache check: sha256 s (before) | remembered s (now) |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models:
        r = measure(name, a.repeats)
        print(f"| {r['model']} | {r['params_m']:.0f} | {r['init']:.2f} | {r['load']:.2f} | "
              f"{r['init'] / r['load']:.1f} | {r['hash']:.3f} | {r['memo']:.4f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        run_child(sys.argv[2], sys.argv[3])
    else:
        main()
