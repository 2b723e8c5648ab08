"""afunix: Unix-domain socket IPC for Python, after Stevens' UNP chapter 15.

The public API is what ``__all__`` lists; everything else lives in private
modules and may change. Start with :func:`listen`, :func:`connect`,
:func:`pair` and :class:`Server`.
"""

from ._address import Address as Address
from ._address import AddressKind as AddressKind
from ._errors import AddressError as AddressError
from ._errors import AddressInUse as AddressInUse
from ._errors import AfunixError as AfunixError
from ._errors import ListenQueueFull as ListenQueueFull
from ._errors import NoReplyAddress as NoReplyAddress
from ._errors import NoSuchSocket as NoSuchSocket
from ._errors import NotASocket as NotASocket
from ._errors import NothingListening as NothingListening
from ._errors import PeerError as PeerError
from ._errors import ProtocolError as ProtocolError
from ._errors import UnsupportedFeature as UnsupportedFeature
from ._errors import WrongSocketType as WrongSocketType
from ._platform import PLATFORM as PLATFORM
from ._sockets import DatagramSocket as DatagramSocket
from ._sockets import Socket as Socket
from ._sockets import connect as connect
from ._sockets import listen as listen
from ._sockets import pair as pair
from .server import AsyncConnection as AsyncConnection
from .server import Connection as Connection
from .server import Datagram as Datagram
from .server import Server as Server

__version__ = "0.1.0"

__all__ = [
    "PLATFORM",
    "Address",
    "AddressError",
    "AddressInUse",
    "AddressKind",
    "AfunixError",
    "AsyncConnection",
    "Connection",
    "Datagram",
    "DatagramSocket",
    "ListenQueueFull",
    "NoReplyAddress",
    "NoSuchSocket",
    "NotASocket",
    "NothingListening",
    "PeerError",
    "ProtocolError",
    "Server",
    "Socket",
    "UnsupportedFeature",
    "WrongSocketType",
    "__version__",
    "connect",
    "listen",
    "pair",
]
