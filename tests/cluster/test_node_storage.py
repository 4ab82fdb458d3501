"""Two agents, each with its own data_dir (node storage), sharing one database: SQLite in WAL mode, or
on PostgreSQL (``STRNET_TEST_DATABASE=postgresql``) one fresh database of the throwaway cluster.

Both are real in-process agents (tiny random-weights STR-Net, inline screening) receiving over
DICOM from pynetdicom SCUs, and sending to one pynetdicom PACS. 40 instances: five studies to
alpha, four to beta, and one study split across them (two images each). What must hold: every
instance screened exactly once, by the agent holding it; one SR per study per holding agent; each
flagged patient once; no job SKIPPED for a missing file; each agent sent only its own files.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from conftest import database_url_for
from dicom_factory import knee_dx
from pacs_peer import PACS_AET, PacsPeer
from pg_cluster import engine_under_test
from pydicom.uid import generate_uid
from screening_helpers import send_study, wait_for
from sqlalchemy import func, select

from agent.app import Agent
from agent.db.models import FlaggedPatient, Instance, Job, OutboxItem, Result, StudyReport
from agent.domain import JobState, OutboxState
from agent.queue import cluster

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def study(k: int, n: int = 4) -> list[Any]:
    uid = generate_uid()
    series = {side: generate_uid() for side in "LR"}
    return [
        knee_dx(study_uid=uid, series_uid=series["LR"[i % 2]], laterality="LR"[i % 2], seed=10 * k + i,
                rows=320, cols=256, patient_id=f"PAT{k:03d}")  # fmt: skip
        for i in range(n)
    ]


def node_agent(make_agent: Any, name: str, db_url: str, weights: Path, pacs_port: int) -> Agent:
    return make_agent(
        agent={"node": name, "database_url": db_url},
        worker={"enabled": True, "weights": str(weights), "device": "cpu", "max_wait_ms": 0},
        reporting={"quiet_period_s": 0.5},
        sender={"backoff_base_s": 0.2, "backoff_max_s": 1.0, "poll_s": 0.2, "timeout_s": 5},
        pacs=[{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs_port}],
    )


def test_two_node_agents_screen_report_and_send_each_what_it_holds(
    make_agent: Any, tiny_weights: Path, tmp_path: Path
) -> None:
    db_url = database_url_for(tmp_path / "shared-db") or f"sqlite:///{tmp_path / 'shared.db'}"  # both agents' one
    with PacsPeer() as pacs:
        alpha = node_agent(make_agent, "alpha", db_url, tiny_weights, pacs.port)
        beta = node_agent(make_agent, "beta", db_url, tiny_weights, pacs.port)
        assert alpha.settings.data_dir != beta.settings.data_dir
        assert alpha.db.dialect == beta.db.dialect == engine_under_test()
        studies = [study(k) for k in range(10)]
        split = studies[9]
        to_alpha = [ds for s in studies[:5] for ds in s] + split[:2]
        to_beta = [ds for s in studies[5:9] for ds in s] + split[2:]
        assert len(to_alpha) + len(to_beta) == 40
        senders = [threading.Thread(target=send_study, args=(a, batch)) for a, batch in ((alpha, to_alpha),
                                                                                         (beta, to_beta))]  # fmt: skip
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)

        def sent_srs() -> int:
            return sum(str(d.SOPClassUID) == COMPREHENSIVE_3D_SR for d in pacs.received)

        # 9 whole studies and the split one from each holder: 11 SRs; 40 overlays
        def all_recorded() -> bool:  # the PACS holds a result a moment before its sender records it
            with alpha.db.reading() as s:
                return set(s.execute(select(OutboxItem.state)).scalars()) == {OutboxState.DELIVERED.value}

        wait_for(lambda: sent_srs() == 11 and len(pacs.received) == 51 and all_recorded(), timeout_s=180)

        with alpha.db.reading() as s:
            jobs = s.execute(select(Job.state, Job.attempts, Job.node, Instance.node, Instance.sop_instance_uid)
                             .join(Instance, Instance.id == Job.instance_id)).all()  # fmt: skip
            assert len(jobs) == 40
            assert {st for st, *_ in jobs} == {JobState.DONE.value}  # none SKIPPED for a missing file
            assert all(attempts == 1 for _, attempts, *_ in jobs)  # screened once
            assert all(leaser == holder for _, _, leaser, holder, _ in jobs)  # by the agent holding it
            holders = {uid: holder for *_, holder, uid in jobs}
            assert {str(d.SOPInstanceUID): holders[str(d.SOPInstanceUID)] for d in to_alpha} == {
                str(d.SOPInstanceUID): "alpha" for d in to_alpha}  # fmt: skip
            assert {holders[str(d.SOPInstanceUID)] for d in to_beta} == {"beta"}
            assert s.execute(select(func.count(Result.id))).scalar_one() == 40
            reports = s.execute(select(StudyReport.study_id, StudyReport.node, StudyReport.result_count)).all()
            by_study: dict[int, list[tuple[str, int]]] = {}
            for study_id, node, count in reports:
                by_study.setdefault(study_id, []).append((node, count))
            assert len(by_study) == 10
            shapes = sorted(sorted(v) for v in by_study.values())
            assert shapes.count([("alpha", 2), ("beta", 2)]) == 1  # the split study: one SR from each
            assert shapes.count([("alpha", 4)]) == 5 and shapes.count([("beta", 4)]) == 4
            flagged = s.execute(select(FlaggedPatient.patient_id)).scalars().all()
            assert sorted(flagged) == [f"PAT{k:03d}" for k in range(10)]  # each flagged patient once
            rows = s.execute(select(OutboxItem.node, OutboxItem.path, OutboxItem.state)).all()
        assert {st for *_, st in rows} == {OutboxState.DELIVERED.value}
        for node, path, _ in rows:  # each agent sent only files of its own results folder
            owner = alpha if node == "alpha" else beta
            assert node in ("alpha", "beta") and (owner.results.root / path).is_file()
        # the split study's SRs: two revisions, each naming the images its agent holds
        split_srs = [d for d in pacs.received if str(d.SOPClassUID) == COMPREHENSIVE_3D_SR
                     and d.StudyInstanceUID == split[0].StudyInstanceUID]  # fmt: skip
        assert len(split_srs) == 2 and split_srs[0].SOPInstanceUID != split_srs[1].SOPInstanceUID
        assert cluster.waiting_by_node(alpha.db) == {}
