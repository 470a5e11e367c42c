"""Moved to ``fedsim.world.models``; this name stays for scripts that import ``fedsim.models``."""

from fedsim.world.models import *  # noqa: F401,F403
