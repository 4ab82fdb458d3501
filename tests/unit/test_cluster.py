"""Several agents on one database: the rows they coordinate through (agent/queue/cluster.py), the
inserts that let two agents create the same study or flag the same patient, the shared spool's
per-agent folders, and migration 0011_node. On the engine under test (a real SQLite file in WAL
mode; a fresh PostgreSQL database with STRNET_TEST_DATABASE=postgresql); the migration on SQLite."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import agent_settings
from sqlalchemy import select, update

from agent.clock import utcnow
from agent.db import registry
from agent.db.engine import Database, current_revision, upgrade
from agent.db.models import Base, FlaggedPatient, Instance, Node, OutboxItem, Result, Study, StudyClaim
from agent.domain import Eligibility, IncomingInstance, InstanceRef, JobState, OutboxState
from agent.ingest.scp import AssociationTracker
from agent.queue import cluster, outbox, store
from agent.queue.cluster import NodeScope
from agent.scheduler import build_scheduler, node_heartbeat
from agent.spool import Spool

ALPHA, BETA = NodeScope("alpha"), NodeScope("beta")
NEW_TABLES = ("nodes", "study_claims", "open_associations")


@pytest.fixture()
def db(db_url: str) -> Iterator[Database]:
    """A database of the engine under test (conftest's db_url: on PostgreSQL a fresh one)."""
    d = Database(db_url)
    upgrade(d)
    yield d
    d.dispose()


def incoming(study_uid: str, sop_uid: str, rel: str) -> IncomingInstance:
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", sop_uid, study_uid, "1.2.3.9", "1.2.840.10008.1.2.1")
    return IncomingInstance(ref, rel, sop_uid.ljust(64, "0")[:64], 10, "TESTSCU", None, Eligibility(True),
                            patient_id="PAT1")  # fmt: skip


def make_gone(db: Database, name: str) -> None:
    with db.transaction() as s:
        s.execute(update(Node).where(Node.name == name).values(last_seen=utcnow() - timedelta(minutes=5)))


def test_migration_0008_adds_node_columns_null_for_old_rows_and_agrees_with_the_models(tmp_path: Path) -> None:
    d = Database(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(d, "0007")
    with d.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO studies (study_instance_uid, first_received_at, last_received_at, "
                    "last_calling_ae) VALUES ('1.2.3.4', :now, :now, 'TESTSCU')"),
            {"now": utcnow()},
        )  # fmt: skip
    upgrade(d)
    assert current_revision(d) == "0012_knee"
    with d.engine.connect() as conn:
        for table in ("instances", "jobs", "study_reports", "outbox"):
            assert "node" in {c["name"] for c in sa.inspect(conn).get_columns(table)}
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "node" in str(d) or any(t in str(d) for t in NEW_TABLES)] == []
    d.dispose()


