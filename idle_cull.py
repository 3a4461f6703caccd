"""idle-cull: stop idle or over-age JupyterHub servers in one pass, then exit.

The file has four parts, in this order:
  1. decisions: pure functions from a user model, a policy and "now" to a plan (no I/O);
  2. the Hub client: the only place that speaks HTTP, with as many requests in flight as the
     Hub's answer times allow (Limiter: pure, fed those times);
  3. the pass: list users, plan, carry the plan out concurrently, report (warnings, metrics);
  4. the command line: parse, validate, wire the parts together.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import http.cookiejar
import importlib
import io
import itertools
import json
import logging
import math
import os
import re
import reprlib
import shlex
import signal
import socket
import ssl
import stat
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from urllib.parse import quote, unquote, urlencode, urlsplit

import click
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

__version__ = "0.1.0"

log = logging.getLogger("idle_cull")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HUB = 0, 1, 2, 3
DEFAULT_URL = "http://127.0.0.1:8081/hub/api"
PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"
# What the token must hold to see activity and stop servers, and in addition to delete users.
SERVER_SCOPES = ("list:users", "read:users:activity", "read:servers", "delete:servers")
# read:users: only it shows `created`, without which a user who never had activity has no idle
# time, and --max-age cannot apply to users.
USER_SCOPES = ("read:users", "delete:users")
GROUP_SCOPES = ("read:users:groups",)  # for group exclusions and rules
# To look inside servers (--server-api-url): each look is made with a token of the server's
# owner that reaches only that server, which the culler's token asks the Hub for.
LOOK_SCOPES = ("tokens",)
CLOCK_SKEW_WARNING = 60  # seconds
RETRY_AFTER_CAP = 30  # seconds; a proxy asking for longer must not hang a cron job
TICK = 0.2  # seconds: how soon a waiting thread notices a signal or a deadline
LOOK_TIMEOUT = 10  # seconds, at most, for a server's own API to answer a look
LOOKS_PER_SERVER = 3  # /api/kernels, /api/terminals, /api/status
LOOK_SLICE = 1000  # looks handed to the workers at a time
# Answers are read up to a cap, counted after decompression (README "Guarantees" says why these):
# a server's answer to a look holds 1,000 kernel models (~200 bytes) in 256 KiB; a Hub's answer
# 4,000 user models of 2 KB (a page is 50 by default, at most 200 unless raised) in 8 MiB.
LOOK_BYTES = 256 * 1024
LOOK_ITEMS = 1000  # kernels, or terminals, one server's answer may list
HUB_BYTES = 8 * 1024 * 1024
# json.loads makes a 64-byte dict of each 3 bytes of [{},{},...]: an answer may hold one `,`,
# `{` or `[` per 16 bytes (real ones hold one per 20 to 40), plus a few for short answers.
JSON_BYTES_PER_MARK = 16
JSON_FREE_MARKS = 1024
READ_CHUNK = 64 * 1024
# What we ask for; urllib3's decoders of these honour a read's size (2.7+). Any other encoding
# (br, zstd: bounded only with recent modules) is refused.
ACCEPT_ENCODING = "gzip, deflate"
ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
PATH_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")  # of a URL path, quoted


# ---------------------------------------------------------------------------
# 1. Decisions (pure)
# ---------------------------------------------------------------------------


def parse_time(value: object) -> datetime | None:
    """Read a JupyterHub timestamp; None when it is absent or unreadable.

    The Hub writes UTC with a trailing Z, but older Hubs and proxies may drop the zone
    or the fraction; a naive time is taken as UTC because that is what the Hub stores.
    """
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def seconds_since(value: object, now: datetime) -> float | None:
    when = parse_time(value)
    return None if when is None else (now - when).total_seconds()


@dataclass(frozen=True)
class Rule:
    """Own limits for the servers it matches: by a group of the user and/or user_options values."""

    group: str | None = None
    user_options: dict = field(default_factory=dict)
    timeout: int | None = None
    max_age: int | None = None

    def matches(self, groups: frozenset[str], server: dict) -> bool:
        if self.group is not None and self.group not in groups:
            return False
        options = server.get("user_options")
        if not isinstance(options, dict):
            options = {}
        return all(options.get(key) == value for key, value in self.user_options.items())


@dataclass(frozen=True)
class Policy:
    timeout: int = 600
    max_age: int = 0
    cull_users: bool = False
    cull_admin_users: bool = True
    cull_default_servers: bool = True
    cull_named_servers: bool = True
    remove_named_servers: bool = False
    arbiter: Callable[..., object] | None = None
    user_timeout: int | None = None  # None: the same as `timeout`
    exclude_users: frozenset[str] = frozenset()
    exclude_groups: frozenset[str] = frozenset()
    rules: tuple[Rule, ...] = ()
    warn_before: int = 0
    keep_busy_kernels: int = 0  # 0: off; else keep while a busy kernel is silent for less
    activity_source: str = "hub"  # "kernels": idle time from inside the server

    @property
    def needs_groups(self) -> bool:
        return bool(self.exclude_groups) or any(rule.group is not None for rule in self.rules)

    def limits(self, groups: frozenset[str], server: dict) -> tuple[int, int]:
        """(timeout, max_age) for a server: the first matching rule's, else the defaults."""
        for rule in self.rules:
            if rule.matches(groups, server):
                return (
                    self.timeout if rule.timeout is None else rule.timeout,
                    self.max_age if rule.max_age is None else rule.max_age,
                )
        return self.timeout, self.max_age


@dataclass(frozen=True)
class Verdict:
    cull: bool
    reason: str
    idle: float | None = None
    age: float | None = None
    error: str | None = None  # set when the verdict is "keep" because something failed
    cull_in: float | None = None  # for an active server: seconds until a limit is reached
    look: bool = False  # neither yet: what is inside the server can change it, look first
    inside: Inside | None = None  # what the look saw, when one was made (or meant)


@dataclass(frozen=True)
class Inside:
    """What a look inside a server (its own /api/kernels, /api/terminals) showed.

    With `error` set the look failed (or was not sent) and nothing else is known.
    """

    kernels: int = 0
    terminals: int | None = None  # None: not asked (only --activity-source=kernels asks)
    busy: int = 0
    silent: float | None = None  # seconds since the busy kernel heard from last did anything
    idle: float | None = None  # seconds since any kernel or terminal (with none: the server) did
    error: str | None = None


def read_inside(
    kernels: object, terminals: object, now: datetime, server_activity: object = None
) -> Inside:
    """Busy, silent and idle times from a server's kernel and terminal lists (`terminals` None:
    not asked). `server_activity`, the server's own last_activity, counts only when it has no
    kernel and no terminal. ValueError when a list or a time cannot be read: "could not see".
    """
    lists = {"kernel": kernels, "terminal": [] if terminals is None else terminals}
    silences: dict[str, list[float]] = {"kernel": [], "terminal": [], "busy": []}
    for what, items in lists.items():
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ValueError(f"the {what} list is not a list of {what}s")
        if len(items) > LOOK_ITEMS:
            raise ValueError(f"the {what} list has {len(items)} {what}s, more than {LOOK_ITEMS}")
        for item in items:
            silent = seconds_since(item.get("last_activity"), now)
            if silent is None:
                raise ValueError(f"a {what} has no readable last_activity")
            silent = max(silent, 0.0)  # the server's clock may be a little ahead of `now`
            silences[what].append(silent)
            state = item.get("execution_state") if what == "kernel" else "idle"
            if not isinstance(state, str):
                raise ValueError("a kernel has no readable execution_state")
            # "starting" (a kernel nobody ever connected to) can last forever: not busy.
            if state == "busy":
                silences["busy"].append(silent)
    times = silences["kernel"] + silences["terminal"]
    if not times and server_activity is not None:
        idle = seconds_since(server_activity, now)
        if idle is None:
            raise ValueError("the server's last_activity cannot be read")
        times = [max(idle, 0.0)]
    return Inside(
        kernels=len(kernels),
        terminals=None if terminals is None else len(terminals),
        busy=len(silences["busy"]),
        silent=min(silences["busy"], default=None),
        idle=min(times, default=None),
    )


def _seen_inside(
    hub_idle: float | None, inside: Inside, policy: Policy
) -> tuple[float | None, str]:
    """The idle time to judge a server by after a look, and what the look saw, for the reason."""
    if inside.error:
        return hub_idle, f"no look inside ({inside.error}): the Hub's activity decides"
    keep = policy.keep_busy_kernels
    seen = f"{inside.kernels} kernel(s), {inside.busy} busy"
    if inside.terminals is not None:
        seen += f", {inside.terminals} terminal(s)"
    if keep and inside.busy:
        if inside.silent < keep:
            return 0.0, f"{seen}, silent {inside.silent:.0f}s < keep-busy-kernels {keep}s"
        seen += f": stuck, silent {inside.silent:.0f}s >= keep-busy-kernels {keep}s"
    if policy.activity_source != "kernels" or inside.idle is None:
        return hub_idle, seen
    if inside.kernels or inside.terminals:
        return inside.idle, f"{seen}: idle inside {inside.idle:.0f}s"
    # Not the Hub's time: the looks themselves, through the proxy, move it every pass.
    return inside.idle, f"{seen}: the server's own last_activity, {inside.idle:.0f}s ago"


class ArbiterError(Exception):
    """The arbiter was not asked, or gave no answer in time (said by whatever runs it)."""


def _ask_arbiter(arbiter, idle: float, limit: int, server: dict) -> tuple[bool, str | None]:
    try:
        answer = arbiter(inactive=timedelta(seconds=idle), inactive_limit=limit, server=server)
    except ArbiterError as exc:
        return False, f"arbiter: {exc}"
    except Exception as exc:  # the operator's code: any failure means "keep"
        return False, f"arbiter raised {type(exc).__name__}: {exc}"
    # Upstream culls on any true value; a None, a "no" or a coroutine nobody awaited is far
    # more likely a bug in the arbiter than a wish to cull.
    if not isinstance(answer, bool):
        return False, f"arbiter answered {reprlib.repr(answer)}, not True or False"
    return answer, None


def server_verdict(
    name: str,
    server: dict,
    policy: Policy,
    now: datetime,
    groups: frozenset[str] = frozenset(),
    inside: Inside | None = None,
) -> Verdict:
    """Should this server ("" is the default server) of a user in `groups` be stopped now?

    With --keep-busy-kernels or --activity-source=kernels the answer can be "look first"
    (`look`); asked again with what the look saw (`inside`), it is a verdict.
    """
    if server.get("pending"):
        return Verdict(cull=False, reason=f"pending {server['pending']}")
    # Anything but a real true (missing, a string "false", a 1) is a state we could not read.
    if server.get("ready") is not True:
        return Verdict(cull=False, reason="not ready")
    age = seconds_since(server.get("started"), now)
    idle = _idle(server, age, now)
    if name and not policy.cull_named_servers:
        return Verdict(cull=False, reason="named servers are not culled", idle=idle, age=age)
    if not name and not policy.cull_default_servers:
        return Verdict(cull=False, reason="default servers are not culled", idle=idle, age=age)
    if idle is None and age is None:
        return Verdict(cull=False, reason="no readable last_activity or started")

    timeout, max_age = policy.limits(groups, server)
    old = bool(max_age) and age is not None and age >= max_age
    look_first = Verdict(cull=False, reason="look inside first", idle=idle, age=age, look=True)
    seen = ""
    if inside is not None:
        idle, seen = _seen_inside(idle, inside, policy)
    elif policy.activity_source == "kernels" and not old and age is not None and age >= timeout:
        return look_first  # a younger server cannot have been idle inside for the timeout
    said = f"; {seen}" if seen else ""
    error = None
    if idle is not None and policy.arbiter is not None:
        if_idle, error = _ask_arbiter(policy.arbiter, idle, timeout, server)
        why = f"arbiter: cull (idle {idle:.0f}s)"
    else:
        if_idle = idle is not None and idle >= timeout
        why = f"idle {idle:.0f}s >= timeout {timeout}s" if if_idle else ""
    if if_idle and inside is None and policy.keep_busy_kernels and not old:
        return look_first  # only a would-be stop for idleness is looked at
    if if_idle:
        return Verdict(cull=True, reason=why + said, idle=idle, age=age, inside=inside)
    if old:
        return Verdict(
            cull=True, reason=f"age {age:.0f}s >= max-age {max_age}s", idle=idle, age=age
        )

    if error:
        return Verdict(
            cull=False, reason="arbiter failed", idle=idle, age=age, error=error, inside=inside
        )
    if idle is None:
        return Verdict(
            cull=False, reason="unreadable last_activity" + said, idle=idle, age=age, inside=inside
        )
    # With an arbiter the idle limit is its call; the timeout is the best guess for a warning.
    cull_in = min(timeout - idle, max_age - age if max_age and age is not None else math.inf)
    if policy.arbiter is not None:
        reason = f"arbiter: keep (idle {idle:.0f}s)"
    else:
        reason = f"active: idle {idle:.0f}s < timeout {timeout}s"
    return Verdict(
        cull=False, reason=reason + said, idle=idle, age=age, cull_in=cull_in, inside=inside
    )


def _idle(model: dict, age: float | None, now: datetime) -> float | None:
    """Seconds idle: null activity means none yet, so idle for its whole age; a missing key
    (not shown to this token) or an unreadable time means "unknown"."""
    if "last_activity" not in model:
        return None
    activity = model["last_activity"]
    return age if activity is None else seconds_since(activity, now)


def user_verdict(user: dict, policy: Policy, now: datetime) -> Verdict:
    """Should this user, whose servers are all stopped (or about to be), be deleted?"""
    timeout = policy.timeout if policy.user_timeout is None else policy.user_timeout
    age = seconds_since(user.get("created"), now)
    idle = _idle(user, age, now)
    # A missing or odd admin flag could be an admin: only a real false lets such a user go.
    if not policy.cull_admin_users and user.get("admin") is not False:
        return Verdict(False, "admin users are not deleted", idle, age)
    if idle is not None and idle >= timeout:
        return Verdict(True, f"idle {idle:.0f}s >= user timeout {timeout}s", idle, age)
    if policy.max_age and age is not None and age >= policy.max_age:
        return Verdict(True, f"age {age:.0f}s >= max-age {policy.max_age}s", idle, age)
    if idle is None:
        return Verdict(False, "no readable last_activity or created", idle, age)
    return Verdict(False, f"active: idle {idle:.0f}s < user timeout {timeout}s", idle, age)


@dataclass(frozen=True)
class Stop:
    server: str  # "" is the default server
    remove: bool
    verdict: Verdict


@dataclass(frozen=True)
class UserPlan:
    user: str
    stops: tuple[Stop, ...] = ()
    delete: Verdict | None = None  # delete the user once every stop has finished
    kept: tuple[tuple[str | None, Verdict], ...] = ()  # what was left alone (None: the user)
    warn: tuple[tuple[str, Verdict], ...] = ()  # kept servers within --warn-before of a limit
    look: tuple[str, ...] = ()  # look inside these servers, then plan this user again

    @property
    def actionable(self) -> bool:
        return bool(self.stops or self.delete)


class GroupsHidden(Exception):
    """Group exclusions or rules are set, but the Hub does not show the user's groups."""


def user_servers(user: dict) -> dict:
    servers = user.get("servers")
    if servers is None and "servers" not in user:
        # Hubs before 0.9 without named servers describe the default server on the user,
        # with no "ready": a URL meant it was up.
        servers = {}
        if user.get("server"):
            servers[""] = {k: user.get(k) for k in ("last_activity", "pending", "started")}
            servers[""].update(url=user["server"], ready=True)
    if not isinstance(servers, dict) or not all(isinstance(s, dict) for s in servers.values()):
        raise ValueError("servers is not a mapping of server models")
    return servers


# Why a user listed without "servers" by a Hub with named servers is left alone.
SERVERS_HIDDEN = "servers not shown (is the token's read:servers filtered?)"
# Names no request can be trusted to reach: the Hub reads %2E as ".", but a proxy that parses
# URLs as browsers do (configurable-http-proxy) collapses %2E and %2E%2E segments like "." and
# "..", so ".../servers/%2E" stops the default server, "/users/%2E/server" deletes user "server".
DOT_NAMES = frozenset({".", ".."})
DOT_NAME_KEPT = "kept: a name . or .. may reach another server or user through a proxy"


def _unsendable(verdict: Verdict) -> Verdict:
    return replace(verdict, cull=False, reason=f"{verdict.reason}, but {DOT_NAME_KEPT}")


