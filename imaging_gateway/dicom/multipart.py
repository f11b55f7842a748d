"""multipart/related framing (RFC 2387, RFC 2046 5.1; PS3.18 8.6): part heads, the closing.

Bytes only: what a retrieve body looks like between its parts, and how long it is when
every part's length is known (the response's Content-Length, its byte ranges).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["closing", "multipart_length", "part_head", "with_syntax"]


def part_head(boundary: str, content_type: str, length: int | None, *, first: bool) -> bytes:
    """The boundary line and headers that open a part (the CRLF ending the previous one
    first, unless ``first``)."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return (head if first else "\r\n" + head).encode("ascii")


def closing(boundary: str) -> bytes:
    """The close-delimiter that ends the body."""
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def multipart_length(boundary: str, parts: Sequence[tuple[str, int]]) -> int:
    """Bytes of the whole body ``api.streaming.send_multipart`` writes for parts (type, length)."""
    total = len(closing(boundary))
    for index, (content_type, length) in enumerate(parts):
        total += len(part_head(boundary, content_type, length, first=index == 0)) + length
    return total


def with_syntax(content_type: str, transfer_syntax: str | None) -> str:
    """Name the parts' transfer syntax on the whole body too, when they all share one.

    Each part carries it anyway; some viewers (older cornerstone WADO-RS loaders) read
    the response's Content-Type instead of the part's to pick the frame decoder.
    """
    if transfer_syntax:
        return f"{content_type}; transfer-syntax={transfer_syntax}"
    return content_type
