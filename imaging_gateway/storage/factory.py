"""Choose and build the ObjectStore adapter a store's settings ask for, wrapped for encryption."""

from __future__ import annotations

import ssl

from imaging_gateway.crypto.aead import Suite
from imaging_gateway.crypto.keyring import FileKeyring, KeyProvider, load_keyring
from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.crypto.tls import outbound_context
from imaging_gateway.errors import ConfigError
from imaging_gateway.settings import Settings, StoreSettings
from imaging_gateway.storage.base import ObjectStore


def open_store(
    settings: StoreSettings, *, ssl_context: ssl.SSLContext | None = None
) -> ObjectStore:
    """Build the adapter for ``settings.kind`` (``s3``, ``minio`` or ``fs``).

    ``ssl_context`` (``crypto.tls.client_context``: system trust plus ``tls.ca_file``)
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


def load_store_keys(settings: Settings) -> FileKeyring | None:
    """The keyring stores are wrapped with, or None when there is none and encryption is off.

    A keyring file that exists is loaded even with encryption off, so objects written
    encrypted earlier stay readable. Raises ``ConfigError`` naming the key: the keyring
    is missing while ``encryption.enabled`` (run ``imaging-gateway keys init``), is not a
    valid 0600 keyring, or holds keys of another suite than ``encryption.suite``.
    """
    enc = settings.encryption
    if not enc.keyring_file.exists():
        if enc.enabled:
            raise ConfigError(
                "encryption.keyring_file",
                f"{enc.keyring_file} is missing; run `imaging-gateway keys init` to create it",
            )
        return None
    ring = load_keyring(enc.keyring_file, setting="encryption.keyring_file")
    if ring.suite.value != enc.suite:
        raise ConfigError(
            "encryption.suite",
            f"is {enc.suite} but the keyring {enc.keyring_file} holds {ring.suite.value} keys",
        )
    return ring


def load_phi_codec(settings: Settings) -> PhiCodec | None:
    """The codec of the index's PHI columns: with ``[encryption] enabled``, over the keyring
    the stores use (``load_store_keys``); else None (the index is plain). The caller passes
    it to ``SqlIndex.open``. Raises ``ConfigError`` as ``load_store_keys`` does (a missing
    keyring names its file)."""
    if not settings.encryption.enabled:
        return None
    keyring = load_store_keys(settings)
    assert keyring is not None  # enabled: load_store_keys raises instead
    return PhiCodec(keyring)


def open_gateway_store(settings: Settings, name: str, keys: KeyProvider | None) -> ObjectStore:
    """The store ``name`` as every caller of the gateway must see it (the one read/write path).

    With ``keys`` (from ``load_store_keys``) the adapter is wrapped by ``EncryptedStore``,
    encrypting writes when ``encryption.enabled``; without, the bare adapter. Raises as
    ``open_store`` and ``Settings.store`` do.
    """
    store = settings.store(name)
    inner = open_store(store, ssl_context=outbound_context(settings.tls, store.endpoint))
    if keys is None:
        return inner
    from imaging_gateway.storage.encrypted import EncryptedStore

    enc = settings.encryption
    return EncryptedStore(
        inner,
        keys,
        encrypt_writes=enc.enabled,
        suite=Suite(enc.suite),
        segment_size=enc.segment_size,
    )
