"""Buses that carry notifications between servers, chosen by URL (see :mod:`.schemes`)."""

from __future__ import annotations

from .base import Bus as Bus
from .base import BusSink as BusSink
from .base import KeyInterest as KeyInterest
from .buffer import KeyBuffer as KeyBuffer
from .buffered import BufferedBus as BufferedBus
from .memory import MemoryBus as MemoryBus
from .schemes import SCHEMES as SCHEMES
from .schemes import bus_class as bus_class
from .schemes import bus_from_url as bus_from_url

#: The former name of :class:`BufferedBus`, kept for code that subclassed it.
BrokerBus = BufferedBus
