"""Soak (issue 5): many passes in a row against the fake Hub with random faults (seeded).

Each pass gets a fresh random population, policy, Hub clock skew and 0-3 random faults, and
the whole command runs in-process. The ground truth (which servers may be stopped, which users
deleted) is computed here from the generated population, independently of idle_cull's code.
Counted: passes, faults injected, exit codes, stops, deletes, and wrong culls, which must be 0.
Figures go to stdout (pytest -s) and to /work/notes/soak-figures.txt.

SOAK_PASSES and SOAK_SEED override the defaults.
"""

from __future__ import annotations

import os
import random
import re
import time
import traceback
from collections import Counter
from dataclasses import dataclass

from conftest import run_cull
from fakehub import CULLER_SCOPES, FakeHub, server

PASSES = int(os.environ.get("SOAK_PASSES", 200))
SEED = int(os.environ.get("SOAK_SEED", 20261125))
MARGIN = 15  # seconds kept between any generated time and a cull threshold
TIMEOUTS = [300, 600, 1200]
MAX_AGES = [0, 0, 7200]
GARBAGE = ["yesterday", "25/11/2026", 12345, "", {"t": 1}]


@dataclass
class Spec:
    """One generated server: ground truth for the checks."""

    state: str  # ready, spawn, slow (ready, but answers 202 when stopped)
    idle: float | None  # seconds since activity, None when unreadable or absent
    activity: object  # what the model says
    age: float | None
    started: object


def when(hub: FakeHub, rng: random.Random, threshold: int, allow_odd: bool = True):
    """(model value, seconds ago or None): clearly below or above `threshold`, or odd."""
    roll = rng.random()
    if allow_odd and roll < 0.08:
        return None, None
    if allow_odd and roll < 0.15:
        return rng.choice(GARBAGE), None
    if rng.random() < 0.5:
        seconds = rng.uniform(0, threshold - MARGIN)
    else:
        seconds = rng.uniform(threshold + MARGIN, 4 * threshold)
    return hub.iso(seconds), seconds


def populate(hub: FakeHub, rng: random.Random, timeout: int, max_age: int):
    age_threshold = max_age or 7200
    specs: dict[tuple[str, str], Spec] = {}
    users: dict[str, dict] = {}
    for i in range(rng.randint(3, 25)):
        name = rng.choice([f"u{i}", f"ü {i}", f"a/b?{i}", f"x%40{i}+"])
        models = {}
        for server_name in rng.sample(["", "gpu", "n/1"], rng.randint(0, 3)):
            activity, idle = when(hub, rng, timeout)
            started, age = when(hub, rng, age_threshold)
            state = rng.choice(["ready"] * 6 + ["spawn", "slow"])
            specs[(name, server_name)] = Spec(state, idle, activity, age, started)
            models[server_name] = server(
                ready=state != "spawn",
                pending="spawn" if state == "spawn" else None,
                last_activity=activity,
                started=started,
                stop_after=30 if state == "slow" else None,
            )
        activity, idle = when(hub, rng, timeout)
        created, age = when(hub, rng, age_threshold)
        admin = rng.random() < 0.2
        hub.add_user(name, admin=admin, last_activity=activity, created=created, servers=models)
        users[name] = {"admin": admin, "idle": idle, "activity": activity, "age": age}
    return specs, users


def may_stop(spec: Spec, server_name: str, policy: dict) -> bool:
    if spec.state == "spawn":
        return False
    if not policy["cull_default" if server_name == "" else "cull_named"]:
        return False
    idle = spec.idle if spec.activity is not None else spec.age  # no activity: idle since start
    if idle is not None and idle >= policy["timeout"]:
        return True
    return bool(policy["max_age"] and spec.age is not None and spec.age >= policy["max_age"])


def may_delete(name: str, user: dict, specs: dict, stopped_for_good: set, policy: dict) -> bool:
    if not policy["cull_users"] or (user["admin"] and not policy["cull_admin"]):
        return False
    # every server of the user was stopped (204) in this pass
    if any(key not in stopped_for_good for key in specs if key[0] == name):
        return False
    idle = user["idle"] if user["activity"] is not None else user["age"]
    if idle is not None and idle >= policy["timeout"]:
        return True
    return bool(policy["max_age"] and user["age"] is not None and user["age"] >= policy["max_age"])


def inject_faults(hub: FakeHub, rng: random.Random, names: list[str]) -> None:
    kinds = ["status"] * 3 + ["drop"] * 2 + ["429", "hang", "malformed", "bad_model"]
    kinds += ["loop_next", "foreign_next"]
    count = rng.choice([0, 1, 1, 2, 3])
    for _ in range(count):
        kind = rng.choice(kinds)
        times = rng.choice([1, 1, 2, None])
        roll = rng.random()
        if kind in ("loop_next", "foreign_next", "bad_model") or roll < 0.35:
            offset = rng.choice([0, 3, 7])  # a listing page (offsets of page sizes used below)

            def match(req, offset=offset):
                return req.kind == "list" and int(req.query.get("offset", 0)) == offset
        elif roll < 0.4 or not names:
            match = ("GET", r"^/hub/api/user$")
        else:
            user = re.escape(rng.choice(names))
            match = ("DELETE", f"^/hub/api/users/{user}(/|$)")
        params: dict = {}
        if kind == "status":
            params = {"code": rng.choice([500, 502, 503, 504])}
        elif kind == "429":
            kind, params = "status", {"code": 429, "headers": {"Retry-After": "0"}}
        elif kind == "drop":
            params = {"after": rng.random() < 0.5}  # after: the Hub did it, the answer is lost
        elif kind == "hang":
            params, times = {"seconds": 0.8}, 1
        elif kind == "bad_model":
            params = {"user": rng.choice(names) if names else "nobody"}
        elif kind == "loop_next":
            params, times = {"offset": 0}, 50
        elif kind == "foreign_next":
            params = {"base": "http://localhost:9/hub/api/users"}
        hub.add_fault(match, kind, times=times, **params)


