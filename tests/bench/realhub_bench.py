"""Benchmark on a real JupyterHub: what one pass costs the Hub and its users (`make bench-hub`).

The population: 5,000 users, 1,000 of them with a running server (tests/realhub.py's
LightSpawner: no process per server, state kept across a Hub restart), 500 of those idle for
three hours, the other 500 active now. It is built once through the Hub's API; then the Hub is
stopped and its sqlite file copied. Before each pass the Hub is stopped, the copy put back, the
servers' and users' last_activity written into it (the idle half: three hours ago; the rest:
now), and the Hub started and waited for; a listing through the API then checks that it shows
exactly the 1,000 running servers and the 500 idle ones. The file is never replaced under a
running Hub: the servers it holds in memory would disagree with the file, which can by itself
make a culler "miss" servers. The Hub's proxy-activity poll is off (last_activity_interval = 0):
the proxy is new at each start and its routes, all added just then, would make every server look
active; so are its polls of the servers (Spawner.poll_interval = 0), which after a start would
all fall in one burst inside the pass; and the Hub keeps its servers when it stops
(cleanup_servers = False), as a Hub with KubeSpawner pods does.

Each pass: a 10 s baseline of a user's own request, `GET /hub/api/users/<self>` with that user's
token (one the Hub made) through configurable-http-proxy every 50 ms; then the culler, on the
Hub's own port as Zero to JupyterHub's `hub:8081`, with the probe going on. Read per pass: the
Hub process's CPU time (utime + stime from /proc/<pid>/stat) over the pass, less what the Hub
spent per second during the baseline (the probe and the Hub's timers) times the pass's length,
divided by the servers stopped; the pass's wall time (the culler process, start-up included); the
probe's p50/p99 during the pass and during the baseline; the servers stopped of the 500 idle
ones (and that none of the 500 active was); the culler's requests and the Hub's time for them,
from the Hub's log. Upstream jupyterhub-idle-culler 2.0.0 (run_upstream.py, concurrency 10)
and each variant of ours take turns, `--pairs` times, the order alternating; the tables show
medians. Then the token kinds: the Hub's CPU per request (GET /hub/api/users/<probe>) with the
service token from its config (hashed with 16,384 rounds) and with one it made for a user holding
the culler's role (1 round), on this Hub and on a small second one whose config tokens were added
while JupyterHub.trust_user_provided_tokens was on, against a request without a token (GET
/hub/api/); the rounds are read from the Hubs' databases.

PASS/FAIL per target (README "What a pass costs the Hub"); exit 1 on a FAIL. Not collected by
pytest; timings never belong in the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # tests/, for realhub

from bench import measure, pass_duration  # noqa: E402
from realhub import CULLER_SCOPES, RealHub, wait_until  # noqa: E402

USERS, RUNNING, IDLE = 5000, 1000, 500
TIMEOUT = 3600  # the cullers' --timeout
IDLE_AGE = timedelta(hours=3)
PROBE_USER = "probe"
GENERATED_TOKEN_USER = "bench-culler"  # holds the culler's role; the Hub makes its token
PROBE_EVERY = 0.05
BASELINE_S = 10.0
UPSTREAM_CONCURRENCY = 10  # upstream's default
TOKEN_REQUESTS, TOKEN_ROUNDS = 100, 5  # per token kind
EXTRA_CONFIG = [
    # Servers survive a Hub restart, as KubeSpawner pods do.
    "c.JupyterHub.cleanup_servers = False",
    # The proxy is new at each start: its routes would make every server look active.
    "c.JupyterHub.last_activity_interval = 0",
    # Started together, the servers' polls would all fall 27 to 33 s after each start, inside
    # the pass; a Hub that has run for a while spreads them out.
    "c.Spawner.poll_interval = 0",
    # A user with the culler's scopes, whose token the Hub makes (POST .../tokens).
    f"c.JupyterHub.load_roles.append({{'name': 'bench-culler', 'scopes': {CULLER_SCOPES!r}, "
    f"'users': [{GENERATED_TOKEN_USER!r}]}})",
]


def name(i: int) -> str:
    return f"user{i:04d}"


# Every 5th user has a server; every other one of those is idle: spread over every page.
SERVER_USERS = [name(i) for i in range(0, USERS, USERS // RUNNING)]
IDLE_USERS = set(SERVER_USERS[::2])


def log(text: str) -> None:
    print(text, flush=True)


def hub_cpu(pid: int) -> float:
    """utime + stime of the process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    """Nearest rank: the smallest value that at least `share` of the values do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else float("nan")


class Probe(threading.Thread):
    """A user's own request through the proxy every PROBE_EVERY seconds, one at a time (a late
    answer delays the next request, as it would a browser's)."""

    def __init__(self, url: str, token: str):
        super().__init__(daemon=True)
        self.url, self.session = url, requests.Session()
        self.session.trust_env = False
        self.session.headers["Authorization"] = f"token {token}"
        self.samples: list[tuple[float, float, int]] = []  # (sent at, seconds, status)
        self.done = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        while not self.done.is_set():
            sent = time.monotonic()
            try:
                status = self.session.get(self.url, timeout=30).status_code
            except requests.RequestException:
                status = 0
            self.samples.append((sent, time.monotonic() - sent, status))
            due = max(due + PROBE_EVERY, time.monotonic())
            self.done.wait(due - time.monotonic())

    def window(self, start: float, end: float) -> tuple[list[float], int]:
        """Latencies (ms) of the requests sent in [start, end), and how many failed."""
        inside = [(s, status) for at, s, status in self.samples if start <= at < end]
        return [s * 1000 for s, _ in inside], sum(status != 200 for _, status in inside)

    def write(self, path: Path, start: float, end: float) -> None:
        """The requests sent in [start, end), a line each: when (Unix time, as the culler's log
        says it), how long (ms), the status; the slowest beside the culler's log say what it was
        doing then."""
        shift = time.time() - time.monotonic()
        lines = [
            f"{at + shift:.3f} {seconds * 1000:.1f} {status}\n"
            for at, seconds, status in self.samples
            if start <= at < end
        ]
        path.write_text("".join(lines))


