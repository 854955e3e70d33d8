"""The gnsq workarounds that need no nsqd (the others are tested against nsqd in test_nsq_ready.py)."""

from __future__ import annotations

import logging
import warnings

import pytest

from entitysync_sync.bus._gnsq_fixes import Consumer, Producer


def test_gnsq_clients_log_warnings_without_deprecation_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    producer = Producer("127.0.0.1:1")
    consumer = Consumer("items", "es-test#ephemeral", nsqd_tcp_addresses=["127.0.0.1:1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        producer.logger.warn("producer %s", "warned")
        consumer.logger.warn("consumer %s", "warned")
        producer.logger = logging.getLogger("entitysync_sync.test")  # as a closing bus does
        producer.logger.warn("reassigned %s", "warned")
    assert [r.getMessage() for r in caplog.records] == ["producer warned", "consumer warned", "reassigned warned"]
    assert caplog.records[-1].name == "entitysync_sync.test"
