"""Several agents on one database (agent.node, agent.storage): what each may touch, and the rows
they coordinate through.

- ``owned(column, scope)``: the rows a node works on. Node storage: its own rows and those of the
  single node of old (NULL; at its start a node makes those whose file it holds its own:
  ``claim_legacy``); shared storage: every row (every node reads every file). ``mine``: what
  start-up recovery and the SR revisions count as this node's own (its rows and the NULL ones);
  ``own``: strictly its rows (retention).
- ``nodes``: each agent's heartbeat; one silent for ``agent.node_timeout_s`` is gone.
- ``study_claims``: the one node building a study's SR now, until its claim expires.
- ``open_associations``: a study an association still open on some node has carried; its SR
  waits for it on every node, unless that node is gone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, true, update
from sqlalchemy.exc import IntegrityError

from agent.clock import utcnow
from agent.config import Settings
from agent.db.engine import Database
from agent.db.models import Instance, Job, Node, OpenAssociation, OutboxItem, StudyClaim
from agent.domain import JobState, OutboxState


@dataclass(frozen=True)
class NodeScope:
    """This agent's name and whether spool and results are shared by every node."""

    name: str
    shared: bool = False


#: the scope of a single agent with its own data_dir (what tests and CLI tools get by default)
SOLO = NodeScope("", shared=True)


def owned(column: Any, scope: NodeScope) -> Any:
    """A WHERE clause: the rows of ``column`` (a ``node`` column) this node works on."""
    if scope.shared or not scope.name:
        return true()
    return or_(column == scope.name, column.is_(None))


def own(column: Any, scope: NodeScope) -> Any:
    """A WHERE clause: strictly this node's rows (every row for a scope without a name)."""
    return column == scope.name if scope.name else true()


def mine(column: Any, scope: NodeScope) -> Any:
    """A WHERE clause: rows this node created or leased itself (and those of the node of old).
    Start-up recovery and retention touch only these, in either storage mode."""
    if not scope.name:
        return true()
    return or_(column == scope.name, column.is_(None))


def claim_legacy(
    db: Database, scope: NodeScope, holds_spool: Callable[[str], bool], holds_result: Callable[[str], bool]
) -> int:
    """At a node's start: the rows of the single node of old (node NULL) whose file this node holds
    (``holds_spool(spool_path)``, ``holds_result(path)``) become its own: instances whose spool file
    is still kept, outbox rows not yet done with. Returns how many."""
    if not scope.name:
        return 0
    done = [OutboxState.DELIVERED.value, OutboxState.COMMITTED.value, OutboxState.SHADOW.value,
            OutboxState.DISCARDED.value]  # fmt: skip
    with db.reading() as s:
        instances = s.execute(
            select(Instance.id, Instance.spool_path).where(Instance.node.is_(None), Instance.spool_removed_at.is_(None))
        ).all()
        items = s.execute(
            select(OutboxItem.id, OutboxItem.path).where(OutboxItem.node.is_(None), OutboxItem.state.not_in(done))
        ).all()
    mine_i = [i for i, p in instances if holds_spool(p)]
    mine_o = [i for i, p in items if p and holds_result(p)]
    with db.transaction() as s:
        for model, ids in ((Instance, mine_i), (OutboxItem, mine_o)):
            for k in range(0, len(ids), 500):
                s.execute(update(model).where(model.id.in_(ids[k : k + 500]), model.node.is_(None))
                          .values(node=scope.name))  # fmt: skip
    return len(mine_i) + len(mine_o)


def node_value(scope: NodeScope) -> str | None:
    return scope.name or None


def beat(db: Database, scope: NodeScope, storage: str, started: bool = False) -> None:
    """Write this node's heartbeat (``started``: at start-up, also its start time)."""
    if not scope.name:
        return
    now = utcnow()
    with db.transaction() as s:
        res = s.execute(update(Node).where(Node.name == scope.name).values(last_seen=now, storage=storage))
        if res.rowcount == 0:  # type: ignore[attr-defined]
            try:
                with s.begin_nested():
                    s.add(Node(name=scope.name, storage=storage, started_at=now, last_seen=now))
            except IntegrityError:  # the same name written a moment ago by a twin: it is there
                pass
        elif started:
            s.execute(update(Node).where(Node.name == scope.name).values(started_at=now))


