"""What operators asked for: exclusions, rules, user timeout, slow stops, warnings, metrics,
JSON logs and the terminal view; each against the fake Hub."""

import json
import os
import pty
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO, run_cull
from fakehub import CULLER_SCOPES, iso, server

IDLE, ACTIVE = 3600, 30


def idle_server(**kw):
    return server(last_activity=iso(IDLE), **kw)


def active_server(**kw):
    return server(last_activity=iso(ACTIVE), **kw)


# ---- exclusions --------------------------------------------------------------------------


@pytest.fixture
def groups_hub(hub_factory):
    """A Hub whose culler token may also read groups."""
    return hub_factory(scopes=[*CULLER_SCOPES, "read:users:groups"])


def test_excluded_users_and_groups_are_never_touched(groups_hub, tmp_path):
    fake_hub = groups_hub
    for name, groups in [("alice", []), ("bob", []), ("carol", ["staff"]), ("dave", ["class"])]:
        fake_hub.add_user(name, last_activity=iso(IDLE), groups=groups, servers={"": idle_server()})
    config = tmp_path / "c.toml"
    config.write_text('exclude-user = ["bob"]\n')
    result = run_cull(
        fake_hub,
        f"--config={config}",
        "--exclude-user=alice",
        "--exclude-group=staff",
        "--cull-users",
    )
    # The command line's list replaces the file's, as for every other option.
    assert result.exit_code == 0, result.stderr
    assert sorted(fake_hub.stops) == [("bob", ""), ("dave", "")]
    assert sorted(fake_hub.deleted_users) == ["bob", "dave"]
    assert run_cull(fake_hub, f"--config={config}").exit_code == 0


def test_config_file_exclusions(groups_hub, tmp_path):
    fake_hub = groups_hub
    for name in ("alice", "bob"):
        fake_hub.add_user(name, groups=[], servers={"": idle_server()})
    config = tmp_path / "c.toml"
    config.write_text('exclude-user = "bob"\nexclude_group = ["nobody"]\n')
    assert run_cull(fake_hub, f"--config={config}").exit_code == 0
    assert fake_hub.stops == [("alice", "")]


def test_group_exclusion_without_groups_in_the_listing_exits_3(hub_factory):
    hub = hub_factory(scopes=None)  # a Hub that lists no scopes: only the models can tell
    hub.add_user("alice", servers={"": idle_server()})  # no "groups" field
    result = run_cull(hub, "--exclude-group=staff")
    assert result.exit_code == 3
    assert "read:users:groups" in result.stderr
    assert hub.deletes() == []


def test_group_exclusion_needs_the_groups_scope(fake_hub):
    fake_hub.add_user("alice", groups=[], servers={"": idle_server()})
    result = run_cull(fake_hub, "--exclude-group=staff")
    assert result.exit_code == 3 and "read:users:groups" in result.stderr
    assert fake_hub.deletes() == []


# ---- rules ---------------------------------------------------------------------------------


RULES = """
timeout = 3000

[[rule]]
group = "gpu-users"
timeout = 600

[[rule]]
user_options = { profile = "gpu" }
timeout = 300
max-age = 7000

[[rule]]
user_options = { profile = "gpu" }
timeout = 5
"""


def test_rules_set_limits_per_group_and_profile_first_match_wins(groups_hub, tmp_path):
    hub = groups_hub
    idle_20_min = iso(1200)
    hub.add_user("g", groups=["gpu-users"], servers={"": server(last_activity=idle_20_min)})
    hub.add_user(
        "p",
        groups=[],
        servers={
            "": server(last_activity=iso(400), user_options={"profile": "gpu"}),
            "cpu": server(last_activity=iso(400), user_options={"profile": "cpu"}),
        },
    )
    hub.add_user(
        "old",
        groups=[],
        servers={
            "": server(last_activity=iso(10), started=iso(8000), user_options={"profile": "gpu"}),
        },
    )
    hub.add_user("plain", groups=[], servers={"": server(last_activity=idle_20_min)})
    config = tmp_path / "rules.toml"
    config.write_text(RULES)
    result = run_cull(hub, f"--config={config}", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("g", ""), ("old", ""), ("p", "")]
    reasons = {a["user"]: a["reason"] for a in result.json["actions"]}
    assert "timeout 600s" in reasons["g"] and "timeout 300s" in reasons["p"]
    assert "max-age 7000s" in reasons["old"]


def test_the_arbiter_decides_last_with_the_rule_limit(hub_factory, tmp_path, monkeypatch):
    (tmp_path / "my_arbiter.py").write_text(
        "def decide(inactive, inactive_limit, server):\n    return inactive_limit == 300\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # as PYTHONPATH would
    hub = hub_factory()
    hub.add_user("gpu", servers={"": active_server(user_options={"profile": "gpu"})})
    hub.add_user("cpu", servers={"": idle_server(user_options={"profile": "cpu"})})
    config = tmp_path / "rules.toml"
    config.write_text('[[rule]]\nuser_options = { profile = "gpu" }\ntimeout = 300\n')
    result = run_cull(hub, f"--config={config}", "--arbiter=my_arbiter:decide")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("gpu", "")]


