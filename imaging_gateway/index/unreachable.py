"""The one translation of a failed database call into ``IndexUnavailable``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy.exc import SQLAlchemyError

from imaging_gateway.errors import IndexUnavailable


@contextlib.contextmanager
def unreachable() -> Iterator[None]:
    """Turn a SQLAlchemy or socket error inside the block into ``IndexUnavailable``, named
    by its class only (the error's text can quote statement values)."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise IndexUnavailable(f"index unreachable: {exc.__class__.__name__}") from exc
