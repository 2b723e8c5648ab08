"""Where each table and key of a TOML text is: the line numbers ``tomllib`` does not give.

The broker's policy errors name a line (``invalid policy p.toml, line 7: ...``);
``tomllib`` returns plain dicts, so this scanner reads the text once more and
records the first line of every ``[table]``, ``[[array]]`` entry and ``key =``.
It is a locator, not a parser: the text has already been parsed, so it only
has to skip what could look like a key (the inside of multi-line strings).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["TomlLines"]

_KEY_LINE: Final = re.compile(r'\s*(?:"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+))\s*=')


class TomlLines:
    """Line numbers (1-based) of a TOML text's tables and keys.

    An entry of an array of tables is ``(name, index)`` (``("rule", 2)`` is the
    third ``[[rule]]``); a plain table is ``(name, 0)``, the top level ``("", 0)``.
    """

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, int, str], int] = {}
        self._table = ("", 0)
        self._entries: dict[str, int] = {}
        in_multiline: str | None = None
        for lineno, line in enumerate(text.splitlines(), 1):
            if in_multiline is not None:
                if in_multiline in line:
                    in_multiline = None
                continue
            if self._header(line.strip(), lineno):
                continue
            m = _KEY_LINE.match(line)
            if m:
                key = m.group(1) or m.group(2) or m.group(3) or ""
                self.where.setdefault((*self._table, key), lineno)
                rest = line[m.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote

    def _header(self, stripped: str, lineno: int) -> bool:
        """Enter the table a ``[name]`` or ``[[name]]`` line opens; False for other lines."""
        if stripped.startswith("[["):
            name = stripped[2:].split("]]", 1)[0].strip()
            index = self._entries[name] = self._entries.get(name, -1) + 1
            self._table = (name, index if name == "rule" else 0)
        elif stripped.startswith("["):
            self._table = (stripped[1:].split("]", 1)[0].strip(), 0)
        else:
            return False
        self.where.setdefault((*self._table, ""), lineno)
        return True

    def of(self, table: str, index: int, key: str = "") -> int | None:
        """The line of *key* in that table, else of the table's header, else ``None``."""
        return self.where.get((table, index, key)) or self.where.get((table, index, ""))
