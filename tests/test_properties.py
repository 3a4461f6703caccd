"""Property tests (issue 5): over generated server and user models, policies and clocks, the
decisions never cull what must be kept, and a dry run never sends a DELETE.

The pure functions are tested directly; the last properties run the whole command against the
fake Hub (few examples, each a real pass).
"""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta, timezone
from unittest.mock import patch

import pytest
from conftest import run_cull
from fakehub import CULLER_SCOPES, FakeHub, fmt, server
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import idle_cull
from idle_cull import Policy, plan_user, server_verdict

NOW = st.datetimes(
    min_value=datetime(2001, 1, 1), max_value=datetime(2099, 1, 1), timezones=st.just(UTC)
)
TIMEOUT = st.integers(1, 10**7)
MAX_AGE = st.one_of(st.just(0), st.integers(1, 10**8))


def always_cull(**_kwargs) -> bool:
    return True


@st.composite
def policies(draw, **fixed) -> Policy:
    values = {
        "timeout": draw(TIMEOUT),
        "max_age": draw(MAX_AGE),
        "cull_users": draw(st.booleans()),
        "cull_admin_users": draw(st.booleans()),
        "cull_default_servers": draw(st.booleans()),
        "cull_named_servers": draw(st.booleans()),
        "remove_named_servers": draw(st.booleans()),
        "arbiter": None,
    }
    values.update(fixed)
    return Policy(**values)


# Ways a Hub (or a proxy, or an older Hub) may write the same instant.
STYLES = ["hub", "no_fraction", "offset_zero", "offset_other", "naive"]


def write_time(when: datetime, style: str) -> tuple[str, datetime]:
    """The text for `when` in a style, and the instant that text really denotes."""
    if style == "hub":
        return fmt(when), when
    if style == "no_fraction":
        when = when.replace(microsecond=0)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ"), when
    if style == "offset_zero":
        return when.isoformat(), when
    if style == "offset_other":
        return when.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(), when
    return when.replace(tzinfo=None).isoformat(), when  # naive: the Hub stores UTC


@st.composite
def written_time(draw, now: datetime, min_s: int, max_s: int) -> tuple[str, float]:
    """A timestamp between min_s and max_s seconds before now: (text, exact seconds ago)."""
    micros = draw(st.integers(min_s * 10**6, max_s * 10**6))
    text, when = write_time(now - timedelta(microseconds=micros), draw(st.sampled_from(STYLES)))
    return text, (now - when).total_seconds()


