"""The benchmark's fake Hub, in a process of its own, driven by bench.py over stdin/stdout.

Keeping the Hub out of the measuring process and out of the cullers' processes means the CPU
time and peak memory read for a culler are its own. One JSON command per line on stdin, one JSON
answer per line on stdout:

    {"cmd": "start", "users": N, "idle_share": 0.5, "named_every": 4, "latency": 0.01,
     "token": "...", "timeout": 600, "busy_share": 0.5}
        busy_share (optional): the token may look inside servers (tokens: it has the fake make
        a token of each server's owner for it), and each server has a busy kernel with that
        probability (--keep-busy-kernels keeps those)
        -> {"url": ..., "expected_stops": int, "build_s": float}
    {"cmd": "stop"}
        -> {"requests": int, "counts": {kind: int}, "peak_in_flight": int, "stopped": int,
            "delete_before_listing_end": bool, "errors": [...], "hub_cpu_s": float}

Every "start" builds the same users from the same seed, so each culler meets the same Hub.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakehub

from fakehub import CULLER_SCOPES, FakeHub, iso, kernel, server  # noqa: E402

SEED = 6


def build(command: dict) -> tuple[FakeHub, int]:
    """A hub with N users, each with a default server and every Nth also a named one.

    A server is idle (last active 6 timeouts ago) with probability idle_share, else active
    (a minute ago); the draw is seeded, so the same command always builds the same Hub.
    """
    busy_share = command.get("busy_share")
    scopes = CULLER_SCOPES + (["tokens"] if busy_share is not None else [])
    hub = FakeHub(token=command["token"], scopes=scopes, latency=command["latency"])
    rng = random.Random(SEED)
    idle_at, active_at, started = iso(6 * command["timeout"]), iso(60), iso(7 * command["timeout"])
    expected = 0
    for i in range(command["users"]):
        names = ["", "gpu"] if i % command["named_every"] == 0 else [""]
        servers = {}
        for name in names:
            idle = rng.random() < command["idle_share"]
            busy = busy_share is not None and rng.random() < busy_share
            if busy:
                hub.set_inside(f"user{i}", name, kernels=[kernel("busy", 60)])
            expected += idle and not busy
            servers[name] = server(started=started, last_activity=idle_at if idle else active_at)
        last = max(s["last_activity"] for s in servers.values())  # same format: sorts by time
        hub.add_user(f"user{i}", last_activity=last, servers=servers)
    return hub, expected


def stats(hub: FakeHub, cpu_at_start: float) -> dict:
    kinds = [r.kind for r in hub.requests]
    last_list = max((i for i, k in enumerate(kinds) if k == "list"), default=-1)
    first_delete = next((i for i, k in enumerate(kinds) if k in ("stop", "delete_user")), None)
    return {
        "requests": len(kinds),
        "counts": dict(hub.counts),
        "peak_in_flight": hub.peak_in_flight,
        "stopped": len(hub.stops),
        "delete_before_listing_end": first_delete is not None and first_delete < last_list,
        "errors": hub.errors[:3],
        # The Hub's own CPU time: shows whether the fake, not the culler, set the pace.
        "hub_cpu_s": time.process_time() - cpu_at_start,
    }


def main() -> None:
    hub: FakeHub | None = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "start":
                began = time.perf_counter()
                hub, expected = build(command)
                hub.start()
                cpu_at_start = time.process_time()
                answer = {
                    "url": hub.url,
                    "expected_stops": expected,
                    "build_s": time.perf_counter() - began,
                }
            elif command["cmd"] == "stop":
                hub.stop()
                answer, hub = stats(hub, cpu_at_start), None
            else:
                answer = {"error": f"unknown command {command['cmd']!r}"}
        except Exception as exc:  # report to bench.py rather than die silently
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
