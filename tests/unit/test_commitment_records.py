"""Storage commitment on results: its settings, its outbox rows and `strnet outbox list`.

The exchanges with a PACS: tests/loopback/test_storage_commitment.py (scripted pynetdicom peers)
and tests/integration/test_storage_commitment_orthanc.py (Orthanc).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import agent_toml, free_port
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from agent.clock import utcnow
from agent.config import load_settings
from agent.db.engine import Database, upgrade
from agent.db.models import Instance, Job, OutboxItem, Study
from agent.domain import OUTBOX_BACKLOG, Eligibility, IncomingInstance, InstanceRef, JobState, OutboxState
from agent.errors import ConfigError
from agent.metrics import render
from agent.pacs import commitment
from agent.queue import outbox, store

POLICY = outbox.RetryPolicy(max_attempts=3, backoff_base_s=1.0, backoff_max_s=2.0, jitter=lambda: 0.5)


@pytest.fixture()
def db(db_url: str) -> Database:
    d = Database(db_url)
    upgrade(d)
    return d


def seed(db: Database, states: list[OutboxState], destination: str = "pacs") -> list[int]:
    """One study (one DONE job) with an outbox row in each of ``states``."""
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.1", "1.2.3.999", "1.2.3.998", "1.2.840.10008.1.2.1")
    store.record_instance(db, IncomingInstance(ref, "d/1.dcm", "0" * 64, 10, "TESTSCU", "127.0.0.1",
                                               Eligibility(True, None)))  # fmt: skip
    with db.transaction() as s:
        study_id = s.execute(select(Study.id)).scalar_one()
        for n, _ in enumerate(states):
            outbox.add(s, study_id, outbox.OutgoingObject("sc", "1.2.3", f"1.2.3.{n}", f"{n}.dcm"), [destination], True)
    with db.transaction() as s:
        ids = list(s.execute(select(OutboxItem.id).order_by(OutboxItem.id)).scalars())
        for i, state in zip(ids, states, strict=True):
            s.execute(update(OutboxItem).where(OutboxItem.id == i).values(state=state.value, attempts=1))
    return ids


def row(db: Database, item_id: int) -> OutboxItem:
    return next(o for o in outbox.items(db) if o.id == item_id)


# -- settings -------------------------------------------------------------------------------------
def _pacs(**extra: Any) -> dict[str, Any]:
    return {"name": "p", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), **extra}


def test_storage_commitment_is_off_by_default_with_a_600_s_timeout() -> None:
    dest = load_settings(None, search_default=False, pacs=[_pacs()]).pacs[0]
    assert (dest.storage_commitment, dest.storage_commitment_timeout_s) == (False, 600.0)


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        ({"calling_ae_title": "OTHER"}, "pacs[0].calling_ae_title"),  # the PACS reports to the AE that asked
        ({"storage_commitment_timeout_s": 5.0}, "pacs[0].storage_commitment_timeout_s"),  # not above keep_open_s
    ],
)
def test_storage_commitment_settings_that_cannot_work_are_refused(extra: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, search_default=False, pacs=[_pacs(storage_commitment=True, **extra)])
    assert err.value.setting == setting
    # the same values are fine without storage commitment, and with the agent's own AE title
    load_settings(None, search_default=False, pacs=[_pacs(**extra)])
    load_settings(None, search_default=False, pacs=[_pacs(storage_commitment=True, calling_ae_title="STRNET")])


def test_a_dicomweb_destination_cannot_ask_for_storage_commitment() -> None:
    web = {"name": "w", "kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web",
           "storage_commitment": True}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_settings(None, search_default=False, pacs=[web])
    assert err.value.setting == "pacs[0].storage_commitment"


# -- rows -----------------------------------------------------------------------------------------
def test_sent_is_backlog_and_committed_is_delivered() -> None:
    assert OutboxState.SENT in OUTBOX_BACKLOG and OutboxState.COMMITTED not in OUTBOX_BACKLOG
    text = render({}, {"SENT": 2, "COMMITTED": 5, "DELIVERED": 1}, 0).decode()
    assert "strnet_outbox_backlog 2.0" in text


def test_a_committed_study_lets_its_spool_files_go(db: Database) -> None:
    seed(db, [OutboxState.COMMITTED])
    with db.transaction() as s:
        s.execute(update(Job).values(state=JobState.DONE.value))
        s.execute(update(Instance).values(received_at=utcnow() - timedelta(days=30)))
    assert len(store.spool_removable(db, older_than_s=86400)) == 1
    with db.transaction() as s:
        s.execute(update(OutboxItem).values(state=OutboxState.SENT.value))
    assert store.spool_removable(db, older_than_s=86400) == []  # still waiting for its commitment


def test_at_start_up_a_sent_row_never_asked_is_sent_again_an_asked_one_waits(db: Database) -> None:
    never, asked = seed(db, [OutboxState.SENT, OutboxState.SENT])
    outbox.commitment_asked(db, [asked], "2.25.1")
    assert outbox.requeue_sending(db) == 1
    assert (row(db, never).state, row(db, asked).state) == ("PENDING", "SENT")


def test_a_report_commits_and_fails_by_transaction_uid_and_leaves_other_rows_alone(db: Database) -> None:
    ok, bad, other, late = seed(db, [OutboxState.SENT] * 4)
    outbox.commitment_asked(db, [ok, bad, late], "2.25.7")
    outbox.commitment_asked(db, [other], "2.25.8")
    with db.transaction() as s:  # timed out meanwhile
        s.execute(update(OutboxItem).where(OutboxItem.id == late).values(state=OutboxState.RETRY.value))
    uid = {i: row(db, i).sop_instance_uid for i in (ok, bad, other, late)}
    report = outbox.CommitmentReport(
        "2.25.7", (uid[ok], uid[other], uid[late]), ((uid[bad], "no_such_object_instance"),), "PACS"
    )
    out = outbox.record_commitment(db, report, POLICY)
    assert (out.destination, out.committed, out.retried, out.dead, out.unknown) == ("pacs", 1, 1, 0, 2)
    assert row(db, ok).state == "COMMITTED" and row(db, ok).delivered_at is not None
    failed = row(db, bad)
    assert failed.state == "RETRY" and failed.next_attempt_at is not None
    assert failed.last_error == "storage commitment failed: the PACS reported no_such_object_instance"
    assert (row(db, other).state, row(db, late).state) == ("SENT", "RETRY")
    unknown = outbox.record_commitment(db, outbox.CommitmentReport("2.25.9", (uid[other],), (), "PACS"), POLICY)
    assert unknown.destination is None and row(db, other).state == "SENT"


def test_timeouts_by_destination_and_rows_of_a_destination_that_no_longer_commits(db: Database) -> None:
    fresh, old, elsewhere = seed(db, [OutboxState.SENT] * 3)
    with db.transaction() as s:
        s.execute(update(OutboxItem).where(OutboxItem.id == elsewhere).values(destination="gone"))
    outbox.commitment_asked(db, [fresh, old, elsewhere], "2.25.1")
    with db.transaction() as s:
        s.execute(update(OutboxItem).where(OutboxItem.id == old)
                  .values(commitment_asked_at=utcnow() - timedelta(seconds=700), attempts=3))  # fmt: skip
    expired = outbox.expire_commitments(db, {"pacs": 600.0}, POLICY)
    assert sorted((e.id, e.state) for e in expired) == [(old, "DEAD"), (elsewhere, "RETRY")]
    assert row(db, old).last_error == "gave up after 3 attempts: storage commitment not confirmed within 600 s"
    assert row(db, fresh).state == "SENT"


# -- the reports as they come off the wire ----------------------------------------------------------
def test_a_report_is_read_with_its_failure_reasons_by_name() -> None:
    info = Dataset()
    info.TransactionUID = "2.25.5"
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID = bad.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ok.ReferencedSOPInstanceUID, bad.ReferencedSOPInstanceUID = "1.2.1", "1.2.2"
    bad.FailureReason = 0x0112
    info.ReferencedSOPSequence = [ok]
    info.FailedSOPSequence = [bad]
    report = commitment.parse_report(2, info, "PACS")
    assert report == outbox.CommitmentReport("2.25.5", ("1.2.1",), (("1.2.2", "no_such_object_instance"),), "PACS")
    with pytest.raises(ValueError, match="event type"):
        commitment.parse_report(3, info, "PACS")
    with pytest.raises(ValueError, match="Transaction UID"):
        commitment.parse_report(1, Dataset(), "PACS")


def test_the_request_names_each_object_under_one_transaction_uid() -> None:
    tx = commitment.new_transaction_uid()
    ds = commitment.request(tx, [("1.2.840.10008.5.1.4.1.1.7", "1.2.1"), ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.2")])
    assert ds.TransactionUID == tx and tx.startswith("2.25.") and len(tx) <= 64
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in ds.ReferencedSOPSequence] == [
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.1"), ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.2")
    ]
    assert commitment.new_transaction_uid() != tx


# -- strnet outbox list -----------------------------------------------------------------------------
def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(tmp_path, 'log_format = "json"\n'), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "agent", "outbox", "list", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_outbox_list_shows_every_delivery_as_json_and_as_a_table(db: Database, tmp_path: Path) -> None:
    committed, dead, sent = seed(db, [OutboxState.COMMITTED, OutboxState.DEAD, OutboxState.SENT])
    outbox.dead(db, dead, "processing_failure", "gave up after 8 attempts: stored, but the PACS refused")
    out = _cli(tmp_path, "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["id"] for r in rows] == [committed, dead, sent]
    for r in rows:
        for key in ("kind", "destination", "state", "attempts", "last_status", "last_error", "sop_instance_uid",
                    "created_at", "updated_at", "delivered_at"):  # fmt: skip
            assert key in r, key
    assert (rows[1]["kind"], rows[1]["destination"], rows[1]["state"], rows[1]["attempts"]) == ("sc", "pacs", "DEAD", 1)
    assert rows[1]["last_status"] == "processing_failure"  # what the receiver answered (docs/integration.md)
    assert rows[1]["last_error"] == "gave up after 8 attempts: stored, but the PACS refused"
    assert rows[0]["created_at"].endswith("Z")
    only = json.loads(_cli(tmp_path, "--format", "json", "--state", "sent").stdout)
    assert [r["id"] for r in only] == [sent]
    newest = json.loads(_cli(tmp_path, "--format", "json", "--limit", "2").stdout)
    assert [r["id"] for r in newest] == [dead, sent]
    table = _cli(tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:6] == ["ID", "KIND", "DESTINATION", "STATE", "TRIES", "UPDATED"]
    assert "DEAD" in lines[2] and "(gave up after 8 attempts" in lines[2]
    assert lines[-1] == "3 deliveries: 1 COMMITTED, 1 DEAD, 1 SENT"
    bad = _cli(tmp_path, "--state", "LOST")
    assert bad.returncode == 2 and "--state" in bad.stderr


# -- the answers to a report ------------------------------------------------------------------------
class _Event:
    """What a pynetdicom EVT_N_EVENT_REPORT event carries, for CommitmentRecorder.handle."""

    def __init__(self, event_type: int, info: Dataset, sop_class: str = commitment.STORAGE_COMMITMENT_PUSH_MODEL):
        self.event_type = event_type
        self.event_information = info
        self.request = type("Rq", (), {"AffectedSOPClassUID": sop_class})()
        user = type("User", (), {"ae_title": "PACS"})()
        self.assoc = type("Assoc", (), {"is_acceptor": True, "requestor": user, "acceptor": user})()


def _info(tx: str | None, *uids: str) -> Dataset:
    info = Dataset()
    if tx:
        info.TransactionUID = tx
    refs = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", uid
        refs.append(item)
    info.ReferencedSOPSequence = refs
    return info


def test_the_answers_to_a_report(db: Database) -> None:
    (item,) = seed(db, [OutboxState.SENT])
    outbox.commitment_asked(db, [item], "2.25.42")
    woken: list[bool] = []
    recorder = commitment.CommitmentRecorder(db, POLICY, on_outbox=lambda: woken.append(True))
    uid = row(db, item).sop_instance_uid
    with structlog.testing.capture_logs() as logs:
        assert recorder.handle(_Event(3, _info("2.25.42", uid))) == (0x0115, None)  # not a result
        assert recorder.handle(_Event(1, _info(None, uid))) == (0x0115, None)  # no Transaction UID
        assert recorder.handle(_Event(1, _info("2.25.43", uid))) == (0x0000, None)  # unknown: nothing to do
    assert row(db, item).state == "SENT"
    # the log events docs/operations.md names: two reports refused, then one of a transaction not ours
    assert [(e["event"], e["log_level"], e["reporter"]) for e in logs] == [
        ("commitment_report_refused", "warning", "PACS"),
        ("commitment_report_refused", "warning", "PACS"),
        ("commitment_report_unknown", "warning", "PACS"),
    ]
    assert logs[2]["transaction_uid"] == "2.25.43"

    class Broken:
        """A database that cannot be written."""

        def transaction(self) -> Any:
            from agent.errors import StorageError

            raise StorageError("database unavailable: disk I/O error")

    broken: Any = Broken()
    assert commitment.CommitmentRecorder(broken, POLICY).handle(_Event(1, _info("2.25.42", uid))) == (0x0110, None)
    failed = _info("2.25.42")
    bad = Dataset()
    bad.ReferencedSOPClassUID, bad.ReferencedSOPInstanceUID, bad.FailureReason = "1.2.3", uid, 0x0110
    failed.FailedSOPSequence = [bad]
    assert recorder.handle(_Event(2, failed)) == (0x0000, None)
    assert row(db, item).state == "RETRY" and woken == [True]  # the sender is woken to send it again


def test_a_report_counts_only_from_the_destination_that_was_asked(db: Database) -> None:
    """A Transaction UID is logged and listed: a report for it from another AE title (another
    allowed peer) must not mark the destination's results committed."""
    (item,) = seed(db, [OutboxState.SENT])
    outbox.commitment_asked(db, [item], "2.25.77")
    uid = row(db, item).sop_instance_uid
    recorder = commitment.CommitmentRecorder(db, POLICY, reporters={"pacs": "ORTHANC"})
    assert recorder.handle(_Event(1, _info("2.25.77", uid))) == (0x0000, None)  # from "PACS": ignored
    assert row(db, item).state == "SENT"
    from_orthanc = _Event(1, _info("2.25.77", uid))
    from_orthanc.assoc.requestor = type("User", (), {"ae_title": "ORTHANC"})()
    assert recorder.handle(from_orthanc) == (0x0000, None)
    assert row(db, item).state == "COMMITTED"


