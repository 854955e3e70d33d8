"""The Redis bus on a real Redis Cluster (``redis+cluster://``): sharded pub/sub, failover, restarts.

The cluster is six real ``redis-server --cluster-enabled yes`` processes
(three masters, a replica each) joined by ``redis-cli --cluster create``
(``tests/support/redis_cluster.py``). The bus-level tests run buses in this
process; the others run real ``gunicorn -k gevent`` and ``flask run`` servers
with real websocket clients on it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import pytest

from entitysync_sync import ConfigError, EntityKey, Publisher
from entitysync_sync.bus import bus_from_url
from entitysync_sync.bus.redis_cluster import RedisClusterBus, key_slot
from tests.support.clients import Client
from tests.support.ports import free_port
from tests.support.pushes import converge, seed, subscribed, until_pushed
from tests.support.redis_cluster import RedisClusterNodes, command
from tests.support.servers import Server
from tests.support.sinks import RecordingSink
from tests.support.waiting import wait_for


@pytest.fixture
def buses(redis_cluster: RedisClusterNodes) -> Iterator[Callable[..., tuple[RedisClusterBus, RecordingSink]]]:
    """Start cluster buses with ``buses(prefix, query=...)``; all are closed after the test."""
    started: list[RedisClusterBus] = []

    def start(prefix: str, query: str = "unsubscribe_delay=0") -> tuple[RedisClusterBus, RecordingSink]:
        bus = bus_from_url(redis_cluster.url(query=query), topic_prefix=prefix)
        assert isinstance(bus, RedisClusterBus)
        sink = RecordingSink()
        started.append(bus)
        bus.start(sink, ["items"])
        wait_for(lambda: bus.stats().get("connects", 0) >= 1, message="the entity channel")
        return bus, sink

    yield start
    for bus in started:
        bus.close()


def keys_by_master(cluster: RedisClusterNodes, prefix: str, ids: list[str]) -> dict[int, list[str]]:
    by_master: dict[int, list[str]] = {}
    for id in ids:
        port = cluster.master_of_slot(key_slot(f"{prefix}items:{id}".encode()))
        by_master.setdefault(port, []).append(id)
    return by_master


def test_keys_spread_over_every_shard_and_reach_only_the_bus_watching_them(
        buses: Any, redis_cluster: RedisClusterNodes, uid: str) -> None:
    a, sink_a = buses(uid)
    b, sink_b = buses(uid)
    mine = [EntityKey("items", f"a{n}") for n in range(300)]
    theirs = [EntityKey("items", f"b{n}") for n in range(300)]
    for key in mine:
        a.watch(key)
    for key in theirs:
        b.watch(key)
    wait_for(lambda: len(sink_a.keys) == 300 and len(sink_b.keys) == 300, message="every key channel confirmed")
    assert a.stats()["nodes"] == 3  # a connection to each master
    assert key_slot(b"foo") == 12182 and key_slot(b"{user1000}.following") == key_slot(b"user1000")  # as Redis
    shares = keys_by_master(redis_cluster, uid, [key.id for key in mine])
    assert len(shares) == 3 and min(len(ids) for ids in shares.values()) >= 60  # ~100 each
    for port, ids in shares.items():  # each shard holds its keys' channels: SSUBSCRIBEd where they live
        assert command(port, "PUBSUB", "SHARDNUMSUB", f"{uid}items:{ids[0]}").split()[1] == "1"
    with Publisher(redis_cluster.url(), topic_prefix=uid) as publisher:  # publishes only: no subscriptions
        for key in [theirs[0], *mine[:30], theirs[1]]:
            publisher.notify(key.entity, key.id)
        publisher.flush()
    wait_for(lambda: len(sink_a.keys) == 330 and len(sink_b.keys) == 302, message="the published keys")
    assert set(sink_a.keys[300:]) == set(mine[:30])
    assert set(sink_b.keys[300:]) == {theirs[0], theirs[1]}
    assert a.stats()["received"] == 30
    # unwatched keys leave their shards
    for key in mine:
        a.unwatch(key)
    wait_for(lambda: redis_cluster.shard_numsub(f"{uid}items:a7") == 0, message="the key channel unsubscribed")
    assert redis_cluster.shard_numsub(f"{uid}items:b7") == 1


def test_a_foreign_publish_and_a_resync_request_on_the_entity_channel_reach_the_bus(
        buses: Any, redis_cluster: RedisClusterNodes, uid: str) -> None:
    bus, sink = buses(uid)
    for port in list(redis_cluster.masters())[:2]:  # classic PUBLISH on any node reaches every node
        redis_cluster.publish(f"{uid}items", f'{{"entity":"items","id":"on{port}"}}'.encode(), port=port)
    wait_for(lambda: len(sink.keys) == 2, message="the foreign publishes")
    bus.publish_entities(["items"])
    wait_for(lambda: "items" in sink.resyncs[1:], message="the resync request")
    # flask entitysync stats: the servers subscribed to an entity channel, counted over every master
    probe = RedisClusterBus.probe(redis_cluster.url(), [f"{uid}items", f"{uid}other"], timeout=5)
    assert probe["reachable"] is True
    assert probe["subscribers"] == {f"{uid}items": 1, f"{uid}other": 0}


def test_entity_routing_publishes_on_the_entity_channel(buses: Any, redis_cluster: RedisClusterNodes,
                                                        uid: str) -> None:
    receiver, sink = buses(uid, query="routing=entity")
    assert receiver.key_interest is None
    publisher, _ = buses(uid, query="routing=entity")
    publisher.publish([EntityKey("items", "e1")])
    wait_for(lambda: sink.keys == [EntityKey("items", "e1")], message="the key on the entity channel")
    assert receiver.stats()["nodes"] == 1  # the entity channel only, on one master


@pytest.mark.parametrize("url, message", [
    ("redis+cluster://:hunter2@/", "name at least one node"),
    ("redis+cluster://:hunter2@127.0.0.1:7000,127.0.0.1:x/", "'127.0.0.1:x' is not host:port"),
    ("redis+cluster://:hunter2@127.0.0.1:7000/1", "has only database 0"),
    ("redis+cluster://:hunter2@127.0.0.1:7000/?db=1", "unknown option db"),
    ("redis+cluster://:hunter2@127.0.0.1:7000/?routing=shard", "routing must be one of entity, key"),
])
def test_bad_cluster_urls_are_config_errors_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        bus_from_url(url)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("case", ["unreachable", "wrong password"])
def test_an_unreachable_cluster_is_logged_and_retried_without_the_password(
        caplog: pytest.LogCaptureFixture, redis_cluster: RedisClusterNodes, uid: str, case: str) -> None:
    if case == "unreachable":
        url = f"redis+cluster://user:hunter2@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/"
    else:
        url = redis_cluster.url(password="hunter2").replace("://:", "://user:")
    bus = bus_from_url(url, topic_prefix=uid)
    sink = RecordingSink()
    with caplog.at_level(logging.INFO, logger="entitysync_sync"):
        bus.start(sink, ["items"])
        try:
            bus.publish([EntityKey("items", "1")])
            wait_for(lambda: bus.stats().get("publish_failures", 0) >= 2, message="publish retries")
            wait_for(lambda: "cannot read the slot map" in caplog.text, message="the subscribing side's warning")
            assert bus.stats()["buffered"] == 1  # held for when the cluster is back
            assert "127.0.0.1" in caplog.text and "publishing to Redis Cluster at" in caplog.text
        finally:
            bus.close()
    assert "hunter2" not in caplog.text
    assert "hunter2" not in (bus.last_error or "") and "hunter2" not in bus.describe()


def test_servers_on_the_cluster_receive_only_the_keys_their_clients_hold(
        redis_cluster: RedisClusterNodes, cluster: Callable[..., Server], uid: str) -> None:
    url = redis_cluster.url(query="unsubscribe_delay=0")
    a = cluster("gunicorn", redis_cluster, url=url)
    b = cluster("flask", redis_cluster, url=url)
    # one id per shard for each server
    ids = [f"{uid}-{n}" for n in range(40)]
    shards = keys_by_master(redis_cluster, uid + "_", ids)
    on_a_ids = [group[0] for group in shards.values()]
    on_b_ids = [group[1] for group in shards.values()]
    for id in on_a_ids + on_b_ids:
        seed(a, id, "v0")
    on_a, on_b = Client(a.ws_url), Client(b.ws_url)
    try:
        for client, server, held in ((on_a, a, on_a_ids), (on_b, b, on_b_ids)):
            for id in held:
                subscribed(client, server, "items", id, "v0")
            wait_for(lambda s=server: s.stats()["bus"].get("key_subscribes") == 3, message="the key channels")
        received_b = b.stats()["bus"].get("received", 0)
        for id in on_a_ids:  # held on a only, on all three shards
            b.set("items", id, "from-b")
        converge(on_a, dict.fromkeys(on_a_ids, "from-b"))  # pushes of different keys come in any order
        for id in on_b_ids:
            a.set("items", id, "from-a")
        converge(on_b, dict.fromkeys(on_b_ids, "from-a"))
        assert b.stats()["bus"]["received"] == received_b + 3  # its own keys, none of a's
        assert a.stats()["bus"]["nodes"] == 3
        # a program's classic PUBLISH on the entity channel reaches the servers too
        seed(a, on_a_ids[0], "written-elsewhere")
        redis_cluster.publish(uid + "_items", f'{{"entity":"items","id":"{on_a_ids[0]}"}}'.encode())
        until_pushed(on_a, "items", on_a_ids[0], "written-elsewhere")
    finally:
        on_a.close()
        on_b.close()


def _shard_servers(redis_cluster: RedisClusterNodes, cluster: Callable[..., Server], uid: str,
                   kinds: tuple[str, ...] = ("gunicorn", "flask"),
                   query: str = "") -> tuple[list[Server], dict[int, str], list[Client]]:
    """Servers of ``kinds`` on the cluster (URL options ``query`` besides ``unsubscribe_delay=0``),
    and a client of each holding one key per shard."""
    redis_cluster.wait_healthy()  # replicas in sync: a test may kill a master
    url = redis_cluster.url(query="&".join(filter(None, ("unsubscribe_delay=0", query))))
    servers = [cluster(kind, redis_cluster, url=url) for kind in kinds]
    shards = keys_by_master(redis_cluster, uid + "_", [f"{uid}-{n}" for n in range(30)])
    by_master = {port: ids[0] for port, ids in shards.items()}
    for id in by_master.values():
        seed(servers[0], id, "v0")
    clients = [Client(server.ws_url) for server in servers]
    for client, server in zip(clients, servers, strict=True):
        for id in by_master.values():
            subscribed(client, server, "items", id, "v0")
        wait_for(lambda s=server: s.stats()["bus"].get("key_subscribes") == 3, message="the key channels")
    return servers, by_master, clients


def test_a_master_restarting_every_client_converges(redis_cluster: RedisClusterNodes,
                                                     cluster: Callable[..., Server], uid: str) -> None:
    servers, by_master, clients = _shard_servers(redis_cluster, cluster, uid)
    a = servers[0]
    port, lost = next(iter(by_master.items()))
    try:
        redis_cluster.kill(port)
        seed(a, lost, "while-down")  # written unnoticed: only a refresh after the resubscription shows it
        for id in by_master.values():
            if id != lost:
                a.set("items", id, "while-down")
        redis_cluster.start(port)
        redis_cluster.wait_healthy()
        for client in clients:
            converge(client, dict.fromkeys(by_master.values(), "while-down"))
        for server in servers:
            assert server.stats()["bus"].get("node_failures", 0) >= 1
        servers[1].set("items", lost, "after")
        for client in clients:
            until_pushed(client, "items", lost, "after")
    finally:
        for client in clients:
            client.close()
        if port not in redis_cluster.procs:
            redis_cluster.start(port)
        redis_cluster.wait_healthy()


@pytest.mark.parametrize("how, kind", [("cluster-failover", "gunicorn"), ("master-killed", "flask")])
def test_a_shard_failing_over_to_its_replica_every_client_converges(redis_cluster: RedisClusterNodes,
                                                                     cluster: Callable[..., Server],
                                                                     uid: str, how: str, kind: str) -> None:
    servers, by_master, clients = _shard_servers(redis_cluster, cluster, uid, kinds=(kind,))
    a = servers[0]
    port, moved = next(iter(by_master.items()))
    replica = redis_cluster.replica_of(port)
    try:
        seed(a, moved, "before-failover")  # unnoticed: the refresh once the channel moves shows it
        if how == "cluster-failover":  # the master hands its slots over and ends their subscriptions
            redis_cluster.failover(replica)
        else:  # the replica takes over once the others count the master as failed
            redis_cluster.kill(port)
            wait_for(lambda: replica in redis_cluster.masters(), timeout=20, message="the replica promoted")
        for client in clients:
            until_pushed(client, "items", moved, "before-failover", timeout=30)
        counter = "shard_channels_moved" if how == "cluster-failover" else "node_failures"
        for server in servers:
            assert server.stats()["bus"].get(counter, 0) >= 1
        servers[0].set("items", moved, "after-failover")  # published to the new master
        for client in clients:
            until_pushed(client, "items", moved, "after-failover")
    finally:
        for client in clients:
            client.close()
        if port not in redis_cluster.procs:
            redis_cluster.start(port)  # back as a replica of the promoted one
        redis_cluster.wait_healthy()


def test_a_worker_stalled_past_the_ping_deadline_keeps_its_shard_subscriptions(redis_cluster: RedisClusterNodes,
                                                                                cluster: Callable[..., Server],
                                                                                uid: str) -> None:
    """As on one Redis: a worker stopped for longer than its PING deadline keeps the connection
    to every master, those with notifications waiting in their sockets and the idle ones."""
    # Nothing read for 1.5 s after a PING: dead.
    servers, by_master, clients = _shard_servers(redis_cluster, cluster, uid, kinds=("flask", "gunicorn"),
                                                 query="health_check_interval=0.25")
    a, b = servers
    moved = next(iter(by_master.values()))
    try:
        assert a.stats()["bus"]["nodes"] == 3
        before = a.stats()["bus"]
        with a.stalled(2.0):
            b.set("items", moved, "while-stalled")  # one master has a message waiting, two are idle
        until_pushed(clients[0], "items", moved, "while-stalled")
        after = a.stats()["bus"]
        counts = ("node_failures", "reconnects")
        assert [after.get(name, 0) for name in counts] == [before.get(name, 0) for name in counts]
        assert "lost the subscriptions" not in a.log()
    finally:
        for client in clients:
            client.close()
