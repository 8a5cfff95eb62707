"""A Hugging Face Hub on loopback that answers the routes huggingface_hub downloads through,
as huggingface.co does, so the real client runs against it unchanged (`HF_ENDPOINT`):

- HEAD/GET `/{repo}/resolve/{revision}/{path}`: the revision is a branch (`main`) or a commit
  id; every answer carries `X-Repo-Commit`. A `.safetensors` file is LFS: the answer is a 302
  to a signed "CDN" URL on another host (`localhost` instead of `127.0.0.1`, so the client
  sends it no token) with `X-Linked-Etag` (the content's sha256), `X-Linked-Size` and an
  `ETag`; other files are answered directly with their git blob id as ETag.
- Errors as the Hub sends them, with `X-Error-Code`: 401 `RepoNotFound` (unknown repos answer
  401, not 404, to anonymous callers), `GatedRepo` (401 without a token, 403 with one that has
  no access), 404 `RevisionNotFound`, 404 `EntryNotFound`.
- The CDN honours `Range` (206, `Content-Range`), refuses a request that also carries an
  `Authorization` header (as S3 does for a signed URL), and can be told to flip a byte of a
  blob (`corrupt`) or to drop the connection part way through once (`drop_after`).
- `/api/models/{repo}/revision/{rev}` and `/tree/{rev}` for `snapshot_download`.

Each `add` makes a new commit on `main`; older commits stay reachable until `rewrite_history`
(a force push). Every request is recorded for assertions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    main: str = ""
    gated: bool = False


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    # Tokens that may read gated repos.
    tokens: set[str] = field(default_factory=set)
    # sha256 of blobs the CDN serves with one byte flipped.
    corrupt: set[str] = field(default_factory=set)
    # sha256 of a blob -> bytes after which the CDN drops the connection, once.
    drop_after: dict[str, int] = field(default_factory=dict)

    def add(self, repo: str, path: str, data: bytes, *, gated: bool = False) -> str:
        """A commit on `main` that sets `path` to `data`; returns the new commit id."""
        entry = self.repos.setdefault(repo, Repo())
        entry.gated = entry.gated or gated
        files = {**entry.commits.get(entry.main, {}), path: data}
        digest = hashlib.sha1(repo.encode() + entry.main.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        entry.main = digest.hexdigest()
        entry.commits[entry.main] = files
        return entry.main

    def rewrite_history(self, repo: str) -> None:
        """Keep only the commit `main` points at, as a force push that replaces a repo does."""
        entry = self.repos[repo]
        entry.commits = {entry.main: entry.commits[entry.main]}

    def commit(self, repo: str) -> str:
        return self.repos[repo].main

    def seen(self, method: str, fragment: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and fragment in unquote(r.path)]


def _is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$")
_CDN = re.compile(r"^/repos/[0-9a-f]{2}/[0-9a-f]{2}/(?P<sha>[0-9a-f]{64})$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, body: bool, extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                       **(extra or {})}
            self._send(status, headers, json.dumps({"error": message}).encode(), body)

        def _json(self, value: Any, body: bool, headers: dict[str, str] | None = None) -> None:
            self._send(200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(value).encode(), body)

        def _route(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            if m := _RESOLVE.match(path):
                return self._resolve(m["repo"], m["rev"], m["path"], body)
            if m := _API.match(path):
                return self._api(m["repo"], m["kind"], m["rev"], body)
            if m := _CDN.match(path):
                return self._cdn(m["sha"], body)
            self._send(404, {}, b"no route", body)

        def _commit(self, repo_id: str, rev: str, body: bool) -> tuple[str, dict[str, bytes]] | None:
            """The commit and files a revision names, or None once the error is sent."""
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found", body)
                return None
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if repo.gated and not token:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                              "and be authenticated to access it. Please log in.", body)
                return None
            if repo.gated and token not in hub.tokens:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                              f"authorized list. Visit {hub.url}/{repo_id} to ask for access.", body)
                return None
            commit = repo.main if rev == "main" else rev
            if commit not in repo.commits:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, body)
                return None
            return commit, repo.commits[commit]

        def _resolve(self, repo: str, rev: str, path: str, body: bool) -> None:
            found = self._commit(repo, rev, body)
            if found is None:
                return
            commit, files = found
            headers = {"X-Repo-Commit": commit}
            if path not in files:
                return self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", body, headers)
            data = files[path]
            if not _is_lfs(path):
                return self._send(200, {**headers, "ETag": f'"{_git_blob_id(data)}"', "Accept-Ranges": "bytes"},
                                  data, body)
            sha = hashlib.sha256(data).hexdigest()
            port = self.headers.get("Host", "").rsplit(":", 1)[-1]
            name = quote(path.rsplit("/", 1)[-1])
            location = (f"http://localhost:{port}/repos/{sha[:2]}/{sha[2:4]}/{sha}"
                        f"?response-content-disposition=attachment%3B+filename%3D%22{name}%22"
                        f"&Expires=4102444800&Signature=fake-signature&Key-Pair-Id=K0FAKE")
            self._send(302, {**headers, "Location": location, "X-Linked-Size": str(len(data)),
                             "X-Linked-Etag": f'"{sha}"', "ETag": f'"{_git_blob_id(data)}"',
                             "Content-Type": "text/plain; charset=utf-8"},
                       f"Found. Redirecting to {location}".encode(), body)

        def _cdn(self, sha: str, body: bool) -> None:
            if "Authorization" in self.headers:
                return self._send(400, {}, b"Only one auth mechanism allowed", body)
            blobs = {hashlib.sha256(d).hexdigest(): d
                     for repo in hub.repos.values() for files in repo.commits.values() for d in files.values()}
            if sha not in blobs:
                return self._send(404, {}, b"NoSuchKey", body)
            data = blobs[sha]
            if sha in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            start, end = 0, len(data) - 1
            status = 200
            if (wanted := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)):
                start = int(m[1])
                end = int(m[2]) if m[2] else end
                if start >= len(data):
                    return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                status = 206
            part = data[start:end + 1]
            cut = hub.drop_after.pop(sha, None) if body else None
            if cut is None:
                return self._send(status, headers, part, body)
            # Promise the whole body, send part of it, hang up: a connection lost mid-file.
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(part))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(part[:cut])
            self.wfile.flush()
            self.close_connection = True

        def _api(self, repo: str, kind: str, rev: str, body: bool) -> None:
            found = self._commit(repo, rev, body)
            if found is None:
                return
            commit, files = found
            if kind == "revision":
                return self._json({"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in files]}, body)
            entries = []
            for p, data in files.items():
                entry: dict[str, Any] = {"type": "file", "path": p, "size": len(data), "oid": _git_blob_id(data)}
                if _is_lfs(p):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
                entries.append(entry)
            self._json(entries, body, {"X-Repo-Commit": commit})

    return Handler


@contextmanager
def serve_fake_hub(hub: FakeHub | None = None, port: int = 0) -> Iterator[FakeHub]:
    """On `port` (any free one by default)."""
    hub = hub or FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hf-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
