"""The result sender: outbox -> C-STORE SCU -> PACS, with backoff and a dead letter (a destination
of kind dicomweb gets each object by STOW-RS instead: agent/pacs/dicomweb.py, same states; an
``[[hl7]]`` or ``[[fhir]]`` destination gets each message by its transport, agent/ehr/, same states).

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

To a destination with ``storage_commitment = true`` a stored object is SENT, not DELIVERED: the
objects stored over an association are asked for in one storage commitment request (N-ACTION,
agent/pacs/commitment.py) when the association is let go, or once the first of them has waited
``sender.keep_open_s``; the association then stays open a moment for a report on it, and the
PACS may also report on a new association to the agent's listener. A refused request sends them
back to RETRY (DEAD after ``sender.max_attempts``), or DEAD at once when the PACS does not do
storage commitment; one not confirmed within ``storage_commitment_timeout_s`` goes back to RETRY.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt

from agent import failpoints
from agent.compat import PatchMissing, pynetdicom_internals, warn_once
from agent.compat.pynetdicom_internals import AWAITING_RELEASE_RESPONSE, DATA_TRANSFER, dul_state
from agent.config import PacsSection, SenderSection
from agent.db.engine import Database
from agent.ehr.delivery import Delivery, MessageTransport
from agent.ehr.messages import MessageRoute
from agent.errors import StorageError
from agent.logging import get_logger
from agent.pacs import commitment, status
from agent.pacs.dicomweb import StowSender
from agent.pacs.identity import identify
from agent.pacs.scu import tls_args
from agent.queue import outbox
from agent.queue.cluster import SOLO, NodeScope
from agent.queue.outbox import DueItem
from agent.spool import Spool

log = get_logger(__name__)

# what the agent sends (reporting/sr.py, reporting/overlay.py): an association proposes both, so
# the one kept open carries SRs and overlays alike
RESULT_SOP_CLASSES = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)


@dataclass
class _Reports:
    """Storage commitment reports that came on one association (the PACS may answer on the
    association that asked while it is open): ``lock`` is held while one is being recorded."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    last_at: float = 0.0  # monotonic time of the last one


@dataclass
class _Held:
    """An association kept open towards one destination (one lane's alone)."""

    assoc: Any
    sop_classes: frozenset[str]
    last_used: float  # monotonic
    # storage commitment: objects stored over it whose commitment is still to ask (asked in one
    # N-ACTION when the association is let go, at most sender.keep_open_s after the first)
    stored: list[DueItem] = field(default_factory=list)
    first_stored: float = 0.0  # monotonic
    reports: _Reports = field(default_factory=_Reports)


@dataclass
class _Asked:
    """An association that has asked for storage commitment, kept open ``SAME_ASSOCIATION_S`` for
    a report on it, then released (a PACS may also report on a new association of its own)."""

    assoc: Any
    destination: str
    until: float  # monotonic
    reports: _Reports


@dataclass
class Lane:
    """One sender thread's associations, by destination name, and the destinations that refused
    it an association while another lane held one (a PACS's per-AE limit): left to that lane
    until the monotonic time given."""

    held: dict[str, _Held] = field(default_factory=dict)
    refused_until: dict[str, float] = field(default_factory=dict)
    asked: list[_Asked] = field(default_factory=list)
    transports: dict[str, MessageTransport] = field(default_factory=dict)  # by message kind


