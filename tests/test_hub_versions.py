"""Hubs of every age: the version first, a scope check only where the Hub has scopes."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, run_cull
from fakehub import CULLER_SCOPES, iso, server

from idle_cull import has_scopes

IDLE = 3600  # seconds since last activity, against the default --timeout of 600
READ_ONLY = ["list:users", "read:users:activity", "read:servers"]


def idle_server():
    return server(last_activity=iso(IDLE))


def idle_hub(hub_factory, **settings):
    hub = hub_factory(**settings)
    hub.add_user("idle", servers={"": server(last_activity=iso(IDLE))})
    hub.add_user("busy", servers={"": server(last_activity=iso(30))})
    return hub


def unreadable_version(hub):
    hub.add_fault(("GET", "^/hub/api$"), "malformed", body=b'{"version": "unknown"}')


@pytest.mark.parametrize(
    "version, expected",
    [("6.1.1", True), ("2.0.0", True), ("2.0.0b1", True), ("1.5.0", False), ("0.9.6", False)]
    + [(None, True), ("unknown", True), (2, True)],
)
def test_has_scopes(version, expected):
    assert has_scopes(version) is expected


@pytest.mark.parametrize("version", ["1.5.0", "1.2.2", "0.9.6"])
def test_a_hub_before_2_is_culled_without_a_scope_check(hub_factory, version):
    # Its GET /user answers 500 to a service token: asking would lock the culler out.
    hub = idle_hub(hub_factory, version=version, paginate=False, scopes=None)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]
    assert hub.counts["whoami"] == 0
    assert f"JupyterHub {version} has no scopes" in result.stderr


@pytest.mark.parametrize("version", ["2.0.0", "6.1.1"])
def test_a_hub_from_2_with_a_missing_scope_still_exits_3(hub_factory, version):
    hub = idle_hub(hub_factory, version=version, scopes=READ_ONLY)
    result = run_cull(hub)
    assert result.exit_code == 3
    assert "the token lacks the scope(s) delete:servers" in result.stderr
    assert hub.deletes() == []


def test_an_unreadable_version_is_checked_as_a_hub_with_scopes(hub_factory):
    hub = idle_hub(hub_factory, scopes=READ_ONLY)
    unreadable_version(hub)
    result = run_cull(hub)
    assert result.exit_code == 3
    assert "cannot read the Hub's version ('unknown')" in result.stderr
    assert "delete:servers" in result.stderr
    assert hub.deletes() == []


def test_an_unreadable_version_and_no_scopes_in_the_token_model_still_culls(hub_factory):
    hub = idle_hub(hub_factory, scopes=None)  # answers GET /user, with no "scopes" in it
    unreadable_version(hub)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]


def test_a_full_scope_set_culls_on_2_0(hub_factory):
    hub = idle_hub(hub_factory, version="2.0.0", scopes=CULLER_SCOPES)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]
    assert hub.counts["whoami"] == 1


# ---- the start of a pass: one round trip before the listing goes on ------------------------


def hub_of_idle_users(hub_factory, count, **settings):
    hub = hub_factory(**settings)
    for i in range(count):
        hub.add_user(f"u{i}", servers={"": server(last_activity=iso(IDLE))})
    return hub


def test_the_version_and_the_first_page_are_asked_for_together(hub_factory):
    hub = hub_of_idle_users(hub_factory, 1, latency=0.5)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    info, first_page = sorted(hub.requests[:2], key=lambda r: r.kind)
    assert (info.kind, first_page.kind) == ("info", "list")
    assert first_page.query["state"] == "ready" and first_page.query["offset"] == "0"
    assert abs(first_page.received - info.received) < 0.5  # not one after the other
    whoami = next(r for r in hub.requests if r.kind == "whoami")
    assert whoami.received >= info.received + 0.5  # asked once the version said 2.0 or later


def slow_scope_check(hub, seconds):
    hub.add_fault(("GET", "^/hub/api/user$"), "hang", times=1, seconds=seconds, then="answer")


def test_the_listing_goes_on_during_the_scope_check_but_no_stop_before_it(hub_factory):
    hub = hub_of_idle_users(hub_factory, 6)
    slow_scope_check(hub, 1.5)
    result = run_cull(hub, "--api-page-size=2")
    assert result.exit_code == 0, result.stderr
    assert len(hub.stops) == 6
    whoami = next(r for r in hub.requests if r.kind == "whoami")
    answered = whoami.received + 1.5
    assert max(r.received for r in hub.requests if r.kind == "list") < answered
    assert min(r.received for r in hub.requests if r.kind == "stop") >= answered


def test_a_scope_missing_is_found_after_the_listing_and_nothing_is_stopped(hub_factory):
    hub = hub_of_idle_users(hub_factory, 6, scopes=READ_ONLY)
    slow_scope_check(hub, 1.0)
    result = run_cull(hub, "--api-page-size=2", "--json")
    assert result.exit_code == 3
    assert result.json["errors"] == ["the token lacks the scope(s) delete:servers needed to cull"]
    assert hub.deletes() == []


def test_a_listing_refused_for_lack_of_a_scope_names_the_scope(hub_factory):
    hub = hub_of_idle_users(hub_factory, 2, scopes=CULLER_SCOPES[1:])  # no list:users
    result = run_cull(hub)
    assert result.exit_code == 3
    assert "the token lacks the scope(s) list:users" in result.stderr
    assert hub.deletes() == []


def test_a_hub_before_1_3_that_refuses_the_state_filter_is_asked_again_without(hub_factory):
    hub = idle_hub(hub_factory, version="1.2.2", paginate=False, scopes=None)
    hub.add_fault(lambda r: r.kind == "list" and "state" in r.query, "status", code=400)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]
    assert [r.query.get("state") for r in hub.requests if r.kind == "list"] == ["ready", None]


def test_a_hub_from_1_3_whose_first_page_fails_exits_3(hub_factory):
    hub = idle_hub(hub_factory, version="1.3.0", paginate=False, scopes=None)
    hub.add_fault(lambda r: r.kind == "list", "status", code=400)
    result = run_cull(hub)
    assert result.exit_code == 3
    assert "listing users" in result.stderr
    assert hub.counts["list"] == 1 and hub.deletes() == []


def test_the_users_with_the_most_stops_are_carried_out_first(hub_factory):
    # A user's stops run one after another; the long ones first leave no straggler at the end.
    hub = hub_factory()
    hub.add_user("one", servers={"": idle_server()})
    hub.add_user("two", servers={"": idle_server(), "gpu": idle_server()})
    result = run_cull(hub, "--concurrency=1")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("two", "gpu"), ("two", ""), ("one", "")]


LAZY = ("subprocess", "fcntl", "asyncio", "tomllib", "prometheus_client", "click._termui_impl")


def test_a_plain_pass_imports_only_what_it_needs(fake_hub):
    fake_hub.add_user("u", servers={"": server(last_activity=iso(IDLE))})
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['idle-cull', '--url', {fake_hub.url!r}]\n"
        "try:\n"
        "    runpy.run_module('idle_cull', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        f"    print(exit.code, sorted(m for m in {LAZY!r} if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDLE_CULL_", "JUPYTERHUB_"))}
    env["JUPYTERHUB_API_TOKEN"] = fake_hub.token
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.stdout.split(None, 1) == ["0", "[]\n"], proc.stderr
    assert fake_hub.stops == [("u", "")]
