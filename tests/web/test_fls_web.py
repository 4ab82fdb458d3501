"""The fracture-liaison pathway in the admin web over real screening data (tiny STR-Net, pynetdicom
PACS; tests/web_seed.py), through FastAPI's TestClient: who may confirm or reject, the allowed
steps (a refused one is a 409 and records nothing), the overdue marker and filter, and the
evidence export's figures. The same walk in Chromium: tests/browser/test_admin_browser.py."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web_seed import Seeded, csrf_of, login, patient, phi_strings, rows_of, screened_agent

from agent.clock import utcnow
from agent.db import fls
from agent.db.engine import Database
from agent.db.models import AuditEvent, FindingAssessment, FlaggedPatient, FollowUpEvent, Result
from agent.db.worklist import verify_chain
from agent.web.app import create_app


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Seeded]:
    with screened_agent(tmp_path_factory.mktemp("fls-agent"), tiny_weights) as s:
        s.agent.sender.stop()
        yield s


@pytest.fixture(scope="module")
def app(seeded: Seeded) -> Any:
    return create_app(seeded.agent.settings, seeded.agent.db)










def findings(db: Database, patient_id: str) -> list[int]:
    """The flagged images of the patient's latest positive study."""
    last = patient(db, patient_id).last_study_id
    return [r.id for r in rows_of(db, Result) if r.bone_loss and r.study_id == last]


def step(client: TestClient, fid: int, action: str, **extra: str) -> Any:
    token = csrf_of(client.get(f"/patients/{fid}").text)
    return client.post(
        f"/patients/{fid}/follow-up", data={"csrf_token": token, "action": action, **extra}, follow_redirects=False
    )


def assess(client: TestClient, fid: int, result_id: int, verdict: str, reason: str = "") -> Any:
    token = csrf_of(client.get(f"/patients/{fid}").text)
    return client.post(
        f"/results/{result_id}/assessment",
        data={"csrf_token": token, "verdict": verdict, "reason": reason},
        follow_redirects=False,
    )


