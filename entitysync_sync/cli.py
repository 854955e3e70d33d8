"""``flask entitysync``: notify from the command line, and check the bus.

``flask entitysync notify items 100 101`` publishes through the app's
configured bus (``ENTITYSYNC_BUS_URL``, ``ENTITYSYNC_TOPIC_PREFIX``) and waits
until the broker has the notifications before it exits. A CLI process is not
a server: it serves no clients, so it publishes with a
:class:`~entitysync_sync.publisher.Publisher` and subscribes to nothing, and
``memory://``, which reaches only the process it runs in, is refused.

``flask entitysync pg-trigger items --table items`` prints the SQL of a
trigger that notifies every write to a PostgreSQL table (``--install`` runs
it on the database the servers listen to).

``flask entitysync stats`` cannot see a running server's counters (those live
in each server process: ``es.stats()``, or Prometheus). It shows what a
separate process can check honestly: the configuration, the registered
entities, whether the broker answers and, on Redis, how many server processes
are subscribed to each entity's channel. It exits with status 1 when the
broker cannot be reached, so it also serves as a health check.
"""

from __future__ import annotations

import json
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from .bus import bus_class
from .bus.postgres import url_secrets
from .exceptions import EntitySyncError
from .keys import EntityKey
from .postgres import install_trigger, trigger_sql
from .publisher import Publisher
from .runtime import EXTENSION_NAME, Runtime

cli = AppGroup("entitysync", help="Notify subscribers and check the entitysync bus.")


def _runtime() -> Runtime:
    runtime = current_app.extensions.get(EXTENSION_NAME)
    if not isinstance(runtime, Runtime):  # pragma: no cover - the group is added by init_app
        raise click.ClickException("EntitySync is not registered on this app: call init_app(app)")
    return runtime


@cli.command("notify")
@click.argument("entity")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True,
              help="Refresh every subscribed key of ENTITY on every server, instead of IDS.")
@click.option("--timeout", default=10.0, show_default=True, type=float,
              help="Seconds to wait for the broker to accept the notifications.")
def notify_command(entity: str, ids: tuple[str, ...], everything: bool, timeout: float) -> None:
    """Tell every server that ENTITY rows IDS... changed, e.g. `notify items 100 101`,
    or with --all that any row of ENTITY may have changed (`notify items --all`)."""
    if everything == bool(ids):
        raise click.UsageError("give either IDS or --all")
    runtime = _runtime()
    settings = runtime.settings
    if bus_class(settings.bus_url).in_process:
        raise click.ClickException(
            f"ENTITYSYNC_BUS_URL is {settings.bus_url}, which reaches only the process it runs in, "
            "not a running server. Set it (e.g. FLASK_ENTITYSYNC_BUS_URL) to the redis:// or nsq:// "
            "URL the servers use."
        )
    if entity not in runtime.registry.entities:
        known = ", ".join(sorted(runtime.registry.entities)) or "none"
        raise click.ClickException(f"no entity {entity!r} is registered in this app (registered: {known})")
    try:
        keys = [EntityKey(entity, id) for id in ids]
        publisher = Publisher(settings.bus_url, topic_prefix=settings.topic_prefix,
                              buffer_size=max(settings.publish_buffer, len(keys)))
        try:
            if everything:
                publisher.notify_entity(entity)
            else:
                publisher.notify_many(keys)
        finally:
            publisher.close(timeout)
    except EntitySyncError as exc:
        raise click.ClickException(str(exc)) from None
    if everything:
        click.echo(f"asked every server to refresh every subscribed key of {entity} via {publisher.describe()}")
    else:
        click.echo(f"published {len(keys)} notification(s) of {entity} to {publisher.describe()}")


@cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--timeout", default=3.0, show_default=True, type=float,
              help="Seconds to wait for the broker to answer.")
