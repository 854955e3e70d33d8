"""The double's state: messages, and the topics and channels that hold them."""

from __future__ import annotations

import base64
import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .codec import FRAME_MESSAGE, encode_message, frame
from .options import INFO

if TYPE_CHECKING:
    from .daemon import NSQD
    from .tcp_server import Client


@dataclass(eq=False)
class Message:
    id: bytes
    body: bytes
    timestamp: int = field(default_factory=time.time_ns)
    attempts: int = 0
    deferred: float = 0.0  # seconds; only set while the message travels from topic to channel
    client_id: int = 0
    deadline: float = 0.0  # in flight: when it times out; deferred: when it becomes ready
    delivered_at: float = 0.0

    def copy(self) -> Message:
        return Message(self.id, self.body, self.timestamp, self.attempts, self.deferred)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id.decode(), "body": base64.b64encode(self.body).decode(),
                "timestamp": self.timestamp, "attempts": self.attempts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        return cls(data["id"].encode(), base64.b64decode(data["body"]), data["timestamp"], data["attempts"])


class Channel:
    def __init__(self, nsqd: NSQD, topic: Topic, name: str) -> None:
        self.nsqd = nsqd
        self.topic = topic
        self.name = name
        self.ephemeral = name.endswith("#ephemeral")
        self.clients: dict[int, Client] = {}
        self.queue: deque[Message] = deque()
        self.in_flight: dict[bytes, Message] = {}
        self.deferred: dict[bytes, Message] = {}
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.requeue_count = 0
        self.timeout_count = 0
        self._next_client = itertools.count()

    # Messages in.

    def put_message(self, msg: Message) -> None:
        self.message_count += 1
        if msg.deferred:
            self.start_deferred(msg, msg.deferred)
        else:
            self.put(msg)

    def put(self, msg: Message) -> None:
        msg.deferred = 0.0
        self.queue.append(msg)
        self.dispatch()
        if self.ephemeral and len(self.queue) > self.nsqd.opts.mem_queue_size:
            self.queue.pop()  # no backend queue: nsqd drops what an ephemeral channel's memory cannot hold

    def start_deferred(self, msg: Message, delay: float) -> None:
        msg.deadline = time.monotonic() + delay
        self.deferred[msg.id] = msg

    # Messages out: every ready client of the channel takes turns.

    def dispatch(self) -> None:
        while self.queue and not self.paused and not self.topic.deleted:
            ready = [c for c in self.clients.values() if c.is_ready_for_messages()]
            if not ready:
                return
            client = ready[next(self._next_client) % len(ready)]
            msg = self.queue.popleft()
            if client.sample_rate > 0 and self.nsqd.random.randrange(100) > client.sample_rate:
                continue  # nsqd drops a message that a sampling client skips
            msg.attempts += 1
            now = time.monotonic()
            msg.client_id = client.id
            msg.delivered_at = now
            msg.deadline = now + client.msg_timeout
            self.in_flight[msg.id] = msg
            client.in_flight_count += 1
            client.message_count += 1
            client.send_message(frame(FRAME_MESSAGE, encode_message(msg)))

    def _pop_in_flight(self, client: Client, msg_id: bytes) -> Message:
        msg = self.in_flight.get(msg_id)
        if msg is None:
            raise ValueError("ID not in flight")
        if msg.client_id != client.id:
            raise ValueError("client does not own message")
        del self.in_flight[msg_id]
        return msg

    def finish(self, client: Client, msg_id: bytes) -> None:
        self._pop_in_flight(client, msg_id)

    def requeue(self, client: Client, msg_id: bytes, delay: float) -> None:
        msg = self._pop_in_flight(client, msg_id)
        self.requeue_count += 1
        if delay == 0:
            self.put(msg)
        else:
            self.start_deferred(msg, delay)

    def touch(self, client: Client, msg_id: bytes) -> None:
        msg = self.in_flight.get(msg_id)
        if msg is None:
            raise ValueError("ID not in flight")
        if msg.client_id != client.id:
            raise ValueError("client does not own message")
        msg.deadline = min(time.monotonic() + client.msg_timeout, msg.delivered_at + self.nsqd.opts.max_msg_timeout)

    def scan(self, now: float) -> None:
        """nsqd's processInFlightQueue and processDeferredQueue."""
        for msg in sorted((m for m in self.in_flight.values() if m.deadline <= now), key=lambda m: m.deadline):
            del self.in_flight[msg.id]
            self.timeout_count += 1
            owner = self.clients.get(msg.client_id)
            if owner is not None:
                owner.in_flight_count -= 1
            self.put(msg)
        for msg in sorted((m for m in self.deferred.values() if m.deadline <= now), key=lambda m: m.deadline):
            del self.deferred[msg.id]
            self.put(msg)
        if self.clients:
            self.dispatch()

    # Clients.

    def add_client(self, client: Client) -> None:
        limit = self.nsqd.opts.max_channel_consumers
        if limit and len(self.clients) >= limit:
            raise ValueError(f"consumers for {self.topic.name}:{self.name} exceeds limit of {limit}")
        self.clients[client.id] = client

    def remove_client(self, client: Client) -> None:
        # In-flight messages stay in flight until they time out, as in nsqd.
        if self.deleted:
            return
        if self.clients.pop(client.id, None) is not None and not self.clients and self.ephemeral:
            self.topic.delete_channel(self.name)

    def depth(self) -> int:
        return len(self.queue)

    def all_messages(self) -> list[Message]:
        return [*self.in_flight.values(), *self.deferred.values(), *self.queue]


class Topic:
    def __init__(self, nsqd: NSQD, name: str) -> None:
        self.nsqd = nsqd
        self.name = name
        self.ephemeral = name.endswith("#ephemeral")
        self.channels: dict[str, Channel] = {}
        self.queue: deque[Message] = deque()
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.message_bytes = 0

    def put_messages(self, msgs: Iterable[Message]) -> None:
        for msg in msgs:
            self.message_count += 1
            self.message_bytes += len(msg.body)
            self.queue.append(msg)
            self.pump()
            if self.ephemeral and len(self.queue) > self.nsqd.opts.mem_queue_size:
                self.queue.pop()  # no backend queue for an ephemeral topic

    def pump(self) -> None:
        """nsqd's topic messagePump: with no channels (or paused) the topic holds its messages."""
        if not self.channels or self.paused:
            return
        while self.queue:
            msg = self.queue.popleft()
            for i, channel in enumerate(list(self.channels.values())):
                channel.put_message(msg if i == 0 else msg.copy())

    def get_channel(self, name: str) -> Channel:
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(self.nsqd, self, name)
            self.nsqd.log(INFO, f"TOPIC({self.name}): new channel({name})")
            self.nsqd.persist_metadata()
            self.pump()
        return channel

    def delete_channel(self, name: str) -> None:
        channel = self.channels.pop(name, None)
        if channel is None:
            raise KeyError(name)
        self.nsqd.log(INFO, f"TOPIC({self.name}): deleting channel {name}")
        channel.deleted = True
        for client in list(channel.clients.values()):
            client.close()
        channel.queue.clear()
        channel.in_flight.clear()
        channel.deferred.clear()
        self.nsqd.persist_metadata()
        if not self.channels and self.ephemeral:
            self.nsqd.delete_topic(self.name)

    def depth(self) -> int:
        return len(self.queue)
