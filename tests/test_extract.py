"""`musicssl embed` / `musicssl.extract` over collections: tree mirroring, resume, faults, concurrency,
sharding, torchrun and unsafe names. The CLI runs in process through main(argv), except where a real
process is needed (SIGKILL, two runs at once, torchrun)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import musicssl
from musicssl.bulk import extract
from musicssl.bulk.outputs import FORMATS, read_clip
from musicssl.bulk.plan import plan_jobs, shard_of, take_shard
from musicssl.cli import main

SR = 16000
ROOT = Path(__file__).resolve().parent.parent


def tone(path: Path, seconds: float, seed: int = 0, sr: int = SR) -> Path:
    """A few harmonics plus noise, written in the format the suffix names."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.01 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr)
    return path


def corpus(folder: Path, n: int, seconds: tuple[float, float] = (0.5, 5.0)) -> list[Path]:
    rng = np.random.default_rng(1)
    return [tone(folder / f"d{i % 3}" / f"track {i:02d}.wav", float(rng.uniform(*seconds)), seed=i) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A small random spec-ViT release folder with 2 s windows, so longer files span several."""
    torch.manual_seed(0)
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=2, embed_dim=48, num_heads=3,
                        context_seconds=2.0, overlap_seconds=0.5)
    return str(musicssl.save_pretrained(enc, tmp_path_factory.mktemp("model") / "tiny"))


def outputs(out: Path, suffix: str = ".npz") -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob(f"*{suffix}"))}


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.rglob(".*") if p.is_file()]


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "metadata"}


# --- inputs and outputs ---------------------------------------------------------------------------

def test_tree_is_mirrored_and_name_collisions_survive(tmp_path, capsys):
    a, b = tmp_path / "in" / "a", tmp_path / "in" / "b"
    tone(a / "x.wav", 1.0), tone(b / "x.wav", 1.0, seed=1), tone(a / "x.flac", 1.0, seed=2), tone(a / "x.mp3", 1.0)
    tone(tmp_path / "in" / "ünï cødé" / "with space.ogg", 1.0)
    (tmp_path / "in" / "link.wav").symlink_to(a / "x.wav")  # the same file twice: embedded once
    out = tmp_path / "out"
    inputs = [a, b, tmp_path / "in" / "ünï cødé", tmp_path / "in" / "link.wav"]
    assert main(["embed", *map(str, inputs), "-o", str(out), "--model", "mfcc"]) == 0
    assert sorted(outputs(out)) == ["a/x.flac.npz", "a/x.mp3.npz", "a/x.wav.npz", "b/x.wav.npz",
                                    "ünï cødé/with space.ogg.npz"]
    assert "5 embedded, 0 skipped, 0 failed of 5 inputs" in capsys.readouterr().out
    assert not np.array_equal(arrays(out / "a/x.wav.npz")["clip"], arrays(out / "b/x.wav.npz")["clip"])
    info = json.loads((out / "run.json").read_text())
    assert info["model"] == "mfcc" and info["musicssl_version"] == musicssl.__version__ and len(info["model_sha256"]) == 64
    assert info["torch_version"] == torch.__version__ and info["layers"] == [0]


def test_names_too_long_for_an_output_are_shortened_uniquely(tmp_path, capsys):
    """A 250-byte input name plus ".npz" (and the claim's ".lock") passes the 255-byte limit of a
    file name: the output keeps what fits and a hash of the whole name, the same on every run."""
    names = ["曲" * 80 + "-take 1.wav", "曲" * 80 + "-take 2.wav", "short.wav"]  # 240 bytes of 曲
    for i, name in enumerate(names):
        tone(tmp_path / "in" / name, 0.5, seed=i)
    out = tmp_path / "out"
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--format", "safetensors"]) == 0
    made = {Path(r["input"]).name: r["output"] for r in manifest(out)}
    assert made["short.wav"] == "short.wav.safetensors" and len(set(made.values())) == 3
    for name in names[:2]:
        assert made[name].startswith("曲" * 60) and made[name].endswith(".safetensors")
        assert len(made[name].encode()) <= 249 and (out / made[name]).is_file()
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--format", "safetensors"]) == 0
    assert "0 embedded, 3 skipped" in capsys.readouterr().out and not leftovers(out)


def test_names_that_are_not_utf8_are_embedded_listed_and_retried(tmp_path, capsys):
    """Latin-1 names from an old share: decoded, written, and listed in failed.txt byte for byte."""
    src = tmp_path / "in"
    src.mkdir()
    good, bad = (Path(os.fsdecode(os.fsencode(src) + name)) for name in (b"/caf\xe9.wav", b"/d\xe9j\xe0 vu.wav"))
    try:
        os.rename(tone(src / "good.wav", 0.5), good)
    except OSError:
        pytest.skip("this filesystem takes only UTF-8 names")
    bad.write_bytes(b"RIFF junk")
    out = tmp_path / "out"
    assert main(["embed", str(src), "-o", str(out), "--model", "mfcc", "--table"]) == 1
    assert "1 embedded, 0 skipped, 1 failed of 2 inputs" in capsys.readouterr().out
    assert (out / (good.name + ".npz")).is_file()
    assert (out / "failed.txt").read_bytes() == os.fsencode(bad) + b"\n"
    os.replace(tone(src / "fixed.wav", 0.5, seed=3), bad)  # repaired: the list brings the same name back
    assert main(["embed", "--files-from", str(out / "failed.txt"), "--root", str(src), "-o", str(out),
                 "--model", "mfcc"]) == 0
    assert (out / (bad.name + ".npz")).is_file() and not (out / "failed.txt").exists()


def test_an_output_path_longer_than_the_system_takes_fails_that_file_only(tmp_path, capsys):
    """A deep tree mirrored under a long -o gives one output path over PATH_MAX (4096 on Linux)."""
    deep = tmp_path / "in" / Path(*["d" * 200] * 19)
    tone(tmp_path / "in" / "top.wav", 0.5)
    deep.mkdir(parents=True)
    os.replace(tone(tmp_path / "x.wav", 0.5, seed=1), deep / "x.wav")  # libsndfile opens no path this long to write
    out = tmp_path / ("o" * 250)
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc"]) == 1
    text = capsys.readouterr()
    assert "1 embedded, 0 skipped, 1 failed of 2 inputs" in text.out
    assert "File name too long (use a shorter -o or --root path)" in text.err
    assert (out / "top.wav.npz").is_file()


def test_summary_says_where_the_time_went(tmp_path, tiny_model, monkeypatch, capsys):
    """A run slowed in its model, then in its decoding: the slowed stage holds that time, and the
    summary names the share of each stage."""
    import musicssl.audio.io as audio_io

    corpus(tmp_path / "in", 6, seconds=(1.0, 1.5))
    real_launch, real_load = musicssl.Encoder.launch_windows, audio_io.load_audio

    def slow_launch(self, *a):
        time.sleep(0.2)
        return real_launch(self, *a)

    def slow_load(*a, **kw):
        time.sleep(0.2)
        return real_load(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(musicssl.Encoder, "launch_windows", slow_launch)
        r = extract([tmp_path / "in"], tmp_path / "a", tiny_model, batch_size=2, num_workers=0)
    assert set(r.stages) == {"model", "decoding", "writing", "host"} and min(r.stages.values()) >= 0
    assert r.stages["model"] >= 3 * 0.2 and max(r.stages, key=r.stages.get) == "model"
    assert sum(r.stages.values()) <= r.wall_seconds
    monkeypatch.setattr(audio_io, "load_audio", slow_load)
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "b"), "--model", tiny_model,
                 "--num-workers", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("time: waiting for decoded audio ")  # the largest share first
    shares = dict((part.rsplit(" ", 2)[0], int(part.rsplit(" ", 2)[1])) for part in out[-2][6:].split(", "))
    assert set(shares) == {"waiting for decoded audio", "model", "waiting for writes", "stitching and bookkeeping"}
    assert shares["waiting for decoded audio"] > 50 and 95 <= sum(shares.values()) <= 105


def test_files_from_stdin_root_and_path_traversal(tmp_path, monkeypatch, capsys):
    src = tmp_path / "data" / "deep"
    files = [tone(src / "..x.wav", 0.5), tone(src / "-rf.wav", 0.5), tone(tmp_path / "data" / "top.wav", 0.5)]
    out = tmp_path / "data" / "deep" / "out"  # inside the inputs' tree, and names that look like options
    listing = "\n".join([str(src / ".." / "deep" / "..x.wav"), "", "data/deep/-rf.wav", str(files[2]), str(files[2])])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(listing + "\n"))
    assert main(["embed", "--files-from", "-", "-o", str(out), "--model", "mfcc"]) == 0
    assert sorted(outputs(out)) == ["deep/-rf.wav.npz", "deep/..x.wav.npz", "top.wav.npz"]
    # Every output is under OUT whatever the names; an input outside --root is refused by name.
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    assert main(["embed", str(files[2]), "--root", str(src), "-o", str(out), "--model", "mfcc"]) == 2
    assert "not inside the root folder" in capsys.readouterr().err


@pytest.mark.parametrize("as_type", [str, Path])
def test_one_folder_or_file_need_not_be_a_list(tmp_path, as_type):
    files = corpus(tmp_path / "in", 3)
    assert extract(as_type(tmp_path / "in"), tmp_path / "a", "mfcc", num_workers=0).ok == 3
    assert extract(as_type(files[0]), tmp_path / "b", "mfcc", num_workers=0).ok == 1


def test_a_list_saved_by_a_windows_editor_is_read(tmp_path):
    """A UTF-8 byte-order mark and CRLF line ends are not part of the names."""
    files = corpus(tmp_path / "in", 3)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(os.fsencode(f) for f in files) + b"\r\n")
    res = extract([], tmp_path / "out", "mfcc", files_from=listing, num_workers=0)
    assert (res.ok, res.failed) == (3, 0)


def test_formats_and_the_clip_table(tmp_path, monkeypatch):
    files = corpus(tmp_path / "in", 4)
    runs = {}
    for fmt in ("npz", "npy", "safetensors"):
        out = tmp_path / fmt
        res = extract([tmp_path / "in"], out, "mfcc", format=fmt, table=True, layers=[0, -1], num_workers=0)
        assert res.ok == 4 and res.tables == [out / "clips.parquet"]
        runs[fmt] = outputs(out, "." + fmt)
    z = arrays(runs["npz"]["d0/track 00.wav.npz"])
    npy = np.load(runs["npy"]["d0/track 00.wav.npy"])
    from safetensors.numpy import load_file

    st = load_file(str(runs["safetensors"]["d0/track 00.wav.safetensors"]))
    assert z["frames"].shape[0] == 2 and np.array_equal(npy, z["frames"]) and np.array_equal(st["frames"], z["frames"])
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "npz" / "clips.parquet").to_pydict()
    assert t["output"][0] == "d0/track 00.wav.npz" and t["path"][0] == str(files[0])
    assert np.allclose(t["clip_layer0"][0], z["clip"][0])
    t_npy = pq.read_table(tmp_path / "npy" / "clips.parquet").to_pydict()  # clip recomputed from the frames
    assert np.allclose(t_npy["clip_layer0"][0], z["clip"][0], atol=1e-5)
    # Without pyarrow: a .npy matrix and an index, in the same order.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    res = extract([tmp_path / "in"], tmp_path / "npz", "mfcc", table=True, layers=[0, -1], num_workers=0)
    assert res.skipped == 4 and [p.name for p in res.tables] == ["clips.npy", "clips.index.tsv"]
    matrix = np.load(tmp_path / "npz" / "clips.npy")
    index = (tmp_path / "npz" / "clips.index.tsv").read_text().splitlines()
    assert matrix.shape == (4, 2, 60) and index[1].split("\t")[1] == "d0/track 00.wav.npz"
    assert np.allclose(matrix[0], z["clip"])


# --- resume and faults ---------------------------------------------------------------------------

def test_skip_overwrite_and_settings_guard(tmp_path, capsys):
    corpus(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert extract([tmp_path / "in"], out, "mfcc", num_workers=0).ok == 3
    first = {k: p.stat().st_mtime_ns for k, p in outputs(out).items()}
    res = extract([tmp_path / "in"], out, "mfcc", num_workers=0)
    assert (res.ok, res.skipped) == (0, 3) and first == {k: p.stat().st_mtime_ns for k, p in outputs(out).items()}
    assert extract([tmp_path / "in"], out, "mfcc", overwrite=True, num_workers=0).ok == 3
    # Another model (or layers, pool, format, dtype) into the same OUT would mix embeddings: refused.
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "logmel"]) == 2
    assert "holds embeddings made with other settings" in capsys.readouterr().err
    statuses = [r["status"] for r in manifest(out)]
    assert statuses == ["ok"] * 3 + ["skipped"] * 3 + ["ok"] * 3
    assert "model: 'mfcc' there, 'logmel' now" in main_err(tmp_path / "in", out, "--model", "logmel")
    # --layers -1 names the same layer as "last" but gives (1, T, D) frames, not (T, D): refused too.
    assert "layer_axis: False there, True now" in main_err(tmp_path / "in", out, "--model", "mfcc", "--layers", "-1")


def main_err(inputs: Path, out: Path, *args: str) -> str:
    """stderr of an `embed` run that must be refused (status 2)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["embed", str(inputs), "-o", str(out), *args]) == 2
    return err.getvalue()


def test_outputs_an_overwrite_left_with_other_settings_are_made_again(tmp_path, caplog):
    """--overwrite with other settings over part of the inputs (or cut short) leaves the rest as they
    were made; a later run with the new settings makes those again instead of skipping them."""
    files = corpus(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert extract([tmp_path / "in"], out, "mfcc", num_workers=0).ok == 3
    with caplog.at_level("WARNING", logger="musicssl"):
        assert extract(files[:1], out, "mfcc", root=tmp_path / "in", layers="all", overwrite=True, num_workers=0).ok == 1
    assert "outputs of other inputs stay as they were" in caplog.text
    res = extract([tmp_path / "in"], out, "mfcc", layers="all", table=True, num_workers=0)
    assert (res.ok, res.skipped) == (2, 1)
    dims = {k: arrays(p)["frames"].ndim for k, p in outputs(out).items()}
    assert set(dims.values()) == {3}, dims  # all (L, T, D) now
    assert extract([tmp_path / "in"], out, "mfcc", layers="all", num_workers=0).skipped == 3


def test_a_table_of_clips_of_other_shapes_names_the_odd_output(tmp_path, monkeypatch):
    from musicssl.bulk.outputs import write_table

    rows = [("a.wav", "a.wav.npz", np.zeros(4, np.float32)), ("b.wav", "b.wav.npz", np.zeros((2, 4), np.float32))]
    with pytest.raises(ValueError, match=r"b\.wav\.npz holds a clip shaped \(2, 4\) and a\.wav\.npz one shaped \(4,\)"):
        write_table(tmp_path, "clips", rows, [0, 1], (4,))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # the .npy table's index keeps names as they are
    write_table(tmp_path, "clips", [("dé\tjà.wav", "dé\tjà.wav.npz", np.zeros(4, np.float32))], [0], (4,))
    assert (tmp_path / "clips.index.tsv").read_text(encoding="utf-8").splitlines()[1] == "dé\\tjà.wav\tdé\\tjà.wav.npz"


@pytest.mark.parametrize("fmt", ["npz", "npy", "safetensors"])
def test_cut_short_outputs_are_made_again(tmp_path, fmt):
    """Outputs are not fsynced one by one: what a machine crash can leave (a file cut short, or empty
    under its final name) is not taken as done by the next run."""
    corpus(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert extract([tmp_path / "in"], out, "mfcc", format=fmt, num_workers=0).ok == 3
    paths = sorted(outputs(out, FORMATS[fmt]).values())
    clips = [read_clip(fmt, p, pooled=False) for p in paths]
    paths[0].write_bytes(paths[0].read_bytes()[: paths[0].stat().st_size // 2])
    paths[1].write_bytes(b"")
    res = extract([tmp_path / "in"], out, "mfcc", format=fmt, num_workers=0)
    assert (res.ok, res.skipped) == (2, 1)
    for p, clip in zip(paths, clips):
        np.testing.assert_array_equal(read_clip(fmt, p, pooled=False), clip)


def test_corrupt_files_are_listed_and_the_rest_embedded(tmp_path, capsys):
    files = corpus(tmp_path / "in", 18)
    bad = tmp_path / "in" / "bad"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    (bad / "garbage.flac").write_bytes(os.urandom(3000))
    good = files[0].read_bytes()
    (bad / "truncated.mp3").write_bytes(b"ID3" + os.urandom(200))
    (bad / "header-only.wav").write_bytes(good[:44])
    (bad / "unreadable.wav").write_bytes(good)
    (bad / "unreadable.wav").chmod(0)
    out = tmp_path / "out"
    code = main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--num-workers", "2"])
    text = capsys.readouterr()
    n_bad = 5 if os.geteuid() != 0 else 4  # root reads a chmod-0 file
    assert code == 1 and f"{23 - n_bad} embedded, 0 skipped, {n_bad} failed of 23 inputs" in text.out
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == n_bad and all(Path(p).parent == bad for p in failed) and "failed.txt" in text.out
    reasons = {Path(r["input"]).name: r["reason"] for r in manifest(out) if r["status"] == "error"}
    assert all(name in reasons[name] for name in reasons)  # every reason names its file
    assert len(outputs(out)) == 23 - n_bad and not leftovers(out)
    # Fixed files are retried from the list; the list then disappears.
    for p in failed:
        Path(p).chmod(0o644)
        tone(Path(p).with_suffix(".wav"), 0.5)
        Path(p).unlink() if Path(p).suffix != ".wav" else None
    fixed = [str(Path(p).with_suffix(".wav")) for p in failed]
    (tmp_path / "retry.txt").write_text("\n".join(fixed))
    assert main(["embed", "--files-from", str(tmp_path / "retry.txt"), "--root", str(tmp_path / "in"),
                 "-o", str(out), "--model", "mfcc"]) == 0
    assert all((out / "bad" / (Path(p).name + ".npz")).exists() for p in fixed)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_file_used_in_part_says_so_in_the_manifest(tmp_path, capsys, workers):
    """A FLAC cut in half embeds what decodes; the manifest and the last lines say it was cut short,
    also when a decoding process (whose own stderr a cluster log may lose) read it."""
    corpus(tmp_path / "in", 2)
    whole = tone(tmp_path / "whole.flac", 10.0)
    (tmp_path / "in" / "cut.flac").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "out"
    code = main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--num-workers", str(workers)])
    assert code == 0 and "1 of the embedded inputs decoded with a warning" in capsys.readouterr().out
    records = {Path(r["input"]).name: r for r in manifest(out)}
    cut = records.pop("cut.flac")
    assert cut["status"] == "ok" and 0 < cut["duration"] < 10.0
    assert "cut.flac" in cut["warning"] and "truncated or damaged" in cut["warning"]
    assert not any("warning" in r for r in records.values())


def test_a_full_disk_stops_the_run_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    """Every later output would fail too: the run stops, says why, and a rerun finishes the rest."""
    import errno

    from musicssl.bulk import run as run_module

    corpus(tmp_path / "in", 6)
    real, written, calls, lock = run_module.write_output, [], itertools.count(), threading.Lock()

    def fills_up(fmt, path, *args):
        # Outputs are written by several threads: count calls under a lock, or two writes in flight
        # can both pass a check of what is done and the disk never fills.
        with lock:
            full = next(calls) >= 2
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(fmt, path, *args)
        with lock:
            written.append(path)

    monkeypatch.setattr(run_module, "write_output", fills_up)
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--batch-size", "1"]
    assert main(args) == 1
    said = capsys.readouterr().out
    assert "(stopped because" in said and "No space left on device" in said and "free space" in said
    assert sorted(outputs(out).values()) == sorted(written) and not leftovers(out)
    monkeypatch.setattr(run_module, "write_output", real)
    assert main(args) == 0 and len(outputs(out)) == 6


def test_fail_fast_stops_at_the_first_failure(tmp_path, capsys):
    corpus(tmp_path / "in", 4)
    (tmp_path / "in" / "d0" / "a-broken.wav").write_bytes(b"RIFF nonsense")
    res = extract([tmp_path / "in"], tmp_path / "out", "mfcc", fail_fast=True, num_workers=0)
    assert res.stopped_early and res.failed == 1 and res.ok < 4 and res.exit_code == 1
    assert res.planned == 5 and res.total < 5
    # The last lines count every input, those never started too, and say how to go on with them.
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out2"), "--model", "mfcc", "--fail-fast",
                 "--layers", "all", "--dtype", "bf16", "--num-workers", "0"]) == 1
    text = capsys.readouterr().out
    started = int(text.split(" embedded, ")[0]) + 1
    assert f"failed of 5 inputs, {5 - started} not started (stopped at the first failure" in text
    # The retry command holds the settings that the output folder holds runs to, so it is accepted.
    retry = text.split("retry them with ")[1].split()
    assert retry[-4:] == ["--layers", "all", "--dtype", "bfloat16"]
    (tmp_path / "in" / "d0" / "a-broken.wav").unlink()
    tone(tmp_path / "in" / "d0" / "a-broken.wav", 0.5)
    assert main(retry[1:]) == 0


def test_a_shard_that_gets_no_files_is_done_not_failed(tmp_path, capsys):
    corpus(tmp_path / "in", 2)
    empty = next(k for k in range(8) if not take_shard(plan_jobs([tmp_path / "in"], tmp_path, ".npz")[0], k, 8))
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc",
                 "--shard", f"{empty}/8"]) == 0
    assert f"0 of 2 inputs fall in shard {empty}/8: nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (["IN", "-o", ""], "the output folder is empty (an unset variable?)"),
    (["IN", "-o", "OUT", "--layers", "foo"], "--layers takes 'last', 'all' or comma-separated integers"),
    (["-o", "OUT"], "give audio files or folders, or --files-from LIST"),
    (["--files-from", "IN/d0/track 00.wav", "-o", "OUT"], "holds NUL bytes, so it is not a text list"),
    (["loop.wav", "-o", "OUT"], "input loop.wav is a link to loop.wav, which leads nowhere (missing, or a loop"),
])
def test_usage_mistakes_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, says):
    corpus(tmp_path / "IN", 1)
    os.symlink("loop.wav", tmp_path / "loop.wav")
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("IN", str(tmp_path / "IN")).replace("OUT", str(tmp_path / "OUT")) for a in args]
    assert main(["embed", *argv, "--model", "mfcc"]) == 2
    assert says in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.npz"))  # -o "" wrote nothing into the working folder


