"""The public face: every name in ``__all__`` exists, and nothing private leaks in."""

from __future__ import annotations

import afunix


def test_all_names_exist() -> None:
    for name in afunix.__all__:
        assert hasattr(afunix, name), name


def test_all_is_sorted_and_unique() -> None:
    assert len(set(afunix.__all__)) == len(afunix.__all__)


def test_no_private_names_exported() -> None:
    assert not [n for n in afunix.__all__ if n.startswith("_") and n != "__version__"]


def test_errors_are_oserrors_with_errno() -> None:
    for name in afunix.__all__:
        obj = getattr(afunix, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, OSError), name


def test_core_imports_only_the_standard_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, afunix, afunix.server\n"
        "bad = [m for m in ('rich', 'matplotlib', 'zmq', 'uvloop', 'anyio', 'trio') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[]", out


def test_lowlevel_face_is_pinned() -> None:
    """``afunix.lowlevel`` exports exactly these names, each the implementing module's."""
    import afunix._cmsg
    import afunix._notify
    import afunix.lowlevel as lowlevel

    assert lowlevel.__all__ == ["close_fds", "notify"]
    assert lowlevel.close_fds is afunix._cmsg.close_fds
    assert lowlevel.notify is afunix._notify.notify
