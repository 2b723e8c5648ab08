"""afunix's low-level face: the calls beneath channels and servers.

What most programs need is in :mod:`afunix`. This module holds what programs
that manage descriptors and credentials themselves use (the broker and the
``afunix`` command among them)::

    from afunix.lowlevel import recv_fds, send_fds

    send_fds(sock, b"x", [f, 0])                 # UNP 15.7: SCM_RIGHTS on the first byte
    data, fds, flags, address = recv_fds(peer, 100, maxfds=2)

* descriptors: :func:`send_fds`, :func:`sendall_fds`, :func:`recv_fds`
  (:class:`Received`), :func:`describe_fd` (:class:`FdInfo`), :func:`close_fds`,
  :data:`SCM_MAX_FD`, :class:`ControlError`, :class:`UnexpectedControl`;
* credentials: :func:`enable_credentials`, :func:`recv_credentials`,
  :func:`send_credentials`, :class:`CredentialsMessage`, :class:`CredentialsRefused`,
  :class:`ProcessFacts`, :func:`credential_mechanisms`, and :mod:`credstructs`
  (every system's credential structures, parsed from bytes);
* payloads: :class:`MemfdBuffer`, :class:`MemfdPool`, :class:`PayloadError`;
* the system: :data:`PLATFORM` (:class:`Platform`), :func:`socket_type`,
  :func:`type_name`, :func:`strerror`, :func:`notify` (``sd_notify``), and
  :data:`CORE`, the core that runs (``"compiled"`` or ``"pure-python"``; set
  ``AFUNIX_PURE_PYTHON=1`` before importing afunix to force the pure one);
* the book's opener: :func:`my_open`, :func:`openfile_main`, :class:`HelperError`;
* ``tls://`` byte streams: :func:`connect_tls` (:class:`TlsSocket`; channels take
  ``ssl=`` themselves);
* typing: :data:`AddressLike`, :data:`FdLike`, :data:`SocketTypeLike`.

Each name is re-exported from the private module that implements it. Eighteen
of them were in :mod:`afunix` before; ``afunix.send_fds`` and the others still
work for one release and warn (``DeprecationWarning``) with the new place.
"""

from __future__ import annotations

from . import _credstructs as credstructs
from ._address import AddressLike as AddressLike
from ._cmsg import SCM_MAX_FD as SCM_MAX_FD
from ._cmsg import ControlError as ControlError
from ._cmsg import FdLike as FdLike
from ._cmsg import UnexpectedControl as UnexpectedControl
from ._cmsg import close_fds as close_fds
from ._connect import connect_tls as connect_tls
from ._core import CORE as CORE
from ._creds import CredentialsMessage as CredentialsMessage
from ._creds import CredentialsRefused as CredentialsRefused
from ._creds import ProcessFacts as ProcessFacts
from ._creds import credential_mechanisms as credential_mechanisms
from ._creds import enable_credentials as enable_credentials
from ._creds import recv_credentials as recv_credentials
from ._creds import send_credentials as send_credentials
from ._errors import strerror as strerror
from ._fds import FdInfo as FdInfo
from ._fds import Received as Received
from ._fds import describe_fd as describe_fd
from ._fds import recv_fds as recv_fds
from ._fds import send_fds as send_fds
from ._fds import sendall_fds as sendall_fds
from ._memfd import MemfdBuffer as MemfdBuffer
from ._memfd import MemfdPool as MemfdPool
from ._memfd import PayloadError as PayloadError
from ._notify import notify as notify
from ._platform import PLATFORM as PLATFORM
from ._platform import Platform as Platform
from ._sockets import SocketTypeLike as SocketTypeLike
from ._sockets import socket_type as socket_type
from ._sockets import type_name as type_name
from ._tlsio import TlsSocket as TlsSocket
from .opener import HelperError as HelperError
from .opener import my_open as my_open
from .opener import openfile_main as openfile_main

__all__ = [
    "CORE",
    "PLATFORM",
    "SCM_MAX_FD",
    "AddressLike",
    "ControlError",
    "CredentialsMessage",
    "CredentialsRefused",
    "FdInfo",
    "FdLike",
    "HelperError",
    "MemfdBuffer",
    "MemfdPool",
    "PayloadError",
    "Platform",
    "ProcessFacts",
    "Received",
    "SocketTypeLike",
    "TlsSocket",
    "UnexpectedControl",
    "close_fds",
    "connect_tls",
    "credential_mechanisms",
    "credstructs",
    "describe_fd",
    "enable_credentials",
    "my_open",
    "notify",
    "openfile_main",
    "recv_credentials",
    "recv_fds",
    "send_credentials",
    "send_fds",
    "sendall_fds",
    "socket_type",
    "strerror",
    "type_name",
]
