"""PostgreSQL as an engine: the driver's absence is a configuration error, every session runs in UTC,
and the audit chain's content depends neither on the session's time zone nor on the engine.

Runs on the session's throwaway PostgreSQL 15 cluster (tests/pg_cluster.py) whatever
STRNET_TEST_DATABASE says; the CLI runs are real ``python -m agent`` processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import agent_settings
from pg_cluster import PgCluster, engine_under_test
from sqlalchemy import select, text

from agent.audit import trail
from agent.db.engine import Database, upgrade
from agent.db.models import AuditEvent

BERLIN = "Europe/Berlin"


def _config(tmp_path: Path, url: str) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndata_dir = "{tmp_path.as_posix()}"\ndatabase_url = "{url}"\n', encoding="utf-8")
    return cfg


def _strnet(*args: str, tz: str | None = None, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PGTZ", None)
    if tz is not None:
        env["PGTZ"] = tz  # libpq sends it as the session's TimeZone when it connects
    prelude = code or ""
    argv = [sys.executable, "-c", f"import sys; {prelude}\nfrom agent.cli import main; sys.argv = ['strnet', *sys.argv[1:]]; main()", *args]  # noqa: E501
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env)


def test_a_postgresql_url_without_psycopg_is_a_configuration_error(tmp_path: Path) -> None:
    # the one stand-in here: psycopg is installed, so the child is made unable to import it
    cfg = _config(tmp_path, "postgresql://strnet@127.0.0.1:1/strnet")
    out = _strnet("db", "upgrade", "--config", str(cfg), code="sys.modules['psycopg'] = None")
    assert out.returncode == 2, out.stderr
    assert "configuration error: agent.database_url" in out.stderr and "psycopg" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_session_runs_in_utc_whatever_pgtz_says(pg_cluster: PgCluster, tmp_path: Path) -> None:
    url = pg_cluster.fresh_database()
    probe = (
        "from agent.db.engine import Database; from sqlalchemy import text; "
        f"db = Database({url!r}); c = db.engine.connect(); "
        "print(c.execute(text('SHOW TimeZone')).scalar(), c.execute(text('SELECT now()')).scalar().utcoffset())"
    )
    env = {**os.environ, "PGTZ": BERLIN}
    raw = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.split() == ["UTC", "0:00:00"]


def _append(db: Database, n: int) -> None:
    with db.transaction() as s:
        for i in range(n):
            trail.append(s, "patient_record", actor=f"user{i}", action="R", object_id=str(i), detail={"n": i})


def test_verify_audit_is_ok_on_postgresql_with_the_session_zone_in_berlin(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    url = pg_cluster.fresh_database()
    cfg = _config(tmp_path, url)
    db = Database(url)
    _append(db, 3)  # written from this process (no PGTZ)
    # a CLI command under Berlin writes its own audit event ("query"), and one more line of the chain
    listed = _strnet("flagged", "list", "--config", str(cfg), tz=BERLIN)
    assert listed.returncode == 0, listed.stderr
    with db.reading() as s:
        assert s.execute(select(AuditEvent.event_name).order_by(AuditEvent.id.desc())).scalars().first() == "Query"
        # stored as the instant it was: within a minute of now, not an hour off
        last = s.execute(select(AuditEvent.at).order_by(AuditEvent.id.desc())).scalars().first()
    assert last is not None and last.tzinfo is not None
    assert abs(datetime.now(UTC) - last) < timedelta(minutes=1)
    for tz in (BERLIN, "UTC", None):
        out = _strnet("db", "verify-audit", "--config", str(cfg), tz=tz)
        assert out.returncode == 0, (tz, out.stdout, out.stderr)
        assert out.stdout.strip() == "audit chain OK: 4 events"
    # and a broken chain is still seen as broken under Berlin
    with db.transaction() as s:
        s.execute(text("UPDATE audit_events SET actor = 'someone else' WHERE id = 2"))
    out = _strnet("db", "verify-audit", "--config", str(cfg), tz=BERLIN)
    assert out.returncode == 1 and "BROKEN at event 2" in out.stdout
    db.dispose()


def test_the_same_events_hash_the_same_on_sqlite_and_on_postgresql_in_berlin(
    pg_cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the same instants on both engines: the last microseconds before Berlin's clocks go forward
    start = datetime(2026, 3, 29, 0, 59, 59, 999_998, tzinfo=UTC)
    chains = []
    for url in (f"sqlite:///{tmp_path / 'a.db'}", pg_cluster.fresh_database()):
        if url.startswith("postgresql"):
            monkeypatch.setenv("PGTZ", BERLIN)  # this process's PostgreSQL sessions would start in Berlin
        stamps = iter([start + timedelta(microseconds=i) for i in range(4)])
        monkeypatch.setattr(trail, "utcnow", lambda stamps=stamps: next(stamps))
        db = Database(url)
        upgrade(db)
        _append(db, 4)
        with db.reading() as s:
            chains.append(s.execute(select(AuditEvent.hash).order_by(AuditEvent.id)).scalars().all())
            assert trail.verify(s).ok
            assert s.execute(select(AuditEvent.at).order_by(AuditEvent.id)).scalars().first() == start
        db.dispose()
    assert len(chains[0]) == 4 and chains[0] == chains[1]


def test_the_agents_of_the_tests_get_the_engine_under_test(tmp_path: Path) -> None:
    # STRNET_TEST_DATABASE=postgresql puts every test agent (agent_settings) on its own PostgreSQL
    # database, the same one each time its data directory is asked for
    settings = agent_settings(tmp_path)
    db = Database(settings.database_url)
    assert db.dialect == engine_under_test()
    assert agent_settings(tmp_path).database_url == settings.database_url
    db.dispose()