def test_extensions_with_spaces_after_commas_still_count(tmp_path, capsys):
    tone(tmp_path / "in" / "a.wav", 0.5)
    tone(tmp_path / "in" / "b.flac", 0.5)
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc", "--ext", "wav, flac"]) == 0
    assert "2 embedded" in capsys.readouterr().out


def test_an_output_folder_on_a_read_only_filesystem_says_so(tmp_path, monkeypatch):
    import errno
    import tempfile

    from musicssl.bulk.outputs import make_out_dir
    from musicssl.errors import OutputPathError

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputPathError, match="Read-only file system"):
        make_out_dir(tmp_path / "out")


def test_a_failed_name_with_a_line_break_stays_out_of_the_retry_list(tmp_path, caplog):
    tone(tmp_path / "in" / "good.wav", 0.5)
    (tmp_path / "in" / "bad\nname.wav").write_bytes(b"RIFF junk")
    (tmp_path / "in" / "bad.wav").write_bytes(b"RIFF junk")
    with caplog.at_level("WARNING", logger="musicssl"):
        res = extract([tmp_path / "in"], tmp_path / "out", "mfcc", num_workers=0)
    assert res.failed == 2 and res.failed_list.read_text().splitlines() == [str(tmp_path / "in" / "bad.wav")]
    assert "1 failed inputs have a line break in their name" in caplog.text


