"""Moving from jupyterhub-idle-culler: the setups that upstream's README, Zero to JupyterHub and
The Littlest JupyterHub write (command lines, config files) make upstream (2.0.0, and 1.4.0,
which both charts pin) and idle-cull send the same DELETE requests.

Each case runs twice against two fake Hubs holding the same users (same timestamps, far from
every limit): once `python -m jupyterhub_idle_culler ARGS` from an upstream venv that `make test`
installs (.bench-venv/upstream*; tests/upstream_one_pass.py stops its loop after the first pass),
once `python -m idle_cull ARGS`, with the same working directory and the environment the Hub gives
a managed service. idle-cull runs the exact command line; as a service it loops, so it gets
SIGTERM once its first pass has reported.
"""

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, REQUIRE_ALL
from fakehub import FakeHub, iso, server

UPSTREAMS = {  # version: its interpreter
    "2.0.0": REPO / ".bench-venv" / "upstream" / "bin" / "python",
    "1.4.0": REPO / ".bench-venv" / "upstream-1.4" / "bin" / "python",
}
ONE_PASS = REPO / "tests" / "upstream_one_pass.py"
HUB_URL = "http://localhost:8081/hub/api"  # what the charts write; the fake Hub's URL replaces it

MINUTE, HOUR, DAY = 60, 3600, 86400


def _upstream_found(version: str) -> bool:
    python = UPSTREAMS[version]
    probe = f"import jupyterhub_idle_culler as u; assert u.__version__ == {version!r}"
    return (
        python.exists()
        and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    )


if not all(map(_upstream_found, UPSTREAMS)):  # CI must have them; elsewhere this file skips
    _MISSING = "upstream jupyterhub-idle-culler 2.0.0 and 1.4.0 not in .bench-venv (make test)"
    if os.environ.get("CI") == "true" or os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(_MISSING, pytrace=False)
    pytest.skip(_MISSING, allow_module_level=True)


def population():
    """(name, add_user keyword arguments): one user per distinction the settings make."""

    def srv(idle, age=2 * HOUR, **kw):
        return server(last_activity=iso(idle), started=iso(age), **kw)

    return [
        ("fresh", {"servers": {"": srv(MINUTE, age=5 * MINUTE)}}),
        ("twelve-minutes", {"servers": {"": srv(12 * MINUTE)}}),  # idle for 600, not for 900
        ("forty-minutes", {"servers": {"": srv(40 * MINUTE)}}),  # idle for 900, not for 3600
        ("two-hours", {"last_activity": iso(2 * HOUR), "servers": {"": srv(2 * HOUR)}}),
        ("named", {"servers": {"": srv(2 * HOUR), "gpu": srv(2 * HOUR)}}),
        ("mixed", {"servers": {"": srv(MINUTE), "lab": srv(2 * HOUR)}}),
        ("boss", {"admin": True, "last_activity": iso(2 * HOUR), "servers": {"": srv(2 * HOUR)}}),
        ("veteran", {"servers": {"": srv(MINUTE, age=3 * DAY)}}),  # active, but old
        ("never-active", {"servers": {"": server(last_activity=None, started=iso(2 * HOUR))}}),
        ("unlimited", {"servers": {"": srv(2 * HOUR, user_options={"profile": "unlimited"})}}),
        ("spawning", {"servers": {"": server(ready=False, pending="spawn")}}),
        ("gone-quiet", {"last_activity": iso(10 * DAY), "servers": {}}),  # no server: a user
        ("just-left", {"last_activity": iso(MINUTE), "servers": {}}),
    ]


HOOK = """
def my_cull_arbiter(inactive, inactive_limit, server):
    if server["user_options"].get("profile") == "unlimited":
        return False
    return inactive.total_seconds() >= inactive_limit
"""
ASYNC_HOOK = HOOK.replace("def my_cull", "async def my_cull")

