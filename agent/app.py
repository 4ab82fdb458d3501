"""Composition root: builds every component from the settings, starts and stops them.

Nothing else wires components together.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from agent.audit import trail
from agent.audit.db import Database, upgrade
from agent.config import Settings
from agent.ingest.eligibility import Rules
from agent.ingest.handlers import Ingestor
from agent.ingest.reconcile import reconcile
from agent.ingest.scp import AssociationTracker, StorageSCP
from agent.ingest.spool import Spool
from agent.logging import get_logger

log = get_logger(__name__)


def make_rules(settings: Settings) -> Rules:
    e = settings.eligibility
    return Rules(
        modalities=frozenset(m.upper() for m in e.modalities),
        body_parts=frozenset(b.upper() for b in e.body_parts),
        anatomic_region_codes=frozenset(e.anatomic_region_codes),
        min_age_years=e.min_age_years,
        max_pixels=e.max_pixels,
    )


def open_database(settings: Settings, migrate: bool = True) -> Database:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    if migrate:
        upgrade(db)
    return db


@dataclass
class Agent:
    """The running service: ingest now; worker, sender, scheduler and web join here."""

    settings: Settings
    db: Database
    spool: Spool
    ingestor: Ingestor
    scp: StorageSCP
    tracker: AssociationTracker
    stopped: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, settings: Settings) -> Agent:
        db = open_database(settings)
        spool = Spool(settings.spool_dir, min_free_bytes=settings.agent.min_free_disk_mb * 1024 * 1024)
        ingestor = Ingestor(db, spool, make_rules(settings), settings.scp.max_instance_mb * 1024 * 1024)
        tracker = AssociationTracker()
        scp = StorageSCP(settings.scp, ingestor, tracker)
        return cls(settings, db, spool, ingestor, scp, tracker)

    def start(self) -> None:
        reconcile(self.db, self.spool, self.ingestor)
        with self.db.transaction() as s:
            trail.append(s, "application_activity", actor="strnet", detail={"activity": "start"})
        self.scp.start()

    def stop(self, grace_s: float = 10.0) -> None:
        self.scp.stop(grace_s)
        with self.db.transaction() as s:
            trail.append(s, "application_activity", actor="strnet", detail={"activity": "stop"})
        self.db.dispose()
        self.stopped.set()
