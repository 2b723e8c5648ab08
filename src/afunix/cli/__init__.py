"""The ``afunix`` command line (stub until the CLI lands)."""

def main() -> int:
    return 0
