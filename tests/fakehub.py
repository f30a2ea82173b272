"""A fake Hugging Face Hub on loopback, for testing the real huggingface_hub download path offline.

Two `ThreadingHTTPServer`s run in daemon threads: the Hub on 127.0.0.1 and its "CDN" on 127.0.0.2.
The Hub answers what huggingface_hub 2.x asks (see TESTING.md):

    HEAD/GET /{org}/{name}/resolve/{rev}/{file}     small files: 200 + ETag (git blob sha1);
                                                    *.safetensors: 302 to the CDN + X-Linked-Etag (sha256)
    GET /api/models/{org}/{name}[/revision/{rev}]   {"id", "sha", "siblings", ...}
    GET /api/models/{org}/{name}/tree/{rev}[/path]  [{"type": "file", "path", "size", "oid", "lfs"?}, ...]

and errors carry `X-Error-Code` (RepoNotFound 401, RevisionNotFound 404, EntryNotFound 404 with
X-Repo-Commit). No Xet header is ever sent. The CDN serves `/lfs/{sha256}` (LFS blobs) and
`/files/{name}` (plain files for URL downloads, see `add_url_file`). Range requests get 206.

Every request is recorded in `requests` as (method, path); `log` also names the host. Faults:
`truncate` (bodies cut in half, with a matching Content-Length), `corrupt` (bodies altered, same size),
`stop()` (both servers shut down: connections are refused), `move_ref()` (a branch moves to a new
commit with other content), `fail_status` (every request answered with that HTTP status and no
X-Error-Code, as a plain mirror, a proxy or an overloaded server answers). Both servers speak HTTP/1.0, so no kept-alive connection outlives `stop()`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote, urlsplit

HUB_HOST = "127.0.0.1"
CDN_HOST = "127.0.0.2"  # another origin, so the client treats it as a CDN (no auth, no redirect follow)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's bytes: the Hub's ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".whl")  # what the Hub stores in LFS


def is_lfs(filename: str) -> bool:
    return filename.endswith(LFS_SUFFIXES)


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file stored in git in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_hex(data)}\nsize {len(data)}\n".encode()


def make_release_files(seed: int = 0, *, card: bool = False) -> dict[str, bytes]:
    """A small real release: model.safetensors (two random tensors) + config.json [+ README.md]."""
    import torch
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    tensors = {"proj.weight": torch.randn(8, 4, generator=gen), "proj.bias": torch.randn(8, generator=gen)}
    config = {"family": "toy", "args": {"dim": 8}, "sample_rate": 16000, "seed": seed}
    files = {
        "config.json": json.dumps(config, indent=2).encode(),
        "model.safetensors": save(tensors),
    }
    if card:
        files["README.md"] = f"---\nlicense: mit\n---\n# toy release {seed}\n".encode()
    return files


class FakeHub:
    """In-memory repos: {repo_id: {"refs": {"main": commit}, "commits": {commit: {filename: bytes}}}}."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, Any]]] = {}
        self.url_files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.log: list[tuple[str, str, str]] = []  # (host, method, path)
        self.truncate = False
        self.corrupt = False
        self.fail_status: int | None = None
        self.sleeps: list[float] = []  # client backoff sleeps, recorded by the fake_hub fixture
        self._commits = 0
        self._servers: list[ThreadingHTTPServer] = []
        self._stopped = False
        self.url = self._serve(HUB_HOST, "hub")
        self.cdn_url = self._serve(CDN_HOST, "cdn")

    # ---------------------------------------------------------------- content

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main") -> str:
        """Create `repo_id` with one commit holding `files` on branch `ref`; returns the commit."""
        self.repos[repo_id] = {"refs": {}, "commits": {}}
        return self.move_ref(repo_id, files, ref=ref)

    def move_ref(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main") -> str:
        """Add a commit holding `files` and point branch `ref` at it (old commits stay reachable)."""
        self._commits += 1
        digest = hashlib.sha1(f"{repo_id}\0{self._commits}".encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + sha256_hex(files[name]).encode())
        commit = digest.hexdigest()
        repo = self.repos[repo_id]
        repo["commits"][commit] = dict(files)
        repo["refs"][ref] = commit
        return commit

    def add_url_file(self, name: str, data: bytes) -> str:
        """Serve `data` from the CDN host at /files/{name}; returns its URL."""
        self.url_files[name] = data
        return f"{self.cdn_url}/files/{quote(name)}"

    def clear_requests(self) -> None:
        self.requests.clear()
        self.log.clear()

    # ---------------------------------------------------------------- servers

    def _serve(self, host: str, role: str) -> str:
        server = ThreadingHTTPServer((host, 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        server.role = role  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._servers.append(server)
        return f"http://{host}:{server.server_address[1]}"

    def stop(self) -> None:
        """Shut both servers down; their ports then refuse connections."""
        if self._stopped:
            return
        self._stopped = True
        for server in self._servers:
            server.shutdown()
            server.server_close()

    close = stop

    # ---------------------------------------------------------------- lookups used by the handler

    def resolve(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        if rev in repo["commits"]:
            return rev
        return repo["refs"].get(rev)

    def lfs_blob(self, sha: str) -> bytes | None:
        for repo in self.repos.values():
            for files in repo["commits"].values():
                for name, data in files.items():
                    if is_lfs(name) and sha256_hex(data) == sha:
                        return data
        return None

    def served(self, data: bytes, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file as sent under the current faults."""
        if self.corrupt and data:
            # Flip bytes in the middle: the size stays right, so only a hash can tell.
            mid = len(data) // 2
            data = data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :]
        body = data[start:end]
        if self.truncate:
            body = body[: len(body) // 2]
        return body


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.hub.requests.append((self.command, self.path))
        self.hub.log.append((self.server.server_address[0], self.command, self.path))  # type: ignore[index]
        raw_path = urlsplit(self.path).path
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        if self.hub.fail_status is not None:
            self._send(self.hub.fail_status, {"Content-Type": "text/plain"}, b"no")
        elif self.server.role == "cdn":  # type: ignore[attr-defined]
            self._cdn(parts)
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        else:
            self._error(404, None, "Not Found")

    # ---------------------------------------------------------------- routes

    def _cdn(self, parts: list[str]) -> None:
        data = None
        if len(parts) == 2 and parts[0] == "lfs":
            data = self.hub.lfs_blob(parts[1])
        elif len(parts) >= 2 and parts[0] == "files":
            data = self.hub.url_files.get("/".join(parts[1:]))
        if data is None:
            self._error(404, None, "Not Found")
        else:
            self._body(data, {"Content-Type": "application/octet-stream"})

    def _repo_commit(self, repo_id: str, rev: str) -> str | None:
        """The commit `rev` names, or None after answering the error."""
        if repo_id not in self.hub.repos:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        commit = self.hub.resolve(repo_id, rev)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
        return commit

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        commit = self._repo_commit(repo_id, rev)
        if commit is None:
            return
        files = self.hub.repos[repo_id]["commits"][commit]
        if filename not in files:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
            return
        data = files[filename]
        if is_lfs(filename):
            sha = sha256_hex(data)
            self._send(
                302,
                {
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_sha1(lfs_pointer(data))}"',
                    "Location": f"{self.hub.cdn_url}/lfs/{sha}",
                    "Content-Length": "0",
                },
                b"",
            )
            return
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Content-Type": "application/json" if filename.endswith(".json") else "text/plain",
        }
        self._body(data, headers)

    def _api(self, parts: list[str]) -> None:
        if len(parts) < 2:
            self._error(404, None, "Not Found")
            return
        repo_id, rest = f"{parts[0]}/{parts[1]}", parts[2:]
        if not rest:
            rest = ["revision", "main"]
        if len(rest) >= 2 and rest[0] in ("revision", "tree"):
            # A revision may hold '/' (refs/pr/1) but the client sends it %2F-quoted as one segment.
            commit = self._repo_commit(repo_id, rest[1])
            if commit is None:
                return
            files = self.hub.repos[repo_id]["commits"][commit]
            if rest[0] == "revision":
                info = {
                    "_id": commit,
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "disabled": False,
                    "gated": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "lastModified": "2025-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                }
                self._json(info)
            else:
                prefix = "/".join(rest[2:])
                self._json(_tree(files, prefix, recursive="recursive=true" in self.path.lower()))
            return
        self._error(404, None, "Not Found")

    # ---------------------------------------------------------------- responses

    def _json(self, obj: Any) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _body(self, data: bytes, headers: dict[str, str]) -> None:
        """Serve a file with its faults applied; honour `Range: bytes=a-[b]` with 206."""
        total = len(data)
        status, start, end = 200, 0, total
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes=") :].split(",")[0].partition("-")
            start = int(first) if first else 0
            end = min(int(last) + 1, total) if last else total
            if start >= total:
                self._send(416, {"Content-Range": f"bytes */{total}"}, b"")
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{total}"}
        # Faults touch what a GET sends; a HEAD reports the true size, as the Hub's metadata would.
        body = data[start:end] if self.command == "HEAD" else self.hub.served(data, start, end)
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(body))}
        self._send(status, headers, body)

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _tree(files: dict[str, bytes], prefix: str, *, recursive: bool) -> list[dict[str, Any]]:
    """The /tree listing of `files` under folder `prefix`."""
    entries: dict[str, dict[str, Any]] = {}
    base = f"{prefix.rstrip('/')}/" if prefix else ""
    for name in sorted(files):
        if not name.startswith(base):
            continue
        rel = name[len(base) :].split("/")
        for depth in range(1, len(rel)):  # the folders on the way
            folder = base + "/".join(rel[:depth])
            oid = git_blob_sha1(folder.encode())  # stands in for a tree id
            entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid, "size": 0})
            if not recursive:
                break
        if len(rel) > 1 and not recursive:
            continue
        data = files[name]
        entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data)}
        if is_lfs(name):
            pointer = lfs_pointer(data)
            entry["oid"] = git_blob_sha1(pointer)
            entry["lfs"] = {"oid": sha256_hex(data), "size": len(data), "pointerSize": len(pointer)}
        else:
            entry["oid"] = git_blob_sha1(data)
        entries[name] = entry
    return list(entries.values())
