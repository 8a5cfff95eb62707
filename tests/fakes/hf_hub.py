"""A Hugging Face Hub on loopback, speaking the routes huggingface_hub uses to download:
HEAD/GET `/{repo}/resolve/{revision}/{path}`, `/api/models/{repo}/revision/{rev}` and
`/api/models/{repo}/tree/{rev}` (snapshot_download), and a "CDN" for large files.

As on the real Hub, a `.safetensors` file is LFS: its resolve answer is a 302 to another host
(here `localhost` instead of `127.0.0.1`, so huggingface_hub treats it as a CDN and sends it
no token) carrying `X-Linked-Size` and `X-Linked-Etag` (the sha256); the CDN honours `Range`.
Other files are answered directly. Every request is recorded for assertions.
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
from urllib.parse import unquote, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    # repo -> path in repo -> bytes
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    url: str = ""
    requests: list[Seen] = field(default_factory=list)

    def add(self, repo: str, path: str, data: bytes) -> str:
        """Serve `data` at `repo`/`path`; returns its sha256."""
        self.repos.setdefault(repo, {})[path] = data
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def seen(self, method: str, fragment: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and fragment in unquote(r.path)]


def _is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


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

        def _json(self, value: Any, body: bool) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(value).encode(), body)

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

        def _files(self, repo: str, rev: str) -> dict[str, bytes] | None:
            files = hub.repos.get(repo)
            return files if files is not None and rev in ("main", hub.commit(repo)) else None

        def _resolve(self, repo: str, rev: str, path: str, body: bool) -> None:
            files = self._files(repo, rev)
            if files is None:
                return self._send(404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
            commit = {"X-Repo-Commit": hub.commit(repo)}
            if path not in files:
                return self._send(404, {**commit, "X-Error-Code": "EntryNotFound"}, b"Entry not found", body)
            data = files[path]
            if _is_lfs(path):
                sha = hashlib.sha256(data).hexdigest()
                port = self.headers.get("Host", "").rsplit(":", 1)[-1]
                return self._send(302, {**commit, "Location": f"http://localhost:{port}/cdn/{sha}",
                                        "X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{sha}"',
                                        "ETag": f'"{hashlib.sha1(sha.encode()).hexdigest()}"'}, b"", body)
            etag = hashlib.sha1(data).hexdigest()
            self._send(200, {**commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}, data, body)

        def _cdn(self, sha: str, body: bool) -> None:
            blobs = {hashlib.sha256(d).hexdigest(): d for files in hub.repos.values() for d in files.values()}
            if sha not in blobs:
                return self._send(404, {}, b"no such blob", body)
            data = blobs[sha]
            headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if (wanted := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)):
                start = int(m[1])
                end = int(m[2]) if m[2] else len(data) - 1
                if start >= len(data):
                    return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, headers, data[start:end + 1], body)
            self._send(200, headers, data, body)

        def _api(self, repo: str, kind: str, rev: str, body: bool) -> None:
            files = self._files(repo, rev)
            if files is None:
                return self._send(404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
            if kind == "revision":
                return self._json({"id": repo, "sha": hub.commit(repo),
                                   "siblings": [{"rfilename": p} for p in files]}, body)
            entries = []
            for p, data in files.items():
                entry: dict[str, Any] = {"type": "file", "path": p, "size": len(data),
                                         "oid": hashlib.sha1(data).hexdigest()}
                if _is_lfs(p):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
                entries.append(entry)
            self._json(entries, body)

    return Handler


@contextmanager
def serve_fake_hub(hub: FakeHub | None = None) -> Iterator[FakeHub]:
    hub = hub or FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hf-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
