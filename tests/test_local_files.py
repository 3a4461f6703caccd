"""Issue 17: files on the culler's machine and log forgery.

Another user of the machine can write to shared folders (/tmp, /run/lock) but not to the
culler's own files; a Hub user chooses their user and server names. Neither may steer the
culler through idle-cull: its settings files, sys.path, its state, metrics and lock files, or
its log lines. "Another user" is uid 65534 here: files of its own are made by processes running
as it (sh, ln, flock), so the kernel's rules for shared folders apply as they would. That needs
root; without it those tests skip with one line (and fail in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, TOKEN, assert_usage_error, cannot_run, run_cull
from fakehub import iso, server

OTHER = 65534  # nobody: another user of the machine
CULLER = 65533  # a culler that is not root, where a test needs one
FORGED = "\n[INFO 2026-01-01 00:00:00,000 idle-cull] summary: users scanned=0, servers stopped=0"


def need_root(check: str) -> None:
    if os.geteuid() != 0:
        cannot_run(f"{check}: needs root, to act as another user (uid {OTHER})")


def as_user(uid: int, *argv: str, **kw) -> subprocess.CompletedProcess:
    """A program run as `uid` (group the same), with no other group."""
    return subprocess.run(
        argv, user=uid, group=uid, extra_groups=[], capture_output=True, text=True, timeout=60, **kw
    )


def plant(path: Path, content: str = "", mode: int = 0o644, uid: int = OTHER) -> Path:
    """A file made by `uid` itself."""
    done = as_user(uid, "sh", "-c", f'umask 0; cat > "$1"; chmod {mode:o} "$1"', "-", str(path),
                   input=content)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return path


def plant_symlink(link: Path, target: Path, uid: int = OTHER) -> Path:
    done = as_user(uid, "ln", "-s", str(target), str(link))
    assert done.returncode == 0, done.stderr
    return link


@pytest.fixture(autouse=True)
def own_sys_path(monkeypatch):
    """A Python config file's folder goes on sys.path: not beyond the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def shared():
    """A folder under /tmp that everyone can reach (pytest's own are private to root), with
    `shared/` in it like /tmp or /run/lock: 1777. Removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="idle-cull-test-", dir="/tmp"))
    base.chmod(0o755)
    (base / "shared").mkdir()
    (base / "shared").chmod(0o1777)
    yield base
    shutil.rmtree(base)


@pytest.fixture
def hub(fake_hub):
    """An idle server and an active one: `timeout = 1` from a planted file would stop both."""
    fake_hub.add_user("idle", servers={"": server(last_activity=iso(7200))})
    fake_hub.add_user("active", servers={"": server(last_activity=iso(30))})
    return fake_hub


# ---- 3. settings files others can write steer nothing --------------------------------------


def config_text(kind: str, marker: Path) -> str:
    if kind == "toml":
        return "timeout = 1\n"
    return f"open({str(marker)!r}, 'w').write('ran')\nc.IdleCuller.timeout = 1\n"


def with_mode(mode: int):
    def case(folder, name, text):
        path = folder / name
        path.write_text(text)
        path.chmod(mode)
        return path, f"writable by group or others (mode {mode:04o})"

    case.__name__ = f"mode_{mode:04o}"  # the test's id
    return case


def in_a_0777_folder(folder, name, text):
    (folder / "open").mkdir()
    (folder / "open").chmod(0o777)
    (folder / "open" / name).write_text(text)
    return folder / "open" / name, f"the folder {folder / 'open'} is writable by group or others"


def in_a_0775_folder(folder, name, text):
    (folder / "group").mkdir()
    (folder / "group").chmod(0o775)
    (folder / "group" / name).write_text(text)
    return folder / "group" / name, f"the folder {folder / 'group'} is writable by group"


def through_a_symlink_into_a_0777_folder(folder, name, text):
    path, _ = in_a_0777_folder(folder, name, text)
    (folder / name).symlink_to(path)
    return folder / name, f"the folder {folder / 'open'} is writable by group or others"


CASES = [with_mode(0o666), with_mode(0o664), with_mode(0o646), in_a_0777_folder, in_a_0775_folder,
         through_a_symlink_into_a_0777_folder]  # fmt: skip


def owned_by_another_user(folder, name, text):
    return plant(folder / "shared" / name, text), f"it is owned by uid {OTHER}"


def in_a_folder_of_another_user(folder, name, text):
    theirs = folder / "shared" / "theirs"
    assert as_user(OTHER, "mkdir", "-m", "755", str(theirs)).returncode == 0
    (theirs / name).write_text(text)  # root's own file, but the folder is theirs to change
    return theirs / name, f"{theirs} is owned by uid {OTHER}"


def their_symlink_in_a_sticky_folder(folder, name, text):
    """/tmp/x.toml -> a good file of root's: which file is read is theirs to choose."""
    good = folder / f"good-{name}"
    good.write_text(text)
    link = plant_symlink(folder / "shared" / name, good)
    return link, f"{link} is owned by uid {OTHER}"


