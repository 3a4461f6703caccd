"""End to end, looks inside servers (issue 12): a real JupyterHub, a real proxy, real
jupyterhub-singleuser servers and real ipykernel kernels, driven as a browser would drive them
(REST and the kernel websocket), then left alone.

One Hub for the module. A server is idle by the Hub once nothing has passed the proxy for the
culler's --timeout (the Hub takes the proxy's activity every 2 s, the servers report theirs
every 2 s). Every look passes the proxy too, and so counts as activity at the Hub: a test that
looks twice waits for the Hub to call the server idle again in between.

Each look carries a token the Hub makes for the server's owner, for that server only, revoked
after its looks (issue 17): a user's server that records what it is sent gets nothing it could
use anywhere else, nor later.
"""

import re
import threading
import time

import pytest
import requests
from realhub import RealHub

pytestmark = pytest.mark.e2e

TIMEOUT = 3  # the culler's --timeout
IDLE_AFTER = TIMEOUT + 3.5  # untouched this long, a server is idle by the Hub (2 s reports)
TAB_TIMEOUT = 8  # the culler's --timeout against a polling tab
SLEEP = "import time; time.sleep(600)"  # a long computation that prints nothing


@pytest.fixture(scope="module")
def real_hub(tmp_path_factory):
    hub = RealHub(tmp_path_factory.mktemp("looks-hub"), spawner="simple").start()
    yield hub
    assert hub.stop() == [], "the Hub left processes running"


@pytest.fixture
def hub(real_hub):
    real_hub.delete_all_users()
    return real_hub


def start_servers(hub, *servers):
    """Spawn real servers ((user, server name)) at the same time: ~5 s each."""
    hub.create_users(*sorted({user for user, _ in servers}))
    for user, server in servers:
        hub.start_server(user, server, wait=False)
    for user, server in servers:
        hub.wait_ready(user, server)


def cull(hub, *args, token="idle-culler-looks", expect=0):
    result = hub.run_culler(
        "--json", f"--timeout={TIMEOUT}", f"--server-api-url={hub.public_url}", *args, token=token
    )
    assert result.returncode == expect, str(result)
    return result


def stopped(result):
    return {(a["user"], a["server"]) for a in result.json["actions"] if a["result"] == "done"}


def kept(result):
    return {(k["user"], k["server"]): k for k in result.json["kept"]}


def test_a_long_computation_is_kept_while_busy_and_stopped_when_stuck(hub):
    start_servers(hub, ("plain", ""), ("calc", "lab"), ("starter", ""))
    # A cell that sleeps with no browser attached, on two servers; a kernel nobody connected to.
    for user, server in [("plain", ""), ("calc", "lab")]:
        hub.run_code(user, server, hub.start_kernel(user, server), SLEEP, until="busy")
    hub.start_kernel("starter")
    computing_since = time.monotonic()
    assert [k["execution_state"] for k in hub.kernels("calc", "lab")] == ["busy"]
    assert [k["execution_state"] for k in hub.kernels("starter")] == ["starting"]
    time.sleep(IDLE_AFTER)

    # A token without the tokens scope cannot look: refused before anything is done.
    refused = cull(hub, "--keep-busy-kernels=600", token="idle-culler", expect=3)
    assert "the token lacks the scope(s) tokens needed to cull" in refused.stderr
    # Today's rule: the Hub sees nothing of the computation and stops the server.
    today = cull(hub, "--exclude-user=calc", "--exclude-user=starter")
    assert stopped(today) == {("plain", "")}

    # Looked at first: busy, so kept; "starting" is not busy, so stopped.
    looked = cull(hub, "--keep-busy-kernels=600")
    assert stopped(looked) == {("starter", "")}
    assert hub.snapshot() == {"plain": {}, "calc": {"lab": "ready"}, "starter": {}}
    saved = kept(looked)[("calc", "lab")]
    assert saved["inside"]["busy"] == 1 and saved["inside"]["kernels"] == 1
    assert re.search(r"silent \d+s < keep-busy-kernels 600s", saved["reason"])
    assert "0 busy" in {(a["user"]): a for a in looked.json["actions"]}["starter"]["reason"]

    # The look passed the proxy: the Hub saw activity. Once idle again, and busy but silent
    # for longer than the limit, the kernel is stuck: stopped, and the log says so.
    time.sleep(IDLE_AFTER)
    silent = int(time.monotonic() - computing_since)
    limit = silent - 3
    stuck = cull(hub, f"--keep-busy-kernels={limit}")
    assert stopped(stuck) == {("calc", "lab")}
    assert re.search(
        rf"stop user=calc server=lab .*stuck, silent \d+s >= keep-busy-kernels {limit}s",
        stuck.stderr,
    ), stuck.stderr
    assert hub.snapshot() == {"plain": {}, "calc": {"lab": "stopped"}, "starter": {}}


