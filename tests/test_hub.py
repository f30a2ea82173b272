"""musicssl.hub against a loopback fake Hub: the real huggingface_hub client, every fault of TESTING.md."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakehub import CDN_HOST, HUB_HOST, FakeHub, git_blob_sha1, make_release_files, sha256_hex

from musicssl import hub
from musicssl.errors import (
    ChecksumError,
    DownloadError,
    ReleaseFormatError,
    WeightsNotCachedError,
    WeightsUnavailableError,
)
from musicssl.registry import ModelSpec

REPO = "musicssl-test/toy"
MODEL = "model.safetensors"


@pytest.fixture
def release(fake_hub: FakeHub) -> SimpleNamespace:
    """REPO on the fake Hub: one commit with a real config.json + model.safetensors on main."""
    files = make_release_files(seed=0)
    commit = fake_hub.add_repo(REPO, files)
    return SimpleNamespace(files=files, commit=commit, sha={k: sha256_hex(v) for k, v in files.items()})


def _spec(**kw: object) -> ModelSpec:
    base = dict(
        name="toy-test",
        family="toy",
        sample_rate=16000,
        frame_rate=50.0,
        embed_dim=8,
        num_layers=1,
        recommended_layer=-1,
        context_seconds=1.0,
    )
    return ModelSpec(**{**base, **kw})  # type: ignore[arg-type]


def _blobs(repo: str = REPO) -> list[Path]:
    folder = hub.hf_cache_dir() / ("models--" + repo.replace("/", "--")) / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


# --------------------------------------------------------------------------- settings


def test_is_offline_reads_env_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUSICSSL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not hub.is_offline()
    monkeypatch.setenv("MUSICSSL_OFFLINE", "yes")
    assert hub.is_offline()
    assert not hub.is_offline(False)  # an explicit argument wins
    monkeypatch.setenv("MUSICSSL_OFFLINE", "0")
    assert not hub.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "ON")
    assert hub.is_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub.is_offline(True)


def test_cache_folders_follow_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "MUSICSSL_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.hf_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    assert hub.cache_dir() == tmp_path / ".cache" / "musicssl"
    assert hub.hf_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "musicssl"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert hub.hf_cache_dir() == tmp_path / "hubcache"
    assert hub.cache_dir() == tmp_path / "ms"
    assert hub.hf_endpoint() == "http://mirror.example"


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 123)  # more than one read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert hub.sha256_file(path) == hashlib.sha256(data).hexdigest()


def _aged(path: Path) -> Path:
    """Set the mtime a minute back: file_sha256 remembers only files not written just now."""
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_file_sha256_reads_a_large_file_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_MEMO_MIN_BYTES", 1024)
    reads: list[str] = []
    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda p: reads.append(p) or real(p))
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(4096))
    _aged(path)
    first = hub.file_sha256(path)
    assert hub.file_sha256(path) == first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(reads) == 1
    with open(path, "r+b") as f:  # changed in place, same size
        f.write(b"\0" * 16)
    assert hub.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first
    assert len(reads) == 2
    fresh = tmp_path / "fresh.bin"  # written just now: hashed every time until it settles
    fresh.write_bytes(os.urandom(4096))
    assert hub.file_sha256(fresh) == hub.file_sha256(fresh)
    assert len(reads) == 4


def test_file_sha256_without_a_writable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(hub, "_MEMO_MIN_BYTES", 1024)
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(4096))
    _aged(path)
    assert hub.file_sha256(path) == hub.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "source, expected",
    [
        ("hf-hub:org/repo", ("org/repo", None)),
        ("hf-hub:org/repo@main", ("org/repo", "main")),
        ("hf-hub:Org_1/my.model-v2@" + "a" * 40, ("Org_1/my.model-v2", "a" * 40)),
        ("hf-hub:org/repo@refs/pr/1", ("org/repo", "refs/pr/1")),
    ],
)
def test_parse_hf_source_good(source: str, expected: tuple[str, str | None]) -> None:
    assert hub.parse_hf_source(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "hf-hub:",
        "hf-hub:repo",
        "hf-hub:org/",
        "hf-hub:/repo",
        "hf-hub:a/b/c",
        "hf-hub:org/re po",
        "hf-hub:org/repo@",
        "hf-hub:org--x/repo",
        "hf-hub:org/repo@../x",
        "hf-hub:org/-repo",
    ],
)
def test_parse_hf_source_bad(source: str) -> None:
    with pytest.raises(ReleaseFormatError, match="hf-hub:org/repo") as info:
        hub.parse_hf_source(source)
    assert isinstance(info.value, ValueError)
    assert repr(source) in str(info.value)


# --------------------------------------------------------------------------- Hub: the happy paths


def test_first_download_follows_lfs_redirect_and_names_blob_by_sha256(
    fake_hub: FakeHub, release: SimpleNamespace
) -> None:
    from safetensors.torch import load_file

    path = hub.fetch_hf(REPO, MODEL)
    assert path.read_bytes() == release.files[MODEL]
    assert set(load_file(path)) == {"proj.weight", "proj.bias"}
    assert path.parent.name == release.commit  # snapshots/<commit>/model.safetensors
    blob = Path(os.readlink(path))
    assert blob.name == release.sha[MODEL] and blob.parent.name == "blobs"
    assert fake_hub.log == [
        (HUB_HOST, "HEAD", f"/{REPO}/resolve/main/{MODEL}"),
        (CDN_HOST, "GET", f"/lfs/{release.sha[MODEL]}"),
    ]
    # A small file is served by the Hub itself and cached under its git blob id.
    config = hub.fetch_hf(REPO, "config.json")
    assert Path(os.readlink(config)).name == git_blob_sha1(release.files["config.json"])
    assert all(host == HUB_HOST for host, *_ in fake_hub.log[2:])


def test_cache_hit_with_pinned_commit_makes_zero_requests(fake_hub: FakeHub, release: SimpleNamespace) -> None:
    first = hub.fetch_hf(REPO, MODEL, release.commit, release.sha[MODEL])
    fake_hub.clear_requests()
    again = hub.fetch_hf(REPO, MODEL, release.commit, release.sha[MODEL])
    assert again == first
    assert fake_hub.requests == []


@pytest.mark.parametrize("how", ["argument", "MUSICSSL_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_hit_makes_zero_requests(
    fake_hub: FakeHub, release: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    online = hub.fetch_hf(REPO, MODEL)  # revision "main": a branch, resolved through refs/main offline
    fake_hub.clear_requests()
    if how != "argument":
        monkeypatch.setenv(how, "1")  # set after huggingface_hub was imported: read at call time
    offline = True if how == "argument" else None
    assert hub.fetch_hf(REPO, MODEL, offline=offline) == online
    assert hub.fetch_hf(REPO, MODEL, release.commit, offline=offline) == online
    assert fake_hub.requests == []


def test_offline_miss_fails_at_once_with_the_command_and_the_path(
    fake_hub: FakeHub, release: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WeightsNotCachedError) as info:
        hub.fetch_hf(REPO, MODEL, release.commit, offline=True)
    message = str(info.value)
    assert f"musicssl download hf-hub:{REPO}@{release.commit}" in message
    assert str(hub.hf_cache_dir() / "models--musicssl-test--toy") in message
    assert "offline=True" in message
    monkeypatch.setenv("MUSICSSL_OFFLINE", "true")
    with pytest.raises(WeightsNotCachedError, match="musicssl download toy-test") as info:
        hub.fetch_release(f"hf-hub:{REPO}", download_hint="musicssl download toy-test")
    assert "MUSICSSL_OFFLINE" in str(info.value)
    assert fake_hub.requests == []  # nothing reached the server, so nothing was retried either
    assert fake_hub.sleeps == []


# --------------------------------------------------------------------------- Hub: errors


@pytest.mark.parametrize(
    "repo, revision, filename, words",
    [
        ("musicssl-test/nope", None, MODEL, ["repository 'musicssl-test/nope' was not found", "HF_ENDPOINT"]),
        (REPO, "v9", MODEL, ["revision 'v9' does not exist", REPO]),
        (REPO, None, "weights.safetensors", ["no file 'weights.safetensors'", "revision 'main'"]),
    ],
    ids=["unknown-repo", "unknown-revision", "unknown-file"],
)
def test_unknown_repo_revision_or_file(
    fake_hub: FakeHub, release: SimpleNamespace, repo: str, revision: str | None, filename: str, words: list[str]
) -> None:
    with pytest.raises(DownloadError) as info:
        hub.fetch_hf(repo, filename, revision)
    for word in words:
        assert word in str(info.value)
    assert fake_hub.sleeps == []  # client errors are not retried


@pytest.mark.parametrize("filename", [MODEL, "config.json"], ids=["lfs-via-cdn", "small-file"])
def test_truncated_download_fails_and_keeps_nothing(fake_hub: FakeHub, release: SimpleNamespace, filename: str) -> None:
    fake_hub.truncate = True
    with pytest.raises(DownloadError, match=f"could not fetch '{filename}'.*run the same call again"):
        hub.fetch_hf(REPO, filename)
    assert _blobs() == []
    fake_hub.truncate = False
    assert hub.fetch_hf(REPO, filename).read_bytes() == release.files[filename]


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned-sha256", "lfs-etag"])
def test_corrupted_same_size_download_is_caught_and_removed(
    fake_hub: FakeHub, release: SimpleNamespace, pinned: bool
) -> None:
    data = release.files[MODEL]
    sha = release.sha[MODEL] if pinned else None
    fake_hub.corrupt = True
    bad_sha = sha256_hex(fake_hub.served(data, 0, len(data)))
    with pytest.raises(ChecksumError) as info:
        hub.fetch_hf(REPO, MODEL, sha256=sha)
    message = str(info.value)
    assert release.sha[MODEL] in message and bad_sha in message and MODEL in message
    assert "run" in message and "again" in message
    snapshot = hub.hf_cache_dir() / "models--musicssl-test--toy" / "snapshots" / release.commit
    assert not (snapshot / MODEL).is_symlink()
    assert _blobs() == []
    fake_hub.corrupt = False
    assert hub.fetch_hf(REPO, MODEL, sha256=sha).read_bytes() == data


@pytest.mark.parametrize("status, says", [
    (401, "needs a token"), (403, "needs a token"), (404, "has no such repository, revision or file"),
    (500, "overloaded or failing"), (503, "overloaded or failing"),
])
def test_an_http_error_without_the_hubs_code_says_what_the_server_answered(
    fake_hub: FakeHub, release: SimpleNamespace, status: int, says: str
) -> None:
    """A plain mirror, a proxy or an overloaded Hub answers without X-Error-Code: the server was
    reached, so "could not be reached, check your network" would send the user the wrong way."""
    fake_hub.fail_status = status
    with pytest.raises(DownloadError, match=f"answered HTTP {status}. .*{says}") as info:
        hub.fetch_hf(REPO, "config.json")
    assert "could not be reached" not in str(info.value)


def test_a_hugging_face_cache_that_cannot_be_written_says_where_to_point_it(
    fake_hub: FakeHub, release: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(DownloadError, match="point HF_HOME \\(or HF_HUB_CACHE\\) at a folder you may write to"):
        hub.fetch_hf(REPO, "config.json")


def test_a_corrupted_small_file_without_a_pin_is_caught_by_its_git_id(fake_hub: FakeHub, release: SimpleNamespace) -> None:
    """config.json is no LFS file and rarely pinned: the Hub names it by its git object id, which
    the content must match (a corrupted copy would otherwise stay cached and break every load)."""
    fake_hub.corrupt = True
    with pytest.raises(ChecksumError, match="does not match the git object id"):
        hub.fetch_hf(REPO, "config.json")
    assert _blobs() == []
    fake_hub.corrupt = False
    assert hub.fetch_hf(REPO, "config.json").read_bytes() == release.files["config.json"]


def test_a_remembered_cache_hit_corrupted_later_is_still_caught(
    fake_hub: FakeHub, release: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "_MEMO_MIN_BYTES", 1)
    path = hub.fetch_hf(REPO, MODEL, release.commit, release.sha[MODEL])
    blob = _aged(path.resolve())
    assert hub.fetch_hf(REPO, MODEL, release.commit, release.sha[MODEL]) == path  # hashed and remembered
    assert list((hub.cache_dir() / "sha256").glob("*.json"))
    with open(blob, "r+b") as f:  # a flipped byte in the cached weights
        f.seek(len(release.files[MODEL]) // 2)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    with pytest.raises(ChecksumError):
        hub.fetch_hf(REPO, MODEL, release.commit, release.sha[MODEL])
    assert not blob.exists()  # the corrupted copy was removed


def test_server_down_with_nothing_cached(fake_hub: FakeHub, release: SimpleNamespace) -> None:
    fake_hub.stop()
    with pytest.raises(DownloadError) as info:
        hub.fetch_hf(REPO, MODEL)
    message = str(info.value)
    assert fake_hub.url in message and "could not be reached" in message
    assert "HF_ENDPOINT" in message and "MUSICSSL_OFFLINE=1" in message
    assert len(fake_hub.sleeps) >= 3  # the client did back off (recorded, not slept)


def test_server_down_still_serves_a_cached_branch(fake_hub: FakeHub, release: SimpleNamespace) -> None:
    path = hub.fetch_hf(REPO, MODEL, sha256=release.sha[MODEL])
    fake_hub.stop()
    assert hub.fetch_hf(REPO, MODEL, sha256=release.sha[MODEL]) == path
    assert fake_hub.sleeps == []  # the client falls back to the cache without retrying


def test_revision_moved_after_pinning(
    fake_hub: FakeHub, release: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pin = release.sha[MODEL]
    hub.fetch_hf(REPO, MODEL, "main", pin)
    fake_hub.move_ref(REPO, make_release_files(seed=1))
    with pytest.raises(ChecksumError) as info:
        hub.fetch_hf(REPO, MODEL, "main", pin)
    message = str(info.value)
    assert pin in message and sha256_hex(make_release_files(seed=1)[MODEL]) in message
    assert "moved" in message and "40-hex commit" in message
    # A pinned commit keeps giving the original bytes: from the cache, and from the server afresh.
    fake_hub.clear_requests()
    assert hub.fetch_hf(REPO, MODEL, release.commit, pin).read_bytes() == release.files[MODEL]
    assert fake_hub.requests == []
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "fresh-cache"))
    assert hub.fetch_hf(REPO, MODEL, release.commit, pin).read_bytes() == release.files[MODEL]
    assert fake_hub.requests


# --------------------------------------------------------------------------- URLs


def test_fetch_url_downloads_then_hits_the_cache(fake_hub: FakeHub) -> None:
    data = os.urandom(3000)
    sha = sha256_hex(data)
    url = fake_hub.add_url_file("upstream/model.ckpt", data)
    path = hub.fetch_url(url, sha)
    assert path == hub.cache_dir() / "url" / sha / "model.ckpt"
    assert path.read_bytes() == data
    assert fake_hub.requests == [("GET", "/files/upstream/model.ckpt")]
    fake_hub.clear_requests()
    assert hub.fetch_url(url, sha.upper(), offline=False) == path
    assert hub.fetch_url(url, sha, offline=True) == path
    assert fake_hub.requests == []
    assert hub.fetch_url(url, sha, filename="renamed.ckpt").name == "renamed.ckpt"


@pytest.mark.parametrize("fault", ["wrong-pin", "corrupt", "truncate"])
def test_fetch_url_checksum_mismatch_keeps_nothing(fake_hub: FakeHub, fault: str) -> None:
    data = os.urandom(4096)
    url = fake_hub.add_url_file("w.bin", data)
    sha = sha256_hex(b"something else") if fault == "wrong-pin" else sha256_hex(data)
    if fault != "wrong-pin":
        setattr(fake_hub, fault, True)
    served = fake_hub.served(data, 0, len(data))
    with pytest.raises(ChecksumError) as info:
        hub.fetch_url(url, sha)
    assert sha in str(info.value) and sha256_hex(served) in str(info.value) and url in str(info.value)
    assert list((hub.cache_dir() / "url" / sha).iterdir()) == []  # no file, no temp file


def test_fetch_url_offline_miss(fake_hub: FakeHub) -> None:
    data = b"weights"
    url = fake_hub.add_url_file("x.pt", data)
    with pytest.raises(WeightsNotCachedError) as info:
        hub.fetch_url(url, sha256_hex(data), offline=True, download_hint="musicssl download upstream-x")
    message = str(info.value)
    assert "musicssl download upstream-x" in message
    assert str(hub.cache_dir() / "url" / sha256_hex(data) / "x.pt") in message
    assert fake_hub.requests == []


def test_fetch_url_http_error_and_unreachable(fake_hub: FakeHub) -> None:
    url = f"{fake_hub.cdn_url}/files/missing.pt"
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        hub.fetch_url(url, "0" * 64)
    assert url in str(info.value)
    fake_hub.stop()
    with pytest.raises(DownloadError, match="could not download") as info:
        hub.fetch_url(url, "0" * 64)
    assert url in str(info.value)


# --------------------------------------------------------------------------- releases


def test_fetch_release_from_the_hub_then_offline(
    fake_hub: FakeHub, release: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = hub.fetch_release(f"hf-hub:{REPO}", files=release.sha)
    assert folder.name == release.commit
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", MODEL]  # no README: ignored
    fake_hub.clear_requests()
    # Pinned to the commit, everything (the known-absent card included) comes from the cache.
    assert hub.fetch_release(f"hf-hub:{REPO}@{release.commit}", files=release.sha) == folder
    assert hub.fetch_release(f"hf-hub:{REPO}", revision=release.commit) == folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.fetch_release(f"hf-hub:{REPO}") == folder
    assert fake_hub.requests == []
    with pytest.raises(ReleaseFormatError, match="pass only one"):
        hub.fetch_release(f"hf-hub:{REPO}@main", revision=release.commit)


@pytest.mark.parametrize("pinned", [True, False], ids=["commit", "branch"])
def test_cached_release_loads_while_the_hub_is_down(fake_hub: FakeHub, release: SimpleNamespace, pinned: bool) -> None:
    spec = _spec(weights=f"hf-hub:{REPO}", revision=release.commit if pinned else None, files=release.sha)
    paths = hub.fetch_spec_files(spec)  # what `musicssl download` does: the card is never asked for
    fake_hub.stop()
    folder = hub.fetch_release(spec.weights, revision=spec.revision, files=spec.files)
    assert folder == paths[MODEL].parent
    assert fake_hub.sleeps == []  # nothing waited on the client's retries


def test_fetch_release_keeps_one_commit_and_its_card(fake_hub: FakeHub) -> None:
    files = make_release_files(seed=3, card=True)
    commit = fake_hub.add_repo("musicssl-test/carded", files)
    folder = hub.fetch_release("hf-hub:musicssl-test/carded")
    assert folder.name == commit
    assert (folder / "README.md").read_bytes() == files["README.md"]
    # The files after the first are asked for at the commit the first one came from.
    assert (HUB_HOST, "HEAD", f"/musicssl-test/carded/resolve/{commit}/{MODEL}") in fake_hub.log


def test_fetch_release_local_folder(tmp_path: Path) -> None:
    files = make_release_files()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sha = {k: sha256_hex(v) for k, v in files.items()}
    assert hub.fetch_release(str(tmp_path), files=sha) == tmp_path
    with pytest.raises(ChecksumError, match=sha["config.json"]):
        hub.fetch_release(str(tmp_path), files={"config.json": sha[MODEL]})
    (tmp_path / MODEL).unlink()
    with pytest.raises(ReleaseFormatError) as info:
        hub.fetch_release(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and MODEL in message and "save_pretrained" in message
    with pytest.raises(ReleaseFormatError, match="hf-hub:org/not-here"):
        hub.fetch_release("org/not-here")


def test_bundled_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "_bundled_root", lambda: tmp_path)
    (tmp_path / "toy").mkdir()
    files = make_release_files()
    for name, data in files.items():
        (tmp_path / "toy" / name).write_bytes(data)
    sha = {k: sha256_hex(v) for k, v in files.items()}
    assert hub.bundled_dir("toy") == tmp_path / "toy"
    assert hub.fetch_release("bundled:toy", files=sha) == tmp_path / "toy"
    assert hub.fetch_spec_files(_spec(weights="bundled:toy", files=sha)) == {k: tmp_path / "toy" / k for k in files}
    with pytest.raises(ChecksumError):
        hub.fetch_spec_files(_spec(weights="bundled:toy", files={MODEL: sha["config.json"]}))
    assert (tmp_path / "toy" / MODEL).exists()  # a bundled file is reported, never deleted
    with pytest.raises(WeightsUnavailableError, match="'nope'"):
        hub.bundled_dir("nope")


# --------------------------------------------------------------------------- registry specs and download


def test_fetch_spec_files_from_the_hub(fake_hub: FakeHub, release: SimpleNamespace) -> None:
    spec = _spec(weights=f"hf-hub:{REPO}", revision=release.commit, files=release.sha)
    with pytest.raises(WeightsNotCachedError, match="`musicssl download toy-test`"):
        hub.fetch_spec_files(spec, offline=True)
    paths = hub.fetch_spec_files(spec)
    assert {k: p.read_bytes() for k, p in paths.items()} == release.files
    fake_hub.clear_requests()
    assert hub.download(spec) == paths[MODEL].parent
    # What `load` then does: the release is cached, so not even its optional card is asked for.
    assert hub.fetch_release(spec.weights, revision=spec.revision, files=spec.files) == paths[MODEL].parent
    assert hub.download(f"hf-hub:{REPO}@{release.commit}") == paths[MODEL].parent
    assert fake_hub.requests == []


@pytest.mark.parametrize("whole_url", [False, True], ids=["base-url", "file-url"])
def test_fetch_spec_files_from_urls(fake_hub: FakeHub, whole_url: bool) -> None:
    data = os.urandom(500)
    url = fake_hub.add_url_file("ckpt/encoder.pt", data)
    weights = url if whole_url else url.rsplit("/", 1)[0] + "/"
    spec = _spec(weights=weights, files={"encoder.pt": sha256_hex(data)})
    paths = hub.fetch_spec_files(spec)
    assert paths["encoder.pt"].read_bytes() == data
    assert fake_hub.requests == [("GET", "/files/ckpt/encoder.pt")]


def test_fetch_spec_files_without_weights() -> None:
    assert hub.fetch_spec_files(_spec(needs_weights=False)) == {}
    with pytest.raises(WeightsUnavailableError, match="toy-test"):
        hub.fetch_spec_files(_spec())


# --------------------------------------------------------------------------- the fake Hub itself


def test_fake_hub_serves_snapshot_download(fake_hub: FakeHub, release: SimpleNamespace, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(REPO, endpoint=fake_hub.url, cache_dir=tmp_path / "snap"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == release.files
    assert ("GET", f"/api/models/{REPO}/revision/main") in fake_hub.requests
