"""The hubert family (MERT-v1) against transformers' HubertModel with MERT's settings.

MERT's own code is Hugging Face remote code on top of transformers' HuBERT classes (and breaks on
transformers >= 4.48), so the reference is `HubertModel(HubertConfig(...))` with the values of MERT's
config.json: bias-free convs, "group" feature-extractor norm, LayerNorm in the feature projection,
a 128-tap positional conv in 16 groups, exact GELU; post-LN for 95M, stable (pre-) LN for 330M.
Its input is made by transformers' own Wav2Vec2FeatureExtractor (do_normalize), as MERT's
preprocessor_config.json asks. Small widths keep the file fast; the released sizes are checked by
their state-dict layout on the meta device.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from musicssl.errors import ReleaseFormatError
from musicssl.models.hubert import ARGS_95M, ARGS_330M, HuBERT, checkpoint_filter_fn
from references import randomize_, rel_err, require, torchaudio_python_only
from upstream_hub import load_through_hub

SR = 24000
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=128, conv_dim=[32] * 7)
SMALL_95M = {**SMALL, "stable_layer_norm": False}
SMALL_330M = {**SMALL, "stable_layer_norm": True}
TOL = 1e-5
POS = "encoder.pos_conv_embed.conv."


def import_transformers() -> Any:
    """transformers, which imports torchaudio when installed (for audio utilities it never uses here):
    make that import work without torchaudio's compiled extension first."""
    require("transformers")
    torchaudio_python_only()
    return require("transformers")


def hubert_config(args: dict[str, Any], attn: str | None = "eager") -> Any:
    """transformers' HubertConfig with MERT's config.json values, at the size of our `args`."""
    transformers = import_transformers()
    kwargs = dict(attn_implementation=attn) if attn else {}
    return transformers.HubertConfig(
        hidden_size=args["hidden_size"], num_hidden_layers=args["num_hidden_layers"],
        num_attention_heads=args["num_heads"], intermediate_size=args["intermediate_size"],
        conv_dim=list(args.get("conv_dim", [512] * 7)), conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=False, feat_extract_norm="group",
        feat_extract_activation="gelu", hidden_act="gelu", feat_proj_layer_norm=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, conv_pos_batch_norm=False,
        do_stable_layer_norm=args["stable_layer_norm"], layer_norm_eps=1e-5,
        mask_time_prob=0.05,  # > 0, so the model holds `masked_spec_embed` like MERT's file
        **kwargs,
    )


def make_reference(args: dict[str, Any], seed: int = 0, attn: str | None = "eager", scale: float = 0.2) -> nn.Module:
    """A randomly initialised transformers HubertModel in eval mode. Scale 0.2 keeps activations
    O(1) through the bias-free conv stack and gives attention non-uniform weights."""
    transformers = import_transformers()
    torch.manual_seed(seed)
    ref = transformers.HubertModel(hubert_config(args, attn)).eval()
    return randomize_(ref, seed=seed, scale=scale)


def convert(ref: nn.Module, args: dict[str, Any]) -> HuBERT:
    from musicssl.factory import load_state_strict

    ours = HuBERT(**args).eval()
    load_state_strict(ours, checkpoint_filter_fn(ref.state_dict()), where="reference")
    return ours


