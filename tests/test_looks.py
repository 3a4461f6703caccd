"""Looks inside servers (issue 12): --server-api-url, --keep-busy-kernels, --activity-source.

The rule (busy, silent and idle times from a kernel list, and what they do to a verdict) is
tested as pure functions, with properties; the looks themselves against the fake Hub, whose
fake server API answers /user/<name>/[<server>/]api/... as the proxy would pass it on.
"""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime, timedelta

import pytest
from conftest import TOKEN, run_cull
from fakehub import CULLER_SCOPES, fmt, iso, kernel, server
from hypothesis import example, given
from hypothesis import strategies as st

from idle_cull import Inside, Policy, read_inside, server_verdict

LOOK_SCOPES = [*CULLER_SCOPES, "tokens"]
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
IDLE, ACTIVE = 3600, 30  # seconds since the Hub's last activity, against --timeout 600


def ago(seconds: float) -> str:
    return fmt(NOW - timedelta(seconds=seconds))


def k(state: str, seconds_ago: float) -> dict:
    return {"id": "k", "execution_state": state, "last_activity": ago(seconds_ago)}


def model(idle: float, age: float = 7200) -> dict:
    return {"ready": True, "pending": None, "url": "/user/u/", "started": ago(age),
            "last_activity": ago(idle)}  # fmt: skip


def idle_server(**kw):
    return server(last_activity=iso(IDLE), **kw)


def active_server(**kw):
    return server(last_activity=iso(ACTIVE), **kw)


# ---- the rule: what a kernel list says -------------------------------------------------------


def test_read_inside_busy_silent_and_idle():
    inside = read_inside(
        [k("busy", 500), k("busy", 90), k("idle", 40), k("starting", 10)],
        [{"name": "1", "last_activity": ago(20)}],
        NOW,
    )
    assert inside == Inside(kernels=4, terminals=1, busy=2, silent=90, idle=10)


def test_starting_is_not_busy_and_terminals_unasked_are_none():
    inside = read_inside([k("starting", 5000)], None, NOW)
    assert inside == Inside(kernels=1, terminals=None, busy=0, silent=None, idle=5000)


def test_the_servers_own_activity_counts_only_when_it_has_nothing_inside():
    assert read_inside([], [], NOW, server_activity=ago(700)).idle == 700
    assert read_inside([k("idle", 50)], [], NOW, server_activity=ago(700)).idle == 50
    assert read_inside([], [], NOW).idle is None


def test_a_clock_ahead_gives_no_negative_times():
    assert read_inside([k("busy", -3)], None, NOW).silent == 0


@pytest.mark.parametrize(
    "kernels, terminals, activity",
    [
        ({"kernels": []}, None, None),  # not a list
        (["k"], None, None),  # not a kernel
        ([{"execution_state": "busy"}], None, None),  # no last_activity
        ([{"execution_state": "busy", "last_activity": "yesterday"}], None, None),
        ([{"last_activity": ago(5)}], None, None),  # no execution_state
        ([{"execution_state": 1, "last_activity": ago(5)}], None, None),
        ([], "none", None),
        ([], [{"name": "1"}], None),
        ([], [], "never"),  # the server's own time unreadable
    ],
)
def test_unreadable_answers_are_could_not_see(kernels, terminals, activity):
    with pytest.raises(ValueError):
        read_inside(kernels, terminals, NOW, server_activity=activity)


# ---- the rule: what a look does to a verdict ------------------------------------------------

BUSY = Policy(timeout=600, keep_busy_kernels=3600)
KERNELS = Policy(timeout=600, activity_source="kernels")
BOTH = Policy(timeout=600, activity_source="kernels", keep_busy_kernels=3600)
FAILED = Inside(error="HTTP 403 Forbidden")


