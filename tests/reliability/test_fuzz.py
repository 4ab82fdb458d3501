"""Fuzzing slice for `make test`: mutated datasets and mutated PDUs against one in-process agent.

STRNET_FUZZ_CASES sets the number of cases per generator (default 300, so 600 in all);
`make bench` runs 10,000 (tests/bench/bench_fuzz.py). See fuzz_core.py for the properties.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from fuzz_core import DatasetFuzzer, PduFuzzer, assert_healthy

CASES = int(os.environ.get("STRNET_FUZZ_CASES", "300"))
FUZZ_SCP = {"acse_timeout_s": 2.0, "network_timeout_s": 2.0, "dimse_timeout_s": 5.0, "max_instance_mb": 4}
NO_BACKUP = {"enabled": False}  # the scheduled database backup writes data_dir/backups: not under test here


@pytest.mark.slow
def test_fuzzed_datasets_never_crash_hang_or_write_outside_the_spool(make_agent: Any) -> None:
    agent = make_agent(scp=FUZZ_SCP, backup=NO_BACKUP)
    outcomes = DatasetFuzzer(agent).run(CASES)
    print(f"dataset fuzz: {CASES} cases: {dict(outcomes)}")
    assert sum(outcomes.values()) >= CASES
    assert outcomes["status_C210"] + outcomes["status_A900"] > 0  # the mutations do reach the checks
    assert_healthy(agent, grace_s=10)


@pytest.mark.slow
def test_fuzzed_pdus_never_crash_hang_or_write_outside_the_spool(make_agent: Any) -> None:
    agent = make_agent(scp=FUZZ_SCP, backup=NO_BACKUP)
    outcomes = PduFuzzer(agent).run(CASES)
    print(f"PDU fuzz: {CASES} cases: {dict(outcomes)}")
    assert sum(outcomes.values()) >= CASES
    assert_healthy(agent, grace_s=10)