def _another_writer_before_the_first_update(db: Database, sql: str) -> list[str]:
    """Run ``sql`` on the transaction's connection just before its first UPDATE of the outbox: what
    another lane committing between this read and its update looks like (possible under
    PostgreSQL's read committed; SQLite's BEGIN IMMEDIATE serializes writers)."""
    from sqlalchemy import event

    done: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not done and statement.lstrip().upper().startswith("UPDATE OUTBOX"):
            done.append(statement)
            cursor.execute(sql)

    event.listen(db.engine, "before_cursor_execute", before)
    return done


@pytest.mark.parametrize("what", ["report", "timeout"])
def test_a_row_committed_or_sent_again_meanwhile_is_not_overwritten(db: Database, what: str) -> None:
    (item,) = seed(db, [OutboxState.SENT])
    outbox.commitment_asked(db, [item], "2.25.3")
    with db.transaction() as s:
        s.execute(update(OutboxItem).where(OutboxItem.id == item)
                  .values(commitment_asked_at=utcnow() - timedelta(seconds=700)))  # fmt: skip
    uid = row(db, item).sop_instance_uid
    # after the read: the row committed by an earlier report (timeout), or failed, sent again by another
    # lane and asked under a new transaction (report)
    sql = ("UPDATE outbox SET state = 'COMMITTED'" if what == "timeout"
           else "UPDATE outbox SET commitment_uid = '2.25.4'") + f" WHERE id = {item}"  # fmt: skip
    hooked = _another_writer_before_the_first_update(db, sql)
    if what == "report":
        out = outbox.record_commitment(db, outbox.CommitmentReport("2.25.3", (), ((uid, "processing_failure"),),
                                                                   "PACS"), POLICY)  # fmt: skip
        assert (out.retried, out.unknown) == (0, 1)
        assert (row(db, item).state, row(db, item).commitment_uid) == ("SENT", "2.25.4")
    else:
        assert outbox.expire_commitments(db, {"pacs": 600.0}, POLICY) == []
        assert row(db, item).state == "COMMITTED"
    assert hooked
