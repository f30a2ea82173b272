"""`python -m bench` runs end to end on the default model and fills every figure (no time is asserted)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def run(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import run as module

    return module


def test_bench_prints_the_table_and_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--models", "simclr-mini", "--devices", "cpu", "--dtypes", "float32",
           "bfloat16", "--repeats", "1", "--cpu-batches", "1", "2", "--long-minutes", "0.5", "--import-repeats", "1",
           "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| simclr-mini | cpu | float32 |" in res.stdout and "| simclr-mini | cpu | bfloat16 |" in res.stdout
    figures = json.loads(out.read_text())
    assert figures["hardware"]["cores"] >= 1 and figures["hardware"]["matmul_peak_tflops"]["cpu"]["bfloat16"] > 0
    (row,) = figures["models"]
    assert row["gflop_per_audio_s"] > 0 and row["load_s"] > 0
    fp32, bf16 = row["runs"]
    assert fp32["drift"] == 0.0 and 0 < bf16["drift"] < 0.1  # a copy of the same weights: bf16 rounding only
    assert all(r["x_rt_batch1"] > 0 and r["best_batch"] in (1, 2) and r["tflops"] > 0 for r in row["runs"])
    memory = row["memory"]["cpu"]
    assert memory["dtype"] == "bfloat16" and memory["batch"] == 1  # one memory run, said as such
    assert all("host_mb" in memory[k] and memory[k]["output_mb"] > 0 for k in ("1min", "0.5min"))
    assert "peak MiB 1 min (bfloat16, batch 1)" in res.stdout


def test_embed_batches_compares_both_batchings() -> None:
    """bench/embed_batches.py runs both batchings and reports less padding for batching by length."""
    cmd = [sys.executable, "bench/embed_batches.py", "--models", "simclr-mini", "--repeats", "1", "--dtype", "float32"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split(" | ") for line in res.stdout.splitlines() if line.startswith("| simclr-mini |")]
    assert [r[2] for r in rows] == ["filled in order (before)", "by length (now)"] * 2
    padded = [float(r[3].rstrip("%")) for r in rows]
    assert padded[0] > padded[1] == 0 and padded[2] > padded[3] == 0


def test_load_time_times_both_ways_of_loading() -> None:
    """bench/load_time.py loads one release folder both ways in fresh processes and prints the row."""
    cmd = [sys.executable, "bench/load_time.py", "--models", "jepa-tiny", "--repeats", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = [line.split(" | ") for line in res.stdout.splitlines() if line.startswith("| jepa-tiny |")]
    assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[3]) > 0


def test_a_reference_ratio_is_given_only_at_equal_outputs(run, monkeypatch):
    """A port that gives other outputs than its upstream is not "faster" than it: the ratio is
    refused, saying by how much they differ."""
    torch.manual_seed(0)
    upstream, x = torch.nn.Linear(8, 8), torch.randn(4, 8)
    broken = copy.deepcopy(upstream)
    with torch.no_grad():
        broken.weight.add_(0.1)
    pair = types.ModuleType("test_parity_fake")
    monkeypatch.setitem(sys.modules, "test_parity_fake", pair)
    monkeypatch.setitem(run.REFERENCE, "fake-port", "fake")
    pair.make_pair = lambda full: (lambda wav: [upstream(wav)], upstream, x)  # a function over the module, a list
    same = run.reference_ratio("fake-port", "cpu", 1)
    assert same["rel_err"] < 1e-7 and same["speedup"] > 0
    pair.make_pair = lambda full: (broken, upstream, x)
    differ = run.reference_ratio("fake-port", "cpu", 1)
    assert "speedup" not in differ and "outputs differ by" in differ["unequal"]


def test_output_error_reads_lists_stacks_and_last_states(run):
    states = [torch.randn(1, 5, 3) for _ in range(3)]
    assert run.output_error(states, torch.stack(states)) == 0.0  # ours a list, upstream stacked
    assert run.output_error(states, states[-1]) == 0.0  # upstream gives the last state only
    assert run.output_error(states, [s + 1 for s in states]) > 0.1


@pytest.mark.parametrize("name", ["simclr-mini", "jepa-tiny", "logmel"])
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_timed_clips_cut_into_two_full_batches(run, name, batch):
    """The rate said to be batch B's is timed on two batches of B whole windows (a short last
    window would go into a batch of its own)."""
    import musicssl

    enc = musicssl.load(name, pretrained=False)
    W, _, _ = enc.window_plan()
    windows = enc.plan_windows([len(c) for c in run.clips_for(enc, batch)])
    assert len(windows) == 2 * batch and all(w.length == W for w in windows)


def test_float16_is_timed_on_a_cpu_only_when_asked(run):
    assert run.dtypes_for("cpu", None) == ["float32", "bfloat16"]
    assert run.dtypes_for("cuda", None) == ["float32", "bfloat16", "float16"]
    assert run.dtypes_for("cpu", ["float16"]) == ["float16"]


def test_host_overhead_runs_the_pipeline_with_outputs_of_each_models_shape() -> None:
    """bench/host_overhead.py: the stand-in writes frames of each named model's rate and width."""
    cmd = [sys.executable, "bench/host_overhead.py", "--data", "tests/data", "--like", "mfcc", "mert-v1-95m",
           "--repeats", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in res.stdout.splitlines() if line.startswith("| m")}
    assert rows["mfcc"][1].endswith(" x 60") and rows["mert-v1-95m"][1].endswith(" x 768"), rows
    assert all(r[2] == "4" and float(r[3]) > 0 for r in rows.values()), rows


def test_every_script_imports_the_checkouts_musicssl_first() -> None:
    """Run from a second worktree, a script without `import checkout` timed the installed copy of
    another one; the first import after `from __future__` is that, so it precedes musicssl's."""
    own_path = {"run.py", "load_time.py", "checkout.py", "__main__.py", "__init__.py"}  # set sys.path themselves
    for script in sorted((ROOT / "bench").glob("*.py")):
        if script.name in own_path:
            continue
        imports = [line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert imports[1].startswith("import checkout"), script.name
