"""The gateway's error tree: every error a user can meet, each with its HTTP status.

Adapters convert library errors into these at their boundary; one middleware
(``api.middlewares``) and the CLI turn them into responses and one-line messages.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: int = 500
    code: str = "internal-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(GatewayError):
    """The configuration is wrong; the message names the key and what was expected."""

    code = "config-error"

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"config: {key}: {expected}")
        self.key = key
        self.expected = expected


class InvalidRequest(GatewayError):
    """The request is malformed (bad parameter, bad body)."""

    status = 400
    code = "invalid-request"


class InvalidQuery(InvalidRequest):
    """A search parameter is not valid."""

    code = "invalid-query"


class Unauthenticated(GatewayError):
    """No credential, or one that is malformed, forged or expired."""

    status = 401
    code = "unauthenticated"


class Forbidden(GatewayError):
    """The principal is known but may not do this."""

    status = 403
    code = "forbidden"


class ClientCertificateRequired(Forbidden):
    """The route needs a verified TLS client certificate and the connection has none."""

    code = "client-certificate-required"


class NotFound(GatewayError):
    """The resource does not exist (or may not be seen, which must look the same)."""

    status = 404
    code = "not-found"


class NotAcceptable(GatewayError):
    """No representation the client accepts can be sent (PS3.18 8.7.3: 406 Not Acceptable)."""

    status = 406
    code = "not-acceptable"


class Conflict(GatewayError):
    """The request conflicts with the current state (e.g. a job already running)."""

    status = 409
    code = "conflict"


class SliceLost(Conflict):
    """A sync worker's claim on a slice passed to another worker (its lease expired)."""


class IntegrityError(GatewayError):
    """Data failed an integrity check (checksum, authentication tag, hash chain)."""

    status = 500
    code = "integrity-error"


class KeyNotFound(GatewayError):
    """A key-encryption key that encrypted data needs (id and version) is not held."""

    status = 500
    code = "key-not-found"

    def __init__(self, key_id: str, version: int, *, held: str = "", where: str = "") -> None:
        """``where`` names what needed the key (a store and object key), first in the message."""
        detail = f" ({held})" if held else ""
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}key {key_id!r} version {version} is not in the keyring{detail}"
        )
        self.key_id = key_id
        self.version = version
        self.held = held
        self.where = where


class StorageError(GatewayError):
    """An object store failed in a way retrying did not cure."""

    status = 502
    code = "storage-error"


class ObjectNotFound(StorageError):
    """The object store has no object under this key."""

    status = 404
    code = "object-not-found"

    def __init__(self, store: str, key: str) -> None:
        super().__init__(f"store {store!r}: no object at this key")
        self.store = store
        self.key = key


class StoreUnavailable(StorageError):
    """The object store is unreachable or kept failing (5xx, throttling) after retries."""

    status = 503
    code = "store-unavailable"


class IndexUnavailable(GatewayError):
    """The study index database cannot be reached."""

    status = 503
    code = "index-unavailable"


class PeerUnavailable(GatewayError):
    """A peer gateway did not answer in time or answered garbage."""

    status = 504
    code = "peer-unavailable"


class QueryTooBroad(GatewayError):
    """A search would take too long to answer; PS3.18 10.6.3.1 answers 413."""

    status = 413
    code = "query-too-broad"


class UnsupportedMediaType(GatewayError):
    """The request body is not a media type the resource accepts (415)."""

    status = 415
    code = "unsupported-media-type"


class StoreNotEnabled(GatewayError):
    """This gateway has no write store, so it cannot store instances (503)."""

    status = 503
    code = "stow-not-enabled"
