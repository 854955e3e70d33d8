"""The exceptions entitysync_sync raises.

Every error the library raises on purpose derives from :class:`EntitySyncError`,
so an application can catch them all in one place, and each narrower class
also derives from the built-in it refines (``ValueError``, ``LookupError``) so
ordinary ``except`` clauses keep working.
"""

from __future__ import annotations


class EntitySyncError(Exception):
    """Root of every error raised by entitysync_sync."""


class ConfigError(EntitySyncError):
    """The extension is configured or used in a way that cannot work."""


class InvalidKeyError(EntitySyncError, ValueError):
    """An entity name or id does not meet the rules of :class:`EntityKey`."""


class UnknownEntityError(EntitySyncError, LookupError):
    """An entity name was used that no ``@es.entity`` registered."""


class BusError(EntitySyncError):
    """The bus that carries notifications between servers failed."""


class ProtocolError(EntitySyncError):
    """A websocket frame or bus payload does not follow the wire protocol.

    ``code`` is the stable, machine-readable error code sent to clients
    (``bad_json``, ``bad_message``, ``unknown_action``...); ``ref`` is the
    client's ``ref`` when it could be read, so the error frame can echo it.
    """

    def __init__(self, code: str, message: str, ref: str | int | float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r})"


class BatchFetchError(EntitySyncError):
    """A batch fetch returned something other than one result per secret, in order."""


class FetchTimeoutError(EntitySyncError, TimeoutError):
    """A fetch took longer than ``ENTITYSYNC_FETCH_TIMEOUT`` and was abandoned."""
