"""Loopback HTTP(S) servers and network guards for the URL-input tests.

Tests may send traffic to loopback only. URL inputs name public hosts, so the tests give
diffbox a resolver of their own (no real DNS) and `NetGuard` stands between urllib3 and the
network: a connection to one of the made-up public addresses below goes to a loopback server
instead, any other non-loopback address is refused, and every attempt is recorded so a test
can prove that a refused URL was never connected to.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

# Public addresses (is_global) that no test ever reaches: NetGuard sends them to loopback.
PUBLIC_IP = "93.184.215.14"
OTHER_PUBLIC_IP = "93.184.215.15"
TLS_NAMES = ("images.test", "rebind.test", "public.test", "mixed.test")


def png_bytes(color: tuple[int, int, int] = (30, 160, 90), size: tuple[int, int] = (40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class TestCA:
    ca_file: Path
    server_context: ssl.SSLContext


def make_tls(tmp: Path, names: tuple[str, ...] = TLS_NAMES) -> TestCA:
    """A throw-away CA and a server certificate for `names`, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diffbox test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain = tmp / "server.pem"
    chain.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    return TestCA(ca_file, context)


@dataclass
class Seen:
    path: str
    host: str | None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        box = self.server.box
        box.requests.append(Seen(self.path, self.headers.get("Host")))
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        route = box.routes.get(url.path)
        if route is None:
            self._send(404, b"not found")
            return
        route(self, query)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    box: UrlServer

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        self.box.connections += 1
        if self.box.tls is not None:
            sock = self.box.tls.wrap_socket(sock, server_side=True)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # clients that hang up on purpose are the point of several tests


@dataclass
class UrlServer:
    """A loopback server with the routes the URL tests need, counting connections."""

    port: int = 0
    tls: ssl.SSLContext | None = None
    image: bytes = field(default_factory=png_bytes)
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    routes: dict[str, Callable[[_Handler, dict[str, str]], None]] = field(default_factory=dict)
    _server: _Server | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(self) -> UrlServer:
        self.routes = {
            "/img.png": lambda h, q: h._send(200, self.image, {"Content-Type": "image/png"}),
            "/redirect": _redirect,
            "/loop": lambda h, q: h._send(302, b"", {"Location": "/loop"}),
            "/big": _big,
            "/chunked": _chunked,
            "/trickle": _trickle,
            "/silent": _silent,
            "/gzip": lambda h, q: h._send(200, b"\x1f\x8b" + b"\0" * 30, {"Content-Encoding": "gzip"}),
        }
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.box = self
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, name="url-test-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _redirect(h: _Handler, q: dict[str, str]) -> None:
    h._send(int(q.get("code", "302")), b"", {"Location": q["to"]} if "to" in q else {})


def _big(h: _Handler, q: dict[str, str]) -> None:
    # A length far above any limit; a client that believes it never reads the body.
    h.send_response(200)
    h.send_header("Content-Length", q.get("length", str(10**9)))
    h.end_headers()
    h.wfile.write(b"\0" * 65536)


def _chunked(h: _Handler, q: dict[str, str]) -> None:
    # No Content-Length: only counting while reading can bound it.
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = b"\0" * 65536
    for _ in range(int(q.get("chunks", "64"))):
        h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    h.wfile.write(b"0\r\n\r\n")


def _trickle(h: _Handler, q: dict[str, str]) -> None:
    # A byte every few tens of ms: never silent long enough for a read timeout.
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    deadline = time.monotonic() + float(q.get("for", "30"))
    while time.monotonic() < deadline:
        h.wfile.write(b"\0")
        h.wfile.flush()
        time.sleep(0.02)


def _silent(h: _Handler, q: dict[str, str]) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.end_headers()
    h.wfile.flush()
    time.sleep(float(q.get("for", "30")))


@dataclass
class Resolver:
    """Made-up DNS: numeric forms as inet_aton reads them, names from `table`; each call is
    recorded, and a name may answer differently on each call (DNS rebinding)."""

    table: dict[str, list[list[str]]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def add(self, name: str, *answers: list[str]) -> None:
        self.table[name] = list(answers)

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        try:
            return [socket.inet_ntoa(socket.inet_aton(host))]
        except OSError:
            pass
        answers = self.table.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers.pop(0) if len(answers) > 1 else answers[0]


@dataclass
class NetGuard:
    """Every connection urllib3 makes, recorded; made-up public addresses go to `routes`."""

    original: Callable[..., socket.socket]  # urllib3's own create_connection
    routes: dict[str, int] = field(default_factory=dict)  # public address -> loopback port
    attempts: list[tuple[str, int]] = field(default_factory=list)

    def connect(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address
        self.attempts.append((host, port))
        if host in self.routes:
            return self.original(("127.0.0.1", self.routes[host]), *args, **kwargs)
        if not ipaddress.ip_address(host).is_loopback:
            raise ConnectionRefusedError(f"test guard: no traffic to {host}")
        return self.original(address, *args, **kwargs)
