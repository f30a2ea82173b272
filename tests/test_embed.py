"""The embed() contract for every registered architecture: shapes, timestamps, batch invariance,
chunking, layers, pooling, dtypes and the inputs it accepts or refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import musicssl
from musicssl.models import music2latent as m2l
from musicssl.errors import AudioInputError
from musicssl.models.base import BATCH_MIN_SHARE

SR = 16000
ALL = musicssl.list_models(pretrained=False)
# One architecture per family: the sizes of a family share all code, and the registry test builds each.
_SMALLEST: dict[str, str] = {}
for _name in sorted(ALL, key=lambda n: musicssl.model_info(n).embed_dim):
    _SMALLEST.setdefault(musicssl.model_info(_name).family, _name)
ARCHS = sorted(_SMALLEST.values())
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "audio"


# Constructor overrides that shrink a family's released size (up to 600M parameters) to a few
# layers of width 64: the embed() contract does not depend on size, and the suite must stay fast.
SHRINK: dict[str, dict] = {
    "spec_vit": dict(depth=2),
    "hubert": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=128, conv_dim=[32] * 7),
    "conformer": dict(depth=2, embed_dim=64, num_heads=4, ffn_dim=128, conv_dim=16),
    "omar_rq": dict(depth=2, embed_dim=64, num_heads=4),
    "dasheng": dict(depth=2, embed_dim=64, num_heads=4),
    "htsat": dict(width=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8]),
    "music2latent": m2l.TINY,  # also 0.41 s windows: its full-resolution 2-D U-Net is costly per second
}


def small(name: str) -> musicssl.Encoder:
    """The registered architecture, shrunk where that keeps the suite fast (see SHRINK)."""
    return musicssl.load(name, pretrained=False, **SHRINK.get(musicssl.model_info(name).family, {}))


def music(seconds: float, seed: int = 0, sr: int = SR) -> np.ndarray:
    """A chord of harmonics with a little noise: (S,) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = rng.uniform(100, 400)
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
    return (0.2 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module", params=ARCHS)
def enc(request):
    torch.manual_seed(0)
    return small(request.param)


def test_shapes_timestamps_and_clip(enc):
    x = music(12.3)
    out = enc.embed(x, sr=SR)
    T = int(enc.frame_lengths(torch.tensor([round(len(x) * enc.sample_rate / SR)]))[0])  # after resampling
    assert out.frames.shape == (1, T, enc.embed_dim) and out.frames.dtype == torch.float32
    assert out.clip.shape == (1, enc.embed_dim)
    assert out.lengths.tolist() == [T]
    assert torch.isfinite(out.frames).all()
    # Timestamps are frame centres: evenly spaced at 1 / frame_rate, within the audio.
    steps = torch.diff(out.timestamps.double())
    assert torch.allclose(steps, torch.full_like(steps, 1 / enc.frame_rate), atol=1e-6)
    assert 0 <= out.timestamps[0] < 1 / enc.frame_rate and out.timestamps[-1] <= len(x) / SR + 1 / enc.frame_rate
    torch.testing.assert_close(out.clip[0], out.frames[0].mean(0), rtol=1e-5, atol=1e-5)


def test_batch_invariance_and_padding(enc):
    a, b, c = music(14.0, 1), music(2.5, 2), music(0.7, 3)
    together = enc.embed([a, b, c], sr=SR)
    for i, x in enumerate([a, b, c]):
        alone = enc.embed(x, sr=SR)
        n = int(alone.lengths[0])
        assert together.lengths[i] == n
        torch.testing.assert_close(together.frames[i, :n], alone.frames[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together.clip[i], alone.clip[0], rtol=1e-4, atol=1e-4)
        assert (together.frames[i, n:] == 0).all()


def test_batch_size_does_not_change_results(enc):
    x = music(min(25.0, 3 * enc.context_seconds + 1), 4)
    torch.testing.assert_close(enc.embed(x, sr=SR, batch_size=1).frames, enc.embed(x, sr=SR, batch_size=5).frames,
                               rtol=1e-4, atol=1e-4)


def test_long_audio_is_chunked_consistently(enc):
    """The frames of the first window's kept region equal the first window embedded alone; for
    frame-local models the stitched result equals one pass over the whole signal."""
    x = music(3 * enc.context_seconds + 1.7, 5)
    out = enc.embed(x, sr=SR, batch_size=2)
    W, step, trim = enc.window_plan()
    first = enc.embed(x[:W], sr=SR)
    keep = trim + step // enc.hop_length
    torch.testing.assert_close(out.frames[0, :keep], first.frames[0, :keep], rtol=1e-4, atol=1e-4)
    if enc.family in ("logmel", "mfcc"):
        with torch.inference_mode():
            whole = enc.forward_features(torch.from_numpy(x)[None], torch.tensor([len(x)]))[-1]
        torch.testing.assert_close(out.frames, whole, rtol=1e-4, atol=1e-3)


def test_layers_and_pooling(enc):
    x = music(3.0, 6)
    L = enc.num_layers
    every = enc.embed(x, sr=SR, layers="all")
    assert every.frames.shape[:2] == (1, L) and every.clip.shape == (1, L, enc.embed_dim)
    pick = enc.embed(x, sr=SR, layers=[0, -1])
    torch.testing.assert_close(pick.frames[:, 1], enc.embed(x, sr=SR).frames)
    assert pick.layers == [0, L - 1]
    pooled = enc.embed(x, sr=SR, pool="max")
    assert pooled.frames is None
    torch.testing.assert_close(pooled.clip[0], every.frames[0, -1].amax(0))
    with pytest.raises(ValueError, match="out of range"):
        enc.embed(x, sr=SR, layers=[L])
    with pytest.raises(ValueError, match="pool"):
        enc.embed(x, sr=SR, pool="median")


def test_a_url_is_refused_with_the_fix():
    from musicssl.errors import AudioDecodeError

    with pytest.raises(AudioDecodeError, match="a URL is not fetched; download the file first"):
        musicssl.load("mfcc").embed("https://example.com/a.wav")


def test_numpy_layer_lists_and_rates_are_taken():
    enc = musicssl.load("mfcc")
    x = music(1.0)
    torch.testing.assert_close(enc.embed(x, sr=np.float32(SR), layers=np.arange(1)).frames,
                               enc.embed(x, sr=SR, layers=[0]).frames)


def test_a_0d_layer_array_is_one_layer_as_an_int_is():
    enc, x = musicssl.load("mfcc"), music(1.0)
    want = enc.embed(x, sr=SR, layers=0).clip.shape
    assert enc.embed(x, sr=SR, layers=np.array(0)).clip.shape == enc.embed(x, sr=SR, layers=torch.tensor(0)).clip.shape == want


def test_audio_far_too_loud_for_float32_is_refused_and_unscaled_pcm_warned_of(caplog):
    """Finite samples beyond 1e10 gave NaN embeddings (the power spectrum overflows); float64 beyond
    float32's range was said to hold Inf values it never held. Integer-scaled floats get a warning."""
    enc, x = musicssl.load("mfcc"), music(1.0)
    for loud in (x.astype(np.float64) * 1e19, x.astype(np.float64) * 1e300, torch.from_numpy(x).double() * 1e300):
        with pytest.raises(AudioInputError, match=r"has samples up to .*e\+.*scale it, e.g. x / np.abs\(x\).max\(\)"):
            enc.embed(loud, sr=SR)
    with caplog.at_level("WARNING", logger="musicssl"):
        out = enc.embed(x * 32768 / np.abs(x).max(), sr=SR)
    assert torch.isfinite(out.clip).all() and "integer PCM passed as floats? Divide it by its scale" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="musicssl"):
        enc.embed(x * 1.5 / np.abs(x).max(), sr=SR)  # a loud master's overs: not warned of
    assert not caplog.text


def test_float_files_far_too_loud_are_refused_and_unscaled_ones_warned_of(tmp_path, caplog):
    """The level check of arrays holds for float WAV files too: one at 1e19 gave NaN embeddings and an
    exit code 0 from `musicssl embed`."""
    from musicssl.errors import AudioDecodeError

    x = music(1.0)
    sf.write(tmp_path / "loud.wav", x * 1e19, SR, subtype="FLOAT")
    sf.write(tmp_path / "unscaled.wav", x * 100, SR, subtype="FLOAT")
    enc = musicssl.load("mfcc")
    with pytest.raises(AudioDecodeError, match=r"loud.wav' has samples up to .*e\+1[89].*normalise it, e.g. `sox"):
        enc.embed(tmp_path / "loud.wav")
    with caplog.at_level("WARNING", logger="musicssl"):
        assert torch.isfinite(enc.embed(tmp_path / "unscaled.wav").clip).all()
    assert "unscaled.wav' has samples up to" in caplog.text and "a float file written without scaling?" in caplog.text
    res = musicssl.extract(tmp_path, tmp_path / "out", enc, num_workers=0)
    assert (res.ok, res.failed, res.exit_code) == (1, 1, 1)


def test_sample_rates_beyond_any_audio_and_meta_tensors_are_refused():
    enc, x = musicssl.load("mfcc"), music(1.0)
    with pytest.raises(AudioInputError, match="not an audio sample rate \\(the highest taken is 10000000 Hz\\)"):
        enc.embed(x, sr=2**62)  # soxr never returned on it
    with pytest.raises(AudioInputError, match="the 'meta' device, which holds shapes but no samples"):
        enc.embed(torch.empty(16000, device="meta"), sr=SR)


def test_pooled_windows_are_reduced_where_the_model_runs_and_copied_back_small():
    """With pool_rows, launch_windows returns each window's sum and max over its kept rows (b, 2, L, D),
    not its frames; a window that keeps no rows gives a sum of 0 and a max of -inf."""
    enc = musicssl.load("mfcc")
    wav = torch.from_numpy(np.stack([music(2.0, 1), music(2.0, 2)]))
    full, n_valid = enc.launch_windows(wav, [32000, 20000], [0]).result()
    pooled, _ = enc.launch_windows(wav, [32000, 20000], [0], pool_rows=[(3, 90), (5, 5)]).result()
    assert pooled.shape == (2, 2, 1, enc.embed_dim) and n_valid == [101, 63]
    torch.testing.assert_close(pooled[0, 0], full[0, 3:90].sum(0))
    torch.testing.assert_close(pooled[0, 1], full[0, 3:90].amax(0))
    assert not pooled[1, 0].any() and bool((pooled[1, 1] == float("-inf")).all())


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_rows_past_a_windows_end_never_reach_the_clip(pool, monkeypatch):
    """Padded rows may hold anything (NaN from a masked softmax): a short clip batched with a long
    one pools as it does alone."""
    enc = musicssl.load("mfcc")
    real = type(enc).forward_features

    def nan_past_the_end(self, wav, lengths):
        out = real(self, wav, lengths)[0].clone()
        for i, n in enumerate(self.frame_lengths(lengths).tolist()):
            out[i, n:] = float("nan")
        return [out]

    monkeypatch.setattr(type(enc), "forward_features", nan_past_the_end)
    long, short = music(12.0, 1), music(3.0, 2)
    both = enc.embed([long, short], sr=SR, pool=pool, batch_size=4).clip
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[1], enc.embed(short, sr=SR, pool=pool).clip[0])


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooling_keeps_no_frames_of_long_audio(pool):
    """pool= returns only the clip, so only a running sum and max per item are held, whatever the
    length, and they give the clip of the frames."""
    enc = musicssl.load("mfcc")
    items = [music(30.0, 1), music(2.0, 2)]
    frames, lengths = enc._embed_items(items, [0], batch_size=4, pooled=True)
    assert [f.nbytes for f in frames] == [2 * 60 * 4] * 2  # (L, D) sum and max: nothing per frame
    every, pooled = enc.embed(items, sr=SR), enc.embed(items, sr=SR, pool=pool)
    assert pooled.frames is None and pooled.timestamps.shape == every.timestamps.shape
    for i, n in enumerate(every.lengths):
        valid = every.frames[i, :n]
        torch.testing.assert_close(pooled.clip[i], valid.mean(0) if pool == "mean" else valid.amax(0))


