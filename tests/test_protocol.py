from __future__ import annotations

import json
from typing import Any

import pytest

from entitysync_sync import EntityKey, ProtocolError
from entitysync_sync import protocol as p
from entitysync_sync.keys import NotifiedKey


def test_the_three_seed_frames_decode() -> None:
    assert p.decode_client_frame('{"action":"subscribe","body":{"entity":"items","id":"100"}}') == \
        p.Subscribe(EntityKey("items", "100"))
    assert p.decode_client_frame('{"action":"unsubscribe","body":{"entity":"items","id":"100"}}') == \
        p.Unsubscribe(EntityKey("items", "100"))
    assert p.decode_client_frame('{"action":"secret","body":"my-secret"}') == p.SetSecret("my-secret")


def test_ref_and_integer_ids_are_read() -> None:
    msg = p.decode_client_frame('{"action":"subscribe","body":{"entity":"items","id":7},"ref":"a1"}')
    assert msg == p.Subscribe(EntityKey("items", "7"), "a1")
    assert p.decode_client_frame('{"action":"secret","body":null,"ref":3}') == p.SetSecret(None, 3)


def test_ping_decodes_with_or_without_ref_and_pong_echoes_it() -> None:
    assert p.decode_client_frame('{"action":"ping"}') == p.Ping()
    assert p.decode_client_frame('{"action":"ping","ref":"hb"}') == p.Ping("hb")
    assert p.encode_pong("hb") == '{"action":"pong","ref":"hb"}'
    assert p.encode_pong(None) == '{"action":"pong","ref":null}'


def test_frames_without_action_pass_through_verbatim() -> None:
    raw = '{"chat": "hello",  "to": 1}'
    assert p.decode_client_frame(raw) == p.PassThrough(raw)


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("not json", "bad_json", None),
        ("", "bad_json", None),
        (b'{"action":"subscribe"}', "bad_message", None),
        ("[1,2]", "bad_message", None),
        ('"subscribe"', "bad_message", None),
        ('{"action":"subscribe","ref":[1]}', "bad_message", None),
        ('{"action":"subscribe","ref":true}', "bad_message", None),
        ('{"action":"subscribe","ref":1}', "bad_message", 1),
        ('{"action":"subscribe","body":"items/1","ref":1}', "bad_message", 1),
        ('{"action":"subscribe","body":{"entity":"items"},"ref":"r"}', "bad_message", "r"),
        ('{"action":"subscribe","body":{"entity":"items","id":true}}', "bad_message", None),
        ('{"action":"subscribe","body":{"entity":"items","id":1.5}}', "bad_message", None),
        ('{"action":"subscribe","body":{"entity":"bad name","id":"1"}}', "bad_message", None),
        ('{"action":"unsubscribe","body":{"entity":"items","id":""}}', "bad_message", None),
        ('{"action":"secret","body":{"token":"x"}}', "bad_message", None),
        ('{"action":5}', "bad_message", None),
        ('{"action":"explode","ref":2}', "unknown_action", 2),
    ],
)
def test_bad_frames_raise_protocol_errors_with_codes(frame: str | bytes, code: str, ref: object) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode_client_frame(frame)
    assert info.value.code == code
    assert info.value.ref == ref
    assert info.value.message


def test_secret_is_hidden_from_repr() -> None:
    assert "hunter2" not in repr(p.SetSecret("hunter2"))


def test_server_frames_are_valid_json_with_the_documented_shape() -> None:
    key = EntityKey("items", "100")
    assert json.loads(p.encode_push(key, '{"a":1}')) == {
        "action": "push", "key": {"entity": "items", "id": "100"}, "body": {"a": 1}}
    assert json.loads(p.encode_gone(key)) == {"action": "gone", "key": {"entity": "items", "id": "100"}}
    assert json.loads(p.encode_push(key, '{"a":1}', "V1"))["v"] == "V1"
    assert json.loads(p.encode_gone(key, "V2")) == {
        "action": "gone", "key": {"entity": "items", "id": "100"}, "v": "V2"}
    assert json.loads(p.encode_ack("r1")) == {"action": "ack", "ref": "r1"}
    assert json.loads(p.encode_error("forbidden", "no", 3, key)) == {
        "action": "error", "ref": 3, "error": {"code": "forbidden", "message": "no"},
        "key": {"entity": "items", "id": "100"}}
    assert json.loads(p.encode_error("bad_json", "x")) == {
        "action": "error", "ref": None, "error": {"code": "bad_json", "message": "x"}}


