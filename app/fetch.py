"""Fetch a query image from a client-given URL without becoming an SSRF proxy.

Off by default (`FetchSettings.enabled`). When on, `UrlFetcher.fetch(url)` applies, to the URL the
client gave and again to every redirect target (at most `max_redirects`, followed by hand):

1. the URL parses, is http:// or https://, has a host name or IP literal, a valid port and no
   user name or password (`user@host` is a classic way to make a URL look like another host);
2. the host is on the allowlist (exact names or `*.example.com` patterns). An empty allowlist
   admits any host, because the address checks below are what keep internal services out; the
   allowlist narrows that further to hosts an operator trusts;
3. the host's addresses: IP literals in any notation (`[::1]`, `2130706433`, `0x7f000001`, `127.1`,
   `::ffff:127.0.0.1`) are parsed here; names are resolved (`getaddrinfo` in a worker thread) and
   the fetch is refused if ANY address is loopback, private, link-local, multicast, reserved,
   unspecified, otherwise not globally routable, or a cloud metadata address. IPv4 addresses
   embedded in IPv6 ones (mapped, 6to4, Teredo, NAT64) are checked as IPv4 too;
4. the connection goes to exactly those checked addresses (pinned, see `_PinningBackend`), so a
   second DNS answer (rebinding) can never redirect it;
5. the body is read raw (`Accept-Encoding: identity`; a compressed answer is refused, so a small
   gzip bomb cannot expand past the cap) and counted while streaming; the first byte over
   `max_bytes` ends the fetch. A declared Content-Length over the cap is refused before reading;
6. connect timeout per connection attempt, and one total deadline over all of it (DNS, every hop,
   the body), so a server that trickles bytes cannot hold a worker.

Private networks: `allowed_private_networks` (CIDRs, default none) lets an operator admit an
internal image store, and lets the tests fetch from a server on 127.0.0.1 without switching the
address checks off wholesale: a redirect from an admitted 127.0.0.1 to 127.0.0.2, ::1, 10.0.0.1 or
the metadata address is still refused. Metadata addresses are refused even inside an admitted
network. `resolver` and `network_backend` can be injected (tests count lookups and connection
attempts with them); neither is reachable from settings or the environment.

Every refusal is a `FetchError(code, message)` (an `app.errors.ApiError`; `app.errors.STATUS` gives
its HTTP status); messages name at most the host the client gave, never a resolved address or a
redirect target.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Annotated, Any, Final

import anyio
import httpcore
import httpx
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.errors import ApiError

__all__ = ["FetchError", "FetchSettings", "METADATA_ADDRESSES", "Resolver", "UrlFetcher",
           "address_refusal", "parse_allowlist", "parse_networks", "system_resolver"]

MiB: Final = 1 << 20
MAX_URL_CHARS: Final = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: `(host, port) -> addresses as strings`; the default is `system_resolver`.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

#: Cloud instance metadata services: never fetched from, whatever the settings say. AWS/GCP/Azure/
#: OpenStack (169.254.169.254), AWS over IPv6 (fd00:ec2::254), Alibaba (100.100.100.200), AWS ECS
#: task metadata (169.254.170.2). All are also non-public; naming them keeps them refused even
#: inside an `allowed_private_networks` range.
METADATA_ADDRESSES: Final[frozenset[IPAddress]] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2"))

_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
# What a host name may contain once httpx has IDNA-encoded it; anything else (percent escapes,
# which httpx leaves in hosts such as "a%20b") is refused rather than handed to the resolver.
_HOST_NAME: Final = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
# Host strings inet_aton reads as an IPv4 address ("2130706433", "0x7f000001", "127.1").
_NUMERIC_V4: Final = re.compile(r"[0-9][0-9a-fx.]*")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_REQUEST_HEADERS: Final = {"Accept": "image/*", "Accept-Encoding": "identity",
                           "User-Agent": "clipsearch-image-fetch/1"}


class FetchError(ApiError):
    """A fetch the service refuses or could not complete; `message` is safe to show the client."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)


