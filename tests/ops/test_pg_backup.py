"""Backups on PostgreSQL, exactly as docs/operations.md (13, Backups) gives them: Debian's
``pg_dump -Fc`` of a database an agent wrote, ``createdb`` + ``pg_restore`` into a new database,
``strnet db verify-audit`` on the restored one; one tampered row there reads BROKEN.

Runs on the throwaway PostgreSQL 15 cluster (tests/pg_cluster.py) whatever the engine under test;
host, port and user are the cluster's (the guide's are the site's).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_cluster import PG_BIN, PgCluster, engine_under_test
from screening_helpers import bilateral_study, send_study, wait_for

from agent.audit import trail
from agent.config import load_settings
from agent.db.engine import open_database
from agent.queue.store import list_jobs

# on PostgreSQL whatever the engine under test: the PostgreSQL pass (Makefile PG_TESTS) would repeat it
ONCE = pytest.mark.skipif(engine_under_test() == "postgresql", reason="runs on PostgreSQL in the SQLite pass")


def strnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120)


def pg(cluster: PgCluster, tool: str, *args: str) -> None:
    """One of Debian's PostgreSQL 15 client tools against the test cluster."""
    argv = [str(PG_BIN / tool), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{tool}: {out.stderr}"


def config_for(tmp_path: Path, name: str, url: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[agent]\ndata_dir = "{(tmp_path / name).as_posix()}"\ndatabase_url = "{url}"\n', encoding="utf-8")
    return path


@ONCE
def test_pg_dump_restore_then_verify_audit_ok_and_a_tampered_row_broken(
    make_agent: Any, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    url = pg_cluster.fresh_database()
    source_db = url.rsplit("/", 1)[1]
    agent = make_agent(agent={"database_url": url})
    assert agent.scheduler is not None
    # [backup] is SQLite's online copy: on PostgreSQL the agent schedules none (pg_dump does it)
    assert agent.scheduler.get_job("database_backup") is None and agent.scheduler.get_job("heartbeat") is not None
    send_study(agent, bilateral_study())  # 4 instances: rows and their audit events, through the agent
    # the dump is taken while the agent goes on receiving (8 more studies, 32 instances)
    more = threading.Thread(target=lambda: [send_study(agent, bilateral_study()) for _ in range(8)])
    more.start()
    dump = tmp_path / "strnet.dump"
    try:
        wait_for(lambda: len(list_jobs(agent.db)) > 8, timeout_s=30)
        pg(pg_cluster, "pg_dump", "-Fc", "-d", source_db, "-f", str(dump))
    finally:
        more.join(timeout=60)
    agent.stop(grace_s=1)
    with agent.db.reading() as s:
        live = trail.verify(s)
    assert live.ok and live.events >= 36

    pg(pg_cluster, "createdb", "-T", "template0", "strnet_restored")
    pg(pg_cluster, "pg_restore", "-d", "strnet_restored", "--no-owner", str(dump))
    restored = config_for(tmp_path, "restored", pg_cluster.url("strnet_restored"))

    ok = strnet("db", "verify-audit", "--config", str(restored))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("audit chain OK: ") and 8 < int(ok.stdout.split()[3]) <= live.events
    jobs = list_jobs(open_database(load_settings(restored, search_default=False)))
    assert 8 < len(jobs) <= 36  # the rows came back with their chain, as of the dump's snapshot

    dsn = f"host=127.0.0.1 port={pg_cluster.port} user=postgres dbname=strnet_restored"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE audit_events SET actor = 'someone-else' WHERE id = (SELECT min(id) + 1 FROM audit_events)")
    broken = strnet("db", "verify-audit", "--config", str(restored))
    assert broken.returncode == 1 and broken.stdout.startswith("audit chain BROKEN at event"), broken.stdout
    with agent.db.reading() as s:  # the dump's source is untouched
        assert trail.verify(s).ok