def test_the_python_api_refuses_what_the_cli_could_not_pass(tmp_path):
    """Mistakes only a Python caller can make are said up front, before a model loads, not as a
    traceback from deep inside; nothing is made."""
    corpus(tmp_path / "in", 1)
    bad = [({"dtype": "float16"}, ValueError, "floating torch dtype such as torch.bfloat16"),
           ({"dtype": torch.int8}, ValueError, "floating torch dtype"),
           ({"shard": (0, 2)}, ValueError, "shard takes 'K/N' as a string"),
           ({"decode_timeout": "10"}, ValueError, "decode_timeout must be seconds > 0"),
           ({"log_every": "5"}, ValueError, "log_every must be seconds > 0"),
           ({"num_workers": True}, ValueError, "num_workers must be an integer >= 0"),
           ({"inputs": None}, TypeError, "inputs must be a file or folder, or a list of them"),
           ({"inputs": np.zeros(3)}, TypeError, "inputs must be a file or folder.*not ndarray"),
           ({"out": None}, TypeError, "out must be the output folder")]
    for change, error, said in bad:
        kwargs = {"inputs": tmp_path / "in", "out": tmp_path / "out", "model": "no-such-model", **change}
        with pytest.raises(error, match=said):
            extract(**kwargs)
    assert not (tmp_path / "out").exists()


