"""Key-encryption keys: the ``KeyProvider`` protocol, a local versioned keyring, blind indexes.

A ``KeyProvider`` wraps and unwraps the per-object data keys of ``crypto.envelope``; a
KMS adapter can implement it later. ``Keyring`` is the local one: versioned keys under one
key id (one version current for wrapping, older ones kept for unwrapping), loaded from a
0600 JSON keyring file (``FileKeyring``, which can also ``rotate``) or from environment
variables named by the caller. Each keyring also holds a separate secret for HMAC blind
indexes over encrypted index columns.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac

from imaging_gateway.crypto.aead import NONCE_SIZE, TAG_SIZE, Aead, Suite
from imaging_gateway.errors import ConfigError, IntegrityError, KeyNotFound

FILE_FORMAT = "imaging-gateway-keyring/1"
BLIND_INDEX_KEY_SIZE = 32
MAX_VERSION = 2**32 - 1
MAX_KEY_ID_BYTES = 255
_WRAP_FORMAT = b"\x01"  # first byte of a wrapped data key: this keyring's wrap layout


class KeyProvider(Protocol):
    """Wraps data keys under a key-encryption key it holds (a local keyring or a KMS)."""

    def current(self) -> tuple[str, int]:
        """The (key id, version) that ``wrap`` uses now."""
        ...

    def wrap(self, dek: bytes, aad: bytes) -> tuple[str, int, bytes]:
        """Seal ``dek`` bound to ``aad`` under the current key: (key id, version, wrapped)."""
        ...

    def unwrap(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """Open a wrapped data key.

        Raises ``KeyNotFound`` if (key id, version) is not held, ``IntegrityError`` if
        ``wrapped`` does not authenticate with ``aad`` under it.
        """
        ...


@dataclass(frozen=True, slots=True)
class _State:
    keys: Mapping[int, bytes]
    current: int
    blind_index_key: bytes


class Keyring:
    """Versioned key-encryption keys of one suite under one key id, and a blind-index secret.

    Wrapped data key layout: ``0x01 || nonce (12) || AEAD(kek, nonce, dek, aad)``.
    """

    def __init__(
        self,
        *,
        key_id: str,
        suite: Suite,
        keys: Mapping[int, bytes],
        current: int,
        blind_index_key: bytes,
    ) -> None:
        """Raises ``ValueError`` if the key id, a version, a key size or ``current`` is wrong."""
        check_key_id(key_id)
        self.key_id = key_id
        self.suite = suite
        self._state = self._checked(keys, current, blind_index_key)

    def _checked(self, keys: Mapping[int, bytes], current: int, bik: bytes) -> _State:
        for version, key in keys.items():
            if not 1 <= version <= MAX_VERSION:
                raise ValueError(f"key {self.key_id!r}: version {version} out of [1, 2^32-1]")
            if len(key) != self.suite.key_size:
                raise ValueError(
                    f"key {self.key_id!r} version {version}: {self.suite} takes "
                    f"{self.suite.key_size}-byte keys, got {len(key)}"
                )
        if current not in keys:
            raise ValueError(f"key {self.key_id!r}: current version {current} is not held")
        if len(bik) != BLIND_INDEX_KEY_SIZE:
            raise ValueError(f"blind index key must be {BLIND_INDEX_KEY_SIZE} bytes")
        return _State(keys=dict(keys), current=current, blind_index_key=bytes(bik))

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions held, oldest first."""
        return tuple(sorted(self._state.keys))

    @property
    def current_version(self) -> int:
        return self._state.current

    def current(self) -> tuple[str, int]:
        return self.key_id, self._state.current

    def wrap(self, dek: bytes, aad: bytes) -> tuple[str, int, bytes]:
        state = self._state  # one read: a concurrent rotate cannot mix versions
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = Aead(self.suite, state.keys[state.current]).seal(nonce, dek, aad)
        return self.key_id, state.current, _WRAP_FORMAT + nonce + sealed

    def unwrap(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        key = self._key(key_id, version)
        if len(wrapped) < 1 + NONCE_SIZE + TAG_SIZE or wrapped[:1] != _WRAP_FORMAT:
            raise IntegrityError(
                f"wrapped data key under key {key_id!r} version {version} is malformed"
            )
        nonce, sealed = wrapped[1 : 1 + NONCE_SIZE], wrapped[1 + NONCE_SIZE :]
        try:
            return Aead(self.suite, key).open(nonce, sealed, aad)
        except InvalidTag:
            raise IntegrityError(
                f"data key wrapped under key {key_id!r} version {version} did not authenticate "
                "(a different key under the same id and version, or an altered header or "
                "key envelope)"
            ) from None

    def _key(self, key_id: str, version: int) -> bytes:
        """Raises ``KeyNotFound`` naming the key id and version."""
        if key_id != self.key_id:
            raise KeyNotFound(key_id, version, held=f"it holds key {self.key_id!r}")
        key = self._state.keys.get(version)
        if key is None:
            held = ", ".join(str(v) for v in self.versions)
            raise KeyNotFound(key_id, version, held=f"it holds versions {held}")
        return key

    def blind_index(self, value: str, *, field: str) -> str:
        """The blind index of ``value`` in column ``field``: hex HMAC under the blind-index key.

        HMAC-SHA-256 for an AES-256-GCM keyring, HMAC-SM3 (GB/T 32905) for an SM4-GCM one.
        The field name is length-prefixed into the message, so equal values in different
        columns get unrelated indexes and no (field, value) pair can pose as another.
        Normalise ``value`` before calling (the index matches exact bytes).
        """
        f = field.encode("utf-8")
        if not f or len(f) > 0xFFFF:
            raise ValueError("blind index field name must be 1..65535 bytes")
        algorithm: hashes.HashAlgorithm = (
            hashes.SM3() if self.suite is Suite.SM4_GCM else hashes.SHA256()
        )
        mac = hmac.HMAC(self._state.blind_index_key, algorithm)
        mac.update(len(f).to_bytes(2, "big") + f + value.encode("utf-8"))
        return mac.finalize().hex()

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        setting: str,
        key_id: str,
        suite: Suite,
        kek_vars: Mapping[int, str],
        blind_index_var: str,
        current: int | None = None,
    ) -> Keyring:
        """A keyring from environment variables the caller names: version -> variable.

        Each variable holds one base64 key; ``current`` defaults to the highest version.
        ``env`` is passed in (settings owns ``os.environ``). Raises ``ConfigError`` naming
        ``setting`` and the variable (never its value) if one is unset or not a key.
        """
        if not kek_vars:
            raise ConfigError(setting, "names no key-encryption key variables")
        keys = {
            version: _b64_env(env, var, setting=setting, size=suite.key_size)
            for version, var in kek_vars.items()
        }
        bik = _b64_env(env, blind_index_var, setting=setting, size=BLIND_INDEX_KEY_SIZE)
        try:
            return cls(
                key_id=key_id,
                suite=suite,
                keys=keys,
                current=max(keys) if current is None else current,
                blind_index_key=bik,
            )
        except ValueError as exc:
            raise ConfigError(setting, str(exc)) from None


