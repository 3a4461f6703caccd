"""A real JupyterHub with a real configurable-http-proxy on 127.0.0.1, for e2e tests and the demo.

`RealHub` writes a jupyterhub_config.py into a work directory, starts `jupyterhub` from this
venv, waits until the Hub answers both directly and through the proxy, and on `stop()` ends the
Hub and then, by PID, anything the Hub started that outlived it (proxy, managed services, servers).

Servers are stand-ins by default (`LightSpawner`): no process per server, one tiny HTTP server
inside the Hub process answers for all of them, so a test can run many servers in seconds. They
stay running across a Hub restart when the Hub keeps its servers (`cleanup_servers = False`,
through `extra_config`, as tests/bench/realhub_bench.py does).
`spawner="simple"` uses real `jupyterhub-singleuser` processes instead.

Services and their roles (tokens are random per hub, passed to the Hub in its environment):
  harness            creates users, starts servers, bumps activity (the Hub's admin role)
  idle-culler        exactly the scopes the README asks for: CULLER_SCOPES
  idle-culler-users  CULLER_SCOPES + admin:users (for --cull-users, as the README says)
  idle-culler-delete-users  CULLER_SCOPES + read:users + delete:users, the narrower choice for
                     --cull-users (read:users shows `created`)
  idle-culler-groups  CULLER_SCOPES + read:users:groups (for --exclude-group, as the README says)
  culler-no-<scope>  CULLER_SCOPES minus one scope (see lacking()), for the missing-scope error
  idle-culler-looks  CULLER_SCOPES + tokens, to look inside servers (README): each look with a
                     token it has the Hub make for the server's owner
  idle-culler-looks-one  CULLER_SCOPES + tokens!user=one: a filtered role

Real servers (spawner="simple") report their activity to the Hub every 2 s, and `start_kernel`
and `run_code` drive their kernels over REST and the kernel websocket, as a browser would.
"""

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import requests
from jupyterhub import __version__ as HUB_VERSION
from jupyterhub.spawner import Spawner
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

REPO = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
CULLER = REPO / "idle_cull.py"
BIN = Path(sys.executable).parent  # the venv's bin: jupyterhub, jupyterhub-singleuser
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]


def chp_command():
    """configurable-http-proxy from PATH, else the one `make` installs into .node/."""
    found = shutil.which("configurable-http-proxy")
    local = REPO / ".node" / "node_modules" / ".bin" / "configurable-http-proxy"
    if found:
        return found
    if local.exists():
        return str(local)
    raise RuntimeError(
        "configurable-http-proxy not found: run `make test` or `make demo`, which install it"
    )


def lacking(scope):
    """Name of the service whose token has CULLER_SCOPES except `scope`."""
    return "culler-no-" + scope.replace(":", "-")


