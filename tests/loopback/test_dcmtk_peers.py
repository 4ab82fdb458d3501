"""DCMTK as the real peer: echoscu, storescu and dcmsend against the agent on loopback.

DX and CR instances in explicit VR, implicit VR, JPEG lossless SV1, JPEG 2000 lossless, JPEG-LS
lossless and RLE (and a MONOCHROME1 CR) each become exactly one QUEUED job whose spool file holds
the same dataset, in the transfer syntax it was sent in (compressed instances arrive as stored).
Unknown calling AE titles, a wrong called AE title and unsupported SOP classes are refused at
association and leave no job.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import dicom_factory as factory
import numpy as np
import pydicom
import pytest
from conftest import AGENT_AET, TEST_SCU_AET, agent_settings, require_tool
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from agent.app import Agent
from agent.db.models import Instance
from agent.domain import JobState
from agent.queue.store import list_jobs

SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg-lossless-sv1": JPEGLosslessSV1,
    "j2k-lossless": JPEG2000Lossless,
    "jpeg-ls-lossless": JPEGLSLossless,
    "rle": RLELossless,
}
# storescu proposes only uncompressed syntaxes unless told which compressed one to add
STORESCU_FLAGS = {
    "explicit": [],
    "implicit": [],
    "jpeg-lossless-sv1": ["-xs"],
    "j2k-lossless": ["-xv"],
    "jpeg-ls-lossless": ["-xt"],
    "rle": ["-xr"],
}

CASES = [
    (kind, syntax, tool)
    for kind in ("DX", "CR")
    for syntax in SYNTAXES
    for tool in ("storescu", "dcmsend")
] + [
    ("CR-MONOCHROME1", "explicit", "storescu"),
    ("CR-MONOCHROME1", "j2k-lossless", "dcmsend"),
    ("CR-MONOCHROME1", "jpeg-lossless-sv1", "dcmsend"),
]


def make_instance(kind: str, syntax: str, folder: Path) -> tuple[Dataset, Path]:
    """The source dataset (uncompressed) and the file to send in ``syntax``."""
    modality = "DX" if kind == "DX" else "CR"
    source = factory.knee_dx(
        modality=modality,
        monochrome1=kind.endswith("MONOCHROME1"),
        implicit=syntax == "implicit",
        rows=160,
        cols=128,
        seed=len(kind) + len(syntax),
    )
    plain = factory.write(source, folder / "source.dcm")
    if syntax in ("explicit", "implicit"):
        return source, plain
    if syntax == "jpeg-lossless-sv1":
        return source, factory.jpeg_lossless_file(plain, folder / "sent.dcm")
    short = {"j2k-lossless": "j2k", "jpeg-ls-lossless": "jls", "rle": "rle"}[syntax]
    return source, factory.write(factory.compressed(source, short), folder / "sent.dcm")


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def send(tool: str, agent: Agent, path: Path, flags: list[str] | None = None,
         calling: str = TEST_SCU_AET) -> subprocess.CompletedProcess[str]:
    exe = require_tool(tool)
    return run([exe, "-v", *(flags or []), "-aet", calling, "-aec", AGENT_AET,
                "127.0.0.1", str(agent.scp.port), str(path)])


def instance_rows(agent: Agent) -> list[Instance]:
    with agent.db.reading() as s:
        rows = list(s.execute(select(Instance).order_by(Instance.id)).scalars())
        for row in rows:
            s.expunge(row)
    return rows


def spool_files(agent: Agent) -> list[Path]:
    return [p for p in agent.spool.root.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent for the store matrix (each case checks its own instance and the count delta)."""
    agent = Agent.build(agent_settings(tmp_path_factory.mktemp("dcmtk-agent")))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop(grace_s=1)