def reference_states(ref: nn.Module, wav: np.ndarray) -> list[torch.Tensor]:
    """Every hidden state of the reference in MERT's convention, for one clip, via the HF preprocessor."""
    transformers = import_transformers()
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0,
                                               do_normalize=True, return_attention_mask=True)
    inputs = fe(wav, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        out = ref(**inputs, output_hidden_states=True)
    states = list(out.hidden_states)
    assert len(states) == ref.config.num_hidden_layers + 1
    if ref.config.do_stable_layer_norm:
        # transformers 5 returns the last layer's output before the final LayerNorm; MERT's code
        # (transformers 4.x) returned it after, as `last_hidden_state` is.
        torch.testing.assert_close(ref.encoder.layer_norm(states[-1]), out.last_hidden_state)
        states[-1] = out.last_hidden_state
    return [s[0] for s in states]


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise plus a tone, with a DC offset and a gain, so the standardisation matters."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * rng.standard_normal(len(t)) + 0.5 * np.sin(2 * np.pi * 220 * t) + 0.2
    return (0.7 * x).astype(np.float32)


def states_of(ours: HuBERT, wav: np.ndarray) -> list[torch.Tensor]:
    x = torch.from_numpy(wav)[None]
    with torch.no_grad():
        return [h[0] for h in ours.forward_features(x, torch.tensor([x.shape[-1]]))]


def to_weight_g_v(state: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The same state dict with the old nn.utils.weight_norm spelling (what MERT's 2023 file uses)."""
    names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        for new, old in names.items():
            k = k.replace(new, old)
        out[k] = v
    return out


# --- parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [SMALL_95M, SMALL_330M], ids=["post-ln-95m", "pre-ln-330m"])
def test_every_hidden_state_matches_the_reference(args):
    ref = make_reference(args)
    ours = convert(ref, args)
    wav = clip(2.0)  # 149 frames: wider than the 128-tap positional conv
    expected = reference_states(ref, wav)
    got = states_of(ours, wav)
    assert len(got) == len(expected) == args["num_hidden_layers"] + 1 == ours.num_layers
    errs = [rel_err(g, e) for g, e in zip(got, expected)]
    assert max(errs) < TOL, errs
    assert expected[-1].std() > 0.1  # the comparison is not between near-zero tensors


def test_batched_windows_of_different_lengths_give_their_unbatched_states():
    ref = make_reference(SMALL_95M, seed=1)
    ours = convert(ref, SMALL_95M)
    long, short = clip(2.0, seed=1), clip(1.3, seed=2)
    batch = torch.from_numpy(np.stack([long, np.pad(short, (0, len(long) - len(short)))]))
    batch[1, len(short):] = 5.0  # whatever lies past the length must not matter
    with torch.no_grad():
        hidden = ours.forward_features(batch, torch.tensor([len(long), len(short)]))
    n_short = int(ours.frame_lengths(torch.tensor(len(short))))
    for i, (wav, n) in enumerate([(long, hidden[0].shape[1]), (short, n_short)]):
        expected = reference_states(ref, wav)
        errs = [rel_err(h[i, :n], e) for h, e in zip(hidden, expected)]
        assert max(errs) < TOL, (i, errs)
    assert all(float(h[1, n_short:].abs().max()) == 0.0 for h in hidden)


def test_frame_count_and_timestamps():
    ref = make_reference(SMALL_95M)
    ours = HuBERT(**SMALL_95M)
    lengths = torch.arange(400, 20000, 37)
    assert torch.equal(ours.frame_lengths(lengths), ref._get_feat_extract_output_lengths(lengths))
    assert (ours.hop_length, ours.receptive_field, ours.frame_rate) == (320, 400, 75.0)
    assert int(ours.frame_lengths(torch.tensor(5 * SR))) == 374  # 5 s gives 374 frames, not 375
    emb = ours.eval().embed(clip(1.0), sr=SR)
    assert emb.frames.shape[1] == 74
    # Frame t sees samples [320 t, 320 t + 400): its centre is sample 320 t + 199.5.
    torch.testing.assert_close(emb.timestamps[:2], torch.tensor([199.5, 519.5]) / SR)


def test_clips_shorter_than_the_receptive_field_give_one_frame():
    ours = HuBERT(**SMALL_95M).eval()
    emb = ours.embed(clip(300 / SR), sr=SR, layers="all")
    assert emb.frames.shape == (1, 3, 1, 64) and int(emb.lengths[0]) == 1
    assert torch.isfinite(emb.frames).all()


def test_long_audio_is_cut_into_windows_on_the_frame_grid():
    ours = HuBERT(**SMALL_95M, context_seconds=1.0, overlap_seconds=0.5).eval()
    wav = clip(3.1, seed=4)[:-7]
    emb = ours.embed(wav, sr=SR, layers="all")
    assert int(emb.lengths[0]) == emb.frames.shape[2] == int(ours.frame_lengths(torch.tensor(len(wav))))
    W, step, trim = ours.window_plan()
    for k in (0, 1):  # frames kept from window k are that window's own frames, shifted onto the global grid
        own = torch.stack(states_of(ours, wav[k * step : k * step + W]))
        lo, hi = (0, trim) if k == 0 else (trim, trim + step // ours.hop_length)
        g0 = k * step // ours.hop_length
        torch.testing.assert_close(emb.frames[0, :, g0 + lo : g0 + hi], own[:, lo:hi])


def test_overlap_must_cover_the_receptive_field():
    with pytest.raises(ValueError, match="receptive field"):
        HuBERT(**SMALL_95M, overlap_seconds=0.01)


# --- checkpoint conversion --------------------------------------------------------------------
def mert_bin_layout(hidden: int, layers: int, conv: int = 512) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of MERT's pytorch_model.bin (research notes, issue 4, section 1)."""
    lay: dict[str, tuple[int, ...]] = {"masked_spec_embed": (hidden,)}

    def affine(prefix: str, n: int) -> None:
        lay[prefix + "weight"], lay[prefix + "bias"] = (n,), (n,)

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        lay[prefix + "weight"], lay[prefix + "bias"] = (n_out, n_in), (n_out,)

    for i, k in enumerate((10, 3, 3, 3, 3, 2, 2)):
        lay[f"feature_extractor.conv_layers.{i}.conv.weight"] = (conv, 1 if i == 0 else conv, k)
    affine("feature_extractor.conv_layers.0.layer_norm.", conv)  # the GroupNorm
    affine("feature_projection.layer_norm.", conv)
    linear("feature_projection.projection.", hidden, conv)
    lay[POS + "weight_g"], lay[POS + "weight_v"] = (1, 1, 128), (hidden, hidden // 16, 128)  # weight norm, dim=2
    lay[POS + "bias"] = (hidden,)
    affine("encoder.layer_norm.", hidden)
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            linear(f"{p}attention.{proj}_proj.", hidden, hidden)
        affine(p + "layer_norm.", hidden)
        affine(p + "final_layer_norm.", hidden)
        linear(p + "feed_forward.intermediate_dense.", 4 * hidden, hidden)
        linear(p + "feed_forward.output_dense.", hidden, 4 * hidden)
    return lay


@pytest.mark.parametrize("args, n_params", [(ARGS_95M, 94_371_712), (ARGS_330M, 315_428_992)], ids=["95m", "330m"])
def test_released_sizes_have_merts_state_dict_layout(args, n_params):
    transformers = import_transformers()
    with torch.device("meta"):
        ref_state = transformers.HubertModel(hubert_config(args, attn=None)).state_dict()
        ours = HuBERT(**args)
    upstream = {k: tuple(v.shape) for k, v in to_weight_g_v(ref_state).items()}
    assert upstream == mert_bin_layout(args["hidden_size"], args["num_hidden_layers"])
    assert sum(int(np.prod(s)) for s in upstream.values()) == n_params  # the file sizes upstream publishes
    converted = {k: tuple(v.shape) for k, v in checkpoint_filter_fn(to_weight_g_v(ref_state)).items()}
    assert converted == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours.num_layers == args["num_hidden_layers"] + 1


def test_weight_norm_folds_from_both_spellings():
    ref = make_reference(SMALL_95M)
    state = ref.state_dict()
    assert POS + "parametrizations.weight.original0" in state  # what transformers 5 writes
    new, old = checkpoint_filter_fn(state), checkpoint_filter_fn(to_weight_g_v(state))
    assert POS + "weight" in new and "masked_spec_embed" not in new
    assert torch.equal(new[POS + "weight"], old[POS + "weight"])
    assert rel_err(new[POS + "weight"], ref.encoder.pos_conv_embed.conv.weight) < 1e-6


def save(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("encoder.layers.1.attention.q_proj.bias"), ["missing", "encoder.layers.1.attention.q_proj.bias"]),
    (lambda s: s.__setitem__("label_embs_concat", torch.zeros(3, 4)), ["unexpected", "label_embs_concat"]),
    (lambda s: s.pop(POS + "weight_g"), ["weight-norm", POS]),
], ids=["missing", "extra", "no-weight-norm"])
def test_a_checkpoint_that_does_not_fit_names_the_file(tmp_path, edit, words):
    state = to_weight_g_v(make_reference(SMALL_95M).state_dict())
    edit(state)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(save(state))
    with pytest.raises(ReleaseFormatError) as err:
        HuBERT(**SMALL_95M).load_upstream({"pytorch_model.bin": path})
    assert all(w in str(err.value) for w in [str(path), *words]), str(err.value)


# --- `musicssl convert` of files a user holds -----------------------------------------------------
@pytest.fixture()
def small_mert(monkeypatch: pytest.MonkeyPatch) -> None:
    """mert-v1-95m's registry entry at SMALL_95M's size (its pin stays the released file's)."""
    import dataclasses

    from musicssl import registry

    spec, build = registry._lookup("mert-v1-95m")
    monkeypatch.setitem(registry._MODELS, "mert-v1-95m", (dataclasses.replace(spec, args=dict(SMALL_95M)), build))
    monkeypatch.setenv("MUSICSSL_CACHE", "/nonexistent-musicssl-cache")  # convert reads nothing cached


@pytest.mark.parametrize("wrap", ["plain", "lightning", "ddp", "fine-tuned"])
def test_convert_reads_wrapped_and_fine_tuned_checkpoints_and_says_they_are_not_the_pinned_file(
    tmp_path, small_mert, caplog, wrap
):
    """Training code nests the state dict, DDP prefixes it, transformers' HubertFor... models hold it
    under "hubert." beside a head: the encoder is taken from each. None is the file the registry
    pins, so each converts with a warning and a release that says so."""
    import json

    from musicssl import convert

    ref = make_reference(SMALL_95M, seed=4)
    state = ref.state_dict()
    state = {"plain": state, "lightning": {"state_dict": state, "epoch": 3}, "ddp": {"module." + k: v for k, v in state.items()},
             "fine-tuned": {**{"hubert." + k: v for k, v in state.items()}, "classifier.weight": torch.zeros(2, 64)}}[wrap]
    path = tmp_path / "my-mert.bin"
    path.write_bytes(save(state))
    with caplog.at_level("WARNING"):
        spec, folder = convert.convert_local("mert-v1-95m", [path], tmp_path / "out")
    assert "is not the pytorch_model.bin that mert-v1-95m pins" in caplog.text
    assert ("dropping ['classifier']" in caplog.text) == (wrap == "fine-tuned")
    assert json.loads((folder / "config.json").read_text())["provenance"]["pinned"] is False
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "**Other weights.**" in card.split("\n---\n", 1)[1][:200]
    import musicssl

    wav = clip(1.0, seed=5)
    got = musicssl.load(folder).embed(wav, sr=SR, layers="all").frames[0]
    assert rel_err(got, torch.stack(reference_states(ref, wav))) < TOL


def test_convert_names_what_does_not_fit(tmp_path, small_mert):
    from musicssl import convert

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(save(make_reference({**SMALL_95M, "hidden_size": 32}).state_dict()))  # another width
    with pytest.raises(ReleaseFormatError) as err:
        convert.convert_local("mert-v1-95m", [path], tmp_path / "out")
    said = str(err.value)
    assert "of another shape (e.g." in said and "the file's" in said and len(said) < 2000, said
    shards = [tmp_path / "pytorch_model-00001-of-00002.bin", tmp_path / "pytorch_model.bin.index.json"]
    for shard in shards:
        shard.write_bytes(b"{}")
    with pytest.raises(ReleaseFormatError, match="sharded checkpoint .* merge it"):
        convert.convert_local("mert-v1-95m", shards, tmp_path / "out")


# --- through the (fake) Hub ---------------------------------------------------------------------
@pytest.mark.parametrize("name, args, spelling", [
    ("mert-v1-95m", SMALL_95M, "weight_g/weight_v"),
    ("mert-v1-330m", SMALL_330M, "parametrizations"),
])
def test_registry_name_loads_merts_file_from_the_hub(fake_hub, monkeypatch, name, args, spelling):
    ref = make_reference(args, seed=2)
    state = ref.state_dict()
    if spelling == "weight_g/weight_v":
        state = to_weight_g_v(state)
    first, second = load_through_hub(fake_hub, monkeypatch, name, {"pytorch_model.bin": save(state)}, args=args)
    wav = clip(1.5, seed=3)
    expected = torch.stack(reference_states(ref, wav))  # (L, T, D)
    emb = first.embed(wav, sr=SR, layers="all")
    assert emb.frames.shape == (1, *expected.shape)
    assert rel_err(emb.frames[0], expected) < TOL
    torch.testing.assert_close(second.embed(wav, sr=SR, layers="all").frames, emb.frames, rtol=0, atol=0)
    assert first.spec.license == "CC-BY-NC-4.0" and first.spec.noncommercial
    from musicssl import convert, registry

    # A sha256 per file pins it: no first download is recorded (its commit would be pinned too).
    assert not (convert.converted_folder(registry.model_info(name)).parent / convert.FIRST_FETCH).exists()


def test_an_unpinned_port_keeps_its_first_download_when_the_branch_moves(fake_hub, monkeypatch):
    """Where the registry pins neither commit nor sha256, the first download's are recorded: a
    conversion made again later (its cached copy removed) takes the same files, not the branch's
    newer ones, until the record is removed too."""
    import dataclasses
    import shutil

    import musicssl
    from musicssl import convert, registry

    spec, build = registry._lookup("mert-v1-95m")
    spec = dataclasses.replace(spec, revision=None, files={"pytorch_model.bin": None}, args=dict(SMALL_95M))
    monkeypatch.setitem(registry._MODELS, "mert-v1-95m", (spec, build))
    first, later = make_reference(SMALL_95M, seed=6), make_reference(SMALL_95M, seed=7)
    fake_hub.add_repo("m-a-p/MERT-v1-95M", {"pytorch_model.bin": save(first.state_dict())})
    wav = clip(1.0, seed=8)

    def matches(ref: nn.Module) -> bool:
        got = musicssl.load("mert-v1-95m").embed(wav, sr=SR, layers="all").frames[0]
        return rel_err(got, torch.stack(reference_states(ref, wav))) < TOL

    assert matches(first)
    fake_hub.move_ref("m-a-p/MERT-v1-95M", {"pytorch_model.bin": save(later.state_dict())})
    shutil.rmtree(convert.converted_folder(spec))
    assert matches(first)
    (convert.converted_folder(spec).parent / convert.FIRST_FETCH).unlink()
    shutil.rmtree(convert.converted_folder(spec))
    assert matches(later)


# --- for bench/parity_speed.py ------------------------------------------------------------------
class _Ours(nn.Module):
    def __init__(self, model: HuBERT) -> None:
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor) -> list[torch.Tensor]:
        lengths = torch.full((wav.shape[0],), wav.shape[-1], device=wav.device)
        return self.model.forward_features(wav, lengths)


class _Reference(nn.Module):
    """HubertModel with the HF preprocessor's standardisation written in torch (unpadded input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, var = wav.mean(-1, keepdim=True), wav.var(-1, unbiased=False, keepdim=True)
        return self.model((wav - mean) / torch.sqrt(var + 1e-7), output_hidden_states=True).hidden_states


def make_pair(full: bool) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(ours, reference, input): MERT-v1-95M (`full`) or the small test size, the same random weights
    in both; each module maps wav (B, S) at 24 kHz to its hidden states. The reference runs with
    transformers' default attention. Input: one 10 s clip (2 s when not `full`)."""
    args = ARGS_95M if full else SMALL_95M
    # Scale 0.05 at 768-d keeps activations O(1), as 0.2 does at the test width; 0.2 at 768-d makes
    # attention near-argmax, where float32 rounding grows ~10x per layer in any implementation.
    ref = make_reference(args, attn=None, scale=0.05 if full else 0.2)
    ours = convert(ref, args)
    wav = torch.from_numpy(clip(10.0 if full else 2.0))[None]
    return _Ours(ours).eval(), _Reference(ref).eval(), wav


def test_first_conv_norm_folded_into_the_weights_matches_group_norm() -> None:
    """Inference folds the first layer's per-channel norm into the conv (statistics from the
    covariance of the input frames); it equals conv -> GroupNorm over each item's valid frames, also
    for a silent item, a two-frame item and a loud offset one."""
    from musicssl.models.hubert import ConvLayer

    torch.manual_seed(0)
    layer = ConvLayer(1, 16, 10, 5, bias=True, norm=True).double()
    nn.init.normal_(layer.layer_norm.weight)
    nn.init.normal_(layer.layer_norm.bias)
    x = torch.randn(4, 1, 4000, dtype=torch.float64) * torch.tensor([1.0, 0.0, 5.0, 0.01])[:, None, None]
    x[2] += 3.0
    for n_valid in (None, torch.tensor([799, 300, 2, 799])):
        with torch.enable_grad():  # training takes the plain path: conv, then the norm
            expected = layer(x, n_valid).detach()
        with torch.no_grad():
            folded = layer(x, n_valid)
        torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
