"""Where weights come from: the Hugging Face Hub, sha256-pinned URLs, the wheel, or a local folder.

Sources understood here:

    hf-hub:org/repo[@rev]   a release on the Hub (config.json + model.safetensors [+ README.md])
    bundled:NAME            a release folder shipped inside the wheel (musicssl/weights/NAME)
    https://host/path       upstream files hosted elsewhere, always pinned by sha256
    /some/folder            a local release folder (what `musicssl.save_pretrained` writes)

Every file is checked against its sha256 by musicssl itself before anything reads it: the Hub client
does not notice a corrupted body of the right size. Offline mode (`offline=True`, `MUSICSSL_OFFLINE=1`
or `HF_HUB_OFFLINE=1`, read at call time) never touches the network and fails at once when a file is
missing. huggingface_hub is imported inside the functions that need it, so `import musicssl` stays cheap.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from musicssl.errors import (
    ChecksumError,
    DownloadError,
    MusicsslError,
    OutputPathError,
    ReleaseFormatError,
    WeightsNotCachedError,
    WeightsUnavailableError,
    first_line,
)

if TYPE_CHECKING:
    from musicssl.registry import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
RELEASE_FILES = ("config.json", "model.safetensors")  # what every release folder must hold
CARD_FILE = "README.md"  # optional in a release

_TRUE = {"1", "true", "yes", "on"}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1_RE = re.compile(r"[0-9a-f]{40}")  # a git object name: a commit, or a blob's
# The Hub's repo id rules: word characters, '.', '-'; no '--' or '..'; at most 96 characters.
_REPO_PART_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_REVISION_RE = re.compile(r"[A-Za-z0-9_.\-/]+")
_CHUNK = 1 << 20  # bytes read at a time when hashing or downloading
_MEMO_MIN_BYTES = 8 << 20  # files this large have their sha256 remembered (file_sha256)
_MEMO_SETTLE_S = 2.0  # ...once their mtime is this old: coarse clocks may not show a quick rewrite
_URL_TIMEOUT = 30.0  # seconds without data before a URL download gives up


# --------------------------------------------------------------------------- settings (call time)


def is_offline(offline: bool | None = None) -> bool:
    """Whether to stay off the network: `offline` when given, else MUSICSSL_OFFLINE / HF_HUB_OFFLINE."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("MUSICSSL_OFFLINE", "HF_HUB_OFFLINE"))


def offline_reason(offline: bool | None) -> str:
    """Why musicssl is offline, for messages: the argument or the variables that say so."""
    if offline:
        return "offline=True was passed"
    names = [v for v in ("MUSICSSL_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").strip().lower() in _TRUE]
    if names:
        return f"{' and '.join(names)} is set"
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, and then refuses every request.
    return "HF_HUB_OFFLINE was set when huggingface_hub was imported"


