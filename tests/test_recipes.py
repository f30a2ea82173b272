"""Every recipe: it learns on a fixed batch, resumes exactly, and exports what load() reads back;
DDP over two CPU processes trains the same steps as one process with twice the batch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import musicssl
from musicssl.recipes import RECIPES
from musicssl.recipes.data import SyntheticMusic
from musicssl.recipes.export import export_run
from musicssl.recipes.train import load_checkpoint, recipe_class, recipe_from_checkpoint, train

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
TWO_VIEW = dict(backbone="jepa-tiny", backbone_args=TINY, crop_seconds=2.0, view_seconds=1.0,
                projector_hidden=64, projector_out=32)
SETTINGS = {
    "jepa": dict(backbone="jepa-tiny", backbone_args=TINY, crop_seconds=2.55, predictor_dim=32,
                 predictor_depth=1, predictor_heads=2),
    "mae": dict(backbone="jepa-tiny", backbone_args=TINY, crop_seconds=2.55, decoder_dim=32, decoder_depth=1,
                decoder_heads=2),
    "simclr": TWO_VIEW,
    "byol": TWO_VIEW,
    "vicreg": TWO_VIEW,
}
LOOP = dict(data="synthetic", batch_size=4, num_workers=0, warmup_steps=1, data_length=32, log_every=1, lr=1e-3)
NAMES = sorted(set(RECIPES) & set(SETTINGS))


def build(name: str):
    torch.manual_seed(0)
    cls = recipe_class(name)
    return cls(cls.Config(**SETTINGS[name]))


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_and_decreases_on_a_fixed_batch(name):
    recipe = build(name)
    sr = recipe.export_encoder().sample_rate
    data = SyntheticMusic(sample_rate=sr, crop_seconds=recipe.cfg.crop_seconds, length=6, seed=1)
    batch = recipe.collate([data[i] for i in range(6)])
    opt = torch.optim.AdamW(recipe.parameters(), lr=2e-3)
    losses = []
    for step in range(15):
        loss = recipe.training_step(batch)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recipe.after_step(step, 15)
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact_and_export_loads(name, tmp_path):
    settings = {**LOOP, **SETTINGS[name], "steps": 4}
    whole = train(name, out=str(tmp_path / "whole"), progress=False, **settings)
    cut = train(name, out=str(tmp_path / "cut"), progress=False, until=2, **settings)
    assert load_checkpoint(cut)["step"] == 2
    train(name, out=str(cut), progress=False, **settings)  # picks up at step 2
    a, b = load_checkpoint(whole), load_checkpoint(cut)
    assert b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=f"{name}: {key} differs after resume")
    logs = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in logs)

    release = export_run(whole, tmp_path / "release")
    assert {p.name for p in release.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    _card_command_reproduces_the_run(release, a)
    mine = recipe_from_checkpoint(a).export_encoder().eval()
    x = (0.1 * np.random.default_rng(0).standard_normal(3 * mine.sample_rate)).astype(np.float32)
    loaded = musicssl.load(release)
    torch.testing.assert_close(loaded.embed(x, sr=mine.sample_rate).frames, mine.embed(x, sr=mine.sample_rate).frames)
    # The release describes this run, not the backbone's registry entry (nor its licence).
    assert f"with the {name} recipe, 4 steps" in loaded.spec.description and loaded.spec.license == "unspecified"
    assert loaded.spec.name == "release" and f"musicssl train {name}" in loaded.spec.source


def test_pesto_resumes_exactly_too(tmp_path):
    """PESTO's backbone has dropout: a resumed run must draw the random numbers the whole run drew
    (starting the data loader draws one, so the checkpoint's generator state is put back after)."""
    settings = dict(LOOP, preset="pesto-tiny", steps=4, batch_size=2)
    whole = train("pesto", out=str(tmp_path / "whole"), progress=False, **settings)
    cut = train("pesto", out=str(tmp_path / "cut"), progress=False, until=2, **settings)
    train("pesto", out=str(cut), progress=False, **settings)
    a, b = load_checkpoint(whole)["model"], load_checkpoint(cut)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0, msg=f"{key} differs after resume")


