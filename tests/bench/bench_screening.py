"""Bench: K synthetic knee studies routed from a real Orthanc through `strnet serve` (shipped model).

Run: ``make bench`` or
``BENCH_K=5 .venv/bin/python -m pytest tests/bench/bench_screening.py -s -q -o norecursedirs=``;
``BENCH_PACE_S=2`` routes one study every 2 s instead of all at once (latency without a queue);
``BENCH_CPUS=1.1`` runs Orthanc and the agent on 1.1 cores' worth of CPU time (tests/bench/
throttle.py: what the figures would be on a slower machine, as root).

Prints figures only (no timed assertions), with the goals of issue 4 beside them:
images per hour (uncompressed ~10 MB DX), p50/p95 processing latency per study with the quiet
period excluded, the mean of each stage (receive, decode, preprocess, infer, report, send) and the
peak RSS (VmHWM) of the `strnet serve` process plus those of its helper processes (the screening
process with the model loaded, ``worker.process``; the SR helper, ``reporting.build_processes``);
its CPU per image counts the helpers too, and is shown per process.

Definitions (all from the agent's own database and log, no clocks of the bench's):
- throughput window: first instance received -> last overlay delivered to Orthanc;
- study processing latency: (first image received -> last overlay of the study delivered)
  + the SR build (sources read, built, written and recorded: ``report_built`` log events)
  + (SR recorded -> SR delivered). Only the waiting is excluded: the quiet period and the
  study-completion sweep's poll for its end;
- receive: the C-STORE handler's time per instance (``instance_received`` log events);
  decode/preprocess/infer/report: ``results.timings_ms`` (infer = the batch's time / batch size,
  report = overlay build); send: outbox ``created_at -> delivered_at`` per object (includes
  waiting for the sender's next poll, at most ``sender.poll_s``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, serve_process

from bench.throttle import cpu_quota
from conftest import AGENT_AET, free_port
from serve_process import ServeProcess, serve_doc, write_doc

from model.checkpoint import SHIPPED

K_STUDIES = int(os.environ.get("BENCH_K", "20"))
# 0: the K studies are routed back to back (a burst: throughput, and latency under a queue).
# > 0: one study every BENCH_PACE_S seconds, as a PACS forwards during a working day; the
# latency is then that of a study that does not queue behind the others (throughput reflects
# the pace, not the capacity).
PACE_S = float(os.environ.get("BENCH_PACE_S", "0"))
# > 0: a CPU quota of this many cores for Orthanc, strnet serve and its helpers (throttle.py).
CPUS = float(os.environ.get("BENCH_CPUS", "0"))
# The shipped checkpoint; BENCH_WEIGHTS=<checkpoint .json> only to try the bench's plumbing with
# another one (the figures then say nothing about the product).
WEIGHTS = Path(os.environ.get("BENCH_WEIGHTS") or SHIPPED)
ROWS, COLS = 2500, 2000  # 16-bit: 10 MB of pixel data per image
QUIET_PERIOD_S = 1.0
POLL_S = 0.2
BASE_IMAGES = 6  # rendered by the generator, then upscaled; each sent image gets its own noise
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
GOAL_IMAGES_PER_HOUR = 15_000
GOAL_P95_S = 2.0
GOAL_RSS_GB = 1.5


def make_studies(folder: Path, k: int, seed: int = 20261127) -> list[tuple[str, list[Path]]]:
    """``k`` studies of 2 to 4 uncompressed 2500 x 2000 16-bit DX knee images."""
    from pydicom.uid import generate_uid
    from skimage.transform import resize

    from model.synth.acquisition import VENDOR_PROFILES
    from model.synth.dicom_writer import ImageHeader, build_dataset
    from model.synth.generate import generate_one

    rng = np.random.default_rng(seed)
    bases = []
    for i in range(BASE_IMAGES):  # the generator renders 1024 x 832: upscale a few renderings
        img, patient = generate_one(rng, laterality="LR"[i % 2], view="AP", profile="acme_dx")
        up = resize(img.stored, (ROWS, COLS), order=1, preserve_range=True, anti_aliasing=False)
        bases.append((up.astype(np.uint16), img, patient))
    profile = VENDOR_PROFILES["acme_dx"]
    top = (1 << profile.bits_stored) - 1
    scale = img.stored.shape[1] / COLS
    studies = []
    for s in range(k):
        study_uid = generate_uid()
        files = []
        for n in range(int(rng.integers(2, 5))):
            stored, img, patient = bases[int(rng.integers(0, BASE_IMAGES))]
            noisy = np.minimum(stored + rng.integers(0, 24, stored.shape, dtype=np.uint16), top)
            side = "LR"[n % 2]
            hdr = ImageHeader(
                patient_id=f"BENCH{s:04d}",
                patient_name=f"SYNTHETIC^BENCH{s:04d}",
                birth_date=datetime(1950, 1, 1).date(),
                sex=patient.sex,
                age=patient.age,
                height_m=patient.height_m,
                weight_kg=patient.weight_kg,
                study_uid=study_uid,
                series_uid=generate_uid(),
                sop_uid=generate_uid(),
                study_datetime=datetime(2026, 1, 5, 9, 0),
                accession=f"B{s:06d}",
                study_id="1",
                series_number=n + 1,
                instance_number=1,
                laterality=side,
                view="AP",
                kvp=img.kvp,
                magnification=img.magnification,
                burned_in_text=False,
            )
            ds = build_dataset(noisy, hdr, profile)
            spacing = f"{profile.pixel_spacing_mm * scale:.4f}"
            ds.ImagerPixelSpacing = [spacing, spacing]
            ds.PixelSpacing = [f"{profile.pixel_spacing_mm * scale / img.magnification:.4f}"] * 2
            path = folder / f"s{s:03d}_{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append((study_uid, files))
    return studies


def serve_config(path: Path, data_dir: Path, port: int, pacs_port: int) -> Path:
    doc = serve_doc(data_dir, port, peers=("ORTHANC",), weights=WEIGHTS, pacs_port=pacs_port)
    doc["reporting"] = {"quiet_period_s": QUIET_PERIOD_S}
    doc["sender"]["poll_s"] = POLL_S
    return write_doc(path, doc)


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (the SR helper processes of ``reporting.build_processes``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # ended meanwhile
            pass
    return out


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family_cpu_s(pid: int) -> float:
    return sum(cpu_s(p) for p in family(pid))


def comm(pid: int) -> str:
    """The process's name: strnet-screen, strnet-sr (agent/helper.py), python for serve itself."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_by_name(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid`` ("serve") and of each helper process, by name."""
    out: dict[str, float] = {}
    for p in family(pid):
        name = "serve" if p == pid else comm(p)
        out[name] = out.get(name, 0.0) + cpu_s(p)
    return out


