"""Entry point for ``python -m attacks`` (see ``attacks.cli``)."""

import sys

from .cli import main

sys.exit(main())
