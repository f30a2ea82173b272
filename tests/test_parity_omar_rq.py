"""OMAR-RQ port vs the reference package omar-rq 0.2.1: every block output of small random models
(mel and waveform inputs), the upstream config.gin and model.ckpt formats through the fake Hub, and
the errors a wrong file gives.

The reference is built by its own `get_model(config_file=..., load_weights=False)` from a gin file
written like the released ones. Stand-ins for imports it never uses on this path: Lightning
(`LightningModule` as a plain nn.Module) and its EnCodec target module (which imports transformers).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import musicssl.models.omar_rq as omar
from musicssl.errors import ReleaseFormatError
from references import REFERENCE_HINT, randomize_, rel_err, stub_module, torchaudio_python_only

TINY = dict(embed_dim=64, depth=2, num_heads=4)  # head dim 16 (RoPE needs it even)
FULL = dict(embed_dim=1024, depth=24, num_heads=8)
ARGS = {"mel": omar.BASE, "waveform": omar.MULTIFEATURE_25HZ_FSQ}
NAMES = {"mel": "omar-rq-base", "waveform": "omar-rq-multifeature-25hz-fsq"}
TOL = 1e-5
# gin-config's torch module checks the torch version with distutils when first imported
pytestmark = pytest.mark.filterwarnings("ignore:distutils Version classes are deprecated:DeprecationWarning")


# --------------------------------------------------------------------------------------------------
# The reference

def import_reference() -> types.ModuleType:
    if importlib.util.find_spec("omar_rq") is None or importlib.util.find_spec("gin") is None:
        pytest.skip(f"reference package 'omar_rq' (or gin-config) missing: {REFERENCE_HINT}")
    torchaudio_python_only()
    stub_module("pytorch_lightning", LightningModule=nn.Module, LightningDataModule=object, Trainer=object,
                Callback=object)
    if "omar_rq.nets.encodec" not in sys.modules:  # a training target only; its import pulls in transformers
        encodec = types.ModuleType("omar_rq.nets.encodec")
        encodec.EnCodec = type("EnCodec", (nn.Module,), {})
        sys.modules["omar_rq.nets.encodec"] = encodec
    import omar_rq

    return omar_rq


def upstream_gin(kind: str, embed_dim: int, depth: int, num_heads: int) -> str:
    """A config.gin in the form of the released ones (repo cfg/: training settings included, a
    macro, comments, a multi-line dict), for a mel ("base") or waveform ("multifeature-25hz-fsq") model."""
    common = f"""# general training parameters
train.wandb_params = {{
    "project": "mtg-ssl",  # a comment inside a dict
    "offline": True,
}}
build_module.module = @modules.maskingmodel.MaskingModel
build_module.net = @nets.conformer.Conformer
train.params = {{"precision": "bf16-mixed", "devices": 4}}
AudioDataset.num_frames = 480000 # 30s
modules.maskingmodel.MaskingModel.num_codebooks = 1
modules.maskingmodel.MaskingModel.lr = 1e-4
modules.maskingmodel.MaskingModel.weight_decay = 1e-2
modules.maskingmodel.MaskingModel.codebook_dim = 16
modules.maskingmodel.MaskingModel.mask_seconds = 0.4
modules.maskingmodel.MaskingModel.mask_prob = 0.6
modules.maskingmodel.MaskingModel.seed = 0
modules.maskingmodel.MaskingModel.plot_tokens = False
modules.maskingmodel.MaskingModel.diff_input = False
nets.conformer.Conformer.embed_dim = {embed_dim}
nets.conformer.Conformer.depth = {depth}
nets.conformer.Conformer.conv_kernel_size = 5
nets.conformer.Conformer.num_heads = {num_heads}
nets.conformer.Conformer.mlp_ratio = 4.0
nets.conformer.Conformer.mlp_residual_factor = 4.0
nets.conformer.Conformer.dropout = 0.2
nets.conformer.Conformer.input_dropout = 0.0
nets.conformer.Conformer.use_deepnorm = True
nets.conformer.Conformer.alpha_deepnorm =  2.6321480259049848 # we can tune this number
nets.conformer.Conformer.beta_deepnorm = 0.022386873579657126
nets.conformer.Conformer.use_rope = True
nets.conformer.Conformer.num_patches = None
build_module.ckpt_path = "model.ckpt"
"""
    mel = """nets.melspectrogram.MelSpectrogram.sr = {sr}
