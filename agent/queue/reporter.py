"""The study reporter: a study's SR once every image of it is screened and it has gone quiet.

The scheduler's study-completion sweep calls ``report_ready_studies``; each SR is built in the SR
helper process (``reporting.build_processes``, agent/reporting/builder.py), written to the results
folder and recorded with its outbox rows in one commit. A study an association is still bringing
waits for it (``study_arriving``: the composition root passes the SCP's association tracker).

Each study is built on its own: whatever its SR build raises is recorded against that study
(``screening.record_report_failure``: tried again with backoff, given up after
``screening.SR_MAX_ATTEMPTS``), logged as ``report_failed`` with a redacted reason, and the sweep
goes on to the next study.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from agent.clock import utcnow
from agent.config import Settings
from agent.db import fls
from agent.db.engine import Database
from agent.db.models import StudyReport
from agent.dicom_values import read_laterality
from agent.domain import Findings, KneeFindings, ServedModel
from agent.ehr import messages
from agent.ehr.content import Assessment, study_result
from agent.errors import HelperClosed, StorageError, reason_of
from agent.logging import get_logger
from agent.pipeline.knees import study_knees
from agent.queue import cluster, screening
from agent.queue.outbox import OutgoingObject, write_message, write_object
from agent.reporting import uids
from agent.reporting.builder import BuiltSr, ReportBuilder, blank_source
from agent.spool import Spool

log = get_logger(__name__)


class StudyReporter:
    """Builds and records the SR of each complete, quiet study (the study-completion sweep).

    ``served_model``: the model the worker screens with now (the SR names its algorithm and the
    T-score interval's coverage); ``study_arriving(study_instance_uid)``: True while an association
    that brought instances of the study is still open, so more may come; ``jitter()`` in [0, 1)
    spreads the retries of failed SR builds.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        spool: Spool,
        results: Spool,
        served_model: Callable[[], ServedModel],
        study_arriving: Callable[[str], bool] | None = None,
        on_outbox: Callable[[], object] | None = None,
        jitter: Callable[[], float] = random.random,
        message_routes: list[messages.MessageRoute] | None = None,
    ) -> None:
        self.settings = settings
        # the HL7 and FHIR destinations: one message each per SR, recorded in the SR's commit
        self.message_routes = messages.routes(settings) if message_routes is None else message_routes
        self.db = db
        self.spool = spool
        self.results = results
        self.served_model = served_model
        self.study_arriving = study_arriving
        self.destinations = [p.name for p in settings.pacs]
        # called after each commit that queued objects for PACS (wakes the sender at once)
        self.on_outbox = on_outbox
        self.jitter = jitter
        self.report_builder = ReportBuilder(settings.reporting.build_processes, settings.reporting.build_timeout_s)
        self.reports = 0  # SRs recorded
        self.failures = 0  # SR builds that failed (each counted against its study)
        self._stop = threading.Event()
        # several agents on one database: this node's part, one builder per study (its claim)
        self.scope = cluster.scope_of(settings)
        self.claim_s = settings.reporting.build_timeout_s + 60.0

    def warm_up(self) -> None:
        """Build a throw-away SR, writing nothing: in the helper, in the background (inline: now)."""
        m = self.served_model()
        findings = Findings(0.5, m.threshold, False, 0.5, None, 0.0, -1.0, 1.0, m.tscore_coverage, m.algorithm)
        self.report_builder.warm_up(blank_source(), [findings])

    def stop(self) -> None:
        """A sweep in progress ends before its next study (the next start reports the rest)."""
        self._stop.set()

    def close(self, wait: bool = True) -> None:
        """Close the SR helper (``wait=False``: without waiting for the SR it is building)."""
        self.report_builder.close(wait=wait)

    def report_ready_studies(self) -> int:
        """Build the SR of every study that is complete and quiet (the study-completion sweep)."""
        built = 0
        for ready in screening.ready_studies(self.db, self.settings.reporting.quiet_period_s, self.scope):
            if self.study_arriving is not None and self.study_arriving(ready.study_instance_uid):
                continue  # an association that brought this study is still open: more may come
            if self._stop.is_set():
                break  # stopping: the next start reports it
            if not cluster.claim_study(self.db, self.scope, ready.study_id, self.claim_s,
                                       self.settings.agent.node_timeout_s):  # fmt: skip
                continue  # another agent is building this study's SR now
            try:
                again = screening.ready_studies(self.db, self.settings.reporting.quiet_period_s, self.scope,
                                                study_id=ready.study_id)  # fmt: skip
                if again:  # still due now that it is ours (another agent may have just built it)
                    ready = again[0]
                    built += self._report(ready)
            except HelperClosed:
                break  # stopped meanwhile: the next start reports it
            except Exception as exc:  # noqa: BLE001 - one study's failure, whatever it is, must not hold up the next
                if self._stop.is_set():
                    break  # the helper was stopped under the build: not the study's fault
                self._failed(ready, exc)
            finally:
                cluster.release_study(self.db, self.scope, ready.study_id)
        return built

    def _failed(self, ready: screening.ReadyStudy, exc: Exception) -> None:
        """Count the failure against this study (retried later, or given up) and log it once."""
        self.failures += 1
        reason = reason_of(exc)  # never str(exc): it may hold an element value
        try:
            failure = screening.record_report_failure(self.db, ready, reason, self.jitter())
        except StorageError:
            # the database is unavailable: the sweep ends here and the next one tries again
            log.error(
                "report_failed",
                study_instance_uid=ready.study_instance_uid,
                study_id=ready.study_id,
                revision=ready.revision,
                reason=reason,
                recorded=False,
            )
            raise
        except Exception as record_exc:  # noqa: BLE001 - not recorded, but the sweep goes on to the next study
            log.error("report_failed", study_instance_uid=ready.study_instance_uid, study_id=ready.study_id,
                      revision=ready.revision, reason=reason, recorded=False,
                      not_recorded=record_exc.__class__.__name__)  # fmt: skip
            return
        log.error(
            "report_failed",
            study_instance_uid=ready.study_instance_uid,  # logged hashed (agent/logging.py)
            study_id=ready.study_id,
            revision=ready.revision,
            reason=reason,
            attempt=failure.attempts,
            gave_up=failure.dead,
            next_attempt_at=failure.next_attempt_at.isoformat() if failure.next_attempt_at else None,
        )

    def _report(self, ready: screening.ReadyStudy) -> int:
        t0 = time.perf_counter()
        rows = screening.study_findings(self.db, ready.study_id, self.scope)
        sources = [dcmread(self.spool.path(p), stop_before_pixels=True) for p, _ in rows]
        served = self.served_model()
        findings = [screening.findings_of(r, served) for _, r in rows]
        knees = knees_of(sources, findings)
        # the knees decide the flag now: an SR that cannot be built must not hold it up
        screening.record_knees(self.db, ready, knees, [r.id for _, r in rows])
        sr = self.report_builder.build_sr(sources, findings, ready.revision, ready.predecessor, knees)
        obj = write_object(self.results, "sr", sr.data, sr.sop_class_uid, sr.sop_instance_uid)
        recorded = screening.record_report(
            self.db, ready, obj, sr.series_instance_uid, self.destinations, self.settings.sender.send,
            self._messages(ready, sources, findings, sr, knees), node=self.scope.name or None,
            knees=knees, result_ids=[r.id for _, r in rows],
        )  # fmt: skip
        if recorded:
            if self.on_outbox is not None:
                self.on_outbox()
            self.reports += 1
            log.info(
                "report_built",
                study_instance_uid=ready.study_instance_uid,
                revision=ready.revision,
                images=len(rows),
                knees=len(knees),
                sop_instance_uid=obj.sop_instance_uid,
                ms=round((time.perf_counter() - t0) * 1000, 1),  # read sources, build, write, record
            )
            return 1
        return 0

    def _messages(
        self, ready: screening.ReadyStudy, sources: Sequence[Any], findings: list[Findings], sr: BuiltSr,
        knees: list[KneeFindings],
    ) -> list[screening.OutgoingMessage]:
        """The study's message for each HL7 and FHIR destination, written to the results folder.
        One that cannot be built is recorded DEAD with the reason (the SR and the others go on)."""
        if not self.message_routes:
            return []
        out: list[screening.OutgoingMessage] = []
        try:
            result = study_result(
                sources, findings, report_sop_instance_uid=sr.sop_instance_uid,
                report_series_instance_uid=sr.series_instance_uid, revision=ready.revision,
                reported_at=utcnow().replace(tzinfo=UTC),  # aware: messages state the zone
                knees=knees,
            )  # fmt: skip
        except _MESSAGE_ERRORS as exc:
            result, failed = None, f"message content could not be read: {reason_of(exc)}"
        for route in self.message_routes:
            if result is not None:
                try:
                    data = route.build(result)
                except _MESSAGE_ERRORS as exc:
                    failed = f"{route.kind} message could not be built: {reason_of(exc)}"
                else:
                    rel = route.file_name(sr.sop_instance_uid)
                    obj = write_message(self.results, route.kind, data, route.label, sr.sop_instance_uid, rel)
                    out.append(screening.OutgoingMessage(obj, route.name, route.send_swept))
                    continue
            log.error("message_build_failed", destination=route.name, kind=route.kind, error=failed)
            blank = OutgoingObject(route.kind, route.label, sr.sop_instance_uid, "")
            out.append(screening.OutgoingMessage(blank, route.name, route.send_swept, failed))
        return out


    def report_assessment(self, study_id: int) -> int:
        """After a radiologist's verdict on a flagged image of the study: when it decides the study
        (confirmed or rejected), a FHIR bundle that updates the study's report (final or amended)
        for each ``[[fhir]]`` destination with ``send_assessments``, recorded in the outbox in one
        commit; returns how many were queued. Called by the admin web after the verdict's commit."""
        routes = [r for r in self.message_routes if r.kind == messages.FHIR and r.section.send_assessments]
        if not routes:
            return 0
        rows = screening.study_findings(self.db, study_id)
        latest = {a.result_id: a for a in fls.study_assessments(self.db, study_id)}
        verdict = study_verdict({r.id for _, r in rows if r.bone_loss}, latest)
        with self.db.reading() as s:
            report = s.execute(
                select(StudyReport).where(StudyReport.study_id == study_id).order_by(StudyReport.revision.desc())
            ).scalars().first()
        if verdict is None or report is None:  # undecided, or no SR yet (its bundle will say preliminary)
            return 0
        sources = [dcmread(self.spool.path(p), stop_before_pixels=True) for p, _ in rows]
        served = self.served_model()
        reasons = tuple(a.reason for a in latest.values() if a.verdict == "disagree" and a.reason)
        decided = max(a.at for a in latest.values()).replace(tzinfo=UTC)
        # one message per decision: keyed by the SR, the verdict and how many verdicts led to it
        key = uids.result_uid(report.sop_instance_uid, f"{verdict}-{max(a.result_id for a in latest.values())}-"
                              f"{len(latest)}-{decided.isoformat()}", "assessment")  # fmt: skip
        try:
            findings = [screening.findings_of(r, served) for _, r in rows]
            result = study_result(
                sources, findings,
                report_sop_instance_uid=report.sop_instance_uid,
                report_series_instance_uid=report.series_instance_uid, revision=report.revision,
                reported_at=report.created_at.replace(tzinfo=UTC), knees=knees_of(sources, findings),
            )  # fmt: skip
        except _MESSAGE_ERRORS as exc:
            log.error("assessment_message_failed", study_id=study_id, error=reason_of(exc))
            return 0
        result = dataclasses.replace(result, assessment=Assessment(verdict, reasons, decided))
        out: list[screening.OutgoingMessage] = []
        for route in routes:
            try:
                data = route.build(result)
            except _MESSAGE_ERRORS as exc:
                failed = f"{route.kind} assessment could not be built: {reason_of(exc)}"
                log.error("message_build_failed", destination=route.name, kind=route.kind, error=failed)
                blank = OutgoingObject(route.kind, route.label, key, "")
                out.append(screening.OutgoingMessage(blank, route.name, True, failed))
                continue
            obj = write_message(self.results, route.kind, data, route.label, key, route.file_name(key))
            out.append(screening.OutgoingMessage(obj, route.name, True))
        queued = screening.record_messages(self.db, study_id, out, self.settings.sender.send)
        if queued and self.on_outbox is not None:
            self.on_outbox()
        log.info("assessment_queued", study_id=study_id, verdict=verdict, messages=queued)
        return queued


def knees_of(sources: Sequence[Any], findings: list[Findings]) -> list[KneeFindings]:
    """The study's knees (agent/pipeline/knees.py), each film's side read as the SR reads it."""
    return study_knees([read_laterality(ds)[0] for ds in sources], findings)


def study_verdict(positive_ids: set[int], latest: dict[int, fls.StudyAssessment]) -> str | None:
    """The radiologist's verdict on a study's result from the latest verdict per flagged image:
    confirmed when any agrees, rejected when every flagged image has a disagreement, else none yet
    (as agent/db/fls.py decides the patient's state)."""
    if any(a.verdict == "agree" for a in latest.values()):
        return "confirmed"
    if positive_ids and all(i in latest and latest[i].verdict == "disagree" for i in positive_ids):
        return "rejected"
    return None


#: what building a message raises on inputs it cannot use (a library may quote the value: it
#: leaves here only through reason_of)
_MESSAGE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError)
