"""--arbiter as upstream calls its hook: sync or async, awaited when the answer is awaitable;
an exception, a timeout or an answer that is not a bool keeps the server, as an error."""

import itertools
import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import run_cull
from fakehub import iso, server

from idle_cull import Policy, server_verdict

IDLE, ACTIVE = 3600, 30
_modules = itertools.count()


@pytest.fixture
def arbiter(tmp_path, monkeypatch):
    """Write an arbiter module into a folder on sys.path (as PYTHONPATH puts it there); returns
    its --arbiter option."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"arbiter_{next(_modules)}"  # a fresh name: the test process keeps modules
        (tmp_path / f"{name}.py").write_text(source)
        return f"--arbiter={name}:decide"

    return write


@pytest.fixture
def hub(fake_hub):
    """An idle and an active server: an arbiter that decides anything shows in the stops."""
    fake_hub.add_user("idle", servers={"": server(last_activity=iso(IDLE))})
    fake_hub.add_user("active", servers={"": server(last_activity=iso(ACTIVE))})
    return fake_hub


@pytest.mark.parametrize(
    "source, stops",
    [
        ("async def decide(inactive, inactive_limit, server):\n    return False\n", []),
        ("async def decide(**_):\n    return True\n", [("active", ""), ("idle", "")]),
        (
            "async def decide(inactive, inactive_limit, server):\n"
            "    import asyncio\n"
            "    await asyncio.sleep(0.01)\n"
            "    return inactive.total_seconds() >= inactive_limit\n",
            [("idle", "")],
        ),
        # A sync function that answers with something to await, as upstream's hook may.
        (
            "import asyncio\n"
            "def decide(**_):\n"
            "    future = asyncio.get_running_loop().create_future()\n"
            "    future.set_result(False)\n"
            "    return future\n",
            [],
        ),
        (
            "import concurrent.futures\n"
            "def decide(**_):\n"
            "    future = concurrent.futures.Future()\n"
            "    future.set_result(True)\n"
            "    return future\n",
            [("active", ""), ("idle", "")],
        ),
        (
            "async def later(answer):\n    return answer\n"
            "def decide(inactive, **_):\n    return later(inactive.total_seconds() > 600)\n",
            [("idle", "")],
        ),
    ],
    ids=["async-no", "async-yes", "async-awaits", "asyncio-future", "concurrent-future", "coro"],
)
def test_an_awaitable_answer_is_awaited(hub, arbiter, source, stops):
    result = run_cull(hub, arbiter(source))
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == stops


@pytest.mark.parametrize(
    "source, error",
    [
        (
            "async def decide(**_):\n    raise ValueError('no profile')\n",
            "arbiter raised ValueError: no profile",
        ),
        ("async def decide(**_):\n    return 'yes'\n", "arbiter answered 'yes', not True or False"),
        ("def decide(**_):\n    return 1\n", "arbiter answered 1, not True or False"),
        ("async def decide(**_):\n    pass\n", "arbiter answered None, not True or False"),
    ],
    ids=["raises", "async-string", "number", "forgot-return"],
)
def test_a_failing_arbiter_keeps_every_server_as_an_error(hub, arbiter, source, error):
    result = run_cull(hub, arbiter(source), "--json")
    assert result.exit_code == 1
    assert hub.stops == []
    assert f"user idle default server: {error}; kept" in result.json["errors"]
    assert f"user active default server: {error}; kept" in result.json["errors"]
    assert f"user idle default server: {error}; kept" in result.stderr


@pytest.mark.parametrize(
    "body", ["    await asyncio.sleep(30)\n", "    time.sleep(30)\n"], ids=["async", "sync"]
)
def test_an_arbiter_that_does_not_answer_in_time_is_given_up(hub, arbiter, body):
    hub.add_user("third", servers={"": server(last_activity=iso(IDLE))})
    option = arbiter(f"import asyncio, time\nasync def decide(**_):\n{body}    return True\n")
    started = time.monotonic()
    result = run_cull(hub, option, "--request-timeout=0.5", "--json")
    assert time.monotonic() - started < 10  # not the arbiter's 30 s
    assert result.exit_code == 1
    assert hub.stops == []
    errors = [e for e in result.json["errors"] if "arbiter" in e]
    assert len(errors) == 3
    assert errors[0].endswith("arbiter: no answer within 0.5s; kept")
    assert all("not asked: no answer within 0.5s (earlier in this pass)" in e for e in errors[1:])


def test_max_runtime_bounds_the_wait_for_an_arbiter(hub, arbiter):
    option = arbiter("import asyncio\nasync def decide(**_):\n    await asyncio.sleep(30)\n")
    started = time.monotonic()
    result = run_cull(hub, option, "--max-runtime=1", "--json")
    assert time.monotonic() - started < 15  # the request timeout (60 s) is not waited for
    assert result.exit_code == 1
    assert hub.stops == []
    assert any("arbiter: --max-runtime reached; kept" in e for e in result.json["errors"])


def test_a_sync_arbiter_runs_inside_a_running_event_loop_as_upstream(hub, arbiter):
    source = "import asyncio\ndef decide(**_):\n    return asyncio.get_running_loop() is not None\n"
    result = run_cull(hub, arbiter(source))
    assert result.exit_code == 0, result.stderr
    assert sorted(hub.stops) == [("active", ""), ("idle", "")]


NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("answer", [None, "yes", "no", 1, 0.5, [True], object()])
def test_only_a_bool_from_the_arbiter_decides(answer):
    model = {
        "ready": True,
        "pending": None,
        "started": (NOW - timedelta(hours=2)).isoformat(),
        "last_activity": (NOW - timedelta(hours=1)).isoformat(),
    }
    verdict = server_verdict("", model, Policy(arbiter=lambda **_: answer), NOW)
    assert verdict.cull is False
    assert verdict.error.endswith("not True or False")


def test_an_async_cull_arbiter_hook_from_upstreams_config_file_is_awaited(hub, tmp_path):
    config = tmp_path / "culler_config.py"
    config.write_text(
        "async def keep_all(inactive, inactive_limit, server):\n"
        "    return False\n"
        "c.IdleCuller.cull_arbiter_hook = keep_all\n"
    )
    result = run_cull(hub, f"--config={config}")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == []
