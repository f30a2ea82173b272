"""Tasks, probes, metrics, the embedding cache and `musicssl eval` (musicssl/evaluate/)."""

from __future__ import annotations

import csv
import logging
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musicssl.cli import main
from musicssl.errors import TaskFormatError
from musicssl.evaluate import compute, evaluate, load_task, make_problem, run_probe
from musicssl.models.base import Encoder

SR = 16000
DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


# --------------------------------------------------------------------------- metrics


def test_metrics_match_scikit_learn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    scores = rng.normal(size=(200, 5)) + np.eye(5)[y]
    got = compute("classification", y, scores)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, scores.argmax(1)))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, scores.argmax(1), average="macro"))
    multi = (rng.random((200, 6)) < 0.3).astype(float)
    ms = np.round(rng.normal(size=(200, 6)) + multi, 1)  # rounded: many tied scores
    got = compute("multilabel", multi, ms)
    assert got["mAP"] == pytest.approx(skm.average_precision_score(multi, ms, average="macro"))
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(multi, ms, average="macro"))
    t = rng.normal(size=100)
    p = t + rng.normal(size=100) * 0.5
    assert compute("regression", t, p)["r2"] == pytest.approx(skm.r2_score(t, p))
    assert compute("regression", t, p)["mae"] == pytest.approx(skm.mean_absolute_error(t, p))


def test_pitch_metrics_count_cents_and_forgive_octaves() -> None:
    values = np.array([60.0, 72.0, 61.0])
    truth = np.array([60.3, 60.0, 60.0, 60.0])
    picks = np.eye(3)[[0, 1, 2, 0]]  # 30 cents off, an octave off, a semitone off, exact
    got = compute("pitch", truth, picks, values)
    assert got["rpa_50c"] == pytest.approx(0.5)
    assert got["rca_50c"] == pytest.approx(0.75)


# --------------------------------------------------------------------------- tasks


def tone(path: Path, freq: float, seconds: float = 0.5, noise: float = 0.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.normal(size=t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), SR)
    return path


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def tone_task(tmp_path: Path, n: int = 16, split: bool = False) -> Path:
    """Two classes of tones (low / high) with a little noise; relative paths, spaces in names."""
    rows = []
    for c, (name, base) in enumerate((("low", 220.0), ("high", 1760.0))):
        for i in range(n):
            f = tone(tmp_path / "audio dir" / f"{name} {i}.wav", base * (1 + 0.02 * i), noise=0.05, seed=i + 100 * c)
            row = {"path": f.relative_to(tmp_path).as_posix(), "label": name}
            if split:
                row["split"] = ["train", "train", "valid", "test"][i % 4]
            rows.append(row)
    return write_csv(tmp_path / "tones.csv", rows)


def test_csv_task_makes_stratified_seeded_splits_independent_of_row_order(tmp_path: Path) -> None:
    task = load_task(tone_task(tmp_path))
    assert task.kind == "classification" and task.classes == ["high", "low"]
    assert all(p.is_file() for p in task.paths)
    for s in ("train", "valid", "test"):
        got = {task.labels[i] for i in task.indices(s)}
        assert got == {"high", "low"}, s  # every split holds both classes
    rows = list(csv.DictReader(open(tmp_path / "tones.csv")))
    write_csv(tmp_path / "shuffled.csv", rows[::-1])
    again = load_task(tmp_path / "shuffled.csv")
    assert dict(zip(map(str, task.paths), task.split)) == dict(zip(map(str, again.paths), again.split))
    other = load_task(tmp_path / "tones.csv", seed=1)
    assert list(other.split) != list(task.split)


def test_given_splits_are_kept_and_aliases_read(tmp_path: Path) -> None:
    path = tone_task(tmp_path, split=True)
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        r["split"] = {"valid": "validation", "test": "TEST"}.get(r["split"], r["split"])
    task = load_task(write_csv(path, rows))
    assert (task.split == "valid").sum() == 8 and (task.split == "test").sum() == 8


def test_groups_never_straddle_splits(tmp_path: Path) -> None:
    rows = list(csv.DictReader(open(tone_task(tmp_path, n=24))))
    for i, r in enumerate(rows):
        r["group"] = f"g{i // 3}"
    task = load_task(write_csv(tmp_path / "grouped.csv", rows))
    where: dict[str, set[str]] = {}
    for g, s in zip(task.groups, task.split):
        where.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in where.values())
    assert {s for ss in where.values() for s in ss} == {"train", "valid", "test"}


def test_a_group_the_csv_puts_partly_in_a_split_stays_there_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A split column filled for some rows only: a group with one row in test had its blank rows split
    apart from it, mostly into train. They now follow the group's given split; a group the CSV itself
    puts on two sides is warned of."""
    rows = list(csv.DictReader(open(tone_task(tmp_path, n=24))))
    for i, r in enumerate(rows):
        r["group"], r["split"] = f"g{i // 6}", "test" if i % 6 == 0 and i < 12 else ""
    task = load_task(write_csv(tmp_path / "partly.csv", rows))
    where: dict[str, set[str]] = {}
    for g, s in zip(task.groups, task.split):
        where.setdefault(g, set()).add(s)
    assert where["g0"] == where["g1"] == {"test"} and all(len(s) == 1 for s in where.values()), where
    rows[1]["split"] = "train"  # g0: one row test, one train, as the CSV says
    with caplog.at_level("WARNING", logger="musicssl"):
        load_task(write_csv(tmp_path / "both.csv", rows))
    assert "puts 1 groups on more than one side, e.g. 'g0' in ['test', 'train']" in caplog.text


def test_kinds_are_read_from_labels_or_sidecar(tmp_path: Path) -> None:
    files = [tone(tmp_path / f"{i}.wav", 200 + 50 * i) for i in range(12)]
    multi = write_csv(tmp_path / "multi.csv", [{"path": f.name, "label": "a;b" if i % 2 else "a"} for i, f in enumerate(files)])
    task = load_task(multi)
    assert task.kind == "multilabel" and task.classes == ["a", "b"] and task.targets().shape == (12, 2)
    reg = write_csv(tmp_path / "reg.csv", [{"path": f.name, "label": str(i % 4 * 0.5)} for i, f in enumerate(files)])
    assert load_task(reg).kind == "regression"
    (tmp_path / "reg.json").write_text(json.dumps({"kind": "pitch", "name": "tones-pitch"}))
    task = load_task(reg)
    assert task.kind == "pitch" and task.name == "tones-pitch"
    assert load_task(reg, kind="classification").kind == "classification"


def test_made_splits_hit_their_shares_when_every_class_is_small(tmp_path: Path) -> None:
    """Rounding each class alone set aside nothing from classes of 2-4 items (then one item anyway)."""
    rows = [{"path": tone(tmp_path / f"{c}-{i}.wav", 100 + 10 * c + i).name, "label": f"class {c}"}
            for c in range(8) for i in range(4)]
    task = load_task(write_csv(tmp_path / "small.csv", rows))
    assert [int((task.split == s).sum()) for s in ("train", "valid", "test")] == [22, 4, 6]  # 20 %, 15 % of the rest
    assert {task.labels[i] for i in task.indices("valid", "test")} <= {task.labels[i] for i in task.indices("train")}
    # A blank group column ties nothing together: the items are split by class all the same. A
    # trailing comma on every row (an empty field past the header) loses nothing and is read.
    path = tmp_path / "blank.csv"
    path.write_text("path,label,group\n" + "".join(f"{r['path']},{r['label']},,\n" for r in rows))
    blank = load_task(path)
    assert list(blank.split) == list(task.split)


def test_group_columns_and_blank_cells_never_straddle_splits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"path": tone(tmp_path / f"{i}.wav", 100 + i).name, "label": "ab"[i % 2], "fold": str(i % 5),
             "group": "" if i < 20 else f"kit {i % 4}"} for i in range(40)]
    path = write_csv(tmp_path / "kits.csv", rows)
    task = load_task(path)  # a blank group cell ties its item to nothing (it was one group of all blanks)
    for g in {"kit 0", "kit 1", "kit 2", "kit 3"}:
        assert len({task.split[i] for i in range(40) if task.groups[i] == g}) == 1
    assert {task.split[i] for i in range(20)} == {"train", "valid", "test"}
    assert "splits are made here by class alone" not in caplog.text
    rows = [{k: v for k, v in r.items() if k != "group"} for r in rows]  # without a group column, a fold
    # column is named as a risk of leakage
    with caplog.at_level(logging.WARNING, logger="musicssl.evaluate.tasks"):
        load_task(write_csv(path, rows))
    assert "items that share a 'fold' can land in both train and test" in caplog.text and "--group fold" in caplog.text
    by_fold = load_task(path, group="fold")
    assert all(len({by_fold.split[i] for i in range(40) if i % 5 == f}) == 1 for f in range(5))
    with pytest.raises(TaskFormatError, match="the group column is the label column 'label'"):
        load_task(path, group="label")  # every test item would be of a class never trained on
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicssl.evaluate.tasks"):
        load_task(path, label="fold", kind="classification")  # a label column named like a group is no risk
    assert "splits are made here by class alone" not in caplog.text


def test_few_whole_number_labels_are_said_to_be_taken_for_regression(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Class ids 0/1/2 trained a regression head without a word (the kind showed only at the end)."""
    files = [tone(tmp_path / f"{i}.wav", 200 + 50 * i) for i in range(12)]
    ids = write_csv(tmp_path / "ids.csv", [{"path": f.name, "label": str(i % 3)} for i, f in enumerate(files)])
    with caplog.at_level("WARNING"):
        assert load_task(ids).kind == "regression"
    assert "3 whole numbers (0, 1, 2), taken for a regression target" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_task(ids, kind="classification").kind == "classification"
    assert "whole numbers" not in caplog.text


