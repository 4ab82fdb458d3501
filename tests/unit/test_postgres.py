"""PostgreSQL as an engine: the driver's absence is a configuration error, every session runs in UTC,
and the audit chain's content depends neither on the session's time zone nor on the engine.

Runs on the session's throwaway PostgreSQL 15 cluster (tests/pg_cluster.py) whatever
STRNET_TEST_DATABASE says; the CLI runs are real ``python -m agent`` processes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import agent_settings
from pg_cluster import PgCluster, engine_under_test
from screening_helpers import report_study
from sqlalchemy import func, select, text

from agent.audit import trail
from agent.db.engine import Database, upgrade
from agent.db.models import AuditEvent, FlaggedPatient, Instance, Study
from agent.domain import AlgorithmInfo, Eligibility, Findings, IncomingInstance, InstanceRef
from agent.errors import ConfigError
from agent.queue import screening, store

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


def test_a_database_that_cannot_be_reached_is_a_one_line_error_without_a_traceback(tmp_path: Path) -> None:
    from conftest import free_port

    cfg = _config(tmp_path, f"postgresql://strnet@127.0.0.1:{free_port()}/strnet")  # nobody listens there
    out = _strnet("db", "upgrade", "--config", str(cfg))
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("database error: ") and "Traceback" not in out.stderr, out.stderr
    assert "[SQL" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["mysql://strnet@127.0.0.1/strnet", "postgresql+psycopg2://s@127.0.0.1/s", "nonsense"])
def test_a_database_other_than_sqlite_or_postgresql_with_psycopg_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Database(url)
    assert caught.value.setting == "agent.database_url"


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
    import psycopg  # the server's default, which a session that sets nothing gets (tests/pg_cluster.py)

    with psycopg.connect(f"host=127.0.0.1 port={pg_cluster.port} user=postgres dbname=postgres") as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == (BERLIN,)


def _append(db: Database, n: int) -> None:
    with db.transaction() as s:
        for i in range(n):
            trail.append(s, "patient_record", actor=f"user{i}", action="R", object_id=str(i), detail={"n": i})


def test_verify_audit_is_ok_on_postgresql_with_the_session_zone_in_berlin(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    url = pg_cluster.empty_database()
    cfg = _config(tmp_path, url)
    migrated = _strnet("db", "upgrade", "--config", str(cfg), tz=BERLIN)
    assert migrated.returncode == 0 and "database at revision" in migrated.stdout, migrated.stderr
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


def test_strnet_db_backup_on_postgresql_is_a_configuration_error_naming_pg_dump(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    out = _strnet("db", "backup", str(tmp_path / "b"), "--config", str(_config(tmp_path, pg_cluster.fresh_database())))
    assert out.returncode == 2 and "pg_dump" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "b").exists()


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


# -- two writers on PostgreSQL: a new study and a newly flagged patient are created once -----------

WRITERS = 2
ROUNDS = 15


def _incoming(study_uid: str, n: int, patient_id: str) -> IncomingInstance:
    uid = f"{study_uid}.{n}"
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", uid, study_uid, f"{study_uid}.1", "1.2.840.10008.1.2.1")
    return IncomingInstance(
        ref=ref, spool_path=f"d/{uid}.dcm", sha256=hashlib.sha256(uid.encode()).hexdigest(), size_bytes=10,
        calling_ae="TESTSCU", peer_host="127.0.0.1", eligibility=Eligibility(True, None), patient_id=patient_id,
        patient_name="Doe^Jane", study_date="20260301",
    )  # fmt: skip


FINDINGS = Findings(
    probability=0.9, threshold=0.4, bone_loss=True, p_osteoporosis_given_bone_loss=0.5, severity="osteoporosis",
    t_score=-2.8, t_score_low=-3.8, t_score_high=-1.8, interval_coverage=0.9,
    algorithm=AlgorithmInfo("STR-Net", "test", "0" * 64),
)  # fmt: skip


def _together(calls: list[Any], timeout_s: float = 60) -> list[Any]:
    """Run the calls at the same moment, one thread each (each with its own engine: its own
    PostgreSQL session, as another process would have); their results, or what they raised."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - the test reports whatever a writer raised
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return out


def test_two_writers_create_one_study_and_one_flagged_patient(pg_cluster: PgCluster) -> None:
    url = pg_cluster.fresh_database()
    dbs = [Database(url) for _ in range(WRITERS)]
    owner = "writer"
    for k in range(ROUNDS):
        # the instances of one new study arrive on two associations at once
        study_uid = f"1.2.826.0.1.{k}"
        outcomes = _together(
            [partial(store.record_instance, d, _incoming(study_uid, i, f"P{k}")) for i, d in enumerate(dbs)]
        )
        assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
        # two studies of one new patient are screened positive, then reported (the SR's commit
        # flags the patient) at once
        for i in range(WRITERS):
            store.record_instance(dbs[0], _incoming(f"1.2.826.0.2.{k}.{i}", 0, f"Q{k}"))
        leased = store.lease(dbs[0], owner, 1000, 60.0)  # this round's jobs (the first step's too)
        jobs = [j for j in leased if j.ref.study_instance_uid.startswith(f"1.2.826.0.2.{k}.")]
        for j in jobs:
            assert screening.record_screening(dbs[0], j.job_id, owner, FINDINGS, {}, None, [], send=False)
        flagged = _together(
            [partial(report_study, d, j.ref.study_instance_uid) for d, j in zip(dbs, jobs, strict=True)]
        )  # fmt: skip
        assert flagged == [True] * WRITERS, flagged
    with dbs[0].reading() as s:
        per_study = s.execute(
            select(Study.study_instance_uid, func.count(Instance.id)).join(Instance).group_by(Study.id)
        ).all()
        keys = s.execute(select(FlaggedPatient.patient_key)).scalars().all()
    assert sorted(n for uid, n in per_study if uid.startswith("1.2.826.0.1.")) == [WRITERS] * ROUNDS
    assert sorted(keys) == sorted(f"Q{k}" for k in range(ROUNDS))
    with dbs[0].reading() as s:
        assert trail.verify(s).ok
    for d in dbs:
        d.dispose()


def test_a_writer_waiting_for_its_file_does_not_hold_up_another_writer(pg_cluster: PgCluster) -> None:
    # the audit chain's advisory lock is held from the append to the commit: taken after the
    # spool file is durable (before_commit), so another association's commit does not wait for
    # this one's fsync
    url = pg_cluster.fresh_database()
    first, second = Database(url), Database(url)
    syncing, synced = threading.Event(), threading.Event()

    def slow_fsync() -> None:
        syncing.set()
        assert synced.wait(30)

    held = threading.Thread(
        target=store.record_instance,
        args=(first, _incoming("1.2.826.0.3.1", 0, "R1")),
        kwargs={"before_commit": slow_fsync},
    )
    held.start()
    try:
        assert syncing.wait(30)
        other = _together([partial(store.record_instance, second, _incoming("1.2.826.0.3.2", 0, "R2"))], timeout_s=10)
        assert other[0] is not None and not isinstance(other[0], BaseException), other
    finally:
        synced.set()
        held.join(30)
    with first.reading() as s:
        assert trail.verify(s).ok
        assert s.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 2
    first.dispose()
    second.dispose()
