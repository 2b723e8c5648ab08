"""``python -m afunix`` is the ``afunix`` command."""

import sys

from .cli import main

sys.exit(main())
