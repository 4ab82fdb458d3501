"""A study whose SR cannot be built never holds up another study's SR (agent/queue/reporter.py,
agent/queue/screening.py): the failure is counted against that study, retried with backoff,
given up after ``SR_MAX_ATTEMPTS`` (audited, on the status page, with a redacted reason) and
replayed by ``strnet jobs retry``; a later instance of the study starts its attempts afresh.

The reporter runs in-process on a real database, building SRs in the sweep's thread; the build
is made to fail for a study whose film lacks its AccessionNumber, quoting the patient in the
exception's text as a careless library would."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import agent_settings, agent_toml, free_port
from dicom_factory import knee_dx
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from typer.testing import CliRunner

from agent.audit import trail
from agent.cli import app as cli_app
from agent.clock import utcnow
from agent.db.engine import Database, current_revision, head_revision, open_database, upgrade
from agent.db.models import (
    REPORT_DEAD,
    REPORT_RETRY,
    AuditEvent,
    Base,
    OutboxItem,
    Study,
    StudyReport,
    StudyReportFailure,
)
from agent.db.worklist import StatusSummary, status_summary
from agent.domain import AlgorithmInfo, Eligibility, Findings, IncomingInstance, InstanceRef, ServedModel
from agent.logging import configure_logging, hash_uid
from agent.queue import screening, store
from agent.queue.reporter import StudyReporter
from agent.reporting.builder import encode
from agent.spool import Spool
from agent.web.render import TEMPLATES_DIR, templates

OWNER = "test-worker"
ALGO = AlgorithmInfo("STR-Net", "test-1", "0" * 64)
SERVED = ServedModel(ALGO, 0.4, {"default": 0.4}, 0.9, "cpu")
# the patient of the film the SR build chokes on: none of this may reach a log, reason or page
BAD_NAME, BAD_ID, BAD_BIRTH = "Quimbly^Ottoline", "PID-FAIL-4242", "19300707"


@pytest.fixture()
def reporter(tmp_path: Path) -> Iterator[StudyReporter]:
    pacs = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
    settings = agent_settings(
        tmp_path / "agent", reporting={"build_processes": 0, "quiet_period_s": 0, "overlay": False}, pacs=pacs
    )
    db = open_database(settings)
    r = StudyReporter(
        settings, db, Spool(settings.spool_dir), Spool(settings.results_dir), served_model=lambda: SERVED,
        jitter=lambda: 0.0,  # the shortest backoff: base x 2^(n-1) x 0.5
    )  # fmt: skip
    yield r
    r.close()
    db.dispose()


class Builds:
    """The reporter's SR build, failing (AttributeError quoting the patient) for a study with a film
    without AccessionNumber until ``fixed``, as a build that cannot handle the film would."""

    def __init__(self, reporter: StudyReporter) -> None:
        self.real = reporter.report_builder.build_sr
        self.fixed = False
        self.studies: list[str] = []  # Study Instance UID of each build asked for

    def __call__(
        self, sources: list[pydicom.Dataset], findings: list[Any], revision: int, predecessor: Any, knees: Any = None
    ) -> Any:
        self.studies.append(str(sources[0].StudyInstanceUID))
        if any("AccessionNumber" not in ds for ds in sources):
            if not self.fixed:
                ds = sources[0]
                raise AttributeError(f"{ds.PatientName} ({ds.PatientID}, {ds.PatientBirthDate}): no AccessionNumber")
            sources = [_with_accession(ds) for ds in sources]
        return self.real(sources, findings, revision, predecessor, knees)


def _with_accession(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds = ds.copy()
    ds.AccessionNumber = ""
    return ds


@pytest.fixture()
def builds(reporter: StudyReporter, monkeypatch: pytest.MonkeyPatch) -> Builds:
    b = Builds(reporter)
    monkeypatch.setattr(reporter.report_builder, "build_sr", b)
    return b


def _screened(reporter: StudyReporter, study_uid: str | None = None, *, accession: bool = True, seed: int = 0) -> str:
    """One knee film spooled, received and screened (its job DONE with a result), as the C-STORE
    handler and the worker leave it; returns its study's UID."""
    study_uid = study_uid or generate_uid()
    kw = {} if accession else {"patient_name": BAD_NAME, "patient_id": BAD_ID, "birth_date": BAD_BIRTH}
    ds = knee_dx(study_uid=study_uid, seed=seed, rows=40, cols=32, **kw)
    if not accession:
        del ds.AccessionNumber
    data = encode(ds)
    rel = reporter.spool.write_named(f"{ds.SOPInstanceUID}.dcm", [data])
    ref = InstanceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), study_uid, str(ds.SeriesInstanceUID),
                      str(ds.file_meta.TransferSyntaxUID))  # fmt: skip
    store.record_instance(
        reporter.db,
        IncomingInstance(ref, rel, hashlib.sha256(data).hexdigest(), len(data), "TESTSCU", "127.0.0.1",
                         Eligibility(True), patient_id=str(ds.PatientID), patient_name=str(ds.PatientName),
                         patient_birth_date=str(ds.PatientBirthDate)),
    )  # fmt: skip
    (job,) = store.lease(reporter.db, OWNER, 1, 60.0)
    findings = Findings(0.81, 0.4, True, 0.6, "osteopenia", -1.8, -2.5, -1.1, 0.9, ALGO)
    assert screening.record_screening(reporter.db, job.job_id, OWNER, findings, {}, None, [], send=False)
    return study_uid