@pytest.mark.parametrize(
    "policy, server_model, inside, cull, said",
    [
        # --keep-busy-kernels: only a would-be stop for idleness is looked at
        (BUSY, model(idle=700), None, "look", ""),
        (BUSY, model(idle=500), None, False, "active: idle 500s"),
        (Policy(timeout=600, max_age=3600, keep_busy_kernels=3600), model(idle=700), None, True,
         "idle 700s"),  # max-age culls anyway: no look
        (BUSY, model(idle=700), Inside(kernels=1, busy=1, silent=100, idle=100), False,
         "silent 100s < keep-busy-kernels 3600s"),
        (BUSY, model(idle=700), Inside(kernels=1, busy=1, silent=4000, idle=4000), True,
         "stuck, silent 4000s >= keep-busy-kernels 3600s"),
        (BUSY, model(idle=700), Inside(kernels=1, busy=0, idle=5), True, "0 busy"),
        (BUSY, model(idle=700), FAILED, True, "no look inside (HTTP 403 Forbidden)"),
        (Policy(timeout=600), model(idle=700), None, True, "idle 700s"),  # off: no look
        # --activity-source=kernels: every ready server older than the timeout is looked at
        (KERNELS, model(idle=30), None, "look", ""),
        (KERNELS, model(idle=30, age=500), None, False, "active: idle 30s"),
        (KERNELS, model(idle=30), Inside(kernels=1, terminals=0, idle=1000), True,
         "idle 1000s >= timeout 600s; 1 kernel(s), 0 busy, 0 terminal(s): idle inside 1000s"),
        (KERNELS, model(idle=900), Inside(kernels=1, terminals=1, idle=100), False,
         "active: idle 100s"),
        (KERNELS, model(idle=30), Inside(kernels=0, terminals=0, idle=1000), True,
         "the server's own last_activity, 1000s ago"),
        (KERNELS, model(idle=30), FAILED, False, "active: idle 30s < timeout 600s; no look"),
        (KERNELS, model(idle=900), FAILED, True, "idle 900s >= timeout 600s; no look"),
        # a busy kernel, with and without --keep-busy-kernels
        (KERNELS, model(idle=30), Inside(kernels=1, terminals=0, busy=1, silent=900, idle=900),
         True, "idle inside 900s"),
        (BOTH, model(idle=30), Inside(kernels=1, terminals=0, busy=1, silent=900, idle=900),
         False, "silent 900s < keep-busy-kernels 3600s"),
        (BOTH, model(idle=30), Inside(kernels=1, terminals=0, busy=1, silent=5000, idle=5000),
         True, "stuck"),
    ],
)  # fmt: skip
def test_what_a_look_decides(policy, server_model, inside, cull, said):
    verdict = server_verdict("", server_model, policy, NOW, inside=inside)
    assert (verdict.look and "look") or verdict.cull == cull, verdict
    assert said in verdict.reason
    assert verdict.inside == inside


TIMES = st.floats(0, 10**6)


@st.composite
def insides(draw) -> Inside:
    if draw(st.booleans()):
        return Inside(error="refused")
    busy = draw(st.integers(0, 3))
    return Inside(
        kernels=busy + draw(st.integers(0, 3)),
        terminals=draw(st.one_of(st.none(), st.integers(0, 2))),
        busy=busy,
        silent=draw(TIMES) if busy else None,
        idle=draw(TIMES),
    )


@given(idle=TIMES, age=TIMES, timeout=st.integers(1, 10**5), keep=st.integers(1, 10**5),
       max_age=st.one_of(st.just(0), st.integers(1, 10**6)), inside=insides())  # fmt: skip
# An age a hair under max-age that the model's microsecond timestamps round up to it.
@example(idle=2.0, age=999999.9999999999, timeout=1, keep=1, max_age=10**6,
         inside=Inside(error="refused"))  # fmt: skip
def test_keep_busy_kernels_only_ever_keeps(idle, age, timeout, keep, max_age, inside):
    """With the Hub's activity, a look can save a server the Hub would stop, never stop one
    it would keep; a failed look leaves the Hub's verdict; a busy kernel silent for less than
    the limit is never stopped for idleness."""
    server_model = model(idle=min(idle, age), age=age)
    hub = server_verdict("", server_model, Policy(timeout=timeout, max_age=max_age), NOW)
    policy = Policy(timeout=timeout, max_age=max_age, keep_busy_kernels=keep)
    first = server_verdict("", server_model, policy, NOW)
    # The age as the verdict reads it from the model's timestamps, not the drawn float.
    assert first.look == (hub.cull and not first.reason.startswith("age") and not (
        max_age and hub.age >= max_age))  # fmt: skip
    if not first.look:
        assert first.cull == hub.cull
        return
    after = server_verdict("", server_model, policy, NOW, inside=inside)
    assert not after.look
    if inside.error:
        assert after.cull == hub.cull
    elif inside.busy and inside.silent < keep:
        assert not after.cull
    else:
        assert after.cull


