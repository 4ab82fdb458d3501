"""The admin web over real screening data (tiny STR-Net, pynetdicom PACS), through FastAPI's
TestClient, plus a live uvicorn (HTTP and HTTPS) for the server, cookies and TLS."""

from __future__ import annotations

import csv
import io
import re
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import database_url_for, free_port
from fastapi.testclient import TestClient
from typer.testing import CliRunner
from web_seed import DEAD_PATIENT, PASSWORDS, PATIENTS, SCRIPT_NAME, Seeded, phi_strings, screened_agent, wait_for

from agent.db.engine import Database
from agent.db.models import AuditEvent, FlaggedPatient, OutboxItem, Result, User, WebSession
from agent.db.users import add_user, open_session
from agent.db.worklist import verify_chain
from agent.queue import sweeps
from agent.web.app import create_app
from agent.web.auth import hash_password
from agent.web.server import WebServer

# every successful GET of patient data in this module: (user, path); checked against the audit trail
LEDGER: list[tuple[str, str]] = []


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Seeded]:
    with screened_agent(tmp_path_factory.mktemp("web-agent"), tiny_weights) as s:
        yield s


@pytest.fixture(scope="module")
def app(seeded: Seeded) -> Any:
    return create_app(seeded.agent.settings, seeded.agent.db, on_replay=seeded.agent.sender.wake.set)


def db_rows(db: Database, model: Any) -> list[Any]:
    with db.reading() as s:
        return list(s.query(model).order_by(model.id))


def flagged_row(db: Database, fid: int) -> FlaggedPatient:
    return next(r for r in db_rows(db, FlaggedPatient) if r.id == fid)


def flagged_id(db: Database, patient_id: str) -> int:
    return next(r.id for r in db_rows(db, FlaggedPatient) if r.patient_id == patient_id)


def login_form_token(client: TestClient) -> str:
    page = client.get("/login")
    assert page.status_code == 200
    return re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