def check_key_id(key_id: str) -> bytes:
    """The UTF-8 of a key id; raises ``ValueError`` unless it is 1..255 bytes, no controls."""
    raw = key_id.encode("utf-8")
    if not 1 <= len(raw) <= MAX_KEY_ID_BYTES or any(ord(c) < 0x20 or c == "\x7f" for c in key_id):
        raise ValueError("key id must be 1..255 UTF-8 bytes without control characters")
    return raw


class FileKeyring(Keyring):
    """A keyring kept in a 0600 JSON file, which ``rotate`` and ``retire`` rewrite atomically.

    File: ``{"format": "imaging-gateway-keyring/1", "key_id": ..., "suite": "AES-256-GCM",
    "current": 2, "keys": {"1": base64, "2": base64}, "blind_index_key": base64}``.
    Rewrites hold an exclusive lock on ``<file>.lock``, re-read the file under it (so two
    processes rotating together lose neither version), write a temporary file beside it,
    fsync it, rename it over the old one and fsync the directory: the file is always either
    the old keyring or the new one. Another process that meets a version newer than it
    loaded re-reads the file once before giving up.
    """

    def __init__(self, path: Path, *, setting: str) -> None:
        """Load ``path``. Raises ``ConfigError`` naming ``setting`` as ``load_keyring`` says."""
        self.path = path
        self.setting = setting
        self._stamp = _file_stamp(path)
        doc = _read_keyring_file(path, setting=setting)
        try:
            super().__init__(**doc)
        except ValueError as exc:
            raise ConfigError(setting, f"{path}: {exc}") from None

    def current(self) -> tuple[str, int]:
        """The current (key id, version), re-read if another process rewrote the file.

        One ``stat`` per call: a running gateway wraps with a version ``keys rotate`` made
        from the next object on, without a restart (so a later rewrap covers its writes).
        A file that cannot be read back keeps the keys loaded.
        """
        stamp = _file_stamp(self.path)
        if stamp is not None and stamp != self._stamp:
            with contextlib.suppress(ConfigError):
                self._reload()
                self._stamp = stamp
        return super().current()

    @classmethod
    def create(
        cls, path: Path, *, setting: str, key_id: str, suite: Suite = Suite.AES_256_GCM
    ) -> FileKeyring:
        """Create a new keyring file with version 1 and a blind-index secret, then load it.

        The parent directory is made 0700 if absent. Raises ``ConfigError`` if ``path``
        exists (a keyring is never overwritten) or the key id is not valid.
        """
        try:
            check_key_id(key_id)
        except ValueError as exc:
            raise ConfigError(setting, str(exc)) from None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = _document(
            key_id=key_id,
            suite=suite,
            keys={1: secrets.token_bytes(suite.key_size)},
            current=1,
            blind_index_key=secrets.token_bytes(BLIND_INDEX_KEY_SIZE),
        )
        with _locked(path):
            if path.exists():
                raise ConfigError(
                    setting, f"{path} already exists; refusing to overwrite a keyring"
                )
            _write_atomically(path, doc)
        return cls(path, setting=setting)

    def rotate(self) -> int:
        """Add a new random version and make it current; returns the new version number.

        Older versions stay for unwrapping. Raises ``ConfigError`` if the file cannot be
        read back as a keyring, ``OSError`` if it cannot be written (the old file stays).
        """
        with _locked(self.path):
            self._reload()  # under the lock: includes another process's rotation
            state = self._state
            version = max(state.keys) + 1
            if version > MAX_VERSION:
                raise ConfigError(self.setting, f"key {self.key_id!r} has no version numbers left")
            keys = {**state.keys, version: secrets.token_bytes(self.suite.key_size)}
            new = _State(keys=keys, current=version, blind_index_key=state.blind_index_key)
            self._commit(new)
        return version

    def retire(self, version: int) -> None:
        """Delete an old version (after every data key under it was rewrapped).

        Raises ``ConfigError`` if it is the current version or not held.
        """
        with _locked(self.path):
            self._reload()
            state = self._state
            if version == state.current:
                raise ConfigError(self.setting, f"key {self.key_id!r} version {version} is current")
            if version not in state.keys:
                raise ConfigError(
                    self.setting, f"key {self.key_id!r} version {version} is not held"
                )
            keys = {v: k for v, k in state.keys.items() if v != version}
            self._commit(
                _State(keys=keys, current=state.current, blind_index_key=state.blind_index_key)
            )

    def unwrap(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        if key_id == self.key_id and version > max(self._state.keys):
            with contextlib.suppress(ConfigError):
                self._reload()  # another process may have rotated since we loaded
        return super().unwrap(key_id, version, wrapped, aad)

    def _reload(self) -> None:
        doc = _read_keyring_file(self.path, setting=self.setting)
        if doc["key_id"] != self.key_id or doc["suite"] is not self.suite:
            raise ConfigError(self.setting, f"{self.path} now holds a different keyring")
        try:
            self._state = self._checked(doc["keys"], doc["current"], doc["blind_index_key"])
        except ValueError as exc:
            raise ConfigError(self.setting, f"{self.path}: {exc}") from None

    def _commit(self, new: _State) -> None:
        doc = _document(
            key_id=self.key_id,
            suite=self.suite,
            keys=new.keys,
            current=new.current,
            blind_index_key=new.blind_index_key,
        )
        _write_atomically(self.path, doc)
        self._state = new  # only once the file holds it
        self._stamp = _file_stamp(self.path)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of the file, None if it cannot be stat'ed: a rewrite (a
    rename over it) changes the inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def load_keyring(path: Path, *, setting: str) -> FileKeyring:
    """Load a keyring file.

    Raises ``ConfigError`` naming ``setting`` if the file is missing, not a regular file,
    open to group or others (it must be 0600), or not a valid keyring document. Key
    material is never put in a message.
    """
    return FileKeyring(path, setting=setting)