def test_pitch_semitones_with_no_train_item_are_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pitch head's classes are the train semitones: test pitches outside them are always wrong."""
    files = [tone(tmp_path / f"{i}.wav", 200 + 50 * i) for i in range(12)]
    rows = [{"path": f.name, "label": str(60 + i % 3), "split": ["train", "train", "valid", "test"][i % 4]}
            for i, f in enumerate(files)]
    rows[3]["label"] = "72"  # a test item an octave above every train pitch
    (tmp_path / "p.json").write_text(json.dumps({"kind": "pitch"}))
    with caplog.at_level("WARNING"):
        load_task(write_csv(tmp_path / "p.csv", rows))
    assert "1 semitone(s) have valid or test items but none in train (72)" in caplog.text


def test_folder_per_class_with_and_without_split_folders(tmp_path: Path) -> None:
    for c in ("kick", "snare"):
        for i in range(10):
            tone(tmp_path / "flat" / c / f"{i}.wav", 100 + i)
            tone(tmp_path / "split" / ("train" if i < 6 else "valid" if i < 8 else "test") / c / f"{i}.flac", 100 + i)
    flat = load_task(tmp_path / "flat")
    assert flat.classes == ["kick", "snare"] and len(flat) == 20 and set(flat.split) == {"train", "valid", "test"}
    given = load_task(tmp_path / "split")
    assert (given.split == "test").sum() == 4 and (given.split == "train").sum() == 12
    for c in ("kick", "snare"):  # two clips a class: too few to split here
        for i in range(2):
            tone(tmp_path / "tiny" / c / f"{i}.wav", 100 + i)
    with pytest.raises(TaskFormatError, match=r"give the splits as subfolders \(ROOT/train/CLASS/"):
        load_task(tmp_path / "tiny")


@pytest.mark.parametrize("problem, message", [
    ("no_label", "no 'label' column"),
    ("missing_file", "do not exist"),
    ("bad_split", "is not train, valid or test"),
    ("one_class", "fewer than 2 classes"),
    ("bad_kind", "not one of"),
    ("text_regression", "line 2: label 'a' is not a number, and a regression task needs one per row"),
    ("nan_label", "line 5: label 'nan' is not a finite number"),
    ("separator_digits", "line 5: label '1_0' is not a number"),
    ("no_rows", r"has a header \(path, label\) but no rows"),
    ("empty_file", r"has no 'path' column \(columns: none\)"),  # it said "I/O operation on closed file"
    ("constant_regression", "every train label is the same value"),
    ("short_row", "line 4: 2 fields where the header has 3"),
    ("unquoted_comma", "line 4: 4 fields where the header has 3; quote a field that holds a comma"),
    ("listed_twice", r"1.wav is listed twice \(items 2 and 3\)"),
    ("one_per_class", "no valid items after splitting .* classes that keep one in train"),
    ("two_groups", "no valid items after splitting .* at least 3 groups"),
])
def test_bad_tasks_name_the_file_and_the_fix(tmp_path: Path, problem: str, message: str) -> None:
    files = [tone(tmp_path / f"{i}.wav", 300 + i) for i in range(10)]
    rows = [{"path": f.name, "label": "ab"[i % 2]} for i, f in enumerate(files)]
    kind = None
    if problem == "no_label":
        rows = [{"path": r["path"], "class": r["label"]} for r in rows]
    elif problem == "missing_file":
        rows[3]["path"] = "nope.wav"
    elif problem == "bad_split":
        rows = [{**r, "split": "holdout"} for r in rows]
    elif problem == "one_class":
        rows = [{**r, "label": "a"} for r in rows]
    elif problem == "bad_kind":
        kind = "ranking"
    elif problem == "text_regression":
        kind = "regression"
    elif problem == "constant_regression":
        rows = [{**r, "label": "5"} for r in rows]
    elif problem in ("nan_label", "separator_digits"):
        rows = [{**r, "label": str(i)} for i, r in enumerate(rows)]
        rows[3]["label"] = "nan" if problem == "nan_label" else "1_0"
        kind = "regression"
    elif problem == "listed_twice":
        rows[2]["path"] = rows[1]["path"]
    elif problem == "one_per_class":
        rows = [{**r, "label": f"class {i}"} for i, r in enumerate(rows)]
    elif problem == "two_groups":
        rows = [{**r, "group": f"kit {i % 2}"} for i, r in enumerate(rows)]
    path = write_csv(tmp_path / "task.csv", rows)
    if problem == "no_rows":
        path.write_text("path,label\n")
    if problem == "empty_file":
        path.write_text("")
    if problem in ("short_row", "unquoted_comma"):
        lines = ["path,label,group"] + [f"{r['path']},{r['label']},g{i}" for i, r in enumerate(rows)]
        lines[3] = "2.wav,a" if problem == "short_row" else "2.wav,rock, pop,g2"
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskFormatError, match=message) as err:
        load_task(path, kind=kind)
    assert "task.csv" in str(err.value) or "nope.wav" in str(err.value)