nets.melspectrogram.MelSpectrogram.win_len = 512
nets.melspectrogram.MelSpectrogram.hop_len = {hop}
nets.melspectrogram.MelSpectrogram.power = 2
nets.melspectrogram.MelSpectrogram.n_mel = 96
nets.melspectrogram.MelSpectrogram.norm = "slaney"
nets.melspectrogram.MelSpectrogram.mel_scale = "slaney"
nets.melspectrogram.MelSpectrogram.norm_std = {std}
nets.melspectrogram.MelSpectrogram.norm_mean = {mean}
nets.melspectrogram.MelSpectrogram.patch_size = {patch}
nets.melspectrogram.MelSpectrogram.stretch_factor = 1
nets.melspectrogram.MelSpectrogram.freq_mask_param = 0
nets.melspectrogram.MelSpectrogram.time_mask_param = 0
"""
    if kind == "mel":
        return (common + "build_module.representation = @nets.melspectrogram.MelSpectrogram\n"
                "modules.maskingmodel.MaskingModel.codebook_size = 8192\n"
                + mel.format(sr=16000, hop=256, std=1.268292820667291, mean=2.06755686098554, patch="(96, 4)"))
    return (common + """new_freq = 24000
build_module.representation = [@nets.melspectrogram.MelSpectrogram, @nets.waveform.Waveform]
modules.maskingmodel.MaskingModel.codebook_size = 7776
modules.maskingmodel.MaskingModel.input_representation = @nets.waveform.Waveform
modules.maskingmodel.MaskingModel.quantizer_type = "finite_scalar_quantizer"
nets.waveform.Waveform.sr = %new_freq
nets.waveform.Waveform.norm_std = 0.1908563740990311
nets.waveform.Waveform.norm_mean = 0
nets.waveform.Waveform.patch_size = (1, 960) # 40 ms
""" + mel.format(sr="%new_freq", hop=320, std=1.2249547514586288, mean=1.860820794608335, patch="(96, 3)"))


def build_reference(kind: str, folder: Path, size: dict[str, int] = TINY, seed: int | None = 0,
                    device: str = "cpu") -> nn.Module:
    """The reference MaskingModel in eval mode, its weights overwritten with noise from `seed`
    (None: as initialised); writes folder/config.gin."""
    omar_rq = import_reference()
    import gin

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.gin").write_text(upstream_gin(kind, **size))
    gin.clear_config()
    ref = omar_rq.get_model(config_file=folder / "config.gin", load_weights=False, device=device)
    return (ref if seed is None else randomize_(ref, seed)).eval()


def upstream_ckpt(ref: nn.Module) -> bytes:
    """model.ckpt as released: torch.save of a flat dict of the `net.*` and `embedding_layer.*` tensors."""
    buf = io.BytesIO()
    torch.save({k: v for k, v in ref.state_dict().items() if k.startswith(("net.", "embedding_layer."))}, buf)
    return buf.getvalue()


def ours_from(ref: nn.Module, kind: str, folder: Path, size: dict[str, int] = TINY) -> omar.OmarRQ:
    """Our model loaded from the reference's config.gin + model.ckpt through `load_upstream`."""
    (folder / "model.ckpt").write_bytes(upstream_ckpt(ref))
    ours = omar.OmarRQ(**{**ARGS[kind], **size})
    ours.load_upstream({"config.gin": folder / "config.gin", "model.ckpt": folder / "model.ckpt"})
    return ours.eval()


def audio(kind: str, seconds: float, batch: int = 2, extra: int = 0, seed: int = 0) -> torch.Tensor:
    n = int(seconds * ARGS[kind]["sample_rate"]) + extra
    return 0.1 * torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))


def reference_blocks(ref: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
    """All block outputs of the reference, (depth, B, T, D)."""
    with torch.inference_mode():
        return ref.extract_embeddings(x, layers=set(range(depth)))


def full_lengths(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), x.shape[-1])


# --------------------------------------------------------------------------------------------------
# Parity

@pytest.mark.parametrize("kind", ["mel", "waveform"])
def test_every_block_matches_the_reference(kind, tmp_path):
    ref = build_reference(kind, tmp_path)
    ours = ours_from(ref, kind, tmp_path)
    x = audio(kind, 3.0, extra=517)  # a partial last patch, dropped by both
    want = reference_blocks(ref, x, TINY["depth"])
    with torch.inference_mode():
        got = ours.forward_features(x, full_lengths(x))
    assert len(got) == ours.num_layers == TINY["depth"]
    assert want.shape[2] == int(ours.frame_lengths(torch.tensor(x.shape[-1])))
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    print(f"{kind}: rel err per block {['%.2e' % e for e in errs]}")
    assert max(errs) < TOL, errs
    # upstream's eps (embeddings per second) is our frame rate
    assert ref.eps == pytest.approx(ours.frame_rate)


