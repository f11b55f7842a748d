"""Choose and build the ObjectStore adapter a store's settings ask for."""

from __future__ import annotations

import ssl

from imaging_gateway.errors import ConfigError
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.base import ObjectStore


def open_store(
    settings: StoreSettings, *, ssl_context: ssl.SSLContext | None = None
) -> ObjectStore:
    """Build the adapter for ``settings.kind`` (``s3``, ``minio`` or ``fs``).

    ``ssl_context`` (``security.tls.client_context``: system trust plus ``tls.ca_file``)
    verifies an https endpoint when ``verify_tls`` is on; None: the system trust alone.
    Opens no connection (the S3 adapter's HTTP session starts on first use); call
    ``close()`` when done. Raises ``ConfigError`` for an unknown kind and
    ``StorageError`` when the settings lack what the adapter needs.
    """
    # Imported here so a gateway with only local stores does not load botocore or minio.
    if settings.kind == "s3":
        from imaging_gateway.storage.s3 import S3Store

        return S3Store(settings, ssl_context=ssl_context)
    if settings.kind == "minio":
        from imaging_gateway.storage.minio_store import MinioStore

        return MinioStore(settings, ssl_context=ssl_context)
    if settings.kind == "fs":
        from imaging_gateway.storage.local import LocalStore

        return LocalStore(settings)
    raise ConfigError(
        f"stores.{settings.name}.kind", f"expected s3, minio or fs, got {settings.kind!r}"
    )
