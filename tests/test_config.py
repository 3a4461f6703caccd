"""Upstream's Python config file (idle_culler_config.py), read without traitlets."""

import logging
import sys

import pytest
from conftest import TOKEN, assert_usage_error, readme_block, run_cull
from fakehub import iso, server
from hypothesis import assume, given
from hypothesis import strategies as st

import idle_cull

EVERY_TRAIT = """\
c = get_config()  # noqa

def keep_gpu(inactive, inactive_limit, server):
    return inactive.total_seconds() >= inactive_limit

c.IdleCuller.url = "http://from-file:8081/hub/api"
c.IdleCuller.timeout = 86400
c.IdleCuller.max_age = 7 * 86400
c.IdleCuller.cull_every = 0
c.IdleCuller.cull_users = True
c.IdleCuller.cull_admin_users = False
c.IdleCuller.cull_default_servers = False
c.IdleCuller.cull_named_servers = True
c.IdleCuller.remove_named_servers = True
c.IdleCuller.concurrency = 4
c.IdleCuller.api_page_size = 50
c.IdleCuller.ssl_enabled = False
c.IdleCuller.internal_certs_location = "/srv/certs"
c.IdleCuller.cull_arbiter_hook = keep_gpu
c.Application.log_level = "DEBUG"
"""


def write(path, text):
    path.write_text(text)
    return path


def test_every_upstream_trait_is_read_from_the_python_file(fake_hub, captured, tmp_path):
    config = write(tmp_path / "idle_culler_config.py", EVERY_TRAIT)
    result = run_cull(fake_hub, f"--config={config}", "--url", fake_hub.url)
    assert result.exit_code == 0, result.output
    policy, settings = captured["policy"], captured["settings"]
    assert (policy.timeout, policy.max_age) == (86400, 7 * 86400)
    assert policy.cull_users and not policy.cull_admin_users
    assert not policy.cull_default_servers and policy.cull_named_servers
    assert policy.remove_named_servers
    assert (settings.concurrency, settings.page_size) == (4, 50)
    assert policy.arbiter.__name__ == "keep_gpu"
    assert logging.getLogger().level == logging.DEBUG
    # The file's url, but the command line wins.
    assert captured["client"].base == fake_hub.url
    result = run_cull(fake_hub, f"--config={config}", "--url", fake_hub.url, "--ssl-enabled")
    assert result.exit_code == 2 and "/srv/certs/hub-internal" in result.stderr


def test_the_file_url_is_used_without_a_command_line_url(fake_hub, captured, tmp_path):
    config = write(tmp_path / "c.py", 'c.IdleCuller.url = "http://from-file:8081/hub/api"\n')
    assert run_cull(fake_hub, f"--config={config}", "--url=").exit_code == 2  # still checked
    from test_cli import CliRunnerNoUrl

    assert CliRunnerNoUrl(fake_hub, {}, f"--config={config}").exit_code == 0
    assert captured["client"].base == "http://from-file:8081/hub/api"


def test_the_hook_decides_through_the_arbiter_path(fake_hub, tmp_path):
    fake_hub.add_user("idle", servers={"": server(last_activity=iso(3600))})
    fake_hub.add_user("active", servers={"": server(last_activity=iso(5))})
    no = write(tmp_path / "no.py", "c.IdleCuller.cull_arbiter_hook = lambda **kw: False\n")
    result = run_cull(fake_hub, f"--config={no}", "--json")
    assert result.exit_code == 0 and result.json["summary"]["servers_stopped"] == 0
    assert not [r for r in fake_hub.requests if r.method == "DELETE"]
    yes = write(tmp_path / "yes.py", "c.IdleCuller.cull_arbiter_hook = lambda **kw: True\n")
    result = run_cull(fake_hub, f"--config={yes}", "--json")
    assert result.json["summary"]["servers_stopped"] == 2


def test_an_async_hook_is_awaited_like_an_async_arbiter(fake_hub, tmp_path):
    fake_hub.add_user("idle", servers={"": server(last_activity=iso(3600))})
    hook = "async def never(inactive, inactive_limit, server):\n    return False\n"
    config = write(tmp_path / "c.py", hook + "c.IdleCuller.cull_arbiter_hook = never\n")
    result = run_cull(fake_hub, f"--config={config}", "--json")
    assert result.exit_code == 0 and result.json["summary"]["servers_stopped"] == 0
    assert fake_hub.stops == []


