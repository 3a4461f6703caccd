"""Table tests of the pure decision functions: no Hub, no clock, no I/O."""

from datetime import UTC, datetime, timedelta

import pytest

from idle_cull import (
    Policy,
    missing_scopes,
    normalize_argv,
    parse_time,
    plan_user,
    server_verdict,
    supports_state_filter,
    user_verdict,
)

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def ago(seconds):
    return (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def server(idle=None, age=1000, **extra):
    model = {"ready": True, "pending": None, "url": "/user/x/"}
    model["started"] = None if age is None else ago(age)
    model["last_activity"] = None if idle is None else ago(idle)
    return {**model, **extra}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-25T22:45:52.734000Z", datetime(2026, 11, 25, 22, 45, 52, 734000, UTC)),
        ("2026-11-25T22:45:52Z", datetime(2026, 11, 25, 22, 45, 52, tzinfo=UTC)),
        ("2026-11-25T22:45:52", datetime(2026, 11, 25, 22, 45, 52, tzinfo=UTC)),
        ("2026-11-25T23:45:52+01:00", datetime(2026, 11, 25, 22, 45, 52, tzinfo=UTC)),
        ("2026-11-25T22:45:52.7Z", datetime(2026, 11, 25, 22, 45, 52, 700000, UTC)),
        ("yesterday", None),
        ("", None),
        (None, None),
        (1732575952, None),
        (["2026-11-25"], None),
    ],
)
def test_parse_time(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    "name, model, policy, cull, reason",
    [
        ("", server(idle=700), Policy(timeout=600), True, "idle 700s >= timeout 600s"),
        ("", server(idle=600), Policy(timeout=600), True, "idle 600s >= timeout 600s"),
        ("", server(idle=599), Policy(timeout=600), False, "active: idle 599s < timeout 600s"),
        # no activity yet: idle since it started
        ("", server(idle=None, age=700), Policy(timeout=600), True, "idle 700s"),
        ("", server(idle=None, age=500), Policy(timeout=600), False, "active"),
        ("", server(idle=10, age=5000), Policy(timeout=600, max_age=3600), True, "age 5000s"),
        ("", server(idle=10, age=5000), Policy(timeout=600, max_age=0), False, "active"),
        ("", server(idle=10, age=3000), Policy(timeout=600, max_age=3600), False, "active"),
        ("", server(idle=900, pending="spawn"), Policy(), False, "pending spawn"),
        ("", server(idle=900, pending="stop"), Policy(), False, "pending stop"),
        ("", server(idle=900, ready=False), Policy(), False, "not ready"),
        # No "ready" (server models have it since 0.9; before, the user model had no servers)
        ("", {"url": "/user/x/", "last_activity": ago(900)}, Policy(), False, "not ready"),
        ("", {"url": None, "last_activity": ago(900)}, Policy(), False, "not ready"),
        ("gpu", server(idle=900), Policy(cull_named_servers=False), False, "named servers are"),
        ("gpu", server(idle=900), Policy(cull_default_servers=False), True, "idle 900s"),
        ("", server(idle=900), Policy(cull_default_servers=False), False, "default servers are"),
        ("", server(idle=900, age=None, started=None), Policy(), True, "idle 900s"),
        ("", server(age=None, started=None), Policy(), False, "no readable"),
        ("", server(last_activity="garbage", age=5000), Policy(), False, "unreadable"),
        ("", server(last_activity="garbage", started="junk"), Policy(), False, "no readable"),
        ("", server(last_activity="garbage", age=5000), Policy(max_age=10), True, "age 5000s"),
        # activity in the future (clock skew): never idle
        ("", server(idle=-3600), Policy(timeout=600), False, "active"),
    ],
)
def test_server_verdict(name, model, policy, cull, reason):
    verdict = server_verdict(name, model, policy, NOW)
    assert verdict.cull is cull
    assert reason in verdict.reason


def test_arbiter_replaces_the_idle_test_and_sees_the_server():
    seen = {}

    def arbiter(inactive, inactive_limit, server):
        seen.update(inactive=inactive, inactive_limit=inactive_limit, server=server)
        return server["user_options"].get("profile") == "gpu"

    policy = Policy(timeout=600, arbiter=arbiter)
    gpu = server(idle=30, user_options={"profile": "gpu"})
    assert server_verdict("", gpu, policy, NOW).cull is True
    assert seen == {"inactive": timedelta(seconds=30), "inactive_limit": 600, "server": gpu}
    cpu = server(idle=9000, user_options={"profile": "cpu"})
    assert server_verdict("", cpu, policy, NOW).cull is False
    # max-age still applies when the arbiter says no
    old = server(idle=10, age=9000, user_options={})
    assert server_verdict("", old, Policy(max_age=3600, arbiter=arbiter), NOW).cull is True


def test_arbiter_that_raises_means_keep_with_an_error():
    def arbiter(**_):
        raise RuntimeError("boom")

    verdict = server_verdict("", server(idle=9000), Policy(arbiter=arbiter), NOW)
    assert verdict.cull is False
    assert "RuntimeError: boom" in verdict.error


