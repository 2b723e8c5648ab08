"""The layering of ``src/afunix``, checked from its source (``ast``; nothing is imported).

Every module sits in exactly one layer of :data:`LAYERS` (bottom first, as
in ``docs/architecture.md`` and section 1 of the design guide). The rules
(design guide, section 3.3):

1. imports go to the same layer or down, and the import graph has no cycle;
2. apps (``broker/``, ``bench/``, ``cli/``, ``__main__``) import public modules
   (no ``_`` part in the path) and modules of their own package;
3. a ``_name`` never leaves its module (``from .channel import _Core``);
4. sans-IO modules import no concurrency or I/O loop (``asyncio``,
   ``selectors``, ``select``, ``threading``, ``trio``, ``anyio``) and call no
   socket method (``send*``, ``recv*``, ``accept``, ``connect``, ``bind``,
   ``listen``, ``[gs]etsockopt``, ``setblocking``, ``settimeout``);
7. every module is in exactly one layer, and every pattern matches a module.

And the broker (section 4.7) makes no socket send or receive of its own: it
speaks through :class:`afunix.Channel`/:class:`afunix.AsyncChannel`.

Imports count wherever they are: relative or absolute, at module level or
inside a function, under ``TYPE_CHECKING`` too.

The migration (section 9) kept exceptions in :data:`ALLOWED`, each with why
and the step that removed it; the last went with the broker over channels
(Phase 1 step 6) and the table is empty. It only shrinks: an entry nothing
uses fails the test.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "afunix"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: Layers, bottom first; each maps to ``fnmatch`` patterns of dotted module names
#: (without the leading ``afunix.``; the package itself is ``__init__``).
LAYERS: dict[str, list[str]] = {
    "base": ["_errors", "_credstructs", "_limits"],
    "platform": ["_platform", "_platform.*", "_peer", "_core"],
    "sans-IO": ["_address", "_cmsg", "_memfd", "_protocol", "_protocol.*"],
    "io": [
        "_io",
        "_tlsio",
        "_backends",
        "_backends.*",
        "_fds",
        "_sockets",
        "_connect",
        "_remote",
        "_bind",
        "_creds",
        "_activation",
        "_notify",
        "_handoff",
        "opener",
        "policy",
        "diag",
        "probe",
    ],
    "shells": ["channel", "aio"],
    "services": ["server", "server.*", "relay"],
    "faces": ["__init__", "lowlevel"],
    "apps": ["__main__", "cli", "cli.*", "bench", "bench.*", "broker", "broker.*"],
}
SANS_IO = "sans-IO"
APPS = "apps"
#: Rule 4: what a sans-IO module must not import ...
IO_MODULES = {"asyncio", "selectors", "select", "threading", "trio", "anyio", "afunix._io"}
#: ... nor call as a method.
SOCKET_METHODS = re.compile(
    r"^(send\w*|recv\w*|accept|connect|bind|listen|[gs]etsockopt|setblocking|settimeout)$"
)

#: The broker speaks through channels only (design guide, section 4.7): no socket I/O
#: method of its own, nor the low-level descriptor calls ...
RAW_IO = re.compile(
    r"^(sendmsg|sendall|sendto|sendfile|recvmsg\w*|recv_into|recvfrom\w*"
    r"|send_fds|sendall_fds|recv_fds)$"
)
#: ... and ``send``/``recv`` only on a channel, which the broker always calls ``chan``.
CHANNEL_IO = {"send", "recv"}
CHANNEL_NAME = "chan"

#: ``(importer, imported)`` -> (why, the step that removes it): the exceptions to the
#: rules. Empty: the applications import public modules only (``afunix``,
#: ``afunix.lowlevel``, ...) since the broker speaks through channels (Phase 1
#: step 6). Adding an entry is an architecture change (design guide, section 9).
ALLOWED: dict[tuple[str, str], tuple[str, str]] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    names: tuple[str, ...]  # the names taken (``from x import a, b``); () for ``import x``
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts == ["__init__"]:
        return "__init__"
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _package(name: str, path: Path) -> list[str]:
    """The package parts a relative import of module *name* starts from."""
    if name == "__init__":
        return []
    parts = name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _ours(dotted: str, known: dict[str, Path]) -> str | None:
    """``afunix.x.y`` (or ``afunix``) as a module name of :func:`modules`, else None."""
    if dotted == "afunix":
        return "__init__"
    if dotted.startswith("afunix."):
        rest = dotted.removeprefix("afunix.")
        return rest if rest in known else None
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _ours(alias.name, known)
                yield Import(name, target or alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(name, path)
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                dotted = ".".join(["afunix", *base, *([node.module] if node.module else [])])
            else:
                dotted = node.module or ""
            target = _ours(dotted, known)
            if target is None:
                yield Import(name, dotted, tuple(a.name for a in node.names), node.lineno)
                continue
            names: list[str] = []
            for alias in node.names:
                sub = _ours(f"{dotted}.{alias.name}", known)
                if sub is not None:  # ``from . import linux``: a module
                    yield Import(name, sub, (), node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Import(name, target, tuple(names), node.lineno)


def socket_calls(path: Path) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and SOCKET_METHODS.match(node.func.attr)
        ):
            yield node.func.attr, node.lineno


def raw_io_calls(path: Path) -> Iterator[tuple[str, int]]:
    """Socket I/O made otherwise than through a channel: a raw I/O method, a low-level
    descriptor call, or ``send``/``recv`` on something not named ``chan``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if RAW_IO.match(name):
            yield name, node.lineno
        elif isinstance(func, ast.Attribute) and name in CHANNEL_IO:
            target = func.value
            if not (isinstance(target, ast.Name) and target.id == CHANNEL_NAME):
                yield name, node.lineno


