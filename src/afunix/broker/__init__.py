"""The descriptor broker: UNP 15.7's ``my_open``/``openfile`` grown into a daemon.

A privileged process (the broker) opens files on behalf of unprivileged or
sandboxed clients, according to a policy, and passes the descriptors back
over a Unix socket, as OpenSSH's privilege-separation monitor, Chromium's
syscall broker and desktop portals do. ``docs/broker.md`` has the setup, the
policy format, the wire protocol and the threat model.

Modules: :mod:`~afunix.broker.policy` (TOML rules, default deny),
:mod:`~afunix.broker.flags` (open flags, checked), :mod:`~afunix.broker.confine`
(``openat2`` beneath a root, or its fallback), :mod:`~afunix.broker.protocol`
(request and reply bodies, sans-IO; channels frame them),
:mod:`~afunix.broker.audit` (JSON lines), :mod:`~afunix.broker.server` (the
daemon) and :mod:`~afunix.broker.client`.

``Limits`` and ``PolicyError`` were renamed :class:`BrokerLimits` and
:class:`PolicyFileError` (a subclass of :class:`afunix.PolicyError`), so that no
name means one thing in ``afunix`` and another here; the old names work for one
release and warn (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings as _warnings

from .audit import AuditError as AuditError
from .audit import AuditLog as AuditLog
from .client import AsyncClient as AsyncClient
from .client import BrokerError as BrokerError
from .client import Client as Client
from .policy import BrokerLimits as BrokerLimits
from .policy import Policy as Policy
from .policy import PolicyFileError as PolicyFileError
from .policy import Rule as Rule
from .policy import load_policy as load_policy
from .policy import parse_policy as parse_policy
from .server import Broker as Broker

__all__ = [
    "AsyncClient",
    "AuditError",
    "AuditLog",
    "Broker",
    "BrokerError",
    "BrokerLimits",
    "Client",
    "Policy",
    "PolicyFileError",
    "Rule",
    "load_policy",
    "parse_policy",
]

_RENAMED = {"Limits": "BrokerLimits", "PolicyError": "PolicyFileError"}


def __getattr__(name: str) -> object:
    new = _RENAMED.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _warnings.warn(
        f"afunix.broker.{name} is deprecated: it is now afunix.broker.{new} "
        "(the old name is removed in the next minor release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return globals()[new]
