"""Zero-copy relay of an object body from a store's socket to a client's socket (Linux splice).

A WADO-RS retrieve copies object bytes from the store to the client unchanged. Through
aiohttp each byte is copied five times on the way (kernel to user, the HTTP parser's body
piece, the 1 MiB chunk join, a transport buffer when the socket is full, user to kernel),
and on two shared cores the gateway hop cost about as much CPU as the object store itself.
``splice(2)`` moves the bytes socket -> pipe -> socket inside the kernel instead: nothing
is copied into the process and memory stays flat (the pipe holds at most ``PIPE_SIZE``).

A store that can do this (``S3Store.open_body`` over plain HTTP) sends its GET itself,
reads the response head and hands over an ``OpenBody``: the socket with the body bytes
still unread in it. ``Relay`` (one per response) splices it into the client's socket when
that is a plain TCP or Unix socket (no TLS) and the response has a Content-Length (no
chunk framing to write between the bytes). Everything else takes the ordinary path.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Final, Protocol

__all__ = ["PIPE_SIZE", "BodyOpener", "OpenBody", "Relay", "RelayTargetGone", "relay_fd"]

PIPE_SIZE: Final = 1 << 20
"""Bytes the relay's pipe holds (``F_SETPIPE_SZ``; the kernel may give less)."""
_YIELD_EVERY: Final = 8 << 20
"""Bytes relayed before giving other tasks a turn when both sockets keep being ready."""
_CHECK_S: Final = 0.5
"""Seconds between looks at whether the client's transport closed while a wait goes on.

A client that closes its end while the response is stalled on its full receive window
sends a FIN, not a reset; the client socket never becomes writable again, but the
transport sees the end of its input and starts closing.
"""
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_GONE: Final = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


class RelayTargetGone(Exception):
    """Writing to the client failed: it closed the connection."""


class OpenBody:
    """The body of one store response, still in the kernel: ``length`` bytes to come.

    ``initial`` holds the body bytes that arrived with the response head. ``delivered``
    counts the body bytes relayed to the client so far. The store's ``release`` callback
    gets the socket back when the relay is done with it (kept for the next request when
    the whole body was read, closed otherwise).
    """

    __slots__ = ("_release", "delivered", "etag", "initial", "length", "sock", "timeout_s")

    def __init__(
        self,
        sock: socket.socket,
        *,
        length: int,
        etag: str,
        initial: bytes,
        timeout_s: float,
        release: Callable[[socket.socket, bool], None],
    ) -> None:
        self.sock = sock
        self.length = length
        self.etag = etag
        self.initial = initial
        self.timeout_s = timeout_s
        self.delivered = 0
        self._release: Callable[[socket.socket, bool], None] | None = release

    def close(self) -> None:
        """Give the socket back: reusable only when the whole body went through it."""
        release, self._release = self._release, None
        if release is not None:
            release(self.sock, self.delivered == self.length)


class BodyOpener(Protocol):
    """A store that can hand over an object's body unread (``S3Store.open_body``)."""

    async def open_body(self, key: str, *, if_match: str | None = None) -> OpenBody | None:
        """The body of the whole object still in its socket, or None when it cannot be."""
        ...


