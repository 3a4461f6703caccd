"""Shared fixtures: a started fake Hub, and helpers that run the culler against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner, Result
from fakehub import CULLER_SCOPES, FakeHub

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # idle_cull.py, even without the editable install
TOKEN = "test-token-s3cr3t"
# The culler refuses settings files that group or others may write; the tests write theirs
# with the umask, which is 0002 on some machines (and then they would be refused).
os.umask(0o022)


def readme_block(language: str, after: str) -> str:
    """The first ```language block of README.md after the text `after` (a heading)."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start : text.index("```", start)]


# Settings from the outer environment must not leak into a run (e.g. JUPYTERHUB_SERVICE_NAME
# would turn a one-pass run into a loop).
_ENV_PREFIXES = ("IDLE_CULL_", "JUPYTERHUB_")


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    with FakeHub(token=TOKEN, scopes=CULLER_SCOPES) as hub:
        yield hub


@pytest.fixture
def hub_factory() -> Iterator:
    """Start extra or differently configured hubs: hub_factory(version="1.2.0", ...)."""
    hubs: list[FakeHub] = []

    def make(**kwargs) -> FakeHub:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("scopes", CULLER_SCOPES)
        hub = FakeHub(**kwargs).start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.stop()


@pytest.fixture
def captured(monkeypatch):
    """Capture the settings a command line parses to, without a Hub."""
    import idle_cull

    seen = {}

    def fake_pass(client, policy, settings, stop, progress=None, looker=None):
        seen.update(policy=policy, settings=settings, client=client, looker=looker)
        return idle_cull.Report()

    monkeypatch.setattr(idle_cull, "run_pass", fake_pass)
    return seen


def assert_usage_error(result, message: str, hub: FakeHub | None = None) -> None:
    """Exit 2 with one line naming the problem, no traceback (and nothing sent to `hub`)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idle-cull: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    if hub is not None:
        assert hub.requests == []


def _args(hub: FakeHub, args: tuple) -> list[str]:
    args_list = [str(a) for a in args]
    if not any(a == "--url" or a.startswith("--url=") for a in args_list):
        args_list = ["--url", hub.url, *args_list]
    return args_list


def _parse_json(args: list[str], stdout: str):
    if "--json" not in args or not stdout.strip():
        return None
    return json.loads(stdout)


def run_cull(
    hub: FakeHub,
    *args,
    env: dict | None = None,
    input: str | None = None,
    internal_error: bool = False,
) -> Result:
    """Run `idle_cull.main` in-process; the result also has `.json` (stdout parsed, with --json).

    The command turns a bug into an "internal error" line and exit 1; unless a test asks for
    one (internal_error=True), that fails the test loudly instead of looking like exit code 1.
    """
    import idle_cull  # lazily: the module under test may not import yet at collection time

    args_list = _args(hub, args)
    run_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith(_ENV_PREFIXES)}
    run_env["JUPYTERHUB_API_TOKEN"] = hub.token
    run_env.update(env or {})
    result = CliRunner().invoke(
        idle_cull.main, args_list, env=run_env, input=input, catch_exceptions=False
    )
    if not internal_error:
        assert "internal error" not in result.stderr, result.stderr
    result.json = _parse_json(args_list, result.stdout)
    return result


def run_cull_subprocess(
    hub: FakeHub, *args, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run `python idle_cull.py` as a real process in the repo; `.json` as for run_cull."""
    args_list = _args(hub, args)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    run_env["JUPYTERHUB_API_TOKEN"] = hub.token
    for key, value in (env or {}).items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = value
    proc = subprocess.run(
        [sys.executable, "idle_cull.py", *args_list],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "internal error" not in proc.stderr, proc.stderr
    proc.json = _parse_json(args_list, proc.stdout)
    return proc


# .ci/run sets this (and CI services set CI=true): there, a check that this machine cannot run
# is a failure, not a skip.
REQUIRE_ALL = "IDLE_CULL_REQUIRE_ALL"


def cannot_run(reason: str) -> NoReturn:
    """Skip the check with a one-line reason (pytest -ra lists it at the end), or fail it in CI."""
    if os.environ.get(REQUIRE_ALL) == "1" or os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (in CI every check must run)", pytrace=False)
    pytest.skip(reason)


def require_tools(*tools: str, check: str, install: str) -> None:
    """Skip (or in CI fail) `check` unless every tool is on PATH; `install` says how to add them."""
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        cannot_run(f"{check}: {', '.join(missing)} not found ({install})")