# --------------------------------------------------------------------------- probes


def features(kind: str, n: int = 600, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features that carry the target linearly, plus noise dimensions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if kind == "classification":
        y = rng.integers(0, 4, n)
        x[:, :4] += 2.5 * np.eye(4)[y]
    elif kind == "multilabel":
        y = (rng.random((n, 3)) < 0.4).astype(np.float32)
        x[:, :3] += 2.5 * y
    elif kind == "pitch":
        y = rng.integers(48, 60, n).astype(float) + rng.uniform(-0.2, 0.2, n)
        x[:, :12] += 3.0 * np.eye(12)[np.round(y).astype(int) - 48]
    else:
        y = x[:, 0] * 2 + x[:, 1] + 0.3 * rng.normal(size=n)
    split = np.array(["train", "train", "train", "valid", "test"] * (n // 5), dtype=object)
    return x.astype(np.float32), y, split


CHANCE = {"classification": 0.25, "multilabel": 0.45, "regression": 0.0, "pitch": 1 / 12}


@pytest.mark.parametrize("kind", ["classification", "multilabel", "regression", "pitch"])
@pytest.mark.parametrize("probe", ["linear", "mlp", "knn"])
def test_probes_learn_every_kind_and_repeat_exactly(kind: str, probe: str) -> None:
    x, y, split = features(kind)
    problem = make_problem(kind, x, y, split, num_classes=4 if kind == "classification" else 3, seed=0)
    fit = run_probe(probe, problem)
    primary = problem.primary
    assert fit.test[primary] > CHANCE[kind] + 0.3, fit.test
    assert len(fit.tried) > 1  # a real choice was made on valid
    assert fit.valid[primary] == max(t[f"valid_{primary}"] for t in fit.tried)
    assert run_probe(probe, problem).test == fit.test


def test_standardisation_uses_train_statistics_only() -> None:
    x, y, split = features("classification")
    x[split == "test"] += 1000.0  # a shifted test set must not move the train statistics
    p = make_problem("classification", x, y, split, 4)
    assert abs(p.train.x.mean()) < 1e-5 and p.test.x.mean() > 100


# --------------------------------------------------------------------------- evaluate, cache, CLI


def scores(result: dict) -> list[dict]:
    """What must repeat exactly: per model and probe, the layer, the settings and the metrics."""
    return [{p: (m["best_layer"][p], b["params"], b["valid"], b["test"]) for p, b in m["best"].items()}
            for m in result["models"]]


def test_evaluate_caches_embeddings_per_model_layer_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = tone_task(tmp_path)
    cache = tmp_path / "cache"
    first = evaluate(task, ["logmel", "mfcc"], probes=["linear", "knn"], cache=cache)
    assert [m.model for m in first.models] == ["logmel", "mfcc"]
    assert [m.model for m in evaluate(task, "mfcc", probes=["knn"], cache=cache).models] == ["mfcc"]
    assert first.models[0].best("linear").test["accuracy"] >= 0.75
    assert len(list(cache.glob("*/mean/layer0.npz"))) == 2

    def no_embed(*a, **k):
        raise AssertionError("embedded again despite the cache")

    monkeypatch.setattr(Encoder, "embed", no_embed)
    again = evaluate(task, ["logmel", "mfcc"], probes=["linear", "knn"], cache=cache)
    assert scores(again.to_dict()) == scores(first.to_dict())
    monkeypatch.undo()
    touched = sorted((tmp_path / "audio dir").glob("*.wav"))[0]
    os.utime(touched, ns=(1, 1))  # an edited file gets a new key and is embedded again
    calls: list[int] = []
    real = Encoder.embed
    monkeypatch.setattr(Encoder, "embed", lambda self, a, *k, **kw: calls.append(len(a)) or real(self, a, *k, **kw))
    evaluate(task, ["mfcc"], probes=["linear"], cache=cache)
    assert calls == [1]


def test_undecodable_task_files_are_named_and_the_rest_cached(tmp_path: Path) -> None:
    task = tone_task(tmp_path)
    (tmp_path / "audio dir" / "low 3.wav").write_bytes(b"RIFF not really audio")
    with pytest.raises(TaskFormatError, match="low 3.wav") as err:
        evaluate(task, ["mfcc"], probes=["linear"], cache=tmp_path / "cache")
    assert "1 task files cannot be decoded" in str(err.value)
    with np.load(next((tmp_path / "cache").glob("*/mean/layer0.npz"))) as z:
        assert len(z["keys"]) == 31


def test_an_interrupted_evaluation_keeps_what_it_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from musicssl.evaluate.cache import EmbeddingCache

    task = tone_task(tmp_path)
    real, chunks = EmbeddingCache._embed_chunk, []

    def ctrl_c_on_the_third_chunk(self, *args):
        chunks.append(1)
        if len(chunks) == 3:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(EmbeddingCache, "_embed_chunk", ctrl_c_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        evaluate(task, ["mfcc"], probes=["linear"], cache=tmp_path / "cache", batch_size=4)
    with np.load(next((tmp_path / "cache").glob("*/mean/layer0.npz"))) as z:
        assert len(z["keys"]) == 8  # the two chunks before the Ctrl-C


def test_all_layers_pick_the_best_on_valid(tmp_path: Path) -> None:
    import musicssl

    enc = musicssl.load("jepa-tiny", pretrained=False, depth=2)
    result = evaluate(tone_task(tmp_path), [enc], layers="all", probes=["linear"], cache=tmp_path / "c")
    m = result.models[0]
    assert m.layers == list(range(enc.num_layers))
    best = m.best_layer["linear"]
    assert m.fits[best]["linear"].valid["accuracy"] == max(m.fits[l]["linear"].valid["accuracy"] for l in m.layers)


def test_cli_eval_writes_json_and_plot_and_repeats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    task = tone_task(tmp_path)
    argv = ["eval", str(task), "--models", "mfcc,logmel", "-o", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| mfcc | linear | 0 |" in out and "test accuracy" in out
    first = json.loads((tmp_path / "out" / "tones.json").read_text())
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "tones.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0
    second = json.loads((tmp_path / "out" / "tones.json").read_text())
    assert scores(first) == scores(second)


def test_cli_eval_tasks_of_one_name_do_not_overwrite_each_other(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tone_task(tmp_path / "a"), tone_task(tmp_path / "b")
    out = tmp_path / "out"
    assert main(["eval", str(a), str(b), "--models", "mfcc,mfcc", "-o", str(out), "--cache", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.count("| mfcc | linear |") == 2  # one row per task: the model once
    assert (out / "tones.json").exists() and (out / "tones-2.json").exists()


def test_cli_eval_out_under_home_makes_no_folder_named_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = tone_task(tmp_path / "a")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "a")
    assert main(["eval", str(task), "--models", "mfcc", "-o", "~/ev", "--cache", str(tmp_path / "c")]) == 0
    assert (tmp_path / "ev" / "tones.json").exists() and not (tmp_path / "a" / "~").exists()


def test_cli_eval_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["eval", str(tmp_path / "none.csv"), "--models", "mfcc"]) == 2
    assert "does not exist" in capsys.readouterr().err
    task = tone_task(tmp_path)
    assert main(["eval", str(task), "--models", "mfcc", "--probes", "svm"]) == 2
    assert "unknown probe" in capsys.readouterr().err
    # A typo in the last model is said before the first one spends its time embedding.
    calls: list[int] = []
    monkeypatch.setattr(Encoder, "embed", lambda *a, **k: calls.append(1))
    assert main(["eval", str(task), "--models", "mfcc,logmell", "--cache", str(tmp_path / "c")]) == 2
    assert "unknown model 'logmell'" in capsys.readouterr().err and not calls
    assert main(["eval", str(task), "--models", "mfcc", "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err and not calls
    assert main(["eval", str(task), "--layers", "deep"]) == 2
    assert "--layers takes 'recommended', 'last', 'all' or comma-separated integers" in capsys.readouterr().err
    assert main(["eval", str(task), "--models", "mfcc", "--batch-size", "0"]) == 2
    assert "batch_size must be an integer >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["eval", str(task), "--models", "mfcc", "-o", str(tmp_path / "file")]) == 2
    assert "is a file: give -o a folder" in capsys.readouterr().err and not calls  # before any work


def test_cli_eval_never_replaces_what_is_not_its_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """-o as the task's folder replaced its TASK.json (the same name as the result), and the next
    run read the task as another kind; task-2.csv's result replaced that of a second task.csv."""
    task = tone_task(tmp_path)
    (tmp_path / "tones.json").write_text(json.dumps({"kind": "classification"}))
    cache = ["--cache", str(tmp_path / "c"), "--models", "mfcc", "--probes", "knn"]
    assert main(["eval", str(task), *cache, "-o", str(tmp_path)]) == 2
    assert "tones.json is not an evaluation result" in capsys.readouterr().err
    assert json.loads((tmp_path / "tones.json").read_text()) == {"kind": "classification"}
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "tones.png").write_bytes(b"\x89PNG a picture of the user's")
    assert main(["eval", str(task), *cache, "-o", str(tmp_path / "pics")]) == 2
    assert "tones.png is not an evaluation result" in capsys.readouterr().err
    b = tone_task(tmp_path / "b")
    (tmp_path / "tones-2.csv").write_text(task.read_text())
    assert main(["eval", str(task), str(b), str(tmp_path / "tones-2.csv"), *cache, "-o", str(tmp_path / "o")]) == 0
    # b's tones.csv became tones-2, so the task named tones-2 takes the next free name
    assert sorted(p.name for p in (tmp_path / "o").glob("*.json")) == ["tones-2-2.json", "tones-2.json", "tones.json"]


def test_cli_eval_full_disk_bad_seed_and_sidecar_as_task_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from musicssl.evaluate import report

    task = tone_task(tmp_path)
    cache = ["--cache", str(tmp_path / "c"), "--models", "mfcc", "--probes", "knn"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "plot_layers", full)
    assert main(["eval", str(task), *cache, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the results of tones in" in err and "No space left on device" in err
    assert "tones.json was written" in err
    for seed in ("-1", "99999999999999999999999"):
        with pytest.raises(SystemExit):
            main(["eval", str(task), *cache, "--seed", seed])
        assert "expected a seed in [0, 2**32)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"seed must be a whole number in \[0, 2\*\*32\)"):  # in Python too
        evaluate(task, ["mfcc"], probes=["knn"], cache=tmp_path / "c", seed=2**64)
    (tmp_path / "tones.json").write_text("{}")
    assert main(["eval", str(tmp_path / "tones.json"), *cache]) == 2
    assert "is a task's settings (TASK.json), not the task: give the CSV beside it" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_file_is_embedded_again(tmp_path: Path, damage: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A truncated or bit-flipped cache .npz was a bare zipfile.BadZipFile traceback."""
    task = tone_task(tmp_path)
    first = evaluate(task, ["mfcc"], probes=["knn"], cache=tmp_path / "c")
    npz = next((tmp_path / "c").glob("*/mean/layer0.npz"))
    data = bytearray(npz.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    npz.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again = evaluate(task, ["mfcc"], probes=["knn"], cache=tmp_path / "c")
    assert "ignoring unreadable embedding cache" in caplog.text
    assert scores(again.to_dict()) == scores(first.to_dict())


@pytest.mark.skipif(not DEV.is_dir(), reason="needs the dev set at ../shared/data/dev")
def test_benchmark_task_reproduces_its_numbers(tmp_path: Path) -> None:
    kwargs = dict(root=DEV, probes=["linear", "mlp", "knn"], cache=tmp_path / "c")
    a = evaluate(BENCH / "drums-class.csv", ["mfcc"], **kwargs).to_dict()
    b = evaluate(BENCH / "drums-class.csv", ["mfcc"], **kwargs).to_dict()
    assert a["task"] == b["task"] and a["task"]["test"] == 160
    assert scores(a) == scores(b)
