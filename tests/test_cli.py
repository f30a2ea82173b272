"""The CLI, called in process through main(argv) and once as a real command."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import musicssl
from musicssl.cli import main
from musicssl.registry import DEFAULT_MODEL, model_info

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "audio"
README = Path(__file__).resolve().parent.parent / "README.md"


def test_list_and_info(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "logmel" in out and "jepa-base" not in out
    assert [line.split()[0] for line in out.splitlines() if line.endswith("(default)")] == [DEFAULT_MODEL]
    assert main(["list", "--all", "jepa-*"]) == 0
    assert "no weights yet" in capsys.readouterr().out
    assert main(["info", "mfcc"]) == 0
    assert json.loads(capsys.readouterr().out)["embed_dim"] == 60
    assert main(["info", "mfc"]) == 2
    assert "Did you mean 'mfcc'" in capsys.readouterr().err
    assert main(["list", "jepa-*"]) == 0  # no weights yet: said, not an empty answer
    assert "no model matches 'jepa-*'; --all also lists architectures without weights" in capsys.readouterr().err


def test_list_verbose_shows_licences_and_marks_noncommercial(capsys, monkeypatch):
    from musicssl import registry

    nc = dataclasses.replace(model_info("jepa-tiny"), name="nc-test", license="CC-BY-NC-4.0", weights="hf-hub:org/nc")
    monkeypatch.setitem(registry._MODELS, "nc-test", (nc, registry.builder("jepa-tiny")))
    assert main(["list", "--verbose"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "licence: CC-BY-NC-4.0 (NON-COMMERCIAL use only)" in lines["nc-test"]
    assert "licence: Apache-2.0" in lines[DEFAULT_MODEL] and "NON-COMMERCIAL" not in lines[DEFAULT_MODEL]
    assert "licence: none (no weights)" in lines["mfcc"]


def test_readme_model_table_is_generated_from_the_registry(capsys):
    assert main(["list", "--all", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    text = README.read_text()
    assert table == text.split("<!-- models:start -->\n")[1].split("\n<!-- models:end -->")[0].strip()


def test_embed_mirrors_the_tree_skips_done_and_reports_bad_files(tmp_path, capsys):
    src = tmp_path / "in put"
    shutil.copytree(EXAMPLES, src, ignore=shutil.ignore_patterns("licenses", "*.md"))
    (src / "notes" / "broken.wav").write_bytes(b"RIFF....WAVEnot really")
    out = tmp_path / "out"
    assert main(["embed", str(src), "-o", str(out), "--model", "mfcc", "--layers", "all"]) == 1
    captured = capsys.readouterr()
    assert "broken.wav" in captured.err and "3 embedded, 0 skipped, 1 failed of 4 inputs" in captured.out
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz"))
    assert made == ["drums/snare.ogg.npz", "notes/piano-midi46.flac.npz", "soundtrack/wesnoth-battle-epic.flac.npz"]
    with np.load(out / "soundtrack/wesnoth-battle-epic.flac.npz") as z:
        meta = json.loads(str(z["metadata"]))
        assert z["frames"].shape == (1, 501, 60) and z["clip"].shape == (1, 60)
        assert z["timestamps"].shape == (501,) and z["timestamps"][1] == pytest.approx(0.02)
    assert meta["model"] == "mfcc" and meta["sample_rate"] == 16000 and meta["duration"] == pytest.approx(10.0)
    assert "musicssl_version" in meta and not list(out.rglob("*.part"))
    # A second run skips finished outputs and still reports the broken file.
    (src / "notes" / "broken.wav").unlink()
    assert main(["embed", str(src), "-o", str(out), "--model", "mfcc", "--layers", "all"]) == 0
    assert "0 embedded, 3 skipped, 0 failed of 3 inputs" in capsys.readouterr().out


def test_embed_pool_and_single_file(tmp_path):
    f = EXAMPLES / "notes" / "piano-midi46.flac"
    assert main(["embed", str(f), "-o", str(tmp_path), "--pool", "mean", "--batch-size", "2"]) == 0
    with np.load(tmp_path / "piano-midi46.flac.npz") as z:
        assert set(z.files) == {"clip", "metadata"} and z["clip"].shape == (model_info(DEFAULT_MODEL).embed_dim,)


def test_embed_user_errors_exit_cleanly(tmp_path, capsys, caplog):
    assert main(["embed", str(tmp_path / "missing.wav"), "-o", str(tmp_path / "o")]) == 2
    assert "missing.wav" in capsys.readouterr().err
    assert main(["embed", str(EXAMPLES), "-o", str(tmp_path / "o"), "--model", "jepa-base"]) == 2
    assert "pretrained=False" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["embed", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 1
    with caplog.at_level("WARNING", logger="musicssl"):
        assert main(["embed", str(EXAMPLES), "-o", str(tmp_path / "o"), "--ext", "mp4a"]) == 1
    assert f"no audio files found in {EXAMPLES} (searched every subfolder for .mp4a)" in caplog.text


@pytest.mark.parametrize("args, said", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:99"], "device 'cuda:99'"),  # CPU-only torch, or fewer GPUs than 100
    (["-o", "FILE"], "is a file: give -o/out a folder"),
    (["-o", "FILE/feats"], "cannot make the output folder"),
])
def test_embed_device_and_output_mistakes_exit_cleanly(tmp_path, capsys, args, said):
    """Said before any work, in musicssl's words rather than a traceback from torch or os."""
    f = EXAMPLES / "notes" / "piano-midi46.flac"
    (tmp_path / "FILE").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    out = ["-o", str(tmp_path / "out")] if "-o" not in args else []
    assert main(["embed", str(f), *out, *args]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and (tmp_path / "FILE").read_text() == "not a folder"


def test_console_entry_points(tmp_path):
    for cmd in ([sys.executable, "-m", "musicssl", "--help"], [shutil.which("musicssl") or "musicssl", "--version"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "musicssl" in res.stdout


def run_with_a_dropped_ctrl_c(argv: list[str], then_run: bool) -> subprocess.CompletedProcess:
    """`musicssl ARGV` through the console entry point, with a Ctrl-C raised inside a finaliser just
    before main(): CPython prints and drops that KeyboardInterrupt. `then_run`: main() runs the
    command; else it returns 0 at once."""
    code = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see cli_process)\n"
        "import musicssl.cli as cli\n"
        "class Finalised:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while Python runs a finaliser: dropped\n"
        "        sum(range(1000))\n"
        "real_main = cli.main\n"
        "def main(argv=None):\n"
        "    Finalised()\n"
        f"    return real_main(argv) if {then_run} else 0\n"
        "cli.main = main\n"
        f"sys.argv = ['musicssl', *{argv!r}]\n"
        "cli.run()\n"
    )
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)