BOTH, V2, V1 = ("2.0.0", "1.4.0"), ("2.0.0",), ("1.4.0",)
# (id, command line after the module name, files in the working directory, as a Hub service,
# the upstream versions that read it). Upstream 2.0.0 reads its options with traitlets, which
# wants a value after a boolean option: the bare `--cull-users` that the charts write makes it
# exit 2 (1.4.0 and idle-cull take both), so 2.0.0 is given `--cull-users=true` for those.
CASES = [
    # Upstream's README: the Hub-managed service, and a standalone run.
    ("readme-service", ["--timeout=3600"], {}, True, BOTH),
    ("readme-standalone", ["--timeout=900", f"--url={HUB_URL}"], {}, False, BOTH),
    # Zero to JupyterHub (jupyterhub/files/hub/jupyterhub_config.py): the chart's defaults ...
    ("z2jh-defaults", [f"--url={HUB_URL}", "--timeout=3600", "--cull-every=600",
                       "--concurrency=10"], {}, True, BOTH),
    # ... and every cull: setting changed (users, adminUsers: false, removeNamedServers, maxAge).
    ("z2jh-all", [f"--url={HUB_URL}", "--timeout=3600", "--cull-every=600", "--concurrency=10",
                  "--cull-users", "--cull-admin-users=false", "--remove-named-servers",
                  f"--max-age={DAY}"], {}, True, BOTH),
    # The Littlest JupyterHub (tljh/configurer.py): its defaults, and with users and named.
    ("tljh-defaults", ["--timeout=600", "--cull-every=60", "--concurrency=5", "--max-age=0"],
     {}, True, BOTH),
    ("tljh-users-named", ["--timeout=600", "--cull-every=10", "--concurrency=5",
                          f"--max-age={DAY}", "--cull-users", "--remove-named-servers"], {}, True,
     BOTH),
    # 1.4's spellings: underscores and capitalised booleans (2.0.0 ignores `--cull_users`).
    ("underscores", ["--timeout=600", "--cull_users=True", "--remove_named_servers=True",
                     "--cull_admin_users=False"], {}, False, V1),
    # Upstream's config file: idle_culler_config.py found in the working directory ...
    ("config-default-file", [], {"idle_culler_config.py": (
        "c.IdleCuller.timeout = 900\nc.IdleCuller.cull_users = True\n"
        "c.IdleCuller.remove_named_servers = True\n")}, True, V2),
    # ... and --config with upstream's cull_arbiter_hook, sync and async.
    ("config-hook", ["--config=culler_config.py"], {"culler_config.py": (
        f"{HOOK}\nc = get_config()\nc.IdleCuller.timeout = 600\n"
        "c.IdleCuller.cull_arbiter_hook = my_cull_arbiter\n")}, True, V2),
    ("config-async-hook", ["--config=culler_config.py"], {"culler_config.py": (
        f"{ASYNC_HOOK}\nc.IdleCuller.timeout = 600\nc.IdleCuller.cull_users = True\n"
        "c.IdleCuller.cull_arbiter_hook = my_cull_arbiter\n"
        "c.Application.log_level = 'DEBUG'\n")}, True, V2),
]  # fmt: skip
UPSTREAM_SPELLING = {flag: f"{flag}=true" for flag in ("--cull-users", "--remove-named-servers")}


def _env(hub: FakeHub, service: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "IDLE_CULL_"))}
    env.update(JUPYTERHUB_API_TOKEN=hub.token, JUPYTERHUB_API_URL=hub.url)
    if service:
        env["JUPYTERHUB_SERVICE_NAME"] = "idle-culler"
    return env