# ---- user timeout and slow stops -------------------------------------------------------


def test_user_timeout_is_separate_from_the_server_timeout(fake_hub):
    fake_hub.add_user("recent", last_activity=iso(IDLE), servers={"": idle_server()})
    fake_hub.add_user("ancient", last_activity=iso(40 * 86400), servers={})
    result = run_cull(fake_hub, "--cull-users", f"--user-timeout={30 * 86400}")
    assert result.exit_code == 0
    assert fake_hub.stops == [("recent", "")]
    assert fake_hub.deleted_users == ["ancient"]


def test_wait_for_stop_lets_the_user_be_deleted_in_the_same_pass(fake_hub):
    fake_hub.add_user("slow", last_activity=iso(IDLE), servers={"": idle_server(stop_after=1)})
    result = run_cull(fake_hub, "--cull-users", "--wait-for-stop=20", "--json")
    assert result.exit_code == 0, result.stderr
    assert fake_hub.deleted_users == ["slow"]
    assert result.json["summary"]["servers_stopping"] == 0
    assert any(r.kind == "get_user" for r in fake_hub.requests)


def test_wait_for_stop_gives_up_and_counts_the_server_as_stopping(fake_hub):
    fake_hub.add_user("stuck", last_activity=iso(IDLE), servers={"": idle_server(stop_after=60)})
    result = run_cull(fake_hub, "--cull-users", "--wait-for-stop=2", "--json")
    assert result.exit_code == 0
    assert result.json["summary"]["servers_stopping"] == 1
    assert not fake_hub.deleted_users


def test_max_runtime_cuts_the_wait_for_stop_short(fake_hub):
    fake_hub.add_user("stuck", last_activity=iso(IDLE), servers={"": idle_server(stop_after=60)})
    result = run_cull(fake_hub, "--cull-users", "--wait-for-stop=30", "--max-runtime=1", "--json")
    assert result.exit_code == 1
    assert result.json["summary"]["servers_stopping"] == 1
    assert result.json["duration_s"] < 15  # not the 30 s of --wait-for-stop
    assert "--max-runtime reached" in result.json["errors"]
    assert not fake_hub.deleted_users


# ---- warnings before culling -------------------------------------------------------------


@pytest.fixture
def notifier(tmp_path):
    """A --notify-command that appends its stdin to a file, and what it received."""
    inbox = tmp_path / "inbox.jsonl"
    script = tmp_path / "notify.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(inbox)!r}, 'a').write(sys.stdin.read() + '\\n')\n"
        "sys.exit(1 if os.environ.get('JUPYTERHUB_API_TOKEN') else 0)\n"
    )

    def received():
        if not inbox.exists():
            return []
        return [json.loads(line) for line in inbox.read_text().splitlines()]

    return f"{sys.executable} {script}", received


def test_warnings_are_sent_once_per_window(fake_hub, tmp_path, notifier):
    command, received = notifier
    state = tmp_path / "state.json"
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    fake_hub.add_user("later", servers={"": server(last_activity=iso(100))})
    fake_hub.add_user("gone", servers={"": idle_server()})
    args = ("--warn-before=200", f"--notify-command={command}", f"--state-file={state}", "--json")

    first = run_cull(fake_hub, *args)
    assert first.exit_code == 0, first.stderr
    assert [(m["user"], m["server"]) for m in received()] == [("soon", "")]
    message = received()[0]
    assert message["event"] == "cull_warning" and 95 <= message["cull_in_s"] <= 101
    assert first.json["summary"]["warnings_sent"] == 1
    assert fake_hub.stops == [("gone", "")]

    assert run_cull(fake_hub, *args).exit_code == 0
    assert len(received()) == 1  # still in the same window: not again

    # Active again (out of the window), then idle into it again: a new window, a new warning.
    fake_hub.users["soon"]["servers"][""]["last_activity"] = iso(10)
    assert run_cull(fake_hub, *args).exit_code == 0
    fake_hub.users["soon"]["servers"][""]["last_activity"] = iso(450)
    assert run_cull(fake_hub, *args).exit_code == 0
    assert [m["user"] for m in received()] == ["soon", "soon"]


def test_a_failing_notify_command_never_blocks_culling(fake_hub, tmp_path):
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    fake_hub.add_user("gone", servers={"": idle_server()})
    result = run_cull(
        fake_hub,
        "--warn-before=200",
        "--notify-command=false",
        f"--state-file={tmp_path / 's.json'}",
    )
    assert result.exit_code == 1
    assert fake_hub.stops == [("gone", "")]
    assert "could not warn user soon" in result.stderr


def test_warnings_due_after_max_runtime_are_sent_by_the_next_pass(fake_hub, tmp_path, notifier):
    command, received = notifier
    fake_hub.add_user("stuck", servers={"": idle_server(stop_after=60)})  # holds the pass up
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    args = ("--warn-before=200", f"--notify-command={command}", f"--state-file={tmp_path / 's'}")
    first = run_cull(fake_hub, *args, "--wait-for-stop=30", "--max-runtime=1", "--json")
    assert first.exit_code == 1
    assert received() == []
    assert "1 warning(s) not sent: --max-runtime reached" in first.json["errors"]
    assert run_cull(fake_hub, *args).exit_code == 0
    assert [m["user"] for m in received()] == ["soon"]