def test_only_a_radiologist_confirms_or_rejects_and_a_refusal_is_audited(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    fp = patient(db, "WEBP-0001")
    finding = findings(db, "WEBP-0001")[0]
    viewer, admin, auditor, rita = (login(app, u) for u in ("vera", "adam", "audrey", "rita"))
    # the verdict form is offered to the radiologist only
    assert 'action="/results/' not in viewer.get(f"/patients/{fp.id}").text
    assert f'action="/results/{finding}/assessment"' in rita.get(f"/patients/{fp.id}").text
    token = csrf_of(viewer.get(f"/patients/{fp.id}").text)
    for client in (viewer, admin, auditor):
        r = client.post(f"/results/{finding}/assessment", data={"csrf_token": token, "verdict": "agree"})
        assert r.status_code == 403
    # the radiologist otherwise works as a viewer: the worklist and its export, not dead letters or the audit log
    assert rita.get("/flagged").status_code == 200 and rita.get("/flagged/export.csv").status_code == 200
    assert rita.get("/dead-letters").status_code == 403 and rita.get("/audit").status_code == 403
    assert auditor.post(f"/patients/{fp.id}/follow-up", data={"action": "closed"}).status_code == 403
    assert rows_of(db, FindingAssessment) == [] and patient(db, "WEBP-0001").status == "new"
    alerts = [e for e in rows_of(db, AuditEvent) if e.event_code == "110113" and (e.detail or {}).get("refused")]
    assert {(e.actor, e.detail["path"]) for e in alerts} >= {
        ("vera", f"/results/{finding}/assessment"),
        ("adam", f"/results/{finding}/assessment"),
        ("audrey", f"/patients/{fp.id}/follow-up"),
    }
    # a result that is no flagged image is no finding: 404
    normal = next((r.id for r in rows_of(db, Result) if not r.bone_loss), None)
    if normal is not None:
        assert assess(rita, fp.id, normal, "agree").status_code == 404
    assert assess(rita, fp.id, 999_999, "agree").status_code == 404


def test_a_step_out_of_order_is_409_and_records_nothing(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    fp = patient(db, "WEBP-0002")
    viewer = login(app, "vera")
    before = len(rows_of(db, FollowUpEvent))
    for action, extra in (
        ("dxa_ordered", {}),
        ("closed", {}),
        ("dxa_done", {"measured_t_score": "-2.0", "dxa_date": utcnow().date().isoformat()}),
        ("treatment", {}),
    ):
        r = step(viewer, fp.id, action, **extra)
        assert r.status_code == 409, action
        beside = re.search(r'id="fu-action-error">([^<]+)<', r.text)
        assert beside and "a radiologist first confirms or rejects" in beside.group(1)
        assert re.search(rf'<option value="{action}" selected>', r.text)  # the form keeps what was chosen
    # a DXA date with another step: refused beside the date, kept as typed
    r = step(viewer, fp.id, "closed", dxa_date="2026-01-02", note="x")
    assert r.status_code == 400 and 'id="fu-d-error">A DXA date belongs to' in r.text
    assert 'value="2026-01-02"' in r.text and re.search(r'<option value="closed" selected>', r.text)
    assert len(rows_of(db, FollowUpEvent)) == before and patient(db, "WEBP-0002").status == "new"
    assert "Waiting for a radiologist" in viewer.get(f"/patients/{fp.id}").text


def test_a_disagreement_needs_its_reason_and_rejects_the_patient(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    fp = patient(db, "WEBP-0002")
    rita, viewer = login(app, "rita"), login(app, "vera")
    ids = findings(db, "WEBP-0002")
    r = assess(rita, fp.id, ids[0], "disagree", "")
    assert r.status_code == 400 and "needs its reason" in r.text and 'class="v-disagree" checked' in r.text
    assert rows_of(db, FindingAssessment) == [] or all(a.flagged_id != fp.id for a in rows_of(db, FindingAssessment))
    for rid in ids:
        r = assess(rita, fp.id, rid, "disagree", "normal trabecular pattern")
        assert r.status_code == 303 and r.headers["location"] == f"/patients/{fp.id}#result-{rid}"
    page = viewer.get(f"/patients/{fp.id}").text
    assert 'id="status">Rejected' in page and "disagreed by rita" in page and "normal trabecular pattern" in page
    assert step(viewer, fp.id, "dxa_ordered").status_code == 409
    assert step(viewer, fp.id, "closed", note="not referred").status_code == 303
    assert patient(db, "WEBP-0002").status == "closed"
    # each verdict and step is in the hash chain with its actor; no reason or note text in it
    events = [e for e in rows_of(db, AuditEvent) if e.detail and e.detail.get("change") in ("assessment", "follow_up")]
    mine = [e for e in events if e.detail.get("flagged_patient") == fp.id or e.object_id == str(fp.id)]
    assert [(e.actor, e.detail["from"], e.detail["to"]) for e in mine] == [
        *[("rita", "new", "new")] * (len(ids) - 1),
        ("rita", "new", "rejected"),
        ("vera", "rejected", "closed"),
    ]
    assert {e.actor for e in events if e.detail["change"] == "assessment"} == {"rita"}
    assert not any("trabecular" in str(e.detail) or "not referred" in str(e.detail) for e in events)
    assert verify_chain(db).ok


def test_overdue_referrals_are_marked_filtered_and_sorted(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    rita, viewer = login(app, "rita"), login(app, "vera")
    fp = patient(db, "WEBP-0003")
    assert assess(rita, fp.id, findings(db, "WEBP-0003")[0], "agree", "thin cortex").status_code == 303
    assert step(viewer, fp.id, "dxa_ordered").status_code == 303
    assert patient(db, "WEBP-0003").referred_at is not None
    listing = viewer.get("/flagged?overdue=1").text
    assert 'id="total">0 matching' in listing  # referred today: not overdue
    with db.transaction() as s:  # referred 50 days ago
        s.get(FlaggedPatient, fp.id).referred_at = utcnow() - timedelta(days=50)  # type: ignore[union-attr]
    listing = viewer.get("/flagged?overdue=1").text
    assert 'id="total">1 matching' in listing and f'href="/patients/{fp.id}"' in listing
    assert re.search(r'class="overdue">overdue 50 d<', listing)
    assert 'id="f-overdue" checked' in listing and "more than 42 days ago" in listing
    page = viewer.get(f"/patients/{fp.id}").text
    assert re.search(r'class="overdue" id="overdue">overdue: referred 50 days ago<', page)
    # sorted by referral, oldest first: the overdue patient leads; those never referred come last
    with db.transaction() as s:  # a second referral, yesterday
        other = s.get(FlaggedPatient, patient(db, "WEBP-0001").id)
        assert other is not None and other.status == "new"
        other.referred_at, other.status = utcnow() - timedelta(days=1), "dxa_ordered"
    order = {}
    for direction in ("asc", "desc"):
        text = viewer.get(f"/flagged?sort=referred&order={direction}").text
        order[direction] = [int(i) for i in re.findall(r'class="patient" href="/patients/(\d+)"', text)]
    never = patient(db, "WEBP-0002").id
    assert order["asc"] == [fp.id, other.id, never] and order["desc"] == [other.id, fp.id, never]
    with db.transaction() as s:
        back = s.get(FlaggedPatient, other.id)
        assert back is not None
        back.referred_at, back.status = None, "new"
    assert viewer.get("/flagged?overdue=yes").status_code == 400
    assert re.search(r"<th>DXA referred</th><td>1</td>", viewer.get("/status").text)  # the status page's count
    export = list(csv.DictReader(io.StringIO(viewer.get("/flagged/export.csv?overdue=1").text.lstrip("\ufeff"))))
    assert [(r["patient_id"], r["overdue"]) for r in export] == [("WEBP-0003", "yes")]
    assert export[0]["referred_utc"][:10] == (utcnow() - timedelta(days=50)).date().isoformat()
    # another site waits 60 days: the same referral is not overdue there
    settings = seeded.agent.settings
    later = create_app(settings.model_copy(update={"fls": settings.fls.model_copy(update={"overdue_days": 60})}), db)
    assert 'id="total">0 matching' in login(later, "vera").get("/flagged?overdue=1").text


def test_the_evidence_export_counts_states_days_to_dxa_and_ppv(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    rita, viewer, auditor = login(app, "rita"), login(app, "vera"), login(app, "audrey")
    first = (utcnow() - timedelta(days=70)).replace(hour=9, minute=0, second=0, microsecond=0)
    with db.transaction() as s:  # the three were first flagged 70 days ago
        for fp in s.query(FlaggedPatient):
            fp.first_flagged_at = first
    one, three = patient(db, "WEBP-0001"), patient(db, "WEBP-0003")
    assert assess(rita, one.id, findings(db, "WEBP-0001")[0], "agree").status_code == 303
    for action, extra in (
        ("dxa_ordered", {}),
        ("dxa_done", {"measured_t_score": "-2.7", "dxa_date": (first + timedelta(days=10)).date().isoformat()}),
        ("treatment", {}),
        ("closed", {}),
    ):
        assert step(viewer, one.id, action, **extra).status_code == 303, action
    day = (first + timedelta(days=30)).date().isoformat()
    assert step(viewer, three.id, "dxa_done", measured_t_score="-0.5", dxa_date=day).status_code == 303
    # WEBP-0001: closed, T -2.7 after 10 days; WEBP-0002: closed (rejected); WEBP-0003: DXA done, T -0.5 after 30
    r = auditor.get("/performance/evidence.csv")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    rows = {row["month"]: row for row in csv.DictReader(io.StringIO(r.text))}
    assert list(rows) == [f"{first:%Y-%m}", "all"]
    for row in rows.values():
        states = (row["flagged"], row["closed"], row["dxa_done"], row["new"], row["dxa_ordered"])
        assert states == ("3", "2", "1", "0", "0")
        assert (row["dxa_n"], row["days_flag_to_dxa_median"]) == ("2", "20")
        assert (row["dxa_t_le_-1.0"], row["ppv_t_le_-1.0"]) == ("1", "0.500")
        assert (row["dxa_t_le_-2.5"], row["ppv_t_le_-2.5"]) == ("1", "0.500")
    for secret in phi_strings():
        assert secret not in r.text
    page = viewer.get("/performance").text
    assert 'id="evidence-chart" src="/performance/evidence.png"' in page and "DXA referred" in page
    png = viewer.get("/performance/evidence.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n" and len(png.content) > 5_000
    exports = [e for e in rows_of(db, AuditEvent) if e.object_type == "fls_evidence"]
    assert [(e.actor, e.event_code) for e in exports] == [("audrey", "110106")]
    assert fls.STATUS_LABELS["dxa_ordered"] == "DXA referred"


def test_a_recorded_verdict_is_handed_on_for_sending_and_a_failure_to_do_so_keeps_it(seeded: Seeded) -> None:
    """The web calls ``on_assessed(study_id)`` after the verdict's commit (the composition root
    passes the reporter's report_assessment: FHIR send_assessments); if that raises, the verdict
    stays recorded and the radiologist still gets the patient page."""
    db = seeded.agent.db
    calls: list[int] = []

    def failing(study_id: int) -> int:
        calls.append(study_id)
        raise RuntimeError("FHIR down")

    app = create_app(seeded.agent.settings, db, on_assessed=failing)
    fp = patient(db, "WEBP-0002")
    finding = findings(db, "WEBP-0002")[0]
    before = len(rows_of(db, FindingAssessment))
    r = assess(login(app, "rita"), fp.id, finding, "agree")
    assert r.status_code == 303 and r.headers["location"].startswith(f"/patients/{fp.id}")
    assert calls == [fp.last_study_id]
    assert len(rows_of(db, FindingAssessment)) == before + 1
