"""Moved to ``fedsim.world.data``; this name stays for scripts that import ``fedsim.data``."""

from fedsim.world.data import *  # noqa: F401,F403