OTHER_USER_CASES = [owned_by_another_user, in_a_folder_of_another_user,
                    their_symlink_in_a_sticky_folder]  # fmt: skip


def assert_refused(hub, result, path, why, marker):
    assert_usage_error(result, f"{path} is refused: ", hub)  # exit 2, one line, nothing sent
    assert why in result.stderr
    assert not marker.exists()  # the Python file's code never ran


@pytest.mark.parametrize("kind", ["toml", "py"])
@pytest.mark.parametrize("case", CASES)
def test_a_settings_file_others_can_write_is_refused(hub, tmp_path, kind, case):
    marker = tmp_path / "ran"
    path, why = case(tmp_path, f"c.{kind}", config_text(kind, marker))
    result = run_cull(hub, f"--config={path}")
    assert_refused(hub, result, path, why, marker)


@pytest.mark.parametrize("kind", ["toml", "py"])
@pytest.mark.parametrize("case", OTHER_USER_CASES)
def test_a_settings_file_another_user_could_choose_is_refused(hub, shared, kind, case):
    need_root("settings files of another user")
    marker = shared / "ran"
    path, why = case(shared, f"c.{kind}", config_text(kind, marker))
    result = run_cull(hub, f"--config={path}")
    assert_refused(hub, result, path, why, marker)


def test_idle_culler_config_py_others_can_write_is_refused(hub, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    path, why = with_mode(0o666)(tmp_path, "idle_culler_config.py", config_text("py", marker))
    monkeypatch.chdir(tmp_path)
    assert_refused(hub, run_cull(hub), path, why, marker)


@pytest.mark.parametrize("kind", ["toml", "py"])
def test_a_settings_file_of_the_cullers_own_is_read(hub, tmp_path, kind):
    """0644 in a 0755 folder: read as before (timeout = 1 stops both servers)."""
    marker = tmp_path / "ran"
    path = tmp_path / f"c.{kind}"
    path.write_text(config_text(kind, marker))
    path.chmod(0o644)
    result = run_cull(hub, f"--config={path}")
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("active", ""), ("idle", "")]
    assert marker.exists() == (kind == "py")


def test_roots_file_in_a_sticky_folder_is_read(hub, shared):
    """Others may add names to /tmp, but not replace root's file there."""
    need_root("a sticky folder shared with another user")
    path = shared / "shared" / "c.toml"
    path.write_text("timeout = 1\n")
    result = run_cull(hub, f"--config={path}")
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("active", ""), ("idle", "")]


# The culler as a user that is not root: started as root with idle-cull (and what it imports
# only when needed) loaded, then that user for good, so that neither this Python nor the
# checkout need be where that user may read.
AS_CULLER = """\
import fcntl, os, tomllib
import idle_cull
os.setgroups([])
os.setgid({uid})
os.setuid({uid})
idle_cull.main()
"""


