"""Fine-tuning: layer groups of every family, freeze policies, layer-wise learning rates, training on a
synthetic task, the run folder that loads back, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import musicssl
from musicssl.cli import main
from musicssl.errors import DivergedError, ReleaseFormatError, TaskFormatError
from musicssl.factory import skip_weight_init
from musicssl.finetune import Classifier, apply_freeze, finetune, layer_groups, param_groups, train_mode

SR = 16000
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}


def tiny() -> musicssl.Encoder:
    """A 2-block spectrogram ViT with 1 s windows, random weights (seeded)."""
    torch.manual_seed(0)
    return musicssl.load("jepa-tiny", pretrained=False, depth=2, context_seconds=1.0, overlap_seconds=0.2)


def tone(f0: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) for k in (1, 2, 3))
    return (0.3 * x / np.abs(x).max() + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory) -> Path:
    """Three pitch classes of harmonic tones (0.6-1.4 s): 6 train, 3 valid, 3 test clips each."""
    root = tmp_path_factory.mktemp("task")
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for label, f0 in PITCHES.items():
        for i, split in enumerate(["train"] * 6 + ["valid"] * 3 + ["test"] * 3):
            name = f"audio/{label}_{i}.wav"
            (root / "audio").mkdir(exist_ok=True)
            sf.write(root / name, tone(f0 * rng.uniform(0.97, 1.03), rng.uniform(0.6, 1.4), rng), SR)
            rows.append(f"{name},{label},{split}")
    (root / "task.csv").write_text("\n".join(rows) + "\n")
    return root / "task.csv"


@pytest.fixture(scope="module")
def trained(task_csv, tmp_path_factory):
    """5 epochs of the head alone, then up to 8 of full fine-tuning, written to a run folder."""
    run = tmp_path_factory.mktemp("runs") / "tones"
    return finetune(task_csv, model=tiny(), out=run, freeze="full", epochs=8, batch_size=6, lr=1e-3, patience=8)


# --------------------------------------------------------------------------- layer groups


@pytest.mark.parametrize("name", musicssl.list_models(pretrained=False))
def test_layer_groups_cover_every_parameter_once(name):
    with skip_weight_init():  # the released sizes, unfilled: cheap to build
        enc = musicssl.load(name, pretrained=False)
    groups = layer_groups(enc)
    names = [n for g in groups for n in g]
    assert sorted(names) == sorted(n for n, _ in enc.named_parameters())  # each exactly once
    blocks = enc.finetune_blocks()
    assert len(groups) == len(blocks) + 1
    # Group k holds block k's own parameters (plus what is registered after it, before the next block).
    params = dict(enc.named_parameters())
    for k, blk in enumerate(blocks, start=1):
        assert {id(p) for p in blk.parameters()} <= {id(params[n]) for n in groups[k]}, k
    if names:
        assert len(blocks) >= 1, f"{name}: parameters but no blocks to fine-tune layer-wise"


def test_pre_ln_final_norm_trains_with_the_last_layer():
    """MERT-330M (pre-LN) applies the encoder's shared norm after its last layer, MERT-95M before its first."""
    for name, group in (("mert-v1-330m", -1), ("mert-v1-95m", 0)):
        with skip_weight_init():
            enc = musicssl.load(name, pretrained=False, num_hidden_layers=2)
        assert "encoder.layer_norm.weight" in layer_groups(enc)[group], name


def test_layer_groups_of_the_spectrogram_vit():
    groups = layer_groups(tiny())
    assert len(groups) == 3
    assert {n.split(".")[0] for n in groups[0]} == {"patch_embed"}
    assert {n.split(".")[1] for n in groups[1]} == {"0"} and all(n.startswith("blocks.0.") for n in groups[1])
    assert any(n.startswith("norm.") for n in groups[2])  # the final norm trains with the last block


# --------------------------------------------------------------------------- freezing and learning rates


def _trainable(clf: Classifier) -> set[str]:
    return {n for n, p in clf.named_parameters() if p.requires_grad}


