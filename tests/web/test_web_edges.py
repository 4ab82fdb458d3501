"""What a hostile web client meets (issue 19): request sizes, slow requests, login throttling
without a hard lock, one answer for known and unknown names, error pages with the security
headers, the deep link after the login and the forwarded client address.

In process (FastAPI's TestClient over a fresh database with three users) where the application
alone is tested; ``strnet serve`` as a subprocess where the server, the process's memory or the
client's address matter. No timings are asserted here except the request deadline (configured
short, with a wide margin); tests/bench/bench_login_flood.py measures latencies.
"""

from __future__ import annotations

import asyncio
import json
import re
import selectors
import socket
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import structlog
from conftest import agent_settings, free_port
from fastapi.testclient import TestClient
from serve_process import ServeProcess, write_config
from web_seed import wait_for

from agent.audit.export import Exporter
from agent.config import Settings, load_settings
from agent.db.engine import Database, open_database
from agent.db.models import AuditEvent, User
from agent.db.users import add_user, disable_user, open_session, typed_name_hash
from agent.web import auth
from agent.web.app import create_app
from agent.web.auth import LoginThrottle, hash_password, safe_next
from agent.web.routes.auth_routes import LOGIN_BUSY, LOGIN_FAILED
from agent.web.server import KEEP_ALIVE_S, WebServer, trusted_proxies

USERS = {  # name: (role, password); "gone" is disabled
    "admin": ("admin", "admin-pass-19"),
    "vera": ("viewer", "viewer-pass-19"),
    "gone": ("viewer", "gone-pass-19"),
}
HUGE = "99999999999999999999999"
HEADERS_ON_EVERY_ANSWER = ("content-security-policy", "x-content-type-options", "x-frame-options", "cache-control")


def add_users(db: Database) -> None:
    for name, (role, password) in USERS.items():
        add_user(db, name, role, hash_password(password))
    disable_user(db, "gone")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Database]]:
    settings = agent_settings(tmp_path_factory.mktemp("web-edges"), web={"enabled": False})
    db = open_database(settings)
    add_users(db)
    yield settings, db
    db.dispose()


def make_app(base: tuple[Settings, Database], **web: Any) -> Any:
    """A fresh application (its own login throttle) over the module's database."""
    settings, db = base
    return create_app(settings.model_copy(update={"web": settings.web.model_copy(update=web)}), db)


def client_at(app: Any, address: str) -> TestClient:
    return TestClient(app, client=(address, 40000))


def login_token(http: TestClient | httpx.Client) -> str:
    page = http.get("/login")
    assert page.status_code == 200
    return re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


def attempt(http: TestClient | httpx.Client, user: str, password: str, **extra: str) -> httpx.Response:
    data = {"login_token": login_token(http), "username": user, "password": password, **extra}
    return http.post("/login", data=data, follow_redirects=False)


def error_of(r: httpx.Response) -> str:
    found = re.search(r'<p class="error" role="alert">([^<]*)</p>', r.text)
    return found.group(1) if found else ""


def audit(db: Database) -> list[AuditEvent]:
    with db.reading() as s:
        return list(s.query(AuditEvent).order_by(AuditEvent.id))


def user_id(db: Database, name: str) -> int:
    with db.reading() as s:
        return int(s.query(User).filter(User.username == name).one().id)


def assert_secured(r: httpx.Response, what: str) -> None:
    for name in HEADERS_ON_EVERY_ANSWER:
        assert name in r.headers, f"{name} missing on {what} ({r.status_code})"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"], what


# --- in process ---------------------------------------------------------------------------------