def _study_id(db: Database, study_uid: str) -> int:
    with db.reading() as s:
        return int(s.execute(select(Study.id).where(Study.study_instance_uid == study_uid)).scalar_one())


def _failure(db: Database, study_uid: str) -> StudyReportFailure | None:
    with db.reading() as s:
        return s.execute(
            select(StudyReportFailure).where(StudyReportFailure.study_id == _study_id(db, study_uid))
        ).scalar_one_or_none()


def _reports(db: Database, study_uid: str) -> list[int]:
    with db.reading() as s:
        return list(
            s.execute(select(StudyReport.revision).where(StudyReport.study_id == _study_id(db, study_uid))).scalars()
        )


def _make_due(db: Database, study_uid: str) -> None:
    """As if the backoff had passed."""
    with db.transaction() as s:
        s.execute(
            update(StudyReportFailure)
            .where(StudyReportFailure.study_id == _study_id(db, study_uid))
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


def _ready(db: Database) -> set[str]:
    return {r.study_instance_uid for r in screening.ready_studies(db, 0.0)}


@contextmanager
def _log() -> Iterator[io.StringIO]:
    """What the production log pipeline (scrubber included) writes meanwhile."""
    configure_logging("info", "console")
    root = logging.getLogger()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield buf
    finally:
        root.removeHandler(handler)


def _status_block(summary: StatusSummary) -> str:
    """The status page's block of SRs not built, rendered as the page renders it."""
    source = (TEMPLATES_DIR / "status.html").read_text(encoding="utf-8")
    start = source.index("<h2>SRs not built</h2>")
    end = source.index("</tbody></table>", start) + len("</tbody></table>")
    return templates().from_string(source[start:end]).render(s=summary)


def _no_phi(text: str) -> None:
    for value in (BAD_NAME, BAD_ID, BAD_BIRTH, "Quimbly", "Ottoline"):
        assert value not in text, f"{value!r} leaked"


def test_a_failing_sr_does_not_hold_up_a_later_study(reporter: StudyReporter, builds: Builds) -> None:
    bad = _screened(reporter, accession=False)  # first in the sweep: it used to stop it
    good = _screened(reporter, seed=1)
    with _log() as out:
        assert reporter.report_ready_studies() == 1
    log = out.getvalue()
    assert builds.studies == [bad, good]
    assert _reports(reporter.db, good) == [1] and _reports(reporter.db, bad) == []
    with reporter.db.reading() as s:
        assert [o.kind for o in s.execute(select(OutboxItem)).scalars()] == ["sr"]
    failure = _failure(reporter.db, bad)
    assert failure is not None and failure.state == REPORT_RETRY and failure.attempts == 1
    assert failure.last_error == "AttributeError"
    # logged once, by hashed UID, with the redacted reason; the good study as before
    failed = [line for line in log.splitlines() if "report_failed" in line]
    assert len(failed) == 1, log
    assert f"study={hash_uid(bad)}" in failed[0] and "AttributeError" in failed[0] and "attempt=1" in failed[0]
    assert bad not in log
    assert sum("report_built" in line for line in log.splitlines()) == 1 and f"study={hash_uid(good)}" in log
    _no_phi(log)
    assert reporter.failures == 1 and reporter.reports == 1


def test_a_failing_sr_backs_off_then_is_given_up_audited_and_shown_without_phi(
    reporter: StudyReporter, builds: Builds
) -> None:
    assert screening.SR_MAX_ATTEMPTS == 8  # docs/architecture.md: "given up after 8 attempts"
    bad = _screened(reporter, accession=False)
    with _log() as out:
        assert reporter.report_ready_studies() == 0
        # not retried by the next sweeps: its next attempt is 15 s away
        assert bad not in _ready(reporter.db)
        assert reporter.report_ready_studies() == 0 and builds.studies == [bad]
        delays = []
        for attempt in range(2, screening.SR_MAX_ATTEMPTS + 1):
            f = _failure(reporter.db, bad)
            assert f is not None and f.next_attempt_at is not None
            delays.append((f.next_attempt_at - f.updated_at).total_seconds())
            _make_due(reporter.db, bad)
            assert bad in _ready(reporter.db)
            assert reporter.report_ready_studies() == 0
            f = _failure(reporter.db, bad)
            assert f is not None and f.attempts == attempt
    log = out.getvalue()
    # 30 s doubling (x 0.5: no jitter here), one build per attempt, one log line per attempt
    assert delays == pytest.approx([15 * 2**i for i in range(screening.SR_MAX_ATTEMPTS - 1)], abs=1.0)
    assert builds.studies == [bad] * screening.SR_MAX_ATTEMPTS
    failed = [line for line in log.splitlines() if "report_failed" in line]
    assert len(failed) == screening.SR_MAX_ATTEMPTS
    assert all("gave_up=False" in line for line in failed[:-1]) and "gave_up=True" in failed[-1]
    f = _failure(reporter.db, bad)
    assert f is not None and f.state == REPORT_DEAD and f.next_attempt_at is None
    # given up: never due again by itself, whatever the time
    _make_due(reporter.db, bad)
    assert bad not in _ready(reporter.db) and reporter.report_ready_studies() == 0
    assert len(builds.studies) == screening.SR_MAX_ATTEMPTS
    # audited, in the chain
    with reporter.db.reading() as s:
        events = [e for e in s.execute(select(AuditEvent)).scalars() if (e.detail or {}).get("change") == "report_dead"]
        assert trail.verify(s).ok
    (event,) = events
    assert event.object_id == str(_study_id(reporter.db, bad)) and event.outcome == 8
    assert event.detail == {"change": "report_dead", "revision": 1, "attempts": screening.SR_MAX_ATTEMPTS,
                            "reason": "AttributeError"}  # fmt: skip
    # on the status page: counts and the study's ids, attempts and reason, no patient data
    summary = status_summary(reporter.db)
    assert (summary.reports_dead, summary.reports_retrying) == (1, 0)
    (line,) = summary.report_failures
    assert (line.study_id, line.study, line.state, line.attempts) == (
        _study_id(reporter.db, bad),
        hash_uid(bad),
        REPORT_DEAD,
        screening.SR_MAX_ATTEMPTS,
    )
    assert line.reason == "AttributeError"
    page = _status_block(summary)
    assert 'id="sr-dead">1<' in page and "AttributeError" in page
    assert hash_uid(bad) in page and bad not in page
    _no_phi(log + repr(summary) + page + repr(event.detail))


def test_jobs_retry_dead_makes_a_given_up_sr_due_and_a_build_clears_it(
    reporter: StudyReporter, builds: Builds, tmp_path: Path
) -> None:
    bad = _screened(reporter, accession=False)
    for _ in range(screening.SR_MAX_ATTEMPTS):
        _make_due(reporter.db, bad)
        reporter.report_ready_studies()
    f = _failure(reporter.db, bad)
    assert f is not None and f.state == REPORT_DEAD
    cfg = tmp_path / "agent.toml"
    cfg.write_text(agent_toml(reporter.settings.data_dir), encoding="utf-8")
    res = CliRunner().invoke(cli_app, ["jobs", "retry", "--dead", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "0 undelivered result(s); 1 SR(s) to build again" in res.output
    f = _failure(reporter.db, bad)
    assert f is not None and (f.state, f.attempts, f.next_attempt_at) == (REPORT_RETRY, 0, None)
    assert bad in _ready(reporter.db)
    assert status_summary(reporter.db).reports_dead == 0
    with reporter.db.reading() as s:
        replays = [e.detail for e in s.execute(select(AuditEvent)).scalars() if (e.detail or {}).get("activity")]
    assert replays[-1] == {"activity": "replay", "jobs": 0, "results": 0, "reports": 1}
    # the cause fixed (the build tolerates the film now): built, the failure gone
    builds.fixed = True
    assert reporter.report_ready_studies() == 1
    assert _reports(reporter.db, bad) == [1] and _failure(reporter.db, bad) is None
    assert status_summary(reporter.db).report_failures == []
    assert _ready(reporter.db) == set()


def test_replaying_chosen_studies_makes_them_due_even_while_backing_off(
    reporter: StudyReporter, builds: Builds
) -> None:
    bad = _screened(reporter, accession=False)
    other = _screened(reporter, accession=False, seed=1)
    reporter.report_ready_studies()
    assert _ready(reporter.db) == set()
    assert screening.replay_failed_reports(reporter.db, [_study_id(reporter.db, bad)]) == 1
    assert _ready(reporter.db) == {bad}
    assert screening.replay_failed_reports(reporter.db, None) == 0  # --dead: only those given up
    assert other not in _ready(reporter.db)


def test_a_later_instance_starts_the_attempts_afresh(reporter: StudyReporter, builds: Builds) -> None:
    bad = _screened(reporter, accession=False)
    reporter.report_ready_studies()
    _make_due(reporter.db, bad)
    reporter.report_ready_studies()
    f = _failure(reporter.db, bad)
    assert f is not None and f.attempts == 2 and bad not in _ready(reporter.db)
    _screened(reporter, bad, seed=3)  # a later film of the study: due at once (after the quiet period)
    assert bad in _ready(reporter.db)
    reporter.report_ready_studies()  # still fails (the first film is still there): attempt 1 again
    f = _failure(reporter.db, bad)
    assert f is not None and f.attempts == 1 and f.state == REPORT_RETRY
    # given up, then a later film: tried again
    for _ in range(screening.SR_MAX_ATTEMPTS - 1):
        _make_due(reporter.db, bad)
        reporter.report_ready_studies()
    f = _failure(reporter.db, bad)
    assert f is not None and f.state == REPORT_DEAD
    _screened(reporter, bad, seed=4)
    assert bad in _ready(reporter.db)
    builds.fixed = True
    assert reporter.report_ready_studies() == 1
    assert _reports(reporter.db, bad) == [1] and _failure(reporter.db, bad) is None


def test_the_migration_upgrades_an_existing_database(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(db, "0003")  # a database of the previous release, with a study in it
    now = utcnow()
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at, last_calling_ae) "
                "VALUES ('1.2.3.4', :now, :now, 'TESTSCU')"
            ),
            {"now": now},
        )
        assert "study_report_failures" not in sa.inspect(conn).get_table_names()
    upgrade(db)
    assert current_revision(db) == head_revision() == "0012_knee"
    with db.engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("study_report_failures")}
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert columns == {"id", "study_id", "state", "attempts", "next_attempt_at", "last_error", "study_received_at",
                       "created_at", "updated_at"}  # fmt: skip
    assert [d for d in diffs if "study_report_failures" in str(d)] == []  # the model and the migration agree
    assert screening.ready_studies(db, 0.0) == []  # the study has no results: nothing to report
    assert status_summary(db).report_failures == []
    db.dispose()


