"""musicssl.convert: safe checkpoint reading, key helpers, cache keys, `convert` argument handling."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from musicssl import convert
from musicssl.errors import ReleaseFormatError, UnknownModelError
from musicssl.registry import ModelSpec


class Meta:
    """A metadata object as upstream checkpoints pickle them (Lightning hparams, omegaconf)."""

    def __init__(self, value):
        self.value = value


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_read_checkpoint_plain_state_dict(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.zeros(3)}
    out = convert.read_checkpoint(_save(state, tmp_path / "m.bin"))
    torch.testing.assert_close(out, state)


def test_read_checkpoint_needs_allow_list_for_builtins_beyond_torch(tmp_path):
    path = _save({"state_dict": {"w": torch.ones(2)}, "tags": frozenset({"a"})}, tmp_path / "c.pt")
    with pytest.raises(ReleaseFormatError, match="c.pt: Unsupported global: GLOBAL frozenset") as err:
        convert.read_checkpoint(path)
    assert "weights_only" not in str(err.value)  # torch's advice to unpickle unsafely is not passed on
    assert convert.read_checkpoint(path, allow=[frozenset])["tags"] == frozenset({"a"})


def test_stand_ins_replace_metadata_classes_without_importing_them(tmp_path, monkeypatch):
    module = types.ModuleType("upstream_meta")
    Meta.__module__ = "upstream_meta"
    module.Meta = Meta
    monkeypatch.setitem(sys.modules, "upstream_meta", module)
    path = _save({"hparams": Meta({"lr": 0.1}), "state_dict": {"w": torch.ones(2)}}, tmp_path / "l.ckpt")
    monkeypatch.delitem(sys.modules, "upstream_meta")  # the package that defined it is not installed
    ckpt = convert.read_checkpoint(path, stand_ins=["upstream_meta.Meta"])
    assert ckpt["hparams"].state == {"value": {"lr": 0.1}}
    torch.testing.assert_close(ckpt["state_dict"]["w"], torch.ones(2))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_code_in_a_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ReleaseFormatError, match="evil.pt"):
        convert.read_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", pickle.dumps([1, 2])[:-3],
                                     b"RIFF\x80\x00\x00\x00WAVEfmt "])  # a WAV broke the unpickler's stack
def test_broken_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.bin"
    path.write_bytes(content)
    with pytest.raises(ReleaseFormatError, match="broken.bin"):
        convert.read_checkpoint(path)


def test_audio_given_as_a_checkpoint_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "MERT-v1-95M.mp3"
    path.write_bytes(b"ID3\x04\x00" + bytes(500))
    with pytest.raises(ReleaseFormatError, match="not a PyTorch checkpoint") as err:
        convert.read_checkpoint(path)
    assert "MERT-v1-95M.mp3" in str(err.value) and "weights_only" not in str(err.value)


@pytest.mark.parametrize("style", ["weight_norm", "parametrize"])
def test_fold_weight_norm_matches_torch(style):
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 8, 5, groups=2)
    if style == "weight_norm":
        conv = nn.utils.weight_norm(conv, dim=2)
    else:
        conv = nn.utils.parametrizations.weight_norm(conv, dim=2)
    with torch.no_grad():  # make g differ from ||v|| so folding is really exercised
        for name, p in conv.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.mul_(torch.rand_like(p) + 0.5)
    conv(torch.zeros(1, 8, 5))  # the old-style hook recomputes `weight` from g and v on forward
    state = {"pos." + k: v.detach().clone() for k, v in conv.state_dict().items() if k != "weight"}
    folded = convert.fold_weight_norm(state, "pos.", dim=2)
    assert set(folded) == {"pos.weight", "pos.bias"}
    torch.testing.assert_close(folded["pos.weight"], conv.weight.detach())


def test_fold_weight_norm_missing_keys():
    with pytest.raises(ReleaseFormatError, match="pos."):
        convert.fold_weight_norm({"pos.weight": torch.ones(1)}, "pos.", dim=2)


def test_take_strips_the_prefix():
    state = {"model.a": torch.ones(1), "model.b.c": torch.ones(2), "other": torch.ones(3)}
    assert set(convert.take(state, "model.")) == {"a", "b.c"}


def _spec(**kw):
    base = ModelSpec(name="x", family="f", sample_rate=16000, frame_rate=50.0, embed_dim=8, num_layers=1,
                     recommended_layer=-1, context_seconds=1.0, weights="hf-hub:o/r", upstream=True,
                     files={"m.bin": None}, args={"dim": 8})
    return dataclasses.replace(base, **kw)


def test_source_key_follows_pins_and_architecture():
    keys = {convert.source_key(_spec()), convert.source_key(_spec(revision="a" * 40)),
            convert.source_key(_spec(files={"m.bin": "0" * 64})), convert.source_key(_spec(args={"dim": 16}))}
    assert len(keys) == 4
    assert convert.source_key(_spec()) == convert.source_key(_spec(description="other text"))


def test_pinning_is_described():
    assert "recorded on first download" in _spec().pinning
    assert _spec(files={"m.bin": "0" * 64}, revision="a" * 40).pinning == f"revision {'a' * 40}, sha256 pinned"
    # `list -v` said Dasheng's weights were not checksummed: only its config.json is not.
    assert _spec(files={"m.bin": "0" * 64, "config.json": None}).pinning == (
        "sha256 pinned for m.bin; config.json recorded on first download")
    assert _spec().converted and not _spec(upstream=False).converted
    assert _spec(upstream=False, weights="https://example.org/w").converted


def test_files_are_matched_by_name_then_extension_then_order(tmp_path):
    spec = _spec(files={"ckpt.pt": None, "stats.json": None})
    a, b = tmp_path / "stats.json", tmp_path / "my_download.pt"
    assert convert._match_files(spec, [a, b]) == {"stats.json": a, "ckpt.pt": b}
    c, d = tmp_path / "renamed.json", tmp_path / "renamed.pt"  # weights first: a renamed file keeps its kind
    assert convert._match_files(spec, [d, c]) == {"ckpt.pt": d, "stats.json": c}
    assert convert._match_files(spec, [tmp_path / "x.bin", tmp_path / "y.bin"])["ckpt.pt"].name == "x.bin"
    with pytest.raises(ValueError, match="extra files"):
        convert._match_files(spec, [a, b, tmp_path / "third"])


def test_the_entry_the_files_name_or_pin_is_tried_first(tmp_path):
    """MusicFM's MSD and FMA checkpoints share one architecture: the file names (or pinned sha256)
    choose, not the registry's order."""
    fma = _spec(name="m-fma", files={"pretrained_fma.pt": None, "fma_stats.json": None})
    msd = _spec(name="m-msd", files={"pretrained_msd.pt": "ab" * 32, "msd_stats.json": None})
    files = [tmp_path / "pretrained_msd.pt", tmp_path / "msd_stats.json"]
    sha = {p: "00" * 32 for p in files}
    assert convert._evidence(msd, files, sha) == (0, 2) and convert._evidence(fma, files, sha) == (0, 0)
    renamed = [tmp_path / "a.pt", tmp_path / "b.json"]
    sha = {renamed[0]: "ab" * 32, renamed[1]: "00" * 32}
    assert convert._evidence(msd, renamed, sha) == (1, 0) and convert._evidence(fma, renamed, sha) == (0, 0)