def plan_user(
    user: object,
    policy: Policy,
    now: datetime,
    insides: dict[str, Inside] | None = None,
    named_servers: bool = True,
) -> UserPlan:
    """Decide everything for one user model; ValueError when the model cannot be read.

    A plan with `look` decides nothing yet: plan again with what those looks saw (`insides`,
    by server name). `named_servers`: the Hub has them (0.9+), so it always lists `servers`.
    """
    name = user.get("name") if isinstance(user, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError("user model without a name")
    groups = user.get("groups")
    if policy.needs_groups and not isinstance(groups, list):
        raise GroupsHidden(name)
    groups = frozenset(g for g in groups or () if isinstance(g, str))
    if named_servers and "servers" not in user:
        # The Hub leaves the key out for users outside a filtered read:servers scope: not
        # "no servers" but "not shown". A user whose servers may be running is never deleted.
        return UserPlan(name, kept=((None, Verdict(cull=False, reason=SERVERS_HIDDEN)),))
    servers = user_servers(user)
    if name in policy.exclude_users or groups & policy.exclude_groups:
        return UserPlan(name, kept=((None, Verdict(False, "excluded")),))
    stops, kept, look = [], [], []
    for server_name, server in servers.items():
        inside = (insides or {}).get(server_name)
        verdict = server_verdict(server_name, server, policy, now, groups, inside)
        if verdict.look:
            look.append(server_name)
        elif verdict.cull and DOT_NAMES & {name, server_name}:
            kept.append((server_name, _unsendable(verdict)))
        elif verdict.cull:
            remove = bool(server_name) and policy.remove_named_servers
            stops.append(Stop(server_name, remove, verdict))
        else:
            kept.append((server_name, verdict))
    if look:
        return UserPlan(name, look=tuple(look))
    # The Hub refuses (500) to delete a user while a named server runs: named ones go first.
    stops.sort(key=lambda stop: stop.server == "")
    warn = tuple(
        (server_name, verdict)
        for server_name, verdict in kept
        # Not past the limit: an arbiter may keep a server beyond the timeout.
        if verdict.cull_in is not None and 0 < verdict.cull_in <= policy.warn_before
    )
    delete = None
    if policy.cull_users and not kept:
        verdict = user_verdict(user, policy, now)
        if verdict.cull and name not in DOT_NAMES:
            delete = verdict
        else:
            kept.append((None, _unsendable(verdict) if verdict.cull else verdict))
    return UserPlan(name, tuple(stops), delete, tuple(kept), warn)


def warnings_to_send(
    candidates: list[tuple[str, str]], warned: set[tuple[str, str]]
) -> tuple[list[tuple[str, str]], set[tuple[str, str]]]:
    """Which (user, server) in the warning window to warn now, and which were warned already.

    A server is warned once per stay in the window: it is remembered while it stays there and
    forgotten once it leaves (culled, or active again), so a later stay warns again.
    """
    new = [key for key in candidates if key not in warned]
    return new, {key for key in candidates if key in warned}


def missing_scopes(identity: dict, needed: tuple[str, ...]) -> list[str]:
    """Scopes in `needed` that the token's own model lacks; none when the Hub lists no scopes."""
    scopes = identity.get("scopes") if isinstance(identity, dict) else None
    if not isinstance(scopes, list):
        return []  # Hubs before 2.0 have no scopes to check
    # A filtered scope ("delete:servers!group=x") still grants the action on some users.
    held = {scope.split("!", 1)[0] for scope in scopes if isinstance(scope, str)}
    return [scope for scope in needed if scope not in held]


def hub_version(version: object) -> tuple[int, int] | None:
    """(major, minor) of a JupyterHub version string; None when it cannot be read."""
    match = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return None if match is None else (int(match[1]), int(match[2]))


def holds_unfiltered(identity: dict, scope: str) -> bool:
    """Does the token hold `scope` for everyone (not only "!user=..." etc.)? Yes when the Hub
    lists no scopes."""
    scopes = identity.get("scopes") if isinstance(identity, dict) else None
    return not isinstance(scopes, list) or scope in scopes


def holds_no_more(granted: object, asked: str, owner: str) -> bool:
    """Does a new token, by the scopes the Hub says it holds, hold no more than `asked`? It may
    also read things of its owner: the Hub adds their name and groups (their own, `!user=`)."""
    return isinstance(granted, list) and all(
        scope == asked
        or (
            isinstance(scope, str)
            and scope.startswith("read:")
            and scope.endswith(f"!user={owner}")
        )
        for scope in granted
    )


def has_named_servers(version: object) -> bool:
    """JupyterHub 0.9 added named servers, and with them `servers` in every user model."""
    parsed = hub_version(version)
    return parsed is None or parsed >= (0, 9)


def supports_state_filter(version: object) -> bool:
    """JupyterHub 1.3 added ?state=ready|inactive to the user list."""
    parsed = hub_version(version)
    return parsed is None or parsed >= (1, 3)


def pages_users(version: object) -> bool:
    """JupyterHub 2.0 lists users a page at a time (?offset, ?limit, `_pagination`)."""
    parsed = hub_version(version)
    return parsed is None or parsed >= (2, 0)


def has_scopes(version: object) -> bool:
    """JupyterHub 2.0 brought scopes. An unreadable version is checked as if it had them:
    a missing scope must never go unnoticed (and a Hub without scopes passes the check)."""
    parsed = hub_version(version)
    return parsed is None or parsed >= (2, 0)


def narrows_tokens(version: object) -> bool:
    """JupyterHub 3.0 made a new token hold only the scopes asked for; 2.x ignores them and
    gives it every permission of its owner. An unreadable version is let through: the scopes
    the Hub says each new token holds are checked too."""
    parsed = hub_version(version)
    return parsed is None or parsed >= (3, 0)


# ---------------------------------------------------------------------------
# 2. The Hub client: every HTTP request goes through here
# ---------------------------------------------------------------------------


class HubError(Exception):
    """A request to the Hub failed. The message names what failed and never holds the token.

    A request that got no usable answer also has `failure` (why, and what to check) and `url`.
    """

    def __init__(
        self, message: str, *, failure: Failure | None = None, what: str = "", url: str = ""
    ):
        super().__init__(message)
        self.failure, self.what, self.url = failure, what, url

    def explained(self) -> str:
        """The message with the URL and what to check, for the line that ends a pass."""
        if self.failure is None:
            return str(self)
        text = f"{self.what} at {self.url}{str(self)[len(self.what) :]}"
        return f"{text}; {self.failure.hint}" if self.failure.hint else text

    def fields(self) -> dict:
        """The failure as JSON log fields (none when it is not a request's)."""
        return {} if self.failure is None else self.failure.fields(self.url)


@dataclass(frozen=True)
class Failure:
    """Why a request got no usable answer, as an operator reads it: `cause` is a fixed key
    (for logs and tests), `words` say what happened, `hint` what to check (None: nothing)."""

    cause: str
    words: str
    hint: str | None = None
    status: int | None = None  # of the answer, when there was one

    def fields(self, url: str) -> dict:
        """For JSON log lines (FAILURE_LOG_FIELDS), about a request to `url`."""
        return {
            "cause": self.cause,
            "url": _shown_url(url),
            "status": self.status,
            "hint": self.hint,
        }


# OpenSSL's X509_V_ERR_* codes for a certificate that no CA at hand vouches for.
TLS_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27})
TLS_EXPIRED, TLS_NOT_YET_VALID, TLS_NAME_MISMATCH = 10, 9, frozenset({62, 64})
TOKEN_HINT = (
    "check the token (JUPYTERHUB_API_TOKEN or --api-token-file) and the scopes of its role "
    "(README: The token and its scopes)"
)
API_HINT = "check that --url is the Hub's API, ending in /hub/api"
# What each option that names a URL reaches.
ORIGINS = {"--url": "the Hub", "--server-api-url": "the proxy", "--pushgateway": "the Pushgateway"}
PROXY_HINT = "a proxy in front of the Hub answered: check that the Hub runs, and the proxy's log"


def explain_error(
    error: BaseException, url: str, timeout: float, option: str = "--url", cut: bool = False
) -> Failure:
    """Why a request to `url` got no answer, from the first cause an operator can act on in
    `error` (and all it wraps). `option` names the URL's origin (one of ORIGINS); `cut`: the
    watchdog ended the attempt at its deadline."""
    host, where = _host_and_port(url)
    thing = ORIGINS[option]
    chain = _chain(error)

    def first(*types: type) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    if first(requests.exceptions.ProxyError, urllib3.exceptions.ProxyError) and not cut:
        return Failure(
            "proxy",
            f"no connection to {where} through the proxy the environment names",
            "check the proxy, and HTTPS_PROXY, HTTP_PROXY and NO_PROXY in the environment",
        )
    # urllib3's NewConnectionError is a ConnectTimeoutError too, whatever the failure was.
    if not cut and any(
        isinstance(e, urllib3.exceptions.ConnectTimeoutError)
        and not isinstance(e, urllib3.exceptions.NewConnectionError)
        for e in chain
    ):
        return Failure(
            "connect_timeout",
            f"no connection to {where} within {timeout:g}s",
            f"check {option}'s address, and any firewall between here and {thing}",
        )
    if cut or first(urllib3.exceptions.ReadTimeoutError, requests.ReadTimeout, TimeoutError):
        hint = (
            "the Hub is slow or stuck: check its load and log, or raise --request-timeout"
            if option == "--url"
            else None
        )
        return Failure("timeout", f"no whole answer within {timeout:g}s", hint)
    if cert := first(ssl.SSLCertVerificationError):
        return _certificate_failure(cert, host, where, option, thing)
    if tls := first(ssl.SSLError):
        reason = (tls.reason or "failed").lower().replace("_", " ")
        hint = (
            f"{where} may speak plain HTTP: check the scheme of {option} (http:// or https://)"
            if tls.reason == "WRONG_VERSION_NUMBER"
            else f"check the scheme of {option} and the TLS options (--ca-bundle, --ssl-enabled)"
        )
        return Failure("tls", f"the TLS handshake with {where} failed ({reason})", hint)
    if dns := first(socket.gaierror):
        return Failure(
            "dns",
            f"host {host} not found by DNS ({dns.strerror or 'no address'})",
            f"check the host name in {option}, and this machine's DNS",
        )
    if first(ConnectionRefusedError):
        return Failure(
            "refused",
            f"connection refused by {where}",
            f"check that {thing} runs and that {option} has its address and port",
        )
    closed_hint = f"check {thing}'s log, and any proxy or load balancer between here and it"
    if first(http.client.RemoteDisconnected):
        return Failure("closed", f"{where} closed the connection without answering", closed_hint)
    if first(http.client.BadStatusLine):  # RemoteDisconnected is one too: first things first
        return Failure(
            "not_http", f"{where} does not answer in HTTP", f"check the port in {option}"
        )
    if first(ConnectionError, http.client.HTTPException, urllib3.exceptions.ProtocolError):
        return Failure(
            "closed", f"the connection to {where} broke before the whole answer", closed_hint
        )
    if system := next((e for e in chain if isinstance(e, OSError) and e.strerror), None):
        return Failure(
            "network",
            f"no connection to {where} ({system.strerror})",
            f"check {option}'s address, and this machine's network",
        )
    return Failure("other", "the request failed (--log-level=debug says why)")


def _certificate_failure(
    cert: ssl.SSLCertVerificationError, host: str, where: str, option: str, thing: str
) -> Failure:
    code, fixed_elsewhere = cert.verify_code, "--ca-bundle cannot fix this"
    if code in TLS_UNTRUSTED:
        return Failure(
            "tls_untrusted",
            f"the TLS certificate of {where} is not trusted ({cert.verify_message})",
            "give --ca-bundle the CA that issued it",
        )
    if code in TLS_NAME_MISMATCH:
        return Failure(
            "tls_name",
            f"the TLS certificate of {where} is not for {host}",
            f"use in {option} a name the certificate is for, or give {thing} a certificate "
            f"for {host} ({fixed_elsewhere})",
        )
    if code == TLS_EXPIRED:
        return Failure(
            "tls_expired",
            f"the TLS certificate of {where} has expired",
            f"renew it, or check this machine's clock ({fixed_elsewhere})",
        )
    if code == TLS_NOT_YET_VALID:
        return Failure(
            "tls_not_yet_valid",
            f"the TLS certificate of {where} is not valid yet",
            f"check this machine's clock, or the certificate's start date ({fixed_elsewhere})",
        )
    return Failure(
        "tls",
        f"the TLS certificate of {where} is refused ({cert.verify_message})",
        "check the certificate, and --ca-bundle",
    )


def explain_answer(
    status: int,
    message: str,
    *,
    html: bool = False,
    is_json: bool = True,
    from_hub: bool = True,
    location: str | None = None,
    option: str = "--url",
) -> Failure:
    """Why an answer is not the one wanted: its status, or (for a 2xx) its body. `message` is
    the Hub's own (or the status's reason phrase), `from_hub` whether the Hub said it (its
    X-JupyterHub-Version header), `option` as for explain_error; hints are for the Hub only."""
    hub = option == "--url"
    words = f"HTTP {status} {message}".rstrip()
    if hub and not from_hub and status >= 300:
        words += ", not from the Hub"

    def failure(cause: str, words: str, hint: str | None) -> Failure:
        return Failure(cause, words, hint if hub else None, status)

    if 300 <= status < 400:
        return failure(
            "redirect", f"{words} (to {location or '?'})", f"{API_HINT}; redirects are not followed"
        )
    if status in (401, 403):
        return failure("token", words, TOKEN_HINT)
    if status == 404:
        return failure("not_found", words, API_HINT)
    if status == 429:
        return failure(
            "rate_limited",
            words,
            "the Hub or a proxy in front of it limits requests: lower --concurrency",
        )
    if status >= 500:
        return failure("server_error", words, "check the Hub's log" if from_hub else PROXY_HINT)
    if status >= 400:
        return failure("http", words, None)
    if html:
        return failure(
            "html",
            f"an HTML page (HTTP {status}), not JSON",
            "check that --url reaches the Hub's API itself (ending in /hub/api), not a login "
            "page or a proxy's",
        )
    if not is_json:
        return failure("not_json", f"the answer is not JSON (HTTP {status})", API_HINT)
    return failure("unexpected", f"{words}, not an answer the Hub gives", API_HINT)


def _host_and_port(url: str) -> tuple[str, str]:
    """The host of a URL, and host:port (never a user:password@ in front)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _shown_url(url: str) -> str:
    """A URL for logs: without a user:password@ that --url may hold."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and every exception it wraps: requests and urllib3 nest the cause deep."""
    found: list[BaseException] = []
    todo = [error]
    while todo:
        exc = todo.pop(0)
        if any(exc is seen for seen in found):
            continue
        found.append(exc)
        inner = [*exc.args, getattr(exc, "reason", None), exc.__cause__, exc.__context__]
        todo += [e for e in inner if isinstance(e, BaseException)]
    return found


def _failed(
    what: str, url: str, failure: Failure, retried: int = 0, cls: type[HubError] | None = None
) -> HubError:
    after = f" (after {retried} retr{'y' if retried == 1 else 'ies'})" if retried else ""
    return (cls or HubError)(
        f"{what}: {failure.words}{after}", failure=failure, what=what, url=_shown_url(url)
    )


def _answer_failed(
    response: requests.Response,
    what: str,
    *secrets: str,
    is_json: bool = True,
    option: str = "--url",
    cls: type[HubError] | None = None,
) -> HubError:
    """The error for an answer that is not the one wanted (see explain_answer), with `secrets`
    (the tokens the request carried) blotted out of what it shows of the answer."""
    headers = response.headers
    failure = explain_answer(
        response.status_code,
        _message(response, *secrets),
        html=headers.get("Content-Type", "").lower().startswith("text/html"),
        is_json=is_json,
        from_hub="X-JupyterHub-Version" in headers,
        location=redact(headers.get("Location", "?"), *secrets)[:100],
        option=option,
    )
    # urllib3 hands each attempt's answer the retries made before it.
    retried = len(getattr(getattr(response.raw, "retries", None), "history", ()))
    return _failed(what, response.url, failure, retried, cls)


def redact(text: str, *secrets: str) -> str:
    """Tokens blotted out, should the Hub, a proxy or a server ever echo one back in a message.

    Before any text is cut: a cut through a token would leave a piece no later pass finds.
    """
    for secret in secrets:
        if secret:
            # Also as JSON would escape it, for the JSON logs and report.
            text = text.replace(secret, "[token]").replace(json.dumps(secret)[1:-1], "[token]")
    return text


class Abandoned(HubError):
    """The pass ended (--max-runtime or a signal) before the request had its whole answer."""

    def __init__(self, message: str, *, sent: bool):
        super().__init__(message)
        self.sent = sent  # False: never sent, so the Hub did nothing; True: it may have acted


class _Gate:
    """Says whether a request may start: not after a stop signal or past the deadline."""

    def __init__(self, stop: threading.Event, max_runtime: float):
        self.stop = stop
        self.deadline = time.monotonic() + max_runtime if max_runtime else None

    def why_closed(self) -> str | None:
        if self.stop.is_set():
            return "stopped by a signal"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "--max-runtime reached"
        return None

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake when the gate closes."""
        self.stop.wait(max(0.0, min(seconds, self.time_left())))


_this_thread = threading.local()  # .flight: the call to the Hub this thread is making


class _Flight:
    """One call to the Hub as the watchdog sees it: the connection of the attempt under way."""

    def __init__(self, what: str, timeout: float, gate: _Gate, lock: threading.Lock):
        self.what, self.timeout, self.gate, self.lock = what, timeout, gate, lock
        self.conn = None  # None between attempts: the connection is back in the pool
        self.deadline = math.inf
        self.sent = False
        self.timed_out = False  # the watchdog cut the last attempt at its deadline
        self.retried = 0
        # What a retry line says: set by _send.
        self.method, self.url, self.option = "", "", "--url"
        self.once = False  # no retry once the request may have been sent (_CappedRetry)

    def attempt(self, conn) -> None:
        """An attempt (the first, or a retry) sends its request on `conn`."""
        if reason := self.gate.why_closed():
            raise self.abandoned(reason)  # no request starts after the deadline or a signal
        with self.lock:
            self.conn, self.deadline = conn, time.monotonic() + self.timeout
            self.sent, self.timed_out = True, False

    def between_attempts(self) -> None:
        with self.lock:
            self.conn = None

    def cut_if_due(self, now: float) -> None:
        """Shut the connection past the attempt's deadline or the gate (the lock is held)."""
        if self.conn is None:
            return
        closed = self.gate.why_closed()
        if closed is None and now < self.deadline:
            return
        # Said before the shutdown: the call wakes from it and at once asks why.
        sock, self.conn, self.timed_out = self.conn.sock, None, closed is None
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, TLS or not: it wakes a read blocked on it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def abandoned(self, reason: str) -> Abandoned:
        if self.sent:
            return Abandoned(f"{self.what}: abandoned in flight: {reason}", sent=True)
        return Abandoned(f"{self.what}: not sent: {reason}", sent=False)


class _Watchdog:
    """Ends calls that outlive their attempt's deadline or their gate, by shutting their socket.

    A read timeout bounds each read only: a Hub (or a proxy) that sends its answer a byte at a
    time never reaches it. Shutting the socket from this thread wakes the read, however slow.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.flights: set[_Flight] = set()
        self.closed = threading.Event()
        self.thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, what: str, timeout: float, gate: _Gate) -> Iterator[_Flight]:
        flight = _Flight(what, timeout, gate, self.lock)
        if reason := gate.why_closed():
            raise flight.abandoned(reason)
        with self.lock:
            self.flights.add(flight)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="idle-cull-watchdog")
                self.thread.daemon = True
                self.thread.start()
        _this_thread.flight = flight
        try:
            yield flight
        finally:
            _this_thread.flight = None
            with self.lock:
                self.flights.discard(flight)

    def close(self) -> None:
        self.closed.set()

    def _run(self) -> None:
        # A look every TICK: waking it for each new call would cost more than it saves.
        while not self.closed.wait(TICK):
            with self.lock:
                now = time.monotonic()
                for flight in self.flights:
                    flight.cut_if_due(now)


class _WatchedConnection:
    """Mixed into urllib3's connections: tells the watchdog which connection a call uses."""

    def request(self, *args, **kwargs):
        if flight := getattr(_this_thread, "flight", None):
            flight.attempt(self)
        return super().request(*args, **kwargs)


_WATCHED = {
    cls: type(f"Watched{cls.__name__}", (_WatchedConnection, cls), {})
    for cls in (urllib3.connection.HTTPConnection, urllib3.connection.HTTPSConnection)
}


class _WatchedAdapter(HTTPAdapter):
    def get_connection_with_tls_context(self, *args, **kwargs):
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        # A SOCKS proxy brings its own connection class: that keeps the per-read timeout only.
        pool.ConnectionCls = _WATCHED.get(pool.ConnectionCls, pool.ConnectionCls)
        return pool