def test_a_hook_imported_from_the_config_files_folder(fake_hub, captured, tmp_path, monkeypatch):
    """As upstream's, run in its working directory: the file's own folder (0755, root's) is
    where its imports and --arbiter look too (tests/test_local_files.py: only such a folder)."""
    write(tmp_path / "config_test_hook.py", "def decide(**kw):\n    return False\n")
    write(tmp_path / "idle_culler_config.py", "from config_test_hook import decide\n"
          "c.IdleCuller.cull_arbiter_hook = decide\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folder is added to it
    assert str(tmp_path) not in sys.path
    assert run_cull(fake_hub).exit_code == 0
    assert captured["policy"].arbiter.__module__ == "config_test_hook"
    # --arbiter on the command line wins over the file's hook.
    write(tmp_path / "config_test_other.py", "def decide(**kw):\n    return True\n")
    assert run_cull(fake_hub, "--arbiter=config_test_other:decide").exit_code == 0
    assert captured["policy"].arbiter.__module__ == "config_test_other"


def test_idle_culler_config_py_in_the_working_directory_is_loaded_and_said(
    fake_hub, captured, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert run_cull(fake_hub).exit_code == 0
    assert captured["policy"].timeout == 600
    write(tmp_path / "idle_culler_config.py", "c.IdleCuller.timeout = 86400\n")
    result = run_cull(fake_hub)
    assert result.exit_code == 0 and captured["policy"].timeout == 86400
    assert f"read the config file {tmp_path / 'idle_culler_config.py'}" in result.stderr
    # An explicit --config replaces it.
    other = write(tmp_path / "other.toml", "timeout = 100\n")
    run_cull(fake_hub, f"--config={other}")
    assert captured["policy"].timeout == 100


def test_precedence_command_line_then_environment_then_python_file(fake_hub, captured, tmp_path):
    config = write(tmp_path / "c.py", "c = get_config()\nc.IdleCuller.timeout = 100\n"
                   "c.IdleCuller.max_age = 7\n")  # fmt: skip
    run_cull(fake_hub, f"--config={config}")
    assert (captured["policy"].timeout, captured["policy"].max_age) == (100, 7)
    run_cull(fake_hub, f"--config={config}", env={"IDLE_CULL_TIMEOUT": "200"})
    assert (captured["policy"].timeout, captured["policy"].max_age) == (200, 7)
    run_cull(fake_hub, f"--config={config}", "--timeout=300", env={"IDLE_CULL_TIMEOUT": "200"})
    assert captured["policy"].timeout == 300


def test_sections_are_dicts_as_in_traitlets(fake_hub, captured, tmp_path):
    text = "c.IdleCuller.update(timeout=5)\nc.IdleCuller['max_age'] = 7\nc.Application = {}\n"
    assert run_cull(fake_hub, f"--config={write(tmp_path / 'c.py', text)}").exit_code == 0
    assert (captured["policy"].timeout, captured["policy"].max_age) == (5, 7)


@pytest.mark.parametrize(
    "text, message",
    [
        ("c.IdleCuller.timeuot = 5\n", "unknown setting c.IdleCuller.timeuot"),
        ("c.JupyterHub.services = []\n", "unknown class c.JupyterHub"),
        ("c.Application.timeout = 5\n", "unknown setting c.Application.timeout"),
        ("c.timeout = 5\n", "unknown setting c.timeout"),
        ("c.IdleCuller.timeout = 0\n", "--timeout"),
        ("c.IdleCuller.cull_users = 'maybe'\n", "'maybe' is not a valid boolean"),
        ("c.IdleCuller.timeout = [60]\n", "timeout = [60] is not a plain value"),
        ("c.IdleCuller.cull_arbiter_hook = 'mod:f'\n", "cull_arbiter_hook is not callable"),
        ("x = 1\nraise RuntimeError('no\\nway')\n", "c.py, line 2: RuntimeError: no way"),
        ("c.IdleCuller.timeout = \n", "c.py, line 1: SyntaxError"),
        ("import no_such_module_here\n", "ModuleNotFoundError"),
        ("load_subconfig('x.py')\n", "NameError"),
        ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
        ("c.IdleCuller.max_age = c.IdleCuller.timeout * 2\n", "AttributeError"),
    ],
)
def test_bad_python_config_files_are_one_line_and_exit_2(fake_hub, tmp_path, text, message):
    config = write(tmp_path / "c.py", text)
    assert_usage_error(run_cull(fake_hub, f"--config={config}"), message, fake_hub)


def test_a_config_file_that_fails_on_the_token_does_not_show_it(fake_hub, tmp_path):
    config = write(tmp_path / "c.py", "import os\nint(os.environ['JUPYTERHUB_API_TOKEN'])\n")
    result = run_cull(fake_hub, f"--config={config}")
    assert result.exit_code == 2 and "line 2: ValueError" in result.stderr
    assert "[token]" in result.stderr and TOKEN not in result.output


def test_a_missing_python_config_file_is_a_usage_error(fake_hub, tmp_path):
    result = run_cull(fake_hub, f"--config={tmp_path / 'nope.py'}")
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_log_level_as_a_logging_constant(fake_hub, captured, tmp_path):
    config = write(tmp_path / "c.py", "import logging\nc.Application.log_level = logging.WARN\n")
    assert run_cull(fake_hub, f"--config={config}").exit_code == 0
    assert logging.getLogger().level == logging.WARNING


# ---- durations, bounds and limits, the same wherever a setting is written ------------------

DURATIONS = [
    ("3600", 3600),
    (" 600 ", 600),  # int() takes it, so upstream does
    ("90m", 5400),
    ("1h", 3600),
    ("8h30m", 30600),
    ("30d", 30 * 86400),
    ("1d2h3m4s", 93784),
    ("45s", 45),
]


@pytest.mark.parametrize("text, seconds", DURATIONS)
def test_durations_as_people_write_them_everywhere(fake_hub, captured, tmp_path, text, seconds):
    run_cull(fake_hub, f"--timeout={text}", f"--max-age={text}", f"--user-timeout={text}")
    policy = captured["policy"]
    assert (policy.timeout, policy.max_age, policy.user_timeout) == (seconds, seconds, seconds)
    run_cull(fake_hub, env={"IDLE_CULL_TIMEOUT": text, "IDLE_CULL_WAIT_FOR_STOP": text})
    assert captured["policy"].timeout == seconds
    assert captured["settings"].wait_for_stop == seconds
    toml = write(tmp_path / "c.toml", f'max-runtime = "{text}"\n[[rule]]\ngroup = "g"\n'
                 f'timeout = "{text}"\nmax-age = "{text}"\n')  # fmt: skip
    run_cull(fake_hub, f"--config={toml}")
    assert captured["settings"].max_runtime == seconds
    rule = captured["policy"].rules[0]
    assert (rule.timeout, rule.max_age) == (seconds, seconds)
    python = write(tmp_path / "c.py", f"c.IdleCuller.timeout = {text!r}\n")
    run_cull(fake_hub, f"--config={python}")
    assert captured["policy"].timeout == seconds
    if seconds <= 86400:  # the longest a request may wait
        run_cull(fake_hub, f"--request-timeout={text}")
        assert captured["client"].timeout == seconds


def test_numbers_in_files_stay_numbers(fake_hub, captured, tmp_path):
    run_cull(fake_hub, f"--config={write(tmp_path / 'c.py', 'c.IdleCuller.timeout = 86400')}")
    assert captured["policy"].timeout == 86400
    run_cull(fake_hub, f"--config={write(tmp_path / 'c.toml', 'max-age = 7200.0')}")
    assert captured["policy"].max_age == 7200
    run_cull(fake_hub, "--request-timeout=0.5")
    assert captured["client"].timeout == 0.5


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--timeout=90x"], {}, "'90x' is not a duration: write seconds (3600), or with units"),
        (["--timeout=1.5h"], {}, "8h30m"),
        (["--timeout=30m1h"], {}, "is not a duration"),  # units in descending order
        (["--timeout=h"], {}, "is not a duration"),
        (["--timeout=1.5"], {}, "is not a duration"),
        (["--max-age=-1"], {}, "--max-age"),
        ([], {"IDLE_CULL_MAX_AGE": "2 weeks"}, "'2 weeks' is not a duration"),
        (["--request-timeout=nan"], {}, "'nan' is not a duration"),
        (["--request-timeout=inf"], {}, "'inf' is not a duration"),
        (["--request-timeout=-inf"], {}, "--request-timeout"),
        (["--request-timeout=0"], {}, "less than the least"),
        (["--request-timeout=2d"], {}, "more than the most idle-cull takes, 1d"),
        ([], {"JUPYTERHUB_REQUEST_TIMEOUT": "nan"}, "--request-timeout"),
        (["--cull-every=10000000000"], {}, "more than the most idle-cull takes, 36500d"),
        (["--timeout=3153600001"], {}, "more than the most idle-cull takes, 36500d"),
        (["--concurrency=1001"], {}, "--concurrency"),
    ],
)
def test_bad_durations_are_one_line_with_an_example(fake_hub, args, env, message):
    assert_usage_error(run_cull(fake_hub, *args, env=env), message, fake_hub)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rule = [1]\n", "rule 1: 1 is not a [[rule]] table"),
        ('rule = ["gpu"]\n', "rule 1: 'gpu' is not a [[rule]] table"),
        ("cull-every = 10000000000\n", "36500d"),
        ("request-timeout = nan\n", "is not a duration"),
        ("timeout = true\n", "True is not a duration"),
        # A rule has the bounds of the options it stands for.
        ('[[rule]]\ngroup = "x"\ntimeout = 0\n', "rule 1: timeout: 0 is less than the least, 1s"),
        ('[[rule]]\ngroup = "x"\ntimeout = "0m"\n', "rule 1: timeout: '0m' is less than the least"),
        ('[[rule]]\ngroup = "x"\nmax-age = -5\n', "rule 1: max_age: -5 is less than the least"),
        ('[[rule]]\ngroup = "x"\ntimeout = 1e11\n', "rule 1: timeout: 100000000000.0 is more than"),
        ('[[rule]]\ngroup = "x"\ntimeout = "soon"\n', "rule 1: timeout: 'soon' is not a duration"),
    ],
)
def test_bad_values_in_toml_are_one_line_and_exit_2(fake_hub, tmp_path, text, message):
    result = run_cull(fake_hub, f"--config={write(tmp_path / 'c.toml', text)}")
    assert_usage_error(result, message, fake_hub)


