"""Fetching client-supplied URLs safely: ``image_url`` inputs and webhook targets.

The rules (docs/runpod.md):

- ``data:`` URIs (base64) and ``http``/``https`` URLs only.
- The host is resolved once and every address it resolves to must be public: loopback,
  link-local (cloud metadata 169.254.169.254 included), private, shared (CGNAT), multicast,
  unspecified and reserved ranges are refused, for IPv6 too, and IPv4 addresses embedded in IPv6
  (mapped, 6to4, NAT64) are checked as IPv4. The connection then goes to the checked address
  (Host header and TLS SNI keep the name), so DNS cannot be re-pointed between check and use.
- Redirects are followed by hand, at most 3, and every hop is checked again.
- The body is streamed and cut off past ``max_bytes``; the whole fetch has a deadline.
- Images must be something Pillow can decode, within a pixel limit (decompression bombs refused).
- An operator allow-list (host names or CIDRs) lets chosen internal hosts through.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

from gateway.errors import invalid
from inference.images import convertible_to_rgb

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ACCEPTED_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


class FetchRefused(Exception):
    """The URL may not be fetched, or what it returned is not acceptable; the message says why."""


class AddressRefused(FetchRefused):
    """The destination itself is not allowed (scheme, credentials or a non-public address)."""


@dataclass(frozen=True)
class AllowList:
    """Operator-approved internal destinations: exact host names and IP networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str | Iterable[str]) -> AllowList:
        """From ``"internal.example,10.0.0.0/8,127.0.0.1"`` (or an iterable of such items)."""
        items = text.split(",") if isinstance(text, str) else list(text)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in (i.strip() for i in items):
            if not raw:
                continue
            try:
                networks.append(ipaddress.ip_network(raw.strip("[]"), strict=False))
            except ValueError:
                hosts.add(raw.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        """True when ``host`` is listed by name."""
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IPAddress) -> bool:
        """True when ``ip`` lies in a listed network."""
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one kind of outbound fetch."""

    allow: AllowList = field(default_factory=AllowList)
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 15.0
    max_pixels: int = 36_000_000


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be contacted (``None``: it is a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_reason(embedded)
    checks = (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for name, hit in checks:
        if hit:
            return name
    if not ip.is_global:
        return "non-public"
    return None


async def resolve_checked(url: str, policy: FetchPolicy) -> tuple[str, str, IPAddress | None]:
    """Check ``url`` and resolve its host; return (scheme, host, address to connect to).

    The address is ``None`` only for a host allowed by name (it is then resolved normally).
    Raises :class:`FetchRefused`.
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed on access: a port past 65535 or not a number raises here
    except ValueError as exc:  # also an unclosed IPv6 bracket
        raise AddressRefused(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise AddressRefused(f"URL scheme {scheme or '(none)'!r} is not allowed; use http or https")
    host = parts.hostname
    if not host:
        raise AddressRefused("URL has no host")
    if parts.username or parts.password:
        raise AddressRefused("URLs with credentials are not allowed")
    if policy.allow.allows_host(host):
        return scheme, host, None
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port or (443 if scheme == "https" else 80), type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchRefused(f"host {host!r} could not be resolved") from exc
        addresses = []
        for info in infos:
            text = str(info[4][0]).split("%", 1)[0]
            addresses.append(ipaddress.ip_address(text))
        if not addresses:
            raise FetchRefused(f"host {host!r} could not be resolved")
    for ip in addresses:
        if policy.allow.allows_ip(ip):
            continue
        reason = blocked_reason(ip)
        if reason is not None:
            raise AddressRefused(
                f"refusing to connect to {host!r}: it resolves to {ip}, a {reason} address"
            )
    return scheme, host, addresses[0]


def _pinned(url: str, ip: IPAddress | None) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL rewritten to connect to ``ip``, with the Host header and SNI of the original.

    ``url`` has passed :func:`resolve_checked`, so it parses.
    """
    parts = urlsplit(url)
    if ip is None:
        return url, {}, {}
    host_text = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = host_text + (f":{parts.port}" if parts.port else "")
    pinned = parts._replace(netloc=netloc).geturl()
    host_header = parts.hostname or ""
    if ":" in host_header:
        host_header = f"[{host_header}]"
    if parts.port:
        host_header += f":{parts.port}"
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    return pinned, {"host": host_header}, extensions


async def _get(client: httpx.AsyncClient, url: str, policy: FetchPolicy) -> tuple[bytes, str]:
    """GET with hand-followed, re-checked redirects; returns (body, content type)."""
    for _ in range(MAX_REDIRECTS + 1):
        _, _, ip = await resolve_checked(url, policy)
        target, headers, extensions = _pinned(url, ip)
        request = client.build_request("GET", target, headers=headers, extensions=extensions)
        response = await client.send(request, stream=True)
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise FetchRefused(f"redirect ({response.status_code}) without a Location")
                url = urljoin(url, location)
                continue
            if response.status_code != 200:
                raise FetchRefused(f"the server answered HTTP {response.status_code}")
            ctype = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype and not ctype.startswith(_ACCEPTED_TYPES):
                raise FetchRefused(f"the URL did not return an image (content type {ctype!r})")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise FetchRefused(
                    f"the image is larger than the {policy.max_bytes}-byte limit "
                    f"({declared} bytes)"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise FetchRefused(
                        f"the image is larger than the {policy.max_bytes}-byte limit"
                    )
                chunks.append(chunk)
            return b"".join(chunks), ctype
        finally:
            await response.aclose()
    raise FetchRefused(f"too many redirects (more than {MAX_REDIRECTS})")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded)."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise FetchRefused("malformed data URI (no comma)")
    meta = header[5:].lower()
    if (len(payload) * 3) // 4 > max_bytes + 3:
        raise FetchRefused(f"the image is larger than the {max_bytes}-byte limit")
    if meta.endswith(";base64"):
        try:
            data = base64.b64decode(payload.strip(), validate=False)
        except (binascii.Error, ValueError) as exc:
            raise FetchRefused("malformed data URI: invalid base64") from exc
    else:
        data = unquote_to_bytes(payload)
    mime = meta.split(";", 1)[0]
    if mime and not mime.startswith(_ACCEPTED_TYPES):
        raise FetchRefused(f"the data URI is not an image (type {mime!r})")
    if len(data) > max_bytes:
        raise FetchRefused(f"the image is larger than the {max_bytes}-byte limit")
    return data


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Verify ``data`` decodes as an image of at most ``max_pixels``; return its size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise FetchRefused(
                        f"the image is {width}x{height}, more than the {max_pixels}-pixel limit "
                        "(possible decompression bomb)"
                    )
                image.load()
                mode = image.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own ceiling, checked on open before the size check above can run: name the
        # lower of the two, which is the limit this server applies.
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise FetchRefused(f"the image has more than the {limit}-pixel limit "
                           "(possible decompression bomb)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FetchRefused("the content is not a readable image") from exc
    if not convertible_to_rgb(mode):
        raise FetchRefused(f"the image's mode {mode} cannot be converted to RGB; send an RGB, "
                           "RGBA or grayscale image")
    return width, height


async def fetch_image(url: str, policy: FetchPolicy) -> bytes:
    """The encoded image behind ``url`` (``data:`` or ``http(s)``), checked; or :class:`FetchRefused`."""
    if url.startswith("data:"):
        data = decode_data_uri(url, policy.max_bytes)
    else:
        timeout = httpx.Timeout(policy.timeout_s)
        try:
            async with asyncio.timeout(policy.timeout_s), httpx.AsyncClient(
                timeout=timeout, follow_redirects=False, trust_env=False
            ) as client:
                data, _ = await _get(client, url, policy)
        except TimeoutError as exc:
            raise FetchRefused(f"fetching the image took longer than {policy.timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise FetchRefused(f"fetching the image failed: {type(exc).__name__}") from exc
    await asyncio.to_thread(check_image, data, policy.max_pixels)
    return data


async def load_image(value: str, field: str, policy: FetchPolicy,
                     decode: Callable[[str], bytes]) -> bytes:
    """The image a request gives as text in ``field``, checked; a refusal is a 400 naming it.

    An ``http(s)`` URL is fetched under the SSRF rules. Anything else is inline data, which
    ``decode`` turns into bytes (raising :class:`FetchRefused`, or its own API error): each API
    has its own rules for base64 and ``data:`` URIs. The bytes must then open as an image within
    ``policy.max_pixels``.
    """
    try:
        if value.startswith(("http://", "https://")):
            return await fetch_image(value, policy)
        data = decode(value)
        await asyncio.to_thread(check_image, data, policy.max_pixels)
        return data
    except FetchRefused as exc:
        raise invalid(f"{field}: {exc}", field=field) from None


async def post_json(url: str, body: bytes, policy: FetchPolicy) -> int:
    """POST ``body`` to a checked ``url`` (no redirects followed); return the HTTP status."""
    _, _, ip = await resolve_checked(url, policy)
    target, headers, extensions = _pinned(url, ip)
    headers["content-type"] = "application/json"
    try:
        async with asyncio.timeout(policy.timeout_s), httpx.AsyncClient(
            timeout=httpx.Timeout(policy.timeout_s), follow_redirects=False, trust_env=False
        ) as client:
            response = await client.post(target, content=body, headers=headers,
                                         extensions=extensions)
            return response.status_code
    except TimeoutError as exc:
        raise FetchRefused(f"no answer within {policy.timeout_s:g}s") from exc
    except httpx.HTTPError as exc:
        raise FetchRefused(f"delivery failed: {type(exc).__name__}") from exc
