"""Composition root: builds every component from the settings, starts and stops them.

Nothing else wires components together.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from agent.audit import trail
from agent.audit.export import Exporter
from agent.config import Settings
from agent.db.engine import Database, open_database
from agent.ehr import messages
from agent.ingest.eligibility import Rules
from agent.ingest.handlers import Ingestor
from agent.ingest.reconcile import reconcile
from agent.ingest.scp import AssociationTracker, StorageSCP
from agent.ingest.sweep import Sweeper, archive_for
from agent.logging import get_logger
from agent.pacs.commitment import CommitmentRecorder
from agent.pacs.sender import Sender
from agent.pipeline.models import served_weights
from agent.pipeline.process import InlineScreening, ScreeningEngine, ScreeningProcess, decode_processes
from agent.queue import cluster, outbox, sweeps
from agent.queue.reporter import StudyReporter
from agent.queue.worker import Worker
from agent.scheduler import build_scheduler
from agent.spool import Spool
from agent.web.app import ModelInfo, create_app
from agent.web.server import WebServer

if TYPE_CHECKING:  # torch: loaded by load_screener only
    from agent.pipeline.infer import Screener

log = get_logger(__name__)


def make_rules(settings: Settings) -> Rules:
    return Rules.from_section(settings.eligibility)


def load_screener(settings: Settings) -> Screener:
    """The STR-Net screener, in this process (imports torch)."""
    from agent.pipeline.infer import Screener

    cfg = settings.worker
    return Screener(
        served_weights(settings), device=cfg.device, threshold=cfg.threshold, saliency=cfg.saliency,
        threads=cfg.cpu_threads or None,
    )


def load_screening(settings: Settings) -> ScreeningEngine:
    """Where the worker screens: a screening process that has loaded the served model
    (``worker.process``), else a screener in this process. Raises ConfigError for a bad checkpoint."""
    max_pixels, overlay = settings.eligibility.max_pixels, settings.reporting.overlay
    if settings.worker.process:
        return ScreeningProcess(served_weights(settings), settings.worker, max_pixels, overlay).start()
    return InlineScreening(load_screener(settings), max_pixels, overlay, decode_processes(settings.worker))


@dataclass
class Agent:
    """The running service: ingest, worker, study reporter, sender and scheduler."""

    settings: Settings
    db: Database
    spool: Spool
    results: Spool
    ingestor: Ingestor
    scp: StorageSCP
    tracker: AssociationTracker
    worker: Worker | None = None
    reporter: StudyReporter | None = None
    sender: Sender | None = None
    scheduler: BackgroundScheduler | None = None
    web: WebServer | None = None
    sweeper: Sweeper | None = None
    stopped: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, settings: Settings, *, worker: bool | None = None, web: bool = False) -> Agent:
        """Build the agent; ``worker=False`` builds ingest only (no model is loaded);
        ``web=True`` adds the admin web (``strnet serve`` asks for it)."""
        db = open_database(settings)
        scope = cluster.scope_of(settings)  # agent.node, agent.storage
        own = scope.name if scope.shared else ""  # shared storage: this node's folder of the shared spool
        spool = Spool(settings.spool_dir, min_free_bytes=settings.agent.min_free_disk_mb * 1024 * 1024, node_dir=own)
        results = Spool(settings.results_dir, node_dir=own)
        ingestor = Ingestor(db, spool, make_rules(settings), settings.scp.max_instance_mb * 1024 * 1024,
                            node=scope.name)  # fmt: skip
        tracker = AssociationTracker(db, scope, settings.agent.node_timeout_s)
        # storage commitment reports that a PACS sends on an association of its own, to the listener
        retry = outbox.RetryPolicy(settings.sender.max_attempts, settings.sender.backoff_base_s,
                                   settings.sender.backoff_max_s)  # fmt: skip
        reports = (
            CommitmentRecorder(db, retry, reporters={p.name: p.ae_title for p in settings.pacs})
            if any(p.storage_commitment for p in settings.pacs)
            else None
        )
        scp = StorageSCP(settings.scp, ingestor, tracker, commitment_reports=reports)
        agent = cls(settings, db, spool, results, ingestor, scp, tracker)
        run_worker = settings.worker.enabled if worker is None else worker
        if run_worker:
            routes = messages.routes(settings)  # [[hl7]] and [[fhir]]: one message per SR each
            sender = Sender(db, results, settings.pacs, settings.sender, settings.scp.ae_title,
                            message_routes=routes, transports=messages.transports() if routes else None,
                            scope=scope)  # fmt: skip
            if reports is not None:  # a failed commitment sends objects again: wake the sender
                reports.on_outbox = sender.wake.set
            # the SR build warms up in the worker thread, after the screening path (reporter: made next)
            screening_worker = Worker(settings, db, spool, results, load_screening(settings),
                                      reload=lambda: load_screening(settings), on_outbox=sender.wake.set,
                                      also_warm_up=lambda: reporter.warm_up())  # fmt: skip
            reporter = StudyReporter(settings, db, spool, results,
                                     served_model=lambda: screening_worker.screening.model,
                                     study_arriving=lambda uid: tracker.receiving(uid)
                                     or sweeps.being_retrieved(db, uid, sweeps.hold_s(settings.sweep.timeout_s)),
                                     on_outbox=sender.wake.set, message_routes=routes)  # fmt: skip
            agent.sender, agent.worker, agent.reporter = sender, screening_worker, reporter
        if settings.sweep.enabled:  # the scheduled archive sweep: C-MOVE to our listener, or C-GET into ingestor
            agent.sweeper = Sweeper(settings, db, make_rules(settings), archive_for(settings), ingestor)
        agent.scheduler = build_scheduler(
            db, spool, settings.retention.spool_days * 86400,
            report_sweep=agent.reporter.report_ready_studies if agent.reporter else None,
            sender_wake=agent.sender.wake.set if agent.sender else None,
            settings=settings,
            archive_sweep=agent.sweeper.scheduled if agent.sweeper else None,
            atna_export=Exporter(db, settings).run if settings.atna.enabled else None,
        )
        if web:
            agent.web = WebServer(create_app(
                settings, db, model_info=lambda: ModelInfo.of(agent.worker.screening.model if agent.worker else None),
                on_replay=agent.sender.wake.set if agent.sender else None,
                on_assessed=agent.reporter.report_assessment if agent.reporter else None,
            ), settings.web)
        return agent

    def start(self) -> None:
        if self.web is not None:  # first: a taken web port stops start-up before anything runs
            self.web.start()
        scope = cluster.scope_of(self.settings)
        cluster.beat(self.db, scope, self.settings.agent.storage, started=True)
        cluster.forget_associations(self.db, scope)  # this node's of a previous run: closed
        reconcile(self.db, self.spool, self.ingestor, scope=scope, results=self.results)
        resent = outbox.requeue_sending(self.db, scope)
        if resent:
            log.warning("outbox_resending", items=resent)
        with self.db.transaction() as s:
            trail.append(s, "application_activity", actor="strnet", detail={"activity": "start"})
        self.scp.start()
        if self.worker is not None:
            self.worker.start()
        if self.sender is not None:
            self.sender.start()
        if self.scheduler is not None:
            self.scheduler.start()

    def stop(self, grace_s: float = 10.0) -> None:
        if self.web is not None:
            self.web.stop()
        if self.sweeper is not None:
            self.sweeper.stop()  # before the listener: a sweep under way ends before its next study
        self.scp.stop(grace_s)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.reporter is not None:
            self.reporter.stop()  # a study-completion sweep under way ends before its next study
        abandoned = self.worker.stop() if self.worker is not None else 0
        if self.reporter is not None:
            self.reporter.close(wait=not abandoned)  # as the screening process: killed if it was
        if self.sender is not None:
            self.sender.stop()
        with self.db.transaction() as s:
            trail.append(s, "application_activity", actor="strnet", detail={"activity": "stop"})
        self.db.dispose()
        self.stopped.set()
