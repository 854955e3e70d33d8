"""How long to wait before trying again: capped exponential backoff, with jitter when many retry."""

from __future__ import annotations

import random


def backoff(attempt: int, first: float, cap: float, jitter: bool = False) -> float:
    """Seconds to wait before try ``attempt + 1``: ``first``, doubling, at most ``cap``.

    With ``jitter`` the pause is drawn from its upper half, so that many
    processes that failed together do not retry together.
    """
    delay: float = min(cap, first * 2.0 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0) if jitter else delay
