"""Entity keys: which row a subscription or notification is about.

A key is an entity name (``"items"``) plus an id (``"100"``). Entity names
double as bus topic names, so they follow NSQ's topic rules; ids are free
text of bounded length. Integer ids are normalised to strings so that
``EntityKey("items", 100) == EntityKey("items", "100")``, whichever way a
client or a view spelled it.
"""

from __future__ import annotations

import re
from typing import Iterable

from .exceptions import ConfigError, InvalidKeyError

#: Entity names: 1 to 64 of ``A-Z a-z 0-9 _ . -`` (valid NSQ topic names).
ENTITY_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: The longest id accepted, in characters.
MAX_ID_LENGTH = 256

IdLike = str | int

#: Longest topic or channel name NSQ accepts; the other buses share it for symmetry.
MAX_TOPIC_LENGTH = 64


#: Entity names found valid so far, so that the keys of every notification and
#: subscribe skip the pattern; bounded, as clients may send any name.
_VALID_ENTITIES: set[str] = set()
_VALID_ENTITIES_MAX = 4096


def validate_entity(entity: object) -> str:
    """Return ``entity`` if it is a valid entity name, else raise :class:`InvalidKeyError`."""
    if type(entity) is str and entity in _VALID_ENTITIES:
        return entity
    if not isinstance(entity, str) or ENTITY_PATTERN.fullmatch(entity) is None:
        raise InvalidKeyError(
            f"invalid entity name {entity!r}: use 1 to 64 characters from "
            "A-Z, a-z, 0-9, '_', '.' and '-'"
        )
    if type(entity) is str and len(_VALID_ENTITIES) < _VALID_ENTITIES_MAX:
        _VALID_ENTITIES.add(entity)
    return entity


def normalise_id(id: object) -> str:
    """Return ``id`` as a string if it is a valid id, else raise :class:`InvalidKeyError`.

    Accepts a non-empty string of at most :data:`MAX_ID_LENGTH` characters
    without control characters, or an integer (not a bool).
    """
    if isinstance(id, bool) or not isinstance(id, (str, int)):
        raise InvalidKeyError(
            f"invalid id {id!r}: an id is a string or an integer"
        )
    text = str(id)
    if not text or len(text) > MAX_ID_LENGTH:
        raise InvalidKeyError(
            f"invalid id: an id has 1 to {MAX_ID_LENGTH} characters, got {len(text)}"
        )
    if not text.isprintable():
        raise InvalidKeyError("invalid id: an id may not contain control characters")
    return text


class EntityKey:
    """An immutable, hashable (entity, id) pair naming one row.

    >>> EntityKey("items", 100)
    EntityKey('items', '100')

    Raises :class:`InvalidKeyError` (a ``ValueError``) when the entity name
    or the id breaks the rules above.
    """

    __slots__ = ("_hash", "entity", "id")

    entity: str
    id: str
    _hash: int

    def __init__(self, entity: str, id: IdLike) -> None:
        object.__setattr__(self, "entity", validate_entity(entity))
        object.__setattr__(self, "id", normalise_id(id))
        object.__setattr__(self, "_hash", hash((self.entity, self.id)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("EntityKey is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("EntityKey is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EntityKey):
            return NotImplemented
        return self.entity == other.entity and self.id == other.id

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"EntityKey({self.entity!r}, {self.id!r})"

    def __str__(self) -> str:
        return f"{self.entity}/{self.id}"

    def __reduce__(self) -> tuple[type[EntityKey], tuple[str, str]]:
        return (EntityKey, (self.entity, self.id))


def as_key(key_or_entity: EntityKey | str, id: IdLike | None = None) -> EntityKey:
    """Build a key from either an :class:`EntityKey` or an ``(entity, id)`` pair."""
    if isinstance(key_or_entity, EntityKey):
        if id is not None:
            raise TypeError("pass either an EntityKey or an entity name and an id, not both")
        return key_or_entity
    if id is None:
        raise TypeError(f"an id is needed with the entity name {key_or_entity!r}")
    return EntityKey(key_or_entity, id)


class NotifiedKey(EntityKey):
    """An :class:`EntityKey` that remembers when it was notified.

    ``notified_at`` is the wall-clock time (``time.time()``) of the ``notify``
    call, carried across the bus so a server can measure how long a
    notification took to reach its subscribers. It equals and hashes as the
    plain key, so buffers that de-duplicate keys keep the first, earliest one.
    """

    __slots__ = ("notified_at",)

    notified_at: float

    def __init__(self, entity: str, id: IdLike, notified_at: float) -> None:
        super().__init__(entity, id)
        object.__setattr__(self, "notified_at", float(notified_at))

    @classmethod
    def stamp(cls, key: EntityKey, notified_at: float) -> NotifiedKey:
        """``key`` with ``notified_at``, without validating it again."""
        stamped = cls.__new__(cls)
        for name in ("entity", "id", "_hash"):
            object.__setattr__(stamped, name, getattr(key, name))
        object.__setattr__(stamped, "notified_at", float(notified_at))
        return stamped


KeyLike = EntityKey | tuple[str, IdLike]


def stamp_keys(keys: Iterable[KeyLike], now: float) -> list[NotifiedKey]:
    """Validate ``keys`` (``EntityKey`` or ``(entity, id)`` pairs) and stamp them with the notify time."""
    return [NotifiedKey.stamp(key if isinstance(key, EntityKey) else EntityKey(*key), now) for key in keys]


def check_topic_prefix(prefix: object) -> str:
    """Return ``prefix`` if topics made with it are valid names, else raise :class:`ConfigError`."""
    if not isinstance(prefix, str) or (prefix and ENTITY_PATTERN.fullmatch(prefix) is None):
        raise ConfigError(
            f"ENTITYSYNC_TOPIC_PREFIX must be empty or up to 64 characters from "
            f"A-Z, a-z, 0-9, '_', '.' and '-', got {prefix!r}"
        )
    return prefix


def topic_name(prefix: str, entity: str) -> str:
    """The bus topic (channel) that carries ``entity``'s keys; :class:`ConfigError` if too long."""
    topic = prefix + entity
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ConfigError(
            f"topic {topic!r} is longer than {MAX_TOPIC_LENGTH} characters: "
            "shorten ENTITYSYNC_TOPIC_PREFIX or the entity name"
        )
    return topic