def test_a_stop_signal_keeps_the_steps_since_the_last_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (held back until the step ends) saves a checkpoint at the last finished
    step; the run then resumes from it to the same weights as an uninterrupted run."""
    import musicssl.recipes.train as train_mod
    from musicssl import signals

    settings = {**LOOP, **SETTINGS["simclr"], "steps": 5, "ckpt_every": 100}
    whole = train("simclr", out=str(tmp_path / "whole"), progress=False, **settings)
    monkeypatch.setattr(signals, "received", [])
    report = train_mod._report

    def stop_after_step_3(run, bar, window, done, *args):
        report(run, bar, window, done, *args)
        if done == 3:
            signals.received.append(signal.SIGINT)  # as the handler does while the step is held

    monkeypatch.setattr(train_mod, "_report", stop_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train("simclr", out=str(tmp_path / "cut"), progress=False, **settings)
    assert load_checkpoint(tmp_path / "cut")["step"] == 3
    monkeypatch.setattr(signals, "received", [])
    monkeypatch.setattr(train_mod, "_report", report)
    train("simclr", out=str(tmp_path / "cut"), progress=False, **settings)
    a, b = load_checkpoint(whole)["model"], load_checkpoint(tmp_path / "cut")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logs == [1, 2, 3, 4, 5]


def test_resuming_with_other_settings_is_refused_and_steps_may_grow(tmp_path):
    settings = {**LOOP, **SETTINGS["simclr"], "steps": 2}
    run = train("simclr", out=str(tmp_path / "run"), progress=False, **settings)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 4 there, 8 now, lr: 0.001 there, 0.1 now\)"):
        train("simclr", out=str(run), progress=False, **{**settings, "batch_size": 8, "lr": 0.1})
    with pytest.raises(ValueError, match="recipe: 'simclr' there, 'byol' now"):
        train("byol", out=str(run), progress=False, **settings)
    train("simclr", out=str(run), progress=False, **{**settings, "steps": 3, "log_every": 2})
    assert load_checkpoint(run)["step"] == 3
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="it is damaged"):
        train("simclr", out=str(run), progress=False, **settings)


def test_a_moved_run_resumes_whatever_its_folder_and_data_are_called(tmp_path, monkeypatch):
    data = Path(__file__).parent / "data"  # three short clips
    settings = {**LOOP, **SETTINGS["simclr"], "steps": 1, "data": data}  # pathlib paths, as for any file API
    run = train("simclr", out=tmp_path / "run", progress=False, **settings)
    moved = run.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    train("simclr", out="moved/", progress=False, **{**settings, "steps": 2, "data": os.path.relpath(data) + "/"})
    assert load_checkpoint(moved)["step"] == 2
    with pytest.raises(ValueError, match="data: .* there, 'synthetic' now"):  # other data is still refused
        train("simclr", out="moved", progress=False, **{**settings, "steps": 3, "data": "synthetic"})
    (tmp_path / "elsewhere" / "data").mkdir(parents=True)  # the same relative name from another folder
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="elsewhere/data' now"):
        train("simclr", out="../moved", progress=False, **{**settings, "steps": 3, "data": "data"})


@pytest.mark.parametrize("name, change, said", [
    ("mae", {"mask_ratio": 1.0}, "mask_ratio=1.0 hides 80 of the 80 patches of a crop"),  # the encoder sees nothing
    ("mae", {"mask_ratio": 0.0}, "mask_ratio=0.0 hides 0 of the 80 patches"),  # no loss at all
    ("simclr", {"batch_size": 1}, "the simclr recipe needs batch_size >= 2"),
    ("jepa", {"backbone": "clmr-samplecnn", "backbone_args": {}}, "needs a backbone of the spec_vit family"),
    ("simclr", {"backbone": "logmel", "backbone_args": {}}, "backbone=logmel has no weights to train"),
    ("byol", {"ema_start": 2.0}, "ema_start must be in [0, 1]"),
    ("vicreg", {"view_seconds": 3.0}, "view_seconds=3.0 must be > 0 and at most crop_seconds=2.0"),
    ("simclr", {"min_lr_ratio": 5.0}, "min_lr_ratio (the last step's share of lr) must be in [0, 1]"),
    ("jepa", {"n_targets": 12}, "12 targets of 8 tokens can cover all but 0 of the 70 tokens"),  # a context of a sliver
])
def test_settings_a_recipe_cannot_train_with_are_refused(name, change, said, tmp_path):
    with pytest.raises(ValueError, match=re.escape(said)):
        train(name, out=str(tmp_path / "run"), progress=False, **{**LOOP, **SETTINGS[name], "steps": 1, **change})


def test_train_and_export_never_write_over_a_release_or_a_run(tmp_path, capsys):
    from musicssl.cli import main

    settings = {**LOOP, **SETTINGS["simclr"], "steps": 1}
    run = train("simclr", out=str(tmp_path / "run"), progress=False, **settings)
    release = export_run(run, tmp_path / "release")
    mode = (release / "config.json").stat().st_mode & 0o777
    assert (release / "model.safetensors").stat().st_mode & 0o777 == mode  # safetensors alone wrote 0600
    with pytest.raises(ValueError, match="holds a model release or another config.json"):
        train("simclr", out=str(release), progress=False, **settings)
    assert musicssl.load(release).family == "spec_vit"  # still a release
    with pytest.raises(ValueError, match="is a training run .* export into a new folder"):
        export_run(run, run)
    assert main(["train", "jepa", "--presets"]) == 0 and "jepa-tiny:" in capsys.readouterr().out
    assert main(["train", "jepa"]) == 2 and "--out RUN_DIR is required" in capsys.readouterr().err


def test_a_log_line_gives_the_means_of_its_steps(tmp_path):
    """A line every 3 steps gives the mean loss and gradient norm of those 3 steps (it gave the
    last step's alone, as noisy as one batch)."""
    settings = {**LOOP, **SETTINGS["simclr"], "steps": 6}
    every = train("simclr", out=str(tmp_path / "every"), progress=False, **settings)
    third = train("simclr", out=str(tmp_path / "third"), progress=False, **{**settings, "log_every": 3})
    lines = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (every, third)]
    assert [r["step"] for r in lines[1]] == [3, 6]
    for i, record in enumerate(lines[1]):
        for key in ("loss", "grad_norm"):
            assert record[key] == pytest.approx(np.mean([r[key] for r in lines[0][3 * i : 3 * i + 3]]), rel=1e-5)


