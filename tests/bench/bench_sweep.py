"""Bench: the archive sweep at work beside live traffic (issue 22), through `strnet serve` (shipped model).

A real Orthanc holds ``BENCH_SWEEP_IMAGES`` (default 200) JPEG 2000 lossless knee images, two per
study, over two study dates. `strnet serve` runs with Orthanc as its ``query = true`` PACS, and
`strnet sweep` (as an admin runs it, beside serve) retrieves them by C-MOVE to serve's listener,
while the bench sends a live study (one small uncompressed knee image) to the listener every
``BENCH_LIVE_PACE_S`` seconds (default 3) by C-STORE. Results go back to Orthanc. The films are
model/synth's renderings, 1024 x 832 (``BENCH_SWEEP_SCALE=2``: upscaled to 2048 x 1664).

Run: ``make bench BENCH=tests/bench/bench_sweep.py`` or
``.venv/bin/python -m pytest tests/bench/bench_sweep.py -s -q -o norecursedirs= -o "python_files=bench_*.py"``.

Prints figures only (no timed assertions), with the goals of issue 22 beside them, both measured in
the same run, from the agent's own database:
- sweep throughput: swept images / (first swept image received -> last swept overlay delivered to
  Orthanc), per hour (goal >= 8,000/h);
- live latency per study: its image received -> its SR delivered to Orthanc (stored there),
  quiet period (``reporting.quiet_period_s`` = 1.0) included; p50 and p95 (goal p95 <= 3 s).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, serve_process

from bench.bench_screening import cpu_model, family_cpu_s, pct, settle, vm_hwm_mb
from bench.films import KneeFilms
from conftest import AGENT_AET, TEST_SCU_AET, free_port
from serve_process import ServeProcess, serve_doc, write_doc

from model.checkpoint import SHIPPED

N_IMAGES = int(os.environ.get("BENCH_SWEEP_IMAGES", "200"))
LIVE_PACE_S = float(os.environ.get("BENCH_LIVE_PACE_S", "3"))
SCALE = float(os.environ.get("BENCH_SWEEP_SCALE", "1"))  # 2: films of 2048 x 1664 instead of 1024 x 832
WEIGHTS = Path(os.environ.get("BENCH_WEIGHTS") or SHIPPED)
SWEEP_DAYS = (date(2026, 1, 5), date(2026, 1, 6))
QUIET_PERIOD_S = 1.0
GOAL_IMAGES_PER_HOUR = 8_000
GOAL_LIVE_P95_S = 3.0
STRNET = str(Path(sys.executable).with_name("strnet"))
BASES = 4


def make_films(folder: Path, n_images: int, seed: int = 20261207) -> tuple[list[Path], Path]:
    """(archive files: ``n_images`` J2K lossless knee DX, two per study over SWEEP_DAYS; the live
    stream's uncompressed image). Synthetic films (tests/bench/films.py) with
    noise of their own, so no two images are alike."""
    from pydicom.uid import JPEG2000Lossless, generate_uid

    films = KneeFilms(np.random.default_rng(seed), bases=BASES, scale=SCALE)
    archive = []
    for s in range(n_images // 2):
        study_uid = generate_uid()
        day = SWEEP_DAYS[s % len(SWEEP_DAYS)]
        for n in range(2):
            ds = films.film(s, n, study_uid, datetime(day.year, day.month, day.day, 9, 0))
            ds.compress(JPEG2000Lossless)
            path = folder / f"a{s:04d}_{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            archive.append(path)
    live = folder / "live.dcm"  # each live study sends it under UIDs of its own
    films.film(90_000, 0, generate_uid(), datetime.now()).save_as(live, enforce_file_format=True)
    return archive, live


def serve_config(path: Path, data_dir: Path, port: int, pacs_port: int) -> Path:
    doc = serve_doc(data_dir, port, peers=("ORTHANC", TEST_SCU_AET), weights=WEIGHTS, pacs_port=pacs_port)
    doc["reporting"] = {"quiet_period_s": QUIET_PERIOD_S}
    doc["pacs"][0]["query"] = True
    doc["sweep"] = {"max_studies_per_hour": 100000}
    return write_doc(path, doc)


class LiveStream(threading.Thread):
    """One live study every ``pace_s`` seconds, each on its own association, until stopped."""

    def __init__(self, template: Path, port: int, pace_s: float) -> None:
        super().__init__(daemon=True)
        self.template, self.port, self.pace_s = template, port, pace_s
        self.stop = threading.Event()
        self.sent: list[str] = []  # study UIDs
        self.failed = 0

    def run(self) -> None:
        from pydicom import dcmread
        from pydicom.uid import generate_uid
        from pynetdicom import AE
        from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

        ae = AE(ae_title=TEST_SCU_AET)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        t0 = time.monotonic()
        for i in range(1_000_000):
            if self.stop.wait(max(0.0, t0 + i * self.pace_s - time.monotonic())):
                return
            ds = dcmread(self.template)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyDate = ds.ContentDate = datetime.now().strftime("%Y%m%d")
            assoc = ae.associate("127.0.0.1", self.port, ae_title=AGENT_AET)
            ok = False
            if assoc.is_established:
                rsp = assoc.send_c_store(ds)
                ok = rsp is not None and int(getattr(rsp, "Status", -1)) == 0
                assoc.release()
            if ok:
                self.sent.append(str(ds.StudyInstanceUID))
            else:
                self.failed += 1


@pytest.mark.timeout(3600)  # generating the films alone takes minutes
def test_bench_sweep_beside_live_traffic(tmp_path: Path) -> None:
    if not WEIGHTS.exists():
        pytest.skip(f"checkpoint {WEIGHTS} is missing: this bench measures the real model")
    from sqlalchemy import select

    from agent.db.engine import Database
    from agent.db.models import Instance, Job, OutboxItem, Result, Study
    from agent.demo.orthanc import LocalOrthanc
    from agent.queue.sweeps import SWEEP_PRIORITY

    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.monotonic()
    folder = tmp_path / "films"
    folder.mkdir()
    archive, live_file = make_films(folder, N_IMAGES)
    mb = sum(p.stat().st_size for p in archive) / 1e6
    from pydicom import dcmread

    one = dcmread(archive[0], stop_before_pixels=True)
    print(f"\n[bench_sweep] {len(archive)} J2K lossless knee DX of {one.Rows}x{one.Columns} "
          f"({mb / len(archive):.2f} MB each) in Orthanc, {len(archive) // 2} studies over {len(SWEEP_DAYS)} "
          f"days; live: one uncompressed image every {LIVE_PACE_S:g} s "
          f"(generated in {time.monotonic() - t0:.0f} s)")  # fmt: skip
    agent_port = free_port()
    data_dir = tmp_path / "var"
    pacs = LocalOrthanc("ORTHANC", modalities={"agent": (AGENT_AET, "127.0.0.1", agent_port)})
    serve = db = stream = None
    try:
        pacs.start()
        for f in archive:
            pacs.upload(f)
        config = serve_config(tmp_path / "agent.toml", data_dir, agent_port, pacs.dicom_port)
        serve = ServeProcess(config, tmp_path / "serve.log").start(timeout_s=120)
        settle(serve.pid)
        load0 = os.getloadavg()
        cpu0 = family_cpu_s(serve.pid)
        t_sweep = time.monotonic()
        sweep = subprocess.Popen([STRNET, "sweep", "--config", str(config), "--from", SWEEP_DAYS[0].isoformat(),
                                  "--to", SWEEP_DAYS[-1].isoformat()], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
        stream = LiveStream(live_file, agent_port, LIVE_PACE_S)
        stream.start()
        db = Database(f"sqlite:///{data_dir / 'strnet.db'}")

        def swept_delivered() -> int:
            with db.reading() as s:  # an overlay per swept instance (an instance's job has the sweep's priority)
                return len(set(s.execute(
                    select(OutboxItem.id).join(Study, Study.id == OutboxItem.study_id)
                    .join(Instance, Instance.study_id == Study.id).join(Job, Job.instance_id == Instance.id)
                    .where(Job.priority == SWEEP_PRIORITY, OutboxItem.kind == "sc", OutboxItem.state == "DELIVERED")
                ).scalars()))  # fmt: skip

        deadline = time.monotonic() + 600 + 20 * len(archive)
        while swept_delivered() < len(archive):
            assert serve.proc is not None and serve.proc.poll() is None, "strnet serve died"
            assert time.monotonic() < deadline, "the swept images were not all screened and delivered in time"
            time.sleep(1.0)
        stream.stop.set()
        stream.join(timeout=30)
        sweep_out, _ = sweep.communicate(timeout=120)
        sweep_wall_s = time.monotonic() - t_sweep
        cpu_agent = family_cpu_s(serve.pid) - cpu0
        load1 = os.getloadavg()
        peak_rss_mb = vm_hwm_mb(serve.pid)

        def live_srs_in() -> bool:
            with db.reading() as s:
                rows = s.execute(
                    select(Study.study_instance_uid).join(OutboxItem, OutboxItem.study_id == Study.id)
                    .where(OutboxItem.kind == "sr", OutboxItem.state == "DELIVERED")
                ).scalars().all()  # fmt: skip
            return set(stream.sent) <= set(rows)

        deadline = time.monotonic() + 120
        while not live_srs_in():
            assert time.monotonic() < deadline, "a live study's SR was not delivered"
            time.sleep(0.5)
        with db.reading() as s:
            swept = s.execute(
                select(Instance.received_at).join(Job, Job.instance_id == Instance.id)
                .where(Job.priority == SWEEP_PRIORITY)
            ).scalars().all()  # fmt: skip
            last_overlay = max(s.execute(
                select(OutboxItem.delivered_at).join(Instance, Instance.study_id == OutboxItem.study_id)
                .join(Job, Job.instance_id == Instance.id)
                .where(Job.priority == SWEEP_PRIORITY, OutboxItem.kind == "sc")
            ).scalars().all())  # fmt: skip
            latencies: list[float] = []
            parts: dict[str, list[float]] = {"screening": [], "quiet period + SR build": [], "SR send": []}
            for uid in stream.sent:
                study_id = s.execute(select(Study.id).where(Study.study_instance_uid == uid)).scalar_one()
                rx = min(s.execute(select(Instance.received_at).where(Instance.study_id == study_id)).scalars())
                sr_created, sr = min(s.execute(select(OutboxItem.created_at, OutboxItem.delivered_at).where(
                    OutboxItem.study_id == study_id, OutboxItem.kind == "sr")).all())  # fmt: skip
                screened = max(s.execute(select(Result.created_at).where(Result.study_id == study_id)).scalars())
                latencies.append((sr - rx).total_seconds())
                parts["screening"].append((screened - rx).total_seconds())
                parts["quiet period + SR build"].append((sr_created - screened).total_seconds())
                parts["SR send"].append((sr - sr_created).total_seconds())
    finally:
        if stream is not None:
            stream.stop.set()
        if db is not None:
            db.engine.dispose()
        if serve is not None:
            serve.close()
        pacs.stop()

    assert len(swept) == len(archive), f"{len(swept)} swept instances for {len(archive)} in the archive"
    window_s = (last_overlay - min(swept)).total_seconds()
    per_hour = len(swept) / window_s * 3600
    p50, p95 = pct(latencies, 50), pct(latencies, 95)
    print(f"[bench_sweep] `strnet sweep`: {sweep_out.strip().splitlines()[-1] if sweep_out.strip() else '?'}")
    print(f"  sweep throughput  {per_hour:10,.0f} images/hour  (goal >= {GOAL_IMAGES_PER_HOUR:,}: "
          f"{'meets' if per_hour >= GOAL_IMAGES_PER_HOUR else 'BELOW'}; {len(swept)} images in {window_s:.1f} s, "
          f"first swept image received -> last swept overlay delivered)")  # fmt: skip
    print(f"  live latency      p50 {p50:.2f} s  p95 {p95:.2f} s  max {max(latencies):.2f} s over "
          f"{len(latencies)} studies (goal p95 <= {GOAL_LIVE_P95_S:g} s: "
          f"{'meets' if p95 <= GOAL_LIVE_P95_S else 'ABOVE'}; received -> SR delivered to Orthanc, quiet period "
          f"{QUIET_PERIOD_S:g} s included); {stream.failed} live sends failed")  # fmt: skip
    print("  live, p50/p95 s   " + ", ".join(f"{k} {pct(v, 50):.2f}/{pct(v, 95):.2f}" for k, v in parts.items()))
    print(f"  strnet serve CPU  {cpu_agent / max(1, len(swept) + len(latencies)) * 1000:.0f} ms per image "
          f"(with helpers); peak RSS {peak_rss_mb:.0f} MB; sweep wall {sweep_wall_s:.0f} s")
    print(f"  machine           {cpu_model()}, {os.cpu_count()} cores; load average before {load0[0]:.2f}, "
          f"after {load1[0]:.2f} (other processes on the machine count in it)")
