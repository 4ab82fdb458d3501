"""The flagged-patient registry as the worker and the reporter fill it (screening.record_screening,
then the SR's commit, screening.record_report, on a temporary SQLite file): one row per patient,
showing the latest positive study's most suspicious knee (these films have no laterality: each is
a knee of its own, so the most suspicious image)."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import pytest
from conftest import agent_toml
from screening_helpers import report_study
from typer.testing import CliRunner

from agent.cli import app
from agent.db.engine import Database, upgrade
from agent.db.models import AuditEvent
from agent.db.registry import list_flagged
from agent.domain import AlgorithmInfo, Eligibility, Findings, IncomingInstance, InstanceRef
from agent.queue import screening, store

OWNER = "test-worker"
_n = itertools.count(1)


@pytest.fixture()
def db(db_url: str) -> Database:
    d = Database(db_url)
    upgrade(d)
    return d


def screen(
    db: Database, study_uid: str, study_date: str | None, p: float, severity: str | None, t: float,
    name: str = "Doe^Jane", side: str | None = None,
) -> None:
    """Receive one image of ``study_uid`` for patient P1, record STR-Net's findings for it and the
    study's next SR revision (the flag is the SR's commit's)."""
    n = next(_n)
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", f"1.2.3.{n}", study_uid, f"{study_uid}.1", "1.2.840.10008.1.2.1")
    store.record_instance(
        db,
        IncomingInstance(
            ref=ref, spool_path=f"d/{n}.dcm", sha256=f"{n:064d}", size_bytes=10, calling_ae="TESTSCU",
            peer_host="127.0.0.1", eligibility=Eligibility(True, None), patient_id="P1",
            patient_name=name, study_date=study_date, laterality=side,
        ),
    )
    (job,) = store.lease(db, OWNER, 1, 60.0)
    findings = Findings(
        probability=p, threshold=0.4, bone_loss=p >= 0.4, p_osteoporosis_given_bone_loss=0.5, severity=severity,
        t_score=t,
        t_score_low=t - 1, t_score_high=t + 1, interval_coverage=0.9,
        algorithm=AlgorithmInfo("STR-Net", "test", "0" * 64),
    )
    assert screening.record_screening(db, job.job_id, OWNER, findings, {}, None, [], send=False)
    assert report_study(db, study_uid)


def only_row(db: Database) -> tuple[str | None, float, str | None, float, int]:
    (row,) = list_flagged(db)
    return row.last_study_date, row.probability, row.severity, row.t_score, row.studies


def flagged_list(tmp_path: Path, *args: str) -> str:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(agent_toml(tmp_path), encoding="utf-8")
    res = CliRunner().invoke(app, ["flagged", "list", "--config", str(cfg), *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_a_study_shows_its_most_suspicious_image_whatever_the_order(db: Database) -> None:
    screen(db, "1.9.1", "20260201", 0.93, "osteoporosis", -2.9)
    screen(db, "1.9.1", "20260201", 0.48, "osteopenia", -1.2)  # screened after, less suspicious
    assert only_row(db) == ("20260201", 0.93, "osteoporosis", -2.9, 1)
    screen(db, "1.9.1", "20260201", 0.97, "osteoporosis", -3.1)
    assert only_row(db) == ("20260201", 0.97, "osteoporosis", -3.1, 1)


def test_a_later_study_replaces_the_figures_even_when_less_suspicious(db: Database) -> None:
    screen(db, "1.9.1", "20250601", 0.93, "osteoporosis", -2.9)
    screen(db, "1.9.2", "20260105", 0.55, "osteopenia", -1.4)
    assert only_row(db) == ("20260105", 0.55, "osteopenia", -1.4, 2)


def test_an_older_study_arriving_late_is_counted_but_keeps_the_latest_figures(db: Database) -> None:
    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6)
    screen(db, "1.9.2", "20190501", 0.99, "osteoporosis", -3.5)  # a film from 2019, routed today
    assert only_row(db) == ("20260115", 0.80, "osteoporosis", -2.6, 2)
    with db.reading() as s:
        events = s.query(AuditEvent).where(AuditEvent.object_type == "flagged_patient")
        changes = [(e.detail or {}).get("change") for e in events]
    assert changes == ["flagged", "counted"]


def test_two_studies_of_one_day_show_the_more_suspicious(db: Database) -> None:
    # a bilateral exam booked as two accessions: two studies, one date
    screen(db, "1.9.1", "20260201", 0.93, "osteoporosis", -2.9)
    screen(db, "1.9.2", "20260201", 0.48, "osteopenia", -1.2)
    assert only_row(db) == ("20260201", 0.93, "osteoporosis", -2.9, 2)


def test_a_closed_patient_is_reopened_by_a_newer_film_not_by_an_old_one(db: Database) -> None:
    from agent.db.models import FlaggedPatient

    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6)
    with db.transaction() as s:
        s.query(FlaggedPatient).update({FlaggedPatient.status: "closed"})
    screen(db, "1.9.2", "20190501", 0.99, "osteoporosis", -3.5)  # a retrospective sweep's film
    assert list_flagged(db)[0].status == "closed"
    screen(db, "1.9.3", "20260601", 0.70, "osteopenia", -1.9)
    assert list_flagged(db)[0].status == "new"