def test_steps_fp16_skips_are_counted_not_averaged_into_the_gradient_norm(tmp_path):
    """fp16's scaler skips steps whose gradients overflow (their norm inf or NaN): a log line gave
    NaN for the whole window (not even strict JSON); it now averages the finite ones and counts the rest."""
    settings = {**LOOP, **SETTINGS["simclr"], "steps": 6, "log_every": 3, "precision": "fp16"}
    run = train("simclr", out=str(tmp_path / "run"), progress=False, **settings)
    lines = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
             for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_steps") for r in lines)  # the first steps overflow at the initial scale
    for r in lines:
        assert r["grad_norm"] is None if r.get("skipped_steps") == 3 else np.isfinite(r["grad_norm"])


def test_a_batch_larger_than_the_data_is_said_for_in_batch_negatives(tmp_path, caplog):
    settings = {**LOOP, **SETTINGS["simclr"], "steps": 1, "data_length": 3}
    with caplog.at_level("WARNING", logger="musicssl.recipes.train"):
        train("simclr", out=str(tmp_path / "simclr"), progress=False, **settings)
        train("byol", out=str(tmp_path / "byol"), progress=False, **{**settings, **SETTINGS["byol"]})
    assert caplog.text.count("holds more items than the 3 files") == 1 and "simclr takes them for negatives" in caplog.text


def test_clip_grad_0_means_no_clipping(tmp_path):
    settings = {**LOOP, **SETTINGS["simclr"], "steps": 1, "warmup_steps": 0, "clip_grad": 0.0, "weight_decay": 0.0}
    before = {k: v.detach().clone() for k, v in build("simclr").named_parameters()}  # not BatchNorm's statistics
    after = load_checkpoint(train("simclr", out=str(tmp_path / "run"), progress=False, **settings))["model"]
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0


def _card_command_reproduces_the_run(release: Path, ckpt: dict) -> None:
    """The card's `musicssl train` line, parsed as the CLI parses it, gives the run's configs."""
    import dataclasses
    import shlex

    from musicssl.recipes.train import parse_overrides, resolve_configs

    (line,) = [ln for ln in (release / "README.md").read_text().splitlines() if "musicssl train" in ln]
    argv = shlex.split(line)
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else None
    tcfg, rcfg = resolve_configs(argv[2], preset, parse_overrides([a for a in argv if "=" in a]))
    place = {"data": ckpt["train_config"]["data"], "out": ckpt["train_config"]["out"]}
    assert {**dataclasses.asdict(tcfg), **place} == ckpt["train_config"]
    assert json.loads(json.dumps(dataclasses.asdict(rcfg))) == ckpt["recipe_config"]