@given(idle=TIMES, age=TIMES, timeout=st.integers(1, 10**5), inside=insides())
@example(idle=0.0, age=99999.9999999999, timeout=10**5, inside=Inside(error="refused"))
def test_kernels_source_judges_by_what_is_inside(idle, age, timeout, inside):
    """With --activity-source=kernels a server is judged by its kernels' idle time; with no
    look (younger than the timeout) or a failed one, by the Hub's."""
    server_model = model(idle=min(idle, age), age=age)
    hub = server_verdict("", server_model, Policy(timeout=timeout), NOW)
    policy = Policy(timeout=timeout, activity_source="kernels")
    first = server_verdict("", server_model, policy, NOW)
    assert first.look == (hub.age >= timeout)
    if not first.look:
        assert first.cull == hub.cull
        return
    after = server_verdict("", server_model, policy, NOW, inside=inside)
    if inside.error:
        assert after.cull == hub.cull
    else:
        assert after.cull == (inside.idle >= timeout)


@given(
    states=st.lists(
        st.tuples(st.sampled_from(["busy", "idle", "starting", "dead"]), st.floats(0, 10**6)),
        max_size=6,
    )
)
def test_only_busy_kernels_are_busy(states):
    inside = read_inside([k(state, when) for state, when in states], None, NOW)
    busy = [when for state, when in states if state == "busy"]
    assert inside.busy == len(busy)
    assert inside.silent == (pytest.approx(min(busy), abs=1e-5) if busy else None)
    assert inside.idle == (pytest.approx(min(w for _, w in states), abs=1e-5) if states else None)


# ---- looks against the fake Hub --------------------------------------------------------------


@pytest.fixture
def hub(hub_factory):
    return hub_factory(scopes=LOOK_SCOPES)


def looking(hub, *args, **kwargs):
    return run_cull(hub, "--json", f"--server-api-url={hub.base_url}", *args, **kwargs)


def looks(hub):
    return sorted(r.raw_path for r in hub.requests if r.kind == "look")


def kept(result):
    return {(e["user"], e["server"]): e for e in result.json["kept"]}


def acted(result):
    return {(a["user"], a["server"]): a for a in result.json["actions"]}


def assert_owners_keys(hub):
    """The culler's token went to the Hub only; each look carried a token made for its owner
    and for that very server; every token made was revoked."""
    made = {token.secret: token for token in hub.minted}
    for request in hub.requests:
        scheme, _, credential = (request.headers.get("Authorization") or "").partition(" ")
        assert scheme == "token", request.raw_path
        if request.kind == "look":
            token = made[credential]  # a KeyError: not a token the Hub made for a look
            assert (token.owner, token.server) == request.looked_at, request.raw_path
        else:
            assert credential == TOKEN, request.raw_path
    assert all(token.revoked for token in hub.minted)


