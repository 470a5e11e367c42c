"""A run: the Flower apps (``apps``), the round loop (``rounds``) and its observers (``observers``: results,
progress, failures), results files (``results``, ``outdir``), checkpoints and resuming (``checkpoint``,
``resume``), traffic metering (``metered``) and the progress bar (``progress``).

``fedsim.run(scenario, overrides=None, out=None)`` also runs a scenario from Python (``fedsim.api.run``):
this package is the attribute ``fedsim.run`` once any of its modules is imported, so the function and the
package share the name. The package's module is made callable (its class below) rather than renamed:
``fedsim.run(...)`` and ``import fedsim.run.apps`` both work, whichever comes first.
"""

import sys
import types


class _CallableRunPackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import run

        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableRunPackage
