"""afunix: Unix-domain socket IPC for Python, after Stevens' UNP chapter 15.

Two faces. This module is what most programs need: addresses and sockets
(:func:`listen`, :func:`connect`, :func:`pair`), messages that carry
descriptors (:class:`Channel`, :class:`AsyncChannel`), servers (:class:`Server`),
peers (:func:`peer_credentials`, :class:`TlsPeer`, :class:`PeerPolicy`) and the errors, each an
``OSError`` with its errno. :mod:`afunix.lowlevel` has the calls beneath them
(``send_fds``, ``recv_credentials``, memfd payloads, the platform's facts).

The public API is what ``__all__`` lists; everything else lives in private
modules and may change. ``import afunix`` is cheap: the asyncio parts
(:class:`AsyncChannel`, :class:`Server` and its connections) are imported the
first time they are used, and the broker, the benchmarks and the command line
only when asked for (``import afunix.broker``).
"""

import importlib as _importlib
import typing as _typing
import warnings as _warnings

from . import _core
from ._address import Address as Address
from ._address import AddressKind as AddressKind
from ._cmsg import ControlTruncated as ControlTruncated
from ._connect import connect as connect
from ._creds import PeerCredentials as PeerCredentials
from ._creds import PeerGone as PeerGone
from ._creds import peer_credentials as peer_credentials
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
from ._peer import TlsPeer as TlsPeer
from ._sockets import DatagramSocket as DatagramSocket
from ._sockets import Socket as Socket
from ._sockets import listen as listen
from ._sockets import pair as pair
from .channel import Channel as Channel
from .channel import Listener as Listener
from .channel import Message as Message
from .policy import PeerPolicy as PeerPolicy
from .policy import PolicyError as PolicyError

if _typing.TYPE_CHECKING:  # imported on first use (they load asyncio): see __getattr__
    from ._limits import Limits as Limits
    from .aio import AsyncChannel as AsyncChannel
    from .server import AsyncConnection as AsyncConnection
    from .server import AsyncServer as AsyncServer
    from .server import Connection as Connection
    from .server import Datagram as Datagram
    from .server import Server as Server

__version__ = "0.1.0"

#: Which implementation of the socket core runs, chosen once at import: ``"compiled"``
#: (the C extension ``afunix._ccore``) or ``"pure-python"`` with the reason in brackets,
#: e.g. ``"pure-python (AFUNIX_PURE_PYTHON=1)"``. ``afunix --version`` shows it; the
#: bare name is :data:`afunix.lowlevel.CORE`.
__core__ = _core.CORE + (f" ({_core.WHY})" if _core.WHY else "")

__all__ = [
    "Address",
    "AddressError",
    "AddressInUse",
    "AddressKind",
    "AfunixError",
    "AsyncChannel",
    "AsyncConnection",
    "AsyncServer",
    "Channel",
    "Connection",
    "ControlTruncated",
    "Datagram",
    "DatagramSocket",
    "Limits",
    "ListenQueueFull",
    "Listener",
    "Message",
    "NoReplyAddress",
    "NoSuchSocket",
    "NotASocket",
    "NothingListening",
    "PeerCredentials",
    "PeerError",
    "PeerGone",
    "PeerPolicy",
    "PeerTimeout",
    "PolicyError",
    "ProtocolError",
    "Server",
    "Socket",
    "TlsPeer",
    "TooManyFds",
    "UnsupportedFeature",
    "WrongSocketType",
    "__version__",
    "connect",
    "listen",
    "pair",
    "peer_credentials",
]

#: Public names imported on first use, and the module that defines each.
_LAZY: dict[str, str] = {
    "AsyncChannel": "afunix.aio",
    "AsyncConnection": "afunix.server",
    "AsyncServer": "afunix.server",
    "Connection": "afunix.server",
    "Datagram": "afunix.server",
    "Limits": "afunix._limits",
    "Server": "afunix.server",
}

#: Public submodules imported on first use: those ``import afunix`` used to import (so
#: ``afunix.server.echo`` after a plain ``import afunix`` keeps working) and the low-level face.
_SUBMODULES: frozenset[str] = frozenset({"aio", "lowlevel", "opener", "server"})

#: Names that moved to :mod:`afunix.lowlevel`: they work for one release, and warn.
_MOVED: frozenset[str] = frozenset(
    {
        "PLATFORM",
        "ControlError",
        "CredentialsMessage",
        "CredentialsRefused",
        "HelperError",
        "MemfdBuffer",
        "MemfdPool",
        "PayloadError",
        "ProcessFacts",
        "UnexpectedControl",
        "credential_mechanisms",
        "enable_credentials",
        "my_open",
        "recv_credentials",
        "recv_fds",
        "send_credentials",
        "send_fds",
        "sendall_fds",
    }
)


def __getattr__(name: str) -> object:
    """Import a lazy name or submodule on first use; resolve a moved name, with a warning."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value  # the next lookup does not come here
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"afunix.{name}")
    if name in _MOVED:
        _warnings.warn(
            f"afunix.{name} is deprecated: import it from afunix.lowlevel "
            f"(afunix.lowlevel.{name}); the old name is removed in the next minor release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module("afunix.lowlevel"), name)
    raise AttributeError(f"module 'afunix' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazy ones included before their first use."""
    return sorted(set(globals()) | set(__all__))
