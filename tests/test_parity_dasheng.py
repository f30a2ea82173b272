"""Dasheng parity with the `dasheng` 0.0.9 package (random weights, small config), upstream-format
loading (Hugging Face safetensors through the fake Hub, the Zenodo .pt through `musicssl convert`),
and refusals of checkpoints that do not fit.

The small config has chunks of 10 tokens (target_length 40 frames = 0.4 s), so 1 s of audio runs as
two full chunks and a partial one, as 25 s would with the released 10.08 s chunks.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import types
from typing import Any, Callable

import numpy as np
import pytest
import torch
from references import randomize_, rel_err, require, torchaudio_python_only

import musicssl
from musicssl import registry
from musicssl.cli import main
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
import musicssl.models.dasheng as dasheng_module
from musicssl.models.dasheng import BASE, Dasheng, checkpoint_filter_fn

SMALL = dict(embed_dim=64, depth=2, num_heads=4, target_length=40)
SR = 16000
TOL = 1e-5


def reference_class() -> type:
    torchaudio_python_only()
    require("einops")
    return require("dasheng.pretrained.pretrained").Dasheng


def make_reference(args: dict[str, Any] = SMALL, seed: int = 0) -> torch.nn.Module:
    """Upstream `Dasheng` with every parameter and BN statistic random (seeded), in eval mode."""
    ref = reference_class()(**args).eval()
    randomize_(ref, seed)
    with torch.no_grad():  # BN statistics on the scale of real dB values
        ref.init_bn[1].running_mean.normal_(-20.0, 5.0, generator=torch.Generator().manual_seed(seed))
        ref.init_bn[1].running_var.mul_(100.0)
    return ref


def convert(ref: torch.nn.Module, args: dict[str, Any] = SMALL) -> Dasheng:
    ours = Dasheng(**args).eval()
    load_state_strict(ours, checkpoint_filter_fn(ref.state_dict(), ours), where="reference")
    return ours


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, Dasheng]:
    ref = make_reference()
    return ref, convert(ref)


def signal(n: int, seed: int = 0) -> torch.Tensor:
    """Tones, a click train and noise: (n,) float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    x = sum(a * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.28)) for a, f in ((0.3, 220.0), (0.2, 1375.0), (0.1, 5100.0)))
    x = x + 0.05 * rng.standard_normal(n) + 0.5 * (np.arange(n) % 4000 < 8)
    return torch.from_numpy(x.astype(np.float32))


def reference_hidden(ref: torch.nn.Module, wav: torch.Tensor) -> list[torch.Tensor]:
    """Upstream on one item (1, S): [block input, block outputs but the last, final norm], the
    chunks concatenated in time, read with hooks."""
    depth = len(ref.blocks)
    caught: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
    hooks = [ref.blocks[0].register_forward_pre_hook(lambda m, a: caught[0].append(a[0]))]
    for i in range(depth - 1):
        hooks.append(ref.blocks[i].register_forward_hook(lambda m, a, out, i=i: caught[i + 1].append(out)))
    hooks.append(ref.norm.register_forward_hook(lambda m, a, out: caught[depth].append(out)))
    try:
        with torch.no_grad():
            out = ref(wav)
    finally:
        for h in hooks:
            h.remove()
    hidden = [torch.cat(c, dim=1) for c in caught]
    torch.testing.assert_close(hidden[-1], out, rtol=0, atol=0)
    return hidden


def ours_hidden(ours: Dasheng, wav: torch.Tensor, lengths: list[int] | None = None) -> list[torch.Tensor]:
    lengths = lengths or [wav.shape[-1]] * wav.shape[0]
    with torch.no_grad():
        return ours.forward_features(wav, torch.tensor(lengths))


# 25 tokens (chunks 10+10+5), 17 (10+7), one full chunk (41 frames), one partial chunk.
LENGTHS = [16000, 11000, 6400, 6000]


def test_every_hidden_state_matches_the_reference_item_by_item(pair):
    ref, ours = pair
    assert ours.num_layers == len(ref.blocks) + 1
    clips = [signal(n, seed=i) for i, n in enumerate(LENGTHS)]
    batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    batched = ours_hidden(ours, batch, LENGTHS)
    worst = 0.0
    for i, clip in enumerate(clips):
        expected = reference_hidden(ref, clip[None])
        alone = ours_hidden(ours, clip[None])
        n = int(ours.frame_lengths(torch.tensor(LENGTHS[i])))
        assert expected[0].shape[1] == n
        for layer, (e, a, b) in enumerate(zip(expected, alone, batched)):
            err_alone, err_batched = rel_err(a, e), rel_err(b[i : i + 1, :n], e)
            worst = max(worst, err_alone, err_batched)
            assert err_alone < TOL, f"item {i} layer {layer}: {err_alone:.2e}"
            assert err_batched < TOL, f"item {i} layer {layer} (padded batch): {err_batched:.2e}"
            assert not b[i, n:].any(), "frames past an item's length are zero"
    print(f"dasheng parity: worst relative error over {len(LENGTHS)} items x {ours.num_layers} layers: {worst:.2e}")