def test_keep_busy_kernels_keeps_computations_and_stops_the_stuck(hub):
    hub.add_user("computing", servers={"": idle_server()})
    hub.set_inside("computing", "", kernels=[kernel("busy", 3000), kernel("idle", 4000)])
    hub.add_user("stuck", servers={"": idle_server()})
    hub.set_inside("stuck", "", kernels=[kernel("busy", 5000)])
    hub.add_user("starting", servers={"lab": idle_server()})
    hub.set_inside("starting", "lab", kernels=[kernel("starting", 5000)])
    hub.add_user("quiet", servers={"": idle_server()})
    hub.add_user("active", servers={"": active_server()})
    hub.set_inside("active", "", kernels=[kernel("busy", 10)])

    result = looking(hub, "--keep-busy-kernels=4000")

    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("quiet", ""), ("starting", "lab"), ("stuck", "")]
    # Only would-be stops are looked at, once each, with the server's own clock kept still.
    assert looks(hub) == [
        "/user/computing/api/kernels",
        "/user/quiet/api/kernels",
        "/user/starting/lab/api/kernels",
        "/user/stuck/api/kernels",
    ]
    assert all(r.query == {"no_track_activity": "1"} for r in hub.requests if r.kind == "look")
    assert_owners_keys(hub)
    assert hub.counts["mint"] == hub.counts["revoke"] == 4
    saved = kept(result)[("computing", "")]
    assert (
        "silent 2999s < keep-busy-kernels 4000s" in saved["reason"]
        or "silent 3000s" in (saved["reason"])
    )
    assert saved["inside"]["kernels"] == 2 and saved["inside"]["busy"] == 1
    assert 2990 < saved["inside"]["silent_s"] < 3010
    stuck = acted(result)[("stuck", "")]
    assert "stuck" in stuck["reason"] and stuck["inside"]["busy"] == 1
    assert re.search(
        r"stop user=stuck server=\(default\) .*stuck, silent (4999|500\d)s", result.stderr
    )
    assert acted(result)[("starting", "lab")]["inside"]["busy"] == 0
    assert kept(result)[("active", "")]["inside"] is None


def test_kernels_source_stops_forgotten_tabs_and_keeps_work(hub):
    # The Hub sees activity (a polling tab) on all of them; inside they differ.
    hub.add_user("tab", servers={"": active_server()})
    hub.set_inside("tab", "", kernels=[kernel("idle", 5000)], terminals=[])
    hub.add_user("typing", servers={"": active_server()})
    hub.set_inside("typing", "", kernels=[kernel("idle", 5000)],
                   terminals=[{"name": "1", "last_activity": iso(20)}])  # fmt: skip
    hub.add_user("empty", servers={"": active_server()})
    hub.set_inside("empty", "", last_activity=iso(5000))
    hub.add_user("editing", servers={"": active_server()})
    hub.set_inside("editing", "", last_activity=iso(100))
    hub.add_user("young", servers={"": active_server(started=iso(300))})

    result = looking(hub, "--activity-source=kernels")

    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("empty", ""), ("tab", "")]
    assert (
        "idle inside 4999s" in acted(result)[("tab", "")]["reason"]
        or "idle inside 5000s" in (acted(result)[("tab", "")]["reason"])
    )
    assert "the server's own last_activity" in acted(result)[("empty", "")]["reason"]
    assert kept(result)[("typing", "")]["inside"]["terminals"] == 1
    assert kept(result)[("editing", "")]["inside"]["kernels"] == 0
    # A server younger than the timeout cannot have been idle that long inside: not looked at.
    assert not [p for p in looks(hub) if p.startswith("/user/young/")]
    # Status is asked only of the servers with nothing inside.
    assert [p for p in looks(hub) if p.endswith("/status")] == [
        "/user/editing/api/status",
        "/user/empty/api/status",
    ]


def test_terminals_turned_off_count_as_none(hub):
    hub.add_user("u", servers={"": active_server()})
    hub.set_inside("u", "", kernels=[kernel("idle", 5000)])
    hub.add_fault(("GET", "^/user/u/api/terminals$"), "status", code=404, body=b"<html>404</html>")
    result = looking(hub, "--activity-source=kernels")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("u", "")]