def test_a_fetch_result_is_one_frame_a_row_as_body_a_set_as_rows() -> None:
    key = EntityKey("lists", "7")
    frame_of = lambda result: [json.loads(t) for t in p.encode_result(key, result)]  # noqa: E731
    k = {"entity": "lists", "id": "7"}
    v = p.result_version
    assert frame_of('{"a":1}') == [{"action": "push", "key": k, "v": v('{"a":1}'), "body": {"a": 1}}]
    assert frame_of(['{"a":1}', '{"a":2}', '[3]']) == [
        {"action": "push", "key": k, "v": v(['{"a":1}', '{"a":2}', '[3]']), "rows": [{"a": 1}, {"a": 2}, [3]]}]
    assert p.encode_result(key, []) == [
        f'{{"action":"push","key":{{"entity":"lists","id":"7"}},"v":"{v([])}","rows":[]}}']
    assert frame_of(None) == [{"action": "gone", "key": k, "v": v(None)}]


def test_a_version_is_short_and_changes_exactly_with_the_result() -> None:
    v = p.result_version
    versions = [v(None), v('{"a":1}'), v('{"a":2}'), v([]), v(['{"a":1}']), v(['{"a":1}', '{"a":2}']), v("[]")]
    assert len(set(versions)) == len(versions)  # a row, a set holding it, gone and empty all differ
    assert all(0 < len(x) <= p.MAX_VERSION_LENGTH and x.isascii() for x in versions)
    assert v(['{"a":1}', '{"a":2}']) == v(['{"a":1}', '{"a":2}']) and v(None) == v(None)
    assert v(['{"a":1},{"a":2}']) == v(['{"a":1}', '{"a":2}'])  # verbatim rows that send the same bytes
    # Derived from the content alone, so it is the same in every process and after a restart.
    assert v('{"a":1}') == "FL-mhbw0Hy2kS1-e"


def test_a_subscribe_may_carry_the_version_the_client_holds() -> None:
    msg = p.decode_client_frame('{"action":"subscribe","body":{"entity":"items","id":"7","v":"abc"},"ref":1}')
    assert msg == p.Subscribe(EntityKey("items", "7"), 1, "abc")
    assert p.decode_client_frame('{"action":"subscribe","body":{"entity":"items","id":"7","v":null}}') == \
        p.Subscribe(EntityKey("items", "7"))


@pytest.mark.parametrize("v", ['""', "1", "true", "[]", '{"a":1}', '"' + "x" * 65 + '"'])
def test_a_version_that_is_not_a_short_string_is_a_bad_message(v: str) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode_client_frame(f'{{"action":"subscribe","body":{{"entity":"items","id":"7","v":{v}}},"ref":"r"}}')
    assert info.value.code == "bad_message" and info.value.ref == "r" and '"v"' in info.value.message


def test_raw_mode_sends_each_row_alone_and_nothing_for_gone() -> None:
    key = EntityKey("lists", "7")
    assert p.encode_result(key, '{"a":1}', envelope=False) == ['{"a":1}']
    assert p.encode_result(key, ['{"a":1}', '{"a":2}'], envelope=False) == ['{"a":1}', '{"a":2}']
    assert p.encode_result(key, [], envelope=False) == []
    assert p.encode_result(key, None, envelope=False) == []


def test_push_of_a_key_with_quotes_stays_valid_json() -> None:
    key = EntityKey("items", 'a"b\\c</script>')
    assert json.loads(p.encode_push(key, "null"))["key"]["id"] == 'a"b\\c</script>'