def relay_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The client socket's file descriptor if bytes can be spliced into it, else None.

    Only a plain stream socket qualifies (TLS must encrypt in the process), and only on
    a system with ``os.splice`` (Linux).
    """
    if transport is None or not hasattr(os, "splice") or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    fd: int = sock.fileno()
    return fd if fd >= 0 else None


class Relay:
    """Splices ``OpenBody`` bodies into one client connection, in the order given.

    Holds a duplicate of the client socket's descriptor (so that waiting for it to be
    writable does not touch the transport's own registration) and one pipe. Bytes are
    only spliced while the transport's own buffer is empty, so they never overtake
    bytes written through the transport. ``close`` releases both.
    """

    def __init__(self, transport: asyncio.Transport, fd: int) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._out = os.dup(fd)
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self._pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default pipe size (64 KiB) works, with more system calls
        self._in_pipe = 0

    def close(self) -> None:
        for fd in (self._out, self._pipe_r, self._pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._out = self._pipe_r = self._pipe_w = -1

    async def _ready(self, *, read: int | None, write: bool, within_s: float | None) -> None:
        """Wait until ``read`` is readable or the client socket writable (either).

        Raises ``TimeoutError`` after ``within_s`` seconds (None: no limit).
        """
        future = self._loop.create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        if read is not None:
            self._loop.add_reader(read, wake)
        if write:
            self._loop.add_writer(self._out, wake)
        try:
            async with asyncio.timeout(within_s):
                await future
        finally:
            if read is not None:
                self._loop.remove_reader(read)
            if write:
                self._loop.remove_writer(self._out)

    async def _writable(self) -> None:
        """Wait until the client socket is writable; ``RelayTargetGone`` once it closes."""
        while True:
            if self._transport.is_closing():
                raise RelayTargetGone
            try:
                await self._ready(read=None, write=True, within_s=_CHECK_S)
            except TimeoutError:
                continue
            return

    async def _flushed(self) -> None:
        """Wait until the transport has sent everything written through it."""
        while self._transport.get_write_buffer_size():
            await self._writable()
            await asyncio.sleep(0)  # let the transport's own writer run first

    def _send(self, data: memoryview) -> int:
        try:
            return os.write(self._out, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in _GONE:
                raise RelayTargetGone from exc
            raise

    def _pipe_to_client(self) -> int:
        try:
            moved = os.splice(self._pipe_r, self._out, self._in_pipe, flags=_FLAGS)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in _GONE:
                raise RelayTargetGone from exc
            raise
        self._in_pipe -= moved
        return moved

    async def relay(self, body: OpenBody) -> int:
        """Move the rest of ``body`` to the client; returns the bytes delivered.

        Returns early (fewer than ``body.length`` delivered) when the store's connection
        fails or ends before the body does: every byte received by then has reached the
        client, so the caller can resume from ``body.delivered``. Raises
        ``RelayTargetGone`` when the client's connection fails.
        """
        if self._transport.is_closing():
            raise RelayTargetGone
        await self._flushed()
        head = memoryview(body.initial)[: body.length - body.delivered]
        while head:
            sent = self._send(head)
            head = head[sent:]
            body.delivered += sent
            if head:
                await self._writable()
        body.initial = b""
        src = body.sock.fileno()
        received = body.delivered
        upstream_done = received >= body.length
        since_yield = 0
        stalled = 0.0
        while not upstream_done or self._in_pipe:
            progress = 0
            want = min(body.length - received, PIPE_SIZE - self._in_pipe)
            if not upstream_done and want > 0:
                try:
                    got = os.splice(src, self._pipe_w, want, flags=_FLAGS)
                except BlockingIOError:
                    got = -1
                except OSError:
                    got = 0  # reset or the like: the store's side ended
                if got == 0:
                    upstream_done = True  # ended early: the caller resumes or fails
                    continue
                if got > 0:
                    received += got
                    self._in_pipe += got
                    progress += got
                    upstream_done = received >= body.length
            if self._in_pipe:
                moved = self._pipe_to_client()
                body.delivered += moved
                progress += moved
            if progress:
                stalled = 0.0
                since_yield += progress
                if since_yield >= _YIELD_EVERY:
                    since_yield = 0
                    await asyncio.sleep(0)
                continue
            if self._transport.is_closing():
                raise RelayTargetGone
            wait_read = not upstream_done and self._in_pipe < PIPE_SIZE
            try:
                await self._ready(
                    read=src if wait_read else None, write=self._in_pipe > 0, within_s=_CHECK_S
                )
            except TimeoutError:
                if wait_read and not self._in_pipe:
                    stalled += _CHECK_S
                    if stalled >= body.timeout_s:
                        upstream_done = True  # the store stalled: the caller resumes or fails
        return body.delivered
