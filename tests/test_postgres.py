"""PostgreSQL on the machine's server: the ``postgresql://`` bus, triggers for every writer,
in-transaction notifications from ``es.watch``, and ``ENTITYSYNC_PG_LISTEN_URL`` beside Redis.

The servers are real ``gunicorn -k gevent`` and threaded ``flask run`` processes
fetching rows from a table in a schema of the module's own; the writers are
psycopg and the psql binary, as any other program would be.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from flask import Flask

from entitysync_sync import ConfigError, EntityKey, EntitySync, InvalidKeyError
from entitysync_sync.bus import bus_from_url
from entitysync_sync.bus.postgres import channel_name
from entitysync_sync.postgres import drop_trigger_sql, trigger_sql
from entitysync_sync.settings import load_settings
from tests.support.brokers import PgBroker, PgSchema, make_broker
from tests.support.clients import Client
from tests.support.ports import free_port
from tests.support.pushes import seed, subscribed, until_pushed
from tests.support.servers import ROOT, Server, stop_all
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import wait_for


@pytest.fixture
def pg() -> PgBroker:
    return PgBroker()


class Sink:
    """What a bus delivers to, recorded, for the in-process tests."""

    def __init__(self) -> None:
        self.keys: list[EntityKey] = []
        self.resyncs: list[str | None] = []

    def deliver(self, keys: Any) -> None:
        self.keys.extend(keys)

    def resync(self, entity: str | None = None) -> None:
        self.resyncs.append(entity)


@pytest.fixture
def listening(pg: PgBroker) -> Iterator[Callable[..., tuple[Any, Sink]]]:
    """Start an in-process PostgresBus on ``entities`` with ``prefix``; closed after the test."""
    buses = []

    def start(entities: list[str], prefix: str = "") -> tuple[Any, Sink]:
        bus = bus_from_url(pg.url(), topic_prefix=prefix)
        sink = Sink()
        bus.start(sink, entities)
        buses.append(bus)
        wait_for(lambda: bus.stats().get("connects", 0) >= len(entities), message="LISTEN")
        return bus, sink

    yield start
    for bus in buses:
        bus.close()
        assert bus.running == 0


@pytest.fixture
def scratch(pg: PgBroker) -> Iterator[PgSchema]:
    schema = PgSchema(pg)
    yield schema
    schema.close()


# -- names, settings and bad input ----------------------------------------------------


def test_channel_names_fit_in_63_bytes_and_never_collide() -> None:
    assert channel_name("", "items") == "items"
    assert channel_name("shop_", "Items.v2") == "shop_Items.v2"
    fits = "p" * 12 + "e" * 50
    assert channel_name("", fits) == fits  # 62 bytes: kept as it is
    long_names = {channel_name("a" * 40, f"{'e' * 20}{n:04d}") for n in range(2000)}  # 64 characters each
    assert len(long_names) == 2000
    assert all(len(name.encode()) == 63 and "#" in name for name in long_names)
    assert channel_name("a" * 40, "e" * 23) != channel_name("a" * 39, "e" * 24)  # same text, other split: one topic
    with pytest.raises(ConfigError, match="longer than 64"):
        channel_name("a" * 40, "e" * 25)
    # Triggers and servers share the one function.
    prefix, entity = "a" * 40, "e" * 24
    assert f"pg_notify('{channel_name(prefix, entity)}'" in trigger_sql(entity, "t", topic_prefix=prefix)


def test_a_missing_psycopg_is_a_config_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    for make in (lambda: bus_from_url("postgresql://127.0.0.1/test"), lambda: trigger_sql("items", "items")):
        with pytest.raises(ConfigError, match=r"pip install 'entitysync_sync\[postgres\]'"):
            make()


def test_the_listen_url_is_checked_and_its_password_never_repeated() -> None:
    for bad in (5, "redis://127.0.0.1:6379/0", "postgresql://u:pw-secret@127.0.0.1:notaport/db"):
        with pytest.raises(ConfigError, match="ENTITYSYNC_PG_LISTEN_URL") as caught:
            load_settings({"ENTITYSYNC_PG_LISTEN_URL": bad})
        assert "pw-secret" not in str(caught.value)
    with pytest.raises(ConfigError, match="already listens"):
        load_settings({"ENTITYSYNC_BUS_URL": "postgresql:///a", "ENTITYSYNC_PG_LISTEN_URL": "postgresql:///b"})
    assert load_settings({"ENTITYSYNC_BUS_URL": "postgresql:///a",
                          "ENTITYSYNC_PG_LISTEN_URL": "postgresql:///a"}).pg_listen_url is None
    assert load_settings({"ENTITYSYNC_PG_LISTEN_URL": "postgres://h/db"}).pg_listen_url == "postgres://h/db"
    with pytest.raises(ConfigError, match="ENTITYSYNC_BUS_URL") as caught:
        bus_from_url("postgresql://u:pw-secret@127.0.0.1:notaport/db")
    assert "pw-secret" not in str(caught.value)


def test_trigger_sql_refuses_bad_names() -> None:
    for table in ("", "a.b.c", "x\x00y", "a." + "t" * 64):
        with pytest.raises(ConfigError, match="table"):
            trigger_sql("items", table)
    with pytest.raises(ConfigError, match="id_column"):
        trigger_sql("items", "items", id_column="")
    with pytest.raises(InvalidKeyError):
        trigger_sql("no such!", "items")


def test_odd_names_are_quoted_never_interpolated(pg: PgBroker, scratch: PgSchema,
                                                 listening: Callable[..., tuple[Any, Sink]]) -> None:
    from psycopg import sql

    table, column = 'we"ird; DROP TABLE x; --', '$entitysync$ "i d"'
    pg.execute(sql.SQL("CREATE TABLE {} ({} text PRIMARY KEY)").format(
        sql.Identifier(scratch.name, table), sql.Identifier(column)))
    text = trigger_sql("Odd.name-1", f"{scratch.name}.{table}", id_column=column, topic_prefix="p_")
    assert table not in text.replace(table.replace('"', '""'), "")  # only ever inside a quoted identifier
    assert "$entitysync$;" not in text  # the body's quote uses a tag the column name does not hold
    pg.execute(text)
    pg.execute(text)  # idempotent
    _bus, sink = listening(["Odd.name-1"], prefix="p_")
    pg.execute(sql.SQL("INSERT INTO {} VALUES ('row-1')").format(sql.Identifier(scratch.name, table)))
    wait_for(lambda: EntityKey("Odd.name-1", "row-1") in sink.keys, message="the trigger's notification")
    pg.execute(drop_trigger_sql("Odd.name-1", f"{scratch.name}.{table}", id_column=column, topic_prefix="p_"))
    assert pg.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'entitysync_Odd%'") == [(0,)]


def test_an_entity_whose_channel_is_shortened_still_works(pg: PgBroker, scratch: PgSchema,
                                                          listening: Callable[..., tuple[Any, Sink]]) -> None:
    prefix = "p" * 59  # prefix + "items": 64 characters, past PostgreSQL's 63 bytes
    pg.execute(trigger_sql("items", scratch.table, topic_prefix=prefix))
    bus, sink = listening(["items"], prefix=prefix)
    assert bus.topic("items") == channel_name(prefix, "items") != prefix + "items"
    scratch.write("long-1", "v")
    bus.publish([EntityKey("items", "published-1")])
    wait_for(lambda: {EntityKey("items", "long-1"), EntityKey("items", "published-1")} <= set(sink.keys),
             message="the trigger's and the bus's notifications")


def test_identical_notifications_of_one_transaction_are_merged(pg: PgBroker, scratch: PgSchema,
                                                               listening: Callable[..., tuple[Any, Sink]]) -> None:
    bus, sink = listening(["items"], prefix=scratch.prefix)
    with pg.transaction() as conn:
        conn.execute(f"INSERT INTO {scratch.table} SELECT 'm-' || n, '0' FROM generate_series(1, 500) AS n")
        for n in range(20):  # every row written 21 times in one transaction
            conn.execute(f"UPDATE {scratch.table} SET value = %s", (str(n),))
    scratch.write("marker", "m")  # a later transaction: its key arrives after the others
    wait_for(lambda: EntityKey("items", "marker") in sink.keys, message="the marker")
    assert len(sink.keys) == 501 and len(set(sink.keys)) == 501
    assert bus.stats()["received"] == 501


# -- across two gunicorn servers and the threaded dev server ----------------------


def subscribe_everywhere(servers: dict[str, Server], entity: str, id: str) -> list[Client]:
    clients = []
    for server in servers.values():
        client = Client(server.ws_url)
        client.subscribe(entity, id)
        clients.append(client)
    return clients


def is_gone(entity: str, id: str) -> Callable[[Any], bool]:
    return lambda f: f.get("action") == "gone" and f["key"] == {"entity": entity, "id": id}


def test_psql_insert_update_delete_reach_subscribers_on_every_server(pg_cluster: dict[str, Server],
                                                                     pg_schema: PgSchema, uid: str) -> None:
    clients = subscribe_everywhere(pg_cluster, "items", uid)
    try:
        for client in clients:
            client.expect(is_gone("items", uid))
        pg_schema.pg.psql(f"""INSERT INTO {pg_schema.table} VALUES ('{uid}', '"inserted"')""")
        for client in clients:
            until_pushed(client, "items", uid, "inserted")
        pg_schema.pg.psql(f"""UPDATE {pg_schema.table} SET value = '"updated"' WHERE id = '{uid}'""")
        for client in clients:
            until_pushed(client, "items", uid, "updated")
        pg_schema.pg.psql(f"DELETE FROM {pg_schema.table} WHERE id = '{uid}'")
        for client in clients:
            client.expect(is_gone("items", uid))
    finally:
        for client in clients:
            client.close()


def test_a_rolled_back_change_sends_nothing(pg_cluster: dict[str, Server], pg_schema: PgSchema, uid: str) -> None:
    marker = uid + "-marker"
    pg_schema.write(uid, "v0", quiet=True)
    pg_schema.write(marker, "m0", quiet=True)
    clients = [subscribed(subscribed(Client(s.ws_url), s, "items", uid, "v0"), s, "items", marker, "m0")
               for s in pg_cluster.values()]
    try:
        with pg_schema.pg.transaction() as conn:
            conn.execute(f"UPDATE {pg_schema.table} SET value = '\"rolled back\"' WHERE id = %s", (uid,))
            conn.rollback()
        pg_schema.write(marker, "m1")  # committed after the rollback: notified after anything it sent
        for client in clients:
            seen: list[Any] = []
            client.expect(lambda f, seen=seen: seen.append(f) or (
                f.get("action") == "push" and f["key"]["id"] == marker and f["body"]["value"] == "m1"))
            assert [f for f in seen if f.get("key", {}).get("id") == uid] == []
    finally:
        for client in clients:
            client.close()


def test_an_id_change_notifies_the_old_and_the_new_key(pg_cluster: dict[str, Server], pg_schema: PgSchema,
                                                       uid: str) -> None:
    old, new = uid + "-old", uid + "-new"
    pg_schema.write(old, "v", quiet=True)
    clients = []
    try:
        for server in pg_cluster.values():
            client = subscribed(Client(server.ws_url), server, "items", old, "v")
            clients.append(client)
            client.subscribe("items", new)
            client.expect(is_gone("items", new))
        pg_schema.pg.execute(f"UPDATE {pg_schema.table} SET id = %s WHERE id = %s", (new, old))
        # The two keys' refreshes may reach a client in either order, and expect() passes over
        # frames that do not match: wait for both in one read.
        for client in clients:
            answers: dict[str, Any] = {}
            while len(answers) < 2:
                frame = client.expect(lambda f: is_gone("items", old)(f) or (
                    f.get("action") == "push" and f["key"] == {"entity": "items", "id": new}
                    and f["body"].get("value") == "v"), timeout=15)
                answers[frame["action"]] = frame
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("name", ["gunicorn-a", "flask"])
def test_a_terminated_listening_connection_converges_within_5_seconds(pg_cluster: dict[str, Server],
                                                                      pg_schema: PgSchema, uid: str,
                                                                      name: str) -> None:
    server = pg_cluster[name]
    pg_schema.write(uid, "v0", quiet=True)
    client = subscribed(Client(server.ws_url), server, "items", uid, "v0")
    try:
        reconnects = server.stats()["bus"].get("reconnects", 0)
        # A change whose notification this server cannot hear: only its resync can show it.
        pg_schema.write(uid, "changed meanwhile", quiet=True)
        assert pg_schema.pg.terminate_listener(server.stats()["pid"]) == 1
        started = time.monotonic()
        until_pushed(client, "items", uid, "changed meanwhile", timeout=5)
        assert time.monotonic() - started < 5
        assert server.stats()["bus"]["reconnects"] > reconnects
        assert "lost the LISTEN connection" in server.log()
    finally:
        client.close()


def test_a_foreign_notify_of_the_go_body_is_delivered(pg_cluster: dict[str, Server], pg_schema: PgSchema,
                                                      uid: str) -> None:
    pg_schema.write(uid, "v0", quiet=True)
    clients = [subscribed(Client(s.ws_url), s, "items", uid, "v0") for s in pg_cluster.values()]
    try:
        pg_schema.write(uid, "written elsewhere", quiet=True)
        channel = channel_name(pg_schema.prefix, "items")
        pg_schema.pg.psql(f"""NOTIFY "{channel}", '{{"entity":"items","id":"{uid}"}}'""")
        for client in clients:
            until_pushed(client, "items", uid, "written elsewhere")
    finally:
        for client in clients:
            client.close()


def test_malformed_notifies_are_counted_and_logged(pg_cluster: dict[str, Server], pg_schema: PgSchema,
                                                   uid: str) -> None:
    server = pg_cluster["flask"]
    pg_schema.write(uid, "v0", quiet=True)
    client = subscribed(Client(server.ws_url), server, "items", uid, "v0")
    garbage = ["not json", "[1,2]", '{"entity":"items"}', '{"entity":"no such!","id":"1"}',
               '{"entity":"items","id":""}', f"{uid}-" + "{" * 5000]
    channel = channel_name(pg_schema.prefix, "items")
    try:
        before = {name: s.stats()["bus"] for name, s in pg_cluster.items()}
        for body in garbage:
            pg_schema.pg.publish_raw(channel, body.encode())
        pg_schema.write(uid, "after")
        until_pushed(client, "items", uid, "after")
        for name, other in pg_cluster.items():
            stats = wait_for(lambda other=other, name=name: (
                (s := other.stats()["bus"]).get("malformed", 0) - before[name].get("malformed", 0) == len(garbage)
                and s), message="every malformed notification to be counted")
            assert stats["received"] - before[name]["received"] >= 1
        assert repr(garbage[-1].encode()[:64]) in server.log()  # the first 64 bytes are logged...
        assert garbage[-1][:65] not in server.log()  # ...and only those
    finally:
        client.close()


def test_a_notify_from_a_view_reaches_every_server(pg_cluster: dict[str, Server], pg_schema: PgSchema,
                                                   uid: str) -> None:
    pg_schema.write(uid, "v0", quiet=True)
    clients = [subscribed(Client(s.ws_url), s, "items", uid, "v0") for s in pg_cluster.values()]
    try:
        for name, server in pg_cluster.items():
            server.set_quietly("items", uid, f"via {name}")  # the trigger notifies
            for client in clients:
                until_pushed(client, "items", uid, f"via {name}")
        published = pg_cluster["gunicorn-b"].stats()["bus"].get("sent", 0)
        pg_cluster["gunicorn-b"].post(f"/_t/burst/items/{uid}?n=3")  # es.notify, through the bus
        for client in clients:
            until_pushed(client, "items", uid, 2)
        assert pg_cluster["gunicorn-b"].stats()["bus"]["sent"] > published
    finally:
        for client in clients:
            client.close()


def test_the_gevent_worker_keeps_serving_while_the_listener_waits(pg_cluster: dict[str, Server],
                                                                  uid: str) -> None:
    server = pg_cluster["gunicorn-a"]
    client = Client(server.ws_url)
    try:
        before = server.stats()["bus"]
        # The listener waits in psycopg for a second at a time. Were that wait blocking the worker,
        # round trips made back to back for 3 s would stall behind it, one of them for about a second.
        took = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            n = len(took)
            started = time.monotonic()
            client.subscribe("items", f"{uid}-{n}")
            client.expect(is_gone("items", f"{uid}-{n}"))
            took.append(time.monotonic() - started)
        assert len(took) > 10 and max(took) < 0.6, sorted(took)[-5:]
        after = server.stats()["bus"]
        assert after["connects"] == before["connects"]  # the same listening connection throughout
    finally:
        client.close()


# -- outages, a second bus, es.watch, secrets --------------------------------------


def test_a_database_outage_is_held_and_recovered_without_a_restart(pg: PgBroker, cluster: Callable[..., Server],
                                                                   uid: str) -> None:
    proxy = TcpProxy(pg.port)
    try:
        a = cluster("gunicorn", pg, url=pg.url(proxy.port))  # A reaches PostgreSQL through the proxy
        b = cluster("flask", pg)
        seed(a, uid, "v0")
        on_a = subscribed(Client(a.ws_url), a, "items", uid, "v0")
        on_b = subscribed(Client(b.ws_url), b, "items", uid, "v0")
        proxy.cut()
        a.set("items", uid, "while-down")
        wait_for(lambda: (s := a.stats()["bus"]).get("publish_failures", 0) >= 1 and s["buffered"] == 1,
                 message="A to hold the notification")
        assert "publishing to PostgreSQL" in a.log()
        on_b.assert_silent(within=0.5)
        proxy.restore()
        until_pushed(on_b, "items", uid, "while-down", timeout=30)
        until_pushed(on_a, "items", uid, "while-down", timeout=30)
        wait_for(lambda: a.stats()["bus"]["buffered"] == 0 and a.stats()["bus"].get("reconnects", 0) >= 1,
                 message="A to publish and listen again")
        b.set("items", uid, "after")  # A hears from PostgreSQL again
        until_pushed(on_a, "items", uid, "after")
    finally:
        proxy.close()


def test_beside_redis_the_listen_url_brings_trigger_notifications_to_every_server(
        pg_schema: PgSchema, cluster: Callable[..., Server], uid: str) -> None:
    redis = make_broker("redis")
    config = {"prefix": pg_schema.prefix, "env": pg_schema.server_env(),
              "ENTITYSYNC_PG_LISTEN_URL": pg_schema.pg.url()}
    a = cluster("gunicorn", redis, **config)
    b = cluster("flask", redis, **config)
    pg_schema.write(uid, "v0", quiet=True)
    clients = [subscribed(Client(s.ws_url), s, "items", uid, "v0") for s in (a, b)]
    try:
        pg_schema.pg.psql(f"""UPDATE {pg_schema.table} SET value = '"by trigger"' WHERE id = '{uid}'""")
        for client in clients:
            until_pushed(client, "items", uid, "by trigger")
        for server in (a, b):
            stats = server.stats()
            assert stats["pg_listen"]["received"] >= 1
        a.set_quietly("items", uid, "quiet")
        a.post(f"/_t/burst/items/{uid}?n=1")  # through Redis as ever
        for client in clients:
            until_pushed(client, "items", uid, 0)
        wait_for(lambda: b.stats()["bus"].get("received", 0) >= 1, message="the notify through Redis")
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def orm_schema(pg: PgBroker) -> Iterator[str]:
    name = "es_orm_" + secrets.token_hex(5)
    pg.execute(f"CREATE SCHEMA {name}")
    yield name
    pg.execute(f"DROP SCHEMA {name} CASCADE")


def test_es_watch_notifies_inside_the_transaction(pg: PgBroker, orm_schema: str) -> None:
    config = {
        "SQLALCHEMY_DATABASE_URI": pg.url().replace("postgresql://", "postgresql+psycopg://", 1),
        "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"options": f"-csearch_path={orm_schema}"}},
        "ENTITYSYNC_BUS_URL": pg.url(), "ENTITYSYNC_TOPIC_PREFIX": orm_schema + "_",
    }
    started = []
    try:
        for kind in ("gunicorn", "flask"):  # one at a time: the app creates its table as it starts
            server = Server(kind, config, app="tests.orm_app:create_app()", ready_path="/items")
            started.append(server)
            wait_for(lambda server=server: server.get("/_t/bus-ready")["ready"], message="LISTEN")
        writer, reader = started
        client = Client(reader.ws_url)
        client.subscribe("items", "1")
        client.expect(is_gone("items", "1"))
        client.subscribe("items", "2")
        client.expect(is_gone("items", "2"))
        writer.post("/items/1", {"name": "committed"})
        client.expect_push("items", "1", lambda body: body["name"] == "committed")
        writer.post("/items/1/rolled-back", {"name": "rolled back"})
        writer.post("/items/2", {"name": "marker"})
        seen: list[Any] = []
        client.expect(lambda f: seen.append(f) or (f.get("action") == "push" and f["key"]["id"] == "2"))
        assert [f for f in seen if f.get("key", {}).get("id") == "1"] == []
        assert writer.get("/_t/bus-ready")["bus"].get("published", 0) == 0  # none went after the commit
        # A worker killed right after its commit: nothing waits in a buffer to be lost.
        with pytest.raises(OSError):
            writer.post("/items/1/commit-then-die", {"name": "survived"})
        client.expect_push("items", "1", lambda body: body["name"] == "survived")
        client.close()
    finally:
        stop_all(started)


def test_a_password_in_the_url_never_shows(pg: PgBroker) -> None:
    secret = "Pw-" + secrets.token_hex(8)
    reachable = pg.url().replace("://root@", f"://root:{secret}@", 1)
    unreachable = f"postgresql://root:{secret}@127.0.0.1:{free_port()}/test"
    debug = {"ENTITYSYNC_TEST_LOG_LEVEL": "DEBUG"}
    on_pg = Server("gunicorn", {"ENTITYSYNC_BUS_URL": reachable}, extra_env=debug)
    beside = Server("flask", {"ENTITYSYNC_BUS_URL": "memory://", "ENTITYSYNC_PG_LISTEN_URL": unreachable},
                    extra_env=debug)
    try:
        wait_for(lambda: on_pg.get("/_t/bus-ready")["ready"], message="LISTEN")
        on_pg.set("items", "1", "v")
        beside.get("/_t/bus-ready")
        wait_for(lambda: beside.stats()["pg_listen"].get("listen_failures", 0) >= 2, message="failed attempts")
        outputs = [on_pg.log(), beside.log(), json.dumps(on_pg.get("/_t/es-stats")),
                   json.dumps(beside.get("/_t/es-stats"))]
        assert "lost the LISTEN connection to PostgreSQL at postgresql://127.0.0.1:" in beside.log()
        cli: dict[tuple[str, str], str] = {}
        for name, config in (("bus", {"ENTITYSYNC_BUS_URL": reachable}),
                             ("listen", {"ENTITYSYNC_BUS_URL": "memory://", "ENTITYSYNC_PG_LISTEN_URL": unreachable})):
            env = dict(os.environ, PYTHONPATH=str(ROOT), **{f"FLASK_{k}": v for k, v in config.items()})
            for args in (["stats"], ["stats", "--json"], ["pg-trigger", "items", "--table", "t", "--install"]):
                result = subprocess.run([sys.executable, "-m", "flask", "--app", "tests.server_app:create_app",
                                         "entitysync", *args], cwd=ROOT, env=env, capture_output=True,
                                        text=True, timeout=60)
                cli[name, args[-1]] = result.stdout + result.stderr
        assert "PostgreSQL at postgresql://127.0.0.1" in cli["bus", "stats"]
        assert "pg listen:" in cli["listen", "stats"] and "NO" in cli["listen", "stats"]
        assert "failed" in cli["listen", "--install"]
        for output in [*outputs, *cli.values()]:
            assert secret not in output
    finally:
        on_pg.stop()
        beside.stop()


# -- flask entitysync pg-trigger ---------------------------------------------------


def make_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    es = EntitySync(app)
    es.entity("items")(lambda key, secret: None)
    return app


def test_the_pg_trigger_command_prints_and_installs(pg: PgBroker, scratch: PgSchema) -> None:
    app = make_app(ENTITYSYNC_BUS_URL=pg.url(), ENTITYSYNC_TOPIC_PREFIX="cli_")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["entitysync", "pg-trigger", "items", "--table", scratch.table])
    assert result.exit_code == 0, result.output
    assert result.output == trigger_sql("items", scratch.table, topic_prefix="cli_")
    result = runner.invoke(args=["entitysync", "pg-trigger", "items", "--table", scratch.table,
                                 "--id-column", "value", "--install"])
    assert result.exit_code == 0, result.output
    assert "channel 'cli_items'" in result.output
    listener = pg.psycopg.connect(pg.url(), autocommit=True)
    try:
        listener.execute('LISTEN "cli_items"')
        scratch.write("x", "by-value")
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert json.loads(payloads[0]) == {"entity": "items", "id": '"by-value"'}
    finally:
        listener.close()
    result = runner.invoke(args=["entitysync", "pg-trigger", "users", "--table", scratch.table])
    assert result.exit_code == 1 and "no entity 'users' is registered" in result.output
    result = runner.invoke(args=["entitysync", "pg-trigger", "items", "--table", "no_such_table_here", "--install"])
    assert result.exit_code == 1 and "no_such_table_here" in result.output
    result = make_app().test_cli_runner().invoke(
        args=["entitysync", "pg-trigger", "items", "--table", "t", "--install"])
    assert result.exit_code == 1 and "postgresql:// URL" in result.output


def test_closing_joins_the_listener_and_the_publisher(pg: PgBroker) -> None:
    bus = bus_from_url(pg.url())
    sink = Sink()
    bus.start(sink, ["items"])
    wait_for(lambda: bus.stats().get("connects") == 1, message="LISTEN")
    done = threading.Event()
    threading.Thread(target=lambda: (bus.close(), done.set()), daemon=True).start()
    assert done.wait(10)
    assert bus.running == 0
    assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                      (f"entitysync listen {os.getpid()}",)) == [(0,)]


# -- the demo on PostgreSQL --------------------------------------------------------


@pytest.mark.parametrize("kind", ["gunicorn", "flask"])
def test_the_demo_on_postgresql_shows_an_update_typed_in_psql(pg: PgBroker, kind: str) -> None:
    schema = "es_demo_" + secrets.token_hex(5)
    config = {"ENTITYSYNC_BUS_URL": pg.url(), "EXAMPLE_PG_SCHEMA": schema, "ENTITYSYNC_TOPIC_PREFIX": schema + "_"}
    server = Server(kind, config, app="example_flask:create_app()", ready_path="/")
    try:
        client = Client(server.ws_url)
        client.subscribe("items", "1")
        first, _owner = client.expect_push("items", "1")  # one push: the item and its owner
        assert first["name"] == "apples"
        pg.psql(f"UPDATE {schema}.items SET value = 'typed in psql' WHERE id = 1")
        rows = client.expect_push("items", "1", lambda rows: rows[0].get("value") == "typed in psql")
        assert rows[0]["name"] == "apples"
        server.post("/items/1", {"value": "from the page"})  # the view commits; the trigger notifies
        client.expect_push("items", "1", lambda rows: rows[0].get("value") == "from the page")
        pg.psql(f"DELETE FROM {schema}.items WHERE id = 1")
        client.expect(is_gone("items", "1"))
        client.close()
    finally:
        server.stop()
        pg.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
