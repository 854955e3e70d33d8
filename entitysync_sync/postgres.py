"""PostgreSQL triggers that notify every inserted, updated and deleted row, whoever wrote it.

``trigger_sql("items", "items")`` returns SQL, idempotent and suitable for an
Alembic migration (``op.execute(trigger_sql(...))``), that creates a trigger
function and two triggers on the table:

* after each inserted, updated or deleted row, ``pg_notify`` on the entity's
  channel (:func:`~entitysync_sync.bus.postgres.channel_name`, the one the
  servers LISTEN on) with the same body as every bus, ``{"entity":"items","id":"7"}``;
  an update that changes the id notifies the old and the new key;
* after a ``TRUNCATE``, a resync request, so every server refreshes every
  subscribed key of the entity.

Notifications are sent when the writer's transaction commits, and not at all
if it rolls back (savepoints included). PostgreSQL merges identical
notifications of one transaction, so a statement that touches a row many
times notifies it once; servers coalesce notifications of keys whose refresh
is already pending. An id longer than an entity key allows (256 characters)
or NULL notifies nothing: no client can subscribe to it.

``flask entitysync pg-trigger ENTITY --table TABLE [--id-column COL] [--install]``
prints this SQL or applies it. Every table, column and function name is
quoted with :mod:`psycopg.sql`, never interpolated raw.
"""

from __future__ import annotations

from typing import Any

from . import protocol as p
from .bus.postgres import channel_name, import_psycopg, shorten_identifier
from .exceptions import ConfigError
from .keys import MAX_ID_LENGTH, validate_entity

_FUNCTION_BODY = """
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify({channel}, {resync});
    RETURN NULL;
  END IF;
  IF TG_OP <> 'INSERT' AND length(OLD.{id}::text) <= {max_id} THEN
    PERFORM pg_notify({channel}, json_build_object('entity', {entity}, 'id', OLD.{id}::text)::text);
  END IF;
  IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.{id} IS DISTINCT FROM OLD.{id})
      AND length(NEW.{id}::text) <= {max_id} THEN
    PERFORM pg_notify({channel}, json_build_object('entity', {entity}, 'id', NEW.{id}::text)::text);
  END IF;
  RETURN NULL;
END
"""

_INSTALL = """\
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {tag}{body}{tag};
DROP TRIGGER IF EXISTS {row_trigger} ON {table};
CREATE TRIGGER {row_trigger} AFTER INSERT OR UPDATE OR DELETE ON {table}
  FOR EACH ROW EXECUTE FUNCTION {function}();
DROP TRIGGER IF EXISTS {truncate_trigger} ON {table};
CREATE TRIGGER {truncate_trigger} AFTER TRUNCATE ON {table}
  FOR EACH STATEMENT EXECUTE FUNCTION {function}();
"""

_DROP = """\
DROP TRIGGER IF EXISTS {row_trigger} ON {table};
DROP TRIGGER IF EXISTS {truncate_trigger} ON {table};
DROP FUNCTION IF EXISTS {function}();
"""


def trigger_sql(entity: str, table: str, id_column: str = "id", topic_prefix: str = "") -> str:
    """The SQL that makes every write to ``table`` notify ``(entity, row.id_column)``.

    ``table`` may be schema-qualified (``"shop.items"``); the function is
    created in the same schema. ``topic_prefix`` must be the servers'
    ``ENTITYSYNC_TOPIC_PREFIX``. Running it again replaces the function and
    triggers. Raises :class:`~entitysync_sync.InvalidKeyError` for a bad
    entity name and :class:`~entitysync_sync.ConfigError` for a bad prefix,
    table or column name.
    """
    names = _names(entity, table, id_column, topic_prefix)
    sql = import_psycopg().sql
    body = _render(sql.SQL(_FUNCTION_BODY).format(
        channel=sql.Literal(names["channel"]),
        resync=sql.Literal(p.encode_bus_resync(entity).decode()),
        entity=sql.Literal(entity),
        id=sql.Identifier(id_column),
        max_id=sql.Literal(MAX_ID_LENGTH),
    ))
    tag = "$entitysync$"
    n = 0
    while tag in body:  # a column name could hold the quote's tag: pick one it does not
        n += 1
        tag = f"$entitysync{n}$"
    return _render(sql.SQL(_INSTALL).format(tag=sql.SQL(tag), body=sql.SQL(body), **_identifiers(sql, names)))


def drop_trigger_sql(entity: str, table: str, id_column: str = "id", topic_prefix: str = "") -> str:
    """The SQL that removes what :func:`trigger_sql` with the same arguments created."""
    names = _names(entity, table, id_column, topic_prefix)
    sql = import_psycopg().sql
    return _render(sql.SQL(_DROP).format(**_identifiers(sql, names)))


def install_trigger(url: str, entity: str, table: str, id_column: str = "id", topic_prefix: str = "") -> None:
    """Run :func:`trigger_sql` on the database of ``url``, in one transaction."""
    psycopg = import_psycopg()
    with psycopg.connect(url, connect_timeout=10) as conn:
        conn.execute(trigger_sql(entity, table, id_column, topic_prefix))


def _names(entity: str, table: str, id_column: str, topic_prefix: str) -> dict[str, Any]:
    validate_entity(entity)
    parts = table.split(".") if isinstance(table, str) else []
    if not 1 <= len(parts) <= 2 or not all(_identifier_ok(part) for part in parts):
        raise ConfigError(f"table must be a table name or schema.table, got {table!r}")
    if not _identifier_ok(id_column):
        raise ConfigError(f"id_column must be a column name, got {id_column!r}")
    schema = parts[:-1]
    name = parts[-1]
    return {
        "channel": channel_name(topic_prefix, entity),
        "table": parts,
        "function": [*schema, shorten_identifier(f"entitysync_notify_{name}_{entity}")],
        "row_trigger": shorten_identifier(f"entitysync_{entity}"),
        "truncate_trigger": shorten_identifier(f"entitysync_{entity}_truncate"),
    }


def _identifiers(sql: Any, names: dict[str, Any]) -> dict[str, Any]:
    return {
        "table": sql.Identifier(*names["table"]),
        "function": sql.Identifier(*names["function"]),
        "row_trigger": sql.Identifier(names["row_trigger"]),
        "truncate_trigger": sql.Identifier(names["truncate_trigger"]),
    }


def _identifier_ok(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name.encode()) <= 63 and "\x00" not in name


def _render(composed: Any) -> str:
    text: str = composed.as_string(None)
    return text
