"""What coordinators and auditors ran into in the admin web (issue 19), checked over real screening
data (tiny STR-Net, pynetdicom PACS) through FastAPI's TestClient: the follow-up form after an
error, a T-score given with another action, probabilities shown and filtered alike, the sort
mark, thresholds, the audit log, dead letters in bulk, the overlay JPEG and the CSV export.

The layout points (table width, trend legend on screen) are in tests/browser/test_admin_browser.py;
the legend's place is also checked here on the figure itself.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import agent_toml
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner
from web_seed import Seeded, csrf_of, login, patient, rows_of, screened_agent

from agent.db.engine import Database
from agent.db.models import AuditEvent, FlaggedPatient, FollowUpEvent, OutboxItem, Result, Study
from agent.db.registry import spreadsheet_cell
from agent.db.worklist import TrendPoint, probability_bound, record_access, shown_number, shown_probability
from agent.web import images
from agent.web.app import ModelInfo, create_app

DEAD_PATIENT_STUDIES = 1  # WEBP-0003 has one study; its SR and two overlays are dead letters


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Seeded]:
    with screened_agent(tmp_path_factory.mktemp("usability-agent"), tiny_weights) as s:
        s.agent.sender.stop()  # replayed dead letters stay PENDING: what the pages show is what we set
        yield s


@pytest.fixture(scope="module")
def app(seeded: Seeded) -> Any:
    info = ModelInfo(
        version="tiny-test-0",
        threshold=0.41234567890123456,
        thresholds={"balanced": 0.41234567890123456, "high_sensitivity": 0.1, "strict": 0.75},
    )
    return create_app(seeded.agent.settings, seeded.agent.db, model_info=lambda: info)










def set_patient(db: Database, patient_id: str, **values: Any) -> None:
    with db.transaction() as s:
        s.query(FlaggedPatient).filter(FlaggedPatient.patient_id == patient_id).update(dict[Any, Any](values))


def set_results_of(db: Database, patient_id: str, **values: Any) -> list[int]:
    """Give every image result of the patient's latest study ``values``; their ids."""
    fp = patient(db, patient_id)
    with db.transaction() as s:
        ids = [r.id for r in s.query(Result).filter(Result.study_id == fp.last_study_id)]
        s.query(Result).filter(Result.id.in_(ids)).update(dict[Any, Any](values))
    return ids


