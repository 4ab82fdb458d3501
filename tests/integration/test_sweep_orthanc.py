"""Issue 22 acceptance: screen the archive by query/retrieve, against a real Orthanc.

Orthanc is the archive: 6 knee studies in range (JPEG 2000, JPEG lossless, uncompressed), one
knee study outside the range, 2 chest studies, and an SR and an overlay of the agent's own in
one knee study. The agent is declared in Orthanc's DicomModalities with C-FIND, C-MOVE and C-GET
allowed. `strnet sweep` runs as the admin runs it (a subprocess sharing the agent's database).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import dicom_factory as factory
import pytest
from conftest import AGENT_AET, free_port, require_tool
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, generate_uid
from serve_process import ServeProcess, serve_doc, write_doc
from sqlalchemy import func, select

from agent.app import Agent
from agent.config import load_settings
from agent.db.engine import Database, open_database
from agent.db.models import AuditEvent, Instance, Job, Study, StudyReport, SweepStudy
from agent.demo.orthanc import LocalOrthanc
from agent.ingest.eligibility import Rules
from agent.ingest.sweep import Sweeper, archive_for
from agent.queue.sweeps import SWEEP_PRIORITY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STRNET = str(Path(sys.executable).with_name("strnet"))
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = factory.SECONDARY_CAPTURE
DAYS = ("20260302", "20260303", "20260304")


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what}: not met within {timeout_s:.0f} s")


def _own_result(study: Dataset, sop_class: str, modality: str, series_number: int) -> Dataset:
    """An SR or overlay as the agent writes them (series 9901/9902, "STR-Net" description)."""
    ds = Dataset()
    for key in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "AccessionNumber", "StudyID"):
        setattr(ds, key, study.get(key))
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), series_number, 1
    ds.Modality = modality
    ds.SeriesDescription = "STR-Net bone-loss screening (research, NOT FOR DIAGNOSTIC USE)"
    if sop_class == SC_CLASS:  # an overlay: it even says KNEE, and must still never be retrieved
        ds.BodyPartExamined = "KNEE"
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = bytes(64 * 64)
    else:
        ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def build_archive(folder: Path) -> tuple[list[str], list[str], str, list[Path]]:
    """(knee study UIDs in range, chest study UIDs, knee study UID out of range, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    knees: list[str] = []
    for n in range(6):
        study = generate_uid()
        knees.append(study)
        for side in ("L", "R"):  # two series of one image each
            ds = factory.knee_dx(study_uid=study, laterality=side, rows=96, cols=80, seed=n * 2 + (side == "R"),
                                 modality="CR" if n % 2 else "DX", patient_id=f"{factory.PHI_ID}{n}")  # fmt: skip
            ds.StudyDate = DAYS[n // 2]
            ds.SeriesNumber = 1 if side == "L" else 2
            path = folder / f"knee{n}{side}.dcm"
            if n in (0, 1):
                factory.write(factory.compressed(ds, "j2k"), path)
            elif n in (2, 3):
                factory.jpeg_lossless_file(factory.write(ds, folder / f"raw{n}{side}.dcm"), path)
            else:
                factory.write(ds, path)
            files.append(path)
        if n == 0:
            files.append(factory.write(_own_result(ds, SR_CLASS, "SR", 9901), folder / "own_sr.dcm"))
            files.append(factory.write(_own_result(ds, SC_CLASS, "OT", 9902), folder / "own_sc.dcm"))
    chests = []
    for n in range(2):
        ds = factory.knee_dx(body_part="CHEST", rows=96, cols=80, seed=50 + n)
        ds.StudyDate = DAYS[n]
        chests.append(str(ds.StudyInstanceUID))
        files.append(factory.write(ds, folder / f"chest{n}.dcm"))
    outside = factory.knee_dx(rows=96, cols=80, seed=70)
    outside.StudyDate = "20260201"
    files.append(factory.write(outside, folder / "outside.dcm"))
    return knees, chests, str(outside.StudyInstanceUID), files


def start_archive(agent_port: int, tmp_path: Path) -> LocalOrthanc:
    require_tool("Orthanc")
    require_tool("dcmcjpeg")
    agent = {"AET": AGENT_AET, "Host": "127.0.0.1", "Port": agent_port, "AllowEcho": True, "AllowFind": True,
             "AllowMove": True, "AllowGet": True, "AllowStore": True}  # fmt: skip
    return LocalOrthanc("ORTHANC", extra_config={"DicomModalities": {"agent": agent}},
                        work_dir=tmp_path / "orthanc").start()  # fmt: skip


def write_config(path: Path, data_dir: Path, agent_port: int, pacs: LocalOrthanc, weights: Path,
                 sweep: dict[str, Any] | None = None) -> Path:  # fmt: skip
    doc = serve_doc(data_dir, agent_port, peers=("ORTHANC",), weights=weights, device="cpu", pacs_port=pacs.dicom_port)
    doc["worker"].update(process=False, max_wait_ms=20)
    doc["reporting"] = {"quiet_period_s": 1.0, "build_processes": 0}
    doc["sender"] = {"poll_s": 0.2, "backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 5, "max_attempts": 50}
    doc["web"], doc["backup"] = {"enabled": False}, {"enabled": False}
    doc["pacs"][0].update(name="archive", query=True)
    doc["sweep"] = {"timeout_s": 20, **(sweep or {})}
    return write_doc(path, doc)


def run_sweep(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STRNET, "sweep", "--config", str(config), "--from", "2026-03-02", "--to", "2026-03-04",
                           *args], capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})},
                          check=False)  # fmt: skip