# --- settings ------------------------------------------------------------------------------------

def parse_allowlist(value: Any) -> Any:
    """Allowlist entries from a comma/whitespace-separated string or a list, normalised the way
    request hosts are (lower case, IDNA, no trailing dot, canonical IP literals); `*.example.com`
    matches every subdomain of example.com, not example.com itself."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)):
        return value  # pydantic reports the type error
    entries: list[str] = []
    for raw in value:
        if not isinstance(raw, str):
            raise ValueError("allowlist entries must be strings")
        entry = raw.strip()
        wildcard = entry.startswith("*.")
        host = _normalise_host(entry[2:] if wildcard else entry)
        if host is None or (wildcard and _literal_address(host) is not None):
            raise ValueError(f"allowlist entry {raw!r} is not a host name, IP address or *.domain")
        entries.append("*." + host if wildcard else host)
    return entries


def parse_networks(value: Any) -> Any:
    """CIDRs from a comma/whitespace-separated string or a list; host bits must be zero (a typo
    such as 10.0.0.1/8 is an error, not a silently wider range)."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)):
        return value
    try:
        return [n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                else ipaddress.ip_network(str(n).strip(), strict=True) for n in value]
    except ValueError as exc:
        raise ValueError(f"allowed_private_networks: {exc}") from None


Allowlist = Annotated[list[str], BeforeValidator(parse_allowlist)]
Networks = Annotated[list[IPNetwork], BeforeValidator(parse_networks)]