class _CappedRetry(Retry):
    """urllib3's retries, each said in one line of ours (urllib3's own are DEBUG details),
    waiting on the pass's gate, and for a Retry-After up to RETRY_AFTER_CAP."""

    def increment(self, method=None, url=None, response=None, error=None, *args, **kwargs):
        retry = self
        # A certificate that cannot be verified now will not be in a second either.
        if error is not None and any(
            isinstance(e, ssl.SSLCertVerificationError) for e in _chain(error)
        ):
            retry = self.new(total=0)
        return super(_CappedRetry, retry).increment(method, url, response, error, *args, **kwargs)

    def _is_method_retryable(self, method: str) -> bool:
        # A request sent `once` is tried again only when it never reached the Hub.
        flight = getattr(_this_thread, "flight", None)
        return not (flight and flight.once) and super()._is_method_retryable(method)

    def sleep(self, response=None) -> None:
        flight = _this_thread.flight
        asked = None
        if response is not None and (header := response.headers.get("Retry-After")):
            # Unreadable (a proxy's garbage): the backoff, as if there were none.
            with contextlib.suppress(urllib3.exceptions.InvalidHeader, ValueError, OverflowError):
                asked = super().parse_retry_after(header)
        delay = min(asked, RETRY_AFTER_CAP) if asked else self.get_backoff_time()
        flight.retried = attempt = len(self.history)
        if not flight.gate.why_closed():  # else no retry will be sent
            self._say(flight, response, attempt, delay, asked)
        # The last attempt's connection is back in the pool, maybe already another call's.
        flight.between_attempts()
        flight.gate.sleep(delay)

    def _say(self, flight: _Flight, response, attempt: int, delay: float, asked) -> None:
        error = self.history[-1].error
        if error is not None:
            failure = explain_error(
                error, flight.url, flight.timeout, flight.option, cut=flight.timed_out
            )
        else:
            try:
                phrase = HTTPStatus(response.status).phrase
            except ValueError:
                phrase = ""
            failure = explain_answer(
                response.status,
                phrase,
                from_hub="X-JupyterHub-Version" in response.headers,
                option=flight.option,
            )
        retries = self.total + attempt  # each retry took one from the total
        honoured = ""
        if asked:
            capped = f", capped at {RETRY_AFTER_CAP}s" if asked > RETRY_AFTER_CAP else ""
            honoured = f" (Retry-After: {asked:.0f}s{capped})"
        log.warning(
            "%s %s: %s; retry %d of %d in %.1fs%s",
            flight.method,
            urlsplit(flight.url).path,
            failure.words,
            attempt,
            retries,
            delay,
            honoured,
            extra={
                "event": "retry",
                **failure.fields(flight.url),
                "attempt": attempt,
                "retries": retries,
                "delay_s": round(float(delay), 1),
                "retry_after_s": asked,
            },
        )


# A round trip whose answers took (by their upper median) LIMIT_FAST times the fastest of their
# kind or less shows a Hub that is not queueing; LIMIT_SLOW times or more, one that is.
LIMIT_FAST = 1.25
LIMIT_SLOW = 1.5
# The first request goes alone (the first page tells how many there are); then two. Until the
# Hub first queues, the limit is multiplied by SLOW_START each round (2, 8, 32).
LIMIT_START = 1
SLOW_START = 4
# After a try of two that made the Hub queue, the next try waits PATIENCE_FIRST rounds (a busy
# moment passes; and the listing's pages, which cost the Hub twice what a stop does, are mostly
# read by then), then each one PATIENCE_GROWTH times as many: a Hub that twice served two no
# faster than one serves one at a time, and each try costs its users one request's wait (a pass
# of 500 stops: tried twice, once at the start; with eightfold waits, three times, and a user's
# p99 was up to 2.2x upstream's).
PATIENCE_FIRST = 32
PATIENCE_GROWTH = 512


