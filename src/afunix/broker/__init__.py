"""The descriptor broker: UNP 15.7's ``my_open``/``openfile`` grown into a daemon.

A privileged process (the broker) opens files on behalf of unprivileged or
sandboxed clients, according to a policy, and passes the descriptors back
over a Unix socket, as OpenSSH's privilege-separation monitor, Chromium's
syscall broker and desktop portals do. ``docs/broker.md`` has the setup, the
policy format, the wire protocol and the threat model.

Modules: :mod:`~afunix.broker.policy` (TOML rules, default deny),
:mod:`~afunix.broker.flags` (open flags, checked), :mod:`~afunix.broker.confine`
(``openat2`` beneath a root, or its fallback), :mod:`~afunix.broker.protocol`
(sans-IO frames), :mod:`~afunix.broker.audit` (JSON lines),
:mod:`~afunix.broker.server` (the daemon) and :mod:`~afunix.broker.client`.
"""

from .audit import AuditError as AuditError
from .audit import AuditLog as AuditLog
from .client import AsyncClient as AsyncClient
from .client import BrokerError as BrokerError
from .client import Client as Client
from .policy import Limits as Limits
from .policy import Policy as Policy
from .policy import PolicyError as PolicyError
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
    "Client",
    "Limits",
    "Policy",
    "PolicyError",
    "Rule",
    "load_policy",
    "parse_policy",
]