def test_one_extension_as_a_string_and_a_folder_with_no_audio(tmp_path, caplog):
    """extensions="flac" was read letter by letter and found nothing; a folder with no audio gave
    exit code 0, no word, and an empty output folder."""
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.flac", np.zeros(8000), SR)
    tone(tmp_path / "in" / "b.wav", 0.5)
    res = extract(tmp_path / "in", tmp_path / "out", "mfcc", extensions="flac")
    assert (res.found, res.ok, res.exit_code) == (1, 1, 0) and list(outputs(tmp_path / "out")) == ["a.flac.npz"]
    (tmp_path / "empty").mkdir()
    with caplog.at_level("WARNING", logger="musicssl"):
        res = extract(tmp_path / "empty", tmp_path / "none", "no-such-model")  # no model is loaded for nothing
    assert (res.found, res.exit_code) == (0, 1) and not (tmp_path / "none").exists()
    assert f"no audio files found in {tmp_path / 'empty'} (searched every subfolder for .aac," in caplog.text


def test_out_under_home_and_random_weights_in_run_json(tmp_path, monkeypatch):
    """"~/feats" is the home folder's, as load() and the inputs read it (not a folder named "~"), and
    a model built with pretrained=False is not recorded with the released weights' files."""
    tone(tmp_path / "in" / "a.wav", 0.5)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "in")
    enc = musicssl.load("simclr-mini", pretrained=False, depth=2)
    (tmp_path / "list.txt").write_text("~/in/a.wav\n")
    assert extract([], "~/feats", enc, files_from="~/list.txt", root="~/in").ok == 1  # root and list too
    info = json.loads((tmp_path / "feats" / "run.json").read_text())
    assert (info["model"], info["weights"], info["weights_files"]) == ("simclr-mini", None, {})
    assert not (tmp_path / "in" / "~").exists()