def _read_keyring_file(path: Path, *, setting: str) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(setting, f"{path} is missing (FileKeyring.create makes one)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(setting, f"{path} must be a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(setting, f"{path} must be readable by its owner only (chmod 600)")
    try:
        raw = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(setting, f"{path} is not a JSON keyring document") from None
    return _parse_document(raw, where=str(path), setting=setting)


def _parse_document(raw: object, *, where: str, setting: str) -> dict[str, Any]:
    def bad(what: str) -> ConfigError:
        return ConfigError(setting, f"{where}: {what}")

    if not isinstance(raw, dict) or raw.get("format") != FILE_FORMAT:
        raise bad(f'expected a JSON object with "format": "{FILE_FORMAT}"')
    unknown = sorted(set(raw) - {"format", "key_id", "suite", "current", "keys", "blind_index_key"})
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}")
    key_id = raw.get("key_id")
    if not isinstance(key_id, str):
        raise bad("key_id must be a string")
    try:
        suite = Suite(str(raw.get("suite")))
    except ValueError:
        raise bad(f"suite must be one of {', '.join(s.value for s in Suite)}") from None
    current = raw.get("current")
    if not isinstance(current, int) or isinstance(current, bool):
        raise bad("current must be an integer version")
    keys_raw = raw.get("keys")
    if not isinstance(keys_raw, dict) or not keys_raw:
        raise bad('keys must be an object of "version": base64 key')
    keys: dict[int, bytes] = {}
    for name, value in keys_raw.items():
        if not name.isdigit():
            raise bad(f"keys: version {name!r} is not a number")
        keys[int(name)] = _b64(value, what=f"keys.{name}", bad=bad)
    bik = _b64(raw.get("blind_index_key"), what="blind_index_key", bad=bad)
    return {
        "key_id": key_id,
        "suite": suite,
        "keys": keys,
        "current": current,
        "blind_index_key": bik,
    }