def test_output_dtype_and_backbone_dtype(enc):
    x = music(4.0, 7)
    ref = enc.embed(x, sr=SR)
    assert enc.embed(x, sr=SR, dtype=torch.float16).frames.dtype == torch.float16
    half = musicssl.load(enc.spec.name, pretrained=False, dtype=torch.bfloat16, **enc.args)
    half.load_state_dict(enc.state_dict())
    out = half.embed(x, sr=SR)
    assert out.frames.dtype == torch.float32  # float32 out unless asked
    rel = (out.frames - ref.frames).norm() / ref.frames.norm()
    assert rel < 0.05, f"bf16 backbone drifts {rel:.3f} from float32"


def test_input_forms_agree():
    enc = musicssl.load("logmel")
    a, b = music(3.0, 8), music(3.0, 9)
    batch = enc.embed(np.stack([a, b]), sr=SR).frames
    torch.testing.assert_close(enc.embed([a, b], sr=SR).frames, batch)
    torch.testing.assert_close(enc.embed(torch.from_numpy(np.stack([a, b])), sr=SR).frames, batch)
    stereo = np.stack([a, b])  # (C, S) in a list, or (B, C, S): channels are averaged
    mono = enc.embed((a + b) / 2, sr=SR).frames
    torch.testing.assert_close(enc.embed([stereo], sr=SR).frames, mono)
    torch.testing.assert_close(enc.embed(stereo[None], sr=SR).frames, mono)
    pcm = (np.clip(a, -1, 1) * 32767).astype(np.int16)
    torch.testing.assert_close(enc.embed(pcm, sr=SR).frames, enc.embed(pcm / 32768.0, sr=SR).frames,
                               rtol=1e-4, atol=1e-3)
    # Big-endian PCM (AIFF bytes read with np.frombuffer(..., ">i2")) is the same samples.
    torch.testing.assert_close(enc.embed(pcm.astype(">i2"), sr=SR).frames, enc.embed(pcm, sr=SR).frames)


