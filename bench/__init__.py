"""Benchmarks of entitysync_sync against real servers; run each as ``python -m bench.NAME``."""
