"""Local-directory adapter: keys are relative POSIX paths under a root, listed in S3 key order."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import os
import stat as stat_mod
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Generator
from datetime import UTC, datetime
from typing import BinaryIO

from imaging_gateway.errors import ObjectNotFound, StorageError
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.base import ListPage, ObjectInfo, RangeRead

TMP_SUFFIX = ".igw-tmp"
"""Suffix of in-progress writes; such files are never listed and such keys are refused."""
_WRITE_BUFFER = 1 << 20
_DIR_CACHE_SIZE = 256
_SETTLED_NS = 2_000_000_000
"""A directory listing is cached only once its mtime is this old (see ``_entries``)."""

_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def local_etag(st: os.stat_result) -> str:
    """ETag of a file: a digest of (size, mtime_ns, inode).

    Hashing the content would make every listing read every byte (a sync of 100k
    DICOM files would read them all each time), so the tag is metadata-based, like
    rsync's quick check. It changes when content changes: writes through this store
    create a new inode and stamp a nanosecond mtime strictly newer than the previous
    version's; ordinary tools update the mtime. Only an edit that keeps the size and
    restores the old mtime on the same inode goes unnoticed.
    """
    raw = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size=st.st_size,
        etag=local_etag(st),
        last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
    )


class LocalStore:
    """A directory seen as a bucket: key ``a/b.dcm`` is the file ``ROOT/PREFIX/a/b.dcm``.

    Listing is in full-key order (UTF-8 byte order, as on AWS S3), produced by a sorted
    walk that bisects each directory to where ``start_after`` falls and skips whole
    subtrees before it, so a page costs O(page + depth) entries, not a walk of the tree.
    Symlinks are not listed, and no key may resolve outside the root. Writes are atomic
    (temporary file, fsync, ``os.replace``). File I/O runs in threads, in 1 MiB pieces.
    """

    def __init__(self, settings: StoreSettings) -> None:
        if settings.path is None:
            raise StorageError(f"store {settings.name!r}: a local store needs a path")
        self.name = settings.name
        self._root = os.path.realpath(settings.path)
        self._prefix = settings.prefix
        self._cache: OrderedDict[str, tuple[int, list[str]]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalStore(name={self.name!r}, root={self._root!r})"

    # -- keys and paths ---------------------------------------------------------

    def _path(self, key: str) -> str:
        """The file path for ``key``; ``StorageError`` if the key is not a safe relative path."""
        full = self._prefix + key
        parts = full.split("/")
        if (
            not key
            or "\x00" in full
            or any(p in ("", ".", "..") for p in parts)
            or parts[-1].endswith(TMP_SUFFIX)
        ):
            raise StorageError(
                f"store {self.name!r}: key refused: not a relative path of plain names "
                "(no leading '/', no empty, '.' or '..' segments)"
            )
        return os.path.join(self._root, *parts)

    def _contained(self, path: str) -> None:
        """Refuse a path that symlinks lead outside the root."""
        real = os.path.realpath(path)
        if real != self._root and not real.startswith(self._root + os.sep):
            raise StorageError(f"store {self.name!r}: key refused: it resolves outside the root")

    def _os_error(self, exc: OSError, op: str) -> StorageError:
        # ``str(exc)`` carries the file name (a key, maybe patient data): use strerror only.
        if isinstance(exc, PermissionError):
            return StorageError(f"store {self.name!r}: access denied on {op} under {self._root}")
        reason = exc.strerror or type(exc).__name__
        return StorageError(f"store {self.name!r}: {op} failed: {reason}")

    # -- listing ----------------------------------------------------------------

    def _entries(self, directory: str) -> list[str]:
        """Sorted entry names of ``directory``; subdirectories end with '/'.

        Keys under ``d/`` all sort right after the string ``d/``, so this order of
        entries yields full keys in byte order. A listing is cached while the
        directory's mtime is unchanged, but only once that mtime is more than two
        seconds old: a change in the same timestamp tick as the caching cannot go
        unseen ("racy git" rule).
        """
        st = os.stat(directory)
        with self._cache_lock:
            hit = self._cache.get(directory)
            if hit is not None and hit[0] == st.st_mtime_ns:
                self._cache.move_to_end(directory)
                return hit[1]
        names: list[str] = []
        with os.scandir(directory) as it:
            for entry in it:
                name = entry.name
                try:
                    name.encode("utf-8")  # names that are not UTF-8 cannot be keys
                except UnicodeEncodeError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    names.append(name + "/")
                elif entry.is_file(follow_symlinks=False) and not name.endswith(TMP_SUFFIX):
                    names.append(name)
        names.sort()
        if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
            with self._cache_lock:
                self._cache[directory] = (st.st_mtime_ns, names)
                if len(self._cache) > _DIR_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return names

    def _walk(self, rel: str, after: str | None, prefix: str) -> Generator[str, None, None]:
        """Full keys under directory ``rel`` ('' or ending '/'), > ``after``, with ``prefix``."""
        try:
            names = self._entries(os.path.join(self._root, rel) if rel else self._root)
        except _MISSING:
            if not rel:
                raise
            return  # removed while we walked
        start = 0
        for bound in (after, prefix):
            if bound and bound.startswith(rel):
                rest = bound[len(rel) :]
                i = bisect.bisect_left(names, rest)
                # The subdirectory holding ``bound`` sorts just before it ("d/" < "d/x").
                if i > 0 and names[i - 1].endswith("/") and rest.startswith(names[i - 1]):
                    i -= 1
                start = max(start, i)
        for name in names[start:]:
            full = rel + name
            if prefix and not (full.startswith(prefix) or prefix.startswith(full)):
                if full > prefix:
                    return  # past every key with the prefix
                continue
            if name.endswith("/"):
                if after is not None and after >= full and not after.startswith(full):
                    continue  # the whole subtree sorts before ``after``
                yield from self._walk(full, after, prefix)
            elif after is None or full > after:
                yield full

    def _list_sync(self, start_after: str | None, limit: int) -> ListPage:
        after = self._prefix + start_after if start_after else None
        cut = len(self._prefix)
        objects: list[ObjectInfo] = []
        truncated = False
        walk = self._walk("", after, self._prefix)
        try:
            for full in walk:
                if len(full) == cut:
                    continue  # the file named exactly like the prefix is no key of this store
                try:
                    st = os.stat(os.path.join(self._root, full), follow_symlinks=False)
                except _MISSING:
                    continue  # deleted since the directory was read
                if len(objects) == limit:
                    truncated = True
                    break
                objects.append(_info(full[cut:], st))
        except _MISSING:
            raise StorageError(
                f"store {self.name!r}: root directory {self._root} does not exist"
            ) from None
        except OSError as exc:
            raise self._os_error(exc, "list") from None
        finally:
            walk.close()
        return ListPage(objects=objects, is_truncated=truncated)

    # -- ObjectStore ----------------------------------------------------------

    async def list_page(self, *, start_after: str | None = None, limit: int = 1000) -> ListPage:
        """Up to ``limit`` objects with keys after ``start_after``, in UTF-8 byte order.

        Raises ``StorageError`` if the root directory is missing or unreadable.
        """
        return await asyncio.to_thread(self._list_sync, start_after, max(1, limit))

    def _stat_sync(self, key: str, path: str) -> ObjectInfo:
        self._contained(path)
        try:
            st = os.stat(path)
        except _MISSING:
            raise ObjectNotFound(self.name, key) from None
        except OSError as exc:
            raise self._os_error(exc, "stat") from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise ObjectNotFound(self.name, key)
        return _info(key, st)

    async def stat(self, key: str) -> ObjectInfo:
        """Size, ETag, mtime of one file. Raises ``ObjectNotFound``, ``StorageError``."""
        return await asyncio.to_thread(self._stat_sync, key, self._path(key))

    def _open(self, key: str, path: str, op: str) -> tuple[int, os.stat_result]:
        self._contained(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except _MISSING:
            raise ObjectNotFound(self.name, key) from None
        except OSError as exc:
            raise self._os_error(exc, op) from None
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            os.close(fd)
            raise ObjectNotFound(self.name, key)
        return fd, st

    @staticmethod
    def _pread(fd: int, length: int, offset: int) -> bytes:
        pieces: list[bytes] = []
        while length > 0:
            piece = os.pread(fd, length, offset)
            if not piece:
                break
            pieces.append(piece)
            length -= len(piece)
            offset += len(piece)
        return b"".join(pieces)

    def _read_range_sync(self, key: str, path: str, offset: int, length: int) -> RangeRead:
        fd, st = self._open(key, path, "read_range")
        try:
            data = self._pread(fd, length, offset) if offset < st.st_size else b""
        except OSError as exc:
            raise self._os_error(exc, "read_range") from None
        finally:
            os.close(fd)
        return RangeRead(data, offset, local_etag(st), st.st_size)

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        """Read ``length`` bytes at ``offset`` (empty past the end) with the file's ETag and size.

        Raises ``ObjectNotFound``, ``StorageError``; ``ValueError`` on a negative offset or length.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        return await asyncio.to_thread(self._read_range_sync, key, self._path(key), offset, length)

    def _changed(self) -> StorageError:
        return StorageError(f"store {self.name!r}: object changed while it was being read")

    async def read_stream(
        self,
        key: str,
        *,
        offset: int = 0,
        chunk_size: int = 1 << 20,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream the file from ``offset`` in ``chunk_size`` pieces, each read in a thread.

        The open file pins the version being read even if the key is replaced; a write
        in place (size, mtime or inode no longer those seen at open) is caught before
        the last chunk is yielded. ``if_match`` must be the file's ETag at open. Raises
        ``ObjectNotFound``, ``StorageError`` (including "object changed while it was
        being read").
        """
        if offset < 0 or chunk_size <= 0:
            raise ValueError("offset must be >= 0 and chunk_size > 0")
        fd, opened = await asyncio.to_thread(self._open, key, self._path(key), "read_stream")
        try:
            etag = local_etag(opened)
            if if_match and if_match != etag:
                raise self._changed()
            pos = offset
            while True:
                try:
                    chunk = await asyncio.to_thread(self._pread, fd, chunk_size, pos)
                except OSError as exc:
                    raise self._os_error(exc, "read_stream") from None
                if not chunk:
                    break
                pos += len(chunk)
                # Checked before the last chunk goes out, so the caller never receives
                # the whole of a file that changed in place.
                if pos >= opened.st_size and local_etag(os.fstat(fd)) != etag:
                    raise self._changed()
                yield chunk
            if local_etag(os.fstat(fd)) != etag:
                raise self._changed()
        finally:
            os.close(fd)

    def _a_parent_is_a_file(self, directory: str) -> bool:
        while directory.startswith(self._root + os.sep):
            if os.path.lexists(directory) and not os.path.isdir(directory):
                return True
            directory = os.path.dirname(directory)
        return False

    def _create_temp(self, path: str) -> tuple[BinaryIO, str]:
        self._contained(path)
        directory = os.path.dirname(path)
        for _ in range(5):
            try:
                os.makedirs(directory, exist_ok=True)
                fd, tmp = tempfile.mkstemp(
                    dir=directory, prefix="." + os.path.basename(path)[:64] + ".", suffix=TMP_SUFFIX
                )
            except FileNotFoundError:
                continue  # a concurrent delete pruned the directory; make it again
            except (FileExistsError, NotADirectoryError):
                # os.makedirs also raises FileExistsError when a concurrent delete prunes a
                # directory between its mkdir and its isdir check: only a file is a refusal.
                if not self._a_parent_is_a_file(directory):
                    continue
                raise StorageError(
                    f"store {self.name!r}: key refused: a parent segment is an existing object"
                ) from None
            except OSError as exc:
                raise self._os_error(exc, "write") from None
            os.fchmod(fd, 0o644)
            return os.fdopen(fd, "wb"), tmp
        raise StorageError(f"store {self.name!r}: write failed: directory keeps disappearing")

    def _commit(self, fh: BinaryIO, tmp: str, path: str) -> os.stat_result:
        """fsync, stamp an mtime newer than the version replaced, rename into place."""
        fh.flush()
        os.fsync(fh.fileno())
        now = time.time_ns()
        with contextlib.suppress(OSError):
            now = max(now, os.stat(path).st_mtime_ns + 1)
        os.utime(fh.fileno(), ns=(now, now))
        st = os.fstat(fh.fileno())
        fh.close()
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            raise StorageError(
                f"store {self.name!r}: key refused: it names a directory of other objects"
            ) from None
        directory = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return st

    async def write_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, content_type: str = "application/dicom"
    ) -> ObjectInfo:
        """Write atomically: readers see the old file or the whole new one, never a part.

        ``content_type`` is not stored (a directory has nowhere to keep it). Raises
        ``StorageError`` (bad key, a parent segment is a file, I/O error).
        """
        path = self._path(key)
        fh, tmp = await asyncio.to_thread(self._create_temp, path)
        try:
            pending = bytearray()
            async for chunk in chunks:
                pending += chunk
                if len(pending) >= _WRITE_BUFFER:
                    await asyncio.to_thread(fh.write, bytes(pending))
                    pending.clear()
            if pending:
                await asyncio.to_thread(fh.write, bytes(pending))
            st = await asyncio.to_thread(self._commit, fh, tmp, path)
        except BaseException as exc:
            fh.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise self._os_error(exc, "write") from None
            raise
        return _info(key, st)

    def _delete_sync(self, path: str) -> None:
        self._contained(path)
        try:
            os.unlink(path)
        except _MISSING:
            return
        except OSError as exc:
            raise self._os_error(exc, "delete") from None
        # Objects have no directories: drop the ones this delete left empty.
        directory = os.path.dirname(path)
        while directory.startswith(self._root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)

    async def delete(self, key: str) -> None:
        """Delete one file; a missing key is fine. Raises ``StorageError``."""
        await asyncio.to_thread(self._delete_sync, self._path(key))

    async def close(self) -> None:
        """Nothing to release (no open handles between calls)."""

    async def ensure_bucket(self) -> None:
        """Create the root directory if it does not exist. Raises ``StorageError``."""
        try:
            await asyncio.to_thread(os.makedirs, self._root, exist_ok=True)
        except OSError as exc:
            raise self._os_error(exc, "ensure_bucket") from None