def run_upstream(version: str, hub: FakeHub, args: list[str], cwd, service: bool) -> None:
    if version == "2.0.0":
        args = [UPSTREAM_SPELLING.get(a, a) for a in args]
    done = subprocess.run(
        [UPSTREAMS[version], ONE_PASS, *args],
        cwd=cwd,
        env=_env(hub, service),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def run_ours(hub: FakeHub, args: list[str], cwd, service: bool) -> None:
    """`python -m idle_cull ARGS` as the Hub would start it; SIGTERM after the first pass."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "idle_cull", *args],
        cwd=cwd,
        env=_env(hub, service),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if service and "summary" in line:
                proc.send_signal(signal.SIGTERM)  # a service loops; one pass is enough here
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)
    assert "summary: users scanned=" in "".join(lines), "".join(lines)


def deletes(hub: FakeHub) -> list[tuple[str, bool]]:
    """Every DELETE the Hub received: (path, whether it asked to remove the named server)."""
    return sorted(
        (r.path, bool(isinstance(r.json(), dict) and r.json().get("remove")))
        for r in hub.requests
        if r.method == "DELETE"
    )


def _url(args: list[str], hub: FakeHub) -> list[str]:
    return [a.replace(HUB_URL, hub.url) for a in args]


def _populated(hub_factory, extra=()) -> FakeHub:
    hub = hub_factory()
    for name, model in [*population(), *extra]:
        hub.add_user(name, **model)
    return hub


def _write(workdir, files: dict) -> None:
    workdir.mkdir(exist_ok=True)
    for name, text in files.items():
        (workdir / name).write_text(text)


@pytest.mark.parametrize(
    "version, args, files, service",
    [(v, args, files, service) for _, args, files, service, vs in CASES for v in vs],
    ids=[f"{case_id}-{v}" for case_id, *_, vs in CASES for v in vs],
)
def test_upstream_setups_stop_the_same_servers(
    hub_factory, tmp_path, version, args, files, service
):
    theirs, ours = _populated(hub_factory), _populated(hub_factory)
    _write(tmp_path, files)

    run_upstream(version, theirs, _url(args, theirs), tmp_path, service)
    run_ours(ours, _url(args, ours), tmp_path, service)

    assert deletes(ours) == deletes(theirs)
    assert deletes(ours)  # every setup stops something in this population


def test_the_setups_differ_in_what_they_stop(hub_factory, tmp_path):
    """So that the comparison above tells one setting from another."""
    seen = {}
    for case_id, args, files, _service, versions in CASES:
        if "2.0.0" not in versions:
            continue
        hub = _populated(hub_factory)
        _write(tmp_path / case_id, files)
        run_upstream("2.0.0", hub, _url(args, hub), tmp_path / case_id, False)
        seen[case_id] = tuple(deletes(hub))
    assert seen["readme-service"] == seen["z2jh-defaults"]  # the same settings
    assert len(set(seen.values())) == len(seen) - 1, seen


def test_where_upstream_culls_more_idle_cull_keeps(hub_factory, tmp_path):
    """Upstream's --max-age check skips --cull-default-servers=false and --cull-admin-users=false;
    idle-cull's does not (README: "What differs")."""
    old_admin = {"admin": True, "created": iso(3 * DAY), "last_activity": iso(2 * HOUR)}
    extra = [("old-boss", {**old_admin, "servers": {}})]
    args = ["--timeout=3600", "--cull-users=true", "--cull-admin-users=false",
            "--cull-default-servers=false", f"--max-age={DAY}"]  # fmt: skip
    theirs, ours = _populated(hub_factory, extra), _populated(hub_factory, extra)

    run_upstream("2.0.0", theirs, _url(args, theirs), tmp_path, False)
    run_ours(ours, _url(args, ours), tmp_path, False)

    assert set(deletes(ours)) < set(deletes(theirs))
    assert set(deletes(theirs)) - set(deletes(ours)) == {
        ("/hub/api/users/veteran/server", False),  # a default server, 3 days old
        ("/hub/api/users/old-boss", False),  # an admin, created 3 days ago
    }


def test_upstream_2_refuses_the_bare_boolean_options_that_the_charts_write():
    done = subprocess.run(
        [UPSTREAMS["2.0.0"], "-m", "jupyterhub_idle_culler", "--cull-users", "--timeout=600"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "expected one argument" in done.stderr
