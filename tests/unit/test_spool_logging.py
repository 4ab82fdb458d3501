"""The spool names its own files and writes atomically; the log scrubber drops PHI fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import structlog

from agent.ingest.spool import Spool
from agent.logging import configure_logging, get_logger, hash_uid


def test_write_is_complete_and_named_by_us(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    rel = spool.write([b"abc", b"def"])
    assert spool.path(rel).read_bytes() == b"abcdef"
    assert list(spool.entries()) == [rel]
    assert not list((tmp_path / "spool" / "tmp").iterdir())
    assert len(Path(rel).name) == 36  # 32 hex characters + .dcm


def test_paths_cannot_leave_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError):
        spool.path("../../etc/passwd")


def test_partials_are_cleared(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / "tmp" / "x.dcm.part").write_bytes(b"half")
    assert spool.clear_partials() == 1


def test_watermark(tmp_path: Path) -> None:
    assert Spool(tmp_path, min_free_bytes=0).has_room_for(1)
    assert not Spool(tmp_path, min_free_bytes=10**18).has_room_for(1)


def test_scrubber_drops_phi_and_hashes_study(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json", salt="s1")
    log = get_logger("t")
    log.info("probe", patient_name="Doe^Jane", PatientID="P123", study_instance_uid="1.2.3", job_id=7)
    logging.getLogger().handlers[0].flush()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    rec = json.loads(line)
    assert "Doe^Jane" not in line and "P123" not in line and "1.2.3" not in line
    assert rec["patient_name"] == "[redacted]" and rec["job_id"] == 7
    assert rec["study"] == hash_uid("1.2.3")
    structlog.reset_defaults()