def test_dry_run_sends_no_warning(fake_hub, tmp_path, notifier):
    command, received = notifier
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    state = tmp_path / "state.json"
    result = run_cull(
        fake_hub,
        "--dry-run",
        "--warn-before=200",
        f"--notify-command={command}",
        f"--state-file={state}",
    )
    assert result.exit_code == 0
    assert received() == [] and not state.exists()
    assert "would warn user=soon" in result.stderr


def test_warn_before_needs_a_command_and_a_state_file(fake_hub, tmp_path):
    result = run_cull(fake_hub, "--warn-before=60")
    assert result.exit_code == 2 and "--notify-command and --state-file" in result.stderr
    state = f"--state-file={tmp_path / 's.json'}"
    result = run_cull(fake_hub, "--warn-before=60", "--notify-command=mail 'unclosed", state)
    assert result.exit_code == 2 and "No closing quotation" in result.stderr


# ---- observability -----------------------------------------------------------------------


def test_json_log_lines_have_stable_keys(fake_hub, tmp_path):
    fake_hub.add_user("u", servers={"": idle_server()})
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    result = run_cull(
        fake_hub,
        "--log-format=json",
        "--insecure",  # one more kind of line: a plain warning
        "--warn-before=200",
        "--notify-command=true",
        f"--state-file={tmp_path / 's'}",
    )
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    keys = {"time", "level", "event", "message", "user", "server", "reason", "idle_s", "age_s"}
    assert all(keys <= set(line) for line in lines)
    events = {line["event"]: line for line in lines}
    assert {"log", "stop", "warn", "summary"} <= set(events)
    stop, warn = events["stop"], events["warn"]
    assert stop["user"] == "u" and stop["server"] == "" and stop["idle_s"] > 3500
    assert warn["user"] == "soon" and 495 < warn["idle_s"] < 510
    assert warn["reason"].startswith("culled in ")
    assert events["log"]["user"] is None and events["log"]["idle_s"] is None
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["message"].startswith("summary:")
    assert summary["summary"]["servers_stopped"] == 1 and summary["summary"]["warnings_sent"] == 1


def test_metrics_file_keeps_the_last_success_across_a_failed_pass(fake_hub, tmp_path):
    metrics = tmp_path / "idle_cull.prom"
    fake_hub.add_user("u", servers={"": idle_server()})
    assert run_cull(fake_hub, f"--metrics-file={metrics}").exit_code == 0
    first = _samples(metrics.read_text())
    assert first["idle_cull_servers_stopped"] == 1 and first["idle_cull_exit_code"] == 0
    assert first["idle_cull_last_success_timestamp_seconds"] > 1.7e9

    fake_hub.add_user("v", servers={"": idle_server()})
    fake_hub.add_fault(("DELETE", "/users/v/server"), "status", code=400)
    assert run_cull(fake_hub, f"--metrics-file={metrics}").exit_code == 1
    second = _samples(metrics.read_text())
    assert second["idle_cull_failures"] == 1 and second["idle_cull_exit_code"] == 1
    assert (
        second["idle_cull_last_success_timestamp_seconds"]
        == (first["idle_cull_last_success_timestamp_seconds"])
    )
    assert not list(tmp_path.glob("*.tmp"))


def _samples(text):
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_are_pushed_to_a_pushgateway(fake_hub):
    pushed = []

    class Gateway(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            length = int(self.headers["Content-Length"])
            pushed.append((self.path, self.rfile.read(length).decode()))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    gateway = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    try:
        fake_hub.add_user("u", servers={"": idle_server()})
        url = f"http://127.0.0.1:{gateway.server_address[1]}"
        assert run_cull(fake_hub, f"--pushgateway={url}").exit_code == 0
    finally:
        gateway.shutdown()
    assert [path for path, _ in pushed] == ["/metrics/job/idle_cull"]
    assert "idle_cull_servers_stopped 1.0" in pushed[0][1]
    assert fake_hub.token not in pushed[0][1]


def test_a_terminal_sees_progress_and_a_table(fake_hub):
    for i in range(5):
        fake_hub.add_user(f"u{i}", servers={"": idle_server()})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDLE_CULL_", "JUPYTERHUB_"))}
    env.update(JUPYTERHUB_API_TOKEN=fake_hub.token, COLUMNS="100")
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "idle_cull.py", "--url", fake_hub.url],
        cwd=REPO,
        env=env,
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=30) == 0
    text = output.decode(errors="replace")
    assert "Listing users" in text and "Culling" in text
    assert "done  gone  stopping  failed  skipped" in text
    assert re.search(r"^stop +5 +0 +0 +0 +0\r?$", text, re.MULTILINE)


def test_no_progress_bar_when_not_on_a_terminal(fake_hub):
    fake_hub.add_user("u", servers={"": idle_server()})
    result = run_cull(fake_hub)
    assert "Listing users" not in result.output and "skipped" not in result.output
