"""The result sender: outbox -> C-STORE SCU -> PACS, with backoff and a dead letter.

Status classes by name: Success and warnings (B000, B006, B007) are delivered (warnings logged);
out-of-resources and association or network failures are transient (exponential backoff with
jitter, DEAD after ``sender.max_attempts``); any other failure status and a permanent
association rejection are DEAD at once, without a retry storm.

One association per destination is kept open for ``sender.keep_open_s`` after its last send, so
a stream of results (an overlay per image, an SR per study) does not wait for an association
set-up and release per batch: one thread sends everything in turn, and those 47 ms each were the
larger part of an object's time in the outbox under load (ADR 0008). It is released when idle
or when the sender stops, and replaced when the PACS has released or aborted it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
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

# what the agent sends (reporting/sr.py, reporting/overlay.py): an association proposes both, so
# the one kept open carries SRs and overlays alike
RESULT_SOP_CLASSES = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)


@dataclass
class _Held:
    """An association kept open towards one destination (the sender thread's alone)."""

    assoc: Any
    sop_classes: frozenset[str]
    last_used: float  # monotonic


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
        self._held: dict[str, _Held] = {}
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
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except StorageError as exc:
                    log.error("sender_database_error", error=str(exc))
                except Exception as exc:
                    log.exception("sender_crashed", error=exc.__class__.__name__)
                self.release_idle()
                self.wake.wait(self.cfg.poll_s)
                self.wake.clear()
        finally:
            self.release_idle(all_=True)

    def release_idle(self, all_: bool = False) -> None:
        """Release the associations idle for ``sender.keep_open_s`` (``all_``: every one)."""
        now = time.monotonic()
        for name, held in list(self._held.items()):
            if all_ or now - held.last_used >= self.cfg.keep_open_s or not held.assoc.is_established:
                self._drop(name)

    def _drop(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is None:
            return
        try:
            if held.assoc.is_established:
                held.assoc.release()
            else:
                held.assoc.abort()
        except Exception as exc:  # noqa: BLE001 - a PACS gone mid-release: nothing left to do
            log.warning("pacs_release_failed", destination=name, error=exc.__class__.__name__)

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
        held = self._association(dest, items)
        if held is None:
            return
        try:
            for n, item in enumerate(items):
                if not held.assoc.is_established:
                    for rest in items[n:]:
                        self._transient(rest, None, "association lost")
                    break
                self._send_one(held.assoc, dest, item)
        finally:
            held.last_used = time.monotonic()
            if not held.assoc.is_established or self.cfg.keep_open_s <= 0:
                self._drop(dest.name)

    def _association(self, dest: PacsSection, items: list[DueItem]) -> _Held | None:
        """The association held for ``dest`` when it is still up and proposed every SOP class of
        ``items``, else a new one (held from now on). None when it cannot be established: the
        items are then retried later or DEAD, by the rejection's kind."""
        classes = {i.sop_class_uid for i in items}
        held = self._held.get(dest.name)
        if held is not None and held.assoc.is_established and classes <= held.sop_classes:
            return held
        self._drop(dest.name)
        ae = AE(ae_title=dest.calling_ae_title or self.default_calling_ae)
        for t in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, t, self.cfg.timeout_s)
        proposed = frozenset(classes | set(RESULT_SOP_CLASSES))
        for sop_class in sorted(proposed):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        try:
            tls = tls_args(dest)
        except (OSError, ValueError) as exc:  # unreadable CA/cert/key file: an operator must fix it
            for item in items:
                self._transient(item, None, f"TLS set-up failed: {exc}")
            return None
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
            return None
        held = _Held(assoc, proposed, time.monotonic())
        self._held[dest.name] = held
        return held

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
        except RuntimeError:  # no longer established: the PACS released or aborted it meanwhile
            self._transient(item, None, "association lost")
            return
        except ValueError as exc:  # no accepted context for this SOP class
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
