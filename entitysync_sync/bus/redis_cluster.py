"""The Redis bus on a Redis Cluster, ``redis+cluster://host:port[,host:port...]/``, with sharded pub/sub.

A Redis Cluster broadcasts every classic ``PUBLISH`` to every node, so plain
pub/sub on a cluster costs each node every message, however many shards it
has. Sharded pub/sub (Redis 7) keeps a channel on the shard that owns its hash
slot: ``SPUBLISH`` reaches only that shard, and ``SSUBSCRIBE`` must be sent to
it. This bus therefore routes by key (``?routing=key`` is the default here):
each key has a shard channel of its own, entity channel + ``:`` + id
(``items:100``), the same names as the single-node bus. No hash tag is used,
so CRC16 of the whole name spreads the keys of one entity over every slot,
and so every shard, evenly (a hash tag on the entity would put a whole entity
on one shard; an entity channel is one slot).

* Publishing: each key is ``SPUBLISH``\\ ed on its channel, through redis-py's
  :class:`redis.cluster.RedisCluster` (a pipeline per batch, split by node, and
  its slot-map refresh on ``MOVED``).
* Receiving: one connection per master that owns a watched key's slot. A
  key's channel is ``SSUBSCRIBE``\\ d there (one command per hash slot, since
  Redis refuses channels of several slots in one command), and once Redis
  confirms it the key is refreshed, as on one node.
* Entity channels (resync requests, ``notify_entity``, and any program's
  ``PUBLISH items '{"entity":"items","id":"100"}'``) stay classic pub/sub: a
  cluster broadcasts a classic ``PUBLISH``, so each server ``SUBSCRIBE``\\ s to
  them on one master only, picked at random to spread servers over nodes.
  With ``?routing=entity`` every key goes there too (compatible with Go
  servers and programs subscribed to the entity channel, but every node then
  carries every notification: nothing is sharded).
* Failover, restart, resharding: when a master gives up a slot (a replica was
  promoted, a slot migrated) Redis sends an ``SUNSUBSCRIBE`` for its channels;
  when a node's connection fails, or it answers with an error (``MOVED``,
  ``CLUSTERDOWN``), all its channels are lost. Either way the bus reads the slot
  map again (``CLUSTER SLOTS``, retried with backoff while no node answers),
  subscribes those channels on their current owner, and refreshes their keys
  once confirmed; the entity channels move to another master and resync their
  entities. Clients converge as after a single Redis restarts.

The subscribing side speaks RESP on sockets of its own rather than through
redis-py's ``ClusterPubSub``: that reads its nodes one after another, waiting
up to the timeout on each, so a message on one shard waits for the others'
timeouts (or the reader spins); a redis-py ``PubSub`` that reconnects by itself
re-subscribes every shard channel in one ``SSUBSCRIBE`` (refused as
``CROSSSLOT``) on the node it knew, and neither says when a channel moved, which
this bus must know to refresh the key. A RESP3 reader of subscription replies
is a few dozen lines, runs on gevent's sockets under ``gunicorn -k gevent``
and on threads under ``flask run``, and leaves every reconnect to this bus;
RESP3 also lets the subscribed connection ask ``ROLE`` before each
``SSUBSCRIBE`` (see :class:`_Connection`).
"""

from __future__ import annotations

import binascii
import logging
import random
import socket
import time
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

from ..backoff import backoff
from ..exceptions import ConfigError
from .redis import HEALTH_CHECK_INTERVAL, KEY_BATCH_INTERVAL, MAX_BACKOFF, RedisBus, redact, split_options

log = logging.getLogger("entitysync_sync")

#: The URL scheme of this bus.
SCHEME = "redis+cluster"
#: Hash slots of a Redis Cluster.
SLOTS = 16384
#: Seconds to wait for a node to accept a connection or answer a command.
CONNECT_TIMEOUT = 5.0
#: Seconds a node's reader handles replies in a row before it sends what waits and lets others run.
DRAIN_SECONDS = 0.05

Address = tuple[str, int]


def key_slot(channel: bytes) -> int:
    """The hash slot of ``channel``, as Redis Cluster computes it (CRC16, honouring ``{hash tags}``)."""
    start = channel.find(b"{")
    if start >= 0:
        end = channel.find(b"}", start + 1)
        if end > start + 1:
            channel = channel[start + 1:end]
    return binascii.crc_hqx(channel, 0) % SLOTS  # CRC16-CCITT (XMODEM), Redis Cluster's CRC16


