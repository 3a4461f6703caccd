"""Hubs of every age: the version first, a scope check only where the Hub has scopes."""

import pytest
from conftest import run_cull
from fakehub import CULLER_SCOPES, iso, server

from idle_cull import has_scopes

IDLE = 3600  # seconds since last activity, against the default --timeout of 600
READ_ONLY = ["list:users", "read:users:activity", "read:servers"]


def idle_hub(hub_factory, **settings):
    hub = hub_factory(**settings)
    hub.add_user("idle", servers={"": server(last_activity=iso(IDLE))})
    hub.add_user("busy", servers={"": server(last_activity=iso(30))})
    return hub


def unreadable_version(hub):
    hub.add_fault(("GET", "^/hub/api$"), "malformed", body=b'{"version": "unknown"}')


@pytest.mark.parametrize(
    "version, expected",
    [("6.1.1", True), ("2.0.0", True), ("2.0.0b1", True), ("1.5.0", False), ("0.9.6", False)]
    + [(None, True), ("unknown", True), (2, True)],
)
def test_has_scopes(version, expected):
    assert has_scopes(version) is expected


@pytest.mark.parametrize("version", ["1.5.0", "1.2.2", "0.9.6"])
def test_a_hub_before_2_is_culled_without_a_scope_check(hub_factory, version):
    # Its GET /user answers 500 to a service token: asking would lock the culler out.
    hub = idle_hub(hub_factory, version=version, paginate=False, scopes=None)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]
    assert hub.counts["whoami"] == 0
    assert f"JupyterHub {version} has no scopes" in result.stderr


@pytest.mark.parametrize("version", ["2.0.0", "6.1.1"])
def test_a_hub_from_2_with_a_missing_scope_still_exits_3(hub_factory, version):
    hub = idle_hub(hub_factory, version=version, scopes=READ_ONLY)
    result = run_cull(hub)
    assert result.exit_code == 3
    assert "the token lacks the scope(s) delete:servers" in result.stderr
    assert hub.deletes() == []


def test_an_unreadable_version_is_checked_as_a_hub_with_scopes(hub_factory):
    hub = idle_hub(hub_factory, scopes=READ_ONLY)
    unreadable_version(hub)
    result = run_cull(hub)
    assert result.exit_code == 3
    assert "cannot read the Hub's version ('unknown')" in result.stderr
    assert "delete:servers" in result.stderr
    assert hub.deletes() == []


def test_an_unreadable_version_and_no_scopes_in_the_token_model_still_culls(hub_factory):
    hub = idle_hub(hub_factory, scopes=None)  # answers GET /user, with no "scopes" in it
    unreadable_version(hub)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]


def test_a_full_scope_set_culls_on_2_0(hub_factory):
    hub = idle_hub(hub_factory, version="2.0.0", scopes=CULLER_SCOPES)
    result = run_cull(hub)
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("idle", "")]
    assert hub.counts["whoami"] == 1
