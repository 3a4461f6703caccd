"""A fake JupyterHub REST API on 127.0.0.1 (real HTTP), with fault injection.

It answers the few endpoints a culler uses the way JupyterHub 6 does (see
/work/shared/jupyterhub-api-notes.md), so tests exercise the real client code: sockets,
keep-alive, retries, timeouts, URL quoting and pagination.

    hub = FakeHub(token="t", scopes=CULLER_SCOPES)
    with hub:                                  # hub.url == "http://127.0.0.1:PORT/hub/api"
        hub.add_user("alice", servers={"": server(last_activity=iso(3600))})
        ...run the culler...
        assert hub.stops == [("alice", "")]

Endpoints
    GET    /hub/api/                         no auth; {"version": ...}
    GET    /hub/api/user                     the token's own model ("scopes" unless scopes=None);
                                             before 2.0: 500, as 1.x answers a service token
    GET    /hub/api/users                    state=ready|active|inactive, offset, limit, pagination
    GET    /hub/api/users/{name}             one user's model
    DELETE /hub/api/users/{name}/server      stop the default server
    DELETE /hub/api/users/{name}/servers/{s} stop a named server; body {"remove": true} deletes it
    DELETE /hub/api/users/{name}             delete a user
    POST   /hub/api/users/{name}/tokens      a token owned by {name} (needs tokens, or
                                             tokens!user=NAME / tokens!group=G); see below
    DELETE /hub/api/users/{name}/tokens/{id} revoke it (the same scope)
    GET    /user/{name}[/{server}]/api/{kernels,terminals,status}
                                             a server's own API, as the proxy passes it on:
                                             only with a live token made for that very server

Behaviour worth knowing when writing tests
- Listings show only *active* servers (running, pending or stopping), as the Hub does. A stopped
  named server is kept aside so that stopping it again answers 204 and not 404.
- ``state=ready`` is applied after offset/limit while ``total`` counts active users, so pages can
  be short or empty while ``next`` is not null (as the real Hub).
- Stopping: 204, and the server leaves the listing at once; the server's and the user's
  ``last_activity`` become "now" (hub clock). A pending spawn is stopped at once too.
  A server built with ``server(stop_after=S)`` is slow to stop: DELETE answers 202, the server
  shows ``ready: False, pending: "stop"`` and is stopped for good by the first request the hub
  handles at least S seconds later (S=0: the very next request). DELETE while stopping: 202.
- Deleting a user (as the Hub): 404 unknown; 400 if the default server is stopping (or is slow
  to stop: deleting starts its stop); else the default server is stopped, then 500 if a named
  server is running or stopping, else the user is removed (204).
- Auth: ``Authorization: token <t>`` (or ``bearer``). If ``scopes`` is a list, endpoints also
  check their scope (with admin:users / admin:servers implying the usual sub-scopes) and answer
  403 "... requires any of [scope]" like the Hub, and a user's ``created`` is shown only to a
  token with read:users (or admin:users), as the Hub shows it.
- Every answer carries ``Date`` (hub clock = local clock + date_skew; left out with
  send_date=False; ``date_header="..."`` sends that text instead, garbage included) and
  ``X-JupyterHub-Version``.
- Paths are routed as the Hub's tornado does: the pattern must match the raw path, then each
  name is percent-decoded (``%2E`` is "."; ``/servers/`` with an empty name is the default
  server; a path no route matches is the Hub's JSON 404). Errors have the Hub's messages, e.g.
  404 with message null for an unknown user, "alice has no server named 'x'" for a server.
- 204 answers carry no Content-Length (RFC 9110), every other answer does.

A server's own API (for looks inside, as through the proxy): ``hub.set_inside(user, server,
kernels=[kernel("busy", 30)], terminals=[...], last_activity=iso(...))`` sets what it shows;
unset, a ready server shows no kernels and no terminals, and its `started` as last_activity.
Its answers carry the servers' own clock in ``Date``: the hub's plus ``server_skew`` seconds.
It accepts only a token made through POST .../tokens for that server (``access:servers!server=
user/name``), not revoked and not expired: the culler's own token gets 403 there, as does a token
made for another server. Tokens (as the Hub 3.0+): the body's ``scopes`` must be
``access:servers!server={name}/...`` (else 400 "Not assigning requested scopes ..."),
``expires_in`` an integer, at most ``token_expires_in_max`` when that is set (else 400); the
answer (201) has ``id``, ``token``, ``scopes`` (with the owner's name and groups, as the Hub
adds them) and ``expires_at``. With ``narrow_tokens=False`` the fake acts as JupyterHub 2.x: it
ignores ``scopes``, answers none, and the token reaches every server of its owner. ``hub.minted``
lists every token made (MintedToken: owner, server, id, secret, note, expires_in, revoked).
A path of a server that is not running is answered like the proxy and the Hub do: by the
user's default server if it runs (404 HTML), else with a redirect to /hub/user/... (302).

Latency: ``latency=S`` adds S seconds to every request, served concurrently (a Hub far away);
with ``serial=True`` one request is served at a time (a Hub's one thread: a request waits for
those before it, so n in flight take n times as long).

Recording: ``hub.requests`` (list of Request, each with its ``received`` monotonic time),
``hub.counts`` (Counter by Request.kind), ``hub.peak_in_flight``, ``hub.deletes()``,
``hub.stops`` ((user, server) the hub actually stopped or began stopping), ``hub.removed``
(named servers deleted), ``hub.deleted_users``, ``hub.errors`` (tracebacks inside the fake
itself; should stay empty).

Faults: ``hub.add_fault(match, kind, times=None, **params)``. ``match`` is a callable taking the
Request, or a ``(method, regex)`` tuple (method None = any; the regex is searched in the unquoted
path). The first fault that matches and has uses left applies; ``times=N`` limits it to N uses so a
retry can then succeed. Kinds and their params:
    "status"       code=503, headers={} (e.g. {"Retry-After": "1"}), body=None (JSON error),
                   proxy=False (True: a proxy's own answer, without X-JupyterHub-Version)
    "hang"         seconds=5.0, then="close"|"answer": wait (longer than the client's read
                   timeout), then drop the connection, or handle the request normally
    "drop"         after=False: close the connection without answering; after=True: do the
                   work (stop, delete...), then close without answering (the answer is lost)
    "malformed"    body=b'{"items": [' : 200, Content-Type application/json, not JSON
    "loop_next"    offset=0: the listing's next link points to that (already served) offset;
                   endless=True: it always points to the following page, past the end too
    "foreign_next" base="http://evil.example:1/hub/api/users": next link on another host
    "bad_model"    user=NAME (required), model=None: that user's model in listings and
                   GET /users/NAME is replaced by `model` (default: BAD_USER_MODEL(name))
    "dribble"      interval=0.5: the whole answer (status line, headers, body) is sent one
                   byte every `interval` seconds; every read gets a byte well within any read
                   timeout, so only a bound on the whole answer ends it
    "total"        total=N: the listing's `_pagination.total` claims N users (next links stay
                   true to the real list)
    "hostile"      shape=...: a hostile body, as a user's own server (a look) or a Hub page
                   bloated by one user can send; 200, application/json (see HOSTILE_SHAPES)
    "echo"         code=500: answers with the request's Authorization header in its JSON
                   message and in a Location header, as a hostile server or a careless proxy
A fault counts a use when it applies (bad_model: when the user was in the answer). Transport
faults ("status", "hang", "drop", "malformed", "dribble", "echo") come before the auth check,
like a proxy in front of the Hub; the other kinds change an otherwise normal answer.

Hostile shapes (``hub.add_fault(match, "hostile", shape=..., ...)``), each sent as it is
generated, so that the fake never holds it whole:
    "huge"      size=800 MB: spaces, then ``[]`` (an empty kernel list, valid JSON), with its
                Content-Length
    "dribble"   the "huge" body in pieces of 64 KiB, one every `interval`=0.01 s, chunked
                (no Content-Length): every read gets bytes, only a bound on the whole ends it
    "gzip"      the "huge" body of size=2 GiB gzipped (~2 MB: members of 1 MiB each), with
                Content-Encoding: gzip
    "deflate"   the same as one raw deflate stream (~2 MB), Content-Encoding: deflate
    "many"      a kernel list of count=1,000,000 kernel models (~130 bytes each)
    "deep"      depth=1,000,000 nested lists: ``[[[...]]]``
    "dicts"     ``[{},{},...]`` of size=8 MB: few bytes, millions of objects once parsed
    "bloat"     (a listing or a user's model) user=NAME's (or a list of names: each one's) servers
                carry user_options ``{"pad": ...}`` of size=800 MB, fill="string" (``"aaa..."``)
                or "dicts" (``[{},{},...]``), as a user can set through the spawn API
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import itertools
import json
import re
import secrets
import ssl
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, unquote_to_bytes, urlencode

PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"

# The scopes the culler needs (read:users and delete:users only with --cull-users).
CULLER_SCOPES = [
    "list:users",
    "read:users:activity",
    "read:servers",
    "delete:servers",
    "read:users",
    "delete:users",
]

# Scopes that grant others, enough for the endpoints the fake serves.
_IMPLIED_BY = {
    "list:users": {"users", "admin:users"},
    "read:users:activity": {"read:users", "users", "admin:users"},
    "read:servers": {"servers", "admin:servers"},
    "delete:servers": {"servers", "admin:servers"},
    "delete:users": {"admin:users"},
    "read:users": {"users", "admin:users"},
}

FAULT_KINDS = {
    "status",
    "hang",
    "drop",
    "malformed",
    "loop_next",
    "foreign_next",
    "bad_model",
    "dribble",
    "total",
    "hostile",
    "echo",
}
HOSTILE_SHAPES = {"huge", "dribble", "gzip", "deflate", "many", "deep", "dicts", "bloat"}
_TRANSPORT_FAULTS = {"status", "hang", "drop", "malformed", "dribble", "echo"}

_DEFAULT = object()
_kernel_ids = itertools.count()


def fmt(dt: datetime) -> str:
    """Format a datetime the way JupyterHub does: UTC, microseconds, 'Z'."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso(seconds_ago: float = 0.0, skew: float = 0.0) -> str:
    """Timestamp `seconds_ago` before now (on a clock `skew` seconds ahead of the local one)."""
    return fmt(datetime.fromtimestamp(time.time() + skew - seconds_ago, UTC))


