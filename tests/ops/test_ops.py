"""Operations: backup and restore, model install and hot swap, the doctor, the digest."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
from pacs_peer import PACS_AET, PacsPeer
from pg_cluster import engine_under_test
from serve_process import write_config

from agent.config import load_settings
from agent.db.engine import open_database
from agent.db.registry import list_flagged
from agent.ops.backup import backup_sqlite, prune
from agent.ops.digest import write_digest


def strnet(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120, input=stdin
    )


@pytest.fixture()
def screened_agent(make_agent: Any, tiny_weights: Path) -> Any:
    """An in-process agent that has screened a bilateral study (so the registry has a patient)."""
    from screening_helpers import bilateral_study, send_study, wait_for

    from agent.queue import outbox

    with PacsPeer() as pacs:
        agent = make_agent(
            worker={"enabled": True, "weights": str(tiny_weights), "device": "cpu", "max_wait_ms": 0},
            reporting={"quiet_period_s": 0.3},
            sender={"poll_s": 0.2},
            pacs=[{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}],
        )
        send_study(agent, bilateral_study(1))
        wait_for(
            lambda: len(outbox.items(agent.db)) == 3 and all(i.state == "DELIVERED" for i in outbox.items(agent.db))
        )
    return agent


@pytest.mark.skipif(
    engine_under_test() == "postgresql", reason="SQLite's online backup (strnet db backup): PostgreSQL has no file"
)
def test_backup_while_writing_restores_the_same_flagged_list(screened_agent: Any, tmp_path: Path) -> None:
    agent = screened_agent
    before = list_flagged(agent.db)
    assert len(before) == 1
    stop = threading.Event()

    def writer() -> None:  # keep the database busy while the backup runs
        from agent.audit import trail

        while not stop.is_set():
            with agent.db.transaction() as s:
                trail.append(s, "query", actor="load", detail={"x": 1})

    t = threading.Thread(target=writer)
    t.start()
    try:
        out = backup_sqlite(agent.settings.database_url, tmp_path / "backups")
    finally:
        stop.set()
        t.join()
    assert sqlite3.connect(out).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # restore into a fresh data directory, as docs/operations.md describes
    fresh = tmp_path / "restored"
    fresh.mkdir()
    shutil.copy(out, fresh / "strnet.db")
    restored = load_settings(None, search_default=False, agent={"data_dir": str(fresh)})
    db = open_database(restored)
    after = list_flagged(db)
    assert [(f.patient_id, f.probability, f.status) for f in after] == [
        (f.patient_id, f.probability, f.status) for f in before
    ]
    cfg = write_config(tmp_path / "restored.toml", fresh)
    listed = strnet("flagged", "list", "--format", "json", "--config", str(cfg))
    assert listed.returncode == 0, listed.stderr
    assert [r["patient_id"] for r in json.loads(listed.stdout)] == [before[0].patient_id]
    verify = strnet("db", "verify-audit", "--config", str(cfg))
    assert verify.returncode == 0 and "audit chain OK" in verify.stdout


def test_prune_keeps_recent_backups(tmp_path: Path) -> None:
    import os
    import time

    old, new = tmp_path / "strnet-20200101T000000.db", tmp_path / "strnet-20990101T000000.db"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 30 * 86400,) * 2)
    assert prune(tmp_path, keep_days=14) == [old]
    assert new.exists()


@pytest.mark.skipif(engine_under_test() == "postgresql", reason="[backup] is SQLite's (PostgreSQL: pg_dump)")
def test_scheduled_backup_every_hours_keep_days_and_no_wal_or_shm_beside_it(tmp_path: Path) -> None:
    """[backup]: a backup when the newest is older than every_hours, one self-contained file
    (docs/reliability.md once reported stray -wal/-shm companions), older than keep_days pruned."""
    import os
    import time
    from contextlib import closing

    from conftest import agent_settings

    from agent.scheduler import scheduled_backup

    settings = agent_settings(tmp_path / "var", backup={"every_hours": 2.0, "keep_days": 3.0})
    db = open_database(settings)
    folder = tmp_path / "var" / "backups"  # default: data_dir/backups
    scheduled_backup(db, settings)
    [first] = list(folder.iterdir())
    assert first.name.startswith("strnet-") and first.suffix == ".db"
    with closing(sqlite3.connect(first)) as copy:  # in WAL mode, opening it would leave -wal/-shm beside it
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    time.sleep(1.1)  # backups are named to the second
    scheduled_backup(db, settings)  # the newest is younger than every_hours: nothing
    assert list(folder.iterdir()) == [first]
    os.utime(first, (time.time() - 4 * 86400,) * 2)  # older than every_hours and keep_days
    time.sleep(1.1)  # backups are named to the second
    scheduled_backup(db, settings)
    [second] = list(folder.iterdir())  # a new one taken, the old one pruned; nothing else beside it
    assert second != first and second.suffix == ".db"
    db.dispose()


def test_digest_lists_new_flags(screened_agent: Any, tmp_path: Path) -> None:
    out = write_digest(screened_agent.db, tmp_path / "digest")
    lines = out.read_text().splitlines()
    assert lines[0].startswith("patient_id,patient_name") and len(lines) == 2


def test_model_install_verifies_records_and_the_next_results_carry_the_version(
    screened_agent: Any, tiny_weights: Path, tmp_path: Path
) -> None:
    from model.checkpoint import update_metadata

    new = update_metadata(tiny_weights, {"model_version": "tiny-test-1"}, tmp_path / "new" / "tiny1.json")
    cfg = write_config(tmp_path / "agent.toml", screened_agent.settings.data_dir)
    done = strnet("model", "install", str(new), "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    info = json.loads(strnet("model", "info", "--config", str(cfg)).stdout)
    assert info["model_version"] == "tiny-test-1"
    # a corrupt checkpoint is refused with a message naming the file
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(new, bad / "tiny1.json")
    (bad / "tiny1.safetensors").write_bytes(b"not weights")
    refused = strnet("model", "install", str(bad / "tiny1.json"), "--config", str(cfg))
    assert refused.returncode == 2 and "tiny1" in refused.stderr


def test_doctor_all_ok_against_orthanc_then_names_the_failing_check(tmp_path: Path, tiny_weights: Path) -> None:
    from agent.demo.orthanc import LocalOrthanc

    with LocalOrthanc("ORTHANC") as orthanc:
        cfg = write_config(
            tmp_path / "agent.toml",
            tmp_path / "var",
            worker=True,
            extra=f'\n[[pacs]]\nname = "main"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n',
        )
        cfg.write_text(cfg.read_text().replace("enabled = true", f'enabled = true\nweights = "{tiny_weights}"', 1))
        assert strnet("db", "upgrade", "--config", str(cfg)).returncode == 0
        ok = strnet("doctor", "--config", str(cfg))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        for name in ("configuration", "database", "audit chain", "spool space", "model", "pacs main"):
            assert f"OK    {name}" in ok.stdout
    down = strnet("doctor", "--config", str(cfg))  # Orthanc is stopped now
    assert down.returncode == 1
    assert "FAIL  pacs main" in down.stdout and "1 check(s) failed: pacs main" in down.stdout


def test_installed_model_is_swapped_in_and_the_next_results_carry_its_version(
    make_agent: Any, tiny_weights: Path, tmp_path: Path
) -> None:
    from screening_helpers import bilateral_study, send_study, wait_for

    from agent.db.models import Result
    from agent.pipeline.models import install
    from model.checkpoint import update_metadata

    with PacsPeer() as pacs:
        # no worker.weights: the agent serves what `strnet model install` points at
        agent = make_agent(
            # the shipped mode: the swap starts a new screening process after the old one's batches
            worker={"enabled": True, "process": True, "weights": None, "device": "cpu", "max_wait_ms": 0},
            reporting={"quiet_period_s": 0.3},
            sender={"poll_s": 0.2},
            pacs=[{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}],
        )
        before = agent.worker.screening.model.algorithm.version
        new = update_metadata(tiny_weights, {"model_version": "tiny-test-2"}, tmp_path / "m" / "tiny2.json")
        with structlog.testing.capture_logs() as logs:
            install(agent.settings, new)
            send_study(agent, bilateral_study(1)[:1])

            def versions() -> list[str]:
                with agent.db.reading() as s:
                    return [r.model_version for r in s.query(Result).all()]

            wait_for(lambda: len(versions()) == 1)
        assert before != "tiny-test-2"
        assert versions() == ["tiny-test-2"]
        # the log event docs/operations.md names, with both versions
        swaps = [(e["log_level"], e["old"], e["new"]) for e in logs if e["event"] == "model_swapped"]
        assert swaps == [("warning", before, "tiny-test-2")]
