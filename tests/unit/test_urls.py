"""URL inputs: what `diffbox.urls.fetch` refuses, where it connects, and its size and time bounds.

Every host name goes through a test resolver (no real DNS) and every connection through
`NetGuard` (loopback only; made-up public addresses land on a loopback TLS server whose
certificate names the test hosts), so "refused without connecting" is checked, not assumed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffbox.errors import JobError
from diffbox.inputs.media import decode_image
from diffbox.inputs.urls import UrlPolicy, fetch, is_public
from tests.urlserver import (
    OTHER_PUBLIC_IP,
    PUBLIC_IP,
    NetGuard,
    Resolver,
    UrlServer,
    make_tls,
    png_bytes,
)

MB = 1_000_000
# A socket timeout can fire a millisecond before our clock says it is due (its own rounding).
CLOCK_SLACK_S = 0.1


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UrlServer, str]]:
    ca = make_tls(tmp_path_factory.mktemp("tls"))
    server = UrlServer(tls=ca.server_context).start()
    yield server, str(ca.ca_file)
    server.stop()


@pytest.fixture
def web(tls_server: tuple[UrlServer, str], net_guard: NetGuard) -> Iterator[tuple[UrlServer, Resolver, UrlPolicy]]:
    """The TLS server reachable as https://images.test (and the other test names) at PUBLIC_IP."""
    server, ca_file = tls_server
    server.requests.clear()
    server.connections = 0
    resolver = Resolver()
    for name in ("images.test", "public.test", "other-cert.test"):
        resolver.add(name, [PUBLIC_IP])
    resolver.add("localhost", ["127.0.0.1", "::1"])
    net_guard.routes[PUBLIC_IP] = server.port
    policy = UrlPolicy(resolver=resolver, ca_file=ca_file, connect_timeout_s=2, read_timeout_s=2, total_timeout_s=5)
    yield server, resolver, policy


def refused(url: str, policy: UrlPolicy, max_bytes: int = MB) -> JobError:
    with pytest.raises(JobError) as err:
        fetch(url, "image", max_bytes, policy)
    assert err.value.type == "validation", err.value.message
    assert err.value.message.startswith("image: "), err.value.message
    return err.value


def test_https_on_a_public_address_connects_to_that_address_with_the_host_name(
    web: tuple[UrlServer, Resolver, UrlPolicy], net_guard: NetGuard
) -> None:
    server, _, policy = web
    data = fetch(f"https://images.test:{server.port}/img.png?X-Amz-Signature=abc", "image", MB, policy)
    assert data == server.image
    assert net_guard.attempts == [(PUBLIC_IP, server.port)]
    # SNI and the certificate were checked against the name (the server's certificate is for it),
    # and the server was told the name, not the address.
    assert [(r.path, r.host) for r in server.requests] == [
        ("/img.png?X-Amz-Signature=abc", f"images.test:{server.port}")]


def test_the_certificate_must_name_the_host(web: tuple[UrlServer, Resolver, UrlPolicy]) -> None:
    server, _, policy = web
    error = refused(f"https://other-cert.test:{server.port}/img.png", policy)
    assert "could not fetch from other-cert.test: SSLError" in error.message
    assert server.requests == []


NOT_PUBLIC = [
    "https://127.0.0.1:{port}/img.png",
    "https://127.1:{port}/img.png",
    "https://2130706433:{port}/img.png",
    "https://0x7f.0.0.1:{port}/img.png",
    "https://localhost:{port}/img.png",
    "https://[::1]:{port}/img.png",
    "https://[::ffff:127.0.0.1]:{port}/img.png",
    "https://0.0.0.0:{port}/img.png",
    "https://0:{port}/img.png",
    "https://[::]:{port}/img.png",
    "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://[::ffff:169.254.169.254]/latest/meta-data/",
    "https://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "https://[2002:7f00:1::]:{port}/img.png",
    "https://[fe80::1]/",
    "https://[fe80::1%25eth0]/",
    "https://10.0.0.5/",
    "https://172.16.3.4/",
    "https://192.168.1.1/",
    "https://100.64.0.1/",
    "https://[fd00::1]/",
    "https://224.0.0.1/",
    "https://239.255.255.250/",
    "https://[ff02::1]/",
    "https://255.255.255.255/",
    "https://240.0.0.1/",
    "https://198.18.0.1/",
    "https://mixed.test/",
]


