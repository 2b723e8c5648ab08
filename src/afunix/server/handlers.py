"""Echo handlers, one per model and socket type: for tests, tours and ``afunix serve``."""

from __future__ import annotations

import socket

from ._connection import AsyncConnection, Connection, Datagram, Handler, Model

__all__ = ["async_datagram_echo", "async_echo", "datagram_echo", "echo", "echo_handler"]


def echo(conn: Connection) -> None:
    """The classic echo handler for ``thread``/``fork`` stream and seqpacket servers."""
    for chunk in conn:
        conn.send(chunk)


async def async_echo(conn: AsyncConnection) -> None:
    """The classic echo handler for ``asyncio`` stream and seqpacket servers."""
    while chunk := await conn.recv():
        await conn.send(chunk)


def datagram_echo(dgram: Datagram) -> bytes:
    """Echo a datagram back to its sender."""
    return dgram.data


async def async_datagram_echo(dgram: Datagram) -> bytes:
    """Echo a datagram back to its sender (asyncio model)."""
    return dgram.data


def echo_handler(model: Model, sock_type: int) -> Handler:
    """The echo handler that fits *model* and *sock_type*."""
    if sock_type == socket.SOCK_DGRAM:
        return async_datagram_echo if model == "asyncio" else datagram_echo
    return async_echo if model == "asyncio" else echo