@pytest.mark.parametrize(
    "model, policy, cull, reason",
    [
        ({"last_activity": ago(700), "created": ago(9000)}, Policy(timeout=600), True, "idle 700s"),
        ({"last_activity": ago(100), "created": ago(9000)}, Policy(), False, "active"),
        ({"last_activity": None, "created": ago(700)}, Policy(timeout=600), True, "idle 700s"),
        ({"last_activity": ago(10), "created": ago(9000)}, Policy(max_age=3600), True, "age 9000s"),
        ({"last_activity": None}, Policy(), False, "no readable"),
        ({"last_activity": "?", "created": "?"}, Policy(max_age=5), False, "no readable"),
        (
            {"admin": True, "last_activity": ago(9000)},
            Policy(cull_admin_users=False),
            False,
            "admin",
        ),
        ({"admin": True, "last_activity": ago(9000)}, Policy(), True, "idle 9000s"),
    ],
)
def test_user_verdict(model, policy, cull, reason):
    verdict = user_verdict(model, policy, NOW)
    assert verdict.cull is cull
    assert reason in verdict.reason


def test_plan_stops_named_servers_before_the_default_and_then_deletes_the_user():
    user = {
        "name": "alice",
        "last_activity": ago(900),
        "servers": {"": server(idle=900), "a": server(idle=900), "b": server(idle=900)},
    }
    plan = plan_user(user, Policy(cull_users=True, remove_named_servers=True), NOW)
    assert [(s.server, s.remove) for s in plan.stops] == [("a", True), ("b", True), ("", False)]
    assert plan.delete is not None and plan.delete.cull


def test_plan_keeps_the_user_while_any_server_is_kept():
    user = {
        "name": "bob",
        "last_activity": ago(900),
        "servers": {"": server(idle=900), "busy": server(idle=5)},
    }
    plan = plan_user(user, Policy(cull_users=True), NOW)
    assert [s.server for s in plan.stops] == [""]
    assert plan.delete is None
    assert [name for name, _ in plan.kept] == ["busy"]


def test_plan_deletes_a_user_without_servers_only_with_cull_users():
    user = {"name": "carol", "last_activity": ago(900), "servers": {}}
    assert plan_user(user, Policy(cull_users=True), NOW).delete is not None
    assert not plan_user(user, Policy(), NOW).actionable


def test_plan_reads_the_pre_0_9_user_model():
    user = {"name": "dave", "server": "/user/dave/", "last_activity": ago(900), "pending": None}
    pre_0_9 = {"named_servers": False}  # the Hub's version says so
    assert [s.server for s in plan_user(user, Policy(), NOW, **pre_0_9).stops] == [""]
    assert not plan_user({"name": "dave", "server": None}, Policy(), NOW, **pre_0_9).actionable


@pytest.mark.parametrize(
    "model",
    [
        None,
        [],
        {},
        {"name": ""},
        {"name": 7},
        {"name": "x", "servers": []},
        {"name": "x", "servers": {"": "running"}},
    ],
)
def test_plan_rejects_unreadable_models(model):
    with pytest.raises(ValueError):
        plan_user(model, Policy(), NOW)


@pytest.mark.parametrize(
    "scopes, needed, missing",
    [
        (None, ("list:users",), []),
        (["list:users", "read:servers"], ("list:users", "delete:servers"), ["delete:servers"]),
        (["delete:servers!group=class"], ("delete:servers",), []),
        (["admin:users", "delete:users"], ("delete:users",), []),
        ([], ("list:users",), ["list:users"]),
    ],
)
def test_missing_scopes(scopes, needed, missing):
    identity = {"kind": "service"} if scopes is None else {"scopes": scopes}
    assert missing_scopes(identity, needed) == missing


@pytest.mark.parametrize(
    "version, expected",
    [
        ("6.1.1", True),
        ("1.3.0", True),
        ("1.2.2", False),
        ("0.9.6", False),
        ("5.0.0b1", True),
        (None, True),
        ("unknown", True),
    ],
)
def test_supports_state_filter(version, expected):
    assert supports_state_filter(version) is expected


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--cull_users", "--timeout=600"], ["--cull-users", "--timeout=600"]),
        (
            ["--cull-users=True", "--cull-admin-users=false"],
            ["--cull-users", "--no-cull-admin-users"],
        ),
        (["--remove_named_servers=1", "--max_age=0"], ["--remove-named-servers", "--max-age=0"]),
        (["--url=http://a_b/hub/api"], ["--url=http://a_b/hub/api"]),
        (
            ["--timeout", "600", "--", "--cull_users=x"],
            ["--timeout", "600", "--", "--cull_users=x"],
        ),
    ],
)
def test_normalize_argv_accepts_upstream_spellings(argv, expected):
    assert normalize_argv(argv) == expected


@pytest.mark.parametrize(
    "warn_before, idle, arbiter, warned",
    [
        (0, 590, None, False),  # warnings off
        (60, 590, None, True),  # culled in 10 s
        (60, 500, None, False),  # culled in 100 s: not yet
        (60, 900, lambda **_: False, False),  # an arbiter keeps it past the timeout
    ],
)
def test_plan_warns_only_within_the_window(warn_before, idle, arbiter, warned):
    user = {"name": "u", "servers": {"": server(idle=idle)}}
    plan = plan_user(user, Policy(timeout=600, warn_before=warn_before, arbiter=arbiter), NOW)
    assert bool(plan.warn) is warned
