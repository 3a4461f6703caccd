"""The fake Hub behaves like the real one where a culler depends on it (API notes)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import quote

import pytest
import requests
from conftest import TOKEN
from fakehub import PAGINATION_MEDIA_TYPE, iso, server

PAGED = {"Accept": PAGINATION_MEDIA_TYPE}


@pytest.fixture
def api(fake_hub):
    session = requests.Session()
    session.headers["Authorization"] = f"token {fake_hub.token}"

    def call(method, path, **kwargs):
        return session.request(method, fake_hub.url + path, timeout=10, **kwargs)

    yield call
    session.close()


def test_auth_required_except_version(fake_hub, api):
    assert requests.get(fake_hub.url + "/", timeout=10).json() == {"version": "6.1.1"}
    answer = requests.get(fake_hub.url + "/users", timeout=10)
    assert answer.status_code == 403
    assert answer.json() == {"status": 403, "message": "Missing or invalid credentials."}
    bad = requests.get(fake_hub.url + "/users", headers={"Authorization": "token no"}, timeout=10)
    assert bad.status_code == 403
    me = api("GET", "/user").json()
    assert me["kind"] == "service" and "delete:servers" in me["scopes"]
    assert "X-JupyterHub-Version" in answer.headers and "Date" in answer.headers


def test_pagination_ready_after_offset(fake_hub, api):
    # a0 ready, a1 pending only, a2 ready, a3 has no server (inactive)
    fake_hub.add_user("a0", servers={"": server()})
    fake_hub.add_user("a1", servers={"": server(ready=False, pending="spawn")})
    fake_hub.add_user("a2", servers={"x": server()})
    fake_hub.add_user("a3")

    page = api("GET", "/users?state=ready&limit=2", headers=PAGED).json()
    assert [u["name"] for u in page["items"]] == ["a0"]  # short page: a1 filtered after limit
    assert page["_pagination"]["total"] == 3  # counts active users
    nxt = page["_pagination"]["next"]
    assert nxt["offset"] == 2 and nxt["limit"] == 2
    page2 = requests.get(nxt["url"], headers={**PAGED, "Authorization": "token " + fake_hub.token})
    assert [u["name"] for u in page2.json()["items"]] == ["a2"]
    assert page2.json()["_pagination"]["next"] is None

    inactive = api("GET", "/users?state=inactive", headers=PAGED).json()
    assert [u["name"] for u in inactive["items"]] == ["a3"]
    assert api("GET", "/users?state=bogus").status_code == 400
    assert api("GET", "/users?limit=x", headers=PAGED).status_code == 400


def test_bare_list_cut_to_page_max(hub_factory):
    hub = hub_factory(page_max=3)
    hub.add_users(5)
    auth = {"Authorization": f"token {hub.token}"}
    bare = requests.get(hub.url + "/users", headers=auth, timeout=10).json()
    assert [u["name"] for u in bare] == ["user0", "user1", "user2"]
    paged = requests.get(hub.url + "/users?limit=99", headers={**auth, **PAGED}, timeout=10)
    assert paged.json()["_pagination"]["limit"] == 3

    old = hub_factory(version="1.2.0", paginate=False)
    old.add_users(5)
    old.add_user("busy", servers={"": server()})
    listing = requests.get(old.url + "/users?state=ready", headers=auth, timeout=10).json()
    assert len(listing) == 6  # state ignored, everything in one bare list


def test_stop_and_delete_rules(fake_hub, api):
    name = "a/b?c#d%e@f+g h-é"
    fake_hub.add_user(name, servers={"": server(), "gpu": server()})
    user = f"/users/{quote(name, safe='')}"

    assert api("DELETE", f"{user}").status_code == 500  # named server still running
    assert list(fake_hub.users[name]["servers"]) == ["gpu"]  # the Hub stopped the default first
    assert api("DELETE", f"{user}/server", json={"remove": True}).status_code == 400
    assert api("DELETE", f"{user}/server").status_code == 204
    assert api("DELETE", f"{user}/server").status_code == 204  # already stopped
    assert api("DELETE", f"{user}/servers/gpu").status_code == 204
    assert api("DELETE", f"{user}/servers/gpu").status_code == 204  # stopped, still exists
    assert api("DELETE", f"{user}/servers/gpu", json={"remove": True}).status_code == 204
    assert api("DELETE", f"{user}/servers/gpu").status_code == 404  # removed
    assert api("DELETE", f"{user}").status_code == 204
    assert api("DELETE", f"{user}").status_code == 404
    assert fake_hub.stops == [(name, ""), (name, "gpu")]
    assert fake_hub.removed == [(name, "gpu")]
    assert fake_hub.deleted_users == [name]
    assert fake_hub.errors == []


def test_slow_stop_and_activity(fake_hub, api):
    fake_hub.add_user("slow", last_activity=iso(9999), servers={"": server(stop_after=0)})
    fake_hub.add_user("slower", servers={"": server(stop_after=60)})
    assert api("DELETE", "/users/slow/server").status_code == 202
    assert api("DELETE", "/users/slower/server").status_code == 202
    assert api("DELETE", "/users/slower/server").status_code == 202  # still stopping
    # stop_after=0: stopped for good by the next request the hub handles
    listed = api("GET", "/users?state=active", headers=PAGED).json()["items"]
    assert [u["name"] for u in listed] == ["slower"]
    assert listed[0]["servers"][""]["pending"] == "stop"
    assert listed[0]["servers"][""]["ready"] is False
    assert fake_hub.users["slow"]["servers"] == {}
    # stopping set the user's activity to now
    activity = datetime.strptime(fake_hub.users["slow"]["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs(activity.replace(tzinfo=UTC).timestamp() - time.time()) < 5
    assert api("DELETE", "/users/slower").status_code == 400  # default server still stopping


def test_date_skew(hub_factory):
    hub = hub_factory(date_skew=-3600)
    hub_date = parsedate_to_datetime(requests.get(hub.url + "/", timeout=10).headers["Date"])
    assert abs(hub_date.timestamp() - (time.time() - 3600)) < 5
    silent = hub_factory(send_date=False)
    assert "Date" not in requests.get(silent.url + "/", timeout=10).headers


def test_faults(fake_hub, api):
    fake_hub.add_users(3)
    fake_hub.add_fault(
        ("GET", r"/users$"), "status", times=1, code=503, headers={"Retry-After": "1"}
    )
    first = api("GET", "/users")
    assert first.status_code == 503 and first.headers["Retry-After"] == "1"
    assert api("GET", "/users").status_code == 200  # times=1 used up

    fake_hub.add_fault(("GET", r"/users$"), "drop", times=1)
    with pytest.raises(requests.ConnectionError):
        api("GET", "/users")

    fake_hub.add_fault(("GET", r"/users$"), "loop_next", times=1)
    page = api("GET", "/users?limit=1&offset=2", headers=PAGED).json()
    assert page["_pagination"]["next"]["offset"] == 0

    fake_hub.add_fault(("GET", r"/users$"), "bad_model", times=1, user="user1")
    items = api("GET", "/users", headers=PAGED).json()["items"]
    assert items[1]["last_activity"] == "yesterday" and items[0]["name"] == "user0"

    fake_hub.add_fault(("GET", r"/users$"), "hang", times=1, seconds=2)
    with pytest.raises(requests.Timeout):
        requests.get(fake_hub.url + "/users", timeout=0.2)

    fake_hub.add_fault(("GET", r"/users$"), "foreign_next", times=1)
    page = api("GET", "/users?limit=1", headers=PAGED).json()
    assert page["_pagination"]["next"]["url"].startswith("http://evil.example:1/hub/api/users?")

    fake_hub.add_fault(("GET", r"/users$"), "malformed", times=1)
    with pytest.raises(ValueError):
        api("GET", "/users").json()

    assert fake_hub.faults_injected == 7


@pytest.mark.parametrize(
    "params, length, encoding",
    [
        ({"shape": "huge", "size": 300_000}, 300_000, None),
        ({"shape": "dribble", "size": 200_000, "interval": 0}, 200_000, None),
        ({"shape": "gzip", "size": 3 << 20}, 3 << 20, "gzip"),
        ({"shape": "deflate", "size": 3 << 20}, 3 << 20, "deflate"),
        ({"shape": "many", "count": 1000}, None, None),
        ({"shape": "deep", "depth": 50}, 100, None),
        ({"shape": "dicts", "size": 3001}, 3001, None),
    ],
)
def test_hostile_bodies_are_what_they_say(hub_factory, params, length, encoding):
    """Sent as generated, decoded by requests whole here (they are small): valid JSON."""
    hub = hub_factory(scopes=None)
    hub.add_user("u", servers={"": server()})
    hub.add_fault(("GET", "^/user/u/"), "hostile", **params)
    answer = requests.get(f"{hub.base_url}/user/u/api/kernels", timeout=10,
                          headers={"Authorization": f"token {hub.token}"})  # fmt: skip
    assert answer.status_code == 200
    assert answer.headers.get("Content-Encoding") == encoding
    assert length is None or len(answer.content) == length
    body = answer.json()
    if params["shape"] == "many":
        assert len(body) == 1000 and body[0]["execution_state"] == "busy"
    elif params["shape"] == "dicts":
        assert body and all(item == {} for item in body)
    elif params["shape"] != "deep":
        assert body == []


def test_a_bloated_user_model_is_theirs_alone(hub_factory):
    hub = hub_factory(scopes=None)
    for name in ("a", "b"):
        hub.add_user(name, servers={"": server()})
    hub.add_fault(lambda r: r.kind == "list", "hostile", shape="bloat", user="b", size=5000)
    answer = requests.get(f"{hub.url}/users", timeout=10,
                          headers={"Authorization": f"token {hub.token}", **PAGED})  # fmt: skip
    items = {user["name"]: user for user in answer.json()["items"]}
    assert items["b"]["servers"][""]["user_options"] == {"pad": "a" * 5000}
    assert items["a"]["servers"][""]["user_options"] == {}
    assert hub.users["b"]["servers"][""]["user_options"] == {}  # the Hub's own model unchanged


def test_a_servers_api_takes_only_a_live_token_made_for_it(hub_factory):
    """As JupyterHub 3.0+ and a single-user server: a token of the owner, for that server."""
    hub = hub_factory(scopes=["tokens!user=alice"], token_expires_in_max=60)
    hub.add_user("alice", servers={"": server(), "gpu": server()})
    hub.add_user("bob", servers={"": server()})
    culler = {"Authorization": f"token {TOKEN}"}

    def mint(user, scopes, expires_in=30):
        body = {"scopes": scopes, "expires_in": expires_in, "note": "n"}
        return requests.post(
            f"{hub.url}/users/{user}/tokens", json=body, headers=culler, timeout=10
        )

    def look(path, secret):
        headers = {"Authorization": f"token {secret}"}
        answer = requests.get(f"{hub.base_url}{path}api/kernels", headers=headers, timeout=10)
        return answer.status_code

    made = mint("alice", ["access:servers!server=alice/"])
    assert made.status_code == 201
    model = made.json()
    assert "access:servers!server=alice/" in model["scopes"] and model["user"] == "alice"
    assert look("/user/alice/", model["token"]) == 200
    assert look("/user/alice/gpu/", model["token"]) == 403  # another server of the owner
    assert look("/user/bob/", model["token"]) == 403
    assert look("/user/alice/", TOKEN) == 403  # the culler's own token
    # Refused: another user (outside tokens!user=alice), scopes the owner does not hold, too long.
    assert mint("bob", ["access:servers!server=bob/"]).status_code == 403
    assert mint("alice", ["access:servers!server=bob/"]).status_code == 400
    assert mint("alice", ["access:servers"]).status_code == 400
    too_long = mint("alice", ["access:servers!server=alice/"], expires_in=61)
    assert too_long.json()["message"] == "token expires_in: 61 must not exceed 60"
    # Revoked, then gone; an expired token is refused.
    revoke = f"{hub.url}/users/alice/tokens/{model['id']}"
    assert requests.delete(revoke, headers=culler, timeout=10).status_code == 204
    assert look("/user/alice/", model["token"]) == 403
    again = requests.delete(revoke, headers=culler, timeout=10)
    assert again.json()["message"] == f"No such token {model['id']} for user alice"
    short = mint("alice", ["access:servers!server=alice/"], expires_in=1).json()
    assert look("/user/alice/", short["token"]) == 200
    time.sleep(1.1)
    assert look("/user/alice/", short["token"]) == 403