@pytest.mark.parametrize("kind", ["mel", "waveform"])
def test_mixed_lengths_in_a_batch_match_each_clip_alone(kind, tmp_path):
    ref = build_reference(kind, tmp_path, seed=1)
    ours = ours_from(ref, kind, tmp_path)
    x = audio(kind, 2.0, seed=1)
    n = x.shape[-1] - 3000
    with torch.inference_mode():
        got = ours.forward_features(x, torch.tensor([x.shape[-1], n]))
    short = reference_blocks(ref, x[1:, :n], TINY["depth"])  # the second clip alone, unpadded
    T = short.shape[2]
    assert max(rel_err(g[1, :T], s[0]) for g, s in zip(got, short)) < TOL
    assert all(bool((g[1, T:] == 0).all()) for g in got)
    assert max(rel_err(g[:1], w) for g, w in zip(got, reference_blocks(ref, x[:1], TINY["depth"]))) < TOL


def test_full_size_keys_and_shapes_match_the_reference(tmp_path):
    """The released size on the meta device (no memory): upstream's 794 checkpoint keys convert to
    exactly our state dict, shape for shape. The waveform reference is built (the mel one's
    torchaudio buffers need real memory); its blocks are the mel model's, only the patch embedding differs."""
    import_reference()
    with torch.device("meta"):
        ref = build_reference("waveform", tmp_path, FULL, seed=None, device="meta")
        # Our front-ends compute their constants at build time, which meta tensors cannot; they hold
        # no parameters, and a 384-sample waveform patch has the shape of a 96 x 4 mel patch.
        models = {kind: omar.OmarRQ(input_type="waveform", patch=patch, norm_mean=None, norm_std=None)
                  for kind, patch in (("mel", 96 * 4), ("waveform", 960))}
    ref_state = {k: v for k, v in ref.state_dict().items() if k.startswith(("net.", "embedding_layer."))}
    ref_state = {k: (omar.rope_freqs(128) if k.endswith("rotary_emb.freqs") else v) for k, v in ref_state.items()}
    assert len(ref_state) == 794
    for kind, ours in models.items():
        state = dict(ref_state)
        if kind == "mel":
            state["embedding_layer.weight"] = torch.empty(1024, 96 * 4, device="meta")
        converted, own = omar.checkpoint_filter_fn(state, head_dim=128), ours.state_dict()
        assert set(converted) == set(own)
        assert all(converted[k].shape == own[k].shape for k in own)
        # upstream's 24,176,704 per block include its 64 saved rotary frequencies
        n_params = sum(p.numel() for p in ours.parameters())
        assert n_params == 24 * (24_176_704 - 64) + (394_240 if kind == "mel" else 984_064)


# --------------------------------------------------------------------------------------------------
# Through the registry and the (fake) Hub

@pytest.mark.parametrize("kind", ["mel", "waveform"])
def test_upstream_files_load_through_the_hub(kind, fake_hub, monkeypatch, tmp_path):
    from upstream_hub import load_through_hub

    ref = build_reference(kind, tmp_path, seed=2)
    files = {"config.gin": (tmp_path / "config.gin").read_bytes(), "model.ckpt": upstream_ckpt(ref)}
    first, second = load_through_hub(fake_hub, monkeypatch, NAMES[kind], files, args={**ARGS[kind], **TINY})
    x = audio(kind, 3.0, batch=1, seed=2)
    want = reference_blocks(ref, x, TINY["depth"])[:, 0]  # (L, T, D)
    for model in (first, second):
        frames = model.embed(x[0].numpy(), sr=ARGS[kind]["sample_rate"], layers="all").frames[0]
        assert rel_err(frames, want) < TOL


def test_registry_entries():
    from musicssl import registry

    for kind, name in NAMES.items():
        spec = registry.model_info(name)
        model = registry.builder(name)(**TINY)
        assert spec.family == "omar_rq" and spec.upstream and spec.noncommercial
        assert set(spec.files) == {"config.gin", "model.ckpt"}
        assert spec.frame_rate == model.frame_rate and spec.sample_rate == model.sample_rate
        assert spec.num_layers == 24 and spec.recommended_layer == 6
    # the registry's args are what upstream's configs say (base: the repo's cfg; fsq: its Waveform stats)
    defaults = {k: p.default for k, p in inspect.signature(omar.OmarRQ).parameters.items()}
    for kind, args in ARGS.items():
        from_gin = omar.args_from_gin(omar.read_gin(upstream_gin(kind, **FULL)))
        assert from_gin == {k: {**defaults, **args}[k] for k in from_gin}


# --------------------------------------------------------------------------------------------------
# Errors and the gin reader

