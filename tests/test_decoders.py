"""Decoding processes of `musicssl embed`: a file that crashes, kills or hangs its decoder fails
alone, in its place in the order, and every other file arrives whole."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import musicssl.bulk.decoders as decoders
import musicssl.bulk.growth as growth
import musicssl.bulk.run as bulk_run
from decode_faults import faulty
from musicssl.audio.worker import decode_one
from musicssl.bulk import extract
from musicssl.bulk.decoders import DecoderPool
from musicssl.bulk.trail import Trail, left_by_dead_runs
from musicssl.cli import main

pytestmark = pytest.mark.skipif(not decoders.ISOLATED, reason="decoding processes need POSIX")
SR = 16000


def clip(path: Path, seconds: float, seed: int) -> str:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR)
    return str(path)


def items(paths: list[str], workers: int, **kw) -> list[dict]:
    with DecoderPool(paths, SR, workers, decode=faulty, **kw) as pool:
        return list(pool)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_file_that_crashes_or_kills_its_decoder_fails_alone(tmp_path, workers):
    names = ["a", "crash1", "b", "killed1", "c", "crash2", "d", "e", "f"]
    paths = [clip(tmp_path / f"{n}.wav", 0.5 + i / 10, i) for i, n in enumerate(names)]
    (tmp_path / "text.wav").write_text("not audio")
    paths.insert(2, str(tmp_path / "text.wav"))
    got = items(paths, workers)
    assert [it["index"] for it in got] == list(range(len(paths)))
    for path, it in zip(paths, got):
        name = Path(path).stem
        if name.startswith("crash"):
            assert it["error"].startswith(f"{path}: the decoder crashed on this file (SIGSEGV)")
        elif name.startswith("killed"):
            assert "SIGKILL" in it["error"] and "memory" in it["error"]
        elif name == "text":
            assert it["error"] == decode_one(path, SR)["error"] and it["error"]
        else:  # whole, and the same samples as decoding here
            assert not it["error"] and np.array_equal(it["audio"].numpy(), decode_one(path, SR)["audio"])
        assert len(it["audio"]) == 0 or not it["error"]


def test_a_hung_decoder_is_stopped_after_the_timeout(tmp_path):
    paths = [clip(tmp_path / f"{n}.wav", 0.5, i) for i, n in enumerate(["a", "hang", "b", "c"])]
    # The limit counts from a process's start (about 0.2 s; more on a loaded machine), so not too tight.
    got = items(paths, 2, timeout=3.0)
    assert [bool(it["error"]) for it in got] == [False, True, False, False]
    assert "did not finish within 3 s" in got[1]["error"] and "--decode-timeout" in got[1]["error"]


@pytest.mark.parametrize("trail", [False, True])
def test_a_slow_decode_in_the_run_is_named_once_it_passes_the_timeout(tmp_path, caplog, trail):
    """In the run's own process a decode cannot be stopped, but the log says which file it is and
    what to do: with a trail (a CLI run), a restart fails it; else decoding processes would."""
    paths = [clip(tmp_path / "a.wav", 0.5, 0), clip(tmp_path / "slow.wav", 0.5, 1), clip(tmp_path / "b.wav", 0.5, 2)]
    with contextlib.closing(Trail(tmp_path)) if trail else contextlib.nullcontext() as kept:
        got = items(paths, 0, timeout=0.5, trail=kept)
    assert not any(it["error"] for it in got)
    said = [r.getMessage() for r in caplog.records if "still decoding" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(paths[1]) and "--num-workers 1" in said[0]
    assert ("start it again" in said[0]) == trail


def test_files_decoded_here_on_threads_come_in_order_and_are_all_named(tmp_path):
    """workers=0, threads=3: files are decoded three at a time, handed out in order, each the same
    as alone, and the trail names every file in hand while they decode."""
    paths = [clip(tmp_path / f"{i}.wav", 0.2 + i / 10, i) for i in range(7)]
    trail, seen = Trail(tmp_path), []

    def peek(path: str, sr: int) -> dict:
        time.sleep(0.2)  # the others of its group have begun by now
        seen.append(trail.path.read_bytes().split(b"\0"))
        return decode_one(path, sr)

    with contextlib.closing(trail), DecoderPool(paths, SR, 0, decode=peek, trail=trail, threads=3) as pool:
        got = list(pool)
    assert [it["index"] for it in got] == list(range(7))
    assert all(np.array_equal(it["audio"].numpy(), decode_one(p, SR)["audio"]) for p, it in zip(paths, got))
    assert max(len(names) for names in seen) == 3 and not trail.path.exists()


def test_a_warning_stays_with_the_file_whose_thread_logged_it(monkeypatch):
    """Two files decoding at once on threads: only the damaged one's manifest line gets the warning."""
    import logging
    import threading

    import musicssl.audio.io as audio_io

    warned = threading.Event()

    def load(path, sr, mono):
        if path == "damaged.flac":
            logging.getLogger("musicssl.audio.io").warning("damaged.flac: decoding stopped after 10 frames")
            warned.set()
        else:
            assert warned.wait(10)  # the other thread's warning comes while this file decodes
        return np.zeros(160, np.float32), sr

    monkeypatch.setattr(audio_io, "load_audio", load)
    got = {}
    names = ("good.wav", "damaged.flac")
    threads = [threading.Thread(target=lambda p=p: got.update({p: decode_one(p, SR)})) for p in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got["good.wav"]["warning"] == "" and got["good.wav"]["error"] == ""
    assert got["damaged.flac"]["warning"] == "damaged.flac: decoding stopped after 10 frames"


def test_groups_decoded_here_are_bounded_by_size_on_disk(tmp_path):
    """Small files go 4 per thread at a time; large ones one per thread, so a group's audio stays bounded."""
    small = [clip(tmp_path / f"s{i}.wav", 0.1, i) for i in range(10)]
    large = []
    for i in range(4):
        large.append(str(tmp_path / f"l{i}.wav"))
        with open(large[-1], "wb") as fh:
            fh.truncate(decoders.GROUP_BYTES)  # sparse: its size on disk is what counts
    with DecoderPool(small + large, SR, 0, threads=2) as pool:
        assert pool._group(0) == range(0, 8) and pool._group(8) == range(8, 10)
        assert pool._group(10) == range(10, 12)  # one per thread even past the bound


def test_every_file_a_dead_run_had_in_hand_is_a_suspect(tmp_path):
    names = [str(tmp_path / "a b.wav"), str(tmp_path / "c\nd.wav")]  # a line break is a legal name
    script = ("import sys, os, pathlib\nfrom musicssl.bulk.trail import Trail\n"
              "t = Trail(pathlib.Path(sys.argv[1]))\nfor n in sys.argv[2:]:\n    t.begin(n)\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *names], check=True)
    assert left_by_dead_runs(tmp_path) == set(names)
    assert left_by_dead_runs(tmp_path) == set()  # taken once


def test_audio_longer_than_a_slot_comes_through_the_socket(tmp_path, monkeypatch):
    monkeypatch.setattr(decoders, "SLOT", 3000)
    paths = [clip(tmp_path / "short.wav", 0.1, 0), clip(tmp_path / "long.wav", 2.0, 1),
             clip(tmp_path / "x.wav", 0.2, 2)]
    got = items(paths, 1)
    for path, it in zip(paths, got):
        assert np.array_equal(it["audio"].numpy(), decode_one(path, SR)["audio"])
    assert len(got[1]["audio"]) > 3000 >= len(got[0]["audio"])


def test_a_file_decoded_before_a_crash_is_kept(tmp_path, monkeypatch):
    """Its process dies on the next file before we read it: its samples are in our memory."""
    real_wait = decoders.wait

    def slow_wait(*a, **kw):
        time.sleep(0.3)  # the process decodes "a", then crashes on the next, before we look
        return real_wait(*a, **kw)

    monkeypatch.setattr(decoders, "wait", slow_wait)
    paths = [clip(tmp_path / "a.wav", 0.5, 0), clip(tmp_path / "crash.wav", 0.5, 1), clip(tmp_path / "b.wav", 0.5, 2)]
    got = items(paths, 1)
    assert np.array_equal(got[0]["audio"].numpy(), decode_one(paths[0], SR)["audio"]) and not got[0]["error"]
    assert "SIGSEGV" in got[1]["error"] and not got[2]["error"]


def test_processes_end_with_the_pool(tmp_path):
    paths = [clip(tmp_path / f"{i}.wav", 0.2, i) for i in range(6)]
    with DecoderPool(paths, SR, 2) as pool:
        next(pool)  # stop early: the processes hold queued files
        procs = [w.process for w in pool.workers]
    for p in procs:
        assert p.wait(timeout=10) is not None


def test_decoding_processes_leave_sigterm_to_the_run(tmp_path):
    """A scheduler's SIGTERM reaches every process of a job: the run stops its decoders itself, so
    one signalled first must not die under a file and have it recorded as failed."""
    paths = [clip(tmp_path / f"{name}.wav", 0.2, i) for i, name in enumerate(["a", "slow1", "b"])]
    with DecoderPool(paths, SR, 1, decode=faulty) as pool:
        got = [next(pool)]  # the process is serving, its handlers set, and now 2 s into slow1
        time.sleep(0.3)
        pool.workers[0].process.send_signal(signal.SIGTERM)
        got += list(pool)
    assert [it["error"] for it in got] == [""] * 3
    assert all(np.array_equal(it["audio"].numpy(), decode_one(p, SR)["audio"]) for p, it in zip(paths, got))


def test_embed_goes_on_past_a_crashing_decoder(tmp_path, monkeypatch, capsys):
    for i in range(4):
        clip(tmp_path / "in" / f"t{i}.wav", 1.0 + i / 4, i)
    ref = tmp_path / "ref"
    assert main(["embed", str(tmp_path / "in"), "-o", str(ref), "--model", "mfcc", "--num-workers", "2"]) == 0
    clip(tmp_path / "in" / "crash.wav", 1.0, 9)
    monkeypatch.setattr(bulk_run, "DecoderPool", functools.partial(DecoderPool, decode=faulty))
    out = tmp_path / "out"
    assert main(["embed", str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--num-workers", "2"]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'in' / 'crash.wav'}: the decoder crashed on this file (SIGSEGV)" in err
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((x["input"].rsplit("/", 1)[1], x["status"]) for x in lines) == [
        ("crash.wav", "error"), *((f"t{i}.wav", "ok") for i in range(4))]
    for i in range(4):
        a, b = np.load(ref / f"t{i}.wav.npz"), np.load(out / f"t{i}.wav.npz")
        assert np.array_equal(a["frames"], b["frames"])


@pytest.mark.parametrize("kind", ["lag", "serial"])
def test_a_run_held_up_by_decoding_adds_decoding_processes(tmp_path, monkeypatch, caplog, kind):
    """By default a run adds processes while it waits for decoded audio, here as if each file took
    50 ms to decode ("lag"), up to half the cores on CPU; it stops adding once one did not help
    (files decoded one at a time across processes, "serial"). The outputs stay the same."""
    n = 200 if kind == "lag" else 100  # 5 s either way
    paths = [clip(tmp_path / "in" / f"{kind}{i:03d}.wav", 0.2, i) for i in range(n)]
    ref = tmp_path / "ref"
    assert extract(tmp_path / "in", ref, "mfcc", num_workers=0).ok == n
    monkeypatch.setattr(bulk_run, "_cores", lambda: 8)  # starts with 1 process, may grow to 4
    monkeypatch.setattr(growth, "GROW_EVERY", 1.0)  # 20 files of 1 process, each a 5 % step of its rate
    monkeypatch.setattr(bulk_run, "DecoderPool", functools.partial(DecoderPool, decode=faulty))
    started = []
    monkeypatch.setattr(DecoderPool, "_start", lambda self, w, real=DecoderPool._start: started.append(1) or real(self, w))
    threads = torch.get_num_threads()
    with caplog.at_level("INFO", logger="musicssl"):
        assert extract(tmp_path / "in", tmp_path / "out", "mfcc").ok == n
    grown = [r.getMessage() for r in caplog.records if "decoding processes now" in r.getMessage()]
    assert len(started) == 1 + len(grown) and torch.get_num_threads() == threads  # threads given back at the end
    if kind == "lag":  # 2 processes decode twice as fast as 1
        assert 2 <= len(grown) <= 3 and "did not speed the run up" not in caplog.text, grown
    else:
        assert len(grown) == 1 and "did not speed the run up: 2 decoding processes" in caplog.text, grown
    for path in paths:
        name = Path(path).name + ".npz"
        assert np.array_equal(np.load(ref / name)["frames"], np.load(tmp_path / "out" / name)["frames"])


def test_decode_timeout_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["embed", str(tmp_path), "--decode-timeout", "-1"])
    assert "expected seconds >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", str(tmp_path), "--decode-timeout", "soon"])
    assert "expected a number of seconds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="decode_timeout"):
        extract([tmp_path], tmp_path / "out", "mfcc", decode_timeout=0)


def test_processes_that_cannot_start_leave_decoding_to_the_run(tmp_path, monkeypatch, caplog):
    """An interpreter that is not Python, or a path without musicssl: every process exits at once.
    The files are decoded in the run's process rather than all failed."""
    monkeypatch.setattr(decoders, "BOOT", "import sys; sys.exit(3)")
    paths = [clip(tmp_path / f"{i}.wav", 0.3, i) for i in range(5)]
    with DecoderPool(paths, SR, 2) as pool:
        got = list(pool)
    assert [it["index"] for it in got] == list(range(5)) and not any(it["error"] for it in got)
    assert all(np.array_equal(it["audio"].numpy(), decode_one(p, SR)["audio"]) for p, it in zip(paths, got))
    assert "decoding processes exit at start here (exit code 3" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_hung_decoder_dies_with_a_killed_run(tmp_path):
    """A run killed with SIGKILL cannot stop its processes; one stuck in a read must not outlive it."""
    clip(tmp_path / "hang.wav", 0.5, 0)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from decode_faults import faulty\nfrom musicssl.bulk.decoders import DecoderPool\n"
              f"pool = DecoderPool([{str(tmp_path / 'hang.wav')!r}], 16000, 1, decode=faulty)\n"
              "print(pool.workers[0].process.pid, flush=True)\nnext(pool)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(run.stdout.readline())
    time.sleep(1.0)  # it is inside the hanging decode by now
    assert _alive(worker)
    run.kill()
    run.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Running (a zombie left for init to reap counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


CRASHING_RUN = """
import functools, sys
sys.path.insert(0, {tests!r})
from decode_faults import faulty
import musicssl.bulk.run as bulk_run
from musicssl.bulk.decoders import DecoderPool
from musicssl.cli import main
bulk_run.DecoderPool = functools.partial(DecoderPool, decode=faulty)
sys.exit(main(sys.argv[1:]))
"""


def test_a_file_that_crashed_a_run_decoding_in_its_own_process_is_left_out_next_time(tmp_path):
    """--num-workers 0 has no isolation: the crash ends the run. The next run must not end the same way."""
    for name in ["a", "b", "crash", "c", "d"]:
        clip(tmp_path / "in" / f"{name}.wav", 1.0, len(name))
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", CRASHING_RUN.format(tests=str(Path(__file__).parent)), "embed",
           str(tmp_path / "in"), "-o", str(out), "--model", "mfcc", "--num-workers", "0", "--batch-size", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode < 0, first.stderr  # killed by the segfault, with no word
    assert [p.name for p in out.glob(".decoding.*")]  # what it was decoding is written down
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 1, second.stderr
    status = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        status[Path(rec["input"]).name] = (rec["status"], rec["reason"])
    assert sorted(k for k, v in status.items() if v[0] == "error") == ["crash.wav"]
    assert sorted(p.name for p in out.glob("*.npz")) == ["a.wav.npz", "b.wav.npz", "c.wav.npz", "d.wav.npz"]
    assert "SIGSEGV" in status["crash.wav"][1] and "ended an earlier run" in status["crash.wav"][1]
    assert not list(out.glob(".decoding.*"))