def test_freeze_policies_set_exactly_what_they_say():
    clf = Classifier(tiny(), 3)
    every = {n for n, _ in clf.named_parameters()}
    head = {n for n in every if not n.startswith("backbone.")}
    assert head == {"layer_weights", "head.2.weight", "head.2.bias"}
    apply_freeze(clf, "frozen")
    assert _trainable(clf) == head
    apply_freeze(clf, "last-1")
    assert _trainable(clf) == head | {n for n in every if n.startswith(("backbone.blocks.1.", "backbone.norm."))}
    apply_freeze(clf, "last-2")
    assert _trainable(clf) == every - {n for n in every if n.startswith("backbone.patch_embed.")}
    apply_freeze(clf, "full")
    assert _trainable(clf) == every
    for bad, match in (("last-3", "2 blocks"), ("last-0", "1..2"), ("partial", "frozen"), ("last-x", "last-N")):
        with pytest.raises(ValueError, match=match):
            apply_freeze(clf, bad)


def test_frozen_weights_do_not_change_in_training():
    clf = Classifier(tiny(), 3)
    apply_freeze(clf, "last-1")
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    train_mode(clf)
    assert not clf.backbone.patch_embed.training and clf.backbone.blocks[1].training and clf.head.training
    opt = torch.optim.AdamW(param_groups(clf, 1e-2), lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(clf(torch.randn(4, SR) * 0.1), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = clf.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith(("backbone.blocks.1.", "backbone.norm.", "head.", "layer_weights")) for k in changed)
    assert any(k.startswith("backbone.blocks.1.") for k in changed) and "head.2.weight" in changed


def test_layerwise_learning_rate_decay():
    clf = Classifier(tiny(), 3)
    apply_freeze(clf, "full")
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in param_groups(clf, 1.0, llrd=0.5, weight_decay=0.1)
             for p in g["params"]}
    params = dict(clf.named_parameters())
    assert lr_of[id(params["backbone.patch_embed.weight"])] == (0.25, 0.1)  # front end: 0.5 ** 2
    assert lr_of[id(params["backbone.blocks.0.attn.qkv.weight"])] == (0.5, 0.1)
    assert lr_of[id(params["backbone.blocks.0.norm1.weight"])] == (0.5, 0.0)  # no decay on norms, biases
    assert lr_of[id(params["backbone.blocks.1.mlp.0.weight"])] == (1.0, 0.1)
    assert lr_of[id(params["backbone.norm.weight"])] == (1.0, 0.0)
    assert lr_of[id(params["head.2.weight"])] == (1.0, 0.1) and lr_of[id(params["layer_weights"])] == (1.0, 0.0)
    assert len(lr_of) == len(params)
    apply_freeze(clf, "frozen")
    assert sum(len(g["params"]) for g in param_groups(clf, 1.0)) == 3  # frozen ones are left out


# --------------------------------------------------------------------------- the classifier


