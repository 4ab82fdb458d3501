"""Issue 4 acceptance: screen and report end to end through a real Orthanc.

Each test starts its own Orthanc (the Debian package, free ports, temporary storage) that holds
the source study, routes it to the agent (C-STORE), and receives the agent's results (the TID 1500
SR and one secondary-capture overlay per screened image) back into the same study. Everything is
checked through Orthanc's REST API, the agent's database, and the standard's tools (dciodvfy,
dsrdump).

The tiny random-weights checkpoint drives the plumbing tests (the SR/overlay structure does not
depend on accuracy); the first test uses the shipped checkpoint when it exists.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dicom_factory as factory
import numpy as np
import pytest
from conftest import AGENT_AET, agent_toml, database_of, free_port, require_tool
from pydicom import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from serve_process import ServeProcess, serve_doc, write_doc
from sqlalchemy import select

from agent.app import Agent
from agent.db.engine import Database
from agent.db.models import Instance, Result, Study
from agent.db.registry import list_flagged, study_results
from agent.demo.orthanc import LocalOrthanc, OrthancError
from agent.domain import JobState, OutboxState
from agent.ingest.eligibility import BODY_PART_REASON
from agent.queue import outbox
from agent.queue.store import list_jobs
from model.checkpoint import SHIPPED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (docs/sr-content.md)
SC_CLASS = factory.SECONDARY_CAPTURE
RESULT_CLASSES = {SR_CLASS, SC_CLASS}
STRNET = str(Path(sys.executable).with_name("strnet"))
SERVE_START_S = 90.0  # `strnet serve` imports torch and loads the model; the machine is shared

# Switch for test 1: the shipped checkpoint once it exists (another engineer is training it);
# until then the tiny random-weights checkpoint. Nothing else needs to change when it lands.
SHIPPED_CHECKPOINT = Path(SHIPPED)


# -- helpers ---------------------------------------------------------------------------------
def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not met within {timeout_s:.0f} s")


def start_orthanc(agent_port: int, tmp_path: Path, **extra_config: Any) -> LocalOrthanc:
    """Orthanc (AE ORTHANC) with the agent declared as modality "agent" in its configuration.

    Declared in the file (not at run time) so that it survives an Orthanc restart.
    """
    require_tool("Orthanc")
    pacs = LocalOrthanc(
        "ORTHANC",
        modalities={"agent": (AGENT_AET, "127.0.0.1", agent_port)},
        extra_config=extra_config,
        work_dir=tmp_path / "orthanc",
    )
    return pacs.start()


def agent_overrides(weights: Path, pacs: LocalOrthanc, agent_port: int, **over: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "scp": {"port": agent_port},
        # as shipped: screening in a process of its own (conftest's test agents screen inline)
        "worker": {"enabled": True, "process": True, "weights": str(weights), "device": "cpu", "max_wait_ms": 20},
        "reporting": {"quiet_period_s": 1.0},
        "sender": {
            "poll_s": 0.2,
            "backoff_base_s": 0.2,
            "backoff_max_s": 1.0,
            "timeout_s": 5,
            "max_attempts": 50,
        },
        "pacs": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
    }
    for key, value in over.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


def upload_and_route(pacs: LocalOrthanc, files: list[Path], study_uids: list[str]) -> None:
    for f in files:
        pacs.upload(f)
    for uid in study_uids:
        pacs.route_study(pacs.study_id_for(uid), "agent", synchronous=True)


def results_in(pacs: LocalOrthanc, study_uid: str) -> list[dict[str, str]]:
    return [i for i in pacs.instances_of_study(study_uid) if i["SOPClassUID"] in RESULT_CLASSES]


def count_classes(items: list[dict[str, str]]) -> Counter[str]:
    return Counter(i["SOPClassUID"] for i in items)


def dciodvfy_errors(path: Path) -> list[str]:
    """Error/Abort lines of dciodvfy (its exit code is not reliable; it prints to stderr)."""
    out = subprocess.run(
        ["dciodvfy", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    return [line for line in out.stdout.splitlines() if re.match(r"^(Error|Abort)", line)]


def orthanc_rejections(pacs: LocalOrthanc) -> int:
    """Associations Orthanc rejected so far (from its log)."""
    return pacs.log_path.read_text(errors="replace").count("Rejected association")


def outbox_states(agent: Agent) -> list[str]:
    return [i.state for i in outbox.items(agent.db)]


def all_in(agent: Agent, state: OutboxState, n: int) -> bool:
    return outbox_states(agent) == [state.value] * n


def knee_study(
    folder: Path,
    *,
    sides: tuple[str, ...] = ("L", "R"),
    views: int = 1,
    patient: str = "PAT-1",
    study_uid: str | None = None,
    seed: int = 0,
) -> tuple[str, list[Path]]:
    """A small knee study (dicom_factory), files written to ``folder``."""
    study = study_uid or generate_uid()
    files = []
    for side in sides:
        series = generate_uid()
        for v in range(views):
            ds = factory.knee_dx(
                study_uid=study,
                series_uid=series,
                laterality=side,
                rows=320,
                cols=256,
                seed=seed + len(files),
                patient_id=patient,
                patient_name=f"TEST^{patient}",
            )
            ds.InstanceNumber = v + 1
            ds.ViewPosition = "AP" if v == 0 else "PA"
            files.append(factory.write(ds, folder / f"{patient}_{study[-8:]}_{side}{v}.dcm"))
    return study, files


def synthetic_bilateral_two_view(folder: Path, seed: int = 4) -> tuple[str, list[Path], str]:
    """L/R x AP/PA of one synthetic patient (model.synth), one study, two series (laterals are
    not screened: docs/dicom-values.md)."""
    from model.synth.acquisition import VENDOR_PROFILES
    from model.synth.dicom_writer import ImageHeader, build_dataset
    from model.synth.generate import generate_one

    rng = np.random.default_rng(seed)
    patient = None
    study_uid = generate_uid()
    files: list[Path] = []
    when = dt.datetime(2026, 1, 5, 10, 15)
    for side in ("L", "R"):
        series_uid = generate_uid()
        for n, view in enumerate(("AP", "PA")):
            img, patient = generate_one(rng, patient=patient, laterality=side, view="AP", profile="acme_dx")
            hdr = ImageHeader(
                patient_id=patient.patient_id,
                patient_name="SYNTHETIC^BILATERAL",
                birth_date=dt.date(1950, 3, 4),
                sex=patient.sex,
                age=patient.age,
                height_m=patient.height_m,
                weight_kg=patient.weight_kg,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=generate_uid(),
                study_datetime=when,
                accession="ACC-BILAT",
                study_id="1",
                series_number=1 if side == "L" else 2,
                instance_number=n + 1,
                laterality=side,
                view=view,
                kvp=img.kvp,
                magnification=img.magnification,
                burned_in_text=img.burned_in_text,
            )
            ds = build_dataset(img.stored, hdr, VENDOR_PROFILES[img.profile])
            path = folder / f"bilat_{side}_{view}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    assert patient is not None
    return study_uid, files, patient.patient_id


# -- 1. bilateral two-view study: SR + overlays in the same study, valid, readable ------------
@pytest.fixture()
def test1_weights(tiny_weights: Path) -> Path:
    # THE SWITCH: the shipped checkpoint when the file exists, else the tiny one.
    return SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.exists() else tiny_weights


def test_bilateral_two_view_study_gets_valid_sr_and_overlays(
    make_agent: Any, test1_weights: Path, tmp_path: Path
) -> None:
    require_tool("dciodvfy")
    require_tool("dsrdump")
    study_uid, files, _patient_id = synthetic_bilateral_two_view(tmp_path)
    agent_port = free_port()
    pacs = start_orthanc(agent_port, tmp_path)
    try:
        agent = make_agent(**agent_overrides(test1_weights, pacs, agent_port))
        upload_and_route(pacs, files, [study_uid])
        wait_for(
            lambda: count_classes(results_in(pacs, study_uid)) == Counter({SC_CLASS: 4, SR_CLASS: 1}),
            timeout_s=120,
            what="SR + 4 overlays in Orthanc",
        )
        assert all_in(agent, OutboxState.DELIVERED, 5), outbox_states(agent)
        assert {j.state for j in list_jobs(agent.db)} == {JobState.DONE}
        stored = pacs.instances_of_study(study_uid)
        assert len(stored) == 9  # 4 sources + 4 overlays + 1 SR, one study
        source_series = {i["SeriesInstanceUID"] for i in stored if i["SOPClassUID"] not in RESULT_CLASSES}
        result_series = {i["SeriesInstanceUID"] for i in stored if i["SOPClassUID"] in RESULT_CLASSES}
        assert not source_series & result_series  # results live in new series of the same study

        findings = study_results(agent.db, study_uid)
        assert len(findings) == 4
        for item in results_in(pacs, study_uid):
            path = tmp_path / f"{item['SOPInstanceUID']}.dcm"
            path.write_bytes(pacs.instance_file(item["ID"]))
            errors = dciodvfy_errors(path)
            assert errors == [], f"dciodvfy on {item['SOPClassUID']}:\n" + "\n".join(errors)
            if item["SOPClassUID"] != SR_CLASS:
                continue
            dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60, check=False)
            assert dump.returncode == 0, dump.stderr
            text = dump.stdout
            assert re.search(r'"Algorithm Name"\)="STR-Net"', text), text[:3000]
            finding = r'CODE:\(,,"Finding"\)=\([^)]*"(Normal|Bone loss suspected|Osteopenia|Osteoporosis)"'
            assert len(re.findall(finding, text)) == 4, text[:3000]  # one per image
            # percentages in the SR (UCUM %), fractions in the findings
            probabilities = [float(v) / 100 for v in re.findall(r'NUM:\(,,"Probability"\)="([^"]+)" \(%,UCUM', text)]
            t_scores = [float(v) for v in re.findall(r'NUM:\(,,"Estimated T-score"\)="([^"]+)"', text)]
            for f in findings:  # every image's probability and T-score, as computed, in the SR
                assert any(abs(p - f.probability) < 1e-3 for p in probabilities), (
                    f.probability,
                    probabilities,
                )
                assert any(abs(t - f.t_score) < 1e-2 for t in t_scores), (f.t_score, t_scores)
    finally:
        pacs.stop()


# -- 2. a non-knee instance is skipped with a reason, and nothing is sent for it -------------
def test_non_knee_is_skipped_and_nothing_sent(make_agent: Any, tiny_weights: Path, tmp_path: Path) -> None:
    chest = factory.knee_dx(body_part="CHEST", patient_id="PAT-CHEST")
    chest_file = factory.write(chest, tmp_path / "chest.dcm")
    knee_uid, knee_files = knee_study(tmp_path, sides=("L",), patient="PAT-KNEE")
    agent_port = free_port()
    pacs = start_orthanc(agent_port, tmp_path)
    try:
        agent = make_agent(**agent_overrides(tiny_weights, pacs, agent_port))
        upload_and_route(pacs, [chest_file, *knee_files], [str(chest.StudyInstanceUID), knee_uid])
        # the knee study routed alongside gets its SR: the sweeps have run past the chest study too
        wait_for(
            lambda: count_classes(results_in(pacs, knee_uid)) == Counter({SC_CLASS: 1, SR_CLASS: 1}),
            timeout_s=90,
            what="the knee study's results",
        )
        time.sleep(2.5)  # another study-completion sweep and several sender polls
        jobs = {j.sop_instance_uid: j for j in list_jobs(agent.db)}
        skipped = jobs[str(chest.SOPInstanceUID)]
        assert skipped.state == JobState.SKIPPED and BODY_PART_REASON in (skipped.reason or ""), skipped
        assert results_in(pacs, str(chest.StudyInstanceUID)) == []
        assert [i["SOPInstanceUID"] for i in pacs.instances_of_study(str(chest.StudyInstanceUID))] == [
            str(chest.SOPInstanceUID)
        ]
        assert study_results(agent.db, str(chest.StudyInstanceUID)) == []
        assert all_in(agent, OutboxState.DELIVERED, 2)  # only the knee study's SR and overlay
    finally:
        pacs.stop()


# -- 3. every compressed syntax and MONOCHROME1 CR is screened --------------------------------
def test_compressed_and_monochrome1_inputs_are_screened(make_agent: Any, tiny_weights: Path, tmp_path: Path) -> None:
    require_tool("dcmcjpeg")
    study = generate_uid()

    def base(seed: int, **kw: Any) -> Dataset:
        ds = factory.knee_dx(study_uid=study, seed=seed, rows=320, cols=256, patient_id="PAT-CODEC", **kw)
        ds.InstanceNumber = seed + 1
        return ds

    files: dict[str, tuple[Path, str]] = {}
    for seed, (name, codec, syntax) in enumerate(
        [
            ("j2k", "j2k", JPEG2000Lossless),
            ("jls", "jls", JPEGLSLossless),
            ("rle", "rle", RLELossless),
        ]
    ):
        files[name] = (
            factory.write(factory.compressed(base(seed), codec), tmp_path / f"{name}.dcm"),
            syntax,
        )
    raw = factory.write(base(3), tmp_path / "raw.dcm")
    files["jpeg_sv1"] = (factory.jpeg_lossless_file(raw, tmp_path / "sv1.dcm"), JPEGLosslessSV1)
    cr = base(4, modality="CR", monochrome1=True)
    files["cr_mono1"] = (factory.write(cr, tmp_path / "cr.dcm"), ExplicitVRLittleEndian)

    agent_port = free_port()
    pacs = start_orthanc(agent_port, tmp_path)
    try:
        agent = make_agent(**agent_overrides(tiny_weights, pacs, agent_port))
        upload_and_route(pacs, [p for p, _ in files.values()], [study])
        wait_for(
            lambda: count_classes(results_in(pacs, study)) == Counter({SC_CLASS: 5, SR_CLASS: 1}),
            timeout_s=120,
            what="5 overlays and the SR in Orthanc",
        )
        jobs = list_jobs(agent.db)
        assert len(jobs) == 5 and {j.state for j in jobs} == {JobState.DONE}, [(j.state, j.reason) for j in jobs]
        with agent.db.reading() as s:
            rows = s.execute(select(Instance.sop_instance_uid, Instance.transfer_syntax_uid, Instance.id)).all()
            with_result = set(s.execute(select(Result.instance_id)).scalars())
        arrived = {uid: syntax for uid, syntax, _ in rows}
        assert {i for _, _, i in rows} == with_result  # a result row per instance
        from pydicom import dcmread

        for name, (path, syntax) in files.items():
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert arrived[uid] == syntax, f"{name} arrived as {arrived[uid]}, not as stored"
        assert len(study_results(agent.db, study)) == 5
    finally:
        pacs.stop()


# -- 4. Orthanc down while results are pending, back on the same ports and storage -------------
def test_results_delivered_after_orthanc_returns(make_agent: Any, tiny_weights: Path, tmp_path: Path) -> None:
    study_uid, files = knee_study(tmp_path, sides=("L",), patient="PAT-DOWN")
    agent_port = free_port()
    pacs = start_orthanc(agent_port, tmp_path)
    try:
        agent = make_agent(**agent_overrides(tiny_weights, pacs, agent_port))
        upload_and_route(pacs, files, [study_uid])
        # Orthanc goes down right after routing: the SR cannot be built before the quiet period
        # has passed, so it is pending for sure (the overlay may have made it before the stop).
        # LocalOrthanc has no public restart: kill the process but keep its folder, then launch
        # it again with the same configuration: same DICOM/HTTP ports, same storage and index.
        ports = (pacs.dicom_port, pacs.http_port)
        # Down at once, as in a crash: on SIGTERM Orthanc keeps its DICOM port open (and stores!)
        # for seconds while it stops, so the SR could still get in.
        assert pacs._proc is not None
        pacs._proc.kill()
        pacs._kill()  # reaps it, closes the REST client and the log, keeps the folder
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", ports[0])) != 0, "Orthanc's DICOM port still open"

        def sr_row() -> Any:
            return next((i for i in outbox.items(agent.db) if i.kind == "sr"), None)

        wait_for(
            lambda: (row := sr_row()) is not None and row.state == OutboxState.RETRY.value,
            timeout_s=60,
            what="the SR waiting to be retried",
        )
        time.sleep(1.5)  # a few more failed attempts with backoff
        failed = sr_row()
        assert failed.attempts >= 2 and "unreachable" in (failed.last_error or ""), failed.last_error
        assert all(i.state != OutboxState.DEAD.value for i in outbox.items(agent.db))
        pacs._launch()
        assert (pacs.dicom_port, pacs.http_port) == ports
        wait_for(
            lambda: all_in(agent, OutboxState.DELIVERED, 2),
            timeout_s=60,
            what="delivery after restart",
        )
        assert count_classes(results_in(pacs, study_uid)) == Counter({SC_CLASS: 1, SR_CLASS: 1})
        assert len(pacs.instances_of_study(study_uid)) == 3  # the source survived the restart
    finally:
        pacs.stop()


# -- 5. Orthanc refuses the agent's AE: DEAD at once, replayed by `strnet jobs retry --dead` ------
def test_refused_ae_goes_dead_then_retry_dead_delivers(make_agent: Any, tiny_weights: Path, tmp_path: Path) -> None:
    # The agent sends as STRNET_SCU, an AE title Orthanc does not know. Orthanc 1.10 rejects
    # the ASSOCIATION of an undeclared calling AE (A-ASSOCIATE-RJ, rejected-permanent, calling
    # AE not recognised) only when every DicomAlwaysAllow* option is false: DicomAlwaysAllowEcho
    # defaults to true, and then Orthanc accepts the association and A-ABORTs at the first
    # C-STORE instead (no status), which the agent rightly treats as transient (backoff, then
    # DEAD after sender.max_attempts): not the permanent rejection this test is about.
    sending_aet = "STRNET_SCU"
    study_uid, files = knee_study(tmp_path, sides=("L", "R"), patient="PAT-REFUSED")
    agent_port = free_port()
    pacs = start_orthanc(agent_port, tmp_path, DicomAlwaysAllowEcho=False)
    try:
        over = agent_overrides(tiny_weights, pacs, agent_port)
        over["pacs"][0]["calling_ae_title"] = sending_aet
        agent = make_agent(**over)
        upload_and_route(pacs, files, [study_uid])
        wait_for(lambda: all_in(agent, OutboxState.DEAD, 3), timeout_s=60, what="SR and 2 overlays DEAD")
        rejected_at_dead = orthanc_rejections(pacs)
        attempts_at_dead = [i.attempts for i in outbox.items(agent.db)]
        time.sleep(2.0)  # ten sender polls and a study sweep later: no attempt more
        items = outbox.items(agent.db)
        assert [i.attempts for i in items] == attempts_at_dead
        assert orthanc_rejections(pacs) == rejected_at_dead, "the agent kept knocking after DEAD"
        # One attempt each, the rejection is permanent. Allowance: pynetdicom now and then (2 in
        # 60 associations in a probe against this Orthanc) reports the association as aborted
        # without the A-ASSOCIATE-RJ that Orthanc's log shows it sent; the agent cannot tell that
        # from a network failure, retries once after the backoff and then sees the rejection.
        assert all(i.attempts <= 2 for i in items), f"retry storm: {[i.attempts for i in items]}"
        assert all("rejected permanently" in (i.last_error or "") for i in items), [i.last_error for i in items]
        assert results_in(pacs, study_uid) == []

        pacs.add_modality("agent_scu", sending_aet, "127.0.0.1", agent_port)  # Orthanc accepts now
        toml = tmp_path / "cli.toml"
        toml.write_text(agent_toml(agent.settings.data_dir), encoding="utf-8")  # and its database
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRNET_")}
        out = subprocess.run(
            [STRNET, "jobs", "retry", "--dead", "--config", str(toml)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr[-2000:]
        assert "3 undelivered result(s)" in out.stdout, out.stdout
        wait_for(
            lambda: all_in(agent, OutboxState.DELIVERED, 3),
            timeout_s=60,
            what="delivery after replay",
        )
        assert count_classes(results_in(pacs, study_uid)) == Counter({SC_CLASS: 2, SR_CLASS: 1})
    finally:
        pacs.stop()


# -- 6. `strnet serve` SIGKILLed mid-inference, then mid-send: exactly once in the end ---------
def serve_config(
    path: Path, data_dir: Path, port: int, weights: Path, pacs_port: int, quiet_period_s: float = 1
) -> Path:
    doc = serve_doc(data_dir, port, peers=("ORTHANC",), weights=weights, device="cpu", pacs_port=pacs_port)
    doc["worker"]["max_wait_ms"] = 20
    doc["reporting"] = {"quiet_period_s": quiet_period_s}
    doc["sender"] = {"poll_s": 0.2, "backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 5, "max_attempts": 50}
    return write_doc(path, doc)


@pytest.fixture()
def failpoint_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], None]]:
    def arm(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv("STRNET_FAILPOINT", raising=False)
        else:
            monkeypatch.setenv("STRNET_FAILPOINT", spec)

    yield arm


def test_serve_killed_mid_inference_and_mid_send_delivers_exactly_once(
    tiny_weights: Path, tmp_path: Path, failpoint_env: Callable[[str | None], None]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    # patient A: two studies (one bilateral two-view), patient B: one study
    studies = [
        knee_study(folder, sides=("L", "R"), views=2, patient="PAT-A", seed=0),
        knee_study(folder, sides=("R",), patient="PAT-A", seed=10),
        knee_study(folder, sides=("L",), patient="PAT-B", seed=20),
    ]
    uids = [uid for uid, _ in studies]
    images = {uid: len(files) for uid, files in studies}
    agent_port = free_port()
    pacs = start_orthanc(agent_port, tmp_path)
    data_dir = tmp_path / "var"
    procs: list[ServeProcess] = []
    try:
        # the re-send routes image by image: a quiet period of 1 s was shorter than one gap between
        # two images of a study under load (1.26 s seen), so its SR came in two revisions
        config = serve_config(tmp_path / "agent.toml", data_dir, agent_port, tiny_weights, pacs.dicom_port, 5)
        # Orthanc ids of the source images: a re-send routes these only (the study in Orthanc
        # also holds our results by then, and the agent accepts no SR/SC storage)
        sources = [pacs.upload(f) for _, fs in studies for f in fs]

        def run(n: int, failpoint: str | None) -> ServeProcess:
            failpoint_env(failpoint)
            proc = ServeProcess(config, tmp_path / f"serve{n}.log")
            procs.append(proc)
            proc.start(timeout_s=SERVE_START_S)
            failpoint_env(None)
            for orthanc_id in sources:  # PACS sends again after a failed transfer: dupes absorbed
                try:
                    pacs.route_study(orthanc_id, "agent", synchronous=True)  # any resource level
                except OrthancError:
                    if failpoint is None:
                        raise
            return proc

        # mid_send:3: the two sender lanes (sender.connections) reach their first sends together;
        # the third send follows a delivery, so the kill lands with objects both sent and in flight
        for n, point in enumerate(("mid_inference", "mid_send:3"), start=1):
            proc = run(n, point)
            assert proc.proc is not None
            try:
                rc = proc.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"fail point {point} did not fire: " + proc.log_path.read_text()[-3000:]) from None
            assert rc == -signal.SIGKILL, f"run {n} exited {rc}: " + proc.log_path.read_text()[-3000:]
            proc.close()
        log2 = procs[1].log_path.read_text(errors="replace")
        assert "_delivered" in log2, "the mid-send kill came before any delivery: it proves less"

        final = run(3, None)
        want = {uid: Counter({SR_CLASS: 1, SC_CLASS: images[uid]}) for uid in uids}
        wait_for(
            lambda: {uid: count_classes(results_in(pacs, uid)) for uid in uids} == want,
            timeout_s=120,
            what="one SR per study and one overlay per image",
        )
        db = Database(database_of(data_dir))
        try:
            wait_for(
                lambda: {i.state for i in outbox.items(db)} == {OutboxState.DELIVERED.value},
                timeout_s=30,
                what="outbox drained",
            )
            time.sleep(2.5)  # one more study sweep: no second SR may appear
            for uid in uids:
                found = results_in(pacs, uid)
                assert count_classes(found) == want[uid], (uid, found)
                assert len({i["SOPInstanceUID"] for i in found}) == len(found)
            assert len(outbox.items(db)) == sum(images.values()) + len(uids)
            jobs = list_jobs(db)
            assert len(jobs) == sum(images.values()) and {j.state for j in jobs} == {JobState.DONE}
            with db.reading() as s:
                positive = set(
                    s.execute(
                        select(Study.patient_id)
                        .join(Result, Result.study_id == Study.id)
                        .where(Result.bone_loss.is_(True))
                    ).scalars()
                )
        finally:
            db.engine.dispose()

        env = {k: v for k, v in os.environ.items() if not k.startswith("STRNET_")}
        out = subprocess.run(
            [STRNET, "flagged", "list", "--format", "json", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        flagged = json.loads(out.stdout)
        ids = [r["patient_id"] for r in flagged]
        assert ids, "the tiny model flags every image at its 0.45 threshold: nobody flagged is wrong"
        assert len(ids) == len(set(ids)), f"a patient is flagged more than once: {ids}"
        assert set(ids) <= {"PAT-A", "PAT-B"}
        assert set(ids) == positive  # every patient with a positive film, once
        assert final.terminate() == 0
    finally:
        failpoint_env(None)
        for proc in procs:
            proc.close()
        pacs.stop()


# -- 7. shadow mode: everything recorded, nothing sent ----------------------------------------
def test_shadow_mode_records_everything_and_sends_nothing(make_agent: Any, tiny_weights: Path, tmp_path: Path) -> None:
    study_uid, files = knee_study(tmp_path, sides=("L", "R"), patient="PAT-SHADOW")
    agent_port = free_port()
    pacs = start_orthanc(agent_port, tmp_path)
    try:
        agent = make_agent(**agent_overrides(tiny_weights, pacs, agent_port, sender={"send": False}))
        upload_and_route(pacs, files, [study_uid])
        wait_for(lambda: len(outbox.items(agent.db)) == 3, timeout_s=60, what="SR + 2 overlays recorded")
        time.sleep(1.5)  # several sender polls
        assert all_in(agent, OutboxState.SHADOW, 3)
        assert sorted(i.kind for i in outbox.items(agent.db)) == ["sc", "sc", "sr"]
        for item in outbox.items(agent.db):
            assert agent.results.path(item.path).stat().st_size > 0  # built and kept
            assert item.attempts == 0 and item.delivered_at is None
        assert results_in(pacs, study_uid) == []
        assert len(pacs.instances_of_study(study_uid)) == 2
        assert len(study_results(agent.db, study_uid)) == 2
        positive = [r for r in study_results(agent.db, study_uid) if r.bone_loss]
        flagged = list_flagged(agent.db)
        assert positive, "the tiny model flags every image at its 0.45 threshold"
        assert [f.patient_id for f in flagged] == ["PAT-SHADOW"]
    finally:
        pacs.stop()
