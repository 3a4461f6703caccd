"""What an operator reads when a request fails (issue 19, point 1): one line per retry, and a
last line naming the URL, the cause in words and what to check; the same as fields in JSON
logs. Each cause against a real listener on 127.0.0.1 (DNS: a resolver faked in-process)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import socket
import ssl
from dataclasses import dataclass

import pytest
from conftest import TOKEN, run_cull
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fakehub import CULLER_SCOPES, FakeHub, iso, server

import idle_cull
from idle_cull import Failure, explain_answer

TEXT_LINE = re.compile(r"\[(\w+) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} idle-cull\] (.*)")
INFO = ("GET", "^/hub/api/?$")  # the Hub's version: the first request a pass needs
HTML = b"<!DOCTYPE html><html><body><form action='/login'>Sign in</form></body></html>"

REFUSED_HINT = "check that the Hub runs and that --url has its address and port"
TOKEN_HINT = (
    "check the token (JUPYTERHUB_API_TOKEN or --api-token-file) and the scopes of its role "
    "(README: The token and its scopes)"
)
API_HINT = "check that --url is the Hub's API, ending in /hub/api"
# A name class of ours or urllib3's, or a Python exception's, in a line meant for an operator.
INTERNALS = re.compile(r"\w(Error|Exception)\b|urllib3|Retry\(|Watched|Connection\(|_ssl\.c|Errno")


@dataclass(frozen=True)
class Retry:
    """A retry line: 'GET <path>: <words>; retry <attempt> of <retries> in <delay>s<note>'."""

    url: str
    words: str
    cause: str
    hint: str | None
    attempt: int = 1
    retries: int = 1
    delay: float = 0.0
    status: int | None = None
    retry_after: float | None = None

    def line(self) -> str:
        path = self.url.split("/", 3)[3].partition("?")[0]
        note = f" (Retry-After: {self.retry_after:.0f}s)" if self.retry_after else ""
        return (
            f"GET /{path}: {self.words}; retry {self.attempt} of {self.retries} in "
            f"{self.delay:.1f}s{note}"
        )

    def fields(self) -> dict:
        return {
            "level": "warning",
            "event": "retry",
            "message": self.line(),
            "cause": self.cause,
            "url": self.url,
            "status": self.status,
            "hint": self.hint,
            "attempt": self.attempt,
            "retries": self.retries,
            "delay_s": self.delay,
            "retry_after_s": self.retry_after,
        }


@dataclass(frozen=True)
class Last:
    """The summary line of a pass that could not use the Hub."""

    url: str
    words: str
    cause: str
    hint: str | None
    status: int | None = None
    what: str = "reading the Hub's version"

    def line(self) -> str:
        text = f"summary: the Hub could not be used: {self.what} at {self.url}: {self.words}"
        return f"{text}; {self.hint}" if self.hint else text

    def fields(self) -> dict:
        return {
            "level": "error",
            "event": "summary",
            "message": self.line(),
            "cause": self.cause,
            "url": self.url,
            "status": self.status,
            "hint": self.hint,
        }


def said(result, log_format: str) -> list[dict]:
    """Each line on stderr: level, message and (JSON) the failure and retry fields."""
    lines = result.stderr.strip().splitlines()
    if log_format == "json":
        keys = ("level", "event", "message", *idle_cull.FAILURE_LOG_FIELDS)
        keys_of = {"retry": (*keys, *idle_cull.RETRY_LOG_FIELDS), "summary": keys}
        entries = [json.loads(line) for line in lines]
        return [{k: e.get(k) for k in keys_of.get(e["event"], keys)} for e in entries]
    matches = [TEXT_LINE.fullmatch(line) for line in lines]
    assert all(matches), result.stderr
    return [{"level": m[1].lower(), "message": m[2]} for m in matches]


def assert_said(result, log_format: str, last: Last, *retries: Retry) -> None:
    """Exactly these lines: the retries (in any order: requests run concurrently), then `last`;
    exit 3; no class name anywhere."""
    assert result.exit_code == 3, result.stderr
    lines = said(result, log_format)
    expected = [r.fields() for r in retries] + [last.fields()]
    if log_format == "text":
        expected = [{"level": e["level"], "message": e["message"]} for e in expected]
    key = json.dumps
    assert sorted(map(key, lines[:-1])) == sorted(map(key, expected[:-1]))
    assert lines[-1] == expected[-1]
    assert not INTERNALS.search(result.stderr), result.stderr


def where(hub: FakeHub) -> str:
    return hub.url.split("/")[2]


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN, scopes=CULLER_SCOPES) as hub:
        hub.add_user("u", servers={"": server(last_activity=iso(3600))})
        yield hub


FORMATS = pytest.mark.parametrize("log_format", ["text", "json"])


# ---- no connection ---------------------------------------------------------------------------


def assert_no_connection(result, log_format: str, url: str, words: str, cause: str, hint: str):
    """Both first requests (the version, the first page) retried once, then the last line."""
    assert_said(
        result,
        log_format,
        Last(f"{url}/", f"{words} (after 1 retry)", cause, hint),
        Retry(f"{url}/", words, cause, hint),
        Retry(f"{url}/users?offset=0&limit=50&state=ready", words, cause, hint),
    )


@FORMATS
def test_connection_refused(log_format):
    with socket.socket() as bound:  # bound, never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        url = f"http://127.0.0.1:{port}/hub/api"
        args = [f"--url={url}", "--retries=1", f"--log-format={log_format}"]
        result = run_cull(FakeHub(token=TOKEN), *args)
    words = f"connection refused by 127.0.0.1:{port}"
    assert_no_connection(result, log_format, url, words, "refused", REFUSED_HINT)


@FORMATS
def test_host_not_found(monkeypatch, log_format):
    """The resolver is faked for this run: no name can reach a real DNS server."""
    asked = []

    def resolve(host, *args, **kwargs):
        asked.append(host)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        return real_getaddrinfo(host, *args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    url = "http://hub.invalid:8081/hub/api"
    args = [f"--url={url}", "--retries=1", f"--log-format={log_format}"]
    result = run_cull(FakeHub(token=TOKEN), *args)
    assert "hub.invalid" in asked
    words = "host hub.invalid not found by DNS (Name or service not known)"
    hint = "check the host name in --url, and this machine's DNS"
    assert_no_connection(result, log_format, url, words, "dns", hint)


@FORMATS
def test_no_answer_within_the_request_timeout(hub, log_format):
    hub.add_fault(INFO, "hang", seconds=5)
    result = run_cull(hub, "--request-timeout=1", "--retries=1", f"--log-format={log_format}")
    words = "no whole answer within 1s"
    hint = "the Hub is slow or stuck: check its load and log, or raise --request-timeout"
    assert_said(
        result,
        log_format,
        Last(f"{hub.url}/", f"{words} (after 1 retry)", "timeout", hint),
        Retry(f"{hub.url}/", words, "timeout", hint),
    )
    assert hub.stops == []


# ---- TLS -------------------------------------------------------------------------------------


def _certificate(name: str, key, issuer=None, days=(-1, 1), ca=False):
    """A certificate for `name` (an IP address or a host name), signed by `issuer` (a
    (certificate, key) pair) or by itself, valid from days[0] to days[1] from now."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    try:
        alternative = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alternative = x509.DNSName(name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
    )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA (ca.pem) and the Hub certificates of each TLS case, each as (cert, key) paths."""
    folder = tmp_path_factory.mktemp("certificates")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("idle-cull test CA", ca_key, ca=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    made = {
        "self-signed": _certificate("127.0.0.1", key),
        "another name": _certificate("hub.example.org", key, issuer=(ca, ca_key)),
        "expired": _certificate("127.0.0.1", key, issuer=(ca, ca_key), days=(-30, -1)),
    }
    paths = {"ca": folder / "ca.pem"}
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for case, certificate in made.items():
        path = folder / f"{case.replace(' ', '-')}.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        paths[case] = (path, folder / "key.pem")
    return paths


TLS_CASES = {
    # case: (cause, words after "the TLS certificate of 127.0.0.1:PORT ", hint)
    "self-signed": (
        "tls_untrusted",
        "is not trusted (self-signed certificate)",
        "give --ca-bundle the CA that issued it",
    ),
    "another name": (
        "tls_name",
        "is not for 127.0.0.1",
        "use in --url a name the certificate is for, or give the Hub a certificate for "
        "127.0.0.1 (--ca-bundle cannot fix this)",
    ),
    "expired": (
        "tls_expired",
        "has expired",
        "renew it, or check this machine's clock (--ca-bundle cannot fix this)",
    ),
}


@FORMATS
@pytest.mark.parametrize("case", TLS_CASES)
def test_a_certificate_that_cannot_be_verified(certificates, case, log_format):
    """Said which way it fails; never retried (it will not be verified a second later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificates[case])
    with FakeHub(token=TOKEN, scopes=CULLER_SCOPES, tls=context) as hub:
        bundle = [] if case == "self-signed" else [f"--ca-bundle={certificates['ca']}"]
        result = run_cull(hub, *bundle, "--retries=3", f"--log-format={log_format}")
        assert hub.requests == []
        cause, words, hint = TLS_CASES[case]
        words = f"the TLS certificate of {where(hub)} {words}"
        assert_said(result, log_format, Last(f"{hub.url}/", words, cause, hint))