def run_as_culler(hub, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JUPYTERHUB_API_TOKEN": TOKEN,
           "IDLE_CULL_URL": hub.url}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", AS_CULLER.format(uid=CULLER), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_culler_that_is_not_root_reads_its_own_and_roots_files_only(hub, shared):
    need_root("a culler that is not root")
    folder = shared / "culler"
    folder.mkdir(mode=0o755)
    os.chown(folder, CULLER, CULLER)
    own = plant(folder / "own.toml", "timeout = 1\n", uid=CULLER)
    roots = folder / "roots.toml"
    roots.write_text("timeout = 1\n")
    theirs = plant(shared / "shared" / "theirs.toml", "timeout = 1\n")
    for path, exit_code in [(own, 0), (roots, 0), (theirs, 2)]:
        done = run_as_culler(hub, "--dry-run", f"--config={path}", cwd=folder)
        assert done.returncode == exit_code, done.stderr
    assert f"it is owned by uid {OTHER}, not this user (uid {CULLER}) or root" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and hub.stops == []


# ---- 4. the working directory is never on sys.path ----------------------------------------

PLANTED = "open({marker!r}, 'w').write('ran as ' + str(__import__('os').geteuid()))\n"


def plant_modules(folder: Path, marker: Path) -> None:
    """What another user leaves in a shared working folder: a package idle-cull imports only
    when needed, and a module an --arbiter would name."""
    assert as_user(OTHER, "mkdir", "-m", "755", str(folder / "prometheus_client")).returncode == 0
    plant(folder / "prometheus_client" / "__init__.py", PLANTED.format(marker=str(marker)))
    plant(folder / "planted.py", PLANTED.format(marker=str(marker)) + "decide = print\n")


@pytest.mark.parametrize(
    "python_flags, args",
    [
        (["-m"], []),  # python -m puts the working directory first; idle-cull takes it off
        (["-P", "-m"], ["--config=idle_culler_config.py"]),  # root's own file, read as before
        (["-P", "-m"], []),  # idle_culler_config.py found in the working directory
        (["-P", "-m"], ["--arbiter=planted:decide"]),
    ],
    ids=["python-m", "config", "found-config", "arbiter"],
)
def test_a_module_planted_in_the_working_directory_never_runs(
    hub, shared, tmp_path, python_flags, args
):
    need_root("modules planted by another user")
    cwd = shared / "shared"
    marker = tmp_path / "planted-code-ran"
    plant_modules(cwd, marker)
    (cwd / "idle_culler_config.py").write_text("c.IdleCuller.timeout = 3600\n")  # root's, 0644
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDLE_CULL_", "JUPYTERHUB_"))}
    env.update(PYTHONPATH=str(REPO), JUPYTERHUB_API_TOKEN=TOKEN)
    metrics = tmp_path / "idle_cull.prom"
    done = subprocess.run(
        [sys.executable, *python_flags, "idle_cull", "--url", hub.url, "--dry-run",
         f"--metrics-file={metrics}", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert not marker.exists(), marker.read_text()
    if "--arbiter=planted:decide" in args:
        assert done.returncode == 2
        assert "cannot load planted:decide: ModuleNotFoundError" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert "idle_cull_users_scanned 2.0" in metrics.read_text()  # the real prometheus_client


def test_a_hook_module_beside_a_python_config_in_a_shared_folder_is_not_imported(
    hub, shared, tmp_path, monkeypatch
):
    """Only a folder nobody else can write is put on sys.path for the file's imports; never
    the working directory, where upstream's `python -m` looked."""
    need_root("modules planted by another user")
    cwd = shared / "shared"
    marker = tmp_path / "planted-code-ran"
    plant_modules(cwd, marker)
    (cwd / "c.py").write_text(
        "from planted import decide\nc.IdleCuller.cull_arbiter_hook = decide\n"
    )
    monkeypatch.chdir(cwd)
    result = run_cull(hub, "--config=c.py")
    assert_usage_error(result, "ModuleNotFoundError: No module named 'planted'", hub)
    assert not marker.exists()


# ---- 5. state and metrics files: no guessable names, never through a symlink ----------------


def warn_and_metrics_args(folder: Path, state: Path, metrics: Path) -> list[str]:
    return ["--warn-before=900", "--notify-command=true", f"--state-file={state}",
            f"--metrics-file={metrics}", "--json"]  # fmt: skip


def assert_own_file(path: Path, mode: int) -> None:
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file"
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), mode), path


