"""Decode + preprocess of compressed films: in the screening process one after another (what
`worker.decode_processes = 0` does) against the decode pool (agent/pipeline/decode.py), same films,
same run. `make bench BENCH=tests/bench/bench_decode.py`; prints figures, asserts no time.

BENCH_N films (default 16) of BENCH_ROWS x BENCH_COLS (2500 x 2000) with 16-bit pixels, JPEG 2000
lossless, prepared as the screening path prepares them for the shipped checkpoint (load with its
caps and blank check, preprocess, texture features). Printed for the serial path and for the pool
(BENCH_PROCESSES, default: the agent's default, at least 2) in batches of 2 (the CPU's default
`worker.max_batch`) and of all the films at once: films per second, the ratio to serial, and the
peak RSS of the screening process and of it plus its decode processes (sampled every 20 ms).

    .venv/bin/python -m pytest tests/bench/bench_decode.py -s -q -o norecursedirs=
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
from dicom_factory import knee_dx, write
from pydicom.uid import JPEG2000Lossless

from agent.pipeline.decode import DecodePool, Prepared, PrepSpec, default_processes, prepare

N = int(os.environ.get("BENCH_N", "16"))
ROWS = int(os.environ.get("BENCH_ROWS", "2500"))
COLS = int(os.environ.get("BENCH_COLS", "2000"))
PROCESSES = int(os.environ.get("BENCH_PROCESSES", "0")) or max(2, default_processes())


def _film(seed: int) -> np.ndarray:
    """A 16-bit film with structure and noise (J2K lossless compresses it about 2:1, as a CR would)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ROWS, 0:COLS]
    img = 0.5 + 0.25 * np.sin(x / 37.0) * np.cos(y / 53.0) + 0.1 * np.exp(-((x - COLS / 2) ** 2) / (COLS * 40.0))
    img += 0.02 * rng.standard_normal((ROWS, COLS))
    return np.clip(img * 65535, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("j2k")
    out = []
    t0 = time.perf_counter()
    for i in range(N):
        ds = knee_dx(rows=8, cols=8, seed=i)
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsStored, ds.HighBit = 16, 15
        ds.WindowCenter, ds.WindowWidth = 32768, 65536
        ds.PixelData = _film(i).tobytes()
        ds.compress(JPEG2000Lossless)
        out.append(write(ds, d / f"film{i}.dcm"))
    size = sum(p.stat().st_size for p in out) / len(out) / 1e6
    print(f"\n{N} films {ROWS}x{COLS} 16-bit, JPEG 2000 lossless, {size:.1f} MB each (encoded in "
          f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def how() -> PrepSpec:
    from agent.pipeline.infer import Screener

    return Screener(device="cpu", threads=1).prep_spec(60_000_000)


class Peak:
    """Peak RSS of this process, and of it with its children, sampled every 20 ms."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.own = 0
        self.tree = 0
        self.cpu: dict[int, float] = {}  # CPU seconds (user + system) of each process seen, last sample
        self._stop = threading.Event()

    def _cpu_seconds(self) -> dict[int, float]:
        out = {}
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    def _sample(self) -> None:
        while not self._stop.is_set():
            own = self.me.memory_info().rss
            tree = own
            for child in self.me.children(recursive=True):
                try:
                    tree += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.own, self.tree = max(self.own, own), max(self.tree, tree)
            self.cpu.update(self._cpu_seconds())
            time.sleep(0.02)

    @contextmanager
    def running(self) -> Iterator[Peak]:
        start = self._cpu_seconds()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.cpu.update(self._cpu_seconds())
            self.cpu_s = sum(v - start.get(pid, 0.0) for pid, v in self.cpu.items())


def _timed(label: str, run: Callable[[], list[object]], serial_rate: float | None) -> float:
    with Peak().running() as peak:
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
    assert len(out) == N and all(isinstance(o, Prepared) for o in out)
    rate = N / seconds
    ratio = f", {rate / serial_rate:.2f} x serial" if serial_rate else ""
    print(f"{label:<34} {seconds:6.2f} s  {rate:5.2f} films/s{ratio}, CPU {peak.cpu_s / N * 1000:4.0f} ms/film "
          f"({peak.cpu_s / seconds:.2f} cores busy); peak RSS: screening process {peak.own / 2**20:4.0f} MB, "
          f"with decode processes {peak.tree / 2**20:4.0f} MB")  # fmt: skip
    return rate


def test_decode_serial_against_pool(films: list[Path], how: PrepSpec) -> None:
    print(f"{_cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before; "
          f"pool of {PROCESSES}")  # fmt: skip
    local = lambda p: prepare(p, how)  # noqa: E731 - the screening process's own path
    local(films[0])  # imports and first-call costs, out of the timing
    serial = _timed("serial (decode_processes = 0)", lambda: [local(p) for p in films], None)
    pool = DecodePool(PROCESSES)
    try:
        t0 = time.perf_counter()
        pool.prepare_all(films[:2], how, local)  # spawns the processes: paid once, at the first batch
        print(f"pool start-up (spawn + first 2 films): {time.perf_counter() - t0:.2f} s")

        def batches(size: int) -> list[object]:
            out: list[object] = []
            for i in range(0, N, size):
                out.extend(pool.prepare_all(films[i : i + size], how, local))
            return out

        _timed(f"pool of {PROCESSES}, batches of 2", lambda: batches(2), serial)
        _timed(f"pool of {PROCESSES}, one batch of {N}", lambda: batches(N), serial)
    finally:
        pool.close()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU not named"
