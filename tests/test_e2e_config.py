"""End to end: upstream's Python config file, as a Hub-managed idle-cull finds it."""

import sys
import time

import pytest
from realhub import RealHub, wait_until

pytestmark = pytest.mark.e2e

CONFIG = """\
c = get_config()  # noqa: F821


def keep_gpu(inactive, inactive_limit, server):
    return server["name"] != "gpu" and inactive.total_seconds() >= inactive_limit


c.IdleCuller.timeout = 6
c.IdleCuller.cull_every = 1
c.IdleCuller.cull_arbiter_hook = keep_gpu
"""


def test_a_managed_service_reads_idle_culler_config_py_in_its_working_directory(tmp_path):
    config = tmp_path / "idle_culler_config.py"
    config.write_text(CONFIG)
    # Upstream's service entry with the module's name changed and -P (README), no flags: the
    # file decides.
    with RealHub(tmp_path, managed_culler=[sys.executable, "-P", "-m", "idle_cull"]) as hub:
        hub.create_users("idle", "active")
        for user in ("idle", "active"):
            hub.start_server(user)
            hub.start_server(user, "gpu")
        expected = {"idle": {"gpu": "ready"}, "active": {"": "ready", "gpu": "ready"}}

        def idle_culled():
            hub.touch("active", "")  # the hook keeps every gpu server: no touch needed there
            return hub.snapshot() == expected

        wait_until(idle_culled, 60, "the managed culler to stop idle's default server")
        # More passes: the hook still keeps the idle gpu server, and active (touched far more
        # often than the timeout, even on a loaded machine) keeps its default server.
        for _ in range(8):
            hub.touch("active", "")
            time.sleep(0.5)
        assert hub.snapshot() == expected
    log = hub.log_text()
    assert f"read the config file {config}" in log
    assert "stop user=idle server=(default)" in log
    assert "Traceback" not in log
