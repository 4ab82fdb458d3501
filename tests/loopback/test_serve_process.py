"""`strnet serve` as a process: clean stop on SIGTERM, `strnet echo`, and no PHI in any log line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import AGENT_AET, TEST_SCU_AET, require_tool
from dicom_factory import PHI_BIRTH, PHI_ID, PHI_NAME, compressed, knee_dx, write
from serve_process import ServeProcess, config_port, write_config


def strnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def test_no_phi_reaches_any_log_line_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    dcmsend = require_tool("dcmsend")
    config = write_config(tmp_path / "agent.toml", tmp_path / "var", log_level="debug")
    log = tmp_path / "serve.log"
    files = []
    good = knee_dx()
    files.append(write(good, tmp_path / "good.dcm"))
    files.append(write(knee_dx(body_part="CHEST", study_uid=good.StudyInstanceUID), tmp_path / "chest.dcm"))
    files.append(write(compressed(knee_dx(), "rle"), tmp_path / "rle.dcm"))
    bad = knee_dx()
    bad.PixelData = bad.PixelData[:100]
    files.append(write(bad, tmp_path / "bad.dcm"))
    young = knee_dx(birth_date="20200101")
    files.append(write(young, tmp_path / "young.dcm"))
    odd = knee_dx()
    odd.SpecificCharacterSet = "ISO_IR 999"  # pydicom warns while decoding its names (quoting values)
    files.append(write(odd, tmp_path / "odd.dcm"))
    with ServeProcess(config, log) as serve:
        port = str(config_port(config))
        sent = subprocess.run(
            [dcmsend, "-nh", "-aet", TEST_SCU_AET, "-aec", AGENT_AET, "127.0.0.1", port, *map(str, files)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr  # dcmsend reports per-file statuses, not in its exit code
        intruder = subprocess.run(
            [dcmsend, "-aet", "INTRUDER", "-aec", AGENT_AET, "127.0.0.1", port, str(files[0])],
            capture_output=True,
            timeout=60,
        )
        assert intruder.returncode != 0
        wrong_node = subprocess.run(  # a PACS node entry with the wrong called AE title
            [dcmsend, "-aet", TEST_SCU_AET, "-aec", "NOT_STRNET", "127.0.0.1", port, str(files[0])],
            capture_output=True,
            timeout=60,
        )
        assert wrong_node.returncode != 0
        echo = strnet("echo", "--config", str(config))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        jobs = json.loads(strnet("jobs", "list", "--config", str(config), "--format", "json").stdout)
        assert sorted(j["state"] for j in jobs) == ["QUEUED", "QUEUED", "QUEUED", "SKIPPED", "SKIPPED"]
        assert serve.terminate() == 0
    text = log.read_text()
    assert "instance_received" in text and "instance_refused" in text and "association_refused" in text
    assert "scp_stopped" in text
    for secret in (PHI_NAME, PHI_NAME.replace("^", " "), "Zyxwvut", "Qwertyuiop", PHI_ID, PHI_BIRTH):
        assert secret not in text, f"PHI value {secret!r} found in the log"
    events = [json.loads(line) for line in text.splitlines()]  # every line is JSON (log_format = json)
    (rejected,) = [e for e in events if e["event"] == "association_rejected"]
    assert rejected["called_ae"] == "NOT_STRNET" and rejected["calling_ae"] == TEST_SCU_AET
    assert "called ae title not recognised" in rejected["reason"].lower().replace("recognized", "recognised")
    assert any(e["event"] == "library_warning" for e in events)  # pydicom's, as an event of our own


def test_echo_fails_with_exit_1_when_nobody_listens(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", tmp_path / "var")
    out = strnet("echo", "--config", str(config), "--timeout-s", "3")
    assert out.returncode == 1
    assert "failed" in out.stdout