# Under cache_dir(): ports converted from their upstream files on first use, as release folders.
CONVERTED_DIR = "converted"


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    # Same fallback as huggingface_hub itself, so both find the same files.
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hf_endpoint() -> str:
    """The Hub endpoint: HF_ENDPOINT read now (huggingface_hub reads it only once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """musicssl's own cache (URL downloads, converted weights): MUSICSSL_CACHE, else XDG, else ~/.cache."""
    if os.environ.get("MUSICSSL_CACHE"):
        return Path(os.path.expandvars(os.environ["MUSICSSL_CACHE"])).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "musicssl"
    return Path("~/.cache/musicssl").expanduser()


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256_file(path), remembered for large files under cache_dir()/sha256/.

    A cached release was hashed again on every load(): 0.27 of 0.58 s for an 85M-parameter model.
    A file whose size, inode, mtime and ctime are those it had when hashed is not read again; any
    write changes its ctime. Corruption that leaves all of these alone (a failing disk) goes unseen,
    as it does for the Hub client, which never checks its cache.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    if st.st_size < _MEMO_MIN_BYTES:
        return sha256_file(real)
    ident = [st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    memo = cache_dir() / "sha256" / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        seen = json.loads(memo.read_text())
        if seen["path"] == real and seen["stat"] == ident:
            return str(seen["sha256"])
    sha = sha256_file(real)  # after the stat: a write meanwhile leaves a memo that no longer matches
    if time.time() - st.st_mtime > _MEMO_SETTLE_S:
        _write_memo(memo, {"path": real, "stat": ident, "sha256": sha})
    return sha


def _write_memo(memo: Path, record: dict[str, Any]) -> None:
    """Write atomically; a cache that cannot be written only means hashing again next time."""
    tmp = None
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=memo.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, memo)
    except OSError as err:
        logger.debug("cannot remember the sha256 of %s in %s: %s", record["path"], memo, err)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _git_blob_sha1(path: Path) -> str:
    """The git object id of a file: how the Hub names (and caches) small non-LFS files."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _normalize_sha256(value: str, what: str) -> str:
    sha = value.strip().lower()
    if not _SHA256_RE.fullmatch(sha):
        raise ValueError(f"sha256 for {what} must be 64 hex digits, got {value!r}")
    return sha


# --------------------------------------------------------------------------- Hub


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """'hf-hub:org/repo@rev' -> ('org/repo', 'rev'); the '@rev' part is optional.

    Raises ReleaseFormatError (a ValueError): a malformed source is a bad value naming a release,
    found before any I/O, not a failed download.
    """
    rest = source.strip()
    if rest.startswith("hf-hub:"):
        rest = rest[len("hf-hub:") :]
    repo_id, at, revision = rest.partition("@")
    problem = _repo_id_problem(repo_id)
    if (
        problem is None
        and at
        and not (_REVISION_RE.fullmatch(revision) and ".." not in revision and not revision.startswith("/"))
    ):
        problem = f"the revision after '@' must be a commit, branch or tag name, got {revision!r}"
    if problem is not None:
        raise ReleaseFormatError(
            f"invalid Hub source {source!r}: {problem}. "
            "Write it as 'hf-hub:org/repo' or 'hf-hub:org/repo@revision' (a 40-hex commit, branch or tag)."
        )
    return repo_id, (revision if at else None)


def _repo_id_problem(repo_id: str) -> str | None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        return f"the repo id must be 'org/name', got {repo_id!r}"
    if len(repo_id) > 96:
        return f"the repo id is longer than 96 characters ({len(repo_id)})"
    for part in parts:
        if not _REPO_PART_RE.fullmatch(part) or "--" in part or ".." in part:
            return f"{part!r} may only hold letters, digits, '_', '.' and '-' (no '--' or '..', no '.'/'-' at the ends)"
    return None


def _repo_cache_folder(repo_id: str) -> Path:
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _hf_errors() -> tuple[type[BaseException], ...]:
    """The exceptions hf_hub_download raises for a failed fetch (client errors, transport, disk)."""
    from huggingface_hub import utils as hf_utils

    transport: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x speaks httpx2; 1.x httpx
        with contextlib.suppress(ImportError):
            transport.append(__import__(module).HTTPError)
    return (hf_utils.HfHubHTTPError, hf_utils.EntryNotFoundError, OSError, *transport)


def _translate_hf_error(
    err: BaseException,
    *,
    repo_id: str,
    filename: str,
    revision: str | None,
    offline: bool | None,
    hint: str | None,
) -> MusicsslError:
    """An actionable musicssl error for what hf_hub_download raised."""
    from huggingface_hub import utils as hf_utils

    rev = revision or "main"
    what = f"{filename!r} of hf-hub:{repo_id}@{rev}"
    endpoint = hf_endpoint()
    offline_miss = is_offline(offline) or isinstance(err.__cause__, hf_utils.OfflineModeIsEnabled)
    if isinstance(err, hf_utils.LocalEntryNotFoundError) and offline_miss:
        return _not_cached_error(what, _repo_cache_folder(repo_id), hint, offline)
    coded = (hf_utils.GatedRepoError, hf_utils.RepositoryNotFoundError, hf_utils.RevisionNotFoundError,
             hf_utils.EntryNotFoundError)  # the Hub's X-Error-Code said what: the messages below say more
    status = _http_status(err)
    said = err if not isinstance(err, hf_utils.LocalEntryNotFoundError) else err.__cause__ or err.__context__
    if status is not None and not isinstance(said, coded):  # (LocalEntryNotFoundError is an EntryNotFoundError)
        return DownloadError(f"could not fetch {what}: {endpoint} answered HTTP {status}. {_status_fix(status)}")
    return _hub_answer(err, what, repo_id, filename, rev, endpoint) or _transfer_error(err, what, endpoint)


def _hub_answer(err: BaseException, what: str, repo_id: str, filename: str, rev: str,
                endpoint: str) -> DownloadError | None:
    """What the Hub said (or that it could not be reached), as a DownloadError with its fix; None
    for other errors."""
    from huggingface_hub import utils as hf_utils

    if isinstance(err, hf_utils.LocalEntryNotFoundError):
        return DownloadError(
            f"could not fetch {what}: {endpoint} could not be reached (the client already retried) and the "
            f"file is not in the cache {_repo_cache_folder(repo_id)}. Cause: {first_line(err.__cause__ or err)}. "
            f"Check your network and HF_ENDPOINT (now {endpoint!r}); if the file was downloaded before "
            "under another cache folder, point HF_HUB_CACHE at it and work offline with MUSICSSL_OFFLINE=1."
        )
    if isinstance(err, hf_utils.GatedRepoError):
        return DownloadError(
            f"could not fetch {what}: the repository is gated. Accept its conditions at "
            f"{endpoint}/{repo_id} and log in (`hf auth login`, or set HF_TOKEN)."
        )
    if isinstance(err, hf_utils.RepositoryNotFoundError):
        return DownloadError(
            f"could not fetch {what}: repository {repo_id!r} was not found on {endpoint}. Check the spelling "
            "of 'org/name'; a private repository also needs a token (`hf auth login` or HF_TOKEN); "
            "check HF_ENDPOINT if you use a mirror."
        )
    if isinstance(err, hf_utils.RevisionNotFoundError):
        return DownloadError(
            f"could not fetch {what}: revision {rev!r} does not exist in {repo_id!r} on {endpoint}. "
            "Check the commit, branch or tag after '@' (a commit may have been squashed away)."
        )
    if isinstance(err, hf_utils.EntryNotFoundError):
        return DownloadError(
            f"could not fetch {what}: the repository has no file {filename!r} at revision {rev!r}. "
            "Check that the repository holds a musicssl release (config.json + model.safetensors) "
            "at that revision."
        )
    if isinstance(err, hf_utils.HfHubHTTPError):
        return DownloadError(f"could not fetch {what} from {endpoint}: {first_line(err)}. Try again later.")
    return None


def _transfer_error(err: BaseException, what: str, endpoint: str) -> DownloadError:
    """A download that failed on this side: the cache not writable, the disk, a cut connection."""
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EPERM):
        return DownloadError(
            f"could not fetch {what}: {first_line(err)}. The Hugging Face cache cannot be written there: point "
            "HF_HOME (or HF_HUB_CACHE) at a folder you may write to; running again as it is would fail the same way."
        )
    if isinstance(err, OSError):
        # Disk trouble, or the client's own size check on a short body ("Consistency check failed").
        return DownloadError(
            f"could not fetch {what}: {first_line(err)} Nothing was kept in the cache: run the same call "
            f"again (and check free disk space in {hf_cache_dir()})."
        )
    return DownloadError(
        f"could not fetch {what}: the download from {endpoint} was interrupted ({type(err).__name__}: "
        f"{first_line(err)}). Run the same call again; check your network and HF_ENDPOINT."
    )


def _http_status(err: BaseException) -> int | None:
    """The HTTP status the server answered, from the error or the one it wraps (None: no answer)."""
    for e in (err, err.__cause__ or err.__context__):  # huggingface_hub raises some inside `except`
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _status_fix(status: int) -> str:
    if status in (401, 403):
        return ("A private or gated repository needs a token (`hf auth login`, or HF_TOKEN); a mirror "
                "(HF_ENDPOINT) may refuse what it does not hold.")
    if status == 404:
        return ("The server has no such repository, revision or file: check the name after 'hf-hub:' and the "
                "revision after '@', and HF_ENDPOINT if you use a mirror.")
    return "The server is overloaded or failing (the client already retried): try again later."


def _not_cached_error(what: str, searched: Path, hint: str | None, offline: bool | None) -> WeightsNotCachedError:
    fix = f"run `{hint}` once while online" if hint else "call again once while online, offline mode off"
    return WeightsNotCachedError(
        f"{what} is not in the local cache and musicssl is offline ({offline_reason(offline)}). "
        f"Searched: {searched}. To fetch it, {fix}."
    )


def _hf_download(repo_id: str, filename: str, revision: str | None, *, offline: bool | None, hint: str | None) -> Path:
    """hf_hub_download into hf_cache_dir() from hf_endpoint(), errors translated; no verification."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from musicssl import __version__

    offline_now = is_offline(offline)
    if offline_now or (revision is not None and _GIT_SHA1_RE.fullmatch(revision)):
        # Answer from the cache without calling hf_hub_download: even with local_files_only it builds
        # headers whose telemetry may contact the Hub once per process.
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(), revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if offline_now:
            what = f"{filename!r} of hf-hub:{repo_id}@{revision or 'main'}"
            raise _not_cached_error(what, _repo_cache_folder(repo_id), hint, offline)
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=hf_cache_dir(),
            endpoint=hf_endpoint(),
            local_files_only=False,  # offline calls were answered above, from the cache alone
            library_name="musicssl",
            library_version=__version__,
        )
    except _hf_errors() as err:
        raise _translate_hf_error(
            err, repo_id=repo_id, filename=filename, revision=revision, offline=offline, hint=hint
        ) from err
    return Path(path)


