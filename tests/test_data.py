"""Tests for musicssl.recipes.data: audio crops, synthetic music and the step-indexed loader."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from musicssl.audio.io import load_audio
from musicssl.errors import AudioDecodeError
from musicssl.recipes import data as data_mod
from musicssl.recipes.data import AudioCrops, SyntheticMusic, default_collate_audio, make_loader

SR = 16000


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five readable files of different lengths, rates and channels, and one that is not audio."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)

    def write(name: str, seconds: float, sr: int, channels: int = 1) -> None:
        n = round(seconds * sr)
        # A slow ramp plus noise: no two crops are alike, and no sample is exactly zero.
        x = 0.5 * np.linspace(0.1, 0.9, n)[:, None] + 0.05 * rng.standard_normal((n, channels))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, x.squeeze(1) if channels == 1 else x, sr)

    write("a_16k_mono.wav", 3.0, 16000)
    write("b_44k_stereo.wav", 5.0, 44100, channels=2)
    write("c_8k_short.wav", 0.5, 8000)
    write("sub/d_22k.flac", 2.0, 22050)
    write("sub/deeper/e_48k.wav", 1.5, 48000, channels=3)
    (root / "broken.wav").write_bytes(b"RIFF....WAVEfmt this is not audio")
    return root


def crops(root: Path, **kwargs: Any) -> AudioCrops:
    return AudioCrops(root, SR, 1.0, **kwargs)


# --------------------------------------------------------------------------------------------------
# AudioCrops


def test_folder_source_skips_unreadable_files(
    audio_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="musicssl.recipes.data"):
        ds = crops(audio_dir)
    assert len(ds) == 5 and [p.name for p in ds.files][0] == "a_16k_mono.wav"
    assert "broken.wav" in caplog.text
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i
        assert item["audio"].shape == (SR,) and item["audio"].dtype == torch.float32
        assert bool(torch.isfinite(item["audio"]).all())


def test_items_are_a_function_of_seed_epoch_and_index(audio_dir: Path) -> None:
    ds, same = crops(audio_dir, seed=3), crops(audio_dir, seed=3)
    for i in range(len(ds)):
        assert torch.equal(ds[i]["audio"], same[i]["audio"])
    long_file = 1  # 5 s: crops move with epoch and seed
    first = ds[long_file]["audio"]
    ds.set_epoch(1)
    assert not torch.equal(ds[long_file]["audio"], first)
    ds.set_epoch(0)
    assert torch.equal(ds[long_file]["audio"], first)
    assert not torch.equal(crops(audio_dir, seed=4)[long_file]["audio"], first)


def test_reads_only_the_crop(audio_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def spy(path: Path, **kwargs: Any) -> tuple[np.ndarray, int]:
        calls.append({"path": Path(path), **kwargs})
        return load_audio(path, **kwargs)

    monkeypatch.setattr(data_mod, "load_audio", spy)
    ds = crops(audio_dir)
    item = ds[0]  # a_16k_mono.wav: 3 s at 16 kHz, the crop's rate
    (call,) = calls
    assert call["sr"] == SR and 0.0 <= call["offset"] <= 2.0
    assert 1.0 <= call["duration"] < 1.01
    # Same rate, so the crop is exactly the file's samples from the offset on.
    full, _ = load_audio(call["path"], sr=SR)
    start = round(call["offset"] * SR)
    assert torch.equal(item["audio"], torch.from_numpy(full[start : start + SR]))
    ds[1]  # 44.1 kHz stereo, resampled: still only about a second is decoded
    assert calls[-1]["duration"] < 1.01 and calls[-1]["offset"] > 0


def test_a_length_the_header_overestimates_is_learned_not_a_broken_file(audio_dir: Path) -> None:
    """ADTS AAC (or an MP3 behind junk) reports a length from its bitrate, past the real end: an
    offset drawn beyond the end must not put the file on the broken list."""
    import dataclasses

    def overestimated() -> AudioCrops:
        ds = crops(audio_dir, length=40)
        ds.infos[k] = dataclasses.replace(ds.infos[k], frames=3 * ds.infos[k].frames, duration=9.0)  # as ffprobe might
        return ds

    k = [p.name for p in crops(audio_dir).files].index("a_16k_mono.wav")  # 3 s
    ds, fresh = overestimated(), overestimated()
    for epoch in range(8):
        ds.set_epoch(epoch)
        audio = ds[k]["audio"]
        assert int((audio == 0).sum()) < 10  # a whole crop of the file's samples, no zero padding
        assert torch.equal(ds[k]["audio"], audio)  # the same item again, whatever was read before
    assert k not in ds._bad
    fresh.set_epoch(7)
    assert torch.equal(fresh[k]["audio"], audio)  # a process that read nothing before (a resumed run)


def test_short_files_are_zero_padded_at_a_drawn_position(audio_dir: Path) -> None:
    ds = crops(audio_dir)
    k = [p.name for p in ds.files].index("c_8k_short.wav")  # 0.5 s: half the crop
    positions = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        audio = ds[k]["audio"]
        nonzero = audio.nonzero().squeeze(1)
        assert abs(len(nonzero) - SR // 2) <= 2
        assert int(nonzero[-1] - nonzero[0]) + 1 == len(nonzero)  # one contiguous block
        positions.add(int(nonzero[0]))
    assert len(positions) > 1


def test_csv_txt_and_list_sources(audio_dir: Path, tmp_path: Path) -> None:
    names = ["a_16k_mono.wav", "sub/d_22k.flac"]
    csv_file = audio_dir / "train.csv"
    csv_file.write_text("path,label\n" + "".join(f"{n},x\n" for n in names))
    txt_file = audio_dir / "train.txt"
    txt_file.write_text("# training files\n\n" + "\n".join(names) + "\n")
    excel = audio_dir / "excel.csv"  # Excel's "CSV UTF-8" begins with a byte-order mark
    excel.write_text("\ufeffpath,label\n" + "".join(f"{n},x\n" for n in names), encoding="utf-8")
    notepad = audio_dir / "notepad.txt"  # so does a list saved by Windows Notepad as "UTF-8 with BOM"
    notepad.write_text("\ufeff" + "\r\n".join(names) + "\r\n", encoding="utf-8")
    listed = [audio_dir / n for n in names]
    expected = [p.resolve() for p in listed]
    for source in (csv_file, str(txt_file), listed, excel, notepad):
        ds = crops(source)
        assert [p.resolve() for p in ds.files] == expected and len(ds) == 2
        assert ds[1]["audio"].shape == (SR,)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file\nx.wav\n")
    with pytest.raises(ValueError, match="'path' column"):
        crops(bad_csv)


def test_no_usable_files_is_a_clear_error(audio_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No audio files"):
        crops(tmp_path)
    with pytest.raises(AudioDecodeError, match="None of the 1 audio files"):
        crops([audio_dir / "broken.wav"])
    with pytest.raises(FileNotFoundError):
        crops(tmp_path / "missing")


def test_length_cycles_files(audio_dir: Path) -> None:
    ds = crops(audio_dir, length=12)
    assert len(ds) == 12
    # Item 5 comes from file 0 again, with its own crop.
    assert not torch.equal(ds[0]["audio"], ds[5]["audio"])
    with pytest.raises(IndexError):
        ds[12]


def test_decode_failure_at_read_time_falls_back_to_the_next_file(
    audio_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = crops(audio_dir)
    expected = ds[1]["audio"]
    bad = ds.files[0]

    def flaky(path: Path, **kwargs: Any) -> tuple[np.ndarray, int]:
        if Path(path) == bad:
            raise AudioDecodeError(f"Cannot decode audio file '{path}': damaged")
        return load_audio(path, **kwargs)

    monkeypatch.setattr(data_mod, "load_audio", flaky)
    ds = crops(audio_dir)
    with caplog.at_level(logging.WARNING, logger="musicssl.recipes.data"):
        item = ds[0]
    assert item["index"] == 0 and torch.equal(item["audio"], expected)
    assert bad.name in caplog.text

    def broken(path: Path, **kwargs: Any) -> tuple[np.ndarray, int]:
        raise AudioDecodeError("damaged")

    monkeypatch.setattr(data_mod, "load_audio", broken)
    with pytest.raises(AudioDecodeError, match="None of the 5"):
        crops(audio_dir)[2]


# --------------------------------------------------------------------------------------------------
# SyntheticMusic


def lowest_strong_peak(audio: torch.Tensor, sr: int) -> float:
    """Frequency (Hz) of the lowest spectral peak above 30 % of the highest one."""
    x = audio.double().numpy()
    n = 8 * len(x)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=n))
    strong = spec > 0.3 * spec.max()
    k = int(np.argmax(strong))
    while k + 1 < len(spec) and spec[k + 1] > spec[k]:  # climb to the top of that peak
        k += 1
    return k * sr / n


def test_synthetic_music_is_deterministic_with_known_pitch() -> None:
    ds = SyntheticMusic(sample_rate=SR, crop_seconds=1.0, length=24, seed=5)
    assert len(ds) == 24
    again = SyntheticMusic(sample_rate=SR, crop_seconds=1.0, length=24, seed=5)
    other = SyntheticMusic(sample_rate=SR, crop_seconds=1.0, length=24, seed=6)
    for i in range(len(ds)):
        item = ds[i]
        assert item["audio"].shape == (SR,) and item["audio"].dtype == torch.float32
        assert item["index"] == i and 55.0 <= item["f0"] <= 880.0
        assert item["f0"] == pytest.approx(440 * 2 ** ((item["midi"] - 69) / 12))
        assert 0.2 < float(item["audio"].abs().max()) < 0.75  # -12 to -3 dBFS peak
        assert torch.equal(item["audio"], again[i]["audio"])
        assert not torch.equal(item["audio"], other[i]["audio"])
        measured = lowest_strong_peak(item["audio"], SR)
        assert measured == pytest.approx(item["f0"], rel=0.01), (i, item["f0"], measured)


def test_synthetic_music_respects_f0_range_and_rate() -> None:
    ds = SyntheticMusic(sample_rate=8000, crop_seconds=0.5, length=8, f0_range=(200.0, 210.0))
    for i in range(len(ds)):
        item = ds[i]
        assert item["audio"].shape == (4000,) and 200.0 <= item["f0"] <= 210.0
    with pytest.raises(ValueError, match="f0_range"):
        SyntheticMusic(sample_rate=8000, f0_range=(100.0, 5000.0))


# --------------------------------------------------------------------------------------------------
# Loader


def take(loader: Iterable[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    it: Iterator[dict[str, torch.Tensor]] = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def tiny() -> SyntheticMusic:
    return SyntheticMusic(sample_rate=8000, crop_seconds=0.05, length=10, seed=1)


def test_default_collate_audio(tiny: SyntheticMusic) -> None:
    batch = default_collate_audio([tiny[0], tiny[1]])
    assert batch["audio"].shape == (2, 400) and batch["index"].tolist() == [0, 1]
    assert batch["f0"].dtype == torch.float32 and batch["f0"].shape == (2,)
    with pytest.raises(ValueError, match="different lengths"):
        default_collate_audio([tiny[0], {"audio": torch.zeros(3), "index": 1}])


def test_loader_is_step_indexed_and_covers_each_epoch_once(tiny: SyntheticMusic) -> None:
    batches = take(make_loader(tiny, 4, seed=2), 5)  # 20 samples: two epochs of 10
    assert [b["index"].tolist() for b in batches[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    order = torch.cat([b["dataset_index"] for b in batches])
    assert sorted(order[:10].tolist()) == list(range(10))
    assert sorted(order[10:].tolist()) == list(range(10))
    assert order[:10].tolist() != order[10:].tolist()  # a fresh permutation per epoch
    for b in batches:  # the audio is the dataset's item
        for audio, i in zip(b["audio"], b["dataset_index"]):
            assert torch.equal(audio, tiny[int(i)]["audio"])
    assert_same_batches(take(make_loader(tiny, 4, seed=2), 5), batches)
    assert not torch.equal(take(make_loader(tiny, 4, seed=3), 1)[0]["dataset_index"],
                           batches[0]["dataset_index"])


def test_loader_resumes_exactly(tiny: SyntheticMusic) -> None:
    full = take(make_loader(tiny, 3, seed=7), 8)
    resumed = take(make_loader(tiny, 3, seed=7, start_step=5), 3)
    assert_same_batches(resumed, full[5:])


def test_ranks_split_the_batch_of_one_process(tiny: SyntheticMusic) -> None:
    single = take(make_loader(tiny, 6, seed=4), 4)
    ranks = [take(make_loader(tiny, 3, seed=4, rank=r, world_size=2), 4) for r in (0, 1)]
    for step in range(4):
        joined = {k: torch.cat([ranks[0][step][k], ranks[1][step][k]]) for k in single[step]}
        assert_same_batches([joined], [single[step]])


def test_workers_change_nothing(audio_dir: Path) -> None:
    """Crops depend on the epoch, which the loader sets inside each worker's copy of the dataset."""
    ds = crops(audio_dir, seed=1)
    in_process = take(make_loader(ds, 2, seed=5), 6)  # 12 samples of 5 files: three epochs
    in_workers = take(make_loader(ds, 2, seed=5, num_workers=2), 6)
    assert_same_batches(in_workers, in_process)
    assert_same_batches(take(make_loader(ds, 2, seed=5, start_step=4, num_workers=2), 2),
                        in_process[4:])


