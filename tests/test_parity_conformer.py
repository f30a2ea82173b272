"""MusicFM / MuQ port (`musicssl.models.conformer`) against the upstream code in the `muq` 0.1.0 package.

MuQ's `MuQModel` is MusicFM's `MusicFM25Hz` with its configuration passed in (same modules and names,
transformers' `Wav2Vec2ConformerEncoder`), so one reference covers both registry families of files:
MusicFM's pickled `{"state_dict": {"model.…"}}` + stats json and MuQ's safetensors + config.json.

The reference is imported without `muq/__init__` (that pulls in MuLan, x_clip and torchvision) and
runs on transformers 5.x, whose conformer encoder no longer returns `hidden_states`: a shim records
them with forward hooks, giving what transformers 4.x returned (the input of block 1, the outputs of
blocks 1..depth-1, then the final LayerNorm's output).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import io
import json
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from musicssl.errors import ReleaseFormatError
from musicssl.factory import load_state_strict
from musicssl.models.conformer import MusicFM, checkpoint_filter_fn
from references import randomize_, rel_err, require, torchaudio_python_only
from upstream_hub import load_through_hub

SR = 24000
# A small network; n_mels stays 128 (upstream's mel front-end always makes 128 bands).
SMALL = dict(conv_dim=16, embed_dim=64, depth=2, num_heads=4, ffn_dim=128, kernel_size=31)
FULL = dict(conv_dim=512, embed_dim=1024, depth=12, num_heads=16, ffn_dim=4096, kernel_size=31)
# Statistics other than the MSD defaults, so the tests see that conversion reads them from the files.
STAT = {"melspec_2048_cnt": 123, "melspec_2048_mean": 3.25, "melspec_2048_std": 21.5,
        "melspec_1024_mean": 0.5, "melspec_1024_std": 19.0}


# --- the reference ----------------------------------------------------------------------------------
def muq_reference_module() -> types.ModuleType:
    """`muq.muq.muq` (MuQ, MuQConfig), imported without running `muq/__init__`."""
    torchaudio_python_only()
    if "muq" not in sys.modules:
        spec = importlib.util.find_spec("muq")
        if spec is None or not spec.submodule_search_locations:
            require("muq")  # skips with the install hint
        package = types.ModuleType("muq")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["muq"] = package
    for dep in ("transformers", "einops", "easydict"):
        require(dep)
    return importlib.import_module("muq.muq.muq")


def w2v2_config(arch: dict[str, Any]) -> dict[str, Any]:
    """facebook/wav2vec2-conformer-rope-large-960h-ft's encoder settings with `arch`'s sizes."""
    return dict(
        activation_dropout=0.1, attention_dropout=0.1, conformer_conv_dropout=0.1, hidden_dropout=0.1,
        conv_depthwise_kernel_size=arch["kernel_size"], feat_extract_activation="gelu", hidden_act="swish",
        hidden_size=1024, intermediate_size=arch["ffn_dim"], layer_norm_eps=1e-5, layerdrop=0.0,
        num_attention_heads=arch["num_heads"], num_conv_pos_embedding_groups=16, num_conv_pos_embeddings=128,
        num_hidden_layers=24, position_embeddings_type="rotary", rotary_embedding_base=10000,
    )


def muq_config(arch: dict[str, Any], stat: dict[str, Any] = STAT) -> Any:
    mm = muq_reference_module()
    w2v = {**w2v2_config(arch), "_attn_implementation": "eager"}  # transformers 5.x reads it from the config
    return mm.MuQConfig(stat=dict(stat), w2v2_config=w2v, conv_dim=arch["conv_dim"], encoder_dim=arch["embed_dim"],
                        encoder_depth=arch["depth"], codebook_size=32 if arch is SMALL else 8192)


def record_hidden_states(encoder: torch.nn.Module) -> None:
    """Make a transformers 5.x `Wav2Vec2ConformerEncoder` return `hidden_states` as 4.x did."""
    from transformers.modeling_outputs import BaseModelOutput

    original = encoder.forward

    def forward(hidden_states: torch.Tensor, attention_mask: Any = None, output_hidden_states: bool = False,
                **kwargs: Any) -> Any:
        seen: list[torch.Tensor] = []
        hooks = [encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
        hooks += [layer.register_forward_hook(lambda m, args, out: seen.append(out)) for layer in encoder.layers[:-1]]
        try:
            out = original(hidden_states, attention_mask=attention_mask, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        return BaseModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=(*seen, out.last_hidden_state))

    encoder.forward = forward


def build_reference(arch: dict[str, Any] = SMALL, seed: int = 0, stat: dict[str, Any] = STAT) -> torch.nn.Module:
    """Upstream MuQ with every parameter and BN statistic randomised, eval mode, hidden states restored."""
    mm = muq_reference_module()
    ref = mm.MuQ(muq_config(arch, stat))
    randomize_(ref, seed)
    record_hidden_states(ref.model.conformer)
    return ref.eval()


def reference_states(ref: torch.nn.Module, wav: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(ref(wav, output_hidden_states=True).hidden_states)


def ours_from(ref: torch.nn.Module, arch: dict[str, Any] = SMALL, stat: dict[str, Any] = STAT) -> MusicFM:
    ours = MusicFM(**arch, norm_mean=stat["melspec_2048_mean"], norm_std=stat["melspec_2048_std"])
    state = checkpoint_filter_fn(ref.state_dict(), stat["melspec_2048_mean"], stat["melspec_2048_std"])
    load_state_strict(ours, state, where="reference")
    return ours.eval()


def noise(seconds: float, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, int(seconds * SR), generator=gen)


# --- upstream file formats --------------------------------------------------------------------------
def musicfm_checkpoint_bytes(ref: torch.nn.Module) -> bytes:
    """A `pretrained_*.pt` as MusicFM's Hub files are laid out: {"state_dict": {"model.<key>": tensor}}
    with MusicFM's own entries (torchaudio's mel window and filterbank, the quantizer named `…_0`,
    the pos-conv weight norm in its `weight_g`/`weight_v` form) and a `set` elsewhere in the pickle."""
    ta = torchaudio_python_only()
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    mel = ta.transforms.MelSpectrogram(sample_rate=SR, n_fft=2048, hop_length=240, n_mels=128).state_dict()
    state["model.preprocessor_melspec_2048.mel_stft.spectrogram.window"] = mel["spectrogram.window"]
    state["model.preprocessor_melspec_2048.mel_stft.mel_scale.fb"] = mel["mel_scale.fb"]
    for key, value in ref.state_dict().items():
        key = key.replace("model.quantizer_melspec_2048.", "model.quantizer_melspec_2048_0.")
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        state[key] = value.clone()
    buf = io.BytesIO()
    torch.save({"state_dict": state, "hyper_parameters": {"features": {"melspec_2048"}}}, buf)
    return buf.getvalue()


def muq_files(ref: torch.nn.Module, cfg: Any) -> dict[str, bytes]:
    """MuQ's Hub layout: config.json (the MuQConfig fields) + model.safetensors (keys `model.…`)."""
    from safetensors.torch import save

    config = dataclasses.asdict(cfg)
    config["w2v2_config"] = {k: v for k, v in config["w2v2_config"].items() if k != "_attn_implementation"}
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": save(state)}