def kernel(state: str = "idle", seconds_ago: float = 0.0, **extra: Any) -> dict:
    """A kernel as a server's /api/kernels lists it: `state` busy, idle or starting, last
    active `seconds_ago`."""
    model = {
        "id": f"k{next(_kernel_ids)}",
        "name": "python3",
        "last_activity": iso(seconds_ago),
        "execution_state": state,
        "connections": 0,
    }
    model.update(extra)
    return model


def server(
    ready: bool = True,
    pending: str | None = None,
    started: Any = _DEFAULT,
    last_activity: Any = _DEFAULT,
    user_options: dict | None = None,
    stop_after: float | None = None,
    **extra: Any,
) -> dict:
    """A server model as listed by the Hub.

    Defaults: started an hour ago, last active a minute ago (active for the default timeout).
    `stop_after` makes it slow to stop (see the module docstring); `extra` adds or overrides
    fields (e.g. unknown fields, garbage values).
    """
    model = {
        "name": "",
        "ready": ready,
        "pending": pending,
        "started": iso(3600) if started is _DEFAULT else started,
        "stopped": False,
        "last_activity": iso(60) if last_activity is _DEFAULT else last_activity,
        "url": "/user/x/",
        "user_options": user_options if user_options is not None else {},
        "progress_url": "/hub/api/users/x/server/progress",
    }
    if stop_after is not None:
        model["_stop_after"] = stop_after
    model.update(extra)
    return model


def server_url(user: str, server: str = "") -> str:
    """The server model's `url`, quoted as the Hub quotes it (its base_url being /)."""
    path = f"/user/{quote(user, safe='@~')}/"
    return path + (f"{quote(server, safe='@~')}/" if server else "")


