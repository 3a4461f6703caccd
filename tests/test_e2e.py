"""End to end: the culler against a real JupyterHub 6 and a real configurable-http-proxy.

Servers become idle for real: nothing talks to them, so their activity stays at their start
time, and the culler runs with a short --timeout after a short wait. "Active" servers get
fresh activity through the REST API just before the culler runs. Each test starts from an empty
Hub and asserts the complete set of users and servers left afterwards (tests/realhub.py).
"""

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from realhub import (
    BIN,
    CULLER,
    CULLER_SCOPES,
    REPO,
    TESTS_DIR,
    RealHub,
    alive,
    cmdline,
    descendants,
    kill_and_wait,
    lacking,
    wait_until,
)

pytestmark = pytest.mark.e2e

TIMEOUT = 3  # the culler's --timeout in these tests
IDLE_AFTER = TIMEOUT + 2.5  # a server untouched this long is idle, whole-second Date included


def wait_idle():
    """Let every server started so far pass the culler's timeout."""
    time.sleep(IDLE_AFTER)


def actions(result):
    """The culler's --json actions as a set of (action, user, server, result)."""
    assert result.json is not None, str(result)
    return {(a["action"], a["user"], a["server"], a["result"]) for a in result.json["actions"]}


@pytest.fixture(scope="module")
def light_hub(tmp_path_factory):
    """One Hub with stand-in servers for the whole module (a Hub takes seconds to start)."""
    hub = RealHub(tmp_path_factory.mktemp("light-hub")).start()
    yield hub
    assert hub.stop() == [], "the Hub left processes running"


@pytest.fixture
def hub(light_hub):
    """The shared Hub, emptied: every test sees only its own users."""
    light_hub.delete_all_users()
    return light_hub


def cull(hub, *args, token="idle-culler", expect=0, **kwargs):
    result = hub.run_culler("--json", f"--timeout={TIMEOUT}", *args, token=token, **kwargs)
    assert result.returncode == expect, str(result)
    return result


# -- what gets stopped ------------------------------------------------------------------------


def test_idle_servers_stopped_active_and_pending_kept(hub):
    hub.create_users("idle", "active", "starting")
    for user in ("idle", "active"):
        hub.start_server(user)
        hub.start_server(user, "gpu")
    hub.start_server("starting", wait=False, start_delay=60)  # pending until the test ends
    wait_idle()
    hub.touch("active", "", "gpu")

    result = cull(hub)

    assert hub.snapshot() == {
        "idle": {"gpu": "stopped"},  # a stopped named server stays, unless removed
        "active": {"": "ready", "gpu": "ready"},
        "starting": {"": "pending"},
    }
    assert actions(result) == {("stop", "idle", "", "done"), ("stop", "idle", "gpu", "done")}
    assert "stop user=idle server=(default)" in result.stderr
    assert "summary:" in result.stderr


def test_max_age_stops_active_but_old_servers(hub):
    hub.create_users("old", "young")
    hub.start_server("old")
    wait_idle()
    hub.touch("old", "")
    hub.start_server("young")

    result = cull(hub, "--timeout=600", f"--max-age={TIMEOUT}")

    assert hub.snapshot() == {"old": {}, "young": {"": "ready"}}
    assert actions(result) == {("stop", "old", "", "done")}


@pytest.mark.parametrize(
    "option, left, done",
    [
        ("--cull-default-servers=false", {"": "ready", "gpu": "stopped"}, {("stop", "gpu")}),
        ("--cull-named-servers=false", {"gpu": "ready"}, {("stop", "")}),
        # the named server is gone, not just stopped
        ("--remove-named-servers", {}, {("stop", ""), ("remove", "gpu")}),
    ],
    ids=["no-default", "no-named", "remove-named"],
)
def test_which_servers(hub, option, left, done):
    hub.create_users("u")
    hub.start_server("u")
    hub.start_server("u", "gpu")
    wait_idle()

    result = cull(hub, option)

    assert hub.snapshot() == {"u": left}
    assert actions(result) == {(action, "u", server, "done") for action, server in done}


# -- users ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cull_admins, token",
    [(True, "idle-culler-users"), (False, "idle-culler-delete-users")],
    ids=["admins-too", "no-admins"],
)
def test_cull_users(hub, cull_admins, token):
    hub.create_users("plain", "busy")
    hub.create_users("boss", admin=True)
    for user in ("plain", "busy", "boss"):
        hub.start_server(user)
    wait_idle()
    hub.touch("busy", "")

    result = cull(
        hub, "--cull-users", f"--cull-admin-users={str(cull_admins).lower()}",
        token=token,
    )  # fmt: skip

    expected = {"busy": {"": "ready"}}
    if not cull_admins:
        expected["boss"] = {}  # server stopped, user kept
    assert hub.snapshot() == expected
    assert ("delete_user", "plain", "", "done") in actions(result)