def _b64(value: object, *, what: str, bad: Any) -> bytes:
    if not isinstance(value, str):
        raise bad(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{what} is not valid base64") from None


def _b64_env(env: Mapping[str, str], var: str, *, setting: str, size: int) -> bytes:
    value = env.get(var)
    if not value:
        raise ConfigError(setting, f"environment variable {var} is not set")
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(setting, f"environment variable {var} is not valid base64") from None
    if len(key) != size:
        raise ConfigError(
            setting, f"environment variable {var} must hold a {size}-byte key, found {len(key)}"
        )
    return key


def _document(
    *,
    key_id: str,
    suite: Suite,
    keys: Mapping[int, bytes],
    current: int,
    blind_index_key: bytes,
) -> bytes:
    doc = {
        "format": FILE_FORMAT,
        "key_id": key_id,
        "suite": suite.value,
        "current": current,
        "keys": {str(v): base64.b64encode(keys[v]).decode("ascii") for v in sorted(keys)},
        "blind_index_key": base64.b64encode(blind_index_key).decode("ascii"),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<path>.lock`` (created 0600) for a rewrite."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomically(path: Path, data: bytes) -> None:
    """Write aside (0600), fsync, rename over ``path``, fsync the directory.

    If anything fails before the rename, ``path`` is untouched and the temporary file is
    removed; a crash leaves at most a stray ``.<name>-*.tmp`` beside it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
