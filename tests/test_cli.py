"""The command end to end against the fake Hub (real HTTP on 127.0.0.1): every rule of a pass."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from conftest import REPO, TOKEN, assert_usage_error, run_cull, run_cull_subprocess
from fakehub import FakeHub, iso, server

import idle_cull

IDLE, ACTIVE = 3600, 30  # seconds since last activity, against --timeout 600


def idle_server(**kw):
    return server(last_activity=iso(IDLE), **kw)


def active_server(**kw):
    return server(last_activity=iso(ACTIVE), **kw)


def results(report):
    return {(a["action"], a["user"], a["server"]): a["result"] for a in report["actions"]}


def test_idle_servers_are_stopped_and_the_rest_kept(fake_hub):
    fake_hub.add_user("idle", servers={"": idle_server(), "lab": idle_server()})
    fake_hub.add_user("busy", servers={"": active_server()})
    fake_hub.add_user("mixed", servers={"": active_server(), "old": idle_server()})
    fake_hub.add_user("spawning", servers={"": idle_server(pending="spawn", ready=False)})
    fake_hub.add_user("nobody", servers={})

    result = run_cull(fake_hub, "--timeout=600", "--json")

    assert result.exit_code == 0, result.stderr
    assert sorted(fake_hub.stops) == [("idle", ""), ("idle", "lab"), ("mixed", "old")]
    assert fake_hub.server_names() == {("busy", ""), ("mixed", ""), ("spawning", "")}
    assert "nobody" in fake_hub.users and not fake_hub.deleted_users
    summary = result.json["summary"]
    assert summary == {
        "users_scanned": 3,  # the "ready" listing: users with a server that is up
        "servers_stopped": 3,
        "servers_stopping": 0,
        "named_servers_removed": 0,
        "users_deleted": 0,
        "warnings_sent": 0,
        "failures": 0,
    }
    stop = next(a for a in result.json["actions"] if a["server"] == "lab")
    # The Hub's Date header is truncated to the second, so its clock may read up to 1s early.
    assert re.fullmatch(r"idle 3(599|600|601)s >= timeout 600s", stop["reason"])
    assert 3590 < stop["age_s"] < 3610
    assert "stop user=idle server=lab" in result.stderr
    assert "summary: users scanned=3, servers stopped=3" in result.stderr
    # The "ready" listing is used on Hubs >= 1.3, with the paginated answer asked for.
    listing = [r for r in fake_hub.requests if r.kind == "list"]
    assert [r.query.get("state") for r in listing] == ["ready"]
    assert all("jupyterhub-pagination+json" in r.headers["Accept"] for r in listing)


def test_max_age_stops_active_but_old_servers(fake_hub):
    fake_hub.add_user("old", servers={"": active_server(started=iso(7200))})
    fake_hub.add_user("young", servers={"": active_server(started=iso(600))})
    result = run_cull(fake_hub, "--timeout=600", "--max-age=3600", "--json")
    assert result.exit_code == 0
    assert fake_hub.stops == [("old", "")]
    assert re.fullmatch(
        r"age 7(199|200|201)s >= max-age 3600s", result.json["actions"][0]["reason"]
    )


@pytest.mark.parametrize(
    "flag, stopped",
    [
        ("--cull-default-servers=false", [("u", "lab")]),
        ("--cull-named-servers=false", [("u", "")]),
        ("--no-cull-named-servers", [("u", "")]),
    ],
)
def test_default_and_named_selection(fake_hub, flag, stopped):
    fake_hub.add_user("u", servers={"": idle_server(), "lab": idle_server()})
    assert run_cull(fake_hub, flag).exit_code == 0
    assert fake_hub.stops == stopped


def test_remove_named_servers_sends_remove_only_for_named_ones(fake_hub):
    fake_hub.add_user("u", servers={"": idle_server(), "lab": idle_server()})
    result = run_cull(fake_hub, "--remove-named-servers", "--json")
    assert result.exit_code == 0
    bodies = {r.path: r.json() for r in fake_hub.requests if r.method == "DELETE"}
    assert bodies == {
        "/hub/api/users/u/servers/lab": {"remove": True},
        "/hub/api/users/u/server": None,
    }
    assert fake_hub.removed == [("u", "lab")]
    assert result.json["summary"]["named_servers_removed"] == 1
    assert result.json["summary"]["servers_stopped"] == 2


def test_cull_users_deletes_idle_users_once_their_servers_are_stopped(fake_hub):
    fake_hub.add_user(
        "gone", last_activity=iso(IDLE), servers={"": idle_server(), "a": idle_server()}
    )
    fake_hub.add_user(
        "keep", last_activity=iso(IDLE), servers={"": idle_server(), "b": active_server()}
    )
    fake_hub.add_user("empty", last_activity=iso(IDLE), servers={})
    fake_hub.add_user("fresh", last_activity=iso(ACTIVE), servers={})
    fake_hub.add_user("boss", admin=True, last_activity=iso(IDLE), servers={})

    result = run_cull(fake_hub, "--cull-users", "--cull-admin-users=false", "--json")

    assert result.exit_code == 0, result.stderr
    assert sorted(fake_hub.deleted_users) == ["empty", "gone"]
    assert set(fake_hub.users) == {"keep", "fresh", "boss"}
    assert fake_hub.server_names() == {("keep", "b")}
    # The named server is stopped before the user is deleted (the Hub answers 500 otherwise).
    gone = [r.path for r in fake_hub.requests if r.method == "DELETE" and "/gone" in r.path]
    assert gone[-1] == "/hub/api/users/gone" and "/hub/api/users/gone/servers/a" in gone[:-1]
    assert [r.query.get("state") for r in fake_hub.requests if r.kind == "list"] == [
        "ready",
        "inactive",
    ]
    assert result.json["summary"]["users_deleted"] == 2


def test_admins_are_deleted_unless_told_not_to(fake_hub):
    fake_hub.add_user("boss", admin=True, last_activity=iso(IDLE), servers={})
    assert run_cull(fake_hub, "--cull-users").exit_code == 0
    assert fake_hub.deleted_users == ["boss"]


def test_user_timeout_uses_created_when_never_active(fake_hub):
    fake_hub.add_user("never", last_activity=None, created=iso(IDLE), servers={})
    fake_hub.add_user("new", last_activity=None, created=iso(ACTIVE), servers={})
    assert run_cull(fake_hub, "--cull-users").exit_code == 0
    assert fake_hub.deleted_users == ["never"]


def test_a_slow_stop_is_not_a_failure_but_keeps_the_user_for_a_later_pass(fake_hub):
    fake_hub.add_user("slow", last_activity=iso(IDLE), servers={"": idle_server(stop_after=0)})
    result = run_cull(fake_hub, "--cull-users", "--json")
    assert result.exit_code == 0
    assert results(result.json) == {
        ("stop", "slow", ""): "stopping",
        ("delete_user", "slow", ""): "skipped",
    }
    assert result.json["summary"]["servers_stopping"] == 1
    assert not fake_hub.deleted_users
    # The stop finishes (which marks the user active, as the Hub does); once the user is
    # idle again, a later pass deletes the user.
    requests.get(fake_hub.url + "/", timeout=5)
    assert fake_hub.server_names() == set()
    fake_hub.users["slow"]["last_activity"] = iso(IDLE)
    second = run_cull(fake_hub, "--cull-users", "--json")
    assert second.exit_code == 0
    assert fake_hub.deleted_users == ["slow"]


def test_404_on_a_stop_or_delete_counts_as_done(fake_hub):
    fake_hub.add_user("u", last_activity=iso(IDLE), servers={"": idle_server()})
    # The Hub's own 404 for a user that is gone (any other 404: tests/test_round2.py).
    hub_404 = b'{"status": 404, "message": "Not Found"}'
    fake_hub.add_fault(("DELETE", r"/users/u/server$"), "status", code=404, body=hub_404)
    fake_hub.add_fault(("DELETE", r"/users/u$"), "status", code=404, body=hub_404)
    result = run_cull(fake_hub, "--cull-users", "--json")
    assert result.exit_code == 0
    assert set(results(result.json).values()) == {"gone"}
    assert result.json["summary"]["failures"] == 0


def test_one_failing_user_does_not_stop_the_pass(fake_hub):
    for name in ("a", "b", "c"):
        fake_hub.add_user(name, servers={"": idle_server()})
    fake_hub.add_fault(("DELETE", r"/users/b/server$"), "status", code=400)
    result = run_cull(fake_hub, "--json")
    assert result.exit_code == 1
    assert sorted(fake_hub.stops) == [("a", ""), ("c", "")]
    failed = [a for a in result.json["actions"] if a["result"] == "failed"]
    assert [a["user"] for a in failed] == ["b"] and "HTTP 400" in failed[0]["error"]
    assert "stopping the default server of b: HTTP 400" in result.stderr


def test_an_unreadable_user_is_reported_and_left_alone(fake_hub):
    fake_hub.add_user("fine", servers={"": idle_server()})
    fake_hub.add_user("odd", servers={"": idle_server()})
    fake_hub.add_fault(
        lambda r: r.kind == "list", "bad_model", user="odd", model={"name": "odd", "servers": [1]}
    )
    result = run_cull(fake_hub, "--json")
    assert result.exit_code == 1
    assert fake_hub.stops == [("fine", "")]
    assert any("user odd: unreadable model" in e for e in result.json["errors"])


@pytest.mark.parametrize("page_size", [1, 2, 3])
def test_pagination_follows_every_page_even_short_or_empty_ones(fake_hub, page_size):
    # Users without a ready server make "ready" pages short or empty while next is set.
    for i in range(10):
        ready = i % 3 == 0
        fake_hub.add_user(
            f"u{i}", servers={"": idle_server(ready=ready, pending=None if ready else "spawn")}
        )
    result = run_cull(fake_hub, f"--api-page-size={page_size}", "--json")
    assert result.exit_code == 0
    assert sorted(fake_hub.stops) == [("u0", ""), ("u3", ""), ("u6", ""), ("u9", "")]
    listing = [r for r in fake_hub.requests if r.kind == "list"]
    assert sorted(int(r.query.get("offset", 0)) for r in listing) == list(range(0, 10, page_size))
    # Offsets shift when servers stop: nothing is deleted before the listing has ended.
    kinds = [r.kind for r in fake_hub.requests]
    assert max(i for i, k in enumerate(kinds) if k == "list") < kinds.index("stop")


@pytest.mark.parametrize("claimed_total", [None, 100])
@pytest.mark.parametrize("concurrency", ["--no-fixed-concurrency", "--fixed-concurrency"])
def test_every_idle_server_is_stopped_in_one_pass_whatever_the_paging(
    hub_factory, concurrency, claimed_total
):
    # Pages smaller than asked for (the Hub's maximum, 7), short or empty (ready is applied after
    # the page is cut, and `total` counts the pending servers), read concurrently; a `total` that
    # claims fewer users than there are (the `next` links go on); and a list that shrinks at
    # once as servers stop, so that offsets read after any stop would skip users.
    hub = hub_factory(page_max=7, latency=0.005)
    idle = set()
    for i in range(150):
        if i % 5 == 0:
            servers = {"": idle_server(ready=False, pending="spawn")}
        elif i % 3 == 0:
            servers = {"": active_server(), "lab": idle_server()}
            idle.add((f"u{i:03d}", "lab"))
        elif i % 2:
            servers = {"": idle_server()}
            idle.add((f"u{i:03d}", ""))
        else:
            servers = {"": active_server()}
        hub.add_user(f"u{i:03d}", servers=servers)
    if claimed_total:
        hub.add_fault(lambda r: r.kind == "list", "total", total=claimed_total)
    result = run_cull(hub, "--api-page-size=50", concurrency, "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == sorted(idle) and len(hub.stops) == len(idle)
    offsets = sorted(int(r.query.get("offset", 0)) for r in hub.requests if r.kind == "list")
    assert offsets == list(range(0, 150, 7))
    kinds = [r.kind for r in hub.requests]
    assert max(i for i, k in enumerate(kinds) if k == "list") < kinds.index("stop")


def test_users_added_during_the_listing_are_found_through_next(fake_hub):
    for i in range(4):
        fake_hub.add_user(f"u{i}", servers={"": idle_server()})
    added = []

    def grow(request):  # the Hub gains users after the first page told the total
        if request.kind == "list" and not added:
            added.append(True)
            for i in range(4, 7):
                fake_hub.add_user(f"u{i}", servers={"": idle_server()})
        return False

    fake_hub.add_fault(grow, "drop")
    assert run_cull(fake_hub, "--api-page-size=2").exit_code == 0
    assert len(fake_hub.stops) == 7


@pytest.mark.parametrize("slow_offset", ["2", "4"])
def test_a_user_seen_twice_as_offsets_shift_is_acted_on_once(fake_hub, slow_offset):
    for i in range(6):
        fake_hub.add_user(f"u{i}", servers={"": idle_server()})
    shifted = []

    # A user is created at the front once the first page is in. The later pages are fetched
    # concurrently in any order, so the shift comes before whichever of them is asked first.
    def shift(request):
        if request.kind == "list" and request.query.get("offset", "0") != "0" and not shifted:
            shifted.append(True)
            fake_hub.add_user("new", servers={"": active_server()})
            with fake_hub._lock:
                fake_hub.users = {"new": fake_hub.users.pop("new"), **fake_hub.users}
                fake_hub._generation += 1
        return False

    fake_hub.add_fault(shift, "drop")

    def slow(request):  # pages arrive in either order
        return request.kind == "list" and request.query.get("offset") == slow_offset

    fake_hub.add_fault(slow, "hang", seconds=0.3, then="answer")
    result = run_cull(fake_hub, "--api-page-size=2", "--json")
    assert result.exit_code == 0
    assert shifted
    stopped = [r.path for r in fake_hub.requests if r.method == "DELETE"]
    assert sorted(stopped) == [f"/hub/api/users/u{i}/server" for i in range(6)]
    assert len(result.json["actions"]) == 6


@pytest.mark.parametrize("concurrency", [1, 3])
def test_users_are_handled_concurrently_within_the_limit(hub_factory, concurrency):
    hub = hub_factory(latency=0.05)
    for i in range(24):
        hub.add_user(f"u{i}", servers={"": idle_server()})
    assert run_cull(hub, f"--concurrency={concurrency}", "--api-page-size=4").exit_code == 0
    assert len(hub.stops) == 24
    assert hub.peak_in_flight == concurrency


def test_a_hub_without_pagination_or_state_filter(hub_factory):
    hub = hub_factory(version="1.2.2", paginate=False, scopes=None)
    hub.add_user("idle", last_activity=iso(IDLE), servers={"": idle_server()})
    hub.add_user("busy", servers={"": active_server()})
    hub.add_user("empty", last_activity=iso(IDLE), servers={})
    result = run_cull(hub, "--cull-users", "--json")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]
    assert sorted(hub.deleted_users) == ["empty", "idle"]
    # One listing: the first page is asked for before the version is known, with a filter
    # this Hub ignores.
    assert [r.query.get("state") for r in hub.requests if r.kind == "list"] == ["ready"]


def test_dry_run_sends_no_delete_and_reports_the_plan(fake_hub):
    fake_hub.add_user("u", last_activity=iso(IDLE), servers={"": idle_server(), "x": idle_server()})
    result = run_cull(fake_hub, "--dry-run", "--cull-users", "--remove-named-servers", "--json")
    assert result.exit_code == 0
    assert fake_hub.deletes() == []
    assert set(results(result.json).values()) == {"planned"}
    assert result.json["summary"]["users_deleted"] == 1 and result.json["dry_run"] is True
    assert "summary (dry run)" in result.stderr and "would do (dry run)" in result.stderr


def test_the_json_report_says_what_was_kept_and_why(fake_hub):
    fake_hub.add_user("idle", servers={"": idle_server()})
    fake_hub.add_user("busy", servers={"": active_server()})
    fake_hub.add_user("vip", servers={"": idle_server()})
    result = run_cull(fake_hub, "--exclude-user=vip", "--json")
    assert result.exit_code == 0
    kept = {(k["user"], k["server"]): k for k in result.json["kept"]}
    assert set(kept) == {("busy", ""), ("vip", None)}  # None: the whole user
    assert "timeout" in kept[("busy", "")]["reason"] and 25 < kept[("busy", "")]["idle_s"] < 40
    assert "excluded" in kept[("vip", None)]["reason"]
    assert [(a["user"], a["result"]) for a in result.json["actions"]] == [("idle", "done")]


def test_names_with_odd_characters_reach_the_right_url(fake_hub):
    names = ["a/b", "x?y#z", "per%cent", "at@home+1 space", "ünïcødé"]
    for name in names:
        fake_hub.add_user(
            name, last_activity=iso(IDLE), servers={"": idle_server(), "s/1 ?#": idle_server()}
        )
    result = run_cull(fake_hub, "--cull-users", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(fake_hub.stops) == sorted([(n, s) for n in names for s in ("", "s/1 ?#")])
    assert sorted(fake_hub.deleted_users) == sorted(names)
    raw = {r.raw_path for r in fake_hub.requests if r.method == "DELETE"}
    assert "/hub/api/users/a%2Fb/servers/s%2F1%20%3F%23" in raw


# ---- exit codes and errors -----------------------------------------------------------------


def test_missing_scope_exits_3_naming_it_before_any_delete(hub_factory):
    hub = hub_factory(scopes=["list:users", "read:users:activity", "read:servers"])
    hub.add_user("u", servers={"": idle_server()})
    result = run_cull(hub)
    assert result.exit_code == 3
    assert "delete:servers" in result.stderr
    assert hub.deletes() == []


def test_cull_users_needs_delete_users(hub_factory):
    hub = hub_factory(
        scopes=["list:users", "read:users:activity", "read:servers", "delete:servers"]
    )
    assert run_cull(hub).exit_code == 0
    result = run_cull(hub, "--cull-users")
    assert result.exit_code == 3 and "delete:users" in result.stderr


def test_a_read_only_token_may_preview_with_dry_run(hub_factory):
    hub = hub_factory(scopes=["list:users", "read:users:activity", "read:servers"])
    hub.add_user("u", servers={"": idle_server()})
    result = run_cull(hub, "--dry-run")
    assert result.exit_code == 0
    assert "lacks delete:servers: a real run would fail" in result.stderr


def test_refused_token_exits_3(fake_hub):
    result = run_cull(fake_hub, env={"JUPYTERHUB_API_TOKEN": "wrong"})
    assert result.exit_code == 3
    assert "HTTP 403" in result.stderr


def test_unreachable_hub_exits_3():
    result = run_cull(FakeHub(), "--url=http://127.0.0.1:9/hub/api", "--retries=0")
    assert result.exit_code == 3
    assert "could not be used" in result.stderr


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--url=127.0.0.1:8081/hub/api"], {}, "is not an http(s) URL"),
        (["--url=http://[::1/hub/api"], {}, "is not an http(s) URL"),
        (["--url=http://127.0.0.1:99999/hub/api"], {}, "is not an http(s) URL"),
        (["--url=https:///hub/api"], {}, "is not an http(s) URL"),
        (["--timeout=-1"], {}, "--timeout"),
        (["--timeout=ten"], {}, "--timeout"),
        (["--concurrency=-1"], {}, "--concurrency"),
        (["--cull-users=perhaps"], {}, "'perhaps' is not true or false"),
        (["--no-such-option"], {}, "No such option"),
        (["--arbiter=nosuchmodule:f"], {}, "cannot load nosuchmodule:f"),
        (["--arbiter=justamodule"], {}, "is not MODULE:FUNCTION"),
        (["--config=/nonexistent.toml"], {}, "cannot read /nonexistent.toml"),
        ([], {"JUPYTERHUB_API_TOKEN": None}, "no API token"),
        (["--api-token-file=/nonexistent"], {}, "cannot read the API token file"),
        (["--ssl-enabled", "--internal-certs-location=/nonexistent"], {}, "not found"),
        ([], {"JUPYTERHUB_REQUEST_TIMEOUT": "abc"}, "--request-timeout"),
        ([], {"IDLE_CULL_CONCURRENCY": "many"}, "--concurrency"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(fake_hub, args, env, message):
    assert_usage_error(run_cull(fake_hub, *args, env=env), message, fake_hub)


def test_token_file_is_read_and_nothing_leaks_the_token(fake_hub, tmp_path):
    fake_hub.add_user("u", servers={"": idle_server()})
    fake_hub.add_fault(("DELETE", "/users/u/server"), "status", code=500)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    result = run_cull(
        fake_hub,
        f"--api-token-file={token_file}",
        "--log-level=DEBUG",
        "--json",
        "--retries=1",
        env={"JUPYTERHUB_API_TOKEN": None},
    )
    assert result.exit_code == 1
    assert all(
        r.headers["Authorization"] == f"token {TOKEN}"
        for r in fake_hub.requests
        if r.kind != "info"
    )
    assert TOKEN not in result.output
    assert TOKEN not in run_cull(fake_hub, "--help").output


# ---- upstream command lines, environment and config file ---------------------------------


UPSTREAM_LINES = {
    # as written by Zero to JupyterHub's hub config
    "z2jh": [
        "--url=http://localhost:8081/hub/api",
        "--timeout=3600",
        "--cull-every=0",
        "--concurrency=10",
        "--cull-users",
        "--cull-admin-users=false",
        "--remove-named-servers",
        "--max-age=0",
    ],
    # as written by The Littlest JupyterHub
    "tljh": [
        "--url=http://127.0.0.1:15001/hub/api",
        "--timeout=3600",
        "--cull-every=0",
        "--concurrency=5",
        "--max-age=0",
        "--cull-users",
    ],
    # underscores and capitalised booleans, which the upstream option parser accepts
    "spellings": [
        "--url",
        "http://localhost:8081/hub/api",
        "--timeout",
        "3600",
        "--cull_users=True",
        "--cull_admin_users=False",
        "--remove_named_servers",
        "--max_age=0",
        "--concurrency",
        "10",
        "--cull-every",
        "0",
    ],
}


@pytest.mark.parametrize("name", ["z2jh", "spellings"])
def test_upstream_command_lines_parse_to_the_same_settings(fake_hub, captured, name):
    assert run_cull(fake_hub, *UPSTREAM_LINES[name]).exit_code == 0
    policy = captured["policy"]
    assert (policy.timeout, policy.max_age, policy.cull_users, policy.cull_admin_users) == (
        3600,
        0,
        True,
        False,
    )
    assert policy.remove_named_servers and policy.cull_default_servers and policy.cull_named_servers
    assert captured["settings"].concurrency == 10
    assert captured["client"].base == "http://localhost:8081/hub/api"


def test_tljh_command_line(fake_hub, captured):
    assert run_cull(fake_hub, *UPSTREAM_LINES["tljh"]).exit_code == 0
    assert captured["policy"].cull_users and captured["settings"].concurrency == 5


def test_precedence_command_line_then_environment_then_file(fake_hub, captured, tmp_path):
    config = tmp_path / "idle-cull.toml"
    config.write_text("timeout = 100\nmax-age = 7\ncull_users = true\nconcurrency = 3\n")
    run_cull(fake_hub, f"--config={config}")
    assert (captured["policy"].timeout, captured["policy"].max_age) == (100, 7)
    assert captured["policy"].cull_users and captured["settings"].concurrency == 3
    run_cull(
        fake_hub,
        f"--config={config}",
        env={"IDLE_CULL_TIMEOUT": "200", "IDLE_CULL_CULL_USERS": "false"},
    )
    assert captured["policy"].timeout == 200 and not captured["policy"].cull_users
    assert captured["policy"].max_age == 7
    run_cull(fake_hub, f"--config={config}", "--timeout=300", env={"IDLE_CULL_TIMEOUT": "200"})
    assert captured["policy"].timeout == 300


def test_request_timeout_from_the_hub_environment(fake_hub, captured):
    run_cull(fake_hub, env={"JUPYTERHUB_REQUEST_TIMEOUT": "7"})
    assert captured["client"].timeout == 7
    run_cull(fake_hub, "--request-timeout=3", env={"JUPYTERHUB_REQUEST_TIMEOUT": "7"})
    assert captured["client"].timeout == 3


def test_url_from_the_hub_environment_and_config(fake_hub, captured, tmp_path):
    run_cull(fake_hub, "--url", fake_hub.url)  # explicit
    env = {"JUPYTERHUB_API_URL": "http://hub.internal:8081/hub/api"}
    result = CliRunnerNoUrl(fake_hub, env)
    assert result.exit_code == 0
    assert captured["client"].base == "http://hub.internal:8081/hub/api"
    config = tmp_path / "c.toml"
    config.write_text('url = "http://from-file:8081/hub/api"\n')
    CliRunnerNoUrl(fake_hub, {}, f"--config={config}")
    assert captured["client"].base == "http://from-file:8081/hub/api"


def CliRunnerNoUrl(hub, env, *args):  # noqa: N802 - a run without the --url run_cull adds
    from click.testing import CliRunner

    full_env = {"JUPYTERHUB_API_TOKEN": hub.token, "IDLE_CULL_URL": None, **env}
    full_env.setdefault("JUPYTERHUB_API_URL", None)
    return CliRunner().invoke(idle_cull.main, list(args), env=full_env, catch_exceptions=False)


@pytest.mark.parametrize(
    "text, message",
    [
        ("timeout = 60\ntimeuot = 5\n", "unknown setting 'timeuot'"),
        ("timeout = [60]\n", "timeout = [60] is not a plain value"),
        ("exclude-user = [{name = 'x'}]\n", "is not a plain value"),
        ('cull-users = "maybe"\n', "'maybe' is not a valid boolean"),
        ("timeout = 60\n[section]\n", "unknown setting 'section'"),
        ("timeout = {minutes = 5}\n", "is not a plain value"),
        ("timeout = \n", "cannot read"),
        ("[[rule]]\ntimeout = 5\n", "needs `group` or `user_options`"),
        ('[[rule]]\ngroup = "x"\n', "needs `timeout` or `max-age`"),
        ('[[rule]]\ngroup = "x"\ntimeout = -1\n', "timeout: -1 is less than the least, 1s"),
        ('[[rule]]\ngroup = "x"\ntimeout = 5\nprofile = "gpu"\n', "unknown key(s) profile"),
        ('rule = "gpu"\n', "must be [[rule]] tables"),
    ],
)
def test_bad_config_files_are_refused(fake_hub, tmp_path, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text)
    result = run_cull(fake_hub, f"--config={config}")
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- running as a process: entry points, loop mode, lock, deadline -------------------------


def test_runs_as_a_module_and_as_a_script(fake_hub):
    fake_hub.add_user("u", servers={"": idle_server()})
    proc = subprocess.run(
        [sys.executable, "-m", "idle_cull", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("idle-cull, version")
    proc = run_cull_subprocess(fake_hub, "--json")
    assert proc.returncode == 0 and proc.json["summary"]["servers_stopped"] == 1
    # `make install` installs the project, so the console script sits beside the interpreter.
    script = os.path.join(os.path.dirname(sys.executable), "idle-cull")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("idle-cull, version")


def test_python_m_idle_cull_help(tmp_path):
    """Upstream's test_help, with the module name changed: exit 0, and every upstream option."""
    done = subprocess.run(
        [sys.executable, "-m", "idle_cull", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: idle-cull [OPTIONS]")
    assert done.stderr == ""
    for option in (
        "--url",
        "--timeout",
        "--max-age",
        "--cull-every",
        "--cull-users",
        "--cull-admin-users",
        "--cull-default-servers",
        "--cull-named-servers",
        "--remove-named-servers",
        "--concurrency",
        "--api-page-size",
        "--ssl-enabled",
        "--internal-certs-location",
        "--config",
    ):
        assert f"\n  {option} " in done.stdout, option


def _wait_for(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    "args, env",
    [
        (["--cull-every=1"], {}),
        # started by the Hub as a managed service: loops every timeout/2 seconds by default
        (["--timeout=2"], {"JUPYTERHUB_SERVICE_NAME": "idle-culler"}),
    ],
)
def test_loop_mode_culls_on_every_pass_and_stops_cleanly_on_sigterm(fake_hub, args, env):
    fake_hub.add_user("u", servers={"": idle_server()})
    run_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("IDLE_CULL_", "JUPYTERHUB_"))
    }
    run_env.update(env, JUPYTERHUB_API_TOKEN=fake_hub.token)
    proc = subprocess.Popen(
        [sys.executable, "idle_cull.py", "--url", fake_hub.url, *args, "--json"],
        cwd=REPO,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for(lambda: fake_hub.stops == [("u", "")])
        # A server that goes idle later is caught by a later pass of the same process.
        fake_hub.add_user("v", servers={"": idle_server()})
        assert _wait_for(lambda: ("v", "") in fake_hub.stops)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    passes = [json.loads(line) for line in out.splitlines()]
    assert len(passes) >= 2
    # Only the last pass can be cut short by the signal, and then it says so.
    *complete, last = passes
    assert all(p["exit_code"] == 0 for p in complete)
    assert last["exit_code"] == 0 or "stopped by a signal" in last["errors"], last
    assert "stopping on signal" in err


def test_a_held_lock_skips_the_pass(fake_hub, tmp_path):
    fake_hub.add_user("u", servers={"": idle_server()})
    lock = tmp_path / "idle-cull.lock"
    # Another pass's lock: this user's own file, 0600, as idle-cull makes it.
    with open(os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_cull(fake_hub, f"--lock-file={lock}")
    assert result.exit_code == 0
    assert "another pass holds" in result.stderr
    assert fake_hub.requests == []
    assert run_cull(fake_hub, f"--lock-file={lock}").exit_code == 0
    assert fake_hub.stops == [("u", "")]


def test_max_runtime_starts_no_new_action_and_exits_1(hub_factory):
    hub = hub_factory(latency=0.3)
    for i in range(12):
        hub.add_user(f"u{i:02}", servers={"": idle_server()})
    result = run_cull(hub, "--max-runtime=2", "--concurrency=1", "--json")
    assert result.exit_code == 1
    outcome = results(result.json)
    skipped = [k for k, v in outcome.items() if v == "skipped"]
    done = {(user, server) for (_, user, server), v in outcome.items() if v == "done"}
    # The one stop in flight at the deadline is abandoned: the Hub may or may not have acted.
    abandoned = {(user, server) for (_, user, server), v in outcome.items() if v == "abandoned"}
    assert skipped and done and len(skipped) + len(done) + len(abandoned) == 12
    assert len(abandoned) <= 1
    assert done <= set(hub.stops) <= done | abandoned
    assert "--max-runtime reached" in result.json["errors"]


def test_max_runtime_also_ends_the_listing(hub_factory):
    hub = hub_factory(latency=0.3)
    for i in range(20):
        hub.add_user(f"u{i:02}", servers={"": idle_server()})
    result = run_cull(hub, "--max-runtime=1", "--concurrency=1", "--api-page-size=2", "--json")
    assert result.exit_code == 1
    listed = hub.counts["list"]
    assert listed < 10  # of 10 pages: only those asked for before the deadline
    assert f"{10 - listed} page(s) not fetched: --max-runtime reached" in " ".join(
        result.json["errors"]
    )
    assert hub.stops == []


def test_max_runtime_reached_while_listing_ready_users_skips_the_inactive_listing(hub_factory):
    hub = hub_factory()
    hub.add_user("u", servers={"": idle_server()})
    # The first page alone takes longer than --max-runtime: it is abandoned in flight.
    hub.add_fault(lambda r: r.kind == "list", "hang", seconds=5, then="answer")
    result = run_cull(hub, "--cull-users", "--max-runtime=1", "--json")
    assert result.exit_code == 1
    assert [r.query.get("state") for r in hub.requests if r.kind == "list"] == ["ready"]
    assert (
        "listing users (state=inactive): not started: --max-runtime reached"
        in (result.json["errors"])
    )
    assert hub.stops == []


def test_a_bug_is_one_line_and_exit_1_with_the_traceback_on_demand(fake_hub, monkeypatch):
    import idle_cull

    fake_hub.add_user("u", servers={"": idle_server()})

    def broken(user, policy, now, **_):
        raise RuntimeError(f"cannot plan (token {fake_hub.token})")

    monkeypatch.setattr(idle_cull, "plan_user", broken)
    result = run_cull(fake_hub, internal_error=True)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].endswith(
        "internal error (please report it): RuntimeError: cannot plan (token [token]); "
        "--log-level=debug shows where"
    )
    assert "Traceback" not in result.stderr
    debug = run_cull(fake_hub, "--log-level=debug", internal_error=True)
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr and "in broken" in debug.stderr
    assert fake_hub.token not in result.stderr + debug.stderr
    assert fake_hub.stops == []