@pytest.mark.parametrize("template", NOT_PUBLIC)
def test_non_public_addresses_are_refused_without_connecting(
    template: str, web: tuple[UrlServer, Resolver, UrlPolicy], net_guard: NetGuard
) -> None:
    server, resolver, policy = web
    # One public and one private address: any non-public one refuses the name.
    resolver.add("mixed.test", [PUBLIC_IP, "10.1.2.3"])
    error = refused(template.format(port=server.port), policy)
    assert "is not a public address" in error.message and "DIFFBOX_ALLOW_PRIVATE_URLS" in error.message
    assert net_guard.attempts == [] and server.connections == 0


@pytest.mark.parametrize(("url", "words"), [
    ("http://images.test/img.png", "only https:// URLs are accepted"),
    ("ftp://images.test/img.png", "only https:// URLs are accepted"),
    ("file:///etc/passwd", "only https:// URLs are accepted"),
    ("https://user:secret@images.test/img.png", "credentials in URLs are not accepted"),
    ("https:///img.png", "names no host"),
    ("https://images.test:99999/", "malformed URL"),
    ("https://[::1/", "malformed URL"),
    ("https://nowhere.test/img.png", "could not resolve nowhere.test"),
])
def test_malformed_and_disallowed_urls(url: str, words: str, web: tuple[UrlServer, Resolver, UrlPolicy],
                                       net_guard: NetGuard) -> None:
    _, _, policy = web
    assert words in refused(url, policy).message
    assert net_guard.attempts == []


def test_dns_rebinding_cannot_move_the_connection(web: tuple[UrlServer, Resolver, UrlPolicy],
                                                  net_guard: NetGuard) -> None:
    server, resolver, policy = web
    # A public answer for the check, then loopback for whoever asks next.
    resolver.add("rebind.test", [PUBLIC_IP], ["127.0.0.1"], ["127.0.0.1"])
    assert fetch(f"https://rebind.test:{server.port}/img.png", "image", MB, policy) == server.image
    assert resolver.calls == ["rebind.test"]
    assert net_guard.attempts == [(PUBLIC_IP, server.port)]
    # And the other way round: the first answer is the one checked.
    resolver.calls.clear()
    resolver.add("rebind.test", ["127.0.0.1"], [PUBLIC_IP])
    refused(f"https://rebind.test:{server.port}/img.png", policy)
    assert net_guard.attempts == [(PUBLIC_IP, server.port)]


def test_redirects_are_followed_and_every_hop_is_checked(web: tuple[UrlServer, Resolver, UrlPolicy],
                                                         net_guard: NetGuard) -> None:
    server, resolver, policy = web
    base = f"https://images.test:{server.port}"
    for code in (301, 302, 303, 307, 308):
        assert fetch(f"{base}/redirect?code={code}&to=/img.png", "image", MB, policy) == server.image
    resolver.add("public.test", [OTHER_PUBLIC_IP])
    net_guard.routes[OTHER_PUBLIC_IP] = server.port
    assert fetch(f"{base}/redirect?to=https://public.test:{server.port}/img.png", "image", MB, policy) == server.image
    assert net_guard.attempts[-2:] == [(PUBLIC_IP, server.port), (OTHER_PUBLIC_IP, server.port)]

    for target in (f"https://127.0.0.1:{server.port}/img.png", "https://169.254.169.254/latest/meta-data/",
                   f"https://localhost:{server.port}/img.png", "https://[::1]/"):
        net_guard.attempts.clear()
        server.requests.clear()
        refused(f"{base}/redirect?to={target}", policy)
        assert net_guard.attempts == [(PUBLIC_IP, server.port)]  # the first hop only
        assert [r.path.split("?")[0] for r in server.requests] == ["/redirect"]
    assert "only https://" in refused(f"{base}/redirect?to=http://images.test:{server.port}/img.png",
                                      policy).message
    assert "redirected without a Location" in refused(f"{base}/redirect?code=302", policy).message