# ---- answers that are not the Hub's ----------------------------------------------------------


@FORMATS
def test_an_html_page(hub, log_format):
    html = {"Content-Type": "text/html"}
    hub.add_fault(INFO, "status", code=200, body=HTML, headers=html, proxy=True)
    result = run_cull(hub, "--retries=1", f"--log-format={log_format}")
    words = "an HTML page (HTTP 200), not JSON"
    hint = (
        "check that --url reaches the Hub's API itself (ending in /hub/api), not a login page "
        "or a proxy's"
    )
    assert_said(result, log_format, Last(f"{hub.url}/", words, "html", hint, 200))


@FORMATS
def test_a_404_that_is_not_from_the_hub(hub, log_format):
    hub.add_fault(INFO, "status", code=404, body=b'{"error": "no such route"}', proxy=True)
    result = run_cull(hub, "--retries=1", f"--log-format={log_format}")
    words = "HTTP 404 Not Found, not from the Hub"
    assert_said(result, log_format, Last(f"{hub.url}/", words, "not_found", API_HINT, 404))


@FORMATS
@pytest.mark.parametrize("code", [401, 403])
def test_a_token_the_hub_refuses(hub, code, log_format):
    if code == 403:  # what JupyterHub answers a wrong token
        env = {"JUPYTERHUB_API_TOKEN": "not-the-token"}
        message = "Missing or invalid credentials."
    else:
        env = None
        message = "Unauthorized"
        body = json.dumps({"status": 401, "message": message}).encode()
        hub.add_fault(lambda req: req.kind != "info", "status", code=401, body=body)
    result = run_cull(hub, "--retries=1", f"--log-format={log_format}", env=env)
    words = f"HTTP {code} {message}"
    what = "reading the token's own model"
    assert_said(result, log_format, Last(f"{hub.url}/user", words, "token", TOKEN_HINT, code, what))