def test_unwrap_state_takes_the_state_dict_training_code_saved(tmp_path):
    t = torch.ones(1)
    path = tmp_path / "ckpt.pt"
    assert convert.unwrap_state({"a.w": t}, path) == {"a.w": t}
    assert convert.unwrap_state({"state_dict": {"a.w": t}, "epoch": 3}, path) == {"a.w": t}
    assert convert.unwrap_state({"model": {"module.a.w": t}, "optimizer": {}}, path) == {"a.w": t}
    with pytest.raises(ReleaseFormatError, match=r"ckpt.pt: the entries \['a.w'\] are floats, not tensors"):
        convert.unwrap_state({"a.w": 1.0, "b": t}, path)
    with pytest.raises(ReleaseFormatError, match="ckpt.pt holds a list"):
        convert.unwrap_state([t], path)


def test_a_half_weight_norm_is_a_format_error():
    with pytest.raises(ReleaseFormatError, match="weight_g' without 'pos.weight_v'"):
        convert.fold_weight_norm({"pos.weight_g": torch.ones(1)}, "pos.", dim=2)


def test_convert_refuses_an_out_whose_files_it_would_replace(tmp_path):
    """A project folder, or the folder the inputs are in (a Hub snapshot, whose files link to
    blobs), is refused before anything is written; an earlier release is replaced."""
    snap = tmp_path / "snap"
    snap.mkdir()
    blob = tmp_path / "blob"
    blob.write_text('{"upstream": 1}')
    (snap / "config.json").symlink_to(blob)
    (snap / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds the input .*config.json, which the release would replace"):
        convert.convert_local("pesto", [snap / "model.pt", snap / "config.json"], snap)
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# mine")
    with pytest.raises(ValueError, match="holds README.md and is not a musicssl release"):
        convert.convert_local("pesto", [snap / "model.pt"], project)
    assert blob.read_text() == '{"upstream": 1}' and (project / "README.md").read_text() == "# mine"


def test_a_release_never_writes_through_a_link_in_its_folder(tmp_path):
    import musicssl
    from musicssl.factory import save_pretrained

    folder = tmp_path / "release"
    save_pretrained(musicssl.load("jepa-tiny", pretrained=False, depth=1), folder)
    blob = tmp_path / "blob"
    blob.write_text("upstream")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(blob)
    save_pretrained(musicssl.load("jepa-tiny", pretrained=False, depth=1), folder, card="# ours")
    assert blob.read_text() == "upstream" and not (folder / "README.md").is_symlink()


def test_convert_unknown_family(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="families"):
        convert.convert_local("no-such-family", [f], tmp_path / "out")
    with pytest.raises(ValueError, match="'simclr-mini' is not a port of upstream weights"):
        convert.convert_local("simclr-mini", [f], tmp_path / "out")


def test_convert_out_that_is_a_file_is_said_first(tmp_path):
    from musicssl.errors import OutputPathError

    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    with pytest.raises(OutputPathError, match="is a file: give --out a folder"):
        convert.convert_local("pesto", [f], f)


def test_convert_reads_and_writes_under_home(tmp_path, monkeypatch):
    """'~' in --out and the files is the home folder (a folder named '~' was made in the working one)."""
    from musicssl.errors import OutputPathError

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="is a file: give --out a folder"):
        convert.convert_local("pesto", ["~/w.bin"], "~/w.bin")  # both found where "~" says
    assert not (tmp_path / "~").exists()