def test_redirect_loops_are_bounded(web: tuple[UrlServer, Resolver, UrlPolicy]) -> None:
    server, _, policy = web
    error = refused(f"https://images.test:{server.port}/loop", policy)
    assert "more than 5 redirects" in error.message
    assert len(server.requests) == 6


def test_size_is_bounded_by_content_length_and_while_reading(web: tuple[UrlServer, Resolver, UrlPolicy]) -> None:
    server, _, policy = web
    base = f"https://images.test:{server.port}"
    assert "larger than the 1 MB limit" in refused(f"{base}/big", policy).message
    assert "larger than the 1 MB limit" in refused(f"{base}/chunked?chunks=64", policy).message
    assert len(fetch(f"{base}/chunked?chunks=4", "image", MB, policy)) == 4 * 65536
    assert "HTTP 404" in refused(f"{base}/missing", policy).message
    assert "compressed body" in refused(f"{base}/gzip", policy).message


def test_time_is_bounded_by_read_timeout_and_total_deadline(web: tuple[UrlServer, Resolver, UrlPolicy]) -> None:
    server, _, policy = web
    base = f"https://images.test:{server.port}"
    # Which bound stopped a fetch is in its message; the clock only shows none fires early (a
    # busy machine can make either late, never early).
    t0 = time.monotonic()
    assert "did not answer in time" in refused(f"{base}/silent", policy).message
    assert time.monotonic() - t0 >= 2 - CLOCK_SLACK_S
    # Never silent for long, so only the whole fetch's deadline (5 s here) can stop it: the
    # trickle itself lasts 30 s.
    t0 = time.monotonic()
    assert "took longer than the 5 s allowed" in refused(f"{base}/trickle?for=30", policy).message
    assert time.monotonic() - t0 >= 5 - CLOCK_SLACK_S


def test_cancel_stops_a_fetch_between_reads(web: tuple[UrlServer, Resolver, UrlPolicy]) -> None:
    server, _, policy = web
    t0 = time.monotonic()
    with pytest.raises(JobError) as err:
        fetch(f"https://images.test:{server.port}/trickle?for=30", "image", MB, policy,
              cancelled=lambda: time.monotonic() - t0 > 0.5)
    assert err.value.type == "cancelled"  # before the trickle's 30 s were over


def test_private_urls_and_http_when_allowed(tmp_path: Path, net_guard: NetGuard) -> None:
    server = UrlServer().start()
    try:
        policy = UrlPolicy(allow_private=True, resolver=Resolver(table={"localhost": [["127.0.0.1"]]}))
        for host in ("127.0.0.1", "localhost"):
            assert fetch(server.url("/img.png", host), "image", MB, policy) == server.image
        assert server.requests[-1].host == f"localhost:{server.port}"
        # The bounds still hold.
        assert "larger than" in refused(server.url("/big"), policy).message
        assert "could not connect to 127.0.0.1" in refused("http://127.0.0.1:1/img.png", policy).message
    finally:
        server.stop()


def test_media_refuses_other_schemes_before_any_fetch() -> None:
    calls: list[str] = []

    def fetcher(url: str, field: str, max_bytes: int) -> bytes:
        calls.append(url)
        return png_bytes()

    for value in ("file:///etc/passwd", "FTP://host/x.png", "gopher://127.0.0.1:6379/_FLUSHALL",
                  "dict://127.0.0.1:11211/stat"):
        with pytest.raises(JobError, match=r"^images\[0\]\.image: .*URLs are not accepted"):
            decode_image(value, "images[0].image", MB, fetcher)
    assert calls == []
    assert decode_image("HTTPS://images.test/a.png", "image", MB, fetcher).width == 40
    assert calls == ["HTTPS://images.test/a.png"]


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("169.254.169.254", False), ("224.0.0.251", False), ("ff02::fb", False), ("::ffff:10.0.0.1", False),
    ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True), ("64:ff9b::a00:1", False), ("2002:0a00:0001::", False),
    ("fe80::1", False), ("fc00::1", False), ("::", False), ("0.0.0.0", False), ("100.64.1.1", False),
])
def test_is_public(address: str, public: bool) -> None:
    import ipaddress

    assert is_public(ipaddress.ip_address(address)) is public