def test_the_same_timeout_bound_on_the_command_line_and_in_a_rule(fake_hub, tmp_path):
    top = run_cull(fake_hub, "--timeout=0")
    rule = run_cull(fake_hub, f"--config={write(tmp_path / 'c.toml', RULE_TIMEOUT_0)}")
    assert top.exit_code == rule.exit_code == 2
    assert "--timeout': '0' is less than the least, 1s" in top.stderr
    assert "timeout: 0 is less than the least, 1s" in rule.stderr


RULE_TIMEOUT_0 = '[[rule]]\nuser_options = { profile = "gpu" }\ntimeout = 0\n'


def test_concurrency_0_means_no_limit_up_to_the_ceiling(fake_hub, captured):
    assert run_cull(fake_hub, "--concurrency=0").exit_code == 0
    assert captured["settings"].concurrency == idle_cull.CONCURRENCY_CEILING


def test_concurrency_0_culls(fake_hub):
    for n in range(5):
        fake_hub.add_user(f"u{n}", servers={"": server(last_activity=iso(3600))})
    result = run_cull(fake_hub, "--concurrency=0", "--json")
    assert result.exit_code == 0 and result.json["summary"]["servers_stopped"] == 5


# ---- --generate-config ---------------------------------------------------------------------


def test_generate_config_prints_every_setting_and_loads_back_to_the_defaults(
    fake_hub, captured, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "idle_culler_config.py", "raise RuntimeError('not read')\n")
    result = run_cull(fake_hub, "--generate-config", env={"JUPYTERHUB_API_TOKEN": None})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert fake_hub.requests == [] and not captured
    for trait in idle_cull.CONFIG_TRAITS:
        section = "Application" if trait == "log_level" else "IdleCuller"
        assert f"\n# c.{section}.{trait} = " in text
    (tmp_path / "idle_culler_config.py").unlink()

    def settings(*args):
        assert run_cull(fake_hub, *args).exit_code == 0
        client = captured["client"]
        level = logging.getLogger().level
        return captured["policy"], captured["settings"], client.base, client.timeout, level

    logging.getLogger().setLevel(logging.WARNING)  # so that the file's INFO is seen to apply
    defaults = settings()
    assert settings(f"--config={write(tmp_path / 'as_printed.py', text)}") == defaults
    # Every line uncommented: the values shown are the defaults.
    uncommented = text.replace("\n# c.", "\nc.")
    assert uncommented.count("\nc.") == len(idle_cull.CONFIG_TRAITS)
    logging.getLogger().setLevel(logging.WARNING)
    assert settings(f"--config={write(tmp_path / 'uncommented.py', uncommented)}") == defaults


