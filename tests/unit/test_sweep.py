"""The retrospective sweep's logic against a fake archive (agent/ingest/sweep.py, agent/queue/sweeps.py):
series selection, resume, never twice, rate limit, time window, live traffic first, results kept
from PACS when asked. The real archive (Orthanc) is tests/integration/test_sweep_orthanc.py."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import agent_settings, free_port
from sqlalchemy import select

from agent.clock import utcnow
from agent.config import Settings
from agent.db.engine import Database, upgrade
from agent.db.models import AuditEvent, Job, OutboxItem, Study, StudyReport, SweepStudy
from agent.domain import AlgorithmInfo, Eligibility, Findings, IncomingInstance, InstanceRef, OutboxState
from agent.errors import ConfigError
from agent.ingest.eligibility import Rules
from agent.ingest.sweep import Sweeper, in_window, keeps_series
from agent.pacs.archive import RetrieveOutcome, SeriesMatch, StoreCallback, StudyMatch
from agent.queue import outbox, screening, store, sweeps
from agent.queue.outbox import OutgoingObject

RULES_SECTION = agent_settings(Path("/nonexistent")).eligibility
RULES = Rules.from_section(RULES_SECTION)
MODS = frozenset({"CR", "DX"})


def series(uid: str, modality: str = "DX", body_part: str = "KNEE", number: int = 1, description: str = "",
           protocol: str = "") -> SeriesMatch:  # fmt: skip
    return SeriesMatch("1.2.3", uid, modality, body_part, description, protocol, number, 2)


def study(description: str = "") -> StudyMatch:
    return StudyMatch("1.2.3", "20260302", ("DX",), description)


# -- which series ------------------------------------------------------------------------------
def test_knee_series_are_kept_by_the_eligibility_body_part_rules() -> None:
    assert keeps_series(study(), series("1"), MODS, RULES)
    assert not keeps_series(study(), series("2", body_part="CHEST"), MODS, RULES)
    assert not keeps_series(study(), series("3", modality="MR"), MODS, RULES)
    # a generic body part counts when a description says knee (the listener's rule)
    assert not keeps_series(study(), series("4", body_part="LEG"), MODS, RULES)
    assert keeps_series(study("XR KNEE BILAT"), series("4", body_part="LEG"), MODS, RULES)
    assert keeps_series(study(), series("5", body_part="", protocol="Knie ap"), MODS, RULES)


def test_the_agents_own_results_are_never_kept() -> None:
    assert not keeps_series(study(), series("1", modality="SR", number=9901), MODS, RULES)
    assert not keeps_series(study(), series("2", modality="OT", number=9902), MODS, RULES)
    # even a series that looks like a knee radiograph: by its number, or its description
    assert not keeps_series(study(), series("3", number=9902), MODS, RULES)
    assert not keeps_series(study(), series("4", number=7, description="STR-Net overlay"), MODS, RULES)


def test_time_window_may_cross_midnight() -> None:
    at = lambda h, m=0: datetime(2026, 3, 2, h, m)  # noqa: E731
    assert in_window("20:00-06:00", at(23)) and in_window("20:00-06:00", at(5, 59))
    assert not in_window("20:00-06:00", at(6)) and not in_window("20:00-06:00", at(12))
    assert in_window("08:00-17:00", at(12)) and not in_window("08:00-17:00", at(19))
    assert in_window("00:00-00:00", at(12))


# -- a fake archive ----------------------------------------------------------------------------
class FakeArchive:
    name = "archive"
    method = "move"

    def __init__(self, db: Database, days: dict[str, list[str]]) -> None:
        self.db = db
        self.days = days  # YYYYMMDD -> study UIDs (each: one knee series and one chest series, 2 images each)
        self.retrieved: list[tuple[str, list[str]]] = []
        self.fail: set[str] = set()
        self.partial: set[str] = set()

    def find_studies(self, date_from: date, date_to: date, modality: str) -> list[StudyMatch]:
        assert date_from == date_to
        day = date_from.strftime("%Y%m%d")
        return [StudyMatch(u, day, ("DX",)) for u in self.days.get(day, [])] if modality == "DX" else []

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        return [SeriesMatch(study_uid, study_uid + ".1", "DX", "KNEE", "", "", 1, 2),
                SeriesMatch(study_uid, study_uid + ".2", "DX", "CHEST", "", "", 2, 2),
                SeriesMatch(study_uid, study_uid + ".9", "SR", "", "STR-Net", "", 9901, 1)]  # fmt: skip

    def retrieve(self, study_uid: str, series_uids: list[str], store_cb: StoreCallback) -> RetrieveOutcome:
        self.retrieved.append((study_uid, series_uids))
        if study_uid in self.partial:  # one image arrives, then the move fails
            store.record_instance(self.db, incoming(study_uid, f"{series_uids[0]}.0"))
            return RetrieveOutcome(False, 1, 1, 0, "C-MOVE status 0xA702")
        if study_uid in self.fail:
            return RetrieveOutcome(False, 0, 2, 0, "C-MOVE status 0xA702")
        for n in range(2):  # the listener records what arrives while the study is being retrieved
            store.record_instance(self.db, incoming(study_uid, f"{series_uids[0]}.{n}"))
        return RetrieveOutcome(True, 2, 0, 0, "C-MOVE status 0x0000")


def incoming(study_uid: str, sop_uid: str) -> IncomingInstance:
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", sop_uid, study_uid, study_uid + ".1", "1.2.840.10008.1.2.1")
    return IncomingInstance(ref=ref, spool_path=f"d/{sop_uid}.dcm", sha256=sop_uid.ljust(64, "0")[:64],
                            size_bytes=10, calling_ae="ORTHANC", peer_host="127.0.0.1",
                            eligibility=Eligibility(True))  # fmt: skip


@pytest.fixture()
def db(db_url: str) -> Database:
    d = Database(db_url)
    upgrade(d)
    return d


def make(
    db: Database, tmp_path: Path, days: dict[str, list[str]], **sweep: Any
) -> tuple[Sweeper, FakeArchive, Settings]:
    pacs = [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port(), "query": True}]
    settings = agent_settings(tmp_path, sweep=sweep, pacs=pacs)
    archive = FakeArchive(db, days)
    return Sweeper(settings, db, RULES, lambda _p: archive, sleep=lambda _s: None), archive, settings


DAYS = {"20260302": ["1.9.1", "1.9.2"], "20260303": [], "20260304": ["1.9.3"]}
FROM, TO = date(2026, 3, 2), date(2026, 3, 4)


def test_a_sweep_retrieves_knee_series_only_and_a_second_one_nothing(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert report.finished and report.retrieved == 3 and report.days == 3
    assert archive.retrieved == [("1.9.1", ["1.9.1.1"]), ("1.9.2", ["1.9.2.1"]), ("1.9.3", ["1.9.3.1"])]
    with db.reading() as s:
        assert set(s.execute(select(SweepStudy.state)).scalars()) == {"done"}
        codes = [e for e in s.execute(select(AuditEvent.event_code)).scalars()]
    assert codes.count("110112") == 3 * 2 + 3 and codes.count("110102") == 3  # Query; Begin Transferring
    again = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert again.finished and again.retrieved == 0 and again.already_screened == 3
    assert len(archive.retrieved) == 3


def test_a_dry_run_retrieves_and_records_nothing(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    report = sweeper.sweep(settings.pacs[0], FROM, TO, dry_run=True)
    assert [p.study_instance_uid for p in report.planned] == ["1.9.1", "1.9.2", "1.9.3"]
    assert [(len(p.series), p.instances) for p in report.planned] == [(1, 2)] * 3
    assert archive.retrieved == [] and sweeps.cursor(db, "pacs:20260302:20260304") is None
    with db.reading() as s:
        assert s.execute(select(SweepStudy)).first() is None


def test_a_study_screened_live_is_not_retrieved(db: Database, tmp_path: Path) -> None:
    store.record_instance(db, incoming("1.9.2", "1.9.2.1.live"))  # arrived live, queued
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert [u for u, _ in archive.retrieved] == ["1.9.1", "1.9.3"] and report.already_screened == 1


def test_a_failed_retrieve_stops_the_sweep_and_the_next_one_resumes_at_that_day(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    archive.fail = {"1.9.2"}
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert not report.finished and report.retrieved == 1 and report.failed and "0xA702" in report.failed[0]
    assert sweeps.cursor(db, "pacs:20260302:20260304") is None  # the first day is not done
    assert sweeps.being_retrieved(db, "1.9.2", 600)  # its SR waits for the rest
    archive.fail = set()
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert report.finished and [u for u, _ in archive.retrieved] == ["1.9.1", "1.9.2", "1.9.2", "1.9.3"]
    assert not sweeps.being_retrieved(db, "1.9.2", 600)


def test_a_study_cut_off_mid_retrieve_is_retrieved_again_not_marked_done(db: Database, tmp_path: Path) -> None:
    """One image of two arrived (and was queued) before the move failed: the next sweep must
    retrieve the study again, not count it as screened because a job of it exists."""
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    archive.partial = {"1.9.2"}
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert not report.finished and report.retrieved == 1
    archive.partial = set()
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert report.finished and report.already_screened == 1  # 1.9.1 only
    assert [u for u, _ in archive.retrieved] == ["1.9.1", "1.9.2", "1.9.2", "1.9.3"]
    with db.reading() as s:
        state = s.execute(select(SweepStudy.state).where(SweepStudy.study_instance_uid == "1.9.2")).scalar_one()
    assert state == "done"


def test_a_study_that_never_arrives_is_given_up_and_the_sweep_goes_on(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    archive.fail = {"1.9.2"}
    for _ in range(sweeps.MAX_RETRIEVE_ATTEMPTS - 1):
        report = sweeper.sweep(settings.pacs[0], FROM, TO)
        assert not report.finished and report.paused == "a retrieve failed"
    report = sweeper.sweep(settings.pacs[0], FROM, TO)  # the last attempt: given up, the sweep goes on
    assert report.finished and [u for u, _ in archive.retrieved].count("1.9.2") == sweeps.MAX_RETRIEVE_ATTEMPTS
    assert ("1.9.3", ["1.9.3.1"]) in archive.retrieved
    assert not sweeps.being_retrieved(db, "1.9.2", 600)  # its SR (of what arrived) is no longer held
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert [u for u, _ in archive.retrieved].count("1.9.2") == sweeps.MAX_RETRIEVE_ATTEMPTS  # not again


def test_an_interrupted_sweep_resumes_from_its_cursor(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    sweeps.set_cursor(db, "pacs:20260302:20260304", "20260304")  # days before the 4th were done
    report = sweeper.sweep(settings.pacs[0], FROM, TO)
    assert report.days == 1 and [u for u, _ in archive.retrieved] == ["1.9.3"]
    assert sweeps.cursor(db, "pacs:20260302:20260304") == ("20260305", True)


def test_the_rate_limit_counts_retrieves_of_the_last_hour(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS, max_studies_per_hour=2)
    report = sweeper.sweep(settings.pacs[0], FROM, TO, wait_for_rate=False)
    assert report.retrieved == 2 and report.paused == "rate limit" and not report.finished
    report = sweeper.sweep(settings.pacs[0], FROM, TO, wait_for_rate=False)  # still within the hour
    assert report.retrieved == 0 and len(archive.retrieved) == 2
    with db.transaction() as s:  # an hour later
        for row in s.execute(select(SweepStudy).where(SweepStudy.retrieve_started_at.is_not(None))).scalars():
            row.retrieve_started_at = row.retrieve_started_at - timedelta(hours=1, seconds=1)
    report = sweeper.sweep(settings.pacs[0], FROM, TO, wait_for_rate=False)
    assert report.finished and [u for u, _ in archive.retrieved] == ["1.9.1", "1.9.2", "1.9.3"]


def test_swept_jobs_yield_to_live_ones(db: Database, tmp_path: Path) -> None:
    sweeper, _archive, settings = make(db, tmp_path, DAYS)
    sweeper.sweep(settings.pacs[0], FROM, date(2026, 3, 2))  # 4 swept jobs queued first
    live = store.record_instance(db, incoming("1.8.1", "1.8.1.1"))  # then a live one
    with db.reading() as s:
        assert sorted(set(s.execute(select(Job.priority)).scalars())) == [0, sweeps.SWEEP_PRIORITY]
    leased = store.lease(db, "w", 1, 60)
    assert [j.job_id for j in leased] == [live.job_id]


@pytest.mark.parametrize("send_results", [True, False])
def test_send_results_false_keeps_swept_results_from_pacs(db: Database, tmp_path: Path, send_results: bool) -> None:
    sweeper, _archive, settings = make(db, tmp_path, DAYS, send_results=send_results)
    sweeper.sweep(settings.pacs[0], FROM, date(2026, 3, 2))  # 1.9.1 and 1.9.2, swept
    store.record_instance(db, incoming("1.8.1", "1.8.1.1"))  # live
    findings = Findings(0.8, 0.5, True, 0.6, "osteopenia", -1.8, -2.5, -1.1, 0.9,
                        AlgorithmInfo("STR-Net", "test-1", "0" * 64))  # fmt: skip
    leased = {j.ref.study_instance_uid: j for j in store.lease(db, "w", 10, 60)}
    for uid in ("1.9.1", "1.8.1"):
        overlay = OutgoingObject("sc", "1.2.840.10008.5.1.4.1.1.7", uid + ".sc", f"sc/{uid}.dcm")
        assert screening.record_screening(db, leased[uid].job_id, "w", findings, {}, overlay, ["pacs"], send=True)
    with db.reading() as s:
        states = dict(s.execute(select(OutboxItem.sop_instance_uid, OutboxItem.state)).all())
    assert states["1.8.1.sc"] == OutboxState.PENDING
    assert states["1.9.1.sc"] == (OutboxState.PENDING if send_results else OutboxState.SHADOW)


def test_the_scheduled_sweep_runs_in_its_window_up_to_yesterday(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS, enabled=True, since="2026-03-02", window="20:00-06:00")
    assert sweeper.scheduled(now=datetime(2026, 3, 5, 12)) == 0 and archive.retrieved == []  # outside
    assert sweeper.scheduled(now=datetime(2026, 3, 4, 22)) == 2  # up to yesterday, the 3rd
    assert sweeper.scheduled(now=datetime(2026, 3, 5, 22)) == 1  # the next night: the 4th
    assert sweeper.scheduled(now=datetime(2026, 3, 5, 23)) == 0
    assert sweeps.cursor(db, "pacs:scheduled") == ("20260305", True)  # up to yesterday; tomorrow goes on


def test_an_enabled_sweep_needs_its_oldest_date_and_a_pacs_to_query(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep.since"):
        agent_settings(tmp_path, sweep={"enabled": True})
    with pytest.raises(ConfigError, match="sweep.enabled"):
        agent_settings(tmp_path, sweep={"enabled": True, "since": "2024-01-01"})
    with pytest.raises(ConfigError, match="sweep.window"):
        agent_settings(tmp_path, sweep={"window": "8-17"})


def test_a_dicomweb_pacs_is_swept_by_qido_and_wado_and_dimse_retrieve_settings_are_refused(tmp_path: Path) -> None:
    from agent.ingest.sweep import archive_for
    from agent.pacs.qr import DimseArchive
    from agent.pacs.wado import DicomwebArchive

    web = {"name": "web", "kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web", "query": True}
    dimse = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port(), "query": True}
    settings = agent_settings(tmp_path, pacs=[web, dimse], sweep={"retrieve": "get"})  # the dimse one uses it
    sources = [archive_for(settings)(p) for p in settings.pacs]
    assert isinstance(sources[0], DicomwebArchive) and isinstance(sources[1], DimseArchive)
    for sweep in ({"retrieve": "get"}, {"move_ae_title": "OTHER"}):
        with pytest.raises(ConfigError, match=f"sweep.{next(iter(sweep))}"):
            agent_settings(tmp_path, pacs=[web], sweep=sweep)


def test_serve_schedules_the_sweep_when_enabled(tmp_path: Path) -> None:
    from agent.app import Agent

    pacs = [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port(), "query": True}]
    off = Agent.build(agent_settings(tmp_path / "a", pacs=pacs), worker=False)
    assert off.sweeper is None and off.scheduler is not None and off.scheduler.get_job("archive_sweep") is None
    on = Agent.build(agent_settings(tmp_path / "b", pacs=pacs, sweep={"enabled": True, "since": "2024-01-01"}),
                     worker=False)  # fmt: skip
    assert on.sweeper is not None and on.scheduler is not None and on.scheduler.get_job("archive_sweep") is not None
    for agent in (off, on):
        agent.db.dispose()


FINDINGS = Findings(0.8, 0.5, True, 0.6, "osteopenia", -1.8, -2.5, -1.1, 0.9,
                    AlgorithmInfo("STR-Net", "test-1", "0" * 64))  # fmt: skip


def screen_and_report(db: Database, uids: list[str]) -> None:
    """Each study's leased jobs screened (an overlay each) and then its SR recorded, in this order."""
    leased = store.lease(db, "w", 100, 60)
    for uid in uids:
        for job in (j for j in leased if j.ref.study_instance_uid == uid):
            overlay = OutgoingObject("sc", "1.2.840.10008.5.1.4.1.1.7", job.ref.sop_instance_uid + ".sc", "sc/x.dcm")
            assert screening.record_screening(db, job.job_id, "w", FINDINGS, {}, overlay, ["pacs"], send=True)
    for uid in uids:
        with db.reading() as s:
            study_id = s.execute(select(Study.id).where(Study.study_instance_uid == uid)).scalar_one()
            revision = 1 + len(s.execute(select(StudyReport.id).where(StudyReport.study_id == study_id)).all())
        ready = screening.ReadyStudy(study_id, uid, "ORTHANC", revision, None, None, [], 1)
        sr = OutgoingObject("sr", "1.2.840.10008.5.1.4.1.1.88.34", f"{uid}.sr{revision}", "sr/x.dcm")
        assert screening.record_report(db, ready, sr, uid + ".99", ["pacs"], send=True)


