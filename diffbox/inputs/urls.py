"""Fetch `https://` image inputs without opening a door into the worker's network.

A worker runs inside a cloud account: a URL naming an internal address (the metadata service
at 169.254.169.254, a database on 10.x, ComfyUI itself on loopback) would let any caller read
it through us (SSRF). So, unless `DIFFBOX_ALLOW_PRIVATE_URLS` is set (trusted networks):

- only `https://`;
- the host is resolved once and refused when any of its addresses is not public;
- the connection goes to the address that was checked, with the URL's host name for SNI,
  the certificate check and the Host header, so a DNS answer that changes between check and
  connect (rebinding) cannot move it;
- redirects are followed here, not by the HTTP library, each hop checked the same way;
- the body is bounded in size (Content-Length, then while reading) and time (connect and
  read timeouts, and a deadline for the whole fetch, redirects included).

Messages name the host, never the whole URL: error messages are logged, and a presigned
URL's query string is a credential.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from .. import logs
from ..errors import JobError, validation
from .media import too_large

log = logs.get("urls")
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
# Host name -> addresses; tests pass their own so that no name goes to real DNS.
Resolver = Callable[[str, int], Sequence[str]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 prefixes that carry an IPv4 address a gateway may forward to (NAT64, 6to4).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class UrlPolicy:
    allow_private: bool = False  # any address and http:// too (DIFFBOX_ALLOW_PRIVATE_URLS)
    max_redirects: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # the longest silence between two reads
    total_timeout_s: float = 60.0  # the whole fetch, however fast the bytes trickle
    resolver: Resolver = system_resolver
    ca_file: str | None = None  # None: certifi's bundle, as requests uses


def is_public(address: IpAddress) -> bool:
    """Whether an address is on the public internet: not private, loopback, link-local
    (cloud metadata), multicast, reserved or unspecified, nor an IPv4 one of those in IPv6."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    # is_global alone lets multicast through (224.0.0.0/4, ff00::/8 are not "private").
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class _Hop:
    """One request: where to connect (a checked address) and what the server is told."""

    scheme: str
    host: str
    port: int
    address: str
    target: str  # path and query

    @classmethod
    def of(cls, url: str, field: str, policy: UrlPolicy) -> _Hop:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise validation(f"{field}: malformed URL") from None
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme != "https" and not (scheme == "http" and policy.allow_private):
            raise validation(f"{field}: only https:// URLs are accepted "
                             "(DIFFBOX_ALLOW_PRIVATE_URLS=1 allows http:// on trusted networks)")
        if not host:
            raise validation(f"{field}: the URL names no host")
        try:
            host = host.encode("idna").decode("ascii")  # the form DNS, SNI and Host headers take
        except UnicodeError:
            raise validation(f"{field}: malformed host name") from None
        if parts.username is not None or parts.password is not None:
            raise validation(f"{field}: credentials in URLs are not accepted")
        port = port or (443 if scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = _resolve(host, port, field, policy)
        if not policy.allow_private and not all(is_public(a) for a in addresses):
            # Which address is not said: the answer would map the worker's private network.
            raise validation(f"{field}: {host} is not a public address; private, loopback, link-local "
                             "and reserved addresses are refused (DIFFBOX_ALLOW_PRIVATE_URLS=1 allows "
                             "them on trusted networks)")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, host, port, str(addresses[0]), target)

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


def _resolve(host: str, port: int, field: str, policy: UrlPolicy) -> list[IpAddress]:
    try:
        found = [ipaddress.ip_address(a.partition("%")[0]) for a in policy.resolver(host, port)]
    except (OSError, UnicodeError, ValueError):
        found = []
    if not found:
        raise validation(f"{field}: could not resolve {host}")
    return found


def fetch(url: str, field: str, max_bytes: int, policy: UrlPolicy,
          cancelled: Callable[[], bool] = lambda: False) -> bytes:
    """The body of `url` (at most `max_bytes`), or a validation error naming `field`."""
    body = bytearray()
    stream(url, field, Bounds(max_bytes, too_large(field, max_bytes)), policy, body.extend, cancelled)
    return bytes(body)


@dataclass(frozen=True)
class Bounds:
    """How many bytes a fetch may read, and the error that says so."""

    max_bytes: int
    too_large: JobError


# The headers a hop to a host (name, as the URL gives it) adds: a credential goes to its own
# host only, and is decided again on every redirect.
HostHeaders = Callable[[str], dict[str, str]]


@dataclass(frozen=True)
class Validators:
    """What a server said identifies the version it sent (for a conditional request later)."""

    etag: str | None = None
    last_modified: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True)
class Transfer:
    size: int
    validators: Validators
    not_modified: bool  # a conditional request's 304: nothing went to the sink