def test_user_with_slow_stop_deleted_in_a_later_pass(hub):
    hub.create_users("slow", "quick")
    hub.start_server("slow", stop_delay=4)  # longer than the Hub's 1 s slow_stop_timeout: 202
    hub.start_server("quick")
    wait_idle()

    first = cull(hub, "--cull-users", token="idle-culler-users")

    assert hub.snapshot() == {"slow": {"": "pending"}}  # still stopping; quick is gone
    assert ("stop", "slow", "", "stopping") in actions(first)
    hub.wait_settled()
    # Stopping a server counts as activity for its user: the user becomes idle again later.
    wait_idle()

    second = cull(hub, "--cull-users", token="idle-culler-users")

    assert hub.snapshot() == {}
    assert ("delete_user", "slow", "", "done") in actions(second)


def test_wait_for_stop_deletes_the_user_with_a_slow_stop_in_the_same_pass(hub):
    hub.create_users("slow", "quick", "busy")
    hub.start_server("slow", stop_delay=2)  # longer than the Hub's 1 s slow_stop_timeout: 202
    hub.start_server("quick")
    hub.start_server("busy")
    wait_idle()
    hub.touch("busy", "")
    log_start = len(hub.log_text())

    result = cull(hub, "--cull-users", "--wait-for-stop=30", token="idle-culler-delete-users")

    assert hub.snapshot() == {"busy": {"": "ready"}}  # slow is gone too, not pending or kept
    assert actions(result) == {
        ("stop", "slow", "", "done"),
        ("delete_user", "slow", "", "done"),
        ("stop", "quick", "", "done"),
        ("delete_user", "quick", "", "done"),
    }
    assert result.json["summary"]["servers_stopping"] == 0
    # The Hub did answer the stop with 202, and the culler then looked until it was over.
    log = hub.log_text()[log_start:]
    assert re.search(r"\b202 DELETE /hub/api/users/slow/server \(idle-culler-delete-users@", log)
    assert re.search(r"\b200 GET /hub/api/users/slow \(idle-culler-delete-users@", log)


# -- exclusions -------------------------------------------------------------------------------


def test_exclude_group_needs_the_groups_scope_and_spares_the_members(hub):
    hub.create_users("member", "outsider")
    hub.create_group("staff", "member")
    hub.start_server("member")
    hub.start_server("outsider")
    wait_idle()

    # The README's culler token cannot see groups: refused before anything is changed.
    refused = cull(hub, "--exclude-group=staff", expect=3)

    assert "read:users:groups" in refused.stderr
    assert hub.snapshot() == {"member": {"": "ready"}, "outsider": {"": "ready"}}

    # With read:users:groups the Hub shows each user's groups, and members are left alone.
    for token, shown in [("idle-culler", None), ("idle-culler-groups", ["staff"])]:
        model = hub.api("GET", "/users/member", token=hub.tokens[token]).json()
        assert model.get("groups") == shown, token
    result = cull(hub, "--exclude-group=staff", token="idle-culler-groups")

    assert hub.snapshot() == {"member": {"": "ready"}, "outsider": {}}
    assert actions(result) == {("stop", "outsider", "", "done")}


# -- listing ----------------------------------------------------------------------------------


def test_pagination_reaches_every_user(hub):
    idle = [f"idle{i:02}" for i in range(12)]
    hub.create_users(*idle, "active")
    for user in [*idle, "active"]:
        hub.start_server(user)
    wait_idle()
    hub.touch("active", "")
    log_start = len(hub.log_text())

    result = cull(hub, "--api-page-size=2")

    assert hub.snapshot() == {**{u: {} for u in idle}, "active": {"": "ready"}}
    assert len(actions(result)) == len(idle)
    # The Hub's own log shows that the culler read the list two users at a time.
    pages = re.findall(
        r"GET /hub/api/users\?\S*\blimit=2\b\S* \(idle-culler@", hub.log_text()[log_start:]
    )
    assert len(pages) >= math.ceil(len(idle) / 2)