def test_the_readme_config_examples_read_as_documented(fake_hub, captured, tmp_path, monkeypatch):
    toml = write(tmp_path / "c.toml", readme_block("toml", "## The configuration file"))
    assert run_cull(fake_hub, f"--config={toml}").exit_code == 0
    policy = captured["policy"]
    assert (policy.timeout, policy.max_age, policy.user_timeout) == (8 * 3600, 86400, 30 * 86400)
    assert [(r.timeout, r.max_age) for r in policy.rules] == [(1800, None), (3600, 4 * 3600)]
    write(tmp_path / "my_rules.py", "def decide(**kw):\n    return False\n")
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_rules", None)  # the README's name: ours, not one imported before
    python = readme_block("python", "### Upstream's Python config file")
    write(tmp_path / "idle_culler_config.py", python)
    assert run_cull(fake_hub).exit_code == 0
    policy = captured["policy"]
    assert policy.timeout == 86400 and policy.cull_users and policy.arbiter.__module__ == "my_rules"
    sys.modules.pop("my_rules")


def test_traitlets_command_line_spelling(fake_hub, captured):
    args = ["--IdleCuller.timeout=3600", "--IdleCuller.cull_users=True", "--IdleCuller.max_age"]
    result = run_cull(fake_hub, *args, "7200", "--Application.log_level=WARNING")
    assert result.exit_code == 0, result.output
    policy = captured["policy"]
    assert (policy.timeout, policy.max_age, policy.cull_users) == (3600, 7200, True)
    assert logging.getLogger().level == logging.WARNING
    assert_usage_error(run_cull(fake_hub, "--Application.timeout=5"), "No such option")