def test_a_live_studys_results_are_sent_before_a_swept_ones_srs_first_within_each(
    db: Database, tmp_path: Path
) -> None:
    sweeper, _archive, settings = make(db, tmp_path, DAYS)
    sweeper.sweep(settings.pacs[0], FROM, date(2026, 3, 2))  # 1.9.1, 1.9.2 swept: 4 images
    store.record_instance(db, incoming("1.8.1", "1.8.1.1"))  # then a live study
    store.record_instance(db, incoming("1.8.1", "1.8.1.2"))
    screen_and_report(db, ["1.9.1", "1.9.2", "1.8.1"])  # the swept results are older
    order = [i.sop_instance_uid for i in outbox.lease_due(db, limit=100)]
    assert order == ["1.8.1.sr1", "1.8.1.1.sc", "1.8.1.2.sc",  # live: SR first, then its overlays
                     "1.9.1.sr1", "1.9.2.sr1", "1.9.1.1.0.sc", "1.9.1.1.1.sc", "1.9.2.1.0.sc",
                     "1.9.2.1.1.sc"], order  # fmt: skip


def test_send_results_false_keeps_only_the_sweeps_results_from_pacs_not_a_later_live_ones(
    db: Database, tmp_path: Path
) -> None:
    sweeper, _archive, settings = make(db, tmp_path, DAYS, send_results=False)
    sweeper.sweep(settings.pacs[0], FROM, date(2026, 3, 2))
    screen_and_report(db, ["1.9.1"])
    store.record_instance(db, incoming("1.9.1", "1.9.1.live"))  # PACS sends one more image later: live
    screen_and_report(db, ["1.9.1"])
    with db.reading() as s:
        states = dict(s.execute(select(OutboxItem.sop_instance_uid, OutboxItem.state)).all())
    assert states["1.9.1.1.0.sc"] == states["1.9.1.sr1"] == OutboxState.SHADOW  # the sweep's: registry only
    assert states["1.9.1.live.sc"] == states["1.9.1.sr2"] == OutboxState.PENDING  # live: sent


