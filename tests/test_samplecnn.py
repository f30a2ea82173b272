"""SampleCNN (the CLMR backbone): segment = frame, layer widths, batch invariance, release round trip,
and the CLMR checkpoint filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import musicssl
from musicssl.models.samplecnn import CLMR_CHANNELS, SampleCNN, checkpoint_filter_fn

SEG = 3**10  # 59049 samples, 2.68 s at 22.05 kHz
SR = 22050


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return musicssl.load("clmr-samplecnn", pretrained=False)


def features(enc, wav, lengths=None):
    if lengths is None:
        lengths = torch.full((wav.shape[0],), wav.shape[-1])
    with torch.inference_mode():
        return enc.forward_features(wav, lengths)


def test_architecture_matches_clmr(enc):
    assert (enc.sample_rate, enc.hop_length, enc.embed_dim, enc.num_layers) == (SR, SEG, 512, 2)
    assert enc.context_seconds == pytest.approx(SEG / SR) and enc.overlap_seconds == 0
    assert enc.frame_rate == pytest.approx(SR / SEG)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [c.out_channels for c in convs] == [128, *CLMR_CHANNELS, 512]
    assert all(c.kernel_size == (3,) for c in convs) and convs[0].stride == (3,)
    # 2,368,512 parameters; CLMR's ~2.4-2.5M adds its 512 x 50 tagging fc, which is not the encoder.
    n_params = sum(p.numel() for p in enc.parameters())
    assert n_params == 2_368_512


def test_one_segment_gives_one_frame_per_layer(enc):
    hidden = features(enc, 0.1 * torch.randn(2, SEG))
    assert len(hidden) == enc.num_layers
    assert all(h.shape == (2, 1, 512) for h in hidden)
    assert all(torch.isfinite(h).all() and h.abs().sum() > 0 for h in hidden)


def test_partial_last_segment_is_zero_padded(enc):
    S = 2 * SEG + 5
    assert enc.frame_lengths(torch.tensor([S, SEG, SEG + 1, 1])).tolist() == [3, 1, 2, 1]
    x = 0.1 * torch.randn(1, S)
    hidden = features(enc, x)
    assert all(h.shape == (1, 3, 512) for h in hidden)
    tail = torch.zeros(1, SEG)
    tail[0, :5] = x[0, 2 * SEG :]
    torch.testing.assert_close(hidden[-1][:, 2], features(enc, tail)[-1][:, 0])


def test_segments_are_independent(enc):
    """A frame sees only its own segment: changing segment 1 changes frame 1 alone."""
    x = 0.1 * torch.randn(1, 3 * SEG)
    y = x.clone()
    y[0, SEG : 2 * SEG] = 0.1 * torch.randn(SEG)
    a, b = features(enc, x)[-1], features(enc, y)[-1]
    torch.testing.assert_close(a[:, [0, 2]], b[:, [0, 2]])
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_batch_invariance_and_padding_content(enc):
    a, b = 0.1 * torch.randn(2 * SEG + 1000), 0.1 * torch.randn(SEG // 2)
    batch = torch.zeros(2, len(a))
    batch[0], batch[1, : len(b)] = a, b
    batch[1, len(b) :] = 5.0  # garbage past the length must not matter
    together = features(enc, batch, torch.tensor([len(a), len(b)]))
    for layer, h in enumerate(together):
        torch.testing.assert_close(h[0], features(enc, a[None])[layer][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h[1, :1], features(enc, b[None])[layer][0], rtol=1e-5, atol=1e-5)
        assert (h[1, 1:] == 0).all()


def test_embed_timestamps_are_segment_centres(enc):
    x = (0.1 * np.random.default_rng(0).standard_normal(2 * SEG + 5)).astype(np.float32)
    out = enc.embed(x, sr=SR, layers="all")
    assert out.frames.shape == (1, 2, 3, 512) and out.lengths.tolist() == [3]
    torch.testing.assert_close(out.timestamps, torch.tensor([0.5, 1.5, 2.5]) * SEG / SR)
    with torch.inference_mode():
        whole = enc.forward_features(torch.from_numpy(x)[None], torch.tensor([len(x)]))
    for layer in range(2):
        torch.testing.assert_close(out.frames[0, layer], whole[layer][0], rtol=1e-5, atol=1e-5)


def test_forward_clip(enc):
    x = 0.1 * torch.randn(2, 2 * SEG)
    with torch.inference_mode():
        clip = enc.forward_clip(x, torch.tensor([2 * SEG, SEG]))
        last = enc.forward_features(x, torch.tensor([2 * SEG, 2 * SEG]))[-1]
        assert clip.shape == (2, 512)
        torch.testing.assert_close(clip[0], last[0].mean(0))
        torch.testing.assert_close(clip[1], last[1, 0])  # only its one valid segment
        torch.testing.assert_close(enc.forward_clip(x[:, :SEG]), last[:, 0])


def test_trains_with_batchnorm_and_gradients_flow():
    torch.manual_seed(0)
    model = SampleCNN(channels=(8, 8, 16)).train()  # 3^4 = 81-sample segments
    assert model.hop_length == 81 and model.embed_dim == 16
    z = model.forward_clip(torch.randn(4, 200))
    z.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_release_round_trip(enc, tmp_path):
    folder = musicssl.save_pretrained(enc, tmp_path / "clmr")
    again = musicssl.load(folder)
    assert isinstance(again, SampleCNN) and again.args == enc.args and again.spec.name == "clmr-samplecnn"
    x = (0.1 * np.random.default_rng(1).standard_normal(int(3.5 * SR))).astype(np.float32)
    a, b = enc.embed(x, sr=SR, layers="all"), again.embed(x, sr=SR, layers="all")
    torch.testing.assert_close(a.frames, b.frames, rtol=0, atol=0)
    torch.testing.assert_close(a.timestamps, b.timestamps)


def test_checkpoint_filter_maps_clmr_keys(enc):
    """CLMR's keys (`sequential.0` stem, `sequential.i` block i-1) under a Lightning checkpoint."""
    ours = enc.state_dict()

    def upstream_key(key: str) -> str:
        head, rest = key.split(".", 1)
        if head == "stem":
            return f"sequential.0.{rest}"
        i, rest = rest.split(".", 1)
        return f"sequential.{int(i) + 1}.{rest}"

    encoder = {upstream_key(k): v.clone() + 1 for k, v in ours.items()}
    lightning = {
        **{f"model.encoder.{k}": v for k, v in encoder.items()},
        **{f"encoder.{k}": torch.zeros_like(v) for k, v in encoder.items()},  # same module, other path
        "model.encoder.fc.weight": torch.zeros(50, 512),
        "model.projector.0.weight": torch.zeros(512, 512),
    }
    for state in (lightning, {f"encoder.{k}": v for k, v in encoder.items()}, {**encoder, "fc.bias": torch.zeros(50)}):
        mapped = checkpoint_filter_fn(state)
        assert set(mapped) == set(ours)
        model = SampleCNN()
        model.load_state_dict(mapped, strict=True)
        torch.testing.assert_close(model.blocks[9][0].weight, ours["blocks.9.0.weight"] + 1)
