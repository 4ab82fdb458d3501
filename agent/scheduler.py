"""Periodic work inside ``strnet serve`` (apscheduler): lease reaper, outbox retry sweep,
study-completion sweep, spool retention, the scheduled archive sweep, the audit export and a heartbeat."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from agent.config import Settings
from agent.db.engine import Database
from agent.errors import StorageError
from agent.logging import get_logger
from agent.queue import cluster, outbox, store
from agent.queue.cluster import SOLO, NodeScope
from agent.spool import Spool

log = get_logger(__name__)


def _guarded(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except StorageError as exc:
            log.error("scheduled_job_failed", job=name, error=str(exc))
        except Exception as exc:
            log.exception("scheduled_job_crashed", job=name, error=exc.__class__.__name__)

    return run


def reap_leases(db: Database, scope: NodeScope = SOLO) -> int:
    n = store.reap_expired_leases(db, scope)
    if n:
        log.warning("leases_reaped", jobs=n)
    return n


#: how often the audit events not yet delivered go to the audit repository (IHE ATNA)
ATNA_EXPORT_S = 5.0


def node_heartbeat(db: Database, settings: Settings) -> None:
    """Write this node's heartbeat; with shared storage, send again what a gone node was sending."""
    scope = cluster.scope_of(settings)
    cluster.beat(db, scope, settings.agent.storage)
    if scope.shared:
        gone = [n for n in cluster.gone_nodes(db, settings.agent.node_timeout_s) if n != scope.name]
        n = cluster.take_over_sending(db, gone)
        if n:
            log.warning("outbox_taken_over", items=n, nodes=len(gone))


#: a .part file untouched this long belongs to a transfer that broke off (network timeouts are shorter)
STALE_PART_S = 3600.0


def apply_spool_retention(db: Database, spool: Spool, retention_s: float, scope: NodeScope = SOLO) -> int:
    """This node's own: its stale ``.part`` files, and the spool files of its instances."""
    stale = spool.clear_partials(older_than_s=STALE_PART_S)
    if stale:
        log.info("spool_partials_removed", removed=stale)
    rows = store.spool_removable(db, retention_s, scope=scope)
    for _, rel in rows:
        spool.remove(rel)
    if rows:
        store.mark_spool_removed(db, [i for i, _ in rows])
        log.info("spool_retention", removed=len(rows))
    return len(rows)


def heartbeat(db: Database) -> None:
    log.info("heartbeat", jobs=store.count_by_state(db), outbox=outbox.count_by_state(db))


def scheduled_backup(db: Database, settings: Settings) -> None:
    from agent.ops.backup import backup_sqlite, is_due, prune

    folder = settings.backup_dir
    folder.mkdir(parents=True, exist_ok=True)
    if not is_due(folder, timedelta(hours=settings.backup.every_hours)):
        return
    out = backup_sqlite(settings.database_url, folder)
    removed = prune(folder, settings.backup.keep_days)
    log.info("database_backup", file=out.name, bytes=out.stat().st_size, pruned=len(removed))


def build_scheduler(
    db: Database,
    spool: Spool,
    retention_s: float,
    report_sweep: Callable[[], Any] | None,
    sender_wake: Callable[[], Any] | None,
    sweep_s: float = 0.5,  # a quiet study's SR at most this long after its quiet period ends
    settings: Settings | None = None,
    archive_sweep: Callable[[], Any] | None = None,
    atna_export: Callable[[], Any] | None = None,
) -> BackgroundScheduler:
    sched = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1})
    scope = cluster.scope_of(settings) if settings is not None else SOLO
    # every 30 s, or twice per lease when leases are shorter (a dead node's work is taken over sooner)
    reap_s = min(30.0, settings.worker.lease_s / 2) if settings is not None else 30.0
    sched.add_job(_guarded("lease_reaper", lambda: reap_leases(db, scope)), "interval", seconds=reap_s,
                  id="lease_reaper")  # fmt: skip
    if settings is not None:
        beat_s = max(1.0, min(15.0, settings.agent.node_timeout_s / 4))
        sched.add_job(_guarded("node_heartbeat", lambda: node_heartbeat(db, settings)), "interval", seconds=beat_s,
                      id="node_heartbeat")  # fmt: skip
    if report_sweep is not None:
        sched.add_job(_guarded("study_completion", report_sweep), "interval", seconds=sweep_s, id="study_completion")
    if sender_wake is not None:
        sched.add_job(_guarded("outbox_retry", sender_wake), "interval", seconds=15, id="outbox_retry")
    sched.add_job(
        _guarded("spool_retention", lambda: apply_spool_retention(db, spool, retention_s, scope)),
        "interval",
        minutes=10,
        id="spool_retention",
    )
    sched.add_job(_guarded("heartbeat", lambda: heartbeat(db)), "interval", seconds=60, id="heartbeat")
    if atna_export is not None:  # the audit trail to the audit repository ([atna]; backoff inside)
        sched.add_job(_guarded("atna_export", atna_export), "interval", seconds=ATNA_EXPORT_S, id="atna_export")
    if archive_sweep is not None:
        # each tick retrieves for up to ~50 s (within the window and the rate limit); apscheduler's own
        # thread pool, so the study-completion sweep and the rest go on beside it
        sched.add_job(_guarded("archive_sweep", archive_sweep), "interval", seconds=60, id="archive_sweep",
                      next_run_time=datetime.now(UTC) + timedelta(seconds=5))  # fmt: skip
    if settings is not None and settings.backup.enabled and settings.database_url.startswith("sqlite"):
        # checked every 10 minutes; a backup is taken when the newest one is older than every_hours
        sched.add_job(
            _guarded("database_backup", lambda: scheduled_backup(db, settings)),
            "interval",
            minutes=10,
            id="database_backup",
            next_run_time=datetime.now(UTC) + timedelta(seconds=60),
        )
    if settings is not None and settings.digest.folder is not None:
        from agent.ops.digest import write_digest, write_overdue

        folder, overdue_days = settings.digest.folder, settings.fls.overdue_days

        def digest() -> None:
            write_digest(db, folder)
            write_overdue(db, folder, overdue_days)

        sched.add_job(
            _guarded("daily_digest", digest),
            "cron",
            hour=settings.digest.hour_utc,
            minute=0,
            timezone="UTC",
            id="daily_digest",
        )
    return sched
