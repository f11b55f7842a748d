"""The gateway's public base URL for a request: the one place absolute URLs start from.

Every URL the gateway writes (RetrieveURL, BulkDataURI, the federation proxy's URLs,
``Location``, the ``Warning`` agent) starts with :func:`public_base`:

1. ``gateway.public_base_url`` when set: what clients reach, behind any proxy.
2. Else, when the peer is one of ``gateway.trusted_proxies``: its ``X-Forwarded-Proto``,
   ``X-Forwarded-Host`` and ``X-Forwarded-Prefix`` (the last value of each, the one that
   proxy wrote; a missing one falls back as in 3).
3. Else the connection's scheme and the ``Host`` header (RFC 9110 7.2). A ``Host``
   without a port (dicomweb-client sends ``Host: 127.0.0.1``) means the scheme's
   default port; when the connection arrived on another port, that port is added, as
   the client evidently reached it (behind a port mapping, set ``public_base_url``).

``X-Forwarded-*`` from any other peer is ignored. A ``Host`` or forwarded value that
is not a host[:port], scheme or path is refused (400 naming the header), never copied.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from aiohttp import web

from imaging_gateway.api.keys import SETTINGS
from imaging_gateway.errors import InvalidRequest

# RFC 3986 host: reg-name (letters, digits, '-', '.', '_', '~'), IPv4, or [IPv6]; port.
_AUTHORITY = re.compile(
    r"(?P<host>[A-Za-z0-9._~-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(?P<port>[0-9]{1,5}))?"
)
# A path prefix: segments of unreserved characters and percent-escapes.
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~%!$&'()*+,;=:@-]+)*/?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def public_base(request: web.Request) -> str:
    """``scheme://host[:port][/prefix]`` of this gateway as the client reached it, without
    a trailing slash.

    Raises ``InvalidRequest`` (400) naming ``Host`` or the ``X-Forwarded-*`` header when
    its value is not a valid host[:port], scheme or path prefix.
    """
    configured = request.app[SETTINGS].gateway.public_base_url
    if configured is not None:
        return configured
    scheme = request.scheme
    authority: str | None = None
    prefix = ""
    if _from_trusted_proxy(request):
        proto = _forwarded(request, "X-Forwarded-Proto")
        if proto is not None:
            if proto.lower() not in _DEFAULT_PORTS:
                raise InvalidRequest("X-Forwarded-Proto: expected http or https")
            scheme = proto.lower()
        host = _forwarded(request, "X-Forwarded-Host")
        if host is not None:
            authority = _authority(host, "X-Forwarded-Host")
        forwarded_prefix = _forwarded(request, "X-Forwarded-Prefix")
        if forwarded_prefix is not None:
            if not _PREFIX.fullmatch(forwarded_prefix) or not forwarded_prefix.startswith("/"):
                raise InvalidRequest("X-Forwarded-Prefix: expected a path such as /imaging")
            prefix = forwarded_prefix.rstrip("/")
    if authority is None:
        authority = _host_authority(request, scheme)
    return f"{scheme}://{authority}{prefix}"


def public_authority(request: web.Request) -> str:
    """The host[:port] of :func:`public_base` (the ``Warning`` header's agent)."""
    return urlsplit(public_base(request)).netloc


def _from_trusted_proxy(request: web.Request) -> bool:
    proxies = request.app[SETTINGS].gateway.trusted_proxies
    if not proxies or request.transport is None:
        return False
    peer = request.transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:  # a Unix socket
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in proxies)


def _forwarded(request: web.Request, name: str) -> str | None:
    """The last value of ``name`` (the one the trusted proxy wrote), None if absent."""
    values = request.headers.getall(name, [])
    if not values:
        return None
    last = values[-1].rsplit(",", 1)[-1].strip()
    return last or None


def _authority(value: str, header: str) -> str:
    match = _AUTHORITY.fullmatch(value.strip())
    if match is None or (match["port"] is not None and not 0 < int(match["port"]) < 65536):
        raise InvalidRequest(f"{header}: expected host[:port]")
    return match.group(0)


def _host_authority(request: web.Request, scheme: str) -> str:
    """The ``Host`` header's host[:port], with the connection's port when it has none;
    the listening address when there is no ``Host`` (HTTP/1.0)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    local_port = sockname[1] if isinstance(sockname, tuple) and len(sockname) > 1 else None
    host = request.headers.get("Host")
    if not host:
        if not isinstance(sockname, tuple):
            raise InvalidRequest("Host: the request names no host")
        address = str(sockname[0])
        host = f"[{address}]" if ":" in address else address
        return _with_port(host, scheme, local_port)
    match = _AUTHORITY.fullmatch(host.strip())
    if match is None or (match["port"] is not None and not 0 < int(match["port"]) < 65536):
        raise InvalidRequest("Host: expected host[:port]")
    if match["port"] is not None:
        return match.group(0)
    return _with_port(match["host"], scheme, local_port)


def _with_port(host: str, scheme: str, port: int | None) -> str:
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return host
    return f"{host}:{port}"
