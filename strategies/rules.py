"""How a feature states a rule it imposes on the rest of a scenario.

A strategy, codec or defense checks the scenario it is part of (``check``) and raises
``RuleViolation`` naming the key path of the setting to change; the scenario schema turns it
into its one-line error. Features never import fedsim's scenario module for this.
"""

from __future__ import annotations


class RuleViolation(ValueError):
    def __init__(self, loc: tuple[str, ...], msg: str):
        super().__init__(msg)
        self.loc, self.msg = tuple(loc), msg