def test_a_polling_tab_keeps_a_server_only_by_the_hubs_activity(hub):
    start_servers(hub, ("tab", ""), ("quiet", ""))
    for user in ("tab", "quiet"):
        hub.run_code(user, "", hub.start_kernel(user), "1 + 1", until="idle")
    ran_at = time.monotonic()
    polling = threading.Event()

    def poll():  # what an open JupyterLab tab does, every few seconds
        while not polling.wait(1.5):
            requests.get(f"{hub.server_url('tab')}api/contents", headers=hub.session.headers)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    # The Hub's time lags the tab by up to 1.5 + 2 s (poll, then the Hub's or the server's
    # report): a longer timeout, so that a loaded machine cannot make the tab look idle.
    try:
        time.sleep(TAB_TIMEOUT + 3)
        by_hub = cull(hub, "--activity-source=hub", f"--timeout={TAB_TIMEOUT}")
        assert stopped(by_hub) == {("quiet", "")}
        assert kept(by_hub)[("tab", "")]["inside"] is None  # the Hub's activity: no look

        by_kernels = cull(hub, "--activity-source=kernels", f"--timeout={TAB_TIMEOUT}")
        assert stopped(by_kernels) == {("tab", "")}
        action = by_kernels.json["actions"][0]
        idle_inside = action["inside"]["idle_s"]
        assert TAB_TIMEOUT <= idle_inside <= time.monotonic() - ran_at + 2
        assert action["inside"]["kernels"] == 1 and action["inside"]["busy"] == 0
        assert "idle inside" in action["reason"]
    finally:
        polling.set()
        poller.join()
    assert hub.snapshot() == {"tab": {}, "quiet": {}}


def test_a_filtered_role_looks_only_where_it_may(hub):
    """tokens!user=one: the Hub makes no token of the others (403); its verdict stands there."""
    start_servers(hub, ("one", ""), ("two", ""))
    for user in ("one", "two"):
        hub.run_code(user, "", hub.start_kernel(user), SLEEP, until="busy")
    time.sleep(IDLE_AFTER)

    result = cull(hub, "--keep-busy-kernels=600", token="idle-culler-looks-one")

    assert hub.snapshot() == {"one": {"": "ready"}, "two": {}}
    assert kept(result)[("one", "")]["inside"]["busy"] == 1
    error = result.json["actions"][0]["inside"]["error"]
    assert error == (
        "making a token of two to look inside two/: HTTP 403 Service two not found or no "
        "permissions to generate tokens"
    ), error
    assert "could not look inside user=two server=(default)" in result.stderr

    # The Hub's own port does not pass /user/... on: looks sent there fail, the Hub decides.
    hub_port = hub.api_url.split("/hub/api")[0]
    wrong = hub.run_culler(
        "--json", f"--timeout={TIMEOUT}", f"--server-api-url={hub_port}",
        "--activity-source=kernels", "--dry-run", "--dry-run-looks", token="idle-culler-looks",
    )  # fmt: skip
    assert wrong.returncode == 0, str(wrong)
    seen = {**kept(wrong), **{(a["user"], a["server"]): a for a in wrong.json["actions"]}}
    assert "HTTP 302 Found (to /hub/user/one/api/kernels" in seen[("one", "")]["inside"]["error"]
    assert hub.snapshot() == {"one": {"": "ready"}, "two": {}}


# What a user can put in their own ~/.jupyter/jupyter_server_config.py: their server runs it at
# its start, and here it keeps every credential the server is sent.
RECORDER = """
import os
import tornado.httputil

_init = tornado.httputil.HTTPServerRequest.__init__


def _recording(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    credential = self.headers.get("Authorization")
    if credential:
        with open(os.path.expanduser("~/recorded-credentials"), "a") as recorded:
            recorded.write(credential + "\\n")


tornado.httputil.HTTPServerRequest.__init__ = _recording
"""


def test_a_server_that_records_its_requests_gets_only_a_key_to_itself_and_only_for_a_moment(hub):
    """The spy's servers record the credentials of every request they are sent; each one is
    then tried where it could hurt: the Hub's API and another user's server."""
    home = hub.home("spy")
    (home / ".jupyter").mkdir(parents=True, exist_ok=True)
    (home / ".jupyter" / "jupyter_server_config.py").write_text(RECORDER)
    (home / "recorded-credentials").unlink(missing_ok=True)
    start_servers(hub, ("spy", ""), ("spy", "lab"), ("victim", ""))
    victims_files = f"{hub.server_url('victim')}api/contents"
    assert hub.session.get(victims_files).status_code == 200  # there is something to read
    time.sleep(TIMEOUT)  # older than the timeout: looked at, with every request a look makes

    result = cull(hub, "--activity-source=kernels", "--exclude-user=victim")

    looked = {**kept(result), **{(a["user"], a["server"]): a for a in result.json["actions"]}}
    for server in ("", "lab"):  # no kernel, no terminal: kernels, terminals and status asked
        assert looked[("spy", server)]["inside"]["error"] is None, looked[("spy", server)]
    recorded = set((home / "recorded-credentials").read_text().splitlines())
    assert len(recorded) == 2, recorded  # one token per server, for all of its looks
    assert not [r for r in recorded if hub.tokens["idle-culler-looks"] in r]
    for credential in recorded:
        auth = {"Authorization": credential}
        tries = {
            "list users": hub.api("GET", "/users", headers=auth),
            "read another user's tokens": hub.api("GET", "/users/victim/tokens", headers=auth),
            "stop another user's server": hub.api("DELETE", "/users/victim/server", headers=auth),
            "read another user's files": requests.get(
                victims_files, headers=auth, allow_redirects=False, timeout=30
            ),
            # Revoked once its looks ended: the Hub no longer knows it at all.
            "say whose it is": hub.api("GET", "/user", headers=auth),
        }
        assert {what: answer.status_code for what, answer in tries.items()} == {
            what: 403 for what in tries
        }
    assert hub.snapshot()["victim"] == {"": "ready"}
    # Nothing left in the Hub's token table: every token made for a look was revoked.
    for user in ("spy", "victim"):
        notes = [t["note"] for t in hub.api("GET", f"/users/{user}/tokens").json()["api_tokens"]]
        assert not [note for note in notes if note and note.startswith("idle-cull")], notes
