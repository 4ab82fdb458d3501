"""The admin web in Debian's Chromium, driven by Playwright (never `playwright install`).

A coordinator logs in, filters the worklist, opens a patient, sees the overlay, records DXA
ordered, exports CSV and logs out, against a live uvicorn over real screening data. The layout
holds with a 120-character name and a 64-character patient ID in a 1280 px window.
Set STRNET_SCREENSHOTS=1 to refresh docs/images/worklist.png and patient.png from this run.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from web_seed import PASSWORDS, SCRIPT_NAME, Seeded, phi_strings, screened_agent

from agent.clock import utcnow
from agent.db.models import FlaggedPatient
from agent.web.app import create_app
from agent.web.server import WebServer

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS_IMAGES = Path(__file__).parents[2] / "docs" / "images"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[tuple[str, Seeded]]:
    if not Path(CHROMIUM).exists():  # `make test` installs it; a missing browser is a set-up error
        pytest.fail("chromium not found: run `make test` (it installs the Debian chromium package)")
    with screened_agent(tmp_path_factory.mktemp("browser-agent"), tiny_weights) as seeded:
        settings = seeded.agent.settings
        web = settings.web.model_copy(update={"port": free_port(), "bind": "127.0.0.1"})
        server = WebServer(create_app(settings.model_copy(update={"web": web}), seeded.agent.db), web)
        server.start()
        try:
            yield f"http://127.0.0.1:{web.port}", seeded
        finally:
            server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, tmp: Path, name: str) -> None:
    path = tmp / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("STRNET_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / name)


def test_coordinator_works_a_patient_through_the_browser(
    live: tuple[str, Seeded], browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    base, seeded = live
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 860})
    page = context.new_page()
    urls: list[str] = []
    console: list[str] = []
    dialogs: list[str] = []
    page.on("request", lambda req: urls.append(req.url))
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        # without a session the worklist sends us to the login page
        page.goto(f"{base}/flagged")
        assert page.url == f"{base}/login"
        page.fill("#username", "vera")
        page.fill("#password", PASSWORDS["vera"][1])
        page.click("#login")
        page.wait_for_url(f"{base}/flagged")
        assert page.inner_text("#total") == "3 matching"
        # the <script> name is text on the page, never run
        assert page.locator("a.patient", has_text=SCRIPT_NAME).count() == 1

        # filter: nobody above 0.999; then new patients flagged since 2000
        page.fill("#f-minp", "0.999")
        with page.expect_navigation():
            page.click("#apply")
        expect(page.locator("#total")).to_have_text("0 matching")
        page.fill("#f-minp", "")
        page.select_option("#f-status", "new")
        page.fill("#f-from", "2000-01-01")
        with page.expect_navigation():
            page.click("#apply")
        expect(page.locator("#total")).to_have_text("3 matching")
        assert page.locator("#worklist tbody tr").count() == 3
        _shot(page, tmp_path, "worklist.png")

        # open a patient: overlays and the trend plot load
        page.click("a.patient:has-text('Doe Jane')")
        page.wait_for_url(f"{base}/patients/*")
        assert page.inner_text("#patient-name") == "Doe Jane"
        page.wait_for_function("() => [...document.images].length > 0 && [...document.images].every(i => i.complete)")
        widths = page.eval_on_selector_all("img.overlay", "els => els.map(e => e.naturalWidth)")
        assert len(widths) == 4 and all(w > 0 for w in widths)
        assert page.eval_on_selector("#trend", "e => e.naturalWidth") > 0
        _shot(page, tmp_path, "patient.png")

        # a radiologist confirmed the patient's flag (the pathway: tests/browser/test_fls_browser.py)
        with seeded.agent.db.transaction() as s:
            s.query(FlaggedPatient).filter(FlaggedPatient.patient_id == "WEBP-0001").update({"status": "confirmed"})
        # record DXA referred with a note
        page.select_option("#fu-action", "dxa_ordered")
        page.fill("#fu-note", "DXA booked at the bone clinic")
        with page.expect_navigation():
            page.click("#fu-save")
        expect(page.locator("#status")).to_have_text("DXA referred")
        assert "DXA booked at the bone clinic" in page.inner_text("#timeline")

        # back to the list, filter on the new status, export
        page.click("text=Flagged patients")
        page.wait_for_url(f"{base}/flagged")
        page.select_option("#f-status", "dxa_ordered")
        with page.expect_navigation():
            page.click("#apply")
        expect(page.locator("#total")).to_have_text("1 matching")
        with page.expect_download() as info:
            page.click("#export")
        download = info.value
        name = download.suggested_filename
        assert name.startswith("strnet-flagged-") and name.endswith(".csv")
        assert Path(download.path()).read_bytes()[:3] == b"\xef\xbb\xbf"  # the BOM: Excel reads UTF-8
        with open(download.path(), newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1
        assert rows[0]["patient_id"] == "WEBP-0001" and rows[0]["patient_name"] == "Doe^Jane"
        assert rows[0]["status"] == "dxa_ordered" and 0 < float(rows[0]["probability"]) <= 1

        # log out: the pages are gone
        page.click("#logout")
        page.wait_for_url(f"{base}/login")
        page.goto(f"{base}/flagged")
        assert page.url == f"{base}/login"
    finally:
        context.close()

    assert dialogs == []
    assert not [m for m in console if "Content Security Policy" in m], console
    assert len(urls) > 10
    for url in urls:  # no patient identifier in any URL the browser asked for
        for secret in [*phi_strings(), *seeded.study_uids, "WEBP"]:
            assert secret not in url, url


LONG_NAME = "Wolfeschlegelsteinhausenbergerdorff-Featherstonehaugh^Maria-Magdalena-Hildegard^" + "X" * 40
LONG_ID = "ID" + "7" * 62  # the longest PatientID (LO, 64 characters), without a space to break at


def test_the_worklist_fits_a_1280_px_window_with_a_120_character_name(
    live: tuple[str, Seeded], browser: Any, tmp_path: Path
) -> None:
    base, seeded = live
    db = seeded.agent.db
    assert len(LONG_NAME) == 120
    with db.reading() as s:
        row = s.query(FlaggedPatient).filter(FlaggedPatient.patient_id == "WEBP-0003").one()
        saved = (row.id, row.patient_name, row.patient_id)
    with db.transaction() as s:
        s.query(FlaggedPatient).filter(FlaggedPatient.id == saved[0]).update(
            {"patient_name": LONG_NAME, "patient_id": LONG_ID}
        )
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    try:
        page.goto(f"{base}/login")
        page.fill("#username", "vera")
        page.fill("#password", PASSWORDS["vera"][1])
        page.click("#login")
        page.wait_for_url(f"{base}/flagged")
        shown = LONG_NAME.replace("^", " ")
        assert page.locator("a.patient", has_text=shown[:40]).count() == 1
        widths = page.evaluate(
            """() => ({
                table: document.querySelector('#worklist').scrollWidth,
                tableBox: document.querySelector('#worklist').getBoundingClientRect().right,
                page: document.documentElement.scrollWidth,
                window: document.documentElement.clientWidth,
            })"""
        )
        assert widths["window"] <= 1280
        assert widths["page"] <= widths["window"], widths  # no sideways scrolling
        assert widths["table"] <= widths["window"] and widths["tableBox"] <= widths["window"], widths
        # the sorted column shows its direction (default: last flagged, newest first)
        sorted_th = page.locator("#worklist th[aria-sort]")
        assert sorted_th.count() == 1 and sorted_th.get_attribute("aria-sort") == "descending"
        assert "▼" in sorted_th.inner_text()
        page.click("#sort-probability")
        page.wait_for_url(lambda url: "sort=probability" in url)
        sorted_th = page.locator("#worklist th[aria-sort]")
        assert sorted_th.get_attribute("aria-sort") == "descending" and "Probability" in sorted_th.inner_text()
        page.click("#sort-probability")
        page.wait_for_url(lambda url: "order=asc" in url)
        assert "▲" in page.locator("#worklist th[aria-sort]").inner_text()
        page.screenshot(path=str(tmp_path / "worklist-long-name.png"), full_page=True)  # to look at, not for docs
        # the patient page too: the name and the ID wrap, the page does not scroll sideways
        page.click("a.patient:has-text('Wolfeschlegel')")
        page.wait_for_url(f"{base}/patients/*")
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        assert page.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    finally:
        context.close()
        with db.transaction() as s:
            s.query(FlaggedPatient).filter(FlaggedPatient.id == saved[0]).update(
                {"patient_name": saved[1], "patient_id": saved[2]}
            )


def _login(page: Any, base: str, user: str) -> None:
    page.goto(f"{base}/login")
    page.fill("#username", user)
    page.fill("#password", PASSWORDS[user][1])
    page.click("#login")
    page.wait_for_url(f"{base}/flagged")


def test_a_patient_walks_the_fracture_liaison_pathway_and_the_evidence_export_counts_it(
    live: tuple[str, Seeded], browser: Any, tmp_path: Path
) -> None:
    """A radiologist confirms a flagged image with a reason; a coordinator refers the patient,
    records the DXA (T-score -2.8, 25 days after the flag), treatment started and closed, and
    downloads the evidence export, whose figures count this patient."""
    from playwright.sync_api import expect

    base, seeded = live
    db = seeded.agent.db
    first = (utcnow() - timedelta(days=60)).replace(hour=8, minute=0, second=0, microsecond=0)
    with db.transaction() as s:  # WEBP-0003 was first flagged 60 days ago, alone in its month
        row = s.query(FlaggedPatient).filter(FlaggedPatient.patient_id == "WEBP-0003").one()
        row.first_flagged_at, fid = first, row.id
    dxa_day = (first + timedelta(days=25)).date().isoformat()
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 860})
    page = context.new_page()
    try:
        # the radiologist agrees with the first flagged image, giving a reason
        _login(page, base, "rita")
        page.goto(f"{base}/patients/{fid}")
        expect(page.locator("#status")).to_have_text("New")
        verdict = page.locator("form.assess").first
        verdict.locator("input.v-agree").check()
        verdict.locator("input.v-reason").fill("Thin cortex, coarse trabeculae")
        with page.expect_navigation():
            verdict.locator("button.v-save").click()
        expect(page.locator("#status")).to_have_text("Confirmed")
        assert "agreed by rita" in page.inner_text(".verdicts") and "Thin cortex" in page.inner_text(".verdicts")
        page.click("#logout")
        page.wait_for_url(f"{base}/login")

        # the coordinator: no verdict form; each step from the form
        _login(page, base, "vera")
        page.goto(f"{base}/patients/{fid}")
        assert page.locator("form.assess").count() == 0
        for action, label, fill in (
            ("dxa_ordered", "DXA referred", {"#fu-note": "Booked at the bone clinic"}),
            ("dxa_done", "DXA done", {"#fu-t": "-2.8", "#fu-dxa-date": dxa_day}),
            ("treatment", "Treatment started", {}),
            ("closed", "Closed", {"#fu-note": "On alendronate, GP informed"}),
        ):
            expect(page.locator("#fu-next")).to_contain_text(label)
            page.select_option("#fu-action", action)
            for selector, value in fill.items():
                page.fill(selector, value)
            with page.expect_navigation():
                page.click("#fu-save")
            expect(page.locator("#status")).to_have_text(label)
        timeline = page.inner_text("#timeline")
        assert "measured T-score -2.8" in timeline and f"scan of {dxa_day}" in timeline
        assert timeline.index("DXA referred") < timeline.index("DXA done") < timeline.index("Closed")

        # the evidence: the chart loads, the export counts the patient in the month of the flag
        page.goto(f"{base}/performance")
        page.wait_for_function("() => document.querySelector('#evidence-chart').complete")
        assert page.eval_on_selector("#evidence-chart", "e => e.naturalWidth") > 0
        with page.expect_download() as info:
            page.click("#evidence-export")
        download = info.value
        assert download.suggested_filename.startswith("strnet-fls-evidence-")
        with open(download.path(), newline="", encoding="utf-8") as f:
            rows = {r["month"]: r for r in csv.DictReader(f)}
        month = rows[f"{first:%Y-%m}"]
        assert (month["flagged"], month["closed"], month["dxa_n"]) == ("1", "1", "1")
        assert (month["days_flag_to_dxa_median"], month["dxa_t_le_-1.0"]) == ("25", "1")
        assert month["ppv_t_le_-1.0"] == "1.000"
        assert (month["dxa_t_le_-2.5"], month["ppv_t_le_-2.5"]) == ("1", "1.000")
        assert rows["all"]["flagged"] == "3" and rows["all"]["dxa_n"] == "1"
    finally:
        context.close()
