"""Two `strnet serve` processes sharing one database, one is killed (SIGKILL): SQLite in WAL mode,
or on PostgreSQL (``STRNET_TEST_DATABASE=postgresql``) one fresh database of the throwaway cluster.

Real processes (tiny random-weights STR-Net, inline screening), pynetdicom SCUs sending, one
pynetdicom PACS receiving. Node storage: the killed agent's rows and files wait for it, untouched
by the survivor, and it finishes them when restarted. Shared storage (spool and results in one
folder both mount): the killed agent is not restarted and the survivor finishes everything
within the lease time plus one minute.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_AET, TEST_SCU_AET, database_url_for
from dicom_factory import DX_PRESENTATION, knee_dx
from pacs_peer import PACS_AET, PacsPeer
from pg_cluster import engine_under_test
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from screening_helpers import wait_for
from serve_process import ServeProcess, config_port, write_config
from sqlalchemy import func, select

from agent.db.engine import Database, upgrade
from agent.db.models import FlaggedPatient, Instance, Job, OutboxItem, StudyReport
from agent.domain import JobState, OutboxState
from agent.pacs import status

pytestmark = pytest.mark.slow

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
LEASE_S = 8


def study(k: int, n: int = 4) -> list[Any]:
    uid, series = generate_uid(), {side: generate_uid() for side in "LR"}
    return [
        knee_dx(study_uid=uid, series_uid=series["LR"[i % 2]], laterality="LR"[i % 2], seed=10 * k + i,
                rows=320, cols=256, patient_id=f"PAT{k:03d}")  # fmt: skip
        for i in range(n)
    ]


def send(port: int, datasets: list[Any]) -> None:
    ae = AE(ae_title=TEST_SCU_AET)
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=AGENT_AET)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert int(assoc.send_c_store(ds).Status) == status.SUCCESS
    finally:
        assoc.release()


def node_config(tmp: Path, name: str, db_url: str, weights: Path, pacs_port: int, storage: str) -> Path:
    cfg = write_config(
        tmp / f"{name}.toml", tmp / name, worker=True, database_url=db_url,
        extra=(f'\n[reporting]\nquiet_period_s = 0.5\nbuild_processes = 0\n'
               f'\n[sender]\npoll_s = 0.2\nbackoff_base_s = 0.2\nbackoff_max_s = 1.0\ntimeout_s = 5\n'
               f'\n[[pacs]]\nname = "pacs"\nae_title = "{PACS_AET}"\nhost = "127.0.0.1"\nport = {pacs_port}\n'),
    )  # fmt: skip
    shared = f'storage = "shared"\nshared_dir = "{tmp / "shared"}"\n' if storage == "shared" else ""
    text = cfg.read_text().replace(
        "min_free_disk_mb = 0",
        f'min_free_disk_mb = 0\nnode = "{name}"\nnode_timeout_s = 4\n{shared}', 1,
    ).replace(
        "enabled = true",
        f'enabled = true\nweights = "{weights}"\nprocess = false\ndevice = "cpu"\nmax_batch = 1\n'
        f"max_wait_ms = 0\nlease_s = {LEASE_S}",
        1,
    )
    cfg.write_text(text)
    return cfg


def jobs(db: Database) -> list[Any]:
    with db.reading() as s:
        return list(s.execute(select(Job.id, Job.state, Job.node, Job.lease_owner, Job.attempts, Instance.node)
                              .join(Instance, Instance.id == Job.instance_id).order_by(Job.id)).all())  # fmt: skip


def done(db: Database) -> int:
    return sum(j.state == JobState.DONE.value for j in jobs(db))


def delivered_uids(pacs: PacsPeer) -> set[str]:
    return {str(d.SOPInstanceUID) for d in list(pacs.received)}


def start_pair(tmp: Path, weights: Path, pacs: PacsPeer, storage: str) -> tuple[Database, list[ServeProcess]]:
    db_url = database_url_for(tmp / "shared-db") or f"sqlite:///{tmp / 'shared.db'}"  # both agents' one database
    db = Database(db_url)
    assert db.dialect == engine_under_test()
    upgrade(db)  # once, before two agents start on it
    procs = [ServeProcess(node_config(tmp, n, db_url, weights, pacs.port, storage), tmp / f"{n}.log")
             for n in ("alpha", "beta")]  # fmt: skip
    for p in procs:
        p.start(timeout_s=120)
    return db, procs


def test_node_storage_kill_one_agent_its_work_waits_for_it_and_finishes_after_restart(
    tmp_path: Path, tiny_weights: Path
) -> None:
    with PacsPeer() as pacs:
        db, (alpha, beta) = start_pair(tmp_path, tiny_weights, pacs, "node")
        try:
            studies = [study(k) for k in range(10)]
            split = studies[9]
            to_alpha = [ds for s in studies[:5] for ds in s] + split[:2]
            to_beta = [ds for s in studies[5:9] for ds in s] + split[2:]
            send(config_port(alpha.config), to_alpha)
            wait_for(lambda: done(db) >= 2, timeout_s=60)
            alpha.kill()  # mid-run: some of its jobs done, others queued or leased
            send(config_port(beta.config), to_beta)
            frozen = [j for j in jobs(db) if j[5] == "alpha"]
            assert sum(j.state != JobState.DONE.value for j in frozen) > 0, "alpha had finished already"
            alpha_files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "alpha").rglob("*") if p.is_file()
                                 and "strnet.db" not in p.name)  # fmt: skip
            # beta finishes its own (its part of the split study too) ...
            wait_for(lambda: sum(j.state == JobState.DONE.value and j[5] == "beta" for j in jobs(db)) == 18,
                     timeout_s=120)  # fmt: skip
            time.sleep(LEASE_S + 2)  # past alpha's leases and beta's reaper turns
            # ... and never touches alpha's: not a lease, not a file, nor a report of alpha's images
            assert [j for j in jobs(db) if j[5] == "alpha"] == frozen
            assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "alpha").rglob("*") if p.is_file()
                          and "strnet.db" not in p.name) == alpha_files  # fmt: skip
            with db.reading() as s:
                assert s.execute(select(func.count()).select_from(StudyReport)
                                 .where(StudyReport.node == "alpha")).scalar_one() <= 5  # fmt: skip
            alpha.close()
            alpha = ServeProcess(alpha.config, tmp_path / "alpha-2.log").start(timeout_s=120)
            wait_for(lambda: done(db) == 40, timeout_s=120)
            wait_for(lambda: _all_delivered(db) and len(delivered_uids(pacs)) == 51, timeout_s=120)
            final = jobs(db)
            assert all(j.node == j[5] for j in final)  # each screened by the agent holding it
            assert all(j.attempts == 1 or j[5] == "alpha" for j in final)  # beta's: once each
            _one_sr_per_study_per_holder(db)
        finally:
            alpha.close()
            beta.close()
            db.dispose()


def test_shared_storage_the_survivor_finishes_a_killed_agents_work(tmp_path: Path, tiny_weights: Path) -> None:
    with PacsPeer() as pacs:
        db, (alpha, beta) = start_pair(tmp_path, tiny_weights, pacs, "shared")
        try:
            studies = [study(k) for k in range(10)]
            split = studies[9]
            send(config_port(beta.config), [ds for s in studies[7:9] for ds in s] + split[2:])
            send(config_port(alpha.config), [ds for s in studies[:7] for ds in s] + split[:2])
            wait_for(lambda: sum(j.state == JobState.DONE.value and j.node == "alpha" for j in jobs(db)) >= 2,
                     timeout_s=60)  # fmt: skip
            alpha.kill()  # not restarted
            killed_at = time.monotonic()
            assert done(db) < 40, "everything was done before the kill"
            assert (tmp_path / "shared" / "spool" / "alpha").is_dir()  # alpha's own folder of the shared spool
            wait_for(lambda: done(db) == 40 and _latest_srs(db) == [4] * 10 and _all_delivered(db),
                     timeout_s=LEASE_S + 60)  # fmt: skip
            assert time.monotonic() - killed_at < LEASE_S + 60
            final = jobs(db)
            assert {j.state for j in final} == {JobState.DONE.value}  # none SKIPPED for a missing file
            with db.reading() as s:
                flagged = s.execute(select(FlaggedPatient.patient_id)).scalars().all()
            assert sorted(flagged) == [f"PAT{k:03d}" for k in range(10)]
            sent = {str(ds.SOPInstanceUID) for s in studies for ds in s}
            assert len(delivered_uids(pacs)) >= 40 + 10 and not sent & delivered_uids(pacs)
        finally:
            alpha.close()
            beta.close()
            db.dispose()


def _latest_srs(db: Database) -> list[int]:
    """How many images each study's latest SR covers."""
    with db.reading() as s:
        return list(s.execute(select(func.max(StudyReport.result_count)).group_by(StudyReport.study_id)).scalars())


def _all_delivered(db: Database) -> bool:
    with db.reading() as s:
        states = set(s.execute(select(OutboxItem.state)).scalars())
    return states == {OutboxState.DELIVERED.value}


def _one_sr_per_study_per_holder(db: Database) -> None:
    with db.reading() as s:
        rows = s.execute(select(StudyReport.study_id, StudyReport.node, StudyReport.result_count)).all()
        flagged = s.execute(select(FlaggedPatient.patient_id)).scalars().all()
    shapes = sorted(sorted((node, n) for sid, node, n in rows if sid == study_id) for study_id in {r[0] for r in rows})
    assert shapes.count([("alpha", 2), ("beta", 2)]) == 1
    assert shapes.count([("alpha", 4)]) == 5 and shapes.count([("beta", 4)]) == 4
    assert sorted(flagged) == [f"PAT{k:03d}" for k in range(10)]