def test_convert_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        convert.convert_local("pesto", [tmp_path / "nope.bin"], tmp_path / "out")


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path):
    """torchrun ranks convert the same upstream weights at once: the first rename wins, the others
    neither fail nor delete the folder their peers may be reading."""
    folder = tmp_path / "converted" / "mert"

    def write(tmp, marker):
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text(marker)

    def write_while_another_wins(tmp):
        write(tmp, "ours")
        convert._write_atomically(folder, lambda other: write(other, "theirs"))

    convert._write_atomically(folder, write_while_another_wins)
    assert (folder / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["mert"]  # no temporary folder left
    (folder / "model.safetensors").unlink()  # an incomplete folder is replaced
    convert._write_atomically(folder, lambda tmp: write(tmp, "again"))
    assert (folder / "model.safetensors").read_text() == "again"


def test_a_damaged_or_unwritable_conversion_cache_still_gives_the_model(tmp_path, monkeypatch, caplog):
    """A converted copy cut short is converted again from the cached upstream files; a cache that
    cannot be written gives the model uncached, with a warning, instead of a traceback."""
    import musicssl
    from musicssl.registry import model_info

    spec = model_info("mert-v1-95m")
    small = musicssl.load("jepa-tiny", pretrained=False, depth=1)
    conversions = []
    monkeypatch.setattr(convert.hub, "fetch_spec_files", lambda spec, offline=None: {})
    monkeypatch.setattr(convert, "convert_files", lambda spec, files: conversions.append(1) or small)
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    convert.load_converted(spec)
    weights = convert.converted_folder(spec) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="musicssl.convert"):
        assert convert.load_converted(spec) is small and len(conversions) == 2
    assert "is damaged" in caplog.text and convert.load_converted(spec).num_layers == 1 and len(conversions) == 2
    other = musicssl.load("jepa-tiny", pretrained=False, depth=1)  # weights of the same shape, put in by hand
    from musicssl.factory import save_pretrained

    save_pretrained(other, tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    caplog.clear()
    with caplog.at_level("WARNING", logger="musicssl.convert"):
        convert.load_converted(spec)
    assert "not the" in caplog.text and "it was written with" in caplog.text and len(conversions) == 3
    record = convert.converted_folder(spec) / convert.WEIGHTS_SHA256
    record.unlink()  # a copy made before these records: taken as it is
    convert.load_converted(spec)
    assert len(conversions) == 3
    record.write_text('{"conversion": 0}')  # made by an older converter: made again
    convert.load_converted(spec)
    assert len(conversions) == 4
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "a-file"))
    with caplog.at_level("WARNING", logger="musicssl.convert"):
        assert convert.load_converted(spec) is small
    assert "point MUSICSSL_CACHE at a folder you may write to" in caplog.text