HTML = b"<!DOCTYPE html><html><body>Sign in</body></html>"


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "code": 403},
        {"kind": "status", "code": 404, "body": b"<html>404: Not Found</html>"},
        {"kind": "status", "code": 302, "headers": {"Location": "/hub/login"}, "body": b""},
        {"kind": "status", "code": 200, "body": HTML},  # a login page
        {"kind": "status", "code": 503},
        {"kind": "malformed", "body": b'[{"id": '},
        {"kind": "hang", "seconds": 5},  # longer than --request-timeout
        {"kind": "drop"},
    ],
    ids=["403", "404-html", "redirect", "html", "503", "malformed", "slow", "dropped"],
)
def test_a_failed_look_leaves_the_hubs_verdict_and_says_why(hub, fault):
    for name in ("a", "b"):
        hub.add_user(name, servers={"": idle_server()})
        hub.set_inside(name, "", kernels=[kernel("busy", 60)])
    hub.add_user("tab", servers={"": active_server()})
    hub.set_inside("tab", "", kernels=[kernel("idle", 5000)])
    kind = fault.pop("kind")
    for name in ("a", "tab"):
        hub.add_fault(("GET", f"^/user/{name}/api/"), kind, **fault)

    busy = looking(hub, "--keep-busy-kernels=3600", "--request-timeout=1", "--retries=0")
    assert busy.exit_code == 0, busy.stderr
    # The Hub calls "a" idle: its verdict stands (stop); "b" is seen busy and kept.
    assert hub.stops == [("a", "")]
    assert acted(busy)[("a", "")]["inside"]["error"]
    assert "no look inside" in acted(busy)[("a", "")]["reason"]
    assert re.search(r"could not look inside user=a server=\(default\): .+", busy.stderr)
    assert "silent" in kept(busy)[("b", "")]["reason"]

    hub.clear_requests()
    by_kernels = looking(hub, "--activity-source=kernels", "--request-timeout=1", "--retries=0")
    assert by_kernels.exit_code == 0, by_kernels.stderr
    # The Hub calls "tab" active: kept, for all its idle kernel, since that could not be seen.
    assert hub.stops == [("a", "")]
    assert "active" in kept(by_kernels)[("tab", "")]["reason"]
    assert kept(by_kernels)[("tab", "")]["inside"]["error"]
    if kind == "status" and fault["code"] == 302:
        assert "HTTP 302 Found (to /hub/login)" in acted(busy)[("a", "")]["inside"]["error"]
        assert not [r for r in hub.requests if r.path.startswith("/hub/login")]


def test_a_stopped_named_server_is_not_read_from_the_default_one(hub):
    """The proxy sends a stopped named server's path to the default server: 404 HTML."""
    hub.add_user("u", servers={"": active_server(), "gpu": idle_server()})
    hub.set_inside("u", "", kernels=[kernel("busy", 10)])  # the default server computes
    hub.users["u"]["servers"]["gpu"]["url"] = "/user/u/gone/"  # as if stopped meanwhile
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 0, result.stderr
    assert looks(hub) == ["/user/u/gone/api/kernels"]
    # Not kept for the default server's busy kernel: the look failed, the Hub's verdict stands.
    assert acted(result)[("u", "gpu")]["inside"]["error"].endswith("HTTP 404 Not Found")


@pytest.mark.parametrize("refused", [("GET", "^/user/"), ("POST", "/tokens$")])
def test_403_on_every_look_is_a_configuration_error(hub_factory, refused):
    # The token holds tokens, but no server accepts its owner's token, or the Hub makes none.
    hub = hub_factory(scopes=LOOK_SCOPES)
    for name in ("a", "b", "c"):
        hub.add_user(name, servers={"": idle_server()})
    hub.add_fault(refused, "status", code=403)
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 3, result.stderr
    assert "every look inside a server (3) was refused (403)" in result.stderr
    assert "the token needs the tokens scope" in result.stderr
    assert hub.stops == [] and hub.counts["stop"] == 0


def test_403_for_servers_outside_a_filtered_scope_is_per_server(hub_factory):
    hub = hub_factory(scopes=[*CULLER_SCOPES, "tokens!user=alice"])
    for name in ("alice", "bob"):
        hub.add_user(name, servers={"": idle_server()})
        hub.set_inside(name, "", kernels=[kernel("busy", 60)])
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("bob", "")]  # not seen: the Hub's verdict
    assert acted(result)[("bob", "")]["inside"]["error"] == (
        "making a token of bob to look inside bob/: HTTP 403 Service bob not found or no "
        "permissions to generate tokens"
    )
    assert [(t.owner, t.server) for t in hub.minted] == [("alice", "")]

    # Every look of this pass falls outside the filter: still no configuration error.
    hub.set_inside("alice", "", kernels=[kernel("idle", 60)])
    hub.users["alice"]["servers"][""]["last_activity"] = iso(ACTIVE)
    hub.add_user("carol", servers={"": idle_server()})
    assert looking(hub, "--keep-busy-kernels=3600").exit_code == 0
    assert hub.stops == [("bob", ""), ("carol", "")]