def layer_of(name: str) -> list[str]:
    return [
        layer
        for layer, patterns in LAYERS.items()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def is_private_module(name: str) -> bool:
    return name != "__init__" and any(part.startswith("_") for part in name.split("."))


def package_of(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def violations() -> tuple[list[str], set[tuple[str, str]]]:
    """Every broken rule as a message, and the ALLOWED pairs that excused one."""
    known = modules()
    order = list(LAYERS)
    found: list[str] = []
    used: set[tuple[str, str]] = set()
    graph: dict[str, set[str]] = {name: set() for name in known}

    def report(imp: Import, rule: str) -> None:
        pair = (imp.importer, imp.imported)
        if pair in ALLOWED:
            used.add(pair)
        else:
            found.append(f"{imp.importer}:{imp.line} -> {imp.imported}: {rule}")

    for name, path in known.items():
        (own,) = layer_of(name) or ["?"]
        for imp in imports_of(name, path, known):
            if imp.imported not in known:  # stdlib or third party
                if own == SANS_IO and imp.imported.split(".")[0] in IO_MODULES:
                    report(imp, f"rule 4: a sans-IO module imports {imp.imported}")
                continue
            graph[name].add(imp.imported)
            theirs = layer_of(imp.imported)
            if own != "?" and len(theirs) == 1 and order.index(theirs[0]) > order.index(own):
                report(imp, f"rule 1: {own} imports upward ({theirs[0]})")
            if (
                own == APPS
                and is_private_module(imp.imported)
                and package_of(imp.imported) != package_of(name)
            ):
                report(imp, "rule 2: an app imports a private module")
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private:
                report(imp, f"rule 3: takes private names {private}")
        if own == SANS_IO:
            for method, line in socket_calls(path):
                found.append(f"{name}:{line}: rule 4: a sans-IO module calls .{method}()")
        if package_of(name) == "broker":
            for call, line in raw_io_calls(path):
                found.append(f"{name}:{line}: the broker does socket I/O of its own: {call}()")
    found += [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return found, used


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ------------------------------------------------------------------- the tests


def test_every_module_is_in_exactly_one_layer() -> None:
    wrong = {name: layer_of(name) for name in modules() if len(layer_of(name)) != 1}
    assert not wrong, f"modules in no layer or several: {wrong}"


def test_every_pattern_matches_a_module() -> None:
    names = list(modules())
    unused = [
        p for ps in LAYERS.values() for p in ps if not any(fnmatch.fnmatchcase(n, p) for n in names)
    ]
    assert not unused, f"patterns matching no module (remove or rename them): {unused}"


def test_imports_follow_the_layers() -> None:
    found, _ = violations()
    assert not found, "\n".join(found)


def test_every_allowed_exception_is_still_needed() -> None:
    _, used = violations()
    unused = sorted(set(ALLOWED) - used)
    assert not unused, f"ALLOWED entries nothing needs any more (delete them): {unused}"


def test_allowed_exceptions_name_a_reason_and_a_step() -> None:
    known = modules()
    for (importer, imported), (why, step) in ALLOWED.items():
        assert importer in known and imported in known, (importer, imported)
        assert why and step.startswith(("Phase 1 step", "Phase 2 step")), (importer, why, step)


def test_architecture_doc_names_every_module() -> None:
    """Top-level modules by file name (``_fds.py``); packages by directory (``cli/``)."""
    text = ARCHITECTURE.read_text()
    missing = []
    for path in modules().values():
        rel = path.relative_to(SRC)
        named = str(rel) if len(rel.parts) == 1 else f"{rel.parts[0]}/"
        if named not in text:
            missing.append(named)
    assert not missing, f"docs/architecture.md does not name: {sorted(set(missing))}"


# ----------------------------------------------------- the checker checks itself


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("from .channel import Channel\n", "rule 1"),  # _fds (io) -> channel (shells)
        ("from ._memfd import _SEAL_SEAL\n", "rule 3"),
        ("import asyncio\n", None),  # io may use asyncio
    ],
)
def test_the_checker_sees_a_planted_import(
    source: str, rule: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A copy of the tree with one line added to ``_fds.py``: the checker reports it."""
    import shutil

    copy = tmp_path / "afunix"
    shutil.copytree(SRC, copy)
    fds = copy / "_fds.py"
    fds.write_text(fds.read_text() + "\n" + source)
    monkeypatch.setitem(globals(), "SRC", copy)
    found, _ = violations()
    if rule is None:
        assert not found
    else:
        assert any(f.startswith("_fds:") and rule in f for f in found), found


def test_the_checker_sees_a_cycle_and_sans_io_socket_calls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "afunix"
    shutil.copytree(SRC, copy)
    (copy / "_errors.py").write_text(
        (copy / "_errors.py").read_text() + "\nfrom . import _address\n"
    )
    (copy / "_protocol" / "decoder.py").write_text(
        (copy / "_protocol" / "decoder.py").read_text()
        + "\nimport threading\n\ndef _peek(sock):\n    return sock.recv(1)\n"
    )
    monkeypatch.setitem(globals(), "SRC", copy)
    found, _ = violations()
    assert any(f.startswith("cycle:") and "_errors" in f for f in found), found
    assert any("rule 4" in f and "threading" in f for f in found), found
    assert any("rule 4" in f and ".recv()" in f for f in found), found


@pytest.mark.parametrize(
    "source",
    [
        "def _f(sock):\n    sock.sendmsg([b'x'], [])\n",
        "def _f(sock):\n    return sock.recv(1)\n",
        "def _f(conn):\n    conn.sock.send(b'x')\n",
        "from afunix.lowlevel import recv_fds\ndef _f(s):\n    return recv_fds(s, 1)\n",
    ],
)
def test_the_checker_sees_broker_socket_io(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A broker module that reads or writes a socket itself (not through a channel)."""
    import shutil

    copy = tmp_path / "afunix"
    shutil.copytree(SRC, copy)
    server = copy / "broker" / "server.py"
    server.write_text(server.read_text() + "\n" + source)
    monkeypatch.setitem(globals(), "SRC", copy)
    found, _ = violations()
    assert any(f.startswith("broker.server:") and "socket I/O of its own" in f for f in found), (
        found
    )