@dataclass
class Pass:
    culler: str
    pair: int
    wall_s: float
    pass_s: float | None
    culler_cpu_s: float
    exit_code: int
    hub_cpu_s: float  # over the pass, as read
    hub_cpu_net_s: float  # less the baseline's rate x wall
    stopped_idle: int
    stopped_active: int
    requests: int
    hub_request_ms: float  # the Hub's own time for the culler's requests, from its log
    base_p50: float
    base_p99: float
    pass_p50: float
    pass_p99: float
    probes: int
    probe_errors: int
    load: float
    hub_start_s: float

    @property
    def cpu_per_stop_ms(self) -> float:
        return 1000 * self.hub_cpu_net_s / self.stopped_idle if self.stopped_idle else math.inf


@dataclass
class Variant:
    name: str
    token: str  # "config" or "generated"
    args: list[str]


def parse_variants(text: str) -> list[Variant]:
    """NAME[@TOKEN]=ARGS,...: ours with these arguments and this kind of token."""
    variants = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        label, _, args = spec.partition("=")
        label, _, token = label.partition("@")
        if token not in ("", "config", "generated"):
            raise SystemExit(f"--variants: unknown token kind {token!r} (config, generated)")
        variants.append(Variant(name=label, token=token or "config", args=shlex.split(args)))
    return variants


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="idle-cull-bench-hub-"))
        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise SystemExit(f"--workdir {self.workdir}: not empty (each run builds its own Hub)")
        self.hub = RealHub(self.workdir / "hub", extra_config=EXTRA_CONFIG)
        self.db = self.hub.workdir / "jupyterhub.sqlite"
        self.snapshot = self.workdir / "snapshot.sqlite"
        self.tokens = {"config": self.hub.tokens["idle-culler"]}
        self.variants = {v.name: v for v in parse_variants(args.variants)}
        self.start_times: list[tuple[float, float]] = []

    # -- the population ---------------------------------------------------------------------

    def build(self) -> None:
        began = time.perf_counter()
        hub = self.hub
        hub.start(timeout=120)
        for first in range(0, USERS, 200):  # each request well within its 30 s, even loaded
            hub.create_users(*(name(i) for i in range(first, min(first + 200, USERS))))
        hub.create_users(PROBE_USER)
        self.probe_token = new_token(hub, PROBE_USER, None)
        self.tokens["generated"] = new_token(hub, GENERATED_TOKEN_USER, CULLER_SCOPES)
        made = time.perf_counter()
        with ThreadPoolExecutor(10) as pool:  # the session keeps 10 connections
            list(pool.map(lambda user: hub.start_server(user, wait=False), SERVER_USERS))
        wait_until(lambda: self._ready_count() == RUNNING, 600, "every server to be ready", 2)
        log(
            f"built {USERS:,} users in {made - began:.0f}s (Hub start included), started "
            f"{RUNNING:,} servers in {time.perf_counter() - made:.0f}s"
        )
        hub.stop()
        shutil.copyfile(self.db, self.snapshot)

    def _ready_count(self) -> int:
        return sum(
            s == "ready" for servers in self.hub.snapshot().values() for s in servers.values()
        )

    def restore(self) -> None:
        """Stop the Hub, put the snapshot back with the activity times, start the Hub."""
        self.hub.stop()
        shutil.copyfile(self.snapshot, self.db)
        now = datetime.now(UTC).replace(tzinfo=None)
        stamp = {True: str(now - IDLE_AGE), False: str(now)}
        with sqlite3.connect(self.db) as db:
            for user in SERVER_USERS:
                when = stamp[user in IDLE_USERS]
                db.execute("UPDATE users SET last_activity = ? WHERE name = ?", (when, user))
                db.execute(
                    "UPDATE spawners SET last_activity = ? WHERE user_id = "
                    "(SELECT id FROM users WHERE name = ?)",
                    (when, user),
                )
        offset = self.hub.log_path.stat().st_size
        began = time.perf_counter()
        self.hub.start(timeout=300)
        answered = time.perf_counter() - began
        wait_until(
            lambda: "JupyterHub is now running" in self._log_since(offset), 300, "the Hub's start"
        )
        self.start_times.append((answered, time.perf_counter() - began))

    def _log_since(self, offset: int) -> str:
        with open(self.hub.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def servers(self) -> tuple[set[str], set[str]]:
        """(users whose default server is ready, those of them idle by the Hub's times)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=TIMEOUT)
        ready, idle = set(), set()
        for user, model in self.hub.users().items():
            server = model["servers"].get("")
            if server and server["ready"]:
                ready.add(user)
                seen = datetime.fromisoformat(server["last_activity"].replace("Z", "+00:00"))
                if seen < cutoff:
                    idle.add(user)
        return ready, idle

    # -- a pass -----------------------------------------------------------------------------

    def command(self, culler: str) -> tuple[list[str], str]:
        """The culler's command line and the token it runs with."""
        url = self.hub.api_url
        if culler == "upstream":
            cmd = [self.args.upstream_python, str(HERE / "run_upstream.py"), "--url", url]
            cmd += ["--concurrency", str(UPSTREAM_CONCURRENCY), "--timeout", str(TIMEOUT)]
            return cmd, self.tokens["config"]
        variant = self.variants[culler]
        cmd = [sys.executable, "-m", "idle_cull", "--url", url, "--timeout", str(TIMEOUT)]
        return cmd + variant.args, self.tokens[variant.token]

    def run_pass(self, culler: str, pair: int) -> Pass:
        self.restore()
        ready, idle = self.servers()
        if ready != set(SERVER_USERS) or idle != IDLE_USERS:
            raise SystemExit(
                f"the restored Hub shows {len(ready)} running servers, {len(idle)} idle "
                f"(expected {RUNNING}, {IDLE}): see {self.hub.log_path}"
            )
        pid = self.hub.proc.pid
        probe = Probe(f"{self.hub.public_url}/hub/api/users/{PROBE_USER}", self.probe_token)
        probe.start()
        time.sleep(2)  # the probe's connection is open and the Hub has answered it
        base_start, base_cpu = time.monotonic(), hub_cpu(pid)
        time.sleep(BASELINE_S)
        pass_start, pass_cpu = time.monotonic(), hub_cpu(pid)
        offset = self.hub.log_path.stat().st_size
        cmd, token = self.command(culler)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("IDLE_CULL_", "JUPYTERHUB_"))
        }
        env["JUPYTERHUB_API_TOKEN"] = token
        log_path = self.workdir / f"{culler}-{pair}.log"
        profiler = self.profiler(pid, f"{culler}-{pair}")
        wall, culler_cpu, _, code, stdout = measure(cmd, env, log_path, ROOT)
        pass_end, end_cpu = time.monotonic(), hub_cpu(pid)
        if profiler:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
            profiler.wait(60)
        probe.done.set()
        probe.join()
        hub_log = self._log_since(offset)
        rate = (pass_cpu - base_cpu) / (pass_start - base_start)
        base_ms, _ = probe.window(base_start, pass_start)
        pass_ms, errors = probe.window(pass_start, pass_end)
        probe.write(self.workdir / f"{culler}-{pair}.probe", pass_start, pass_end)
        who = GENERATED_TOKEN_USER if token == self.tokens.get("generated") else "idle-culler"
        request_ms = [float(m) for m in re.findall(rf"\({who}@[^)]*\) ([0-9.]+)ms", hub_log)]
        ready_after, _ = self.servers()
        culler_log = log_path.read_text(errors="replace")
        if code != 0:
            log(f"  ! {culler} exited {code}; log tail ({log_path}):")
            log("    " + "\n    ".join(culler_log.splitlines()[-5:]))
        return Pass(
            culler=culler,
            pair=pair,
            wall_s=wall,
            pass_s=pass_duration(
                "upstream" if culler == "upstream" else "ours", stdout, culler_log
            ),
            culler_cpu_s=culler_cpu,
            exit_code=code,
            hub_cpu_s=end_cpu - pass_cpu,
            hub_cpu_net_s=end_cpu - pass_cpu - rate * (pass_end - pass_start),
            stopped_idle=len(IDLE_USERS - ready_after),
            stopped_active=len(set(SERVER_USERS) - IDLE_USERS - ready_after),
            requests=len(request_ms),
            hub_request_ms=sum(request_ms),
            base_p50=percentile(base_ms, 0.5),
            base_p99=percentile(base_ms, 0.99),
            pass_p50=percentile(pass_ms, 0.5),
            pass_p99=percentile(pass_ms, 0.99),
            probes=len(pass_ms),
            probe_errors=errors,
            load=os.getloadavg()[0],
            hub_start_s=self.start_times[-1][1],
        )

    def profiler(self, pid: int, label: str) -> subprocess.Popen | None:
        """py-spy recording the Hub's stacks over the pass (--profile-hub), or None."""
        if not self.args.profile_hub:
            return None
        out = self.workdir / f"{label}.hub-profile.txt"
        cmd = [self.args.profile_hub, "record", "--pid", str(pid), "--rate", "200"]
        cmd += ["--format", "raw", "--output", str(out)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # -- token kinds ------------------------------------------------------------------------

    def token_costs(self, hub: RealHub, tokens: dict[str, str]) -> dict[str, float]:
        """Hub CPU (ms) per request: GET /hub/api/users/<probe> with each token (the tokens hold
        the same scopes, so the answers are the same), and GET /hub/api/ with none. The kinds
        take turns, TOKEN_ROUNDS rounds; the median round of each kind counts."""
        session = requests.Session()
        session.trust_env = False
        kinds = [("no token", None), *tokens.items()]
        samples: dict[str, list[float]] = {kind: [] for kind, _ in kinds}
        for _ in range(TOKEN_ROUNDS):
            for kind, token in kinds:
                url = f"{hub.api_url}/users/{PROBE_USER}" if token else f"{hub.api_url}/"
                headers = {"Authorization": f"token {token}"} if token else {}
                session.get(url, headers=headers).raise_for_status()  # a warm connection
                before = hub_cpu(hub.proc.pid)
                for _ in range(TOKEN_REQUESTS):
                    session.get(url, headers=headers).raise_for_status()
                samples[kind].append(1000 * (hub_cpu(hub.proc.pid) - before) / TOKEN_REQUESTS)
        return {kind: statistics.median(values) for kind, values in samples.items()}

    def token_kinds(self) -> list[tuple[str, str, float, int | None]]:
        """(Hub, token kind, Hub CPU ms per request, hash rounds) on this Hub, and on a small
        one whose config tokens were added while trust_user_provided_tokens was on."""
        self.restore()
        kinds = {k: self.tokens[k] for k in ("config", "generated")}
        rows = [("bench", k, ms, None) for k, ms in self.token_costs(self.hub, kinds).items()]
        self.hub.stop()
        extra = [*EXTRA_CONFIG, "c.JupyterHub.trust_user_provided_tokens = True"]
        with RealHub(self.workdir / "trusted-hub", extra_config=extra) as small:
            small.create_users(PROBE_USER)
            kinds = {
                "config": small.tokens["idle-culler"],
                "generated": new_token(small, GENERATED_TOKEN_USER, CULLER_SCOPES),
            }
            costs = self.token_costs(small, kinds)
        rows += [("trusted", k, ms, None) for k, ms in costs.items()]
        found = {}
        for name, hub in (("bench", self.hub), ("trusted", small)):
            db = hub.workdir / "jupyterhub.sqlite"
            found[name, "config"] = rounds(db, "services", "idle-culler")
            found[name, "generated"] = rounds(db, "users", GENERATED_TOKEN_USER)
        return [(hub, kind, ms, found.get((hub, kind))) for hub, kind, ms, _ in rows]


def new_token(hub: RealHub, user: str, scopes: list[str] | None) -> str:
    """A token the Hub makes for the user (POST /users/<user>/tokens): hashed with 1 round."""
    body = {"note": "bench", **({"scopes": scopes} if scopes else {})}
    response = hub._check(hub.api("POST", f"/users/{user}/tokens", json=body), 201)
    return response.json()["token"]


def rounds(db: Path, table: str, owner: str) -> int | None:
    """The hash rounds of the owner's tokens (a user or a service); None unless all agree."""
    column = "user_id" if table == "users" else "service_id"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            f"SELECT api_tokens.note, api_tokens.hashed FROM api_tokens JOIN {table} "  # noqa: S608
            f"ON api_tokens.{column} = {table}.id WHERE {table}.name = ?",
            (owner,),
        ).fetchall()
    found = {int(hashed.split(":")[1]) for _, hashed in rows}
    return found.pop() if len(found) == 1 else None


