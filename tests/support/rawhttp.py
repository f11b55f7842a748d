"""Raw HTTP/1.1 exchanges over a socket: requests no well-behaved client would send,
answers read byte for byte (a client library would refuse or hide bad header bytes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    head: bytes
    """The status line and header block, exactly as received (without the blank line)."""
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


async def exchange(port: int, request: bytes, *, host: str = "127.0.0.1") -> RawResponse | None:
    """Send ``request`` (ending in CRLF CRLF), read until the server closes; None if it
    closed without answering."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await reader.read()  # the request says Connection: close
    finally:
        writer.close()
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return RawResponse(status, head, headers, body)


def get(path: str, *, port: int, headers: dict[str, str] | None = None,
        host_header: str | None = None) -> bytes:
    """The bytes of ``GET path`` with ``Connection: close`` (``path`` is sent as given)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host_header or f'127.0.0.1:{port}'}",
             "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