class Limiter:
    """How many requests may be in flight to the Hub, from how long it takes to answer them.

    JupyterHub serves its API from one thread: requests beyond the one it is serving wait in its
    queue, in front of its users' own clicks, and are answered no sooner. Each answer is compared
    with the fastest of its kind (the same request and status, so that a page of users is never
    compared with a stop; the first of a kind is not judged), and the limit is judged once per
    round: the first `limit` requests sent after the last verdict, once all of them are answered
    (or more than half of them slow):
    - their upper median within LIMIT_FAST times the fastest, the limit in use: it grows,
      fourfold until the Hub first queues (slow start: the first request alone, then 2, 8, 32),
      then by one every `patience` rounds; `patience` is 32 once one more made the Hub queue so
      that the limit fell back to 1, and 512 times as long after each next such try, so that a
      Hub that serves one at a time is tried with two twice in a pass of thousands of requests.
      Once one more does not make it queue, patience is 1 again (past where it last queued:
      there it keeps the patience it had) and growth fourfold, up to one short of where the Hub
      last queued;
    - LIMIT_SLOW times or more: the Hub is queueing. After one round trip with one request alone
      (the fastest of a kind first seen beside others may itself have waited), the limit is
      divided by that factor: n requests in flight at a Hub that serves one at a time are
      answered about n times slower, so it comes back to about 1.
    A lost answer (none, 429 or 5xx) is slow. Requests that cost the Hub next to nothing (its
    version: 0.7 ms of its CPU, the token's own model: 2.6 ms, where a stop takes 21 ms) are
    held to the ceiling only, and not judged. Fixed, the limit is the ceiling. No clock and no
    I/O: the Hub client tells it, under its own lock, what it sends and how long each answer took.
    """

    def __init__(self, ceiling: int, fixed: bool = False):
        self.ceiling, self.fixed = ceiling, fixed
        self.limit = ceiling if fixed else min(LIMIT_START, ceiling)
        self.in_flight = 0
        self.cheap_in_flight = 0
        self.sent_under: dict[int, int] = {}  # requests sent under each limit
        self._fastest: dict[object, float] = {}
        # A round is the first `limit` requests sent after the last verdict; only they are judged,
        # and only once all of them are answered: on a real Hub a page sent later can overtake
        # one that waits, and judging the first answers to come would miss the one that waited.
        self._round = 0
        self._members = 0  # requests sent in this round
        self._answered = 0  # of them, answered
        self._ratios: list[float] = []  # this round's answers, over the fastest of their kind
        # How many were in flight when each of them was sent: only a round whose requests were
        # in flight together shows that the limit does not make the Hub queue (two sent one
        # after the other need not wait for each other).
        self._sent_with: list[int] = []
        self._slow_start = True
        self._fast_rounds = 0
        self._patience = 1
        self._tried = True  # the limit is one not yet judged (the start)
        self._resume = 0  # the limit to go back to after a round alone
        self._queued_at = ceiling + 1  # the limit under which the Hub last queued

    def may_send(self, cheap: bool = False) -> bool:
        within = self.in_flight + self.cheap_in_flight < self.ceiling
        return within and (cheap or self.in_flight < self.limit)

    def sent(self, cheap: bool = False) -> int | None:
        """A request is sent: its ticket, to be given back with its answer."""
        if cheap:
            self.cheap_in_flight += 1
            return None
        self.in_flight += 1
        self.sent_under[self.limit] = self.sent_under.get(self.limit, 0) + 1
        if self._members == self.limit:
            return -1  # past this round's members: not judged
        self._members += 1
        self._sent_with.append(self.in_flight)
        return self._round

    def answered(self, ticket: int | None, kind: object, seconds: float | None):
        """The answer to a request of `kind` came after `seconds` (math.inf: it was lost; None:
        the request was cut short and says nothing about the Hub)."""
        if ticket is None:
            self.cheap_in_flight -= 1
            return
        self.in_flight -= 1
        if self.fixed:
            return
        ratio = None if seconds is None else self._ratio(kind, seconds)
        if ticket != self._round:
            return  # sent before the last verdict, or past this round's members
        self._answered += 1
        if ratio is not None:
            self._ratios.append(ratio)
        # More than half of them slow decides it before the rest have come: they would only have
        # kept more of ours in the Hub's queue.
        slow = sum(each >= LIMIT_SLOW for each in self._ratios)
        if self._answered < self.limit and slow < self.limit - self.limit // 2:
            return
        if self._ratios:
            self._judge(sorted(self._ratios)[len(self._ratios) // 2])
        elif self.limit == 1 and self._slow_start:
            # The pass's first request went alone and was the first of its kind: it shows
            # nothing, and so nothing against two.
            self.limit = min(2, self.ceiling)
        self._round += 1
        self._members = self._answered = 0
        self._ratios, self._sent_with = [], []

    def _ratio(self, kind: object, seconds: float) -> float | None:
        """`seconds` over the fastest answer of `kind` so far; None for the first of its kind."""
        if seconds == math.inf:
            return math.inf
        fastest = self._fastest.get(kind)
        self._fastest[kind] = seconds if fastest is None else min(fastest, seconds)
        if fastest is None:
            return None
        return seconds / self._fastest[kind] if self._fastest[kind] > 0 else 1.0

    def _judge(self, slowness: float) -> None:
        # Growth takes a round that used the limit: in slow start, one of its requests was sent
        # with half of it in flight, and at least two (one alone shows nothing about two); for
        # a try of one more, all of them with it full.
        if self._slow_start:
            most = max(self._sent_with)
            in_use = 2 * most >= self.limit and most >= min(2, self.limit)
        else:
            in_use = min(self._sent_with) >= self.limit
        if self._resume:
            # The round alone is over: its answers waited for no one of ours.
            self.limit = self._resume if slowness < LIMIT_SLOW else 1
            self._resume = 0
        elif slowness >= LIMIT_SLOW:
            self._resume = max(1, min(self.limit - 1, int(self.limit / slowness)))
            self._queued_at = self.limit
            self.limit = 1
            self._slow_start, self._fast_rounds = False, 0
            if self._tried and self._resume == 1:
                self._patience = (
                    PATIENCE_GROWTH * self._patience if self._patience > 1 else PATIENCE_FIRST
                )
            self._tried = False
        elif slowness <= LIMIT_FAST and in_use:
            if self._tried:
                # One more works: quickly back to just short of where the Hub last queued. Where
                # it queued, one round trip may have been a quiet moment: going on from there
                # takes the patience it had.
                if self.limit != self._queued_at:
                    self._patience = 1
                self._slow_start = self.limit + 1 < self._queued_at
            self._fast_rounds += 1
            self._tried = False
            if self.limit < self.ceiling and (
                self._slow_start or self._fast_rounds >= self._patience
            ):
                if self._slow_start:
                    self.limit = min(SLOW_START * self.limit, self._queued_at - 1)
                    self._slow_start = self.limit + 1 < self._queued_at
                else:
                    self.limit = min(self.ceiling, self.limit + 1)
                self._fast_rounds, self._tried = 0, True

    def used(self) -> dict:
        """For the report: the limit most requests were sent under, and the least and most."""
        counts = self.sent_under or {self.limit: 0}
        return {
            "ceiling": self.ceiling,
            "fixed": self.fixed,
            "settled": max(counts, key=lambda limit: (counts[limit], -limit)),
            "least": min(counts),
            "most": max(counts),
        }


class HubClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        concurrency: int = 10,
        request_timeout: float = 60,
        retries: int = 3,
        verify: bool | str = True,
        cert: tuple[str, str] | None = None,
    ):
        self.base = url.rstrip("/")
        self.timeout = request_timeout
        # Set for each pass: past it no request starts, and none in flight is used.
        self.gate = _Gate(threading.Event(), 0)
        # Set for each pass too: how many requests may be in flight (at most `concurrency`).
        self.limiter = Limiter(concurrency)
        self._permits = threading.Condition()
        self.watchdog = _Watchdog()
        self._clock_anchor: tuple[datetime, float] | None = None
        self._clock_lock = threading.Lock()
        retry = _CappedRetry(
            total=retries,
            backoff_factor=0.5,
            backoff_jitter=0.5,
            backoff_max=RETRY_AFTER_CAP,
            # Only idempotent requests are repeated: a list, or the stop/delete of a named thing.
            allowed_methods=frozenset({"GET", "DELETE"}),
            status_forcelist=(429, 500, 502, 503, 504),
            respect_retry_after_header=True,
            raise_on_status=False,
            redirect=False,
        )
        # pool_block keeps connections (and so requests in flight) at `concurrency`.
        adapter = _WatchedAdapter(pool_maxsize=concurrency, max_retries=retry, pool_block=True)
        self.session = requests.Session()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.cert = cert
        # The token goes only to the Hub: a header of the Hub's own requests, never the
        # session's, which also carries the looks inside servers (with their owners' tokens).
        self.secret = token
        self._auth = {"Authorization": f"token {token}"}
        # No cookies: one that a user's server sets would go with every later request to the
        # proxy (other users' looks, the Hub behind it), and a big one would make them fail.
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.session.headers["User-Agent"] = f"idle-cull/{__version__}"
        self.session.headers["Accept-Encoding"] = ACCEPT_ENCODING
        # The environment (proxies, REQUESTS_CA_BUNDLE) is read once here, not on every request
        # (a tenth of the CPU of a large pass), and ~/.netrc can never replace the token.
        self.session.trust_env = False
        self.session.proxies = requests.utils.get_environ_proxies(self.base)
        if verify is True:
            verify = (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            )
        self.session.verify = verify

        # requests re-quotes a URL (turning %2E back into ".") and collapses "." and ".."
        # segments: requests are prepared with the base as requests spells it, then sent with
        # the path exactly as `_segment` built it.
        self._wire_base = requests.Request("GET", self.base).prepare().url.rstrip("/")

    def close(self) -> None:
        self.watchdog.close()
        self.session.close()

    def redact(self, text: str) -> str:
        return redact(text, self.secret)

    def _request(
        self,
        method: str,
        path: str,
        what: str,
        params: dict | None = None,
        headers: dict | None = None,
        kind: str | None = None,
        cheap: bool = False,
        **kwargs,
    ) -> requests.Response:
        """A request to the Hub, sent once the limiter has room for it. `kind` names what it
        asks for (with the answer's status, what the limiter compares like with like); `cheap`:
        it costs the Hub next to nothing, and is held to the ceiling only."""
        url = self._wire_base + path
        headers = {**self._auth, **(headers or {})}
        limiter = self.limiter  # the answer goes back to it, should a new pass have begun
        with self._permits:
            while not limiter.may_send(cheap) and not self.gate.why_closed():
                self._permits.wait(TICK)
            ticket = limiter.sent(cheap)
        started = time.monotonic()
        answer, seconds = None, math.inf  # lost, unless an answer comes
        try:
            response = _send(
                self, method, url, what, self.timeout, params, headers=headers, **kwargs
            )
            status = response.status_code
            if status != 429 and status < 500:
                answer = (kind or method, status)
                seconds = time.monotonic() - started
        except Abandoned:
            seconds = None  # cut short by the end of the pass: it says nothing about the Hub
            raise
        finally:
            with self._permits:
                limiter.answered(ticket, answer, seconds)
                # Wake as many as may now start, not all (one thread switch each); a cheap
                # request that is not woken looks again within a TICK.
                self._permits.notify(max(1, limiter.limit - limiter.in_flight))
        self._note_hub_date(response)
        return response

    def _json(self, response: requests.Response, what: str) -> object:
        if not 200 <= response.status_code < 300:
            raise _answer_failed(response, what, self.secret)
        try:
            return _parse_json(response.content)
        except _Unreadable as exc:
            raise _unreadable(response, what, exc) from None
        except ValueError:
            raise _answer_failed(response, what, self.secret, is_json=False) from None

    def _note_hub_date(self, response: requests.Response) -> None:
        if self._clock_anchor is not None:
            return
        try:
            hub_time = parsedate_to_datetime(response.headers["Date"])
        except (KeyError, TypeError, ValueError, IndexError, OverflowError):
            return
        if hub_time.tzinfo is None:
            return
        with self._clock_lock:
            if self._clock_anchor is None:
                self._clock_anchor = (hub_time, time.monotonic())

    def clocks(self) -> tuple[datetime | None, datetime]:
        """(the Hub's time, None when it sent no readable Date; this machine's time).

        The Hub's is the Date header of its first answer advanced by our monotonic clock.
        """
        local = datetime.now(UTC)
        if self._clock_anchor is None:
            return None, local
        hub_time, anchor = self._clock_anchor
        try:
            return hub_time + timedelta(seconds=time.monotonic() - anchor), local
        except OverflowError:  # a Date at the end of year 9999 is no clock
            return None, local

    def now(self) -> datetime:
        """The earlier of the Hub's clock and ours: a culler may cull late, never early.

        Ours alone culls early when this machine's clock is fast; the Hub's alone when a proxy
        or ingress with a fast clock rewrites the Date header. The header has one-second
        resolution and is truncated, which errs towards culling later too.
        """
        hub, local = self.clocks()
        return local if hub is None else min(hub, local)

    def clock_skew(self) -> float | None:
        """Seconds by which our clock is ahead of the Hub's, when the Hub told its time."""
        hub, local = self.clocks()
        return None if hub is None else (local - hub).total_seconds()

    def info(self) -> dict:
        what = "reading the Hub's version"
        model = self._json(self._request("GET", "/", what, kind="version", cheap=True), what)
        return model if isinstance(model, dict) else {}

    def identity(self) -> dict:
        what = "reading the token's own model"
        model = self._json(self._request("GET", "/user", what, kind="identity", cheap=True), what)
        return model if isinstance(model, dict) else {}

    def list_users(self, state: str | None, offset: int, limit: int) -> tuple[list, dict | None]:
        """One page of users, and its pagination info (None from a Hub that does not page)."""
        params = {"offset": offset}
        if limit:
            params["limit"] = limit
        if state:
            params["state"] = state
        what = f"listing users (state={state or 'any'}, offset={offset})"
        answer = self._json(
            self._request(
                "GET",
                "/users",
                what,
                params=params,
                kind=f"list {state}",
                headers={"Accept": PAGINATION_MEDIA_TYPE},
            ),
            what,
        )
        if isinstance(answer, list):
            return answer, None
        if isinstance(answer, dict) and isinstance(answer.get("items"), list):
            pagination = answer.get("_pagination")
            return answer["items"], pagination if isinstance(pagination, dict) else None
        raise HubError(f"{what}: unexpected answer (neither a list nor a page of items)")

    def stop_server(self, user: str, server: str, remove: bool) -> str:
        """Stop (and with `remove`, delete) a server: 'done', 'stopping' (202) or 'gone' (404)."""
        if server:
            path = f"/users/{_segment(user)}/servers/{_segment(server)}"
            what = f"stopping server {user}/{server}"
            # The Hub's 404s for an unknown user, and for a user without that named server.
            gone = (*HUB_NOT_FOUND, f"{user} has no server named '{server}'")
        else:
            path = f"/users/{_segment(user)}/server"
            what = f"stopping the default server of {user}"
            gone = HUB_NOT_FOUND
        body = {"remove": True} if remove else None
        response = self._request("DELETE", path, what, kind="stop", json=body)
        return self._action_result(response, what, gone)

    def server_active(self, user: str, server: str) -> bool:
        """Is the server still running or stopping? (The Hub lists only active servers.)"""
        what = f"looking at user {user}"
        response = self._request("GET", f"/users/{_segment(user)}", what, kind="user")
        if _is_hub_404(response, HUB_NOT_FOUND):
            return False  # the user is gone, and so is the server
        model = self._json(response, what)
        servers = model.get("servers") if isinstance(model, dict) else None
        if not isinstance(servers, dict):
            raise HubError(f"{what}: unreadable user model")
        return server in servers

    def delete_user(self, user: str) -> str:
        what = f"deleting user {user}"
        response = self._request("DELETE", f"/users/{_segment(user)}", what, kind="delete_user")
        return self._action_result(response, what, HUB_NOT_FOUND)

    def look_token(self, user: str, server: str, lifetime: int) -> LookToken:
        """A new token of `user` that reaches only this server of theirs, for `lifetime` seconds;
        LookFailed (with the Hub's status) when the Hub makes none, or a wider one."""
        where = f"{user}/{server}"  # the Hub's name for a server; "alice/" is the default one
        asked = f"access:servers!server={where}"
        what = f"making a token of {user} to look inside {where}"
        body = {"scopes": [asked], "expires_in": lifetime, "note": f"idle-cull look at {where}"}
        made = f"a token made, if any, expires in {lifetime}s"
        try:
            response = self._request(
                "POST", f"/users/{_segment(user)}/tokens", what, kind="make_token", json=body
            )
        except HubError as exc:  # the Hub may have made it and lost the answer
            raise HubError(f"{exc}; {made}", failure=exc.failure, what=what, url=exc.url) from None
        if response.status_code != 201:
            raise _answer_failed(response, what, self.secret, cls=LookFailed)
        try:
            answer = _parse_json(response.content)
        except ValueError:
            answer = None
        answer = answer if isinstance(answer, dict) else {}
        secret, token_id = answer.get("token"), answer.get("id")
        if not (isinstance(secret, str) and secret and isinstance(token_id, str) and token_id):
            words = f"an answer without a token and its id ({made})"
            raise _failed(
                what, response.url, Failure("unexpected", words, status=201), 0, LookFailed
            )
        token = LookToken(user=user, server=server, id=token_id, secret=secret, lifetime=lifetime)
        if not holds_no_more(answer.get("scopes"), asked, user):
            try:
                self.revoke_token(token)
                fate = "revoked"
            except HubError as exc:
                fate = f"not sent anywhere; {exc}"
            words = f"the Hub made a token wider than asked ({fate})"
            raise _failed(
                what, response.url, Failure("unexpected", words, status=201), 0, LookFailed
            )
        return token

    def revoke_token(self, token: LookToken) -> None:
        what = f"revoking the token of {token.user} for the look inside {token.user}/{token.server}"
        path = f"/users/{_segment(token.user)}/tokens/{_segment(token.id)}"
        # Sent once: the Hub gives a revoked token's id to the next token it makes, and a retry
        # after a lost answer could revoke a token its owner has made since.
        response = self._request("DELETE", path, what, kind="revoke_token", once=True)
        # 404: gone already (expired, or revoked by its owner).
        gone = (f"No such token {token.id} for user {token.user}",)
        if response.status_code != 204 and not _is_hub_404(response, gone):
            raise _answer_failed(response, what, self.secret)

    def _action_result(self, response: requests.Response, what: str, gone: tuple) -> str:
        if response.status_code == 202:
            return "stopping"
        if _is_hub_404(response, gone):
            return "gone"  # already stopped or deleted: what we wanted
        # The Hub answers 204. A redirect or a proxy's 200 page (a login form) stopped nothing.
        if response.status_code == 204 or (response.status_code == 200 and not response.content):
            return "done"
        raise _answer_failed(response, what, self.secret)


# JupyterHub's message in a 404 for a user that does not exist: null (6.x), or tornado's reason
# phrase (older Hubs).
HUB_NOT_FOUND = (None, "Not Found")


def _segment(name: str) -> str:
    """A name as one path segment that reaches that name: "/" and "." too.

    quote() leaves "." as it is, and "." or ".." as a whole segment is collapsed by URL
    normalisation (a server "." of alice would become alice's default server).
    """
    quoted = quote(name, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _is_hub_404(response: requests.Response, messages: tuple) -> bool:
    """A 404 that the Hub itself gave about the object asked for, in one of `messages`.

    A proxy's 404 (no X-JupyterHub-Version, an HTML page) or any other message is not proof
    that the object is gone: it is a failure, never "done".
    """
    if response.status_code != 404 or "X-JupyterHub-Version" not in response.headers:
        return False
    try:
        body = _parse_json(response.content)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == 404 and body.get("message") in messages


class LookFailed(HubError):
    """A look inside a server did not answer 200 JSON, or was not sent."""

    @property
    def status(self) -> int | None:
        """The HTTP status of the answer, if there was one."""
        return self.failure.status if self.failure else None


@dataclass(frozen=True)
class LookToken:
    """A token of a server's owner that reaches only that server, made for its looks."""

    user: str
    server: str
    id: str
    secret: str = field(repr=False)
    lifetime: int  # seconds


class ServerClient:
    """Looks inside single-user servers (GET <server>/api/...) through the proxy.

    It shares the Hub client's session: connection pools, retries and TLS settings, but not the
    Hub's token: each look carries a token of the server's owner (HubClient.look_token). A look
    goes only to --server-api-url's scheme, host and port, never follows a redirect, and is
    judged as the Hub's answers are.
    """

    def __init__(self, hub: HubClient, url: str, timeout: float, retries: int):
        self.hub = hub
        parts = urlsplit(url)
        # As requests spells it (lower case, IDNA): looks are sent as built, like the Hub's.
        self.origin = requests.Request("GET", f"{parts.scheme}://{parts.netloc}").prepare().url
        self.origin = self.origin.rstrip("/")
        self.timeout = timeout
        # The session's proxies are the Hub's; the environment may say otherwise for this host.
        self.proxies = requests.utils.get_environ_proxies(self.origin)
        # A server's token must last through every attempt of its looks; it is revoked as soon
        # as they end, so its lifetime bounds only a token whose revoke failed.
        self.token_lifetime = math.ceil(LOOKS_PER_SERVER * (1 + retries) * timeout)

    def api_url(self, server_url: object, endpoint: str) -> str:
        """<server>/api/<endpoint> under --server-api-url, or LookFailed if that is unsafe."""
        path = server_url if isinstance(server_url, str) else ""
        shown = self.hub.redact(repr(server_url))[:100]
        parts = urlsplit(path)
        segments = [unquote(segment) for segment in parts.path.split("/")]
        # A full URL (another host), "//host/...", "..", a query, a character that is not
        # quoted: not a server's own path.
        if not path.startswith("/") or parts.netloc or not PATH_CHARACTERS.fullmatch(path):
            raise LookFailed(f"the server's url {shown} is not a path")
        # A proxy may decode %2F or %5C and then collapse: "..%2Falice" is alice's.
        if any(s in (".", "..") or "/" in s or "\\" in s for s in segments):
            raise LookFailed(
                f"the server's url {shown} has a segment that is . or .. or holds / or \\ "
                "once decoded: it could reach another server"
            )
        url = f"{self.origin}{path.rstrip('/')}/api/{endpoint}"
        if not url.startswith(self.origin + "/"):
            raise LookFailed(f"the server's url {shown} leaves --server-api-url")
        return url

    def get(
        self, server_url: object, endpoint: str, what: str, token: LookToken
    ) -> tuple[object, datetime | None]:
        """The JSON answer and the server's Date, asked with `token`; LookFailed for anything
        but 200 JSON, HubError when it cannot be had (whole, within LOOK_BYTES, in time)."""
        response = _send(
            self.hub,
            "GET",
            self.api_url(server_url, endpoint),
            what,
            self.timeout,
            # The server's own clock stays still; the proxy still counts the look as activity.
            {"no_track_activity": "1"},
            proxies=self.proxies,
            option="--server-api-url",
            cap=LOOK_BYTES,
            secret=token.secret,
            headers={"Authorization": f"token {token.secret}"},
        )
        failed = functools.partial(
            _answer_failed,
            response,
            what,
            self.hub.secret,
            token.secret,
            option="--server-api-url",
            cls=LookFailed,
        )
        if response.status_code != 200:
            raise failed()
        try:
            answer = _parse_json(response.content)
        except _Unreadable as exc:
            raise _unreadable(response, what, exc, LookFailed) from None
        except ValueError:
            raise failed(is_json=False) from None
        try:
            date = parsedate_to_datetime(response.headers["Date"])
        except (KeyError, TypeError, ValueError, IndexError):
            date = None
        return answer, date if date is not None and date.tzinfo is not None else None


def _send(
    hub: HubClient,
    method: str,
    url: str,
    what: str,
    timeout: float,
    params: dict | None = None,
    proxies: dict | None = None,
    option: str = "--url",
    cap: int = HUB_BYTES,
    secret: str = "",
    once: bool = False,
    **kwargs,
) -> requests.Response:
    """One request on the Hub client's session, sent with the URL as built, redirects not
    followed, each attempt's whole answer within `timeout` (see _Watchdog) and its body (in
    `.content`) within `cap` bytes once decoded; every failure a HubError naming `what` and
    why (see explain_error; `option` names the URL's origin),
    Abandoned once the client's gate has closed. `secret`: a token besides the Hub's that the
    request carries (blotted out too); `once`: not sent again once it may have reached the Hub."""
    url += f"?{urlencode(params)}" if params else ""
    # requests re-quotes a URL (turning %2E back into ".") and collapses "." and ".."
    # segments: the request is prepared, then sent with the URL exactly as built.
    prepared = hub.session.prepare_request(requests.Request(method, url, **kwargs))
    prepared.url = url
    sending = {} if proxies is None else {"proxies": proxies}
    with hub.watchdog.watch(what, timeout, hub.gate) as flight:
        flight.method, flight.url, flight.option = method, url, option
        flight.once = once
        try:
            response = hub.session.send(
                prepared, timeout=timeout, allow_redirects=False, stream=True, **sending
            )
            # Read here, where the watchdog still watches the connection.
            cut = _read_body(response, cap, option)
        except requests.RequestException as exc:
            if reason := hub.gate.why_closed():
                raise flight.abandoned(reason) from None
            details = _details(exc, hub.secret, secret)
            log.debug("%s %s failed: %s", method, _shown_url(url), details)
            failure = explain_error(exc, url, timeout, option, cut=flight.timed_out)
            raise _failed(what, url, failure, flight.retried) from None
        if reason := hub.gate.why_closed():
            raise flight.abandoned(reason)  # an answer after the deadline is not used
    if cut:
        raise _failed(what, url, cut)
    return response


def _read_body(response: requests.Response, cap: int, option: str) -> Failure | None:
    """Read the body, decoded, into `response.content`; or say why not (it is over `cap` bytes,
    or in an encoding not asked for). The connection goes back to the pool, or is closed."""
    with response:
        encodings = response.headers.get("Content-Encoding", "").lower()
        if not {coding.strip() for coding in encodings.split(",")} <= ENCODINGS:
            words = f"the answer is encoded as {encodings[:40]!r}, which was not asked for"
            return Failure("unreadable", words, status=response.status_code)
        body = bytearray()
        # Each read decodes at most READ_CHUNK bytes: a gzip bomb is cut as it inflates.
        for chunk in response.iter_content(READ_CHUNK):
            body += chunk
            if len(body) > cap:
                hint = "lower --api-page-size (README: How a pass decides)"
                return Failure(
                    "too_large",
                    f"the answer is over {_size(cap)}: not read",
                    hint if option == "--url" else None,
                    response.status_code,
                )
        response._content = bytes(body)  # where requests keeps `.content` once it has read it
    return None


def _size(count: int) -> str:
    return f"{count // 1024**2} MiB" if count >= 1024**2 else f"{count // 1024} KiB"


class _Unreadable(ValueError):
    """JSON that is not parsed: more values than its size allows, or nested too deep."""


def _parse_json(body: bytes) -> object:
    """The JSON value of an answer; ValueError when it is not JSON, _Unreadable (saying why)
    when it is not parsed.

    Before json.loads, the `,`, `{` and `[` (one before each value but the first, counted in
    strings too) are held to the answer's size: a few MB of [{},{},...] is millions of dicts.
    """
    marks = body.count(b",") + body.count(b"{") + body.count(b"[")
    if marks > JSON_FREE_MARKS + len(body) // JSON_BYTES_PER_MARK:
        raise _Unreadable(f"holds {marks} JSON values in {len(body)} bytes, more than a real one")
    try:
        return json.loads(body)
    except RecursionError:
        raise _Unreadable("is JSON nested too deep to read") from None


def _unreadable(
    response: requests.Response, what: str, exc: _Unreadable, cls: type[HubError] | None = None
) -> HubError:
    failure = Failure("too_complex", f"the answer {exc}", status=response.status_code)
    return _failed(what, response.url, failure, cls=cls)


def _message(response: requests.Response, *secrets: str) -> str:
    try:
        message = _parse_json(response.content).get("message")
    except (ValueError, AttributeError):
        message = None
    if message:
        return redact(str(message), *secrets)[:200]
    return redact(response.reason or "", *secrets)


def _details(exc: BaseException, *secrets: str) -> str:
    """Each exception `exc` wraps, by class: for DEBUG lines."""
    return redact(" <- ".join(f"{type(e).__name__}: {e}" for e in _chain(exc)), *secrets)[:1000]


# ---------------------------------------------------------------------------
# 3. The pass
# ---------------------------------------------------------------------------

NOTIFY_TIMEOUT = 30  # seconds one --notify-command may take
PUSH_TIMEOUT = 10  # seconds for each read (and the connection) of a push to --pushgateway
# The environment --notify-command gets (and LC_*): what finds programs, the user, the language.
NOTIFY_ENV = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR"})
# Users per page of the listing: the Hub builds a page in one go, its one thread held meanwhile
# (9 ms plus 0.3 ms a user of its CPU; a stop takes 21 ms), so a user waits behind a page of 50
# about as long as behind a stop (README: How many requests at once).
PAGE_SIZE = 50
STOP_POLL_INTERVAL = 1.0  # seconds between looks at a server that is stopping
ABANDON_GRACE = 2.0  # seconds a cut-short pass waits for the requests it cut to say so


@dataclass
class Outcome:
    action: str  # "stop", "remove" or "delete_user"
    user: str
    server: str
    verdict: Verdict
    result: str  # done, stopping, gone, failed, planned, skipped
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "action": self.action,
            "user": self.user,
            "server": self.server,
            "reason": self.verdict.reason,
            "idle_s": _round(self.verdict.idle),
            "age_s": _round(self.verdict.age),
            "result": self.result,
            "error": self.error,
            "inside": _inside_dict(self.verdict.inside),
        }


def _inside_dict(inside: Inside | None) -> dict | None:
    """What a look saw, for --json and the JSON logs; None when there was no look."""
    if inside is None:
        return None
    return {
        "kernels": None if inside.error else inside.kernels,
        "terminals": inside.terminals,
        "busy": None if inside.error else inside.busy,
        "silent_s": _round(inside.silent),
        "idle_s": _round(inside.idle),
        "error": inside.error,
    }


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


@dataclass
class Report:
    dry_run: bool = False
    users_scanned: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings_sent: int = 0
    fatal: str | None = None  # the Hub could not be used at all
    fatal_fields: dict = field(default_factory=dict)  # why, for JSON logs (HubError.fields)
    incomplete: str | None = None  # stopped early by --max-runtime or a signal
    duration: float = 0.0
    kept: list[dict] | None = None  # only when asked for: one entry per server or user kept
    servers_hidden: int = 0  # users listed without their servers (SERVERS_HIDDEN)
    clocks: dict[str, datetime | None] = field(default_factory=dict)  # "hub" and "local"
    concurrency: dict = field(default_factory=dict)  # Limiter.used(): requests in flight

    def count(self, actions: tuple[str, ...], results: tuple[str, ...]) -> int:
        return sum(1 for o in self.outcomes if o.action in actions and o.result in results)

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes if o.result == "failed") + len(self.errors)

    @property
    def exit_code(self) -> int:
        if self.fatal:
            return EXIT_HUB
        return EXIT_FAILED if self.failures or self.incomplete else EXIT_OK

    def summary(self) -> dict:
        done = ("planned",) if self.dry_run else ("done", "gone")
        return {
            "users_scanned": self.users_scanned,
            "servers_stopped": self.count(("stop", "remove"), done),
            "servers_stopping": self.count(("stop", "remove"), ("stopping",)),
            "named_servers_removed": self.count(("remove",), done),
            "users_deleted": self.count(("delete_user",), done),
            "warnings_sent": self.warnings_sent,
            "failures": self.failures,
        }

    def as_dict(self) -> dict:
        errors = [self.fatal] if self.fatal else []
        if self.incomplete:
            errors.append(self.incomplete)
        return {
            "ok": self.exit_code == EXIT_OK,
            "exit_code": self.exit_code,
            "dry_run": self.dry_run,
            "duration_s": round(self.duration, 3),
            "summary": self.summary(),
            "actions": [o.as_dict() for o in self.outcomes],
            "kept": self.kept or [],
            # The pass's "now" is the earlier of the two (null: the Hub sent no readable Date).
            "clocks": {key: when and when.isoformat() for key, when in self.clocks.items()},
            "concurrency": self.concurrency,
            "errors": errors + self.errors,
        }


@dataclass(frozen=True)
class PassSettings:
    concurrency: int = 10  # the most requests in flight to the Hub
    fixed_concurrency: bool = False  # always that many, whatever the Hub's answer times
    page_size: int = 0  # 0: the Hub's default
    dry_run: bool = False
    max_runtime: float = 0
    wait_for_stop: float = 0
    notify_command: tuple[str, ...] = ()
    state_file: str | None = None
    report_kept: bool = False  # for --json: what was left alone, and why
    dry_run_looks: bool = False  # a dry run sends the looks too (they count as activity)


