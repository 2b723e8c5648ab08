"""The public faces, pinned: each public module exports exactly its ``PUBLIC`` names.

``afunix`` is what most programs need; ``afunix.lowlevel`` the calls beneath
(design guide, section 6). Changing a table here is changing the API: a name
added is a promise, a name removed breaks programs (move it with a deprecated
alias instead, as :data:`MOVED` does).
"""

from __future__ import annotations
import __future__

import ast
import importlib
import inspect
import json
import subprocess
import sys
import types
import warnings

import pytest

import afunix

#: Every public module (no ``_`` part) that programs import, and its ``__all__``.
#: ``afunix.server`` is left out while it becomes a package (design guide, Phase 2 step 1).
PUBLIC: dict[str, list[str]] = {
    "afunix": [
        # sockets and addresses
        "Address",
        "AddressKind",
        "DatagramSocket",
        "Socket",
        "connect",
        "listen",
        "pair",
        # messages
        "AsyncChannel",
        "Channel",
        "Listener",
        "Message",
        # servers (AsyncServer joins with the async runner)
        "AsyncConnection",
        "AsyncServer",
        "Connection",
        "Datagram",
        "Limits",
        "Server",
        # peers
        "PeerCredentials",
        "PeerPolicy",
        "TlsPeer",
        "peer_credentials",
        # errors, each an OSError with its errno
        "AddressError",
        "AddressInUse",
        "AfunixError",
        "ControlTruncated",
        "ListenQueueFull",
        "NoReplyAddress",
        "NoSuchSocket",
        "NotASocket",
        "NothingListening",
        "PeerError",
        "PeerGone",
        "PeerTimeout",
        "PolicyError",
        "ProtocolError",
        "TooManyFds",
        "UnsupportedFeature",
        "WrongSocketType",
        "__version__",
    ],
    "afunix.lowlevel": [
        # descriptors
        "send_fds",
        "sendall_fds",
        "recv_fds",
        "Received",
        "describe_fd",
        "FdInfo",
        "close_fds",
        "SCM_MAX_FD",
        "ControlError",
        "UnexpectedControl",
        # credentials
        "enable_credentials",
        "recv_credentials",
        "send_credentials",
        "CredentialsMessage",
        "CredentialsRefused",
        "ProcessFacts",
        "credential_mechanisms",
        "credstructs",
        # payloads
        "MemfdBuffer",
        "MemfdPool",
        "PayloadError",
        # the system
        "PLATFORM",
        "Platform",
        "socket_type",
        "type_name",
        "strerror",
        "notify",
        "CORE",
        # the book's opener
        "my_open",
        "openfile_main",
        "HelperError",
        # typing
        "AddressLike",
        "FdLike",
        "SocketTypeLike",
        # tls:// byte streams (issue 18)
        "TlsSocket",
        "connect_tls",
    ],
    "afunix.channel": ["Channel", "Listener", "Message"],
    "afunix.aio": ["AsyncChannel"],
    "afunix.policy": ["Decision", "PeerPolicy", "PolicyError"],
    "afunix.opener": ["DEFAULT_HELPER", "HelperError", "HelperLike", "my_open", "openfile_main"],
    "afunix.broker": [
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
    ],
    "afunix.broker.policy": [
        "MAX_PATH",
        "OPERATIONS",
        "AccessDecision",
        "BrokerLimits",
        "PathRefused",
        "Policy",
        "PolicyFileError",
        "Rule",
        "Subject",
        "load_policy",
        "parse_policy",
        "split_path",
    ],
    "afunix.broker.client": ["AsyncClient", "BrokerError", "Client", "mode_to_flags"],
    "afunix.broker.audit": [
        "MAX_ITEMS",
        "MAX_LINE",
        "MAX_SHOWN",
        "REFUSAL_BYTES",
        "REFUSAL_WINDOW",
        "AuditError",
        "AuditLog",
        "errno_name",
        "text",
    ],
    "afunix.broker.flags": [
        "KNOWN",
        "MAX_MODE",
        "FlagError",
        "Wire",
        "check",
        "describe",
        "from_os_flags",
        "kernel_flags",
        "operations",
        "to_os_flags",
    ],
    "afunix.bench": [
        "CASES",
        "IMPLS",
        "Cell",
        "Options",
        "Run",
        "plot",
        "render_markdown",
        "render_plain",
        "render_rich",
        "run_bench",
        "run_from_json",
        "targets",
        "to_json",
        "uds_vs_tcp",
    ],
    "afunix.probe": ["DUMPS", "EXIT_STATUS", "ProbeResult", "probe"],
    "afunix.diag": [
        "SHOW_ALL",
        "STATE_NAMES",
        "TCP_CLOSE",
        "TCP_ESTABLISHED",
        "TCP_LISTEN",
        "TYPE_NAMES",
        "Holder",
        "UnixSocketInfo",
        "build_request",
        "dump",
        "dump_or_fallback",
        "holders",
        "kernel_dev_to_user",
        "parse_messages",
        "parse_proc_net_unix",
        "parse_unix_diag_msg",
    ],
    "afunix.relay": [
        "SCHEMA",
        "TO_CLIENT",
        "TO_SERVER",
        "Event",
        "FrameTracker",
        "Relay",
        "Sink",
        "client_identity",
        "decode_packet_frame",
        "describe_passed_fd",
        "preview",
    ],
}

