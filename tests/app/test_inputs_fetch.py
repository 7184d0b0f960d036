"""app.fetch.UrlFetcher against a real HTTP(S) server on 127.0.0.1.

Only 127.0.0.1 is ever connected to: every connection goes through `RecordingBackend`, which
records it and refuses anything but loopback, and names other than `localhost` (from /etc/hosts)
are answered by `TableResolver`, never by DNS. Refusal tests run with no private network admitted
and assert that no connection was attempted; success, redirect and streaming tests admit only
127.0.0.1/32, so a redirect to any other non-public address is still refused.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpcore
import pytest
from pydantic import ValidationError

from app.fetch import (METADATA_ADDRESSES, FetchError, FetchSettings, UrlFetcher, _PinningBackend,
                       address_refusal, system_resolver)

LOCAL = ["127.0.0.1/32"]
IMAGE = bytes(range(256)) * 16  # 4 KiB stand-in: the fetcher does not look inside
CAP = 64 * 1024


# --- the local server ----------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalServer

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.requests.append(url.path)
        getattr(self, "route_" + url.path.strip("/"), self.route_missing)(q)

    def reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def stream(self, n: int, chunked: bool) -> None:
        """Send n bytes in 16 KiB pieces; record how many got out before the client hung up."""
        sent = 0
        try:
            while sent < n:
                piece = b"\xab" * min(16384, n - sent)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            self.server.sent.append(sent)
            self.close_connection = True

    def route_missing(self, q: dict[str, str]) -> None:
        self.reply(404, b"no such route")

    def route_image(self, q: dict[str, str]) -> None:
        self.reply(200, IMAGE, Content_Type="image/png")

    def route_host(self, q: dict[str, str]) -> None:
        self.reply(200, self.headers["Host"].encode())

    def route_bytes(self, q: dict[str, str]) -> None:
        self.reply(200, b"\x01" * int(q["n"]))

    def route_redirect(self, q: dict[str, str]) -> None:
        n = int(q["n"])
        if n == 0:
            self.reply(200, b"done")
        else:
            self.reply(302, Location=f"/redirect?n={n - 1}")

    def route_to(self, q: dict[str, str]) -> None:
        self.reply(int(q.get("status", "302")), Location=q["loc"])

    def route_chunked(self, q: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.stream(int(q["n"]), chunked=True)

    def route_unframed(self, q: dict[str, str]) -> None:
        # No Content-Length, no chunking: the body runs until the server closes the connection.
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.stream(int(q["n"]), chunked=False)

    def route_lying(self, q: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", q["claim"])
        self.end_headers()
        self.stream(int(q["n"]), chunked=False)

    def route_gzip(self, q: dict[str, str]) -> None:
        self.reply(200, gzip.compress(b"\0" * 1_000_000), Content_Encoding="gzip")

    def route_status(self, q: dict[str, str]) -> None:
        self.reply(int(q["code"]), b"upstream says no")

    def route_garbage(self, q: dict[str, str]) -> None:
        self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
        self.close_connection = True

    def route_sleep(self, q: dict[str, str]) -> None:
        self.server.release.wait(5)  # accepted, request read, never answered
        self.close_connection = True

    def route_trickle(self, q: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):  # one byte per 50 ms: each read is quick, the whole is not
                if self.server.release.wait(0.05):
                    break
                self.wfile.write(b"x")
                self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]
        self.requests: list[str] = []
        self.sent: list[int] = []
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The fetcher hangs up mid-response on purpose (cap reached, refusal, timeout); only
        # anything other than a reset connection is worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def wait_sent(self, timeout: float = 3.0) -> int:
        deadline = time.monotonic() + timeout
        while not self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.sent, "the server never finished streaming"
        return self.sent[0]

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = LocalServer()
    yield srv
    srv.close()


# --- instrumented resolver and network backend -----------------------------------------------------

class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records every connection attempt, and refuses all but loopback (a second safety net: a
    broken check must fail the test, not send traffic elsewhere)."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> Any:
        self.connects.append((host, port))
        assert ipaddress.ip_address(host).is_loopback, f"test tried to connect to {host}"
        return await self.inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                            socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise AssertionError("unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class TableResolver:
    """Answers from a table; `localhost` through the system resolver (/etc/hosts), never DNS."""

    def __init__(self, table: dict[str, list[str]] | None = None):
        self.table = table or {}
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host in self.table:
            return self.table[host]
        if host == "localhost":
            return await system_resolver(host, port)
        raise socket.gaierror(socket.EAI_NONAME, "not in the test table")


class Run(SimpleNamespace):
    backend: RecordingBackend
    resolver: TableResolver


def run(url: str, table: dict[str, list[str]] | None = None, ssl_context: ssl.SSLContext | None = None,
        **settings: Any) -> tuple[bytes | FetchError, Run]:
    """Fetch `url`; return the body or the FetchError, plus the resolver and backend used."""
    probe = Run(backend=RecordingBackend(), resolver=TableResolver(table))
    fetcher = UrlFetcher(FetchSettings(enabled=True, **settings), resolver=probe.resolver,
                         network_backend=probe.backend, ssl_context=ssl_context)
    try:
        return asyncio.run(fetcher.fetch(url)), probe
    except FetchError as exc:
        return exc, probe


def fetched(url: str, **kw: Any) -> bytes:
    kw.setdefault("allowed_private_networks", LOCAL)
    out, _ = run(url, **kw)
    assert isinstance(out, bytes), f"refused: {out!r} {getattr(out, 'message', '')}"
    return out


def refused(url: str, code: str, status: int, **kw: Any) -> tuple[FetchError, Run]:
    out, probe = run(url, **kw)
    assert isinstance(out, FetchError), f"not refused: {url}"
    assert (out.code, out.status) == (code, status), out.message
    assert str(out) == out.message
    return out, probe


def forbidden_before_connecting(url: str, **kw: Any) -> FetchError:
    err, probe = refused(url, "url_forbidden", 403, **kw)
    assert probe.backend.connects == []
    return err


# --- success --------------------------------------------------------------------------------------

def test_fetches_the_body(server: LocalServer) -> None:
    assert fetched(server.url("/image")) == IMAGE
    assert server.requests == ["/image"]


def test_a_name_is_pinned_to_its_checked_address_and_keeps_its_host_header(server: LocalServer) -> None:
    out, probe = run(server.url("/host", host="img.test"), table={"img.test": ["127.0.0.1"]},
                     allowed_private_networks=LOCAL)
    assert out == f"img.test:{server.port}".encode()  # the Host header the URL implies
    assert probe.resolver.calls == ["img.test"]  # resolved once, by the fetcher
    assert probe.backend.connects == [("127.0.0.1", server.port)]  # to the address it checked


def test_body_exactly_at_the_cap_is_accepted(server: LocalServer) -> None:
    assert len(fetched(server.url(f"/bytes?n={CAP}"), max_bytes=CAP)) == CAP


def test_three_redirects_are_followed(server: LocalServer) -> None:
    assert fetched(server.url("/redirect?n=3")) == b"done"
    assert server.requests == ["/redirect"] * 4


def test_relative_and_absolute_redirects(server: LocalServer) -> None:
    assert fetched(server.url("/to?loc=" + quote("image"))) == IMAGE
    assert fetched(server.url("/to?status=307&loc=" + quote(server.url("/image")))) == IMAGE


def test_https_is_pinned_with_sni_and_certificate_checked_for_the_name(tls: SimpleNamespace) -> None:
    srv = LocalServer(tls.server_context("img.test"))
    tls.sni.clear()
    try:
        url = srv.url("/host", host="img.test", scheme="https")
        out, probe = run(url, table={"img.test": ["127.0.0.1"]}, ssl_context=tls.client,
                         allowed_private_networks=LOCAL)
        assert out == f"img.test:{srv.port}".encode()
        assert tls.sni == ["img.test"]  # TLS spoke to the name, TCP to the checked address
        assert probe.backend.connects == [("127.0.0.1", srv.port)]
    finally:
        srv.close()


def test_https_certificate_for_another_name_fails(tls: SimpleNamespace) -> None:
    srv = LocalServer(tls.server_context("other.test"))
    try:
        err, _ = refused(srv.url("/image", host="img.test", scheme="https"), "fetch_failed", 502,
                         table={"img.test": ["127.0.0.1"]}, ssl_context=tls.client,
                         allowed_private_networks=LOCAL)
        assert err.message == "could not connect to the image host"
    finally:
        srv.close()


# --- byte cap while streaming ------------------------------------------------------------------------

BIG = 64 << 20  # what the server tries to send; the client stops after CAP


def test_chunked_body_over_the_cap_is_cut_off_while_streaming(server: LocalServer) -> None:
    t0 = time.monotonic()
    err, _ = refused(server.url(f"/chunked?n={BIG}"), "payload_too_large", 413,
                     max_bytes=CAP, allowed_private_networks=LOCAL)
    assert f"{CAP:,} bytes" in err.message
    assert time.monotonic() - t0 < 2
    assert server.wait_sent() < BIG // 4  # the client hung up long before the end


def test_unframed_body_over_the_cap_is_cut_off_while_streaming(server: LocalServer) -> None:
    refused(server.url(f"/unframed?n={BIG}"), "payload_too_large", 413, max_bytes=CAP,
            allowed_private_networks=LOCAL)
    assert server.wait_sent() < BIG // 4


def test_declared_length_over_the_cap_is_refused_before_reading(server: LocalServer) -> None:
    refused(server.url(f"/lying?claim={BIG}&n={CAP * 4}"), "payload_too_large", 413, max_bytes=CAP,
            allowed_private_networks=LOCAL)


def test_a_content_length_that_understates_the_body_never_yields_more_than_it(server: LocalServer) -> None:
    # Claims 100 bytes, sends 4x the cap: the body ends where the framing says, never past the cap.
    out = fetched(server.url(f"/lying?claim=100&n={CAP * 4}"), max_bytes=CAP)
    assert out == b"\xab" * 100


# --- redirects ------------------------------------------------------------------------------------

def test_a_fourth_redirect_is_refused(server: LocalServer) -> None:
    err, _ = refused(server.url("/redirect?n=4"), "fetch_failed", 502, allowed_private_networks=LOCAL)
    assert err.message == "the image URL redirected more than 3 times"
    assert server.requests == ["/redirect"] * 4  # the fifth URL is never requested


def test_max_redirects_zero_refuses_the_first(server: LocalServer) -> None:
    refused(server.url("/redirect?n=1"), "fetch_failed", 502, max_redirects=0, allowed_private_networks=LOCAL)
    assert server.requests == ["/redirect"]


@pytest.mark.parametrize("target", [
    "http://127.0.0.2/", "http://[::1]/", "http://localhost./x", "http://10.0.0.1/", "http://172.16.0.1/",
    "http://192.168.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
    "http://[::ffff:10.0.0.1]/", "http://2130706434/", "http://internal.test/",
])
def test_redirect_to_a_non_public_address_is_refused_after_an_allowed_first_hop(
        server: LocalServer, target: str) -> None:
    # "localhost." is answered from the table (::1): /etc/hosts says 127.0.0.1, which is admitted.
    table = {"internal.test": ["10.1.2.3"], "localhost": ["::1"]}
    err, probe = refused(server.url("/to?loc=" + quote(target)), "url_forbidden", 403, table=table,
                         allowed_private_networks=LOCAL + ["169.254.0.0/16"])
    assert err.message.startswith("a redirect target ")
    assert "10." not in err.message and "::" not in err.message and "169." not in err.message
    assert probe.backend.connects == [("127.0.0.1", server.port)]  # only the first hop connected
    assert server.requests == ["/to"]


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/x", "file:///etc/passwd", "gopher://127.0.0.1/",
                                    "javascript:alert(1)", "data:image/png;base64,QUJD",
                                    "http://user:pw@127.0.0.1/"])
def test_redirect_to_another_scheme_or_credentials_is_refused(server: LocalServer, target: str) -> None:
    err, probe = refused(server.url("/to?loc=" + quote(target)), "url_forbidden", 403,
                         allowed_private_networks=LOCAL)
    assert err.message.startswith("the image URL redirected to a URL that ")
    assert len(probe.backend.connects) == 1


def test_redirect_to_a_host_off_the_allowlist_is_refused_unresolved(server: LocalServer) -> None:
    err, probe = refused(server.url("/to?loc=" + quote("http://elsewhere.test/")), "url_forbidden", 403,
                         table={"elsewhere.test": ["127.0.0.1"]}, allowlist=["127.0.0.1"],
                         allowed_private_networks=LOCAL)
    assert err.message == "a redirect target is not on this server's allowlist"
    assert probe.resolver.calls == []


def test_every_hop_is_resolved_and_checked_again(server: LocalServer) -> None:
    # Same name on both hops; the second answer has turned private (rebinding between hops).
    answers = iter([["127.0.0.1"], ["10.0.0.7"]])

    class Rebinding(TableResolver):
        async def __call__(self, host: str, port: int) -> list[str]:
            self.calls.append(host)
            return next(answers)

    probe = Run(backend=RecordingBackend(), resolver=Rebinding())
    fetcher = UrlFetcher(FetchSettings(enabled=True, allowed_private_networks=LOCAL),
                         resolver=probe.resolver, network_backend=probe.backend)
    with pytest.raises(FetchError) as info:
        asyncio.run(fetcher.fetch(server.url("/to?loc=" + quote(server.url("/image", host="img.test")),
                                             host="img.test")))
    assert (info.value.code, info.value.status) == ("url_forbidden", 403)
    assert probe.resolver.calls == ["img.test", "img.test"]
    assert probe.backend.connects == [("127.0.0.1", server.port)]


# --- refused addresses (no private network admitted) --------------------------------------------------

@pytest.mark.parametrize("host, reason", [
    ("127.0.0.1", "loopback"), ("localhost", "loopback"), ("[::1]", "loopback"),
    ("0.0.0.0", "unspecified"), ("[::]", "unspecified"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("172.31.255.254", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"), ("[fd00:ec2::254]", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("169.254.1.1", "link-local"), ("[fe80::1]", "link-local"),
    ("[::ffff:127.0.0.1]", "loopback"), ("[::ffff:10.0.0.1]", "private"), ("2130706433", "loopback"),
    ("0x7f000001", "loopback"), ("127.1", "loopback"), ("0", "unspecified"), ("100.64.0.1", "non-public"),
    ("224.0.0.1", "multicast"), ("[ff02::1]", "multicast"), ("255.255.255.255", "private"),
    ("240.0.0.1", "private"), ("[fc00::1]", "private"), ("[64:ff9b::7f00:1]", "loopback"),
    ("[2002:7f00:1::]", "loopback"), ("[2002:a00:1::]", "private"), ("198.18.0.1", "private"),
    ("[::127.0.0.1]", "reserved"),
])
def test_non_public_addresses_are_refused_before_connecting(server: LocalServer, host: str, reason: str) -> None:
    err = forbidden_before_connecting(f"http://{host}:{server.port}/image")
    assert err.message.endswith(f"an address this server does not fetch from ({reason})")
    assert err.message.startswith(f"host '{host.strip('[]')}' ")  # the host as given, nothing resolved
    assert server.requests == []


@pytest.mark.parametrize("answers", [["10.0.0.5"], ["93.184.216.34", "127.0.0.1"],
                                     ["2606:4700::1111", "::1"], ["fe80::1%2"], ["169.254.169.254"]])
def test_a_name_is_refused_if_any_address_is_non_public(answers: list[str]) -> None:
    err = forbidden_before_connecting("http://images.test/cat.png", table={"images.test": answers})
    assert err.message.startswith("host 'images.test' resolves to an address this server does not fetch from")
    assert not any(a.split("%")[0] in err.message for a in answers)


def test_a_resolver_answer_that_is_no_address_is_refused() -> None:
    err = forbidden_before_connecting("http://images.test/", table={"images.test": ["not-an-ip"]})
    assert err.message == "host 'images.test' resolved to an unusable address"


def test_a_name_that_does_not_resolve_is_an_upstream_failure() -> None:
    err, probe = refused("http://nowhere.test/", "fetch_failed", 502)
    assert err.message == "host 'nowhere.test' could not be resolved"
    assert probe.backend.connects == []
    err, _ = refused("http://empty.test/", "fetch_failed", 502, table={"empty.test": []})


def test_admitted_network_does_not_admit_its_neighbours_or_metadata() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("169.254.0.0/16")]
    assert address_refusal(ipaddress.ip_address("10.9.8.7"), nets) is None
    assert address_refusal(ipaddress.ip_address("::ffff:10.9.8.7"), nets) is None
    assert address_refusal(ipaddress.ip_address("192.168.0.1"), nets) == "private"
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), nets) == "cloud metadata"
    assert all(address_refusal(a, nets) == "cloud metadata" for a in METADATA_ADDRESSES)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1111",
                                     "2a00:1450:4001:82b::200e", "::ffff:8.8.8.8"])
def test_public_addresses_pass_the_address_check(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None  # (checked only, never connected)


# --- allowlist ---------------------------------------------------------------------------------------

ALLOW = ["images.example.com", "*.cdn.example.com", "127.0.0.1"]


@pytest.mark.parametrize("url", ["http://evil.example.org/x.png", "http://cdn.example.com/x.png",
                                 "http://images.example.com.evil.test/x.png", "http://xcdn.example.com/",
                                 "http://example.com/", "http://127.0.0.2/", "http://2130706434/"])
def test_hosts_off_the_allowlist_are_refused_unresolved(url: str) -> None:
    err, probe = refused(url, "url_forbidden", 403, allowlist=ALLOW)
    assert probe.resolver.calls == [] and probe.backend.connects == []
    assert err.message.endswith("is not on this server's allowlist")
    assert "images.example.com" not in err.message.replace(urlsplit(url).hostname or "", "")


@pytest.mark.parametrize("host", ["images.example.com", "IMAGES.Example.COM.", "a.cdn.example.com",
                                  "x.y.cdn.example.com"])
def test_allowlisted_names_still_get_the_address_check(host: str) -> None:
    err, probe = refused(f"http://{host}/x.png", "url_forbidden", 403, allowlist=ALLOW,
                         table={host.lower().rstrip("."): ["127.0.0.1"]})
    assert err.message.endswith("(loopback)")
    assert len(probe.resolver.calls) == 1 and probe.backend.connects == []


def test_allowlisted_ip_literal_in_another_notation_is_allowed(server: LocalServer) -> None:
    # 2130706433 is 127.0.0.1; the allowlist compares canonical addresses.
    assert fetched(server.url("/image", host="2130706433"), allowlist=["127.0.0.1"]) == IMAGE


def test_allowlist_and_networks_parse_from_environment_strings() -> None:
    s = FetchSettings(allowlist="Images.Example.com., *.CDN.example.com  [::1],0x7f000001, bücher.example",
                      allowed_private_networks="10.0.0.0/8, fd00::/8")
    assert s.allowlist == ["images.example.com", "*.cdn.example.com", "::1", "127.0.0.1",
                           "xn--bcher-kva.example"]
    assert [str(n) for n in s.allowed_private_networks] == ["10.0.0.0/8", "fd00::/8"]
    assert not FetchSettings().enabled and FetchSettings().max_redirects == 3


@pytest.mark.parametrize("bad", [{"allowlist": "a b%20c"}, {"allowlist": "*.127.0.0.1"}, {"allowlist": "http://x/"},
                                 {"allowed_private_networks": "10.0.0.1/8"},
                                 {"allowed_private_networks": "nonsense"},
                                 {"connect_timeout_s": 5, "total_timeout_s": 2}, {"max_redirects": -1},
                                 {"unknown": 1}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FetchSettings(**bad)


def test_from_service_settings() -> None:
    service = SimpleNamespace(fetch_urls=True, fetch_allowlist=["a.example"], max_upload_bytes=1234,
                              fetch_connect_timeout_s=1.0, fetch_total_timeout_s=2.0, fetch_max_redirects=2,
                              fetch_allowed_private_networks=[])
    s = FetchSettings.from_settings(service)
    assert (s.enabled, s.allowlist, s.max_bytes, s.max_redirects) == (True, ["a.example"], 1234, 2)


# --- URL form ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, message", [
    ("ftp://127.0.0.1/x.png", "image_url is not an http:// or https:// URL"),
    ("file:///etc/passwd", "image_url is not an http:// or https:// URL"),
    ("gopher://127.0.0.1/", "image_url is not an http:// or https:// URL"),
    ("javascript:alert(1)", "image_url is not an http:// or https:// URL"),
    ("data:image/png;base64,QUJD", "image_url is not an http:// or https:// URL"),
    ("//127.0.0.1/x", "image_url is not an http:// or https:// URL"),
    ("", "image_url is empty"),
    ("   ", "image_url is empty"),
    ("http://", "image_url has no host"),
    ("http:///etc/passwd", "image_url has no host"),
    ("http://user:secret@images.test/", "image_url contains a user name or password"),
    ("http://images.test@127.0.0.1/", "image_url contains a user name or password"),
    ("http://images.test:99999/", "image_url has an invalid port"),
    ("http://ima ges.test/", "image_url has an invalid host name"),
    ("http://0177.0.0.1/", "image_url is not a valid URL"),
    ("http://[::1/", "image_url is not a valid URL"),
    ("http://images.test/\x00", "image_url is not a valid URL"),
    ("http://images.test/" + "a" * 2048, "image_url is longer than 2048 characters"),
])
def test_bad_urls_are_refused_unresolved(url: str, message: str) -> None:
    err, probe = refused(url, "bad_url", 400)
    assert err.message == message
    assert probe.resolver.calls == [] and probe.backend.connects == []


def test_a_url_that_is_not_a_string_is_refused() -> None:
    fetcher = UrlFetcher(FetchSettings(enabled=True))
    with pytest.raises(FetchError) as info:
        asyncio.run(fetcher.fetch(b"http://images.test/"))  # type: ignore[arg-type]
    assert (info.value.code, info.value.status, info.value.message) == ("bad_url", 400, "image_url must be a string")


def test_the_pinning_backend_fails_closed_for_unchecked_hosts(server: LocalServer) -> None:
    # Should anything in httpx/httpcore ever connect to a host the fetcher did not check (a proxy,
    # a changed code path), the connection is refused instead of made.
    recording = RecordingBackend()
    backend = _PinningBackend(recording)
    backend.pin("img.test", server.port, ["127.0.0.1"])
    with pytest.raises(FetchError) as info:
        asyncio.run(backend.connect_tcp("127.0.0.1", server.port))
    assert (info.value.code, info.value.status) == ("url_forbidden", 403)
    with pytest.raises(FetchError):
        asyncio.run(backend.connect_tcp("img.test", server.port + 1))  # same host, other port
    with pytest.raises(FetchError):
        asyncio.run(backend.connect_unix_socket("/run/docker.sock"))
    assert recording.connects == []


def test_disabled_fetcher_refuses_everything(server: LocalServer) -> None:
    fetcher = UrlFetcher(FetchSettings(allowed_private_networks=LOCAL))
    with pytest.raises(FetchError) as info:
        asyncio.run(fetcher.fetch(server.url("/image")))
    assert (info.value.code, info.value.status) == ("fetch_disabled", 403)
    assert server.requests == []


# --- upstream failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("path, message", [
    ("/status?code=404", "the image URL answered HTTP 404"),
    ("/status?code=500", "the image URL answered HTTP 500"),
    ("/to?status=304&loc=/image", "the image URL answered HTTP 304"),
    ("/status?code=302", "the image URL answered HTTP 302"),  # a redirect without Location
    ("/gzip", "the image URL answered with a compressed body"),
    ("/garbage", "the image host sent an invalid HTTP response"),
    ("/to?loc=" + quote("http://[::1"), "the image URL redirected to an invalid URL"),
])
def test_upstream_errors_are_502(server: LocalServer, path: str, message: str) -> None:
    err, _ = refused(server.url(path), "fetch_failed", 502, allowed_private_networks=LOCAL)
    assert err.message == message


def test_connection_refused_is_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    err, _ = refused(f"http://127.0.0.1:{port}/", "fetch_failed", 502, allowed_private_networks=LOCAL)
    assert err.message == "could not connect to the image host"


# --- timeouts ---------------------------------------------------------------------------------------

@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose accept queue is full, so a new connection attempt hangs in the handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(16):
        c = socket.socket()
        c.settimeout(0.2)
        fillers.append(c)
        try:
            c.connect(("127.0.0.1", port))
        except TimeoutError:
            break
    else:
        pytest.skip("this kernel never lets a connect to a full accept queue hang")
    yield port
    for c in fillers:
        c.close()
    listener.close()


def test_connect_timeout(unaccepting_port: int) -> None:
    t0 = time.monotonic()
    err, _ = refused(f"http://127.0.0.1:{unaccepting_port}/", "fetch_timeout", 504,
                     connect_timeout_s=0.3, total_timeout_s=5, allowed_private_networks=LOCAL)
    assert 0.25 < time.monotonic() - t0 < 2.5  # the connect timeout, not the total one
    assert err.message == "could not connect to the image host within 0.3 s"


@pytest.mark.parametrize("path", ["/sleep", "/trickle", "/to?loc=/sleep"])
def test_total_timeout(server: LocalServer, path: str) -> None:
    t0 = time.monotonic()
    err, _ = refused(server.url(path), "fetch_timeout", 504, connect_timeout_s=0.2, total_timeout_s=0.6,
                     allowed_private_networks=LOCAL)
    assert 0.5 < time.monotonic() - t0 < 2.5  # (slack for a busy machine)
    assert err.message == "fetching image_url did not finish within 0.6 s"


def test_total_timeout_covers_a_slow_resolver() -> None:
    class Slow(TableResolver):
        async def __call__(self, host: str, port: int) -> list[str]:
            await asyncio.sleep(5)
            return ["127.0.0.1"]

    fetcher = UrlFetcher(FetchSettings(enabled=True, connect_timeout_s=0.1, total_timeout_s=0.3),
                         resolver=Slow(), network_backend=RecordingBackend())
    t0 = time.monotonic()
    with pytest.raises(FetchError) as info:
        asyncio.run(fetcher.fetch("http://slow.test/"))
    assert (info.value.code, info.value.status) == ("fetch_timeout", 504)
    assert time.monotonic() - t0 < 2.0


# --- TLS fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A throwaway CA, `server_context(name)` for a leaf certificate of that name signed by it, a
    client context trusting only that CA, and the SNI names the servers saw."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    folder = tmp_path_factory.mktemp("tls")

    def cert(name: str, key: Any, issuer_name: x509.Name | None, issuer_key: Any, ca: bool) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("clipsearch test CA", ca_key, None, ca_key, ca=True)
    client = ssl.create_default_context(cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    sni: list[str] = []

    def server_context(name: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = cert(name, key, ca_cert.subject, ca_key, ca=False)
        pem = folder / f"{name}.pem"
        pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pem)
        ctx.sni_callback = lambda sock, server_name, _ctx: sni.append(server_name)  # type: ignore[assignment,misc]
        return ctx

    return SimpleNamespace(client=client, server_context=server_context, sni=sni)