def test_a_positive_study_whose_sr_cannot_be_built_is_flagged_all_the_same(
    reporter: StudyReporter, builds: Builds
) -> None:
    """The knees decide the flag before the SR is built: a build that fails (retried, perhaps given
    up) does not hold up the coordinators' list; the retry with the same films decides nothing
    twice, and the SR, once built, is linked to the knee it stated."""
    from agent.db.models import KneeResult
    from agent.db.registry import list_flagged

    bad = _screened(reporter, accession=False)
    assert reporter.report_ready_studies() == 0 and _reports(reporter.db, bad) == []
    assert len(list_flagged(reporter.db)) == 1

    def knees() -> list[tuple[int, int | None]]:
        with reporter.db.reading() as s:
            return [(k.revision, k.report_id) for k in s.execute(select(KneeResult)).scalars()]

    assert knees() == [(1, None)]
    _make_due(reporter.db, bad)
    assert reporter.report_ready_studies() == 0 and knees() == [(1, None)]
    builds.fixed = True
    _make_due(reporter.db, bad)
    assert reporter.report_ready_studies() == 1
    with reporter.db.reading() as s:
        report_id = s.execute(select(StudyReport.id)).scalar_one()
        changes = [e.detail["change"] for e in s.execute(select(AuditEvent)).scalars()
                   if e.object_type == "flagged_patient"]  # fmt: skip
    assert knees() == [(1, report_id)]
    assert changes == ["flagged"]