class FetchSettings(BaseModel):
    """Knobs of `UrlFetcher`; the service's Settings carries them as CLIPSEARCH_FETCH_* variables
    (see `from_settings`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=False, description="Accept {\"image_url\": ...} queries at all.")
    allowlist: Allowlist = Field(default_factory=list, description=(
        "Hosts that may be fetched from: exact names/IPs or *.example.com; empty = any public host."))
    max_bytes: int = Field(default=10 * MiB, ge=1, description="Largest body read, counted while streaming.")
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60,
                                     description="Per TCP (+TLS) connection attempt.")
    total_timeout_s: float = Field(default=10.0, gt=0, le=300,
                                   description="Whole fetch: DNS, every redirect hop and the body.")
    max_redirects: int = Field(default=3, ge=0, le=10, description="Redirects followed; one more is refused.")
    allowed_private_networks: Networks = Field(default_factory=list, description=(
        "Non-public CIDRs that may be fetched from anyway (an internal image store); metadata "
        "addresses stay refused. Empty (the default) admits public addresses only."))

    @model_validator(mode="after")
    def _check(self) -> FetchSettings:
        if self.connect_timeout_s > self.total_timeout_s:
            raise ValueError("connect_timeout_s must not exceed total_timeout_s")
        return self

    @classmethod
    def from_settings(cls, settings: Any) -> FetchSettings:
        """From the service Settings' flat `fetch_*` fields; the byte cap is the upload cap, so an
        image costs the same whichever way it arrives."""
        return cls(enabled=settings.fetch_urls, allowlist=settings.fetch_allowlist,
                   max_bytes=settings.max_upload_bytes,
                   connect_timeout_s=settings.fetch_connect_timeout_s,
                   total_timeout_s=settings.fetch_total_timeout_s,
                   max_redirects=settings.fetch_max_redirects,
                   allowed_private_networks=settings.fetch_allowed_private_networks)


# --- address policy ------------------------------------------------------------------------------

def address_refusal(address: IPAddress, allowed_networks: Sequence[IPNetwork] = ()) -> str | None:
    """None when the service may connect to `address`; else the kind of address it is, e.g.
    "loopback" (words only, fit for a client message)."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(int(address))  # fe80::1%eth0 -> fe80::1 for the lookups
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if any(address.version == net.version and address in net for net in allowed_networks):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on the wire
            return address_refusal(address.ipv4_mapped, allowed_networks)
        teredo = address.teredo
        for embedded in (address.sixtofour, teredo[1] if teredo else None,
                         ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF) if address in _NAT64 else None):
            if embedded is not None and (reason := address_refusal(embedded, allowed_networks)):
                return reason
    for reason, hit in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                        ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                        ("private", address.is_private), ("reserved", address.is_reserved),
                        ("site-local", getattr(address, "is_site_local", False)),
                        ("non-public", not address.is_global)):
        if hit:
            return reason
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """All TCP addresses of `host`, from getaddrinfo in a worker thread (it blocks)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def _literal_address(host: str) -> IPAddress | None:
    """`host` read as an IP address the way a resolver would read it, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_V4.fullmatch(host):
        try:  # the forms inet_aton (and so getaddrinfo) accepts: 2130706433, 0x7f000001, 127.1
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _normalise_host(host: str) -> str | None:
    """Lower-case ASCII host without a trailing dot, IP literals in canonical form; None when it is
    neither a plausible host name nor an IP address."""
    host = host.strip().strip("[]") if host.startswith("[") else host.strip()
    try:
        host = httpx.URL(f"http://[{host}]/" if ":" in host else f"http://{host}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return None
    host = host.lower()
    if (address := _literal_address(host)) is not None:
        return str(address)
    host = host.rstrip(".")
    return host if host and len(host) <= 253 and _HOST_NAME.fullmatch(host) else None


def _host_allowed(host: str, allowlist: Sequence[str]) -> bool:
    if not allowlist:
        return True
    return any(host.endswith(entry[1:]) if entry.startswith("*.") else host == entry
               for entry in allowlist)


# --- connections pinned to checked addresses -----------------------------------------------------

class _PinningBackend(httpcore.AsyncNetworkBackend):
    """Connects to the addresses the fetcher checked for a host instead of resolving it again.

    httpcore asks its network backend to `connect_tcp(host, port)` with the URL's own host and then
    runs TLS over that stream with `server_hostname` = the URL's host, so pinning here keeps the
    URL, the Host header, SNI and certificate verification exactly as for an ordinary request while
    the TCP connection can only reach a checked address. (The alternative, rewriting the URL to the
    IP and sending a Host header, breaks SNI and makes certificate checks compare against the IP.)
    A host that was not checked is refused: this fails closed should anything ever connect
    somewhere the fetcher did not look at.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend):
        self._inner = inner
        self._pins: dict[tuple[str, int], tuple[str, ...]] = {}

    def pin(self, host: str, port: int, addresses: Iterable[str]) -> None:
        self._pins[(host, port)] = tuple(addresses)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        addresses = self._pins.get((host, port))
        if not addresses:
            raise FetchError("url_forbidden", "refused to connect to an address that was not checked")
        failure: httpcore.ConnectError | None = None
        for address in addresses:  # every one of them passed the address checks
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout,
                                                     local_address=local_address,
                                                     socket_options=socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise FetchError("url_forbidden", "refused to connect to a local socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (its exception mapping and response streams) over a connection pool
    that connects through `_PinningBackend`. httpx has no public way to pass a network backend, so
    the pool it builds is replaced; the type check makes an httpx that changes this fail loudly
    instead of connecting unpinned."""

    def __init__(self, backend: _PinningBackend, ssl_context: ssl.SSLContext):
        super().__init__(verify=ssl_context, trust_env=False, http1=True, http2=False, retries=0)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("this httpx version builds its transport differently; "
                               "app.fetch cannot pin connections")
        self._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context, max_connections=4,
                                                  http1=True, http2=False, retries=0,
                                                  network_backend=backend)


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """certifi's CA bundle (httpx's default), loaded once per process: loading it costs ~50 ms, and
    an SSLContext is safe to share. SSL_CERT_FILE and friends are ignored (trust_env=False), as are
    proxy variables elsewhere: a proxy would connect for us and bypass the pinning."""
    return httpx.create_ssl_context(trust_env=False)