class Progress:
    """What a pass tells about its progress; the terminal's bar overrides these."""

    def start(self, label: str, length: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


class _ArbiterLoop:
    """Calls the operator's arbiter on an event loop in a thread of its own, for one pass.

    Sync and async arbiters both run there, inside a running loop as upstream runs them; an
    awaitable answer (a coroutine, an asyncio or a concurrent future) is awaited. The caller
    waits at most `timeout` seconds, and not past the gate's closing (--max-runtime, a
    signal); then the call is cancelled and ArbiterError raised. After one such timeout the
    arbiter is not asked again in this pass: a loop stuck in a sync arbiter would make every
    later call wait the whole timeout too.
    """

    def __init__(self, arbiter: Callable[..., object], timeout: float, gate: _Gate):
        import asyncio  # only a pass with an arbiter pays for it

        self.arbiter, self.timeout, self.gate = arbiter, timeout, gate
        self.gave_up: str | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="idle-cull-arbiter", daemon=True
        )
        self.thread.start()

    async def _answer(self, kwargs: dict) -> object:
        import asyncio
        import inspect

        answer = self.arbiter(**kwargs)
        if isinstance(answer, Future):
            answer = asyncio.wrap_future(answer)
        if inspect.isawaitable(answer):
            answer = await answer
        return answer

    def __call__(self, **kwargs) -> object:
        import asyncio

        if self.gave_up:
            raise ArbiterError(f"not asked: {self.gave_up}")
        if reason := self.gate.why_closed():
            raise ArbiterError(f"not asked: {reason}")
        future = asyncio.run_coroutine_threadsafe(self._answer(kwargs), self.loop)
        deadline = time.monotonic() + self.timeout
        while not future.done():
            left = deadline - time.monotonic()
            reason = self.gate.why_closed() or (
                None if left > 0 else f"no answer within {self.timeout:g}s"
            )
            if reason:
                future.cancel()
                self.gave_up = f"{reason} (earlier in this pass)"
                raise ArbiterError(reason)
            wait([future], timeout=min(left, TICK))
        return future.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(1)
        if not self.thread.is_alive():  # else stuck in the arbiter: left to die with us
            self.loop.close()


@contextlib.contextmanager
def _arbiter_on_a_loop(policy: Policy, timeout: float, gate: _Gate) -> Iterator[Policy]:
    """The policy, with its arbiter (if any) called through an _ArbiterLoop for this pass."""
    if policy.arbiter is None:
        yield policy
        return
    arbiter = _ArbiterLoop(policy.arbiter, timeout, gate)
    try:
        yield replace(policy, arbiter=arbiter)
    finally:
        arbiter.close()


def _next_offset(pagination: dict, client: HubClient) -> int | None:
    """The offset of the next page, checking that the link stays on our Hub."""
    following = pagination.get("next")
    if not following:
        return None
    if not isinstance(following, dict) or not isinstance(following.get("offset"), int):
        raise HubError(f"unreadable pagination link {client.redact(repr(following))[:100]}")
    link = following.get("url")
    if link:
        ours, theirs = urlsplit(client.base), urlsplit(link)
        if theirs.netloc and (theirs.scheme, theirs.netloc) != (ours.scheme, ours.netloc):
            raise HubError(f"the next page is on another host ({theirs.netloc}); not followed")
    return following["offset"]


def list_user_pages(
    client: HubClient,
    state: str | None,
    settings: PassSettings,
    pool: ThreadPoolExecutor,
    gate: _Gate,
    errors: list[str],
    first: tuple[list, dict | None],
) -> Iterator[tuple[list, int | None]]:
    """(page of user models, total from the first page) as pages arrive.

    Failures after the first page (`first`, already fetched) go to `errors`. Later pages are
    fetched concurrently, a few more requests than workers at a time (so no worker waits for
    this thread), up to where the Hub's pages say the list ends: the least `total` a page
    claimed, or a page without `next`. A wild `total` costs only the pages the Hub really
    serves. Offsets are only stable while nothing is stopped, so the caller acts after the
    listing.
    """
    items, pagination = first
    total = pagination.get("total") if pagination else None
    yield items, total if isinstance(total, int) else None
    if pagination is None:
        return  # a Hub that does not page answered with everyone
    limit = pagination.get("limit")
    if not (isinstance(limit, int) and limit > 0 and isinstance(total, int)):
        shown = client.redact(repr(pagination))[:100]
        errors.append(f"listing users (state={state}): unreadable pagination {shown}")
        return
    end = _list_end(total, pagination, 0, limit)
    following, seen, pending, not_fetched = limit, {0}, {}, 0
    last_offset, last_pagination = 0, pagination
    while True:
        while len(pending) < 2 * settings.concurrency and following < end:
            if gate.why_closed():
                break
            pending[pool.submit(_read_page, client, state, following, limit, errors)] = following
            seen.add(following)
            following += limit
        if not pending:
            break
        done = _wait_any(pending, gate)
        if not done:
            errors.append(
                f"listing users (state={state}): {len(pending)} page(s) abandoned in flight: "
                f"{gate.why_closed()}"
            )
            return
        for future in done:
            offset = pending.pop(future)
            try:
                items, page_pagination = future.result()
            except Abandoned as exc:
                if exc.sent:
                    errors.append(str(exc))
                else:
                    not_fetched += 1  # said once, below
                continue
            except HubError as exc:
                errors.append(str(exc))
                continue
            page_pagination = page_pagination or {}
            end = _list_end(end, page_pagination, offset, limit)
            if offset > last_offset:
                last_offset, last_pagination = offset, page_pagination
            yield items, total
    reason = gate.why_closed()
    if reason:
        not_fetched += max(0, math.ceil((end - following) / limit))
    if not_fetched:
        errors.append(f"listing users (state={state}): {not_fetched} page(s) not fetched: {reason}")
        return
    # Users added while we listed show up as a `next` after the last page we expected.
    page_budget = 2 * math.ceil(end / limit) + 10
    pages = len(seen)
    try:
        offset = _next_offset(last_pagination, client)
        while offset is not None:
            if offset in seen:
                raise HubError(f"the next page repeats offset {offset}: listing stopped")
            if pages >= page_budget:
                raise HubError(f"listing did not end after {pages} pages: stopped")
            if reason := gate.why_closed():
                raise HubError(f"listing users: {reason}")
            seen.add(offset)
            pages += 1
            items, page_pagination = _read_page(client, state, offset, limit, errors)
            yield items, total
            offset = _next_offset(page_pagination or {}, client)
    except HubError as exc:
        errors.append(f"listing users (state={state}): {exc}")


def _read_page(
    client: HubClient, state: str | None, offset: int, limit: int, errors: list[str]
) -> tuple[list, dict | None]:
    """A page of users (limit 0: the Hub's default). A user sets their own `user_options` when
    they spawn, so one user can make the page they are on too large or too dense to read: such a
    page is read again in halves, down to that user alone, who is left out (so kept, with an
    error in `errors`), and the others on the page get their verdicts as usual."""
    try:
        return client.list_users(state, offset, limit)
    except HubError as exc:
        if not _bloated(exc):
            raise
        return _in_halves(client, state, offset, limit, errors, exc)


