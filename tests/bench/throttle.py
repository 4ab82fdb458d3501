"""Run a bench on fewer CPUs' worth of time than the machine has: a CPU quota for this process
and every process it starts afterwards (Orthanc, ``strnet serve`` and its helpers).

The machines this project is measured on differ in speed from session to session by up to about
a factor of two (docs/benchmarks.md). ``BENCH_CPUS=1.1`` gives the bench 1.1 cores'
worth of CPU time per wall second, spread over both cores (a 10 ms scheduling period, so the
stalls stay short): on a fast machine it shows what the figures would be on a slower one, with the
same code measured in the same session. A quota is not a slower core: a step that would take
twice as long runs at full speed and then waits; so it mimics the queueing of a busier or slower
machine, not every latency of it.

Linux only, as root; cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``). Without those it says
why and the bench is skipped rather than run unthrottled under a throttled label.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 10_000


def _cgroup_dirs(name: str) -> tuple[Path, Path, str]:
    """(parent, child, version) of the cgroup the quota goes into."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # v2, unified
        own = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split("::", 1)[-1]
        parent = root / own.lstrip("/")
        return parent, parent / name, "v2"
    if (root / "cpu" / "cpu.cfs_quota_us").exists():  # v1, cpu controller
        return root / "cpu", root / "cpu" / name, "v1"
    raise OSError("no cgroup cpu controller under /sys/fs/cgroup")


@contextlib.contextmanager
def cpu_quota(cpus: float) -> Iterator[str]:
    """Limit this process (and what it starts from now on) to ``cpus`` cores' worth of CPU.

    Yields a description; on leaving, moves this process back and removes the cgroup (children
    still alive then keep the quota until they end, which they do: the bench stops them first).
    """
    if cpus <= 0:
        raise ValueError(f"BENCH_CPUS must be positive, not {cpus}")
    if os.geteuid() != 0:
        raise PermissionError("a CPU quota needs root (it writes a cgroup)")
    parent, child, version = _cgroup_dirs(f"strnet-bench-{os.getpid()}")
    child.mkdir(exist_ok=True)
    quota_us = round(cpus * PERIOD_US)
    if version == "v2" and not (child / "cpu.max").exists():
        child.rmdir()
        raise OSError(f"the cpu controller is not enabled below {parent} (cgroup.subtree_control)")
    if version == "v2":
        (child / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
    else:
        (child / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (child / "cpu.cfs_quota_us").write_text(str(quota_us))
    (child / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield f"CPU quota {cpus:g} cores ({quota_us} us per {PERIOD_US} us, cgroup {version})"
    finally:
        (parent / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):  # busy: a child still inside; the kernel keeps it
            child.rmdir()
