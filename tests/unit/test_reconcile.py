"""agent/ingest/reconcile.py: start-up recovery (docs/architecture.md, the durability contract).

``.part`` files are deleted (never acknowledged); a complete spool file without a row (a crash
between rename and commit) is adopted, its calling AE taken from the file meta; an unreadable one
goes to spool/quarantine/; RUNNING jobs go back to QUEUED. The crash itself, at each fail point,
is tests/reliability/test_failpoints.py's; this holds each step by itself."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from conftest import agent_settings
from dicom_factory import knee_dx
from sqlalchemy import select

from agent.app import make_rules
from agent.db.engine import open_database
from agent.db.models import Instance
from agent.domain import JobState
from agent.ingest.handlers import Ingestor, StoreRequest, file_head
from agent.ingest.reconcile import ReconcileReport, reconcile, split_file
from agent.queue import store
from agent.spool import Spool


def _raw(ds: object) -> bytes:
    """The dataset bytes as a sender puts them on the wire (no file meta)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return split_file(buf.getvalue())[1]


def test_start_up_deletes_partials_adopts_orphans_quarantines_the_unreadable_and_requeues(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path / "agent")
    db = open_database(settings)
    spool = Spool(settings.spool_dir)
    ingestor = Ingestor(db, spool, make_rules(settings), 64 * 1024 * 1024)
    # a job a worker had leased when the service died
    leased = knee_dx(rows=64, cols=64, seed=1)
    status, _ = ingestor.store(StoreRequest(str(leased.SOPClassUID), str(leased.SOPInstanceUID),
                                            leased.file_meta.TransferSyntaxUID, _raw(leased), leased, "TESTSCU",
                                            "127.0.0.1"))  # fmt: skip
    assert status == 0
    [job] = store.lease(db, "gone-worker", 1, 600)
    # a file renamed into place whose commit never came: our file meta names who sent it
    orphan = knee_dx(rows=64, cols=64, seed=2)
    head = file_head(str(orphan.SOPClassUID), str(orphan.SOPInstanceUID), str(orphan.file_meta.TransferSyntaxUID),
                     "MODALITY7")  # fmt: skip
    orphan_rel = spool.write([head, _raw(orphan)])
    unreadable = spool.write([b"\x00" * 132, b"not a dataset"])
    partial = spool.tmp_dir / "broken-off.part"
    partial.write_bytes(b"half an instance")

    report = reconcile(db, spool, ingestor)

    assert report == ReconcileReport(partials_removed=1, adopted=1, quarantined=1, requeued=1)
    assert not partial.exists()
    assert (settings.spool_dir / "quarantine" / Path(unreadable).name).is_file()
    assert not (settings.spool_dir / unreadable).exists()
    with db.reading() as s:
        adopted = s.execute(select(Instance).where(Instance.sop_instance_uid == orphan.SOPInstanceUID)).scalar_one()
    assert (adopted.spool_path, adopted.calling_ae) == (orphan_rel, "MODALITY7")
    states = {j.job_id: j.state for j in store.list_jobs(db)}
    assert states[job.job_id] == JobState.QUEUED  # its worker is gone: screened again
    assert sorted(states.values()) == [JobState.QUEUED, JobState.QUEUED]  # the adopted one is queued too
    # a second start finds nothing left to do
    assert reconcile(db, spool, ingestor) == ReconcileReport(0, 0, 0, 0)
    db.dispose()