def test_wrong_checkpoint_or_config_is_refused(tmp_path):
    ref = build_reference("waveform", tmp_path, seed=3)
    state = {k: v for k, v in ref.state_dict().items() if k.startswith(("net.", "embedding_layer."))}
    ours = omar.OmarRQ(**{**omar.MULTIFEATURE_25HZ_FSQ, **TINY})

    def load(st: dict[str, torch.Tensor], gin: str | None = None) -> str:
        torch.save(st, tmp_path / "model.ckpt")
        if gin is not None:
            (tmp_path / "config.gin").write_text(gin)
        with pytest.raises(ReleaseFormatError) as err:
            ours.load_upstream({"config.gin": tmp_path / "config.gin", "model.ckpt": tmp_path / "model.ckpt"})
        return str(err.value)

    missing = {k: v for k, v in state.items() if k != "net.layers.1.conv_block.module.3.running_var"}
    msg = load(missing)
    assert "model.ckpt" in msg and "blocks.1.conv.batch_norm.running_var" in msg
    msg = load({**state, "net.extra.weight": torch.zeros(1)})
    assert "model.ckpt" in msg and "net.extra.weight" in msg
    msg = load({**state, "net.layers.0.attention.rotary_emb.freqs": torch.ones(8)})
    assert "model.ckpt" in msg and "rotary" in msg
    msg = load(state, upstream_gin("waveform", embed_dim=64, depth=3, num_heads=4))
    assert "config.gin" in msg and "depth: config 3 vs model 2" in msg
    msg = load(state, upstream_gin("mel", **TINY))
    assert "input_type: config 'mel' vs model 'waveform'" in msg and "sample_rate" in msg
    # the training-only SSL head of a full MaskingModel state is dropped by name
    (tmp_path / "config.gin").write_text(upstream_gin("waveform", **TINY))
    torch.save({**state, "linear.weight": torch.zeros(3, 64), "linear.bias": torch.zeros(3)}, tmp_path / "model.ckpt")
    ours.load_upstream({"config.gin": tmp_path / "config.gin", "model.ckpt": tmp_path / "model.ckpt"})


def test_read_gin_syntax():
    text = """
import gin.torch.external_configurables
include 'other.gin'
rate = 24000
sizes = (1, %rate)
A.b.Conf.x = %rate  # trailing comment with a '#' and = sign
Conf.y = [@a.B, @c.D(), "s#tring"]
Conf.z = {
    "k": (1, 2),   # inside brackets
    'v': -1e-4,
}
scope/Conf.x = 5
Conf.x = 7
Conf.w = %sizes
Conf.expr = 1 + foo
"""
    b = omar.read_gin(text)
    assert b["A.b.Conf.x"] == 24000 and b["Conf.x"] == 7
    assert omar.gin_binding(b, "Conf", "x") == 7  # the later binding wins
    assert b["Conf.y"] == ["@a.B", "@c.D", "s#tring"]
    assert b["Conf.z"] == {"k": (1, 2), "v": -1e-4}
    assert b["Conf.w"] == (1, 24000)
    assert b["Conf.expr"] is omar.UNREADABLE and not any(k.startswith("scope/") for k in b)
    with pytest.raises(ReleaseFormatError, match="binds no Conformer.depth"):
        omar.args_from_gin(omar.read_gin(upstream_gin("mel", **TINY).replace("Conformer.depth", "Conformer.dpth")))
    single_waveform = upstream_gin("multifeature", **TINY).replace(
        "build_module.representation = [@nets.melspectrogram.MelSpectrogram, @nets.waveform.Waveform]",
        "build_module.representation = @nets.waveform.Waveform")
    with pytest.raises(ReleaseFormatError, match="single Waveform representation has no patch size"):  # a TypeError
        omar.args_from_gin(omar.read_gin(single_waveform))


# --------------------------------------------------------------------------------------------------
# For bench/parity_speed.py

def make_pair(full: bool) -> tuple[Callable[[torch.Tensor], Any], Callable[[torch.Tensor], Any], torch.Tensor]:
    """(ours, reference, input): the base (mel) model with the same random weights, at the released
    24 x 1024 size when `full` (else the test size); input 10 s of noise at 16 kHz, batch 1.
    Each callable returns every block output."""
    size = FULL if full else TINY
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference("mel", Path(tmp), size)
        ours = ours_from(ref, "mel", Path(tmp), size)
    x = audio("mel", 10.0, batch=1)
    depth = size["depth"]
    return (lambda wav: ours.forward_features(wav, full_lengths(wav)),
            lambda wav: ref.extract_embeddings(wav, layers=set(range(depth))), x)