#: Faces: modules of re-exports only. Every public attribute is in ``__all__``
#: (or is a submodule, or ``from __future__ import annotations``).
FACES = ("afunix", "afunix.lowlevel", "afunix.broker", "afunix.bench")

#: Old name -> (module it was in, where it is now). Each works for one release and warns.
MOVED: dict[tuple[str, str], str] = {
    **{
        ("afunix", name): f"afunix.lowlevel.{name}"
        for name in (
            "PLATFORM",
            "ControlError",
            "UnexpectedControl",
            "CredentialsMessage",
            "CredentialsRefused",
            "HelperError",
            "MemfdBuffer",
            "MemfdPool",
            "PayloadError",
            "ProcessFacts",
            "credential_mechanisms",
            "enable_credentials",
            "my_open",
            "recv_credentials",
            "recv_fds",
            "send_credentials",
            "send_fds",
            "sendall_fds",
        )
    },
    ("afunix.broker", "Limits"): "afunix.broker.BrokerLimits",
    ("afunix.broker", "PolicyError"): "afunix.broker.PolicyFileError",
    ("afunix.broker.policy", "Limits"): "afunix.broker.policy.BrokerLimits",
    ("afunix.broker.policy", "PolicyError"): "afunix.broker.policy.PolicyFileError",
    ("afunix.broker.policy", "Decision"): "afunix.broker.policy.AccessDecision",
}


def _resolve(dotted: str) -> object:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _defined_in(module: types.ModuleType) -> set[str]:
    """Top-level names a module's own source defines (``def``, ``class``, assignments)."""
    names: set[str] = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_the_table_lists_each_module_once_without_duplicates() -> None:
    assert len(PUBLIC["afunix"]) == 39  # the design guide's 38, and TlsPeer (issue 18)
    assert len(PUBLIC["afunix.lowlevel"]) == 36  # and TlsSocket, connect_tls (issue 18), CORE (16)
    for module, names in PUBLIC.items():
        assert len(set(names)) == len(names), module
        assert not any(part.startswith("_") for part in module.split(".")), module


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_pinned(module: str) -> None:
    mod = importlib.import_module(module)
    assert len(set(mod.__all__)) == len(mod.__all__), f"{module}.__all__ has duplicates"
    assert sorted(mod.__all__) == sorted(PUBLIC[module])
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"


@pytest.mark.parametrize("module", FACES)
def test_a_face_has_nothing_public_outside_all(module: str) -> None:
    mod = importlib.import_module(module)
    loose = []
    for name, value in vars(mod).items():
        if name.startswith("_") or name in mod.__all__:
            continue
        if isinstance(value, types.ModuleType) and value.__name__.startswith(f"{module}."):
            continue  # a submodule, set by the import system
        if name == "annotations" and value is __future__.annotations:
            continue
        loose.append(name)
    assert not loose, f"{module} has public names outside __all__: {loose}"


