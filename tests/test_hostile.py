"""Hostile answers (issue 17): what a user's own server answers a look, and a Hub page that one
user bloated (user_options are theirs to set), are read up to a cap, after decompression.

The passes that meet hostile bodies run the culler as a child process: its peak RSS (from
os.wait4, the child alone) is compared with a normal pass over the same users, and the other
users' idle servers must be stopped in that same pass, within its --max-runtime.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

import pytest
import requests
from conftest import REPO, TOKEN, run_cull
from fakehub import CULLER_SCOPES, PAGINATION_MEDIA_TYPE, FakeHub, iso, kernel, server
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from idle_cull import HUB_BYTES, LOOK_BYTES, LOOK_ITEMS

LOOK_SCOPES = [*CULLER_SCOPES, "tokens"]  # looks are made with tokens the Hub makes
MAX_RUNTIME = 60  # seconds: every pass here must end well within it
RSS_MARGIN_MB = 100  # a hostile pass may take this much more memory than a normal one
# The culler's address space is capped so that one that reads a hostile body whole fails
# (MemoryError) rather than take the shared machine's memory.
ADDRESS_SPACE = 4 << 30


@dataclass
class Measured:
    code: int
    report: dict | None
    stderr: str
    rss_mb: float
    wall: float


# A child's ru_maxrss counts the pages it had before exec, a copy of its parent's: pytest's
# own RSS would hide the culler's. So a small launcher forks the culler and waits for it.
LAUNCHER = """
import os, resource, sys
limit, rusage_file, *command = sys.argv[1:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    os.execv(sys.executable, [sys.executable, *command])
_, status, usage = os.wait4(pid, 0)
with open(rusage_file, "w") as out:
    out.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def run_measured(hub: FakeHub, *args: str) -> Measured:
    """One pass of `python idle_cull.py` as a child process; its peak RSS from os.wait4."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDLE_CULL_", "JUPYTERHUB_"))}
    env["JUPYTERHUB_API_TOKEN"] = TOKEN
    with tempfile.NamedTemporaryFile("r") as rusage:
        command = [sys.executable, "-c", LAUNCHER, str(ADDRESS_SPACE), rusage.name,
                   "idle_cull.py", "--url", hub.url, "--json", *args]  # fmt: skip
        start = time.monotonic()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=3 * MAX_RUNTIME)  # fmt: skip
        wall = time.monotonic() - start
        maxrss_kb = int(rusage.read())
    report = json.loads(done.stdout) if done.stdout.strip() else None
    return Measured(done.returncode, report, done.stderr, maxrss_kb / 1024, wall)


def stops(hub: FakeHub) -> set[str]:
    return {user for user, _ in hub.stops}


# ---- a look at a hostile server ------------------------------------------------------------

IDLE = iso(3600)  # the Hub calls every server here idle against --timeout 600
HOSTILE = {f"u{i:02}" for i in range(0, 20, 2)}
QUIET = {f"u{i:02}" for i in range(1, 20, 2)}  # nothing inside: stopped
BUSY = {f"b{i}" for i in range(4)}  # a busy kernel inside: kept


def look_args(hub: FakeHub) -> tuple[str, ...]:
    return (f"--server-api-url={hub.base_url}", "--keep-busy-kernels=3600", "--concurrency=10",
            f"--max-runtime={MAX_RUNTIME}", "--request-timeout=10")  # fmt: skip


def look_hub() -> FakeHub:
    """20 servers the Hub calls idle, looked at 10 at a time, and 4 busy inside."""
    hub = FakeHub(token=TOKEN, scopes=LOOK_SCOPES).start()
    for name in sorted(HOSTILE | QUIET | BUSY):
        hub.add_user(name, servers={"": server(last_activity=IDLE)})
    for name in BUSY:
        hub.set_inside(name, "", kernels=[kernel("busy", 60)])
    return hub


_normal: dict[str, Measured] = {}


def normal_pass(kind: str, make, args) -> Measured:
    """The same pass with nothing hostile in it (once per module)."""
    if kind not in _normal:
        hub = make()
        try:
            _normal[kind] = run_measured(hub, *args(hub))
        finally:
            hub.stop()
        assert _normal[kind].code == 0, _normal[kind].stderr
    return _normal[kind]


# shape: (the fault's parameters, what the warning says)
OVER = f"is over {LOOK_BYTES // 1024} KiB: not read"
SHAPES = {
    "huge": ({}, OVER),  # 800 MB of valid JSON
    "dribbled": ({"shape": "dribble"}, OVER),  # 800 MB, 64 KiB every 10 ms, chunked
    "gzip-bomb": ({"shape": "gzip"}, OVER),  # 2 GiB in 2 MB
    "deflate-bomb": ({"shape": "deflate"}, OVER),
    "million-kernels": ({"shape": "many"}, OVER),  # 130 MB
    "deep": ({"shape": "deep", "depth": LOOK_BYTES // 2 - 10}, "JSON values"),  # under the cap
    "dicts": ({"shape": "dicts", "size": LOOK_BYTES - 10}, "JSON values"),  # under the cap
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_hostile_server_costs_no_other_server_its_verdict(shape):
    params, said = SHAPES[shape]
    normal = normal_pass("looks", look_hub, look_args)
    hub = look_hub()
    try:
        hub.add_fault(lambda r: r.kind == "look" and r.user in HOSTILE, "hostile",
                      **{"shape": "huge", **params})  # fmt: skip
        hostile = run_measured(hub, *look_args(hub))
    finally:
        hub.stop()

    print(f"{shape}: peak RSS {hostile.rss_mb:.1f} MB (normal {normal.rss_mb:.1f} MB), "
          f"{hostile.wall:.2f} s")  # fmt: skip
    assert hostile.code == 0, hostile.stderr
    # Every look was made; a hostile one failed: the Hub's verdict (stop) stands for it alone.
    assert stops(hub) == HOSTILE | QUIET
    assert hostile.wall < MAX_RUNTIME
    assert hostile.rss_mb <= normal.rss_mb + RSS_MARGIN_MB, (hostile.rss_mb, normal.rss_mb)
    report = {entry["user"]: entry for entry in hostile.report["actions"] + hostile.report["kept"]}
    for name in HOSTILE:
        assert said in report[name]["inside"]["error"], report[name]
        assert f"could not look inside user={name} server=(default): " in hostile.stderr
    assert all(report[name]["inside"]["error"] is None for name in QUIET | BUSY)
    assert all(report[name]["inside"]["busy"] == 1 for name in BUSY)


def test_a_body_dribbled_under_the_cap_is_cut_at_the_look_timeout_and_max_runtime(hub_factory):
    """The body is read while the watchdog watches: its whole answer within the look's
    timeout, and nothing past --max-runtime."""
    hub = hub_factory(scopes=LOOK_SCOPES)

    def timed_pass(*args: str):
        hub.reset()
        for name in ("slow", "quiet"):
            hub.add_user(name, servers={"": server(last_activity=IDLE)})
        # Headers at once, then 64 KiB a second: the cap is 4 s away.
        hub.add_fault(("GET", "^/user/slow/"), "hostile", shape="dribble", interval=1.0)
        began = time.monotonic()
        result = run_cull(hub, "--json", f"--server-api-url={hub.base_url}",
                          "--keep-busy-kernels=3600", *args)  # fmt: skip
        assert time.monotonic() - began < 3.5
        return result

    cut = timed_pass("--request-timeout=2", "--retries=0")
    assert cut.exit_code == 0, cut.stderr
    assert stops(hub) == {"slow", "quiet"}
    slow = next(a for a in cut.json["actions"] if a["user"] == "slow")
    assert slow["inside"]["error"].endswith("no whole answer within 2s")

    late = timed_pass("--request-timeout=30", "--max-runtime=2")
    assert late.exit_code == 1, late.stderr
    assert "--max-runtime reached" in late.stderr
    assert hub.counts["stop"] == 0  # the deadline came during the looks: no stop after it


# ---- a Hub page that one user bloated -------------------------------------------------------

PAGE = 50  # the fake Hub's default page, as the Hub's
USERS = [f"p{i:03}" for i in range(150)]
MALLORY = USERS[75]  # on the second page
SECOND_PAGE = set(USERS[PAGE : 2 * PAGE])


def page_args(_hub: FakeHub) -> tuple[str, ...]:
    return ("--concurrency=10", f"--max-runtime={MAX_RUNTIME}")


def page_hub() -> FakeHub:
    hub = FakeHub(token=TOKEN, scopes=CULLER_SCOPES).start()
    for name in USERS:
        hub.add_user(name, servers={"": server(last_activity=IDLE)})
    return hub


@pytest.mark.parametrize(
    "fill, size, said",
    [
        ("string", 800_000_000, f"is over {HUB_BYTES // 1024**2} MiB: not read"),
        ("dicts", HUB_BYTES - 200_000, "JSON values"),  # the page stays under the cap
    ],
)
def test_a_user_who_bloats_their_page_costs_only_themselves_a_verdict(fill, size, said):
    normal = normal_pass("pages", page_hub, page_args)
    hub = page_hub()
    try:
        hub.add_fault(lambda r: r.kind == "list", "hostile", shape="bloat", user=MALLORY,
                      fill=fill, size=size)  # fmt: skip
        hostile = run_measured(hub, *page_args(hub))
    finally:
        hub.stop()

    print(f"bloated page ({fill}): peak RSS {hostile.rss_mb:.1f} MB "
          f"(normal {normal.rss_mb:.1f} MB), {hostile.wall:.2f} s")  # fmt: skip
    # The page Mallory is on is read again in halves, down to Mallory alone: only Mallory is
    # kept (unseen), everyone else's idle server is stopped in this same pass.
    assert stops(hub) == set(USERS) - {MALLORY}
    assert hostile.wall < MAX_RUNTIME
    assert hostile.rss_mb <= normal.rss_mb + RSS_MARGIN_MB, (hostile.rss_mb, normal.rss_mb)
    assert hostile.code == 1, hostile.stderr
    [error] = hostile.report["errors"]
    assert "offset=75" in error and said in error
    assert error.endswith("the user at offset 75 is left alone this pass")
    # 3 pages, then halves down to one user: 2 more requests for each halving (50 -> 1: 6).
    assert hub.counts["list"] <= 3 + 2 * 6, hub.counts


def test_a_hub_page_is_read_up_to_its_cap_exactly(hub_factory):
    hub = hub_factory()
    for name in USERS[:3]:
        hub.add_user(name, servers={"": server(last_activity=IDLE)})
    fault = hub.add_fault(lambda r: r.kind == "list", "hostile", shape="bloat", user=USERS[1],
                          size=0)  # fmt: skip
    unpadded = requests.get(f"{hub.url}/users?state=ready", timeout=10,
                            headers={"Authorization": f"token {TOKEN}",
                                     "Accept": PAGINATION_MEDIA_TYPE})  # fmt: skip
    fault.params["size"] = HUB_BYTES - len(unpadded.content)  # the page: HUB_BYTES exactly
    at_cap = run_cull(hub, "--json")
    assert at_cap.exit_code == 0, at_cap.stderr
    assert stops(hub) == set(USERS[:3])

    hub.reset()
    for name in USERS[:3]:
        hub.add_user(name, servers={"": server(last_activity=IDLE)})
    fault.params["size"] += 1
    hub.faults.append(fault)
    over = run_cull(hub, "--json")
    # One byte more is not read: the page is asked for again in halves, until "limit": 6 makes
    # it a byte shorter (the same three users) and it is read.
    assert [r.query.get("limit") for r in hub.requests if r.kind == "list"] == [
        "50",
        "25",
        "12",
        "6",
        "6",
        "13",
        "25",
    ]
    assert over.exit_code == 0, over.stderr
    assert stops(hub) == set(USERS[:3])


@pytest.mark.parametrize("page_size", ["0", "1", "7", "200"])
def test_a_bloated_user_on_the_first_page_is_left_out_at_any_page_size(hub_factory, page_size):
    hub = hub_factory()
    for name in USERS[:20]:
        hub.add_user(name, servers={"": server(last_activity=IDLE)})
    # The first and the last user: the list's end is known only from the pages around them.
    hub.add_fault(lambda r: r.kind == "list", "hostile", shape="bloat",
                  user=[USERS[0], USERS[19]], fill="dicts", size=100_000)  # fmt: skip
    result = run_cull(hub, "--json", f"--api-page-size={page_size}")
    assert result.exit_code == 1, result.stderr
    assert stops(hub) == set(USERS[1:19])
    assert sorted(e.split(": ")[-1] for e in result.json["errors"]) == [
        f"the user at offset {n} is left alone this pass" for n in (0, 19)
    ]


def test_a_hub_before_2_0_that_answers_too_much_is_not_asked_again_in_halves(hub_factory):
    hub = hub_factory(version="1.5.0", paginate=False, scopes=None)
    for name in USERS[:3]:
        hub.add_user(name, servers={"": server(last_activity=IDLE)})
    hub.add_fault(lambda r: r.kind == "list", "hostile", shape="bloat", user=USERS[1],
                  size=HUB_BYTES)  # fmt: skip
    result = run_cull(hub, "--json")
    assert result.exit_code == 3, result.stderr  # everyone at once: nothing is known
    assert hub.deletes() == []
    assert hub.counts["list"] == 1


# ---- cut points, encodings and shapes ----------------------------------------------------------


def encode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":  # as HTTP means it: zlib's format
        return zlib.compress(body)
    if encoding == "raw-deflate":  # what some servers send as "deflate"
        squeeze = zlib.compressobj(6, zlib.DEFLATED, -15)
        return squeeze.compress(body) + squeeze.flush()
    if encoding == "gzip, gzip":
        return gzip.compress(gzip.compress(body))
    return body


def kernel_list(size: int, where: str) -> bytes:
    """A list of one idle kernel (silent for 5000 s), `size` bytes long as JSON."""
    model = kernel("idle", 5000)
    if where == "dicts":  # padded with empty models: not a kernel list that can be read
        listed = json.dumps([model]).encode()
        count = max(0, (size - len(listed)) // 4)
        body = listed[:-1] + b", {}" * count + b"]"
        return body + b" " * (size - len(body))
    if where == "name":
        model["name"] = ""
        model["name"] = "a" * (size - len(json.dumps([model])))
    body = json.dumps([model]).encode()
    pad = b" " * (size - len(body))
    return pad + body if where == "front" else body + pad


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.one_of(
        st.sampled_from([LOOK_BYTES - 1, LOOK_BYTES, LOOK_BYTES + 1]),
        st.integers(300, 2 * LOOK_BYTES),
    ),
    encoding=st.sampled_from(["identity", "gzip", "deflate", "raw-deflate", "gzip, gzip"]),
    where=st.sampled_from(["front", "end", "name", "dicts"]),
)
@example(size=LOOK_BYTES, encoding="gzip", where="end")
@example(size=LOOK_BYTES + 1, encoding="gzip", where="end")
def test_a_cut_is_a_failed_look_never_a_cull_the_hub_would_not_make(size, encoding, where):
    """By its kernels the server is idle; by the Hub, active. Seen whole, it is stopped; cut
    anywhere, or unreadable, the Hub's verdict stands and it is kept."""
    body = kernel_list(size, where)
    assert len(body) == size
    with FakeHub(token=TOKEN, scopes=LOOK_SCOPES) as hub:
        hub.add_user("u", servers={"": server(last_activity=iso(30))})
        coding = encoding.removeprefix("raw-")
        headers = {} if encoding == "identity" else {"Content-Encoding": coding}
        hub.add_fault(("GET", "^/user/u/api/kernels$"), "status", code=200,
                      body=encode(body, encoding), headers=headers)  # fmt: skip
        result = run_cull(hub, "--json", f"--server-api-url={hub.base_url}",
                          "--activity-source=kernels")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    whole = size <= LOOK_BYTES and where != "dicts"
    assert (hub.stops == [("u", "")]) == whole
    if not whole:
        [kept] = result.json["kept"]
        assert kept["inside"]["error"] and "active" in kept["reason"]
        assert "could not look inside user=u" in result.stderr
        if size > LOOK_BYTES:
            assert f"is over {LOOK_BYTES // 1024} KiB" in kept["inside"]["error"]


def test_answers_are_asked_for_as_gzip_or_deflate_and_no_other_encoding_is_read(hub_factory):
    hub = hub_factory(scopes=LOOK_SCOPES)
    hub.add_user("u", servers={"": server(last_activity=iso(30))})
    hub.add_fault(("GET", "^/user/u/api/kernels$"), "status", code=200,
                  body=b"\x1b\x00\xf8\xa5\x00", headers={"Content-Encoding": "br"})  # fmt: skip
    result = run_cull(hub, "--json", f"--server-api-url={hub.base_url}",
                      "--activity-source=kernels")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert hub.stops == []
    assert (
        "is encoded as 'br', which was not asked for" in result.json["kept"][0]["inside"]["error"]
    )
    assert {r.headers["Accept-Encoding"] for r in hub.requests} == {"gzip, deflate"}


def test_more_kernels_than_the_cap_is_a_failed_look(hub_factory):
    hub = hub_factory(scopes=LOOK_SCOPES)
    hub.add_user("u", servers={"": server(last_activity=iso(30))})
    hub.set_inside("u", "", kernels=[kernel("idle", 5000) for _ in range(LOOK_ITEMS + 1)])
    result = run_cull(hub, "--json", f"--server-api-url={hub.base_url}",
                      "--activity-source=kernels")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert hub.stops == []
    error = result.json["kept"][0]["inside"]["error"]
    assert f"the kernel list has {LOOK_ITEMS + 1} kernels, more than {LOOK_ITEMS}" in error


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(bloated=st.sets(st.integers(0, 29), max_size=6), page_size=st.integers(0, 12))
@example(bloated={0, 1}, page_size=2)  # the whole first page: its total from the next user
def test_bloated_users_anywhere_cost_only_themselves_a_verdict(hub_factory, bloated, page_size):
    # Not when the whole first page and the user after it are bloated: nothing tells the
    # list's length, so nothing after it is listed (exit 1).
    assume(not page_size or not set(range(page_size + 1)) <= bloated)
    hub = hub_factory()
    for name in USERS[:30]:
        hub.add_user(name, servers={"": server(last_activity=IDLE)})
    if bloated:
        hub.add_fault(lambda r: r.kind == "list", "hostile", shape="bloat",
                      user=[USERS[n] for n in bloated], fill="dicts", size=20_000)  # fmt: skip
    result = run_cull(hub, "--json", f"--api-page-size={page_size}")
    assert result.exit_code == (1 if bloated else 0), result.stderr
    assert stops(hub) == {USERS[n] for n in range(30) if n not in bloated}
    left_alone = [re.search(r"the user at offset (\d+) is left alone this pass$", error)
                  for error in result.json["errors"]]  # fmt: skip
    assert sorted(int(match[1]) for match in left_alone) == sorted(bloated)
