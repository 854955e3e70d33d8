"""The wire protocol: pure encoding and decoding, no sockets.

Three kinds of payload cross the wire:

* client frames (browser to server), decoded by :func:`decode_client_frame`
  into :class:`Subscribe`, :class:`Unsubscribe`, :class:`SetSecret`,
  :class:`Ping` or :class:`PassThrough`;
* server frames (server to browser), built by the ``encode_*`` functions;
* bus bodies (server to server), ``{"entity":"items","id":"100"}``, the same
  bytes the Go entity-sync publishes, built by :func:`encode_bus_body` and
  read by :func:`decode_bus_body` (or, on a channel of one key, by
  :func:`decode_key_body`, which gives the same), optionally with ``"t"``, the notify time
  (Unix seconds) of a :class:`~entitysync_sync.keys.NotifiedKey`, an extra
  field that Go and older servers ignore; and ``{"entity":"items","resync":true}``,
  built by :func:`encode_bus_resync`, which asks every server to refresh all
  its subscribed keys of one entity (sent after a publisher had to drop
  notifications, and for ``notify_entity``). The Go entity-sync unmarshals
  it into its ``EntityKey`` struct, ignoring the unknown field, and gets a
  key with an empty id: it refreshes that key for clients subscribed to it,
  and no Python client can subscribe to an empty id, so it does nothing.

Bad input raises :class:`~entitysync_sync.exceptions.ProtocolError` carrying
one of the error codes below.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

from .exceptions import InvalidKeyError, ProtocolError
from .keys import EntityKey, NotifiedKey, validate_entity

# Error codes sent in ``{"action":"error"}`` frames.
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
UNKNOWN_ACTION = "unknown_action"
UNKNOWN_ENTITY = "unknown_entity"
FORBIDDEN = "forbidden"
TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
FETCH_FAILED = "fetch_failed"
INTERNAL_ERROR = "internal_error"

#: The longest version a client may send back in a subscribe frame.
MAX_VERSION_LENGTH = 64

# Close codes the server uses.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012

Ref = str | int | float | None

#: One fetch result as JSON texts: one row (``str``, sent as ``"body"``), a set
#: of rows in the fetch's order (``list``, sent as ``"rows"``), or ``None``
#: when the key does not exist (sent as ``gone``).
FetchResult = str | list[str] | None


@dataclass(frozen=True)
class Subscribe:
    """``{"action":"subscribe","body":{"entity":..,"id":..,"v":..}}``

    ``version`` is the ``"v"`` of the last push or gone frame the client
    holds for the key, if it sent one: when the current result has the same
    version, the server sends no push.
    """

    key: EntityKey
    ref: Ref = None
    version: str | None = None


@dataclass(frozen=True)
class Unsubscribe:
    """``{"action":"unsubscribe","body":{"entity":..,"id":..}}``"""

    key: EntityKey
    ref: Ref = None


@dataclass(frozen=True)
class SetSecret:
    """``{"action":"secret","body":"..."}``; ``null`` clears the secret."""

    secret: str | None
    ref: Ref = None

    def __repr__(self) -> str:  # never show the secret, even in a debugger or a log
        return f"SetSecret(secret=<hidden>, ref={self.ref!r})"


@dataclass(frozen=True)
class Ping:
    """``{"action":"ping"}``: the client's heartbeat, answered by ``{"action":"pong"}``."""

    ref: Ref = None


@dataclass(frozen=True)
class PassThrough:
    """A JSON object with no ``"action"``: handed to ``@es.on_message`` as sent."""

    raw: str


ClientMessage = Subscribe | Unsubscribe | SetSecret | Ping | PassThrough

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _read_ref(obj: dict[str, Any]) -> Ref:
    ref = obj.get("ref")
    if ref is None or (isinstance(ref, (str, int, float)) and not isinstance(ref, bool)):
        return ref
    raise ProtocolError(BAD_MESSAGE, '"ref" must be a string or a number')


def _read_key(body: object, ref: Ref) -> EntityKey:
    if not isinstance(body, dict):
        raise ProtocolError(
            BAD_MESSAGE, '"body" must be an object like {"entity":"items","id":"100"}', ref
        )
    entity, id = body.get("entity"), body.get("id")
    if not isinstance(entity, str) or isinstance(id, bool) or not isinstance(id, (str, int)):
        raise ProtocolError(
            BAD_MESSAGE, '"body" needs a string "entity" and a string or integer "id"', ref
        )
    try:
        return EntityKey(entity, id)
    except InvalidKeyError as exc:
        raise ProtocolError(BAD_MESSAGE, str(exc), ref) from None


def _read_version(body: Any, ref: Ref) -> str | None:
    version = body.get("v")  # body is an object: _read_key checked it
    if version is None or (isinstance(version, str) and 0 < len(version) <= MAX_VERSION_LENGTH):
        return version
    raise ProtocolError(
        BAD_MESSAGE, f'"v" must be the string of 1 to {MAX_VERSION_LENGTH} characters the server sent', ref
    )


