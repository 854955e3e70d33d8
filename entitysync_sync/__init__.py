"""entitysync_sync: keep browsers in sync with a Flask app's database.

Register fetch callbacks with :class:`EntitySync`, call
:meth:`EntitySync.notify` after changing a row, and every websocket client
subscribed to that row, on any server, gets it fetched with its own secret.
"""

__version__ = "0.1.0"

from .bus import Bus as Bus
from .bus import BusSink as BusSink
from .bus import MemoryBus as MemoryBus
from .exceptions import BatchFetchError as BatchFetchError
from .exceptions import BusError as BusError
from .exceptions import ConfigError as ConfigError
from .exceptions import EntitySyncError as EntitySyncError
from .exceptions import InvalidKeyError as InvalidKeyError
from .exceptions import ProtocolError as ProtocolError
from .exceptions import UnknownEntityError as UnknownEntityError
from .extension import EntitySync as EntitySync
from .keys import MAX_ID_LENGTH as MAX_ID_LENGTH
from .keys import EntityKey as EntityKey
from .publisher import Publisher as Publisher

__all__ = [
    "MAX_ID_LENGTH",
    "BatchFetchError",
    "Bus",
    "BusError",
    "BusSink",
    "ConfigError",
    "EntityKey",
    "EntitySync",
    "EntitySyncError",
    "InvalidKeyError",
    "MemoryBus",
    "ProtocolError",
    "Publisher",
    "UnknownEntityError",
    "__version__",
]