def BAD_USER_MODEL(name: str) -> dict:  # noqa: N802 - reads as a constant in tests
    """A user model a careless Hub or proxy might send: wrong types, garbage timestamps.

    Its server claims to be ready but no time in it can be read, so it must never be culled.
    """
    return {
        "kind": "user",
        "name": name,
        "admin": "no",
        "last_activity": "yesterday",
        "created": 1764110752,
        "servers": {
            "": {
                "name": "",
                "ready": True,
                "pending": None,
                "started": "25/11/2026 22:45",
                "last_activity": 12345,
                "user_options": "not-a-dict",
                "unexpected": {"nested": [1, 2]},
            }
        },
    }


@dataclass
class Request:
    """One request as the fake received it."""

    method: str
    path: str  # unquoted segments joined by "/" (a "/" inside a name is ambiguous here)
    raw_path: str  # as sent, without the query string
    segments: list[str]  # unquoted path segments, e.g. ["hub", "api", "users", "a/b", "server"]
    query: dict[str, str]  # last value of each parameter
    raw_query: str
    body: bytes
    headers: Message  # case-insensitive: headers.get("Authorization")
    # info, whoami, list, get_user, stop, delete_user, mint, revoke, look, other
    kind: str = "other"
    route_args: list[str] = field(default_factory=list)  # the route's groups, still encoded
    received: float = 0.0  # time.monotonic() when the request had been read

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def user(self) -> str:
        """The user name the Hub reads from the path (get_user, delete_user, stop)."""
        return _tornado_unquote(self.route_args[0])

    @property
    def server(self) -> str:
        """The server name the Hub reads from the path of a stop ("" is the default server)."""
        return _tornado_unquote(self.route_args[1]) if len(self.route_args) > 1 else ""

    @property
    def looked_at(self) -> tuple[str, str]:
        """(user, server) whose own API a look reaches ("" is the default server)."""
        server = self.route_args[1] if len(self.route_args) == 3 else ""
        return _tornado_unquote(self.route_args[0]), _tornado_unquote(server)


@dataclass
class MintedToken:
    """A token the fake made for a user (POST /hub/api/users/{name}/tokens)."""

    owner: str
    server: str | None  # the one server it reaches; None: every server of its owner (2.x)
    id: str
    secret: str
    note: str | None
    expires_in: int | None
    made: float  # time.monotonic()
    revoked: bool = False

    def reaches(self, user: str, server: str) -> bool:
        if self.revoked or self.owner != user:
            return False
        if self.expires_in is not None and time.monotonic() >= self.made + self.expires_in:
            return False
        return self.server is None or self.server == server


@dataclass
class Fault:
    match: Callable[[Request], bool]
    kind: str
    times: int | None
    params: dict
    hits: int = 0

    def available(self) -> bool:
        return self.times is None or self.hits < self.times


class _Answer(Exception):
    """Raised inside a handler to answer with an HTTP error."""

    def __init__(self, status: int, message: str | None):
        self.status = status
        self.message = message


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 makes a burst of new connections wait on SYN retries.
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, hub: FakeHub):
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)