def free_ports(count):
    """Ports free on 127.0.0.1 now; all held open together, so they are distinct."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------------------------------------
# The light spawner: runs inside the Hub process (the generated config imports it from here).

_stand_in_url = None


class _Ok(RequestHandler):
    def get(self, *_):
        self.set_header("X-JupyterHub-Version", HUB_VERSION)
        self.write({"ok": True})


def _stand_in_server():
    """Start (once per Hub process) the HTTP server that answers for every light server.

    The Hub only declares a server ready after an HTTP GET to its URL answers with a non-5xx
    status, and it reads X-JupyterHub-Version from that answer; any path must answer 200.
    """
    global _stand_in_url
    if _stand_in_url is None:
        sockets = bind_sockets(0, "127.0.0.1")
        HTTPServer(Application([(r".*", _Ok)])).add_sockets(sockets)
        _stand_in_url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    return _stand_in_url


class LightSpawner(Spawner):
    """A server with no process. `user_options` (the JSON body of the start request) can hold
    `start_delay` (seconds the server stays pending) and `stop_delay` (seconds a stop takes, so
    that the Hub answers a stop with 202 once they exceed its slow_stop_timeout)."""

    running = False

    def _delay(self, key):
        return float((self.user_options or {}).get(key, 0))

    async def start(self):
        await asyncio.sleep(self._delay("start_delay"))
        self.running = True
        return _stand_in_server()

    async def stop(self, now=False):
        await asyncio.sleep(self._delay("stop_delay"))
        self.running = False

    async def poll(self):
        return None if self.running else 0

    # After a restart the Hub asks a running server where it is and checks that it answers
    # there: the stand-in server of the old Hub process is gone, this process has its own.
    async def get_url(self):
        return _stand_in_server() + self.server.base_url

    # The Hub saves state in its database after start and restores it after a restart.
    def get_state(self):
        state = super().get_state()
        if self.running:
            state["running"] = True
        return state

    def load_state(self, state):
        super().load_state(state)
        self.running = bool(state.get("running"))

    def clear_state(self):
        super().clear_state()
        self.running = False


# ---------------------------------------------------------------------------------------------
# Process helpers (Linux /proc): the Hub starts the proxy, services and real servers in new
# sessions, so they are not in its process group; we find them by parent PID instead.


def _ppid_and_state(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def alive(pid):
    """True if the process exists and is not a zombie."""
    _, state = _ppid_and_state(pid)
    return state is not None and state != "Z"


def descendants(pid):
    """PIDs of all live descendants of pid."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            ppid, state = _ppid_and_state(int(entry.name))
            if ppid is not None and state != "Z":
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def kill_and_wait(pids, timeout=10):
    """SIGTERM, then SIGKILL after timeout; returns the PIDs that were still alive."""
    pids = [p for p in pids if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        if not any(alive(p) for p in pids):
            break
    return pids


def wait_until(predicate, timeout, what, interval=0.2):
    """Poll predicate until it returns something truthy; return that, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------


@dataclass
class CullResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self):
        """The --json report (the last JSON line on stdout), or None."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return None

    def __str__(self):
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


class RealHub:
    """One JupyterHub + proxy. Use as a context manager, or call start() and stop()."""

    def __init__(self, workdir, *, spawner="light", managed_culler=None, extra_config=()):
        self.workdir = Path(workdir)
        self.spawner = spawner
        self.extra_config = list(extra_config)  # lines appended to jupyterhub_config.py
        # A command line: the Hub itself runs it as the managed service "managed-culler".
        self.managed_culler = managed_culler
        self.hub_port, self.proxy_port, self.proxy_api_port = free_ports(3)
        self.api_url = f"http://127.0.0.1:{self.hub_port}/hub/api"
        self.public_url = f"http://127.0.0.1:{self.proxy_port}"
        self.log_path = self.workdir / "jupyterhub.log"
        self.proc = None
        self.proxy_pid = None
        self.leftovers = []  # PIDs stop() had to kill because the Hub did not stop them
        self.tokens = {
            name: secrets.token_hex(16)
            for name in [
                "harness",
                "idle-culler",
                "idle-culler-users",
                "idle-culler-delete-users",
                "idle-culler-groups",
                "idle-culler-looks",
                "idle-culler-looks-one",
            ]
            + [lacking(scope) for scope in CULLER_SCOPES]
        }
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {self.tokens['harness']}"

    # -- configuration -------------------------------------------------------------------------

    def _roles_and_services(self):
        roles = [
            # Only an admin may create admin users, so the harness is in the Hub's admin role.
            {"name": "admin", "services": ["harness"]},
            {"name": "idle-culler", "scopes": CULLER_SCOPES, "services": ["idle-culler"]},
            {
                "name": "idle-culler-users",
                "scopes": [*CULLER_SCOPES, "admin:users"],
                "services": ["idle-culler-users"],
            },
            {
                "name": "idle-culler-delete-users",
                "scopes": [*CULLER_SCOPES, "read:users", "delete:users"],
                "services": ["idle-culler-delete-users"],
            },
            {
                "name": "idle-culler-groups",
                "scopes": [*CULLER_SCOPES, "read:users:groups"],
                "services": ["idle-culler-groups"],
            },
            {
                "name": "idle-culler-looks",
                "scopes": [*CULLER_SCOPES, "tokens"],
                "services": ["idle-culler-looks"],
            },
            {
                "name": "idle-culler-looks-one",
                "scopes": [*CULLER_SCOPES, "tokens!user=one"],
                "services": ["idle-culler-looks-one"],
            },
        ]
        for scope in CULLER_SCOPES:
            name = lacking(scope)
            rest = [s for s in CULLER_SCOPES if s != scope]
            roles.append({"name": name, "scopes": rest, "services": [name]})
        services = [{"name": name, "api_token_env": _env_name(name)} for name in self.tokens]
        if self.managed_culler:
            # The Hub makes its own token for a managed service; the role gives it the scopes.
            services.append(
                {
                    "name": "managed-culler",
                    "command": [str(part) for part in self.managed_culler],
                }
            )
            roles.append(
                {"name": "managed-culler", "scopes": CULLER_SCOPES, "services": ["managed-culler"]}
            )
        return roles, services

    def home(self, user):
        """The home of a user's real server (spawner="simple"): its HOME, its working
        directory, and where its own ~/.jupyter config is read from."""
        return self.workdir / "homes" / user

    def _spawner_config(self):
        if self.spawner == "light":
            return [
                f"sys.path.insert(0, {str(TESTS_DIR)!r})",
                "from realhub import LightSpawner",
                "c.JupyterHub.spawner_class = LightSpawner",
                # Answer a slow start or stop with 202 after 1 s instead of 10 s (real servers
                # keep the default: they take about 1 s to stop, which is not "slow").
                'c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 1, "slow_stop_timeout": 1}',
            ]
        homes = self.workdir / "homes"
        homes.mkdir(exist_ok=True)
        # as root, jupyter-server refuses to start without --allow-root
        args = ["--allow-root"] if os.geteuid() == 0 else []
        return [
            'c.JupyterHub.spawner_class = "simple"',
            f"c.Spawner.cmd = [{str(BIN / 'jupyterhub-singleuser')!r}]",
            f"c.Spawner.args = {args!r}",
            f"c.SimpleLocalProcessSpawner.home_dir_template = {str(homes / '{username}')!r}",
            # The server tells the Hub its own activity (kernels, API requests) this often.
            'c.Spawner.environment = {"JUPYTERHUB_ACTIVITY_INTERVAL": "2"}',
        ]

    def write_config(self):
        roles, services = self._roles_and_services()
        w = self.workdir
        lines = [
            "# Written by tests/realhub.py for a throw-away Hub. Tokens come from the environment.",
            "import os",
            "import sys",
            "",
            "c = get_config()  # noqa: F821",
            'c.JupyterHub.authenticator_class = "null"',
            'c.JupyterHub.ip = "127.0.0.1"',
            f"c.JupyterHub.port = {self.proxy_port}",
            'c.JupyterHub.hub_ip = "127.0.0.1"',
            f"c.JupyterHub.hub_port = {self.hub_port}",
            f'c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"',
            f"c.ConfigurableHTTPProxy.command = [{chp_command()!r}]",
            f"c.ConfigurableHTTPProxy.pid_file = {str(w / 'proxy.pid')!r}",
            f"c.JupyterHub.pid_file = {str(w / 'jupyterhub.pid')!r}",
            f"c.JupyterHub.db_url = {'sqlite:///' + str(w / 'jupyterhub.sqlite')!r}",
            f"c.JupyterHub.cookie_secret_file = {str(w / 'cookie_secret')!r}",
            "c.JupyterHub.allow_named_servers = True",
            # The Hub takes the proxy's route activity this often; with no traffic it must not
            # make an idle server look active.
            "c.JupyterHub.last_activity_interval = 2",
            f"c.JupyterHub.load_roles = {roles!r}",
            f"services = {services!r}",
            "for service in services:",
            '    if "api_token_env" in service:',
            '        service["api_token"] = os.environ[service.pop("api_token_env")]',
            "c.JupyterHub.services = services",
            *self._spawner_config(),
            *self.extra_config,
        ]
        path = w / "jupyterhub_config.py"
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout=60):
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
        env.update({_env_name(name): token for name, token in self.tokens.items()})
        env["CONFIGPROXY_AUTH_TOKEN"] = secrets.token_hex(16)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the Hub writes to it until stop()
        self.proc = subprocess.Popen(
            [str(BIN / "jupyterhub"), "-f", str(config)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal goes to us; we stop the Hub
        )
        log.close()
        try:
            wait_until(self._answers, timeout, "the Hub and its proxy to answer")
        except BaseException:
            self.stop()
            raise
        self.proxy_pid = int((self.workdir / "proxy.pid").read_text())
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"jupyterhub exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            direct = requests.get(f"{self.api_url}/", timeout=2)
            proxied = requests.get(f"{self.public_url}/hub/api/", timeout=2)
        except requests.ConnectionError:
            return False
        return direct.ok and proxied.ok

    def stop(self, timeout=30):
        """Stop the Hub (SIGTERM, as a service manager would) and make sure that nothing it
        started is left running. Returns the PIDs that had to be killed (also in .leftovers)."""
        if self.proc is None:
            return []
        started = set(descendants(self.proc.pid))
        if self.proxy_pid:
            started.add(self.proxy_pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.leftovers = kill_and_wait(started)
        self.proc = None
        return self.leftovers

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines=30):
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- REST API with the harness token --------------------------------------------------------

    def api(self, method, path, token=None, **kwargs):
        """A request to the Hub's REST API; `token` defaults to the harness token."""
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"token {token}"
        return self.session.request(
            method, f"{self.api_url}{path}", headers=headers, timeout=30, **kwargs
        )

    def _check(self, response, *ok):
        if response.status_code not in ok:
            raise AssertionError(
                f"{response.request.method} {response.request.url} -> "
                f"{response.status_code} {response.text}\n{self.log_tail()}"
            )
        return response

    def users(self):
        """{name: user model}, stopped named servers included; follows every page."""
        users, offset = {}, 0
        while True:
            page = self._check(
                self.api(
                    "GET",
                    "/users",
                    params={"include_stopped_servers": 1, "offset": offset, "limit": 200},
                    headers={"Accept": "application/jupyterhub-pagination+json"},
                ),
                200,
            ).json()
            users.update((u["name"], u) for u in page["items"])
            if not page["_pagination"]["next"]:
                return users
            offset = page["_pagination"]["next"]["offset"]

    def snapshot(self):
        """What a test asserts on: {user: {server name ("" = default): status}}, status being
        "ready", "pending" (start or stop in progress) or "stopped" (a named server kept)."""
        result = {}
        for name, user in self.users().items():
            servers = {}
            for server_name, server in user["servers"].items():
                if server["pending"]:
                    servers[server_name] = "pending"
                elif server["ready"]:
                    servers[server_name] = "ready"
                elif server_name:  # a stopped default server is no more than an empty slot
                    servers[server_name] = "stopped"
            result[name] = servers
        return result

    def create_users(self, *names, admin=False):
        self._check(
            self.api("POST", "/users", json={"usernames": list(names), "admin": admin}), 201
        )

    def create_group(self, name, *users):
        """A new group with these (existing) users as its members."""
        self._check(self.api("POST", f"/groups/{name}", json={"users": list(users)}), 201)

    def _server_path(self, user, server=""):
        return f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"

    def start_server(self, user, server="", wait=True, **options):
        """Start a server (options become its user_options); wait until it is ready."""
        self._check(self.api("POST", self._server_path(user, server), json=options), 201, 202)
        if wait:
            self.wait_ready(user, server)

    def wait_ready(self, user, server="", timeout=60):
        def ready():
            model = self._check(self.api("GET", f"/users/{user}"), 200).json()
            found = model["servers"].get(server)
            return found and found["ready"]

        wait_until(ready, timeout, f"server {user}/{server or '(default)'} to be ready")

    def wait_settled(self, timeout=60):
        """Wait until no server is starting or stopping."""
        wait_until(
            lambda: "pending" not in str(self.snapshot()), timeout, "pending servers to settle"
        )

    def touch(self, user, *servers):
        """Record activity now for the user and the given servers ("" = default)."""
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {"last_activity": now, "servers": {s: {"last_activity": now} for s in servers}}
        self._check(self.api("POST", f"/users/{user}/activity", json=body), 200)

    def server_state(self, user, server=""):
        """The spawner state (needs admin:server_state), e.g. {"pid": 1234} for real servers."""
        model = self._check(self.api("GET", f"/users/{user}"), 200).json()
        return model["servers"][server]["state"]

    def delete_all_users(self):
        """Back to an empty Hub: stop and remove every server, then delete every user and
        every group."""
        for name, user in self.users().items():
            for server in user["servers"]:
                if server:
                    self._check(
                        self.api("DELETE", self._server_path(name, server), json={"remove": True}),
                        202,
                        204,
                        404,
                    )
                else:
                    self._check(self.api("DELETE", self._server_path(name)), 202, 204, 404)
        self.wait_settled()
        for name in self.users():
            self._check(self.api("DELETE", f"/users/{name}"), 204, 404)
        for group in self._check(self.api("GET", "/groups"), 200).json():
            self._check(self.api("DELETE", f"/groups/{group['name']}"), 204, 404)

    # -- inside real servers (spawner="simple"), through the proxy, with the harness token ----

    def server_url(self, user, server=""):
        return f"{self.public_url}/user/{user}/" + (f"{server}/" if server else "")

    def start_kernel(self, user, server=""):
        """Start a python3 kernel over REST (no client connects: it stays "starting")."""
        response = self.session.post(
            f"{self.server_url(user, server)}api/kernels", json={"name": "python3"}, timeout=60
        )
        return self._check(response, 201).json()["id"]

    def run_code(self, user, server, kernel_id, code, until="idle", timeout=60):
        """Send `code` to the kernel over its websocket, as a notebook does; disconnect once
        the kernel says `until` ("busy": the cell has started, "idle": it has finished)."""
        import websocket  # websocket-client

        url = f"{self.server_url(user, server)}api/kernels/{kernel_id}/channels"
        ws = websocket.create_connection(
            "ws" + url[len("http") :],
            header=[f"Authorization: token {self.tokens['harness']}"],
            timeout=timeout,
        )
        try:
            msg_id = secrets.token_hex(8)
            header = {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "session": secrets.token_hex(8),
                "username": "harness",
                "version": "5.3",
                "date": datetime.now(UTC).isoformat(),
            }
            content = {"code": code, "silent": False, "store_history": False,
                       "user_expressions": {}, "allow_stdin": False}  # fmt: skip
            message = {"header": header, "parent_header": {}, "metadata": {},
                       "content": content, "channel": "shell", "buffers": []}  # fmt: skip
            ws.send(json.dumps(message))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                reply = json.loads(ws.recv())
                if (
                    reply.get("msg_type") == "status"
                    and reply.get("parent_header", {}).get("msg_id") == msg_id
                    and reply["content"]["execution_state"] == until
                ):
                    return
            raise TimeoutError(f"kernel {kernel_id} of {user} never said {until}")
        finally:
            ws.close()

    def kernels(self, user, server=""):
        """The server's own /api/kernels, as it answers now."""
        response = self.session.get(
            f"{self.server_url(user, server)}api/kernels", params={"no_track_activity": 1}
        )
        return self._check(response, 200).json()

    # -- running the culler --------------------------------------------------------------------

    def culler_env(self, token="idle-culler", env=None, base_env=None):
        """The environment for a culler process.

        token: a service name from self.tokens, or None for no token at all.
        base_env: the environment to start from (default: ours), JUPYTERHUB_* and IDLE_CULL_*
        variables removed so that only what the test passes in `env` counts."""
        base = os.environ if base_env is None else base_env
        run_env = {k: v for k, v in base.items() if not k.startswith(("JUPYTERHUB_", "IDLE_CULL_"))}
        if token is not None:
            run_env["JUPYTERHUB_API_TOKEN"] = self.tokens[token]
        run_env.update(env or {})
        return run_env

    def run_culler(
        self, *args, token="idle-culler", env=None, base_env=None, command=None, cwd=None
    ):
        """Run idle_cull.py (or `command`) to the end as a separate process against this Hub."""
        command = command or [sys.executable, str(CULLER)]
        done = subprocess.run(
            [*command, "--url", self.api_url, *args],
            env=self.culler_env(token, env, base_env),
            cwd=cwd or self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "internal error" not in done.stderr, done.stderr  # a bug must fail the test loudly
        return CullResult(done.returncode, done.stdout, done.stderr)


def _env_name(service):
    return "REALHUB_TOKEN_" + service.upper().replace("-", "_").replace(":", "_")