def test_embed_long_audio_follows_upstream_chunks(pair):
    ref, ours = pair
    clips = [signal(16000, seed=5), signal(12900, seed=6)]  # 2.5 windows; 2 windows + 100 samples
    emb = ours.embed([c.numpy() for c in clips], sr=SR, layers="all")
    assert emb.frame_rate == 25.0
    torch.testing.assert_close(emb.timestamps[:3], torch.tensor([0.015, 0.055, 0.095]))
    for i, clip in enumerate(clips):
        expected = reference_hidden(ref, clip[None])
        n = expected[0].shape[1]
        assert int(emb.lengths[i]) == n
        got = emb.frames[i, :, :n]
        # Block input: tokens away from window boundaries are exact; each window's first and last
        # token sees reflect padding in the STFT where upstream sees the neighbouring audio.
        edge = {9, 10, 19, 20}
        inner = [t for t in range(n) if t not in edge]
        assert rel_err(got[0, inner], expected[0][0, inner]) < TOL
        # Those tokens differ, and attention spreads a little of it over their chunks (with random
        # weights, which amplify it; a loose bound, as a regression guard).
        errs = [rel_err(got[k], expected[k][0]) for k in range(len(expected))]
        inner_last = rel_err(got[-1, inner], expected[-1][0, inner])
        clip_err = rel_err(got[-1].mean(0), expected[-1][0].mean(0))
        assert max(errs) < 0.2, errs
        print(f"dasheng embed() vs one upstream pass, clip {i}: per layer {['%.1e' % e for e in errs]}, "
              f"last layer without edge tokens {inner_last:.1e}, mean-pooled last layer {clip_err:.1e}")
    # Windows holding several chunks are exact (forward_features chunks like upstream).
    wide = convert(ref, {**SMALL, "context_seconds": 1.2})
    emb = wide.embed(clips[0].numpy(), sr=SR, layers="all")
    expected = reference_hidden(ref, clips[0][None])
    for k, e in enumerate(expected):
        assert rel_err(emb.frames[0, k], e[0]) < TOL


def hf_files(ref: torch.nn.Module, args: dict[str, Any] = SMALL) -> dict[str, bytes]:
    """What mispeech/dasheng-* holds: config.json and model.safetensors (keys under `encoder.`,
    no front-end buffers)."""
    from safetensors.torch import save

    state = {f"encoder.{k}": v.contiguous() for k, v in ref.state_dict().items() if not k.startswith("front_end.")}
    kwargs = {"depth": args["depth"], "embed_dim": args["embed_dim"], "num_heads": args["num_heads"],
              "patch_size": [64, 4], "patch_stride": [64, 4], "target_length": args["target_length"]}
    config = {"architectures": ["DashengModel"], "encoder_kwargs": kwargs, "name": "dasheng-test", "model_type": "dasheng"}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": save(state)}


def test_loads_upstream_hf_files_through_the_hub(pair, fake_hub, monkeypatch):
    from upstream_hub import load_through_hub

    ref, _ = pair
    first, second = load_through_hub(fake_hub, monkeypatch, "dasheng-base", hf_files(ref), args=SMALL)
    clip = signal(6000, seed=9)  # within one embed() window
    expected = reference_hidden(ref, clip[None])
    emb = first.embed(clip.numpy(), sr=SR, layers="all")  # frames (1, L, T, D)
    for k, e in enumerate(expected):
        assert rel_err(emb.frames[0, k], e[0]) < TOL
    torch.testing.assert_close(second.embed(clip.numpy(), sr=SR, layers="all").frames, emb.frames, rtol=0, atol=0)


