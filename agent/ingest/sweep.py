"""The retrospective sweep: find the archive's knee studies of a date range that the agent has not
screened, and retrieve them so they are screened like live ones (docs/operations.md, Sweep).

Day by day over the range (oldest first): C-FIND at STUDY level for each of ``sweep.modalities``
(ModalitiesInStudy, StudyDate), then at SERIES level; a series is kept when its modality is one
of ``sweep.modalities`` and the body-part rules of [eligibility] (``eligibility.body_part_reason``,
the same rules the listener applies) say knee; the agent's own results (series 9901/9902,
"STR-Net" descriptions, SR/OT) are never kept. Each study not yet screened is then retrieved
series by series, through an ``ArchiveSource`` (C-MOVE: the instances arrive at the agent's
listener; C-GET: they come back on the query association and go through the same ``Ingestor``).

State is in the database (agent/queue/sweeps.py): a study is marked ``retrieving`` (with its
audit event) before its retrieve starts, ``done`` after; a cursor per sweep says which day comes
next. A sweep killed at any point resumes at its day and never retrieves a study it has done.
The rate limit (``sweep.max_studies_per_hour``) counts retrieval starts in the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode as decode_dataset

from agent import failpoints
from agent.config import PacsSection, Settings
from agent.db.engine import Database
from agent.ingest.eligibility import Rules, body_part_reason
from agent.ingest.handlers import Ingestor, StoreRequest
from agent.ingest.scp import guard_requested_connection, message_received, pdu_limit_bytes
from agent.logging import get_logger
from agent.pacs import status
from agent.pacs.archive import ArchiveError, ArchiveSource, Received, SeriesMatch, StudyMatch
from agent.queue import sweeps

log = get_logger(__name__)

#: the agent's own results: never retrieved (agent/reporting/sr.py, overlay.py)
OWN_SERIES_NUMBERS = frozenset({9901, 9902})
OWN_DESCRIPTION_PREFIX = "STR-NET"
OWN_MODALITIES = frozenset({"SR", "OT"})


@dataclass(frozen=True)
class PlannedStudy:
    """A study with knee series: what the sweep retrieves (or, dry, would)."""

    study_instance_uid: str
    study_date: str | None
    modalities: tuple[str, ...]
    series: tuple[SeriesMatch, ...]
    screened: bool = False

    @property
    def instances(self) -> int:
        return sum(s.instances or 0 for s in self.series)


@dataclass
class SweepReport:
    days: int = 0
    studies_found: int = 0
    planned: list[PlannedStudy] = field(default_factory=list)
    retrieved: int = 0
    already_screened: int = 0
    failed: list[str] = field(default_factory=list)  # study UID: reason (no PHI)
    finished: bool = False
    paused: str | None = None  # why the sweep stopped before the end of its range


def keeps_series(study: StudyMatch, series: SeriesMatch, modalities: frozenset[str], rules: Rules) -> bool:
    """A knee series of a screened modality, and not one of the agent's own results."""
    if series.modality in OWN_MODALITIES or series.modality not in modalities:
        return False
    if series.series_number in OWN_SERIES_NUMBERS:
        return False
    if series.series_description.strip().upper().startswith(OWN_DESCRIPTION_PREFIX):
        return False
    ds = Dataset()  # the rules read tags: give them what the query returned
    ds.BodyPartExamined = series.body_part
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = series.series_description
    ds.ProtocolName = series.protocol_name
    return body_part_reason(ds, rules) is None


def in_window(window: str, now: datetime) -> bool:
    """Whether local time ``now`` is in ``HH:MM-HH:MM`` (which may cross midnight)."""
    start_s, end_s = window.split("-")
    start = int(start_s[:2]) * 60 + int(start_s[3:])
    end = int(end_s[:2]) * 60 + int(end_s[3:])
    minute = now.hour * 60 + now.minute
    if start == end:
        return True
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _from_da(text: str) -> date:
    return datetime.strptime(text, "%Y%m%d").date()


