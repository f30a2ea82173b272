"""`python -m bench` runs end to end on the default model and fills every figure (no time is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    assert set(memory) == {"1min", "0.5min"} and all("host_mb" in m and m["output_mb"] > 0 for m in memory.values())


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