def test_dry_run_changes_nothing(hub):
    hub.create_users("u", "boss")
    hub.start_server("u")
    hub.start_server("u", "gpu")
    hub.start_server("boss")
    wait_idle()
    before = hub.snapshot()

    result = cull(
        hub, "--dry-run", "--cull-users", "--remove-named-servers", token="idle-culler-users"
    )

    assert hub.snapshot() == before == {"u": {"": "ready", "gpu": "ready"}, "boss": {"": "ready"}}
    assert result.json["dry_run"] is True
    assert actions(result) == {
        ("stop", "u", "", "planned"),
        ("remove", "u", "gpu", "planned"),
        ("stop", "boss", "", "planned"),
        ("delete_user", "u", "", "planned"),
        ("delete_user", "boss", "", "planned"),
    }


# -- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", CULLER_SCOPES)
def test_missing_scope_is_named_and_exit_3(hub, scope):
    hub.create_users("u")
    hub.start_server("u")
    wait_idle()

    result = cull(hub, token=lacking(scope), expect=3)

    assert scope in result.stderr
    assert hub.snapshot() == {"u": {"": "ready"}}


def test_culler_token_can_do_no_more_than_culling(hub):
    hub.create_users("u")
    hub.start_server("u")
    now = hub.users()["u"]["last_activity"]
    for service in (
        "idle-culler",
        "idle-culler-delete-users",
        "idle-culler-users",
        "idle-culler-groups",
    ):
        token = hub.tokens[service]
        # What it is for: list users with their servers and activity.
        assert hub.api("GET", "/users", token=token).status_code == 200
        # Never: start servers, read server state, manage tokens or groups.
        assert hub.api("POST", "/users/u/server", token=token).status_code == 403
        model = hub.api("GET", "/users/u", token=token).json()
        assert "state" not in model["servers"][""]
        assert hub.api("GET", "/users/u/tokens", token=token).status_code == 403
        assert hub.api("POST", "/groups/g", token=token).status_code == 403
    for service in ("idle-culler", "idle-culler-delete-users", "idle-culler-groups"):
        # Nor create users or fake activity (admin:users, in idle-culler-users, would allow it).
        token = hub.tokens[service]
        assert hub.api("POST", "/users/intruder", token=token).status_code == 403
        activity = {"last_activity": now}
        assert hub.api("POST", "/users/u/activity", token=token, json=activity).status_code == 403
    # Deleting users takes the extra scope.
    culler = hub.tokens["idle-culler"]
    assert hub.api("DELETE", "/users/u", token=culler).status_code == 403
    own = hub.api("GET", "/user", token=culler).json()
    assert set(own["scopes"]) == {*CULLER_SCOPES, "read:users:name"}
    assert hub.snapshot() == {"u": {"": "ready"}}


# -- arbiter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("verdict", [True, False])
def test_arbiter_decides(hub, tmp_path, verdict):
    (tmp_path / "verdict.py").write_text(
        "from datetime import timedelta\n"
        "\n"
        "def decide(inactive, inactive_limit, server):\n"
        "    assert isinstance(inactive, timedelta) and inactive_limit == 3\n"
        f"    return {verdict}\n"
    )
    hub.create_users("idle", "active")
    hub.start_server("idle")
    hub.start_server("active")
    wait_idle()
    hub.touch("active", "")

    cull(hub, "--arbiter=verdict:decide", env={"PYTHONPATH": str(tmp_path)})

    # The arbiter replaces the idle test: yes stops even the active server, no stops none.
    left = {} if verdict else {"": "ready"}
    assert hub.snapshot() == {"idle": left, "active": left}


# -- upstream's own cases (jupyterhub-idle-culler 2.0.0, tests/test_idle_culler.py) -----------


def test_upstream_cull_idle_only_after_the_time_limit(hub):
    """Three servers: none culled before the limit, all once they have been idle past it."""
    users = ["test-0", "test-1", "test-2"]
    limit = 10  # seconds: room for a slow start before the first pass on a loaded machine
    started = time.monotonic()
    hub.create_users(*users)
    for user in users:
        hub.start_server(user)

    early = cull(hub, f"--timeout={limit}")
    assert time.monotonic() - started < limit  # else this pass proved nothing

    assert actions(early) == set()
    assert hub.snapshot() == {user: {"": "ready"} for user in users}
    time.sleep(limit + IDLE_AFTER - TIMEOUT)

    late = cull(hub, f"--timeout={limit}")

    assert actions(late) == {("stop", user, "", "done") for user in users}
    assert hub.snapshot() == {user: {} for user in users}


