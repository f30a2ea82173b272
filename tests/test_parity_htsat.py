"""Parity of the `htsat` family (LAION-CLAP's audio tower) with the installed `laion_clap` 1.1.7.

The reference is upstream's `HTSAT_Swin_Transformer` (torchlibrosa front-end included) plus the
two-Linear projection of `CLAP`, with random weights. `laion_clap/__init__` cannot be imported
offline (it downloads tokenizers and needs transformers and torchvision), so its directories are
registered as bare packages and only `clap_module/htsat.py` is imported; `torchvision` and `h5py`,
which its `utils` imports but this path never uses, are stand-ins. Upstream's input handling
(int16 round trip, repeat-padding of short clips) lives in `training/data.py`, which downloads at
import, so `upstream_clip` below restates it.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import musicssl.models.htsat as htsat_family
from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.htsat import BASE, HTSAT, checkpoint_filter_fn, repeat_pad
from references import REFERENCE_HINT, padded, randomize_, rel_err, require, stub_module

CLIP = 480000  # 10 s at 48 kHz
FILE = "music_audioset_epoch_15_esc_90.14.pt"
# A small tower with upstream's geometry (64 x 64 tokens, 8 x 8 windows, 4 stages; shifted blocks
# in stages 0-2, none in the 8 x 8 last stage) and front-end.
SMALL = dict(width=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 4, 8], projection_dim=64)

# Upstream's WindowAttention calls torch.meshgrid without `indexing`.
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")


# --- the reference ---------------------------------------------------------------------------
def htsat_module() -> types.ModuleType:
    """`laion_clap.clap_module.htsat`, imported without running any package __init__."""
    if importlib.util.find_spec("laion_clap") is None:
        pytest.skip(f"reference package 'laion_clap' missing: {REFERENCE_HINT}")
    require("torchlibrosa")
    name = "_laion_clap_bare"
    if f"{name}.clap_module.htsat" not in sys.modules:
        root = Path(importlib.util.find_spec("laion_clap").origin).parent
        stub_module("torchvision.ops.misc", FrozenBatchNorm2d=type("FrozenBatchNorm2d", (nn.Module,), {}))
        stub_module("h5py")
        for pkg, path in ((name, root), (f"{name}.clap_module", root / "clap_module")):
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(path)]
            sys.modules[pkg] = mod
    return importlib.import_module(f"{name}.clap_module.htsat")


def audio_cfg(model_name: str = "base") -> SimpleNamespace:
    """`model_configs/HTSAT-base.json`'s audio_cfg, as `create_htsat_model` reads it."""
    return SimpleNamespace(model_name=model_name, mel_bins=64, sample_rate=48000, window_size=1024, hop_size=480,
                           fmin=50, fmax=14000, class_num=527)


class Reference(nn.Module):
    """Upstream's audio path: `audio_branch` -> "embedding" -> `audio_projection` -> L2 normalise
    (`CLAP.get_audio_embedding`), on waveforms already prepared as upstream's data pipeline does."""

    def __init__(self, audio_branch: nn.Module, width: int, projection_dim: int) -> None:
        super().__init__()
        self.audio_branch = audio_branch
        self.audio_projection = nn.Sequential(nn.Linear(width, projection_dim), nn.ReLU(),
                                              nn.Linear(projection_dim, projection_dim))

    def forward(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.audio_branch({"waveform": clips})
        return {"embedding": out["embedding"], "joint": F.normalize(self.audio_projection(out["embedding"]), dim=-1)}


def make_reference(args: dict[str, Any], seed: int = 0) -> Reference:
    """A randomised upstream reference of our `args` (SMALL, or BASE through create_htsat_model)."""
    htsat = htsat_module()
    if args["width"] == BASE["width"] and list(args["depths"]) == BASE["depths"]:
        branch = htsat.create_htsat_model(audio_cfg("base"))
    else:
        branch = htsat.HTSAT_Swin_Transformer(
            spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=527, embed_dim=args["width"],
            depths=args["depths"], num_heads=args["num_heads"], window_size=8, config=audio_cfg(),
        )
    ref = Reference(branch, args["width"] * 8, args["projection_dim"])
    # Larger than the default noise, so attention is far from uniform and a wrong shift shows.
    return randomize_(ref, seed, scale=0.2).eval()


def upstream_checkpoint(ref: Reference) -> dict[str, Any]:
    """`ref` in the container of upstream's training checkpoints (`training/main.py`): DDP-prefixed
    keys under "state_dict", with text-tower entries and metadata holding numpy scalars."""
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    state["module.text_branch.embeddings.word_embeddings.weight"] = torch.zeros(4, 8)
    state["module.text_projection.0.weight"] = torch.zeros(8, 8)
    state["module.audio_transform.sequential.0.weight"] = torch.zeros(8, 8)
    state["module.logit_scale_a"] = torch.tensor(2.66)
    state["module.logit_scale_t"] = torch.tensor(2.66)
    optimizer = {"state": {}, "param_groups": [{"lr": np.float64(1e-4), "betas": (0.9, 0.999), "params": [0]}]}
    return {"epoch": 15, "name": "music_audioset", "state_dict": state, "optimizer": optimizer}


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    return buf.getvalue()


def converted(ref: Reference, args: dict[str, Any], **overrides: Any) -> HTSAT:
    ours = HTSAT(**{**args, **overrides})
    load_state_strict(ours, checkpoint_filter_fn(upstream_checkpoint(ref), ours), where="reference")
    return ours.eval()


def upstream_clip(x: np.ndarray) -> np.ndarray:
    """Upstream's preparation of one clip of at most 10 s (hook.get_audio_embedding_from_data with
    data.get_audio_features, 'repeatpad'): int16 round trip (float32 scaling, truncation, float64
    division), then as many whole copies as fit in 10 s, then zeros."""
    q = (np.clip(x, -1.0, 1.0) * np.float32(32767.0)).astype(np.int16)
    y = (q / 32767.0).astype(np.float32)
    y = np.tile(y, CLIP // len(y))
    return np.pad(y, (0, CLIP - len(y)))


def reference_frames(ref: Reference, x: np.ndarray) -> torch.Tensor:
    """Our framing of a long signal, each 10 s window prepared as upstream prepares a clip -> (T, D)."""
    windows = [upstream_clip(x[i:i + CLIP]) for i in range(0, len(x), CLIP)]
    with torch.no_grad():
        return ref(torch.from_numpy(np.stack(windows)))["joint"]


@pytest.fixture(scope="module")
def pair() -> tuple[HTSAT, Reference]:
    torch.manual_seed(0)
    ref = make_reference(SMALL, seed=1)
    return converted(ref, SMALL), ref


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 48000)) / 48000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 0.5 * t) + 0.05 * rng.standard_normal(len(t))
    return x.astype(np.float32)


