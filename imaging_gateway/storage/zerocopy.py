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

Encrypted objects (``EncryptedStore.open_body``) cannot be spliced: every segment must
be verified and decrypted in the process, so the bytes have to come up into user space
once. ``DecryptingBody`` is such a body (the socket positioned after the object's header,
and a ``SegmentOpener`` holding the data key); the Relay moves it with the same loop
shape and readiness waits as a splice, copying as little as that allows: the ciphertext
is received (``recv_into``, kernel -> user, once) into a preallocated buffer of a few
segments, the whole segments in it are verified and decrypted into a second
preallocated buffer (``decrypt_into``: the cipher's output is the only other copy), and
that plaintext is written to the client socket (``os.write``, user -> kernel, once).
Against the ordinary aiohttp path that saves the parser's body pieces, the chunk joins,
the per-segment ``bytes`` objects and the transport's buffer, and keeps memory flat
(two buffers of ``DECRYPT_BATCH`` bytes per response, whatever the study size).
A segment's bytes go out only after its tag verified (a failing ``decrypt_into`` may
already have written into the buffer: nothing of it is sent), so a tampered or
truncated object ends the relay with the opener's ``IntegrityError`` before any of its
bad segment reaches the client, exactly where the ordinary path would raise it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Any, Final, Protocol

__all__ = [
    "DECRYPT_BATCH",
    "PIPE_SIZE",
    "BodyOpener",
    "DecryptingBody",
    "OpenBody",
    "Relay",
    "RelayTargetGone",
    "SegmentOpener",
    "opens_bodies",
    "relay_fd",
]

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
DECRYPT_BATCH: Final = 1 << 20
"""Bytes of ciphertext a decrypting relay receives and opens at a time (whole segments)."""
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
            release(self.sock, self._read_whole())

    def _read_whole(self) -> bool:
        return self.delivered == self.length


class SegmentOpener(Protocol):
    """Verifies and decrypts the segments of one encrypted object (its data key)."""

    @property
    def segment_size(self) -> int:
        """Plaintext bytes of every segment but the last."""
        ...

    @property
    def tag_size(self) -> int:
        """Bytes each segment has on top of its plaintext (its tag)."""
        ...

    @property
    def threaded(self) -> bool:
        """The cipher is slow enough to be run in a worker thread, off the event loop."""
        ...

    def open_into(self, index: int, ciphertext: memoryview, out: memoryview, *, last: bool) -> int:
        """Verify segment ``index`` and decrypt it into ``out``; its plaintext length.

        Raises ``IntegrityError`` (naming the object) if it does not authenticate;
        ``out`` may then hold unverified bytes, which must not be used.
        """
        ...


class DecryptingBody(OpenBody):
    """The segments of an encrypted object still in the kernel, for a decrypting relay.

    The socket is positioned after the object's header (``initial`` holds the segment
    bytes that arrived with it). ``stored`` is the ciphertext bytes of the segments (the
    object's size less its header), already checked to be a valid size for the segment
    size; ``length`` and ``delivered`` count *plaintext* bytes, so a caller resumes an
    early-ended relay from a plaintext offset, as it does for a plain body.
    """

    __slots__ = ("opener", "received", "stored")

    def __init__(
        self,
        body: OpenBody,
        *,
        opener: SegmentOpener,
        length: int,
        stored: int,
        initial: bytes,
    ) -> None:
        """Take over ``body`` (its socket and its release), which must not be used after."""
        release, body._release = body._release, None
        assert release is not None, "the body was already released"
        super().__init__(
            body.sock,
            length=length,
            etag=body.etag,
            initial=initial,
            timeout_s=body.timeout_s,
            release=release,
        )
        self.opener = opener
        self.stored = stored
        self.received = 0
        """Ciphertext bytes taken from the body so far (``initial`` included)."""

    def _read_whole(self) -> bool:
        return self.received == self.stored


def opens_bodies(store: object) -> bool:
    """True if ``store`` can hand bodies to a relay (``BodyOpener``), as far as its type says.

    A wrapper store (``EncryptedStore``) has ``open_body`` in its class but opens bodies
    only when the store it wraps does: it says so with a ``can_open_bodies`` attribute.
    ``open_body`` may still answer None for one object (the ordinary path then).
    """
    if not callable(getattr(type(store), "open_body", None)):
        return False
    return bool(getattr(store, "can_open_bodies", True))


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