class FakeHub:
    def __init__(
        self,
        version: str = "6.1.1",
        token: str = "test-token-s3cr3t",
        scopes: list[str] | None = None,
        paginate: bool = True,
        page_default: int = 50,
        page_max: int = 200,
        latency: float = 0.0,
        serial: bool = False,
        date_skew: float = 0.0,
        send_date: bool = True,
        date_header: str | None = None,
        service_name: str = "idle-cull",
        tls: ssl.SSLContext | None = None,
        server_skew: float = 0.0,
        token_expires_in_max: int = 0,
        narrow_tokens: bool = True,
    ):
        self.version = version
        self.token = token
        self.scopes = list(scopes) if scopes is not None else None
        self.paginate = paginate
        self.page_default = page_default
        self.page_max = page_max
        self.latency = latency
        # One request served at a time, as the Hub's one thread does: n in flight are answered
        # n times slower.
        self.serial = serial
        self._serving = threading.Lock()
        self.date_skew = date_skew
        self.send_date = send_date
        self.date_header = date_header  # sent as it is instead of the hub's clock
        self.service_name = service_name
        self.tls = tls  # serve HTTPS with this server-side context
        self.server_skew = server_skew  # the servers' own clock (their Date) off the Hub's
        self.token_expires_in_max = token_expires_in_max  # the Hub's setting; 0: no limit
        self.narrow_tokens = narrow_tokens  # False: new tokens ignore `scopes` (JupyterHub 2.x)

        self.users: dict[str, dict] = {}  # name -> user model, in creation order (= Hub's id)
        self.requests: list[Request] = []
        self.counts: Counter[str] = Counter()
        self.stops: list[tuple[str, str]] = []
        self.removed: list[tuple[str, str]] = []
        self.deleted_users: list[str] = []
        self.errors: list[str] = []
        self.faults: list[Fault] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.insides: dict[tuple[str, str], dict] = {}  # (user, server) -> its own API's answers
        self.minted: list[MintedToken] = []

        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._stopped_named: dict[str, set[str]] = {}  # user -> stopped (not removed) servers
        self._slow: dict[tuple[str, str], float] = {}  # (user, server) -> stop_after seconds
        self._stopping: dict[tuple[str, str], tuple[float, bool]] = {}  # -> (deadline, remove)
        # Name lists per listing state, rebuilt only after a change (not per page).
        self._generation = 0
        self._lists: dict[str | None, tuple[int, list[str]]] = {}
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._httpd = _HTTPServer(self)
        if self.tls is not None:
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # releases hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "hub not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/hub/api"

    # ---- state -----------------------------------------------------------------------------

    def now(self) -> float:
        """The hub's clock (epoch seconds)."""
        return time.time() + self.date_skew

    def iso(self, seconds_ago: float = 0.0) -> str:
        """Timestamp `seconds_ago` before now on the hub's clock."""
        return iso(seconds_ago, skew=self.date_skew)

    def add_user(
        self,
        name: str,
        admin: bool = False,
        last_activity: Any = _DEFAULT,
        created: Any = _DEFAULT,
        groups: list[str] | None = None,
        servers: dict[str, dict] | None = None,
        **extra: Any,
    ) -> dict:
        """Add a user. `created`/`groups` are left out of the model unless given (`created` is
        then shown only to a token with read:users). Servers are keyed by name ("" = default);
        their "name" field is filled in. `extra` adds or overrides model fields."""
        servers = dict(servers or {})
        model: dict[str, Any] = {"kind": "user", "name": name, "admin": admin}
        if groups is not None:
            model["groups"] = list(groups)
        if created is not _DEFAULT:
            model["created"] = created
        model["last_activity"] = iso(60) if last_activity is _DEFAULT else last_activity
        with self._lock:
            if name in self.users:
                raise ValueError(f"user {name!r} exists")
            for server_name, srv in servers.items():
                srv = dict(srv)
                srv["name"] = server_name
                if srv.get("url") == "/user/x/":  # server()'s default: where the proxy has it
                    srv["url"] = server_url(name, server_name)
                stop_after = srv.pop("_stop_after", None)
                if stop_after is not None:
                    self._slow[(name, server_name)] = stop_after
                servers[server_name] = srv
            model["servers"] = servers
            model.update(extra)
            self.users[name] = model
            self._generation += 1
        return model

    def add_users(self, count: int, prefix: str = "user", **kwargs: Any) -> None:
        """Add `count` users named prefix0, prefix1, ... with the same settings (bench)."""
        for i in range(count):
            self.add_user(f"{prefix}{i}", **kwargs)

    def set_inside(
        self,
        user: str,
        server: str = "",
        kernels: list[dict] | None = None,
        terminals: list[dict] | None = None,
        last_activity: str | None = None,
    ) -> None:
        """What the server's own API answers: kernel and terminal lists, and the
        last_activity of /api/status (default: when the server started)."""
        with self._lock:
            self.insides[(user, server)] = {
                "kernels": list(kernels or []),
                "terminals": list(terminals or []),
                "last_activity": last_activity,
            }

    def server_names(self) -> set[tuple[str, str]]:
        """(user, server) of every active server now."""
        with self._lock:
            return {(u, s) for u, m in self.users.items() for s in m.get("servers") or {}}

    def add_fault(
        self,
        match: Callable[[Request], bool] | tuple[str | None, str],
        kind: str,
        times: int | None = None,
        **params: Any,
    ) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if kind == "bad_model" and "user" not in params:
            raise ValueError("bad_model needs user=NAME")
        if kind == "hostile" and params.get("shape") not in HOSTILE_SHAPES:
            raise ValueError(f"hostile needs shape= one of {sorted(HOSTILE_SHAPES)}")
        if isinstance(match, tuple):
            method, pattern = match
            regex = re.compile(pattern)

            def match(req: Request, method: str | None = method) -> bool:
                return (method is None or req.method == method) and bool(regex.search(req.path))

        fault = Fault(match, kind, times, params)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    @property
    def faults_injected(self) -> int:
        return sum(f.hits for f in self.faults)

    def deletes(self) -> list[tuple[str, str]]:
        """(method, unquoted path) of every DELETE received, faulted or not."""
        with self._lock:
            return [(r.method, r.path) for r in self.requests if r.method == "DELETE"]

    def reset(self) -> None:
        """Forget users, faults and records (keep the settings): a fresh hub, same port."""
        with self._lock:
            self.users.clear()
            self.faults.clear()
            self.requests.clear()
            self.counts.clear()
            self.stops.clear()
            self.removed.clear()
            self.deleted_users.clear()
            self._stopped_named.clear()
            self._slow.clear()
            self._stopping.clear()
            self.insides.clear()
            self.minted.clear()
            self._generation += 1

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.counts.clear()

    # ---- internals (called by the handler with the lock held unless said otherwise) ----------

    def _take_fault(self, req: Request, kinds: set[str]) -> Fault | None:
        for fault in self.faults:
            if fault.kind in kinds and fault.available() and fault.match(req):
                return fault
        return None

    def _names(self, state: str | None) -> list[str]:
        cached = self._lists.get(state)
        if cached and cached[0] == self._generation:
            return cached[1]
        if state in ("active", "ready"):
            names = [n for n, u in self.users.items() if u["servers"]]
        elif state == "inactive":
            names = [n for n, u in self.users.items() if not u["servers"]]
        else:
            names = list(self.users)
        self._lists[state] = (self._generation, names)
        return names

    def _finish_stops(self) -> None:
        now = time.monotonic()
        for key, (deadline, remove) in list(self._stopping.items()):
            if now >= deadline:
                del self._stopping[key]
                self._stopped(*key, remove=remove)

    def _stopped(self, user_name: str, server_name: str, remove: bool) -> None:
        """The server has stopped: it leaves the listing; activity is set to now."""
        user = self.users.get(user_name)
        if user is None:
            return
        user["servers"].pop(server_name, None)
        user["last_activity"] = self.iso()
        if server_name:
            stopped = self._stopped_named.setdefault(user_name, set())
            if remove:
                stopped.discard(server_name)
                self.removed.append((user_name, server_name))
            else:
                stopped.add(server_name)
        self._generation += 1

    def _stop(self, user_name: str, server_name: str, remove: bool) -> int:
        user = self.users.get(user_name)
        if user is None:
            raise _Answer(404, None)
        active = server_name in user["servers"]
        if server_name:
            if not active and server_name not in self._stopped_named.get(user_name, ()):
                raise _Answer(404, f"{user_name} has no server named '{server_name}'")
        elif remove:
            raise _Answer(400, "Cannot delete the default server")
        key = (user_name, server_name)
        if key in self._stopping:
            if remove:
                self._stopping[key] = (self._stopping[key][0], True)
            return 202
        if not active:
            if remove:
                self._stopped(user_name, server_name, remove=True)
            return 204
        self.stops.append(key)
        if key in self._slow:
            srv = user["servers"][server_name]
            srv["ready"] = False
            srv["pending"] = "stop"
            self._stopping[key] = (time.monotonic() + self._slow[key], remove)
            return 202
        self._stopped(user_name, server_name, remove)
        return 204

    def _delete_user(self, name: str) -> int:
        user = self.users.get(name)
        if user is None:
            raise _Answer(404, None)
        stopping = _Answer(400, f"{name}'s server is in the process of stopping, please wait.")
        if (name, "") in self._stopping:
            raise stopping
        # As the Hub: stop the default server first, then refuse if a named one is active.
        if "" in user["servers"] and self._stop(name, "", remove=False) == 202:
            raise stopping
        if any(s for s in user["servers"] if s):
            raise _Answer(500, "Internal Server Error")
        del self.users[name]
        self._stopped_named.pop(name, None)
        self._generation += 1
        self.deleted_users.append(name)
        return 204

    def _holds(self, scope: str) -> bool:
        return scope in self.scopes or bool(_IMPLIED_BY.get(scope, set()) & set(self.scopes))

    def _check_scope(self, scope: str) -> None:
        if self.scopes is None or self._holds(scope):
            return
        raise _Answer(
            403, f"Action is not authorized with current scopes; requires any of [{scope}]"
        )

    def _bad_models(self, req: Request) -> dict[str, Fault]:
        """user name -> the bad_model fault that replaces its model in this answer."""
        bad: dict[str, Fault] = {}
        for fault in self.faults:
            if fault.kind == "bad_model" and fault.available() and fault.match(req):
                bad.setdefault(fault.params["user"], fault)
        return bad

    def _shown(self, model: dict) -> dict:
        """A user model as the token may see it: `created` only with read:users (the Hub's
        rule; see jupyterhub-api-notes.md)."""
        if "created" not in model or self.scopes is None or self._holds("read:users"):
            return model
        return {key: value for key, value in model.items() if key != "created"}

    def _model(self, name: str, bad: dict[str, Fault]) -> dict:
        fault = bad.get(name)
        if fault is None:
            return self._shown(self.users[name])
        fault.hits += 1
        model = fault.params.get("model")
        return BAD_USER_MODEL(name) if model is None else model

    def _list_users(self, req: Request, host: str) -> Any:
        self._check_scope("list:users")
        state = req.query.get("state")
        if _version_tuple(self.version) < (1, 3):
            state = None  # older Hubs ignore the parameter
        elif state not in (None, "ready", "active", "inactive"):
            raise _Answer(400, f"Unrecognized state filter: {state!r}")
        names = self._names(state)
        bad = self._bad_models(req)
        if not self.paginate:
            return [self._model(n, bad) for n in names]

        accepts = {
            s.strip().lower() for s in (req.headers.get("Accept") or "").split(",") if s.strip()
        }
        paginated = PAGINATION_MEDIA_TYPE in accepts
        try:
            offset = abs(int(req.query.get("offset", 0)))
            limit = abs(int(req.query.get("limit", self.page_default if paginated else 0)))
        except ValueError:
            raise _Answer(400, "Invalid argument type, offset and limit must be integers") from None
        if not paginated:
            limit = self.page_max  # bare list: silently cut
        limit = min(max(limit, 1), self.page_max)

        page = names[offset : offset + limit]
        if state == "ready":  # applied after offset/limit, as the Hub does
            page = [
                n for n in page if any(s.get("ready") for s in self.users[n]["servers"].values())
            ]
        items = (
            [self._model(n, bad) for n in page]
            if bad
            else [self._shown(self.users[n]) for n in page]
        )
        if not paginated:
            return items

        next_offset = offset + limit
        next_base = None
        loop = self._take_fault(req, {"loop_next"})
        foreign = self._take_fault(req, {"foreign_next"})
        if loop is not None:
            loop.hits += 1
            if not loop.params.get("endless"):
                next_offset = loop.params.get("offset", 0)
            next_base = f"http://{host}{req.raw_path}"
        elif foreign is not None:
            foreign.hits += 1
            next_base = foreign.params.get("base", "http://evil.example:1/hub/api/users")
        elif next_offset < len(names):
            next_base = f"http://{host}{req.raw_path}"
        nxt = None
        if next_base is not None:
            query = parse_qs(req.raw_query, keep_blank_values=True)
            query["offset"] = [str(next_offset)]
            query["limit"] = [str(limit)]
            nxt = {
                "offset": next_offset,
                "limit": limit,
                "url": f"{next_base}?{urlencode(query, doseq=True)}",
            }
        total = len(names)
        if (claim := self._take_fault(req, {"total"})) is not None:
            claim.hits += 1
            total = claim.params["total"]
        return {
            "items": items,
            "_pagination": {"offset": offset, "limit": limit, "total": total, "next": nxt},
        }

    def _token_scope_holds(self, name: str) -> None:
        """The `tokens` scope for user `name`: unfiltered, !user=name or !group=<one of theirs>."""
        if self.scopes is None:
            return
        groups = (self.users.get(name) or {}).get("groups") or []
        allowed = {"tokens", f"tokens!user={name}", *(f"tokens!group={g}" for g in groups)}
        if not allowed & set(self.scopes):
            raise _Answer(403, f"Service {name} not found or no permissions to generate tokens")

    def _mint(self, req: Request) -> dict:
        name = req.user
        self._token_scope_holds(name)
        if name not in self.users:
            raise _Answer(403, f"Service {name} not found or no permissions to generate tokens")
        try:
            body = req.json() or {}
        except ValueError:
            raise _Answer(400, "Invalid JSON in body") from None
        scopes, expires_in = body.get("scopes"), body.get("expires_in")
        if scopes is not None and not (
            isinstance(scopes, list) and all(isinstance(s, str) for s in scopes)
        ):
            raise _Answer(400, f"token scopes must be null or a list of strings, not {scopes!r}")
        if not (expires_in is None or isinstance(expires_in, int)):
            raise _Answer(400, f"token expires_in must be null or integer, not {expires_in!r}")
        if self.token_expires_in_max:
            if expires_in is None:
                expires_in = self.token_expires_in_max
            elif expires_in > self.token_expires_in_max:
                raise _Answer(
                    400,
                    f"token expires_in: {expires_in} must not exceed {self.token_expires_in_max}",
                )
        server = None
        if self.narrow_tokens:
            prefix = f"access:servers!server={name}/"
            wider = [s for s in scopes or [] if not s.startswith(prefix)]
            if wider or len(scopes or []) != 1:
                raise _Answer(
                    400, f"Not assigning requested scopes {','.join(wider)} not held by User {name}"
                )
            server = scopes[0][len(prefix) :]
        token = MintedToken(
            owner=name,
            server=server,
            id=f"a{len(self.minted) + 1}",
            secret=secrets.token_hex(16),
            note=body.get("note"),
            expires_in=expires_in,
            made=time.monotonic(),
        )
        self.minted.append(token)
        model: dict[str, Any] = {
            "user": name,
            "id": token.id,
            "kind": "api_token",
            "roles": [] if self.narrow_tokens else ["token"],
            "note": token.note,
            "token": token.secret,
        }
        if self.narrow_tokens:
            model["scopes"] = [
                f"read:users:name!user={name}",
                *scopes,
                f"read:users:groups!user={name}",
            ]
        return model

    def _revoke(self, req: Request) -> None:
        name, token_id = req.user, _tornado_unquote(req.route_args[1])
        self._token_scope_holds(name)
        if name not in self.users:
            raise _Answer(404, f"No such user: {name}")
        for token in self.minted:
            if token.id == token_id and token.owner == name and not token.revoked:
                token.revoked = True
                return
        raise _Answer(404, f"No such token {token_id} for user {name}")

    def _look_allowed(self, req: Request, name: str, server_name: str) -> bool:
        auth = (req.headers.get("Authorization") or "").split(None, 1)
        secret = auth[1] if len(auth) == 2 and auth[0].lower() in ("token", "bearer") else None
        return any(t.secret == secret and t.reaches(name, server_name) for t in self.minted)

    def _server_api(self, req: Request) -> tuple[int, bytes, dict]:
        """A server's own /api/kernels, /api/terminals or /api/status: (status, body, headers)."""
        name, server_name = req.looked_at
        user = self.users.get(name)
        running = user["servers"] if user else {}
        if server_name not in running:
            if "" in running:  # the proxy's longest match: the user's default server
                return (
                    404,
                    b"<html><title>404: Not Found</title></html>",
                    {"Content-Type": "text/html"},
                )
            return 302, b"", {"Location": f"/hub{req.raw_path}"}
        if not self._look_allowed(req, name, server_name):
            return 403, json.dumps({"message": "Forbidden", "reason": None}).encode(), {}
        server = running[server_name]
        inside = self.insides.get((name, server_name)) or {"kernels": [], "terminals": []}
        endpoint = req.route_args[-1]
        if endpoint == "status":
            body: Any = {
                "connections": 0,
                "kernels": len(inside["kernels"]),
                "last_activity": inside.get("last_activity") or server.get("started"),
                "started": server.get("started"),
            }
        else:
            body = inside[endpoint]
        return 200, json.dumps(body).encode(), {}

    def _route(self, req: Request, host: str) -> tuple[int, Any]:
        """Handle an authenticated request: (status, JSON-able body or None)."""
        if req.kind == "whoami":
            if _version_tuple(self.version) < (2, 0):
                # 1.x builds a *user* model from the token's owner; a service has no groups.
                raise _Answer(500, "Internal Server Error")
            model: dict[str, Any] = {"kind": "service", "name": self.service_name}
            if self.scopes is not None:
                model["scopes"] = list(self.scopes)
            return 200, model
        if req.kind == "list":
            return 200, self._list_users(req, host)
        if req.kind == "get_user":
            self._check_scope("read:servers")
            if req.user not in self.users:
                raise _Answer(404, None)
            return 200, self._model(req.user, self._bad_models(req))
        if req.kind == "delete_user":
            self._check_scope("delete:users")
            return self._delete_user(req.user), None
        if req.kind == "mint":
            return 201, self._mint(req)
        if req.kind == "revoke":
            self._revoke(req)
            return 204, None
        if req.kind == "stop":
            self._check_scope("delete:servers")
            try:
                body = req.json()
            except ValueError:
                raise _Answer(400, "Invalid JSON in body") from None
            remove = bool(isinstance(body, dict) and body.get("remove"))
            return self._stop(req.user, req.server, remove), None
        # The Hub's catch-all for /hub/api/ (API404), or tornado's own 404 elsewhere.
        raise _Answer(404, None)


