"""Issue 11, never a wrong cull (round two): odd names, 404s that are not about the object, the
clock, hidden servers, the scope that shows `created`, leaks of the token, unwritable files."""

import json
import re
import sys
from datetime import UTC, datetime, timedelta

import pytest
from conftest import run_cull
from fakehub import CULLER_SCOPES, fmt, iso, server

import idle_cull
from idle_cull import DOT_NAME_KEPT, SERVERS_HIDDEN, Policy, Verdict, plan_user

IDLE, ACTIVE = 3600, 30  # seconds since last activity, against --timeout 600


def idle_server(**kw):
    return server(last_activity=iso(IDLE), **kw)


def active_server(**kw):
    return server(last_activity=iso(ACTIVE), **kw)


def deletes(hub) -> list[str]:
    return [r.raw_path for r in hub.requests if r.method == "DELETE"]


# ---- 1. names of dots reach their own objects; a 404 is "gone" only when it says so ----------


def test_a_pass_never_sends_a_request_for_a_name_of_dots(fake_hub):
    """Through configurable-http-proxy %2E becomes "." and collapses (tests/test_e2e.py): a
    stop for server "." would stop alice's default server, one for user "." delete user
    "server". Such a due stop or delete is left for a person, with a warning."""
    fake_hub.add_user(
        "alice",
        last_activity=iso(IDLE),
        servers={"": active_server(), ".": idle_server(), "..": idle_server()},
    )
    fake_hub.add_user("server", last_activity=iso(ACTIVE), servers={"": active_server()})
    fake_hub.add_user(".", last_activity=iso(IDLE), servers={"": idle_server()})
    fake_hub.add_user("..", last_activity=iso(IDLE), servers={})
    result = run_cull(fake_hub, "--cull-users", "--json")
    assert result.exit_code == 0, result.stderr
    assert deletes(fake_hub) == [] and fake_hub.stops == []
    kept = {(k["user"], k["server"]): k["reason"] for k in result.json["kept"]}
    for key in [("alice", "."), ("alice", ".."), (".", ""), ("..", None)]:
        assert kept[key].endswith(DOT_NAME_KEPT)
        assert f"user {key[0]}" in result.stderr
    assert result.stderr.count(DOT_NAME_KEPT) == 4


@pytest.mark.parametrize(
    "call, path",
    [
        (lambda c: c.stop_server("alice", ".", remove=False), "/hub/api/users/alice/servers/%2E"),
        (
            lambda c: c.stop_server("alice", "..", remove=True),
            "/hub/api/users/alice/servers/%2E%2E",
        ),
        (lambda c: c.stop_server(".", "", remove=False), "/hub/api/users/%2E/server"),
        (lambda c: c.delete_user(".."), "/hub/api/users/%2E%2E"),
        (lambda c: c.server_active(".", ""), "/hub/api/users/%2E"),
    ],
    ids=["stop-named", "remove-named", "stop-default", "delete-user", "look"],
)
def test_each_request_sends_a_name_of_dots_as_percent_2e(fake_hub, call, path):
    """Straight to the Hub (no proxy), %2E reaches the object of that name."""
    fake_hub.add_user(
        "alice", servers={"": active_server(), ".": idle_server(), "..": idle_server()}
    )
    fake_hub.add_user(".", servers={"": idle_server()})
    fake_hub.add_user("..", servers={})
    client = idle_cull.HubClient(fake_hub.url, fake_hub.token)
    try:
        call(client)
    finally:
        client.close()
    assert [r.raw_path for r in fake_hub.requests] == [path]
    assert ("alice", "") in fake_hub.server_names() and not fake_hub.deleted_users[1:]


HUB_404 = json.dumps({"status": 404, "message": "Not Found"}).encode()


