"""The spool names its own files and writes atomically; the log scrubber drops PHI fields."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import structlog

from agent.logging import _warning_to_log, configure_logging, get_logger, hash_uid
from agent.spool import Spool


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


def test_running_sweep_clears_only_stale_partials(tmp_path: Path) -> None:
    import os
    import time

    spool = Spool(tmp_path / "spool")
    old, fresh = spool.tmp_dir / "old.part", spool.tmp_dir / "fresh.part"
    old.write_bytes(b"broken-off transfer")
    fresh.write_bytes(b"still arriving")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert spool.clear_partials(older_than_s=3600) == 1
    assert not old.exists() and fresh.exists()


def test_spooling_file_writes_our_head_then_the_fragments(tmp_path: Path) -> None:
    # What pynetdicom's chunked receive does with the file object: preamble, b"DICM" and its own
    # group 2 in three writes, then one write per P-DATA fragment, then (our handler) sync.
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from agent.ingest.chunked import SpoolingFile

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buf = BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    seen = []

    def head(m: FileMetaDataset, thread: object) -> bytes:
        seen.append(str(m.MediaStorageSOPInstanceUID))
        return b"OUR-HEAD"

    spool = Spool(tmp_path / "spool")
    f = SpoolingFile(spool.tmp_dir, head)
    for part in (b"\x00" * 128, b"DICM", buf.getvalue(), b"frag1-", b"frag2" * 300_000):
        f.write(part)
    f.file.flush()
    assert f.data() == b"frag1-" + b"frag2" * 300_000
    f.sync()
    f.close()
    assert seen == ["1.2.3.4"]
    assert Path(f.name).read_bytes() == b"OUR-HEAD" + b"frag1-" + b"frag2" * 300_000
    rel = spool.keep(Path(f.name))
    assert spool.path(rel).read_bytes().startswith(b"OUR-HEAD") and not list(spool.tmp_dir.iterdir())


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


def test_log_format_auto_is_json_off_a_terminal_and_text_on_one_and_site_salt_changes_the_hash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def last_line(fmt: str, salt: str = "s1") -> str:
        configure_logging("info", fmt, salt=salt)
        get_logger("t").info("probe", study_instance_uid="1.2.3")
        logging.getLogger().handlers[0].flush()
        return capsys.readouterr().err.strip().splitlines()[-1]

    try:
        off = json.loads(last_line("auto"))  # stderr captured: not a terminal
        assert off["event"] == "probe" and off["study"] == hash_uid("1.2.3")
        assert json.loads(last_line("auto", salt="s2"))["study"] != off["study"]  # agent.site_salt
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        on = last_line("auto")
        assert "probe" in on and not on.startswith("{")  # readable text on a terminal
        assert last_line("json").startswith("{")
    finally:
        structlog.reset_defaults()


def test_the_log_follows_stderr_when_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler writes to ``sys.stderr`` as it is now: configured while another stream was
    stderr (a test's capture, since closed), the log neither goes to that closed stream nor prints
    "--- Logging error ---" (the traceback that a later test's captured output then held)."""
    import io

    first, now = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", "json")
    first.close()
    monkeypatch.setattr(sys, "stderr", now)
    get_logger("t").info("after_the_swap", n=1)
    assert json.loads(now.getvalue().strip().splitlines()[-1])["event"] == "after_the_swap"
    assert "Logging error" not in now.getvalue()
    configure_logging("info", "console")  # as tests/conftest.py configures it


def test_library_warnings_become_json_events_without_the_values_they_quote(capsys: pytest.CaptureFixture[str]) -> None:
    """pydicom warns with the offending value quoted (a PN is PHI, a study UID is logged hashed
    only); such a warning was a raw line on stderr in the middle of a JSON log."""
    import warnings

    from pydicom.dataelem import DataElement

    configure_logging("info", "json", salt="s1")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert warnings.showwarning is _warning_to_log  # configure_logging's hook (catch_warnings keeps it)
        DataElement(0x0020000D, "UI", "1.2.840.99999.1.abc")  # pydicom: invalid UI value, quoted
        warnings.warn("Invalid value for VR PN: 'DOE^JANE'", UserWarning, stacklevel=1)
    logging.getLogger().handlers[0].flush()
    lines = capsys.readouterr().err.strip().splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert [e["event"] for e in events] == ["library_warning", "library_warning"]
    assert events[0]["category"] == "UserWarning" and events[0]["source"].startswith("pydicom/")
    text = "\n".join(lines)
    assert "DOE^JANE" not in text and "1.2.840.99999" not in text
    structlog.reset_defaults()


def test_helper_processes_log_as_their_parent_does() -> None:
    from agent.helper import HelperProcess
    from agent.logging import current_config

    configure_logging("warning", "json", salt="s2")
    helper = HelperProcess("logtest")
    try:  # a spawned process: it starts with nothing configured unless the parent's set-up is passed
        assert helper.call(current_config) == ("warning", "json", "s2")
    finally:
        helper.close()
        structlog.reset_defaults()


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ('The string "DOE^JANE" is unlikely to represent the intended person name', "The string", "DOE^JANE"),
        ("Invalid value for VR PN: 'O'BRIEN^PAT' at (0010,0010)", "Invalid value for VR PN", "BRIEN"),
        ("Invalid value for VR UI: '1.2.abc'", "VR UI", "1.2.abc"),
        ("study 1.2.840.113619.2.55.3 has no series", "has no series", "113619"),
    ],
)
def test_redact_warning(text: str, kept: str, gone: str) -> None:
    from agent.logging import redact_warning

    out = redact_warning(text)
    assert kept in out and gone not in out


def test_a_skipped_scheduler_tick_is_not_logged_and_other_scheduler_warnings_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The study-completion sweep polls every 0.5 s: a tick that comes while the last one works is
    skipped by design and must not fill the log with warnings; a missed run still warns."""
    configure_logging("info", "json", salt="s1")
    sched = logging.getLogger("apscheduler.scheduler")
    sched.warning('Execution of job "run" skipped: maximum number of running instances reached (1)')
    sched.warning('Run time of job "run" was missed by 0:00:03')
    out = capsys.readouterr()
    text = out.out + out.err
    assert "maximum number of running instances" not in text and "was missed by" in text
