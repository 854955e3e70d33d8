"""Key routing on Redis (``?routing=key``): a server receives only the keys its clients hold.

The bus-level tests run a :class:`RedisBus` in this process against the real
Redis and watch what it subscribes to with ``PUBSUB NUMSUB``; the others run
real servers on it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from entitysync_sync import ConfigError, EntityKey
from entitysync_sync.bus import bus_from_url
from entitysync_sync.bus.redis import RedisBus
from entitysync_sync.keys import NotifiedKey
from entitysync_sync.protocol import encode_bus_body
from tests.support.brokers import RedisBroker, make_broker
from tests.support.clients import Client
from tests.support.pushes import seed, subscribed, until_pushed
from tests.support.servers import Server
from tests.support.sinks import RecordingSink
from tests.support.waiting import wait_for


@pytest.fixture
def redis_broker() -> Iterator[RedisBroker]:
    broker = make_broker("redis")
    yield broker
    broker.close()


@pytest.fixture
def buses() -> Iterator[Callable[..., tuple[RedisBus, RecordingSink]]]:
    """Start key-routed buses with ``buses(prefix, **options)``; all are closed after the test."""
    started: list[RedisBus] = []

    def start(prefix: str, url: str = "redis://127.0.0.1:6379/0?routing=key&unsubscribe_delay=0",
              entities: tuple[str, ...] = ("items",)) -> tuple[RedisBus, RecordingSink]:
        bus = bus_from_url(url, topic_prefix=prefix)
        assert isinstance(bus, RedisBus)
        sink = RecordingSink()
        started.append(bus)
        bus.start(sink, list(entities))
        wait_for(lambda: bus.stats().get("connects", 0) >= len(entities), message="the entity channels")
        return bus, sink

    yield start
    for bus in started:
        bus.close()


def numsub(broker: RedisBroker, channel: str) -> int:
    import redis

    client = redis.Redis(port=broker.port)
    try:
        return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
    finally:
        client.close()


def test_a_bus_receives_only_the_keys_it_watches(buses: Any, uid: str) -> None:
    receiver, sink = buses(uid)
    publisher, _ = buses(uid)
    mine, other = EntityKey("items", "mine"), EntityKey("items", "other")
    receiver.watch(mine)
    wait_for(lambda: sink.keys == [mine], message="the refresh once the key channel is confirmed")
    publisher.publish([other, mine, other])
    wait_for(lambda: len(sink.keys) == 2, message="the published key")
    publisher.publish([EntityKey("items", "third")])
    assert publisher.flush(10)
    receiver.publish([mine])  # after the unwatched keys: once it arrives, they would have too
    wait_for(lambda: len(sink.keys) == 3, message="the second notification of the watched key")
    assert sink.keys == [mine, mine, mine]
    assert receiver.stats()["received"] == 2
    assert receiver.stats()["key_subscribes"] == 1


def test_key_channels_are_subscribed_in_batches_and_dropped_when_unwatched(
        buses: Any, redis_broker: RedisBroker, uid: str) -> None:
    bus, sink = buses(uid)
    keys = [EntityKey("items", str(n)) for n in range(2500)]
    for key in keys:
        bus.watch(key)
    wait_for(lambda: len(sink.keys) == len(keys), message="every key channel confirmed")
    assert set(sink.keys) == set(keys)
    # 2,500 keys watched at once: three SUBSCRIBE commands of at most 1,000 channels
    assert bus.stats()["key_subscribe_commands"] <= 4
    assert numsub(redis_broker, f"{uid}items:7") == 1
    for key in keys:
        bus.unwatch(key)
    wait_for(lambda: numsub(redis_broker, f"{uid}items:7") == 0, message="the key channel unsubscribed")
    assert bus.stats()["key_channels"] == 0
    assert numsub(redis_broker, f"{uid}items") == 1  # the entity channel stays


def test_a_key_unwatched_and_watched_again_within_the_delay_costs_no_subscribe(buses: Any, uid: str,
                                                                               redis_broker: RedisBroker) -> None:
    bus, sink = buses(uid, url="redis://127.0.0.1:6379/0?routing=key&unsubscribe_delay=60")
    key = EntityKey("items", "reload")
    bus.watch(key)
    wait_for(lambda: sink.keys == [key], message="the key channel confirmed")
    bus.unwatch(key)
    bus.watch(key)
    bus.unwatch(key)
    other = EntityKey("items", "later")
    bus.watch(other)  # the reader has seen the changes once this one is confirmed
    wait_for(lambda: other in sink.keys, message="a later key confirmed")
    assert bus.stats()["key_subscribes"] == 2
    assert numsub(redis_broker, f"{uid}items:reload") == 1  # kept for the delay


@pytest.mark.parametrize("routing", ["key", "entity"])
def test_a_foreign_publish_on_the_entity_channel_reaches_the_bus(buses: Any, redis_broker: RedisBroker,
                                                                 uid: str, routing: str) -> None:
    bus, sink = buses(uid, url=f"redis://127.0.0.1:6379/0?routing={routing}")
    assert (bus.key_interest is not None) == (routing == "key")
    redis_broker.publish_raw(f"{uid}items", b'{"entity":"items","id":"foreign"}')
    wait_for(lambda: sink.keys == [EntityKey("items", "foreign")], message="the foreign publish")
    redis_broker.publish_raw(f"{uid}items", b'{"entity":"items","resync":true}')
    wait_for(lambda: "items" in sink.resyncs[1:], message="the resync request")


def test_a_key_channel_reads_its_own_bodies_fast_and_any_other_body_as_before(
        buses: Any, redis_broker: RedisBroker, uid: str) -> None:
    """A key channel's publishers' bodies keep their notify time; another key's body, or a bad one,
    on that channel is read (or dropped) exactly as on an entity channel."""
    bus, sink = buses(uid)
    mine = EntityKey("items", "mine")
    bus.watch(mine)
    wait_for(lambda: sink.keys == [mine], message="the refresh once the key channel is confirmed")
    channel = bus.key_channel(mine)
    redis_broker.publish_raw(channel, encode_bus_body(NotifiedKey.stamp(mine, 1732912345.125)))
    redis_broker.publish_raw(channel, b'{"entity":"items","id":"other","t":7}')
    redis_broker.publish_raw(channel, b'{"entity":"items","id":"mine","t":1_0}')
    redis_broker.publish_raw(channel, b'{"entity":"items","id":"mine"}')
    wait_for(lambda: len(sink.keys) == 4, message="the three good bodies")
    stamped, other, plain = sink.keys[1:]
    assert isinstance(stamped, NotifiedKey) and (stamped, stamped.notified_at) == (mine, 1732912345.125)
    assert isinstance(other, NotifiedKey) and (other, other.notified_at) == (EntityKey("items", "other"), 7)
    assert plain == mine and not isinstance(plain, NotifiedKey)
    assert bus.stats()["malformed"] == 1


def test_key_channels_are_subscribed_again_and_refreshed_after_the_broker_restarts(buses: Any, uid: str) -> None:
    broker = RedisBroker(own=True)
    try:
        bus, sink = buses(uid, url=broker.url() + "?routing=key")
        key = EntityKey("items", "k")
        bus.watch(key)
        wait_for(lambda: sink.keys == [key], message="the key channel confirmed")
        broker.stop()
        broker.start()
        wait_for(lambda: sink.keys == [key, key], timeout=30, message="the key refreshed after the restart")
        assert numsub(broker, f"{uid}items:k") == 1
        broker.publish_raw(f"{uid}items:k", b'{"entity":"items","id":"k"}')
        wait_for(lambda: len(sink.keys) == 3, message="a notification after the restart")
    finally:
        broker.close()


@pytest.mark.parametrize("query, message", [
    ("routing=shard", "routing must be one of entity, key, got 'shard'"),
    ("routing=", "routing must be one of entity, key, got ''"),
    ("routing=key&unsubscribe_delay=soon", "unsubscribe_delay must be a number of seconds"),
    ("unsubscribe_delay=-1", "unsubscribe_delay must be 0 to 3600 seconds"),
])
def test_bad_routing_options_are_config_errors_without_credentials(query: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        bus_from_url(f"redis://user:hunter2@127.0.0.1:6379/0?{query}")
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


def test_options_for_redis_py_still_reach_it() -> None:
    bus = bus_from_url("redis://127.0.0.1:6379/0?routing=key&socket_timeout=7")
    assert isinstance(bus, RedisBus)
    assert bus.routing == "key"
    assert bus._client.connection_pool.connection_kwargs["socket_timeout"] == 7


@pytest.mark.parametrize("kind", ["gunicorn", "flask"])
def test_servers_on_key_routing_receive_only_what_their_clients_hold(
        redis_broker: RedisBroker, cluster: Callable[..., Server], uid: str, kind: str) -> None:
    url = redis_broker.url() + "?routing=key&unsubscribe_delay=0"
    a = cluster(kind, redis_broker, url=url)
    b = cluster("gunicorn", redis_broker, url=url)
    seed(a, uid, "v0")
    seed(a, uid + "x", "x0")
    on_a = subscribed(Client(a.ws_url), a, "items", uid, "v0")
    on_b = subscribed(Client(b.ws_url), b, "items", uid + "x", "x0")
    try:
        for server in (a, b):  # a key changed before its channel is confirmed is refreshed, not received
            wait_for(lambda s=server: s.stats()["bus"].get("key_subscribes") == 1, message="the key channel")
        received_b = b.stats()["bus"].get("received", 0)
        b.set("items", uid, "from-b")  # held on a only
        until_pushed(on_a, "items", uid, "from-b")
        a.set("items", uid + "x", "from-a")  # held on b only: b receives it after the first
        until_pushed(on_b, "items", uid + "x", "from-a")
        assert b.stats()["bus"]["received"] == received_b + 1
        assert a.stats()["bus"]["key_channels"] == 1
        # a foreign publish on the entity channel still reaches subscribers
        seed(a, uid, "written-elsewhere")
        redis_broker.publish_raw(uid + "_items", f'{{"entity":"items","id":"{uid}"}}'.encode())
        until_pushed(on_a, "items", uid, "written-elsewhere")
        on_a.unsubscribe("items", uid)
        wait_for(lambda: numsub(redis_broker, f"{uid}_items:{uid}") == 0, message="the key channel dropped")
    finally:
        on_a.close()
        on_b.close()


def test_the_hub_tells_its_interest_of_first_and_last_subscribers_only() -> None:
    from entitysync_sync.hub import Hub

    events: list[tuple[str, EntityKey]] = []

    class Interest:
        def watch(self, key: EntityKey) -> None:
            events.append(("watch", key))

        def unwatch(self, key: EntityKey) -> None:
            events.append(("unwatch", key))

    hub = Hub(interest=Interest())
    one, two = object(), object()
    a, b = EntityKey("items", "a"), EntityKey("items", "b")
    hub.add(one)  # type: ignore[arg-type]
    hub.add(two)  # type: ignore[arg-type]
    hub.subscribe(one, a)  # type: ignore[arg-type]
    hub.subscribe(two, a)  # type: ignore[arg-type]
    hub.subscribe(one, a)  # type: ignore[arg-type]
    hub.subscribe(two, b)  # type: ignore[arg-type]
    assert events == [("watch", a), ("watch", b)]
    hub.unsubscribe(one, a)  # type: ignore[arg-type]
    hub.unsubscribe(one, b)  # type: ignore[arg-type]  # not held by one: nothing changes
    assert events == [("watch", a), ("watch", b)]
    hub.remove(two, [a, b])  # type: ignore[arg-type]  # a disconnect
    assert events[2:] == [("unwatch", a), ("unwatch", b)]
    assert hub.key_count == 0


def test_a_publisher_on_key_routing_reaches_only_the_servers_watching_the_key(buses: Any, uid: str) -> None:
    from entitysync_sync import Publisher

    watching, sink = buses(uid)
    other, other_sink = buses(uid)
    key = EntityKey("items", "p")
    watching.watch(key)
    wait_for(lambda: sink.keys == [key], message="the key channel confirmed")
    with Publisher("redis://127.0.0.1:6379/0?routing=key", topic_prefix=uid) as publisher:
        publisher.notify("items", "p")
        publisher.notify("items", "nobody")
        publisher.flush()
    wait_for(lambda: len(sink.keys) == 2, message="the published key")
    other.watch(EntityKey("items", "later"))  # confirmed after the publishes reached Redis
    wait_for(lambda: other_sink.keys == [EntityKey("items", "later")], message="the other bus's own key")
    assert other.stats().get("received", 0) == 0
    assert watching.stats()["received"] == 1
