import gc
import sys

try:
    from .console import sigterm_as_ctrl_c

    sigterm_as_ctrl_c()  # SIGTERM is handled as Ctrl-C is, everywhere below (exit 130, resumable)
    from .cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C or SIGTERM where main() does not catch it (its start-up and run handlers do)
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
    inline.exit_past_abandoned_calls(code)  # a call given up (timed out, interrupted) still inside torch would abort the shut-down
sys.exit(code)