def fetch_hf(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    sha256: str | None = None,
    *,
    offline: bool | None = None,
    download_hint: str | None = None,
) -> Path:
    """A file of a Hub repo, from the cache or downloaded, verified; returns its snapshot path.

    The file is checked against `sha256` when pinned, else against the LFS etag (the sha256 the Hub
    names large files by). Meant for safetensors and json files only: nothing here unpickles.
    """
    rev = revision or "main"
    hint = download_hint or f"musicssl download hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    expected = _normalize_sha256(sha256, filename) if sha256 else None
    path = _hf_download(repo_id, filename, revision, offline=offline, hint=hint)
    _verify_hub_file(path, expected, repo_id=repo_id, filename=filename, revision=rev)
    return path


def _blob_of(pointer: Path) -> Path:
    """The cache blob a snapshot entry links to (the entry itself where symlinks are unsupported)."""
    if pointer.is_symlink():
        # normpath only folds the '../..' of the link: snapshots/<commit> holds no symlinked folders.
        return Path(os.path.normpath(pointer.parent / os.readlink(pointer)))
    return pointer


def _verify_hub_file(pointer: Path, expected: str | None, *, repo_id: str, filename: str, revision: str) -> None:
    what = f"{filename!r} of hf-hub:{repo_id}@{revision}"
    blob = _blob_of(pointer)
    etag_sha = blob.name if _SHA256_RE.fullmatch(blob.name) else None
    expected = expected or etag_sha
    if expected is None:
        # A small (non-LFS) file is cached under its git object id: check the content against it.
        if _GIT_SHA1_RE.fullmatch(blob.name) and _git_blob_sha1(pointer) != blob.name:
            raise _corrupted(pointer, blob, f"{what} does not match the git object id it was served under "
                                            f"({blob.name})")
        logger.debug("%s has no sha256 pin and a non-LFS etag: checked against its git object id", what)
        return
    actual = file_sha256(pointer)
    if actual == expected:
        return
    # Tell a corrupted blob (its content does not match the etag it is named by) from an intact file
    # that is simply not the pinned one (the revision moved): only the first is worth deleting.
    if etag_sha is not None:
        intact = actual == etag_sha
    elif _GIT_SHA1_RE.fullmatch(blob.name):
        intact = _git_blob_sha1(pointer) == blob.name
    else:
        intact = False
    if intact:
        raise ChecksumError(
            f"checksum mismatch for {what} ({pointer}): expected sha256 {expected} (pinned), got {actual}. "
            f"The file downloaded intact but is not the pinned one: revision {revision!r} has probably "
            f"moved on the server since it was pinned. Pin a 40-hex commit ('hf-hub:{repo_id}@<commit>') "
            "or upgrade musicssl for an updated pin."
        )
    raise _corrupted(pointer, blob, f"checksum mismatch for {what}: expected sha256 {expected}, got {actual}")


