"""``flask entitysync notify`` and ``flask entitysync stats``: in-process, and as real
``flask`` commands reaching real servers through Redis and NSQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

from flask import Flask

from entitysync_sync import EntitySync
from tests.support.brokers import make_broker
from tests.support.clients import Client
from tests.support.ports import free_port
from tests.support.pushes import seed, subscribed, until_pushed
from tests.support.servers import ROOT, Server


def make_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    es = EntitySync(app)
    es.entity("items")(lambda key, secret: None)
    es.entity("users")(lambda key, secret: None)
    return app


def flask_cli(*args: str, **config: Any) -> subprocess.CompletedProcess[str]:
    """Run ``flask --app tests.server_app:create_app ARGS`` as a user would, configured from the environment."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update({f"FLASK_{key}": json.dumps(value) for key, value in config.items()})
    return subprocess.run([sys.executable, "-m", "flask", "--app", "tests.server_app:create_app", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


# -- in-process -------------------------------------------------------------------


def test_notify_on_memory_fails_with_a_fix() -> None:
    result = make_app().test_cli_runner().invoke(args=["entitysync", "notify", "items", "1"])
    assert result.exit_code == 1
    assert "reaches only the process it runs in" in result.output
    assert "redis:// or nsq://" in result.output


def test_notify_refuses_unknown_entities_and_bad_ids() -> None:
    runner = make_app(ENTITYSYNC_BUS_URL=f"redis://127.0.0.1:{free_port()}/0").test_cli_runner()
    result = runner.invoke(args=["entitysync", "notify", "itemz", "1"])
    assert result.exit_code == 1 and "no entity 'itemz' is registered in this app (registered: items, users)" \
        in result.output
    result = runner.invoke(args=["entitysync", "notify", "items", "x" * 300])
    assert result.exit_code == 1 and "invalid id" in result.output
    result = runner.invoke(args=["entitysync", "notify", "items"])
    assert result.exit_code == 2 and "give either IDS or --all" in result.output
    result = runner.invoke(args=["entitysync", "notify", "items", "1", "--all"])
    assert result.exit_code == 2 and "give either IDS or --all" in result.output


def test_notify_fails_when_the_broker_cannot_be_reached() -> None:
    port = free_port()
    runner = make_app(ENTITYSYNC_BUS_URL=f"redis://u:s3cret@127.0.0.1:{port}/0").test_cli_runner()
    result = runner.invoke(args=["entitysync", "notify", "--timeout", "0.5", "items", "1", "2"])
    assert result.exit_code == 1
    assert f"2 notification(s) not published to Redis at redis://127.0.0.1:{port}/0 within 0.5s" in result.output
    assert "s3cret" not in result.output


def test_stats_on_memory_shows_the_config_and_says_what_it_cannot_see() -> None:
    result = make_app(ENTITYSYNC_TOPIC_PREFIX="shop_").test_cli_runner().invoke(args=["entitysync", "stats"])
    assert result.exit_code == 0, result.output
    assert "entities:     items, users" in result.output
    assert "topic prefix: shop_" in result.output
    assert "reachable:    n/a (memory:// is in-process" in result.output


def test_stats_exits_1_when_the_broker_is_unreachable() -> None:
    port = free_port()
    app = make_app(ENTITYSYNC_BUS_URL=f"redis://u:s3cret@127.0.0.1:{port}/0")
    result = app.test_cli_runner().invoke(args=["entitysync", "stats", "--timeout", "1"])
    assert result.exit_code == 1
    assert "reachable:    NO" in result.output and "s3cret" not in result.output
    app = make_app(ENTITYSYNC_BUS_URL=f"nsq://127.0.0.1:{port}")
    result = app.test_cli_runner().invoke(args=["entitysync", "stats", "--json", "--timeout", "1"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["reachable"] is False and f"nsqd 127.0.0.1:{port}" in report["detail"]


# -- real commands, real servers ----------------------------------------------------


def test_notify_from_the_command_line_reaches_a_running_server(broker: Any, cluster: Callable[..., Server],
                                                               uid: str) -> None:
    server = cluster("gunicorn", broker)
    ids = [f"{uid}-1", f"{uid}-2"]
    clients = []
    try:
        for id in ids:
            seed(server, id, "v0")
            clients.append(subscribed(Client(server.ws_url), server, "items", id, "v0"))
        for id in ids:
            seed(server, id, "from-cli")
        done = flask_cli("entitysync", "notify", "items", *ids,
                         ENTITYSYNC_BUS_URL=broker.url(), ENTITYSYNC_TOPIC_PREFIX=uid + "_")
        assert done.returncode == 0, done.stderr
        assert "published 2 notification(s) of items to" in done.stdout
        for client, id in zip(clients, ids, strict=True):
            until_pushed(client, "items", id, "from-cli")
    finally:
        for client in clients:
            client.close()


def test_notify_all_from_the_command_line_refreshes_every_subscribed_key(broker: Any,
                                                                         cluster: Callable[..., Server],
                                                                         uid: str) -> None:
    server = cluster("flask", broker)
    ids = [f"{uid}-1", f"{uid}-2"]
    clients = []
    try:
        for id in ids:
            seed(server, id, "v0")
            clients.append(subscribed(Client(server.ws_url), server, "items", id, "v0"))
        for id in ids:
            seed(server, id, "from-cli-all")
        done = flask_cli("entitysync", "notify", "items", "--all",
                         ENTITYSYNC_BUS_URL=broker.url(), ENTITYSYNC_TOPIC_PREFIX=uid + "_")
        assert done.returncode == 0, done.stderr
        assert "asked every server to refresh every subscribed key of items" in done.stdout
        for client, id in zip(clients, ids, strict=True):
            until_pushed(client, "items", id, "from-cli-all")
    finally:
        for client in clients:
            client.close()


def test_stats_from_the_command_line_counts_subscribed_servers_on_redis(cluster: Callable[..., Server],
                                                                        uid: str) -> None:
    broker = make_broker("redis")
    cluster("gunicorn", broker)
    cluster("flask", broker)
    done = flask_cli("entitysync", "stats", "--json", ENTITYSYNC_BUS_URL=broker.url(),
                     ENTITYSYNC_TOPIC_PREFIX=uid + "_")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["reachable"] is True
    assert report["subscribers"][f"{uid}_items"] == 2 and report["subscribers"][f"{uid}_typed"] == 2
    assert "items" in report["entities"]


def test_stats_from_the_command_line_checks_nsqd() -> None:
    broker = make_broker("nsq")
    try:
        done = flask_cli("entitysync", "stats", ENTITYSYNC_BUS_URL=broker.url())
        assert done.returncode == 0, done.stderr
        assert "reachable:    yes (1 address(es) accept connections)" in done.stdout
    finally:
        broker.close()