# -- the report ---------------------------------------------------------------------------------


def median(passes: list[Pass], attr: str) -> float:
    return statistics.median(getattr(p, attr) for p in passes)


def table(passes: list[Pass], cullers: list[str]) -> str:
    head = (
        "| culler | passes | Hub CPU per stop ms | Hub CPU s | wall s | pass s | user p50 / p99 "
        "ms, baseline | user p50 / p99 ms, during the pass | p99 vs upstream's | idle stopped "
        "(fewest) | active stopped | requests | Hub ms in them | culler CPU s | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    up = [p for p in passes if p.culler == "upstream"]
    for culler in cullers:
        runs = [p for p in passes if p.culler == culler]
        if not runs:
            continue
        vs = median(runs, "pass_p99") / median(up, "pass_p99") if up else math.nan
        pass_s = [p.pass_s for p in runs if p.pass_s is not None]
        lines.append(
            f"| {culler} | {len(runs)} | {median(runs, 'cpu_per_stop_ms'):.2f} "
            f"| {median(runs, 'hub_cpu_s'):.2f} | {median(runs, 'wall_s'):.2f} "
            f"| {statistics.median(pass_s) if pass_s else math.nan:.2f} "
            f"| {median(runs, 'base_p50'):.1f} / {median(runs, 'base_p99'):.1f} "
            f"| {median(runs, 'pass_p50'):.1f} / {median(runs, 'pass_p99'):.1f} | {vs:.2f}x "
            f"| {min(p.stopped_idle for p in runs)}/{IDLE} "
            f"| {max(p.stopped_active for p in runs)} | {median(runs, 'requests'):.0f} "
            f"| {median(runs, 'hub_request_ms'):.0f} | {median(runs, 'culler_cpu_s'):.2f} "
            f"| {min(p.load for p in runs):.1f}-{max(p.load for p in runs):.1f} |"
        )
    return "\n".join(lines)


def targets(passes: list[Pass], ours: str) -> list[tuple[bool, str]]:
    up = [p for p in passes if p.culler == "upstream"]
    mine = [p for p in passes if p.culler == ours]
    checks = []
    p99, up_p99 = median(mine, "pass_p99"), median(up, "pass_p99")
    checks.append(
        (
            p99 <= 1.5 * up_p99,
            f"the user's p99 during the pass at most 1.5x upstream's ({ours}): {p99:.1f} ms vs "
            f"{up_p99:.1f} ms = {p99 / up_p99:.2f}x",
        )
    )
    cpu, up_cpu = median(mine, "cpu_per_stop_ms"), median(up, "cpu_per_stop_ms")
    checks.append(
        (
            cpu <= up_cpu,
            f"Hub CPU per server stopped at most upstream's ({ours}): {cpu:.2f} ms vs "
            f"{up_cpu:.2f} ms = {cpu / up_cpu:.2f}x",
        )
    )
    wall, up_wall = median(mine, "wall_s"), median(up, "wall_s")
    checks.append(
        (
            wall <= up_wall,
            f"pass wall time at most upstream's ({ours}): {wall:.2f}s vs {up_wall:.2f}s "
            f"= {up_wall / wall:.2f}x faster",
        )
    )
    stops = [p.stopped_idle for p in mine]
    checks.append(
        (
            all(s == IDLE for s in stops) and all(p.exit_code == 0 for p in mine),
            f"{IDLE} of {IDLE} idle servers stopped in one pass, every run, exit 0 ({ours}): "
            f"{', '.join(map(str, stops))}; exits {sorted({p.exit_code for p in mine})}",
        )
    )
    for culler in sorted({p.culler for p in passes}):
        runs = [p for p in passes if p.culler == culler]
        wrong = sum(p.stopped_active for p in runs)
        failed = sum(p.probe_errors for p in runs)
        checks.append(
            (
                not wrong and not failed,
                f"no active server stopped and every probe answered 200 ({culler}): "
                f"{wrong} active stopped, {failed} probes failed",
            )
        )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-python", required=True, help="python of the upstream venv")
    parser.add_argument(
        "--pairs", type=int, default=3, help="passes of each culler (0: only the token kinds)"
    )
    parser.add_argument(
        "--variants",
        default="ours=",
        help="ours, as NAME[@TOKEN]=ARGS,... (TOKEN: config, the default, or generated); "
        "the first is held to the targets",
    )
    parser.add_argument("--no-tokens", action="store_true", help="skip the token kinds")
    parser.add_argument("--workdir", default=None, help="the Hub, its snapshot and the logs")
    parser.add_argument("--json-out", default=None, help="also write every pass as JSON")
    parser.add_argument(
        "--profile-hub",
        metavar="PY_SPY",
        default=None,
        help="record the Hub's stacks during each pass with this py-spy, into the work "
        "directory (profiling only: the figures then include the profiler)",
    )
    args = parser.parse_args()
    bench = Bench(args)
    names = list(bench.variants)
    log(f"work directory (Hub, logs): {bench.workdir}")
    began = time.perf_counter()
    passes: list[Pass] = []
    try:
        bench.build()
        for pair in range(1, args.pairs + 1):
            order = ["upstream", *names] if pair % 2 else [*names, "upstream"]
            for culler in order:
                p = bench.run_pass(culler, pair)
                passes.append(p)
                log(
                    f"  pair {pair} {culler:<12} wall {p.wall_s:6.2f}s hub CPU {p.hub_cpu_s:5.2f}s "
                    f"({p.cpu_per_stop_ms:.2f} ms/stop net) stopped {p.stopped_idle}/{IDLE} "
                    f"(+{p.stopped_active} active) user p50/p99 {p.base_p50:.0f}/{p.base_p99:.0f}"
                    f" -> {p.pass_p50:.0f}/{p.pass_p99:.0f} ms, {p.requests} requests, "
                    f"Hub start {p.hub_start_s:.1f}s (load average {p.load:.1f})"
                )
        kinds = [] if args.no_tokens else bench.token_kinds()
    finally:
        bench.hub.stop()
    answered = statistics.median(a for a, _ in bench.start_times)
    running = statistics.median(r for _, r in bench.start_times)

    print()
    described = ", ".join(
        f"{v.name} = {shlex.join(v.args) or '(its defaults)'} with the {v.token} token"
        for v in bench.variants.values()
    )
    log(
        f"{USERS:,} users, {RUNNING:,} running servers, {IDLE} idle; {args.pairs} passes each, "
        f"medians; ours: {described}; upstream 2.0.0 with concurrency {UPSTREAM_CONCURRENCY} "
        "and the config token"
    )
    if passes:
        log(table(passes, ["upstream", *names]))
    log(
        f"\nHub restart with {RUNNING:,} running servers (the median of {len(bench.start_times)}): "
        f"answers after {answered:.1f}s, 'JupyterHub is now running' after {running:.1f}s"
    )
    if kinds:
        log(
            "\nHub CPU per request (GET /hub/api/users/probe; with no token: GET /hub/api/); "
            "trusted: a small Hub with trust_user_provided_tokens on when its tokens were added:"
        )
        for hub, kind, ms, found in kinds:
            where = f", hashed with {found:,} round(s)" if found else ""
            log(f"  {hub:<8} {kind:<10} {ms:6.2f} ms{where}")
        cost = {(hub, kind): ms for hub, kind, ms, _ in kinds}
        extra = cost["bench", "config"] - cost["bench", "generated"]
        if ours := [p for p in passes if p.culler == names[0]]:
            log(
                f"  a pass of {names[0]} sends {median(ours, 'requests'):.0f} requests: with the "
                f"config token the Hub spends {median(ours, 'requests') * extra / 1000:.2f}s "
                "more CPU on it than with a generated one"
            )
    print()
    checks = targets(passes, names[0]) if passes else []
    for passed, text in checks:
        log(f"{'PASS' if passed else 'FAIL'}  {text}")
    log(f"\nbenchmark took {time.perf_counter() - began:.0f}s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([p.__dict__ for p in passes], indent=1))
    return 1 if any(not passed for passed, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