# --- tests ------------------------------------------------------------------------------------------
def test_every_hidden_state_matches_the_reference():
    ref = build_reference()
    ours = ours_from(ref)
    wav = noise(3.0, batch=2)
    expected = reference_states(ref, wav)
    with torch.no_grad():
        got = ours.forward_features(wav, torch.full((2,), wav.shape[-1]))
    assert len(got) == len(expected) == SMALL["depth"] + 1 == ours.num_layers
    errs = [rel_err(g, e) for g, e in zip(got, expected)]
    assert max(errs) < 1e-5, errs
    assert got[0].shape == (2, 75, SMALL["embed_dim"])  # 3 s -> 300 mel frames -> 75 tokens (25 Hz)


def test_frame_count_and_batching_of_unequal_lengths():
    ref = build_reference(seed=1)
    ours = ours_from(ref)
    wav = noise(2.0, batch=2, seed=1)
    lengths = torch.tensor([wav.shape[-1], 30001])
    with torch.no_grad():
        batched = ours.forward_features(wav, lengths)
        alone = ours.forward_features(wav[1:, :30001], lengths[1:])
        expected = reference_states(ref, wav[1:, :30001])
    n = int(ours.frame_lengths(lengths[1:]))
    assert n == alone[0].shape[1] == expected[0].shape[1] == 32  # 30001 // 240 = 125 mel frames -> 32
    for b, a, e in zip(batched, alone, expected):
        torch.testing.assert_close(b[1, :n], a[0], rtol=0, atol=1e-6)
        assert rel_err(a[0], e[0]) < 1e-5
        assert bool((b[1, n:] == 0).all())
    # Clips too short for the reflect-padded STFT still give their frames.
    for s in (100, 1024, 1200):
        with torch.no_grad():
            out = ours.forward_features(torch.zeros(1, s), torch.tensor([s]))
        assert out[0].shape[1] == int(ours.frame_lengths(torch.tensor(s)))