def _corrupted(pointer: Path, blob: Path, mismatch: str) -> ChecksumError:
    """Delete a cached download whose content is not what it should be; the error that says so."""
    pointer.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    return ChecksumError(
        f"{mismatch}. The download was corrupted (or the cached copy was modified); musicssl deleted it "
        f"({blob}), so running the same call again downloads it afresh. If it fails again, the server or a "
        "proxy is altering the file."
    )


def _snapshot_root(pointer: Path, filename: str) -> Path:
    """snapshots/<commit>/ for the snapshot entry of `filename` (which may hold '/')."""
    return pointer.parents[len(Path(filename).parts) - 1]


def snapshot_commit(pointer: Path, filename: str) -> str | None:
    """The Hub commit a cached file `filename` came from (its snapshot folder's name), or None when
    `pointer` is not in a snapshot."""
    name = _snapshot_root(Path(pointer), filename).name
    return name if _GIT_SHA1_RE.fullmatch(name) else None


def _fetch_hf_files(
    repo_id: str,
    revision: str | None,
    files: Mapping[str, str | None],
    *,
    offline: bool | None,
    download_hint: str | None,
) -> dict[str, Path]:
    """Several files of one repo, all from the same commit even when `revision` is a branch."""
    paths: dict[str, Path] = {}
    for filename, sha in files.items():
        paths[filename] = fetch_hf(repo_id, filename, revision, sha, offline=offline, download_hint=download_hint)
        if revision is None or not _GIT_SHA1_RE.fullmatch(revision):
            # Pin the rest to the commit the first file came from: if the branch moves meanwhile we
            # still get one consistent snapshot, and cached files cost no request.
            revision = _snapshot_root(paths[filename], filename).name
    return paths


def _cached_commit(repo_id: str, revision: str | None, names: Iterable[str]) -> str | None:
    """The commit whose cached snapshot already holds all `names` (no request), else None."""
    from huggingface_hub import try_to_load_from_cache

    commits = set()
    for name in names:
        cached = try_to_load_from_cache(repo_id, name, cache_dir=hf_cache_dir(), revision=revision)
        if not isinstance(cached, str):
            return None
        commits.add(_snapshot_root(Path(cached), name).name)
    return commits.pop() if len(commits) == 1 else None


def _fetch_optional_hf(repo_id: str, filename: str, commit: str, *, offline: bool | None) -> Path | None:
    """A file that a release may lack (the model card); None when absent."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub import utils as hf_utils

    cached = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(), revision=commit)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None or is_offline(offline):  # known to be absent, or we may not ask
        return None
    try:
        path = _hf_download(repo_id, filename, commit, offline=offline, hint=None)
    except DownloadError as err:
        cause = err.__cause__
        if not isinstance(cause, hf_utils.EntryNotFoundError) or isinstance(cause, hf_utils.LocalEntryNotFoundError):
            # The card is optional: a release whose weights are cached must load while the Hub is down.
            logger.warning("skipping %s of %s: %s", filename, repo_id, err)
        # Otherwise it is absent; the client records that, so the next call asks nothing.
        return None
    _verify_hub_file(path, None, repo_id=repo_id, filename=filename, revision=commit)
    return path


# --------------------------------------------------------------------------- URLs


def _url_filename(url: str) -> str:
    name = urllib.parse.unquote(Path(urllib.parse.urlsplit(url).path).name)
    if not name:
        raise ValueError(f"cannot name a file after {url!r}: pass filename=")
    return name


def fetch_url(
    url: str,
    sha256: str,
    *,
    filename: str | None = None,
    offline: bool | None = None,
    download_hint: str | None = None,
) -> Path:
    """A file hosted outside the Hub, pinned by sha256, cached under cache_dir()/url/<sha256>/."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs can be fetched, got {url!r}")
    sha = _normalize_sha256(sha256, url)
    name = filename or _url_filename(url)
    if "/" in name or name in (".", ".."):
        raise ValueError(f"filename must be a plain file name, got {name!r}")
    target = cache_dir() / "url" / sha / name
    if target.is_file():
        actual = file_sha256(target)
        if actual == sha:
            return target
        logger.warning("cached %s has sha256 %s, expected %s: fetching it again", target, actual, sha)
        target.unlink()
    if is_offline(offline):
        raise _not_cached_error(f"{name!r} from {url}", target, download_hint, offline)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot keep downloads in the musicssl cache {cache_dir()}: {err.strerror or err}; "
                              "point MUSICSSL_CACHE at a folder you may write to") from err
    _download_url(url, target, sha)
    return target