def test_symlinks_at_every_guessable_name_are_not_followed(fake_hub, tmp_path):
    """At the state and metrics files, and at each name a temporary file of theirs could have
    (the old <path>.<pid>.tmp: in-process, the pid is this one)."""
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(3300))})  # warned
    folder = tmp_path / "files"
    folder.mkdir()
    state, metrics = folder / "warned.json", folder / "idle_cull.prom"
    victims = {}
    for path in (state, metrics):
        for name in (path.name, f"{path.name}.{os.getpid()}.tmp"):
            victim = tmp_path / f"victim-{name}"
            victim.write_text("precious\n")
            (folder / name).symlink_to(victim)
            victims[victim] = folder / name
    result = run_cull(fake_hub, "--timeout=3600", *warn_and_metrics_args(folder, state, metrics))
    assert result.exit_code == 0, result.stderr
    assert result.json["summary"]["warnings_sent"] == 1
    assert [victim.read_text() for victim in victims] == ["precious\n"] * len(victims)
    assert_own_file(state, 0o600)
    assert_own_file(metrics, 0o644)
    assert json.loads(state.read_text()) == {"warned": [{"user": "soon", "server": ""}]}
    assert "idle_cull_users_scanned 1.0" in metrics.read_text()
    # Nothing left behind but the planted links at the old temporary names.
    left = {p.name for p in folder.iterdir()} - {state.name, metrics.name}
    assert left == {f"{p.name}.{os.getpid()}.tmp" for p in (state, metrics)}


def test_a_file_planted_at_a_guessable_name_in_a_shared_folder_changes_nothing(fake_hub, shared):
    """Another user's file at the old temporary name: the state file is still the culler's own
    and 0600 (it was the other user's, mode 0666), the metrics file 0644 whatever the umask."""
    need_root("files planted by another user")
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(3300))})
    folder = shared / "shared"
    state, metrics = folder / "warned.json", folder / "idle_cull.prom"
    for path in (state, metrics):
        plant(folder / f"{path.name}.{os.getpid()}.tmp", "", mode=0o666)
    old_umask = os.umask(0o077)
    try:
        args = warn_and_metrics_args(folder, state, metrics)
        result = run_cull(fake_hub, "--timeout=3600", *args)
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.stderr
    assert_own_file(state, 0o600)
    assert_own_file(metrics, 0o644)


def test_a_state_file_another_user_wrote_is_not_read(fake_hub, tmp_path):
    """Its warnings would otherwise be taken as sent: the server is warned all the same."""
    need_root("a state file of another user")
    fake_hub.add_user("soon", servers={"": server(last_activity=iso(3300))})
    state, metrics = tmp_path / "warned.json", tmp_path / "idle_cull.prom"
    state.write_text(json.dumps({"warned": [{"user": "soon", "server": ""}]}))
    os.chown(state, OTHER, OTHER)
    result = run_cull(fake_hub, "--timeout=3600", *warn_and_metrics_args(tmp_path, state, metrics))
    assert result.exit_code == 0, result.stderr
    assert result.json["summary"]["warnings_sent"] == 1
    assert "cannot read the state file" in result.stderr
    assert_own_file(state, 0o600)


# ---- 6. the lock cannot be squatted --------------------------------------------------------