def test_resampled_input_matches():
    enc = musicssl.load("logmel")
    t = np.arange(3 * 44100) / 44100
    x44 = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    x16 = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * SR) / SR)).astype(np.float32)
    a, b = enc.embed(x44, sr=44100), enc.embed(x16, sr=SR)
    assert a.lengths == b.lengths
    # Log-mel of the resampled tone agrees away from the first and last frames.
    assert (a.frames[0, 5:-5] - b.frames[0, 5:-5]).abs().median() < 0.5


def test_a_file_shorter_than_one_sample_at_the_model_rate_embeds_as_its_array_does(tmp_path):
    enc = musicssl.load("mfcc")
    sf.write(tmp_path / "one.wav", np.array([0.25], np.float32), 44100, subtype="FLOAT")
    from_file, from_array = enc.embed(tmp_path / "one.wav"), enc.embed(np.array([0.25], np.float32), sr=44100)
    torch.testing.assert_close(from_file.frames, from_array.frames)


def test_embeddings_are_ordinary_tensors_that_train_a_probe():
    """A frame-level probe trains on what embed() returns; inference-mode tensors would refuse."""
    out = musicssl.load("mfcc").embed(music(1.0), sr=SR)
    probe = torch.nn.Linear(out.frames.shape[-1], 2)
    probe(out.frames).sum().backward()
    out.frames[..., 0] = 0  # and they can be edited in place
    assert probe.weight.grad is not None and not out.lengths.is_inference()


