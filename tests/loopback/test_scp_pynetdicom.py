"""The SCP on real loopback sockets with a pynetdicom SCU as the peer."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_AET, TEST_SCU_AET
from dicom_factory import DX_PRESENTATION, knee_dx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from agent.app import Agent
from agent.db.models import Instance
from agent.domain import JobState
from agent.ingest.eligibility import BODY_PART_REASON
from agent.pacs import status
from agent.pacs.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from agent.queue.store import list_jobs


def associate(agent: Agent, calling: str = TEST_SCU_AET, called: str = AGENT_AET) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 5
    ae.dimse_timeout = 10
    ae.add_requested_context(DX_PRESENTATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT: not supported by the agent
    return ae.associate("127.0.0.1", agent.scp.port, ae_title=called)


@pytest.fixture()
def assoc(agent: Agent) -> Iterator[Association]:
    a = associate(agent)
    assert a.is_established
    yield a
    if a.is_established:
        a.release()


def send(assoc: Association, ds: Dataset) -> int:
    rsp = assoc.send_c_store(ds)
    assert rsp is not None and "Status" in rsp, "no response"
    return int(rsp.Status)


def spool_files(agent: Agent) -> list[Path]:
    return [p for p in agent.spool.root.rglob("*") if p.is_file()]


def instances(agent: Agent) -> list[Instance]:
    with agent.db.reading() as s:
        return list(s.execute(select(Instance).order_by(Instance.id)).scalars())


def test_valid_instance_becomes_one_queued_job_with_the_same_dataset(agent: Agent, assoc: Association) -> None:
    ds = knee_dx()
    assert send(assoc, ds) == status.SUCCESS
    jobs = list_jobs(agent.db)
    assert [(j.state, j.sop_instance_uid) for j in jobs] == [(JobState.QUEUED, ds.SOPInstanceUID)]
    stored = dcmread(agent.spool.path(instances(agent)[0].spool_path))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    assert stored.PatientName == ds.PatientName
    assert stored.preamble == b"\x00" * 128
    assert stored.file_meta.SourceApplicationEntityTitle == TEST_SCU_AET
    # the agent's own file meta (conformance statement 2.1), not the sender's
    assert stored.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert stored.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME


def test_duplicate_gives_one_job_and_conflict_keeps_both(agent: Agent, assoc: Association) -> None:
    ds = knee_dx()
    assert send(assoc, ds) == status.SUCCESS
    assert send(assoc, ds) == status.SUCCESS
    assert len(list_jobs(agent.db)) == 1
    other = knee_dx(sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID, seed=9)
    assert send(assoc, other) == status.SUCCESS
    jobs = list_jobs(agent.db)
    assert len(jobs) == 2 and jobs[1].state == JobState.SKIPPED and "conflict" in (jobs[1].reason or "")
    rows = instances(agent)
    assert rows[1].conflict_of_id == rows[0].id
    # both files kept, different bytes
    a, b = (agent.spool.path(r.spool_path).read_bytes() for r in rows)
    assert a != b


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3/../../../evil"),
            status.CANNOT_UNDERSTAND,
            id="traversal-uid",
        ),
        pytest.param(
            lambda ds: setattr(ds, "SOPInstanceUID", "1." + "9" * 70), status.CANNOT_UNDERSTAND, id="uid-over-64"
        ),
        pytest.param(
            lambda ds: setattr(ds, "StudyInstanceUID", "1.2;$(reboot)"),
            status.CANNOT_UNDERSTAND,
            id="shell-in-study-uid",
        ),
        pytest.param(
            lambda ds: setattr(ds, "PixelData", ds.PixelData[:5000]), status.CANNOT_UNDERSTAND, id="truncated-pixels"
        ),
        pytest.param(
            lambda ds: delattr(ds, "SeriesInstanceUID"),
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            id="missing-series-uid",
        ),
    ],
)
def test_bad_instances_get_a_failure_and_a_good_one_after_is_stored(
    agent: Agent, assoc: Association, mutate: Any, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # play a non-conforming peer: pynetdicom's SCU would refuse to send such UIDs itself
    import pynetdicom._config as pconf

    monkeypatch.setitem(pconf.VALIDATORS, "UI", lambda value: (True, ""))
    bad = knee_dx()
    mutate(bad)
    assert send(assoc, bad) == expected
    assert list_jobs(agent.db) == []
    assert [p for p in spool_files(agent)] == []  # nothing landed anywhere in the spool
    good = knee_dx()
    assert send(assoc, good) == status.SUCCESS
    assert len(list_jobs(agent.db)) == 1


def test_command_and_dataset_uids_disagree(agent: Agent, assoc: Association, monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom's SCU takes the command's Affected SOP Instance UID from the dataset, so change
    # the dataset after the command is built: encode one instance under another's command.
    import pynetdicom.association as pa

    ds = knee_dx()
    real = pa.encode

    def lying_encode(dataset: Dataset, *args: Any, **kw: Any) -> Any:
        twin = copy.deepcopy(dataset)
        twin.SOPInstanceUID = "1.2.3.4.5.6.7"
        return real(twin, *args, **kw)

    monkeypatch.setattr(pa, "encode", lying_encode)
    assert send(assoc, ds) == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert list_jobs(agent.db) == []


def test_truncated_stream_is_refused(agent: Agent, assoc: Association, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom.association as pa

    real = pa.encode

    def truncating_encode(dataset: Dataset, *args: Any, **kw: Any) -> Any:
        return real(dataset, *args, **kw)[:-70_000]  # cut inside the pixel data element

    monkeypatch.setattr(pa, "encode", truncating_encode)
    assert send(assoc, knee_dx()) in (status.CANNOT_UNDERSTAND,)
    monkeypatch.setattr(pa, "encode", real)
    assert send(assoc, knee_dx()) == status.SUCCESS
    assert len(list_jobs(agent.db)) == 1


def test_unknown_calling_ae_wrong_called_ae_and_wrong_host_are_refused(make_agent: Any) -> None:
    agent = make_agent(scp={"peers": [{"ae_title": TEST_SCU_AET, "host": "127.0.0.2"}]})
    for calling, called in ((TEST_SCU_AET, AGENT_AET), ("INTRUDER", AGENT_AET), ("ORTHANC", "NOT_ME")):
        a = associate(agent, calling, called)
        assert a.is_rejected, (calling, called)
    assert list_jobs(agent.db) == []


def test_a_peer_named_by_host_name_is_accepted_from_its_address(make_agent: Any) -> None:
    # as in deploy/compose.agent.toml (host = "orthanc"): the name is resolved, not compared as text
    agent = make_agent(scp={"peers": [{"ae_title": TEST_SCU_AET, "host": "localhost"}]})
    a = associate(agent)
    assert a.is_established
    assert send(a, knee_dx()) == status.SUCCESS
    a.release()
    assert associate(agent, "INTRUDER").is_rejected


def test_the_agent_names_itself_and_verification_takes_little_endian_only(agent: Agent) -> None:
    """Conformance statement 2.1 and 2.3, as a peer sees them in negotiation."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=TEST_SCU_AET)
    for ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        ae.add_requested_context(Verification, ts)
    a = ae.associate("127.0.0.1", agent.scp.port, ae_title=AGENT_AET)
    try:
        assert a.is_established
        assert a.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert a.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        assert a.acceptor.maximum_length == 0  # maximum PDU size received: unlimited
        assert {cx.transfer_syntax[0] for cx in a.accepted_contexts} == {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
    finally:
        a.release()


def test_unsupported_sop_class_is_refused_in_negotiation(agent: Agent, assoc: Association) -> None:
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert "1.2.840.10008.5.1.4.1.1.2" not in accepted
    ct = knee_dx()
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(ValueError):  # no accepted context: nothing can even be sent
        assoc.send_c_store(ct)


def test_free_disk_watermark_refuses_with_out_of_resources(make_agent: Any) -> None:
    free_mb = shutil.disk_usage("/tmp").free // (1024 * 1024)
    agent = make_agent(agent={"min_free_disk_mb": free_mb + 10_000})
    a = associate(agent)
    try:
        assert send(a, knee_dx()) == status.OUT_OF_RESOURCES
    finally:
        a.release()
    assert list_jobs(agent.db) == []
    assert spool_files(agent) == []


def test_oversized_instance_is_refused(make_agent: Any) -> None:
    agent = make_agent(scp={"max_instance_mb": 1})
    a = associate(agent)
    try:
        assert send(a, knee_dx(rows=1024, cols=1024)) == status.OUT_OF_RESOURCES  # 2 MB
        assert send(a, knee_dx()) == status.SUCCESS
    finally:
        a.release()
    assert len(list_jobs(agent.db)) == 1


def test_ineligible_instance_is_accepted_and_skipped(agent: Agent, assoc: Association) -> None:
    assert send(assoc, knee_dx(body_part="CHEST")) == status.SUCCESS
    job = list_jobs(agent.db)[0]
    assert job.state == JobState.SKIPPED and BODY_PART_REASON in (job.reason or "")


def test_orphan_spool_file_is_adopted_at_restart(make_agent: Any, tmp_path: Path) -> None:
    agent = make_agent()
    a = associate(agent)
    ds = knee_dx()
    assert send(a, ds) == status.SUCCESS
    a.release()
    agent.stop(grace_s=1)
    # simulate a crash between the spool rename and the job commit: file present, rows gone
    src = agent.spool.path(instances(agent)[0].spool_path)
    orphan = src.with_name("0" * 32 + ".dcm")
    shutil.copy(src, orphan)
    (agent.spool.root / "tmp" / "half.dcm.part").write_bytes(b"partial")
    from agent.app import Agent as AgentCls

    again = AgentCls.build(agent.settings)
    from sqlalchemy import delete

    from agent.db.models import Job

    with again.db.transaction() as s:  # forget everything: the spool must be enough
        s.execute(delete(Job))
        s.execute(delete(Instance))
    src.unlink()
    again.start()
    try:
        jobs = list_jobs(again.db)
        assert [(j.sop_instance_uid, j.state, j.calling_ae) for j in jobs] == [
            (ds.SOPInstanceUID, JobState.QUEUED, TEST_SCU_AET)
        ]
        assert not (again.spool.root / "tmp" / "half.dcm.part").exists()
    finally:
        again.stop(grace_s=1)


def test_instance_is_received_into_the_spool_not_rewritten(
    agent: Agent, assoc: Association, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunked receive: the fragments land in spool/tmp while they arrive and the handler keeps
    # that file (fsync, rename); the in-memory path's Spool.write is never needed.
    def no_rewrite(*_args: Any, **_kwargs: Any) -> str:
        raise AssertionError("the received file should have been kept, not written again")

    monkeypatch.setattr(agent.spool, "write", no_rewrite)
    ds = knee_dx()
    assert send(assoc, ds) == status.SUCCESS
    (stored,) = spool_files(agent)
    assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    assert not list(agent.spool.tmp_dir.iterdir())
