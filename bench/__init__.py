"""Benchmarks of entitysync_sync against Flask-SocketIO and the raw socket loop, on real servers.

``python -m bench`` runs every scenario; ``python -m bench --only NAME[,NAME]``
runs some alone (``fanout``, ``per_user``, ``cross``, ``compression``, ``routing``,
``redis_cost``, ``storm``, ``cohorts``; ``pg`` runs only when named), and
``--quick`` shrinks every size (see :mod:`bench.__main__`, ``--help``).
Benchmarks print figures; they assert nothing about timings.

One harness serves every scenario:

* :mod:`bench.apps`: the three server apps (entitysync_sync, Flask-SocketIO, the raw loop);
* :mod:`bench.systems`: the servers under test, each an app, an entity and an environment;
* :mod:`bench.server`: the server runner, a ``gunicorn -k gevent -w 1`` process and its control requests;
* :mod:`bench.usage`: the worker's CPU time and RSS, the only server-cost measurements;
* :mod:`bench.client`: the load client, asyncio websocket connections in one process;
* :mod:`bench.measure`: the steps scenarios share (memory while connecting, fan-out, settling);
* the scenarios: :mod:`bench.fanout` (a, c, d), :mod:`bench.per_user` (b, e),
  :mod:`bench.cross` (d across two servers), :mod:`bench.compression` (f), :mod:`bench.pg` (g),
  :mod:`bench.routing` (h), :mod:`bench.redis_cost` (i), :mod:`bench.storm` (j, a reconnect
  storm after a restart), :mod:`bench.cohorts` (k, per-user keys with cohorts and batch fetch);
* :mod:`bench.report`: the printed tables.
"""
