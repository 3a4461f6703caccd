"""The fault matrix (issue 5): a broken or slow Hub never causes a wrong cull or a lost pass.

Every case runs one pass against the fake Hub with one fault injected and checks:
- the documented exit code (0 all done, 1 something failed for good, 3 Hub unusable),
- the servers the Hub stopped are exactly those of a fault-free pass minus the ones whose
  requests failed for good (so the pass went on for everybody else),
- what failed is reported with the user's name, and nothing leaks the token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from conftest import TOKEN, run_cull, run_cull_subprocess
from fakehub import FakeHub, server

TIMEOUT = 600
# Page size 3 spreads the 11 users over pages at offsets 0, 3, 6 and 9.
ARGS = (
    "--json",
    "--timeout",
    TIMEOUT,
    "--api-page-size",
    3,
    "--request-timeout",
    1,
    "--retries",
    1,
)
IDLE_USERS = [f"idle{i}" for i in range(6)]
# What a fault-free pass stops: every idle default server, and mixed's idle named server.
EXPECTED = {(name, "") for name in IDLE_USERS} | {("mixed", "gpu")}


def populate(hub: FakeHub) -> None:
    """Six idle users, four active ones, one with an active default and an idle named server.

    Times are on the hub's clock, so the same population serves the skewed-clock tests.
    """
    idle, active, started = hub.iso(3600), hub.iso(60), hub.iso(7200)
    for name in IDLE_USERS:
        hub.add_user(name, servers={"": server(last_activity=idle, started=started)})
    for i in range(4):
        hub.add_user(f"active{i}", servers={"": server(last_activity=active, started=started)})
    hub.add_user(
        "mixed",
        servers={
            "": server(last_activity=active, started=started),
            "gpu": server(last_activity=idle, started=started),
        },
    )


def stop_of(user: str, name: str = "") -> tuple[str, str]:
    """Match the DELETE that stops this server."""
    tail = f"/servers/{re.escape(name)}" if name else "/server"
    return ("DELETE", f"^/hub/api/users/{re.escape(user)}{tail}$")


def page(offset: int):
    """Match the listing request for the page at this offset."""
    return lambda req: req.kind == "list" and int(req.query.get("offset", 0)) == offset


PAGE_3 = {(name, "") for name in IDLE_USERS[3:6]}  # idle3..idle5 are listed at offset 3


@dataclass
class Case:
    id: str
    match: object
    kind: str
    exit_code: int
    lost: set = field(default_factory=set)  # servers whose requests failed for good
    times: int | None = None
    params: dict = field(default_factory=dict)
    args: tuple = ()
    reported: str | None = None  # must appear in the report's errors (e.g. the user's name)


RETRY_AFTER = {"code": 429, "headers": {"Retry-After": "1"}}
NO_NAME = {"user": "idle4", "model": {"servers": {"": server(last_activity=None)}}}
SERVERS_LIST = {"user": "idle4", "model": {"kind": "user", "name": "idle4", "servers": ["x"]}}
HTML = {"body": b"<html><body>502 Bad Gateway</body></html>"}
LOST_1 = {("idle1", "")}
LOST_5 = {("idle5", "")}
LOST_4 = {("idle4", "")}

# fmt: off
CASES = [
    # id, match, kind, exit code, lost, times, params, extra args, text in the report's errors
    Case("5xx then success: stop", stop_of("idle1"), "status", 0, times=2, args=("--retries", 2)),
    Case("5xx then success: page", page(3), "status", 0, times=1, params={"code": 502}),
    Case("5xx forever: stop", stop_of("idle1"), "status", 1, LOST_1, reported="idle1"),
    Case("5xx forever: named stop", stop_of("mixed", "gpu"), "status", 1, {("mixed", "gpu")},
         reported="mixed/gpu"),
    Case("5xx forever: page", page(3), "status", 1, PAGE_3, params={"code": 504},
         reported="offset=3"),
    Case("5xx forever: first page", page(0), "status", 3, EXPECTED, reported="listing users"),
    Case("5xx forever: token check", ("GET", "^/hub/api/user$"), "status", 3, EXPECTED),
    Case("5xx forever: version", ("GET", "^/hub/api$"), "status", 3, EXPECTED),
    Case("429 + Retry-After then success", stop_of("idle2"), "status", 0, times=1,
         params=RETRY_AFTER),
    Case("429 + Retry-After forever", stop_of("idle2"), "status", 1, {("idle2", "")},
         params=RETRY_AFTER, reported="idle2"),
    Case("hang once: stop", stop_of("idle1"), "hang", 0, times=1),
    Case("hang forever: stop", stop_of("idle1"), "hang", 1, LOST_1, reported="idle1"),
    Case("hang forever: page", page(3), "hang", 1, PAGE_3, reported="offset=3"),
    Case("hang forever: first page", page(0), "hang", 3, EXPECTED),
    Case("drop once: stop", stop_of("idle5"), "drop", 0, times=1),
    Case("drop once: page", page(6), "drop", 0, times=1),
    Case("drop forever: stop", stop_of("idle5"), "drop", 1, LOST_5, reported="idle5"),
    Case("drop forever: page", page(3), "drop", 1, PAGE_3, reported="offset=3"),
    Case("answer lost after a stop", stop_of("idle5"), "drop", 0, times=1, params={"after": True}),
    Case("answer lost after a named stop", stop_of("mixed", "gpu"), "drop", 0, times=1,
         params={"after": True}),
    Case("malformed JSON: page", page(3), "malformed", 1, PAGE_3, reported="not JSON"),
    Case("malformed JSON: HTML page", page(3), "malformed", 1, PAGE_3, params=HTML,
         reported="not JSON"),
    Case("malformed JSON: first page", page(0), "malformed", 3, EXPECTED, reported="not JSON"),
    # An unreadable time is not an error, only never a reason to cull.
    Case("bad model: garbage times", page(3), "bad_model", 0, LOST_4, params={"user": "idle4"}),
    Case("bad model: servers not a mapping", page(3), "bad_model", 1, LOST_4,
         params=SERVERS_LIST, reported="idle4"),
    Case("bad model: no name", page(3), "bad_model", 1, LOST_4, params=NO_NAME,
         reported="unreadable model"),
    Case("bad model: a list, not a user", page(3), "bad_model", 1, LOST_4,
         params={"user": "idle4", "model": ["idle4"]}, reported="unreadable model"),
    # A repeating next link ends the listing with an error; every page was read, nothing lost.
    Case("loop next: to page 0", page(9), "loop_next", 1, times=100, params={"offset": 0},
         reported="repeats offset"),
    Case("loop next: to itself", page(9), "loop_next", 1, times=100, params={"offset": 9},
         reported="repeats offset"),
    Case("loop next: past the end", lambda r: r.kind == "list" and int(r.query["offset"]) >= 9,
         "loop_next", 1, times=100, params={"offset": 12}, reported="repeats offset"),
    Case("endless next", lambda r: r.kind == "list", "loop_next", 1, times=1000,
         params={"endless": True}, reported="did not end"),
    Case("loop next: single page", page(0), "loop_next", 1, times=100, args=("--api-page-size", 0),
         reported="repeats offset"),
]
# fmt: on


def _report_errors(result) -> str:
    """Everything the pass reported as failed, for checking that the user is named."""
    report = result.json
    failed = [a["error"] or "" for a in report["actions"] if a["result"] == "failed"]
    return " ".join(report["errors"] + failed)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_matrix(fake_hub, case):
    populate(fake_hub)
    fault = fake_hub.add_fault(case.match, case.kind, times=case.times, **case.params)
    result = run_cull(fake_hub, *ARGS, *case.args)

    assert fault.hits >= 1, "the fault was never injected: the case tests nothing"
    if case.times and case.exit_code == 0:
        assert fault.hits == case.times  # retried through every injected failure
    assert result.exit_code == case.exit_code, result.stderr
    assert result.json["exit_code"] == case.exit_code
    assert set(fake_hub.stops) == EXPECTED - case.lost
    if case.exit_code == 3:
        assert fake_hub.deletes() == []
    if case.exit_code == 0:
        assert result.json["summary"]["failures"] == 0
    else:
        assert result.json["errors"] or result.json["summary"]["failures"]
    if case.reported:
        assert case.reported in _report_errors(result)
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert fake_hub.errors == []


def test_fault_free_pass_culls_expected(fake_hub):
    """The baseline the matrix subtracts from."""
    populate(fake_hub)
    result = run_cull(fake_hub, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert set(fake_hub.stops) == EXPECTED
    assert len(fake_hub.stops) == len(EXPECTED)  # nothing stopped twice


@pytest.mark.parametrize("last_page", [0, 9])
def test_foreign_next_link_is_not_followed(fake_hub, hub_factory, last_page):
    """A next link to another host stops the listing; that host is never contacted."""
    foreign = hub_factory()
    populate(fake_hub)
    # "localhost" and another port: a different origin that records anything it receives.
    base = foreign.url.replace("127.0.0.1", "localhost") + "/users"
    fault = fake_hub.add_fault(page(last_page), "foreign_next", base=base)
    page_size = 3 if last_page else 0  # 0: the Hub's default, one page for everybody
    result = run_cull(fake_hub, *ARGS, "--api-page-size", page_size)
    assert fault.hits == 1
    assert result.exit_code == 1, result.stderr
    assert "another host" in " ".join(result.json["errors"])
    assert set(fake_hub.stops) == EXPECTED  # every page was read before the bad link
    assert foreign.requests == []


def test_unreachable_hub_exits_3(fake_hub):
    url = fake_hub.url
    fake_hub.stop()
    result = run_cull(fake_hub, "--url", url, *ARGS)
    assert result.exit_code == 3
    assert result.json["errors"]


@pytest.mark.parametrize("skew", [3600, -3600])
def test_the_earlier_clock_decides(hub_factory, skew):
    """Times on the Hub's clock. An hour behind ours: the Hub's clock decides. An hour ahead:
    ours, the earlier, and nothing looks idle yet (late, never early). A warning either way."""
    hub = hub_factory(date_skew=skew)
    started = hub.iso(7200)
    hub.add_user("idle", servers={"": server(last_activity=hub.iso(900), started=started)})
    hub.add_user("active", servers={"": server(last_activity=hub.iso(300), started=started)})
    result = run_cull(hub, "--json", "--timeout", TIMEOUT)
    assert result.exit_code == 0, result.stderr
    assert set(hub.stops) == ({("idle", "")} if skew < 0 else set())
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert any("clock" in line for line in warnings), result.stderr


def test_clock_local_changes_nothing_and_says_so(hub_factory):
    """--clock local once trusted our clock alone, culling early when ours is fast."""
    hub = hub_factory(date_skew=-3600)
    started = hub.iso(7200)
    hub.add_user("idle", servers={"": server(last_activity=hub.iso(900), started=started)})
    hub.add_user("active", servers={"": server(last_activity=hub.iso(300), started=started)})
    result = run_cull(hub, "--json", "--timeout", TIMEOUT, "--clock", "local")
    assert result.exit_code == 0, result.stderr
    assert set(hub.stops) == {("idle", "")}
    assert "--clock local no longer changes anything" in result.stderr


def test_no_date_header_falls_back_to_local(hub_factory):
    hub = hub_factory(send_date=False)
    populate(hub)
    result = run_cull(hub, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert set(hub.stops) == EXPECTED


def test_slow_stop_is_not_a_failure_and_blocks_user_delete(fake_hub):
    """202 = still stopping: counted apart, not a failure, and that user is not deleted."""
    old = fake_hub.iso(3600)
    fake_hub.add_user(
        "slow", last_activity=old, servers={"": server(last_activity=old, stop_after=60)}
    )
    fake_hub.add_user("quick", last_activity=old, servers={"": server(last_activity=old)})
    result = run_cull(fake_hub, "--json", "--timeout", TIMEOUT, "--cull-users")
    assert result.exit_code == 0, result.stderr
    assert result.json["summary"]["servers_stopping"] == 1
    assert fake_hub.deleted_users == ["quick"]


def _faulty_hub(hub: FakeHub, foreign: FakeHub) -> None:
    populate(hub)
    hub.add_fault(stop_of("idle1"), "status", code=500)
    hub.add_fault(stop_of("idle2"), "hang", seconds=3)
    hub.add_fault(stop_of("idle3"), "drop")
    hub.add_fault(page(6), "malformed")
    hub.add_fault(page(9), "foreign_next", base=foreign.url.replace("127.0.0.1", "localhost"))


def test_token_never_in_output(fake_hub, hub_factory):
    """DEBUG logs, --json, failures of every kind: the token appears nowhere, and is sent
    nowhere but the Hub (a real process, so everything it prints is seen)."""
    foreign = hub_factory()
    _faulty_hub(fake_hub, foreign)
    args = (*ARGS, "--log-level", "DEBUG")
    for log_format in ("text", "json"):
        proc = run_cull_subprocess(fake_hub, *args, "--log-format", log_format)
        assert proc.returncode == 1, proc.stderr
        assert "idle1" in proc.stdout  # the failures were reported
        assert TOKEN not in proc.stdout
        assert TOKEN not in proc.stderr
    assert foreign.requests == []
    assert {r.headers.get("Authorization") for r in fake_hub.requests if r.kind != "info"} == {
        f"token {TOKEN}"
    }


def test_token_echoed_by_hub_is_redacted(fake_hub):
    """A proxy that echoes the request (Authorization included) in its error body."""
    populate(fake_hub)
    echo = f'{{"status": 502, "message": "bad gateway; request had Authorization: token {TOKEN}"}}'
    fake_hub.add_fault(stop_of("idle1"), "status", code=502, body=echo.encode())
    result = run_cull(fake_hub, *ARGS, "--log-level", "DEBUG")
    assert result.exit_code == 1
    assert TOKEN not in result.stderr
    assert TOKEN not in result.stdout


@pytest.mark.parametrize(
    "answer",
    [
        {"kind": "status", "code": 302, "headers": {"Location": "/hub/login"}, "body": b""},
        {"kind": "malformed", "body": b"<html>Sign in</html>"},
    ],
    ids=["302 redirect", "200 html page"],
)
def test_answer_that_is_not_a_stop_is_a_failure(fake_hub, answer):
    populate(fake_hub)
    fake_hub.add_fault(stop_of("idle1"), **answer)
    result = run_cull(fake_hub, *ARGS)
    assert set(fake_hub.stops) == EXPECTED - {("idle1", "")}
    idle1 = [a for a in result.json["actions"] if a["user"] == "idle1"]
    assert [a["result"] for a in idle1] == ["failed"]
    assert result.exit_code == 1


def test_wait_for_stop_does_not_trust_an_unreadable_model(fake_hub):
    old = fake_hub.iso(3600)
    fake_hub.add_user(
        "slow", last_activity=old, servers={"": server(last_activity=old, stop_after=60)}
    )
    no_servers = {"kind": "user", "name": "slow"}
    fake_hub.add_fault(("GET", "^/hub/api/users/slow$"), "bad_model", user="slow", model=no_servers)
    result = run_cull(fake_hub, "--json", "--cull-users", "--wait-for-stop", 2)
    assert [a["result"] for a in result.json["actions"]] == ["stopping", "skipped"]
    assert fake_hub.counts["delete_user"] == 0
    assert result.exit_code == 0


@pytest.mark.parametrize("kind", ["status", "drop", "lost answer"])
def test_user_delete_faults(fake_hub, kind):
    """Deleting users: a failure for good keeps that user and the pass goes on; a lost answer
    (the Hub deleted the user, the reply never came) is retried and ends as gone, not failed."""
    old = fake_hub.iso(3600)
    for name in ("u1", "u2", "u3"):
        fake_hub.add_user(name, last_activity=old, servers={"": server(last_activity=old)})
    if kind == "lost answer":  # once: the retry must then hear 404
        fault = fake_hub.add_fault(("DELETE", "^/hub/api/users/u2$"), "drop", times=1, after=True)
    else:
        fault = fake_hub.add_fault(("DELETE", "^/hub/api/users/u2$"), kind)
    result = run_cull(fake_hub, *ARGS, "--cull-users")
    assert fault.hits >= 1
    assert set(fake_hub.stops) == {("u1", ""), ("u2", ""), ("u3", "")}
    u2 = [a for a in result.json["actions"] if a["user"] == "u2" and a["action"] == "delete_user"]
    if kind == "lost answer":
        assert sorted(fake_hub.deleted_users) == ["u1", "u2", "u3"]
        assert [a["result"] for a in u2] == ["gone"]
        assert result.exit_code == 0, result.stderr
    else:
        assert sorted(fake_hub.deleted_users) == ["u1", "u3"]
        assert [a["result"] for a in u2] == ["failed"]
        assert "u2" in u2[0]["error"]
        assert result.exit_code == 1