def sr_counts(pacs: LocalOrthanc, studies: list[str]) -> list[int]:
    """SRs per study in Orthanc, besides the agent's own SR preloaded in the first study."""
    return [sum(1 for i in pacs.instances_of_study(s) if i["SOPClassUID"] == SR_CLASS) - (n == 0)
            for n, s in enumerate(studies)]  # fmt: skip


def audit_codes(db: Database) -> Counter[str]:
    with db.reading() as s:
        return Counter(s.execute(select(AuditEvent.event_code)).scalars())


def received_studies(db: Database) -> set[str]:
    with db.reading() as s:
        return set(s.execute(select(Study.study_instance_uid).join(Instance, Instance.study_id == Study.id)).scalars())


@pytest.fixture()
def archive(tmp_path: Path) -> Iterator[tuple[LocalOrthanc, int, list[str], list[str], str]]:
    agent_port = free_port()
    pacs = start_archive(agent_port, tmp_path)
    knees, chests, outside, files = build_archive(tmp_path / "files")
    for f in files:
        pacs.upload(f)
    try:
        yield pacs, agent_port, knees, chests, outside
    finally:
        pacs.stop()


def test_sweep_screens_the_knee_studies_of_the_range_once(
    archive: tuple[LocalOrthanc, int, list[str], list[str], str], tiny_weights: Path, tmp_path: Path
) -> None:
    pacs, agent_port, knees, chests, outside = archive
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", agent_port, pacs, tiny_weights)
    agent = Agent.build(load_settings(config, search_default=False))
    agent.start()
    try:
        # dry run: what it would retrieve, PHI-free; nothing retrieved
        dry = run_sweep(config, "--dry-run")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        for uid in knees:
            assert uid in dry.stdout
        for uid in (*chests, outside):
            assert uid not in dry.stdout
        assert "would retrieve 6 (12 instances)" in dry.stdout, dry.stdout
        assert "2026-03-02" in dry.stdout
        assert factory.PHI_ID not in dry.stdout and "Zyxwvut" not in dry.stdout
        assert received_studies(agent.db) == set()
        with agent.db.reading() as s:
            assert s.execute(select(func.count()).select_from(SweepStudy)).scalar() == 0
        assert audit_codes(agent.db)["110112"] == 3 * 2 + 8  # a STUDY query per day and modality, a SERIES per study
        assert audit_codes(agent.db)["110102"] == 0

        # the sweep: knee series only, screened like live ones, one SR each back in the archive
        run = run_sweep(config)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "6 retrieved" in run.stdout, run.stdout
        assert factory.PHI_ID not in run.stdout + run.stderr and "Zyxwvut" not in run.stdout + run.stderr
        wait_for(lambda: sr_counts(pacs, knees) == [1] * 6, 120, "one SR per knee study in Orthanc")
        assert received_studies(agent.db) == set(knees)  # no chest study, nothing out of range
        with agent.db.reading() as s:
            classes = set(s.execute(select(Instance.sop_class_uid)).scalars())
            syntaxes = set(s.execute(select(Instance.transfer_syntax_uid)).scalars())
            priorities = set(s.execute(select(Job.priority)).scalars())
            instances = s.execute(select(func.count()).select_from(Instance)).scalar()
        assert classes <= {factory.DX_PRESENTATION, factory.CR}, classes  # never our own SR or overlay
        assert {JPEG2000Lossless, JPEGLosslessSV1, ExplicitVRLittleEndian} <= syntaxes  # received as stored
        assert priorities == {SWEEP_PRIORITY} and instances == 12
        assert audit_codes(agent.db)["110102"] == 6  # Begin Transferring DICOM Instances, one per study

        # a second sweep retrieves nothing
        again = run_sweep(config)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "0 retrieved, 6 already screened" in again.stdout, again.stdout
        assert audit_codes(agent.db)["110102"] == 6
        with agent.db.reading() as s:
            assert s.execute(select(func.count()).select_from(Instance)).scalar() == 12
    finally:
        agent.stop(grace_s=1)