@pytest.mark.parametrize(("kind", "syntax", "tool"), CASES, ids=["-".join(c) for c in CASES])
def test_dcmtk_store_becomes_one_queued_job(
    shared_agent: Agent, tmp_path: Path, kind: str, syntax: str, tool: str
) -> None:
    agent = shared_agent
    jobs_before = {j.job_id for j in list_jobs(agent.db)}
    files_before = set(spool_files(agent))
    source, path = make_instance(kind, syntax, tmp_path)
    sent = pydicom.dcmread(path)
    assert sent.file_meta.TransferSyntaxUID == SYNTAXES[syntax]  # the factory made what we meant
    # pydicom 3's compress() gives the compressed copy a new SOP Instance UID: identity is `sent`

    # dcmsend offers an uncompressed file with all uncompressed syntaxes in one context and the
    # agent picks explicit VR: dcmsend then sends an implicit VR file in explicit VR (lossless).
    # Every other combination goes on the wire in the file's own syntax.
    wire = ExplicitVRLittleEndian if (tool, syntax) == ("dcmsend", "implicit") else SYNTAXES[syntax]
    out = send(tool, agent, path, STORESCU_FLAGS[syntax] if tool == "storescu" else [])
    assert out.returncode == 0, out.stdout + out.stderr
    if tool == "dcmsend":  # dcmsend reports per-file results in its summary, not its exit code
        assert "with status SUCCESS  : 1" in out.stdout + out.stderr, out.stdout + out.stderr

    jobs = [j for j in list_jobs(agent.db) if j.job_id not in jobs_before]
    assert len(jobs) == 1, [(j.sop_instance_uid, j.state, j.reason) for j in jobs]
    job = jobs[0]
    assert job.state == JobState.QUEUED, job.reason
    assert job.sop_instance_uid == str(sent.SOPInstanceUID)
    assert job.study_instance_uid == str(sent.StudyInstanceUID)
    assert job.calling_ae == TEST_SCU_AET

    (row,) = [r for r in instance_rows(agent) if r.sop_instance_uid == job.sop_instance_uid]
    assert row.transfer_syntax_uid == wire  # recorded as sent, not transcoded by the agent
    assert row.sop_class_uid == source.SOPClassUID
    kept = pydicom.dcmread(agent.spool.path(row.spool_path))
    assert kept.file_meta.TransferSyntaxUID == wire
    assert kept.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert kept.SOPInstanceUID == sent.SOPInstanceUID
    assert kept.SOPClassUID == source.SOPClassUID
    assert kept.PhotometricInterpretation == source.PhotometricInterpretation
    assert kept.Modality == source.Modality
    if SYNTAXES[syntax].is_encapsulated:
        assert kept.PixelData == sent.PixelData  # the compressed stream byte for byte
    decoded = kept.pixel_array
    assert decoded.shape == (source.Rows, source.Columns)
    np.testing.assert_array_equal(decoded, source.pixel_array)
    assert set(spool_files(agent)) - files_before == {agent.spool.path(row.spool_path)}


@pytest.mark.parametrize(
    ("calling", "called", "accepted"),
    [
        (TEST_SCU_AET, AGENT_AET, True),  # the control: a known peer calling the right title
        ("NOBODY", AGENT_AET, False),  # unknown calling AE title
        (TEST_SCU_AET, "WRONG_AET", False),  # wrong called AE title
    ],
    ids=["known-peer", "unknown-calling-ae", "wrong-called-ae"],
)
def test_echoscu_association_checks(
    agent: Agent, calling: str, called: str, accepted: bool
) -> None:
    echoscu = require_tool("echoscu")
    out = run([echoscu, "-aet", calling, "-aec", called, "127.0.0.1", str(agent.scp.port)])
    assert (out.returncode == 0) is accepted, out.stdout + out.stderr
    if not accepted:
        assert "Association Rejected" in out.stdout + out.stderr


def test_unknown_calling_ae_cannot_store(agent: Agent, tmp_path: Path) -> None:
    path = factory.write(factory.knee_dx(), tmp_path / "dx.dcm")
    refused = send("storescu", agent, path, calling="NOBODY")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert list_jobs(agent.db) == [] and spool_files(agent) == []
    # the same file from the known peer is stored: the refusal was about the title only
    assert send("storescu", agent, path).returncode == 0
    assert len(list_jobs(agent.db)) == 1


@pytest.mark.parametrize(
    ("sop_class", "tool"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "storescu"),  # CT Image Storage
        ("1.2.840.10008.5.1.4.1.1.2", "dcmsend"),
        ("1.2.840.10008.5.1.4.1.1.4", "storescu"),  # MR Image Storage
    ],
    ids=["ct-storescu", "ct-dcmsend", "mr-storescu"],
)
def test_unsupported_sop_class_is_refused(
    agent: Agent, tmp_path: Path, sop_class: str, tool: str
) -> None:
    ds = factory.knee_dx()
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    path = factory.write(ds, tmp_path / "unsupported.dcm")
    out = send(tool, agent, path)
    text = out.stdout + out.stderr
    if tool == "storescu":
        assert out.returncode != 0, text
        assert "No presentation context for" in text, text
    else:  # dcmsend finds no acceptable presentation context and sends nothing
        assert "No Acceptable Presentation Contexts" in text, text
        assert "with status SUCCESS" not in text, text
    assert list_jobs(agent.db) == []
    assert instance_rows(agent) == []
    assert spool_files(agent) == []
    # a supported instance right after is stored
    good = factory.write(factory.knee_dx(), tmp_path / "good.dcm")
    assert send("storescu", agent, good).returncode == 0
    assert len(list_jobs(agent.db)) == 1


def test_our_own_result_classes_are_kept_and_skipped(agent: Agent, tmp_path: Path) -> None:
    """A PACS forwarding a whole study sends our SR/overlays back: kept, SKIPPED, never refused."""
    ds = factory.knee_dx()
    ds.SOPClassUID = factory.SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPClassUID = factory.SECONDARY_CAPTURE
    ds.Modality = "OT"
    path = factory.write(ds, tmp_path / "sc.dcm")
    out = send("storescu", agent, path)
    assert out.returncode == 0, out.stdout + out.stderr
    (job,) = list_jobs(agent.db)
    assert job.state.value == "SKIPPED" and "not screened" in (job.reason or "")
