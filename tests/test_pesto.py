"""PESTO: the VQT front-end, the equivariant architecture, the recipe's losses and data side, the
release round trip, and the property PESTO is for: after a short self-supervised run on synthetic
harmonic tones, transposing a held-out tone by s semitones moves the predicted bin by 3 s."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import musicssl
from musicssl.audio.frontends import VQT
from musicssl.models.pesto import PESTO, ToeplitzLinear, checkpoint_filter_fn, reduce_activations
from musicssl.recipes import losses
from musicssl.recipes import pesto as recipe_mod

SR = 16000
FMIN = 27.5  # Hz, bin 0 of the plain VQT below
BPO = 36  # bins per octave


def tone(midi: float, seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """A steady harmonic tone with a random timbre (3-10 partials, random decay, phases and level)."""
    rng = np.random.default_rng(seed)
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    n = int(rng.integers(3, 11))
    amps = rng.uniform(0.3, 1.0, n) * np.arange(1, n + 1) ** -rng.uniform(0.3, 1.5)
    t = np.arange(int(seconds * sr)) / sr
    x = sum(a * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
            for k, a in enumerate(amps, start=1) if k * f0 < sr / 2)
    return (x / np.abs(x).max() * rng.uniform(0.1, 0.9)).astype(np.float32)


def sine(freq: float, seconds: float = 0.5, sr: int = SR) -> torch.Tensor:
    return torch.from_numpy((0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# VQT


@pytest.mark.parametrize("gamma", [0.0, 7.0])
def test_vqt_tone_peaks_fall_on_their_bins(gamma):
    """A sine at bin k's centre frequency peaks at bin k: one bin per 1/3 semitone, on and between semitones."""
    vqt = VQT(SR, 160, fmin=FMIN, bins_per_semitone=3, n_bins=251, gamma=gamma)
    for k in [10, 50, 100, 101, 102, 150, 200, 250]:
        mag = vqt(sine(FMIN * 2 ** (k / BPO)))
        assert int(mag[:, 25].argmax()) == k
        assert torch.allclose(vqt.frequencies[k].double(), torch.tensor(FMIN * 2 ** (k / BPO), dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:n_fft=.* is too large")  # librosa's top-octave STFTs of short input
def test_vqt_matches_librosa_loosely():
    """Same peaks as librosa.vqt and magnitudes within 2% of the peak (librosa resamples per octave
    and defines the bandwidth slightly differently, so parity is not exact)."""
    librosa = pytest.importorskip("librosa")
    x = tone(57, 2.0, seed=3)  # A3, 220 Hz
    for gamma in (0.0, 7.0):
        ref = np.abs(librosa.vqt(x, sr=SR, hop_length=128, fmin=FMIN, n_bins=251, bins_per_octave=BPO, gamma=gamma))
        ours = VQT(SR, 128, fmin=FMIN, n_bins=251, gamma=gamma)(torch.from_numpy(x)).numpy()
        assert ours.shape == ref.shape
        mid = slice(30, -30)  # away from the edges, where librosa reflects and we zero-pad
        np.testing.assert_array_equal(ours[:, mid].argmax(0), ref[:, mid].argmax(0))
        assert np.corrcoef(ours[:, mid].ravel(), ref[:, mid].ravel())[0, 1] > 0.999
        assert np.abs(ours[:, mid] - ref[:, mid]).max() < 0.02 * ref[:, mid].max()


def test_vqt_frames_are_centred_and_batch_independent():
    vqt = VQT(SR, 160, n_bins=100)
    for n in [1, 159, 160, 161, 4000]:
        assert vqt(torch.zeros(n)).shape == (100, n // 160 + 1)
    x = torch.from_numpy(tone(60, 0.7, seed=1))
    alone = vqt(x)
    padded = vqt(torch.stack([F.pad(x, (0, 3000)), torch.zeros(len(x) + 3000)]))  # batch dims kept
    assert padded.shape[:2] == (2, 100)
    torch.testing.assert_close(padded[0, :, : alone.shape[-1]], alone, rtol=1e-4, atol=1e-5)


def test_vqt_stays_float32_under_low_precision():
    vqt = VQT(SR, 160, n_bins=100)
    x = torch.from_numpy(tone(60, 0.4, seed=2))
    ref = vqt(x)
    cast = copy.deepcopy(vqt).to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in cast.buffers()) and cast.state_dict() == {}
    out = cast(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_vqt_refuses_bins_above_nyquist():
    with pytest.raises(ValueError, match="Nyquist"):
        VQT(6000, 60, fmin=27.5, n_bins=251)  # the top bin is at 3.4 kHz


# --------------------------------------------------------------------------------------------------
# Architecture


def test_toeplitz_head_is_transposition_equivariant():
    """Shifting the features by k bins (in every channel) shifts the logits by exactly k bins."""
    torch.manual_seed(0)
    C, F_, D = 3, 60, 90
    head = ToeplitzLinear(C * F_, D)
    feats = torch.zeros(5, C, F_)
    feats[:, :, 20:35] = torch.randn(5, C, 15)  # compact support: nothing falls off under the shifts
    base = head(feats.flatten(1))
    for k in [-7, -1, 1, 3, 12]:
        shifted = head(feats.roll(k, dims=-1).flatten(1))
        if k > 0:
            torch.testing.assert_close(shifted[:, k:], base[:, :-k], rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(shifted[:, :k], base[:, -k:], rtol=0, atol=1e-5)
    # The matrix is upstream's 1-channel convolution, applied faster.
    ref = F.conv1d(feats.flatten(1)[:, None], head.weight, padding=D - 1)[:, 0]
    torch.testing.assert_close(base, ref, rtol=1e-5, atol=1e-5)


def test_conv_stack_commutes_with_shifts_away_from_the_edges():
    torch.manual_seed(0)
    enc = PESTO(n_chan_layers=[8, 8, 2], n_prefilt_layers=2, prefilt_kernel_size=15).eval()
    n = enc.n_bins_in
    x = torch.full((4, n), -100.0)
    x[:, 90:120] = -100 + 60 * torch.rand(4, 30)  # a "spectrum" on a flat floor
    base = enc.encoder.features(x)
    margin = 2 * 7  # two convs of kernel 15 reach 14 bins
    for k in [-9, 5]:
        out = enc.encoder.features(x.roll(k, dims=-1))
        lo, hi = margin + max(k, 0), n - margin + min(k, 0)
        torch.testing.assert_close(out[..., lo:hi], base[..., lo - k : hi - k], rtol=1e-4, atol=1e-5)


def test_state_dict_has_upstream_names():
    """The default PESTO has the key names and shapes of upstream's `mir-1k_g7` checkpoint (listed
    here, the LayerNorm affine flattened from (1, 219)), which `checkpoint_filter_fn` maps onto it."""
    shapes = {k: tuple(v.shape) for k, v in PESTO().state_dict().items()}
    assert shapes == {
        "shift": (), "encoder.layernorm.weight": (219,), "encoder.layernorm.bias": (219,),
        "encoder.conv1.0.weight": (40, 1, 39), "encoder.conv1.0.bias": (40,),
        "encoder.prefilt_layers.0.0.weight": (40, 40, 39), "encoder.prefilt_layers.0.0.bias": (40,),
        "encoder.prefilt_layers.1.0.weight": (40, 40, 39), "encoder.prefilt_layers.1.0.bias": (40,),
        "encoder.conv_layers.0.weight": (30, 40, 1), "encoder.conv_layers.0.bias": (30,),
        "encoder.conv_layers.3.weight": (30, 30, 1), "encoder.conv_layers.3.bias": (30,),
        "encoder.conv_layers.6.weight": (10, 30, 1), "encoder.conv_layers.6.bias": (10,),
        "encoder.conv_layers.9.weight": (3, 10, 1), "encoder.conv_layers.9.bias": (3,),
        "encoder.fc.weight": (1, 1, 1040), "confidence.conv.weight": (1, 1, 39), "confidence.conv.bias": (1,),
        "confidence.linear.weight": (1, 72), "confidence.linear.bias": (1,),
    }
    upstream = {**PESTO().state_dict(), "preprocessor.hcqt_kernels.cqt_kernels.0.sqrt_lengths": torch.ones(251, 1)}
    upstream["encoder.layernorm.weight"] = torch.ones(1, 219)
    upstream["encoder.layernorm.bias"] = torch.zeros(1, 219)
    assert {k: tuple(v.shape) for k, v in checkpoint_filter_fn(upstream).items()} == shapes


def test_reduce_activations():
    probs = torch.zeros(2, 384)
    probs[0, 100] = 1.0
    probs[1, 200:203] = torch.tensor([0.25, 0.5, 0.25])
    assert reduce_activations(probs, 3, "argmax").tolist() == pytest.approx([100 / 3, 201 / 3])
    assert reduce_activations(probs, 3, "alwa").tolist() == pytest.approx([100 / 3, 201 / 3])
    assert reduce_activations(probs, 3, "mean").tolist() == pytest.approx([100 / 3, 201 / 3])


def test_pitch_runs_in_exact_chunks_and_keeps_shift_float32():
    torch.manual_seed(0)
    enc = musicssl.load("pesto-tiny", pretrained=False)
    x = torch.from_numpy(tone(62, 1.73, seed=4))
    whole = enc.forward_features(x[None], torch.tensor([len(x)]))[-1][0]
    chunked = copy.deepcopy(enc)
    chunked.context_seconds = 0.3
    midi, conf, probs = chunked.frame_pitch(x)
    assert probs.shape == whole.shape and midi.shape == conf.shape == (len(x) // 160 + 1,)
    torch.testing.assert_close(probs, whole, rtol=1e-4, atol=1e-6)
    assert ((conf >= 0) & (conf <= 1)).all()
    enc.shift.fill_(21.3333)
    assert enc.to(torch.bfloat16).shift.dtype == torch.float32
    f0, c = enc.pitch([x.numpy(), x[:8000].numpy()], sr=SR)
    assert f0.shape == c.shape == (2, len(x) // 160 + 1) and (f0[1, 8000 // 160 + 1 :] == 0).all()


def test_release_round_trip_reproduces_embed_and_pitch(tmp_path):
    torch.manual_seed(0)
    enc = musicssl.load("pesto-tiny", pretrained=False)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
        enc.shift.fill_(12.5)
    folder = musicssl.save_pretrained(enc, tmp_path / "pesto")
    back = musicssl.load(folder)
    x = tone(64, 1.2, seed=5)
    a, b = enc.embed(x, sr=22050, layers="all"), back.embed(x, sr=22050, layers="all")
    torch.testing.assert_close(a.frames, b.frames, rtol=0, atol=0)
    assert float(back.shift) == 12.5
    for u, v in zip(enc.pitch(x, sr=22050), back.pitch(x, sr=22050)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Losses, each against its formula written out row by row


def _rows(seed: int, n: int = 6, d: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pa = torch.randn(n, d, generator=g).mul(3).softmax(-1)
    pb = torch.randn(n, d, generator=g).mul(3).softmax(-1)
    shift = torch.randint(-5, 6, (n,), generator=g)
    return pa, pb, shift


def _ce(p: np.ndarray, t: np.ndarray) -> float:
    """pesto-full's CE of one row: torch CrossEntropyLoss with the probabilities p as logits."""
    return float(-(t * (p - np.log(np.exp(p).sum()))).sum())


def test_pesto_cross_entropy_is_torch_cross_entropy_on_probabilities():
    pa, pb, _ = _rows(0)
    torch.testing.assert_close(losses.pesto_cross_entropy(pa, pb), F.cross_entropy(pa, pb))
    expected = np.mean([_ce(a, b) for a, b in zip(pa.numpy(), pb.numpy())])
    assert float(losses.pesto_cross_entropy(pa, pb)) == pytest.approx(expected, rel=1e-5)


def test_invariance_loss_formula_and_stop_gradient():
    pa, pb, _ = _rows(1)
    expected = np.mean([(_ce(a, b) + _ce(b, a)) / 2 for a, b in zip(pa.numpy(), pb.numpy())])
    assert float(losses.invariance_loss(pa, pb)) == pytest.approx(expected, rel=1e-5)
    a = pa.clone().requires_grad_()
    losses.invariance_loss(a, pb).backward()
    # Only the prediction side carries gradient: d/dp_a of CE(p_a, sg p_b) / 2.
    want = (torch.softmax(pa, -1) - pb) / 2 / len(pa)
    torch.testing.assert_close(a.grad, want, rtol=1e-5, atol=1e-7)


def _transpose(p: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rows of p moved up by shift bins, zero-filled: out[n, j] = p[n, j - k]."""
    out = torch.zeros_like(p)
    for n, k in enumerate(shift.tolist()):
        for j in range(p.shape[1]):
            if 0 <= j - k < p.shape[1]:
                out[n, j] = p[n, j - k]
    return out


def test_shifted_cross_entropy_formula():
    pa, pb, shift = _rows(2)
    P, D = int(shift.abs().max()) + 1, pa.shape[1]
    a, b = pa.numpy(), pb.numpy()
    expected = []
    for n, k in enumerate(shift.tolist()):
        # Both distributions in a margin of P empty bins; b read k bins further up.
        wa = np.array([a[n, m - P] if 0 <= m - P < D else 0.0 for m in range(D + 2 * P)])
        wb = np.array([b[n, m - P + k] if 0 <= m - P + k < D else 0.0 for m in range(D + 2 * P)])
        expected.append((_ce(wa, wb) + _ce(wb, wa)) / 2)
    assert float(losses.shifted_cross_entropy(pa, pb, shift, P)) == pytest.approx(np.mean(expected), rel=1e-5)


def test_huber_and_power_series_and_equivariance_loss():
    x = torch.linspace(-1, 1, 41)
    torch.testing.assert_close(losses.huber(x, 0.12), F.huber_loss(x, torch.zeros_like(x), reduction="none", delta=0.12))
    alpha, tau = 2 ** (1 / 36), 2 ** (1 / 6) - 1
    pa, pb, shift = _rows(3)
    D = pa.shape[1]
    phi = losses.power_series(pa, alpha)
    want = [sum(alpha ** (i - D + 1) * float(pa[n, i]) for i in range(D)) for n in range(len(pa))]
    assert phi.tolist() == pytest.approx(want, rel=1e-5)

    def h(v: float) -> float:
        return v * v / 2 if abs(v) <= tau else tau * abs(v) - tau * tau / 2

    zb = losses.power_series(pb, alpha).tolist()
    expected = np.mean([(h(zb[n] / want[n] - alpha ** k) + h(want[n] / zb[n] - alpha ** -k)) / 2
                        for n, k in enumerate(shift.tolist())])
    assert float(losses.equivariance_loss(pa, pb, shift, alpha, tau)) == pytest.approx(expected, rel=1e-5)
    # Zero when b is exactly a transposed by k (mass kept inside the bins).
    narrow = torch.zeros(3, 80)
    narrow[:, 30:40] = torch.rand(3, 10).softmax(-1)
    k = torch.tensor([-4, 0, 7])
    assert float(losses.equivariance_loss(narrow, _transpose(narrow, k), k, alpha, tau)) < 1e-10


def test_losses_check_shapes():
    pa, pb, shift = _rows(4)
    with pytest.raises(ValueError, match="same shape"):
        losses.invariance_loss(pa, pb[:, :-1])
    with pytest.raises(ValueError, match="shift"):
        losses.shifted_cross_entropy(pa, pb, shift[:-1], 8)


# --------------------------------------------------------------------------------------------------
# Recipe


def _recipe(**overrides) -> recipe_mod.PESTO:
    torch.manual_seed(0)
    return recipe_mod.PESTO(recipe_mod.PESTO.Config(**{"crop_seconds": 0.2, "calibrate_every": 0, **overrides}))


def _tone_items(start: int, n: int, seconds: float = 0.2) -> list[dict]:
    """Training crops: tones at MIDI 40-80 (82-830 Hz) of random timbre, one per index."""
    out = []
    for i in range(start, start + n):
        midi = np.random.default_rng(10_000 + i).uniform(40, 80)
        out.append({"audio": tone(midi, seconds, seed=i), "index": i})
    return out


def test_collate_is_seeded_by_index_and_draws_shifts_in_range():
    recipe = _recipe(max_shift=5)
    items = _tone_items(0, 6)
    batch = recipe.collate(items)
    assert batch["views"].shape == (6, 2, 3200) and batch["shift"].shape == (6, 21)
    assert batch["shift"].abs().max() <= 5 and len(batch["shift"].unique()) > 5
    assert not torch.equal(batch["views"][:, 0], batch["views"][:, 1])
    again = recipe.collate(items[3:] + items[:3])  # each row depends only on its item's index
    for key in ("views", "shift"):
        torch.testing.assert_close(again[key][:3], batch[key][3:], rtol=0, atol=0)
    other = _recipe(max_shift=5, seed=1).collate(items)
    assert not torch.equal(other["shift"], batch["shift"])
    with pytest.raises(ValueError, match="max_shift"):
        _recipe(max_shift=17)


def test_loss_is_finite_and_decreases_on_a_fixed_batch():
    recipe = _recipe()
    batch = recipe.collate(_tone_items(0, 8))
    opt = torch.optim.AdamW(recipe.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        out = recipe.training_step(batch)
        assert set(out) == {"loss", "invariance", "equivariance", "shift_ce"}
        assert all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        recipe.after_step(step, 25)
        losses.append(out["loss"].item())
    # The cross-entropies cannot go below ~4.96 each (see pesto_cross_entropy), so the total starts
    # near 12 and can only fall to ~9.9; on a fixed batch it moves by ~1e-4 a step when not learning.
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    assert recipe.export_encoder() is recipe.backbone


def _shift_accuracy(enc: PESTO, n_pairs: int = 60, seed: int = 999_000) -> float:
    """Fraction of held-out tone pairs (same timbre, the second transposed by s semitones, |s| in
    1..12) whose predicted bins (argmax, median over frames) differ by 3 s within +-1 bin."""
    rng = np.random.default_rng(seed)
    pairs = [(rng.uniform(45, 70), int(rng.choice([1, 2, 3, 4, 5, 7, 12])) * int(rng.choice([-1, 1])))
             for _ in range(n_pairs)]
    x = torch.from_numpy(np.stack([tone(m, 0.3, seed=seed + p) for p, (midi, s) in enumerate(pairs)
                                   for m in (midi, midi + s)]))
    with torch.no_grad():
        probs = enc.forward_features(x, torch.full((len(x),), x.shape[1]))[-1][:, 10:-10]
    bins = probs.argmax(-1).float().median(dim=1).values.view(-1, 2)
    errors = bins[:, 1] - bins[:, 0] - 3 * torch.tensor([s for _, s in pairs])
    return float((errors.abs() <= 1).float().mean())


def test_training_on_tones_learns_transposition_equivariance():
    """Self-supervised training on synthetic tones makes the predicted bin follow transpositions.

    AdamW (lr 3e-3) on batches of 16 crops of 0.2 s, checked every 20 steps on 60 held-out pairs
    and stopped once over 90% of them move by 3 s bins (+-1): here after 40 steps (~20 s on 2
    idle cores) at 0.98. Over 16 seeds of this set-up, 12 reached >= 0.9 by step 60; the other
    four (0.33-0.83 at step 60) reached 0.77-1.0 by step 200, hence the bound of 0.7 after at most
    200 steps. Untrained networks score 0.0-0.27 (16 initialisations): the argmax barely moves."""
    recipe = _recipe()
    recipe.backbone.eval()
    assert _shift_accuracy(recipe.backbone) < 0.3
    opt = torch.optim.AdamW(recipe.parameters(), lr=3e-3, weight_decay=0.0)
    step, accuracy = 0, 0.0
    while accuracy <= 0.9 and step < 200:
        recipe.backbone.train()
        for _ in range(20):
            out = recipe.training_step(recipe.collate(_tone_items(16 * step, 16)))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            step += 1
        accuracy = _shift_accuracy(recipe.export_encoder().eval())
    assert accuracy > 0.7, (accuracy, step)
    # Calibrated on one octave of 5-harmonic tones, the absolute pitch of other tones is right.
    enc = recipe.export_encoder()
    enc.calibrate_shift()
    midi = np.array([47.0, 55.5, 61.2, 66.0, 73.7])
    f0, _ = enc.pitch([tone(m, 0.5, seed=77 + i) for i, m in enumerate(midi)], sr=SR)
    estimate = 69 + 12 * np.log2(f0[:, 10:-10].median(dim=1).values.numpy() / 440)
    assert np.median(np.abs(estimate - midi)) < 0.5, estimate - midi