def test_the_loops_own_work_runs_on_one_thread_and_the_model_on_the_free_cores(tmp_path, monkeypatch):
    """torch's parallel ops wait for their slowest thread, so the loop stitches and pools on one; the
    model gets the cores that decoding processes leave (4 cores, 1 process: 3), and the threads are
    as they were after the run."""
    from musicssl.bulk import run as bulk_run
    from musicssl.models.base import Encoder

    corpus(tmp_path / "in", 3)
    seen: dict[str, set[int]] = {"model": set(), "stitch": set()}
    launch, place = Encoder.launch_windows, Encoder.place_window
    monkeypatch.setattr(Encoder, "launch_windows", lambda self, *a: seen["model"].add(torch.get_num_threads()) or launch(self, *a))
    monkeypatch.setattr(Encoder, "place_window", lambda self, *a: seen["stitch"].add(torch.get_num_threads()) or place(self, *a))
    monkeypatch.setattr(bulk_run, "_cores", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert extract([tmp_path / "in"], tmp_path / "out", "mfcc", num_workers=1).ok == 3
        assert seen == {"model": {3}, "stitch": {1}} and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_a_model_that_fails_on_every_window_says_why_once(tmp_path, monkeypatch, caplog):
    """Each batch is retried in halves down to single windows, and each file fails; the reason was
    logged at every split (7 lines per batch of 8), all run long. Now once, then a count."""
    corpus(tmp_path / "in", 12)

    def broken(self, wav, n_samples, keep, rows=None):
        raise RuntimeError("The expanded size of the tensor (501) must match the existing size (500)")

    monkeypatch.setattr(musicssl.Encoder, "launch_windows", broken)
    with caplog.at_level("WARNING", logger="musicssl"):
        res = extract([tmp_path / "in"], tmp_path / "out", "mfcc", batch_size=4, num_workers=0)
    assert res.failed == 12 and res.ok == 0
    splits = [r.getMessage() for r in caplog.records if "in halves" in r.getMessage()]
    assert len(splits) == 2 and splits[0].startswith("a batch of 4 windows failed (The expanded size"), splits
    assert splits[1].endswith("more batches failed for a reason said above and were retried in halves")


@pytest.mark.parametrize("when", ["launch", "result"])
def test_out_of_memory_falls_back_to_smaller_batches(tmp_path, tiny_model, monkeypatch, when):
    """Out of memory on a batch of more than two windows, raised when the batch is started or (as an
    error from a GPU would be) when its result is asked for: the run retries in halves."""
    corpus(tmp_path / "in", 5, seconds=(3.0, 6.0))
    ref = extract([tmp_path / "in"], tmp_path / "ref", tiny_model, batch_size=1, num_workers=0)
    real = musicssl.Encoder.launch_windows
    seen = []

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def flaky(self, wav, n_samples, keep, rows=None):
        seen.append(len(n_samples))
        if len(n_samples) <= 2:
            return real(self, wav, n_samples, keep, rows)
        if when == "launch":
            oom()
        launched = real(self, wav, n_samples, keep, rows)
        launched.result = oom
        return launched

    monkeypatch.setattr(musicssl.Encoder, "launch_windows", flaky)
    res = extract([tmp_path / "in"], tmp_path / "out", tiny_model, batch_size=8, num_workers=0)
    assert res.ok == 5 and ref.ok == 5 and max(seen) == 8 and 2 in seen
    for rel, p in outputs(tmp_path / "ref").items():
        for k, v in arrays(p).items():
            assert np.allclose(arrays(tmp_path / "out" / rel)[k], v, atol=1e-5), (rel, k)


def test_a_batch_failing_with_an_empty_message_is_split_too(tmp_path, tiny_model, monkeypatch):
    """A model's bare RuntimeError() (no message) crashed the log line of the split with IndexError."""
    corpus(tmp_path / "in", 3, seconds=(3.0, 6.0))
    real = musicssl.Encoder.launch_windows

    def flaky(self, wav, n_samples, keep, rows=None):
        if len(n_samples) > 1:
            raise RuntimeError()
        return real(self, wav, n_samples, keep, rows)

    monkeypatch.setattr(musicssl.Encoder, "launch_windows", flaky)
    assert extract([tmp_path / "in"], tmp_path / "out", tiny_model, batch_size=8, num_workers=0).ok == 3


# --- packing windows into batches -----------------------------------------------------------------

def pack(seconds: list[float], batch_size: int, max_open: int, max_bytes: int = 1 << 30,
         model: str = "mfcc") -> dict:
    """Files of `seconds` through a WindowPacker as `extract` drives it (by default the 10 s windows
    of the mfcc baseline; bench/packing.py passes others): the batches as (file, window, samples),
    the share of padded samples, and the most open files and bytes held at any point."""
    from musicssl.bulk.pipeline import OpenFile, WindowPacker

    enc = musicssl.load(model, pretrained=False)
    packer, batches, most_open, most_held = WindowPacker(batch_size, max_open, max_bytes), [], 0, 0

    def take() -> None:  # keeps no file alive: their buffers go when the packer lets them go
        batches.append([(f.seq, w.index, w.length) for f, w in packer.take()])

    for seq, sec in enumerate(seconds):
        n = int(sec * enc.sample_rate)
        windows = enc.plan_windows([n])
        frames = torch.zeros(int(enc.frame_lengths(torch.tensor([n]))[0]), 1, enc.embed_dim)
        packer.add(OpenFile(seq, seq, torch.zeros(n), frames, len(windows), windows[-1].index, 0.0), windows)
        while packer.ready():
            take()
        most_open, most_held = max(most_open, packer.open_files()), max(most_held, packer.held)
    while packer.pool:
        take()
    padded = sum(len(b) * max(n for *_, n in b) for b in batches)
    valid = sum(n for b in batches for *_, n in b)
    return {"batches": batches, "waste": 1 - valid / padded, "open": most_open, "held": most_held,
            "windows": sorted((f, i) for b in batches for f, i, _ in b)}


def test_windows_of_equal_files_pack_into_equal_batches():
    """25 s files: two full windows and a short last one each; no batch mixes the two lengths."""
    got = pack([25.0] * 12, batch_size=4, max_open=16)
    assert got["windows"] == [(f, i) for f in range(12) for i in range(3)]  # each window once
    assert all(len({n for *_, n in b}) == 1 for b in got["batches"]) and got["waste"] == 0


def test_mixed_lengths_pad_little_within_the_memory_bounds():
    """Files of 1-60 s: most windows are odd lengths, yet batches pad under 5 % of the compute (1.7 %;
    taking the longest windows of the 8 files at hand padded 12.7 %); open files and held bytes stay
    bounded."""
    rng = np.random.default_rng(0)
    seconds = rng.uniform(1, 60, 300).tolist()
    got = pack(seconds, batch_size=8, max_open=32)
    assert got["waste"] < 0.05
    assert got["open"] <= 33 and len(got["windows"]) == len(set(got["windows"]))
    tight = pack(seconds, batch_size=8, max_open=32, max_bytes=8 << 20)
    largest = 60 * 16000 * 4 + 3001 * 60 * 4
    assert tight["held"] <= (8 << 20) + largest and tight["windows"] == got["windows"]


# --- processes ----------------------------------------------------------------------------------

def cli_process(args: list[str], slow: float = 0.0, **kw) -> subprocess.Popen:
    """`musicssl embed ARGS` in a fresh interpreter, through the console entry point; `slow` adds
    seconds per forward pass so a test can act while the run is under way."""
    code = ("import signal, sys, time, musicssl\n"
            # A test runner started in the background (nohup, `cmd &`) ignores SIGINT, and children
            # inherit that: give the run Python's usual Ctrl-C, as in a terminal.
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"slow = {slow}\n"
            "real = musicssl.Encoder.launch_windows\n"
            "def run(self, *a):\n    time.sleep(slow)\n    return real(self, *a)\n"
            "musicssl.Encoder.launch_windows = run\n"
            "from musicssl.cli import run\nrun()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, "embed", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_killed_run_resumes_to_identical_outputs(tmp_path, tiny_model):
    files = corpus(tmp_path / "in", 16, seconds=(1.0, 5.0))
    args = [str(tmp_path / "in"), "--model", tiny_model, "--batch-size", "1", "--num-workers", "1"]
    assert main(["embed", *args, "-o", str(tmp_path / "clean")]) == 0
    proc = cli_process([*args, "-o", str(tmp_path / "out")], slow=0.1)
    deadline = time.time() + 120
    while time.time() < deadline and len(outputs(tmp_path / "out")) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(outputs(tmp_path / "out"))
    assert 4 <= done < len(files), "the run should have been killed halfway"
    # A temporary file left by a kill mid-write is replaced when its input is redone.
    pending = sorted(set(outputs(tmp_path / "clean")) - set(outputs(tmp_path / "out")))[0]
    stale = tmp_path / "out" / Path(pending).parent / f".{Path(pending).name}.part"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    assert main(["embed", *args, "-o", str(tmp_path / "out")]) == 0
    clean, resumed = outputs(tmp_path / "clean"), outputs(tmp_path / "out")
    assert sorted(clean) == sorted(resumed) and not leftovers(tmp_path / "out")
    for rel in clean:
        a, b = arrays(clean[rel]), arrays(resumed[rel])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), rel
    statuses = [r["status"] for r in manifest(tmp_path / "out")]
    assert statuses.count("ok") == len(files) and statuses.count("skipped") == done


@pytest.mark.parametrize("sig, status, what", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_ends_with_one_line_and_resumes(tmp_path, tiny_model, sig, status, what):
    """Ctrl-C, or the SIGTERM a scheduler sends before it kills: one line, every output whole, and
    a manifest line for each output written."""
    corpus(tmp_path / "in", 12, seconds=(1.0, 3.0))
    args = [str(tmp_path / "in"), "--model", tiny_model, "--batch-size", "1", "-o", str(tmp_path / "out")]
    proc = cli_process(args, slow=0.2)
    deadline = time.time() + 120
    while time.time() < deadline and len(outputs(tmp_path / "out")) < 2:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    # Status, outputs and the run's stderr in the message, should it fail.
    done = len(outputs(tmp_path / "out"))
    assert proc.returncode == status and "Traceback" not in err, (proc.returncode, done, err[-3000:])
    assert err.strip().splitlines()[-1] == (f"musicssl embed: {what}; finished outputs are kept, and the same "
                                            "command carries on from them")
    assert 2 <= done < 12 and not leftovers(tmp_path / "out")
    recorded = {r["output"] for r in manifest(tmp_path / "out") if r["status"] == "ok"}
    assert recorded == set(outputs(tmp_path / "out"))
    assert main(["embed", *args]) == 0 and len(outputs(tmp_path / "out")) == 12


def test_two_concurrent_runs_share_one_output_folder(tmp_path):
    files = corpus(tmp_path / "in", 24, seconds=(0.5, 2.0))
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc", "--num-workers", "0"]
    procs = [cli_process(args, slow=0.02) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    records = manifest(tmp_path / "out")  # every line whole
    ok = [r["input"] for r in records if r["status"] == "ok"]
    assert sorted(ok) == sorted(map(str, files)), "each file embedded exactly once between the two runs"
    assert len(records) == 2 * len(files) and not leftovers(tmp_path / "out")
    for p in outputs(tmp_path / "out").values():
        assert arrays(p)["frames"].shape[-1] == 60


def test_a_filesystem_without_locks_still_gets_its_outputs(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK/EOPNOTSUPP on some FUSE and object-store mounts: the run goes on
    unlocked and says once what that risks."""
    import errno
    import logging

    from musicssl.bulk import manifest as mf

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(mf.fcntl, "flock", no_locks)
    monkeypatch.setattr(mf, "_warned_no_locks", [])
    corpus(tmp_path / "in", 4)
    with caplog.at_level(logging.WARNING, logger="musicssl"):
        res = extract([tmp_path / "in"], tmp_path / "out", "mfcc", num_workers=0)
    assert res.ok == 4 and len(outputs(tmp_path / "out")) == 4 and len(manifest(tmp_path / "out")) == 4
    assert caplog.text.count("no file locks") == 1


def test_shards_cover_every_file_exactly_once(tmp_path):
    files = corpus(tmp_path / "in", 30, seconds=(0.3, 0.6))
    out = tmp_path / "out"
    got = []
    for k in range(3):
        res = extract([tmp_path / "in"], out, "mfcc", shard=f"{k}/3", num_workers=0, table=True)
        got.append(res.ok)
        assert res.tables[0].name == f"clips.shard-{k}-of-3.parquet"
    assert sum(got) == len(files) and all(got)  # nobody idle, nothing twice
    assert len(outputs(out)) == len(files) and len(manifest(out)) == len(files)
    assert shard_of("d0/track 00.wav", 3) == shard_of("d0/track 00.wav", 3)  # a pure function of the name
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--shard", "3/3"]) == 2


def test_torchrun_two_processes_on_cpu(tmp_path):
    files = corpus(tmp_path / "in", 10, seconds=(0.5, 2.0))
    broken = tmp_path / "in" / "d0" / "track 00b.wav"  # second in order: rank 1's, whose errors rank 0 prints too
    broken.write_bytes(b"RIFF nonsense")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "musicssl", "embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--num-workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]  # one input failed: every rank exits non-zero
    assert "10 embedded, 0 skipped, 1 failed of 11 inputs" in res.stdout
    records = manifest(out)  # merged by rank 0; no part files left
    assert sorted(r["input"] for r in records if r["status"] == "ok") == sorted(map(str, files))
    assert len({r["host"] for r in records}) == 2 and not leftovers(out)
    assert (out / "failed.txt").read_text().strip() == str(broken) and f"error: {broken}" in res.stderr


def test_what_a_killed_torchrun_run_left_is_merged_before_this_runs_records(tmp_path):
    """A killed torchrun run's part files were appended after the resuming run's records, so they read
    as the latest: a file fixed since stayed failed (failed.txt, the table). They now go in first."""
    tone(tmp_path / "in" / "a.wav", 0.5)
    (tmp_path / "in" / "b.wav").write_bytes(b"RIFF nonsense")
    out = tmp_path / "out"
    assert extract(tmp_path / "in", out, "mfcc", num_workers=0).failed == 1
    lines = (out / "manifest.jsonl").read_text().splitlines()
    # As a killed rank leaves it: its records in a part file no live process holds.
    (out / "manifest.jsonl").write_text("".join(line + "\n" for line in lines if '"ok"' in line))
    (out / ".manifest.zz-killed.rank1.part.jsonl").write_text("".join(line + "\n" for line in lines if '"error"' in line))
    tone(tmp_path / "in" / "b.wav", 0.5, seed=2)  # fixed since
    res = extract(tmp_path / "in", out, "mfcc", num_workers=0, table=True)
    assert (res.ok, res.skipped, res.failed, res.failed_list) == (1, 1, 0, None) and not leftovers(out)
    latest = {r["input"]: r["status"] for r in manifest(out)}
    assert latest == {str(tmp_path / "in" / "a.wav"): "skipped", str(tmp_path / "in" / "b.wav"): "ok"}


def test_files_from_stdin_is_refused_under_torchrun(tmp_path, monkeypatch):
    """Every process read the one standard input: rank 0 got none of it and said no audio was found."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--files-from - under torchrun: every process would read the one"):
        extract([], tmp_path / "out", "mfcc", files_from="-")
    assert not (tmp_path / "out").exists()


def test_an_encoder_passed_in_is_left_as_it_was(tmp_path):
    """extract(model=enc, dtype=..., device=...) runs a copy where it would change the caller's encoder."""
    tone(tmp_path / "a.wav", 0.5)
    enc = musicssl.load()
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    assert extract(tmp_path / "a.wav", tmp_path / "out", enc, dtype=torch.bfloat16, num_workers=0).ok == 1
    assert enc.training and all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_model_digest_covers_zero_dim_buffers() -> None:
    """PESTO keeps its pitch shift as a 0-d buffer: the digest must read it, and change with it."""
    import musicssl
    from musicssl.bulk.run import model_sha256

    enc = musicssl.load("pesto-tiny", pretrained=False)
    name = next(k for k, v in enc.state_dict().items() if v.dim() == 0)
    before = model_sha256(enc)
    enc.state_dict()[name].add_(1.0)
    assert model_sha256(enc) != before


def test_outputs_get_the_usual_permissions(tmp_path: Path) -> None:
    """Temporary files are private (0600); the renamed output follows the umask like any new file."""
    from musicssl.bulk.outputs import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x.npy", lambda fh: fh.write(b"data"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.npy").stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux's")
def test_the_run_flushes_its_own_filesystem_only(tmp_path, monkeypatch):
    """One flush at the end, of the filesystem holding OUT: sync(2) would wait for every disk of a
    shared machine."""
    import ctypes

    from musicssl.bulk import outputs as outputs_module

    flushed, real = [], ctypes.CDLL(None).syncfs

    class Libc:
        def syncfs(self, fd: int) -> int:
            flushed.append(os.fstat(fd).st_dev)
            return real(fd)

    monkeypatch.setattr(outputs_module.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(os, "sync", lambda: pytest.fail("sync(2) flushes every filesystem"))
    corpus(tmp_path / "in", 2)
    assert extract(tmp_path / "in", tmp_path / "out", "mfcc").ok == 2
    assert flushed == [(tmp_path / "out").stat().st_dev]


@pytest.mark.parametrize("cores, device, world, start, most", [
    (2, "cpu", 1, 0, 0), (1, "cpu", 1, 0, 0), (8, "cpu", 1, 1, 4), (16, "cuda", 1, 8, 15), (4, "cuda", 1, 3, 3),
    (16, "cuda", 4, 3, 3), (1, "cuda", 1, 1, 1), (8, "cpu", 4, 0, 0), (16, "cpu", 2, 1, 4)])
def test_default_decoders_follow_cores_and_device(monkeypatch: pytest.MonkeyPatch, cores: int, device: str,
                                                  world: int, start: int, most: int) -> None:
    """Cores are shared by the runs on the machine. CPU: a decoding process only with more than two
    cores per run, growing to half of them; GPU: enough to keep it fed (at most 8 to start), a core
    left to the loop. A number given is kept."""
    from types import SimpleNamespace

    from musicssl.bulk.run import _Run

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    run = SimpleNamespace(encoder=SimpleNamespace(device=torch.device(device)), ranks=SimpleNamespace(world=world))
    assert _Run._workers(run, None) == (start, most)
    assert _Run._workers(run, 3) == (3, 3)


def test_compile_flag_gives_the_same_outputs(tmp_path, tiny_model, monkeypatch):
    """`musicssl embed --compile` runs the model through Encoder.compile_windows (here with torch's
    eager backend: compiling C++ would take minutes) and writes what an uncompiled run writes."""
    from musicssl.models.base import Encoder

    calls = []
    compile_windows = Encoder.compile_windows

    def eager_compile(self: Encoder) -> Encoder:
        calls.append(self)
        return compile_windows(self, backend="eager")

    monkeypatch.setattr(Encoder, "compile_windows", eager_compile)
    corpus(tmp_path / "in", 5, seconds=(0.5, 7.0))
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "ref"), "--model", tiny_model,
                 "--num-workers", "0"]) == 0
    assert not calls
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_model,
                 "--num-workers", "0", "--compile", "--batch-size", "4"]) == 0
    assert len(calls) == 1
    ref, out = outputs(tmp_path / "ref"), outputs(tmp_path / "out")
    assert ref.keys() == out.keys()
    for key in ref:
        with np.load(ref[key]) as a, np.load(out[key]) as b:
            np.testing.assert_allclose(b["frames"], a["frames"], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# --- what the table and run.json hold across runs (a consumer's hostile pass) ----------------------

def _table_rows(out: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(out / "clips.parquet").to_pydict()
    return {o: np.asarray(c, np.float32) for o, c in zip(t["output"], t["clip"])}


def test_a_run_over_part_of_a_collection_writes_where_the_whole_run_did(tmp_path):
    """A run over one file of OUT's collection used to lay it out from that file's folder, and its
    settings stamp (keyed by input) then hid the stale output where the whole run had put it."""
    pytest.importorskip("pyarrow")
    files = corpus(tmp_path / "in", 4)
    out = tmp_path / "out"
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--pool", "mean"]) == 0
    assert main(["embed", str(files[0]), "-o", str(out), "--model", "mfcc", "--pool", "max", "--overwrite"]) == 0
    assert set(outputs(out)) == {f"d{i % 3}/track {i:02d}.wav.npz" for i in range(4)}  # nothing beside them
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--pool", "max", "--table"]) == 0
    enc = musicssl.load("mfcc")
    for key, clip in _table_rows(out).items():
        np.testing.assert_allclose(clip, enc.embed(tmp_path / "in" / key[:-4], pool="max").clip[0], rtol=1e-5, atol=1e-5)


def test_the_table_holds_the_whole_collection_and_no_input_whose_last_run_failed(tmp_path):
    pytest.importorskip("pyarrow")
    files = corpus(tmp_path / "in", 3)
    out, args = tmp_path / "out", ["-o", str(tmp_path / "out"), "--model", "mfcc", "--table"]
    assert main(["embed", str(tmp_path / "in"), *args]) == 0 and len(_table_rows(out)) == 3
    files[1].write_bytes(b"RIFF not audio")  # damaged since
    assert main(["embed", str(tmp_path / "in"), *args, "--overwrite"]) == 1
    assert set(_table_rows(out)) == {"d0/track 00.wav.npz", "d2/track 02.wav.npz"}  # its old vector is not given
    tone(files[1], 1.0, seed=1)  # fixed: the retry of failed.txt gives the whole table, not its one file
    assert main(["embed", "--files-from", str(out / "failed.txt"), "--root", str(tmp_path / "in"), *args]) == 0
    assert len(_table_rows(out)) == 3


@pytest.mark.parametrize("arrow", [True, False])
def test_a_table_of_no_rows_is_written_empty(tmp_path, monkeypatch, arrow):
    """A shard with nothing embedded (or a retry whose files all fail) writes a table of 0 rows of
    the model's width, and the run ends as it would without --table."""
    if arrow:
        pytest.importorskip("pyarrow")
    else:
        monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.wav").write_bytes(b"RIFF not audio")
    res = extract([tmp_path / "in"], tmp_path / "out", "mfcc", table=True, num_workers=0)
    assert res.failed == 1 and res.exit_code == 1
    if arrow:
        import pyarrow.parquet as pq

        table = pq.read_table(res.tables[0])
        assert table.num_rows == 0 and table.schema.field("clip").type.list_size == musicssl.load("mfcc").embed_dim
    else:
        assert np.load(res.tables[0]).shape == (0, musicssl.load("mfcc").embed_dim)


def test_run_json_says_the_precision_of_a_cast_encoder_and_how_to_time_frames(tmp_path):
    tone(tmp_path / "in" / "a.wav", 3.0)
    enc = musicssl.load("simclr-mini", dtype=torch.bfloat16)
    res = extract([tmp_path / "in"], tmp_path / "out", enc, format="npy", num_workers=0)
    info = json.loads((res.out_dir / "run.json").read_text())
    assert info["model_dtype"] == "bfloat16"
    frames = np.load(res.out_dir / "a.wav.npy")
    t = (info["frame_offset"] + np.arange(frames.shape[0]) * info["hop_length"]) / info["sample_rate"]
    np.testing.assert_allclose(t, musicssl.load("simclr-mini").embed(tmp_path / "in" / "a.wav").timestamps.numpy())


def test_names_that_are_not_utf8_and_names_with_backslashes_keep_apart_in_the_table():
    from musicssl.bulk.outputs import _tsv_field, printable, table_name

    latin1 = os.fsdecode(b"caf\xe9.flac")
    assert table_name(latin1) == "caf\\xe9.flac" and table_name("caf\\xe9.flac") == "caf\\\\xe9.flac"
    assert printable("a\\b") == "a\\b"  # messages keep a name as it is
    assert _tsv_field('a\tb "c".wav') == 'a\\tb "c".wav'  # quotes as they are; pandas: quoting=csv.QUOTE_NONE


def test_outputs_made_before_settings_stamps_stay_in_the_table(tmp_path):
    """Manifest lines of an earlier version carry no stamp: such outputs are skipped as done, and
    so they belong in the table too."""
    pytest.importorskip("pyarrow")
    corpus(tmp_path / "in", 3)
    out, args = tmp_path / "out", ["-o", str(tmp_path / "out"), "--model", "mfcc"]
    assert main(["embed", str(tmp_path / "in"), *args]) == 0
    lines = [{k: v for k, v in r.items() if k != "settings"} for r in manifest(out)]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["embed", str(tmp_path / "in"), *args, "--table"]) == 0
    assert len(_table_rows(out)) == 3


def test_an_input_never_takes_the_output_of_another_file(tmp_path, capsys):
    """lib/a/x.wav into OUT, then lib/b/x.wav into the same OUT: laid out from its own folder, it
    would be named x.wav.npz too and skipped as done, with a's embedding under its name."""
    tone(tmp_path / "lib" / "a" / "x.wav", 1.0, seed=1)
    tone(tmp_path / "lib" / "b" / "x.wav", 1.0, seed=2)
    out = tmp_path / "out"
    assert main(["embed", str(tmp_path / "lib" / "a"), "-o", str(out), "--model", "mfcc"]) == 0
    assert main(["embed", str(tmp_path / "lib" / "b"), "-o", str(out), "--model", "mfcc"]) == 2
    assert "x.wav.npz, which holds" in capsys.readouterr().err and len(manifest(out)) == 1
    assert main(["embed", str(tmp_path / "lib" / "b"), "-o", str(out), "--model", "mfcc", "--overwrite"]) == 2
    (tmp_path / "lib" / "a").rename(tmp_path / "moved")  # a's file is gone: b's is made, not refused
    assert main(["embed", str(tmp_path / "lib" / "b"), "-o", str(out), "--model", "mfcc"]) == 0
    assert manifest(out)[-1]["status"] == "ok" and manifest(out)[-1]["input"].endswith("b/x.wav")


def test_a_run_that_finds_no_audio_leaves_no_run_json_to_refuse_the_next(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["embed", str(tmp_path / "empty"), "-o", str(out)]) == 1
    assert not (out / "run.json").exists()
    tone(tmp_path / "in" / "a.wav", 1.0)
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc"]) == 0


def test_mistakes_said_before_any_work_leave_no_folder_behind(tmp_path, capsys):
    tone(tmp_path / "in" / "a.wav", 1.0)
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out" / "x" / "y"), "--model", "no-such-model"]) == 2
    assert not (tmp_path / "out").exists()  # made for a run that never began, with the folders above it
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--root", str(tmp_path / "in" / "a.wav")]) == 2
    assert "a.wav is a file: give the folder that holds every input" in capsys.readouterr().err


def test_an_output_is_never_handed_to_another_input_nor_counted_twice(tmp_path):
    """The manifest lost, an existing output is not skipped as another file's (its metadata says
    whose it is); a root widened over an earlier run's leaves the table one row per input."""
    pytest.importorskip("pyarrow")
    tone(tmp_path / "lib" / "a" / "x.wav", 1.0, seed=1)
    tone(tmp_path / "lib" / "b" / "x.wav", 1.0, seed=2)
    out, args = tmp_path / "out", ["--model", "mfcc", "--table"]
    assert main(["embed", str(tmp_path / "lib" / "a"), "-o", str(out), *args]) == 0
    (out / "manifest.jsonl").unlink()
    assert main(["embed", str(tmp_path / "lib" / "b"), "-o", str(out), *args]) == 1
    assert manifest(out)[-1]["status"] == "error" and "holds" in manifest(out)[-1]["reason"]
    wide = tmp_path / "wide"
    assert main(["embed", str(tmp_path / "lib" / "a"), "-o", str(wide), *args]) == 0
    assert main(["embed", str(tmp_path / "lib"), "-o", str(wide), *args]) == 0  # a's file laid out anew: a/x.wav.npz
    assert sorted(_table_rows(wide)) == ["a/x.wav.npz", "b/x.wav.npz"]


def test_a_moved_collection_whose_manifest_was_lost_is_made_again(tmp_path):
    """Its outputs' metadata name files that are gone: made again from where they are now, not
    failed (a retry would fail the same way)."""
    tone(tmp_path / "lib" / "a" / "x.wav", 1.0)
    out = tmp_path / "out"
    assert main(["embed", str(tmp_path / "lib" / "a"), "-o", str(out), "--model", "mfcc"]) == 0
    (tmp_path / "lib" / "a").rename(tmp_path / "lib" / "d")
    (out / "manifest.jsonl").unlink()
    assert main(["embed", str(tmp_path / "lib" / "d"), "-o", str(out), "--model", "mfcc"]) == 0
    assert manifest(out)[-1]["status"] == "ok"


# --- faults of the disk, the streams and the input tree ---------------------------------------------

def _full_disk_after(calls: int):
    """A stand-in for manifest.append_records that fails with ENOSPC after `calls` appends."""
    import errno

    from musicssl.bulk import manifest as m

    real, seen = m.append_records, []

    def append(path, records):
        seen.append(len(records))
        if len(seen) > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, records)

    return append


