import gc
import sys

try:
    from .cli import main

    code = main()
except KeyboardInterrupt:  # the instants main() does not cover (its own start-up and run handlers do the rest)
    print("fedsim: interrupted", file=sys.stderr)
    code = 130
# The process ends here. Shutting the interpreter down would garbage-collect every object
# torch, Flower and the data libraries created (about a second, measured in
# benchmarks/engine_overhead.py), though nothing among them is left to finalise: results
# are written and Ray is shut down. Freezing moves them out of the collector's reach; atexit
# handlers still run.
gc.freeze()
inline = sys.modules.get("fedsim.engines.inline")  # loaded only when a run used the inline engine
if inline is not None:
    inline.exit_past_abandoned_calls(code)  # a timed-out call still inside torch would abort the shut-down
sys.exit(code)
