"""Delay packets for real: an nfnetlink_queue listener that holds each packet, then accepts it.

``python -m tests.support.netdelay --queue 7 --delay-ms 100``, run inside a
network namespace whose nftables rules send packets to queue 7
(``... queue num 7``), holds every such packet for 100 ms, in arrival order,
before telling the kernel to let it through. It prints ``ready`` once bound.

This stands in for ``tc qdisc ... netem delay`` on kernels built without
``sch_netem``: the packets really wait in the kernel's queue, so TCP sees the
longer round trip (its RTT estimate, retransmission timer and window all
react), which an in-process proxy could not show. It speaks nfnetlink_queue
over an ``AF_NETLINK`` socket with the standard library only, so the tests need
no compiled dependency (libnetfilter_queue, the NetfilterQueue package).
"""

from __future__ import annotations

import argparse
import heapq
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
AF_UNSPEC = 0
#: Packets the kernel may hold for this queue; beyond it, it drops them (as a full link would).
QUEUE_MAXLEN = 65536


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    found = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


class DelayQueue:
    """One bound nfnetlink queue; :meth:`run` delays every packet by ``delay`` seconds."""

    def __init__(self, queue: int, delay: float) -> None:
        self.queue = queue
        self.delay = delay
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", QUEUE_MAXLEN)))
        self.held: list[tuple[float, int, int]] = []  # (release time, arrival order, packet id)
        self.arrivals = 0

    def _config(self, attrs: bytes) -> None:
        self.seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, self.seq, NLM_F_REQUEST | NLM_F_ACK))
        while True:
            data = self.sock.recv(65536)
            _, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
            if kind == NLMSG_ERROR and seq == self.seq:
                (error,) = struct.unpack_from("=i", data, 16)
                if error:
                    raise OSError(-error, f"nfnetlink_queue config of queue {self.queue} failed")
                return

    def _verdict(self, packet_id: int) -> None:
        self.seq += 1
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet_id))
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue, attrs, self.seq))

    def _receive(self) -> None:
        data = self.sock.recv(1 << 20)
        now = time.monotonic()
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                header = _attrs(data[offset + 20:offset + length]).get(NFQA_PACKET_HDR)
                if header is not None:
                    (packet_id,) = struct.unpack_from(">I", header)
                    self.arrivals += 1
                    heapq.heappush(self.held, (now + self.delay, self.arrivals, packet_id))
            offset += (length + 3) & ~3

    def run(self) -> None:
        while True:
            now = time.monotonic()
            while self.held and self.held[0][0] <= now:
                self._verdict(heapq.heappop(self.held)[2])
            timeout = max(0.0, self.held[0][0] - now) if self.held else None
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if readable:
                self._receive()

    def close(self) -> None:
        # Let through whatever is still held, then unbind, so nothing stays queued.
        print(f"delayed {self.arrivals}", flush=True)
        for _, _, packet_id in sorted(self.held):
            self._verdict(packet_id)
        self.held.clear()
        try:
            self._config(_attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)))
        except OSError:
            pass
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True, help="the nfnetlink queue number to bind")
    parser.add_argument("--delay-ms", type=float, required=True, help="milliseconds to hold each packet")
    args = parser.parse_args(argv)
    if not 0 <= args.queue <= 65535 or not 0 <= args.delay_ms <= 60_000:
        parser.error("--queue must be 0 to 65535 and --delay-ms 0 to 60000")
    queue = DelayQueue(args.queue, args.delay_ms / 1000)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    try:
        queue.run()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