def test_a_full_disk_met_by_the_manifest_stops_with_the_summary(tmp_path, monkeypatch, capsys):
    """ENOSPC from a manifest line (or the failed list, or run.json), not from an output, ended the
    run in a bare OSError traceback with no summary."""
    from musicssl.bulk import manifest as m

    corpus(tmp_path / "in", 4)
    monkeypatch.setattr(m, "append_records", _full_disk_after(2))
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc",
                 "--num-workers", "0"]) == 1
    out = capsys.readouterr().out
    assert "stopped because" in out and "No space left on device" in out and "free space" in out
    monkeypatch.undo()  # space freed: the same command finishes the job
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc"]) == 0
    assert len(outputs(tmp_path / "out")) == 4


def test_a_full_disk_at_the_start_or_the_end_is_said_in_a_line(tmp_path, monkeypatch, capsys, caplog):
    import errno

    from musicssl.bulk import run as bulk_run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    corpus(tmp_path / "in", 2)
    monkeypatch.setattr(bulk_run, "write_run_info", full)
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc"]) == 2
    assert "run.json: No space left on device; free space" in capsys.readouterr().err
    monkeypatch.undo()
    (tmp_path / "in" / "bad.wav").write_bytes(b"RIFF junk")
    monkeypatch.setattr(bulk_run, "write_failed", full)
    with caplog.at_level("WARNING", logger="musicssl"):
        assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc"]) == 1
    assert "1 failed of 3 inputs" in capsys.readouterr().out and "No space left on device" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(bulk_run, "write_table", full)  # a full disk at the table alone fails the run too
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc", "--table"]) == 1
    assert "stopped because" in capsys.readouterr().out