def worklist_cells(text: str) -> dict[str, list[str]]:
    """{patient link text: [cell texts]} of the worklist table."""
    out = {}
    for row in re.findall(r"<tr>\s*(<td class=\"text\"><a class=\"patient\".*?)</tr>", text, re.S):
        cells = [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        out[cells[0]] = cells
    return out


def total_of(text: str) -> int:
    return int(re.search(r'id="total">(\d+) matching', text).group(1))  # type: ignore[union-attr]


# -- 1 and 2: the follow-up form -----------------------------------------------------------
def test_the_follow_up_form_keeps_action_and_note_after_an_error_and_shows_it_beside_the_field(
    app: Any, seeded: Seeded
) -> None:
    db = seeded.agent.db
    fid = patient(db, "WEBP-0001").id
    set_patient(db, "WEBP-0001", status="dxa_ordered")  # referred: DXA done is the next step
    client = login(app, "vera")
    page = client.get(f"/patients/{fid}")
    token = csrf_of(page.text)
    # a fresh form has no action chosen: a quick "Record" cannot record a step by default
    assert re.search(r'<option value="" selected disabled>', page.text)
    assert not re.search(r'<option value="[a-z_]+" selected>', page.text)
    before = len(rows_of(db, FollowUpEvent))

    note = "Booked at the bone clinic, Tue 10:00 <b>"
    r = client.post(
        f"/patients/{fid}/follow-up",
        data={"csrf_token": token, "action": "dxa_done", "note": note, "measured_t_score": ""},
        follow_redirects=False,
    )
    assert r.status_code == 400
    assert re.search(r'<option value="dxa_done" selected>', r.text)
    assert not re.search(r'<option value="(dxa_ordered|treatment|no_treatment|closed)" selected>', r.text)
    assert f">{html.escape(note, quote=False)}</textarea>" in r.text.replace("&#39;", "'")
    # the message sits inside the T-score field's label, tied to the input for screen readers
    field = re.search(
        r'<input name="measured_t_score"[^>]*>\s*<span class="field-error" id="fu-t-error">([^<]+)<', r.text
    )
    assert field and "measured T-score" in field.group(1)
    assert 'aria-describedby="fu-t-error"' in r.text and 'role="alert"' in r.text

    # a T-score that is not a number: kept as typed, with the action and the note
    r = client.post(
        f"/patients/{fid}/follow-up",
        data={"csrf_token": token, "action": "dxa_done", "note": "hip", "measured_t_score": "-2,4"},
        follow_redirects=False,
    )
    assert r.status_code == 400 and 'value="-2,4"' in r.text and ">hip</textarea>" in r.text
    assert re.search(r'<option value="dxa_done" selected>', r.text) and "must be a number" in r.text

    # no action chosen: the message is beside the action
    r = client.post(
        f"/patients/{fid}/follow-up", data={"csrf_token": token, "note": "spoke to GP"}, follow_redirects=False
    )
    assert r.status_code == 400 and 'id="fu-action-error">Choose an action' in r.text
    assert ">spoke to GP</textarea>" in r.text
    assert len(rows_of(db, FollowUpEvent)) == before  # nothing recorded by a refused form

    # corrected and sent again: recorded once, as DXA done with the note
    r = client.post(
        f"/patients/{fid}/follow-up",
        data={
            "csrf_token": token,
            "action": "dxa_done",
            "note": note,
            "measured_t_score": "-2.4",
            "dxa_date": "2026-02-01",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    events = rows_of(db, FollowUpEvent)[before:]
    assert [(e.action, e.note, e.measured_t_score) for e in events] == [("dxa_done", note.strip(), -2.4)]


def test_a_t_score_with_another_action_is_refused_not_dropped(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    fp = patient(db, "WEBP-0002")
    client = login(app, "vera")
    token = csrf_of(client.get(f"/patients/{fp.id}").text)
    before = len(rows_of(db, FollowUpEvent))
    set_patient(db, "WEBP-0002", status="confirmed")
    fp = patient(db, "WEBP-0002")
    for action in ("dxa_ordered", "closed"):
        r = client.post(
            f"/patients/{fp.id}/follow-up",
            data={"csrf_token": token, "action": action, "note": "DXA hip", "measured_t_score": "-2.1"},
            follow_redirects=False,
        )
        assert r.status_code == 400, action
        message = html.unescape(re.search(r'id="fu-t-error">([^<]+)<', r.text).group(1))  # type: ignore[union-attr]
        assert 'A measured T-score belongs to "DXA done"' in message
        assert re.search(rf'<option value="{action}" selected>', r.text) and 'value="-2.1"' in r.text
    assert len(rows_of(db, FollowUpEvent)) == before
    assert patient(db, "WEBP-0002").status == fp.status
    # without the T-score, "DXA referred" is recorded
    r = client.post(
        f"/patients/{fp.id}/follow-up",
        data={"csrf_token": token, "action": "dxa_ordered", "measured_t_score": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303 and patient(db, "WEBP-0002").status == "dxa_ordered"


# -- 3: probabilities ----------------------------------------------------------------------
def test_shown_probability_rounds_down_and_the_bound_agrees_with_it() -> None:
    assert shown_probability(0.996) == "0.996" and shown_probability(0.9996) == "0.999"
    assert shown_probability(0.5378) == "0.537" and shown_probability(1.0) == "1.000"
    assert shown_probability(0.537) == "0.537" and shown_probability(0.0) == "0.000"
    rng = np.random.default_rng(7)
    ps = [*rng.random(2000).tolist(), *(k / 1000 for k in range(1001)), 0.5378, 0.996, 0.9996]
    for m in [0.54, 0.537, 0.5375, 0.996, 0.997, 0.1, 0.3, 0.7, 0.0, 1.0, 0.12345]:
        bound = probability_bound(m)
        for p in ps:
            assert (p >= bound) == (float(shown_probability(p)) >= m), (p, m)


def test_probabilities_are_shown_as_the_filter_compares_them(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    set_patient(db, "WEBP-0001", probability=0.996)
    set_patient(db, "WEBP-0002", probability=0.5378)
    set_patient(db, "WEBP-0003", probability=0.2)
    set_results_of(db, "WEBP-0001", probability=0.996)
    client = login(app, "vera")
    cells = worklist_cells(client.get("/flagged").text)
    shown = {name: row[4] for name, row in cells.items()}
    assert shown["Doe Jane"] == "0.996"  # not 1.00
    assert sorted(shown.values()) == ["0.200", "0.537", "0.996"]  # 0.5378: 0.537, not 0.54

    def names(q: str) -> set[str]:
        return set(worklist_cells(client.get(f"/flagged?{q}").text))

    assert "Doe Jane" in names("min_probability=0.996") and "Doe Jane" not in names("min_probability=0.997")
    at_537 = names("min_probability=0.537")
    assert len(at_537) == 2 and "Doe Jane" in at_537  # the patient shown as 0.537 is there ...
    assert names("min_probability=0.54") == {"Doe Jane"}  # ... and not under 0.54, as shown
    assert names("min_probability=0.5375") == {"Doe Jane"}  # 0.537 < 0.5375
    # the patient page shows the same figure, per patient and per image
    page = client.get(f"/patients/{patient(db, 'WEBP-0001').id}").text
    assert 'id="probability">0.996<' in page
    assert re.findall(r'<b class="prob">([^<]+)</b>', page).count("0.996") == 2
    assert ">1.00<" not in page and ">1.000<" not in page


def test_the_csv_export_shows_probabilities_as_the_page_does(app: Any, seeded: Seeded) -> None:
    """Three decimals rounded down, as on the page: 0.99996 is 0.999 (not 1.0), 0.5378 is 0.537."""
    db = seeded.agent.db
    before = {pid: patient(db, pid).probability for pid in ("WEBP-0001", "WEBP-0002")}
    set_patient(db, "WEBP-0001", probability=0.99996)
    set_patient(db, "WEBP-0002", probability=0.5378)
    try:
        client = login(app, "vera")
        r = client.get("/flagged/export.csv")
        rows = {row["patient_id"]: row for row in csv.DictReader(io.StringIO(r.content.decode("utf-8-sig")))}
        assert rows["WEBP-0001"]["probability"] == "0.999"
        assert rows["WEBP-0002"]["probability"] == "0.537"
        shown = {name: row[4] for name, row in worklist_cells(client.get("/flagged").text).items()}
        assert {"0.999", "0.537"} <= set(shown.values())  # the same figures as the page
    finally:
        for pid, p in before.items():
            set_patient(db, pid, probability=p)


# -- 6 and 7: sort mark, thresholds ---------------------------------------------------------
def test_the_sorted_column_is_marked_with_direction_and_an_accessible_label(app: Any, seeded: Seeded) -> None:
    client = login(app, "vera")
    page = client.get("/flagged").text  # default: last flagged, newest first
    sorted_ths = re.findall(r'<th aria-sort="(\w+)" class="sorted">(.*?)</th>', page, re.S)
    assert len(sorted_ths) == 1
    direction, cell = sorted_ths[0]
    assert direction == "descending" and "Flagged (UTC)" in cell and "▼" in cell
    assert '<span class="sr-only"> (sorted descending)</span>' in cell
    assert page.count("aria-sort=") == 1 and "▲" not in page
    page = client.get("/flagged?sort=probability&order=asc").text
    ((direction, cell),) = re.findall(r'<th aria-sort="(\w+)" class="sorted">(.*?)</th>', page, re.S)
    assert direction == "ascending" and "Probability" in cell and "▲" in cell and "▼" not in page
    # the link of the sorted column reverses it
    assert re.search(r'href="/flagged\?[^"]*sort=probability&amp;order=desc[^"]*" id="sort-probability"', page)


def test_thresholds_print_at_most_four_decimals(app: Any, seeded: Seeded) -> None:
    assert shown_number(0.41234567890123456) == "0.4123" and shown_number(0.5) == "0.5"
    assert shown_number(2) == "2" and shown_number(None) == "" and shown_number(-0.00001) == "0"
    db = seeded.agent.db
    set_results_of(db, "WEBP-0003", threshold=0.41234567890123456)
    status = login(app, "audrey").get("/status").text
    assert 'id="threshold">0.4123<' in status
    assert re.findall(r'<td class="threshold">([^<]*)</td>', status) == ["0.4123", "0.1", "0.75"]
    assert "at 0.4123" in status  # the latest result's threshold
    page = login(app, "vera").get(f"/patients/{patient(db, 'WEBP-0003').id}").text
    assert re.findall(r'<span class="threshold">([^<]*)</span>', page) == ["0.4123", "0.4123"]
    for text in (status, page):
        assert "0.41234567890123456" not in text


# -- 8: the audit log -----------------------------------------------------------------------
def test_the_audit_log_reads_unicode_names_events_and_filters_with_pagination(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    for i in range(60):
        record_access(db, "query", actor="pager-test", object_type="audit_log", detail={"i": i})
    record_access(db, "query", actor="zoë", object_type="audit_log", detail={"note": "Straße 東京 <b>&", "n": 1})
    client = login(app, "audrey")
    page = client.get("/audit").text
    assert "Straße 東京 &lt;b&gt;&amp;" in page and "\\u00df" not in page and "<b>&" not in page
    assert "zoë" in page
    # the PS3.15 name beside each code, and the action and outcome named
    assert "Query <small>(110112)</small>" in page and "Read <small>(R)</small>" in page
    assert "Success <small>(0)</small>" in page
    assert 'option value="login"' in page and "Login (110122)" in page

    def events(q: str) -> tuple[int, list[tuple[str, str]]]:
        text = client.get(f"/audit?{q}").text
        total = int(re.search(r'<small id="total">(\d+) events', text).group(1))  # type: ignore[union-attr]
        rows = re.findall(
            r'<td class="event">([^<]*) <small>\((\d+)\)</small></td>.*?<td class="text">([^<]*)</td>', text
        )
        return total, [(code, actor) for _name, code, actor in rows]

    total, rows = events("kind=login")
    assert total >= 3 and rows and {code for code, _ in rows} == {"110122"}
    total, rows = events("actor=zo%C3%AB")
    assert total == 1 and rows == [("110112", "zoë")]
    today = datetime.now(UTC).date().isoformat()
    assert events(f"date_from={today}&date_to={today}")[0] >= 60
    assert events("date_from=2000-01-01&date_to=2000-01-31") == (0, [])
    # pagination keeps the filter
    first = client.get("/audit?actor=pager-test").text
    assert "page 1 of 2" in first
    next_q = html.unescape(re.search(r'href="/audit\?([^"]+)" id="next"', first).group(1))  # type: ignore[union-attr]
    assert "actor=pager-test" in next_q and "page=2" in next_q
    second = client.get(f"/audit?{next_q}").text
    assert "page 2 of 2" in second and second.count('<td class="text">pager-test</td>') == 10
    prev_q = html.unescape(re.search(r'href="/audit\?([^"]+)" id="prev"', second).group(1))  # type: ignore[union-attr]
    assert "actor=pager-test" in prev_q
    assert client.get("/audit?kind=bogus").status_code == 400
    assert client.get("/audit?date_from=yesterday").status_code == 400
    # the auditor's filtered queries are audited, with the filter
    mine = [e for e in rows_of(db, AuditEvent) if e.actor == "audrey" and e.object_type == "audit_log"]
    assert any((e.detail or {}).get("actor") == "pager-test" for e in mine)


# -- 9: dead letters ------------------------------------------------------------------------
_UIDS = itertools.count(90000)


def _add_dead_letters(db: Database, study_ids: list[int]) -> list[int]:
    from agent.clock import utcnow

    now = utcnow()
    with db.transaction() as s:
        rows = [
            OutboxItem(
                kind="sc",
                study_id=study_id,
                destination="pacs",
                sop_class_uid=str(SecondaryCaptureImageStorage),
                sop_instance_uid=f"2.25.{next(_UIDS)}",
                path="missing.dcm",
                state="DEAD",
                attempts=4,
                last_status="cannot_understand",
                last_error="refused",
                created_at=now,
                updated_at=now,
            )
            for study_id in study_ids
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _dead_by_study(db: Database) -> dict[int, int]:
    out: dict[int, int] = {}
    for o in rows_of(db, OutboxItem):
        if o.state == "DEAD":
            out[o.study_id] = out.get(o.study_id, 0) + 1
    return out


def test_dead_letters_paginate_replay_in_bulk_audited_and_discard_stands_apart(app: Any, seeded: Seeded) -> None:
    db = seeded.agent.db
    # a page holds as many rows as "Replay selected" can carry with all of them ticked
    per = min(25, seeded.agent.settings.web.max_form_fields - 3)
    studies = [st.id for st in rows_of(db, Study)]
    (dead_study,) = _dead_by_study(db)  # WEBP-0003's study: 3 dead letters, the oldest ids
    others = [st for st in studies if st != dead_study]
    assert len(others) == 3 and per > 3
    s1, s2, s3 = others
    _add_dead_letters(db, [s1] * (per - 3) + [s2] * 20 + [s3] * 25)  # page 1: WEBP-0003's and s1's
    total = per + 45
    pages = -(-total // per)
    admin = login(app, "adam")
    page = admin.get("/dead-letters").text
    assert f'<small id="total">{total}</small>' in page and f"page 1 of {pages}" in page
    assert page.count('name="item"') == per
    shown = re.search(r'name="shown" value="([0-9,]+)"', page).group(1)  # type: ignore[union-attr]
    assert len(shown.split(",")) == per
    last = admin.get(f"/dead-letters?page={pages}").text
    assert last.count('name="item"') == total - (pages - 1) * per
    assert 'id="prev"' in last and 'id="next"' not in last
    assert f"page {pages} of {pages}" in admin.get("/dead-letters?page=999").text  # past the end: the last
    # Replay and Discard look different: discard is a destructive button behind its own disclosure
    assert page.count('<button type="submit" class="replay">Replay</button>') == per
    discards = re.findall(r'<details class="discard"><summary>Discard&hellip;</summary>(.*?)</details>', page, re.S)
    assert len(discards) == per
    assert all('class="danger"' in d and "required" in d and 'name="reason"' in d for d in discards)
    assert 'class="danger"' not in page.split('<table class="list" id="dead">')[0]  # none among the bulk buttons
    token = csrf_of(page)

    # the bulk form needs the CSRF token and an admin
    assert admin.post("/dead-letters/bulk-replay", data={"scope": "shown", "shown": shown}).status_code == 403
    viewer = login(app, "vera")
    vt = csrf_of(viewer.get("/flagged").text)
    refused = viewer.post("/dead-letters/bulk-replay", data={"csrf_token": vt, "scope": "shown", "shown": shown})
    assert refused.status_code == 403
    assert sum(_dead_by_study(db).values()) == total
    # nothing ticked: said so, nothing replayed
    r = admin.post("/dead-letters/bulk-replay", data={"csrf_token": token, "scope": "selected"})
    assert r.status_code == 400 and "Tick the dead letters" in r.text

    # "Replay all shown": the studies of the rows shown (WEBP-0003's and s1), each audited as one replay
    r = admin.post(
        "/dead-letters/bulk-replay",
        data={"csrf_token": token, "scope": "shown", "shown": shown},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == f"/dead-letters?done=replayed&n={per}"
    assert _dead_by_study(db) == {s2: 20, s3: 25}
    audited = [e for e in rows_of(db, AuditEvent) if (e.detail or {}).get("change") == "dead_letters_replayed"]
    assert [(e.actor, e.event_code, e.detail["study_id"], e.detail["items"], e.detail["scope"]) for e in audited] == [
        ("adam", "110100", dead_study, 3, "shown"),
        ("adam", "110100", s1, per - 3, "shown"),
    ]
    assert [e.object_id for e in audited] == [shown.split(",")[0], shown.split(",")[3]]
    page = admin.get(r.headers["location"]).text
    assert f"replayed ({per} back in the queue)" in page and f"page 1 of {-(-45 // per)}" in page

    # "Replay selected" with every row of the page ticked fits the form: s2's rows come first
    ticked = re.findall(r'name="item" value="(\d+)"', page)
    assert len(ticked) == per
    r = admin.post(
        "/dead-letters/bulk-replay",
        data={"csrf_token": token, "scope": "selected", "item": ticked, "shown": ",".join(ticked)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    replayed_studies = {s2} | ({s3} if per > 20 else set())
    assert _dead_by_study(db) == ({} if per > 20 else {s3: 25})
    selected = [e for e in rows_of(db, AuditEvent) if (e.detail or {}).get("scope") == "selected"]
    assert {e.detail["study_id"] for e in selected} == replayed_studies
    assert next(e for e in selected if e.detail["study_id"] == s2).object_id == ticked[0]
    assert next(e for e in selected if e.detail["study_id"] == s2).detail["items"] == 20

    # discard still needs its reason
    _add_dead_letters(db, [s3])
    page = admin.get("/dead-letters").text
    one = re.findall(r'name="item" value="(\d+)"', page)[0]
    assert admin.post(f"/dead-letters/{one}/discard", data={"csrf_token": token, "reason": " "}).status_code == 400
    r = admin.post(f"/dead-letters/{one}/discard", data={"csrf_token": token, "reason": "test"}, follow_redirects=False)
    assert r.status_code == 303 and next(o for o in rows_of(db, OutboxItem) if o.id == int(one)).state == "DISCARDED"


# -- 10: the overlay as a JPEG ----------------------------------------------------------------
def test_the_patient_page_shows_the_overlay_as_a_small_private_jpeg_with_the_png_a_click_away(
    app: Any, seeded: Seeded
) -> None:
    db = seeded.agent.db
    client = login(app, "vera")
    page = client.get(f"/patients/{patient(db, 'WEBP-0001').id}").text
    jpegs = re.findall(r'<img class="overlay" src="(/results/(\d+)/overlay\.jpg)"', page)
    assert len(jpegs) == 4
    for _src, rid in jpegs:
        assert f'href="/results/{rid}/overlay.png"' in page  # the full-size PNG stays a click away
    src, rid = jpegs[0]

    def views() -> list[AuditEvent]:
        return [e for e in rows_of(db, AuditEvent) if e.object_type == "result" and e.object_id == rid]

    audited = len(views())
    r = client.get(src)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
    png = client.get(f"/results/{rid}/overlay.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG" and png.headers["cache-control"] == "no-store"
    assert len(r.content) < len(png.content) and len(r.content) < 200_000
    jpeg = Image.open(io.BytesIO(r.content))
    assert jpeg.format == "JPEG" and max(jpeg.size) <= images.OVERLAY_JPEG_MAX_SIDE
    assert jpeg.size == Image.open(io.BytesIO(png.content)).size  # a small overlay is not enlarged
    # served again from the cache, the same bytes; every view still audited as today
    size_before = len(images.overlay_cache)
    again = client.get(src)
    assert again.content == r.content and len(images.overlay_cache) == size_before
    seen = views()
    assert len(seen) == audited + 3
    assert {(e.actor, e.event_code, (e.detail or {}).get("view")) for e in seen[audited:]} == {
        ("vera", "110110", "overlay_image")
    }
    # behind the login and the PHI roles like the PNG
    anonymous = TestClient(app).get(src, follow_redirects=False)
    assert anonymous.status_code == 401 or (
        anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    )
    assert anonymous.content[:2] != b"\xff\xd8"
    assert login(app, "audrey").get(src).status_code == 403
    assert client.get("/results/999999/overlay.jpg").status_code == 404


def test_the_overlay_jpeg_may_be_kept_privately_by_the_browser(app: Any, seeded: Seeded) -> None:
    """Private (this browser only, never a shared cache) and asked for again at every view
    (no-cache): an unchanged image is a 304 without a body, answered only after the login, the role
    check and the audit of the view, as a 200 is. Every other answer with patient data stays no-store."""
    db = seeded.agent.db
    client = login(app, "vera")
    page = client.get(f"/patients/{patient(db, 'WEBP-0001').id}")
    assert page.headers["cache-control"] == "no-store"
    src = re.findall(r'<img class="overlay" src="(/results/\d+/overlay\.jpg)"', page.text)[0]
    rid = src.split("/")[2]

    def views() -> int:
        return sum(1 for e in rows_of(db, AuditEvent) if e.object_type == "result" and e.object_id == rid)

    first = client.get(src)
    cache = first.headers["cache-control"]
    assert cache == "private, no-cache", (
        f"Cache-Control {cache!r}: the security-headers middleware of agent/web/app.py must keep the "
        "route's private Cache-Control for /results/<id>/overlay.jpg"
    )
    assert "pragma" not in first.headers
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    before = views()
    again = client.get(src, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag and again.headers["cache-control"] == "private, no-cache"
    assert views() == before + 1  # the repeat view is audited like the first
    other = client.get(src, headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200 and other.content == first.content
    # no 304 without the login or the role, whatever the browser offers
    anonymous = TestClient(app).get(src, headers={"If-None-Match": etag}, follow_redirects=False)
    assert anonymous.status_code in (401, 303)
    assert login(app, "audrey").get(src, headers={"If-None-Match": etag}).status_code == 403
    assert client.get(src.replace(".jpg", ".png")).headers["cache-control"] == "no-store"


def _write_sc(path: Path, rows: int, cols: int) -> None:
    rng = np.random.default_rng(1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    smooth = np.linspace(0, 255, cols, dtype=np.float64)[None, :, None].repeat(rows, 0).repeat(3, 2)
    ds.PixelData = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_a_large_overlay_is_downscaled_once_and_cached_within_bounds(tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    _write_sc(path, 1100, 1400)
    data = images.overlay_jpeg(path)
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size[0] == 768 and abs(img.size[1] - 603) <= 1
    assert images.overlay_jpeg(path) is data  # the cached bytes, not built again
    assert Image.open(io.BytesIO(images.sc_to_png(path))).size == (1400, 1100)  # the PNG: full size
    cache = images.BytesCache(max_bytes=250, max_entries=3)
    for i in range(5):
        cache.put(("k", i), b"x" * 100)
    assert len(cache) == 2 and cache.size_bytes == 200 and cache.get(("k", 0)) is None and cache.get(("k", 4))
    for i in range(5):
        cache.put(("s", i), b"y")
    assert len(cache) == 3
    cache.put(("big",), b"z" * 1000)  # larger than the whole cache: not kept
    assert cache.get(("big",)) is None


# -- 4: the trend legend ------------------------------------------------------------------------
def test_the_trend_legend_is_outside_the_plot() -> None:
    points = [
        TrendPoint("2025-06-10", 0.95, -3.9, 0.4),  # top left and bottom left: where the legends sat
        TrendPoint("2026-01-05", 0.05, 1.9, 0.4),
        TrendPoint("2026-02-01", 0.5, -1.0, 0.4),
    ]
    fig = images.trend_figure(points, 0.4)
    fig.draw_without_rendering()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), "the legend covers the plot"
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
    assert len(legend.get_texts()) == 3
    assert images.trend_png(points, 0.4)[:4] == b"\x89PNG"


# -- 11: CSV ------------------------------------------------------------------------------------
FORMULAS = {  # patient names that a spreadsheet would run as formulas
    "WEBP-0001": '\u00a0=HYPERLINK("http://evil","x")',  # NBSP before the formula
    "WEBP-0002": " \u3000@SUM(A1)",  # a space and an ideographic space
    "WEBP-0003": "\u200b-2+3",  # zero-width space (a format character)
}


@pytest.fixture()
def formula_patients(seeded: Seeded) -> Iterator[dict[str, str]]:
    db = seeded.agent.db
    saved = {pid: patient(db, pid).patient_name for pid in FORMULAS}
    with db.transaction() as s:
        for pid, name in FORMULAS.items():
            s.query(FlaggedPatient).filter(FlaggedPatient.patient_id == pid).update(
                {"patient_name": name, "t_score": -2.1, "patient_birth_date": "19450325"}
            )
    try:
        yield FORMULAS
    finally:
        with db.transaction() as s:
            for pid, old in saved.items():
                s.query(FlaggedPatient).filter(FlaggedPatient.patient_id == pid).update({"patient_name": old})


def test_spreadsheet_cell_neutralises_formulas_after_any_whitespace_and_keeps_numbers() -> None:
    for text in (
        "=1",
        " =1",
        "\u00a0=1",
        "\u2003+1+1",
        "\u3000@x",
        "\u200b=1",
        "\ufeff=1",
        "-2+3",
        "\tabc",
        "\rabc",
        "＝1",
    ):
        assert spreadsheet_cell(text) == "'" + text, repr(text)
    for kept in ("-2.1", "+1.5", " -2.1", "Doe^Jane", "a=b", "1945-03-25", "", -2.1, 0.996, None, 7):
        assert spreadsheet_cell(kept) == kept, repr(kept)


def test_csv_download_has_a_bom_neutralised_formulas_numbers_and_iso_dates(
    app: Any, seeded: Seeded, formula_patients: dict[str, str]
) -> None:
    client = login(app, "vera")
    r = client.get("/flagged/export.csv?sort=name&order=asc")
    assert r.status_code == 200 and r.content[:3] == b"\xef\xbb\xbf"  # Excel reads it as UTF-8
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    rows = {row["patient_id"]: row for row in csv.DictReader(io.StringIO(r.content.decode("utf-8-sig")))}
    assert set(rows) == set(formula_patients)
    for pid, name in formula_patients.items():
        assert rows[pid]["patient_name"] == "'" + name  # text, never a formula
        assert rows[pid]["estimated_t_score"] == "-2.1"  # a negative number stays a number
        assert rows[pid]["birth_date"] == "1945-03-25"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", rows[pid]["last_study_date"])
    assert csv.DictReader(io.StringIO(r.content.decode("utf-8-sig"))).fieldnames[0] == "registry_id"  # type: ignore[index]


def test_cli_csv_neutralises_formulas_and_formats_dates(
    seeded: Seeded, formula_patients: dict[str, str], tmp_path: Path
) -> None:
    from agent.cli import app as cli

    cfg = tmp_path / "agent.toml"
    cfg.write_text(agent_toml(seeded.agent.settings.data_dir), encoding="utf-8")
    res = CliRunner().invoke(cli, ["flagged", "list", "--config", str(cfg), "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = {row["patient_id"]: row for row in csv.DictReader(io.StringIO(res.output))}
    assert set(rows) == set(formula_patients)
    for pid, name in formula_patients.items():
        assert rows[pid]["patient_name"] == "'" + name
        assert rows[pid]["t_score"] == "-2.1"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", rows[pid]["last_study_date"])


def test_dates_out_of_range_are_a_bad_filter_not_a_missing_page(app: Any) -> None:
    """A date picker offers 9999-12-31; the queries add a day to the last date: 400, never 404."""
    viewer, auditor = login(app, "vera"), login(app, "audrey")
    for q in ("date_to=9999-12-31", "date_from=0001-01-01", "date_from=2024-01-01&date_to=2201-01-01"):
        r = viewer.get(f"/flagged?{q}")
        assert r.status_code == 400 and "Check the date" in r.text, q
        assert viewer.get(f"/flagged/export.csv?{q}").status_code == 400, q
        r = auditor.get(f"/audit?{q}")
        assert r.status_code == 400 and "Check the date" in r.text, q
    for q in ("date_from=1900-01-01&date_to=2200-12-31", "date_to=2024-02-29"):
        assert viewer.get(f"/flagged?{q}").status_code == 200, q
        assert viewer.get(f"/flagged/export.csv?{q}").status_code == 200, q
        assert auditor.get(f"/audit?{q}").status_code == 200, q


def test_the_worklist_row_names_the_knee_its_figures_are_of(app: Any, seeded: Seeded) -> None:
    """Issue 24: each flagged row's figures are a knee's (one film of each side in these studies),
    and the Knee column says which; a row flagged before knees (no knee recorded) shows "-"."""
    db = seeded.agent.db
    client = login(app, "vera")
    cells = worklist_cells(client.get("/flagged").text)
    with db.reading() as s:
        flagged = {
            (fp.patient_name or "").replace("^", " "): fp for fp in s.query(FlaggedPatient).all()
        }
    assert cells and set(cells) <= set(flagged)
    for name, row in cells.items():
        fp = flagged[name]
        assert fp.knee_laterality in ("L", "R") and fp.knee_images == 1
        assert row[7] == ("Left knee" if fp.knee_laterality == "L" else "Right knee") + ", 1 image", row
    before = patient(db, "WEBP-0001")
    set_patient(db, "WEBP-0001", knee_images=None, knee_laterality=None)
    try:
        cells = worklist_cells(client.get("/flagged").text)
        assert [row[7] for row in cells.values() if row[1] == "WEBP-0001"] == ["-"]
    finally:
        set_patient(db, "WEBP-0001", knee_images=before.knee_images, knee_laterality=before.knee_laterality)