def test_upstream_custom_arbiters_sync_yes_and_async_no(hub, tmp_path):
    """Upstream's arbiter cases, with no time passed: an async arbiter that says no culls
    nothing, a sync one that says yes culls every server."""
    (tmp_path / "upstream_arbiters.py").write_text(
        "def cull_arbiter_function(inactive, inactive_limit, server):\n"
        "    return True\n"
        "\n"
        "async def async_cull_arbiter_function(inactive, inactive_limit, server):\n"
        "    return False\n"
    )
    users = ["test-0", "test-1", "test-2"]
    hub.create_users(*users)
    for user in users:
        hub.start_server(user)
    env = {"PYTHONPATH": str(tmp_path)}

    no = cull(hub, "--arbiter=upstream_arbiters:async_cull_arbiter_function", env=env)

    assert actions(no) == set()
    assert hub.snapshot() == {user: {"": "ready"} for user in users}

    yes = cull(hub, "--arbiter=upstream_arbiters:cull_arbiter_function", env=env)

    assert actions(yes) == {("stop", user, "", "done") for user in users}
    assert hub.snapshot() == {user: {} for user in users}


# -- how it is run ----------------------------------------------------------------------------


def test_standalone_as_cron_runs_it(hub, tmp_path):
    hub.create_users("idle", "active")
    hub.start_server("idle")
    hub.start_server("active")
    wait_idle()
    hub.touch("active", "")
    cron_env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": str(tmp_path)}

    # The installed console script, the environment cron gives, a token, and --url.
    result = hub.run_culler(
        f"--timeout={TIMEOUT}", command=[str(BIN / "idle-cull")], base_env=cron_env, cwd=tmp_path
    )

    assert result.returncode == 0, str(result)
    assert hub.snapshot() == {"idle": {}, "active": {"": "ready"}}
    assert "stop user=idle server=(default)" in result.stderr
    assert result.stdout == ""  # no --json: nothing on stdout for cron to mail


def test_loop_mode_ends_cleanly_on_sigterm(hub):
    """--cull-every keeps culling until SIGTERM (as systemd or Kubernetes send it), then exits 0."""
    hub.create_users("idle")
    hub.start_server("idle")
    wait_idle()
    looping = subprocess.Popen(
        [sys.executable, CULLER, "--url", hub.api_url, f"--timeout={TIMEOUT}", "--cull-every=1"],
        env=hub.culler_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: hub.snapshot() == {"idle": {}}, 30, "the loop to stop the server")
        time.sleep(1.5)  # one more loop period at least
        looping.send_signal(signal.SIGTERM)
        stderr = looping.communicate(timeout=30)[1]
    finally:
        if looping.poll() is None:
            looping.kill()
            looping.wait()

    assert looping.returncode == 0, stderr
    assert stderr.count("summary") >= 2  # a pass per loop period, not a single pass
    assert "Traceback" not in stderr
    assert hub.snapshot() == {"idle": {}}


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, CULLER, "--timeout=2", "--cull-every=2"],
        # The README's service entry: started by the Hub, it loops every timeout/2 by itself.
        [sys.executable, "-P", "-m", "idle_cull", "--timeout=2"],
    ],
    ids=["script", "module"],
)
def test_hub_managed_service(tmp_path, command):
    """The Hub starts the culler with its own environment, the culler loops and culls on its
    own, and stopping the Hub stops it."""

    def culler_pids():
        return [p for p in descendants(hub.proc.pid) if "idle_cull" in " ".join(cmdline(p))]

    with RealHub(tmp_path, managed_culler=command) as hub:
        started = culler_pids()
        assert len(started) == 1
        hub.create_users("idle", "active")
        for user in ("idle", "active"):
            hub.start_server(user)
            hub.start_server(user, "gpu")

        def idle_culled():
            hub.touch("active", "", "gpu")  # keeps "active" active while we wait
            return hub.snapshot() == {
                "idle": {"gpu": "stopped"},
                "active": {"": "ready", "gpu": "ready"},
            }

        wait_until(idle_culled, 30, "the managed culler to stop the idle servers")
        assert culler_pids() == started  # the same process all along: never restarted
    assert not alive(started[0])
    assert hub.leftovers == []
    log = hub.log_text()
    assert "stop user=idle server=(default)" in log  # the service's log goes to the Hub's
    assert "Service managed-culler exited" not in log
    assert "Traceback" not in log


def test_real_singleuser_servers(tmp_path):
    """Once with the real thing: jupyterhub-singleuser processes, culled, gone afterwards."""
    with RealHub(tmp_path, spawner="simple") as hub:
        hub.create_users("idle", "active")
        servers = [("idle", ""), ("idle", "lab"), ("active", "")]
        for user, server in servers:
            hub.start_server(user, server, wait=False)  # spawn concurrently: ~5 s each
        for user, server in servers:
            hub.wait_ready(user, server)
        pids = {s: hub.server_state(*s)["pid"] for s in servers}
        for pid in pids.values():
            assert alive(pid) and "jupyterhub-singleuser" in " ".join(cmdline(pid))
        wait_idle()
        hub.touch("active", "")

        result = cull(hub, "--remove-named-servers")

        assert hub.snapshot() == {"idle": {}, "active": {"": "ready"}}
        assert actions(result) == {("stop", "idle", "", "done"), ("remove", "idle", "lab", "done")}
        assert not alive(pids[("idle", "")]) and not alive(pids[("idle", "lab")])
        assert alive(pids[("active", "")])
    assert not alive(pids[("active", "")])  # the Hub stopped it on the way out
    assert hub.leftovers == []