def test_embed_runs_in_eval_mode_and_keeps_the_models_mode():
    enc = small("pesto-tiny")
    enc.train()
    enc.frontend.eval()  # a submodule's own mode survives too
    x = music(2.0)
    first = enc.embed(x, sr=SR).frames
    torch.testing.assert_close(enc.embed(x, sr=SR).frames, first, rtol=0, atol=0)  # no dropout
    assert enc.training and not enc.frontend.training


def test_paths_are_decoded(tmp_path):
    enc = musicssl.load("mfcc")
    x = music(2.0, 10, sr=44100)
    path = tmp_path / "a clip é.wav"
    sf.write(path, np.stack([x, x], axis=1), 44100, subtype="PCM_16")
    out = enc.embed([path, str(path)])
    assert out.frames.shape[0] == 2
    torch.testing.assert_close(out.frames[0], out.frames[1])
    ref = enc.embed(x, sr=44100)
    assert (out.frames[0] - ref.frames[0]).abs().max() < 1.0  # 16-bit quantisation only
    real = sorted(EXAMPLES.rglob("*.flac"))
    assert real and enc.embed(real[0]).frames.shape[1] > 0


@pytest.mark.parametrize(
    "audio, kwargs, match",
    [
        (np.zeros(1000, np.float32), {}, "sample rate"),
        (np.array([0.0, np.nan, 0.0], np.float32), {"sr": SR}, "NaN"),
        (np.zeros(0, np.float32), {"sr": SR}, "no samples"),
        (np.zeros((1, 1, 1, 10), np.float32), {"sr": SR}, "shape"),
        ([], {"sr": SR}, "empty"),
        ([np.zeros(10, np.float32), 3], {"sr": SR}, "item 1"),
        (np.zeros(10, np.complex64), {"sr": SR}, "dtype"),
        ({"not": "audio"}, {"sr": SR}, "dict"),
        (np.zeros(1000, np.float32), {"sr": "16k"}, "sample rate in Hz"),
        # soundfile.read's (samples, channels): not 16000 clips of 2 samples.
        (np.zeros((16000, 2), np.float32), {"sr": SR}, r"looks like \(samples, channels\).*x\.T"),
        ([np.zeros((16000, 6), np.float32)], {"sr": SR}, r"item 0 has shape \(16000, 6\)"),
        (torch.zeros(3, 16000, 2), {"sr": SR}, r"transpose\(0, 2, 1\)"),
        # A 16-channel recording the same way: not 16000 clips of 1 ms.
        (np.zeros((16000, 16), np.float32), {"sr": SR}, r"looks like \(samples, channels\)"),
        (np.zeros(1000, np.int64), {"sr": SR}, r"int64, which is no PCM format.*astype\(np.int16\)"),
        (np.zeros((0, 16000), np.float32), {"sr": SR}, "an empty batch"),
        (np.zeros((16, 0), np.float32), {"sr": SR}, "item 0 has no samples"),
        # No channels: averaging them would give NaN, said as if the samples held it.
        (np.zeros((1, 0, 16000), np.float32), {"sr": SR}, r"shape \(1, 0, 16000\), has 0 channels"),
        ([np.zeros((0, 16000), np.float32)], {"sr": SR}, "item 0, shape .*has 0 channels"),
    ],
)
def test_bad_inputs_are_refused_clearly(audio, kwargs, match):
    with pytest.raises(AudioInputError, match=match):
        musicssl.load("logmel").embed(audio, **kwargs)


