"""afunix.broker's public face: a subpackage, not re-exported; stdlib only; OSError errors."""

from __future__ import annotations

import subprocess
import sys

import afunix
import afunix.broker


def test_all_names_exist_sorted_unique() -> None:
    names = afunix.broker.__all__
    assert names == sorted(names) and len(set(names)) == len(names)
    for name in names:
        assert hasattr(afunix.broker, name), name


def test_errors_are_oserrors_with_errno() -> None:
    from afunix.broker.confine import ConfinementError
    from afunix.broker.flags import FlagError
    from afunix.broker.policy import PathRefused

    for cls in (
        afunix.broker.PolicyFileError,
        afunix.broker.BrokerError,
        afunix.broker.AuditError,
        FlagError,
        PathRefused,
        ConfinementError,
    ):
        assert issubclass(cls, OSError), cls
    assert FlagError(22, "x").errno == 22


def test_the_top_level_package_does_not_import_the_broker() -> None:
    code = "import sys, afunix; print('afunix.broker' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr
    assert not any("broker" in n.lower() for n in afunix.__all__)


def test_the_broker_imports_only_the_standard_library() -> None:
    code = (
        "import sys, afunix.broker, afunix.broker.server, afunix.broker.client\n"
        "print([m for m in ('rich', 'matplotlib', 'zmq', 'uvloop', 'hypothesis') "
        "if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[]", out.stderr


def test_sans_io_modules_do_no_socket_io() -> None:
    """policy, flags and protocol import no socket I/O (checked in their source)."""
    import ast
    from pathlib import Path

    forbidden = {"socket", "selectors", "asyncio", "_fds", "_sockets", "server", "client"}
    here = Path(afunix.broker.__file__).parent
    for name in ("policy.py", "flags.py", "protocol.py"):
        tree = ast.parse((here / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] + [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[-1] not in forbidden, (name, mod)


def test_renamed_names_keep_working_for_one_release_and_warn() -> None:
    """``Limits``, ``PolicyError`` and ``Decision`` collided with names of ``afunix``."""
    import pytest

    import afunix.broker.policy as policy

    renamed = [
        (afunix.broker, "Limits", policy.BrokerLimits),
        (afunix.broker, "PolicyError", policy.PolicyFileError),
        (policy, "Limits", policy.BrokerLimits),
        (policy, "PolicyError", policy.PolicyFileError),
        (policy, "Decision", policy.AccessDecision),
    ]
    for module, old, new in renamed:
        with pytest.warns(DeprecationWarning, match=rf"{module.__name__}\.{old} is deprecated"):
            assert getattr(module, old) is new
        assert old not in module.__all__ and old not in vars(module)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        policy.Nope


def test_a_bad_policy_file_is_an_afunix_policy_error() -> None:
    """One ``except afunix.PolicyError`` catches a peer policy's and the broker's."""
    import errno

    import pytest

    from afunix.broker import PolicyFileError, parse_policy

    assert issubclass(PolicyFileError, afunix.PolicyError)
    try:
        parse_policy("version = 1\n[limits]\nburst = 0\n", "/etc/afunix/broker.toml")
    except afunix.PolicyError as exc:
        caught: afunix.PolicyError = exc
    else:
        pytest.fail("an invalid policy was accepted")
    assert isinstance(caught, PolicyFileError)
    assert caught.errno == errno.EINVAL and isinstance(caught, ValueError)
    assert caught.filename == "/etc/afunix/broker.toml"
    assert str(caught).startswith("invalid policy /etc/afunix/broker.toml, line 3: ")
    assert str(caught).endswith("[EINVAL]")
