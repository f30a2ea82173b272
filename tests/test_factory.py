"""load() / save_pretrained(): release folders round-trip, and every refusal says what to do."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import musicssl
from musicssl.errors import DeviceError, ReleaseFormatError, UnknownModelError, WeightsUnavailableError


def clip(seconds: float = 11.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def test_release_round_trip_gives_identical_embeddings(tmp_path):
    torch.manual_seed(1)
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=2)
    folder = musicssl.save_pretrained(enc, tmp_path / "release", provenance={"recipe": "test"})
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["family"] == "spec_vit" and config["args"]["depth"] == 2
    assert config["spec"]["name"] == "jepa-tiny" and config["provenance"] == {"recipe": "test"}
    again = musicssl.load(folder)
    assert not again.training
    torch.testing.assert_close(again.embed(clip(), sr=16000).frames, enc.embed(clip(), sr=16000).frames)
    assert again.spec.name == "jepa-tiny" and "# jepa-tiny" in (folder / "README.md").read_text()


def test_load_skips_random_init_it_would_overwrite(tmp_path, monkeypatch):
    """Random weights are drawn for pretrained=False only; a release's are loaded, never drawn first."""
    calls = []
    original = torch.nn.init.kaiming_uniform_
    counted = lambda t, *a, **kw: calls.append(t.shape) or original(t, *a, **kw)  # noqa: E731
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counted)
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=2)
    built = len(calls)
    assert built > 0
    again = musicssl.load(musicssl.save_pretrained(enc, tmp_path / "release"))
    assert len(calls) == built and torch.nn.init.kaiming_uniform_ is counted  # skipped, then put back
    for (key, a), b in zip(enc.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_skipping_init_in_one_thread_leaves_other_threads_alone():
    from musicssl.factory import skip_weight_init

    seen = {}
    other = threading.Thread(target=lambda: seen.update(other=torch.nn.init.ones_(torch.zeros(3))))
    with skip_weight_init():
        with skip_weight_init():
            pass
        seen["this"] = torch.nn.init.ones_(torch.zeros(3))  # still skipped after a nested use
        other.start()
        other.join()
    assert seen["this"].sum() == 0 and seen["other"].sum() == 3
    assert torch.nn.init.ones_(torch.zeros(3)).sum() == 3


def test_fp16_release_is_half_size_and_close(tmp_path):
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=2)
    full = musicssl.save_pretrained(enc, tmp_path / "fp32")
    half = musicssl.save_pretrained(enc, tmp_path / "fp16", dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    a, b = musicssl.load(half).embed(clip(), sr=16000).frames, enc.embed(clip(), sr=16000).frames
    assert (a - b).norm() / b.norm() < 1e-2


def test_architecture_without_weights_refuses_with_the_way_out():
    with pytest.raises(WeightsUnavailableError) as err:
        musicssl.load("jepa-base")
    msg = str(err.value)
    assert "no released weights" in msg and "pretrained=False" in msg and "train" in msg


def test_random_weights_are_not_passed_off_as_the_released_model(tmp_path, monkeypatch):
    """pretrained=False kept the released model's spec: its weights and files, and the layer count
    the overrides had changed, went into run.json and releases as if trained."""
    enc = musicssl.load("simclr-mini", pretrained=False, depth=2)
    released = musicssl.registry.model_info("simclr-mini")
    assert released.weights and released.files  # what must not be claimed
    assert (enc.spec.weights, enc.spec.files, enc.spec.revision) == (None, {}, None)
    assert enc.spec.num_layers == enc.num_layers == 2 and enc.spec.args["depth"] == 2
    assert enc.spec.description.startswith("random weights (pretrained=False)")
    monkeypatch.setenv("HOME", str(tmp_path))  # "~" in a folder written is expanded, as load() reads it
    musicssl.save_pretrained(enc, "~/rel")
    again = musicssl.load("~/rel")
    assert (tmp_path / "rel" / "model.safetensors").is_file() and again.spec.description == enc.spec.description


def test_an_empty_name_and_the_meta_device_are_refused():
    with pytest.raises(ValueError, match="an empty model name \\(an unset variable\\?\\)"):
        musicssl.load("")  # it was read as the working folder
    with pytest.raises(DeviceError, match="device 'meta' holds no data"):
        musicssl.load("mfcc", device="meta")


def test_a_device_this_machine_lacks_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr("musicssl.hub.fetch_release", lambda *a, **k: pytest.fail("fetched before the check"))
    with pytest.raises(DeviceError, match="device 'cuda:99'"):
        musicssl.load("hf-hub:org/any", device="cuda:99")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'.*'cpu'"):
        musicssl.load("logmel", device="gpu0")
    assert musicssl.load("logmel", device=torch.device("cpu")).device.type == "cpu"


def test_unknown_model_and_overrides():
    with pytest.raises(UnknownModelError, match="Did you mean 'logmel'"):
        musicssl.load("logmell")
    assert musicssl.load("logmel", n_mels=64).embed_dim == 64  # weight-free models take overrides
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['offlin'\] for 'simclr-mini'"):
        musicssl.load("simclr-mini", offlin=True)  # a typo is not a constructor override
    with pytest.raises(TypeError, match="takes a model name"):
        musicssl.load(None)
    with pytest.raises(ValueError, match="floating torch dtype"):
        musicssl.load("mfcc", dtype="float16")


def test_a_folder_named_like_a_model_hides_it_only_if_it_is_a_release(tmp_path, monkeypatch, caplog):
    from musicssl.factory import release_info

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mfcc").mkdir()  # as `musicssl embed x -o mfcc --model mfcc` leaves
    assert type(musicssl.load("mfcc")).__name__ == "Mfcc"
    musicssl.save_pretrained(musicssl.load("jepa-tiny", pretrained=False, depth=1), tmp_path / "jepa-tiny")
    with caplog.at_level("WARNING", logger="musicssl"):
        assert musicssl.load("jepa-tiny").num_layers == 1  # a release of that name: the folder, said
    assert f"using the release folder {tmp_path / 'jepa-tiny'} in the working folder, not the registered" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="musicssl"):  # `musicssl info jepa-tiny` shows the folder's: said too
        assert release_info("jepa-tiny")["args"]["depth"] == 1
    assert "using the release folder" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="musicssl"):
        assert musicssl.load("./jepa-tiny").num_layers == 1  # meant as a folder: nothing to say
    assert not caplog.text
    with pytest.raises(ValueError, match="apply only to registry names"):
        musicssl.load("./jepa-tiny", pretrained=False)
    with pytest.raises(ValueError, match="depth="):
        musicssl.load("./jepa-tiny", depth=3)