def decode_client_frame(data: str | bytes) -> ClientMessage:
    """Decode one websocket frame sent by a client.

    Raises :class:`ProtocolError` with ``bad_json``, ``bad_message`` or
    ``unknown_action``.
    """
    if not isinstance(data, str):
        raise ProtocolError(BAD_MESSAGE, "binary frames are not supported: send JSON text frames")
    try:
        obj = json.loads(data)
    except ValueError:
        raise ProtocolError(BAD_JSON, "the frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_MESSAGE, "a frame must be a JSON object")
    ref = _read_ref(obj)
    if "action" not in obj:
        return PassThrough(data)
    action = obj["action"]
    if action == "subscribe":
        body = obj.get("body")
        return Subscribe(_read_key(body, ref), ref, _read_version(body, ref))
    if action == "unsubscribe":
        return Unsubscribe(_read_key(obj.get("body"), ref), ref)
    if action == "secret":
        secret = obj.get("body")
        if secret is not None and not isinstance(secret, str):
            raise ProtocolError(BAD_MESSAGE, '"body" of a secret frame must be a string or null', ref)
        return SetSecret(secret, ref)
    if action == "ping":
        return Ping(ref)
    if not isinstance(action, str):
        raise ProtocolError(BAD_MESSAGE, '"action" must be a string', ref)
    raise ProtocolError(
        UNKNOWN_ACTION,
        f"unknown action {action[:64]!r}: use subscribe, unsubscribe, secret or ping",
        ref,
    )


def encode_key(key: EntityKey) -> str:
    """``{"entity":"items","id":"100"}`` as compact JSON text.

    Built directly, as it is once per fetch: an entity name needs no escaping,
    and a valid id has no control characters, so only ``"`` and ``\\`` would
    (those ids go through the JSON encoder).
    """
    id = key.id
    if '"' in id or "\\" in id:
        return _dumps({"entity": key.entity, "id": id})
    return f'{{"entity":"{key.entity}","id":"{id}"}}'


def result_version(result: FetchResult) -> str:
    """The version of a fetch result: a short string that changes exactly when the result does.

    It is derived from the result's JSON text alone, so equal rows give the
    same version on every server and after a restart.
    """
    if result is None:
        data = b"g"
    elif isinstance(result, str):
        data = b"b" + result.encode()
    else:
        data = b"r" + ",".join(result).encode()
    # urlsafe_b64encode without its Python wrappers: 12 bytes make 16 characters, no padding.
    return binascii.b2a_base64(blake2b(data, digest_size=12).digest(), newline=False).translate(_URLSAFE).decode()


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _version_field(version: str | None) -> str:
    return "" if version is None else f',"v":"{version}"'


def encode_push(key: EntityKey, row_json: str, version: str | None = None) -> str:
    """A push frame around one row that is already JSON text."""
    return f'{{"action":"push","key":{encode_key(key)}{_version_field(version)},"body":{row_json}}}'


def encode_push_rows(key: EntityKey, rows_json: list[str], version: str | None = None) -> str:
    """A push frame holding a whole set of rows (each already JSON text), in their order."""
    return (f'{{"action":"push","key":{encode_key(key)}{_version_field(version)},'
            f'"rows":[{",".join(rows_json)}]}}')


def encode_gone(key: EntityKey, version: str | None = None) -> str:
    """The frame saying that ``key`` does not exist (its fetch returned ``None``)."""
    return f'{{"action":"gone","key":{encode_key(key)}{_version_field(version)}}}'


def encode_result(
    key: EntityKey, result: FetchResult, envelope: bool = True, version: str | None = None
) -> list[str]:
    """The server frames that carry one fetch result of ``key`` to a subscriber.

    In envelope mode a single row is one ``push`` with ``"body"``, a set of
    rows (possibly empty) is one ``push`` with ``"rows"``, so the client gets
    the whole set at once and learns of rows that left it, and ``None`` is
    ``gone``; each carries ``"v"``, the result's :func:`result_version`
    (pass ``version`` when it is computed already). In raw mode each row is
    sent alone, as the Go entity-sync did, and ``None`` sends nothing.
    Per-subscriber and shared fetches both build frames here.
    """
    if not envelope:
        if result is None:
            return []
        return [result] if isinstance(result, str) else list(result)
    if version is None:
        version = result_version(result)
    if result is None:
        return [encode_gone(key, version)]
    if isinstance(result, str):
        return [encode_push(key, result, version)]
    return [encode_push_rows(key, result, version)]


class KeyFrames:
    """:func:`encode_result` for many results of one key: the key's JSON text is encoded once.

    ``frames(result)`` returns what ``encode_result(key, result, envelope)``
    does, with the result's version in envelope mode, and that version
    (None in raw mode).
    """

    __slots__ = ("_envelope", "_gone", "_push")

    def __init__(self, key: EntityKey, envelope: bool = True) -> None:
        self._envelope = envelope
        encoded = encode_key(key)
        self._push = f'{{"action":"push","key":{encoded},"v":"'
        self._gone = f'{{"action":"gone","key":{encoded},"v":"'

    def frames(self, result: FetchResult) -> tuple[list[str], str | None]:
        """The frames that carry ``result`` to a subscriber, and its version."""
        if not self._envelope:
            if result is None:
                return [], None
            return ([result] if isinstance(result, str) else list(result)), None
        version = result_version(result)
        if result is None:
            return [f'{self._gone}{version}"}}'], version
        if isinstance(result, str):
            return [f'{self._push}{version}","body":{result}}}'], version
        return [f'{self._push}{version}","rows":[{",".join(result)}]}}'], version


def encode_fetch_failed(key: EntityKey, message: str, envelope: bool = True) -> list[str]:
    """The frames that tell a subscriber a fetch of ``key`` failed (none in raw mode)."""
    return [encode_error(FETCH_FAILED, message, None, key)] if envelope else []


def encode_ack(ref: Ref) -> str:
    """The frame acknowledging the client frame that carried ``ref``."""
    return _dumps({"action": "ack", "ref": ref})


def encode_pong(ref: Ref) -> str:
    """The answer to a ``ping``; it carries the ping's ``ref`` (``null`` when it had none)."""
    return _dumps({"action": "pong", "ref": ref})


def encode_error(code: str, message: str, ref: Ref = None, key: EntityKey | None = None) -> str:
    """An error frame; ``key`` is added for errors about one subscription."""
    frame: dict[str, Any] = {"action": "error", "ref": ref, "error": {"code": code, "message": message}}
    if key is not None:
        frame["key"] = {"entity": key.entity, "id": key.id}
    return _dumps(frame)


def encode_bus_body(key: EntityKey) -> bytes:
    """The bus message body for ``key``, byte-compatible with the Go entity-sync.

    A :class:`NotifiedKey` adds ``"t"``, its notify time in Unix seconds to
    the millisecond, so receivers can measure notify-to-push latency.
    """
    if isinstance(key, NotifiedKey):
        return _dumps({"entity": key.entity, "id": key.id, "t": round(key.notified_at, 3)}).encode()
    return encode_key(key).encode()


@dataclass(frozen=True)
class ResyncRequest:
    """A bus body asking for every subscribed key of ``entity`` to be refreshed."""

    entity: str


def encode_bus_resync(entity: str) -> bytes:
    """The bus body of a :class:`ResyncRequest` for ``entity``."""
    return json.dumps({"entity": entity, "resync": True}, separators=(",", ":")).encode()


def decode_bus_body(body: bytes | str) -> EntityKey | ResyncRequest:
    """Read a bus message body; extra fields are ignored.

    A body with a numeric ``"t"`` gives a :class:`NotifiedKey` carrying that
    notify time. Raises :class:`ProtocolError` (``bad_message``) for anything that is not
    a JSON object with a valid entity and either a valid id or ``"resync": true``.
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(BAD_MESSAGE, "bus body is not valid JSON") from None
    if isinstance(obj, dict) and obj.get("resync") is True:
        try:
            return ResyncRequest(validate_entity(obj.get("entity")))
        except InvalidKeyError as exc:
            raise ProtocolError(BAD_MESSAGE, str(exc)) from None
    key = _read_key(obj, None)
    sent = obj.get("t")
    if isinstance(sent, (int, float)) and not isinstance(sent, bool) and math.isfinite(sent):
        return NotifiedKey.stamp(key, sent)
    return key


#: A JSON number, exactly as the JSON grammar has it (``float`` alone would also take ``1_0`` or ``inf``).
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def decode_key_body(body: bytes, key: EntityKey) -> EntityKey | ResyncRequest:
    """Read a bus body that should name ``key``: what :func:`decode_bus_body` gives, faster.

    With key routing a channel carries one key, so the body its publishers
    write is known but for its ``"t"``: the bodies :func:`encode_bus_body`
    writes for ``key`` (with or without ``"t"``) are recognised by their bytes
    and read without a JSON parse. Any other body, another key's included, is
    read by :func:`decode_bus_body`, so the result is the same either way.
    """
    head = encode_key(key).encode()
    if body == head:
        return key
    cut = len(head) - 1  # the head without its closing brace
    if body.startswith(b',"t":', cut) and body.endswith(b"}") and body.startswith(head[:cut]):
        number = body[cut + 5:-1]
        if _NUMBER.fullmatch(number):
            sent = float(number)
            if math.isfinite(sent):
                return NotifiedKey.stamp(key, sent)
    return decode_bus_body(body)