def test_one_sr_builder_per_study_until_its_claim_expires_or_its_agent_is_gone(db: Database) -> None:
    with db.transaction() as s:
        s.add(Study(study_instance_uid="1.2.3", first_received_at=utcnow(), last_received_at=utcnow(),
                    last_calling_ae="X"))  # fmt: skip
    cluster.beat(db, ALPHA, "node", started=True)
    cluster.beat(db, BETA, "node", started=True)
    assert cluster.claim_study(db, ALPHA, 1, hold_s=60)
    assert cluster.claim_study(db, ALPHA, 1, hold_s=60)  # its own claim, renewed
    assert not cluster.claim_study(db, BETA, 1, hold_s=60)
    cluster.release_study(db, BETA, 1)  # not beta's: stays
    assert not cluster.claim_study(db, BETA, 1, hold_s=60)
    with db.transaction() as s:  # alpha's claim expired
        s.execute(update(StudyClaim).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert cluster.claim_study(db, BETA, 1, hold_s=60)
    assert not cluster.claim_study(db, ALPHA, 1, hold_s=60)
    make_gone(db, "beta")  # beta stopped writing its heartbeat: its claim is taken over at once
    assert cluster.claim_study(db, ALPHA, 1, hold_s=60)
    cluster.release_study(db, ALPHA, 1)
    with db.reading() as s:
        assert s.execute(select(StudyClaim)).first() is None


def test_an_association_open_on_another_agent_holds_the_study_until_released_or_that_agent_is_gone(
    db: Database,
) -> None:
    cluster.beat(db, ALPHA, "node")
    cluster.beat(db, BETA, "node")
    on_alpha, on_beta = AssociationTracker(db, ALPHA, 60.0), AssociationTracker(db, BETA, 60.0)
    on_alpha.opened(7)
    on_alpha.carried(7, "1.2.3")
    on_alpha.carried(7, "1.2.3")  # one row per association and study
    assert on_beta.receiving("1.2.3") and not on_beta.receiving("1.2.4")
    on_alpha.closed(7)
    assert not on_beta.receiving("1.2.3")
    on_alpha.opened(8)
    on_alpha.carried(8, "1.2.3")
    make_gone(db, "alpha")  # killed with the association open
    assert not on_beta.receiving("1.2.3")
    assert cluster.gone_nodes(db, 60.0) == ["alpha"]
    assert cluster.forget_associations(db, ALPHA) == 1  # alpha's next start


def test_two_agents_creating_one_study_and_flagging_one_patient_do_not_fail(db: Database) -> None:
    """Two agents' rows for one study and one patient: the second insert finds the first's row
    (``INSERT ... ON CONFLICT DO NOTHING`` then a read, agent/db/upsert.py; the simultaneous race
    on PostgreSQL is tests/unit/test_postgres.py's)."""
    first = store.record_instance(db, incoming("1.2.3", "1.2.3.1", "a/1.dcm"), node="alpha")
    second = store.record_instance(db, incoming("1.2.3", "1.2.3.2", "b/2.dcm"), node="beta")
    assert not first.duplicate and not second.duplicate
    with db.transaction() as s:
        study = s.execute(select(Study)).scalar_one()
        result = Result(job_id=first.job_id, instance_id=1, study_id=study.id, probability=0.9, threshold=0.5,
                        bone_loss=True, p_osteoporosis_given_bone_loss=0.5, t_score=-2.0, t_score_low=-3.0,
                        t_score_high=-1.0, model_version="v", checkpoint_sha256="0" * 64,
                        created_at=utcnow())  # fmt: skip
        s.add(result)
        s.flush()
        registry.upsert_flag(s, study, result)  # alpha flags the patient
    with db.transaction() as s:
        study = s.execute(select(Study)).scalar_one()
        result = s.execute(select(Result)).scalar_one()
        registry.upsert_flag(s, study, result)  # beta's transaction goes on: an update of the row
    with db.reading() as s:
        assert len(s.execute(select(FlaggedPatient)).all()) == 1
        assert set(s.execute(select(Instance.node)).scalars()) == {"alpha", "beta"}


def test_node_scope_of_leases_reaping_requeue_and_retention(db: Database) -> None:
    a = store.record_instance(db, incoming("1.2.3", "1.2.3.1", "a/1.dcm"), node="alpha")
    b = store.record_instance(db, incoming("1.2.3", "1.2.3.2", "b/2.dcm"), node="beta")
    assert [j.job_id for j in store.lease(db, "w-beta", 10, 60, scope=BETA)] == [b.job_id]  # only what beta holds
    assert store.lease(db, "w-beta", 10, 60, scope=BETA) == []
    assert [j.job_id for j in store.lease(db, "w-alpha", 10, 0.0, scope=ALPHA)] == [a.job_id]
    assert store.requeue_running(db, BETA) == 1  # beta's start-up: its own lease only
    assert store.reap_expired_leases(db, BETA) == 0  # alpha's expired lease is not beta's (node storage)
    assert cluster.waiting_by_node(db) == {"alpha": 1, "beta": 1}
    assert store.reap_expired_leases(db, NodeScope("beta", shared=True)) == 1  # shared: taken over
    for job in store.lease(db, "w", 10, 60):
        assert store.finish(db, job.job_id, "w", JobState.DONE)
    removable = store.spool_removable(db, older_than_s=-60, scope=BETA)  # retention: beta's files only
    assert [p for _, p in removable] == ["b/2.dcm"]


def test_shared_spool_keeps_each_agents_writes_in_progress_and_adoption_in_its_own_folder(tmp_path: Path) -> None:
    alpha, beta = Spool(tmp_path, node_dir="alpha"), Spool(tmp_path, node_dir="beta")
    rel = alpha.write([b"x"])
    assert rel.startswith("alpha/") and alpha.tmp_dir != beta.tmp_dir
    (beta.tmp_dir / "half.part").write_bytes(b"y")
    assert alpha.clear_partials() == 0 and (beta.tmp_dir / "half.part").exists()
    assert list(alpha.entries()) == [rel] and list(beta.entries()) == []
    assert beta.path(rel).read_bytes() == b"x"  # any agent reads any file


def test_rows_of_the_single_node_of_old_become_the_rows_of_the_node_holding_their_file(
    db: Database, tmp_path: Path
) -> None:
    spool_a, results_a = Spool(tmp_path / "a" / "spool"), Spool(tmp_path / "a" / "results")
    rel = spool_a.write([b"x"])
    old = store.record_instance(db, incoming("1.2.3", "1.2.3.1", rel), node=None)  # before migration 0011_node
    lost = store.record_instance(db, incoming("1.2.3", "1.2.3.2", "20260101/elsewhere.dcm"), node=None)
    results_a.write_named("1.2.9.dcm", [b"sr"])
    with db.transaction() as s:
        for path in ("1.2.9.dcm", "1.2.8.dcm"):
            outbox.add(s, 1, outbox.OutgoingObject("sr", "1.2.840.10008.5.1.4.1.1.88.34", path[:-4], path),
                       ["pacs"], True)  # fmt: skip
    assert store.spool_removable(db, older_than_s=-60, scope=ALPHA) == []  # retention: strictly its own
    assert cluster.claim_legacy(db, ALPHA, lambda p: spool_a.path(p).is_file(),
                                lambda p: results_a.path(p).is_file()) == 2  # fmt: skip
    # beta gets no row whose file alpha holds; what nobody holds stays everybody's (as before 0008)
    assert [j.job_id for j in store.lease(db, "w-beta", 10, 60, scope=BETA)] == [lost.job_id]
    assert [d.path for d in outbox.lease_due(db, scope=BETA)] == ["1.2.8.dcm"]
    assert [j.job_id for j in store.lease(db, "w-alpha", 10, 60, scope=ALPHA)] == [old.job_id]
    assert cluster.waiting_by_node(db) == {"alpha": 1, "": 1}


def test_in_shared_storage_what_a_gone_agent_was_sending_is_sent_again_at_the_next_heartbeat(
    db: Database, tmp_path: Path
) -> None:
    """docs/architecture.md, scaling out: a dead node's outbox rows being sent are sent again once
    its heartbeat is older than ``agent.node_timeout_s`` (shared storage only; a live node's rows
    and the node's own stay SENDING)."""
    with db.transaction() as s:
        s.add(Study(study_instance_uid="1.2.3", first_received_at=utcnow(), last_received_at=utcnow(),
                    last_calling_ae="X"))  # fmt: skip
        s.flush()
        for uid in ("1.2.9.1", "1.2.9.2"):
            outbox.add(s, 1, outbox.OutgoingObject("sr", "1.2.840.10008.5.1.4.1.1.88.34", uid, f"{uid}.dcm"),
                       ["pacs"], True)  # fmt: skip
    on_alpha, on_beta = NodeScope("alpha", shared=True), NodeScope("beta", shared=True)
    cluster.beat(db, on_alpha, "shared", started=True)
    [by_alpha] = outbox.lease_due(db, limit=1, scope=on_alpha)
    [by_beta] = outbox.lease_due(db, limit=1, scope=on_beta)

    def states() -> dict[int, str]:
        with db.reading() as s:
            return dict(s.execute(select(OutboxItem.id, OutboxItem.state)).all())

    sending = OutboxState.SENDING.value
    shared = {"node": "beta", "storage": "shared", "shared_dir": str(tmp_path / "shared"), "node_timeout_s": 60}
    node_heartbeat(db, agent_settings(tmp_path / "beta", agent=shared))
    assert states() == {by_alpha.id: sending, by_beta.id: sending}  # alpha is alive
    make_gone(db, "alpha")
    node_heartbeat(db, agent_settings(tmp_path / "beta-node", agent={"node": "beta", "node_timeout_s": 60}))
    assert states() == {by_alpha.id: sending, by_beta.id: sending}  # node storage: never
    node_heartbeat(db, agent_settings(tmp_path / "beta", agent=shared))
    assert states() == {by_alpha.id: OutboxState.PENDING.value, by_beta.id: sending}
    assert [d.id for d in outbox.lease_due(db, scope=on_beta)] == [by_alpha.id]


@pytest.mark.parametrize(
    ("lease_s", "node_timeout_s", "reap_s", "beat_s"), [(300, 60, 30, 15), (20, 40, 10, 10), (600, 200, 30, 15)]
)
def test_the_lease_reaper_and_the_heartbeat_run_as_often_as_the_house_plan_says(
    db: Database, tmp_path: Path, lease_s: float, node_timeout_s: float, reap_s: float, beat_s: float
) -> None:
    """docs/architecture.md: the lease reaper every 30 s, or every half lease when ``worker.lease_s``
    is shorter; a heartbeat every ``node_timeout_s / 4``, at most 15 s; the study-completion sweep
    every 0.5 s."""
    settings = agent_settings(tmp_path, worker={"lease_s": lease_s}, agent={"node_timeout_s": node_timeout_s})
    sched = build_scheduler(db, Spool(tmp_path / "spool"), 3600.0, lambda: None, None, settings=settings)

    def every(job_id: str) -> float:
        job = sched.get_job(job_id)
        assert job is not None, job_id
        return float(job.trigger.interval.total_seconds())

    assert (every("lease_reaper"), every("node_heartbeat"), every("study_completion")) == (reap_s, beat_s, 0.5)


def test_an_agent_without_a_node_name_is_named_after_its_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "knee-agent-2")
    assert agent_settings(tmp_path).node == "knee-agent-2"
    assert cluster.scope_of(agent_settings(tmp_path)).name == "knee-agent-2"
    assert agent_settings(tmp_path, agent={"node": "alpha"}).node == "alpha"
