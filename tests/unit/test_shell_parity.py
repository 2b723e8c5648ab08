"""The blocking and the asyncio classes have the same public face.

For each pair below (design guide, section 4.5) the public names are the
same, but for the listed allowed differences; every shared callable takes
the same parameters (name, kind, default) in the same order; what is a
property, a classmethod or a plain method on one side is the same on the
other; and the asyncio side awaits exactly the calls that wait (the sync
side awaits none). So a fix or an option added to one class and forgotten
in the other fails here, not in a user's program.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from afunix import AsyncChannel, Channel
from afunix.broker import AsyncClient, Client
from afunix.server import AsyncConnection, Connection

#: (sync, asyncio, names only on the sync side, names only on the asyncio side,
#: the asyncio side's coroutine methods).
PAIRS: list[tuple[type[Any], type[Any], set[str], set[str], set[str]]] = [
    (
        Channel,
        AsyncChannel,
        {"listen"},  # a Listener's accept() is blocking; AsyncChannel has no listener yet
        {"aclose"},  # flushes held messages with awaits, then closes
        {"aclose", "connect", "flush", "recv", "send", "send_buffer"},
    ),
    (Connection, AsyncConnection, set(), set(), {"recv", "send"}),
    (Client, AsyncClient, set(), set(), {"listdir", "open", "open_fd", "request"}),
]
IDS = [sync.__name__ for sync, *_ in PAIRS]
#: Protocol methods: context manager and iteration, sync and async spellings.
SYNC_PROTOCOL = {"__enter__": "__aenter__", "__exit__": "__aexit__", "__iter__": "__aiter__"}


def public(cls: type[Any]) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")} | {"__init__"}


def parameters(func: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


def kind_of(cls: type[Any], name: str) -> str:
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, property):
        return "property"
    if isinstance(raw, classmethod):
        return "classmethod"
    if isinstance(raw, staticmethod):
        return "staticmethod"
    return "method" if callable(raw) else "attribute"


@pytest.mark.parametrize(("sync", "aio", "sync_only", "aio_only", "awaited"), PAIRS, ids=IDS)
def test_same_public_names(
    sync: type[Any], aio: type[Any], sync_only: set[str], aio_only: set[str], awaited: set[str]
) -> None:
    assert public(sync) - public(aio) == sync_only
    assert public(aio) - public(sync) == aio_only


@pytest.mark.parametrize(("sync", "aio", "sync_only", "aio_only", "awaited"), PAIRS, ids=IDS)
def test_same_signatures_and_kinds(
    sync: type[Any], aio: type[Any], sync_only: set[str], aio_only: set[str], awaited: set[str]
) -> None:
    for name in sorted(public(sync) & public(aio)):
        assert kind_of(sync, name) == kind_of(aio, name), name
        ours, theirs = getattr(sync, name), getattr(aio, name)
        if callable(ours) and not isinstance(ours, type):
            assert parameters(ours) == parameters(theirs), (
                f"{sync.__name__}.{name}{inspect.signature(ours)} vs "
                f"{aio.__name__}.{name}{inspect.signature(theirs)}"
            )


@pytest.mark.parametrize(("sync", "aio", "sync_only", "aio_only", "awaited"), PAIRS, ids=IDS)
def test_the_asyncio_side_awaits_what_waits(
    sync: type[Any], aio: type[Any], sync_only: set[str], aio_only: set[str], awaited: set[str]
) -> None:
    def coroutines(cls: type[Any]) -> set[str]:
        return {n for n in public(cls) if inspect.iscoroutinefunction(getattr(cls, n))}

    assert coroutines(aio) == awaited
    assert coroutines(sync) == set()


@pytest.mark.parametrize(("sync", "aio", "sync_only", "aio_only", "awaited"), PAIRS, ids=IDS)
def test_protocols_have_their_async_spelling(
    sync: type[Any], aio: type[Any], sync_only: set[str], aio_only: set[str], awaited: set[str]
) -> None:
    for name, async_name in SYNC_PROTOCOL.items():
        if hasattr(sync, name):
            assert hasattr(aio, async_name), (
                f"{sync.__name__} has {name}, {aio.__name__} no {async_name}"
            )
    if hasattr(aio, "__aiter__"):
        assert hasattr(aio, "__anext__") or inspect.isasyncgenfunction(aio.__aiter__)