def test_bus_body_is_byte_compatible_with_the_go_library() -> None:
    assert p.encode_bus_body(EntityKey("items", 100)) == b'{"entity":"items","id":"100"}'
    assert p.decode_bus_body(b'{"entity":"items","id":"100"}') == EntityKey("items", "100")
    assert p.decode_bus_body(b'{"id":"1","entity":"items","extra":true}') == EntityKey("items", "1")


def test_resync_request_round_trips_and_names_an_entity() -> None:
    assert p.encode_bus_resync("items") == b'{"entity":"items","resync":true}'
    assert p.decode_bus_body(p.encode_bus_resync("items")) == p.ResyncRequest("items")


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b"[]", b'{"entity":"items"}', b'{"entity":"a b","id":"1"}',
                                  b'{"resync":true}', b'{"entity":"a b","resync":true}', b"[" * 100_000])
def test_bad_bus_bodies_raise(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode_bus_body(body)
    assert info.value.code == "bad_message"


def _same_reading(body: bytes, key: EntityKey) -> None:
    """``decode_key_body(body, key)`` reads ``body`` exactly as ``decode_bus_body`` does, or raises as it does."""
    try:
        want: Any = p.decode_bus_body(body)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError) as info:
            p.decode_key_body(body, key)
        assert info.value.code == exc.code
        return
    got = p.decode_key_body(body, key)
    assert (type(got), got, getattr(got, "notified_at", None)) == (type(want), want, getattr(want, "notified_at", None))


KEY_BODIES = [
    b'{"entity":"items","id":"100"}', b'{"entity":"items","id":"100","t":1732912345.123}',
    b'{"entity":"items","id":"100","t":17}', b'{"entity":"items","id":"100","t":-0.5e3}',
    b'{"entity":"items","id":"100","t":1E+2}', b'{"entity":"items","id":"100","t":1_0}',
    b'{"entity":"items","id":"100","t":01}', b'{"entity":"items","id":"100","t":1.}',
    b'{"entity":"items","id":"100","t":1e999}', b'{"entity":"items","id":"100","t":NaN}',
    b'{"entity":"items","id":"100","t":Infinity}', b'{"entity":"items","id":"100","t":"1"}',
    b'{"entity":"items","id":"100","t":true}', b'{"entity":"items","id":"100","t":}',
    b'{"entity":"items","id":"100","t":5}}', b'{"entity":"items","id":"100","t":5,"x":1}',
    b'{"entity":"items","id":"100","t": 5}', b'{"entity":"items","id":"1000"}', b'{"entity":"items","id":"101"}',
    b'{"entity":"items","id":"100" }', b'{"id":"100","entity":"items"}', b'{"entity":"items","resync":true}',
    b'{"entity":"items","id":"100"', b"", b"\xff",
]


@pytest.mark.parametrize("body", KEY_BODIES)
def test_a_body_on_a_key_channel_is_read_as_the_json_parse_reads_it(body: bytes) -> None:
    _same_reading(body, EntityKey("items", "100"))


def test_the_bodies_a_publisher_writes_for_a_key_are_read_without_a_json_parse(monkeypatch: Any) -> None:
    key = EntityKey("items", "100")
    stamped = NotifiedKey.stamp(key, 1732912345.123)

    def no_parse(body: Any) -> Any:
        raise AssertionError("parsed")

    monkeypatch.setattr(p, "decode_bus_body", no_parse)
    assert p.decode_key_body(p.encode_bus_body(key), key) == key
    got = p.decode_key_body(p.encode_bus_body(stamped), key)
    assert isinstance(got, NotifiedKey) and got.notified_at == 1732912345.123


@pytest.mark.parametrize("id", ["100", "a b", 'say "hi"', "back\\slash", "ünïcødé ✓", "😀", "x" * 200, "'", "/"])
@pytest.mark.parametrize("entity", ["items", "a.b-c_D9"])
def test_a_key_is_encoded_exactly_as_the_json_encoder_would(entity: str, id: str) -> None:
    key = EntityKey(entity, id)
    text = p.encode_key(key)
    assert text == json.dumps({"entity": entity, "id": id}, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(text) == {"entity": entity, "id": id}