def test_full_size_names_and_shapes_match_upstream(monkeypatch):
    """The released size, built on the meta device (no memory): upstream's key table through the filter
    equals ours, names and shapes; 316,343,296 parameters on the encoder path."""
    mm = muq_reference_module()
    # MuQ's mel front-end is a plain object outside the state dict whose torchaudio filterbank cannot
    # be built on `meta`; it is not needed for the key table.
    monkeypatch.setattr(sys.modules["muq.muq.models.muq_model"], "MelSTFT", lambda **_: None)
    with torch.device("meta"):
        ref = mm.MuQ(muq_config(FULL, STAT))
        ours = MusicFM(**FULL)
    upstream = ref.state_dict()
    # MuQ's file holds 463 tensors; MusicFM's 465 (its mel window and filterbank are module buffers).
    assert len(upstream) == 463 and len(ours.state_dict()) == 456  # 454 weights + norm.mean, norm.std
    state = checkpoint_filter_fn(upstream, 1.0, 2.0)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 316_343_296
    assert ours.num_layers == 13 and ours.frame_rate == 25.0


def test_musicfm_msd_through_the_hub(fake_hub, monkeypatch):
    ref = build_reference(seed=2)
    files = {"pretrained_msd.pt": musicfm_checkpoint_bytes(ref), "msd_stats.json": json.dumps(STAT).encode()}
    first, second = load_through_hub(fake_hub, monkeypatch, "musicfm-msd", files=files, args=dict(SMALL))
    wav = noise(3.0, seed=2)
    expected = torch.stack(reference_states(ref, wav), dim=1)  # (B, L, T, D)
    for model in (first, second):
        out = model.embed(wav[0].numpy(), sr=SR, layers="all")
        assert rel_err(out.frames, expected) < 1e-5
        assert float(model.norm.mean) == STAT["melspec_2048_mean"] and float(model.norm.std) == STAT["melspec_2048_std"]
    assert second.args["norm_mean"] == STAT["melspec_2048_mean"]


def test_muq_msd_through_the_hub(fake_hub, monkeypatch):
    stat = {"melspec_2048_cnt": 9, "melspec_2048_mean": -1.5, "melspec_2048_std": 12.0}
    ref = build_reference(seed=3, stat=stat)
    files = muq_files(ref, muq_config(SMALL, stat))
    first, second = load_through_hub(fake_hub, monkeypatch, "muq-msd", files=files, args=dict(SMALL))
    wav = noise(3.0, seed=3)
    with torch.no_grad():
        expected = ref(wav).last_hidden_state
    for model in (first, second):
        assert rel_err(model.embed(wav[0].numpy(), sr=SR).frames, expected) < 1e-5  # layers="last"