def test_presets_and_overrides_are_checked():
    from musicssl.recipes.train import parse_overrides, resolve_configs

    tcfg, rcfg = resolve_configs("jepa", "jepa-small", parse_overrides(["steps=7", 'backbone_args={"depth": 3}']))
    assert tcfg.steps == 7 and rcfg.backbone == "jepa-small" and rcfg.backbone_args == {"depth": 3}
    with pytest.raises(ValueError, match="no preset"):
        resolve_configs("jepa", "jepa-huge", {})
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_configs("jepa", None, {"stepz": 3})
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_configs("barlow", None, {})
    # Values are checked against the settings' types and ranges before anything is built.
    assert resolve_configs("jepa", None, parse_overrides(["steps=1e3", "lr=1"]))[0].steps == 1000
    for bad, said in [("steps=abc", "steps='abc' must be of type int"), ("lr=true", "lr=True must be of type float"),
                      ("n_targets=2.5", "n_targets=2.5 must be of type int"), ("backbone_args=3", "backbone_args"),
                      ("steps=0", "steps must be >= 1"), ("precision=fp8", "precision must be")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            resolve_configs("jepa", None, parse_overrides([bad]))


def test_bad_device_and_out_are_refused_before_training(tmp_path):
    from musicssl.errors import DeviceError, OutputPathError
    from musicssl.recipes.train import train

    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        train("simclr", out=str(tmp_path / "run"), device="tpu", steps=1)
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file: give --out a folder"):
        train("simclr", out=str(tmp_path / "file"), steps=1)
    run = train("simclr", out=str(tmp_path / "run"), progress=False, **{**LOOP, **SETTINGS["simclr"], "steps": 1})
    with pytest.raises(OutputPathError, match="is a file: give --out a folder"):  # export names its option too
        export_run(run, tmp_path / "file")


def test_ddp_on_two_cpu_processes_matches_one_process_with_twice_the_batch(tmp_path):
    """Gradients are averaged over ranks, each rank taking half of the same global batch."""
    args = ["mae", "--data", "synthetic", "steps=3", "batch_size=4", "num_workers=0", "warmup_steps=1",
            "data_length=16", "log_every=1", "backbone_args=" + json.dumps(TINY), "crop_seconds=2.55",
            "decoder_dim=32", "decoder_depth=1", "decoder_heads=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in [("one", [sys.executable, "-m", "musicssl"]),
                          ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", "2", "-m", "musicssl"])]:
        res = subprocess.run([*launcher, "train", *args[:3], "--out", str(tmp_path / out), *args[3:]],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    one, two = (load_checkpoint(tmp_path / out) for out in ("one", "two"))
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5)
    loss = {out: [json.loads(line)["loss"] for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]
            for out in ("one", "two")}
    np.testing.assert_allclose(loss["two"], loss["one"], rtol=1e-4)


# --- faults of the run folder ---------------------------------------------------------------------

def test_a_full_disk_at_a_checkpoint_is_one_error_and_leaves_no_part_file(tmp_path, monkeypatch):
    """torch says a full disk as a RuntimeError of its zip writer: it was a bare traceback, and the
    partial checkpoint.pt.part kept the disk full."""
    from musicssl.errors import OutputPathError

    real = torch.save

    def full(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)  # what torch wrote before it ran out of room stays behind
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13891264 vs 13891152")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputPathError, match="cannot write .*checkpoint.pt: .*free space"):
        train("simclr", out=str(tmp_path / "run"), progress=False, **{**LOOP, **SETTINGS["simclr"], "steps": 1})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".train.lock", "config.json", "log.jsonl"]


def test_one_run_folder_trains_one_run_at_a_time(tmp_path):
    """Two trainings into one --out interleaved their log and raced for the checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".train.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"host pid 1\n")
    script = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(run / ".train.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(ValueError, match="is being trained by host pid 1: wait for it to end"):
            train("simclr", out=str(run), progress=False, **{**LOOP, **SETTINGS["simclr"], "steps": 1})
    finally:
        holder.kill()
        holder.wait()
        os.close(fd)


def test_a_fresh_start_drops_the_log_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # a kill before any checkpoint left these
    train("simclr", out=str(run), progress=False, **{**LOOP, **SETTINGS["simclr"], "steps": 2})
    assert [json.loads(l)["step"] for l in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_refused_data_and_foreign_checkpoints_leave_nothing_behind(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.wav\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: it is not UTF-8 text .* save it as UTF-8"):
        train("simclr", out=str(tmp_path / "run"), progress=False,
              **{**LOOP, **SETTINGS["simclr"], "steps": 1, "data": str(tmp_path / "latin1.txt")})
    assert not (tmp_path / "run").exists()  # config.json was written before the data was read
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"a": 1}, other / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not a checkpoint of `musicssl train`"):
        export_run(other, tmp_path / "rel")
    assert not (tmp_path / "rel").exists()


def test_the_card_of_a_run_resumed_with_other_steps_says_so(tmp_path):
    """A run extended by a resume (steps=2, then steps=3) had the card of one run with steps=3, whose
    learning-rate schedule, and so weights, differ."""
    settings = {**LOOP, **SETTINGS["simclr"]}
    run = train("simclr", out=str(tmp_path / "run"), progress=False, **{**settings, "steps": 2})
    train("simclr", out=str(run), progress=False, **{**settings, "steps": 3})
    assert load_checkpoint(run)["segments"] == [[0, 2], [2, 3]]
    card = (export_run(run, tmp_path / "rel") / "README.md").read_text()
    assert "resumed with other `steps` (steps=2 from step 0, then steps=3 from step 2)" in card
    plain = export_run(train("simclr", out=str(tmp_path / "one"), progress=False, **{**settings, "steps": 1}),
                       tmp_path / "rel1")
    assert "resumed with other" not in (plain / "README.md").read_text()


def test_a_resume_says_when_the_data_changed(tmp_path, caplog):
    """Files added between two runs of one training changed its batches without a word."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(Path(__file__).parent / "data", data)
    settings = {**LOOP, **SETTINGS["simclr"], "data": str(data)}
    run = train("simclr", out=str(tmp_path / "run"), progress=False, **{**settings, "steps": 1})
    first = next(p for p in sorted(data.rglob("*")) if p.suffix in (".wav", ".flac"))
    shutil.copy(first, data / ("added" + first.suffix))
    with caplog.at_level("WARNING"):
        train("simclr", out=str(run), progress=False, **{**settings, "steps": 2})
    assert "holds other files than when the run began" in caplog.text and "uninterrupted" in caplog.text
    caplog.clear()
    first.rename(data / ("renamed" + first.suffix))  # as many files as before, but not the same ones
    with caplog.at_level("WARNING"):
        train("simclr", out=str(run), progress=False, **{**settings, "steps": 3})
    assert "holds other files than when the run began" in caplog.text


@pytest.mark.parametrize("keep", [5000, 60000])
def test_a_checkpoint_cut_part_way_is_said_to_be_damaged(tmp_path, keep):
    """Cut at some lengths, torch.load raised OSError ("[Errno 22] Invalid argument"), which was
    passed on as it was."""
    settings = {**LOOP, **SETTINGS["simclr"], "steps": 1}
    run = train("simclr", out=str(tmp_path / "run"), progress=False, **settings)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:keep])
    with pytest.raises(ValueError, match="it is damaged"):
        load_checkpoint(run)


def test_a_full_disk_when_a_run_starts_leaves_no_folder(tmp_path, monkeypatch):
    import errno

    from musicssl.errors import OutputPathError

    real = os.write

    def full(fd, data):
        if data.endswith(f"pid {os.getpid()}\n".encode()):  # the lock file's line, the run's first write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputPathError, match=r"cannot write .*\.train\.lock: No space left on device; free space"):
        train("simclr", out=str(tmp_path / "run"), progress=False, **{**LOOP, **SETTINGS["simclr"], "steps": 1})
    assert not (tmp_path / "run").exists()


def test_an_out_of_other_files_is_refused_before_a_run_starts(tmp_path):
    """--out as the data folder (or any folder of other files) was taken: the run's files went in
    beside them, and a log.jsonl there was appended to and trimmed."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "song.wav").write_bytes(b"RIFF")
    with pytest.raises(ValueError, match="holds song.wav, which no training run writes"):
        train("simclr", out=str(tmp_path / "data"), progress=False, **{**LOOP, **SETTINGS["simclr"], "steps": 1})
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["song.wav"]
