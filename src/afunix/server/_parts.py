"""What :class:`~afunix.Server` and :class:`~afunix.server.AsyncServer` share.

Both fronts take the same options, build the same two parts (an
:class:`~afunix.server._admission.Admission` and a
:class:`~afunix.server._listener.ListeningSocket`) and show the same
attributes, which read and write the part that keeps them (:class:`Part`,
gathered in :class:`ServerParts`). The option checks (:func:`check_options`)
run before any socket exists; :func:`open_listener` binds (or inherits) the
listener and closes it again if admission cannot work on it.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any, Generic, TypeVar, cast, overload

from .._address import Address, AddressLike
from .._sockets import SocketTypeLike, socket_type
from ..policy import PeerPolicy
from ._admission import Admission, Verifier
from ._connection import Handler, Model
from ._listener import ListeningSocket
from ._threads import THREAD_MAX_CLIENTS

__all__ = ["Part", "ServerParts", "check_options", "is_async", "open_listener"]

T = TypeVar("T")


class Part(Generic[T]):
    """An attribute of a server that one of its parts keeps: read and written there."""

    def __init__(self, part: str, doc: str) -> None:
        self.part = part
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Part[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object, owner: type | None = None) -> T | Part[T]:
        if obj is None:
            return self
        return cast(T, getattr(getattr(obj, self.part), self.name))

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class ServerParts:
    """The attributes of both server classes; each lives in ``_admission`` or ``_listener``.

    Admission settings (``policy``, ``verify``, ``max_clients``,
    ``max_clients_per_uid``, ``refuse_with``) may be changed while serving:
    the next client is judged by the new value (the broker lowers its per-uid
    cap on reload this way).
    """

    _admission: Admission
    _listener: ListeningSocket
    #: The listening socket (an :class:`afunix.Socket` unless ``sock=`` gave another).
    sock: socket.socket
    #: Where it listens.
    address: Address
    #: How the listening socket was obtained: "given", "handoff", "activation", "bound".
    origin: str

    policy: Part[PeerPolicy | None] = Part("_admission", "Who may connect (``policy=``).")
    verify: Part[Verifier | None] = Part("_admission", "The ``verify(sock, peer)`` hook, after it.")
    max_clients: Part[int | None] = Part("_admission", "Clients served at once.")
    max_clients_per_uid: Part[int | None] = Part(
        "_admission",
        "Connections one uid may hold at once (see :attr:`uid_limit`); ``None``: no cap.",
    )
    refuse_with: Part[bytes] = Part(
        "_admission",
        "Sent, best effort and without waiting, to a client refused by the per-uid cap.",
    )
    uid_limit: Part[int | None] = Part("_admission", Admission.uid_limit.__doc__ or "")
    served: Part[int] = Part(
        "_admission", "Connections served so far (accepted, handed to a handler)."
    )
    rejected: Part[int] = Part(
        "_admission", "Connections (and datagrams) refused by ``policy`` or ``verify``."
    )
    hung_up: Part[int] = Part(
        "_admission",
        "Clients dropped at accept because they had already hung up, sending nothing "
        "(with a per-uid cap only; they would hold a slot for nothing).",
    )
    refused: Part[dict[str, int]] = Part(
        "_admission",
        "Clients turned away before any handler ran, by reason: ``uid-limit`` "
        "(:attr:`uid_limit`), ``no-thread`` (a thread could not be started), "
        "``no-process`` (``fork()`` failed). Each is logged in aggregate.",
    )
    fdstore: Part[bool] = Part("_listener", "Park the listener with systemd (``FDSTORE=1``).")
    handed_over_to: Part[int | None] = Part(
        "_listener", "The successor's pid after a :meth:`hand_over`."
    )

    def shutdown(self) -> None:
        """Ask the server to stop (thread- and signal-safe); returns at once.

        It stops accepting, lets connections in flight finish for up to
        ``shutdown_timeout`` seconds, then closes the rest and the listener.
        Callable from any thread, from a ``signal.signal`` handler, or from a
        task; before serving starts, serving ends as soon as it begins.
        """
        self._listener.request_stop()


def is_async(handler: Handler) -> bool:
    """Whether *handler* is an ``async def`` function (or an object with one as ``__call__``)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    )


def check_options(
    handler: Handler,
    model: Model,
    type: SocketTypeLike,
    *,
    max_clients: int | None,
    max_clients_per_uid: int | None,
    backlog: int | None,
    event_loop: str,
) -> tuple[int, int | None]:
    """Check a server's options before any socket exists; the socket type and
    ``max_clients`` (``model="thread"``: :data:`THREAD_MAX_CLIENTS` unless given)."""
    if model not in ("asyncio", "thread", "fork"):
        raise ValueError(f"unknown model {model!r}: use 'asyncio', 'thread' or 'fork'")
    asynchronous = is_async(handler)
    if model == "asyncio" and not asynchronous:
        raise TypeError(
            "model='asyncio' needs an 'async def' handler; for a plain function pass "
            "model='thread' or model='fork'"
        )
    if model != "asyncio" and asynchronous:
        raise TypeError(f"model={model!r} needs a plain function, not an 'async def' handler")
    if max_clients is not None and max_clients < 1:
        raise ValueError("max_clients must be at least 1")
    if max_clients is None and model == "thread":
        max_clients = THREAD_MAX_CLIENTS
    if max_clients_per_uid is not None and max_clients_per_uid < 1:
        raise ValueError("max_clients_per_uid must be at least 1")
    if backlog is not None and backlog < 0:
        raise ValueError(f"backlog must be 0 or more, not {backlog}")
    sock_type = socket_type(type)
    if max_clients_per_uid is not None and sock_type == socket.SOCK_DGRAM:
        raise ValueError("max_clients_per_uid counts connections: a datagram server has none")
    if event_loop not in ("asyncio", "uvloop"):
        raise ValueError(f"unknown event loop {event_loop!r}: use 'asyncio' or 'uvloop'")
    return sock_type, max_clients


def open_listener(
    address: AddressLike,
    sock_type: int,
    admission: Admission,
    *,
    sock: socket.socket | None,
    inherit: bool,
    fdstore: bool,
    **bind: Any,
) -> ListeningSocket:
    """The listener (:meth:`ListeningSocket.acquire`); closed if admission cannot work."""
    listener = ListeningSocket.acquire(address, sock_type, sock=sock, inherit=inherit, **bind)
    listener.fdstore = fdstore
    try:
        admission.prepare(listener.sock, listener.address, sock_type, tls=listener.tls)
    except BaseException:
        listener.close()
        raise
    return listener