class Sweeper:
    """Runs sweeps: ``sweep`` over a range (``strnet sweep``), ``scheduled`` from the scheduler."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        rules: Rules,
        source_for: Callable[[PacsSection], ArchiveSource],
        ingestor: Ingestor | None = None,
        *,
        actor: str | None = None,
        sleep: Callable[[float], object] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cfg = settings.sweep
        self.db = db
        self.rules = rules
        self.source_for = source_for
        self.ingestor = ingestor
        self.actor = actor or settings.scp.ae_title
        self.modalities = frozenset(self.cfg.modalities)
        self._sleep = sleep
        self._monotonic = monotonic
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    # -- one day -------------------------------------------------------------------------------
    def plan_day(self, source: ArchiveSource, day: date) -> tuple[int, list[PlannedStudy]]:
        """(studies found, those with knee series) on ``day``; every C-FIND audited."""
        studies: dict[str, StudyMatch] = {}
        for modality in self.cfg.modalities:
            try:
                found = source.find_studies(day, day, modality)
            except ArchiveError:
                sweeps.audit_query(self.db, self.actor, source.name, "STUDY",
                                   {"study_date": _da(day), "modality": modality}, outcome=8)  # fmt: skip
                raise
            sweeps.audit_query(self.db, self.actor, source.name, "STUDY",
                               {"study_date": _da(day), "modality": modality, "matches": len(found)})  # fmt: skip
            for m in found:
                studies.setdefault(m.study_instance_uid, m)
        planned = []
        for uid in sorted(studies):
            study = studies[uid]
            try:
                series = source.find_series(uid)
            except ArchiveError:
                sweeps.audit_query(self.db, self.actor, source.name, "SERIES", {"study": uid}, outcome=8)
                raise
            kept = tuple(s for s in series if keeps_series(study, s, self.modalities, self.rules))
            sweeps.audit_query(self.db, self.actor, source.name, "SERIES",
                               {"study": uid, "matches": len(series), "kept": len(kept)})  # fmt: skip
            if kept:
                planned.append(PlannedStudy(uid, study.study_date, study.modalities, kept))
        screened = sweeps.already_screened(self.db, [p.study_instance_uid for p in planned])
        return len(studies), [
            PlannedStudy(p.study_instance_uid, p.study_date, p.modalities, p.series, p.study_instance_uid in screened)
            for p in planned
        ]

    # -- the rate limit ------------------------------------------------------------------------
    def _wait_for_slot(self, wait: bool, deadline: float | None, echo: Callable[[str], object] | None) -> bool:
        """True when a study may be retrieved now (fewer than max_studies_per_hour started in the
        last hour); waits for a slot when ``wait`` (and the deadline allows), else False."""
        limit = self.cfg.max_studies_per_hour
        while not self.stopping.is_set():
            started = sweeps.retrieves_since(self.db, sweeps.hour_ago())
            if len(started) < limit:
                return True
            free_in = max(1.0, (started[0] - sweeps.hour_ago()).total_seconds() + 1.0)
            if not wait or (deadline is not None and self._monotonic() + free_in > deadline):
                return False
            if echo is not None:
                echo(f"rate limit ({limit} studies per hour): waiting {free_in:.0f} s")
            self._sleep(min(free_in, 60.0))
        return False

    # -- one study -----------------------------------------------------------------------------
    def _store(self, received: Received) -> int:
        """An instance a C-GET brought: the same path as a C-STORE at the listener."""
        if self.ingestor is None:
            return status.OUT_OF_RESOURCES
        ts = UID(received.transfer_syntax)
        try:
            ds = decode_dataset(BytesIO(received.raw), ts.is_implicit_VR, ts.is_little_endian)
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for a dataset it cannot decode
            return status.CANNOT_UNDERSTAND
        code, _ = self.ingestor.store(StoreRequest(
            received.sop_class_uid, received.sop_instance_uid, ts, received.raw, ds,
            received.calling_ae, received.peer_host,
        ))  # fmt: skip
        return code

    def retrieve(self, source: ArchiveSource, study: PlannedStudy) -> tuple[str | None, str]:
        """Retrieve the study's knee series: (None when all arrived, else the reason; the study's
        sweep state after it)."""
        uid = study.study_instance_uid
        sweeps.begin_retrieve(self.db, uid, self.actor, {
            "method": source.method, "series": len(study.series), "instances": study.instances,
            "destination": (self.cfg.move_ae_title or self.settings.scp.ae_title) if source.method == "move" else None,
        })  # fmt: skip
        t0 = time.perf_counter()
        try:
            outcome = source.retrieve(uid, [s.series_instance_uid for s in study.series], self._store)
        except ArchiveError as exc:
            error: str | None = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure must end the retrieve, not leave it RETRIEVING
            error = f"retrieve failed ({exc.__class__.__name__})"
        else:
            error = None if outcome.ok else f"{outcome.detail}; {outcome.failed} failed, {outcome.completed} completed"
        failpoints.hit("mid_sweep")
        state = sweeps.end_retrieve(self.db, uid, error)
        log.info("sweep_study_retrieved" if error is None else "sweep_study_failed", study_instance_uid=uid,
                 pacs=source.name, series=len(study.series), error=error,
                 state=state, ms=round((time.perf_counter() - t0) * 1000, 1))  # fmt: skip
        return error, state

    # -- a range -------------------------------------------------------------------------------
    def sweep(
        self,
        pacs: PacsSection,
        date_from: date,
        date_to: date,
        *,
        dry_run: bool = False,
        key: str | None = None,
        wait_for_rate: bool = True,
        restart_finished: bool = True,
        deadline: float | None = None,
        still_open: Callable[[], bool] | None = None,
        echo: Callable[[str], object] | None = None,
    ) -> SweepReport:
        """Sweep ``pacs`` over [date_from, date_to], resuming where the sweep ``key`` stopped.

        ``dry_run``: query (audited) and plan only; nothing is retrieved or recorded as found.
        Stops early (``report.paused``), between studies, when stopped, past ``deadline``
        (monotonic), when ``still_open`` says no (the scheduled sweep's window closed), when the
        rate limit says wait and ``wait_for_rate`` is false, or after a study failed; the day is
        swept again next time (what it has done is not retrieved again). A source with a
        ``close`` (the DICOMweb one's HTTP session) is closed after."""
        source = self.source_for(pacs)
        try:
            return self._sweep(source, pacs, date_from, date_to, dry_run, key, restart_finished, wait_for_rate,
                               deadline, still_open, echo)  # fmt: skip
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                close()

    def _sweep(
        self,
        source: ArchiveSource,
        pacs: PacsSection,
        date_from: date,
        date_to: date,
        dry_run: bool,
        key: str | None,
        restart_finished: bool,
        wait_for_rate: bool,
        deadline: float | None,
        still_open: Callable[[], bool] | None,
        echo: Callable[[str], object] | None,
    ) -> SweepReport:
        report = SweepReport()
        key = key or f"{pacs.name}:{_da(date_from)}:{_da(date_to)}"
        day = date_from
        if not dry_run:
            at = sweeps.cursor(self.db, key)
            if at is not None and not (at[1] and restart_finished):
                day = max(date_from, _from_da(at[0]))

        def pause() -> str | None:
            if self.stopping.is_set():
                return "stopped"
            if deadline is not None and self._monotonic() > deadline:
                return "time is up"
            if still_open is not None and not still_open():
                return "the window closed"
            return None

        while day <= date_to:
            report.paused = pause()
            if report.paused is not None:
                return report
            found, planned = self.plan_day(source, day)
            report.days += 1
            report.studies_found += found
            report.planned += planned
            if dry_run:
                day += timedelta(days=1)
                continue
            sweeps.record_found(self.db, pacs.name, [
                sweeps.FoundStudy(p.study_instance_uid, p.study_date, len(p.series), p.instances) for p in planned
            ], self.cfg.send_results)  # fmt: skip
            for study in planned:
                if study.screened:
                    sweeps.mark_done(self.db, study.study_instance_uid)
                    report.already_screened += 1
                    continue
                report.paused = pause()
                if report.paused is not None:
                    return report
                if not self._wait_for_slot(wait_for_rate, deadline, echo):
                    report.paused = "stopped" if self.stopping.is_set() else "rate limit"
                    return report
                error, state = self.retrieve(source, study)
                if error is not None:
                    report.failed.append(f"{study.study_instance_uid}: {error}")
                    if state == sweeps.GIVEN_UP:  # tried enough: the sweep goes on without it
                        continue
                    report.paused = "a retrieve failed"
                    return report
                report.retrieved += 1
                if echo is not None:
                    echo(f"retrieved {study.study_instance_uid} ({len(study.series)} series)")
            day += timedelta(days=1)
            sweeps.set_cursor(self.db, key, _da(day))
        if not dry_run:
            sweeps.set_cursor(self.db, key, _da(day), finished=True)
        report.finished = True
        return report

    def scheduled(self, now: datetime | None = None, budget_s: float = 50.0) -> int:
        """One tick of the scheduled sweep: within the time window, sweep every PACS with
        ``query = true`` from ``sweep.since`` to yesterday for at most ``budget_s``, within the
        rate limit, stopping between studies when the window closes (local time ``now`` plus the
        time the tick has run); the next tick goes on from the cursor. Returns the studies
        retrieved."""
        now = now or datetime.now()
        if not self.cfg.enabled or self.cfg.since is None or not in_window(self.cfg.window, now):
            return 0
        since = datetime.strptime(self.cfg.since, "%Y-%m-%d").date()
        yesterday = now.date() - timedelta(days=1)
        started = self._monotonic()
        deadline = started + budget_s
        window = self.cfg.window

        def still_open() -> bool:
            return in_window(window, now + timedelta(seconds=self._monotonic() - started))

        retrieved = 0
        for pacs in self.settings.pacs:
            if not pacs.query or since > yesterday:
                continue
            try:
                report = self.sweep(pacs, since, yesterday, key=f"{pacs.name}:scheduled", wait_for_rate=False,
                                    restart_finished=False, deadline=deadline, still_open=still_open)  # fmt: skip
            except ArchiveError as exc:
                log.warning("sweep_query_failed", pacs=pacs.name, error=str(exc))
                continue
            retrieved += report.retrieved
            if report.failed:
                log.warning("sweep_paused", pacs=pacs.name, reason=report.paused, failed=len(report.failed))
        return retrieved


def archive_for(settings: Settings) -> Callable[[PacsSection], ArchiveSource]:
    """The query/retrieve source of a [[pacs]] entry, as [sweep] configures it: DIMSE (C-FIND,
    C-MOVE or C-GET), or QIDO-RS/WADO-RS for ``kind = "dicomweb"``."""
    from agent.pacs.qr import DimseArchive
    from agent.pacs.wado import DicomwebArchive

    cfg = settings.sweep

    def make(pacs: PacsSection) -> ArchiveSource:
        if pacs.kind == "dicomweb":
            return DicomwebArchive(pacs, timeout_s=cfg.timeout_s, max_bytes=settings.scp.max_instance_mb * 1024 * 1024)
        move_to = cfg.move_ae_title or settings.scp.ae_title
        limit = pdu_limit_bytes(settings.scp.max_instance_mb)  # the listener's guard
        return DimseArchive(pacs, settings.scp.ae_title, method=cfg.retrieve, move_ae_title=move_to,
                            timeout_s=cfg.timeout_s,
                            on_connect=lambda event: guard_requested_connection(event, limit, cfg.timeout_s),
                            on_message=message_received)  # fmt: skip

    return make