def parse_nodes(url: str) -> tuple[list[Address], str | None, str | None]:
    """The nodes, user name and password that a ``redis+cluster://`` URL names.

    :class:`ConfigError` (without the credentials) for anything else: another
    scheme, no node, a bad port, a database other than 0 (a cluster has only
    that one), or a query option this bus does not know.
    """
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ConfigError(f"ENTITYSYNC_BUS_URL {shown}: a Redis Cluster URL starts with {SCHEME}://")
    auth, at, hosts = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes: list[Address] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.partition(":")
        try:
            port = int(port_text) if port_text else 6379
        except ValueError:
            port = 0
        if not host or not 0 < port < 65536:
            raise ConfigError(f"ENTITYSYNC_BUS_URL {shown}: {item[:64]!r} is not host:port")
        nodes.append((host, port))
    if not nodes:
        raise ConfigError(f"ENTITYSYNC_BUS_URL {shown}: name at least one node, "
                          f"{SCHEME}://host:port[,host:port...]/")
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"ENTITYSYNC_BUS_URL {shown}: a Redis Cluster has only database 0, "
                          f"got {parts.path[:32]!r}")
    rest = urlsplit(split_options(url)[0]).query
    if rest:
        names = sorted({pair.partition("=")[0] for pair in rest.split("&")})
        raise ConfigError(f"ENTITYSYNC_BUS_URL {shown}: unknown option {', '.join(names)[:64]}; "
                          "a Redis Cluster URL takes routing, unsubscribe_delay, health_check_interval and max_backoff")
    return nodes, username, password


class NodeError(Exception):
    """A node answered a subscribing connection with an error (``MOVED``, ``CLUSTERDOWN``, ...)."""


class _Error(str):
    """A RESP error reply."""