#: pynetdicom's own loop delay of a connection's thread (DUL), and ours while an association is idle
BUSY_LOOP_S = pynetdicom_internals.DUL_LOOP_DELAY_S
IDLE_LOOP_S = 0.02
#: how long an association that asked for storage commitment stays open for a report on it (a PACS
#: that answers on the same association does so at once; Orthanc opens a new one), and how long
#: after a report came on it (its response goes out after our handler returns)
SAME_ASSOCIATION_S = 1.0
AFTER_REPORT_S = 0.2
#: how often the sender looks for storage commitments past their timeout
COMMITMENT_CHECK_S = 1.0


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
        message_routes: Sequence[MessageRoute] = (),
        transports: Mapping[str, Callable[[], MessageTransport]] | None = None,
        scope: NodeScope = SOLO,
    ) -> None:
        self.db = db
        self.scope = scope  # node storage: sends only the rows whose file this node wrote
        # HL7 and FHIR destinations by name, and a transport factory per message kind (one
        # transport per lane: each keeps its own connections)
        self.message_routes = {r.name: r for r in message_routes}
        self.transports = dict(transports or {})
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
        self.retry_policy = outbox.RetryPolicy(cfg.max_attempts, cfg.backoff_base_s, cfg.backoff_max_s, jitter)
        # reports that come on the association that asked (else on a new one, to the listener)
        self.commitment = commitment.CommitmentRecorder(
            db, self.retry_policy, on_outbox=self.wake.set, reporters={d.name: d.ae_title for d in destinations}
        )
        self._commitment_timeouts = {
            d.name: d.storage_commitment_timeout_s for d in destinations if d.storage_commitment
        }
        self._commitment_check_at = 0.0  # monotonic; the first pass looks (rows of an earlier configuration)
        self._commitment_lock = threading.Lock()
        self.stow = StowSender(cfg.timeout_s)  # destinations of kind dicomweb
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
        self.stow.close()

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
        """Release ``lane``'s associations idle for ``sender.keep_open_s`` (``all_``: every one), and
        those whose storage commitment is due to be asked (``_commitment_due``)."""
        now = time.monotonic()
        for name, held in list(lane.held.items()):
            idle = now - held.last_used >= self.cfg.keep_open_s
            if all_ or idle or not usable(held.assoc) or self._commitment_due(held, now):
                self._drop(lane, name, wait_for_report=not all_)
        self._release_asked(lane, all_)
        if all_:  # the lane ends: its message transports close their connections
            for kind, transport in list(lane.transports.items()):
                del lane.transports[kind]
                try:
                    transport.close()
                except Exception as exc:  # noqa: BLE001 - a peer gone while closing: nothing left to do
                    log.warning("transport_close_failed", kind=kind, error=exc.__class__.__name__)

    def _commitment_due(self, held: _Held, now: float) -> bool:
        """Objects stored over ``held`` have waited ``sender.keep_open_s`` for their commitment to be
        asked: a stream of results that keeps the association busy is asked for at that pace."""
        return bool(held.stored) and now - held.first_stored >= self.cfg.keep_open_s

    def _release_asked(self, lane: Lane, all_: bool) -> None:
        now = time.monotonic()
        for asked in list(lane.asked):
            reports = asked.reports
            if not all_ and usable(asked.assoc) and now < max(asked.until, reports.last_at + AFTER_REPORT_S):
                continue
            lane.asked.remove(asked)
            with reports.lock:  # not while a report on it is being recorded
                self._let_go(asked.assoc, asked.destination)

    def _drop(self, lane: Lane, name: str, wait_for_report: bool = True) -> None:
        """Let ``lane``'s association to ``name`` go: ask for the storage commitment of what was stored
        over it first (the association then stays open a moment for a report on it: ``lane.asked``)."""
        held = lane.held.pop(name, None)
        if held is None:
            return
        self._not_holding(name)
        asked = False
        if held.stored:
            try:
                asked = self._ask_commitment(held, name)
            except StorageError as exc:  # the objects stay SENT: the commitment timeout sends them again
                log.error("sender_database_error", error=str(exc))
        if asked and wait_for_report:
            _reported(pynetdicom_internals.set_dul_loop_delay(held.assoc, IDLE_LOOP_S))  # its reactor runs
            lane.asked.append(_Asked(held.assoc, name, time.monotonic() + SAME_ASSOCIATION_S, held.reports))
            return
        self._let_go(held.assoc, name)

    def _let_go(self, assoc: Any, name: str) -> None:
        """Release ``assoc`` (or answer the PACS's release, or abort it when nothing else can end it)."""
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
        self._expire_commitments()
        due = outbox.lease_due(self.db, share=share, scope=self.scope)
        by_dest: dict[str, list[DueItem]] = defaultdict(list)
        for item in due:
            by_dest[item.destination].append(item)
        attempted = 0
        for name, items in by_dest.items():
            dest: PacsSection | MessageRoute | None = self.destinations.get(name) or self.message_routes.get(name)
            if dest is None:
                for item in items:
                    outbox.dead(self.db, item.id, None, f"destination {name!r} is no longer configured")
                attempted += len(items)
            elif isinstance(dest, MessageRoute):
                attempted += self._deliver_each(lane, dest, items)
            elif dest.kind == "dicomweb":
                attempted += self._stow_each(dest, items)
            elif lane.refused_until.get(name, 0.0) > time.monotonic() and self._held_elsewhere(lane, name):
                outbox.unlease(self.db, [i.id for i in items])  # for the lane that has an association
            else:
                attempted += self._send_to(lane, dest, items)
        return attempted

    def _stow_each(self, dest: PacsSection, items: list[DueItem]) -> int:
        """Send ``items`` to a DICOMweb destination by STOW-RS (agent/pacs/dicomweb.py), one
        request each, and record what became of each as the C-STORE path does."""
        for item in items:
            failpoints.hit("mid_send")
            out = self.stow.store(dest, self.results.path(item.path), item.sop_instance_uid)
            failpoints.hit("after_ack")
            self._record(item, out.verdict, out.status, out.reason)
        return len(items)

    def _deliver_each(self, lane: Lane, route: MessageRoute, items: list[DueItem]) -> int:
        """Deliver messages to an HL7 or FHIR destination, one at a time over the lane's transport
        of that kind, and record what became of each as the C-STORE path does."""
        transport = lane.transports.get(route.kind)
        if transport is None:
            transport = lane.transports[route.kind] = self.transports[route.kind]()
        for item in items:
            failpoints.hit("mid_send")
            try:
                payload = self.results.path(item.path).read_bytes() if item.path else None
            except OSError as exc:
                payload, out = None, Delivery("dead", None, f"message file unreadable: {exc.__class__.__name__}")
            else:
                out = Delivery("dead", None, "message was never built (see the reason recorded before)")
            if payload is not None:
                try:
                    out = transport.deliver(route.section, payload)
                except Exception as exc:  # noqa: BLE001 - a transport's unforeseen error: retried, class only
                    out = Delivery("retry", None, f"delivery failed: {exc.__class__.__name__}")
            failpoints.hit("after_ack")
            self._record(item, out.verdict, out.status, out.reason)
        return len(items)

    def _record(self, item: DueItem, verdict: str, status_name: str | None, reason: str) -> None:
        """What became of one object or message sent by a one-request transport (STOW-RS, MLLP,
        FHIR): delivered (a warning is logged), retried with backoff, or dead."""
        if verdict in ("delivered", "warning"):
            outbox.delivered(self.db, item.id, status_name or "")
            event = {"sr": "sr_delivered", "sc": "overlay_delivered"}.get(item.kind, "message_delivered")
            (log.warning if verdict == "warning" else log.info)(
                event, outbox_id=item.id, destination=item.destination, kind=item.kind,
                sop_instance_uid=item.sop_instance_uid, status=status_name, **({"warning": reason} if reason else {}),
            )  # fmt: skip
        elif verdict == "retry":
            self._transient(item, status_name, reason)
        else:
            outbox.dead(self.db, item.id, status_name, reason)
            log.error("result_dead", outbox_id=item.id, destination=item.destination, status=status_name, error=reason)

    def _held_elsewhere(self, lane: Lane, name: str) -> bool:
        """Another lane holds an association to destination ``name``."""
        with self._holding_lock:
            return self._holding[name] - (1 if name in lane.held else 0) > 0

    def _expire_commitments(self) -> None:
        """Storage commitments not confirmed within their destination's timeout: back to RETRY (sent
        again, asked again) or DEAD after ``sender.max_attempts`` (``outbox.expire_commitments``).
        Looked at once a second by whichever lane comes first; without a destination that asks for
        commitment, only once (SENT rows left by an earlier configuration are sent again)."""
        now = time.monotonic()
        with self._commitment_lock:
            if now < self._commitment_check_at:
                return
            self._commitment_check_at = now + COMMITMENT_CHECK_S if self._commitment_timeouts else float("inf")
        for ex in outbox.expire_commitments(self.db, self._commitment_timeouts, self.retry_policy):
            (log.error if ex.state == "DEAD" else log.warning)(
                "commitment_timed_out", outbox_id=ex.id, destination=ex.destination, state=ex.state
            )
        # the rows back in RETRY are due after their backoff; the retry sweep or the next poll finds them

    def _ask_commitment(self, held: _Held, name: str) -> bool:
        """Ask ``name`` to commit to keeping the objects stored over ``held`` (one N-ACTION); True
        when the request was accepted. A refusal sends them back to RETRY (DEAD after
        ``sender.max_attempts``), or DEAD at once when the PACS does not do storage commitment."""
        items, held.stored = held.stored, []
        assoc = held.assoc
        if not usable(assoc):
            for item in items:
                self._transient(item, None, "stored, but the association was lost before storage commitment was asked")
            return False
        transaction_uid = commitment.new_transaction_uid()
        outbox.commitment_asked(self.db, [i.id for i in items], transaction_uid)  # before: the report may be quick
        action = commitment.request(transaction_uid, [(i.sop_class_uid, i.sop_instance_uid) for i in items])
        busy(assoc)
        try:
            rsp, _reply = assoc.send_n_action(
                action,
                commitment.REQUEST_STORAGE_COMMITMENT,
                commitment.STORAGE_COMMITMENT_PUSH_MODEL,
                commitment.STORAGE_COMMITMENT_INSTANCE,
            )
        except ValueError:  # the PACS did not accept the Storage Commitment Push Model context
            for item in items:
                self._refused(item, None, "the PACS did not accept the Storage Commitment Push Model SOP class")
            return False
        except RuntimeError:  # released or aborted meanwhile
            for item in items:
                self._transient(item, None, "stored, but the association was lost before storage commitment was asked")
            return False
        code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if code is None:
            for item in items:
                self._transient(item, None, "stored, but the storage commitment request (N-ACTION) got no answer")
            return False
        name_ = status.name(code)
        if status.classify(code) in (status.StatusClass.SUCCESS, status.StatusClass.WARNING):
            log.info("commitment_asked", destination=name, transaction_uid=transaction_uid, objects=len(items))
            return True
        for item in items:
            if code in commitment.REFUSED_FOR_GOOD:
                self._refused(item, name_, f"the PACS refused storage commitment ({name_})")
            else:
                self._transient(item, name_, f"stored, but the PACS refused storage commitment ({name_})")
        return False

    def _refused(self, item: DueItem, status_name: str | None, reason: str) -> None:
        """Storage commitment that asking again cannot get: DEAD at once (the object is stored)."""
        error = f"stored, not committed: {reason} (storage_commitment = true for this destination)"
        outbox.dead(self.db, item.id, status_name, error)
        log.error("result_dead", outbox_id=item.id, destination=item.destination, status=status_name, error=error)

    def _on_report(self, event: Any, reports: _Reports) -> tuple[int, Any]:
        """A storage commitment report on an association the sender opened."""
        with reports.lock:
            try:
                return self.commitment.handle(event)
            finally:
                reports.last_at = time.monotonic()

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
                if self._send_one(held.assoc, dest, item) and dest.storage_commitment:
                    if not held.stored:
                        held.first_stored = time.monotonic()
                    held.stored.append(item)
        finally:
            held.last_used = time.monotonic()
            if not usable(held.assoc) or self.cfg.keep_open_s <= 0 or self._commitment_due(held, held.last_used):
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
        reports = _Reports()
        handlers: list[Any] = []
        if dest.storage_commitment:  # we are its SCU: the default roles
            ae.add_requested_context(commitment.STORAGE_COMMITMENT_PUSH_MODEL, commitment.TRANSFER_SYNTAXES)
            handlers.append((evt.EVT_N_EVENT_REPORT, self._on_report, [reports]))
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
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls, evt_handlers=handlers)
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
        held = _Held(assoc, proposed, time.monotonic(), reports=reports)
        lane.held[dest.name] = held
        lane.refused_until.pop(dest.name, None)
        return held

    def _not_holding(self, name: str) -> None:
        with self._holding_lock:
            self._holding[name] -= 1

    def _send_one(self, assoc: object, dest: PacsSection, item: DueItem) -> bool:
        """C-STORE ``item`` and record what became of it; True when the PACS stored it."""
        path = self.results.path(item.path)
        try:
            dcmread(path, stop_before_pixels=True)  # readable, and a Part 10 file
        except (OSError, ValueError) as exc:
            outbox.dead(self.db, item.id, None, f"result file unreadable: {exc.__class__.__name__}")
            return False
        failpoints.hit("mid_send")
        try:
            # a path, with chunked send on: the file's bytes go out as stored (no decode and
            # re-encode of a 2.5 MB overlay); our files are explicit VR little endian, as requested
            rsp = assoc.send_c_store(path)  # type: ignore[attr-defined]
        except RuntimeError:  # no longer established: the PACS released or aborted it meanwhile
            self._transient(item, None, "association lost")
            return False
        except ValueError as exc:  # no accepted context for this SOP class
            outbox.dead(self.db, item.id, None, f"PACS did not accept the SOP class: {exc}")
            return False
        code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if code is None:
            self._transient(item, None, "no response (timeout or abort)")
            return False
        failpoints.hit("after_ack")
        cls = status.classify(code)
        name = status.name(code)
        if cls in (status.StatusClass.SUCCESS, status.StatusClass.WARNING):
            if dest.storage_commitment:  # SENT: delivered once committed
                outbox.stored(self.db, item.id, name)
            else:
                outbox.delivered(self.db, item.id, name)
            event = "sr_delivered" if item.kind == "sr" else "overlay_delivered"
            (log.warning if cls is status.StatusClass.WARNING else log.info)(
                event, outbox_id=item.id, destination=dest.name, sop_instance_uid=item.sop_instance_uid, status=name,
                **({"storage_commitment": "to ask"} if dest.storage_commitment else {}),
            )  # fmt: skip
            return True
        if cls is status.StatusClass.TRANSIENT:
            self._transient(item, name, f"PACS answered {name}")
        else:
            outbox.dead(self.db, item.id, name, f"PACS refused the object ({name})")
            log.error("result_dead", outbox_id=item.id, destination=dest.name, status=name)
        return False