def test_an_item_too_short_for_one_frame_is_refused_not_given_a_nan_clip():
    """Dasheng's first frame needs 30 ms: a 25 ms item had a clip of 0 / 0 (NaN; -inf pooled by max)."""
    enc = musicssl.load("dasheng-base", pretrained=False, depth=1, embed_dim=64, num_heads=4)
    short, long = np.zeros(400, np.float32), 0.1 * np.ones(16000, np.float32)
    for pool in (None, "mean", "max"):
        with pytest.raises(AudioInputError, match=r"item 0 holds 25.0 ms .* needs 30.0 ms \(480 samples at 16000 Hz\)"):
            enc.embed([short, long], sr=16000, pool=pool)
    assert enc.embed(np.zeros(480, np.float32), sr=16000).frames.shape[1] == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": "8"}, "batch_size must be an integer"),
    ({"dtype": "bf16"}, "floating dtype"),
    ({"dtype": torch.int8}, "floating dtype"),  # would truncate every value
    ({"layers": True}, "layers must be"),  # not layer 1
])
def test_bad_settings_are_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        musicssl.load("logmel").embed(np.zeros(1000, np.float32), sr=SR, **kwargs)


def test_tiny_inputs():
    enc = small("jepa-tiny")
    out = enc.embed([np.zeros(1, np.float32), np.full(100, 0.1, np.float32)], sr=SR)
    assert out.lengths.tolist() == [1, 1] and torch.isfinite(out.frames).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 3 * 44100), min_size=1, max_size=3),
    channels=st.integers(1, 3),
    sr=st.sampled_from([8000, 16000, 22050, 44100, 48000]),
    seed=st.integers(0, 2**16),
)
@example(lengths=[1], channels=1, sr=44100, seed=0)  # shorter than one sample at 16 kHz
def test_property_any_lengths_channels_and_rates(lengths, channels, sr, seed):
    enc = _PROPERTY_MODEL
    rng = np.random.default_rng(seed)
    items = [(0.1 * rng.standard_normal((channels, n))).astype(np.float32) for n in lengths]
    out = enc.embed(items, sr=sr)
    expected = [int(enc.frame_lengths(torch.tensor([round(n * SR / sr)]))[0]) for n in lengths]
    assert out.lengths.tolist() == pytest.approx(expected, abs=1)
    assert out.frames.shape == (len(items), max(out.lengths.tolist()), enc.embed_dim)
    assert torch.isfinite(out.frames).all() and torch.isfinite(out.clip).all()
    for i, n in enumerate(out.lengths.tolist()):
        assert (out.frames[i, n:] == 0).all()


torch.manual_seed(0)
_PROPERTY_MODEL = musicssl.load("jepa-tiny", pretrained=False, depth=1)