class Squatter:
    """Another user's process holding flock on a file, as long as the test wants."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen(
            ["flock", "-n", str(path), "sh", "-c", "echo held; exec sleep 60"],
            user=OTHER, group=OTHER, extra_groups=[], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout.readline() == "held\n", "the squatter did not get the lock"

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.proc.kill()
        self.proc.wait()


def assert_lock_refused(hub, result, lock, why):
    assert result.exit_code == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == f"idle-cull: error: the lock file {lock} {why}; nothing done"
    assert hub.requests == []


def test_a_lock_file_another_user_made_and_holds_is_an_error(hub, shared):
    """/run/lock is 1777: another user makes the lock file first and holds it."""
    need_root("a lock held by another user")
    if not shutil.which("flock"):
        cannot_run("lock squatting: flock not found (Debian's util-linux; `make test-tools`)")
    lock = shared / "shared" / "idle-cull.lock"
    with Squatter(lock):
        result = run_cull(hub, f"--lock-file={lock}")
    assert_lock_refused(hub, result, lock, f"is owned by uid {OTHER}, not this user (uid 0)")


def test_a_lock_file_others_can_open_is_an_error(hub, shared):
    """The culler's own lock file, 0644 (as idle-cull made it before): anyone may open it
    read-only and hold flock on it."""
    need_root("a lock held by another user")
    if not shutil.which("flock"):
        cannot_run("lock squatting: flock not found (Debian's util-linux; `make test-tools`)")
    lock = shared / "shared" / "idle-cull.lock"
    lock.touch(mode=0o644)
    with Squatter(lock):
        result = run_cull(hub, f"--lock-file={lock}")
    assert_lock_refused(hub, result, lock, "can be opened by other users (mode 0644): remove it")


def test_a_culler_that_is_not_root_refuses_another_users_lock_file(hub, shared):
    need_root("a culler that is not root")
    lock = plant(shared / "shared" / "idle-cull.lock", mode=0o644)
    done = run_as_culler(hub, f"--lock-file={lock}", cwd=Path("/"))
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"idle-cull: error: the lock file {lock} is owned by uid {OTHER}, not this user "
        f"(uid {CULLER}); nothing done\n"
    )
    assert hub.requests == []


def test_a_symlink_at_the_lock_file_is_an_error(hub, tmp_path):
    victim = tmp_path / "victim"
    lock = tmp_path / "idle-cull.lock"
    lock.symlink_to(victim)
    result = run_cull(hub, f"--lock-file={lock}")
    assert_lock_refused(hub, result, lock, "is not a regular file")
    assert not victim.exists()


def test_the_lock_file_is_made_0600_and_used_again(hub, tmp_path):
    lock = tmp_path / "idle-cull.lock"
    old_umask = os.umask(0)
    try:
        assert run_cull(hub, f"--lock-file={lock}").exit_code == 0
    finally:
        os.umask(old_umask)
    assert_own_file(lock, 0o600)
    assert run_cull(hub, f"--lock-file={lock}").exit_code == 0


# ---- the token file ------------------------------------------------------------------------


@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o444, True), (0o640, False),
                                          (0o600, False)])  # fmt: skip
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_token_file_readable_by_every_user_is_warned_of(hub, tmp_path, mode, warned, log_format):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(mode)
    result = run_cull(hub, f"--api-token-file={token_file}", f"--log-format={log_format}",
                      env={"JUPYTERHUB_API_TOKEN": None})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    warning = f"the API token file {token_file} is readable by every user (mode {mode:04o})"
    assert (warning in result.stderr) == warned
    assert TOKEN[:8] not in result.output and "[token]" not in result.output


# ---- 7. one event, one line ----------------------------------------------------------------

NAMES = [
    "eve" + FORGED,
    "carriage\rreturn",
    "escape\x1b[2J\x1b]0;title\x07",
    "del\x7fete",
    "next\x85line",
    "line\u2028separator",
    "para\u2029graph",
    "csi\x9b31m",
    "bidi\u202eevil\u2066isolate\u2069",
    "nul\x00tab\t",
    "all" + FORGED + "\r\x1b[2J\x7f\x85\u2028",
]
# What may still end a line or drive a terminal in the text log (its lines end with \n).
RAW = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
LINE_START = r"\[(DEBUG|INFO|WARNING|ERROR) \d{4}-\d\d-\d\d [\d:,]+ idle-cull\] "
HTTP_DEBUG = re.compile(r"Starting new HTTP connection|\] http://127\.0\.0\.1:\d+ |^http://")


@pytest.fixture
def forger(fake_hub, tmp_path):
    """Users named to forge lines: each with an idle default server (stopped), a named server
    also named so, active (kept), and one more soon to be culled (warned)."""
    for name in NAMES:
        fake_hub.add_user(
            name,
            servers={
                "": server(last_activity=iso(7200)),
                name: server(last_activity=iso(30)),
                "soon" + name: server(last_activity=iso(3300)),
            },
        )
    notify = tmp_path / "notify.sh"
    # Fails, saying something with a forged line of its own in it (its stderr is logged).
    notify.write_text(f"#!/bin/sh\nprintf 'no mail{FORGED}\\r\\033[2J\\n' >&2\nexit 1\n")
    notify.chmod(0o755)
    args = ["--timeout=3600", "--warn-before=900", f"--notify-command={notify}",
            f"--state-file={tmp_path / 'state.json'}", "--log-level=DEBUG"]  # fmt: skip
    return fake_hub, args


def test_names_that_forge_log_lines_give_one_line_per_event_in_the_text_log(forger):
    hub, args = forger
    result = run_cull(hub, *args)
    assert result.exit_code == 1, result.stderr  # the warnings failed
    log = result.stderr
    assert not RAW.search(log), RAW.search(log)
    lines = log.removesuffix("\n").split("\n")
    assert lines == log.splitlines()  # no other line break (U+0085, U+2028, ...) either
    assert all(re.match(rf"{LINE_START}\w", line) for line in lines)
    events = [line for line in lines if not HTTP_DEBUG.search(line)]
    # Per user: its default server stopped, two servers kept, one warning that failed.
    assert len(events) == 4 * len(NAMES) + 1
    assert sum(bool(re.match(rf"{LINE_START}summary: ", line)) for line in lines) == 1
    assert len(hub.stops) == len(NAMES)
    for event, count in [("stop user=", 1), ("keep user ", 2), ("could not warn user ", 1)]:
        assert sum(bool(re.match(LINE_START + event, line)) for line in lines) == count * len(NAMES)
    assert "stop user=eve\\n[INFO 2026-01-01 00:00:00,000 idle-cull] summary: " in log
    assert "user escape\\x1b[2J\\x1b]0;title\\x07 server escape" in log
    assert "no mail\\n[INFO 2026-01-01" in log and "\\x1b[2J" in log  # the command's stderr


def test_names_that_forge_log_lines_stay_json_in_the_json_log(forger):
    hub, args = forger
    result = run_cull(hub, *args, "--log-format=json", "--json")
    assert result.exit_code == 1, result.stderr
    for output in (result.stderr, result.stdout):
        assert output.isascii() and not RAW.search(output)
        assert output.removesuffix("\n").split("\n") == output.splitlines()
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    events = [e for e in entries if not HTTP_DEBUG.search(e["message"])]
    assert len(events) == 4 * len(NAMES) + 1
    assert [e["event"] for e in events].count("summary") == 1
    assert {e["user"] for e in events if e["event"] == "stop"} == set(NAMES)
    assert sum(e["message"].startswith("keep user ") for e in events) == 2 * len(NAMES)
    report = json.loads(result.stdout)
    assert {a["user"] for a in report["actions"]} == set(NAMES)


def test_an_error_line_is_one_line(fake_hub, tmp_path):
    path = f"{tmp_path}/no{FORGED}\r\x1b[2J.toml"
    result = run_cull(fake_hub, f"--config={path}")
    assert_usage_error(result, "cannot read", fake_hub)
    assert not RAW.search(result.stderr)
    assert "no\\n[INFO 2026-01-01 00:00:00,000 idle-cull] summary: " in result.stderr