@pytest.mark.parametrize(
    "server_name, params, result",
    [
        ("", {"body": HUB_404}, "gone"),  # the Hub: no such user
        ("lab", {"body": HUB_404}, "gone"),
        ("lab", {"body": b'{"status": 404, "message": "u has no server named \'lab\'"}'}, "gone"),
        # Not about this server: another server's message, a proxy's page, a bare 404.
        ("lab", {"body": b'{"status": 404, "message": "u has no server named \'x\'"}'}, "failed"),
        ("", {"body": HUB_404, "proxy": True}, "failed"),
        ("", {"body": b"<html><body>404 Not Found</body></html>", "proxy": True}, "failed"),
        ("", {"body": b"<html><body>404 Not Found</body></html>"}, "failed"),
        ("", {"body": b'{"status": 404, "message": "No such API endpoint"}'}, "failed"),
        ("", {}, "failed"),
    ],
    ids=[
        "hub-user", "hub-named-user", "hub-named", "other-server", "proxy-json", "proxy-html",
        "html", "other-message", "injected",
    ],
)  # fmt: skip
def test_a_404_counts_as_gone_only_when_the_hub_says_so_about_that_object(
    fake_hub, server_name, params, result
):
    fake_hub.add_user("u", last_activity=iso(ACTIVE), servers={server_name: idle_server()})
    tail = f"servers/{server_name}" if server_name else "server"
    fake_hub.add_fault(("DELETE", f"^/hub/api/users/u/{tail}$"), "status", code=404, **params)
    outcome = run_cull(fake_hub, "--json")
    assert [a["result"] for a in outcome.json["actions"]] == [result]
    assert outcome.exit_code == (0 if result == "gone" else 1)
    assert outcome.json["summary"]["servers_stopped"] == (1 if result == "gone" else 0)


@pytest.mark.parametrize("proxy", [False, True], ids=["hub", "proxy"])
def test_a_404_on_deleting_a_user(fake_hub, proxy):
    fake_hub.add_user("u", last_activity=iso(IDLE), servers={})
    fake_hub.add_fault(("DELETE", "^/hub/api/users/u$"), "status", code=404, body=HUB_404,
                       proxy=proxy)  # fmt: skip
    outcome = run_cull(fake_hub, "--cull-users", "--json")
    assert [a["result"] for a in outcome.json["actions"]] == ["failed" if proxy else "gone"]
    assert outcome.exit_code == (1 if proxy else 0)


def test_a_proxy_404_while_waiting_for_a_stop_is_not_done(fake_hub):
    fake_hub.add_user("u", last_activity=iso(IDLE), servers={"": idle_server(stop_after=60)})
    fake_hub.add_fault(("GET", "^/hub/api/users/u$"), "status", code=404, body=HUB_404,
                       proxy=True)  # fmt: skip
    outcome = run_cull(fake_hub, "--cull-users", "--wait-for-stop=2", "--json")
    assert [a["result"] for a in outcome.json["actions"]] == ["stopping", "skipped"]
    assert fake_hub.deleted_users == []


# ---- 5. --notify-command gets an allow-listed environment -------------------------------------


