"""Looks with the owner's key, not ours (issue 17).

Each server is looked at with a token the Hub makes for the server's owner, scoped to that one
server (access:servers!server=<owner>/<name>), short-lived, and revoked once its looks end; the
culler's own token goes to the Hub only. The fake Hub makes and revokes such tokens as JupyterHub
3.0+ does, and its servers accept nothing else (tests/fakehub.py). The real thing, with a user's
server that records what it is sent, is in tests/test_e2e_looks.py.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import TOKEN
from fakehub import CULLER_SCOPES, FakeHub, iso, kernel, server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_looks import acted, assert_owners_keys, kept, looking

import idle_cull

LOOK_SCOPES = [*CULLER_SCOPES, "tokens"]
IDLE, ACTIVE = 3600, 30


def idle_server(**kw):
    return server(last_activity=iso(IDLE), **kw)


@pytest.fixture
def hub(hub_factory):
    return hub_factory(scopes=LOOK_SCOPES)


def add_busy(hub, name, servers=("",)):
    """A user whose servers are idle by the Hub, each with a busy kernel (kept by a look)."""
    hub.add_user(name, servers={s: idle_server() for s in servers})
    for s in servers:
        hub.set_inside(name, s, kernels=[kernel("busy", 60)])


def made_for(hub, user, server=""):
    return [t for t in hub.minted if (t.owner, t.server) == (user, server)]


# ---- what is asked for, what is sent where ---------------------------------------------------


def test_each_look_carries_a_token_of_its_owner_for_that_server_only(hub):
    add_busy(hub, "alice", ("", "gpu"))
    add_busy(hub, "bob")
    hub.add_user("carol", servers={"": server(last_activity=iso(ACTIVE))})  # active: no look
    hub.set_inside("carol", "", kernels=[kernel("idle", 5000)])

    result = looking(hub, "--keep-busy-kernels=3600", "--activity-source=kernels")

    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("carol", "")]  # idle inside; the others compute
    assert_owners_keys(hub)  # never the culler's token on a look; every token revoked
    assert sorted((t.owner, t.server) for t in hub.minted) == [
        ("alice", ""), ("alice", "gpu"), ("bob", ""), ("carol", "")
    ]  # fmt: skip
    # One token per server, for all of that server's looks (kernels, terminals).
    assert hub.counts["mint"] == hub.counts["revoke"] == 4
    assert hub.counts["look"] == 8
    bodies = {tuple(r.json()["scopes"]): r.json() for r in hub.requests if r.kind == "mint"}
    assert bodies[("access:servers!server=alice/gpu",)] == {
        "scopes": ["access:servers!server=alice/gpu"],
        "expires_in": 120,  # 3 requests x (1 + 3 retries) x 10 s
        "note": "idle-cull look at alice/gpu",
    }
    assert bodies[("access:servers!server=bob/",)]["note"] == "idle-cull look at bob/"
    # The token's revoke comes after the last of its server's looks.
    for token in hub.minted:
        auth = f"token {token.secret}"
        used = [r.received for r in hub.requests if r.headers.get("Authorization") == auth]
        revoke = next(r for r in hub.requests if r.raw_path.endswith(f"/tokens/{token.id}"))
        assert used and max(used) <= revoke.received


def test_a_tokens_lifetime_covers_every_attempt_of_its_looks(hub):
    add_busy(hub, "u")
    result = looking(hub, "--keep-busy-kernels=3600", "--request-timeout=4", "--retries=1")
    assert result.exit_code == 0, result.stderr
    [mint] = [r.json() for r in hub.requests if r.kind == "mint"]
    assert mint["expires_in"] == 24  # 3 x (1 + 1) x 4 s


def test_the_hubs_token_limit_makes_looks_fail_and_says_why(hub_factory):
    hub = hub_factory(scopes=LOOK_SCOPES, token_expires_in_max=60)
    add_busy(hub, "a")
    add_busy(hub, "b")
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("a", ""), ("b", "")]  # the Hub's verdict stands
    assert acted(result)[("a", "")]["inside"]["error"] == (
        "making a token of a to look inside a/: HTTP 400 token expires_in: 120 must not exceed 60"
    )
    assert "could not look inside user=b server=(default): making a token" in result.stderr
    assert hub.minted == [] and hub.counts["look"] == 0
    # Shorter looks ask for less, within the Hub's limit.
    hub.reset()
    add_busy(hub, "a")
    ok = looking(hub, "--keep-busy-kernels=3600", "--request-timeout=5", "--retries=1")
    assert ok.exit_code == 0 and hub.stops == [], ok.stderr
    assert_owners_keys(hub)


# ---- a refused or failed token is a failed look ----------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "code": 403},
        {"kind": "status", "code": 400},
        {"kind": "status", "code": 503},
        {"kind": "status", "code": 200, "body": b"<html>sign in</html>"},
        {"kind": "malformed", "body": b'{"token": '},
        {"kind": "hang", "seconds": 3},  # longer than --request-timeout
        {"kind": "drop"},
        {"kind": "drop", "after": True},  # made, but the answer is lost
    ],
    ids=["403", "400", "503", "html", "malformed", "hang", "dropped", "answer-lost"],
)
def test_a_failed_token_is_a_failed_look_and_touches_no_other_server(hub, fault):
    for name in ("a", "b", "c"):
        add_busy(hub, name)
    kind = fault.pop("kind")
    hub.add_fault(("POST", "^/hub/api/users/b/tokens$"), kind, **fault)

    result = looking(hub, "--keep-busy-kernels=3600", "--request-timeout=1", "--retries=0")

    # One refusal among others is no configuration error: the Hub's verdict stands for b.
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("b", "")]
    assert {s for s in kept(result) if kept(result)[s]["inside"]["busy"]} == {("a", ""), ("c", "")}
    error = acted(result)[("b", "")]["inside"]["error"]
    assert error.startswith("making a token of b to look inside b/: "), error
    assert re.search(
        r"could not look inside user=b server=\(default\): making a token", result.stderr
    )
    assert not [r for r in hub.requests if r.kind == "look" and r.looked_at[0] == "b"]
    if fault.get("after"):  # lost: it cannot be revoked, and the warning says when it ends
        assert "a token made, if any, expires in 3s" in error
        assert [t.revoked for t in made_for(hub, "b")] == [False]
    assert all(t.revoked for t in hub.minted if t.owner != "b")


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "code": 503},
        {"kind": "status", "code": 403},
        {"kind": "hang", "seconds": 3},
        {"kind": "drop", "after": True},
    ],
    ids=["503", "403", "hang", "answer-lost"],
)
def test_a_failed_revoke_is_a_warning_sent_once(hub, fault):
    add_busy(hub, "a")
    add_busy(hub, "b")
    kind = fault.pop("kind")
    hub.add_fault(("DELETE", "^/hub/api/users/a/tokens/"), kind, **fault)

    result = looking(hub, "--keep-busy-kernels=3600", "--request-timeout=1", "--retries=3")

    assert result.exit_code == 0, result.stderr  # a warning, not a failure
    assert hub.stops == []  # both seen busy: the looks themselves went well
    warning = re.search(
        r"WARNING .*revoking the token of a for the look inside a/: (.*); the token expires "
        r"12s after it was made",
        result.stderr,
    )
    assert warning, result.stderr
    # Never sent twice: the Hub reuses ids, a retry could revoke a token made since.
    assert len([r for r in hub.requests if r.kind == "revoke" and r.user == "a"]) == 1
    assert [t.revoked for t in made_for(hub, "b")] == [True]
    assert "revoking the token of b" not in result.stderr


def test_a_token_gone_already_is_revoked(hub):
    add_busy(hub, "a")
    gone = {"status": 404, "message": "No such token a1 for user a"}
    hub.add_fault(("DELETE", "/tokens/"), "status", code=404, body=json.dumps(gone).encode())
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 0 and "WARNING" not in result.stderr, result.stderr
    # A 404 that is not the Hub's about that very token is no proof that it is gone.
    hub.reset()
    add_busy(hub, "a")
    hub.add_fault(("DELETE", "/tokens/"), "status", code=404, proxy=True, body=b"<html>404</html>")
    result = looking(hub, "--keep-busy-kernels=3600")
    assert "revoking the token of a for the look inside a/: HTTP 404" in result.stderr


def test_a_token_wider_than_asked_is_revoked_at_once_and_never_sent(hub_factory):
    """A Hub that ignores the scopes asked for (JupyterHub 2.x does; a version that cannot be
    read lets such a Hub through) makes a token that can do all its owner may."""
    hub = hub_factory(scopes=LOOK_SCOPES, narrow_tokens=False, version="unknown-build")
    hub.add_fault(("GET", "^/hub/api/user$"), "status", code=200,
                  body=json.dumps({"kind": "service", "scopes": LOOK_SCOPES}).encode())  # fmt: skip
    add_busy(hub, "a")
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("a", "")]  # not seen: the Hub's verdict
    assert acted(result)[("a", "")]["inside"]["error"] == (
        "making a token of a to look inside a/: the Hub made a token wider than asked (revoked)"
    )
    assert [t.revoked for t in hub.minted] == [True]
    assert hub.counts["look"] == 0


@pytest.mark.parametrize("version", ["1.5.0", "2.3.1"])
def test_hubs_before_3_cannot_narrow_a_token_so_looks_are_refused(hub_factory, version):
    hub = hub_factory(scopes=LOOK_SCOPES, version=version, narrow_tokens=False)
    add_busy(hub, "a")
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 3, result.stderr
    line = (
        f"looking inside servers needs JupyterHub 3.0 or later (this Hub: {version}), where a "
        "token can be narrowed to one server"
    )
    assert line in result.stderr
    assert hub.stops == [] and hub.minted == [] and hub.counts["look"] == 0
    # A dry run that sends no look only says so; one that looks is refused too.
    dry = looking(hub, "--keep-busy-kernels=3600", "--dry-run")
    assert dry.exit_code == 0 and f"{line}: a real run would fail" in dry.stderr, dry.stderr
    assert looking(hub, "--keep-busy-kernels=3600", "--dry-run", "--dry-run-looks").exit_code == 3
    assert hub.minted == []


def test_3_0_looks(hub_factory):
    hub = hub_factory(scopes=LOOK_SCOPES, version="3.0.0")
    add_busy(hub, "a")
    result = looking(hub, "--keep-busy-kernels=3600")
    assert result.exit_code == 0 and hub.stops == [], result.stderr
    assert_owners_keys(hub)


# ---- what a server sends back ----------------------------------------------------------------


def pieces(secret: str) -> set[str]:
    return {secret[i : i + 8] for i in range(len(secret) - 7)}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_server_that_echoes_its_token_shows_none_of_it(hub, log_format):
    add_busy(hub, "a")
    add_busy(hub, "b")
    hub.add_fault(("GET", "^/user/a/"), "echo", code=500)
    hub.add_fault(("GET", "^/user/b/"), "echo", code=302)
    result = looking(hub, "--keep-busy-kernels=3600", "--retries=0", f"--log-format={log_format}",
                     "--log-level=debug")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("a", ""), ("b", "")]
    output = result.stdout + result.stderr
    assert "you sent Authorization: token [token]" in output
    assert "(to /hub/login?next=token [token])" in output
    shown = [p for t in hub.minted for p in pieces(t.secret) if p in output]
    assert shown == [] and len(hub.minted) == 2
    assert not [p for p in pieces(TOKEN) if p in output]


def test_cookies_a_server_sets_go_nowhere(hub):
    """A cookie from one user's server would go with every later request to the proxy's host:
    other users' looks, and the Hub behind the same proxy; a big one would make them fail."""
    for name in ("a", "b", "c"):
        add_busy(hub, name)
    planted = "planted=" + "x" * 3000 + "; Path=/"
    hub.add_fault(("GET", "^/user/a/api/kernels$"), "status", code=200,
                  headers={"Set-Cookie": planted}, body=b"[]")  # fmt: skip
    result = looking(hub, "--keep-busy-kernels=3600", "--concurrency=1")
    assert result.exit_code == 0, result.stderr
    assert [r.looked_at for r in hub.requests if r.kind == "look"][0] == ("a", "")
    assert [r.raw_path for r in hub.requests if r.headers.get("Cookie")] == []
    assert hub.stops == [("a", "")]  # nothing busy inside a; b and c still seen busy