# The Hub's routes that the fake serves (jupyterhub/apihandlers/*.py): (method, pattern, kind).
# As tornado does, a pattern must match the whole raw path, and each group is then
# percent-decoded (as UTF-8, else 400): "a%2Fb" is one name "a/b", "%2E" is ".", and
# ".../servers/" (an empty group) is the default server.
_ROUTES = [
    ("GET", re.compile(r"/hub/api/?"), "info"),
    ("GET", re.compile(r"/hub/api/user"), "whoami"),
    ("GET", re.compile(r"/hub/api/users"), "list"),
    ("GET", re.compile(r"/hub/api/users/([^/]+)"), "get_user"),
    ("DELETE", re.compile(r"/hub/api/users/([^/]+)"), "delete_user"),
    ("DELETE", re.compile(r"/hub/api/users/([^/]+)/server"), "stop"),
    ("DELETE", re.compile(r"/hub/api/users/([^/]+)/servers/([^/]*)"), "stop"),
    ("POST", re.compile(r"/hub/api/users/([^/]+)/tokens"), "mint"),
    ("DELETE", re.compile(r"/hub/api/users/([^/]+)/tokens/([^/]+)"), "revoke"),
    # Not the Hub's: a server's own API as the proxy passes it on (FakeHub._server_api).
    ("GET", re.compile(r"/user/([^/]+)/api/(kernels|terminals|status)"), "look"),
    ("GET", re.compile(r"/user/([^/]+)/([^/]+)/api/(kernels|terminals|status)"), "look"),
]