def cpu_model() -> str:
    """The processor's name and family (machines of one kind here differ in speed by up to 2x)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return "?"
    return f"{info.get('model name', '?')}, family {info.get('cpu family', '?')} model {info.get('model', '?')}"


def settle(pid: int, timeout_s: float = 20.0) -> None:
    """Wait until ``strnet serve`` and its helpers are idle (the worker's warm-up is done)."""
    deadline = time.monotonic() + timeout_s
    before = family_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = family_cpu_s(pid)
        if now - before < 0.05:
            return
        before = now


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    idx = q / 100 * (len(ordered) - 1)
    lo, hi = int(np.floor(idx)), int(np.ceil(idx))
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (idx - lo)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def test_bench_screening_through_orthanc(tmp_path: Path) -> None:
    if not WEIGHTS.exists():
        pytest.skip(
            f"checkpoint {WEIGHTS} is missing: this bench measures the real model "
            "(made by `strnet model train`; BENCH_WEIGHTS=<checkpoint.json> tries the bench with another)"
        )
    from sqlalchemy import select

    from agent.db.engine import Database
    from agent.db.models import Instance, OutboxItem, Result, StudyReport
    from agent.demo.orthanc import LocalOrthanc

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per REST call otherwise
    t0 = time.monotonic()
    folder = tmp_path / "studies"
    folder.mkdir()
    studies = make_studies(folder, K_STUDIES)
    n_images = sum(len(f) for _, f in studies)
    mb = sum(p.stat().st_size for _, fs in studies for p in fs) / 1e6
    print(
        f"\n[bench_screening] {K_STUDIES} studies, {n_images} images of {ROWS}x{COLS} 16-bit DX, "
        f"explicit VR LE, {mb / n_images:.1f} MB each (generated in {time.monotonic() - t0:.0f} s)"
    )

    agent_port = free_port()
    data_dir = tmp_path / "var"
    pacs = LocalOrthanc("ORTHANC", modalities={"agent": (AGENT_AET, "127.0.0.1", agent_port)})
    serve = None
    db = None
    throttled = contextlib.ExitStack()
    try:
        if CPUS > 0:  # before Orthanc and strnet serve start: they inherit the quota
            try:
                print(f"[bench_screening] {throttled.enter_context(cpu_quota(CPUS))}")
            except OSError as exc:
                pytest.skip(f"BENCH_CPUS={CPUS:g} asked for, but no CPU quota can be set here: {exc}")
        pacs.start()
        config = serve_config(tmp_path / "agent.toml", data_dir, agent_port, pacs.dicom_port)
        for _, files in studies:
            for f in files:
                pacs.upload(f)
        t_start = time.monotonic()
        serve = ServeProcess(config, tmp_path / "serve.log").start(timeout_s=120)
        print(
            f"[bench_screening] strnet serve listening after {time.monotonic() - t_start:.1f} s "
            f"(checkpoint {WEIGHTS}{'' if WEIGHTS == Path(SHIPPED) else ', NOT the shipped one'}); "
            f"peak RSS so far {vm_hwm_mb(serve.pid):.0f} MB"
        )

        orthanc_pid = pacs._proc.pid if pacs._proc is not None else None
        settle(serve.pid)
        cpu0 = (family_cpu_s(serve.pid), cpu_s(orthanc_pid) if orthanc_pid else float("nan"))
        by_name0 = cpu_by_name(serve.pid)
        t_route = time.monotonic()
        for i, (uid, _) in enumerate(studies):  # one study after another, each its association
            if PACE_S > 0:
                time.sleep(max(0.0, t_route + i * PACE_S - time.monotonic()))
            pacs.route_study(pacs.study_id_for(uid), "agent", synchronous=True)
        route_s = time.monotonic() - t_route
        db = Database(f"sqlite:///{data_dir / 'strnet.db'}")

        def done() -> bool:
            with db.reading() as s:
                reports = s.execute(select(StudyReport.id)).all()
                states = s.execute(select(OutboxItem.state)).scalars().all()
            return len(reports) >= K_STUDIES and len(states) == n_images + K_STUDIES and set(states) == {"DELIVERED"}

        deadline = time.monotonic() + 120 + 10 * n_images
        while not done():
            assert serve.proc is not None and serve.proc.poll() is None, "strnet serve died"
            assert time.monotonic() < deadline, "not every study was reported and delivered in time"
            time.sleep(0.5)
        peak_rss_mb = vm_hwm_mb(serve.pid)
        helpers: dict[str, float] = {}  # by name, summed (build_processes = 2: two strnet-sr)
        for p in family(serve.pid)[1:]:
            if (hwm := vm_hwm_mb(p)) == hwm:  # nan: ended meanwhile
                helpers[comm(p)] = helpers.get(comm(p), 0.0) + hwm
        helper_rss_mb = sum(helpers.values())  # 0 without helpers
        by_name = {k: v - by_name0.get(k, 0.0) for k, v in cpu_by_name(serve.pid).items()}
        wall_s = time.monotonic() - t_route
        cpu_agent = family_cpu_s(serve.pid) - cpu0[0]
        cpu_orthanc = (cpu_s(orthanc_pid) if orthanc_pid else float("nan")) - cpu0[1]

        with db.reading() as s:
            inst = {i.id: (i.study_id, i.received_at) for i in s.execute(select(Instance)).scalars()}
            results = [
                (r.instance_id, r.study_id, r.created_at, dict(r.timings_ms or {}))
                for r in s.execute(select(Result)).scalars()
            ]
            out = [
                (o.kind, o.study_id, o.sop_instance_uid, o.created_at, o.delivered_at)
                for o in s.execute(select(OutboxItem)).scalars()
            ]
            overlay_of = {r.overlay_sop_instance_uid: r.instance_id for r in s.execute(select(Result)).scalars()}
    finally:
        if db is not None:
            db.engine.dispose()
        if serve is not None:
            serve.close()
        pacs.stop()
        throttled.close()

    # -- figures -------------------------------------------------------------------------------
    assert len(results) == n_images, f"{len(results)} results for {n_images} images"
    first_rx = min(rx for _, rx in inst.values())
    last_overlay = max(d for k, _, _, _, d in out if k == "sc" and d is not None)
    window_s = (last_overlay - first_rx).total_seconds()
    per_hour = n_images / window_s * 3600

    receive_ms: list[float] = []
    sr_build_s: dict[str, float] = {}  # SR SOP Instance UID -> build seconds
    for line in (tmp_path / "serve.log").read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "instance_received" and not event.get("duplicate"):
            receive_ms.append(float(event.get("ms", "nan")))
        elif event.get("event") == "report_built":
            sr_build_s[str(event.get("sop_instance_uid"))] = float(event.get("ms", "nan")) / 1000
    stages = {name: [t[name] for *_, t in results if name in t] for name in ("decode", "preprocess", "infer", "report")}

    latencies: list[float] = []
    end_to_end: list[float] = []
    parts: dict[str, list[float]] = {"arriving": [], "screening": [], "sending": [], "sr build": [], "sr send": []}
    for study_id in {sid for sid, _ in inst.values()}:
        rx = [t for sid, t in inst.values() if sid == study_id]
        overlays = [d for k, sid, _, _, d in out if k == "sc" and sid == study_id]
        srs = [(c, d) for k, sid, _, c, d in out if k == "sr" and sid == study_id]
        sr_uids = {uid for k, sid, uid, _, _ in out if k == "sr" and sid == study_id}
        images_s = (max(overlays) - min(rx)).total_seconds()
        build_s = sum(sr_build_s[uid] for uid in sr_uids)  # KeyError: a report_built event is missing
        report_s = sum((d - c).total_seconds() for c, d in srs)
        latencies.append(images_s + build_s + report_s)
        screened = max(c for _, sid, c, _ in results if sid == study_id)
        parts["arriving"].append((max(rx) - min(rx)).total_seconds())
        parts["screening"].append((screened - max(rx)).total_seconds())
        parts["sending"].append((max(overlays) - screened).total_seconds())
        parts["sr build"].append(build_s)
        parts["sr send"].append(report_s)
        end_to_end.append((max(d for _, d in srs) - min(rx)).total_seconds())

    send_ms = [(d - c).total_seconds() * 1000 for k, _, _, c, d in out if d is not None]
    assert len(overlay_of) == n_images

    ok = "meets" if per_hour >= GOAL_IMAGES_PER_HOUR else "BELOW"
    if PACE_S > 0:  # the arrivals set the rate: a paced run cannot show the capacity
        offered = n_images / len(studies) * 3600 / PACE_S
        ok = f"judged in a burst run; paced arrivals offer {offered:,.0f}/h"
    print(
        f"[bench_screening] {'burst' if PACE_S <= 0 else f'paced, one study every {PACE_S:g} s'}"
        f"{f', on a quota of {CPUS:g} cores' if CPUS > 0 else ''}: "
        f"Orthanc routed {n_images} images ({mb:.0f} MB) in {route_s:.1f} s; "
        f"all SRs and overlays in PACS {wall_s:.1f} s after routing began"
    )
    print(
        f"  throughput        {per_hour:10,.0f} images/hour  (goal >= {GOAL_IMAGES_PER_HOUR:,}: {ok};"
        f" {n_images} images in {window_s:.1f} s, first received -> last overlay delivered)"
    )
    p50, p95 = pct(latencies, 50), pct(latencies, 95)
    print(
        f"  study latency     p50 {p50:6.2f} s   p95 {p95:6.2f} s   (goal p95 <= {GOAL_P95_S} s: "
        f"{'meets' if p95 <= GOAL_P95_S else 'ABOVE'}; quiet period excluded, SR build included)"
    )
    print(
        f"  (for reference: last image received -> SR in PACS, with the {QUIET_PERIOD_S:g} s quiet "
        f"period and the 2 s sweep: p50 {pct(end_to_end, 50):.2f} s, p95 {pct(end_to_end, 95):.2f} s)"
    )
    print(
        "  study latency parts, p50 / p95 (s): "
        + "; ".join(f"{k} {pct(v, 50):.2f} / {pct(v, 95):.2f}" for k, v in parts.items())
        + "  (first -> last image received; -> last result recorded; -> last overlay delivered;"
        " SR sources read -> recorded; SR outbox -> delivered)"
    )
    print("  stage means per image (ms):")
    print(f"    receive    {mean(receive_ms):8.1f}   (C-STORE handler: validate, spool write + fsync, commit)")
    for name, values in stages.items():
        print(f"    {name:<10} {mean(values):8.1f}")
    print(f"    send       {mean(send_ms):8.1f}   (outbox row -> delivered, incl. <= {POLL_S * 1000:.0f} ms poll wait)")
    print(
        f"  CPU per image, routing to last delivery: strnet serve with its helper processes "
        f"{cpu_agent / n_images * 1000:.0f} ms "
        f"({', '.join(f'{k} {v / n_images * 1000:.0f}' for k, v in sorted(by_name.items()) if v > 0.005)}), "
        f"Orthanc {cpu_orthanc / n_images * 1000:.0f} ms (2 cores give 480 ms per image at 15,000/h)"
    )
    total_rss_mb = peak_rss_mb + (helper_rss_mb if helper_rss_mb == helper_rss_mb else 0.0)  # nan: none
    print(
        f"  peak RSS (VmHWM) of strnet serve {peak_rss_mb:,.0f} MB + helpers {helper_rss_mb:,.0f} MB "
        f"({', '.join(f'{k} {v:,.0f}' for k, v in sorted(helpers.items()))}) "
        f"= {total_rss_mb:,.0f} MB  (goal <= {GOAL_RSS_GB} GB: "
        f"{'meets' if total_rss_mb <= GOAL_RSS_GB * 1024 else 'ABOVE'})"
    )
    print(
        f"  machine: {os.cpu_count()} CPUs ({cpu_model()}), load average {os.getloadavg()[0]:.1f} "
        "(the machine is shared: figures vary with what else runs)"
    )