def test_notify_command_gets_neither_token_variable(fake_hub, tmp_path):
    seen = tmp_path / "env.json"
    script = tmp_path / "notify.py"
    script.write_text(f"import json, os\njson.dump(dict(os.environ), open({str(seen)!r}, 'w'))\n")
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    env = {
        "JUPYTERHUB_API_TOKEN": fake_hub.token,  # as the Hub gives a managed service, twice
        "JPY_API_TOKEN": fake_hub.token,
        "DATABASE_PASSWORD": "hunter2",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
    }
    result = run_cull(
        fake_hub,
        "--warn-before=200",
        f"--notify-command={sys.executable} {script}",
        f"--state-file={tmp_path / 'state.json'}",
        env=env,
    )
    assert result.exit_code == 0, result.stderr
    child = json.loads(seen.read_text())
    assert not {"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "DATABASE_PASSWORD"} & set(child)
    assert not [key for key, value in child.items() if fake_hub.token[:8] in value]
    assert child["LC_ALL"] == "C.UTF-8" and child["TZ"] == "UTC" and "PATH" in child


# ---- 7. a token file with two tokens, or not UTF-8 ---------------------------------------------

OLD_TOKEN, NEW_TOKEN = "0ld70k3n" * 4, "n3w70k3n" * 4


def fragments(secret: str, size: int = 8) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


@pytest.mark.parametrize(
    "content",
    [
        f"{OLD_TOKEN}\n{NEW_TOKEN}\n".encode(),
        f"\n  {OLD_TOKEN}  \n\n{NEW_TOKEN}".encode(),
        b"\xff\xfe" + OLD_TOKEN.encode(),
        OLD_TOKEN.encode() + b"\x80\n",
    ],
    ids=["two-lines", "two-with-blanks", "not-utf8-start", "not-utf8-end"],
)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_token_file_with_two_tokens_or_not_utf8_is_a_usage_error(
    fake_hub, tmp_path, content, log_format
):
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    result = run_cull(
        fake_hub, f"--api-token-file={token_file}", f"--log-format={log_format}", "--json"
    )
    assert result.exit_code == 2
    output = result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(token_file) in result.stderr
    assert not [piece for piece in fragments(OLD_TOKEN + NEW_TOKEN) if piece in output]
    assert fake_hub.requests == []


def test_a_token_file_with_one_token_and_blank_lines_is_fine(fake_hub, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"\n  {fake_hub.token}  \n\n")
    fake_hub.add_user("u", servers={"": idle_server()})
    result = run_cull(fake_hub, f"--api-token-file={token_file}", env={"JUPYTERHUB_API_TOKEN": ""})
    assert result.exit_code == 0, result.stderr
    assert fake_hub.stops == [("u", "")]


# ---- 6. the token is blotted out before any text is cut ----------------------------------------

# Characters that JSON escapes, so that the token also shows up in its escaped form.
ODD_TOKEN = 'Qz7"Kw9\\Rv3pL8mN2xJ5tB4hG6yC1dF0s'
OFFSETS = (0, 100, 150, 170, 185, 192, 196, 199, 200, 250, 290, 296, 299, 400)


def leaked(output: str, secret: str = ODD_TOKEN) -> list[str]:
    """Every 8-character piece of the token (plain or JSON-escaped) found in the output."""
    escaped = json.dumps(secret)[1:-1]
    return [p for p in fragments(secret) | fragments(escaped) if p in output]


def echo(offset: int, escaped: bool) -> bytes:
    token = json.dumps(ODD_TOKEN)[1:-1] if escaped else ODD_TOKEN
    message = "." * offset + token + " was refused"
    return json.dumps({"status": 400, "message": message}).encode()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_piece_of_the_token_in_any_output_when_the_hub_echoes_it(hub_factory, log_format):
    hub = hub_factory(token=ODD_TOKEN)
    for offset in OFFSETS:
        for escaped in (False, True):
            name = f"u{offset}{'e' if escaped else ''}"
            hub.add_user(name, last_activity=iso(IDLE), servers={"": idle_server()})
            body = echo(offset, escaped)
            hub.add_fault(("DELETE", f"^/hub/api/users/{name}/server$"), "status", code=400,
                          body=body)  # fmt: skip
    result = run_cull(hub, "--json", f"--log-format={log_format}", "--log-level=debug")
    assert result.exit_code == 1
    errors = [a["error"] for a in result.json["actions"]]
    assert len(errors) == 2 * len(OFFSETS) and all("HTTP 400" in e for e in errors)
    assert leaked(result.stdout + result.stderr) == []


def test_no_piece_of_the_token_from_a_failing_notify_command(hub_factory, tmp_path):
    hub = hub_factory(token=ODD_TOKEN)
    secret_file = tmp_path / "secret"
    secret_file.write_text(ODD_TOKEN)
    script = tmp_path / "notify.py"
    script.write_text(  # a command that, say, read the token file and failed with it on stderr
        "import sys\n"
        f"sys.stderr.write(open({str(secret_file)!r}).read() + ' ' + 'y' * 180)\n"
        "sys.exit(1)\n"
    )
    hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    result = run_cull(
        hub,
        "--warn-before=200",
        f"--notify-command={sys.executable} {script}",
        f"--state-file={tmp_path / 'state.json'}",
        "--json",
    )
    assert result.exit_code == 1
    assert "exited 1" in result.json["errors"][0]
    assert leaked(result.stdout + result.stderr) == []


# ---- 2. "now" is the earlier of the Hub's clock and ours --------------------------------------


def test_a_date_header_a_day_ahead_never_culls_early(hub_factory):
    """A proxy with a fast clock rewrites Date; the Hub's own times are right."""
    hub = hub_factory(date_skew=86400)
    hub.add_user("busy", last_activity=iso(5), servers={"": server(last_activity=iso(5))})
    hub.add_user("idle", last_activity=iso(IDLE), servers={"": idle_server()})
    result = run_cull(hub, "--cull-users", "--json")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")] and hub.deleted_users == ["idle"]
    assert re.search(
        r"clock is -86(39[89]|40[01])s off the Hub's; using the earlier, this", result.stderr
    )
    clocks = {key: datetime.fromisoformat(value) for key, value in result.json["clocks"].items()}
    assert 86398 <= (clocks["hub"] - clocks["local"]).total_seconds() <= 86401


@pytest.mark.parametrize(
    "date",
    ["Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT", "yesterday", "", "0"],
)
def test_any_date_header_is_safe(hub_factory, date):
    hub = hub_factory(date_header=date)
    hub.add_user("busy", servers={"": server(last_activity=iso(5))})
    hub.add_user("idle", servers={"": idle_server()})
    result = run_cull(hub, "--json")
    assert result.exit_code == 0, result.stderr
    # Year 1 is a readable clock, and the earlier: nothing is idle yet. The rest are no clock.
    assert hub.stops == ([] if "0001" in date else [("idle", "")])
    assert set(result.json["clocks"]) == {"hub", "local"}


# ---- 3. a user listed without "servers" on a Hub with named servers: not shown, kept ------------


def test_a_user_without_servers_is_never_deleted_on_a_hub_with_named_servers():
    now = datetime.now(UTC)
    user = {"name": "u", "admin": False, "last_activity": fmt(now - timedelta(days=9))}
    plan = plan_user(user, Policy(cull_users=True), now)
    assert plan.delete is None and not plan.stops
    assert plan.kept == ((None, Verdict(cull=False, reason=SERVERS_HIDDEN)),)
    # Before 0.9 there were no named servers and no "servers": the user's own fields say it all.
    assert plan_user(user, Policy(cull_users=True), now, named_servers=False).delete is not None


def test_a_filtered_read_servers_scope_never_deletes_the_users_it_hides(fake_hub):
    """The Hub leaves "servers" out for users outside a read:servers!group=... filter."""
    fake_hub.add_user("hidden", last_activity=iso(IDLE), servers={"": active_server()})
    fake_hub.add_user("shown", last_activity=iso(IDLE), servers={"": idle_server()})
    hidden = {"kind": "user", "name": "hidden", "admin": False, "last_activity": iso(IDLE)}
    fake_hub.add_fault(lambda req: True, "bad_model", user="hidden", model=hidden)
    result = run_cull(fake_hub, "--cull-users", "--json")
    assert result.exit_code == 0, result.stderr
    assert fake_hub.stops == [("shown", "")] and fake_hub.deleted_users == ["shown"]
    assert {"user": "hidden", "server": None, "reason": SERVERS_HIDDEN} in [
        {key: kept[key] for key in ("user", "server", "reason")} for kept in result.json["kept"]
    ]
    assert "1 user(s) listed without their servers" in result.stderr


def test_a_hub_before_0_9_keeps_todays_reading_of_server(hub_factory):
    hub = hub_factory(version="0.8.1", scopes=None, paginate=False)
    old = iso(IDLE)
    running = {"kind": "user", "name": "running", "admin": False, "last_activity": old,
               "server": "/user/running/", "pending": None, "started": old}  # fmt: skip
    gone = {"kind": "user", "name": "gone", "admin": False, "last_activity": old, "server": None}
    for model in (running, gone):
        hub.add_user(model["name"], servers={})
        hub.add_fault(lambda req: True, "bad_model", user=model["name"], model=model)
    result = run_cull(hub, "--cull-users", "--json")
    assert result.exit_code == 0, result.stderr
    done = {(a["action"], a["user"]) for a in result.json["actions"] if a["result"] == "done"}
    assert done == {("stop", "running"), ("delete_user", "running"), ("delete_user", "gone")}


# ---- 14. a state or metrics file that cannot be written is a failure ----------------------------


def test_an_unwritable_state_file_sends_no_warning_and_fails(fake_hub, tmp_path):
    inbox = tmp_path / "inbox"
    script = tmp_path / "notify.py"
    script.write_text(f"import sys\nopen({str(inbox)!r}, 'a').write(sys.stdin.read() + '\\n')\n")
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(500))})
    fake_hub.add_user("idle", servers={"": idle_server()})
    state = tmp_path / "no-such-folder" / "state.json"
    args = ("--warn-before=200", f"--notify-command={sys.executable} {script}",
            f"--state-file={state}", "--json")  # fmt: skip
    for _ in range(2):  # the same warning is never sent again and again
        result = run_cull(fake_hub, *args)
        assert result.exit_code == 1
        assert result.json["summary"]["failures"] >= 1
        assert result.json["summary"]["warnings_sent"] == 0
        assert any(str(state) in e and "no warning sent" in e for e in result.json["errors"])
    assert not inbox.exists()
    assert fake_hub.stops == [("idle", "")]  # culling goes on all the same