def stream(url: str, field: str, bounds: Bounds, policy: UrlPolicy, sink: Callable[[bytes], object],
           cancelled: Callable[[], bool] = lambda: False, host_headers: HostHeaders = lambda host: {},
           on_length: Callable[[int | None], object] = lambda length: None,
           unless: Validators | None = None) -> Transfer:
    """Hand the body of `url` to `sink` chunk by chunk (at most `bounds.max_bytes`). `on_length`
    hears the final hop's Content-Length before the first chunk. With `unless`, the request is
    conditional: a server that still has that version answers 304 and sends nothing."""
    t0 = time.monotonic()
    deadline = t0 + policy.total_timeout_s
    conditional = unless.headers() if unless is not None else {}
    for _ in range(policy.max_redirects + 1):
        hop = _Hop.of(url, field, policy)
        reader = _Reader(field, bounds, deadline, policy, cancelled, sink, on_length, bool(conditional))
        location = _get(hop, reader, {**host_headers(hop.host), **conditional})
        if location is None:
            logs.event(log, "fetched", host=hop.host, bytes=reader.size, not_modified=reader.not_modified,
                       elapsed_s=logs.since(t0))
            return Transfer(reader.size, reader.validators, reader.not_modified)
        url = urljoin(url, location)
    raise validation(f"{field}: more than {policy.max_redirects} redirects")


@dataclass
class _Reader:
    field: str
    bounds: Bounds
    deadline: float
    policy: UrlPolicy
    cancelled: Callable[[], bool]
    sink: Callable[[bytes], object]
    on_length: Callable[[int | None], object]
    conditional: bool = False
    size: int = 0
    not_modified: bool = False
    validators: Validators = Validators()


def _get(hop: _Hop, reader: _Reader, extra_headers: dict[str, str]) -> str | None:
    """One request: the redirect's Location, or None when the body went to the reader's sink."""
    field, deadline, policy = reader.field, reader.deadline, reader.policy
    remaining = max(0.01, deadline - time.monotonic())
    timeout = urllib3.Timeout(connect=min(policy.connect_timeout_s, remaining),
                              read=min(policy.read_timeout_s, remaining))
    pool: urllib3.HTTPConnectionPool
    if hop.scheme == "https":
        # Connect to the checked address; SNI and the certificate check use the host name.
        pool = urllib3.HTTPSConnectionPool(hop.address, hop.port, timeout=timeout, retries=False, maxsize=1,
                                           server_hostname=hop.host, ca_certs=policy.ca_file or certifi.where())
    else:
        pool = urllib3.HTTPConnectionPool(hop.address, hop.port, timeout=timeout, retries=False, maxsize=1)
    headers = {**extra_headers, "Host": hop.host_header, "Accept-Encoding": "identity", "User-Agent": "diffbox"}
    try:
        with pool:
            response = pool.urlopen("GET", hop.target, headers=headers, redirect=False, retries=False,
                                    preload_content=False, decode_content=False, assert_same_host=False)
            try:
                return _read(response, hop, reader)
            finally:
                response.release_conn()
    except urllib3.exceptions.NewConnectionError:  # before TimeoutError: urllib3 makes it one
        raise validation(f"{field}: could not connect to {hop.host}") from None
    except urllib3.exceptions.TimeoutError:
        if time.monotonic() >= deadline:
            raise _too_slow(field, hop, policy.total_timeout_s) from None
        raise validation(f"{field}: {hop.host} did not answer in time (connect {policy.connect_timeout_s:g} s, "
                         f"read {policy.read_timeout_s:g} s)") from None
    except urllib3.exceptions.HTTPError as exc:
        # The class only: urllib3's messages repeat the request's path and query.
        raise validation(f"{field}: could not fetch from {hop.host}: {type(exc).__name__}") from None
    except ValueError:  # http.client refuses paths and headers with control characters
        raise validation(f"{field}: malformed URL") from None


def _read(response: urllib3.BaseHTTPResponse, hop: _Hop, reader: _Reader) -> str | None:
    field, bounds, policy = reader.field, reader.bounds, reader.policy
    if response.status in REDIRECTS:
        location = response.headers.get("Location")
        if not location:
            raise validation(f"{field}: {hop.host} redirected without a Location")
        return location
    if response.status == 304 and reader.conditional:
        reader.not_modified = True
        return None
    if response.status != 200:
        raise validation(f"{field}: {hop.host} answered HTTP {response.status}")
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        # Asked for identity: a compressed body could expand far past the size bound.
        raise validation(f"{field}: {hop.host} sent a compressed body")
    length = response.headers.get("Content-Length")
    known = int(length) if length is not None and length.isdigit() else None
    if known is not None and known > bounds.max_bytes:
        raise bounds.too_large
    reader.on_length(known)
    reader.validators = Validators(response.headers.get("ETag"), response.headers.get("Last-Modified"))
    sock = getattr(response.connection, "sock", None)
    while True:
        if reader.cancelled():
            raise JobError("cancelled", "job cancelled")
        remaining = reader.deadline - time.monotonic()
        if remaining <= 0:
            raise _too_slow(field, hop, policy.total_timeout_s)
        if sock is not None:
            # No read may outlast the deadline, however slowly the bytes trickle in.
            sock.settimeout(min(policy.read_timeout_s, remaining))
        # read1: at most one socket read per call, so the checks above run between reads.
        chunk = response.read1(CHUNK)
        if not chunk:
            return None
        reader.size += len(chunk)
        if reader.size > bounds.max_bytes:
            raise bounds.too_large
        reader.sink(chunk)


def _too_slow(field: str, hop: _Hop, total_s: float) -> JobError:
    return validation(f"{field}: fetching from {hop.host} took longer than the {total_s:g} s allowed")
