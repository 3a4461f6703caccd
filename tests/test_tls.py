"""TLS: the Hub's certificate is verified unless the operator says otherwise, explicitly."""

import ssl
import subprocess
import time

import pytest
from conftest import run_cull
from fakehub import CULLER_SCOPES, FakeHub, iso, server


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert path, key path)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "hub.crt", folder / "hub.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_hub(certificate):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with FakeHub(token="tls-token", scopes=CULLER_SCOPES, tls=context) as hub:
        hub.add_user("u", servers={"": server(last_activity=iso(3600))})
        yield hub


def test_an_unknown_certificate_is_refused(tls_hub):
    result = run_cull(tls_hub, "--retries=0")
    assert result.exit_code == 3
    assert "SSLError" in result.stderr or "certificate" in result.stderr
    assert tls_hub.stops == []


def test_ca_bundle_verifies_the_hub(tls_hub, certificate):
    result = run_cull(tls_hub, f"--ca-bundle={certificate[0]}")
    assert result.exit_code == 0, result.stderr
    assert tls_hub.stops == [("u", "")]


def test_requests_ca_bundle_is_honoured(tls_hub, certificate):
    result = run_cull(tls_hub, env={"REQUESTS_CA_BUNDLE": str(certificate[0])})
    assert result.exit_code == 0, result.stderr
    assert tls_hub.stops == [("u", "")]


def test_insecure_works_and_warns_on_every_pass(tls_hub):
    result = run_cull(tls_hub, "--insecure")
    assert result.exit_code == 0
    assert "TLS verification is off (--insecure)" in result.stderr
    assert "InsecureRequestWarning" not in result.stderr  # one clear warning, not urllib3's noise
    assert tls_hub.stops == [("u", "")]


def test_internal_ssl_presents_the_client_certificate(certificate, tmp_path):
    # JupyterHub's internal-ssl layout; this Hub refuses clients without a certificate.
    cert, key = certificate
    for folder, name, source in [
        ("hub-internal", "hub-internal.crt", cert),
        ("hub-internal", "hub-internal.key", key),
        ("hub-ca", "hub-ca.crt", cert),
    ]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(source.read_bytes())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cert)
    with FakeHub(token="tls-token", scopes=CULLER_SCOPES, tls=context) as hub:
        hub.add_user("u", servers={"": server(last_activity=iso(3600))})
        without = run_cull(hub, f"--ca-bundle={cert}", "--retries=0")
        assert without.exit_code == 3
        result = run_cull(hub, "--ssl-enabled", f"--internal-certs-location={tmp_path}")
        assert result.exit_code == 0, result.stderr
        assert hub.stops == [("u", "")]


def test_a_dribbled_answer_over_tls_is_cut_at_the_request_timeout(tls_hub, certificate):
    """The watchdog shuts a TLS socket as it does a plain one (issue 11, item 8)."""
    tls_hub.add_user("v", servers={"": server(last_activity=iso(3600))})
    tls_hub.add_fault(("DELETE", "^/hub/api/users/u/server$"), "dribble", interval=0.5)
    began = time.monotonic()
    result = run_cull(
        tls_hub, f"--ca-bundle={certificate[0]}", "--request-timeout=1", "--retries=0", "--json"
    )
    assert time.monotonic() - began < 10
    assert result.exit_code == 1, result.stderr
    outcomes = {a["user"]: (a["result"], a["error"]) for a in result.json["actions"]}
    assert outcomes["v"] == ("done", None)
    assert outcomes["u"][0] == "failed" and "no whole answer within 1s" in outcomes["u"][1]