# Values nobody can read as a time. None is not here: it has a meaning ("no activity yet").
UNREADABLE = st.one_of(
    st.sampled_from(
        ["", "yesterday", "25/11/2026 22:45", "2026-13-45T99:99:99Z", "NaN", "null", "now"]
    ),
    st.text(alphabet=string.ascii_letters + " /:", max_size=20),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def running(last_activity, started, **extra) -> dict:
    return {"name": "", "ready": True, "pending": None, "started": started,
            "last_activity": last_activity, "url": "/user/x/", **extra}  # fmt: skip


@given(now=NOW, policy=policies(), data=st.data(), name=st.sampled_from(["", "gpu"]))
def test_active_server_is_never_culled(now, policy, data, name):
    """idle < timeout, and age < max-age when max-age is set: kept, whatever the time format."""
    activity, idle = data.draw(written_time(now, 0, policy.timeout))
    assume(idle < policy.timeout)
    oldest = policy.max_age if policy.max_age else 10**9
    started, age = data.draw(written_time(now, 0, oldest))
    assume(not policy.max_age or age < policy.max_age)
    with_activity = running(activity, started)
    assert not server_verdict(name, with_activity, policy, now).cull
    # no activity recorded yet: idle since it started
    assume(age < policy.timeout)
    assert not server_verdict(name, running(None, started), policy, now).cull


@given(now=NOW, policy=policies(), data=st.data())
def test_idle_server_is_culled(now, policy, data):
    """The converse, so the property above cannot pass by never culling anything."""
    activity, idle = data.draw(written_time(now, policy.timeout, policy.timeout + 10**6))
    started, _age = data.draw(written_time(now, 0, 10**9))
    model = running(activity, started)
    cull = server_verdict("", model, policy, now).cull
    assert cull == policy.cull_default_servers


@given(
    now=NOW,
    policy=policies(arbiter=None) | policies(arbiter=always_cull),
    pending=st.sampled_from([None, "spawn", "stop", "check"]),
    ready=st.booleans(),
    data=st.data(),
)
def test_pending_or_not_ready_server_is_never_culled(now, policy, pending, ready, data):
    assume(pending or not ready)
    activity, _ = data.draw(written_time(now, 0, 10**9))
    started, _ = data.draw(written_time(now, 0, 10**9))
    model = running(activity, started, ready=ready, pending=pending)
    assert not server_verdict("", model, policy, now).cull


@given(
    now=NOW,
    policy=policies(arbiter=None) | policies(arbiter=always_cull),
    activity=UNREADABLE,
    started=UNREADABLE | st.none(),
)
def test_unreadable_times_never_cause_a_cull(now, policy, activity, started):
    model = running(activity, started)
    assert not server_verdict("", model, policy, now).cull
    model = running(None, activity)  # no activity, unreadable start
    assert not server_verdict("", model, policy, now).cull


@given(now=NOW, policy=policies(arbiter=always_cull), activity=UNREADABLE, data=st.data())
def test_unreadable_activity_culls_only_by_a_readable_age(now, policy, activity, data):
    started, age = data.draw(written_time(now, 0, 10**9))
    verdict = server_verdict("", running(activity, started), policy, now)
    if verdict.cull:
        assert policy.max_age and age >= policy.max_age


@st.composite
def server_models(draw, now: datetime) -> dict:
    """Any server a Hub lists: running idle or active, pending, stopping, odd times."""
    activity = draw(st.one_of(st.none(), UNREADABLE, written_time(now, -60, 10**7)))
    started = draw(st.one_of(st.none(), UNREADABLE, written_time(now, -60, 10**7)))
    state = draw(st.sampled_from(["ready", "spawn", "stop", "not ready"]))
    return running(
        activity[0] if isinstance(activity, tuple) else activity,
        started[0] if isinstance(started, tuple) else started,
        ready=state == "ready",
        pending=None if state in ("ready", "not ready") else state,
    )


@st.composite
def user_models(draw, now: datetime) -> dict:
    names = draw(st.lists(st.sampled_from(["", "a", "b/c", "é d"]), unique=True, max_size=3))
    activity = draw(st.one_of(st.none(), UNREADABLE, written_time(now, -60, 10**7)))
    return {
        "kind": "user",
        "name": draw(st.text(min_size=1, max_size=10)),
        "admin": draw(st.booleans()),
        "last_activity": activity[0] if isinstance(activity, tuple) else activity,
        "servers": {name: {**draw(server_models(now)), "name": name} for name in names},
    }


@given(now=NOW, policy=policies(cull_users=True), data=st.data())
def test_user_with_a_server_left_running_or_stopping_is_never_deleted(now, policy, data):
    user = data.draw(user_models(now))
    plan = plan_user(user, policy, now)
    busy = [s for s in user["servers"].values() if s["pending"] or not s["ready"]]
    stopped = {stop.server for stop in plan.stops}
    left_running = [n for n in user["servers"] if n not in stopped]
    if busy or left_running:
        assert plan.delete is None
    if plan.delete is not None:  # then every one of its servers is being stopped first
        assert stopped == set(user["servers"])
        if "" in stopped:  # named servers first: the Hub refuses to delete a user while they run
            assert plan.stops[-1].server == ""


@given(now=NOW, policy=policies(cull_users=True, cull_admin_users=False), data=st.data())
def test_admin_is_never_deleted_without_cull_admin_users(now, policy, data):
    user = {**data.draw(user_models(now)), "admin": True}
    assert plan_user(user, policy, now).delete is None


@pytest.mark.parametrize("admin", ["missing", None, 0, ""])
def test_unreadable_admin_flag_is_never_deleted_without_cull_admin_users(admin):
    now = datetime(2026, 11, 25, tzinfo=UTC)
    user = {"name": "u", "last_activity": fmt(now - timedelta(days=9)), "servers": {}}
    if admin != "missing":
        user["admin"] = admin
    policy = Policy(cull_users=True, cull_admin_users=False)
    assert plan_user(user, policy, now).delete is None


@pytest.mark.parametrize("ready", ["false", "no", "0"])
def test_unreadable_ready_flag_never_causes_a_cull(ready):
    now = datetime(2026, 11, 25, tzinfo=UTC)
    old = fmt(now - timedelta(days=9))
    assert not server_verdict("", running(old, old, ready=ready), Policy(), now).cull


@given(model=JSON, now=NOW, policy=policies())
def test_any_json_user_model_is_planned_or_refused_cleanly(model, now, policy):
    """Whatever the Hub sends: a plan, or ValueError (logged, user left alone); no traceback."""
    try:
        plan_user(model, policy, now)
    except ValueError:
        pass


@given(now=NOW, policy=policies(), servers=st.dictionaries(st.text(max_size=5), JSON, max_size=3))
def test_any_json_servers_are_planned_or_refused_cleanly(now, policy, servers):
    try:
        plan = plan_user({"name": "u", "servers": servers}, policy, now)
    except ValueError:
        return
    for stop in plan.stops:  # a culled server had a readable time that justified it
        verdict = stop.verdict
        assert verdict.idle is not None or verdict.age is not None


@given(value=JSON | st.text())
def test_parse_time_never_raises(value):
    parsed = idle_cull.parse_time(value)
    assert parsed is None or parsed.tzinfo is not None


# ---- through the fake Hub: whole passes -------------------------------------------------------

HUB_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def populations(draw) -> list[tuple[str, bool, dict]]:
    """(name, admin, servers) for a few users; times relative to when the pass runs."""
    users = []
    for i in range(draw(st.integers(0, 8))):
        servers = {}
        for name in draw(st.lists(st.sampled_from(["", "n1", "n/2"]), unique=True, max_size=3)):
            servers[name] = {
                "idle": draw(st.sampled_from([None, 30, 3000, 10**6])),
                "age": draw(st.sampled_from([60, 5000, 10**6])),
                "state": draw(st.sampled_from(["ready", "ready", "spawn", "slow"])),
            }
        users.append((f"user {i}", draw(st.booleans()), servers))
    return users


def build(hub: FakeHub, population) -> None:
    for name, admin, servers in population:
        models = {}
        for server_name, spec in servers.items():
            models[server_name] = server(
                ready=spec["state"] != "spawn",
                pending="spawn" if spec["state"] == "spawn" else None,
                last_activity=None if spec["idle"] is None else hub.iso(spec["idle"]),
                started=hub.iso(spec["age"]),
                stop_after=60 if spec["state"] == "slow" else None,
            )
        hub.add_user(name, admin=admin, last_activity=hub.iso(3000), servers=models)


FLAGS = st.lists(
    st.sampled_from(
        ["--cull-users", "--remove-named-servers", "--no-cull-admin-users",
         "--no-cull-default-servers", "--no-cull-named-servers", "--max-age=4000"]
    ),
    unique=True,
)  # fmt: skip


@HUB_SETTINGS
@given(population=populations(), flags=FLAGS)
def test_dry_run_never_sends_a_delete(population, flags):
    with FakeHub(scopes=CULLER_SCOPES) as hub:
        build(hub, population)
        result = run_cull(hub, "--json", "--dry-run", "--timeout", 600, *flags)
        assert result.exit_code == 0, result.stderr
        assert hub.deletes() == []
        assert {a["result"] for a in result.json["actions"]} <= {"planned"}


@HUB_SETTINGS
@given(population=populations(), flags=FLAGS, cull_users=st.sampled_from([True, True, False]))
def test_whole_pass_culls_only_idle_and_deletes_only_emptied_users(population, flags, cull_users):
    if cull_users and "--cull-users" not in flags:
        flags = [*flags, "--cull-users"]  # deleting users is the riskier half: test it more
    with FakeHub(scopes=CULLER_SCOPES) as hub:
        build(hub, population)
        result = run_cull(hub, "--json", "--timeout", 600, *flags)
        assert result.exit_code == 0, result.stderr
        specs = {(name, s): spec for name, _, servers in population for s, spec in servers.items()}
        max_age = 4000 if "--max-age=4000" in flags else 0
        for user, server_name in hub.stops:
            spec = specs[(user, server_name)]
            idle = spec["age"] if spec["idle"] is None else spec["idle"]
            assert spec["state"] != "spawn"
            assert server_name or "--no-cull-default-servers" not in flags
            assert not server_name or "--no-cull-named-servers" not in flags
            assert idle >= 600 or (max_age and spec["age"] >= max_age)
        event(f"stopped some: {bool(hub.stops)}, deleted some: {bool(hub.deleted_users)}")
        admins = {name for name, admin, _ in population if admin}
        stopped_for_good = set(hub.stops) - {k for k, v in specs.items() if v["state"] == "slow"}
        for user in hub.deleted_users:
            assert all((user, s) in stopped_for_good for s in hub_servers(population, user))
            if "--no-cull-admin-users" in flags:
                assert user not in admins


def hub_servers(population, user: str) -> list[str]:
    return next(list(servers) for name, _, servers in population if name == user)


# Names a Hub accepts that URL handling likes to mangle: dots, reserved and escaped characters.
ODD_NAME = st.sampled_from([".", "..", "..."]) | st.text(
    alphabet="./%?#;+~ é", min_size=1, max_size=4
)


@HUB_SETTINGS
@given(user=ODD_NAME, named=ODD_NAME, cull_users=st.booleans())
@example(user=".", named="..", cull_users=True)
def test_every_name_reaches_its_own_objects(user, named, cull_users):
    """Stops, deletes and the look while waiting reach the user and server named, no other;
    nothing is sent for a name of dots (a proxy may collapse it into another path)."""
    assume(user not in ("decoy", "server"))
    dots = {".", ".."}
    with FakeHub(scopes=CULLER_SCOPES) as hub:
        old, recent = hub.iso(3600), hub.iso(30)
        for bystander in ("decoy", "server"):  # "server": what "./server" collapses to
            hub.add_user(
                bystander, last_activity=recent, servers={"": server(last_activity=recent)}
            )
        hub.add_user(
            user,
            last_activity=old,
            servers={
                "": server(last_activity=old, stop_after=0),
                named: server(last_activity=old),
            },
        )
        args = ["--json", "--wait-for-stop=10", "--remove-named-servers"]
        with patch.object(idle_cull, "STOP_POLL_INTERVAL", 0.05):
            result = run_cull(hub, *args, *(["--cull-users"] if cull_users else []))
        assert result.exit_code == 0, result.stderr
        stopped = [] if user in dots else [(user, s) for s in ("", named) if s not in dots]
        assert sorted(hub.stops) == sorted(stopped)
        assert hub.removed == ([(user, named)] if (user, named) in stopped else [])
        emptied = cull_users and len(stopped) == 2
        assert hub.deleted_users == ([user] if emptied else [])
        reached = {r.user for r in hub.requests if r.kind in ("stop", "get_user", "delete_user")}
        assert reached == ({user} if stopped else set())


# A token with characters JSON escapes, so that it also travels in an escaped form.
ECHOED_TOKEN = 'Qz7"Kw9\\Rv3pL8mN2xJ5tB4hG6yC1dF0s'


def token_pieces(secret: str) -> set[str]:
    escaped = json.dumps(secret)[1:-1]
    return {text[i : i + 8] for text in (secret, escaped) for i in range(len(text) - 7)}


@HUB_SETTINGS
@given(
    offset=st.integers(0, 450),
    escaped=st.booleans(),
    where=st.sampled_from(["stop", "delete_user", "list", "get_user"]),
    code=st.sampled_from([400, 403, 404, 500]),
    log_format=st.sampled_from(["text", "json"]),
)
@example(offset=180, escaped=False, where="stop", code=400, log_format="json")
def test_no_piece_of_an_echoed_token_in_any_output(offset, escaped, where, code, log_format):
    """Wherever the Hub echoes the token in an error, at whatever offset, none of it is shown."""
    echoed = json.dumps(ECHOED_TOKEN)[1:-1] if escaped else ECHOED_TOKEN
    body = json.dumps({"status": code, "message": "." * offset + echoed + " !"}).encode()
    with FakeHub(token=ECHOED_TOKEN, scopes=CULLER_SCOPES) as hub:
        old = hub.iso(3600)
        hub.add_user("u", last_activity=old, servers={"": server(last_activity=old, stop_after=0)})
        hub.add_fault(lambda req: req.kind == where, "status", code=code, body=body)
        args = ["--json", "--cull-users", "--wait-for-stop=1", "--retries=0"]
        with patch.object(idle_cull, "STOP_POLL_INTERVAL", 0.05):
            result = run_cull(hub, *args, f"--log-format={log_format}", "--log-level=debug")
        assert result.exit_code in (0, 1, 3), result.stderr
        output = result.stdout + result.stderr
        assert [piece for piece in token_pieces(ECHOED_TOKEN) if piece in output] == []


GARBAGE_DATES = st.sampled_from(
    ["", "yesterday", "0", "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT",
     "Thu, 26 Nov 2026 25:61:61 GMT", "Thu, 26 Nov 2026 10:00:00"]
) | st.text(alphabet=string.ascii_letters + string.digits + " ,:", max_size=30)  # fmt: skip


@HUB_SETTINGS
@given(
    skew=st.one_of(st.integers(-(10**9), 10**9), st.sampled_from([-3600, -61, 0, 61, 3600])),
    garbage=st.none() | GARBAGE_DATES,
    idles=st.lists(st.sampled_from([5, 300, 590, 610, 900, 3600, 10**6]), min_size=1, max_size=5),
)
@example(skew=86400, garbage=None, idles=[5, 3600])  # a proxy a day ahead rewrites Date
@example(skew=0, garbage="Fri, 31 Dec 9999 23:59:59 GMT", idles=[5, 3600])
def test_any_date_header_never_culls_early(skew, garbage, idles):
    """Times on our clock; the Hub's Date skewed anywhere or garbage: a server is stopped only
    when it is idle on both clocks (on ours alone when the Date cannot be read)."""
    with FakeHub(scopes=CULLER_SCOPES, date_skew=skew, date_header=garbage) as hub:
        for number, idle in enumerate(idles):
            hub.add_user(f"u{number}", servers={"": server(last_activity=fmt_ago(idle))})
        result = run_cull(hub, "--json", "--timeout=600")
        assert result.exit_code == 0, result.stderr
        for user, _ in hub.stops:
            idle = idles[int(user[1:])]
            assert idle >= 600
            if garbage is None:
                assert idle + skew >= 600 - 2  # the Date header is truncated to the second
        if garbage is None and skew >= 0:  # our clock is the earlier: it alone decides
            assert len(hub.stops) == sum(idle >= 610 for idle in idles)


def fmt_ago(seconds: float) -> str:
    return fmt(datetime.now(UTC) - timedelta(seconds=seconds))


@given(now=NOW, policy=policies(cull_users=True), data=st.data())
def test_a_missing_key_never_causes_a_stop_or_delete_it_would_have_justified(now, policy, data):
    """Any keys left out of the user and server models (a token shown less, an odd Hub): a
    missing `servers` keeps the user; a missing `ready` keeps the server; a missing
    `last_activity` leaves only max-age to act (never idleness)."""
    user = data.draw(user_models(now))
    user["created"] = data.draw(written_time(now, 0, 10**8))[0]
    user = {k: v for k, v in user.items() if k == "name" or data.draw(st.booleans())}
    for name, model in list(user.get("servers", {}).items()):
        user["servers"][name] = {k: v for k, v in model.items() if data.draw(st.booleans())}
    plan = plan_user(user, policy, now)
    if "servers" not in user:
        assert not plan.actionable
        return
    for stop in plan.stops:
        model = user["servers"][stop.server]
        assert model.get("ready") is True
        if "last_activity" not in model:
            assert stop.verdict.reason.startswith("age")
    if plan.delete is not None and "last_activity" not in user:
        assert plan.delete.reason.startswith("age")
