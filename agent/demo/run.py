"""``strnet demo``: a real Orthanc routes synthetic knee studies to the agent and gets results back.

Everything runs on free loopback ports with temporary storage and is stopped at the end.
The radiographs are synthetic (model/synth); the figures printed are STR-Net's real outputs on
them. NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

import copy
import csv
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from agent.config import load_settings
from agent.demo.orthanc import LocalOrthanc, free_port

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
DEMO_SEED = 20261127


@dataclass
class DemoStudy:
    label: str  # what the synthetic ground truth says
    study_uid: str
    files: list[Path]
    knee: bool = True
    routed_at: float = 0.0
    sr_seconds: float | None = None


def pick_studies(manifest: Path) -> list[DemoStudy]:
    """One bone-loss study and one normal study (by the synthetic ground truth)."""
    rows = list(csv.DictReader(manifest.open()))
    by_study: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_study.setdefault(r["study_instance_uid"], []).append(r)
    chosen: dict[str, DemoStudy] = {}
    for uid, films in by_study.items():
        label = "bone loss" if films[0]["label"] == "1" else "normal"
        if label not in chosen and len(films) >= 2:
            chosen[label] = DemoStudy(
                f"{label} (T {float(films[0]['t_score']):+.1f})", uid, [manifest.parent / f["path"] for f in films]
            )
    return [chosen[k] for k in ("bone loss", "normal") if k in chosen]


def make_non_knee(source: Path, out: Path) -> DemoStudy:
    """A chest film: the agent must store it, skip it with a reason and send nothing."""
    from pydicom.uid import generate_uid

    ds = dcmread(source)
    ds = copy.deepcopy(ds)
    ds.BodyPartExamined = "CHEST"
    if "AnatomicRegionSequence" in ds:  # a real chest film codes the thorax, not the knee
        item = ds.AnatomicRegionSequence[0]
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "51185008", "SCT", "Thorax"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "SYNCHEST01"
    ds.PatientName = "SYNTHETIC^CHEST"
    ds.save_as(out, enforce_file_format=True)
    return DemoStudy("not a knee (chest)", ds.StudyInstanceUID, [out], knee=False)


def wait_until(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def run_demo(
    keep: bool = False, weights: Path | None = None, timeout_s: float = 180.0, echo: Callable[[str], Any] = print
) -> int:
    from agent.app import Agent
    from agent.db.registry import list_flagged, study_results
    from agent.logging import configure_logging
    from agent.queue.store import list_jobs
    from model.synth.generate import generate

    configure_logging("warning", "console")
    work = Path(tempfile.mkdtemp(prefix="strnet-demo-"))
    agent_port = free_port()
    orthanc = LocalOrthanc("ORTHANC", modalities={"agent": ("STRNET", "127.0.0.1", agent_port)})
    agent = None
    try:
        echo("strnet demo: synthetic knee radiographs, research software, NOT FOR DIAGNOSTIC USE")
        echo(f"  working folder {work}")
        manifest = generate(work / "synth", n=16, seed=DEMO_SEED, preset="default")
        studies = pick_studies(manifest)
        studies.append(make_non_knee(studies[0].files[0], work / "chest.dcm"))
        orthanc.start()
        echo(f"  Orthanc (PACS) on DICOM port {orthanc.dicom_port}, HTTP port {orthanc.http_port}")
        settings = load_settings(
            None,
            search_default=False,
            agent={"data_dir": str(work / "var"), "min_free_disk_mb": 100, "log_level": "warning"},
            scp={"ae_title": "STRNET", "port": agent_port, "peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}]},
            pacs=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
            reporting={"quiet_period_s": 2.0},
            sender={"poll_s": 0.2},
            worker={"weights": str(weights) if weights else None, "max_wait_ms": 20},
        )
        t_load = time.monotonic()
        agent = Agent.build(settings)
        assert agent.worker is not None  # the demo's settings run the worker
        agent.start()
        echo(
            f"  agent STRNET on port {agent_port}, model {agent.worker.screening.model.algorithm.version} "
            f"loaded in {time.monotonic() - t_load:.1f} s"
        )
        for st in studies:
            for f in st.files:
                orthanc.upload(f)
        for st in studies:
            st.routed_at = time.monotonic()
            orthanc.route_study(orthanc.study_id_for(st.study_uid), "agent")
        echo(f"  Orthanc routed {sum(len(s.files) for s in studies)} instances in {len(studies)} studies to the agent")

        def sr_arrived(st: DemoStudy) -> bool:
            if st.sr_seconds is None and any(
                i["SOPClassUID"] in SR_CLASSES for i in orthanc.instances_of_study(st.study_uid)
            ):
                st.sr_seconds = time.monotonic() - st.routed_at
            return st.sr_seconds is not None

        knee = [s for s in studies if s.knee]
        ok = wait_until(lambda: all([sr_arrived(s) for s in knee]), timeout_s)
        echo("")
        echo(
            f"{'STUDY (synthetic truth)':<26} {'RESULT':<22} {'P(BONE LOSS)':>12} "
            f"{'T-SCORE (90% interval)':>24} {'SR IN PACS':>11} {'OVERLAYS':>8}"
        )
        for st in studies:
            if not st.knee:
                jobs = [j for j in list_jobs(agent.db) if j.study_instance_uid == st.study_uid]
                reason = jobs[0].reason if jobs else "not received"
                in_pacs = [
                    i for i in orthanc.instances_of_study(st.study_uid) if i["SOPClassUID"] in SR_CLASSES | {SC_CLASS}
                ]
                echo(
                    f"{st.label:<26} {'SKIPPED':<22} {'-':>12} {'-':>24} "
                    f"{'none' if not in_pacs else 'SENT!':>11} {len(in_pacs):>8}"
                )
                echo(f"{'':<26}   reason: {reason}")
                continue
            res = study_results(agent.db, st.study_uid)
            if not res:
                echo(f"{st.label:<26} {'no result':<22}")
                continue
            top = max(res, key=lambda r: r.probability)
            verdict = f"BONE LOSS ({top.severity})" if any(r.bone_loss for r in res) else "no bone loss"
            overlays = sum(i["SOPClassUID"] == SC_CLASS for i in orthanc.instances_of_study(st.study_uid))
            sr = f"{st.sr_seconds:.1f} s" if st.sr_seconds is not None else "missing"
            interval = f"{top.t_score:+.1f} ({top.t_score_low:+.1f} to {top.t_score_high:+.1f})"
            echo(f"{st.label:<26} {verdict:<22} {top.probability:>12.3f} {interval:>24} {sr:>11} {overlays:>8}")
        echo("  (seconds from routing to the SR stored in Orthanc include the 2 s quiet period)")
        echo("")
        flagged = list_flagged(agent.db)
        echo(f"Flagged patients ({len(flagged)}):")
        for p in flagged:
            echo(
                f"  {p.patient_id:<12} {p.patient_name or '':<26} {p.status:<6} P={p.probability:.3f} "
                f"{p.severity or '':<12} T={p.t_score:+.1f} studies={p.studies}"
            )
        if not ok:
            echo("demo FAILED: not every knee study got its SR back in time")
            return 1
        return 0
    finally:
        if agent is not None:
            agent.stop(grace_s=2)
        orthanc.stop()
        if keep:
            echo(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