def test_python_m_musicssl_cli_runs_the_command():
    """`torchrun -m musicssl.cli embed ...` did nothing and exited 0: the module had no main guard."""
    res = subprocess.run([sys.executable, "-m", "musicssl.cli", "list", "mfcc"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("mfcc "), res


def test_the_command_prints_its_own_notes_and_not_other_libraries_info_logs():
    """torch printed its compiler's cache statistics (INFO) at exit after a Ctrl-C."""
    code = ("import logging, sys\nimport musicssl.cli as cli\n"
            "def main(argv=None):\n"
            "    logging.getLogger('torch._subclasses').info('FakeTensor cache stats')\n"
            "    logging.getLogger('musicssl.bulk.run').info('3/3 files')\n"
            "    logging.getLogger('torch').warning('a warning of torch')\n"
            "    return 0\n"
            "cli.main = main\nsys.argv = ['musicssl', 'list']\ncli.run()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stderr.splitlines() == ["3/3 files", "a warning of torch"], res.stderr


def test_ctrl_c_that_python_drops_in_a_finaliser_still_ends_the_command_as_interrupted():
    """soundfile's SoundFile has a __del__; the command must still end with status 130 and its one
    line, not with 0."""
    res = run_with_a_dropped_ctrl_c(["embed"], then_run=False)
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("musicssl embed: interrupted")


def test_a_ctrl_c_lost_before_the_run_starts_stops_it_at_its_first_step(tmp_path):
    """A Ctrl-C that lands during start-up (torch's C import drops it, as a finaliser does) must stop
    the run at once, not after it has embedded the whole collection."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        shutil.copy(EXAMPLES / "notes" / "piano-midi46.flac", folder / f"{i}.flac")
    res = run_with_a_dropped_ctrl_c(["embed", str(folder), "-o", str(tmp_path / "out"), "--num-workers", "0"],
                                    then_run=True)
    assert res.returncode == 130, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("musicssl embed: interrupted")
    assert not list((tmp_path / "out").glob("*.npz")), "the run went on after the Ctrl-C"



def test_a_reader_that_stops_early_gets_no_traceback():
    """`musicssl list --all | head -1`: a closed pipe ends the command quietly (status 141, as `yes | head`)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-c", "from musicssl.cli import run; run()", "list", "--all"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_an_unknown_option_prints_its_commands_usage(capsys):
    with pytest.raises(SystemExit) as err:
        main(["list", "--bogus"])
    assert err.value.code == 2 and "usage: musicssl list" in capsys.readouterr().err


def test_eval_names_a_missing_task_before_working_on_the_others(tmp_path, monkeypatch, capsys):
    import musicssl.evaluate

    (tmp_path / "task.csv").write_text("path,label\n")
    monkeypatch.setattr(musicssl.evaluate, "evaluate", lambda *a, **k: pytest.fail("a task ran first"))
    assert main(["eval", str(tmp_path / "task.csv"), str(tmp_path / "nope.csv"), "--models", "mfcc"]) == 2
    assert "nope.csv does not exist" in capsys.readouterr().err


def test_an_embedding_cache_that_cannot_be_written_costs_only_time(tmp_path, caplog):
    from musicssl.evaluate.cache import EmbeddingCache

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cache = EmbeddingCache(blocker, musicssl.load("mfcc"), "mfcc")
    with caplog.at_level("WARNING", logger="musicssl.evaluate.cache"):
        cache._write({0: {"k": np.zeros(3, np.float32)}})
    assert "the results stand, but the next run embeds again" in caplog.text