# --- the fetcher ---------------------------------------------------------------------------------

class UrlFetcher:
    """Fetches image bytes from client-given URLs under `FetchSettings`; safe to share between
    concurrent requests (each fetch has its own client and pins)."""

    def __init__(self, settings: FetchSettings, *, resolver: Resolver | None = None,
                 network_backend: httpcore.AsyncNetworkBackend | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self.settings = settings
        self._resolve: Resolver = resolver or system_resolver
        self._backend = network_backend or httpcore.AnyIOBackend()
        self._ssl = ssl_context or _default_ssl_context()

    async def fetch(self, url: str) -> bytes:
        """The body at `url` (at most `max_bytes`), after every check in the module docstring.
        The bytes are not checked to be an image: run `clipsearch.images.decode_image` on them.

        Raises:
            FetchError: bad_url 400, url_forbidden 403 (and fetch_disabled 403), payload_too_large
                413, fetch_failed 502, fetch_timeout 504.
        """
        if not self.settings.enabled:
            raise FetchError("fetch_disabled", "fetching images by URL is turned off on this server")
        if not isinstance(url, str):
            raise FetchError("bad_url", "image_url must be a string")
        try:
            with anyio.fail_after(self.settings.total_timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise _timeout(self.settings.total_timeout_s) from None

    async def _fetch(self, url: str) -> bytes:
        s = self.settings
        current = _check_url(url, hop=0)
        backend = _PinningBackend(self._backend)
        # read/write also get the total budget: the overall deadline is what bounds them.
        timeout = httpx.Timeout(connect=s.connect_timeout_s, read=s.total_timeout_s,
                                write=s.total_timeout_s, pool=s.connect_timeout_s).as_dict()
        # The transport is driven directly, not through httpx.AsyncClient: even with
        # follow_redirects=False the client builds the next request from Location itself (copying
        # the old host into host-less URLs such as file:///etc/passwd, raising on odd ones), and
        # here every redirect is parsed and checked by `_check_url` alone. No client also means no
        # cookie jar, auth or proxy handling that could carry anything between hops.
        async with _PinnedTransport(backend, self._ssl) as transport:
            for hop in range(s.max_redirects + 1):
                await self._pin(current, hop, backend)
                request = httpx.Request("GET", current, headers=_REQUEST_HEADERS,
                                        extensions={"timeout": timeout})
                try:
                    response = await transport.handle_async_request(request)
                except httpx.ConnectTimeout:
                    raise FetchError("fetch_timeout", "could not connect to the image host within "
                                                           f"{s.connect_timeout_s:g} s") from None
                except httpx.TimeoutException:
                    raise _timeout(s.total_timeout_s) from None
                except httpx.HTTPError as exc:
                    raise _upstream_error(exc) from None
                response.request = request
                try:
                    if not response.has_redirect_location:
                        return await self._read_body(response)
                    if hop == s.max_redirects:
                        raise FetchError("fetch_failed",
                                         f"the image URL redirected more than {s.max_redirects} times")
                    try:
                        target = current.join(response.headers["location"].strip())
                    except (httpx.InvalidURL, ValueError, TypeError):
                        raise FetchError("fetch_failed",
                                         "the image URL redirected to an invalid URL") from None
                    current = _check_url(target, hop=hop + 1)
                finally:
                    await response.aclose()
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def _pin(self, url: httpx.URL, hop: int, backend: _PinningBackend) -> None:
        """Allowlist and address checks for one hop; the checked addresses are pinned for it."""
        raw_host = url.raw_host.decode("ascii")
        port = url.port or _DEFAULT_PORTS[url.scheme]
        host = _normalise_host(raw_host)
        if host is None:
            raise _refused(hop, "bad_url", "has an invalid host name")
        # Only the client's own host is ever named in a message; redirect targets stay anonymous.
        subject = f"host {raw_host[:253]!r}" if hop == 0 else "a redirect target"
        if not _host_allowed(host, self.settings.allowlist):
            raise FetchError("url_forbidden", f"{subject} is not on this server's allowlist")
        literal = _literal_address(host)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            try:
                found = await self._resolve(host, port)
            except OSError:  # socket.gaierror and friends
                raise FetchError("fetch_failed", f"{subject} could not be resolved") from None
            try:
                addresses = [ipaddress.ip_address(a) for a in found]
            except ValueError:  # a resolver answer that is not an address: fail closed
                raise FetchError("url_forbidden", f"{subject} resolved to an unusable address") from None
            if not addresses:
                raise FetchError("fetch_failed", f"{subject} could not be resolved")
        verb = "is" if literal is not None else "resolves to"
        for address in addresses:
            if reason := address_refusal(address, self.settings.allowed_private_networks):
                raise FetchError("url_forbidden", f"{subject} {verb} an address this server "
                                                       f"does not fetch from ({reason})")
        backend.pin(raw_host, port, [str(a) for a in addresses])

    async def _read_body(self, response: httpx.Response) -> bytes:
        cap = self.settings.max_bytes
        if not response.is_success:
            raise FetchError("fetch_failed", f"the image URL answered HTTP {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Asked for identity; decompressing would let a few KiB expand past the cap in one step.
            raise FetchError("fetch_failed", "the image URL answered with a compressed body")
        declared = response.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > cap:
            raise _too_large(cap)
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                if len(body) + len(chunk) > cap:  # whatever Content-Length said
                    raise _too_large(cap)
                body += chunk
        except httpx.TimeoutException:
            raise _timeout(self.settings.total_timeout_s) from None
        except httpx.HTTPError as exc:
            raise _upstream_error(exc) from None
        return bytes(body)


def _check_url(url: str | httpx.URL, hop: int) -> httpx.URL:
    """Parse and check a URL's form: scheme, host, port, no credentials."""
    if isinstance(url, str):
        url = url.strip()
        if not url:
            raise FetchError("bad_url", "image_url is empty")
        if len(url) > MAX_URL_CHARS:
            raise FetchError("bad_url", f"image_url is longer than {MAX_URL_CHARS} characters")
        try:
            url = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise FetchError("bad_url", "image_url is not a valid URL") from None
    if url.scheme not in _DEFAULT_PORTS:
        raise _refused(hop, "bad_url", "is not an http:// or https:// URL")
    if not url.raw_host:
        raise _refused(hop, "bad_url", "has no host")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise _refused(hop, "bad_url", "has an invalid port")
    if url.userinfo:
        raise _refused(hop, "bad_url", "contains a user name or password")
    return url


def _refused(hop: int, code: str, what: str) -> FetchError:
    # The client's URL gets the client-error status; the same flaw in a redirect target is the
    # upstream's doing and a policy refusal (403), never a 400 about what the client sent.
    if hop == 0:
        return FetchError(code, f"image_url {what}")
    return FetchError("url_forbidden", f"the image URL redirected to a URL that {what}")


def _too_large(cap: int) -> FetchError:
    return FetchError("payload_too_large", f"the image at image_url is larger than {cap:,} bytes")


def _timeout(total_s: float) -> FetchError:
    return FetchError("fetch_timeout", f"fetching image_url did not finish within {total_s:g} s")


def _upstream_error(exc: httpx.HTTPError) -> FetchError:
    if isinstance(exc, httpx.ConnectError):
        return FetchError("fetch_failed", "could not connect to the image host")
    if isinstance(exc, httpx.RemoteProtocolError):
        return FetchError("fetch_failed", "the image host sent an invalid HTTP response")
    return FetchError("fetch_failed", "fetching image_url failed")