def _from_store(read: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """Bytes a non-blocking read from the store's socket took: -1 none yet, 0 it ended.

    A reset or the like counts as the end: the caller resumes or fails.
    """
    try:
        return read(*args, **kwargs)
    except BlockingIOError:
        return -1
    except OSError:
        return 0


class _Pace:
    """The waiting of one relay loop, after each pass over both sockets.

    A pass that moved bytes goes straight on (giving other tasks a turn every
    ``_YIELD_EVERY`` bytes); one that moved none waits until the store's socket is
    readable (``read``) or the client's writable (``write``), looking at the client's
    transport every ``_CHECK_S``, and tells when the store has sent nothing, with nothing
    left to write, for ``timeout_s``.
    """

    __slots__ = ("_relay", "_since_yield", "_src", "_stalled", "_timeout_s")

    def __init__(self, relay: Relay, src: int, timeout_s: float) -> None:
        self._relay = relay
        self._src = src
        self._timeout_s = timeout_s
        self._since_yield = 0
        self._stalled = 0.0

    async def after(self, progress: int, *, read: bool, write: bool) -> bool:
        """Pace the next pass; True when the store stalled (``RelayTargetGone``: client gone)."""
        if progress:
            self._stalled = 0.0
            self._since_yield += progress
            if self._since_yield >= _YIELD_EVERY:
                self._since_yield = 0
                await asyncio.sleep(0)
            return False
        if self._relay._transport.is_closing():
            raise RelayTargetGone
        try:
            await self._relay._ready(
                read=self._src if read else None, write=write, within_s=_CHECK_S
            )
        except TimeoutError:
            if read and not write:
                self._stalled += _CHECK_S
                return self._stalled >= self._timeout_s
        return False


class Relay:
    """Splices ``OpenBody`` bodies into one client connection, in the order given.

    Holds a duplicate of the client socket's descriptor (so that waiting for it to be
    writable does not touch the transport's own registration) and one pipe (and, once an
    encrypted body came, the two decrypting buffers, reused for the next ones). Bytes are
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
        self._decrypt_buffers: tuple[memoryview, memoryview] | None = None

    def close(self) -> None:
        for fd in (self._out, self._pipe_r, self._pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._out = self._pipe_r = self._pipe_w = -1
        self._decrypt_buffers = None

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
        ``RelayTargetGone`` when the client's connection fails. A ``DecryptingBody`` is
        decrypted on the way (``_relay_decrypting``): then the bytes delivered are
        plaintext, an early end keeps back the segment it cut (resumed from its start),
        and a segment that fails raises the opener's ``IntegrityError`` before any of
        it is sent.
        """
        if self._transport.is_closing():
            raise RelayTargetGone
        await self._flushed()
        if isinstance(body, DecryptingBody):
            return await self._relay_decrypting(body)
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
        pace = _Pace(self, src, body.timeout_s)
        while not upstream_done or self._in_pipe:
            progress = 0
            want = min(body.length - received, PIPE_SIZE - self._in_pipe)
            if not upstream_done and want > 0:
                got = _from_store(os.splice, src, self._pipe_w, want, flags=_FLAGS)
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
            wait_read = not upstream_done and self._in_pipe < PIPE_SIZE
            if await pace.after(progress, read=wait_read, write=self._in_pipe > 0):
                upstream_done = True  # the store stalled: the caller resumes or fails
        return body.delivered

    def _buffers(self, cipher_size: int, plain_size: int) -> tuple[memoryview, memoryview]:
        """The decrypting relay's two buffers, kept for the response's next body."""
        held = self._decrypt_buffers
        if held is None or (len(held[0]), len(held[1])) != (cipher_size, plain_size):
            held = (memoryview(bytearray(cipher_size)), memoryview(bytearray(plain_size)))
            self._decrypt_buffers = held
        return held

    async def _relay_decrypting(self, body: DecryptingBody) -> int:
        """``relay`` of an encrypted body: receive, verify and decrypt, write (module doc).

        The ciphertext buffer holds whole segments from its start: segment ``index``
        first, then as many more as fit (``DECRYPT_BATCH``); once the plaintext of the
        previous batch is all written, the whole segments received are opened at once
        into the plaintext buffer and the cut one left is moved to the front. Receiving
        goes on while the plaintext is being written. Only the final segment (the
        object's size says which it is) is opened as last; with the size checked
        beforehand, a body that lost its final segment or gained bytes fails its tag.
        """
        opener = body.opener
        size, tag = opener.segment_size, opener.tag_size
        step = size + tag
        final = max(1, -(-body.stored // step)) - 1
        final_bytes = body.stored - final * step
        batch = max(1, DECRYPT_BATCH // step)
        cipher, plain = self._buffers(batch * step, batch * size)
        capacity = len(cipher)
        initial = memoryview(body.initial)
        body.initial = b""
        sock = body.sock
        src = sock.fileno()
        have = 0  # ciphertext bytes in the buffer, segment ``index`` first
        index = 0  # the next segment to open
        out_at = out_end = 0  # plaintext of the opened batch, written up to ``out_at``
        upstream_done = body.received >= body.stored
        pace = _Pace(self, src, body.timeout_s)

        def complete() -> tuple[int, int]:
            """(segments, bytes) wholly in the buffer, from ``index``."""
            count = pos = 0
            while index + count <= final:
                need = step if index + count < final else final_bytes
                if pos + need > have:
                    break
                pos += need
                count += 1
            return count, pos

        def open_batch(count: int) -> int:
            pos = out = 0
            for k in range(count):
                i = index + k
                need = step if i < final else final_bytes
                out += opener.open_into(
                    i, cipher[pos : pos + need], plain[out : out + need - tag],
                    last=i == final,
                )  # fmt: skip
                pos += need
            return out

        while True:
            progress = 0
            if not upstream_done and have < capacity:
                want = min(capacity - have, body.stored - body.received)
                if initial:
                    got = min(want, len(initial))
                    cipher[have : have + got] = initial[:got]
                    initial = initial[got:]
                else:
                    got = _from_store(sock.recv_into, cipher[have : have + want])
                    if got == 0:
                        upstream_done = True  # ended early: the caller resumes or fails
                if got > 0:
                    have += got
                    body.received += got
                    progress += got
                    upstream_done = body.received >= body.stored
            if out_at == out_end:
                count, used = complete()
                if count:
                    if opener.threaded:
                        out_end = await asyncio.to_thread(open_batch, count)
                    else:
                        out_end = open_batch(count)
                    out_at = 0
                    index += count
                    rest = have - used
                    if rest:  # the start of a cut segment (memoryview copies overlap safely)
                        cipher[:rest] = cipher[used:have]
                    have = rest
                    progress += 1
                elif index > final or upstream_done:
                    break  # everything delivered, or the store's side ended (resume)
            if out_at < out_end:
                sent = self._send(plain[out_at:out_end])
                out_at += sent
                body.delivered += sent
                progress += sent
            wait_read = not upstream_done and have < capacity
            if await pace.after(progress, read=wait_read, write=out_at < out_end):
                upstream_done = True  # the store stalled: the caller resumes or fails
        return body.delivered