def test_the_scheduled_sweep_stops_between_studies_when_its_window_closes(db: Database, tmp_path: Path) -> None:
    clock = [0.0]
    pacs = [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port(), "query": True}]
    sweep = {"enabled": True, "since": "2026-03-02", "window": "20:00-06:00", "max_studies_per_hour": 100}
    settings = agent_settings(tmp_path, pacs=pacs, sweep=sweep)
    archive = FakeArchive(db, {"20260302": ["1.9.1", "1.9.2", "1.9.3", "1.9.4"]})
    real_retrieve = archive.retrieve

    def a_minute_each(study_uid: str, series_uids: list[str], store_cb: StoreCallback) -> RetrieveOutcome:
        clock[0] += 60.0
        return real_retrieve(study_uid, series_uids, store_cb)

    archive.retrieve = a_minute_each  # type: ignore[method-assign]
    sweeper = Sweeper(settings, db, RULES, lambda _p: archive, sleep=lambda _s: None, monotonic=lambda: clock[0])
    # one day's work started at 05:58 with time to spare: two studies (05:58, 05:59), none at 06:00
    assert sweeper.scheduled(now=datetime(2026, 3, 5, 5, 58), budget_s=3600) == 2
    assert [r[0] for r in archive.retrieved] == ["1.9.1", "1.9.2"]
    assert sweeps.cursor(db, "pacs:scheduled") is None  # the day is not done
    assert sweeper.scheduled(now=datetime(2026, 3, 5, 20, 0), budget_s=3600) == 2  # the next window: the rest
    assert [r[0] for r in archive.retrieved] == ["1.9.1", "1.9.2", "1.9.3", "1.9.4"]