# ---- properties over whole passes --------------------------------------------------------------

NAMES = st.sampled_from(["alice", "bob", "a b", "é/x", "x%2Fy", "@home", "dots."])
SERVER_NAMES = st.sampled_from(["", "gpu", "a b", "é", "1"])
FAULTS = st.sampled_from(
    [None, None, ("mint", 403), ("mint", 400), ("mint", 503), ("mint", "drop"),
     ("revoke", 503), ("revoke", "drop"), ("look", 403), ("look", 500)]
)  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    users=st.dictionaries(
        NAMES,
        st.dictionaries(SERVER_NAMES, st.tuples(st.booleans(), FAULTS), min_size=1, max_size=3),
        min_size=1,
        max_size=4,
    ),
    kernels_source=st.booleans(),
)
@example(users={"alice": {"": (True, ("mint", 403)), "gpu": (True, None)}}, kernels_source=False)
def test_only_owners_tokens_reach_servers_and_each_is_revoked_or_warned(users, kernels_source):
    """Whatever the names and faults: a look carries only a token made for its own server,
    never the culler's; every token made is revoked or a warning says it was not; a server
    whose token or look failed gets the Hub's verdict (stop: idle); no other is touched."""
    with FakeHub(token=TOKEN, scopes=LOOK_SCOPES) as hub:
        faulted = {}
        for user, servers in users.items():
            hub.add_user(user, servers={s: idle_server() for s in servers})
            for name, (busy, fault) in servers.items():
                inside = kernel("busy", 60) if busy else kernel("idle", 5000)
                hub.set_inside(user, name, kernels=[inside], terminals=[])
                if fault:
                    faulted[(user, name)] = fault
                    where, what = fault

                    def match(req, key=(user, name), where=where):
                        if req.kind != where:
                            return False
                        if where == "look":
                            return req.looked_at == key
                        if where == "mint":
                            return req.json()["scopes"] == [
                                f"access:servers!server={key[0]}/{key[1]}"
                            ]
                        token = next(t for t in hub.minted if t.id == req.route_args[1])
                        return (token.owner, token.server) == key

                    if what == "drop":
                        hub.add_fault(match, "drop", after=True)
                    else:
                        hub.add_fault(match, "status", code=what)
        args = ["--keep-busy-kernels=3600", "--retries=0"]
        args += ["--activity-source=kernels"] if kernels_source else []
        result = looking(hub, *args)

        assert result.exit_code in (0, 3), result.stderr
        made = {t.secret: t for t in hub.minted}
        for request in hub.requests:
            credential = (request.headers.get("Authorization") or "").partition(" ")[2]
            if request.kind == "look":
                token = made[credential]
                assert (token.owner, token.server) == request.looked_at
            else:
                assert credential == TOKEN
        for token in hub.minted:
            if token.revoked:
                continue
            said = f"revoking the token of {token.owner} for the look inside "
            lost = faulted.get((token.owner, token.server)) == ("mint", "drop")
            assert lost or f"{said}{token.owner}/{token.server}" in result.stderr
        if result.exit_code == 3:  # every look refused: nothing done
            assert "was refused (403)" in result.stderr and hub.stops == []
            return
        for user, servers in users.items():
            for name, (busy, fault) in servers.items():
                # A name holding "/" is not looked at (a proxy may decode %2F), nor given a token.
                seen = "/" not in user and (fault is None or fault[0] == "revoke")
                assert ((user, name) in hub.stops) == (not (seen and busy)), (user, name)


def test_a_look_tokens_secret_is_not_in_its_repr():
    token = idle_cull.LookToken(user="u", server="", id="a1", secret="s3cr3t-minted", lifetime=1)
    assert "s3cr3t" not in repr(token)