def login(app: Any, user: str, password: str | None = None) -> TestClient:
    client = TestClient(app, base_url="http://testserver")
    r = client.post(
        "/login",
        data={"login_token": login_form_token(client), "username": user, "password": password or PASSWORDS[user][1]},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def view(client: TestClient, user: str, path: str, **kw: Any) -> httpx.Response:
    """GET a page of patient data, noting it for the audit check at the end of the module."""
    r = client.get(path, **kw)
    if r.status_code == 200:
        LEDGER.append((user, path))
    return r


def test_without_a_session_every_phi_page_redirects_to_login_or_answers_401(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    fid = flagged_id(db, "WEBP-0001")
    result_id = 1
    anonymous = TestClient(app)
    pages = [
        "/",
        "/flagged",
        "/flagged?status=new",
        f"/patients/{fid}",
        "/status",
        "/performance",
        "/dead-letters",
        "/audit",
    ]
    files = ["/flagged/export.csv", f"/patients/{fid}/trend.png", f"/results/{result_id}/overlay.png"]
    for path in pages + files:
        r = anonymous.get(path, follow_redirects=False)
        if path in files:
            assert r.status_code == 401, path
        else:
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
        for secret in phi_strings():
            assert secret not in r.text, f"{secret!r} in the answer to {path}"
    before = db_rows(db, FlaggedPatient)
    r = anonymous.post(
        f"/patients/{fid}/follow-up", data={"action": "closed", "csrf_token": "x"}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert [p.status for p in db_rows(db, FlaggedPatient)] == [p.status for p in before]
    # a forged session cookie is no session
    anonymous.cookies.set("strnet_session", "forged-token")
    assert anonymous.get("/flagged", follow_redirects=False).status_code == 303


def test_cookies_headers_and_escaping(app: Any, seeded: Seeded) -> None:
    client = TestClient(app)
    r = client.post(
        "/login",
        data={"login_token": login_form_token(client), "username": "vera", "password": PASSWORDS["vera"][1]},
        follow_redirects=False,
    )
    cookie = r.headers["set-cookie"]
    assert "strnet_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain HTTP here; the HTTPS test below checks Secure
    page = view(client, "vera", "/flagged")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store" and page.headers["pragma"] == "no-cache"
    assert csp == (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )  # as docs/security.md states it
    assert (page.headers["x-content-type-options"], page.headers["x-frame-options"]) == ("nosniff", "DENY")
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert SCRIPT_NAME not in page.text and "<script" not in page.text  # no script tags at all
    pid = flagged_id(seeded.agent.db, "WEBP-0002")
    detail = view(client, "vera", f"/patients/{pid}")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail.text and SCRIPT_NAME not in detail.text
    # links carry row ids only: no patient or DICOM identifier in any URL of the page
    hrefs = re.findall(r'(?:href|src|action)="([^"]*)"', page.text + detail.text)
    assert hrefs
    uids = [str(u) for u in seeded.study_uids]
    for h in hrefs:
        for secret in [*phi_strings(), *uids, "WEBP"]:
            assert secret not in h, h


def test_post_without_valid_csrf_token_is_refused(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    fid = flagged_id(db, "WEBP-0003")
    client = login(app, "vera")
    for token in (None, "", "not-the-token"):
        data = {"action": "closed", "note": "forged"}
        if token is not None:
            data["csrf_token"] = token
        r = client.post(f"/patients/{fid}/follow-up", data=data, follow_redirects=False)
        assert r.status_code == 403
    assert next(p for p in db_rows(db, FlaggedPatient) if p.id == fid).status == "new"
    # a token from another session does not work either
    other = view(login(app, "adam"), "adam", f"/patients/{fid}")
    r = client.post(
        f"/patients/{fid}/follow-up",
        data={"action": "closed", "csrf_token": csrf_of(other.text)},
        follow_redirects=False,
    )
    assert r.status_code == 403
    # the login form has its own token
    fresh = TestClient(app)
    r = fresh.post("/login", data={"username": "vera", "password": PASSWORDS["vera"][1]}, follow_redirects=False)
    assert r.status_code == 403 and "strnet_session" not in r.headers.get("set-cookie", "")
    refused = [
        e for e in db_rows(db, AuditEvent) if e.event_code == "110113" and (e.detail or {}).get("refused") == "csrf"
    ]
    assert len(refused) >= 4


def test_five_failures_throttle_the_name_from_that_address_without_a_hard_lock(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    add_user(db, "lockme", "viewer", hash_password("right-password-1"))
    client = TestClient(app)
    for _ in range(5):
        r = client.post(
            "/login",
            data={"login_token": login_form_token(client), "username": "lockme", "password": "wrong"},
            follow_redirects=False,
        )
        assert r.status_code == 401 and "strnet_session" not in r.headers.get("set-cookie", "")
    r = client.post(
        "/login",
        data={"login_token": login_form_token(client), "username": "lockme", "password": "right-password-1"},
        follow_redirects=False,
    )
    assert r.status_code == 401 and "too many failed attempts" in r.text  # the one message of every failure
    user = next(u for u in db_rows(db, User) if u.username == "lockme")
    assert user.locked_until is None  # no hard lock that an attacker could extend
    alerts = [e for e in db_rows(db, AuditEvent) if (e.detail or {}).get("alert") == "login_throttled"]
    assert len(alerts) == 1 and alerts[0].object_id == str(user.id)
    failed_logins = [e for e in db_rows(db, AuditEvent) if e.event_code == "110122" and e.actor == "lockme"]
    assert len(failed_logins) == 6 and all(e.outcome == 4 for e in failed_logins)
    assert [(e.detail or {}).get("reason") for e in failed_logins][-1] == "throttled"
    # from another address the right password logs in at once
    elsewhere = TestClient(app, client=("10.20.30.40", 50000))
    r = elsewhere.post(
        "/login",
        data={"login_token": login_form_token(elsewhere), "username": "lockme", "password": "right-password-1"},
        follow_redirects=False,
    )
    assert r.status_code == 303


def test_roles(app: Any, seeded: Seeded) -> None:
    viewer, admin, auditor = login(app, "vera"), login(app, "adam"), login(app, "audrey")
    assert viewer.get("/dead-letters").status_code == 403
    assert viewer.get("/audit").status_code == 403
    assert admin.get("/audit").status_code == 403
    assert auditor.get("/flagged").status_code == 403
    assert auditor.get(f"/patients/{flagged_id(seeded.agent.db, 'WEBP-0001')}").status_code == 403
    assert auditor.get("/flagged/export.csv").status_code == 403
    r = auditor.get("/audit")
    assert r.status_code == 200 and "Login" in r.text
    for secret in phi_strings():
        assert secret not in r.text  # the audit log refers to rows, not to patients
    assert view(admin, "adam", "/flagged").status_code == 200


# docs/security.md, Roles: what each role may GET ("yes": 200, else 403)
ROLE_PAGES = {
    "/flagged": {"vera", "adam", "rita"},
    "/patients/{fid}": {"vera", "adam", "rita"},
    "/flagged/export.csv": {"vera", "adam", "rita"},
    "/performance": {"vera", "adam", "audrey", "rita"},
    "/performance/evidence.csv": {"vera", "adam", "audrey", "rita"},
    "/status": {"vera", "adam", "audrey", "rita"},
    "/dead-letters": {"adam"},
    "/audit": {"audrey"},
}
PHI_PAGES = ("/flagged", "/patients/{fid}", "/flagged/export.csv")  # noted for the audit check


def test_each_role_gets_the_pages_of_the_roles_table(app: Any, seeded: Seeded) -> None:
    fid = flagged_id(seeded.agent.db, "WEBP-0001")
    for user in PASSWORDS:
        client = login(app, user)
        for pattern, allowed in ROLE_PAGES.items():
            path = pattern.format(fid=fid)
            r = view(client, user, path) if pattern in PHI_PAGES else client.get(path)
            assert r.status_code == (200 if user in allowed else 403), (user, path)


def test_flagged_list_filters_sort_paginate_and_patient_detail(app: Any, seeded: Seeded) -> None:
    client = login(app, "vera")
    r = view(client, "vera", "/flagged")
    assert re.search(r'id="total">3 matching', r.text)
    for pid in PATIENTS:
        assert pid in r.text
    assert 'id="total">0 matching' in view(client, "vera", "/flagged?min_probability=0.999").text
    assert 'id="total">0 matching' in view(client, "vera", "/flagged?status=closed").text
    assert 'id="total">0 matching' in view(client, "vera", "/flagged?date_to=2000-01-01").text
    assert 'id="total">3 matching' in view(client, "vera", "/flagged?date_from=2000-01-01&status=new").text
    assert client.get("/flagged?status=bogus").status_code == 400
    by_name = view(client, "vera", "/flagged?sort=name&order=asc").text
    names = re.findall(r'class="patient" href="/patients/\d+">([^<]*)<', by_name)
    assert names == sorted(names) and len(names) == 3
    # patient detail: both studies of WEBP-0001 with per-image results, overlays and the trend plot
    fid = flagged_id(seeded.agent.db, "WEBP-0001")
    page = view(client, "vera", f"/patients/{fid}")
    assert page.status_code == 200 and "Doe Jane" in page.text
    assert page.text.count('<section class="study">') == 2
    overlays = re.findall(r'src="(/results/\d+/overlay\.jpg)"', page.text)
    assert len(overlays) == 4
    jpg = view(client, "vera", overlays[0])
    assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg" and jpg.content[:2] == b"\xff\xd8"
    assert f'href="{overlays[0][:-4]}.png"' in page.text  # the full-size PNG, linked
    png = view(client, "vera", overlays[0][:-4] + ".png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    trend = view(client, "vera", f"/patients/{fid}/trend.png")
    assert trend.status_code == 200 and trend.content[:4] == b"\x89PNG"
    assert client.get("/patients/99999").status_code == 404


def test_pagination(app: Any, seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.web.routes import patients

    monkeypatch.setattr(patients, "PER_PAGE", 2)
    client = login(app, "vera")
    first = view(client, "vera", "/flagged?sort=name&order=asc")
    assert 'id="total">3 matching' in first.text and "page 1 of 2" in first.text
    next_q = re.search(r'href="/flagged\?([^"]+)" id="next"', first.text).group(1)  # type: ignore[union-attr]
    second = view(client, "vera", "/flagged?" + next_q.replace("&amp;", "&"))
    assert "page 2 of 2" in second.text and 'id="prev"' in second.text and 'id="next"' not in second.text
    on_first = re.findall(r'class="patient" href="/patients/(\d+)"', first.text)
    on_second = re.findall(r'class="patient" href="/patients/(\d+)"', second.text)
    assert len(on_first) == 2 and len(on_second) == 1 and not set(on_first) & set(on_second)


def test_follow_up_actions_and_observed_performance(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    client = login(app, "vera")
    fid = flagged_id(db, "WEBP-0001")
    page = view(client, "vera", f"/patients/{fid}")
    token = csrf_of(page.text)
    r = client.post(
        f"/patients/{fid}/follow-up",
        data={"csrf_token": token, "action": "dxa_done", "note": ""},
        follow_redirects=False,
    )
    assert r.status_code == 400 and "measured T-score" in r.text
    LEDGER.append(("vera", f"/patients/{fid}"))  # the form is shown again with the patient's data
    # a radiologist confirms one flagged image; then the coordinator refers, and records the DXA
    last_study = flagged_row(db, fid).last_study_id
    finding = next(r.id for r in db_rows(db, Result) if r.bone_loss and r.study_id == last_study)
    rita = login(app, "rita")
    r = rita.post(
        f"/results/{finding}/assessment",
        data={"csrf_token": csrf_of(rita.get(f"/patients/{fid}").text), "verdict": "agree", "reason": ""},
        follow_redirects=False,
    )
    LEDGER.append(("rita", f"/patients/{fid}"))
    assert r.status_code == 303 and flagged_row(db, fid).status == "confirmed"
    for action, extra in (
        ("dxa_ordered", {"note": "DXA booked <b>Tue</b>"}),
        ("dxa_done", {"measured_t_score": "-2.3", "dxa_date": "2026-01-20", "note": "hip -2.3"}),
    ):
        r = client.post(
            f"/patients/{fid}/follow-up", data={"csrf_token": token, "action": action, **extra}, follow_redirects=False
        )
        assert r.status_code == 303 and r.headers["location"] == f"/patients/{fid}"
    page = view(client, "vera", f"/patients/{fid}")
    assert 'id="status">DXA done' in page.text
    assert "DXA booked &lt;b&gt;Tue&lt;/b&gt;" in page.text and "measured T-score -2.3" in page.text
    assert next(p for p in db_rows(db, FlaggedPatient) if p.id == fid).status == "dxa_done"
    assert 'id="total">1 matching' in view(client, "vera", "/flagged?status=dxa_done").text
    perf = client.get("/performance").text
    predicted = next(p for p in db_rows(db, FlaggedPatient) if p.id == fid).t_score
    assert re.search(r'id="perf-n">1<', perf) and re.search(r'id="perf-ppv">1.00<', perf)
    assert re.search(rf'id="perf-mae">{abs(predicted + 2.3):.2f}<', perf)
    # a second patient measured normal: PPV 1/2
    other = flagged_id(db, "WEBP-0002")
    with db.transaction() as s:  # referred earlier (the pathway's steps: tests/web/test_fls_web.py)
        s.get(FlaggedPatient, other).status = "dxa_ordered"
    client.post(
        f"/patients/{other}/follow-up",
        data={"csrf_token": token, "action": "dxa_done", "measured_t_score": "0.4", "dxa_date": "2026-01-21"},
    )
    LEDGER.append(("vera", f"/patients/{other}"))  # followed redirect
    perf = client.get("/performance").text
    assert re.search(r'id="perf-n">2<', perf) and re.search(r'id="perf-ppv">0.50<', perf)


def test_csv_export(app: Any, seeded: Seeded) -> None:
    client = login(app, "vera")
    r = view(client, "vera", "/flagged/export.csv?sort=name&order=asc")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"] and "WEBP" not in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["patient_id"] for row in rows] == ["WEBP-0002", "WEBP-0001", "WEBP-0003"]  # "<" sorts first
    assert rows[0]["patient_name"] == SCRIPT_NAME  # CSV is data, not HTML
    assert all(-10 < float(row["estimated_t_score"]) < 10 for row in rows)
    one = list(csv.DictReader(io.StringIO(view(client, "vera", "/flagged/export.csv?status=dxa_done").text)))
    assert {row["patient_id"] for row in one} == {"WEBP-0001", "WEBP-0002"}


def test_viewer_cannot_replay_dead_letters_admin_can_and_they_are_delivered(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    dead = [o for o in db_rows(db, OutboxItem) if o.state == "DEAD"]
    assert len(dead) == 3
    viewer = login(app, "vera")
    token = csrf_of(viewer.get("/flagged").text)
    r = viewer.post(f"/dead-letters/{dead[0].id}/replay", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 403
    time.sleep(0.5)
    assert [o.state for o in db_rows(db, OutboxItem) if o.id in {d.id for d in dead}] == ["DEAD"] * 3
    admin = login(app, "adam")
    page = admin.get("/dead-letters")
    assert page.status_code == 200 and page.text.count("/replay") == 3 and "cannot_understand" in page.text
    token = csrf_of(page.text)
    # discard one overlay with a reason, replay the rest once the PACS accepts again
    sc = next(o for o in dead if o.kind == "sc")
    assert admin.post(f"/dead-letters/{sc.id}/discard", data={"csrf_token": token, "reason": ""}).status_code == 400
    r = admin.post(
        f"/dead-letters/{sc.id}/discard",
        data={"csrf_token": token, "reason": "duplicate overlay"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    seeded.refuse["on"] = False
    received_before = len(seeded.pacs.received)
    rest = [o for o in dead if o.id != sc.id]
    r = admin.post(f"/dead-letters/{rest[0].id}/replay", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    wait_for(
        lambda: {o.state for o in db_rows(db, OutboxItem) if o.id in {d.id for d in rest}} == {"DELIVERED"},
        timeout_s=30,
        what="replayed dead letters delivered",
    )
    assert len(seeded.pacs.received) == received_before + 2
    assert {str(d.PatientID) for d in seeded.pacs.received[received_before:]} == {DEAD_PATIENT}
    discarded = next(o for o in db_rows(db, OutboxItem) if o.id == sc.id)
    assert discarded.state == "DISCARDED" and "duplicate overlay" in (discarded.last_error or "")
    assert "No dead letters." in admin.get("/dead-letters").text
    events = [(e.detail or {}).get("change") for e in db_rows(db, AuditEvent) if e.actor == "adam"]
    assert "dead_letter_discarded" in events and "dead_letters_replayed" in events


def test_status_page(app: Any, seeded: Seeded) -> None:
    page = login(app, "audrey").get("/status")
    assert page.status_code == 200
    assert re.search(r"<th>DONE</th><td>8</td>", page.text)
    assert "chain intact" in page.text and "tiny-test-0" in page.text
    assert re.search(r'id="backlog">0<', page.text)
    assert re.search(r'id="waiting"><tr><td>nothing waits<', page.text)  # every image screened


def test_status_page_names_the_images_waiting_on_another_agent_and_that_it_is_gone(app: Any, seeded: Seeded) -> None:
    """Several agents on one database: a QUEUED job whose instance another agent ("knee-b") holds,
    and that agent's heartbeat 5 minutes old. Rows written here and removed after."""
    from datetime import timedelta

    from sqlalchemy import delete, select

    from agent.clock import utcnow
    from agent.db.models import Instance, Job, Node

    db = seeded.agent.db
    now = utcnow()
    with db.transaction() as s:
        study_id = s.execute(select(Instance.study_id).limit(1)).scalar_one()
        inst = Instance(
            study_id=study_id, sop_class_uid="1.2", sop_instance_uid="1.2.3.999", series_instance_uid="1.2.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1", spool_path="20260101/elsewhere.dcm", sha256="0" * 64,
            size_bytes=1, calling_ae="X", received_at=now, node="knee-b",
        )
        s.add(inst)
        s.flush()
        s.add(Job(instance_id=inst.id, state="QUEUED", attempts=0, created_at=now, updated_at=now))
        s.add(Node(name="knee-b", storage="node", started_at=now, last_seen=now - timedelta(minutes=5)))
    try:
        page = login(app, "audrey").get("/status").text
        assert re.search(r"<th>knee-b</th><td>1 image\(s\) <span class=\"error\">\(agent gone\)", page)
    finally:
        with db.transaction() as s:
            s.execute(delete(Job).where(Job.instance_id == inst.id))
            s.execute(delete(Instance).where(Instance.id == inst.id))
            s.execute(delete(Node).where(Node.name == "knee-b"))


def test_status_page_and_metrics_show_each_sweeps_progress(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    assert "No archive sweep has run." in login(app, "audrey").get("/status").text
    found = [sweeps.FoundStudy(f"1.2.999.{n}", f"2026030{2 + n % 2}", 1, 2) for n in range(5)]
    sweeps.record_found(db, "archive", found, True)
    sweeps.record_found(db, "archive", [sweeps.FoundStudy("1.2.999.9", "20250101", 1, 1)], True)  # out of range
    for n, error in ((0, None), (1, None), (2, "C-MOVE status 0xA701; 1 failed, 0 completed")):
        sweeps.begin_retrieve(db, f"1.2.999.{n}", "STRNET", {"method": "move"})
        sweeps.end_retrieve(db, f"1.2.999.{n}", error)
    sweeps.begin_retrieve(db, "1.2.999.3", "STRNET", {"method": "move"})  # under way
    sweeps.set_cursor(db, "archive:20260302:20260304", "20260303")
    page = login(app, "audrey").get("/status").text
    row = re.search(r'<table class="list" id="sweeps">.*?</table>', page, re.S).group(0)  # type: ignore[union-attr]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
    assert cells[:8] == ["archive", "2026-03-02 to 2026-03-04", "2026-03-03", "1", "1", "2", "1", "0"], cells
    assert re.match(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}$", cells[8]), cells
    text = TestClient(app).get("/metrics").text
    assert 'strnet_sweep_studies{state="done"} 2.0' in text and 'strnet_sweep_studies{state="pending"} 2.0' in text
    assert 'strnet_sweep_studies{state="retrieving"} 1.0' in text


def test_healthz_and_metrics_need_no_login_and_hold_no_phi(app: Any, seeded: Seeded) -> None:
    client = TestClient(app)
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["database"] == "reachable"
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    received = float(re.search(r'strnet_instances_received_total\{outcome="queued"\} (\S+)', text).group(1))  # type: ignore[union-attr]
    assert received >= 8
    assert re.search(r'strnet_jobs\{state="DONE"\} 8\.0', text)
    count = float(re.search(r"strnet_inference_seconds_count (\S+)", text).group(1))  # type: ignore[union-attr]
    assert count >= 8 and 'strnet_inference_seconds_bucket{le="+Inf"}' in text
    assert re.search(r"strnet_outbox_backlog \d", text)
    assert "strnet_flagged_patients 3.0" in text
    for secret in phi_strings():
        assert secret not in text and secret not in h.text


def test_idle_logoff(seeded: Seeded) -> None:
    settings = seeded.agent.settings
    quick = settings.model_copy(update={"web": settings.web.model_copy(update={"idle_timeout_s": 2.0})})
    app = create_app(quick, seeded.agent.db)
    client = login(app, "vera")
    assert view(client, "vera", "/flagged").status_code == 200
    time.sleep(1.0)
    assert view(client, "vera", "/flagged").status_code == 200  # activity restarts the idle clock
    time.sleep(1.0)
    assert view(client, "vera", "/flagged").status_code == 200  # 2 s since login, 1 s idle
    time.sleep(2.5)
    r = client.get("/flagged", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?expired=1"
    assert "inactivity" in client.get(r.headers["location"]).text
    idle = [e for e in db_rows(seeded.agent.db, AuditEvent) if (e.detail or {}).get("reason") == "idle_timeout"]
    assert len(idle) == 1 and idle[0].actor == "vera"


def test_logout_ends_the_session(app: Any, seeded: Seeded) -> None:
    client = login(app, "vera")
    token = csrf_of(client.get("/status").text)
    cookie = client.cookies.get("strnet_session")
    r = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    replayed = TestClient(app)
    replayed.cookies.set("strnet_session", cookie)  # the old cookie is dead on the server side
    assert replayed.get("/flagged", follow_redirects=False).status_code == 303


def test_users_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cli import app as cli

    monkeypatch.setenv("STRNET_AGENT__DATA_DIR", str(tmp_path / "var"))
    url = database_url_for(tmp_path / "var") or f"sqlite:///{tmp_path / 'var' / 'strnet.db'}"
    monkeypatch.setenv("STRNET_AGENT__DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["users", "add", "carol", "--role", "admin", "--password-stdin"], input="carol-secret-9\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["users", "add", "carol", "--role", "admin", "--password-stdin"], input="carol-secret-9\n")
    assert r.exit_code == 1
    r = runner.invoke(cli, ["users", "add", "dan", "--role", "root", "--password-stdin"], input="dan-secret-99\n")
    assert r.exit_code != 0
    r = runner.invoke(cli, ["users", "add", "erin", "--password-stdin"], input="short\n")
    assert r.exit_code != 0
    r = runner.invoke(cli, ["users", "add", "erin", "--password-stdin"], input="8 chars\n")  # 7: too short
    assert r.exit_code != 0
    r = runner.invoke(cli, ["users", "add", "rhea", "--role", "radiologist", "--password-stdin"], input="8 chars!\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["users", "list"])
    assert r.exit_code == 0 and re.search(r"carol\s+admin\s+active", r.output) and "2 user(s)" in r.output
    assert re.search(r"rhea\s+radiologist\s+active", r.output)
    db = Database(url)
    carol = next(u for u in db_rows(db, User) if u.username == "carol")
    assert carol.password_hash.startswith("$argon2id$") and "carol-secret-9" not in carol.password_hash
    open_session(db, carol.id)
    assert runner.invoke(cli, ["users", "disable", "carol"]).exit_code == 0
    assert [s.user_id for s in db_rows(db, WebSession)] == []  # disabling ends the user's sessions
    assert runner.invoke(cli, ["users", "disable", "nobody"]).exit_code == 1
    assert re.search(r"carol\s+admin\s+disabled", runner.invoke(cli, ["users", "list"]).output)
    db.dispose()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "web.crt", tmp / "web.key"
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
        timeout=60,
    )
    return cert, key


@pytest.mark.parametrize("tls", [False, True])
def test_live_uvicorn_http_and_https(seeded: Seeded, tmp_path: Path, tls: bool) -> None:
    settings = seeded.agent.settings
    web: dict[str, Any] = {"port": free_port(), "bind": "127.0.0.1"}
    if tls:
        cert, key = _self_signed(tmp_path)
        web.update(tls_cert_file=cert, tls_key_file=key)
    s2 = settings.model_copy(update={"web": settings.web.model_copy(update=web)})
    server = WebServer(create_app(s2, seeded.agent.db), s2.web)
    server.start()
    try:
        base = f"{'https' if tls else 'http'}://127.0.0.1:{web['port']}"
        verify = ssl.create_default_context(cafile=str(web["tls_cert_file"])) if tls else True
        with httpx.Client(base_url=base, verify=verify) as http:
            assert http.get("/healthz").json()["status"] == "ok"
            page = http.get("/login")
            token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
            r = http.post("/login", data={"login_token": token, "username": "vera", "password": PASSWORDS["vera"][1]})
            cookie = r.headers["set-cookie"]
            assert ("; Secure" in cookie) is tls and "HttpOnly" in cookie
            if tls:
                assert "max-age" in r.headers["strict-transport-security"]
            assert "server" not in r.headers
    finally:
        server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{web['port']}/healthz", timeout=2)


@pytest.mark.parametrize("no_web", [False, True])
def test_strnet_serve_runs_the_web_unless_no_web(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_web: bool) -> None:
    from serve_process import ServeProcess, write_config

    web_port = free_port()
    monkeypatch.setenv("STRNET_WEB__PORT", str(web_port))
    config = write_config(tmp_path / "agent.toml", tmp_path / "var")
    with ServeProcess(config, tmp_path / "serve.log", args=("--no-web",) if no_web else ()) as serve:
        url = f"http://127.0.0.1:{web_port}"
        if no_web:
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{url}/healthz", timeout=2)
        else:
            wait_for(lambda: _answers(f"{url}/healthz"), timeout_s=20, what="web answering")
            assert httpx.get(f"{url}/healthz").json()["database"] == "reachable"
            r = httpx.get(f"{url}/flagged")
            assert r.status_code == 303 and r.headers["location"] == "/login"
        assert serve.terminate() == 0
    assert ("web_started" in (tmp_path / "serve.log").read_text()) is not no_web


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_zz_every_phi_view_was_audited_and_the_chain_verifies(seeded: Seeded) -> None:
    """Runs last in this module: each noted view has its audit event, and the chain is intact."""
    db = seeded.agent.db
    events = db_rows(db, AuditEvent)
    assert len(LEDGER) >= 20
    expected: Counter[tuple[str, str, str]] = Counter()
    for user, path in LEDGER:
        if path.startswith("/flagged/export.csv"):
            expected[(user, "110106", "flagged_list")] += 1
        elif path.startswith("/flagged"):
            expected[(user, "110112", "flagged_list")] += 1
        elif m := re.fullmatch(r"/patients/(\d+)", path):
            expected[(user, "110110", f"patient_detail:{m.group(1)}")] += 1
        elif m := re.fullmatch(r"/patients/(\d+)/trend\.png", path):
            expected[(user, "110110", f"trend_plot:{m.group(1)}")] += 1
        elif m := re.fullmatch(r"/results/(\d+)/overlay\.(png|jpg)", path):
            expected[(user, "110110", f"overlay_image:{m.group(1)}")] += 1
        else:
            raise AssertionError(f"unclassified PHI view {path}")
    seen: Counter[tuple[str, str, str]] = Counter()
    for e in events:
        d = e.detail or {}
        if e.event_code in ("110106", "110112") and e.object_type == "flagged_list":
            seen[(e.actor, e.event_code, "flagged_list")] += 1
        elif e.event_code == "110110" and "view" in d:
            seen[(e.actor, e.event_code, f"{d['view']}:{e.object_id}")] += 1
    for key, n in expected.items():
        assert seen[key] >= n, f"{key}: {n} views, {seen[key]} audit events"
    report = verify_chain(db)
    assert report.ok and report.events == len(events)
