"""Fuzzing at length for `make bench`: 10,000 cases (5,000 dataset + 5,000 PDU) by default.

STRNET_FUZZ_BENCH_CASES sets the cases per generator. Same generators and properties as
tests/reliability/test_fuzz.py (see tests/reliability/fuzz_core.py); prints the outcome counts
and the cases per second.

    .venv/bin/python -m pytest tests/bench/bench_fuzz.py -s -q -o norecursedirs=
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
from fuzz_core import DatasetFuzzer, PduFuzzer, assert_healthy

CASES = int(os.environ.get("STRNET_FUZZ_BENCH_CASES", "5000"))
FUZZ_SCP = {"acse_timeout_s": 2.0, "network_timeout_s": 2.0, "dimse_timeout_s": 5.0, "max_instance_mb": 4}
NO_BACKUP = {"enabled": False}  # the scheduled database backup writes data_dir/backups: not under test here


@pytest.mark.timeout(7200)
def test_fuzz_datasets_and_pdus(make_agent: Any) -> None:
    agent = make_agent(scp=FUZZ_SCP, backup=NO_BACKUP)
    for name, fuzzer in (("dataset", DatasetFuzzer(agent)), ("PDU", PduFuzzer(agent))):
        t0 = time.monotonic()
        outcomes = fuzzer.run(CASES)
        wall = time.monotonic() - t0
        print(f"\n{name} fuzz: {CASES} cases in {wall:.0f} s ({CASES / wall:.1f}/s): {dict(outcomes)}")
        assert sum(outcomes.values()) >= CASES
        assert_healthy(agent, grace_s=15)
