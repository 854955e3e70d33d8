"""An NSQ protocol double: a small nsqd written with gevent, for tests on machines without nsqd.

Run it as its own process, with the flag names real nsqd uses::

    python -m tests.support.nsqd_double --tcp-address=127.0.0.1:0 --http-address=127.0.0.1:0 --data-path=/tmp/x

It logs the same ``TCP: listening on ADDR`` and ``HTTP: listening on ADDR`` lines as
nsqd 1.3.0 (``[nsqd] 2006/01/02 15:04:05.000000 INFO: ...`` on stderr), so one
fixture can launch either and read the ports the same way.

It follows the published TCP protocol and nsqd 1.3.0's source (``nsqd/protocol_v2.go``,
``client_v2.go``, ``channel.go``, ``topic.go``, ``http.go``, ``internal/protocol/names.go``):
the same commands, error codes and texts, fatal versus non-fatal errors, IDENTIFY range
checks, heartbeats and the two-interval read deadline, RDY accounting, in-flight and
deferred timeouts scanned every 100 ms, per-channel fan-out, ephemeral topics and
channels, and the HTTP endpoints a client or a test uses.

Where it differs from nsqd, on purpose:

- It behaves like ``nsqd --deflate=false --snappy=false`` with no TLS: feature
  negotiation answers ``false`` for all three, so a client never upgrades the stream.
  No auth server either: ``AUTH`` answers ``E_AUTH_DISABLED`` as nsqd does without one.
- There is no disk queue. A durable topic or channel keeps any number of messages in
  memory (where nsqd would spill past ``--mem-queue-size`` to disk); an ephemeral one
  holds at most ``--mem-queue-size`` and drops the rest, as nsqd does. ``backend_depth``
  in /stats reports what nsqd would have put on disk.
- Durability across restarts: with ``--data-path`` it writes ``nsqd.dat`` (nsqd's own
  metadata format: durable topics and channels) whenever one is created or deleted, and
  on a clean exit (SIGTERM/SIGINT) it also saves every queued, in-flight and deferred
  message of durable topics and channels, which come back on the next start, as nsqd's
  flush to disk does. After SIGKILL only the metadata survives, as with nsqd when its
  messages were all still in memory. Without ``--data-path`` nothing is written.
- ``sample_rate`` is honoured; no nsqlookupd, statsd or e2e latency percentiles (flags
  for them are accepted and ignored).

Where nsqd's behaviour is easy to miss, the double has it too: message frames wait in
a per-client output buffer (``output_buffer_size``, flushed every
``output_buffer_timeout``, when the client is not ready, or before any other frame), so
a consumer that keeps nsqd's defaults sees its 250 ms; the queue scan that times out
in-flight messages and releases deferred ones only looks at channels it listed at its
last refresh, every 5 s; ``/stats`` for a topic that does not exist answers
``"topics": null``; and an HTTP publish over the size limit is refused by its
``Content-Length`` before the body is read, with ``Connection: close``.

The package: :mod:`.codec` (wire frames and command bodies, no I/O), :mod:`.options`
(nsqd's flags and log lines), :mod:`.model` (messages, channels, topics),
:mod:`.tcp_server` (one protocol V2 connection), :mod:`.http_server` (the HTTP API)
and :mod:`.daemon` (the process: topics, persistence, the queue scanner, both servers).
"""

from __future__ import annotations

from .daemon import NSQD, main
from .options import Options

__all__ = ["NSQD", "Options", "main"]
