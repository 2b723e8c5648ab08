"""afunix: Unix-domain socket IPC for Python, after Stevens' UNP chapter 15.

The public API is what ``__all__`` lists; everything else lives in private
modules and may change. Start with :func:`listen`, :func:`connect`,
:func:`pair` and :class:`Server`.
"""

from ._address import Address as Address
from ._address import AddressKind as AddressKind
from ._cmsg import ControlError as ControlError
from ._cmsg import ControlTruncated as ControlTruncated
from ._cmsg import UnexpectedControl as UnexpectedControl
from ._creds import CredentialsMessage as CredentialsMessage
from ._creds import CredentialsRefused as CredentialsRefused
from ._creds import PeerCredentials as PeerCredentials
from ._creds import PeerGone as PeerGone
from ._creds import ProcessFacts as ProcessFacts
from ._creds import credential_mechanisms as credential_mechanisms
from ._creds import enable_credentials as enable_credentials
from ._creds import peer_credentials as peer_credentials
from ._creds import recv_credentials as recv_credentials
from ._creds import send_credentials as send_credentials
from ._errors import AddressError as AddressError
from ._errors import AddressInUse as AddressInUse
from ._errors import AfunixError as AfunixError
from ._errors import ListenQueueFull as ListenQueueFull
from ._errors import NoReplyAddress as NoReplyAddress
from ._errors import NoSuchSocket as NoSuchSocket
from ._errors import NotASocket as NotASocket
from ._errors import NothingListening as NothingListening
from ._errors import PeerError as PeerError
from ._errors import PeerTimeout as PeerTimeout
from ._errors import ProtocolError as ProtocolError
from ._errors import UnsupportedFeature as UnsupportedFeature
from ._errors import WrongSocketType as WrongSocketType
from ._fds import TooManyFds as TooManyFds
from ._fds import recv_fds as recv_fds
from ._fds import send_fds as send_fds
from ._fds import sendall_fds as sendall_fds
from ._memfd import MemfdBuffer as MemfdBuffer
from ._memfd import MemfdPool as MemfdPool
from ._memfd import PayloadError as PayloadError
from ._platform import PLATFORM as PLATFORM
from ._sockets import DatagramSocket as DatagramSocket
from ._sockets import Socket as Socket
from ._sockets import connect as connect
from ._sockets import listen as listen
from ._sockets import pair as pair
from .aio import AsyncChannel as AsyncChannel
from .channel import Channel as Channel
from .channel import Listener as Listener
from .channel import Message as Message
from .opener import HelperError as HelperError
from .opener import my_open as my_open
from .policy import PeerPolicy as PeerPolicy
from .policy import PolicyError as PolicyError
from .server import AsyncConnection as AsyncConnection
from .server import Connection as Connection
from .server import Datagram as Datagram
from .server import Limits as Limits
from .server import Server as Server

__version__ = "0.1.0"

#: Which implementation of the socket core runs: ``"pure-python"`` (the only one
#: today). A compiled core, when there is one, is chosen once at import and named
#: here; ``afunix --version`` shows it.
__core__ = "pure-python"

__all__ = [
    "PLATFORM",
    "Address",
    "AddressError",
    "AddressInUse",
    "AddressKind",
    "AfunixError",
    "AsyncChannel",
    "AsyncConnection",
    "Channel",
    "Connection",
    "ControlError",
    "ControlTruncated",
    "CredentialsMessage",
    "CredentialsRefused",
    "Datagram",
    "DatagramSocket",
    "HelperError",
    "Limits",
    "ListenQueueFull",
    "Listener",
    "MemfdBuffer",
    "MemfdPool",
    "Message",
    "NoReplyAddress",
    "NoSuchSocket",
    "NotASocket",
    "NothingListening",
    "PayloadError",
    "PeerCredentials",
    "PeerError",
    "PeerGone",
    "PeerPolicy",
    "PeerTimeout",
    "PolicyError",
    "ProcessFacts",
    "ProtocolError",
    "Server",
    "Socket",
    "TooManyFds",
    "UnexpectedControl",
    "UnsupportedFeature",
    "WrongSocketType",
    "__version__",
    "connect",
    "credential_mechanisms",
    "enable_credentials",
    "listen",
    "my_open",
    "pair",
    "peer_credentials",
    "recv_credentials",
    "recv_fds",
    "send_credentials",
    "send_fds",
    "sendall_fds",
]
