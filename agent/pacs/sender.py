"""The result sender: outbox -> C-STORE SCU -> PACS, with backoff and a dead letter.

Status classes by name: Success and warnings (B000, B006, B007) are delivered (warnings logged);
out-of-resources and association or network failures are transient (exponential backoff with
jitter, DEAD after ``sender.max_attempts``); any other failure status and a permanent
association rejection are DEAD at once, without a retry storm.

``sender.connections`` threads (lanes) send at the same time, each over an association of its own
to each destination: a PACS spends most of a C-STORE's time storing, not receiving (Orthanc: 115
ms per 2 MB overlay, 22 ms of it CPU), so a second association nearly halves the wait of a
burst. Each lane leases its share of what is due (``outbox.lease_due``) and keeps its association
open for ``sender.keep_open_s`` after its last send, so a stream of results (an overlay per image,
an SR per study) does not wait for an association set-up and release per object (47 ms each,
ADR 0008). An association is released when idle or when the sender stops, and replaced when the
PACS has released or aborted it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE

from agent import failpoints
from agent.compat import PatchMissing, pynetdicom_internals, warn_once
from agent.compat.pynetdicom_internals import AWAITING_RELEASE_RESPONSE, DATA_TRANSFER, dul_state
from agent.config import PacsSection, SenderSection
from agent.db.engine import Database
from agent.errors import StorageError
from agent.logging import get_logger
from agent.pacs import status
from agent.pacs.identity import identify
from agent.pacs.scu import tls_args
from agent.queue import outbox
from agent.queue.outbox import DueItem
from agent.spool import Spool

log = get_logger(__name__)

# what the agent sends (reporting/sr.py, reporting/overlay.py): an association proposes both, so
# the one kept open carries SRs and overlays alike
RESULT_SOP_CLASSES = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)


@dataclass
class _Held:
    """An association kept open towards one destination (one lane's alone)."""

    assoc: Any
    sop_classes: frozenset[str]
    last_used: float  # monotonic


@dataclass
class Lane:
    """One sender thread's associations, by destination name, and the destinations that refused
    it an association while another lane held one (a PACS's per-AE limit): left to that lane
    until the monotonic time given."""

    held: dict[str, _Held] = field(default_factory=dict)
    refused_until: dict[str, float] = field(default_factory=dict)


#: pynetdicom's own loop delay of a connection's thread (DUL), and ours while an association is idle
BUSY_LOOP_S = pynetdicom_internals.DUL_LOOP_DELAY_S
IDLE_LOOP_S = 0.02


def _reported(missing: PatchMissing | None) -> None:
    """Say once (``library_patch_missing``) that a pynetdicom patch could not act: the sender goes
    on over pynetdicom's public path, at its cost."""
    if missing is not None:
        warn_once(log, missing)


def quiet(assoc: Any) -> None:
    """Let a held association idle cheaply until its next use (``busy``).

    pynetdicom (3.0.4) polls every open association in two threads that sleep 1 ms a turn: about
    100 ms of CPU per second for each association held open and idle, measured, and the lanes hold
    one each. The association's reactor is paused (it then waits on an event; ``send_c_store``,
    ``release`` and ``abort`` pause and resume it themselves) and its DUL thread, which keeps
    reading the socket, turns every 20 ms instead of every 1 (13 ms of CPU per second, measured;
    it goes back to 1 ms before a send, or each PDU of the send would wait a turn). An abort or a
    release request from the PACS still moves the DUL's state machine: ``usable`` reads that.
    """
    if assoc.is_established:
        _reported(pynetdicom_internals.pause_reactor(assoc, wait_s=1.0))  # a loop turn, at most
        _reported(pynetdicom_internals.set_dul_loop_delay(assoc, IDLE_LOOP_S))


def busy(assoc: Any) -> None:
    """Undo ``quiet``'s slower DUL turn before sending (the reactor resumes by itself)."""
    _reported(pynetdicom_internals.set_dul_loop_delay(assoc, BUSY_LOOP_S))


def release_requested(assoc: Any) -> bool:
    """The PACS asked to release while the reactor was paused (the DUL waits for our answer, which
    only the reactor gives)."""
    return bool(assoc.dul.is_alive() and dul_state(assoc) == AWAITING_RELEASE_RESPONSE)


def usable(assoc: Any) -> bool:
    """Established, and its connection still in the data-transfer state: False once the PACS
    aborted it, closed the connection or asked to release, even while its reactor is paused."""
    return bool(assoc.is_established and assoc.dul.is_alive() and dul_state(assoc) == DATA_TRANSFER)


class Wake:
    """Wakes every lane at once (with a ``threading.Event`` the first lane to clear it would leave
    the others asleep until their next poll)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def set(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def generation(self) -> int:
        with self._cond:
            return self._generation

    def wait(self, seen: int, timeout_s: float) -> None:
        """Return when ``set`` was called after ``generation()`` returned ``seen``, or after
        ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout_s)


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
        self._threads: list[threading.Thread] = []
        self.wake = Wake()
        self._holding: Counter[str] = Counter()  # destination -> lanes holding an association
        self._holding_lock = threading.Lock()
        _reported(pynetdicom_internals.enable_chunked_send())  # send_c_store(path) streams the stored bytes

    def start(self) -> None:
        n = self.cfg.connections
        self._threads = [
            threading.Thread(
                target=self._loop, name=f"strnet-sender-{i + 1}" if n > 1 else "strnet-sender", daemon=True
            )
            for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        lane = Lane()
        try:
            while not self._stop.is_set():
                seen = self.wake.generation()
                sent = 0
                try:
                    sent = self.run_once(lane)
                except StorageError as exc:
                    log.error("sender_database_error", error=str(exc))
                except Exception as exc:
                    log.exception("sender_crashed", error=exc.__class__.__name__)
                self.release_idle(lane)
                if not sent:  # else look again at once: a lane leases only its share
                    self.wake.wait(seen, self.cfg.poll_s)
        finally:
            self.release_idle(lane, all_=True)

    def release_idle(self, lane: Lane, all_: bool = False) -> None:
        """Release ``lane``'s associations idle for ``sender.keep_open_s`` (``all_``: every one)."""
        now = time.monotonic()
        for name, held in list(lane.held.items()):
            if all_ or now - held.last_used >= self.cfg.keep_open_s or not usable(held.assoc):
                self._drop(lane, name)

    def _drop(self, lane: Lane, name: str) -> None:
        held = lane.held.pop(name, None)
        if held is None:
            return
        self._not_holding(name)
        assoc = held.assoc
        try:
            if usable(assoc):
                busy(assoc)  # the release handshake at pynetdicom's pace
                assoc.release()
            elif release_requested(assoc):  # the PACS released it: let pynetdicom answer and end it
                busy(assoc)
                _reported(pynetdicom_internals.resume_reactor(assoc))  # paused by quiet()
            else:  # a release request would wait for an answer that will not come
                assoc.abort()
        except Exception as exc:  # noqa: BLE001 - a PACS gone mid-release: nothing left to do
            log.warning("pacs_release_failed", destination=name, error=exc.__class__.__name__)

    def run_once(self, lane: Lane | None = None) -> int:
        """Send this lane's share of the due objects once; returns how many were attempted.
        Without ``lane``: every due object, over associations released before returning."""
        own = lane is None
        lane = Lane() if lane is None else lane
        try:
            return self._send_due(lane, 1 if own else self.cfg.connections)
        finally:
            if own:
                self.release_idle(lane, all_=True)

    def _send_due(self, lane: Lane, share: int) -> int:
        due = outbox.lease_due(self.db, share=share)
        by_dest: dict[str, list[DueItem]] = defaultdict(list)
        for item in due:
            by_dest[item.destination].append(item)
        attempted = 0
        for name, items in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                for item in items:
                    outbox.dead(self.db, item.id, None, f"destination {name!r} is no longer configured")
                attempted += len(items)
            elif lane.refused_until.get(name, 0.0) > time.monotonic() and self._held_elsewhere(lane, name):
                outbox.unlease(self.db, [i.id for i in items])  # for the lane that has an association
            else:
                attempted += self._send_to(lane, dest, items)
        return attempted

    def _held_elsewhere(self, lane: Lane, name: str) -> bool:
        """Another lane holds an association to destination ``name``."""
        with self._holding_lock:
            return self._holding[name] - (1 if name in lane.held else 0) > 0

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

    def _send_to(self, lane: Lane, dest: PacsSection, items: list[DueItem]) -> int:
        """Send ``items`` over this lane's association to ``dest``; returns how many were
        attempted (0: handed back for another lane)."""
        held = self._association(lane, dest, items)
        if held is None:
            return 0 if lane.refused_until.get(dest.name, 0.0) > time.monotonic() else len(items)
        busy(held.assoc)
        try:
            for n, item in enumerate(items):
                if not usable(held.assoc):
                    for rest in items[n:]:
                        self._transient(rest, None, "association lost")
                    break
                self._send_one(held.assoc, dest, item)
        finally:
            held.last_used = time.monotonic()
            if not usable(held.assoc) or self.cfg.keep_open_s <= 0:
                self._drop(lane, dest.name)
            else:
                quiet(held.assoc)
        return len(items)

    def _association(self, lane: Lane, dest: PacsSection, items: list[DueItem]) -> _Held | None:
        """The association held for ``dest`` when it is still up and proposed every SOP class of
        ``items``, else a new one (held from now on). None when it cannot be established: the
        items are then retried later or DEAD, by the rejection's kind."""
        classes = {i.sop_class_uid for i in items}
        held = lane.held.get(dest.name)
        if held is not None and usable(held.assoc) and classes <= held.sop_classes:
            return held
        self._drop(lane, dest.name)
        ae = identify(AE(ae_title=dest.calling_ae_title or self.default_calling_ae))
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
        # counted from the attempt, not from its success: a lane the PACS refuses meanwhile must see
        # this one as connected (it is, to the PACS), or it counts the refusal as a failed attempt
        with self._holding_lock:
            self._holding[dest.name] += 1
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
        except BaseException:
            self._not_holding(dest.name)
            raise
        if not assoc.is_established:
            self._not_holding(dest.name)
        if not assoc.is_established and self._held_elsewhere(lane, dest.name):
            # Refused while another lane is connected with the same AE titles: the PACS's limit of
            # associations per AE, not a fault. The items go back to that lane, no attempt counted.
            lane.refused_until[dest.name] = time.monotonic() + self.cfg.backoff_base_s
            outbox.unlease(self.db, [i.id for i in items])
            log.info("pacs_association_limit", destination=dest.name, lanes_connected=self._holding[dest.name])
            return None
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
        lane.held[dest.name] = held
        lane.refused_until.pop(dest.name, None)
        return held

    def _not_holding(self, name: str) -> None:
        with self._holding_lock:
            self._holding[name] -= 1

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