def test_make_demo(tmp_path):
    """`make demo` as the Makefile runs it: culls, and leaves no Hub or proxy running."""
    node_bin = REPO / ".node" / "node_modules" / ".bin"
    env = {**os.environ, "PATH": f"{node_bin}:{os.environ.get('PATH', '')}"}
    output = tmp_path / "demo.out"
    started = {}  # pid -> command line, of everything the demo started, seen while it ran

    def command(pid):
        return " ".join(cmdline(pid)).strip()  # empty while a process exits

    def still_running():  # same PID and same command line: not a reused PID
        return [pid for pid, c in started.items() if alive(pid) and command(pid) == c]

    with open(output, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "demo.py")],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while demo.poll() is None and time.monotonic() < deadline:
            started.update((pid, c) for pid in descendants(demo.pid) if (c := command(pid)))
            time.sleep(0.1)
        assert demo.poll() is not None, "the demo did not end within 120 s"
        left = [started[pid] for pid in still_running()]  # before any cleanup of ours
    finally:
        if demo.poll() is None:
            demo.terminate()  # the demo stops its Hub on SIGTERM
            demo.wait(30)
        kill_and_wait(still_running())  # only what the demo left behind
    text = output.read_text(errors="replace")

    assert demo.returncode == 0, text
    assert any(f"{BIN / 'jupyterhub'} -f" in c for c in started.values()), started
    assert any("configurable-http-proxy" in c for c in started.values()), started
    assert left == [], f"still running after the demo: {left}\n{text}"
    assert "Servers unchanged after the dry run: yes" in text
    after = text.split("5. Before and after:")[1]
    for user, server, now in [
        ("alice", r"\(default\)", "stopped"),
        ("bob", r"\(default\)", "still running"),
        ("carol", "gpu", r"stopped \(kept\)"),
        ("dave", r"\(default\)", "still running"),
        ("dave", "experiment", r"stopped \(kept\)"),
    ]:
        assert re.search(rf"^  {user} +{server} +running, idle \d+s +{now}  ", after, re.M), text
    assert re.search(r"\b4 users looked at, 3 servers stopped, 0 failures\b", text), text
    assert "had to kill" not in text
    assert "Done: nothing left running." in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


# -- issue 11: what only a real Hub (and proxy) can show --------------------------------------


def test_read_users_shows_created_and_the_hubs_own_404s_count_as_gone(hub):
    """The README's --cull-users role lets the real Hub show `created`, so a user who never had
    activity is deleted; the real Hub's 404s for an unknown user or server (its message is
    null, or names the server) are the ones idle-cull counts as gone, a name sent as %2E too;
    and why a pass never sends a name of dots: the real proxy collapses %2E."""
    import idle_cull

    hub.create_users("never")
    time.sleep(2)  # older than --user-timeout, with no activity ever
    result = cull(hub, "--cull-users", "--user-timeout=1", token="idle-culler-delete-users")
    assert ("delete_user", "never", "", "done") in actions(result)
    assert "never" not in hub.users()

    hub.create_users("u")
    hub.start_server("u")
    token = hub.tokens["idle-culler-delete-users"]
    direct = idle_cull.HubClient(hub.api_url, token)
    proxied = idle_cull.HubClient(f"{hub.public_url}/hub/api", token)
    try:
        for client in (direct, proxied):
            assert client.delete_user("nobody") == "gone"
            assert client.stop_server("nobody", "", remove=False) == "gone"
            assert client.stop_server("u", "nosuch", remove=False) == "gone"
            assert not client.server_active("nobody", "")
        # Straight to the Hub, %2E is the server "."; through configurable-http-proxy it is
        # collapsed, and the stop of "." stops u's default server.
        assert direct.stop_server("u", ".", remove=False) == "gone"
        assert hub.snapshot() == {"u": {"": "ready"}}
        assert proxied.stop_server("u", ".", remove=False) in ("done", "stopping")
        wait_until(lambda: hub.snapshot() == {"u": {}}, 30, "u's default server stopped")
    finally:
        direct.close()
        proxied.close()