def test_without_the_tokens_scope_exit_3_naming_it(hub_factory):
    # access:servers, which looks once needed, is no longer enough (nor asked for).
    hub = hub_factory(scopes=[*CULLER_SCOPES, "access:servers"])
    hub.add_user("u", servers={"": idle_server()})
    for option in ("--keep-busy-kernels=3600", "--activity-source=kernels"):
        result = looking(hub, option)
        assert result.exit_code == 3, result.stderr
        assert "the token lacks the scope(s) tokens needed to cull" in result.stderr
    assert hub.deletes() == [] and looks(hub) == [] and hub.minted == []
    # --server-api-url alone asks for it too; a dry run that sends no look does not.
    assert looking(hub).exit_code == 3
    dry = looking(hub, "--keep-busy-kernels=3600", "--dry-run")
    assert dry.exit_code == 0 and "lacks tokens: a real run would fail" in dry.stderr
    assert looking(hub, "--keep-busy-kernels=3600", "--dry-run", "--dry-run-looks").exit_code == 3


def test_a_dry_run_sends_no_look_unless_asked_and_says_what_a_look_would_decide(hub):
    hub.add_user("u", servers={"": idle_server()})
    hub.set_inside("u", "", kernels=[kernel("busy", 60)])

    dry = looking(hub, "--keep-busy-kernels=3600", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert looks(hub) == [] and hub.deletes() == []
    assert (
        f"would look inside user=u server=(default) (GET {hub.base_url}/user/u/api/kernels; "
        "not sent in a dry run, --dry-run-looks sends it): kept while a kernel is busy and "
        "silent < 3600s"
    ) in dry.stderr
    assert acted(dry)[("u", "")]["result"] == "planned"  # the Hub's verdict, unseen inside
    assert acted(dry)[("u", "")]["inside"]["error"] == "not sent in a dry run"

    sent = looking(hub, "--keep-busy-kernels=3600", "--dry-run", "--dry-run-looks")
    assert sent.exit_code == 0, sent.stderr
    assert looks(hub) == ["/user/u/api/kernels"] and hub.stops == []
    # The look's token is made and revoked: the only DELETE, and nothing else changed.
    assert hub.deletes() == [("DELETE", "/hub/api/users/u/tokens/a1")]
    assert_owners_keys(hub)
    assert sent.json["actions"] == [] and "silent" in kept(sent)[("u", "")]["reason"]


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example:1/user/u/",  # another host
        "//evil.example:1/user/u/",  # another host, without a scheme
        "/user/u/../../hub/api/",  # climbs out of the server
        "/user/u/%2e%2e/%2E%2E/hub/api/",
        "/user/u/..%2Fevil/",  # a named server "../evil": a proxy may decode and collapse it
        "/user/u/..%2f..%2fhub%2fapi/",
        "/user/u/..%5Cevil/",  # a backslash, which browsers' URL parsers read as a slash
        "/user/u/a%2Fb/",  # a slash in a segment: another path than the server's own
        "user/u/",  # not a path from the root
        None,
    ],
)
def test_looks_never_leave_the_server_api_url(hub, hub_factory, url):
    evil = hub_factory(scopes=LOOK_SCOPES)
    hub.add_user("u", servers={"": idle_server()})
    hub.users["u"]["servers"][""]["url"] = (url or "").replace("evil.example:1", evil.base_url[7:])
    if url is None:
        del hub.users["u"]["servers"][""]["url"]
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 0, result.stderr
    assert evil.requests == []
    # Nothing but the culler's own requests to the Hub: no look, and no other way in.
    assert {r.kind for r in hub.requests} == {"info", "whoami", "list", "stop"}
    assert acted(result)[("u", "")]["inside"]["error"]


