"""`python -m jupyterhub_idle_culler ARGS`, but only its first pass, for the migration test.

Runs in an upstream venv (.bench-venv/upstream for 2.0.0, .bench-venv/upstream-1.4 for 1.4.0;
both start the same way) with the arguments, environment and working directory a service entry
would give upstream, so that upstream itself parses the command line and reads its config file.
Upstream then loops forever; here its periodic callback is never started and its event loop
stops once the first pass (the one it runs at start-up) has ended. Exit 0 after a pass that
raised nothing, 1 otherwise.
"""

import runpy
import sys
import traceback

import jupyterhub_idle_culler as upstream
from tornado.ioloop import IOLoop

first_pass = upstream.cull_idle
failed = []


async def one_pass(*args, **kwargs):
    try:
        await first_pass(*args, **kwargs)
    except Exception:
        failed.append(traceback.format_exc())
    finally:
        IOLoop.current().stop()


class NoPeriodicCallback:
    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        pass


upstream.cull_idle = one_pass
upstream.PeriodicCallback = NoPeriodicCallback
sys.argv = ["jupyterhub_idle_culler", *sys.argv[1:]]
runpy.run_module("jupyterhub_idle_culler", run_name="__main__", alter_sys=True)
if failed:
    sys.exit("upstream's pass failed:\n" + failed[0])