def test_a_manifest_that_cannot_be_written_is_said_before_any_work(tmp_path, monkeypatch, capsys):
    from musicssl.bulk import run as bulk_run

    corpus(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.jsonl").write_text("")
    monkeypatch.setattr(bulk_run.os, "access", lambda path, mode: False)  # as a user who may not write it
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc"]) == 2
    assert "manifest.jsonl cannot be written (permission denied)" in capsys.readouterr().err


def test_a_garbled_manifest_line_is_skipped(tmp_path):
    """One non-UTF-8 byte in the manifest made every later run refuse with a bare UnicodeDecodeError."""
    corpus(tmp_path / "in", 2)
    assert extract([tmp_path / "in"], tmp_path / "out", "mfcc").ok == 2
    with open(tmp_path / "out" / "manifest.jsonl", "ab") as fh:
        fh.write(b'{"input": "\xff\xfe garbled"}\n')
    assert extract([tmp_path / "in"], tmp_path / "out", "mfcc").skipped == 2


def test_what_a_folder_search_cannot_read_is_said_and_fails_the_run(tmp_path, capsys):
    """An unreadable folder (or a link that leads nowhere) inside an input tree was a log line only:
    the run said success with its files left out."""
    corpus(tmp_path / "in", 2)
    (tmp_path / "in" / "gone.wav").symlink_to(tmp_path / "elsewhere.wav")
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "mfcc"]) == 1
    captured = capsys.readouterr()
    assert "2 embedded, 0 skipped, 0 failed" in captured.out
    assert "1 folders or files in the inputs could not be read" in captured.err and "gone.wav" in captured.err


def test_closed_streams_and_a_dangling_output_link_get_one_line(tmp_path, monkeypatch, capsys):
    corpus(tmp_path / "in", 1)
    monkeypatch.setattr(sys, "stdin", None)  # started with <&-
    assert main(["embed", "--files-from", "-", "-o", str(tmp_path / "out")]) == 2
    assert "standard input is closed" in capsys.readouterr().err
    (tmp_path / "link").symlink_to("/nonexistent/scratch/feats")
    assert main(["embed", str(tmp_path / "in"), "-o", str(tmp_path / "link"), "--model", "mfcc"]) == 2
    assert "is a link to /nonexistent/scratch/feats, which leads nowhere" in capsys.readouterr().err


def test_a_reason_keeps_the_spaces_of_a_name():
    from musicssl.errors import describe

    assert describe(ValueError("cannot decode 'two  spaces.flac'\nsecond line")) == \
        "ValueError: cannot decode 'two  spaces.flac' second line"