def test_a_retrieving_or_failed_study_holds_its_sr_back_for_a_bounded_time(db: Database, tmp_path: Path) -> None:
    assert sweeps.hold_s(120.0) == 1200.0  # docs/architecture.md: "at most 10 x sweep.timeout_s"
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    archive.fail = {"1.9.2"}
    sweeper.sweep(settings.pacs[0], FROM, TO)  # 1.9.2 failed, and no sweep runs again
    sweeps.record_found(db, "pacs", [sweeps.FoundStudy("1.9.3", "20260304", 1, 2)], True)
    sweeps.begin_retrieve(db, "1.9.3", "STRNET", {})  # 1.9.3: a sweep killed mid-retrieve
    for uid in ("1.9.2", "1.9.3"):
        assert sweeps.being_retrieved(db, uid, sweeps.hold_s(settings.sweep.timeout_s))
    with db.transaction() as s:  # the retrieves started longer ago than the hold
        for row in s.execute(select(SweepStudy)).scalars():
            row.retrieve_started_at = utcnow() - timedelta(seconds=sweeps.hold_s(settings.sweep.timeout_s) + 1)
    for uid in ("1.9.2", "1.9.3"):
        assert not sweeps.being_retrieved(db, uid, sweeps.hold_s(settings.sweep.timeout_s))  # its SR is built


def test_a_live_study_ready_with_swept_ones_gets_its_sr_built_first(db: Database, tmp_path: Path) -> None:
    sweeper, _archive, settings = make(db, tmp_path, DAYS)
    sweeper.sweep(settings.pacs[0], FROM, date(2026, 3, 2))  # 1.9.1, 1.9.2: older studies
    store.record_instance(db, incoming("1.8.1", "1.8.1.1"))
    for job in store.lease(db, "w", 100, 60):
        assert screening.record_screening(db, job.job_id, "w", FINDINGS, {}, None, ["pacs"], send=True)
    ready = [r.study_instance_uid for r in screening.ready_studies(db, quiet_period_s=0)]
    assert ready == ["1.8.1", "1.9.1", "1.9.2"]


def test_a_source_with_a_close_is_closed_after_each_sweep(db: Database, tmp_path: Path) -> None:
    sweeper, archive, settings = make(db, tmp_path, DAYS)
    closed: list[bool] = []
    archive.close = lambda: closed.append(True)  # type: ignore[attr-defined]  # as the DICOMweb source's session
    sweeper.sweep(settings.pacs[0], FROM, TO)
    sweeper.sweep(settings.pacs[0], FROM, TO, dry_run=True)
    assert closed == [True, True]