def _write(tmp_path: Path, files: dict[str, bytes]) -> dict[str, Path]:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def _resave(ckpt: bytes, change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    obj = torch.load(io.BytesIO(ckpt), weights_only=True)
    change(obj["state_dict"])
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_bad_upstream_files_give_clear_errors(tmp_path):
    ref = build_reference(seed=4)
    ckpt = musicfm_checkpoint_bytes(ref)
    stats = json.dumps(STAT).encode()

    def load(files: dict[str, bytes]) -> None:
        MusicFM(**SMALL).load_upstream(_write(tmp_path, files))

    extra = _resave(ckpt, lambda s: s.__setitem__("model.mystery.weight", torch.zeros(3)))
    with pytest.raises(ReleaseFormatError, match=r"pretrained_msd\.pt.*mystery\.weight"):
        load({"pretrained_msd.pt": extra, "msd_stats.json": stats})
    missing = _resave(ckpt, lambda s: s.pop("model.conformer.layers.1.final_layer_norm.bias"))
    with pytest.raises(ReleaseFormatError, match=r"pretrained_msd\.pt.*missing.*layers\.1\.final_layer_norm\.bias"):
        load({"pretrained_msd.pt": missing, "msd_stats.json": stats})
    with pytest.raises(ReleaseFormatError, match=r"msd_stats\.json.*melspec_2048_mean"):
        load({"pretrained_msd.pt": ckpt, "msd_stats.json": json.dumps({"melspec_1024_mean": 1.0}).encode()})
    with pytest.raises(ReleaseFormatError, match="state_dict"):
        buf = io.BytesIO()
        torch.save({"model": {}}, buf)
        load({"pretrained_msd.pt": buf.getvalue(), "msd_stats.json": stats})

    files = muq_files(ref, muq_config(SMALL))
    config = json.loads(files["config.json"])
    config["encoder_depth"] = 3
    with pytest.raises(ReleaseFormatError, match=r"config\.json.*encoder_depth"):
        MusicFM(**SMALL).load_upstream(_write(tmp_path, {**files, "config.json": json.dumps(config).encode()}))


# --- for bench/parity_speed.py ----------------------------------------------------------------------
def make_pair(full: bool) -> tuple[Callable[[torch.Tensor], Any], Callable[[torch.Tensor], Any], torch.Tensor]:
    """(ours, reference, input): the same random weights; full=True is the released 12x1024 size (10 s
    of audio), else the test's small size (3 s). Both return all hidden states."""
    arch = FULL if full else SMALL
    ref = build_reference(arch, seed=0)
    ours = ours_from(ref, arch)
    wav = noise(10.0 if full else 3.0)
    lengths = torch.full((wav.shape[0],), wav.shape[-1])

    def run_ours(x: torch.Tensor) -> list[torch.Tensor]:
        return ours.forward_features(x, lengths)

    def run_ref(x: torch.Tensor) -> Any:
        return ref(x, output_hidden_states=True).hidden_states

    return run_ours, run_ref, wav


if __name__ == "__main__":  # print the relative error of every hidden state
    ours_fn, ref_fn, x = make_pair(full="--full" in sys.argv)
    with torch.no_grad():
        for i, (o, r) in enumerate(zip(ours_fn(x), ref_fn(x))):
            print(f"hidden_states[{i}]: rel err {rel_err(o, r):.3e}")


@pytest.mark.parametrize("make", [
    lambda: (torch.nn.Conv2d(3, 8, 3, stride=(2, 2), padding=1), torch.nn.BatchNorm2d(8), (2, 3, 16, 20)),
    lambda: (torch.nn.Conv1d(8, 8, 31, padding=15, groups=8, bias=False), torch.nn.BatchNorm1d(8), (2, 8, 50)),
    lambda: (torch.nn.Conv1d(4, 6, 3), torch.nn.BatchNorm1d(6, affine=False), (1, 4, 9)),
])
def test_conv_bn_folds_the_norm_at_inference(make):
    """conv_bn (the Res2d blocks' and the conv module's conv + BatchNorm): at inference one conv with
    the norm in its weights, equal to the two steps; in training the norm still sees its batch."""
    from musicssl.models.layers import conv_bn

    torch.manual_seed(0)
    conv, bn, shape = make()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3.0)
    if bn.affine:
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(shape)
    conv.eval(), bn.eval()
    plain = bn(conv(x)).detach()
    with torch.inference_mode():
        torch.testing.assert_close(conv_bn(conv, bn, x), plain, rtol=1e-5, atol=1e-5)
        conv.to(torch.bfloat16), bn.to(torch.bfloat16)
        folded = conv_bn(conv, bn, x.bfloat16()).float()
        assert rel_err(folded, plain) < 2e-2
    conv.float(), bn.float()
    bn.train()
    torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)))  # batch statistics, as training needs