def stats_command(as_json: bool, timeout: float) -> None:
    """Show the configuration and whether the bus answers (exit status 1 if not).

    A running server's counters live in that server: read them with
    es.stats() (for example from a view of your own) or with Prometheus.
    """
    runtime = _runtime()
    settings = runtime.settings
    bus = runtime.bus
    entities = sorted(runtime.registry.entities)
    report: dict[str, Any] = {
        "bus": bus.describe(),
        "topic_prefix": settings.topic_prefix,
        "path": settings.path,
        "entities": entities,
    }
    report.update(probe(settings.bus_url, [settings.topic_prefix + entity for entity in entities], timeout))
    listener = runtime.pg_listener
    if listener is not None and settings.pg_listen_url is not None:
        report["pg_listen"] = {"bus": listener.describe(), **probe(settings.pg_listen_url, [], timeout)}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"bus:          {report['bus']}")
        click.echo(f"topic prefix: {report['topic_prefix'] or '(none)'}")
        click.echo(f"websocket:    {report['path']}")
        click.echo(f"entities:     {', '.join(entities) or '(none)'}")
        click.echo(f"reachable:    {_yes_no(report['reachable'])}{_detail(report)}")
        for topic, count in report.get("subscribers", {}).items():
            click.echo(f"  {topic}: {count} server process(es) subscribed")
        if "pg_listen" in report:
            listen = report["pg_listen"]
            click.echo(f"pg listen:    {listen['bus']}")
            click.echo(f"reachable:    {_yes_no(listen['reachable'])}{_detail(listen)}")
    if report["reachable"] is False or report.get("pg_listen", {}).get("reachable") is False:
        raise SystemExit(1)


@cli.command("pg-trigger")
@click.argument("entity")
@click.option("--table", required=True, help="The table (or schema.table) whose rows ENTITY's ids name.")
@click.option("--id-column", default="id", show_default=True, help="The column that holds the id.")
@click.option("--install", is_flag=True,
              help="Run the SQL on the database the servers listen to, instead of printing it.")
def pg_trigger_command(entity: str, table: str, id_column: str, install: bool) -> None:
    """Print (or --install) a PostgreSQL trigger that notifies ENTITY for every write to --table.

    Every INSERT, UPDATE and DELETE then reaches the subscribers, whoever
    wrote it (psql, a migration, another service). The SQL is idempotent and
    suits a migration; it uses the app's ENTITYSYNC_TOPIC_PREFIX.
    """
    runtime = _runtime()
    settings = runtime.settings
    if entity not in runtime.registry.entities:
        known = ", ".join(sorted(runtime.registry.entities)) or "none"
        raise click.ClickException(f"no entity {entity!r} is registered in this app (registered: {known})")
    database = runtime.listened_database()
    if install and database is None:
        raise click.ClickException(
            "--install needs the database the servers listen to: set ENTITYSYNC_BUS_URL (or, "
            "beside another bus, ENTITYSYNC_PG_LISTEN_URL) to a postgresql:// URL")
    url = settings.pg_listen_url or settings.bus_url
    try:
        if not install:
            click.echo(trigger_sql(entity, table, id_column, settings.topic_prefix), nl=False)
            return
        install_trigger(url, entity, table, id_column, settings.topic_prefix)
    except EntitySyncError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # psycopg's errors: the server's message, never the URL's password
        message = str(exc)
        for secret in url_secrets(url):
            message = message.replace(secret, "***")
        raise click.ClickException(f"installing the trigger on {database.describe()} failed: {message}") from None
    click.echo(f"installed the trigger of {entity} on {table} in {database.describe()}; "
               f"it notifies channel {database.topic(entity)!r}")


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[value]


def _detail(report: dict[str, Any]) -> str:
    return f" ({report['detail']})" if report.get("detail") else ""


def probe(url: str, topics: list[str], timeout: float) -> dict[str, Any]:
    """Whether the broker of ``url`` answers, plus what it can say about subscribers.

    Returns ``reachable`` (True, False, or None for ``memory://``), a
    ``detail`` message (never with credentials) and, on Redis, ``subscribers``:
    the number of connections subscribed to each topic's channel, one per
    server process. Each bus says this for itself (``BufferedBus.probe``).
    """
    return bus_class(url).probe(url, topics, timeout)
