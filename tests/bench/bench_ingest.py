"""Ingest throughput: DCMTK ``storescu`` into the agent and into DCMTK ``storescp``, same run.

``make bench`` runs it (not part of ``make test``); figures are printed, nothing is timed-asserted.
N instances (env BENCH_N, default 30) of a 2500 x 2000 16-bit DX (10 MB, explicit VR) are sent
over loopback in one association to (a) ``strnet serve`` as a subprocess (fsync per file, a
committed job row per instance, worker off) and (b) ``storescp`` writing into a temporary
folder (no fsync). The two are measured alternately, best of three each. Printed: MB/s of each,
the ratio agent/storescp (goal >= 1.0) and the peak RSS (VmHWM) of ``strnet serve`` while
receiving (goal < 400 MB, no model loaded).

    .venv/bin/python -m pytest tests/bench/bench_ingest.py -s -q -o norecursedirs=
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import dicom_factory as factory
import numpy as np
import pydicom
from conftest import AGENT_AET, TEST_SCU_AET, free_port, require_tool
from serve_process import ServeProcess, config_port, write_config

N = int(os.environ.get("BENCH_N", "30"))
ROUNDS = 3
ROWS, COLS = 2500, 2000
REF_AET = "REFSCP"
# The reference is storescp as shipped (max PDU 16 KiB). Also measured, for information: storescp
# with the largest PDU DCMTK negotiates (the agent announces "unlimited", which storescu caps at
# the same 128 KiB), which shows how much of the difference is PDU size.
BIG_PDU = "131072"


def make_files(folder: Path, n: int) -> tuple[list[Path], int]:
    """``n`` distinct 10 MB DX instances (same pixels, own UIDs); returns (files, total bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=(ROWS, COLS), dtype=np.uint16).tobytes()
    ds = factory.knee_dx(rows=64, cols=64)  # small to build, then the big pixel data
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelData = pixels
    study = pydicom.uid.generate_uid()
    files: list[Path] = []
    for i in range(n):
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        files.append(factory.write(ds, folder / f"dx{i:03d}.dcm"))
    return files, sum(f.stat().st_size for f in files)


def wait_echo(port: int, called: str, timeout_s: float = 60.0) -> None:
    echoscu = require_tool("echoscu")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            [echoscu, "-aet", TEST_SCU_AET, "-aec", called, "127.0.0.1", str(port)],
            capture_output=True, timeout=30, check=False,
        )
        if out.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"no C-ECHO answer from {called} on port {port}")


def storescu(port: int, called: str, files: list[Path]) -> float:
    """Send all files in one association; return the wall time in seconds."""
    exe = require_tool("storescu")
    t0 = time.perf_counter()
    out = subprocess.run(
        [exe, "-aet", TEST_SCU_AET, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    return elapsed


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def run_agent(work: Path, files: list[Path], round_no: int) -> tuple[float, int, int]:
    """One timed send into a fresh ``strnet serve``; returns (seconds, VmHWM kB, idle RSS kB)."""
    data_dir = work / f"agent{round_no}"
    config = write_config(work / f"agent{round_no}.toml", data_dir)
    port = config_port(config)
    serve = ServeProcess(config, work / f"serve{round_no}.log")
    try:
        serve.start(timeout_s=120)
        wait_echo(port, AGENT_AET)
        idle_rss = vm_kb(serve.pid, "VmRSS")
        elapsed = storescu(port, AGENT_AET, files)
        peak = vm_kb(serve.pid, "VmHWM")
        with sqlite3.connect(data_dir / "strnet.db") as con:
            jobs = con.execute("SELECT count(*) FROM jobs").fetchone()[0]
        assert jobs == len(files), f"{jobs} jobs for {len(files)} instances"
        assert serve.terminate() == 0
    finally:
        serve.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    return elapsed, peak, idle_rss


def run_storescp(work: Path, files: list[Path], round_no: int, pdu: str | None) -> float:
    exe = require_tool("storescp")
    name = f"storescp{round_no}-{pdu or 'default'}"
    out_dir = work / name
    out_dir.mkdir()
    port = free_port()
    with open(work / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, "-aet", REF_AET, *(["-pdu", pdu] if pdu else []), "-od", str(out_dir), str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        wait_echo(port, REF_AET)
        elapsed = storescu(port, REF_AET, files)
        stored = [p for p in out_dir.iterdir() if p.is_file()]
        assert len(stored) == len(files), f"storescp wrote {len(stored)} of {len(files)} files"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    shutil.rmtree(out_dir, ignore_errors=True)
    return elapsed


def test_bench_ingest_agent_vs_storescp(tmp_path: Path) -> None:
    files, total = make_files(tmp_path / "send", N)
    mb = total / 1e6
    times: dict[str, list[float]] = {"agent": [], "storescp": [], "storescp-bigpdu": []}
    peaks: list[int] = []
    idles: list[int] = []
    receivers = list(times)
    for r in range(ROUNDS):
        shift = r % len(receivers)  # alternate the order from round to round
        for who in receivers[shift:] + receivers[:shift]:
            if who == "agent":
                s, peak, idle = run_agent(tmp_path, files, r)
                peaks.append(peak)
                idles.append(idle)
            else:
                s = run_storescp(tmp_path, files, r, BIG_PDU if who == "storescp-bigpdu" else None)
            times[who].append(s)
    best = {who: mb / min(t) for who, t in times.items()}
    print()
    print(f"ingest bench: {N} x {total / N / 1e6:.1f} MB DX (explicit VR), storescu over loopback,"
          f" one association, best of {ROUNDS}, order rotated each round")
    for who, t in times.items():
        print(f"  {who:<16} MB/s per round: " + ", ".join(f"{mb / s:.0f}" for s in t))
    print(f"  agent (strnet serve; fsync per file, job row committed before Success): "
          f"{best['agent']:.0f} MB/s")
    print(f"  storescp (as shipped, max PDU 16 KiB, no fsync): {best['storescp']:.0f} MB/s")
    print(f"  storescp -pdu {BIG_PDU} (no fsync), for information: "
          f"{best['storescp-bigpdu']:.0f} MB/s")
    print(f"  RATIO agent/storescp: {best['agent'] / best['storescp']:.2f}  (goal >= 1.0); "
          f"agent/storescp-bigpdu: {best['agent'] / best['storescp-bigpdu']:.2f}")
    print(f"  strnet serve peak RSS (VmHWM) while receiving: {max(peaks) / 1024:.0f} MB"
          f"  (idle before sending: {max(idles) / 1024:.0f} MB; goal < 400 MB)")