def _in_halves(
    client: HubClient,
    state: str | None,
    offset: int,
    limit: int,
    errors: list[str],
    bloated: HubError,
) -> tuple[list, dict | None]:
    """The page at `offset` that could not be read (`bloated`), read in two halves."""
    if limit == 1:
        errors.append(f"{bloated}: the user at offset {offset} is left alone this pass")
        return [], {"offset": offset, "limit": 1, "next": {"offset": offset + 1}}
    size = limit or PAGE_SIZE
    items, before = _read_page(client, state, offset, size // 2, errors)
    rest, after = _read_page(client, state, offset + size // 2, size - size // 2, errors)
    # The whole page's pagination, as the Hub would have given it: where the list goes on (after
    # a user left out, it may go on) and its total.
    totals = [p["total"] for p in (before, after) if p and isinstance(p.get("total"), int)]
    following = after.get("next") if after else None
    pagination = {"offset": offset, "limit": size, "next": following}
    if totals:
        pagination["total"] = min(totals)
    return items + rest, pagination


def _bloated(exc: HubError) -> bool:
    """An answer too large or too dense to read: in a page of users, one user's doing."""
    return exc.failure is not None and exc.failure.cause in ("too_large", "too_complex")


def _list_end(end: int, pagination: dict, offset: int, limit: int) -> int:
    """Where the list ends, as far as we know, after reading the page at `offset`."""
    claimed = pagination.get("total")
    if isinstance(claimed, int):
        end = min(end, claimed)
    return end if pagination.get("next") else min(end, offset + limit)


def _wait_any(futures: dict[Future, object] | set[Future], gate: _Gate) -> set[Future]:
    """Some of `futures` once done; none when the gate has been closed for ABANDON_GRACE.

    Requests in flight when the gate closes end at once (the client cuts them); a worker stuck
    anyway, where nothing can wake it, is left behind rather than waited for.
    """
    give_up = math.inf
    while True:
        done, _ = wait(futures, timeout=TICK, return_when=FIRST_COMPLETED)
        if done:
            return done
        if gate.why_closed():
            give_up = min(give_up, time.monotonic() + ABANDON_GRACE)
            if time.monotonic() >= give_up:
                return set()


def carry_out(
    client: HubClient, plan: UserPlan, settings: PassSettings, gate: _Gate
) -> list[Outcome]:
    """Act on one user's plan: stops first, then the user, only if every stop finished."""

    def act(action: str, server: str, verdict: Verdict, request) -> Outcome:
        def outcome(result: str, error: str | None = None) -> Outcome:
            return Outcome(
                action=action,
                user=plan.user,
                server=server,
                verdict=verdict,
                result=result,
                error=error,
            )

        if settings.dry_run:
            return outcome("planned")
        if reason := gate.why_closed():
            return outcome("skipped", reason)
        try:
            return outcome(request())
        except Abandoned as exc:
            # Sent: the Hub may have acted, but nobody heard it say so.
            return outcome("abandoned" if exc.sent else "skipped", str(exc))
        except HubError as exc:
            return outcome("failed", str(exc))

    outcomes = []
    for stop in plan.stops:

        def request(stop=stop):
            result = client.stop_server(plan.user, stop.server, stop.remove)
            if result == "stopping" and settings.wait_for_stop:
                result = _wait_for_stop(client, plan.user, stop.server, settings, gate)
            return result

        outcomes.append(
            act("remove" if stop.remove else "stop", stop.server, stop.verdict, request)
        )
    if plan.delete:
        unfinished = [
            o.server or "(default)"
            for o in outcomes
            if o.result in ("stopping", "failed", "skipped")
        ]
        if unfinished:
            waiting = f"server not stopped yet: {', '.join(unfinished)}"
            outcomes.append(Outcome("delete_user", plan.user, "", plan.delete, "skipped", waiting))
        else:
            outcomes.append(
                act("delete_user", "", plan.delete, lambda: client.delete_user(plan.user))
            )
    return outcomes


def _wait_for_stop(
    client: HubClient, user: str, server: str, settings: PassSettings, gate: _Gate
) -> str:
    """After a 202: look until the server is gone ('done') or the wait is over ('stopping')."""
    deadline = time.monotonic() + settings.wait_for_stop
    while (left := deadline - time.monotonic()) > 0 and not gate.why_closed():
        gate.sleep(min(STOP_POLL_INTERVAL, left))
        try:
            if not client.server_active(user, server):
                return "done"
        except HubError as exc:
            log.warning("while waiting for %s to stop: %s", user, exc)
    return "stopping"


def run_pass(
    client: HubClient,
    policy: Policy,
    settings: PassSettings,
    stop: threading.Event,
    progress: Progress | None = None,
    looker: ServerClient | None = None,
) -> Report:
    """One pass. `looker` is needed when the policy looks inside servers."""
    started = time.monotonic()
    progress = progress or Progress()
    report = Report(dry_run=settings.dry_run, kept=[] if settings.report_kept else None)
    gate = client.gate = _Gate(stop, settings.max_runtime)
    client.limiter = Limiter(settings.concurrency, fixed=settings.fixed_concurrency)
    plans: dict[str, UserPlan] = {}
    warnings: list[tuple[str, str, Verdict]] = []
    waiting: list[tuple[dict, tuple[str, ...]]] = []  # users to plan again after looking inside
    with (
        _arbiter_on_a_loop(policy, client.timeout, gate) as policy,
        _workers(settings.concurrency, gate) as pool,
    ):
        check: Future | None = None
        identity = now = None
        try:
            # One round trip before the listing goes on: the first page is asked for with the
            # version. Planning needs no permission, so the listing goes on while the scopes
            # are checked (once the version says whether there are any); nothing is done
            # before the check has passed.
            first_page = pool.submit(client.list_users, "ready", 0, settings.page_size)
            version = client.info().get("version")
            looks = looker is not None
            check = pool.submit(_check_hub, client, policy, settings, version, looks)
            states = _states(version, policy)
            named_servers = has_named_servers(version)
            now = client.now()
            report.clocks = dict(zip(("hub", "local"), client.clocks(), strict=True))
            _warn_on_skew(client)
            for index, state in enumerate(states):
                if index and (reason := gate.why_closed()):
                    report.errors.append(f"listing users (state={state}): not started: {reason}")
                    break
                try:
                    asked = None if index else first_page
                    first = _first_page(client, asked, state, settings, version, report.errors)
                    pages = list_user_pages(
                        client, state, settings, pool, gate, report.errors, first
                    )
                    for number, (page, total) in enumerate(pages):
                        if number == 0 and total:
                            progress.start(f"Listing users ({state or 'all'})", total)
                        progress.advance(len(page))
                        report.users_scanned += len(page)
                        _plan_page(
                            page, policy, now, plans, warnings, waiting, report, named_servers
                        )
                except HubError as exc:
                    if index == 0 and not isinstance(exc, Abandoned):
                        raise
                    report.errors.append(str(exc))
            identity = check.result()
        except Abandoned as exc:
            report.errors.append(str(exc))  # cut short, not a Hub that cannot be used
        except (HubError, GroupsHidden) as exc:
            if isinstance(exc, GroupsHidden):
                exc = HubError(
                    f"the Hub does not show the groups of user {exc}: group exclusions and "
                    "rules need the read:users:groups scope"
                )
            failed = _failed_check(check) or exc
            report.fatal, report.fatal_fields = failed.explained(), failed.fields()
        progress.finish()
        if report.servers_hidden:
            log.warning(
                "%d user(s) listed without their servers (is the token's read:servers "
                "filtered?): left alone, neither stopped nor deleted",
                report.servers_hidden,
            )
        if waiting and not report.fatal:
            looked = _look_inside_all(looker, waiting, policy, settings, gate, pool, now)
            # A filtered `tokens` scope refuses the owners outside it one by one.
            refused_is_fatal = holds_unfiltered(identity, "tokens")
            if looked.sent and looked.refused == looked.sent and refused_is_fatal:
                report.fatal = (
                    f"every look inside a server ({looked.sent}) was refused (403): the token "
                    "needs the tokens scope, and each server must accept its owner's token"
                )
            for plan in looked.plans:
                _take_plan(plan, plans, warnings, report)
        if report.fatal:
            plans.clear()  # nothing is done on a partial or blind view of the Hub
        if plans:
            progress.start("Culling", len(plans))
        act = functools.partial(carry_out, client, settings=settings, gate=gate)
        _carry_out_all(pool, plans, act, settings.concurrency, gate, progress, report)
        progress.finish()
    if policy.warn_before and not report.fatal and now is not None:
        _send_warnings(warnings, now, client, settings, gate, report)
    report.incomplete = None if report.fatal else gate.why_closed()
    report.concurrency = client.limiter.used()
    report.duration = time.monotonic() - started
    return report


@contextlib.contextmanager
def _workers(concurrency: int, gate: _Gate) -> Iterator[ThreadPoolExecutor]:
    """The pass's threads; once the pass is cut short, one that is stuck is not waited for."""
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="idle-cull")
    try:
        yield pool
    finally:
        pool.shutdown(wait=gate.why_closed() is None, cancel_futures=True)


def _carry_out_all(
    pool: ThreadPoolExecutor,
    plans: dict[str, UserPlan],
    act: Callable[[UserPlan], list[Outcome]],
    concurrency: int,
    gate: _Gate,
    progress: Progress,
    report: Report,
) -> None:
    """Carry out the plans, freeing each once it is carried out.

    Each of `concurrency` workers takes the next plan itself rather than being handed one by
    this thread: one thread switch less per plan, about a tenth of the CPU of a large pass.
    A user's stops run one after another, so the users with the most go first (then in
    listing order): no worker is left with a long one while the others have finished.
    """
    lock = threading.Lock()
    names = iter(sorted(plans, key=lambda name: -len(plans[name].stops)))
    in_hand: dict[int, UserPlan] = {}  # worker thread -> the plan it is carrying out
    left_behind = False  # the pass is reported without the workers still busy

    def record(outcomes: list[Outcome]) -> None:
        progress.advance()
        for outcome in outcomes:
            _log_outcome(outcome)
            report.outcomes.append(outcome)

    def work() -> None:
        me = threading.get_ident()
        while True:
            with lock:
                name = None if left_behind else next(names, None)
                if name is None:
                    return
                plan = in_hand[me] = plans.pop(name)
            outcomes = act(plan)
            with lock:
                if left_behind:
                    return
                del in_hand[me]
                record(outcomes)

    pending = {pool.submit(work) for _ in range(concurrency)}
    while pending and (done := _wait_any(pending, gate)):
        pending -= done
        for future in done:
            future.result()
    if not pending:
        return
    with lock:
        left_behind = True
        why = f"no answer by the end of the pass ({gate.why_closed()})"
        for plan in in_hand.values():
            # The gate is closed: act() sends nothing and lists the plan's actions as skipped.
            record([replace(o, result="abandoned", error=why) for o in act(plan)])
        for name in names:
            record(act(plans.pop(name)))


def _check_hub(
    client: HubClient, policy: Policy, settings: PassSettings, version: object, looks: bool
) -> dict:
    """The token's own model, once it is known to hold every scope the pass needs ({} on a
    Hub without scopes)."""
    if looks and not narrows_tokens(version):
        # Any token of the owner would do all the owner may, for anyone who reads it on the way.
        why = (
            f"looking inside servers needs JupyterHub 3.0 or later (this Hub: {version!s:.40}), "
            "where a token can be narrowed to one server"
        )
        if not settings.dry_run or settings.dry_run_looks:
            raise HubError(why)
        log.warning("%s: a real run would fail", why)
    if not has_scopes(version):
        # Before 2.0 a service token cannot even read its own model (GET /user fails).
        log.info("JupyterHub %s has no scopes: the token's permissions are not checked", version)
        return {}
    if hub_version(version) is None:
        log.warning(
            "cannot read the Hub's version (%.40r): checking the token's scopes as on "
            "JupyterHub 2 and later",
            version,
        )
    needed = SERVER_SCOPES + (USER_SCOPES if policy.cull_users else ())
    needed += GROUP_SCOPES if policy.needs_groups else ()
    needed += LOOK_SCOPES if looks else ()
    identity = client.identity()
    missing = missing_scopes(identity, needed)
    if settings.dry_run:
        # A dry run sends no DELETE (and no look unless asked), so a read-only token may
        # preview; say what a real run lacks.
        unused = [s for s in missing if s.startswith("delete:")]
        unused += [] if settings.dry_run_looks else [s for s in missing if s in LOOK_SCOPES]
        if unused:
            log.warning("the token lacks %s: a real run would fail", ", ".join(unused))
        missing = [s for s in missing if s not in unused]
    if missing:
        raise HubError(f"the token lacks the scope(s) {', '.join(missing)} needed to cull")
    return identity


def _failed_check(check: Future | None) -> HubError | None:
    """Why the scope check failed (it explains a failed listing best), once it has ended."""
    try:
        if check is not None:
            check.result()
    except HubError as exc:
        return exc
    return None


def _first_page(
    client: HubClient,
    asked: Future | None,
    state: str | None,
    settings: PassSettings,
    version: object,
    errors: list[str],
) -> tuple[list, dict | None]:
    """The first page of the listing of `state`; `asked`: the page asked for as ?state=ready
    before the version was known."""
    try:
        return asked.result() if asked else client.list_users(state, 0, settings.page_size)
    except HubError as exc:
        if _bloated(exc) and pages_users(version):
            items, pagination = _in_halves(client, state, 0, settings.page_size, errors, exc)
            if "total" not in pagination:
                # No one on the first page could be read: the list's length from the next user.
                with contextlib.suppress(HubError):
                    probe = client.list_users(state, pagination["limit"], 1)[1] or {}
                    pagination["total"] = probe.get("total")
            return items, pagination
        if asked is None or state == "ready":
            raise
        # A Hub before 1.3 ignores the filter; one that refuses it is asked again without.
        return client.list_users(state, 0, settings.page_size)


def _states(version: object, policy: Policy) -> list[str | None]:
    if not supports_state_filter(version):
        return [None]
    # Users with no server at all are only in the "inactive" list; only user culling needs them.
    return ["ready", "inactive"] if policy.cull_users else ["ready"]


def _warn_on_skew(client: HubClient) -> None:
    skew = client.clock_skew()
    if skew is not None and abs(skew) > CLOCK_SKEW_WARNING:
        earlier = "the Hub's" if skew > 0 else "this machine's"
        log.warning(
            "this machine's clock is %+.0fs off the Hub's; using the earlier, %s", skew, earlier
        )


def _plan_page(
    page: list,
    policy: Policy,
    now: datetime,
    plans: dict,
    warnings: list,
    waiting: list,
    report: Report,
    named_servers: bool,
) -> None:
    for user in page:
        try:
            plan = plan_user(user, policy, now, named_servers=named_servers)
        except ValueError as exc:
            name = user.get("name") if isinstance(user, dict) else None
            report.errors.append(f"user {name or '?'}: unreadable model ({exc}); left alone")
            log.error("user %s: unreadable model (%s); left alone", name or "?", exc)
            continue
        if plan.look:
            waiting.append((user, plan.look))
        else:
            _take_plan(plan, plans, warnings, report)


def _take_plan(plan: UserPlan, plans: dict, warnings: list, report: Report) -> None:
    """Report what a user's plan keeps, note its warnings, and queue its actions."""
    for server, verdict in plan.kept:
        report.servers_hidden += verdict.reason == SERVERS_HIDDEN
        if verdict.reason.endswith(DOT_NAME_KEPT):  # due, and left for a person to do
            log.warning("user %s%s: %s", plan.user, _server_suffix(server), verdict.reason)
        if verdict.error:
            message = f"user {plan.user}{_server_suffix(server)}: {verdict.error}; kept"
            report.errors.append(message)
            log.error("%s", message)
        elif verdict.inside is not None:  # what the look saw, for the JSON logs too
            log.debug(
                "keep user %s%s: %s",
                plan.user,
                _server_suffix(server),
                verdict.reason,
                extra={
                    "event": "keep",
                    "user": plan.user,
                    "server": server,
                    "reason": verdict.reason,
                    "idle_s": _round(verdict.idle),
                    "age_s": _round(verdict.age),
                    "inside": _inside_dict(verdict.inside),
                },
            )
        else:
            log.debug("keep user %s%s: %s", plan.user, _server_suffix(server), verdict.reason)
        if report.kept is not None:
            report.kept.append(
                {
                    "user": plan.user,
                    "server": server,  # None: the user, not deleted
                    "reason": verdict.error or verdict.reason,
                    "idle_s": _round(verdict.idle),
                    "age_s": _round(verdict.age),
                    "inside": _inside_dict(verdict.inside),
                }
            )
    warnings.extend((plan.user, server, verdict) for server, verdict in plan.warn)
    # The same user can show up twice when offsets shift between pages; act once.
    if plan.actionable and plan.user not in plans:
        plans[plan.user] = replace(plan, kept=(), warn=())


@dataclass
class Looked:
    plans: list[UserPlan]  # the waiting users, planned again with what was seen
    sent: int = 0  # looks sent
    refused: int = 0  # of those, answered 403


def _look_inside_all(
    looker: ServerClient,
    waiting: list[tuple[dict, tuple[str, ...]]],
    policy: Policy,
    settings: PassSettings,
    gate: _Gate,
    pool: ThreadPoolExecutor,
    now: datetime,
) -> Looked:
    """Look inside the servers the plans wait for, `concurrency` at a time, then plan again.

    All looks end before any action starts: looks refused everywhere then change nothing.
    """

    def look(job: tuple[dict, str]) -> tuple[Inside, int | None]:
        user, server = job
        where = f"user={user['name']} server={server or '(default)'}"
        model = user_servers(user)[server]
        if reason := gate.why_closed():
            return Inside(error=f"not sent: {reason}"), None
        if settings.dry_run and not settings.dry_run_looks:
            log.info(
                "would look inside %s (GET %s; not sent in a dry run, --dry-run-looks sends it): "
                "%s",
                where,
                _look_url(looker, model),
                _what_looks_decide(policy),
            )
            return Inside(error="not sent in a dry run"), None
        inside, status, fields = _look_inside(looker, policy, user["name"], server, model, now)
        if inside.error:
            log.warning(
                "could not look inside %s: %s; the Hub's verdict stands",
                where,
                inside.error,
                extra=fields,
            )
        return inside, status

    looked = Looked(plans=[])
    insides: dict[str, dict[str, Inside]] = {}
    jobs = ((user, server) for user, servers in waiting for server in servers)
    # In slices: 100,000 looks never wait as 100,000 futures at once.
    while chunk := list(itertools.islice(jobs, LOOK_SLICE)):
        for (user, server), (inside, status) in zip(chunk, pool.map(look, chunk), strict=True):
            insides.setdefault(user["name"], {})[server] = inside
            looked.sent += status is not None
            looked.refused += status == 403
    for user, _ in waiting:
        looked.plans.append(plan_user(user, policy, now, insides[user["name"]]))
    return looked


def _look_url(looker: ServerClient, server: dict) -> str:
    try:
        return looker.api_url(server.get("url"), "kernels")
    except LookFailed as exc:
        return f"(none: {exc})"


def _what_looks_decide(policy: Policy) -> str:
    """What a look would decide, for a dry run that does not send it."""
    said = []
    if policy.activity_source == "kernels":
        said.append("idle time from its kernels and terminals")
    if policy.keep_busy_kernels:
        said.append(f"kept while a kernel is busy and silent < {policy.keep_busy_kernels}s")
    return "; ".join(said)


def _look_inside(
    looker: ServerClient, policy: Policy, user: str, server_name: str, server: dict, now: datetime
) -> tuple[Inside, int | None, dict]:
    """What one server's own API shows (an Inside with `error` when it cannot be seen), the
    HTTP status of the first answer that was not 200 JSON (200 when all were, None if none),
    and why a request failed (HubError.fields)."""
    what = f"looking inside {user}{_server_suffix(server_name)}"
    url = server.get("url")
    terminals = activity = None
    try:
        looker.api_url(url, "kernels")  # no token is made for a server whose url is unsafe
        with _owners_token(looker.hub, user, server_name, looker.token_lifetime) as token:
            kernels, date = looker.get(url, "kernels", what, token)
            if policy.activity_source == "kernels":
                try:
                    terminals, _ = looker.get(url, "terminals", what, token)
                except LookFailed as exc:
                    if exc.status != 404:  # 404: terminals are turned off on that server
                        raise
                    terminals = []
                if kernels == [] and terminals == []:
                    status, _ = looker.get(url, "status", what, token)
                    activity = status.get("last_activity") if isinstance(status, dict) else None
                    if activity is None:
                        raise ValueError("its /api/status has no last_activity")
        # The server's own Date: its times are judged by its clock (whole seconds, truncated).
        return read_inside(kernels, terminals, date or now, activity), 200, {}
    except LookFailed as exc:
        return Inside(error=str(exc)), exc.status, exc.fields()
    except HubError as exc:
        return Inside(error=str(exc)), 0, exc.fields()
    except ValueError as exc:
        return Inside(error=f"{what}: unreadable answer: {exc}"), 200, {}


@contextlib.contextmanager
def _owners_token(hub: HubClient, user: str, server: str, lifetime: int) -> Iterator[LookToken]:
    """A token of the server's owner for its looks, revoked when they end: the server, which
    its owner controls, sees only a key to itself, and only for a moment."""
    token = hub.look_token(user, server, lifetime)
    try:
        yield token
    finally:
        try:
            hub.revoke_token(token)
        except HubError as exc:
            log.warning(
                "%s; the token expires %ds after it was made", exc, lifetime, extra=exc.fields()
            )


def _server_suffix(server: str | None) -> str:
    if server is None:
        return ""
    return f" server {server}" if server else " default server"


def _send_warnings(
    warnings: list[tuple[str, str, Verdict]],
    now: datetime,
    client: HubClient,
    settings: PassSettings,
    gate: _Gate,
    report: Report,
) -> None:
    """Run --notify-command once per server per stay in the warning window."""
    verdicts = {(user, server): verdict for user, server, verdict in warnings}
    new, remembered = warnings_to_send(list(verdicts), _read_warned(settings.state_file))
    # Remembered before they are sent: a state file that cannot be written would otherwise
    # have every warning sent again on every pass. Then none is sent, and that is a failure.
    planned = remembered | {*new}
    if not settings.dry_run and (error := _write_warned(settings.state_file, planned)):
        report.errors.append(f"{error}: no warning sent")
        log.error("%s: no warning sent (it would be sent again on every pass)", error)
        return
    for sent, (user, server) in enumerate(new):
        if reason := gate.why_closed():
            # Not remembered as sent, so the next pass sends them.
            report.errors.append(f"{len(new) - sent} warning(s) not sent: {reason}")
            break
        verdict = verdicts[(user, server)]
        cull_at = now + timedelta(seconds=max(verdict.cull_in, 0))
        if settings.dry_run:
            log.info(
                "would warn user=%s server=%s: culled in %.0fs",
                user,
                server or "(default)",
                verdict.cull_in,
            )
            continue
        message = {
            "event": "cull_warning",
            "user": user,
            "server": server,
            "idle_s": _round(verdict.idle),
            "age_s": _round(verdict.age),
            "cull_in_s": _round(verdict.cull_in),
            "cull_at": cull_at.isoformat(),
            "hub_api_url": client.base,
        }
        if error := _notify(settings.notify_command, message, gate, client.redact):
            report.errors.append(f"warning user {user}{_server_suffix(server)}: {error}")
            log.error("could not warn user %s%s: %s", user, _server_suffix(server), error)
        else:
            remembered.add((user, server))
            report.warnings_sent += 1
            log.info(
                "warned user=%s server=%s: culled in %.0fs",
                user,
                server or "(default)",
                verdict.cull_in,
                extra={
                    "event": "warn",
                    "user": user,
                    "server": server,
                    "reason": f"culled in {verdict.cull_in:.0f}s",
                    "idle_s": _round(verdict.idle),
                    "age_s": _round(verdict.age),
                },
            )
    # Those not sent are forgotten again, so that the next pass sends them.
    unsent = remembered != planned
    if (
        not settings.dry_run
        and unsent
        and (error := _write_warned(settings.state_file, remembered))
    ):
        report.errors.append(error)
        log.error("%s", error)


def _notify(
    command: tuple[str, ...], message: dict, gate: _Gate, redact: Callable[[str], str]
) -> str | None:
    """Run the operator's command with the warning as JSON on stdin; an error text or None.

    It is killed after NOTIFY_TIMEOUT, or as soon as the gate closes (the deadline, a signal).
    """
    # The command is the operator's, but it has no need of the Hub's token, which a managed
    # service holds under two names (and who knows what else): pass only what a command needs.
    env = {k: v for k, v in os.environ.items() if k in NOTIFY_ENV or k.startswith("LC_")}
    import subprocess  # only a pass that warns pays for it

    pipe = subprocess.PIPE
    try:
        child = subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=env)
    except OSError as exc:
        return redact(f"{command[0]}: {exc}")
    given_up = time.monotonic() + NOTIFY_TIMEOUT
    stdin = json.dumps(message)
    while True:
        try:
            _, stderr = child.communicate(stdin, timeout=TICK)
            break
        except subprocess.TimeoutExpired:
            stdin = None  # sent with the first call
            why = gate.why_closed() or (
                f"no end within {NOTIFY_TIMEOUT}s" if time.monotonic() > given_up else None
            )
            if why:
                child.kill()
                child.communicate()
                return f"{command[0]}: killed: {why}"
    if child.returncode:
        return f"{command[0]} exited {child.returncode}: {redact(stderr.strip())[-200:]}"
    return None


def _read_warned(path: str | None) -> set[tuple[str, str]]:
    try:
        with _open_own(path) as f:
            return {(entry["user"], entry["server"]) for entry in json.load(f)["warned"]}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read the state file %s (%s); starting afresh", path, exc)
        return set()


def _write_warned(path: str | None, warned: set[tuple[str, str]]) -> str | None:
    entries = [{"user": user, "server": server} for user, server in sorted(warned)]
    return _write_atomically(path, json.dumps({"warned": entries}, indent=1), 0o600)


def _open_own(path: str) -> io.TextIOWrapper:
    """A file of the culler's own, for reading: not through a symlink, and one that no other
    user could have written (else OSError), so that nobody else steers what it says."""
    # O_NONBLOCK: a FIFO planted there must not hang the pass.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise OSError("not a file of this user's that only it can write")
    return open(fd, encoding="utf-8")


def _write_atomically(path: str, text: str, mode: int) -> str | None:
    """Readers (node_exporter, the next pass) see the old file or the new one, never half.

    The new file is the culler's own, with `mode` whatever the umask; it is made under a name
    nobody can guess (a symlink or a file planted at a guessable name in a shared folder would
    be written through, or stay another user's) and renamed over `path`, which replaces a
    symlink there instead of following it. An error text when the file could not be written
    (the caller counts it as a failure)."""
    folder, name = os.path.split(path)
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, mode)
            f.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        return f"cannot write {path}: {exc.strerror or exc}"
    return None


def _log_outcome(outcome: Outcome) -> None:
    verdict = outcome.verdict
    if outcome.result == "failed":
        level = logging.ERROR
    elif outcome.result in ("stopping", "skipped", "abandoned"):
        level = logging.WARNING
    else:
        level = logging.INFO
    text = {"planned": "would do (dry run)", "stopping": "still stopping (202)"}.get(
        outcome.result, outcome.result
    )
    log.log(
        level,
        "%s user=%s server=%s idle=%s age=%s reason=%s -> %s%s",
        outcome.action,
        outcome.user,
        outcome.server or "(default)",
        _seconds(verdict.idle),
        _seconds(verdict.age),
        verdict.reason,
        text,
        f": {outcome.error}" if outcome.error else "",
        extra={"event": outcome.action, "outcome": outcome},
    )


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}s"


def summary_line(report: Report) -> str:
    s = report.summary()
    if report.fatal:
        return f"summary: the Hub could not be used: {report.fatal}"
    verb = "would stop" if report.dry_run else "stopped"
    line = (
        f"summary{' (dry run)' if report.dry_run else ''}: users scanned={s['users_scanned']}, "
        f"servers {verb}={s['servers_stopped']}, still stopping={s['servers_stopping']}, "
        f"named servers removed={s['named_servers_removed']}, users deleted={s['users_deleted']}, "
        f"failures={s['failures']}, duration={report.duration:.2f}s"
    )
    if used := report.concurrency:
        spread = "fixed" if used["fixed"] else f"{used['least']} to {used['most']}"
        line += f", in flight={used['settled']} ({spread}, ceiling {used['ceiling']})"
    return line + (f" (incomplete: {report.incomplete})" if report.incomplete else "")


METRICS = {
    "users_scanned": "Users listed by the last pass",
    "servers_stopped": "Servers stopped by the last pass",
    "servers_stopping": "Servers still stopping (202) at the end of the last pass",
    "named_servers_removed": "Named servers removed by the last pass",
    "users_deleted": "Users deleted by the last pass",
    "failures": "Failures in the last pass",
}


def write_metrics(report: Report, metrics_file: str | None, pushgateway: str | None) -> None:
    """Prometheus metrics of a pass: a node_exporter textfile and/or a Pushgateway push."""
    import prometheus_client as prom  # an optional extra: checked when the options are read

    registry = prom.CollectorRegistry()
    for key, value in report.summary().items():
        if key in METRICS:
            prom.Gauge(f"idle_cull_{key}", METRICS[key], registry=registry).set(value)
    prom.Gauge(
        "idle_cull_pass_duration_seconds", "Duration of the last pass", registry=registry
    ).set(report.duration)
    prom.Gauge("idle_cull_exit_code", "Exit code of the last pass", registry=registry).set(
        report.exit_code
    )
    last_success = prom.Gauge(
        "idle_cull_last_success_timestamp_seconds", "When a pass last succeeded", registry=registry
    )
    if report.exit_code == EXIT_OK:
        last_success.set_to_current_time()
    elif metrics_file:
        last_success.set(_previous_metric(metrics_file, last_success._name))
    if metrics_file and (
        error := _write_atomically(metrics_file, prom.generate_latest(registry).decode(), 0o644)
    ):
        report.errors.append(error)  # pushed below with the figures from before it
        log.error("%s", error)
    if pushgateway:
        try:
            # push_add replaces only these metrics, so a failed pass keeps the last success.
            if report.exit_code != EXIT_OK:
                registry.unregister(last_success)
            prom.pushadd_to_gateway(
                pushgateway, job="idle_cull", registry=registry, timeout=PUSH_TIMEOUT
            )
        except Exception as exc:  # whatever answers there (or not): never the end of the loop
            if isinstance(exc, urllib.error.HTTPError):
                failure = explain_answer(exc.code, str(exc.reason), option="--pushgateway")
            else:
                failure = explain_error(exc, pushgateway, PUSH_TIMEOUT, "--pushgateway")
            log.debug("pushing metrics failed: %s", _details(exc, ""))
            log.error(
                "cannot push metrics to %s: %s",
                _shown_url(pushgateway),
                failure.words,
                extra=failure.fields(pushgateway),
            )