def test_compiled_windows_compile_a_few_shapes_once() -> None:
    """compile_windows pads every batch to the full window and a power-of-two number of windows:
    clips of lengths never seen add no compile, and the frames equal the eager ones."""
    shapes: list[tuple] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        shapes.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward

    torch._dynamo.reset()
    enc = musicssl.load("simclr-mini")
    sr, rng = enc.sample_rate, np.random.default_rng(0)

    def clips(seconds: list[float]) -> list[np.ndarray]:
        return [(0.1 * rng.standard_normal(int(s * sr))).astype(np.float32) for s in seconds]

    # Every shape there is at batch 4: 1, 2 or 4 windows (3 pads to 4), all full or some short.
    warm = [clips([s] * k) for s in (0.5, enc.context_seconds) for k in (1, 2, 4)]
    eager = [enc.embed(c, sr=sr, batch_size=4) for c in warm]
    enc.compile_windows(backend=counting_backend)
    for c, e in zip(warm, eager):
        torch.testing.assert_close(enc.embed(c, sr=sr, batch_size=4).frames, e.frames, rtol=1e-4, atol=1e-5)
    compiled = len(shapes)
    assert 0 < compiled <= 12
    for seconds in ([0.3, 4.4, 7.3, 13.0], [2.05, 6.6, 12.5], [31.7, 1.1]):  # lengths never seen
        enc.embed(clips(seconds), sr=sr, batch_size=4)
    assert len(shapes) == compiled
    torch._dynamo.reset()


def test_uncompiled_batches_are_not_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only compile_windows pads batches to full windows: a plain encoder runs each batch as it is."""
    enc = musicssl.load("simclr-mini")
    shapes = []
    forward = enc.forward_features
    monkeypatch.setattr(enc, "forward_features", lambda wav, n: shapes.append(tuple(wav.shape)) or forward(wav, n))
    enc.embed([np.zeros(8000, np.float32)] * 3, sr=enc.sample_rate, batch_size=4)
    assert shapes == [(3, 8000)]


def test_windows_of_very_different_lengths_run_in_separate_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window shorter than BATCH_MIN_SHARE of its batch's longest starts a new batch rather than run
    padded; windows of similar length still share one, up to batch_size."""
    enc = musicssl.load("simclr-mini")
    sr, W = enc.sample_rate, enc.window_plan()[0]
    shapes = []
    forward = enc.forward_features
    monkeypatch.setattr(enc, "forward_features", lambda wav, n: shapes.append(tuple(wav.shape)) or forward(wav, n))
    short = int(W * BATCH_MIN_SHARE) - 1  # just too short to join full windows
    clips = [np.zeros(n, np.float32) for n in (W, W, W, short, short - 100, W // 4)]
    enc.embed(clips, sr=sr, batch_size=2)
    assert shapes == [(2, W), (1, W), (2, short), (1, W // 4)]
    shapes.clear()
    enc.embed(clips[:4], sr=sr, batch_size=8)
    assert shapes == [(3, W), (1, short)]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", ARCHS)
def test_embed_on_a_gpu_matches_the_cpu(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches overlap on a GPU (the next starts before the last is stitched) and some front ends run
    channels-last there: the frames are still those of the CPU, for clips of several windows spread
    over several batches."""
    enc = small(name).eval()
    rng = np.random.default_rng(0)
    seconds = [2.2 * enc.context_seconds, 0.7 * enc.context_seconds, 0.4, 1.3 * enc.context_seconds]
    clips = [(0.1 * rng.standard_normal(int(s * enc.sample_rate))).astype(np.float32) for s in seconds]
    cpu = enc.embed(clips, sr=enc.sample_rate, batch_size=2)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the CPU computes in full float32
    gpu = enc.to("cuda").embed(clips, sr=enc.sample_rate, batch_size=2)
    torch.testing.assert_close(gpu.frames, cpu.frames, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu.lengths, cpu.lengths)


@needs_cuda
def test_starting_a_batch_on_a_gpu_does_not_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`launch_windows` queues the copies in, the model and the copy back without a host-device
    sync (a model free of them stands in for one); the result is there once asked for."""
    enc = musicssl.load("simclr-mini").to("cuda")
    monkeypatch.setattr(enc, "forward_features", lambda wav, n: [wav.unfold(1, 160, 160) * 2.0])
    wav = enc.stack_windows([np.ones(16000, np.float32)] * 2, enc.plan_windows([16000, 16000])[:2])
    enc.launch_windows(wav, [16000, 16000], [0]).result()  # warm: the first pinned blocks come from the driver
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = enc.launch_windows(wav, [16000, 16000], [0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stacked, _ = launched.result()
    assert stacked.device.type == "cpu" and stacked.shape == (2, 100, 1, 160)
    assert torch.equal(stacked, torch.full_like(stacked, 2.0))