def test_save_pretrained_mistakes_are_said(tmp_path):
    from musicssl.errors import OutputPathError

    with pytest.raises(TypeError, match="takes a musicssl Encoder"):
        musicssl.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "r")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        musicssl.save_pretrained(musicssl.load("mfcc"), tmp_path / "file")


def test_save_pretrained_replaces_a_linked_weights_file_without_writing_through_it(tmp_path):
    """A link there (a Hub snapshot's) is replaced, never written through into the cache's blob."""
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"the cache's weights")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "model.safetensors").symlink_to(blob)
    folder = musicssl.save_pretrained(musicssl.load("jepa-tiny", pretrained=False, depth=1), tmp_path / "r")
    assert blob.read_bytes() == b"the cache's weights" and not (folder / "model.safetensors").is_symlink()
    assert musicssl.load(folder).num_layers == 1 and sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors"]  # no temporary file left


@pytest.mark.parametrize("change, says", [
    (lambda c: c["args"].update(foo=1), "unexpected keyword argument 'foo'"),
    (lambda c: c.update(args=[1]), r"\['args'\] must be JSON objects"),
    (lambda c: c.update(spec="hello"), r"\['spec'\] must be JSON objects"),
    (lambda c: c.update(spec={"name": "x"}), "missing"),
    (lambda c: c.update(format_version=99), "newer than this musicssl reads"),
])
def test_a_config_json_that_does_not_fit_is_a_release_format_error(tmp_path, change, says):
    folder = musicssl.save_pretrained(musicssl.load("jepa-tiny", pretrained=False, depth=1), tmp_path / "r")
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReleaseFormatError, match=says):
        musicssl.load(folder)


def test_damaged_releases_are_reported(tmp_path):
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=1)
    folder = musicssl.save_pretrained(enc, tmp_path / "r")
    state = load_file(folder / "model.safetensors")
    state["extra.weight"] = torch.zeros(1)
    del state["norm.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ReleaseFormatError) as err:
        musicssl.load(folder)
    assert "norm.weight" in str(err.value) and "extra.weight" in str(err.value)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ReleaseFormatError, match="model.safetensors"):
        musicssl.load(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ReleaseFormatError, match="config.json"):
        musicssl.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ReleaseFormatError, match="model.safetensors"):
        musicssl.load(folder)
    with pytest.raises(ReleaseFormatError, match="not a folder"):
        musicssl.load(str(tmp_path / "no" / "such-release"))


def test_device_and_dtype_are_honoured():
    enc = musicssl.load("jepa-tiny", pretrained=False, depth=1, device="cpu", dtype=torch.bfloat16)
    assert enc.patch_embed.weight.dtype == torch.bfloat16 and enc.device.type == "cpu"
    out = enc.embed(clip(2.0), sr=16000)
    assert out.frames.dtype == torch.float32 and torch.isfinite(out.frames).all()