def _previous_metric(path: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with _open_own(path) as f:
            for family in text_string_to_metric_families(f.read()):
                for sample in family.samples:
                    if sample.name == name:
                        return sample.value
    except (OSError, ValueError):
        pass
    return 0.0


# ---------------------------------------------------------------------------
# 4. The command line
# ---------------------------------------------------------------------------


JSON_LOG_FIELDS = ("user", "server", "reason", "idle_s", "age_s", "inside")
# Lines about a failed request add why (HubError.fields), and retry lines the retry.
FAILURE_LOG_FIELDS = ("cause", "url", "status", "hint")
RETRY_LOG_FIELDS = ("attempt", "retries", "delay_s", "retry_after_s")
# What could end a line or drive a terminal: C0 controls, DEL, C1 controls (U+0085 ends a line
# for some readers, U+009B starts an escape sequence), the Unicode line and paragraph
# separators, and the bidirectional overrides and isolates, which make a terminal show the rest
# of a line in another order than it was written.
CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def one_line(text: str) -> str:
    """`text` with control characters written as escapes (\\n, \\x1b, \\u2028): a name from the
    Hub or a line from a command cannot forge a log line of its own or rewrite the terminal."""
    return CONTROLS.sub(lambda match: match[0].encode("unicode_escape").decode(), text)


class _Formatter(logging.Formatter):
    """Text or JSON lines, with the token blotted out of anything that might echo it."""

    def __init__(self, secret: str, as_json: bool):
        super().__init__("[%(levelname)s %(asctime)s idle-cull] %(message)s")
        self.secret, self.as_json = secret, as_json

    def format(self, record: logging.LogRecord) -> str:
        if self.as_json:
            # Every line has the same keys (null when they do not apply), for log shippers.
            entry = {
                "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
                "level": record.levelname.lower(),
                "event": getattr(record, "event", "log"),
                "message": record.getMessage(),
                **dict.fromkeys(JSON_LOG_FIELDS),
            }
            if outcome := getattr(record, "outcome", None):
                entry.update(outcome.as_dict())  # built here: text logs never pay for it
            for key in (*JSON_LOG_FIELDS, "summary", *FAILURE_LOG_FIELDS, *RETRY_LOG_FIELDS):
                if hasattr(record, key):
                    entry[key] = getattr(record, key)
            if record.exc_info:
                entry["traceback"] = self.formatException(record.exc_info)
            text = json.dumps(entry)  # ASCII only: every control character escaped, DEL too
        else:
            # One event, one line; a traceback (--log-level=debug) follows on lines of its own.
            message = record.getMessage()
            if CONTROLS.search(message):  # a copy, not the record: it may go elsewhere too
                escaped = {"msg": one_line(message), "args": None}
                record = logging.makeLogRecord({**vars(record), **escaped})
            text = super().format(record)
        return redact(text, self.secret)


def _urllib3_at_debug(record: logging.LogRecord) -> bool:
    """urllib3 speaks of its own classes (our retry lines say it in words): its lines are
    details, shown at DEBUG only."""
    if record.name.partition(".")[0] != "urllib3":
        return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def _setup_logging(level: str, log_format: str, secret: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(secret, log_format == "json"))
    handler.addFilter(_urllib3_at_debug)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)


BOOLEAN_OPTIONS = (
    "cull-users",
    "cull-admin-users",
    "cull-default-servers",
    "cull-named-servers",
    "remove-named-servers",
    "ssl-enabled",
    "dry-run",
    "json",
    "insecure",
    "dry-run-looks",
)
_TRUE, _FALSE = {"true", "1", "yes", "y", "on", "t"}, {"false", "0", "no", "n", "off", "f"}


def normalize_argv(args: list[str]) -> list[str]:
    """Accept the upstream culler's spellings: --cull_users, --cull-users=False, and traitlets'
    own --IdleCuller.timeout=600 and --Application.log_level=DEBUG."""
    result = []
    for position, arg in enumerate(args):
        if arg == "--":
            return result + args[position:]
        if not arg.startswith("--"):
            result.append(arg)
            continue
        name, equals, value = arg[2:].partition("=")
        name = name.replace("_", "-")
        section, dot, trait = name.partition(".")
        if dot and (section == "IdleCuller" or (section, trait) == ("Application", "log-level")):
            name = trait
        if equals and name in BOOLEAN_OPTIONS:
            if value.lower() in _TRUE:
                arg = f"--{name}"
            elif value.lower() in _FALSE:
                arg = f"--no-{name}"
            else:
                raise click.BadParameter(f"{value!r} is not true or false", param_hint=f"--{name}")
        else:
            arg = f"--{name}{equals}{value}"
        result.append(arg)
    return result


class _Command(click.Command):
    """Every error is one line on stderr and exit 2: operators read cron mail, not tracebacks."""

    def main(self, args=None, prog_name=None, **extra):
        # Test runners pass `args`, and keep their process (see the end).
        from_command_line = args is None
        if from_command_line:
            _forget_working_directory()
        try:
            args = normalize_argv(list(sys.argv[1:] if args is None else args))
            extra.pop("standalone_mode", None)
            code = super().main(args, prog_name or "idle-cull", standalone_mode=False, **extra)
        except click.exceptions.Abort:
            code = 130
        except click.ClickException as exc:
            click.echo(f"idle-cull: error: {one_line(exc.format_message())}", err=True)
            code = exc.exit_code  # 2 for usage and settings, 1 for a lock file not ours
        except Exception as exc:  # a bug: still one line in the cron mail, the traceback on demand
            debug = log.isEnabledFor(logging.DEBUG)
            log.critical(
                "internal error (please report it): %s: %s%s",
                type(exc).__name__,
                exc,
                "" if debug else "; --log-level=debug shows where",
                exc_info=debug,
            )
            code = EXIT_FAILED
        if from_command_line and any(
            t.is_alive() and not t.daemon and t is not threading.current_thread()
            for t in threading.enumerate()
        ):
            # A worker that a cut-short pass left behind (stuck where nothing can wake it, such
            # as a DNS lookup) must not hold the process: the report is out.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
        sys.exit(code or 0)


def _forget_working_directory() -> None:
    """`python -m idle_cull` without -P puts the working directory first on sys.path, where
    another user may plant a module that would run as the culler at a later import (some are
    imported only when needed): it is taken off. -P keeps it off from the start (README)."""
    with contextlib.suppress(OSError):  # a working directory that is gone
        if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
            del sys.path[0]


CONFIG_FILE = "idle_culler_config.py"  # upstream's default, read from the working directory
# What idle-cull reads from upstream's Python config file: these IdleCuller traits set the
# option of the same name, cull_arbiter_hook is an --arbiter function, and log_level may also
# be set on Application, as traitlets allows.
CONFIG_TRAITS = (
    "url", "timeout", "max_age", "cull_every", "cull_users", "cull_admin_users",
    "cull_default_servers", "cull_named_servers", "remove_named_servers", "concurrency",
    "api_page_size", "ssl_enabled", "internal_certs_location", "cull_arbiter_hook", "log_level",
)  # fmt: skip


def _load_config(ctx: click.Context, _param, path: str | None) -> str | None:
    if not path:
        if not os.path.isfile(CONFIG_FILE):
            return path
        path = ctx.meta["idle_cull.found_config"] = os.path.abspath(CONFIG_FILE)
    if path.endswith(".toml"):
        settings = _read_toml_config(ctx, path)
    else:
        settings = _read_python_config(ctx, path)
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    return path


SYMLINK_HOPS = 40  # as many as Linux follows in one path


def _open_trusted(path: str) -> tuple[io.BufferedReader, str | None]:
    """A settings file opened for reading, once no user but this one and root can have chosen
    what it holds (as cron and ssh's StrictModes check theirs); click.BadParameter naming the
    file and the reason otherwise. Also the folder it is in, when nobody else can write there.

    Its checks are those of the file opened, not of a name that may change after them.
    """
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the culler; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # a NUL in the name
        raise click.BadParameter(f"cannot read {path!r}: {exc}") from None
    f = open(fd, "rb")
    try:
        why, folder = _why_untrusted(path, os.fstat(fd))
    except OSError as exc:
        why, folder = f"cannot check it: {exc.strerror}", None
    if why:
        f.close()
        raise click.BadParameter(f"{path} is refused: {why}")
    return f, folder


def _why_untrusted(path: str, opened: os.stat_result) -> tuple[str | None, str | None]:
    """Why another user could have chosen what the file opened as `path` holds (None: nobody
    could), and its folder when only this user or root can write there.

    The file must be regular, owned by this user (effective uid) or root and writable by no
    one else; so must every name on the way to it, from / and through each symlink, be owned by
    one of them, and every folder looked in be writable by no one else or sticky (/tmp: others
    may add names there, but not rename or replace ours). A group-writable folder counts as
    writable by others, as ssh counts it: the group may hold other users.
    """
    owners = {0, os.geteuid()}

    def not_ours(st: os.stat_result, what: str) -> str | None:
        if st.st_uid in owners:
            return None
        return f"{what} is owned by uid {st.st_uid}, not this user (uid {os.geteuid()}) or root"

    if not stat.S_ISREG(opened.st_mode):
        return "not a regular file", None
    if why := not_ours(opened, "it"):
        return why, None
    if opened.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(opened.st_mode):04o})", None
    # The kernel's own walk, name by name; ".." is the parent of where a symlink led.
    names, where, hops, entry = os.path.join(os.getcwd(), path).split("/")[::-1], "/", 0, None
    while names:
        name = names.pop()
        if name in ("", "."):
            continue
        if name == "..":
            where = os.path.dirname(where)
            continue
        folder = os.stat(where)
        if why := not_ours(folder, f"the folder {where}"):
            return why, None
        if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(folder.st_mode)
            return f"the folder {where} is writable by group or others (mode {mode:04o})", None
        where = os.path.join(where, name)
        entry = os.lstat(where)
        if why := not_ours(entry, where):
            return why, None
        if stat.S_ISLNK(entry.st_mode):
            hops += 1
            if hops > SYMLINK_HOPS:
                return "too many symlinks on the way", None
            target = os.readlink(where)
            where = "/" if target.startswith("/") else os.path.dirname(where)
            names.extend(target.split("/")[::-1])
    if entry is None or (entry.st_dev, entry.st_ino) != (opened.st_dev, opened.st_ino):
        return "it changed while it was being checked", None
    folder = os.path.dirname(where)
    private = not os.stat(folder).st_mode & 0o022  # its owner is checked above
    return None, folder if private else None


def _read_toml_config(ctx: click.Context, path: str) -> dict:
    import tomllib

    f, _ = _open_trusted(path)
    try:
        with f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from None
    # Keys are the long option names ("cull-users", or "cull_users" as upstream spells them).
    known = {
        opt[2:].replace("-", "_"): p
        for p in ctx.command.params
        for opt in p.opts
        if opt.startswith("--") and p.name not in ("config", "version", "help")
    }
    ctx.meta["idle_cull.rules"] = _read_rules(data.pop("rule", []), path)
    settings = {}
    for key, value in data.items():
        param = known.get(key.replace("-", "_"))
        if param is None:
            raise click.BadParameter(f"{path}: unknown setting {key!r}")
        if param.multiple and isinstance(value, str):
            value = [value]  # exclude-user = "bob" means one name
        items = value if param.multiple and isinstance(value, list) else [value]
        if not all(isinstance(item, str | int | float) for item in items):
            raise click.BadParameter(f"{path}: {key} = {value!r} is not a plain value")
        settings[param.name] = value
    return settings


class _ConfigSection(dict):
    """`c.IdleCuller` in upstream's config file: a dict whose keys are also attributes."""

    def __getattr__(self, trait: str) -> object:
        try:
            return self[trait]
        except KeyError:
            raise AttributeError(f"{trait} is not set") from None

    def __setattr__(self, trait: str, value: object) -> None:
        self[trait] = value


class _UpstreamConfig:
    """The `c` of upstream's config file, without traitlets: `c.<Class>.<trait> = value`."""

    def __init__(self):
        object.__setattr__(self, "values", {})  # class name -> its section

    def __getattr__(self, name: str) -> _ConfigSection:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.values.setdefault(name, _ConfigSection())

    def __setattr__(self, name: str, value: object) -> None:
        self.values[name] = value  # not a class: refused with its name once the file has run


def config_file_text(command: click.Command) -> str:
    """Upstream's Python config file with every setting idle-cull reads, at its default."""
    import textwrap

    params = {param.name: param for param in command.params}
    lines = [
        f"# Configuration file for idle-cull {__version__}, in jupyterhub-idle-culler's format.",
        f"# Read with --config FILE, or as {CONFIG_FILE} in the working directory.",
        "# Each setting is shown at its default: uncomment a line to change it. The command line",
        "# and IDLE_CULL_* environment variables win over this file.",
        "",
        "c = get_config()  # noqa",
    ]
    for trait in CONFIG_TRAITS:
        param = params[{"cull_arbiter_hook": "arbiter"}.get(trait, trait)]
        section = "Application" if trait == "log_level" else "IdleCuller"
        # None is "not set": the url then comes from $JUPYTERHUB_API_URL, as upstream's does.
        default = param.default if isinstance(param.default, str | int | float) else None
        if trait == "cull_every":
            default = 0  # what "not set" means there too
        help_text = param.help
        if isinstance(param.show_default, str):
            help_text += f" [default: {param.show_default}]"
        if trait == "cull_arbiter_hook":
            help_text += " Here: a function defined or imported in this file (--arbiter wins)."
        lines += ["", *textwrap.wrap(help_text, 96, initial_indent="## ", subsequent_indent="#  ")]
        lines.append(f"# c.{section}.{trait} = {default!r}")
    return "\n".join(lines)


def _generate_config(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(config_file_text(ctx.command))
        ctx.exit(EXIT_OK)


def _read_python_config(ctx: click.Context, path: str) -> dict:
    """Run upstream's Python config file as traitlets does; the settings it makes."""
    config = _UpstreamConfig()
    namespace = {"c": config, "get_config": lambda: config, "__file__": os.path.abspath(path)}
    f, folder = _open_trusted(path)
    try:
        with f:
            source = f.read()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    # Upstream's `python -m` found a hook's module in the working directory, wherever that was.
    # Here: in the file's own folder, if nobody else can put a module there; last, so that
    # nothing in it hides a module of Python's or of idle-cull's.
    if folder is not None and folder not in sys.path:
        sys.path.append(folder)
    try:
        exec(compile(source, path, "exec"), namespace)
    except (Exception, SystemExit) as exc:  # the operator's code: one line, no traceback
        line = exc.lineno if isinstance(exc, SyntaxError) else None
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename == path:
                line = frame.lineno
        where = path if line is None else f"{path}, line {line}"
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        # The file may have read the token (int(os.environ[...]) fails saying what it read).
        message = redact(message, os.environ.get("JUPYTERHUB_API_TOKEN", "").strip())
        raise click.BadParameter(f"{where}: {message}") from None
    settings = {}
    # Application first: a setting on IdleCuller, its subclass, wins, as in traitlets.
    for section, traits in sorted(config.values.items(), key=lambda item: item[0] == "IdleCuller"):
        if not isinstance(traits, dict):
            raise click.BadParameter(f"{path}: unknown setting c.{section}")
        if traits and section not in ("IdleCuller", "Application"):
            raise click.BadParameter(f"{path}: unknown class c.{section}")
        for trait, value in traits.items():
            if trait not in (CONFIG_TRAITS if section == "IdleCuller" else ("log_level",)):
                raise click.BadParameter(f"{path}: unknown setting c.{section}.{trait}")
            settings[trait] = value
    if (hook := settings.pop("cull_arbiter_hook", None)) is not None:
        if not callable(hook):
            raise click.BadParameter(f"{path}: c.IdleCuller.cull_arbiter_hook is not callable")
        ctx.meta["idle_cull.arbiter"] = hook
    if isinstance(level := settings.get("log_level"), int) and not isinstance(level, bool):
        settings["log_level"] = logging.getLevelName(level)  # logging.DEBUG, as traitlets takes
    if settings.get("log_level") in ("WARN", "warn"):
        settings["log_level"] = "WARNING"
    if settings.get("url", "") is None:
        del settings["url"]  # upstream's "not set"
    for trait, value in settings.items():
        if not isinstance(value, str | int | float):
            raise click.BadParameter(f"{path}: {trait} = {value!r} is not a plain value")
    return settings


def _read_rules(tables: object, path: str) -> tuple[Rule, ...]:
    """[[rule]] tables: `group` and/or `user_options` to match, `timeout`/`max-age` to set."""
    if not isinstance(tables, list):
        raise click.BadParameter(f"{path}: `rule` must be [[rule]] tables")
    rules = []
    for number, table in enumerate(tables, 1):
        where = f"{path}: rule {number}"
        if not isinstance(table, dict):
            raise click.BadParameter(f"{where}: {table!r} is not a [[rule]] table")
        table = {key.replace("-", "_"): value for key, value in table.items()}
        if unknown := set(table) - {"group", "user_options", "timeout", "max_age"}:
            raise click.BadParameter(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if "group" not in table and "user_options" not in table:
            raise click.BadParameter(f"{where}: needs `group` or `user_options` to match")
        if "timeout" not in table and "max_age" not in table:
            raise click.BadParameter(f"{where}: needs `timeout` or `max-age`")
        # The same bounds as --timeout and --max-age.
        for key, duration in (("timeout", TIMEOUT), ("max_age", SECONDS)):
            if key in table:
                try:
                    table[key] = duration.convert(table[key], None, None)
                except click.BadParameter as exc:
                    raise click.BadParameter(f"{where}: {key}: {exc.message}") from None
        if not isinstance(table.get("group", ""), str):
            raise click.BadParameter(f"{where}: group must be a string")
        if not isinstance(table.get("user_options", {}), dict):
            raise click.BadParameter(f"{where}: user_options must be a table")
        rules.append(Rule(**table))
    return tuple(rules)


def _check_url(_ctx, _param, value: str) -> str:
    try:
        parts = urlsplit(value)
        usable = parts.scheme in ("http", "https") and parts.hostname and parts.port != 0
    except ValueError:  # a bad port or IPv6 address
        usable = False
    if not usable:
        raise click.BadParameter(f"{value!r} is not an http(s) URL like {DEFAULT_URL}")
    return value


def _check_server_api_url(_ctx, _param, value: str | None) -> str | None:
    if not value:
        return None
    try:
        parts = urlsplit(value)
        usable = parts.scheme in ("http", "https") and parts.hostname and parts.port != 0
    except ValueError:
        usable = False
    # Each server's url from the Hub is the whole path (the Hub's base_url included).
    if not usable or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise click.BadParameter(
            f"{value!r} is not the proxy's address alone, like http://proxy-public"
        )
    return value


def _load_arbiter(_ctx, _param, value: str | None):
    if not value:
        return None
    module_name, _, function_name = value.partition(":")
    if not module_name or not function_name:
        raise click.BadParameter(f"{value!r} is not MODULE:FUNCTION")
    # Never from the working directory (see _forget_working_directory): from sys.path.
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:
        raise click.BadParameter(f"cannot load {value}: {type(exc).__name__}: {exc}") from None
    if not callable(function):
        raise click.BadParameter(f"{value} is not callable")
    return function


def _read_token(token_file: str | None) -> tuple[str, str | None]:
    """The token, and a warning to log when its file is readable by other users."""
    # Errors name the file, never a byte of it: it could hold a token or two.
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        except OSError as exc:
            raise click.UsageError(f"cannot read the API token file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise click.UsageError(f"the API token file {token_file} is not UTF-8 text") from None
        if not lines:
            raise click.UsageError(f"the API token file {token_file} is empty")
        if len(lines) > 1:
            # Say, an old and a new token mid-rotation: which one is meant is not ours to guess.
            raise click.UsageError(
                f"the API token file {token_file} has {len(lines)} lines: it must hold one token"
            )
        # Warned, not refused: Kubernetes mounts a Secret 0644 unless told otherwise.
        warning = None
        if mode & 0o004:
            warning = (
                f"the API token file {token_file} is readable by every user (mode {mode:04o}): "
                "make it 0600 (or 0440 for a group)"
            )
        return lines[0], warning
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "").strip()
    if not token:
        raise click.UsageError("no API token: set JUPYTERHUB_API_TOKEN or --api-token-file")
    return token, None


def _tls(ssl_enabled: bool, certs: str, ca_bundle: str | None, insecure: bool):
    cert = verify = None
    if ssl_enabled:
        cert = (
            os.path.join(certs, "hub-internal", "hub-internal.crt"),
            os.path.join(certs, "hub-internal", "hub-internal.key"),
        )
        verify = os.path.join(certs, "hub-ca", "hub-ca.crt")
        for path in (*cert, verify):
            if not os.path.isfile(path):
                raise click.UsageError(
                    f"--ssl-enabled: {path} not found (--internal-certs-location)"
                )
    if ca_bundle:
        verify = ca_bundle
    if insecure:
        verify = False
    return (True if verify is None else verify), cert


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGTERM/SIGINT end the pass within a second or so (requests in flight are abandoned)
    and it still reports, instead of dying mid-pass."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _exclusive(lock_file: str | None):
    """Yields False when another pass holds the lock.

    Only this user can hold it: the file is its own and 0600 (created so), opened without
    following a symlink. Another user's file, or one that others could open (and lock) is an
    error, never a silent "another pass holds it".
    """
    if not lock_file:
        yield True
        return
    import fcntl  # only with --lock-file

    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock_file, flags, 0o600)
    except OSError as exc:
        # Refused (another user's file, a symlink): say why; else a path that cannot be used.
        with contextlib.suppress(OSError):
            _check_lock_file(lock_file, os.lstat(lock_file))
        raise click.UsageError(f"cannot open the lock file {lock_file}: {exc.strerror}") from None
    with open(fd, "rb") as handle:
        _check_lock_file(lock_file, os.fstat(fd))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _check_lock_file(path: str, st: os.stat_result) -> None:
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid != os.geteuid():
        why = f"is owned by uid {st.st_uid}, not this user (uid {os.geteuid()})"
    elif st.st_mode & 0o066:
        # Anyone who could open it could hold its lock, and then every pass would do nothing.
        why = f"can be opened by other users (mode {stat.S_IMODE(st.st_mode):04o}): remove it"
    if why:
        raise click.ClickException(f"the lock file {path} {why}; nothing done")


class Duration(click.ParamType):
    """Seconds: a number as upstream reads one (`int("3600")`), or as people write them (8h30m)."""

    name = "duration"
    UNITS = (86400, 3600, 60, 1)  # d, h, m, s, as in PATTERN
    PATTERN = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
    EXAMPLE = "seconds (3600), or with units such as 90m, 1h, 8h30m, 30d"

    def __init__(self, minimum: float, maximum: float, fraction: bool = False):
        self.minimum, self.maximum, self.fraction = minimum, maximum, fraction

    def convert(self, value, param, ctx) -> float:
        seconds = self.seconds(value)
        if seconds is None:
            self.fail(f"{value!r} is not a duration: write {self.EXAMPLE}", param, ctx)
        if seconds < self.minimum:
            self.fail(f"{value!r} is less than the least, {self.minimum:g}s", param, ctx)
        if seconds > self.maximum:
            most = f"{self.maximum / 86400:g}d"
            self.fail(f"{value!r} is more than the most idle-cull takes, {most}", param, ctx)
        return seconds

    def seconds(self, value: object) -> float | None:
        """The number of seconds `value` means; None when it is not a duration."""
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)  # what upstream accepts for a number stays exactly that
        if isinstance(value, str) and self.fraction:
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and math.isfinite(value):
            return value if self.fraction else int(value) if value.is_integer() else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        match = self.PATTERN.fullmatch(value.strip().lower()) if isinstance(value, str) else None
        if not match or not any(match.groups()):
            return None
        return sum(int(n) * unit for n, unit in zip(match.groups(), self.UNITS, strict=True) if n)