# --- parity ----------------------------------------------------------------------------------
def test_every_output_matches_upstream(pair):
    """Image fed to the Swin, the 4 stage outputs, the 1024-d (here 256-d) embedding, the joint one."""
    ours, ref = pair
    seen: dict[Any, torch.Tensor] = {}
    handles = [ref.audio_branch.patch_embed.register_forward_pre_hook(lambda m, a: seen.__setitem__("image", a[0]))]
    for i, layer in enumerate(ref.audio_branch.layers):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0])))
    clips = torch.from_numpy(np.stack([signal(10.0, 0), signal(10.0, 1) * 3]))  # beyond full scale: used as given here
    try:
        with torch.no_grad():
            expected = ref(clips)
            image, got = ours.image(clips), ours.clip_outputs(clips)
    finally:
        for h in handles:
            h.remove()
    errors = {"image": rel_err(image, seen["image"])}
    errors.update({f"stage {i}": rel_err(got["stages"][i], seen[i]) for i in range(4)})
    errors.update({k: rel_err(got[k], expected[k]) for k in ("embedding", "joint")})
    assert max(errors.values()) < 1e-5, errors


def test_forward_features_prepares_clips_as_upstream(pair):
    """Short clips are repeat-padded and every window int16-quantised as upstream; long audio gives
    one frame per 10 s window; frames past an item's length are zero."""
    ours, ref = pair
    items = [signal(3.3, 2), signal(10.0, 3) * 4, signal(23.0, 4)]  # 3.3 s -> 3 copies + zeros; 23 s -> 3 windows
    wav, lengths = padded(items)
    with torch.no_grad():
        frames = ours.forward_features(wav, lengths)
    assert len(frames) == ours.num_layers == 1
    assert frames[0].shape == (3, 3, 64)
    assert ours.frame_lengths(lengths).tolist() == [1, 1, 3]
    for i, x in enumerate(items):
        expected = reference_frames(ref, x)
        assert rel_err(frames[0][i, :len(expected)], expected) < 1e-5
        assert not frames[0][i, len(expected):].any()


def test_repeat_pad_is_upstreams_repeatpad():
    x = torch.randn(1, 100).expand(6, 100).contiguous()
    lengths = torch.tensor([1, 3, 33, 34, 99, 100])
    got = repeat_pad(x, lengths)
    for row, n in zip(got, lengths.tolist()):
        whole = np.tile(x[0, :n].numpy(), 100 // n)
        assert torch.equal(row, torch.from_numpy(np.pad(whole, (0, 100 - len(whole)))))


def test_int16_round_trip_is_upstreams(pair):
    ours, _ = pair
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 10000), [-1.0, 1.0, 0.5 / 32767, -0.99999 / 32767, 2.5, -3.0]])
    x = x.astype(np.float32)
    expected = (np.clip(x, -1.0, 1.0) * np.float32(32767.0)).astype(np.int16) / 32767.0
    assert torch.equal(ours.quantize(torch.from_numpy(x)), torch.from_numpy(expected.astype(np.float32)))


def test_embed_windows_and_timestamps(pair):
    ours, ref = pair
    x = signal(25.0, 5)
    out = ours.embed(x, sr=48000)
    assert out.frames.shape == (1, 3, 64) and out.frame_rate == pytest.approx(0.1)
    assert out.timestamps.tolist() == [5.0, 15.0, 25.0]
    assert rel_err(out.frames[0], reference_frames(ref, x)) < 1e-5


