"""Bad input to every route of the admin web (outside review): a 4xx with a message, never a 500,
never PHI in an error's text nor in the log.

Every route (GET query and path parameters, POST forms, exports) is sent malformed input by a
logged-in user of the role it is meant for (the login form: by nobody logged in): wrong types,
-1, 0, 10**30, floats for ints, empty and missing fields, 1 MB strings, %ff and %00, impossible
dates, repeated parameters, unknown sort keys and statuses, rows that do not exist or were
discarded. Each answer must be below 500; a 4xx must carry a message (an HTML page, or plain
text for images and exports), never a JSON body; the seeded patients' names, IDs and birth dates
never appear in a 4xx error's text, in any answer's headers, nor in what the web logged meanwhile.

A 4xx that shows the patient page again with the refused follow-up or verdict beside its field
(docs/security.md: the form kept as submitted) is the page the user asked for: there only the
error texts are checked. Over real screening data (tiny STR-Net, tests/web_seed.py), one app for
the module; on PostgreSQL too (``STRNET_TEST_DATABASE=postgresql``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from web_seed import PASSWORDS, PATIENTS, Seeded, csrf_of, login, patient, rows_of, screened_agent

from agent.db.engine import Database
from agent.db.models import FindingAssessment, FlaggedPatient, FollowUpEvent, OutboxItem, Result
from agent.queue import outbox
from agent.web.app import create_app

FORM = "application/x-www-form-urlencoded"
MB = 1024 * 1024
BIG = "a" * MB  # 1 MB: past every body limit (32 KiB forms, 8 KiB logins)
LONG = "b" * 20_000  # long, but within the form limit: reaches the route
HUGE = "1" + "0" * 30  # 10**30
MAX_HTTPX_URL = 60_000  # longer addresses go to the app directly (httpx refuses them)


def phi_markers() -> list[str]:
    """The seeded patients' names, IDs and birth dates, as stored and as a page would show them."""
    out: list[str] = []
    for pid, (name, birth, _dates) in PATIENTS.items():
        day = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
        out += [pid, name, html.escape(name), name.split("^")[0], birth, day]
    return out


