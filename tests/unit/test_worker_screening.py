"""agent/queue/worker.py with agent/pipeline/process.py: batches screened in the real screening
process (spawned, tiny checkpoint) while the worker leases the next, recorded in order by the
completion thread; the process's death, stop(), a bad checkpoint, the inline mode, overlays off.
What an overlay contains is tested in test_reporting.py; the helper itself in test_helper.py."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import structlog
from conftest import agent_settings, free_port
from dicom_factory import PHI_ID, PHI_NAME, SECONDARY_CAPTURE, as_received, knee_dx, set_pixels
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_helper import ended
from test_report_builder import _unstamped
from test_reporting import _findings

from agent.app import load_screening
from agent.config import Settings
from agent.db.engine import open_database
from agent.db.models import Instance, Job, Result
from agent.domain import Eligibility, IncomingInstance, InstanceRef, JobState, LeasedJob, OutboxState
from agent.errors import ConfigError
from agent.pipeline.process import InlineScreening, ScreeningProcess, default_threads
from agent.pipeline.run import Failed, Screened, finish
from agent.queue import outbox, store
from agent.queue.worker import Worker
from agent.reporting.builder import encode
from agent.spool import Spool


def _settings(tmp_path: Path, weights: Path, process: bool = True, **over: Any) -> Settings:
    worker = {"enabled": True, "device": "cpu", "max_wait_ms": 0, "max_batch": 2, "process": process,
              "weights": str(weights), **over.pop("worker", {})}  # fmt: skip
    reporting = {"build_processes": 0, **over.pop("reporting", {})}
    pacs = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
    return agent_settings(tmp_path / "agent", worker=worker, reporting=reporting, pacs=pacs, **over)


def _worker(tmp_path: Path, weights: Path, process: bool = True, screening: Any = None, **over: Any) -> Worker:
    """A worker on its own database and spools, screening as ``worker.process`` says."""
    settings = _settings(tmp_path, weights, process, **over)
    db = open_database(settings)
    engine = screening if screening is not None else load_screening(settings)
    return Worker(settings, db, Spool(settings.spool_dir), Spool(settings.results_dir), engine)


def _queue(worker: Worker, n: int, pixels: np.ndarray | None = None, **raw: Any) -> list[pydicom.Dataset]:
    """``n`` knee images spooled and queued (one study), as the C-STORE handler leaves them;
    ``pixels``: 12-bit stored values instead of the factory's; ``raw``: values set as a sender puts
    them on the wire (dicom_factory.as_received)."""
    study, out = generate_uid(), []
    for i in range(n):
        ds = knee_dx(study_uid=study, laterality="LR"[i % 2], seed=i, rows=96, cols=80)
        ds.InstanceNumber = i + 1
        if pixels is not None:
            set_pixels(ds, pixels, bits_stored=12)
        if raw:
            ds = as_received(ds, **raw)
        data = encode(ds)
        rel = worker.spool.write_named(f"{ds.SOPInstanceUID}.dcm", [data])
        ref = InstanceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), study, str(ds.SeriesInstanceUID),
                          str(ds.file_meta.TransferSyntaxUID))  # fmt: skip
        store.record_instance(
            worker.db,
            IncomingInstance(ref, rel, hashlib.sha256(data).hexdigest(), len(data), "TESTSCU", "127.0.0.1",
                             Eligibility(True), patient_id=str(ds.PatientID), patient_name=str(ds.PatientName)),
        )  # fmt: skip
        out.append(ds)
    return out


def _job(worker: Worker, job_id: int) -> Job:
    with worker.db.reading() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _occupy(worker: Worker, seconds: float) -> Future[Any]:
    """Keep the screening process busy, so the batch handed over next is surely still pending."""
    assert isinstance(worker.screening, ScreeningProcess)
    return worker.screening.helper.submit(time.sleep, seconds)


def test_run_once_screens_in_the_screening_process_and_records_done(tmp_path: Path, tiny_weights: Path) -> None:
    worker = _worker(tmp_path, tiny_weights)
    try:
        assert isinstance(worker.screening, ScreeningProcess)
        assert worker.screening.model is not None and worker.screening.model.device == "cpu"
        datasets = _queue(worker, 2)
        assert worker.run_once() == 2
        assert worker.drain(60) == 0
        jobs = store.list_jobs(worker.db)
        assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]
        [pid] = worker.screening.pids()
        assert pid != os.getpid()
        items = outbox.items(worker.db)
        assert [(i.kind, i.state, i.destination) for i in items] == [("sc", OutboxState.PENDING.value, "pacs")] * 2
        for item, ds in zip(items, datasets, strict=True):
            sc = pydicom.dcmread(worker.results.path(item.path))
            assert str(sc.SOPClassUID) == SECONDARY_CAPTURE == item.sop_class_uid
            assert str(sc.SOPInstanceUID) == item.sop_instance_uid
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
            assert sc.InstanceNumber == ds.InstanceNumber
        with worker.db.reading() as s:
            timings = list(s.execute(select(Result.timings_ms).order_by(Result.id)).scalars())
        assert all(t["report"] > 0 and {"decode", "preprocess", "infer"} <= set(t) for t in timings), timings
        assert worker.stats.screened == 2 and worker.stats.failed == 0
    finally:
        worker.stop(5)


def test_the_process_screens_as_the_inline_engine_does(tmp_path: Path, tiny_weights: Path) -> None:
    worker = _worker(tmp_path, tiny_weights)
    inline = InlineScreening(
        load_screening(_settings(tmp_path, tiny_weights, process=False)).screener, 60_000_000, overlay=True
    )
    try:
        _queue(worker, 2)
        jobs = store.lease(worker.db, worker.owner, 2, 60)
        paths = {j.spool_path: worker.spool.path(j.spool_path) for j in jobs}
        there = worker.screening.submit(jobs, paths).result(120)
        here = inline.submit(jobs, paths).result()
    finally:
        worker.stop(5)
    assert worker.screening.model == inline.model
    for a, b in zip(there, here, strict=True):
        assert type(a).__name__ == type(b).__name__ == "Finished"
        assert a.findings == b.findings and a.findings.saliency is None  # the map stays in the process
        assert a.overlay.sop_instance_uid == b.overlay.sop_instance_uid  # type: ignore[union-attr]
        assert _unstamped(a.overlay.data) == _unstamped(b.overlay.data)  # type: ignore[union-attr]


def test_jobs_stay_leased_while_their_batch_is_pending(tmp_path: Path, tiny_weights: Path) -> None:
    worker = _worker(tmp_path, tiny_weights)
    try:
        _queue(worker, 1)
        busy = _occupy(worker, 3.0)
        assert worker.run_once() == 1  # returns at once: the process is busy
        [job] = store.list_jobs(worker.db)
        assert (job.state, _job(worker, job.job_id).lease_owner) == (JobState.RUNNING, worker.owner)
        assert outbox.items(worker.db) == []
        busy.result(30)
        assert worker.drain(60) == 0
        assert _job(worker, job.job_id).state == JobState.DONE.value
        assert [i.kind for i in outbox.items(worker.db)] == ["sc"]
    finally:
        worker.stop(5)


def test_at_most_two_batches_are_pending_and_the_worker_waits_for_room_before_leasing_more(
    tmp_path: Path, tiny_weights: Path
) -> None:
    """docs/architecture.md, threads of `strnet serve`: "at most two batches are pending"."""
    worker = _worker(tmp_path, tiny_weights)
    try:
        for _ in range(3):
            _queue(worker, 1)  # three studies: three batches (a batch never mixes studies)
        busy = _occupy(worker, 4.0)
        assert worker.run_once() == 1 and worker.run_once() == 1  # two handed over, both pending
        leased: list[int] = []
        third = threading.Thread(target=lambda: leased.append(worker.run_once()))
        third.start()
        time.sleep(1.0)
        assert third.is_alive() and leased == []  # waits for room instead of leasing a third
        assert [j.state for j in store.list_jobs(worker.db)].count(JobState.QUEUED) == 1
        busy.result(30)
        third.join(60)
        assert leased == [1]  # leased once the first batch was recorded
        assert worker.drain(60) == 0
        assert {j.state for j in store.list_jobs(worker.db)} == {JobState.DONE}
    finally:
        worker.stop(5)


def test_a_killed_screening_process_fails_the_batch_for_a_retry_in_a_new_one(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.queue.worker.RETRY_DELAY_S", 0.0)  # lease the failed job again at once
    worker = _worker(tmp_path, tiny_weights)
    try:
        _queue(worker, 1)
        _occupy(worker, 30.0)
        worker.run_once()
        [pid] = worker.screening.pids()
        os.kill(pid, signal.SIGKILL)
        assert worker.drain(60) == 0
        [job] = store.list_jobs(worker.db)
        assert job.state == JobState.FAILED and "screening helper process died" in (job.reason or ""), job.reason
        assert outbox.items(worker.db) == []
        # the retry: leased again, screened by a new process (loaded and warmed up first), recorded
        assert worker.run_once() == 1
        assert worker.drain(120) == 0
        [job] = store.list_jobs(worker.db)
        assert (job.state, job.attempts) == (JobState.DONE, 2)
        assert [i.kind for i in outbox.items(worker.db)] == ["sc"]
        assert worker.screening.pids() not in ([], [pid])
    finally:
        worker.stop(5)


def test_a_stuck_screening_process_is_killed_and_the_batch_retried(tmp_path: Path, tiny_weights: Path) -> None:
    worker = _worker(tmp_path, tiny_weights, worker={"lease_s": 3.0})
    try:
        _queue(worker, 1)
        _occupy(worker, 120.0)  # a call that does not return: the batch waits behind it
        t0 = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            worker.run_once()
            [pid] = worker.screening.pids()
            assert worker.drain(30) == 0
        assert time.monotonic() - t0 < 20  # killed at 0.9 x lease_s, not after the 120 s
        [job] = store.list_jobs(worker.db)
        assert job.state == JobState.FAILED and "screening helper process died" in (job.reason or "")
        assert ended(pid, 5)
        # the log event docs/operations.md names, at error level, once
        stuck = [e for e in logs if e["event"] == "screening_stuck"]
        assert [(e["log_level"], e["jobs"]) for e in stuck] == [("error", 1)] and stuck[0]["seconds"] >= 2
    finally:
        worker.stop(5)


def test_stop_abandons_pending_batches_without_hanging_and_leaves_them_leased(
    tmp_path: Path, tiny_weights: Path
) -> None:
    worker = _worker(tmp_path, tiny_weights)
    _queue(worker, 1)
    _occupy(worker, 20.0)
    worker.run_once()
    t0 = time.monotonic()
    worker.stop(timeout_s=0.5)
    assert time.monotonic() - t0 < 10
    [job] = store.list_jobs(worker.db)
    assert (job.state, _job(worker, job.job_id).lease_owner) == (JobState.RUNNING, worker.owner)  # for the reaper
    assert outbox.items(worker.db) == []
    assert worker._completer is not None and not worker._completer.is_alive()
    assert worker.screening.pids() == []


def test_a_batch_the_process_never_ran_goes_back_to_the_queue_without_an_attempt(
    tmp_path: Path, tiny_weights: Path
) -> None:
    worker = _worker(tmp_path, tiny_weights)
    try:
        _queue(worker, 1)
        for _ in range(3):  # one running, two more the pool hands to its process in advance
            _occupy(worker, 1.0)
        worker.run_once()  # queued behind them, not yet handed to the process
        worker.screening.close(wait=True)  # the sleeps end, the batch is cancelled
        assert worker.drain(30) == 0
        [job] = store.list_jobs(worker.db)
        assert (job.state, job.attempts, job.reason) == (JobState.QUEUED, 0, None)
        assert worker.stats.failed == 0 and outbox.items(worker.db) == []
    finally:
        worker.stop(5)


def test_a_checkpoint_that_does_not_load_stops_start_up_with_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError) as err:
        load_screening(_settings(tmp_path, missing))
    assert err.value.setting == "worker.weights" and "nowhere.json" in str(err.value)


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_torch_threads_in_the_screening_process_default_to_one_fewer_than_the_cores(
    cores: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADR 0008: ``worker.cpu_threads = 0`` gives the screening process one fewer than the cores
    (the main process has the other), at least one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert default_threads() == expected


@pytest.mark.parametrize("cpu_threads", [0, 3])
def test_cpu_threads_is_torchs_thread_count_in_the_screening_process(
    tmp_path: Path, tiny_weights: Path, cpu_threads: int
) -> None:
    """docs/configuration.md, worker.cpu_threads: the threads torch uses in the screening process;
    0 = one fewer than the cores this process may use (torch's own default there: one per core)."""
    import torch

    engine = load_screening(_settings(tmp_path, tiny_weights, worker={"cpu_threads": cpu_threads}))
    try:
        assert isinstance(engine, ScreeningProcess)
        got = engine.helper.call(torch.get_num_threads)
    finally:
        engine.close()
    assert got == (cpu_threads or default_threads()), got


def test_inline_mode_screens_and_records_in_the_worker_thread(tmp_path: Path, tiny_weights: Path) -> None:
    worker = _worker(tmp_path, tiny_weights, process=False, sender={"send": False})
    try:
        assert isinstance(worker.screening, InlineScreening)
        _queue(worker, 2)
        assert worker.run_once() == 2
        # recorded before run_once returned: no process, no completion thread
        assert [j.state for j in store.list_jobs(worker.db)] == [JobState.DONE, JobState.DONE]
        assert [i.state for i in outbox.items(worker.db)] == [OutboxState.SHADOW.value] * 2
        assert worker._completer is None
    finally:
        worker.stop(5)


def test_overlays_off_records_without_building(tmp_path: Path, tiny_weights: Path) -> None:
    worker = _worker(tmp_path, tiny_weights, reporting={"overlay": False})
    try:
        _queue(worker, 1)
        worker.run_once()
        assert worker.drain(60) == 0
        assert [j.state for j in store.list_jobs(worker.db)] == [JobState.DONE]
        assert outbox.items(worker.db) == []
        with worker.db.reading() as s:
            [timings] = s.execute(select(Result.timings_ms)).scalars().all()
        assert timings["report"] < 1.0  # nothing built
    finally:
        worker.stop(5)


class _Outcomes:
    """A stand-in engine that returns the outcomes it is given (the recording logic under test,
    not screening: a real engine cannot be made to produce an overlay error on demand)."""

    def __init__(self, make: Any, model: Any) -> None:
        self.make, self.model = make, model

    def submit(self, jobs: list[LeasedJob], paths: dict[str, Path]) -> Future[Any]:
        f: Future[Any] = Future()
        f.set_result(self.make(jobs))
        return f

    def warm_up(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def close(self, wait: bool = True) -> None:
        pass


def test_an_overlay_build_error_fails_the_job_with_the_reason(tmp_path: Path, tiny_weights: Path) -> None:
    finding = _findings(np.random.default_rng(3))[0]
    bad = np.zeros((2, 2, 2), np.float32)  # not an image: build_overlay refuses it

    def screened_with_bad_pixels(jobs: list[LeasedJob]) -> list[Any]:
        return [finish(Screened(j, knee_dx(rows=40, cols=32), bad, finding, {"decode": 1.0}), True) for j in jobs]

    model = load_screening(_settings(tmp_path, tiny_weights, process=False)).model
    worker = _worker(tmp_path, tiny_weights, screening=_Outcomes(screened_with_bad_pixels, model))
    try:
        _queue(worker, 1)
        worker.run_once()
        [job] = store.list_jobs(worker.db)
        assert job.state == JobState.FAILED
        # agent.errors.reason_of: a library's error by its class only, never its message
        assert job.reason == "overlay could not be built: ValueError"
        assert outbox.items(worker.db) == [] and worker.stats.failed == 1
    finally:
        worker.stop(5)


def test_finish_lets_go_of_pixels_and_saliency() -> None:
    finding = _findings(np.random.default_rng(3))[0]
    job = LeasedJob(1, 1, "x.dcm", InstanceRef("1.2", "1.2.3", "1.2.4", "1.2.5", "1.2.840.10008.1.2.1"))
    out = finish(Screened(job, knee_dx(rows=40, cols=32), np.zeros((40, 32), np.float32), finding, {}), True)
    assert not isinstance(out, Failed) and out.overlay is not None and out.overlay.data
    assert out.findings == dataclasses.replace(finding, saliency=None)


def test_a_batch_never_mixes_studies(tmp_path: Path, tiny_weights: Path) -> None:
    """Batches of 2: a study of one image goes alone, not paired with the next study's first (its
    result would wait for that image's screening too); the next study's two go together."""
    worker = _worker(tmp_path, tiny_weights, process=False)
    try:
        first = _queue(worker, 1)
        second = _queue(worker, 2)
        batches = [worker._lease_batch(), worker._lease_batch(), worker._lease_batch()]
        uids = [[j.ref.sop_instance_uid for j in b] for b in batches]
        assert uids == [[str(first[0].SOPInstanceUID)], [str(d.SOPInstanceUID) for d in second], []]
    finally:
        worker.stop(5)


# ---- what hospitals send: a bad value never costs a screening, and no value reaches a log or a reason -------------

_BAD = {"PatientBirthDate": "25/03/1945", "StudyTime": "12:30 PM", "PatientSex": "male"}


# 25/03/1945 however written (1945-03-25, 19450325 ...); a bare "1945" also turns up in random
# UIDs now and then, which are not the birth date
_BIRTH = re.compile(r"1945\D{0,2}0?3\D{0,2}25|25\D{0,2}0?3\D{0,2}1945")


def _no_phi(text: str) -> None:
    assert not _BIRTH.search(text), _BIRTH.search(text)
    for phi in ("25/03", PHI_NAME, PHI_NAME.split("^")[0], PHI_ID):
        assert phi not in text, phi


def test_a_film_with_a_day_first_birth_date_is_screened_and_leaves_no_phi(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """25/03/1945 made the overlay build fail (the job went DEAD, the date in three job_failed
    lines and on the status page): now the film is screened, the results carry an empty birth
    date, and no log line, reason or result holds the value, the name or the ID."""
    import logging

    import structlog

    from agent.logging import configure_logging
    from agent.reporting.builder import build_sr_bytes

    configure_logging("info", "json", salt="s")
    worker = _worker(tmp_path, tiny_weights, process=False)
    try:
        [ds] = _queue(worker, 1, **_BAD)
        assert worker.run_once() == 1
        [job] = store.list_jobs(worker.db)
        assert job.state == JobState.DONE and job.reason is None
        with worker.db.reading() as s:
            assert len(s.execute(select(Result)).scalars().all()) == 1
        [item] = outbox.items(worker.db)
        sc = pydicom.dcmread(worker.results.path(item.path))
        assert (sc.PatientBirthDate, sc.PatientSex, sc.StudyTime) == ("", "M", "")
        # the study's SR, as the sweep builds it from the spooled header
        with worker.db.reading() as s:
            [path] = s.execute(select(Instance.spool_path)).scalars().all()
        header = pydicom.dcmread(worker.spool.path(path), stop_before_pixels=True)
        sr = build_sr_bytes([header], [_findings(np.random.default_rng(3))[0]], 1, None)
        for built in (sr.data, worker.results.path(item.path).read_bytes()):
            assert not _BIRTH.search(built.decode("latin-1"))
        assert str(ds.PatientBirthDate) == "25/03/1945"  # the value was there to leak
    finally:
        worker.stop(5)
        logging.getLogger().handlers[0].flush()
        err = capsys.readouterr().err
        structlog.reset_defaults()
    assert "inference_done" in err
    _no_phi(err)


def test_a_bone_loss_film_with_bad_values_is_recorded_and_flagged(tmp_path: Path, tiny_weights: Path) -> None:
    """The overlay is built from the header as it was received (the stand-in engine forces a
    bone-loss finding: the tiny model cannot be made to give one); the patient is flagged by the
    study's SR commit, not by the screening one."""
    from screening_helpers import report_study

    from agent.db.registry import list_flagged

    finding = _findings(np.random.default_rng(3))[0]
    assert finding.bone_loss

    def screened(jobs: list[LeasedJob]) -> list[Any]:
        out = []
        for j in jobs:
            header = pydicom.dcmread(worker.spool.path(j.spool_path))
            out.append(finish(Screened(j, header, np.zeros((96, 80), np.float32), finding, {"decode": 1.0}), True))
        return out

    model = load_screening(_settings(tmp_path, tiny_weights, process=False)).model
    worker = _worker(tmp_path, tiny_weights, screening=_Outcomes(screened, model))
    try:
        _queue(worker, 1, **_BAD, SpecificCharacterSet="ISO-8859-1", StudyDate="11.02.2023")
        worker.run_once()
        [job] = store.list_jobs(worker.db)
        assert (job.state, job.reason) == (JobState.DONE, None)
        assert list_flagged(worker.db) == []  # the knee's decision waits for the study's SR
        assert report_study(worker.db, job.study_instance_uid)
        assert len(list_flagged(worker.db)) == 1
    finally:
        worker.stop(5)


@pytest.mark.parametrize(
    ("value", "noise", "window"),
    [(0, 0, True), (4095, 0, True), (2048, 0, False), (2048, 2, True), (2048, 2, False), (2048, 20, True)],
)
def test_blank_and_nearly_uniform_films_are_told_from_films(value: int, noise: int, window: bool) -> None:
    """agent/pipeline/load.py's thresholds against the factory's films (docs/dicom-values.md)."""
    from dicom_factory import pixels as factory_pixels

    from agent.pipeline.load import is_blank
    from model.io import read_pixels

    arr = np.full((320, 256), value, np.int32)
    if noise:
        arr += np.random.default_rng(5).integers(-noise, noise + 1, size=arr.shape)
    blank = set_pixels(knee_dx(rows=320, cols=256), arr, bits_stored=12)
    if not window:
        del blank.WindowCenter, blank.WindowWidth
    assert is_blank(read_pixels(blank))
    for bits in (8, 12, 16):
        film = set_pixels(knee_dx(rows=320, cols=256), factory_pixels(320, 256, bits=bits), bits_stored=bits)
        film.WindowCenter, film.WindowWidth = 2 ** (bits - 1), 2**bits
        assert not is_blank(read_pixels(film)), bits


def test_a_blank_film_is_skipped_not_failed(tmp_path: Path, tiny_weights: Path) -> None:
    """A uniform film was screened and reported as bone loss (P 0.95): now SKIPPED, with the reason."""
    from agent.pipeline.load import BLANK_REASON

    worker = _worker(tmp_path, tiny_weights, process=False)
    try:
        _queue(worker, 1, pixels=np.full((96, 80), 2048, np.int32))
        assert worker.run_once() == 1
        [job] = store.list_jobs(worker.db)
        assert (job.state, job.reason) == (JobState.SKIPPED, BLANK_REASON)
        assert outbox.items(worker.db) == [] and worker.stats.failed == 0
    finally:
        worker.stop(5)