class _Connection:
    """One RESP3 connection to one node: send commands, read replies and pushes as they come.

    RESP3 (``HELLO 3``), because a subscribed RESP2 connection accepts no
    command but (un)subscriptions and PING, and the subscribing side must ask
    ``ROLE`` before each ``SSUBSCRIBE``: Redis 7.0 lets a replica accept one,
    and a replica's subscriber misses what is published while it is not yet
    known as one, so a channel placed from a slot map read just before a
    failover became known would be silently lost.
    """

    def __init__(self, address: Address, username: str | None, password: str | None) -> None:
        self.address = address
        self.sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.buffer = b""
        self.offset = 0
        auth = ("AUTH", username or "default", password) if password is not None else ()
        self.call("HELLO", "3", *auth)

    def send(self, commands: Iterable[tuple[bytes | str, ...]]) -> None:
        """Send ``commands`` in one write; their replies come later, through :meth:`read`."""
        out = bytearray()
        for args in commands:
            out += b"*%d\r\n" % len(args)
            for arg in args:
                data = arg.encode() if isinstance(arg, str) else arg
                out += b"$%d\r\n%s\r\n" % (len(data), data)
        self.sock.settimeout(CONNECT_TIMEOUT)
        self.sock.sendall(out)

    def call(self, *args: bytes | str) -> Any:
        """Send one command and return its reply (before subscribing); :class:`NodeError` for an error."""
        self.send([args])
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            reply = self.read(max(0.0, deadline - time.monotonic()))
            if reply is not None:
                if isinstance(reply, _Error):
                    raise NodeError(str(reply)[:200])
                return reply
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no answer to {args[0]!s} within {CONNECT_TIMEOUT:.0f}s")

    def read(self, timeout: float) -> Any:
        """The next reply, or None if none is complete within ``timeout`` seconds."""
        while True:
            parsed = self._parse(self.offset)
            if parsed is not None:
                reply, self.offset = parsed
                if self.offset > 65536:
                    self.buffer, self.offset = self.buffer[self.offset:], 0
                if reply is None:
                    continue  # a null: no command sent here answers one
                return reply
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return None
            if not data:
                raise ConnectionError("the node closed the connection")
            self.buffer += data
            timeout = min(timeout, CONNECT_TIMEOUT) or 0.001  # the rest of a reply is on its way

    def _parse(self, at: int) -> tuple[Any, int] | None:
        buffer = self.buffer
        end = buffer.find(b"\r\n", at)
        if end < 0:
            return None
        kind, line = buffer[at:at + 1], buffer[at + 1:end]
        after = end + 2
        if kind == b"+":
            return line.decode(errors="replace"), after
        if kind == b"-":
            return _Error(line.decode(errors="replace")), after
        if kind == b":":
            return int(line), after
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, after
            if len(buffer) < after + size + 2:
                return None
            return buffer[after:after + size], after + size + 2
        if kind in (b"*", b">", b"~", b"%", b"|"):  # array, push, set, map and attributes: flat lists
            count = int(line) * (2 if kind in (b"%", b"|") else 1)
            items: list[Any] = []
            for _ in range(max(count, 0)):
                parsed = self._parse(after)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            if kind == b"|":  # attributes precede the reply they describe
                return self._parse(after)
            return items, after
        if kind == b"_":
            return None, after
        if kind == b"#":
            return line == b"t", after
        if kind in (b",", b"("):
            return (float(line) if kind == b"," else int(line)), after
        if kind in (b"=", b"!"):  # verbatim string, blob error
            size = int(line)
            if len(buffer) < after + size + 2:
                return None
            data = buffer[after:after + size]
            if kind == b"!":
                return _Error(data.decode(errors="replace")), after + size + 2
            return data[4:], after + size + 2
        raise ConnectionError(f"not a RESP reply: {buffer[at:at + 16]!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass


class _Node:
    """What one master's subscribing connection holds, and what it is still to send.

    Changed by the coordinator and the node's own reader, under the bus's lock.
    """

    def __init__(self, address: Address) -> None:
        self.address = address
        self.channels: set[bytes] = set()  # shard channels placed on this node
        self.to_add: set[bytes] = set()
        self.to_drop: set[bytes] = set()
        self.unsubscribing: set[bytes] = set()  # SUNSUBSCRIBE sent, not confirmed yet
        self.classic = False  # whether it carries the entity channels
        self.entities_to_add: set[str] = set()
        self.stopped = False

    @property
    def name(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


class _Placed:
    """The channels placed on a node or waiting for one: what counts as subscribed, without a copy."""

    def __init__(self, placed: dict[bytes, Address], homeless: set[bytes]) -> None:
        self._placed = placed
        self._homeless = homeless

    def __contains__(self, channel: object) -> bool:
        return channel in self._placed or channel in self._homeless


class RedisClusterBus(RedisBus):
    """Notifications through a Redis Cluster's sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``).

    :param url: ``redis+cluster://[user:password@]host:port[,host:port...]/``;
        one reachable node is enough, the others are read from its slot map.
    :param routing: ``"key"`` (the default here: a shard channel per key) or
        ``"entity"`` (classic pub/sub on entity channels, broadcast to every node).
    :param unsubscribe_delay: as for :class:`~entitysync_sync.bus.redis.RedisBus`.
    """

    kind = "redis-cluster"
    default_routing = "key"

    def __init__(self, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000,
                 health_check_interval: float = HEALTH_CHECK_INTERVAL, retry_max: float = MAX_BACKOFF,
                 routing: str = "key", unsubscribe_delay: float = 5.0) -> None:
        super().__init__(url, topic_prefix=topic_prefix, buffer_size=buffer_size,
                         health_check_interval=health_check_interval, retry_max=retry_max,
                         routing=routing, unsubscribe_delay=unsubscribe_delay)
        self._cluster: Any = None
        # The subscribing side, under _pending_lock: the owner of every slot (None until read),
        # the node connections, which node each shard channel is placed on, the channels to place.
        self._owners: list[Address] | None = None
        self._nodes: dict[Address, _Node] = {}
        self._placed: dict[bytes, Address] = {}
        self._homeless: set[bytes] = set()
        self._classic: _Node | None = None
        self._map_stale = True
        self._map_due = 0.0
        self._failures = 0

    def _make_client(self, url: str) -> Any:
        """Check the URL only: the cluster client connects when the publisher first sends."""
        if not hasattr(self._redis, "cluster") or not hasattr(self._redis.client.PubSub, "ssubscribe"):
            raise ConfigError("ENTITYSYNC_BUS_URL names a Redis Cluster, which needs redis-py 5.0 or "
                              "later: pip install -U 'redis>=5'")
        self._startup, self._username, self._password = parse_nodes(url)
        return None

    @classmethod
    def from_url(cls, url: str, *, topic_prefix: str = "", buffer_size: int = 10_000) -> RedisClusterBus:
        parse_nodes(url)  # the URL's own errors first
        bus = super().from_url(url, topic_prefix=topic_prefix, buffer_size=buffer_size)
        assert isinstance(bus, RedisClusterBus)
        return bus

    @classmethod
    def probe(cls, url: str, topics: list[str], timeout: float) -> dict[str, Any]:
        """Reach a node, and count the servers subscribed to each entity channel on every master."""
        nodes, username, password = parse_nodes(url)
        try:
            owners = _read_slot_map(nodes, username, password)
            counts = dict.fromkeys(topics, 0)
            for address in sorted(set(owners)):
                connection = _Connection(address, username, password)
                try:
                    if topics:
                        reply = connection.call("PUBSUB", "NUMSUB", *topics)
                        for name, count in zip(reply[::2], reply[1::2], strict=True):
                            counts[name.decode()] += int(count)
                finally:
                    connection.close()
        except (OSError, NodeError) as exc:
            return {"reachable": False, "detail": f"{redact(url)}: {str(exc)[:200]}"}
        return {"reachable": True, "detail": f"{len(set(owners))} masters serve every slot",
                "subscribers": counts}

    def describe(self) -> str:
        nodes = ",".join(f"{host}:{port}" for host, port in self._startup)
        return f"Redis Cluster at {nodes}" + (" (key routing)" if self.routing == "key" else "")

    def stats(self) -> dict[str, int]:
        stats = super().stats()
        with self._pending_lock:
            stats["nodes"] = len(self._nodes)
        return stats

    # -- publishing -------------------------------------------------------------

    def _publisher(self) -> Any:
        if self._cluster is None:
            cluster = self._redis.cluster
            self._cluster = cluster.RedisCluster(
                startup_nodes=[cluster.ClusterNode(host, port) for host, port in self._startup],
                username=self._username, password=self._password,
                socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=CONNECT_TIMEOUT,
                socket_keepalive=True)
        return self._cluster

    def _send(self, batches: dict[str, list[bytes]]) -> None:
        pipe = self._publisher().pipeline(transaction=False)
        for topic, bodies in batches.items():
            # A key channel (entity topic + ":" + id; topics hold no ":") goes to its shard;
            # an entity channel is classic pub/sub, which the cluster broadcasts to every node.
            command = "SPUBLISH" if ":" in topic else "PUBLISH"
            for body in bodies:
                pipe.execute_command(command, topic, body)
        try:
            pipe.execute()
        except Exception:
            # redis-py follows MOVED by itself; after anything else the next attempt starts
            # from a new client, which reads the slot map afresh (a node may be gone for good).
            client, self._cluster = self._cluster, None
            try:
                client.close()
            except Exception:  # pragma: no cover - closing what already failed
                pass
            raise

    def _shutdown(self) -> None:
        if self._receiving:
            self._reader_done.wait(2.0)
        if self._cluster is not None:
            self._cluster.close()

    # -- receiving: the coordinator ------------------------------------------------

    def _read_until_closed(self) -> None:
        """Keep every wanted channel placed on the master that owns its slot, until closed."""
        assert self._closing is not None
        try:
            while not self.closed:
                now = time.monotonic()
                if self._map_stale and now >= self._map_due:
                    self._refresh_map()
                self._place()
                self._closing.wait(KEY_BATCH_INTERVAL)
        finally:
            with self._pending_lock:
                for node in self._nodes.values():
                    node.stopped = True
                self._nodes.clear()

    def _refresh_map(self) -> None:
        with self._pending_lock:
            known = list(dict.fromkeys([*(self._owners or ()), *self._startup]))
        try:
            owners = _read_slot_map(known, self._username, self._password)
        except Exception as exc:  # unreachable, refused, or a reply this bus cannot read
            with self._pending_lock:
                self._failures += 1
                failures = self._failures
                self._map_due = time.monotonic() + backoff(failures, self.retry_min, self.retry_max,
                                                           jitter=True)
            if failures == 1:
                log.warning("cannot read the slot map of %s (%s); retrying", self.describe(), str(exc)[:200])
            return
        with self._pending_lock:
            self._owners = owners
            self._map_stale = False

    def _place(self) -> None:
        """Hand new, dropped and moved channels to the nodes that own their slots."""
        if not (self._changed or self._leaving or self._homeless or self._pending or self._classic is None):
            return  # nothing to do: the usual case, checked without the lock
        add, drop = (self._key_changes(_Placed(self._placed, self._homeless)) if self.routing == "key"
                     else ([], []))
        with self._pending_lock:
            for channel in drop:
                self._homeless.discard(channel)
                address = self._placed.pop(channel, None)
                node = self._nodes.get(address) if address is not None else None
                if node is not None:
                    node.channels.discard(channel)
                    if channel in node.to_add:
                        node.to_add.discard(channel)
                    else:
                        node.to_drop.add(channel)
            self._homeless.update(add)
            owners = self._owners
            if owners is None or (self._map_stale and (self._homeless or self._classic is None)):
                return  # placed once the slot map is read
            if self._classic is None:
                node = self._node(random.choice(sorted(set(owners))))
                node.classic = True
                node.entities_to_add = set(self._entities)
                self._pending.clear()
                self._classic = node
            elif self._pending:
                self._classic.entities_to_add |= self._pending
                self._pending.clear()
            for channel in self._homeless:
                if channel not in self._wanted:
                    continue
                node = self._node(owners[key_slot(channel)])
                node.channels.add(channel)
                if channel in node.to_drop:
                    node.to_drop.discard(channel)  # still subscribed there: nothing was missed
                else:
                    node.to_add.add(channel)
                self._placed[channel] = node.address
            self._homeless.clear()
            for address, node in list(self._nodes.items()):
                if not node.channels and not node.classic and not node.to_drop and not node.unsubscribing:
                    node.stopped = True
                    del self._nodes[address]

    def _node(self, address: Address) -> _Node:
        """The node connection to ``address``, started if there is none; under the lock."""
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = _Node(address)
            assert self._executor is not None
            self._executor.spawn(self._run_node, node)
        return node

    def _lost(self, node: _Node, channels: Iterable[bytes]) -> None:
        """``channels`` are no longer subscribed on ``node``: place them again; under the lock."""
        for channel in channels:
            node.channels.discard(channel)
            if self._placed.get(channel) == node.address:
                del self._placed[channel]
            if channel in self._wanted:
                self._homeless.add(channel)
        self._map_stale = True

    # -- receiving: one connection per master -----------------------------------

    def _run_node(self, node: _Node) -> None:
        connection: _Connection | None = None
        try:
            connection = _Connection(node.address, self._username, self._password)
            self._serve(node, connection)
        except Exception as exc:  # unreachable, closed, an error reply, or a reply this bus cannot read
            self.counters["node_failures"] += 1
            with self._pending_lock:
                node.stopped = True
                if self._nodes.get(node.address) is node:
                    del self._nodes[node.address]
                if self._classic is node:
                    self._classic = None
                self._lost(node, list(node.channels))
                self._failures += 1
                failures = self._failures
                self._map_due = time.monotonic() + backoff(failures, self.retry_min, self.retry_max,
                                                           jitter=True)
            if failures == 1 and not self.closed:
                log.warning("lost the subscriptions on Redis Cluster node %s (%s); moving them to the "
                            "slots' current owners", node.name, str(exc)[:200])
        finally:
            if connection is not None:
                connection.close()

    def _serve(self, node: _Node, connection: _Connection) -> None:
        entity_channels: dict[bytes, str] = {}
        # As on one Redis: dead once nothing at all could be read for two PING intervals and a
        # second after a PING, judged only when a read finds nothing (a backlog or a stall is no death).
        next_ping = time.monotonic()
        unanswered: float | None = None  # when the first PING not followed by anything was sent
        interval = self.health_check_interval
        while not self.closed and not node.stopped:
            with self._pending_lock:
                add, node.to_add = node.to_add, set()
                drop, node.to_drop = node.to_drop, set()
                node.unsubscribing |= drop
                entities, node.entities_to_add = node.entities_to_add, set()
            commands: list[tuple[bytes | str, ...]] = []
            if entities:
                topics = {self.topic(entity).encode(): entity for entity in sorted(entities)}
                entity_channels.update(topics)
                commands.append(("SUBSCRIBE", *topics))
            if add:
                # Answered, in order, before the SSUBSCRIBEs are run: a replica's answer ends this
                # connection, and its channels go to the slots' current owners.
                commands.append(("ROLE",))
            for command, channels in (("SSUBSCRIBE", add), ("SUNSUBSCRIBE", drop)):
                by_slot: dict[int, list[bytes]] = {}
                for channel in channels:
                    by_slot.setdefault(key_slot(channel), []).append(channel)
                commands.extend((command, *group) for group in by_slot.values())
                self.counters[f"key_{command[1:].lower()}_commands"] += len(by_slot)
            now = time.monotonic()
            if now >= next_ping:
                commands.append(("PING",))
                next_ping = now + interval
                if unanswered is None:
                    unanswered = now
            if commands:
                connection.send(commands)
            reply = connection.read(KEY_BATCH_INTERVAL)
            if reply is None:
                if unanswered is None or time.monotonic() - unanswered <= 2 * interval + 1:
                    continue
                reply = connection.read(0)  # a stalled process may be woken by its timeout first
                if reply is None:
                    raise ConnectionError(f"nothing received, not even a PONG, for "
                                          f"{time.monotonic() - unanswered:.0f}s after a PING")
            unanswered = None
            until = time.monotonic() + DRAIN_SECONDS
            while reply is not None:
                self._handle(node, reply, entity_channels)
                if time.monotonic() >= until:
                    # A flood of messages must not hold up new subscriptions and PINGs, nor, under
                    # gevent, the other greenlets: reading more never waits while data is there.
                    time.sleep(0)
                    break
                reply = connection.read(0)

    def _handle(self, node: _Node, reply: Any, entity_channels: dict[bytes, str]) -> None:
        """Act on one reply of ``node``."""
        if isinstance(reply, _Error):
            raise NodeError(str(reply)[:200])
        if not isinstance(reply, list):
            return
        kind = reply[0]
        if kind in (b"smessage", b"message"):
            self._received_on(reply[2], self._wanted.get(reply[1]))  # a key channel names its key
        elif kind in (b"slave", b"replica"):  # ROLE: this node no longer owns the slots
            self.counters["replica_answers"] += 1
            raise NodeError(f"{node.name} is a replica now")
        elif kind == b"ssubscribe":
            with self._pending_lock:
                placed = reply[1] in node.channels
            if placed:
                self._recovered()
                self._confirmed_key(reply[1])
        elif kind == b"sunsubscribe":
            with self._pending_lock:
                if reply[1] in node.unsubscribing:
                    node.unsubscribing.discard(reply[1])
                elif reply[1] in node.channels:  # the node gave up the channel's slot
                    self.counters["shard_channels_moved"] += 1
                    self._lost(node, [reply[1]])
        elif kind == b"subscribe":
            entity = entity_channels.get(reply[1])
            if entity is not None:
                self._recovered()
                self._connected(entity)

    def _recovered(self) -> None:
        """A subscription is confirmed: once every channel is placed again, failures start over."""
        with self._pending_lock:
            if not self._failures or self._homeless or self._map_stale:
                return
            self._failures = 0
        log.info("subscribed on every node of %s again; the moved keys are refreshed", self.describe())


def _read_slot_map(nodes: Iterable[Address], username: str | None, password: str | None) -> list[Address]:
    """The master of every slot, from the first of ``nodes`` that answers ``CLUSTER SLOTS``."""
    error: BaseException | None = None
    for address in nodes:
        try:
            connection = _Connection(address, username, password)
        except OSError as exc:
            error = exc
            continue
        try:
            reply = connection.call("CLUSTER", "SLOTS")
        except (OSError, NodeError) as exc:
            error = exc
            continue
        finally:
            connection.close()
        owners: list[Address | None] = [None] * SLOTS
        for first, last, master, *_replicas in reply:
            host = master[0].decode() if master[0] not in (b"", b"?") else address[0]
            owners[first:last + 1] = [(host, int(master[1]))] * (last - first + 1)
        if None in owners:
            error = NodeError(f"{address[0]}:{address[1]} serves only part of the {SLOTS} slots")
            continue
        return owners  # type: ignore[return-value]
    raise error if error is not None else NodeError("no node to ask for the slot map")