def _tornado_unquote(group: str) -> str:
    try:
        return unquote_to_bytes(group).decode("utf-8")
    except UnicodeDecodeError:
        raise _Answer(400, f"Invalid unicode in url: {group[:40]!r}") from None


def _match_route(method: str, raw_path: str) -> tuple[str, list[str]]:
    """(kind, the path's groups, still percent-encoded) of the route a request reaches."""
    for route_method, pattern, kind in _ROUTES:
        match = pattern.fullmatch(raw_path)
        if route_method == method and match:
            return kind, list(match.groups())
    return "other", []


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub behind tornado
    server_version = "TornadoServer/6.5"
    sys_version = ""
    # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms.
    disable_nagle_algorithm = True
    server: _HTTPServer
    from_proxy = False  # this answer is a proxy's own: no X-JupyterHub-Version
    # Also before _handle: a request line that cannot be parsed is answered from here.
    from_server = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # tests read hub.requests instead

    def send_response(self, code: int, message: str | None = None) -> None:
        # Like the base class, but with the hub's (possibly skewed, possibly absent) Date.
        hub = self.server.hub
        self.send_response_only(code, message)
        self.send_header("Server", self.version_string())
        if hub.date_header is not None:
            self.send_header("Date", hub.date_header)
        elif hub.send_date:
            skew = hub.server_skew if self.from_server else 0.0
            self.send_header("Date", formatdate(hub.now() + skew, usegmt=True))
        if not self.from_proxy:
            self.send_header("X-JupyterHub-Version", hub.version)

    def _send(self, status: int, body: Any = None, raw: bytes | None = None, headers=None) -> None:
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if status != 204:
            raw = raw or b""
            if "Content-Type" not in (headers or {}):
                self.send_header("Content-Type", "application/json" if raw else "text/plain")
            self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if raw and status != 204:
            self.wfile.write(raw)

    def _error(self, status: int, message: str | None, headers=None) -> None:
        self._send(status, {"status": status, "message": message}, headers=headers)

    def _drop(self) -> None:
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle()

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        hub = self.server.hub
        self.from_proxy = False
        self.from_server = False  # a server's own API answers, with the server's clock
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        raw_path, _, raw_query = self.path.partition("?")
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()  # trailing slash
        kind, groups = _match_route(self.command, raw_path)
        req = Request(
            method=self.command,
            path="/" + "/".join(segments),
            raw_path=raw_path,
            segments=segments,
            query={k: v[-1] for k, v in parse_qs(raw_query, keep_blank_values=True).items()},
            raw_query=raw_query,
            body=body,
            headers=self.headers,
            kind=kind,
            route_args=groups,
            received=time.monotonic(),
        )
        with hub._lock:
            hub.requests.append(req)
            hub.counts[req.kind] += 1
            hub.in_flight += 1
            hub.peak_in_flight = max(hub.peak_in_flight, hub.in_flight)
        try:
            with hub._serving if hub.serial else contextlib.nullcontext():
                if hub.latency:
                    time.sleep(hub.latency)  # stands for the Hub's own work
                self._respond(hub, req)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its read timeout)
        except Exception:
            hub.errors.append(traceback.format_exc())
            self._error(500, "fake hub error")
        finally:
            with hub._lock:
                hub.in_flight -= 1
            if isinstance(self.wfile, _Dribbling):
                self.wfile = self.wfile.raw
                self.close_connection = True  # the answer may have been cut short

    def _respond(self, hub: FakeHub, req: Request) -> None:
        with hub._lock:
            hub._finish_stops()
            fault = hub._take_fault(req, _TRANSPORT_FAULTS)
            if fault is not None:
                fault.hits += 1
        if fault is not None:
            p = fault.params
            if fault.kind == "status":
                code = p.get("code", 503)
                self.from_proxy = p.get("proxy", False)
                if p.get("body") is not None:
                    self._send(code, raw=p["body"], headers=p.get("headers"))
                else:
                    self._error(code, "injected fault", headers=p.get("headers"))
                return
            if fault.kind == "drop" and not p.get("after"):
                return self._drop()
            if fault.kind == "malformed":
                return self._send(200, raw=p.get("body", b'{"items": ['))
            if fault.kind == "hang":
                hub._closing.wait(p.get("seconds", 5.0))
                if p.get("then", "close") == "close":
                    return self._drop()
            if fault.kind == "echo":
                sent = req.headers.get("Authorization") or ""
                message = f"refused: you sent Authorization: {sent}"
                location = {"Location": f"/hub/login?next={sent}"}
                return self._error(p.get("code", 500), message, headers=location)
            if fault.kind == "dribble":
                self.wfile = _Dribbling(self.wfile, p.get("interval", 0.5), hub._closing)

        lose_answer = fault is not None and fault.kind == "drop"  # drop(after=True)
        if req.kind == "info":
            return self._send(200, {"version": hub.version})
        if req.kind != "look":  # a server checks a look's token itself (_server_api)
            auth = (req.headers.get("Authorization") or "").split(None, 1)
            if len(auth) != 2 or auth[0].lower() not in ("token", "bearer") or auth[1] != hub.token:
                return self._error(403, "Missing or invalid credentials.")
        with hub._lock:
            hostile = hub._take_fault(req, {"hostile"})
            if hostile is not None:
                hostile.hits += 1
                page = hub._route(req, "")[1] if hostile.params["shape"] == "bloat" else None
        if hostile is not None:
            self.from_server = req.kind == "look"
            return self._stream(*hostile_body(hostile.params, page))
        if req.kind == "look":
            self.from_server = True
            with hub._lock:
                status, raw, headers = hub._server_api(req)
            return self._send(status, raw=raw, headers=headers)
        try:
            with hub._lock:
                status, body = hub._route(req, self.headers.get("Host") or "")
                raw = json.dumps(body).encode() if body is not None else None
        except _Answer as answer:
            status, raw = answer.status, None
            if not lose_answer:
                return self._error(answer.status, answer.message)
        if lose_answer:
            return self._drop()  # the work is done, the answer is lost
        self._send(status, raw=raw)

    def _stream(self, headers: dict, length: int | None, chunks: Iterator[bytes], pause=0.0):
        """200 with a body sent as it is generated: with its length, else chunked."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        # The client cuts most of these short: the connection is not used again.
        self.close_connection = True
        closing = self.server.hub._closing
        for chunk in chunks:
            if closing.wait(pause):
                return
            if length is None:
                chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            self.wfile.write(chunk)
        if length is None:
            self.wfile.write(b"0\r\n\r\n")


MIB = 1 << 20
_KERNEL_JSON = json.dumps(
    {
        "id": "00000000-0000-0000-0000-000000000000",
        "name": "python3",
        "last_activity": "2026-11-26T12:00:00.000000Z",
        "execution_state": "busy",
        "connections": 0,
    }
).encode()


def _repeat(piece: bytes, count: int) -> Iterator[bytes]:
    """`piece` `count` times, in writes of about 64 KiB."""
    batch = max(1, 65536 // len(piece))
    for start in range(0, count, batch):
        yield piece * min(batch, count - start)


def _spaces_then_empty_list(size: int) -> Iterator[bytes]:
    yield from _repeat(b" " * 65536, (size - 2) // 65536)
    yield b" " * ((size - 2) % 65536) + b"[]"


@functools.cache
def _gzip_members() -> tuple[bytes, bytes]:
    """(a gzip member of 1 MiB of spaces, the last member: spaces ending in []) (~1 KB each)."""
    return gzip.compress(b" " * MIB), gzip.compress(b" " * (MIB - 2) + b"[]")


@functools.cache
def _deflate_blocks() -> tuple[bytes, bytes]:
    """Raw deflate: (1 MiB of spaces, flushed so that it can be repeated; the end: [])."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = squeeze.compress(b" " * MIB) + squeeze.flush(zlib.Z_FULL_FLUSH)
    return block, squeeze.compress(b" " * (MIB - 2) + b"[]") + squeeze.flush()