# --- the probes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request. ``target`` and ``body`` are sent as written (already percent-encoded) after
    their placeholders are filled in: {fid} a flagged patient, {rid} a flagged image, {dead} a dead
    letter, {gone} a discarded one, {missing} an id no row has, {csrf} the session's CSRF token,
    {login_token} a fresh login form's token. ``status`` puts patient {fid} in that follow-up state
    first, so that a step with an odd note reaches the database."""

    role: str | None  # None: nobody logged in
    method: str
    target: str
    body: str | None = None
    content_type: str = FORM
    headers: dict[str, str] = field(default_factory=dict)
    status: str | None = None


PROBES: dict[str, Probe] = {}


def probe(name: str, p: Probe) -> None:
    assert name not in PROBES, name
    PROBES[name] = p


# integers as a path or query parameter: wrong types, signs, sizes, encodings
BAD_INTS = {
    "abc": "abc",
    "minus1": "-1",
    "zero": "0",
    "float": "1.5",
    "exp": "1e3",
    "10e30": HUGE,
    "int32max+1": str(2**31),
    "int32min-1": str(-(2**31) - 1),
    "int64max": str(2**63 - 1),
    "int64max+1": str(2**63),
    "int64min-1": str(-(2**63) - 1),
    "1000digits": "9" * 1000,
    "nul": "%00",
    "one-nul": "1%00",
    "ff": "%ff",
    "one-ff": "1%ff",
    "space": "%201",
    "plus": "%2B1",
    "underscore": "1_0",
    "fullwidth": "%EF%BC%91",
    "arabic": "%D9%A3",
    "hex": "0x1",
    "1MB": "7" * MB,
    "missing-row": "{missing}",
}
# path ids: the above, but not empty (/patients/ is another page) and 1 MB only once below
PATH_IDS = {k: v for k, v in BAD_INTS.items() if k != "1MB"}
PAGES = {**BAD_INTS, "empty": "", "repeated": "1&page=abc", "bare": None}
BAD_DATES = {
    "feb30": "2026-02-30",
    "year99999": "99999-01-01",
    "year0": "0000-01-01",
    "year1": "0001-01-01",
    "year9999": "9999-12-31",
    "month13": "2026-13-01",
    "compact": "20260101",
    "datetime": "2026-01-01T10%3A00",
    "signed": "%2B2026-01-01",
    "abc": "abc",
    "nul": "2026-01-01%00",
    "ff": "%ff",
    "1MB": "2" * MB,
}
BAD_WORDS = {  # a status, severity, sort key, event kind: unknown, odd bytes, huge
    "unknown": "bogus",
    "upper": "NEW",
    "dunder": "__class__",
    "nul": "%00",
    "word-nul": "new%00",
    "ff": "%ff",
    "sql": "%27%3B%20DROP%20TABLE%20users%3B--",
    "1MB": BIG,
}
BAD_FLOATS = {
    "abc": "abc",
    "nan": "nan",
    "inf": "inf",
    "minus-inf": "-inf",
    "minus1": "-1",
    "two": "2",
    "1e400": "1e400",
    "tiny": "1e-400",
    "hex": "0x1",
    "comma": "0%2C5",
    "nul": "0.5%00",
    "ff": "%ff",
    "1MB": "1" * MB,
}

# --- GET: the worklist and its export (the filters), as a viewer
for route in ("/flagged", "/flagged/export.csv"):
    params: dict[str, dict[str, Any]] = {
        "status": BAD_WORDS,
        "severity": BAD_WORDS,
        "sort": BAD_WORDS,
        "order": BAD_WORDS,
        "overdue": {**BAD_WORDS, "two": "2", "yes": "yes"},
        "date_from": BAD_DATES,
        "date_to": BAD_DATES,
        "min_probability": BAD_FLOATS,
        "page": PAGES,
    }
    for param, values in params.items():
        for name, value in values.items():
            query = param if value is None else f"{param}={value}"
            probe(f"GET {route} {param}={name}", Probe("vera", "GET", f"{route}?{query}"))
    for name, query in {
        "repeated-status": "status=new&status=bogus",
        "repeated-sort": "sort=name&sort=__class__",
        "repeated-everything": "page=2&page=-1&min_probability=0.5&min_probability=nan",
        "dates-reversed": "date_from=2026-12-31&date_to=2026-01-01",
        "unknown-params": "foo=bar&%ff=%ff&%00=%00",
        "no-equals": "status&sort&page",
        "ampersands": "&&&=&==",
        "whole-query-1MB": "x=" + BIG,
    }.items():
        probe(f"GET {route} {name}", Probe("vera", "GET", f"{route}?{query}"))

# --- GET: pages addressed by a row id, as a viewer
for route in ("/patients/{}", "/patients/{}/trend.png", "/results/{}/overlay.png", "/results/{}/overlay.jpg"):
    for name, value in PATH_IDS.items():
        probe(f"GET {route.format('<' + name + '>')}", Probe("vera", "GET", route.format(value)))
probe("GET /patients/<1MB>", Probe("vera", "GET", "/patients/" + "7" * MB))
probe("GET /patients/<id>?page=abc&x=%00", Probe("vera", "GET", "/patients/{fid}?page=abc&x=%00"))
for name, value in {
    "garbage": "%%%",
    "star": "*",
    "many": ", ".join(['"x"'] * 2000),
    "weak-only": "W/",
    "unquoted": "abc",
    "latin1": "\xe9",
}.items():
    probe(
        f"GET /results/<rid>/overlay.jpg If-None-Match={name}",
        Probe("vera", "GET", "/results/{rid}/overlay.jpg", headers={"If-None-Match": value}),
    )

# --- GET: the audit log, as an auditor
audit_params: dict[str, dict[str, Any]] = {
    "kind": BAD_WORDS,
    "actor": {**BAD_WORDS, "a-nul-b": "a%00b", "spaces": "%20%20%20"},
    "date_from": BAD_DATES,
    "date_to": BAD_DATES,
    "page": PAGES,
}
for param, values in audit_params.items():
    for name, value in values.items():
        query = param if value is None else f"{param}={value}"
        probe(f"GET /audit {param}={name}", Probe("audrey", "GET", f"/audit?{query}"))
probe("GET /audit repeated", Probe("audrey", "GET", "/audit?kind=login&kind=bogus&actor=a&actor=%00&page=1&page=x"))

# --- GET: dead letters, as an admin
for name, value in PAGES.items():
    probe(f"GET /dead-letters page={name}", Probe("adam", "GET", "/dead-letters?page=" + (value or "")))
for name, value in {**BAD_WORDS, **{f"int-{k}": v for k, v in BAD_INTS.items()}}.items():
    probe(f"GET /dead-letters done={name}", Probe("adam", "GET", f"/dead-letters?done={value}"))
    probe(f"GET /dead-letters done=replayed&n={name}", Probe("adam", "GET", f"/dead-letters?done=replayed&n={value}"))

# --- GET: pages without parameters, with junk ones (as the roles that may see them)
JUNK = "page=abc&page=-1&id=%00&%ff=%ff&sort=__class__&x=" + HUGE
for role, route in (
    ("vera", "/"),
    ("audrey", "/"),
    ("vera", "/performance"),
    ("audrey", "/performance/evidence.csv"),
    ("vera", "/performance/evidence.png"),
    ("audrey", "/status"),
    ("adam", "/status"),
    (None, "/healthz"),
    (None, "/metrics"),
):
    probe(f"GET {route} junk as {role}", Probe(role, "GET", f"{route}?{JUNK}"))
    probe(f"GET {route} 1MB query as {role}", Probe(role, "GET", f"{route}?x={BIG}"))

# --- GET /login, before a login
for name, value in {
    "nul": "%00",
    "ff": "%ff",
    "other-site": "//evil.example",
    "scheme": "https%3A//evil.example",
    "path-nul": "/flagged%00",
    "path-ff": "/flagged%ff",
    "1MB": "/" + BIG,
    "repeated": "/flagged&next=//evil",
    "empty": "",
}.items():
    probe(f"GET /login next={name}", Probe(None, "GET", f"/login?next={value}"))
probe("GET /login expired=%00", Probe(None, "GET", "/login?expired=%00&expired=1"))
for name, value in {
    "ff": "%ff",
    "nul": "%00",
    "latin1": "\xe9",
    "other-site": "%2F%2Fevil",
    "long": "%2F" * 3000,
}.items():
    probe(f"GET /login cookie next={name}", Probe(None, "GET", "/login", headers={"Cookie": f"strnet_next={value}"}))

# --- POST /login, before a login
LOGIN = "login_token={login_token}&password=some-password-1"
for name, body in {
    "user-nul": f"{LOGIN}&username=a%00b",
    "user-only-nul": f"{LOGIN}&username=%00",
    "user-ff": f"{LOGIN}&username=%ff%fe",
    "user-spaces": f"{LOGIN}&username=%20%20",
    "user-long": f"{LOGIN}&username=" + "u" * 4000,
    "user-1MB": f"{LOGIN}&username={BIG}",
    "user-missing": LOGIN,
    "user-repeated": f"{LOGIN}&username=vera&username=%00",
    "password-nul": "login_token={login_token}&username=vera&password=%00",
    "password-missing": "login_token={login_token}&username=vera",
    "password-ff": "login_token={login_token}&username=vera&password=%ff" + "x" * 10,
    "token-missing": "username=vera&password=some-password-1",
    "token-garbage": "login_token=%00%ff&username=vera&password=some-password-1",
    "token-repeated": "login_token=x&login_token={login_token}&login_token=%00&username=vera&password=p",
    "next-nul": f"{LOGIN}&username=nobody&next=%00",
    "next-1MB": f"{LOGIN}&username=nobody&next=/{BIG}",
    "too-many-fields": LOGIN + "".join(f"&f{i}=1" for i in range(20)),
    "empty": "",
    "not-urlencoded": "%%%&&==\x00\xff",
}.items():
    probe(f"POST /login {name}", Probe(None, "POST", "/login", body))
probe("POST /login json", Probe(None, "POST", "/login", '{"username": "vera"}', content_type="application/json"))
probe("POST /login text", Probe(None, "POST", "/login", "username=vera", content_type="text/plain"))

# --- POST /logout: a missing or odd CSRF token (a right one ends the session the others use)
for name, body in {
    "missing": "",
    "wrong": "csrf_token=wrong",
    "nul": "csrf_token=%00",
    "ff": "csrf_token=%ff",
    "1MB": f"csrf_token={BIG}",
}.items():
    probe(f"POST /logout csrf {name}", Probe("vera", "POST", "/logout", body))

# --- POST a follow-up, as a viewer
FU = "/patients/{fid}/follow-up"
for name, value in PATH_IDS.items():
    probe(
        f"POST /patients/<{name}>/follow-up",
        Probe("vera", "POST", f"/patients/{value}/follow-up", "csrf_token={csrf}&action=closed"),
    )
for name, body in {
    "csrf-missing": "action=closed",
    "csrf-wrong": "csrf_token=x&action=closed",
    "csrf-nul": "csrf_token=%00&action=closed",
    "nothing-else": "csrf_token={csrf}",
    "action-empty": "csrf_token={csrf}&action=",
    "action-unknown": "csrf_token={csrf}&action=bogus",
    "action-status": "csrf_token={csrf}&action=confirmed",
    "action-nul": "csrf_token={csrf}&action=closed%00",
    "action-ff": "csrf_token={csrf}&action=%ff",
    "action-repeated": "csrf_token={csrf}&action=closed&action=bogus&action=%00",
    "action-1MB": f"csrf_token={{csrf}}&action={BIG}",
    "t-abc": "csrf_token={csrf}&action=dxa_done&dxa_date=2026-01-01&measured_t_score=abc",
    "t-nan": "csrf_token={csrf}&action=dxa_done&dxa_date=2026-01-01&measured_t_score=nan",
    "t-inf": "csrf_token={csrf}&action=dxa_done&dxa_date=2026-01-01&measured_t_score=-inf",
    "t-1e400": "csrf_token={csrf}&action=dxa_done&dxa_date=2026-01-01&measured_t_score=1e400",
    "t-1e308": "csrf_token={csrf}&action=dxa_done&dxa_date=2026-01-01&measured_t_score=-1e308",
    "t-nul": "csrf_token={csrf}&action=dxa_done&dxa_date=2026-01-01&measured_t_score=-2%00",
    "t-long": f"csrf_token={{csrf}}&action=dxa_done&dxa_date=2026-01-01&measured_t_score=-{LONG}",
    "t-with-closed": "csrf_token={csrf}&action=closed&measured_t_score=-2.1",
    "date-feb30": "csrf_token={csrf}&action=dxa_done&measured_t_score=-2.1&dxa_date=2026-02-30",
    "date-99999": "csrf_token={csrf}&action=dxa_done&measured_t_score=-2.1&dxa_date=99999-01-01",
    "date-year1": "csrf_token={csrf}&action=dxa_done&measured_t_score=-2.1&dxa_date=0001-01-01",
    "date-9999": "csrf_token={csrf}&action=dxa_done&measured_t_score=-2.1&dxa_date=9999-12-31",
    "date-nul": "csrf_token={csrf}&action=dxa_done&measured_t_score=-2.1&dxa_date=2026-01-01%00",
    "date-ff": "csrf_token={csrf}&action=dxa_done&measured_t_score=-2.1&dxa_date=%ff",
    "date-with-closed": "csrf_token={csrf}&action=closed&dxa_date=2026-01-01",
    "note-long": f"csrf_token={{csrf}}&action=bogus&note={LONG}",
    "note-1MB": f"csrf_token={{csrf}}&action=closed&note={BIG}",
    "too-many-fields": "csrf_token={csrf}&action=closed" + "".join(f"&f{i}=1" for i in range(20)),
    "not-urlencoded": "csrf_token={csrf}&%%%&&==\x00\xff",
}.items():
    probe(f"POST follow-up {name}", Probe("vera", "POST", FU, body))
probe("POST follow-up json", Probe("vera", "POST", FU, '{"action": "closed"}', content_type="application/json"))
# steps the pathway allows, with odd free text: what is not refused reaches the database
for name, (status, body) in {
    "note-nul": ("confirmed", "csrf_token={csrf}&action=dxa_ordered&note=seen%00twice"),
    "note-ff": ("dxa_ordered", "csrf_token={csrf}&action=closed&note=%ff%fe"),
    "note-long": ("confirmed", f"csrf_token={{csrf}}&action=closed&note={LONG}"),
    "dxa-done-edges": ("dxa_ordered", "csrf_token={csrf}&action=dxa_done&measured_t_score=-10&dxa_date=1900-01-01"),
}.items():
    probe(f"POST follow-up allowed {name}", Probe("vera", "POST", FU, body, status=status))

# --- POST a verdict on a flagged image, as a radiologist
AS = "/results/{rid}/assessment"
for name, value in PATH_IDS.items():
    probe(
        f"POST /results/<{name}>/assessment",
        Probe("rita", "POST", f"/results/{value}/assessment", "csrf_token={csrf}&verdict=agree"),
    )
for name, body in {
    "csrf-missing": "verdict=agree",
    "verdict-missing": "csrf_token={csrf}",
    "verdict-unknown": "csrf_token={csrf}&verdict=maybe",
    "verdict-nul": "csrf_token={csrf}&verdict=agree%00",
    "verdict-ff": "csrf_token={csrf}&verdict=%ff",
    "verdict-repeated": "csrf_token={csrf}&verdict=maybe&verdict=%00",
    "verdict-1MB": f"csrf_token={{csrf}}&verdict={BIG}",
    "disagree-no-reason": "csrf_token={csrf}&verdict=disagree&reason=%20%20",
    "disagree-reason-nul": "csrf_token={csrf}&verdict=disagree&reason=normal%00bone",
    "disagree-reason-ff": "csrf_token={csrf}&verdict=disagree&reason=%ff%fe",
    "disagree-reason-long": f"csrf_token={{csrf}}&verdict=disagree&reason={LONG}",
    "agree-reason-nul": "csrf_token={csrf}&verdict=agree&reason=%00",
    "too-many-fields": "csrf_token={csrf}&verdict=agree" + "".join(f"&f{i}=1" for i in range(20)),
}.items():
    probe(f"POST assessment {name}", Probe("rita", "POST", AS, body))

# --- POST dead letters, as an admin
for action in ("replay", "discard"):
    for name, value in {**PATH_IDS, "discarded-row": "{gone}"}.items():
        probe(
            f"POST /dead-letters/<{name}>/{action}",
            Probe("adam", "POST", f"/dead-letters/{value}/{action}", "csrf_token={csrf}&reason=checked"),
        )
    probe(
        f"POST /dead-letters/<dead>/{action} csrf missing",
        Probe("adam", "POST", f"/dead-letters/{{dead}}/{action}", "reason=x"),
    )
for name, body in {
    "reason-missing": "csrf_token={csrf}",
    "reason-spaces": "csrf_token={csrf}&reason=%20%20",
    "reason-1MB": f"csrf_token={{csrf}}&reason={BIG}",
    "reason-repeated": "csrf_token={csrf}&reason=&reason=%00&reason=",
}.items():
    probe(f"POST discard {name}", Probe("adam", "POST", "/dead-letters/{dead}/discard?page=abc", body))
for name, body in {
    "nothing": "csrf_token={csrf}",
    "csrf-missing": "scope=shown&shown=1",
    "scope-unknown": "csrf_token={csrf}&scope=%00&item=abc",
    "shown-junk": f"csrf_token={{csrf}}&scope=shown&shown=abc,,-1,1.5,{HUGE},%00,%ff,{{missing}},{{gone}}",
    "shown-empty": "csrf_token={csrf}&scope=shown&shown=",
    "shown-long": "csrf_token={csrf}&scope=shown&shown=" + "1," * 12_000,
    "shown-1MB": f"csrf_token={{csrf}}&scope=shown&shown={BIG}",
    "items-junk": f"csrf_token={{csrf}}&item=abc&item=-1&item=%00&item={HUGE}&item={{missing}}&item={{gone}}",
    "items-int32": "csrf_token={csrf}&item=2147483648&item=999999999999999999&item=-1",
    "shown-int32": "csrf_token={csrf}&scope=shown&shown=2147483648,999999999999999999",
    "items-too-many": "csrf_token={csrf}" + "&item=1" * 30,
    "items-and-shown": "csrf_token={csrf}&scope=shown&item={missing}&shown=%ff",
}.items():
    probe(f"POST bulk-replay {name}", Probe("adam", "POST", "/dead-letters/bulk-replay", body))
# odd free text that reaches the database, and a real replay among junk: last, they change rows
probe(
    "POST discard allowed reason-nul",
    Probe("adam", "POST", "/dead-letters/{dead}/discard", "csrf_token={csrf}&reason=dup%00licate"),
)
probe(
    "POST discard allowed reason-ff",
    Probe("adam", "POST", "/dead-letters/{dead}/discard", "csrf_token={csrf}&reason=%ff%fe"),
)
probe(
    "POST bulk-replay allowed among junk",
    Probe("adam", "POST", "/dead-letters/bulk-replay", "csrf_token={csrf}&item=abc&item={dead}&item=%00"),
)

# --- odd paths and filters from a role the page is not for: refused (403), the refusal audited
probe("GET /patients/<nul> as auditor", Probe("audrey", "GET", "/patients/%00%ff"))
probe("GET /audit actor=nul as viewer", Probe("vera", "GET", "/audit?actor=%00"))
probe(
    "POST /dead-letters/<nul>/replay as viewer", Probe("vera", "POST", "/dead-letters/%00/replay", "csrf_token={csrf}")
)

# --- methods no route takes
for role, method, route in (
    ("vera", "PUT", "/flagged"),
    ("vera", "DELETE", "/patients/{fid}"),
    ("vera", "PATCH", "/patients/{fid}/follow-up"),
    ("adam", "GET", "/dead-letters/{dead}/replay"),
    ("adam", "PUT", "/dead-letters/bulk-replay"),
    ("vera", "POST", "/flagged/export.csv"),
):
    probe(f"{method} {route}", Probe(role, method, route, "csrf_token={csrf}"))


# --- the module's app, sessions and rows ---------------------------------------------------------


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Seeded]:
    with screened_agent(tmp_path_factory.mktemp("bad-input-agent"), tiny_weights) as s:
        s.agent.sender.stop()  # replayed dead letters stay PENDING
        yield s


@dataclass
class World:
    db: Database
    app: Any
    clients: dict[str, TestClient]
    csrf: dict[str, str]
    ids: dict[str, str]
    fid: int


def _client(app: Any) -> TestClient:
    # a 500 is an answer to look at here, not an exception in the test
    return TestClient(app, base_url="http://testserver", raise_server_exceptions=False)


@pytest.fixture(scope="module")
def world(seeded: Seeded) -> World:
    db = seeded.agent.db
    app = create_app(seeded.agent.settings, db)
    fp = patient(db, "WEBP-0001")
    flagged_images = [r.id for r in rows_of(db, Result) if r.bone_loss and r.study_id == fp.last_study_id]
    assert flagged_images, "WEBP-0001's latest study has a flagged image"
    dead = [o.id for o in rows_of(db, OutboxItem) if o.state == "DEAD"]
    assert len(dead) >= 3
    assert outbox.discard_dead(db, dead[0], "adam", "set up: a discarded row")
    biggest = max([r.id for r in rows_of(db, Result)] + [r.id for r in rows_of(db, FlaggedPatient)] + dead)
    clients = {user: login(app, user, raise_server_exceptions=False) for user in PASSWORDS}
    clients["anonymous"] = _client(app)
    csrf = {user: csrf_of(clients[user].get("/status").text) for user in PASSWORDS}
    ids = {
        "{fid}": str(fp.id),
        "{rid}": str(flagged_images[0]),
        "{gone}": str(dead[0]),
        "{missing}": str(biggest + 1000),
    }
    return World(db, app, clients, csrf, ids, fp.id)


def _fill(text: str, w: World, csrf: str, login_token: Callable[[], str]) -> str:
    for key, value in w.ids.items():
        text = text.replace(key, value)
    if "{dead}" in text:  # a dead letter now (replays and discards take them), else none
        dead = [o.id for o in rows_of(w.db, OutboxItem) if o.state == "DEAD"]
        text = text.replace("{dead}", str(dead[-1]) if dead else w.ids["{missing}"])
    if "{login_token}" in text:
        text = text.replace("{login_token}", login_token())
    return text.replace("{csrf}", csrf)


def _login_token(client: TestClient) -> Callable[[], str]:
    def token() -> str:
        page = client.get("/login")
        return re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]

    return token


def _raw_get(app: Any, target: str, client: TestClient) -> httpx.Response:
    """A GET whose address is longer than httpx sends (its limit is 64 KiB), straight to the app."""
    path, _, query = target.partition("?")
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"cookie", cookie.encode())],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    answer: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    async def call() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - answered 500 by the app first, as over a socket
            answer.setdefault("status", 500)

    anyio.run(call)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in answer["headers"]]
    return httpx.Response(answer["status"], headers=headers, content=answer["body"])


def _error_texts(r: httpx.Response) -> str:
    """What a 4xx says: the whole answer, or where it shows the patient page again with the form as
    submitted, only its error messages (the page itself is what the user asked to see)."""
    if 'action="/patients/' in r.text and 'class="field-error"' in r.text:
        found = re.findall(r'<(?:span|p) class="(?:field-)?error"[^>]*>([^<]*)<', r.text)
        assert found, "a refused form says why"
        return "\n".join(found)
    return r.text


@pytest.mark.parametrize("name", list(PROBES))
def test_bad_input_gets_a_4xx_with_a_message_never_a_500_nor_phi(
    name: str, world: World, capfd: pytest.CaptureFixture[str]
) -> None:
    p = PROBES[name]
    client = world.clients[p.role or "anonymous"]
    if p.status is not None:
        with world.db.transaction() as s:
            s.query(FlaggedPatient).filter(FlaggedPatient.id == world.fid).update({"status": p.status})
    fill = lambda text: _fill(text, world, world.csrf.get(p.role or "", ""), _login_token(client))  # noqa: E731
    target = fill(p.target)
    headers = {k: v.encode("latin-1") for k, v in p.headers.items()}
    content: bytes | None = None
    if p.body is not None:
        content = fill(p.body).encode("latin-1")
        headers["Content-Type"] = p.content_type.encode()
    if len(target) > MAX_HTTPX_URL:
        r = _raw_get(world.app, target, client)
    else:
        r = client.request(p.method, target, content=content, headers=headers, follow_redirects=False)
    logged = capfd.readouterr()

    assert r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]!r}"
    markers = phi_markers()
    head = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    assert not [m for m in markers if m in head], f"{name}: PHI in the headers"
    assert not [m for m in markers if m in logged.out + logged.err], f"{name}: PHI in the log"
    if 400 <= r.status_code < 500:
        assert "application/json" not in r.headers.get("content-type", ""), f"{name}: a JSON error"
        assert r.text.strip(), f"{name}: a {r.status_code} without a message"
        said = _error_texts(r)
        echoed = [m for m in markers if m in said]
        assert not echoed, f"{name}: {r.status_code} echoes PHI {echoed}"
        assert "Traceback" not in logged.err, f"{name}: a client error logged a traceback"


def test_a_nul_in_free_text_is_a_400_that_says_so_and_records_nothing(world: World) -> None:
    """PostgreSQL stores no NUL in text: a note, reason, user name or actor filter holding one was
    a 500 there (DataError); it is refused on every engine alike."""
    db = world.db
    with db.transaction() as s:
        s.query(FlaggedPatient).filter(FlaggedPatient.id == world.fid).update({"status": "confirmed"})
        dead = [o.id for o in s.query(OutboxItem).filter(OutboxItem.state == "DEAD")]
        if not dead:  # the probes before replayed or discarded them all
            dead = [s.query(OutboxItem).order_by(OutboxItem.id).first().id]  # type: ignore[union-attr]
            s.query(OutboxItem).filter(OutboxItem.id == dead[0]).update({"state": "DEAD"})
    counts = (len(rows_of(db, FollowUpEvent)), len(rows_of(db, FindingAssessment)))
    vera, rita, adam, audrey = (world.clients[u] for u in ("vera", "rita", "adam", "audrey"))
    answers = {
        "note": vera.post(
            f"/patients/{world.fid}/follow-up",
            data={"csrf_token": world.csrf["vera"], "action": "dxa_ordered", "note": "seen\x00twice"},
        ),
        "reason": rita.post(
            f"/results/{world.ids['{rid}']}/assessment",
            data={"csrf_token": world.csrf["rita"], "verdict": "disagree", "reason": "normal\x00bone"},
        ),
        "discard": adam.post(
            f"/dead-letters/{dead[0]}/discard", data={"csrf_token": world.csrf["adam"], "reason": "dup\x00"}
        ),
    }
    for what, r in answers.items():
        assert r.status_code == 400 and "NUL character (%00)" in r.text, what
    # the CSRF check comes first: a forged form with a NUL is refused as forged
    assert vera.post(f"/patients/{world.fid}/follow-up", data={"note": "\x00"}).status_code == 403
    anonymous = world.clients["anonymous"]
    token = _login_token(anonymous)()
    r = anonymous.post("/login", data={"login_token": token, "username": "ve\x00ra", "password": "some-password"})
    assert r.status_code == 400 and "NUL character (%00)" in r.text
    r = audrey.get("/audit", params={"actor": "ad\x00am"})
    assert r.status_code == 400 and "Check the actor field." in r.text
    assert (len(rows_of(db, FollowUpEvent)), len(rows_of(db, FindingAssessment))) == counts
    assert next(o for o in rows_of(db, OutboxItem) if o.id == dead[0]).state == "DEAD"
    assert patient(db, "WEBP-0001").status == "confirmed"


@pytest.mark.parametrize("number", [2**31, -(2**31) - 1, 2**63 - 1])
def test_a_row_id_past_the_id_columns_range_names_no_row_on_either_engine(world: World, number: int) -> None:
    """The id columns are INTEGER: on PostgreSQL an id past 2^31 - 1 was a 500 (DataError)."""
    vera, adam = world.clients["vera"], world.clients["adam"]
    for path in (f"/patients/{number}", f"/patients/{number}/trend.png", f"/results/{number}/overlay.jpg"):
        assert vera.get(path).status_code == 404, path
    r = adam.post(f"/dead-letters/{number}/replay", data={"csrf_token": world.csrf["adam"]})
    assert r.status_code == 404
    before = [(o.id, o.state) for o in rows_of(world.db, OutboxItem)]
    r = adam.post(
        "/dead-letters/bulk-replay",
        data={"csrf_token": world.csrf["adam"], "item": str(number)},
        follow_redirects=False,
    )
    assert r.status_code == 400 and "Tick the dead letters" in r.text  # no row ticked
    assert [(o.id, o.state) for o in rows_of(world.db, OutboxItem)] == before
