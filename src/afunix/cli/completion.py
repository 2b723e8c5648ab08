"""``afunix completion bash|zsh|fish``: a shell completion script, made from the parser.

The script comes from argcomplete (https://github.com/kislyuk/argcomplete),
not written by hand, so it always knows every command and option. argcomplete
rather than shtab, which writes a static script from the parser: shtab has no
fish. argcomplete's script asks ``afunix`` itself for the candidates (with
``_ARGCOMPLETE`` set in its environment; :func:`afunix.cli.main` answers and
exits before running anything), so completion follows the installed version.
"""

from __future__ import annotations

import argparse
from typing import Any

SHELLS = ["bash", "zsh", "fish"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, fish)",
        description=(
            "Print a completion script for SHELL on standard output, generated from "
            "afunix's own parser by argcomplete (installed with afunix[cli]). Load it "
            "in the running shell, or save it where the shell looks for completions."
        ),
        epilog=(
            "bash:  source <(afunix completion bash)   (or save it as "
            "~/.local/share/bash-completion/completions/afunix).  "
            "zsh:   source <(afunix completion zsh).  "
            "fish:  afunix completion fish > ~/.config/fish/completions/afunix.fish"
        ),
    )
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    p.set_defaults(func=cmd_completion)


def _argcomplete() -> Any:
    try:
        import argcomplete
    except ImportError:
        raise OSError(
            2,
            "shell completion needs argcomplete: pip install 'afunix[cli]'",
            "argcomplete",
        ) from None
    return argcomplete


def cmd_completion(args: argparse.Namespace) -> int:
    script: str = _argcomplete().shellcode(["afunix"], shell=args.shell)
    print(script, end="" if script.endswith("\n") else "\n")
    return 0


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request from the shell script, then exit (argcomplete's hook)."""
    try:
        import argcomplete
    except ImportError:  # pragma: no cover - the script came from an install that had it
        return
    argcomplete.autocomplete(parser)
