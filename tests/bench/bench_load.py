"""Load: 4 concurrent associations of 10 MB DX for N minutes while the worker screens, then a
burst of 1,000 instances over 8 associations. `make bench` only; figures are printed, nothing is
timed-asserted except that no acknowledged instance is lost.

Environment: STRNET_BENCH_MINUTES (default 5), STRNET_BENCH_BURST (default 1000),
STRNET_BENCH_WEIGHTS (tiny = a tiny random STR-Net, the default, which measures the agent's own
plumbing; shipped = model/weights, which adds the real model's CPU time), STRNET_BENCH_DRAIN_MAX_S
(default 1800: the longest wait for the backlog to drain).

`strnet serve` runs as a subprocess (worker on, shadow mode: results built and recorded, not
sent, so no PACS peer competes for the two CPUs). Printed per phase: p50/p99 C-STORE response
time, instances/s and MB/s, peak RSS (VmHWM) of the server, lost instances (acknowledged but no
job: must be 0) and the time the backlog takes to drain after the last C-STORE.

    .venv/bin/python -m pytest tests/bench/bench_load.py -s -q -o norecursedirs=
"""

from __future__ import annotations

import copy
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import AGENT_AET, TEST_SCU_AET, free_port
from dicom_factory import DX_PRESENTATION, knee_dx
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
from serve_fork import ServeFork

from model.checkpoint import SHIPPED

MINUTES = float(os.environ.get("STRNET_BENCH_MINUTES", "5"))
BURST = int(os.environ.get("STRNET_BENCH_BURST", "1000"))
WEIGHTS = os.environ.get("STRNET_BENCH_WEIGHTS", "tiny")
DRAIN_MAX_S = float(os.environ.get("STRNET_BENCH_DRAIN_MAX_S", "1800"))


def _config(path: Path, data: Path, port: int, weights: Path) -> Path:
    path.write_text(f"""
[agent]
data_dir = "{data}"
min_free_disk_mb = 0
log_format = "json"
log_level = "warning"

[scp]
ae_title = "{AGENT_AET}"
bind = "127.0.0.1"
port = {port}
max_associations = 16

[[scp.peers]]
ae_title = "{TEST_SCU_AET}"
host = "127.0.0.1"

[worker]
enabled = true
weights = "{weights}"
device = "cpu"

[reporting]
quiet_period_s = 2.0

[sender]
send = false

[backup]
enabled = false

[web]
enabled = false
""")
    return path


class Sender:
    """One association storing copies of ``template`` with fresh UIDs; records latencies and acks."""

    def __init__(self, port: int, template: object) -> None:
        self.port = port
        self.template = template
        self.latencies: list[float] = []
        self.acked: list[str] = []
        self.failed = 0
        self.bytes = 0

    def run(self, until: float | None = None, count: int | None = None) -> None:
        ae = AE(ae_title=TEST_SCU_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=AGENT_AET)
        assert assoc.is_established
        size = len(self.template.PixelData)  # type: ignore[attr-defined]
        study = generate_uid()
        n = 0
        try:
            while (until is None or time.monotonic() < until) and (count is None or n < count):
                ds = copy.copy(self.template)
                ds.SOPInstanceUID = generate_uid()
                ds.StudyInstanceUID = study if n % 4 else generate_uid()
                study = ds.StudyInstanceUID
                ds.SeriesInstanceUID = generate_uid()
                t0 = time.perf_counter()
                rsp = assoc.send_c_store(ds)
                self.latencies.append(time.perf_counter() - t0)
                n += 1
                if rsp is not None and int(rsp.get("Status", -1)) == 0:
                    self.acked.append(str(ds.SOPInstanceUID))
                    self.bytes += size
                else:
                    self.failed += 1
        finally:
            assoc.release()


def _rss_kb(pid: int, key: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _db(data: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    con = sqlite3.connect(f"file:{data / 'strnet.db'}?mode=ro", uri=True, timeout=30)
    try:
        return list(con.execute(sql).fetchall())
    finally:
        con.close()


def _phase(name: str, senders: list[Sender], wall_s: float, data: Path, pid: int) -> None:
    lat = np.array([x for s in senders for x in s.latencies]) * 1000
    acked = [u for s in senders for u in s.acked]
    mb = sum(s.bytes for s in senders) / 1e6
    jobs = {u for (u,) in _db(data, "SELECT i.sop_instance_uid FROM jobs j JOIN instances i ON j.instance_id = i.id")}
    lost = [u for u in acked if u not in jobs]
    t0 = time.monotonic()
    while time.monotonic() - t0 < DRAIN_MAX_S:
        pending = _db(data, "SELECT count(*) FROM jobs WHERE state IN ('QUEUED','RUNNING','RECEIVED')")[0][0]
        if pending == 0:
            break
        time.sleep(1)
    drain = time.monotonic() - t0
    states = dict(_db(data, "SELECT state, count(*) FROM jobs GROUP BY state"))
    print(
        f"\n[{name}] {len(lat)} C-STORE in {wall_s:.1f} s over {len(senders)} associations: "
        f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms, "
        f"{len(acked) / wall_s:.2f} instances/s, {mb / wall_s:.1f} MB/s; "
        f"failed statuses {sum(s.failed for s in senders)}; "
        f"peak RSS (VmHWM) {_rss_kb(pid) / 1024:.0f} MB; lost {len(lost)}; "
        f"backlog drained in {drain:.1f} s{'' if pending == 0 else ' (NOT drained: cap reached)'}; jobs {states}"
    )
    assert lost == [], f"{len(lost)} acknowledged instances have no job"


@pytest.mark.slow
@pytest.mark.timeout(int(MINUTES * 60 + 2 * DRAIN_MAX_S + 900))
def test_load(tmp_path: Path, tiny_weights: Path) -> None:
    weights = SHIPPED if WEIGHTS == "shipped" else tiny_weights
    port = free_port()
    data = tmp_path / "var"
    config = _config(tmp_path / "agent.toml", data, port, weights)
    print(f"\nparameters: {MINUTES} min x 4 associations of 10 MB DX, burst {BURST} over 8; weights {WEIGHTS}; "
          f"machine: {os.cpu_count()} CPUs (shared)")
    server = ServeFork(config, port, tmp_path / "serve.log", exec_=True)
    try:
        server.start(timeout_s=180)
        assert server.pid is not None
        big = knee_dx(rows=2500, cols=2000)  # 10 MB of 16-bit pixels
        senders = [Sender(port, copy.deepcopy(big)) for _ in range(4)]  # own copy: UIDs are set per send
        until = time.monotonic() + MINUTES * 60
        t0 = time.monotonic()
        threads = [threading.Thread(target=s.run, kwargs={"until": until}) for s in senders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _phase("sustained", senders, time.monotonic() - t0, data, server.pid)

        small = knee_dx(rows=256, cols=200)
        per = BURST // 8
        burst = [Sender(port, copy.deepcopy(small)) for _ in range(8)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=s.run, kwargs={"count": per}) for s in burst]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _phase("burst", burst, time.monotonic() - t0, data, server.pid)
    finally:
        server.stop()
