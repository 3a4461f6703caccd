"""`make demo`: watch idle-cull work on a real, throw-away JupyterHub on 127.0.0.1.

It starts JupyterHub and its proxy in a temporary folder, gives a few users servers, lets some
of them go idle, runs the culler once with --dry-run and once for real, prints what happened,
and stops everything it started (also on Ctrl-C or an error).
"""

import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realhub import CULLER, RealHub  # noqa: E402 - tests/ is not a package

TIMEOUT = 5  # seconds; a real Hub would use an hour or more (--timeout=3600)

# (user, server, in use?) -- "" is the user's default server.
SERVERS = [
    ("alice", "", False),
    ("bob", "", True),
    ("carol", "gpu", False),
    ("dave", "", True),
    ("dave", "experiment", False),
]


def say(text=""):
    print(text, flush=True)


def idle_seconds(timestamp):
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - then).total_seconds()


def describe(hub):
    """{(user, server): "running, idle 7s"} for every server the Hub has."""
    found = {}
    for name, user in hub.users().items():
        for server_name, server in user["servers"].items():
            if server["ready"]:
                state = f"running, idle {idle_seconds(server['last_activity']):.0f}s"
            elif server_name:
                state = "stopped (kept)"
            else:
                continue
            found[(name, server_name)] = state
    return found


def table(rows, headers):
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    for i, row in enumerate([headers, *rows]):
        say(("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True))).rstrip())
        if i == 0:
            say("  " + "  ".join("-" * w for w in widths))


def run_culler(hub, *args):
    shown = " ".join(["python idle_cull.py", "--url", hub.api_url, f"--timeout={TIMEOUT}", *args])
    say(f"$ JUPYTERHUB_API_TOKEN=<culler's token> {shown}")
    result = hub.run_culler(f"--timeout={TIMEOUT}", "--json", *args)
    say("  The culler logged (on stderr):")
    for line in result.stderr.splitlines():
        say(f"    {line}")
    report = result.json
    if result.returncode != 0 or report is None:
        raise RuntimeError(f"the culler failed:\n{result}")
    say(f"  Exit code {result.returncode}: every action it tried worked.")
    return report


def demo(workdir):
    say("1. Starting a throw-away JupyterHub with configurable-http-proxy on 127.0.0.1 ...")
    hub = RealHub(workdir)
    try:
        hub.start()
        say(f"   Hub API: {hub.api_url}  (its log, deleted at the end: {hub.log_path})")
        say("   The culler has its own token with only the scopes it needs:")
        say("   list:users, read:users:activity, read:servers, delete:servers.")
        say()
        say("2. Giving users servers (stand-ins: no notebook process behind them) ...")
        hub.create_users(*sorted({user for user, _, _ in SERVERS}))
        for user, server, _ in SERVERS:
            hub.start_server(user, server)
        say(f"   Waiting {TIMEOUT + 2}s, so that untouched servers pass the {TIMEOUT}s timeout ...")
        time.sleep(TIMEOUT + 2)
        for user, server, in_use in SERVERS:
            if in_use:
                hub.touch(user, server)  # what a user's open notebook reports to the Hub
        before = describe(hub)
        say()
        say(f"   Servers now (idle = time since last activity; the timeout is {TIMEOUT}s):")
        rows = [(u, s or "(default)", state) for (u, s), state in before.items()]
        table(rows, ["USER", "SERVER", "STATE"])
        say()

        say("3. A dry run first: the culler says what it would do and changes nothing.")
        planned = run_culler(hub, "--dry-run")
        for action in sorted(planned["actions"], key=lambda a: (a["user"], a["server"])):
            say(f"   would {action['action']} {action['user']}/{action['server'] or '(default)'}")
        unchanged = set(describe(hub)) == set(before)
        say(f"   Servers unchanged after the dry run: {'yes' if unchanged else 'NO'}")
        say()

        say("4. Now for real:")
        report = run_culler(hub)
        after = describe(hub)
        why = {(a["user"], a["server"]): a["reason"] for a in report["actions"]}
        say()
        say("5. Before and after:")
        rows = []
        for (user, server), state in before.items():
            now = after.get((user, server), "stopped")
            if now.startswith("running"):
                now = "still running"
            reason = why.get((user, server), f"active within the last {TIMEOUT}s")
            rows.append((user, server or "(default)", state, now, reason))
        table(rows, ["USER", "SERVER", "BEFORE", "AFTER", "WHY"])
        s = report["summary"]
        say()
        say(
            f"   {s['users_scanned']} users looked at, {s['servers_stopped']} servers stopped, "
            f"{s['failures']} failures, in {report['duration_s']:.2f}s."
        )
        say("   Named servers stay listed as stopped; add --remove-named-servers to delete them,")
        say("   and --cull-users to also delete users who are idle and have no running server.")
        say("   Try it on your Hub (a dry run changes nothing):")
        say(f"   JUPYTERHUB_API_TOKEN=... python {CULLER.name} --url http://HUB:8081/hub/api \\")
        say("       --timeout=3600 --dry-run")
    except Exception:
        say("\nSomething went wrong; the end of the Hub's log:")
        say(hub.log_tail())
        raise
    finally:
        say()
        say("6. Stopping the Hub and its proxy ...")
        leftovers = hub.stop()
        if leftovers:
            say(f"   had to kill leftover processes: {leftovers}")
        say("   Done: nothing left running.")


def main():
    # `kill` or a closed terminal should clean up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="idle-cull-demo-") as workdir:
        try:
            demo(workdir)
        except KeyboardInterrupt:
            say("Interrupted; everything that was started has been stopped.")
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