# ---- durations, over generated values ------------------------------------------------------

PARTS = st.tuples(*[st.one_of(st.none(), st.integers(0, 10**4)) for _ in "dhms"])


@given(PARTS)
def test_any_duration_with_units_largest_first_is_its_seconds(parts):
    assume(any(part is not None for part in parts))
    text = "".join(f"{n}{unit}" for n, unit in zip(parts, "dhms", strict=True) if n is not None)
    seconds = sum(n * unit for n, unit in zip(parts, (86400, 3600, 60, 1), strict=True) if n)
    assert idle_cull.SECONDS.seconds(text) == seconds
    assert idle_cull.SECONDS.seconds(text.upper()) == seconds
    units = [u for n, u in zip(parts, "dhms", strict=True) if n is not None]
    if len(units) > 1:  # out of order: refused, never read as something else
        shuffled = "".join(f"1{u}" for u in reversed(units))
        assert idle_cull.SECONDS.seconds(shuffled) is None


@given(st.text(max_size=12))
def test_a_plain_number_is_read_exactly_as_int_reads_it(text):
    try:
        expected = int(text)
    except ValueError:
        expected = None
    got = idle_cull.SECONDS.seconds(text)
    if expected is not None:
        assert got == expected
    else:  # anything int() refuses is either refused or a duration with units
        assert got is None or any(unit in text.lower() for unit in "dhms")