def test_wrong_password_unknown_name_disabled_user_and_throttled_attempt_get_one_answer(
    base: tuple[Settings, Database],
) -> None:
    settings, db = base
    app = make_app(base, login_free_failures=2, login_backoff_s=60.0)
    before = len(audit(db))
    answers = {
        "wrong password": attempt(client_at(app, "10.0.1.1"), "admin", "not-the-password"),
        "unknown name": attempt(client_at(app, "10.0.1.2"), "nobody-at-all", "not-the-password"),
        "disabled user": attempt(client_at(app, "10.0.1.3"), "gone", USERS["gone"][1]),
    }
    throttled = client_at(app, "10.0.1.4")
    for _ in range(2):
        attempt(throttled, "admin", "still-not-it")
    answers["throttled, right password"] = attempt(throttled, "admin", USERS["admin"][1])
    for what, r in answers.items():
        assert (r.status_code, error_of(r)) == (401, LOGIN_FAILED), what
        assert "strnet_session" not in r.headers.get("set-cookie", ""), what
    events = audit(db)[before:]
    reasons = [(e.detail or {}).get("reason") for e in events if e.event_code == "110122"]
    assert reasons == ["bad_password", "unknown", "disabled", "bad_password", "bad_password", "throttled"]
    [alert] = [e for e in events if (e.detail or {}).get("alert") == "login_throttled"]
    assert alert.object_id == str(user_id(db, "admin")) and alert.detail["scope"] == "account"
    assert alert.detail["client"] == "10.0.1.4" and alert.outcome == 8
    [unknown] = [e for e in events if (e.detail or {}).get("reason") == "unknown"]
    # a name no user has (often a password in the wrong field) is kept only as a salted hash
    assert unknown.detail["username_sha256"] == typed_name_hash("nobody-at-all", settings.agent.site_salt)
    assert "username" not in unknown.detail and "nobody-at-all" not in json.dumps(unknown.detail)
    assert typed_name_hash("nobody-at-all", "another-site") != unknown.detail["username_sha256"]
    for e in events:  # no password ever reaches the audit trail
        text = json.dumps(e.detail)
        assert not any(p in text for p in ("not-the-password", "still-not-it", *(pw for _r, pw in USERS.values())))
    with db.reading() as s:  # no hard lock is written
        assert s.query(User).filter(User.username == "admin").one().locked_until is None


def test_a_throttled_pair_does_not_lock_the_account_elsewhere_nor_for_ever(base: tuple[Settings, Database]) -> None:
    app = make_app(base, login_free_failures=3, login_backoff_s=1.0)
    a, b = client_at(app, "10.0.2.1"), client_at(app, "10.0.2.2")
    for _ in range(3):
        assert attempt(a, "vera", "wrong-guess-1").status_code == 401
    assert attempt(a, "vera", USERS["vera"][1]).status_code == 401  # throttled: refused unchecked
    r = attempt(b, "vera", USERS["vera"][1])  # another address: the right password logs in
    assert r.status_code == 303 and "strnet_session=" in r.headers["set-cookie"]
    time.sleep(1.2)  # A's back-off (1 s) is over: the right password logs in there too
    assert attempt(a, "vera", USERS["vera"][1]).status_code == 303