SERVER_ERRORS = {
    # code: (from the Hub, Retry-After, reason phrase, the final message, hint)
    500: (True, None, "Internal Server Error", "injected fault", "check the Hub's log"),
    502: (False, None, "Bad Gateway", "Bad Gateway, not from the Hub",
          "a proxy in front of the Hub answered: check that the Hub runs, and the proxy's log"),
    503: (True, 1, "Service Unavailable", "injected fault", "check the Hub's log"),
    429: (True, 1, "Too Many Requests", "injected fault",
          "the Hub or a proxy in front of it limits requests: lower --concurrency"),
}  # fmt: skip


@FORMATS
@pytest.mark.parametrize("code", SERVER_ERRORS)
def test_a_server_error_is_retried_then_said(hub, code, log_format):
    from_hub, retry_after, phrase, message, hint = SERVER_ERRORS[code]
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if not from_hub:  # a proxy's own page
        headers["Content-Type"] = "text/html"
    body = None if from_hub else b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    hub.add_fault(INFO, "status", code=code, headers=headers, body=body, proxy=not from_hub)
    result = run_cull(hub, "--retries=1", f"--log-format={log_format}")
    cause = "rate_limited" if code == 429 else "server_error"
    retry_words = f"HTTP {code} {phrase}" + ("" if from_hub else ", not from the Hub")
    assert_said(
        result,
        log_format,
        Last(f"{hub.url}/", f"HTTP {code} {message} (after 1 retry)", cause, hint, code),
        Retry(
            f"{hub.url}/",
            retry_words,
            cause,
            hint,
            status=code,
            delay=float(retry_after or 0),
            retry_after=retry_after,
        ),  # fmt: skip
    )


