"""Secret key files under the gateway's data directory: created once 0600, checked on load."""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

from imaging_gateway.errors import ConfigError


def load_secret(path: Path, *, setting: str, size: int = 32) -> bytes:
    """Read a secret key file.

    Raises ``ConfigError`` naming ``setting`` if the file is missing, not a regular file
    of exactly ``size`` bytes, or open to group or others. The key is never logged.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(
            setting, f"{path} is missing (the gateway creates it on first use)"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(setting, f"{path} must be a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(setting, f"{path} must be readable by its owner only (chmod 600)")
    data = path.read_bytes()
    if len(data) != size:
        raise ConfigError(setting, f"{path} must hold exactly {size} bytes, found {len(data)}")
    return data


def load_or_create_secret(path: Path, *, setting: str, size: int = 32) -> bytes:
    """Load a secret key file, first creating it (``size`` random bytes, 0600) if absent.

    A new file appears complete or not at all (written aside, then linked into place),
    so processes starting together agree on one key and none reads a half-written one.
    The parent directory is created with mode 0700. Raises ``ConfigError`` as
    ``load_secret`` does, and naming ``setting`` when the file cannot be created.
    """
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        except OSError as exc:
            raise ConfigError(setting, f"cannot create {path}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(size))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: everyone uses that one
        finally:
            os.unlink(tmp)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return load_secret(path, setting=setting, size=size)