def _list_of(item: bytes, size: int) -> tuple[int, Iterator[bytes]]:
    """[item,item,...] padded with spaces to `size` bytes: (its length, its pieces)."""
    count = max(1, (size - 2) // (len(item) + 1))
    pad = max(0, size - count * (len(item) + 1) - 1)
    pieces = itertools.chain([b"["], _repeat(item + b",", count - 1), [item + b"]" + b" " * pad])
    return count * (len(item) + 1) + 1 + pad, pieces


def _bloated(page: Any, user: str | list[str], size: int, fill: str) -> tuple[int, Iterator[bytes]]:
    """A page (or a user's model) whose user `user` (or each of a list) carries user_options of
    `size` bytes."""
    users = [user] if isinstance(user, str) else user
    page = json.loads(json.dumps(page))  # a copy: the hub's own models stay as they are
    items = page.get("items", [page]) if isinstance(page, dict) else page
    mark = "\x00pad\x00"
    for model in items:
        if model.get("name") in users:
            for server_model in model.get("servers", {}).values():
                server_model["user_options"] = {"pad": mark}
                break
    parts = json.dumps(page).encode().split(json.dumps(mark).encode())

    def pad() -> Iterator[bytes]:
        if fill == "dicts":
            return _list_of(b"{}", size)[1]
        return itertools.chain([b'"'], _repeat(b"a", size), [b'"'])

    def pieces() -> Iterator[bytes]:
        yield parts[0]
        for part in parts[1:]:
            yield from pad()
            yield part

    length = _list_of(b"{}", size)[0] if fill == "dicts" else size + 2
    return sum(map(len, parts)) + length * (len(parts) - 1), pieces()


def hostile_body(params: dict, page: Any = None) -> tuple[dict, int | None, Iterator[bytes], float]:
    """(headers, length or None for chunked, the body's pieces, pause between pieces)."""
    shape = params["shape"]
    if shape == "bloat":
        size = params.get("size", 800_000_000)
        return {}, *_bloated(page, params["user"], size, params.get("fill", "string")), 0.0
    if shape in ("huge", "dribble"):
        size = params.get("size", 800_000_000)
        if shape == "huge":
            return {}, size, _spaces_then_empty_list(size), 0.0
        return {}, None, _spaces_then_empty_list(size), params.get("interval", 0.01)
    if shape in ("gzip", "deflate"):
        mebibytes = params.get("size", 2 << 30) // MIB
        if shape == "gzip":
            member, last = _gzip_members()
            headers = {"Content-Encoding": "gzip"}
        else:
            member, last = _deflate_blocks()
            headers = {"Content-Encoding": "deflate"}
        body = itertools.chain(_repeat(member, mebibytes - 1), [last])
        return headers, len(member) * (mebibytes - 1) + len(last), body, 0.0
    if shape == "many":
        count = params.get("count", 1_000_000)
        body = itertools.chain(
            [b"["], _repeat(_KERNEL_JSON + b", ", count - 1), [_KERNEL_JSON + b"]"]
        )
        return {}, (len(_KERNEL_JSON) + 2) * count, body, 0.0
    if shape == "deep":
        depth = params.get("depth", 1_000_000)
        return {}, 2 * depth, itertools.chain(_repeat(b"[", depth), _repeat(b"]", depth)), 0.0
    return {}, *_list_of(b"{}", params.get("size", 8_000_000)), 0.0  # "dicts"


class _Dribbling:
    """A socket writer that sends one byte at a time, `interval` seconds apart."""

    def __init__(self, raw: Any, interval: float, closing: threading.Event):
        self.raw, self.interval, self.closing = raw, interval, closing

    def write(self, data: bytes) -> int:
        for i in range(len(data)):
            if self.closing.wait(self.interval):
                raise BrokenPipeError("the hub is stopping")
            self.raw.write(data[i : i + 1])
        return len(data)

    def flush(self) -> None:
        self.raw.flush()