def test_sweep_by_c_get_stores_through_the_ingest_path(
    archive: tuple[LocalOrthanc, int, list[str], list[str], str], tmp_path: Path, tiny_weights: Path
) -> None:
    pacs, agent_port, knees, _chests, _outside = archive
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", agent_port, pacs, tiny_weights,
                          sweep={"retrieve": "get"})  # fmt: skip
    settings = load_settings(config, search_default=False)
    # as in `strnet serve`: the listener runs in the same process (its receive-into-file mode is
    # process-wide), the Orthanc modality points nowhere the agent listens, so only C-GET brings them
    pacs.add_modality("agent", AGENT_AET, "127.0.0.1", free_port())
    agent = Agent.build(settings, worker=False)
    agent.start()
    try:
        sweeper = Sweeper(settings, agent.db, Rules.from_section(settings.eligibility), archive_for(settings),
                          agent.ingestor)  # fmt: skip
        report = sweeper.sweep(settings.pacs[0], date(2026, 3, 2), date(2026, 3, 4))
        assert report.finished and report.retrieved == 6 and not report.failed, report
        assert received_studies(agent.db) == set(knees)
        with agent.db.reading() as s:
            syntaxes = Counter(s.execute(select(Instance.transfer_syntax_uid)).scalars())
            priorities = set(s.execute(select(Job.priority)).scalars())
        assert syntaxes == Counter({JPEG2000Lossless: 4, JPEGLosslessSV1: 4, ExplicitVRLittleEndian: 4}), syntaxes
        assert priorities == {SWEEP_PRIORITY}
    finally:
        agent.stop(grace_s=1)


def test_sweep_resumes_after_sigkill_of_the_sweep_and_of_serve(
    archive: tuple[LocalOrthanc, int, list[str], list[str], str], tiny_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    pacs, agent_port, knees, chests, _outside = archive
    config = write_config(tmp_path / "agent.toml", tmp_path / "data", agent_port, pacs, tiny_weights)
    logs = tmp_path / "serve.log"
    serve = ServeProcess(config, logs).start(timeout_s=90)
    try:
        # the sweep killed right after its second study arrived, before it was marked done
        killed = run_sweep(config, env={"STRNET_FAILPOINT": "mid_sweep:2"})
        assert killed.returncode == -9, killed.stdout + killed.stderr
        # serve killed mid-retrieve: dies after committing the 3rd instance it receives
        serve.kill()
        monkeypatch.setenv("STRNET_FAILPOINT", "after_commit:3")
        serve = ServeProcess(config, logs).start(timeout_s=90)
        failed = run_sweep(config)
        wait_for(lambda: serve.proc is not None and serve.proc.poll() is not None, 30, "serve killed")
        assert failed.returncode == 1 and "failed:" in failed.stdout, failed.stdout + failed.stderr
        monkeypatch.delenv("STRNET_FAILPOINT")
        serve = ServeProcess(config, logs).start(timeout_s=90)
        done = run_sweep(config)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: sr_counts(pacs, knees) == [1] * 6, 120, "one SR per knee study in Orthanc")
        time.sleep(3)  # quiet period and a report sweep: no second SR follows
        assert sr_counts(pacs, knees) == [1] * 6
        db = open_database(load_settings(config, search_default=False))
        with db.reading() as s:
            reports = Counter(s.execute(select(Study.study_instance_uid).join(StudyReport)).scalars())
            states = set(s.execute(select(SweepStudy.state)).scalars())
        assert reports == Counter(dict.fromkeys(knees, 1)), reports
        assert states == {"done"}
        assert received_studies(db) == set(knees)
        assert not set(chests) & received_studies(db)
        db.dispose()
    finally:
        serve.close()


def test_c_get_keeps_the_listeners_pdu_size_guard(tmp_path: Path, tiny_weights: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """An instance larger than the listener lets pynetdicom buffer ((2 x scp.max_instance_mb + 1)
    MiB) is cut off at the C-GET association's socket, as on the listener's, not held in memory."""
    agent_port = free_port()
    pacs = start_archive(agent_port, tmp_path)
    try:
        # the small study first (the sweep goes by UID and pauses at a failure)
        base = generate_uid()[:50].rstrip(".")
        big = factory.knee_dx(rows=1500, cols=1400, seed=3, study_uid=base + ".2")  # 4.2 MB > 3 MiB
        big.StudyDate = DAYS[0]
        small = factory.knee_dx(rows=96, cols=80, seed=4, study_uid=base + ".1")
        small.StudyDate = DAYS[0]
        for n, ds in enumerate((big, small)):
            pacs.upload(factory.write(ds, tmp_path / f"{n}.dcm"))
        config = write_config(tmp_path / "agent.toml", tmp_path / "data", agent_port, pacs, tiny_weights,
                              sweep={"retrieve": "get"})  # fmt: skip
        config.write_text(config.read_text().replace("[scp]\n", "[scp]\nmax_instance_mb = 1\n"))
        settings = load_settings(config, search_default=False)
        pacs.add_modality("agent", AGENT_AET, "127.0.0.1", free_port())
        agent = Agent.build(settings, worker=False)
        agent.start()
        try:
            sweeper = Sweeper(settings, agent.db, Rules.from_section(settings.eligibility), archive_for(settings),
                              agent.ingestor)  # fmt: skip
            report = sweeper.sweep(settings.pacs[0], date(2026, 3, 2), date(2026, 3, 2))
            assert report.retrieved == 1 and len(report.failed) == 1, report
            assert str(big.StudyInstanceUID) in report.failed[0]
            assert "connection_closed_pdu_too_large" in caplog.text
            assert received_studies(agent.db) == {str(small.StudyInstanceUID)}
        finally:
            agent.stop(grace_s=1)
    finally:
        pacs.stop()