def test_an_unwritable_metrics_file_is_a_failure(fake_hub, tmp_path):
    pytest.importorskip("prometheus_client")
    fake_hub.add_user("idle", servers={"": idle_server()})
    metrics = tmp_path / "no-such-folder" / "idle_cull.prom"
    result = run_cull(fake_hub, f"--metrics-file={metrics}", "--json")
    assert result.exit_code == 1
    assert result.json["summary"]["failures"] == 1
    assert any(str(metrics) in error for error in result.json["errors"])
    assert "failures=1" in result.stderr.splitlines()[-1]
    assert fake_hub.stops == [("idle", "")]
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


# ---- 4. --cull-users needs read:users, the only scope that shows `created` ---------------------

WITHOUT_READ_USERS = [s for s in CULLER_SCOPES if s != "read:users"]


def test_cull_users_needs_read_users_exit_3_naming_it(hub_factory):
    hub = hub_factory(scopes=WITHOUT_READ_USERS)
    hub.add_user("never", last_activity=None, created=iso(IDLE), servers={})
    result = run_cull(hub, "--cull-users", "--json")
    assert result.exit_code == 3
    assert "read:users" in result.stderr and "delete:users" not in result.stderr
    assert hub.deletes() == []
    # Without --cull-users it is not needed.
    assert run_cull(hub).exit_code == 0


def test_a_user_who_never_had_activity_is_deleted_by_created(fake_hub):
    fake_hub.add_user("never", last_activity=None, created=iso(IDLE), servers={})
    fake_hub.add_user("new", last_activity=None, created=iso(ACTIVE), servers={})
    result = run_cull(fake_hub, "--cull-users", "--json")
    assert result.exit_code == 0, result.stderr
    assert fake_hub.deleted_users == ["never"]