def test_classifier_outputs_and_windows():
    clf = Classifier(tiny(), 3, layers=[0, -1]).eval()
    assert clf(torch.randn(2, SR)).shape == (2, 3) and clf.layer_weights.shape == (2,)
    reg = Classifier(tiny(), 1, kind="regression", target_mean=5.0, target_std=2.0, pool="max").eval()
    assert reg(torch.randn(2, SR)).shape == (2,)
    rng = np.random.default_rng(1)
    a, b = tone(300.0, 2.5, rng), tone(500.0, 0.7, rng)  # a: windows of 1 s at 0, 1 and 1.5 s
    with torch.inference_mode():
        both = clf.clip_logits([a, b], batch_size=2)
        alone = clf.clip_logits([a], batch_size=1)
        # The mean over windows weighted by their frames, then the head.
        parts = [clf.features(torch.from_numpy(a[s : s + SR])[None], torch.tensor([SR])) for s in (0, SR, 3 * SR // 2)]
        pooled = sum(p * n for p, n in parts) / sum(n for _, n in parts)
        manual = clf.classify(pooled)
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, manual, atol=1e-5, rtol=1e-4)
    # It is an Encoder: embed() gives the backbone's embeddings.
    torch.testing.assert_close(clf.embed(a, sr=SR).clip, clf.backbone.embed(a, sr=SR).clip)
    # predict() runs in eval mode, whatever mode training left the model in, and leaves that mode.
    expected = clf.predict(a, sr=SR).scores
    clf.train()
    torch.testing.assert_close(clf.predict(a, sr=SR).scores, expected, rtol=0, atol=0)
    assert clf.training and clf.backbone.training


# --------------------------------------------------------------------------- training and the run folder


def test_finetuning_learns(trained):
    losses = [h["train_loss"] for h in trained.history]
    assert losses[-1] < 0.7 * losses[0]
    assert trained.valid["accuracy"] >= 0.75 and trained.primary == "accuracy"  # chance is 1/3
    assert set(trained.test) == {"accuracy", "macro_f1", "loss"}
    assert 1 <= trained.best_epoch <= trained.epochs == len(trained.history)


def test_run_folder_loads_back_with_the_same_predictions(trained, task_csv, monkeypatch):
    run = trained.out
    assert {p.name for p in run.iterdir()} >= {"config.json", "model.safetensors", "README.md", "metrics.json",
                                              "log.jsonl"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"] == pytest.approx(trained.test) and metrics["primary"] == "accuracy"
    assert len((run / "log.jsonl").read_text().splitlines()) == trained.epochs
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no network needed
    clf = musicssl.load(run, offline=True)
    assert isinstance(clf, Classifier) and clf.classes == ["high", "low", "mid"] and not clf.training
    assert clf.spec.family == "classifier" and clf.backbone.spec.name == "jepa-tiny"
    files = sorted(task_csv.parent.glob("audio/*_1[01].wav"))
    mine, theirs = trained.model.eval().predict(files), clf.predict(files)
    assert mine.labels == theirs.labels
    torch.testing.assert_close(mine.scores, theirs.scores)
    assert sum(label == f.name.split("_")[0] for label, f in zip(theirs.labels, files)) >= len(files) - 2
    torch.testing.assert_close(clf.embed(files[0]).clip, trained.model.embed(files[0]).clip)


def test_loading_is_strict(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    for f in ("config.json", "README.md"):
        (tmp_path / f).write_bytes((trained.out / f).read_bytes())
    state = load_file(str(trained.out / "model.safetensors"))
    del state["head.2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ReleaseFormatError, match="head.2.weight"):
        musicssl.load(tmp_path)


def test_training_is_repeatable_on_cpu(task_csv):
    runs = [finetune(task_csv, model=tiny(), freeze="last-1", epochs=2, batch_size=6, seed=3) for _ in range(2)]
    histories = [[{k: v for k, v in h.items() if k != "seconds"} for h in r.history] for r in runs]
    assert histories[0] == histories[1]
    for k, v in runs[0].model.state_dict().items():
        assert torch.equal(v, runs[1].model.state_dict()[k]), k


def test_task_audio_reads_from_disk_when_it_does_not_fit(task_csv):
    from musicssl.evaluate.tasks import load_task
    from musicssl.finetune import TaskAudio

    paths = load_task(task_csv).paths[:3]
    cached, streamed = TaskAudio(paths, SR), TaskAudio(paths, SR, cache_bytes=0)
    assert cached.cached and not streamed.cached and streamed.audio is None
    for i in range(3):
        np.testing.assert_array_equal(cached.clip(i), streamed.clip(i))
        a, b = (t.crop(i, SR // 2, np.random.default_rng(i)) for t in (cached, streamed))
        assert len(a) == len(b) == SR // 2
        np.testing.assert_allclose(a, b, atol=1e-6)  # the same span, decoded on its own


def test_mixed_precision_runs(task_csv):
    r = finetune(task_csv, model=tiny(), epochs=1, head_epochs=1, batch_size=6, precision="bf16")
    assert r.settings["precision"] == "bfloat16" and all(np.isfinite(h["train_loss"]) for h in r.history)
    with pytest.raises(ValueError, match="precision must be"):
        finetune(task_csv, model=tiny(), precision="fp8")


@pytest.mark.parametrize("kind", ["multilabel", "regression", "pitch"])
def test_other_task_kinds(kind, task_csv, tmp_path):
    lines = task_csv.read_text().splitlines()
    label = {"multilabel": {"low": "tonal;low", "mid": "tonal", "high": "tonal;high"},
             "regression": {"low": "57", "mid": "69", "high": "81"},
             "pitch": {"low": "57", "mid": "69", "high": "81"}}[kind]
    rows = [lines[0]] + [f"{task_csv.parent / p},{label[y]},{s}" for p, y, s in (r.split(",") for r in lines[1:])]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    r = finetune(tmp_path / "t.csv", model=tiny(), kind=kind, freeze="frozen", epochs=2, batch_size=6, out=tmp_path / "run")
    primary = {"multilabel": "mAP", "regression": "r2", "pitch": "rpa_50c"}[kind]
    assert r.primary == primary and primary in r.test
    clf = musicssl.load(tmp_path / "run")
    pred = clf.predict(sorted(task_csv.parent.glob("audio/low_*.wav"))[:2])
    if kind == "regression":
        assert pred.scores.shape == (2,) and all(isinstance(v, float) for v in pred.labels)
    elif kind == "pitch":
        assert clf.values == [57.0, 69.0, 81.0] and pred.scores.shape == (2, 3) and set(pred.labels) <= {57.0, 69.0, 81.0}
    else:
        assert clf.classes == ["high", "low", "tonal"] and all(isinstance(v, tuple) for v in pred.labels)


# --------------------------------------------------------------------------- the CLI


def test_cli_finetune_end_to_end(task_csv, tmp_path, capsys):
    model = musicssl.save_pretrained(tiny(), tmp_path / "tiny")
    code = main(["finetune", str(task_csv), "--model", str(model), "-o", str(tmp_path / "run"), "--epochs", "2",
                 "--batch-size", "6", "--freeze", "last-1", "--llrd", "0.5", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| test |" in out and "accuracy" in out and "musicssl.load(" in out
    clf = musicssl.load(tmp_path / "run")
    assert clf.classes == ["high", "low", "mid"]
    settings = json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]
    assert settings["freeze"] == "last-1" and settings["llrd"] == 0.5 and settings["seed"] == 1


@pytest.mark.parametrize("args, message", [
    (["missing.csv"], "does not exist"),
    (["{task}", "--freeze", "half"], "freeze policy must be"),
    (["{task}", "--freeze", "last-5"], "2 blocks"),
    (["{task}", "--epochs", "0"], "epochs must be a whole number >= 1, got 0"),
    (["{task}", "--batch-size", "1"], "batch_size must be a whole number >= 2"),  # every batch of one would be skipped
    (["{task}", "--kind", "regression"], "is not a number, and a regression task needs one per row"),
    (["{task}", "--lr", "1e30", "--epochs", "3", "--head-epochs", "0", "--freeze", "frozen"],
     "(training diverged): lower the learning rate (lr=1e+30)"),
])
def test_cli_bad_inputs_give_one_clear_line(args, message, task_csv, tmp_path, capsys):
    model = musicssl.save_pretrained(tiny(), tmp_path / "tiny")
    argv = ["finetune", *[a.format(task=task_csv) for a in args], "--model", str(model), "-o", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("musicssl finetune: error:") and message in err
    if "half" in args:  # a policy it cannot read is refused before the run folder is made
        assert not (tmp_path / "run").exists()


def test_finetune_never_writes_over_the_model_it_starts_from(task_csv, tmp_path, capsys):
    model = musicssl.save_pretrained(tiny(), tmp_path / "tiny")
    assert main(["finetune", str(task_csv), "--model", str(model), "-o", str(model)]) == 2
    assert "is the model's own folder" in capsys.readouterr().err
    assert musicssl.load(model).family == tiny().family  # still the release it was


def test_an_out_where_load_finds_weights_or_other_files_is_refused(task_csv, tmp_path, monkeypatch, capsys):
    """-o as a named model's folder (the bundled default's, a Hub snapshot) replaced the weights that
    load() reads, and -o as a folder of other files replaced them without a word."""
    from musicssl.factory import check_release_out
    from musicssl.hub import bundled_dir

    # Checked apart, not by a run: were the check to fail, a run would replace this checkout's weights.
    with pytest.raises(ValueError, match="lies in musicssl's bundled weights"):
        check_release_out(bundled_dir("simclr-mini"), "-o")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    snapshot = tmp_path / "hf" / "models--org--m" / "snapshots" / "0123abc"
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    for out, said in ((snapshot, "lies in the Hugging Face cache"), (notes, "holds README.md and is not a musicssl")):
        assert main(["finetune", str(task_csv), "--model", "mfcc", "-o", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert not snapshot.exists() and (notes / "README.md").read_text() == "my notes"
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path))  # a scratch folder that also holds the user's runs
    check_release_out(tmp_path / "runs" / "genre", "-o")  # not where load() reads weights: taken
    check_release_out(tmp_path / "hf" / "my-exports", "-o")


def test_a_refused_or_interrupted_run_leaves_the_out_folder_as_it_was(task_csv, trained, tmp_path, monkeypatch):
    """A run refused after -o was made left an empty folder; a rerun into a finished run's folder,
    interrupted, had already emptied its log.jsonl, beside the old run's weights and metrics."""
    from musicssl import finetune as ft

    with pytest.raises(ValueError, match="layer"):
        finetune(task_csv, model=tiny(), out=tmp_path / "new" / "run", layers=[99])
    assert not (tmp_path / "new").exists()
    run = tmp_path / "done"
    shutil.copytree(trained.out, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "evaluate_clips", interrupted)  # after the first epoch's training
    with pytest.raises(KeyboardInterrupt):
        finetune(task_csv, model=tiny(), out=run, epochs=2, batch_size=6)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ft.PARTIAL_LOG} == before
    fresh = tmp_path / "fresh"  # interrupted in its first epoch, then run again: the same command works
    with pytest.raises(KeyboardInterrupt):
        finetune(task_csv, model=tiny(), out=fresh, epochs=2, batch_size=6)
    monkeypatch.undo()
    with pytest.raises(DivergedError):  # a run that diverges at once leaves nothing to refuse a rerun for
        finetune(task_csv, model=tiny(), out=fresh, epochs=1, batch_size=6, lr=1e30, head_lr=1e30)
    assert finetune(task_csv, model=tiny(), out=fresh, epochs=1, head_epochs=0, batch_size=6).out == fresh


def test_numpy_numbers_go_into_the_run_files_as_numbers(task_csv, tmp_path):
    """np.int64 epochs (a grid search's) failed after training, writing the run's JSON, and left a
    folder without config.json."""
    result = finetune(task_csv, model=tiny(), out=tmp_path / "run", freeze="frozen", epochs=np.int64(1),
                      batch_size=np.int64(6), lr=np.float32(1e-3), hidden=np.int64(8), seed=np.int64(1),
                      dropout=np.float32(0.1))
    assert result.settings["epochs"] == 1 and musicssl.load(tmp_path / "run").args["hidden"] == 8


@pytest.mark.parametrize("setting, value", [("crop_seconds", -5.0), ("label_smoothing", 1.5), ("dropout", 2.0),
                                            ("warmup", -1.0), ("epochs", 2.5), ("seed", -1), ("seed", 2**64)])
def test_settings_out_of_range_are_refused_before_any_work(task_csv, tmp_path, setting, value):
    with pytest.raises(ValueError, match=f"{setting} must be a (finite|whole) number"):
        finetune(task_csv, model=tiny(), out=tmp_path / "run", **{setting: value})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, value", [("lr", -1.0), ("lr", float("nan")), ("llrd", -0.5), ("hidden", -5),
                                            ("head_lr", 0.0), ("weight_decay", -0.1),
                                            ("clip_grad", -1.0)])
def test_rates_that_would_train_backwards_are_refused_before_any_work(task_csv, tmp_path, setting, value):
    """llrd -1 gave every other block a negative rate (gradient ascent) and ran to the end; lr -1
    was said by torch only after the head epochs; hidden -5 was a torch traceback."""
    with pytest.raises(ValueError, match=f"{setting} must be a (finite|whole) number"):
        finetune(task_csv, model=tiny(), out=tmp_path / "run", **{setting: value})
    assert not (tmp_path / "run").exists()


def test_clip_grad_zero_trains_without_clipping(task_csv):
    """clip_grad=0 (no clipping, as in `musicssl train`) scaled every gradient to zero: nothing trained."""
    clf = finetune(task_csv, model=tiny(), freeze="frozen", epochs=1, batch_size=6, clip_grad=0,
                   weight_decay=0).model  # no decay: only gradients move the weights
    encoder = tiny()
    torch.manual_seed(0)  # as finetune() seeds before it builds the head
    untrained = Classifier(encoder, 3)
    assert not torch.equal(clf.head[-1].weight.cpu(), untrained.head[-1].weight)


def test_rates_from_numpy_are_numbers_too():
    from musicssl.finetune import _check_numbers

    plain = _check_numbers(lr=np.float32(1e-4), llrd=np.float64(0.8), hidden=np.int64(256))  # a grid search's values
    assert plain == {"lr": pytest.approx(1e-4), "llrd": 0.8, "hidden": 256}
    assert [type(v) for v in plain.values()] == [float, float, int]  # as the run's JSON files take them


def test_bad_task_raises_before_training(tmp_path):
    with pytest.raises(TaskFormatError):
        finetune(tmp_path / "nope.csv", model=tiny())
