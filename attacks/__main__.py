"""Entry point for ``python -m attacks`` (see ``attacks.cli``)."""

import sys

try:
    from .cli import main  # imports torch: seconds in which Ctrl-C is as likely as anywhere

    code = main()
except KeyboardInterrupt:
    print("python -m attacks: interrupted; no results written", file=sys.stderr)
    code = 130
sys.exit(code)