def prepare_pass(hub: FakeHub, rng: random.Random):
    """A fresh population, policy, clock skew and faults; the command line for them."""
    hub.reset()
    hub.date_skew = rng.choice([0, 0, 3600, -3600, 90])
    policy = {
        "timeout": rng.choice(TIMEOUTS),
        "max_age": rng.choice(MAX_AGES),
        "cull_users": rng.random() < 0.5,
        "cull_admin": rng.random() < 0.5,
        "cull_default": rng.random() < 0.9,
        "cull_named": rng.random() < 0.9,
    }
    specs, users = populate(hub, rng, policy["timeout"], policy["max_age"])
    inject_faults(hub, rng, list(users))
    args = [
        "--json",
        f"--timeout={policy['timeout']}",
        f"--max-age={policy['max_age']}",
        f"--cull-users={policy['cull_users']}",
        f"--cull-admin-users={policy['cull_admin']}",
        f"--cull-default-servers={policy['cull_default']}",
        f"--cull-named-servers={policy['cull_named']}",
        f"--remove-named-servers={rng.random() < 0.3}",
        f"--api-page-size={rng.choice([0, 3, 7])}",
        f"--concurrency={rng.choice([1, 4, 10])}",
        "--request-timeout=0.5",
        "--retries=1",
    ]
    return policy, specs, users, args


def test_soak():
    rng = random.Random(SEED)
    figures: Counter[str] = Counter()
    exit_codes: Counter[int] = Counter()
    problems: list[str] = []
    started = time.monotonic()
    with FakeHub(scopes=CULLER_SCOPES) as hub:
        for number in range(PASSES):
            policy, specs, users, args = prepare_pass(hub, rng)
            figures["faults planned"] += len(hub.faults)
            try:
                result = run_cull(hub, *args)
            except Exception:
                problems.append(f"pass {number}: crashed\n{traceback.format_exc()}")
                continue
            figures["passes"] += 1
            figures["faults injected"] += hub.faults_injected
            exit_codes[result.exit_code] += 1
            report = result.json
            if result.exit_code not in (0, 1, 3) or report is None:
                problems.append(f"pass {number}: exit {result.exit_code}\n{result.stderr}")
                continue
            if report["exit_code"] != result.exit_code:
                problems.append(f"pass {number}: report says exit {report['exit_code']}")
            if result.exit_code == 3 and hub.deletes():
                problems.append(f"pass {number}: Hub unusable, yet DELETEs were sent")
            if result.exit_code == 0 and report["summary"]["failures"]:
                problems.append(f"pass {number}: exit 0 with failures")

            stops = set(hub.stops)
            slow = {key for key, spec in specs.items() if spec.state == "slow"}
            for user, server_name in stops:
                if not may_stop(specs[(user, server_name)], server_name, policy):
                    figures["wrong culls"] += 1
                    problems.append(f"pass {number}: wrong cull {user!r}/{server_name!r}")
            for user in hub.deleted_users:
                if not may_delete(user, users[user], specs, stops - slow, policy):
                    figures["wrong deletes"] += 1
                    problems.append(f"pass {number}: wrong delete of user {user!r}")
            # A stop or delete reported done that the Hub did not do (a wrong report, no harm).
            done = [
                (a["action"], a["user"], a["server"])
                for a in report["actions"]
                if a["result"] == "done"
            ]
            for action, user, server_name in done:
                if action == "delete_user":
                    figures["false done"] += user not in hub.deleted_users
                else:
                    figures["false done"] += (user, server_name) not in stops
            cullable = {k for k, spec in specs.items() if may_stop(spec, k[1], policy)}
            figures["servers cullable"] += len(cullable)
            figures["servers stopped"] += len(stops)
            figures["users deleted"] += len(hub.deleted_users)
            figures["requests"] += len(hub.requests)
            if hub.errors:
                problems.append(f"pass {number}: fake hub error\n{hub.errors[-1]}")
                hub.errors.clear()
    duration = time.monotonic() - started

    lines = [
        f"soak: seed={SEED} passes={figures['passes']}/{PASSES} in {duration:.1f}s",
        f"faults planned={figures['faults planned']} injected={figures['faults injected']}",
        "exit codes: " + ", ".join(f"{code}={n}" for code, n in sorted(exit_codes.items())),
        f"servers cullable={figures['servers cullable']} stopped={figures['servers stopped']} "
        f"users deleted={figures['users deleted']} requests={figures['requests']}",
        f"wrong culls={figures['wrong culls']} wrong deletes={figures['wrong deletes']} "
        f"problems={len(problems)}",
        f"actions reported done that the Hub did not do={figures['false done']}",
    ]
    print("\n" + "\n".join(lines))

    assert figures["passes"] == PASSES, problems[:3]
    assert figures["faults injected"] > PASSES // 4  # the soak really was faulty
    assert figures["servers stopped"] > 0
    assert problems == [], "\n".join(problems[:10])
    assert figures["wrong culls"] == 0 and figures["wrong deletes"] == 0
    assert figures["false done"] == 0
