"""The result sender: outbox -> C-STORE SCU -> PACS, with backoff and a dead letter.

Status classes by name: Success and warnings (B000, B006, B007) are delivered (warnings logged);
out-of-resources and association or network failures are transient (exponential backoff with
jitter, DEAD after ``sender.max_attempts``); any other failure status and a permanent
association rejection are DEAD at once, without a retry storm.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Callable

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from agent import failpoints
from agent.audit.db import Database
from agent.config import PacsSection, SenderSection
from agent.errors import StorageError
from agent.ingest.spool import Spool
from agent.logging import get_logger
from agent.pacs import status
from agent.pacs.scu import tls_args
from agent.queue import outbox
from agent.queue.outbox import DueItem

log = get_logger(__name__)


class Sender:
    def __init__(
        self,
        db: Database,
        results: Spool,
        destinations: list[PacsSection],
        cfg: SenderSection,
        default_calling_ae: str,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.results = results
        self.destinations = {d.name: d for d in destinations}
        self.cfg = cfg
        self.default_calling_ae = default_calling_ae
        self.jitter = jitter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wake = threading.Event()
        _config.STORE_SEND_CHUNKED_DATASET = True  # send_c_store(path) streams the stored bytes

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="strnet-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except StorageError as exc:
                log.error("sender_database_error", error=str(exc))
            except Exception as exc:
                log.exception("sender_crashed", error=exc.__class__.__name__)
            self.wake.wait(self.cfg.poll_s)
            self.wake.clear()

    def run_once(self) -> int:
        """Send every due object once; returns how many were attempted."""
        due = outbox.lease_due(self.db)
        by_dest: dict[str, list[DueItem]] = defaultdict(list)
        for item in due:
            by_dest[item.destination].append(item)
        for name, items in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                for item in items:
                    outbox.dead(self.db, item.id, None, f"destination {name!r} is no longer configured")
                continue
            self._send_to(dest, items)
        return len(due)

    def _transient(self, item: DueItem, status_name: str | None, error: str) -> None:
        if item.attempts >= self.cfg.max_attempts:
            outbox.dead(self.db, item.id, status_name, f"gave up after {item.attempts} attempts: {error}")
            log.error(
                "result_dead", outbox_id=item.id, destination=item.destination, error=error, attempts=item.attempts
            )
            return
        when = outbox.next_attempt(item.attempts, self.cfg.backoff_base_s, self.cfg.backoff_max_s, self.jitter())
        outbox.retry_at(self.db, item.id, when, status_name, error)
        log.warning(
            "result_retry",
            outbox_id=item.id,
            destination=item.destination,
            error=error,
            attempt=item.attempts,
            next_attempt_at=when.isoformat(),
        )

    def _send_to(self, dest: PacsSection, items: list[DueItem]) -> None:
        ae = AE(ae_title=dest.calling_ae_title or self.default_calling_ae)
        for t in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, t, self.cfg.timeout_s)
        for sop_class in sorted({i.sop_class_uid for i in items}):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        try:
            tls = tls_args(dest)
        except (OSError, ValueError) as exc:  # unreadable CA/cert/key file: an operator must fix it
            for item in items:
                self._transient(item, None, f"TLS set-up failed: {exc}")
            return
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
        if not assoc.is_established:
            permanent = assoc.is_rejected and getattr(assoc.acceptor.primitive, "result", None) == 0x01
            reason = (
                "association rejected permanently"
                if permanent
                else (
                    "association rejected (transient)" if assoc.is_rejected else "association failed (PACS unreachable)"
                )
            )
            log.warning("pacs_association_failed", destination=dest.name, reason=reason)
            for item in items:
                if permanent:
                    outbox.dead(self.db, item.id, None, reason)
                    log.error("result_dead", outbox_id=item.id, destination=dest.name, error=reason)
                else:
                    self._transient(item, None, reason)
            return
        try:
            for n, item in enumerate(items):
                if not assoc.is_established:
                    for rest in items[n:]:
                        self._transient(rest, None, "association lost")
                    break
                self._send_one(assoc, dest, item)
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()

    def _send_one(self, assoc: object, dest: PacsSection, item: DueItem) -> None:
        path = self.results.path(item.path)
        try:
            dcmread(path, stop_before_pixels=True)  # readable, and a Part 10 file
        except (OSError, ValueError) as exc:
            outbox.dead(self.db, item.id, None, f"result file unreadable: {exc.__class__.__name__}")
            return
        failpoints.hit("mid_send")
        try:
            # a path, with chunked send on: the file's bytes go out as stored (no decode and
            # re-encode of a 2.5 MB overlay); our files are explicit VR little endian, as requested
            rsp = assoc.send_c_store(path)  # type: ignore[attr-defined]
        except (ValueError, RuntimeError) as exc:  # no accepted context for this SOP class
            outbox.dead(self.db, item.id, None, f"PACS did not accept the SOP class: {exc}")
            return
        code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if code is None:
            self._transient(item, None, "no response (timeout or abort)")
            return
        failpoints.hit("after_ack")
        cls = status.classify(code)
        name = status.name(code)
        if cls in (status.StatusClass.SUCCESS, status.StatusClass.WARNING):
            outbox.delivered(self.db, item.id, name)
            event = "sr_delivered" if item.kind == "sr" else "overlay_delivered"
            (log.warning if cls is status.StatusClass.WARNING else log.info)(
                event, outbox_id=item.id, destination=dest.name, sop_instance_uid=item.sop_instance_uid, status=name
            )
        elif cls is status.StatusClass.TRANSIENT:
            self._transient(item, name, f"PACS answered {name}")
        else:
            outbox.dead(self.db, item.id, name, f"PACS refused the object ({name})")
            log.error("result_dead", outbox_id=item.id, destination=dest.name, status=name)