def test_looks_run_within_concurrency_and_max_runtime(hub_factory):
    hub = hub_factory(scopes=LOOK_SCOPES, latency=0.02)
    for i in range(60):
        hub.add_user(f"u{i}", servers={"": idle_server()})
    result = looking(hub, "--keep-busy-kernels=3600", "--concurrency=4")
    assert result.exit_code == 0, result.stderr
    assert len(looks(hub)) == 60 and len(hub.stops) == 60
    assert hub.peak_in_flight == 4

    slow = hub_factory(scopes=LOOK_SCOPES)
    for i in range(5):
        slow.add_user(f"u{i}", servers={"": idle_server()})
    slow.add_fault(("GET", "^/user/"), "hang", seconds=3, then="answer")
    cut = looking(slow, "--keep-busy-kernels=3600", "--concurrency=1", "--max-runtime=2")
    assert cut.exit_code == 1, cut.stderr
    assert len(looks(slow)) == 1  # the deadline passed during the first look
    assert slow.deletes() == []
    assert "--max-runtime reached" in cut.stderr


def test_refused_connections_leave_the_hubs_verdict(hub):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    hub.add_user("idle", servers={"": idle_server()})
    hub.add_user("tab", servers={"": active_server()})
    result = run_cull(hub, "--json", f"--server-api-url=http://127.0.0.1:{port}",
                      "--activity-source=kernels", "--retries=1")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]
    # The words of a Hub that refuses connections (tests/test_errors.py), as warnings.
    error = f"looking inside tab default server: connection refused by 127.0.0.1:{port}"
    assert kept(result)[("tab", "")]["inside"]["error"] == f"{error} (after 1 retry)"
    lines = [line.partition("] ")[2] for line in result.stderr.splitlines()]
    assert (
        f"GET /user/tab/api/kernels: connection refused by 127.0.0.1:{port}; retry 1 of 1 in 0.0s"
        in lines
    )
    assert (
        f"could not look inside user=tab server=(default): {error} (after 1 retry); the Hub's "
        "verdict stands"
    ) in lines


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep-busy-kernels=60"], "need --server-api-url"),
        (["--activity-source=kernels"], "need --server-api-url"),
        (["--server-api-url=http://proxy/hub/api", "--keep-busy-kernels=60"], "address alone"),
        (["--server-api-url=ftp://proxy"], "address alone"),
        (["--server-api-url=http://proxy", "--activity-source=tabs"], "activity-source"),
        (["--server-api-url=http://proxy", "--keep-busy-kernels=-1"], "keep-busy-kernels"),
    ],
)
def test_bad_look_options_exit_2(hub, args, message):
    result = run_cull(hub, *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert hub.requests == []


def test_kernel_times_are_judged_by_the_servers_own_clock(hub_factory):
    # The server's clock is 1000 s behind the Hub's: by the Hub's its busy kernel looks stuck.
    hub = hub_factory(scopes=LOOK_SCOPES, server_skew=-1000)
    hub.add_user("u", servers={"": idle_server()})
    hub.set_inside("u", "", kernels=[kernel("busy", last_activity=iso(100, skew=-1000))])
    result = looking(hub, "--keep-busy-kernels=600")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == []
    assert 95 < kept(result)[("u", "")]["inside"]["silent_s"] < 105


def test_the_json_logs_carry_what_the_look_saw(hub):
    hub.add_user("stuck", servers={"": idle_server()})
    hub.set_inside("stuck", "", kernels=[kernel("busy", 5000), kernel("idle", 7000)])
    hub.add_user("computing", servers={"": idle_server()})
    hub.set_inside("computing", "", kernels=[kernel("busy", 50)])
    result = looking(hub, "--keep-busy-kernels=4000", "--log-format=json", "--log-level=debug")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert all("inside" in line for line in lines)
    stop = next(line for line in lines if line["event"] == "stop")
    assert stop["user"] == "stuck" and "stuck" in stop["reason"]
    assert stop["inside"]["kernels"] == 2 and stop["inside"]["busy"] == 1
    assert 4990 < stop["inside"]["silent_s"] < 5010
    assert stop["inside"]["error"] is None
    keep = next(line for line in lines if line["event"] == "keep")
    assert keep["user"] == "computing" and keep["inside"]["busy"] == 1
    assert 45 < keep["inside"]["silent_s"] < 55 and "keep-busy-kernels" in keep["reason"]
