"""Helpers the tests share: servers, clients and doubles they run (no fixtures, no tests)."""
