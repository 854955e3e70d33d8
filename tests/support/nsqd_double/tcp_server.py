"""One TCP connection to the double, speaking protocol V2 (nsqd's protocol_v2.go and client_v2.go)."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.queue

from .codec import (
    FRAME_ERROR,
    FRAME_RESPONSE,
    HEARTBEAT,
    MSG_ID_LENGTH,
    OK,
    READ_BUFFER_SIZE,
    STATE_CLOSING,
    STATE_INIT,
    STATE_SUBSCRIBED,
    VERSION,
    ClientError,
    Closed,
    byte_to_base10,
    decode_identify,
    fatal,
    frame,
    go_quote,
    is_valid_name,
    read_mpub,
)
from .model import Message
from .options import CLIENT_TIMEOUT, DEFAULT_OUTPUT_BUFFER_SIZE, ERROR, INFO

if TYPE_CHECKING:
    from .daemon import NSQD
    from .model import Channel


class Client:
    """One TCP connection speaking protocol V2."""

    def __init__(self, nsqd: NSQD, sock: socket.socket, address: tuple[str, int]) -> None:
        self.nsqd = nsqd
        self.sock = sock
        self.remote_address = f"{address[0]}:{address[1]}"
        self.id = next(nsqd.client_ids)
        self.state = STATE_INIT
        self.client_id = address[0]
        self.hostname = address[0]
        self.user_agent = ""
        self.heartbeat_interval = CLIENT_TIMEOUT / 2
        self.msg_timeout = nsqd.opts.msg_timeout
        self.output_buffer_size = DEFAULT_OUTPUT_BUFFER_SIZE
        self.output_buffer_timeout = nsqd.opts.output_buffer_timeout
        self.sample_rate = 0
        self.ready_count = 0
        self.in_flight_count = 0
        self.message_count = 0
        self.finish_count = 0
        self.requeue_count = 0
        self.pub_counts: dict[str, int] = {}
        self.connect_ts = int(time.time())
        self.channel: Channel | None = None
        self.identified = False
        self.closed = False
        self._buf = b""
        self._out: gevent.queue.Queue[bytes | None] = gevent.queue.Queue()
        self._writer = gevent.spawn(self._write_loop)
        self._heartbeat: gevent.Greenlet | None = None
        # Output buffering (see send_message): message frames not yet written, and
        # nsqd's flush ticker: it ticks every output_buffer_timeout from ``_ticks_from``,
        # and holds at most one tick until the message pump takes it.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._ticks_from = time.monotonic()
        self._tick_taken = self._ticks_from
        self._flusher: gevent.Greenlet | None = None

    def __str__(self) -> str:
        return self.remote_address

    # I/O.

    def send(self, data: bytes) -> None:
        """Write a response, error or heartbeat frame, after every message buffered before it
        (nsqd flushes its buffer on every frame that is not a message)."""
        if not self.closed:
            if self._pending:
                data = self._take_pending() + data
            self._out.put(data)

    def send_message(self, data: bytes) -> None:
        """Write a message frame as nsqd's message pump does, through the client's output buffer.

        The buffer holds up to ``output_buffer_size`` bytes; it is written when the
        next frame would not fit, when the client is not ready for more messages
        (in flight has reached its RDY count), before any other frame, and otherwise
        at the next tick of a ticker of period ``output_buffer_timeout`` (a tick that
        fell while nothing was buffered is taken at once, as Go's ticker keeps one).
        ``output_buffer_size`` -1 (a size of 1) writes every message at once; an
        ``output_buffer_timeout`` of -1 stops the ticker, so a message waits for one
        of the other occasions, as in nsqd.
        """
        if self.closed:
            return
        if self.output_buffer_size <= 1:
            self._out.put(data)
            return
        if self._pending and self._pending_size + len(data) > self.output_buffer_size:
            self.flush()
        self._pending.append(data)
        self._pending_size += len(data)
        if not self.is_ready_for_messages():
            self.flush()
        elif self._flusher is None and self.output_buffer_timeout > 0:
            now = time.monotonic()
            period = self.output_buffer_timeout
            last_tick = self._ticks_from + (now - self._ticks_from) // period * period
            if last_tick > self._tick_taken:
                self._tick_taken = last_tick
                self.flush()
            else:
                self._flusher = gevent.spawn_later(last_tick + period - now, self._flush_on_tick, last_tick + period)

    def flush(self) -> None:
        """Write every buffered message frame now."""
        if self._pending and not self.closed:
            self._out.put(self._take_pending())

    def _take_pending(self) -> bytes:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        if self._flusher is not None:
            self._flusher.kill(block=False)
            self._flusher = None
        return data

    def _flush_on_tick(self, tick: float) -> None:
        self._flusher = None
        self._tick_taken = tick
        self.flush()

    def _restart_ticker(self) -> None:
        """nsqd's message pump restarts its flush ticker on the first IDENTIFY."""
        self._ticks_from = self._tick_taken = time.monotonic()
        if self._flusher is not None:
            self._flusher.kill(block=False)
            self._flusher = None
        if self._pending:
            self.flush()

    def close(self) -> None:
        """Close after what is already queued has been written (so a fatal error frame arrives)."""
        if not self.closed:
            self.closed = True
            self._out.put(None)

    def _write_loop(self) -> None:
        try:
            while True:
                data = self._out.get()
                if data is None:
                    break
                self.sock.sendall(data)
        except OSError:
            pass
        finally:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def _fill(self, deadline: float | None) -> None:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise TimeoutError("read deadline passed")
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise Closed
        self._buf += data

    def _read_line(self, deadline: float | None) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line, self._buf = self._buf[:end], self._buf[end + 1:]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) >= READ_BUFFER_SIZE:
                raise ValueError("bufio: buffer full")
            self._fill(deadline)

    def _read_exact(self, size: int, deadline: float | None) -> bytes:
        while len(self._buf) < size:
            self._fill(deadline)
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def _read_len(self, deadline: float | None) -> int:
        return int(struct.unpack(">i", self._read_exact(4, deadline))[0])

    # Heartbeats: a ticker, as in nsqd's messagePump, restarted by IDENTIFY.

    def _start_heartbeats(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.kill(block=False)
            self._heartbeat = None
        if self.heartbeat_interval > 0:
            self._heartbeat = gevent.spawn(self._heartbeat_loop, self.heartbeat_interval)

    def _heartbeat_loop(self, interval: float) -> None:
        while not self.closed:
            gevent.sleep(interval)
            self.send(frame(FRAME_RESPONSE, HEARTBEAT))

    # The read loop (nsqd's IOLoop).

    def serve(self) -> None:
        self._start_heartbeats()
        try:
            while not self.closed:
                deadline = time.monotonic() + 2 * self.heartbeat_interval if self.heartbeat_interval > 0 else None
                try:
                    line = self._read_line(deadline)
                except Closed:
                    break
                except (OSError, ValueError) as exc:
                    self.nsqd.log(ERROR, f"[{self}] - failed to read command - {exc or type(exc).__name__}")
                    break
                params = line.split(b" ")
                try:
                    response = self.exec(params, deadline)
                except ClientError as err:
                    self.nsqd.log(ERROR, f"[{self}] - {err}")
                    self.send(frame(FRAME_ERROR, str(err).encode()))
                    if err.fatal:
                        break
                    continue
                except (Closed, OSError):
                    break
                if response is not None:
                    self.send(frame(FRAME_RESPONSE, response))
        finally:
            self.nsqd.log(INFO, f"PROTOCOL(V2): [{self}] exiting ioloop")
            self.close()
            if self._heartbeat is not None:
                self._heartbeat.kill(block=False)
            if self.channel is not None:
                self.channel.remove_client(self)
            self.nsqd.clients.pop(self.id, None)
            self._writer.join()

    def is_ready_for_messages(self) -> bool:
        if self.closed or self.state != STATE_SUBSCRIBED:
            return False
        return 0 < self.ready_count and self.in_flight_count < self.ready_count

    def exec(self, params: list[bytes], deadline: float | None) -> bytes | None:
        cmd = params[0]
        handler: Callable[[list[bytes], float | None], bytes | None] | None = {
            b"IDENTIFY": self.identify, b"FIN": self.fin, b"RDY": self.rdy, b"REQ": self.req,
            b"PUB": self.pub, b"MPUB": self.mpub, b"DPUB": self.dpub, b"NOP": self.nop,
            b"TOUCH": self.touch, b"SUB": self.sub, b"CLS": self.cls, b"AUTH": self.auth,
        }.get(cmd)
        if handler is None:
            raise fatal("E_INVALID", f"invalid command {cmd.decode(errors='replace')}")
        return handler(params, deadline)

    # Commands.

    def identify(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_INIT:
            raise fatal("E_INVALID", "cannot IDENTIFY in current state")
        try:
            size = self._read_len(deadline)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_BODY", "IDENTIFY failed to read body size") from exc
        if size > self.nsqd.opts.max_body_size:
            raise fatal("E_BAD_BODY", f"IDENTIFY body too big {size} > {self.nsqd.opts.max_body_size}")
        if size <= 0:
            raise fatal("E_BAD_BODY", f"IDENTIFY invalid body size {size}")
        try:
            body = self._read_exact(size, deadline)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_BODY", "IDENTIFY failed to read body") from exc
        data = decode_identify(body)
        first = not self.identified
        self.identified = True
        opts = self.nsqd.opts
        self.client_id = data.get("client_id", "")
        self.hostname = data.get("hostname", "")
        self.user_agent = data.get("user_agent", "")
        try:
            self._apply_identify(data)
        except ValueError as exc:
            raise fatal("E_BAD_BODY", f"IDENTIFY {exc}") from exc
        if first:
            # nsqd's message pump takes only the first IDENTIFY's settings for its heartbeat
            # and flush tickers; a second one (allowed before SUB) changes the read deadline only.
            self._start_heartbeats()
            self._restart_ticker()
        if not data.get("feature_negotiation", False):
            return OK
        deflate_level = min(6, opts.max_deflate_level)
        return json.dumps({
            "max_rdy_count": opts.max_rdy_count,
            "version": VERSION,
            "max_msg_timeout": int(opts.max_msg_timeout * 1000),
            "msg_timeout": int(self.msg_timeout * 1000),
            "tls_v1": False,
            "deflate": False,
            "deflate_level": deflate_level,
            "max_deflate_level": opts.max_deflate_level,
            "snappy": False,
            "sample_rate": self.sample_rate,
            "auth_required": False,
            "output_buffer_size": self.output_buffer_size,
            "output_buffer_timeout": int(self.output_buffer_timeout * 1000),
        }, separators=(",", ":")).encode()

    def _apply_identify(self, data: dict[str, Any]) -> None:
        """client_v2.go's SetHeartbeatInterval, SetOutputBuffer, SetSampleRate, SetMsgTimeout."""
        opts = self.nsqd.opts
        hb = data.get("heartbeat_interval", 0)
        if hb == -1:
            self.heartbeat_interval = 0
        elif hb == 0:
            pass
        elif 1000 <= hb <= int(opts.max_heartbeat_interval * 1000):
            self.heartbeat_interval = hb / 1000
        else:
            raise ValueError(f"heartbeat interval ({hb}) is invalid")

        size, timeout = data.get("output_buffer_size", 0), data.get("output_buffer_timeout", 0)
        if timeout == -1:
            self.output_buffer_timeout = 0
        elif timeout == 0:
            pass
        elif int(opts.min_output_buffer_timeout * 1000) <= timeout <= int(opts.max_output_buffer_timeout * 1000):
            self.output_buffer_timeout = timeout / 1000
        else:
            raise ValueError(f"output buffer timeout ({timeout}) is invalid")
        if size == -1:
            self.output_buffer_size, self.output_buffer_timeout = 1, 0
        elif size == 0:
            pass
        elif 64 <= size <= opts.max_output_buffer_size:
            self.output_buffer_size = size
        else:
            raise ValueError(f"output buffer size ({size}) is invalid")

        rate = data.get("sample_rate", 0)
        if rate < 0 or rate > 99:
            raise ValueError(f"sample rate ({rate}) is invalid")
        self.sample_rate = rate

        msg_timeout = data.get("msg_timeout", 0)
        if msg_timeout == 0:
            pass
        elif 1000 <= msg_timeout <= int(opts.max_msg_timeout * 1000):
            self.msg_timeout = msg_timeout / 1000
        else:
            raise ValueError(f"msg timeout ({msg_timeout}) is invalid")

    def auth(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_INIT:
            raise fatal("E_INVALID", "cannot AUTH in current state")
        if len(params) != 1:
            raise fatal("E_INVALID", "AUTH invalid number of parameters")
        try:
            size = self._read_len(deadline)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_BODY", "AUTH failed to read body size") from exc
        if size > self.nsqd.opts.max_body_size:
            raise fatal("E_BAD_BODY", f"AUTH body too big {size} > {self.nsqd.opts.max_body_size}")
        if size <= 0:
            raise fatal("E_BAD_BODY", f"AUTH invalid body size {size}")
        try:
            self._read_exact(size, deadline)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_BODY", "AUTH failed to read body") from exc
        raise fatal("E_AUTH_DISABLED", "AUTH disabled")

    def sub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_INIT:
            raise fatal("E_INVALID", "cannot SUB in current state")
        if self.heartbeat_interval <= 0:
            raise fatal("E_INVALID", "cannot SUB with heartbeats disabled")
        if len(params) < 3:
            raise fatal("E_INVALID", "SUB insufficient number of parameters")
        topic_name = params[1].decode(errors="replace")
        if not is_valid_name(topic_name):
            raise fatal("E_BAD_TOPIC", f"SUB topic name {go_quote(topic_name)} is not valid")
        channel_name = params[2].decode(errors="replace")
        if not is_valid_name(channel_name):
            raise fatal("E_BAD_CHANNEL", f"SUB channel name {go_quote(channel_name)} is not valid")
        channel = self.nsqd.get_topic(topic_name).get_channel(channel_name)
        try:
            channel.add_client(self)
        except ValueError as exc:
            raise fatal("E_SUB_FAILED", f"SUB failed {exc}") from exc
        self.state = STATE_SUBSCRIBED
        self.channel = channel
        return OK

    def rdy(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state == STATE_CLOSING:
            self.nsqd.log(INFO, f"PROTOCOL(V2): [{self}] ignoring RDY after CLS in state ClientStateV2Closing")
            return None
        if self.state != STATE_SUBSCRIBED:
            raise fatal("E_INVALID", "cannot RDY in current state")
        count = 1
        if len(params) > 1:
            try:
                count = byte_to_base10(params[1])
            except ValueError as exc:
                raise fatal("E_INVALID", f"RDY could not parse count {params[1].decode(errors='replace')}") from exc
        max_rdy = self.nsqd.opts.max_rdy_count
        if count < 0 or count > max_rdy:
            raise fatal("E_INVALID", f"RDY count {count} out of range 0-{max_rdy}")
        self.ready_count = count
        if not self.is_ready_for_messages():
            self.flush()  # nsqd's message pump flushes whenever the client is not ready
        assert self.channel is not None
        self.channel.dispatch()
        return None

    def _message_id(self, params: list[bytes], verb: str) -> bytes:
        if self.state not in (STATE_SUBSCRIBED, STATE_CLOSING):
            raise fatal("E_INVALID", f"cannot {verb} in current state")
        if len(params) < (3 if verb == "REQ" else 2):
            raise fatal("E_INVALID", f"{verb} insufficient number of params")
        if len(params[1]) != MSG_ID_LENGTH:
            raise fatal("E_INVALID", "Invalid Message ID")
        return params[1]

    def fin(self, params: list[bytes], deadline: float | None) -> bytes | None:
        msg_id = self._message_id(params, "FIN")
        assert self.channel is not None
        try:
            self.channel.finish(self, msg_id)
        except ValueError as exc:
            raise ClientError("E_FIN_FAILED", f"FIN {msg_id.decode(errors='replace')} failed {exc}",
                              fatal=False) from exc
        self.finish_count += 1
        self.in_flight_count -= 1
        self.channel.dispatch()
        return None

    def req(self, params: list[bytes], deadline: float | None) -> bytes | None:
        msg_id = self._message_id(params, "REQ")
        try:
            timeout_ms = byte_to_base10(params[2])
        except ValueError as exc:
            raise fatal("E_INVALID", f"REQ could not parse timeout {params[2].decode(errors='replace')}") from exc
        # nsqd clamps an out-of-range timeout to 0..--max-req-timeout rather than failing
        delay = min(timeout_ms / 1000, self.nsqd.opts.max_req_timeout)
        assert self.channel is not None
        try:
            self.channel.requeue(self, msg_id, delay)
        except ValueError as exc:
            raise ClientError("E_REQ_FAILED", f"REQ {msg_id.decode(errors='replace')} failed {exc}",
                              fatal=False) from exc
        self.requeue_count += 1
        self.in_flight_count -= 1
        self.channel.dispatch()
        return None

    def touch(self, params: list[bytes], deadline: float | None) -> bytes | None:
        msg_id = self._message_id(params, "TOUCH")
        assert self.channel is not None
        try:
            self.channel.touch(self, msg_id)
        except ValueError as exc:
            raise ClientError("E_TOUCH_FAILED", f"TOUCH {msg_id.decode(errors='replace')} failed {exc}",
                              fatal=False) from exc
        return None

    def cls(self, params: list[bytes], deadline: float | None) -> bytes | None:
        if self.state != STATE_SUBSCRIBED:
            raise fatal("E_INVALID", "cannot CLS in current state")
        self.ready_count = 0
        self.state = STATE_CLOSING
        return b"CLOSE_WAIT"

    def nop(self, params: list[bytes], deadline: float | None) -> bytes | None:
        return None

    def _topic_param(self, params: list[bytes], verb: str, minimum: int, prefix: str = "") -> str:
        if len(params) < minimum:
            raise fatal("E_INVALID", f"{verb} insufficient number of parameters")
        name = params[1].decode(errors="replace")
        if not is_valid_name(name):
            raise fatal("E_BAD_TOPIC", f"{prefix}{verb} topic name {go_quote(name)} is not valid")
        return name

    def _read_message_body(self, verb: str, deadline: float | None) -> bytes:
        try:
            size = self._read_len(deadline)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_MESSAGE", f"{verb} failed to read message body size") from exc
        if size <= 0:
            raise fatal("E_BAD_MESSAGE", f"{verb} invalid message body size {size}")
        if size > self.nsqd.opts.max_msg_size:
            raise fatal("E_BAD_MESSAGE", f"{verb} message too big {size} > {self.nsqd.opts.max_msg_size}")
        try:
            return self._read_exact(size, deadline)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_MESSAGE", f"{verb} failed to read message body") from exc

    def _published(self, topic: str, count: int) -> None:
        self.pub_counts[topic] = self.pub_counts.get(topic, 0) + count
        self.nsqd.producers[self.id] = self

    def pub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        name = self._topic_param(params, "PUB", 2)
        body = self._read_message_body("PUB", deadline)
        topic = self.nsqd.get_topic(name)
        topic.put_messages([Message(self.nsqd.new_id(), body)])
        self._published(name, 1)
        return OK

    def dpub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        name = self._topic_param(params, "DPUB", 3)
        try:
            timeout_ms = byte_to_base10(params[2])
        except ValueError as exc:
            raise fatal("E_INVALID", f"DPUB could not parse timeout {params[2].decode(errors='replace')}") from exc
        max_ms = int(self.nsqd.opts.max_req_timeout * 1000)
        if timeout_ms > max_ms:
            raise fatal("E_INVALID", f"DPUB timeout {timeout_ms} out of range 0-{max_ms}")
        body = self._read_message_body("DPUB", deadline)
        msg = Message(self.nsqd.new_id(), body, deferred=timeout_ms / 1000)
        self.nsqd.get_topic(name).put_messages([msg])
        self._published(name, 1)
        return OK

    def mpub(self, params: list[bytes], deadline: float | None) -> bytes | None:
        name = self._topic_param(params, "MPUB", 2, prefix="E_BAD_TOPIC ")  # sic: nsqd repeats the code
        topic = self.nsqd.get_topic(name)  # nsqd creates the topic before reading the body
        try:
            size = self._read_len(deadline)
        except (OSError, Closed) as exc:
            raise fatal("E_BAD_BODY", "MPUB failed to read body size") from exc
        if size <= 0:
            raise fatal("E_BAD_BODY", f"MPUB invalid body size {size}")
        if size > self.nsqd.opts.max_body_size:
            raise fatal("E_BAD_BODY", f"MPUB body too big {size} > {self.nsqd.opts.max_body_size}")
        bodies = read_mpub(lambda n: self._read_exact(n, deadline), self.nsqd.opts)
        topic.put_messages([Message(self.nsqd.new_id(), b) for b in bodies])
        self._published(name, len(bodies))
        return OK

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "client_id": self.client_id, "hostname": self.hostname, "version": "V2",
            "remote_address": self.remote_address, "state": self.state, "ready_count": self.ready_count,
            "in_flight_count": self.in_flight_count, "message_count": self.message_count,
            "finish_count": self.finish_count, "requeue_count": self.requeue_count,
            "connect_ts": self.connect_ts, "sample_rate": self.sample_rate, "deflate": False, "snappy": False,
            "user_agent": self.user_agent,
        }
        if self.pub_counts:
            stats["pub_counts"] = [{"topic": t, "count": c} for t, c in self.pub_counts.items()]
        stats.update({"tls": False, "tls_cipher_suite": "", "tls_version": "", "tls_negotiated_protocol": "",
                      "tls_negotiated_protocol_is_mutual": False})
        return stats