@pytest.mark.parametrize("module", sorted(set(PUBLIC) - set(FACES)))
def test_a_module_defines_nothing_public_outside_all(module: str) -> None:
    """What a module defines itself is in ``__all__`` or has a ``_`` name (names it imports
    are the other module's: ``channel.py`` and ``aio.py`` still import many)."""
    mod = importlib.import_module(module)
    loose = sorted(n for n in _defined_in(mod) if not n.startswith("_") and n not in mod.__all__)
    assert not loose, f"{module} defines public names outside __all__: {loose}"


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()), ids=lambda v: str(v))
def test_a_moved_name_resolves_to_the_same_object_and_warns(old: tuple[str, str], new: str) -> None:
    module, name = old
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} is deprecated") as seen:
        value = getattr(mod, name)
    assert value is _resolve(new)
    assert new.rpartition(".")[0] in str(seen[0].message), "the warning names the new place"
    assert name not in mod.__all__ and name not in vars(mod) and name not in dir(mod)


def test_from_import_of_a_moved_name_warns_too() -> None:
    with pytest.warns(DeprecationWarning, match=r"afunix\.lowlevel\.send_fds"):
        from afunix import send_fds
    assert send_fds is afunix.lowlevel.send_fds


def test_unknown_names_are_attribute_errors() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(afunix, "no_such_name")
        with pytest.raises(AttributeError, match="module 'afunix' has no attribute 'Limit'"):
            afunix.Limit


def test_errors_are_oserrors_with_errno() -> None:
    for module in ("afunix", "afunix.lowlevel", "afunix.broker"):
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                assert issubclass(obj, OSError), f"{module}.{name}"


def test_faces_re_export_the_implementing_objects() -> None:
    import afunix._cmsg
    import afunix._credstructs
    import afunix._notify
    import afunix.lowlevel as lowlevel

    assert lowlevel.close_fds is afunix._cmsg.close_fds
    assert lowlevel.notify is afunix._notify.notify
    assert lowlevel.credstructs is afunix._credstructs
    assert afunix.Server is importlib.import_module("afunix.server").Server


IMPORT_AFUNIX = """
import json, sys
import afunix
loaded = [m for m in ("asyncio", "afunix.broker", "afunix.bench", "afunix.cli",
                      "afunix.server", "afunix.aio") if m in sys.modules]
before = "Server" in vars(afunix)
listed = "Server" in dir(afunix) and "send_fds" not in dir(afunix)
afunix.Server
print(json.dumps([loaded, before, listed, "asyncio" in sys.modules, "Server" in vars(afunix)]))
"""


def test_import_afunix_is_lazy() -> None:
    """``import afunix`` loads neither asyncio nor the broker, benchmarks or CLI; the
    asyncio parts come on first use (and stay)."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_AFUNIX], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    loaded, before, listed, asyncio_after, kept = json.loads(out.stdout)
    assert loaded == [], f"import afunix loaded {loaded}"
    assert not before and listed
    assert asyncio_after and kept


def test_submodules_import_afunix_used_to_load_are_still_attributes() -> None:
    """``import afunix`` loaded ``afunix.server``, ``.aio`` and ``.opener`` before it became
    lazy; programs that use ``afunix.server.echo`` after a plain ``import afunix`` work."""
    code = (
        "import sys, afunix\n"
        "assert 'afunix.server' not in sys.modules\n"
        "print(afunix.server.echo.__module__, afunix.aio.AsyncChannel.__name__,"
        " afunix.opener.my_open.__name__, afunix.lowlevel.send_fds.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=30
    )
    assert out.stdout.split() == [
        "afunix.server.handlers",
        "AsyncChannel",
        "my_open",
        "send_fds",
    ], out.stderr


def test_core_imports_only_the_standard_library() -> None:
    code = (
        "import sys, afunix, afunix.lowlevel, afunix.server\n"
        "bad = [m for m in ('rich', 'matplotlib', 'zmq', 'uvloop', 'anyio', 'trio')"
        " if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[]", out