def test_full_size_keys_match_upstream_base(pair):
    """HTSAT-base from upstream's `create_htsat_model` (built on the meta device, reusing the small
    reference's front-end, which is the same) has exactly our BASE keys and shapes once filtered."""
    htsat = htsat_module()
    _, small = pair

    def reuse(module: nn.Module) -> Callable[..., nn.Module]:
        return lambda *args, **kwargs: module

    def on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with torch.device("cpu"):
                return fn(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(htsat, "Spectrogram", reuse(small.audio_branch.spectrogram_extractor))
        mp.setattr(htsat, "LogmelFilterBank", reuse(small.audio_branch.logmel_extractor))
        mp.setattr(torch, "linspace", on_cpu(torch.linspace))  # its drop-path rates call .item()
        with torch.device("meta"):
            branch = htsat.create_htsat_model(audio_cfg("base"))
        mp.setattr(htsat_family, "MelSpectrogram", on_cpu(htsat_family.MelSpectrogram))  # float() of its edges
        with torch.device("meta"):
            ours = HTSAT(**BASE)
    state = {f"audio_branch.{k}": v for k, v in branch.state_dict().items()}
    assert len(state) == 287
    theirs = {k: tuple(v.shape) for k, v in checkpoint_filter_fn(state).items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith("audio_projection.")}
    assert theirs == mine
    assert ours.state_dict()["audio_projection.0.weight"].shape == (512, 1024)
    # Fixed tensors the filter drops: an index per block (18), a mask per shifted block of stages 0-2 (8).
    fixed = [k for k in state if k.endswith(("relative_position_index", "attn_mask"))]
    assert len(fixed) == 18 + 8


# --- loading ---------------------------------------------------------------------------------
def test_load_through_hub(pair, fake_hub, monkeypatch):
    from upstream_hub import load_through_hub

    ours, ref = pair
    data = checkpoint_bytes(upstream_checkpoint(ref))
    first, second = load_through_hub(fake_hub, monkeypatch, "clap-music", files={FILE: data}, args={**BASE, **SMALL})
    x = signal(13.0, 6)  # a 10 s window and a 3 s one (3 copies + 1 s of zeros)
    expected = reference_frames(ref, x)
    got = first.embed(x, sr=48000).frames[0]
    assert rel_err(got, expected) < 1e-5
    torch.testing.assert_close(second.embed(x, sr=48000).frames[0], got, rtol=0, atol=0)


def _mutate(kind: str, checkpoint: dict[str, Any]) -> str:
    state = checkpoint["state_dict"]
    if kind == "missing":
        del state["module.audio_branch.norm.weight"]
        return "norm.weight"
    if kind == "unexpected":
        state["module.audio_branch.extra.weight"] = torch.zeros(1)
        return "extra.weight"
    if kind == "fusion":
        state["module.audio_branch.mel_conv1d.0.weight"] = torch.zeros(1)
        return "feature fusion"
    if kind == "front-end":
        state["module.audio_branch.logmel_extractor.melW"] = state["module.audio_branch.logmel_extractor.melW"] * 1.01
        return "logmel_extractor.melW"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "fusion", "front-end"])
def test_bad_checkpoint_names_the_file_and_the_key(pair, tmp_path, kind):
    _, ref = pair
    checkpoint = upstream_checkpoint(ref)
    needle = _mutate(kind, checkpoint)
    path = tmp_path / FILE
    path.write_bytes(checkpoint_bytes(checkpoint))
    with pytest.raises(ReleaseFormatError) as err:
        HTSAT(**SMALL).load_upstream({FILE: path})
    assert str(path) in str(err.value) and needle in str(err.value)


def test_plain_state_dict_loads_too(pair):
    """No "state_dict" wrapper and no `module.` prefix: the same weights."""
    ours, ref = pair
    plain = {k[len("module."):]: v for k, v in upstream_checkpoint(ref)["state_dict"].items()}
    other = HTSAT(**SMALL)
    load_state_strict(other, checkpoint_filter_fn(plain, other), where="plain")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


# --- benchmark hook --------------------------------------------------------------------------
Forward = Callable[[torch.Tensor], torch.Tensor]


def make_pair(full: bool) -> tuple[Forward, Forward, torch.Tensor]:
    """(ours, reference, input) computing the same thing: two 10 s clips (2, 480000) -> joint
    embeddings (2, 1, D). Random weights; `full` = HTSAT-base (the released size), else SMALL.
    Ours skips the int16 round trip here, as upstream's tensor path (use_tensor=True) does."""
    args = dict(BASE, projection_dim=512) if full else SMALL
    torch.manual_seed(0)
    ref = make_reference(args, seed=1)
    ours = converted(ref, args, quantize_int16=False)
    x = torch.from_numpy(np.stack([signal(10.0, 0), signal(10.0, 1)]))

    def run_ours(wav: torch.Tensor) -> torch.Tensor:
        return ours(wav)

    def run_ref(wav: torch.Tensor) -> torch.Tensor:
        return ref(wav)["joint"][:, None]

    return run_ours, run_ref, x