def zenodo_bytes(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> bytes:
    """The Zenodo dasheng_*.pt layout: {"model": state_dict (with front-end buffers), "config": kwargs}."""
    buf = io.BytesIO()
    torch.save({"model": state, "config": config if config is not None else {"target_length": 40, "pooling": "mean"}}, buf)
    return buf.getvalue()


@pytest.fixture
def small_registry(monkeypatch):
    """dasheng-base with the small architecture, for converting small upstream files."""
    spec, build = registry._lookup("dasheng-base")
    monkeypatch.setitem(registry._MODELS, "dasheng-base", (dataclasses.replace(spec, args=dict(SMALL)), build))


def test_convert_cli_takes_the_zenodo_checkpoint(pair, small_registry, tmp_path, capsys):
    ref, _ = pair
    path = tmp_path / "dasheng_base.pt"
    path.write_bytes(zenodo_bytes(ref.state_dict()))
    assert main(["convert", "dasheng", str(path), "--out", str(tmp_path / "release")]) == 0
    loaded = musicssl.load(str(tmp_path / "release"))
    clip = signal(16000, seed=11)
    for k, (a, e) in enumerate(zip(ours_hidden(loaded, clip[None]), reference_hidden(ref, clip[None]))):
        assert rel_err(a, e) < TOL, k


def load_into_small(tmp_path, files: dict[str, bytes]) -> Dasheng:
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    model = Dasheng(**SMALL)
    model.load_upstream(paths)
    return model


@pytest.mark.parametrize("change", ["extra", "missing", "cls_token"])
def test_checkpoint_that_does_not_fit_is_refused(pair, tmp_path, change):
    ref, _ = pair
    state = dict(ref.state_dict())
    if change == "extra":
        state["blocks.0.ls1.gamma"] = torch.ones(64)
    elif change == "missing":
        del state["norm.weight"]
    else:
        state["cls_token"] = torch.zeros(1, 1, 64)
    with pytest.raises(ReleaseFormatError) as err:
        load_into_small(tmp_path, {"dasheng_base.pt": zenodo_bytes(state)})
    msg = str(err.value)
    assert "dasheng_base.pt" in msg
    assert {"extra": "blocks.0.ls1.gamma", "missing": "norm.weight", "cls_token": "cls_token"}[change] in msg


def test_front_end_buffers_are_checked(pair, tmp_path):
    ref, _ = pair
    state = dict(ref.state_dict())
    state["front_end.0.mel_scale.fb"] = state["front_end.0.mel_scale.fb"] * 1.01  # another mel norm
    with pytest.raises(ReleaseFormatError, match=r"dasheng_base\.pt.*mel_scale\.fb"):
        load_into_small(tmp_path, {"dasheng_base.pt": zenodo_bytes(state)})


def test_config_of_another_size_is_refused(pair, tmp_path):
    ref, _ = pair
    files = hf_files(ref, {**SMALL, "embed_dim": 1280})
    with pytest.raises(ReleaseFormatError, match=r"config\.json.*embed_dim=1280"):
        load_into_small(tmp_path, files)
    bad = zenodo_bytes(ref.state_dict(), {"pooling": "token", "target_length": 40})
    with pytest.raises(ReleaseFormatError, match=r"pooling='token'"):
        load_into_small(tmp_path, {"dasheng_base.pt": bad})


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ReleaseFormatError, match="model.safetensors"):
        load_into_small(tmp_path, {"model.safetensors": b"not weights at all"})


def test_released_size_keys_and_shapes(monkeypatch):
    """dasheng-base: the upstream module tree (on the meta device, no memory) in the Hugging Face
    key layout maps onto ours key for key and shape for shape."""
    cls = reference_class()
    upstream = importlib.import_module("dasheng.train.models")
    transforms = upstream.audio_transforms

    def on_cpu(make: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        def build(*args: Any, **kwargs: Any) -> torch.nn.Module:  # filterbanks are computed from values
            with torch.device("cpu"):
                return make(*args, **kwargs)
        return build

    monkeypatch.setattr(upstream, "audio_transforms", types.SimpleNamespace(
        MelSpectrogram=on_cpu(transforms.MelSpectrogram), AmplitudeToDB=transforms.AmplitudeToDB))
    monkeypatch.setattr(dasheng_module, "MelSpectrogram", on_cpu(dasheng_module.MelSpectrogram))
    with torch.device("meta"):
        ref = cls(**BASE).eval()
    state = {f"encoder.{k}": v for k, v in ref.state_dict().items() if not k.startswith("front_end.")}
    assert len(state) == 155
    with torch.device("meta"):
        ours = musicssl.load("dasheng-base", pretrained=False)
    mapped = checkpoint_filter_fn(state, ours)
    own = ours.state_dict()
    assert sorted(mapped) == sorted(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert sum(p.numel() for p in ours.parameters()) == 85_447_808
    spec = registry.model_info("dasheng-base")
    assert (spec.num_layers, spec.embed_dim, spec.frame_rate) == (ours.num_layers, ours.embed_dim, ours.frame_rate)
    assert spec.context_seconds == ours.context_seconds == pytest.approx(60.48)


def make_pair(full: bool) -> tuple[Callable[[torch.Tensor], Any], Callable[[torch.Tensor], Any], torch.Tensor]:
    """(ours, upstream, input) with the same random weights, for bench/parity_speed.py. Both take
    wav (1, S) at 16 kHz; ours returns every hidden state, upstream the last one. full: the released
    size (base) on 30 s (two 10.08 s chunks and a partial one); else the small test config on 1 s."""
    args = dict(BASE) if full else dict(SMALL)
    ref = make_reference(args)
    ours = convert(ref, args)
    wav = signal(30 * SR if full else SR)[None]

    def run_ours(x: torch.Tensor) -> list[torch.Tensor]:
        return ours.forward_features(x, torch.full((x.shape[0],), x.shape[-1]))

    return run_ours, ref, wav