def _download_url(url: str, target: Path, sha: str) -> None:
    """Stream `url` into a temp file next to `target`, check it, then rename it into place."""
    import http.client
    import urllib.error

    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                actual, received, declared = _stream(url, out, target.name)
        except urllib.error.HTTPError as err:
            raise DownloadError(
                f"could not download {url}: the server answered HTTP {err.code} {err.reason}. "
                "Check that the URL still serves this file (upstream may have moved it)."
            ) from err
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"could not download {url}: {reason}. Check your network and that the host is up; "
                f"on a machine without access, copy the file to {target} by hand."
            ) from err
        if declared is not None and received != declared:
            raise DownloadError(
                f"could not download {url}: got {received} of {declared} bytes (connection cut). "
                "Run the same call again."
            )
        if actual != sha:
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {sha}, got {actual}. The file was not kept. "
                "If this repeats, the upstream file has changed: report it so the pin can be reviewed."
            )
        os.replace(tmp, target)  # atomic: a reader never sees a half-written file
        logger.info("downloaded %s -> %s", url, target)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out: Any, label: str) -> tuple[str, int, int | None]:
    """Copy `url` into `out`; returns (sha256, bytes received, Content-Length or None)."""
    import urllib.request

    from musicssl import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"musicssl/{__version__}"})
    digest = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(request, timeout=_URL_TIMEOUT) as response:
        length = response.headers.get("Content-Length")
        declared = int(length) if length and length.isdigit() else None
        with _progress(declared, label) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar(len(chunk))
    return digest.hexdigest(), received, declared