def gone_nodes(db: Database, timeout_s: float) -> list[str]:
    """Nodes whose heartbeat is older than ``timeout_s``."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    with db.reading() as s:
        return list(s.execute(select(Node.name).where(Node.last_seen < cutoff).order_by(Node.name)).scalars())


def _live_nodes(timeout_s: float) -> Any:
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    return select(Node.name).where(Node.last_seen >= cutoff)


# -- open associations ---------------------------------------------------------------------------


def association_carried(db: Database, scope: NodeScope, association: str, study_uid: str) -> None:
    """An association open on this node brought an instance of ``study_uid`` (first time only)."""
    with db.transaction() as s:
        try:
            with s.begin_nested():
                s.add(OpenAssociation(node=scope.name, association=association, study_instance_uid=study_uid,
                                      opened_at=utcnow()))  # fmt: skip
        except IntegrityError:
            pass  # recorded already


def association_closed(db: Database, scope: NodeScope, association: str) -> None:
    with db.transaction() as s:
        s.execute(
            delete(OpenAssociation)
            .where(OpenAssociation.node == scope.name, OpenAssociation.association == association)
        )


def forget_associations(db: Database, scope: NodeScope) -> int:
    """At start-up: this node's associations of a previous run are closed."""
    with db.transaction() as s:
        res = s.execute(delete(OpenAssociation).where(OpenAssociation.node == scope.name))
        return res.rowcount  # type: ignore[attr-defined]


def arriving_elsewhere(db: Database, scope: NodeScope, study_uid: str, timeout_s: float) -> bool:
    """Whether an association open on another live node has carried an instance of ``study_uid``."""
    with db.reading() as s:
        row = s.execute(
            select(OpenAssociation.id)
            .where(OpenAssociation.study_instance_uid == study_uid, OpenAssociation.node != scope.name)
            .where(OpenAssociation.node.in_(_live_nodes(timeout_s)))
            .limit(1)
        ).first()
        return row is not None


# -- study claims ---------------------------------------------------------------------------------


def claim_study(db: Database, scope: NodeScope, study_id: int, hold_s: float, node_timeout_s: float = 60.0) -> bool:
    """Claim the study's SR build for ``hold_s``; False while another live node holds an unexpired
    claim (a gone node's claim is taken over at once)."""
    now = utcnow()
    until = now + timedelta(seconds=hold_s)
    with db.transaction() as s:
        res = s.execute(
            update(StudyClaim)
            .where(StudyClaim.study_id == study_id)
            .where(or_(StudyClaim.node == scope.name, StudyClaim.expires_at < now,
                       StudyClaim.node.not_in(_live_nodes(node_timeout_s))))  # fmt: skip
            .values(node=scope.name, expires_at=until)
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            return True
        try:
            with s.begin_nested():
                s.add(StudyClaim(study_id=study_id, node=scope.name, expires_at=until))
        except IntegrityError:
            return False  # another node holds it
        return True


def release_study(db: Database, scope: NodeScope, study_id: int) -> None:
    with db.transaction() as s:
        s.execute(delete(StudyClaim).where(StudyClaim.study_id == study_id, StudyClaim.node == scope.name))


# -- what waits on which node -------------------------------------------------------------------


def waiting_by_node(db: Database) -> dict[str, int]:
    """Jobs not yet screened, by the node that holds their instance ("" for the node of old)."""
    open_states = [JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value, JobState.RECEIVED.value]
    with db.reading() as s:
        rows = s.execute(
            select(Instance.node, func.count())
            .join(Job, Job.instance_id == Instance.id)
            .where(Job.state.in_(open_states))
            .group_by(Instance.node)
        ).all()
    return {node or "": n for node, n in rows}


def take_over_sending(db: Database, nodes: Iterable[str]) -> int:
    """Shared storage: outbox rows a gone node was sending go back to PENDING (any node sends them)."""
    names = list(nodes)
    if not names:
        return 0
    with db.transaction() as s:
        res = s.execute(
            update(OutboxItem)
            .where(OutboxItem.node.in_(names), OutboxItem.state == OutboxState.SENDING.value)
            .values(state=OutboxState.PENDING.value, updated_at=utcnow())
        )
        return res.rowcount  # type: ignore[attr-defined]


def last_seen(db: Database) -> dict[str, datetime]:
    with db.reading() as s:
        return {name: seen for name, seen in s.execute(select(Node.name, Node.last_seen)).all()}


def scope_of(settings: Settings) -> NodeScope:
    """This agent's scope: its node name (agent.node, else the host name) and storage mode."""
    return NodeScope(settings.node, settings.shared_storage)