# Every wait must fit the OS timers (threading.TIMEOUT_MAX, ~292 years): a century is plenty.
DURATION_MAX = 36500 * 86400
TIMEOUT = Duration(1, DURATION_MAX)  # an idle limit of 0 would stop servers in use right now
SECONDS = Duration(0, DURATION_MAX)
# A request that may wait beyond a day is a hang; below a millisecond it cannot succeed.
REQUEST_TIMEOUT = Duration(0.001, 86400, fraction=True)
# What --concurrency 0 ("no limit", as upstream) gives: threads and connections need a number.
CONCURRENCY_CEILING = 50


class _TerminalProgress(Progress):
    """click's progress bar, for a person watching a manual run."""

    def __init__(self):
        self.bar = None

    def start(self, label: str, length: int) -> None:
        self.finish()
        self.bar = click.progressbar(length=length, label=label, file=sys.stderr)
        self.bar.__enter__()

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def result_table(report: Report) -> str:
    """What a pass did, as a small table for a terminal."""
    results = ("planned",) if report.dry_run else ("done", "gone", "stopping", "failed", "skipped")
    if report.count(("stop", "remove", "delete_user"), ("abandoned",)):
        results += ("abandoned",)
    rows = [("", *results)]
    for action in ("stop", "remove", "delete_user"):
        counts = [report.count((action,), (result,)) for result in results]
        if any(counts):
            rows.append((action, *map(str, counts)))
    if len(rows) == 1:
        return "nothing to do"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def _summary_level(report: Report) -> int:
    if report.failures or report.fatal:
        return logging.ERROR
    # Cut short by the deadline or a stop signal: worth a look, not an error of its own.
    return logging.WARNING if report.incomplete else logging.INFO


def _check_outputs(metrics_file, pushgateway, warn_before, notify_command, state_file) -> None:
    if metrics_file or pushgateway:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise click.UsageError(
                "--metrics-file and --pushgateway need prometheus_client: "
                "pip install 'idle-cull[metrics]'"
            ) from None
    if warn_before and not (notify_command and state_file):
        raise click.UsageError("--warn-before needs --notify-command and --state-file")
    try:
        shlex.split(notify_command or "")
    except ValueError as exc:
        raise click.UsageError(f"--notify-command: {exc}") from None


# The options read best as one compact block: keep the formatter away from it.
# fmt: off
@click.command(
    cls=_Command,
    context_settings={
        "auto_envvar_prefix": "IDLE_CULL",
        "max_content_width": 100,
        "help_option_names": ["-h", "--help"],
    },
)
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_config,
              help="Settings file: TOML (.toml: keys as the long options, and [[rule]] tables), "
                   "else upstream's Python config (c.IdleCuller.timeout = 3600). Command line "
                   "and IDLE_CULL_* environment variables win over it.  [default: "
                   f"{CONFIG_FILE}, if the working directory has one]")
@click.option("--generate-config", is_flag=True, is_eager=True, expose_value=False,
              callback=_generate_config,
              help="Print a Python config file (upstream's format) with every setting at its "
                   "default, and exit.")
@click.option("--url", callback=_check_url, show_default="$JUPYTERHUB_API_URL, else " + DEFAULT_URL,
              default=lambda: os.environ.get("JUPYTERHUB_API_URL") or DEFAULT_URL,
              help="The Hub's API URL.")
@click.option("--api-token-file", type=click.Path(dir_okay=False),
              help="Read the API token from this file instead of $JUPYTERHUB_API_TOKEN.")
@click.option("--timeout", type=TIMEOUT, default=600, show_default=True,
              help="Seconds of inactivity after which a server is stopped.")
@click.option("--max-age", type=SECONDS, default=0, show_default=True,
              help="Stop servers older than this many seconds even if active (0: never).")
@click.option("--cull-every", type=SECONDS, default=None,
              help="Run a pass every N seconds until SIGTERM (0: one pass, then exit). "
                   "Default 0, or timeout/2 when started by the Hub as a service.")
@click.option("--cull-users/--no-cull-users", default=False, show_default=True,
              help="Also delete users whose servers are all stopped and who are idle or old.")
@click.option("--user-timeout", type=TIMEOUT, default=None,
              help="Seconds of inactivity after which a user is deleted [default: --timeout].")
@click.option("--cull-admin-users/--no-cull-admin-users", default=True, show_default=True,
              help="With --cull-users, may admin users be deleted.")
@click.option("--cull-default-servers/--no-cull-default-servers", default=True,
              show_default=True, help="Stop idle default servers.")
@click.option("--cull-named-servers/--no-cull-named-servers", default=True, show_default=True,
              help="Stop idle named servers.")
@click.option("--remove-named-servers/--no-remove-named-servers", default=False,
              show_default=True, help="Delete named servers after stopping them.")
@click.option("--exclude-user", multiple=True, metavar="NAME",
              help="Never stop this user's servers or delete the user (repeatable).")
@click.option("--exclude-group", multiple=True, metavar="NAME",
              help="Never stop the servers of this group's members or delete them (repeatable; "
                   "needs the read:users:groups scope).")
@click.option("--wait-for-stop", type=SECONDS, default=0, show_default=True,
              help="After a slow stop (202), wait up to this many seconds for it to finish.")
@click.option("--warn-before", type=SECONDS, default=0, show_default=True,
              help="Warn through --notify-command this many seconds before a server is culled.")
@click.option("--notify-command", metavar="COMMAND",
              help="Command run once per warning, with the warning as JSON on stdin.")
@click.option("--state-file", type=click.Path(dir_okay=False),
              help="Where --warn-before remembers the warnings it sent.")
@click.option("--concurrency", type=click.IntRange(0, 1000), default=10, show_default=True,
              help=f"Most requests in flight to the Hub at once (0: {CONCURRENCY_CEILING}); "
                   "fewer while the Hub's answers show it queueing.")
@click.option("--fixed-concurrency/--no-fixed-concurrency", default=False, show_default=True,
              help="Always --concurrency requests in flight, however the Hub answers.")
@click.option("--api-page-size", type=click.IntRange(min=0), default=PAGE_SIZE, show_default=True,
              help="Users per page when listing, at most the Hub's maximum (0: the Hub's "
                   "default).")
@click.option("--request-timeout", type=REQUEST_TIMEOUT,
              default=lambda: os.environ.get("JUPYTERHUB_REQUEST_TIMEOUT") or 60,
              show_default="$JUPYTERHUB_REQUEST_TIMEOUT, else 60",
              help="Seconds for each attempt at a request to get its whole answer, however "
                   "slowly it comes (each retry is a new attempt).")
@click.option("--retries", type=click.IntRange(0, 20), default=3, show_default=True,
              help="Retries of a failed GET or DELETE (connection errors, 429, 5xx), with backoff.")
@click.option("--ssl-enabled/--no-ssl-enabled", default=False, show_default=True,
              help="Use JupyterHub's internal SSL certificates.")
@click.option("--internal-certs-location", default="internal-ssl", show_default=True,
              help="Folder of JupyterHub's internal SSL certificates.")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False),
              help="CA bundle to verify the Hub's certificate.")
@click.option("--insecure/--no-insecure", default=False,
              help="Do not verify the Hub's TLS certificate (warned on every pass).")
@click.option("--arbiter", callback=_load_arbiter, metavar="MODULE:FUNCTION",
              help="Your own idle test, called as f(inactive=timedelta, inactive_limit=int, "
                   "server=dict) -> bool, or an async one; it replaces the idle-timeout test.")
@click.option("--clock", type=click.Choice(["hub", "local"]), default="hub", show_default=True,
              help="Kept for old command lines: idle times are always measured on the earlier of "
                   "the Hub's clock (its Date header) and this machine's.")
@click.option("--server-api-url", callback=_check_server_api_url, metavar="URL",
              help="The proxy's address as idle-cull reaches it (e.g. http://proxy-public), "
                   "to look inside servers (needs the tokens scope, JupyterHub 3.0+).")
@click.option("--keep-busy-kernels", type=SECONDS, default=0, show_default=True,
              help="Look inside a server before stopping it for idleness; keep it while a "
                   "kernel is busy and silent for less than this many seconds (0: off).")
@click.option("--activity-source", type=click.Choice(["hub", "kernels"]), default="hub",
              show_default=True,
              help="Idle time from the Hub's last_activity, or from inside the server: its "
                   "kernels and terminals (browser tabs and pings do not count).")
@click.option("--lock-file", type=click.Path(dir_okay=False),
              help="Skip the pass (exit 0) when another pass holds this lock: a file of this "
                   "user's own, made 0600 (another user's is an error, exit 1).")
@click.option("--max-runtime", type=SECONDS, default=0, show_default=True,
              help="End the pass after this many seconds: nothing new starts, what is in "
                   "flight is abandoned, the report is printed; exit 1 (0: no limit).")
@click.option("--dry-run/--no-dry-run", default=False, help="Decide and report; change nothing.")
@click.option("--dry-run-looks/--no-dry-run-looks", default=False,
              help="With --dry-run, still look inside servers (a look counts as activity).")
@click.option("--json/--no-json", "as_json", default=False,
              help="Print a JSON report of each pass on stdout.")
@click.option("--metrics-file", type=click.Path(dir_okay=False),
              help="Write Prometheus metrics here (node_exporter textfile format).")
@click.option("--pushgateway", metavar="URL", help="Push Prometheus metrics here after a pass.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="How much to log; DEBUG also lists every server kept and why.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines on stderr as text or as JSON.")
@click.version_option(__version__, prog_name="idle-cull")
@click.pass_context
def main(ctx, url, api_token_file, timeout, max_age, cull_every, cull_users, user_timeout,
         cull_admin_users, cull_default_servers, cull_named_servers, remove_named_servers,
         exclude_user, exclude_group, wait_for_stop, warn_before, notify_command, state_file,
         concurrency, fixed_concurrency, api_page_size, request_timeout, retries, ssl_enabled,
         internal_certs_location, ca_bundle, insecure, arbiter, clock, server_api_url,
         keep_busy_kernels, activity_source, lock_file, max_runtime, dry_run, dry_run_looks,
         as_json, metrics_file, pushgateway, log_level, log_format):
    # fmt: on
    """Stop idle or over-age JupyterHub servers (and, if asked, delete idle users).

    One pass, then exit: 0 all done, 1 some action failed, 2 bad usage, 3 Hub unusable.
    Durations are seconds (3600) or with units, largest first: 90m, 1h, 8h30m, 30d.
    """
    token, token_warning = _read_token(api_token_file)
    verify, cert = _tls(ssl_enabled, internal_certs_location, ca_bundle, insecure)
    _check_outputs(metrics_file, pushgateway, warn_before, notify_command, state_file)
    if (keep_busy_kernels or activity_source == "kernels") and not server_api_url:
        raise click.UsageError(
            "--keep-busy-kernels and --activity-source=kernels need --server-api-url"
        )
    _setup_logging(log_level, log_format, token)
    if token_warning:
        log.warning("%s", token_warning)
    if clock == "local":
        # Our clock alone culls early when it is fast: "now" is the earlier of the two clocks.
        log.warning("--clock local no longer changes anything: the earlier clock is used")
    if found := ctx.meta.get("idle_cull.found_config"):
        log.info("read the config file %s (found in the working directory)", found)
    arbiter = arbiter or ctx.meta.get("idle_cull.arbiter")  # --arbiter wins over the file's hook
    if not cull_every and os.environ.get("JUPYTERHUB_SERVICE_NAME"):
        # Started by the Hub, which restarts a service that exits: loop, as upstream does.
        cull_every = max(1, timeout // 2)
    if insecure:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    concurrency = concurrency or CONCURRENCY_CEILING
    policy = Policy(
        timeout=timeout, max_age=max_age, cull_users=cull_users,
        cull_admin_users=cull_admin_users, cull_default_servers=cull_default_servers,
        cull_named_servers=cull_named_servers, remove_named_servers=remove_named_servers,
        arbiter=arbiter, user_timeout=user_timeout, exclude_users=frozenset(exclude_user),
        exclude_groups=frozenset(exclude_group), rules=ctx.meta.get("idle_cull.rules", ()),
        warn_before=warn_before, keep_busy_kernels=keep_busy_kernels,
        activity_source=activity_source,
    )
    settings = PassSettings(
        concurrency=concurrency, fixed_concurrency=fixed_concurrency, page_size=api_page_size,
        dry_run=dry_run, max_runtime=max_runtime, wait_for_stop=wait_for_stop,
        notify_command=tuple(shlex.split(notify_command or "")), state_file=state_file,
        report_kept=as_json, dry_run_looks=dry_run_looks,
    )
    client = HubClient(url, token, concurrency=concurrency, request_timeout=request_timeout,
                       retries=retries, verify=verify, cert=cert)
    looker = None
    if server_api_url:
        looker = ServerClient(client, server_api_url, min(request_timeout, LOOK_TIMEOUT), retries)
    on_terminal = sys.stderr.isatty()
    stop = threading.Event()
    with _exclusive(lock_file) as acquired, _stop_on_signals(stop), contextlib.closing(client):
        if not acquired:
            log.info("another pass holds %s; nothing done", lock_file)
            return EXIT_OK
        while True:
            if insecure:
                log.warning("TLS verification is off (--insecure)")
            report = run_pass(client, policy, settings, stop,
                              _TerminalProgress() if on_terminal else None, looker=looker)
            if metrics_file or pushgateway:  # first: a file it cannot write is a failure
                write_metrics(report, metrics_file, pushgateway)
            log.log(
                _summary_level(report),
                "%s",
                summary_line(report),
                extra={"event": "summary", "summary": report.summary(), **report.fatal_fields},
            )
            if on_terminal:
                click.echo(result_table(report), err=True)
            if as_json:
                click.echo(redact(json.dumps(report.as_dict()), token))
            if not cull_every:
                return report.exit_code
            if stop.wait(cull_every):
                log.info("stopping on signal")
                return EXIT_OK


if __name__ == "__main__":
    main()
