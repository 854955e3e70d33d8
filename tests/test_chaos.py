"""Chaos: many clients, random changes, a broker restart and dropped clients, then convergence.

Two servers (gunicorn and flask run) share a database and a broker of the
test's own. While rows change at random through both servers, the broker is
restarted and some clients vanish without a close and come back. At the
end every client must hold the latest row of every key it subscribes to.
"""

from __future__ import annotations

import random
import socket
import threading
from typing import Any, Callable

from tests.support.clients import Client
from tests.support.pushes import converge, seed
from tests.support.servers import Server
from tests.support.waiting import wait_for


def test_every_client_converges_after_a_broker_restart_and_dropped_clients(
        own_broker: Any, cluster: Callable[..., Server], uid: str) -> None:
    rng = random.Random(uid)
    servers = [cluster("gunicorn", own_broker), cluster("flask", own_broker)]
    ids = [f"{uid}-{n}" for n in range(8)]
    for id in ids:
        seed(servers[0], id, "seed")
    subscribed: dict[Client, list[str]] = {}

    def connect() -> Client:
        client = Client(rng.choice(servers).ws_url)
        keys = rng.sample(ids, rng.randrange(1, len(ids) + 1))
        for id in keys:
            client.subscribe("items", id)
        subscribed[client] = keys
        return client

    for _ in range(12):
        connect()
    written: dict[str, Any] = {}
    writes = [0]
    stop = threading.Event()

    def writer() -> None:
        wrng = random.Random(uid + "w")
        while not stop.is_set():
            id = wrng.choice(ids)
            value = f"w{writes[0]}"
            wrng.choice(servers).set("items", id, value)
            written[id] = value
            writes[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: writes[0] >= 30, message="changes before the faults")
        for client in rng.sample(list(subscribed), 4):  # vanish without a close frame
            client.ws.sock.shutdown(socket.SHUT_RDWR)
            client.ws.sock.close()
            del subscribed[client]
        own_broker.stop()
        count = writes[0]
        wait_for(lambda: writes[0] >= count + 30, message="changes while the broker is down")
        for _ in range(4):
            connect()  # they come back, to either server
        own_broker.start()
        count = writes[0]
        wait_for(lambda: writes[0] >= count + 30, message="changes after the broker is back")
    finally:
        stop.set()
        thread.join()
    final = {id: written.get(id, "seed") for id in ids}
    for client, keys in subscribed.items():
        converge(client, {id: final[id] for id in keys})
    for client in subscribed:
        client.close()
    for server in servers:
        wait_for(lambda server=server: server.stats()["connections"] == 0, message="connections to be gone")
        assert server.stats()["subscriptions"] == 0