def test_a_study_without_a_date_counts_as_the_latest_arrival(db: Database) -> None:
    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6)
    screen(db, "1.9.2", None, 0.50, "osteopenia", -1.3)
    assert only_row(db) == (None, 0.50, "osteopenia", -1.3, 2)


def test_a_negative_image_never_touches_the_row(db: Database) -> None:
    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6)
    screen(db, "1.9.2", "20260301", 0.10, None, 0.5)
    assert only_row(db) == ("20260115", 0.80, "osteoporosis", -2.6, 1)


def flag_changes(db: Database) -> list[tuple[str, str]]:
    with db.reading() as s:
        events = s.query(AuditEvent).where(AuditEvent.object_type == "flagged_patient").order_by(AuditEvent.id)
        return [(e.action, (e.detail or {}).get("change")) for e in events]


# A retake of the flagged knee whose combined probability falls below the threshold (0.4 here):
# the mean of the logits of 0.80 and 0.05 is that of 0.31, a negative knee and a negative study.


def test_a_flag_its_study_no_longer_supports_is_withdrawn_while_nobody_has_acted_on_it(db: Database) -> None:
    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6, side="L")
    assert only_row(db)[:2] == ("20260115", 0.80)
    screen(db, "1.9.1", "20260115", 0.05, None, 0.4, side="L")  # revision 2: the knee is negative
    assert list_flagged(db) == []
    assert flag_changes(db) == [("C", "flagged"), ("D", "withdrawn")]
    screen(db, "1.9.1", "20260115", 0.99, "osteoporosis", -3.2, side="L")  # positive again: flagged afresh
    assert [r.status for r in list_flagged(db)] == ["new"]


def test_a_withdrawn_flag_falls_back_to_the_patients_other_positive_study(db: Database) -> None:
    screen(db, "1.9.1", "20250601", 0.70, "osteopenia", -1.8, side="R")
    screen(db, "1.9.2", "20260115", 0.80, "osteoporosis", -2.6, side="L")
    assert only_row(db) == ("20260115", 0.80, "osteoporosis", -2.6, 2)
    screen(db, "1.9.2", "20260115", 0.05, None, 0.4, side="L")
    assert only_row(db) == ("20250601", 0.70, "osteopenia", -1.8, 2)
    assert flag_changes(db)[-1] == ("U", "revised")


def test_a_patient_in_follow_up_stays_with_the_revised_figures(db: Database) -> None:
    from agent.db import fls
    from agent.db.models import Result

    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6, side="L")
    (row,) = list_flagged(db)
    with db.reading() as s:
        (film,) = s.query(Result.id).all()
    assert fls.assess_finding(db, film[0], "radiologist", "agree", None)
    assert fls.record_step(db, row.id, "coordinator", "dxa_ordered", None)
    screen(db, "1.9.1", "20260115", 0.05, None, 0.4, side="L")
    (after,) = list_flagged(db)
    assert (after.status, after.knee) == ("dxa_ordered", "Left knee, 2 images")
    assert after.probability < 0.4 and after.severity is None
    assert flag_changes(db)[-1] == ("U", "revised_negative")


def test_a_negative_revision_of_another_study_leaves_the_flag_alone(db: Database) -> None:
    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6, side="L")
    screen(db, "1.9.2", "20260301", 0.10, None, 0.5, side="R")
    screen(db, "1.9.2", "20260301", 0.12, None, 0.4, side="R")  # revision 2 of the negative study
    assert only_row(db) == ("20260115", 0.80, "osteoporosis", -2.6, 1)
    assert flag_changes(db) == [("C", "flagged")]


def test_flagged_list_shows_what_it_sorts_and_filters_on_and_csv_is_safe_in_a_spreadsheet(
    tmp_path: Path, db_url: str
) -> None:
    db = Database(db_url)
    upgrade(db)
    screen(db, "1.9.1", "20260115", 0.80, "osteoporosis", -2.6, name='=HYPERLINK("http://x","P1")')
    (row,) = json.loads(flagged_list(tmp_path, "--format", "json"))
    assert {"first_flagged_at", "last_flagged_at", "last_study_date"} <= set(row)
    (line,) = csv.DictReader(io.StringIO(flagged_list(tmp_path, "--format", "csv")))
    assert line["patient_name"] == "'" + '=HYPERLINK("http://x","P1")'  # text, not a formula
    assert line["t_score"] == "-2.6"  # numbers stay numbers
    table = flagged_list(tmp_path)
    header, first = table.splitlines()[:2]
    assert "LAST STUDY" in header and "FIRST FLAGGED" in header and "LAST FLAGGED" in header
    assert "2026-01-15" in first and row["last_flagged_at"][:10] in first


def test_an_empty_registry_exports_the_same_csv_columns(tmp_path: Path, db_url: str) -> None:
    upgrade(Database(db_url))
    header = flagged_list(tmp_path, "--format", "csv").splitlines()[0].split(",")
    assert header[:3] == ["patient_id", "patient_name", "first_flagged_at"] and "studies" in header