class _SignalsSeen(torch.utils.data.Dataset):
    """Items that say whether the process making them ignores Ctrl-C and SIGTERM."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, Any]:
        import signal

        ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))
        return {"audio": np.zeros(8, np.float32), "index": i, "ignored": int(ignored)}


def test_workers_leave_stop_signals_to_the_training_process() -> None:
    """Ctrl-C reaches the whole process group: a worker that died of it would fail the next batch
    ("DataLoader worker exited unexpectedly") before training could save its checkpoint."""
    (batch,) = take(make_loader(_SignalsSeen(), 4, seed=0, num_workers=1), 1)
    assert batch["ignored"].tolist() == [1, 1, 1, 1]


def test_loader_checks_its_arguments(tiny: SyntheticMusic) -> None:
    with pytest.raises(ValueError, match="rank"):
        make_loader(tiny, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(tiny, 0)


def test_an_item_of_a_file_damaged_part_way_is_the_same_in_any_process(tmp_path: Path) -> None:
    """After one crop of a file damaged part-way failed, its later crops were replaced in that
    process only: a resumed run (a fresh process) read them, and trained on other batches."""
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(tmp_path / f"good{i}.flac", 0.1 * rng.standard_normal(3 * SR), SR)
    sf.write(tmp_path / "damaged.flac", 0.1 * rng.standard_normal(20 * SR), SR)
    data = (tmp_path / "damaged.flac").read_bytes()
    (tmp_path / "damaged.flac").write_bytes(data[: len(data) // 2])  # its second half is gone

    def items(start: int, stop: int) -> dict[int, torch.Tensor]:
        ds = crops(tmp_path, length=60, seed=0)
        return {i: ds[i]["audio"] for i in range(start, stop)}

    whole, resumed = items(0, 60), items(30, 60)
    assert all(torch.equal(whole[i], resumed[i]) for i in range(30, 60))