def test_an_unreadable_retry_after_is_the_backoff(hub):
    """A proxy's garbage Retry-After is not honoured, and no reason to give up."""
    hub.add_fault(INFO, "status", times=1, code=503, headers={"Retry-After": "soon"})
    result = run_cull(hub, "--retries=1")
    assert result.exit_code == 0, result.stderr
    assert said(result, "text")[0] == {
        "level": "warning",
        "message": "GET /hub/api/: HTTP 503 Service Unavailable; retry 1 of 1 in 0.0s",
    }
    assert hub.stops == [("u", "")]


def test_urllib3s_own_words_are_debug_details(hub):
    """At DEBUG the details stay, as DEBUG lines; nothing above DEBUG names a class."""
    hub.add_fault(INFO, "drop", times=1)
    result = run_cull(hub, "--retries=1", "--log-level=debug")
    assert result.exit_code == 0, result.stderr
    lines = said(result, "text")
    retry = f"GET /hub/api/: {where(hub)} closed the connection without answering; retry 1 of 1"
    assert {"level": "warning", "message": f"{retry} in 0.0s"} in lines
    details = [line for line in lines if "Retrying (" in line["message"]]
    assert len(details) == 1 and details[0]["level"] == "debug"
    above_debug = [line["message"] for line in lines if line["level"] != "debug"]
    assert not [message for message in above_debug if INTERNALS.search(message)]


# ---- the wording, as a table -----------------------------------------------------------------


@pytest.mark.parametrize(
    "status, kwargs, expected",
    [
        (302, {"message": "Found", "location": "/hub/login"},
         Failure("redirect", "HTTP 302 Found (to /hub/login)",
                 f"{API_HINT}; redirects are not followed", 302)),
        (400, {"message": "bad"}, Failure("http", "HTTP 400 bad", None, 400)),
        (403, {"message": "Forbidden", "option": "--server-api-url"},
         Failure("token", "HTTP 403 Forbidden", None, 403)),
        (404, {"message": "Not Found", "from_hub": False, "option": "--server-api-url"},
         Failure("not_found", "HTTP 404 Not Found", None, 404)),
        (200, {"message": "OK", "html": True, "option": "--server-api-url"},
         Failure("html", "an HTML page (HTTP 200), not JSON", None, 200)),
        (200, {"message": "OK", "is_json": False},
         Failure("not_json", "the answer is not JSON (HTTP 200)", API_HINT, 200)),
        (200, {"message": "OK"},
         Failure("unexpected", "HTTP 200 OK, not an answer the Hub gives", API_HINT, 200)),
        (504, {"message": "Gateway Timeout", "from_hub": False},
         Failure("server_error", "HTTP 504 Gateway Timeout, not from the Hub",
                 "a proxy in front of the Hub answered: check that the Hub runs, and the "
                 "proxy's log", 504)),
    ],
)  # fmt: skip
def test_answers_in_words(status, kwargs, expected):
    message = kwargs.pop("message")
    assert explain_answer(status, message, **kwargs) == expected


# ---- the Pushgateway -------------------------------------------------------------------------


@FORMATS
def test_a_pushgateway_that_cannot_be_reached(hub, log_format):
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        result = run_cull(hub, f"--pushgateway={url}", f"--log-format={log_format}")
    assert result.exit_code == 0, result.stderr
    assert hub.stops == [("u", "")]
    error = [line for line in said(result, log_format) if line["level"] == "error"]
    words = f"connection refused by {url[7:]}"
    hint = "check that the Pushgateway runs and that --pushgateway has its address and port"
    expected = {"level": "error", "message": f"cannot push metrics to {url}: {words}"}
    if log_format == "json":
        expected.update(event="log", cause="refused", url=url, status=None, hint=hint)
    assert error == [expected]