def test_the_unknown_name_path_verifies_a_password_in_the_login_pool_outside_any_transaction(
    base: tuple[Settings, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db = base
    real = auth.verify_password
    calls: list[tuple[str | None, str, bool]] = []

    def counted(stored: str | None, password: str) -> bool:
        # a write from another thread completes meanwhile: no write transaction (nor the
        # process's writer lock) is held while the password is checked
        writer = threading.Thread(target=open_session, args=(db, user_id(db, "vera")))
        writer.start()
        writer.join(10)
        calls.append((stored, threading.current_thread().name, not writer.is_alive()))
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", counted)
    app = make_app(base)
    assert attempt(client_at(app, "10.0.3.1"), "no-such-user-19", "some-password").status_code == 401
    assert attempt(client_at(app, "10.0.3.2"), "vera", "wrong-password").status_code == 401
    assert attempt(client_at(app, "10.0.3.3"), "vera", USERS["vera"][1]).status_code == 303
    assert [c[0] is None for c in calls] == [True, False, False]
    assert all(name.startswith("strnet-login") and wrote for _s, name, wrote in calls), calls


def test_login_concurrency_checks_at_once_login_queue_more_wait_the_rest_get_503_at_once(
    base: tuple[Settings, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """web.login_concurrency password checks run at the same time, web.login_queue more wait for
    one; an attempt beyond those is answered 503 at once, unchecked (docs/configuration.md)."""
    real = auth.verify_password
    release, lock = threading.Event(), threading.Lock()
    checking = [0, 0]  # now, most at once

    def held(stored: str | None, password: str) -> bool:
        with lock:
            checking[0] += 1
            checking[1] = max(checking)
        release.wait(20)
        with lock:
            checking[0] -= 1
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", held)
    app = make_app(base, login_concurrency=1, login_queue=1)
    answers: dict[str, httpx.Response] = {}

    def log_in(address: str) -> None:
        answers[address] = attempt(client_at(app, address), "vera", USERS["vera"][1])

    first = threading.Thread(target=log_in, args=("10.0.4.1",))
    others = [threading.Thread(target=log_in, args=(f"10.0.4.{i}",)) for i in (2, 3)]
    first.start()
    try:
        wait_for(lambda: checking[0] == 1, 10, "the one check slot taken")
        for t in others:
            t.start()
        # one of the two waits in the queue, the other is turned away while the first check still runs
        wait_for(lambda: any(r.status_code == 503 for r in answers.values()), 10, "an attempt answered 503")
    finally:
        busy = [r for r in answers.values() if r.status_code == 503]
        release.set()
    assert len(busy) == 1 and error_of(busy[0]) == LOGIN_BUSY and busy[0].headers["retry-after"] == "2"
    assert "strnet_session" not in busy[0].headers.get("set-cookie", "")
    for t in (first, *others):
        t.join(20)
    assert sorted(r.status_code for r in answers.values()) == [303, 303, 503]  # the queued one logged in
    assert checking[1] == 1  # never two checks at once with login_concurrency = 1


def test_the_login_form_key_is_kept_in_data_dir_or_is_session_secret(base: tuple[Settings, Database]) -> None:
    """web.session_secret unset: a random key kept in data_dir/web_secret (mode 0600), so a login
    form fetched before a restart still logs in after it; set: that key, and only that key."""
    settings, _db = base

    def form_then_login(issuer: Any, checker: Any) -> httpx.Response:
        before = client_at(issuer, "10.0.5.1")
        token = login_token(before)
        after = client_at(checker, "10.0.5.1")
        after.cookies = before.cookies  # the browser keeps the form's cookie across the restart
        data = {"login_token": token, "username": "vera", "password": USERS["vera"][1]}
        return after.post("/login", data=data, follow_redirects=False)

    assert form_then_login(make_app(base), make_app(base)).status_code == 303  # a restart: the same key
    kept = settings.data_dir / "web_secret"
    assert kept.stat().st_mode & 0o777 == 0o600 and len(kept.read_text().strip()) >= 32
    one, same = make_app(base, session_secret="k-" + "1" * 40), make_app(base, session_secret="k-" + "1" * 40)
    assert form_then_login(one, same).status_code == 303
    refused = form_then_login(one, make_app(base))  # signed with another key
    assert refused.status_code == 403 and "strnet_session" not in refused.headers.get("set-cookie", "")


def test_the_defaults_the_admin_guide_states() -> None:
    """docs/admin-guide.md, Who sees what: 5 wrong passwords from one workstation, then 1 s doubling
    up to 15 minutes; 20 from one workstation whatever the names; logged off after 15 minutes idle."""
    from agent.config import WebSection

    web = WebSection()
    assert (web.login_free_failures, web.login_free_failures_per_client) == (5, 20)
    assert (web.login_backoff_s, web.login_backoff_max_s, web.idle_timeout_s) == (1.0, 15 * 60.0, 15 * 60.0)


def test_login_throttle_backs_off_doubling_and_forgets() -> None:
    now = [1000.0]
    t = LoginThrottle(3, 10, 1.0, 8.0, clock=lambda: now[0], max_keys=50)
    assert [t.failed("Admin", "10.0.0.1") for _ in range(2)] == [[], []]
    assert t.wait_s("admin", "10.0.0.1") == 0  # names are keyed case-blind
    [started] = t.failed("admin", "10.0.0.1")
    assert (started.scope, started.backoff_s) == ("account", 1.0)
    assert t.wait_s("admin", "10.0.0.1") == 1.0 and t.wait_s("admin", "10.0.0.2") == 0
    assert t.refused("admin", "10.0.0.1") == 1 and t.refused("admin", "10.0.0.1") == 2
    for expected in (2.0, 4.0, 8.0, 8.0):  # doubling, at most backoff_max_s
        assert t.failed("admin", "10.0.0.1") == []
        assert t.wait_s("admin", "10.0.0.1") == expected
    now[0] += 8.0 + 8.0 + 0.1  # quiet for backoff_max_s after the wait: forgotten
    assert t.wait_s("admin", "10.0.0.1") == 0 and t.failed("admin", "10.0.0.1") == []
    # one address, many names: the address is throttled after its own free failures
    for i in range(9):
        t.failed(f"name-{i}", "10.0.0.9")
    assert [a.scope for a in t.failed("name-9", "10.0.0.9")] == ["client"]
    assert t.wait_s("anyone-else", "10.0.0.9") == 1.0
    for i in range(100):  # the table stays bounded
        t.failed(f"spray-{i}", f"10.1.{i}.1")
    assert len(t._keys) <= 50
    t.succeeded("admin", "10.0.0.1")


def test_a_throttled_attempt_waits_as_long_as_a_password_check_without_checking(
    base: tuple[Settings, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/security.md, One answer: a throttled attempt is refused unchecked after the time a
    verification takes, so the answer's timing does not tell a throttled name from a checked one.
    Checks are made slow here (0.3 s each) so that the wait stands out from the refusal's own write;
    only a lower bound is asserted."""
    _settings, db = base
    real = auth.verify_password
    checks: list[float] = []

    def slow(stored: str | None, password: str) -> bool:
        checks.append(time.monotonic())
        time.sleep(0.3)
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", slow)
    web = base[0].web.model_copy(update={"login_free_failures": 8, "login_backoff_s": 60.0})
    gate = auth.LoginGate(db, web)
    try:
        took = []
        for _ in range(8):  # checked: each takes a check's time; the 8th starts the throttle
            started = time.monotonic()
            assert asyncio.run(gate.attempt("vera", "wrong-guess-12", "10.0.12.1")).user is None
            took.append(time.monotonic() - started)
        assert len(checks) == 8
        started = time.monotonic()
        refused = asyncio.run(gate.attempt("vera", USERS["vera"][1], "10.0.12.1"))
        waited = time.monotonic() - started
    finally:
        gate.close()
    assert refused.user is None and not refused.busy and len(checks) == 8  # refused unchecked
    assert waited >= 0.5 * min(took), (waited, took)  # without the wait: a few ms


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("/patients/12", True),
        ("/flagged?status=new&page=2", True),
        ("//evil.example", False),
        ("https://evil.example", False),
        ("/\\evil", False),
        ("/\t/evil.example", False),
        ("javascript:alert(1)", False),
        ("/login?next=/flagged", False),
        ("", False),
        (None, False),
    ],
)
def test_safe_next(value: str | None, safe: bool) -> None:
    assert safe_next(value) == (value if safe else None)


def test_the_deep_link_asked_for_while_logged_out_is_where_the_login_goes(base: tuple[Settings, Database]) -> None:
    app = make_app(base)
    browser = client_at(app, "10.0.4.1")
    r = browser.get("/patients/7?from=list", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    cookie = r.headers["set-cookie"]  # strnet_next: only for the login page, 10 minutes, Lax
    assert cookie.startswith("strnet_next=") and "Path=/login" in cookie and "HttpOnly" in cookie
    assert "Max-Age=600" in cookie and "SameSite=lax" in cookie
    page = browser.get("/login")
    assert 'name="next" value="/patients/7?from=list"' in page.text
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = browser.post(
        "/login",
        data={"login_token": token, "username": "vera", "password": USERS["vera"][1], "next": "/patients/7?from=list"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/patients/7?from=list"
    # ?next= works too; a link off the site is never followed
    assert 'name="next" value="/status"' in client_at(app, "10.0.4.2").get("/login?next=/status").text
    assert 'name="next"' not in client_at(app, "10.0.4.3").get("/login?next=//evil.example").text
    for i, evil in enumerate(("//evil.example", "https://evil.example", "/\\evil", "/\t/evil.example")):
        r = attempt(client_at(app, f"10.0.5.{i}"), "vera", USERS["vera"][1], next=evil)
        assert r.status_code == 303 and r.headers["location"] == "/flagged", evil


def test_errors_are_pages_with_the_security_headers(base: tuple[Settings, Database]) -> None:
    """Starlette's own 404 and 405, a path that is not a row id, integers beyond SQLite's range in
    path and query, a malformed session cookie: each a 4xx (a redirect to the login for the
    cookie on a page) with the headers, never a 500 (TestClient re-raises server errors)."""
    app = make_app(base)
    viewer = client_at(app, "10.0.6.1")
    assert attempt(viewer, "vera", USERS["vera"][1]).status_code == 303
    expected = {
        "/no-such-page": 404,
        "/patients/abc": 404,
        f"/patients/{HUGE}": 404,
        f"/results/{HUGE}/overlay.png": 404,
        f"/patients/{HUGE}/trend.png": 404,
        f"/flagged?page={HUGE}": 422,
        "/flagged?page=400000000000000000": 404,  # a row offset beyond SQLite's range
        "/audit": 403,
    }
    for path, status in expected.items():
        r = viewer.get(path, follow_redirects=False)
        assert r.status_code == status, (path, r.status_code, r.text[:200])
        assert_secured(r, path)
    r = viewer.put("/login")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    assert_secured(r, "PUT /login")
    anonymous = client_at(app, "10.0.6.2")
    for path, status in (("/flagged", 303), ("/results/1/overlay.png", 401), ("/healthz", 200)):
        r = anonymous.get(path, headers={"cookie": b"strnet_session=\xe9"}, follow_redirects=False)  # type: ignore[dict-item]
        assert r.status_code == status, path
        assert_secured(r, f"malformed cookie on {path}")


def test_a_server_error_is_a_page_with_the_security_headers(
    base: tuple[Settings, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 500 is answered outside the middleware that adds the headers: its handler adds them."""
    from agent.web.routes import ops

    def broken(db: Database) -> int:
        raise RuntimeError("planted")

    monkeypatch.setattr(ops, "flagged_count", broken)
    r = TestClient(make_app(base), raise_server_exceptions=False).get("/metrics")
    assert r.status_code == 500 and r.headers["content-type"].startswith("text/html")
    assert "Something went wrong on the server" in r.text and "planted" not in r.text
    assert_secured(r, "500")


def test_healthz_is_503_degraded_when_the_database_cannot_be_read(base: tuple[Settings, Database]) -> None:
    settings, _db = base
    junk = settings.data_dir / "not-a-database.db"
    junk.write_bytes(b"this is no SQLite file " * 100)
    gone = Database(f"sqlite:///{junk}")
    try:
        r = TestClient(create_app(settings, gone)).get("/healthz")
    finally:
        gone.dispose()
    assert r.status_code == 503
    assert (r.json()["status"], r.json()["database"]) == ("degraded", "unreachable")


def test_the_login_form_key_is_kept_0600_and_its_token_lasts_an_hour(
    base: tuple[Settings, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _db = base
    assert settings.web.session_secret is None
    make_app(base)
    assert stat.S_IMODE((settings.data_dir / "web_secret").stat().st_mode) == 0o600
    forms = auth.LoginForms("a-test-key")
    cookie, token = forms.issue()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3500)
    assert forms.check(cookie, token) and not forms.check("another-nonce", token)
    monkeypatch.setattr(time, "time", lambda: now + 3700)
    assert not forms.check(cookie, token)


def test_bodies_over_the_limits_are_refused_before_any_route_reads_them(base: tuple[Settings, Database]) -> None:
    app = make_app(base, max_login_bytes=4096, max_form_bytes=8192, max_form_fields=8)
    client = client_at(app, "10.0.7.1")
    token = login_token(client)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    big = b"username=vera&password=" + b"x" * 5000
    r = client.post("/login", content=big, headers=form)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert_secured(r, "413")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b"username=vera&password="
        for _ in range(10):
            yield b"y" * 1000

    r = client.post("/login", content=chunks(), headers=form)
    assert r.status_code == 413
    r = client.post("/login", content=b"--b\r\n\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 415
    assert_secured(r, "415")
    # two Content-Type headers: Starlette would parse the first, so every one is checked
    multipart, urlencoded = ("Content-Type", "multipart/form-data; boundary=b"), tuple(form.items())[0]
    for pair in ([multipart, urlencoded], [urlencoded, multipart]):
        r = client.post("/login", content=b"--b\r\n\r\n", headers=pair)
        assert r.status_code == 415, pair
        assert_secured(r, "415 with two Content-Types")
    many = {f"f{i}": "v" for i in range(20)}
    r = client.post("/login", data={"login_token": token, "username": "vera", "password": "p", **many})
    assert r.status_code == 400
    assert_secured(r, "too many fields")
    r = client.post("/logout", content=b"csrf_token=" + b"z" * 9000, headers=form, follow_redirects=False)
    assert r.status_code == 413  # every route, not only the login


def test_views_and_refusals_record_the_client_address_that_the_atna_message_names(
    base: tuple[Settings, Database],
) -> None:
    """docs/atna.md: a worklist or audit-log query and a role or CSRF refusal name the user with
    the client's address as the active participant, as a login does."""
    settings, db = base
    add_user(db, "auditor-19", "auditor", hash_password("auditor-pass-19"))
    app = make_app(base)
    viewer, auditor = client_at(app, "10.0.9.1"), client_at(app, "10.0.9.2")
    assert attempt(viewer, "vera", USERS["vera"][1]).status_code == 303
    assert attempt(auditor, "auditor-19", "auditor-pass-19").status_code == 303
    before = len(audit(db))
    assert viewer.get("/flagged").status_code == 200
    assert viewer.get("/audit").status_code == 403  # role refusal
    assert viewer.post("/logout", data={"csrf_token": "forged"}, follow_redirects=False).status_code == 403
    assert auditor.get("/audit").status_code == 200
    events = audit(db)[before:]
    seen = [(e.actor, e.event_code, (e.detail or {}).get("refused"), (e.detail or {}).get("client")) for e in events]
    assert seen == [
        ("vera", "110112", None, "10.0.9.1"),
        ("vera", "110113", "role", "10.0.9.1"),
        ("vera", "110113", "csrf", "10.0.9.1"),
        ("auditor-19", "110112", None, "10.0.9.2"),
    ]
    with db.reading() as s:
        messages = Exporter(db, settings).messages(events, s)
    for message, event in zip(messages, events, strict=True):
        root = ET.fromstring(message[message.index(b"<?xml") :])
        user = root.find("ActiveParticipant")
        assert user is not None and user.get("UserID") == event.actor
        access_point = (user.get("NetworkAccessPointID"), user.get("NetworkAccessPointTypeCode"))
        assert access_point == (event.detail["client"], "2")


def test_logins_beyond_the_free_password_check_slots_get_503_at_once_unrecorded(
    base: tuple[Settings, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """web.login_concurrency checks at a time and web.login_queue waiting: one more is answered 503
    with Retry-After, without a password check or an audit event."""
    _settings, db = base
    real, entered, release = auth.verify_password, threading.Event(), threading.Event()

    def held(stored: str | None, password: str) -> bool:
        entered.set()
        release.wait(30)
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", held)
    app = make_app(base, login_concurrency=1, login_queue=0)
    first, second = client_at(app, "10.0.10.1"), client_at(app, "10.0.10.2")
    token = login_token(first)
    answers: list[int] = []
    checking = threading.Thread(target=lambda: answers.append(
        first.post("/login", data={"login_token": token, "username": "vera", "password": USERS["vera"][1]},
                   follow_redirects=False).status_code))  # fmt: skip
    checking.start()
    try:
        assert entered.wait(10)
        before = len(audit(db))
        r = attempt(second, "vera", USERS["vera"][1])
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and "busy" in r.text
        assert len(audit(db)) == before  # unchecked and unrecorded
    finally:
        release.set()
        checking.join(30)
    assert answers == [303]


def test_refused_attempts_are_audited_at_the_1st_2nd_4th_8th_refusal(base: tuple[Settings, Database]) -> None:
    _settings, db = base
    app = make_app(base, login_free_failures=1, login_backoff_s=60.0)
    client = client_at(app, "10.0.11.1")
    assert attempt(client, "vera", "wrong-guess-11").status_code == 401  # the throttle starts
    before = len(audit(db))
    for _ in range(9):
        assert attempt(client, "vera", USERS["vera"][1]).status_code == 401
    refused = [e.detail for e in audit(db)[before:] if e.event_code == "110122"]
    assert [(d["reason"], d["refused_so_far"]) for d in refused] == [("throttled", n) for n in (1, 2, 4, 8)]


@pytest.mark.parametrize(
    ("web", "believed"),
    [
        ({}, []),
        ({"behind_tls_proxy": True}, ["127.0.0.1"]),  # a TLS proxy on this machine
        ({"behind_tls_proxy": True, "trusted_proxies": ["10.0.0.5"]}, ["10.0.0.5"]),
        ({"trusted_proxies": ["10.0.0.0/8"]}, ["10.0.0.0/8"]),
    ],
)
def test_which_addresses_may_name_the_client(
    base: tuple[Settings, Database], web: dict[str, Any], believed: list[str]
) -> None:
    """Behind a TLS proxy with no trusted_proxies, 127.0.0.1 is believed: else every browser would
    have the proxy's address and share one per-address login throttle."""
    settings = base[0]
    section = settings.web.model_copy(update=web)
    assert trusted_proxies(section) == believed
    config = WebServer(make_app(base, **web), section).server.config
    assert config.proxy_headers == bool(believed)
    if believed:
        assert config.forwarded_allow_ips == believed


def test_a_post_waiting_for_the_database_writer_does_not_stall_the_web(
    base: tuple[Settings, Database],
) -> None:
    """A follow-up whose write waits for the writer lock (held by another thread, as the worker
    or the receiver may) waits off the event loop: /healthz answers meanwhile. A live uvicorn (in
    this process, so that the writer lock is the one the web waits on); a generous bound."""
    settings, db = base
    web = settings.web.model_copy(update={"enabled": True, "port": free_port()})
    server = WebServer(make_app(base), web)
    server.start()
    url = f"http://127.0.0.1:{web.port}"
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.transaction():
            holding.set()
            release.wait(2.0)  # about 2 s, then the follow-up's write goes through

    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            assert attempt(http, "vera", USERS["vera"][1]).status_code == 303
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', http.get("/flagged").text).group(1)  # type: ignore[union-attr]
            cookie = f"strnet_session={http.cookies['strnet_session']}"
        body = f"csrf_token={csrf}&action=closed&note=".encode()
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as raw:
            raw.sendall(  # the headers first: the session is checked (a write) while the lock is free
                b"POST /patients/999999/follow-up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                + f"Cookie: {cookie}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            time.sleep(0.5)
            holder = threading.Thread(target=hold)
            holder.start()
            assert holding.wait(10)
            raw.sendall(body)  # now the route's own write waits for the lock
            time.sleep(0.3)
            assert holder.is_alive(), "the writer lock was released before /healthz was asked"
            started = time.monotonic()
            health = httpx.get(f"{url}/healthz", timeout=10)
            took = time.monotonic() - started
            answer = _read_all(raw)
        holder.join(10)
        assert took < 0.5, f"/healthz took {took:.2f} s while a follow-up waited for the writer lock"
        assert health.status_code == 200
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]  # the follow-up itself then finished
    finally:
        release.set()
        server.stop()


# --- strnet serve ---------------------------------------------------------------------------------

SERVE_WEB = """
[web]
request_timeout_s = 3.0
trusted_proxies = ["127.0.0.2"]
login_free_failures = 3
login_free_failures_per_client = 1000
login_backoff_s = 120.0
"""
REQUEST_TIMEOUT_S = 3.0


class Serve:
    def __init__(self, proc: ServeProcess, url: str, db: Database, log: Path, settings: Settings) -> None:
        self.proc, self.url, self.db, self.log, self.settings = proc, url, db, log, settings

    def client(self, source: str = "127.0.0.1", **kw: Any) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(base_url=self.url, transport=transport, timeout=30, **kw)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("serve-edges")
    config = write_config(tmp / "agent.toml", tmp / "var", extra=SERVE_WEB)
    settings = load_settings(config)
    db = open_database(settings)
    add_users(db)
    web_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRNET_WEB__PORT", str(web_port))
        proc = ServeProcess(config, tmp / "serve.log").start()
    try:
        url = f"http://127.0.0.1:{web_port}"
        wait_for(lambda: _answers(f"{url}/healthz"), timeout_s=30, what="web answering")
        yield Serve(proc, url, db, tmp / "serve.log", settings)
        log = (tmp / "serve.log").read_text()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    finally:
        proc.close()
        db.dispose()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_200_mb_form_to_login_gets_413_and_serve_stays_small(serve: Serve) -> None:
    process = psutil.Process(serve.proc.pid)
    before = process.memory_info().rss

    def body() -> Iterator[bytes]:  # chunked: this test never holds more than 1 MiB of it
        yield b"login_token=x&username=admin&password="
        chunk = b"a" * (1 << 20)
        for _ in range(200):
            yield chunk

    with serve.client() as http:
        r = http.post("/login", content=body(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    assert_secured(r, "413 from serve")
    grown = process.memory_info().rss - before
    assert grown < 60 * 2**20, f"serve grew by {grown / 2**20:.0f} MB"
    # 500 MB announced as a multipart upload: refused at once, nothing read
    with socket.create_connection(("127.0.0.1", int(serve.url.rsplit(":", 1)[1])), timeout=10) as raw:
        raw.sendall(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 524288000\r\n\r\n--b\r\n"
        )
        assert _read_all(raw).startswith(b"HTTP/1.1 415")
    # the same behind a harmless first Content-Type, on the real server
    with socket.create_connection(("127.0.0.1", int(serve.url.rsplit(":", 1)[1])), timeout=10) as raw:
        raw.sendall(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 524288000\r\n\r\n--b\r\n"
        )
        assert _read_all(raw).startswith(b"HTTP/1.1 415")


def test_while_client_a_is_throttled_for_admin_client_b_logs_in(serve: Serve) -> None:
    with serve.client("127.0.0.1") as a, serve.client("127.0.0.2") as b:
        for _ in range(3):
            assert attempt(a, "admin", "a-wrong-guess").status_code == 401
        throttled = attempt(a, "admin", USERS["admin"][1])
        assert (throttled.status_code, error_of(throttled)) == (401, LOGIN_FAILED)
        r = attempt(b, "admin", USERS["admin"][1])
        assert r.status_code == 303 and r.headers["location"] == "/flagged"
        assert b.get("/flagged").status_code == 200
        assert attempt(a, "admin", USERS["admin"][1]).status_code == 401  # A still waits
        unknown = attempt(a, "no-such-admin", "a-wrong-guess")
        assert (unknown.status_code, error_of(unknown)) == (401, LOGIN_FAILED)
    alerts = [e for e in audit(serve.db) if (e.detail or {}).get("alert") == "login_throttled"]
    assert [(e.actor, e.detail["client"]) for e in alerts] == [("admin", "127.0.0.1")]


def test_slow_partial_requests_are_closed_within_the_timeout(serve: Serve) -> None:
    port = int(serve.url.rsplit(":", 1)[1])
    sockets = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 5:  # half a request line
            s.sendall(b"GET /healthz HT")
        else:  # whole headers, a tenth of the body announced
            s.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nusername=a")
        sockets.append(s)
    sent = time.monotonic()
    with serve.client() as http:  # the web answers meanwhile
        assert http.get("/healthz").status_code == 200
    margin_s = 5.0
    closed = _wait_closed(sockets, sent + REQUEST_TIMEOUT_S + margin_s)
    for s in sockets:
        s.close()
    assert len(closed) == 50, f"{50 - len(closed)} of 50 still open after {REQUEST_TIMEOUT_S} s + {margin_s} s"
    assert max(closed) - sent <= REQUEST_TIMEOUT_S + margin_s


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(serve: Serve) -> None:
    with serve.client("127.0.0.1", headers={"X-Forwarded-For": "203.0.113.7"}) as local:
        attempt(local, "xff-from-anyone", "a-wrong-guess")
    with serve.client("127.0.0.2", headers={"X-Forwarded-For": "198.51.100.9"}) as proxy:
        attempt(proxy, "xff-from-proxy", "a-wrong-guess")
    clients = {
        (e.detail or {}).get("username_sha256"): (e.detail or {}).get("client")
        for e in audit(serve.db)
        if e.event_code == "110122"
    }
    salt = serve.settings.agent.site_salt
    # the header of an untrusted address is ignored
    assert clients[typed_name_hash("xff-from-anyone", salt)] == "127.0.0.1"
    assert clients[typed_name_hash("xff-from-proxy", salt)] == "198.51.100.9"


def test_an_idle_kept_alive_connection_is_closed_after_keep_alive_s(serve: Serve) -> None:
    """docs/security.md: an idle kept-alive connection is closed after 5 s (``KEEP_ALIVE_S``),
    not at the request deadline (3 s here), which applies only while a request arrives."""
    assert KEEP_ALIVE_S == 5
    port = int(serve.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = kept.recv(65536)
            assert chunk, "closed before the answer"
            head += chunk
        answered = time.monotonic()
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < length:
            body += kept.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        closed = _wait_closed([kept], answered + KEEP_ALIVE_S + 10)
    assert closed, f"an idle kept-alive connection still open {KEEP_ALIVE_S + 10} s after its answer"
    assert KEEP_ALIVE_S - 0.5 <= closed[0] - answered <= KEEP_ALIVE_S + 5, closed[0] - answered


def test_the_start_up_log_names_the_addresses_believed(serve: Serve, base: tuple[Settings, Database]) -> None:
    """docs/security.md: ``web_started`` says from which addresses X-Forwarded-* are believed: the
    list (strnet serve here, trusted_proxies = ["127.0.0.2"]), or ``nobody``."""
    started = [json.loads(line) for line in serve.log.read_text().splitlines() if '"web_started"' in line]
    assert [e["forwarded_headers_from"] for e in started] == [["127.0.0.2"]]
    web = base[0].web.model_copy(update={"enabled": True, "port": free_port()})
    server = WebServer(make_app(base), web)
    with structlog.testing.capture_logs() as logs:
        server.start()
    server.stop()
    assert [e["forwarded_headers_from"] for e in logs if e["event"] == "web_started"] == ["nobody"]


def test_malformed_cookie_and_huge_integers_on_the_real_server(serve: Serve) -> None:
    port = int(serve.url.rsplit(":", 1)[1])
    for path, status in ((b"/flagged", b"303"), (b"/results/1/overlay.png", b"401")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            cookie = b"Cookie: strnet_session=\xe9\r\n"
            raw.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + cookie + b"Connection: close\r\n\r\n")
            answer = _read_all(raw)
        assert answer.startswith(b"HTTP/1.1 " + status) and b"content-security-policy" in answer.lower(), answer[:300]
    with serve.client("127.0.0.2") as viewer:
        assert attempt(viewer, "vera", USERS["vera"][1]).status_code == 303
        for path, status in (
            (f"/flagged?page={HUGE}", 422),
            (f"/patients/{HUGE}", 404),
            (f"/results/{HUGE}/overlay.png", 404),
            ("/flagged?page=400000000000000000", 404),
        ):
            r = viewer.get(path)
            assert r.status_code == status, path
            assert_secured(r, path)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _wait_closed(sockets: list[socket.socket], deadline: float) -> list[float]:
    """When each socket was closed by the server (monotonic times), until ``deadline``."""
    sel = selectors.DefaultSelector()
    for s in sockets:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed: list[float] = []
    while len(closed) < len(sockets) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            sock: Any = key.fileobj
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except BlockingIOError:
                continue
            if not data:
                closed.append(time.monotonic())
                sel.unregister(sock)
    sel.close()
    return closed