@contextlib.contextmanager
def _progress(total: int | None, label: str) -> Iterator[Any]:
    """A byte counter callback: a tqdm bar on a terminal, nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024) as bar:
        yield bar.update


# --------------------------------------------------------------------------- releases


def _bundled_root() -> Path:
    import musicssl

    return Path(musicssl.__file__).parent / "weights"


def weights_home(path: Path) -> str | None:
    """The folder `load()` reads weights from that `path` lies in (the bundled weights, a model's
    tree in the Hugging Face cache, musicssl's converted ports), said in words; None for any other."""
    real = Path(os.path.realpath(path))
    for what, root in (("musicssl's bundled weights", _bundled_root()),
                       ("musicssl's converted weights", cache_dir() / CONVERTED_DIR)):
        if real.is_relative_to(os.path.realpath(root)):
            return f"{what} ({root})"
    hf = Path(os.path.realpath(hf_cache_dir()))
    if real.is_relative_to(hf) and real != hf and real.relative_to(hf).parts[0].startswith("models--"):
        return f"the Hugging Face cache ({hf_cache_dir()})"
    return None


def bundled_dir(name: str) -> Path:
    """The folder of weights shipped inside the wheel: musicssl/weights/NAME.

    Raises WeightsUnavailableError: the named weights are not available in this installation.
    """
    root = _bundled_root()
    folder = root / name
    if not name or "/" in name or name in (".", "..") or not folder.is_dir():
        raise WeightsUnavailableError(
            f"bundled weights {name!r} are not in this installation (looked for {folder}). "
            "Reinstall musicssl (`pip install --force-reinstall musicssl`); in a source checkout, "
            f"the folder must exist under {root}."
        )
    return folder


def _verify_local(path: Path, sha: str | None) -> Path:
    """A file of a bundled or local release, checked against its pin; never deleted (not ours)."""
    if not path.is_file():
        raise ReleaseFormatError(f"{path.parent} lacks {path.name}, which this model needs.")
    if sha:
        expected = _normalize_sha256(sha, str(path))
        actual = file_sha256(path)
        if actual != expected:
            raise ChecksumError(
                f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
                "The file was modified after it was released; restore it (reinstall musicssl for "
                "bundled weights, or export the release again)."
            )
    return path


def _check_release_folder(folder: Path, source: str) -> Path:
    if not folder.is_dir():
        hint = ""
        if _repo_id_problem(source) is None:
            hint = f" To load it from the Hub, write 'hf-hub:{source}'."
        raise ReleaseFormatError(
            f"{source!r} is not a folder (looked for {folder}); a release is 'hf-hub:org/repo[@rev]', "
            f"'bundled:NAME' or a local folder made by musicssl.save_pretrained(encoder, dir).{hint}"
        )
    missing = [name for name in RELEASE_FILES if not (folder / name).is_file()]
    if missing:
        raise ReleaseFormatError(
            f"{folder} is not a musicssl release: it lacks {' and '.join(missing)}. A release folder "
            f"holds {' + '.join(RELEASE_FILES)} (and {CARD_FILE}); write one with "
            "musicssl.save_pretrained(encoder, dir)."
        )
    return folder


def fetch_release(
    source: str,
    *,
    revision: str | None = None,
    files: dict[str, str] | None = None,
    offline: bool | None = None,
    download_hint: str | None = None,
) -> Path:
    """A local folder holding the release `source` names; `files` pins sha256s ({filename: sha256})."""
    pins: dict[str, str | None] = {name: None for name in RELEASE_FILES}
    pins.update(files or {})
    if source.startswith("hf-hub:"):
        repo_id, rev = parse_hf_source(source)
        _refuse_upstream(source, repo_id)
        rev = _merge_revision(source, rev, revision)
        cached_before = _cached_commit(repo_id, rev, pins)
        paths = _fetch_hf_files(repo_id, rev, pins, offline=offline, download_hint=download_hint)
        first = next(iter(paths))
        snapshot = _snapshot_root(paths[first], first)
        # Ask for the optional card only along with a download: a release that was already cached
        # then loads with zero requests, and never waits on retries for a card while the Hub is down.
        if CARD_FILE not in paths and cached_before != snapshot.name:
            _fetch_optional_hf(repo_id, CARD_FILE, snapshot.name, offline=offline)
        return snapshot
    folder = _local_release(source)
    for name, sha in pins.items():
        _verify_local(folder / name, sha)
    return folder


def _local_release(source: str) -> Path:
    """The release folder of a "bundled:NAME" or a path source, checked to be one."""
    if source.startswith("bundled:"):
        return _check_release_folder(bundled_dir(source[len("bundled:") :]), source)
    return _check_release_folder(Path(source).expanduser(), source)


def fetch_release_config(source: str, *, offline: bool | None = None) -> Path:
    """The config.json of the release `source` names, fetching nothing else (not its weights)."""
    if source.startswith("hf-hub:"):
        repo_id, rev = parse_hf_source(source)
        _refuse_upstream(source, repo_id)
        return fetch_hf(repo_id, "config.json", rev, None, offline=offline, download_hint=f"musicssl download {source}")
    return _verify_local(_local_release(source) / "config.json", None)


def _refuse_upstream(source: str, repo_id: str) -> None:
    """Before any download: a port's upstream repository holds upstream's own format, which only
    the registered port converts."""
    from musicssl.registry import ports_of

    names = ports_of(repo_id)
    if names:
        raise ReleaseFormatError(
            f"{source!r} holds {repo_id}'s own files, not a musicssl release: musicssl converts them as "
            f"{' or '.join(map(repr, names))}. Load that name instead (musicssl.load({names[0]!r}), "
            f"--model {names[0]}), or convert a local copy with `musicssl convert {names[0]} FILES --out DIR`."
        )


def _merge_revision(source: str, in_source: str | None, given: str | None) -> str | None:
    if in_source and given and in_source != given:
        raise ReleaseFormatError(
            f"{source!r} names revision {in_source!r} but revision={given!r} was also given: pass only one."
        )
    return in_source or given


def _file_url(base: str, filename: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/" + filename) else f"{base}/{filename}"


def fetch_spec_files(spec: ModelSpec, *, offline: bool | None = None) -> dict[str, Path]:
    """Local paths of a registry entry's files ({filename: path}), each verified against its pin."""
    hint = f"musicssl download {spec.name}"
    weights = spec.weights
    if weights is None:
        if spec.needs_weights:
            raise WeightsUnavailableError(f"model {spec.name!r} has no released weights yet.")
        return {}
    if weights.startswith("hf-hub:"):
        repo_id, rev = parse_hf_source(weights)
        rev = _merge_revision(weights, rev, spec.revision)
        pins: dict[str, str | None] = dict(spec.files) or {name: None for name in RELEASE_FILES}
        return _fetch_hf_files(repo_id, rev, pins, offline=offline, download_hint=hint)
    if weights.startswith("bundled:"):
        folder = bundled_dir(weights[len("bundled:") :])
        names: Mapping[str, str | None] = spec.files or {name: None for name in RELEASE_FILES}
        return {name: _verify_local(folder / name, sha) for name, sha in names.items()}
    if weights.startswith(("https://", "http://")):
        if not spec.files:
            raise ReleaseFormatError(
                f"model {spec.name!r} is fetched from {weights} but pins no files: a URL source needs "
                "{filename: sha256} in its spec."
            )
        return {
            name: fetch_url(
                _file_url(weights, name), sha, filename=Path(name).name, offline=offline, download_hint=hint
            )
            for name, sha in spec.files.items()
        }
    raise ReleaseFormatError(
        f"model {spec.name!r} has weights source {weights!r}; expected 'hf-hub:org/repo', "
        "'bundled:NAME' or an https:// URL."
    )


def _common_folder(paths: Iterable[Path]) -> Path:
    paths = list(paths)
    if len(paths) == 1:
        return paths[0].parent
    return Path(os.path.commonpath([str(p) for p in paths]))


def download(name_or_source: str | ModelSpec, *, offline: bool | None = False) -> Path:
    """Fetch a model's files into the cache (what `musicssl download X` runs); returns their folder.

    Accepts a registry name or ModelSpec, 'hf-hub:org/repo[@rev]', 'bundled:NAME' or a release folder.
    """
    if not isinstance(name_or_source, str):
        spec = name_or_source
    elif name_or_source.startswith(("hf-hub:", "bundled:")):
        return fetch_release(name_or_source, offline=offline)
    elif name_or_source.startswith(("https://", "http://")):
        raise ValueError(
            f"{name_or_source!r}: a bare URL has no sha256 pin; download models by registry name or 'hf-hub:org/repo'."
        )
    else:
        from musicssl.errors import UnknownModelError
        from musicssl.registry import model_info

        try:
            spec = model_info(name_or_source)
        except UnknownModelError:
            if Path(name_or_source).expanduser().is_dir():  # a local release: check it, nothing to fetch
                return fetch_release(name_or_source, offline=offline)
            raise
    paths = fetch_spec_files(spec, offline=offline)
    if not paths:
        logger.info("model %r needs no weights: nothing to download", spec.name)
        return cache_dir()
    return _common_folder(paths.values())
