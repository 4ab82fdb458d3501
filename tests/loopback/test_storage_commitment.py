"""Storage commitment on results (docs/dicom-conformance.md, Storage Commitment SCU), against
pynetdicom peers that play a PACS's Storage Commitment SCP with scripted behaviour: reports on a new
association (with and without SCP/SCU role selection) or on the same one, failures listed, no
report at all, the N-ACTION refused, the SOP class not supported. Real Orthanc:
tests/integration/test_storage_commitment_orthanc.py.

The sender runs alone (no model): each test puts result objects in the outbox itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pytest
import structlog
from conftest import AGENT_AET, TEST_SCU_AET
from dicom_factory import knee_dx
from pacs_peer import PACS_AET, PacsPeer
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from sqlalchemy import select

from agent.app import Agent
from agent.db.models import AuditEvent, Study
from agent.domain import Eligibility, IncomingInstance, InstanceRef, OutboxState
from agent.pacs import status
from agent.pacs.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH_MODEL
from agent.pacs.sender import Sender
from agent.queue import outbox, store

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class CommitmentPeer(PacsPeer):
    """A PACS that stores (PacsPeer) and is a Storage Commitment SCP.

    ``report``: "new" (an N-EVENT-REPORT on an association it opens to the agent, proposing
    itself as SCP by role selection unless ``role_selection`` is False), "same" (on the
    association that asked), "never". ``action_status``: the N-ACTION's answer. ``fail_once``:
    SOP Instance UIDs reported failed the first time they are asked for."""

    def __init__(
        self,
        report: str = "new",
        action_status: int = status.SUCCESS,
        fail_once: set[str] | None = None,
        role_selection: bool = True,
        supports_commitment: bool = True,
    ) -> None:
        super().__init__()
        if supports_commitment:
            self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, SYNTAXES)
        self.report = report
        self.action_status = action_status
        self.fail_once = set(fail_once or ())
        self.role_selection = role_selection
        self.agent_port = 0
        self.requests: list[Dataset] = []  # the N-ACTIONs' Action Information
        self.report_statuses: list[int] = []  # the agent's answers to our N-EVENT-REPORTs
        self._threads: list[threading.Thread] = []

    def start(self) -> CommitmentPeer:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        for t in self._threads:
            t.join(10)
        super().stop()

    def _on_action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        with self._lock:
            self.requests.append(info)
        if self.action_status != status.SUCCESS:
            return self.action_status, None
        result = self._result(info)
        if self.report == "new":
            self._later(self._report_on_new_association, result)
        elif self.report == "same":
            self._later(self._report_on_same_association, event.assoc, result)
        return status.SUCCESS, None

    def _later(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _result(self, info: Dataset) -> tuple[int, Dataset]:
        out = Dataset()
        out.TransactionUID = info.TransactionUID
        ok, failed = [], []
        for ref in info.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            if str(ref.ReferencedSOPInstanceUID) in self.fail_once:
                self.fail_once.discard(str(ref.ReferencedSOPInstanceUID))
                item.FailureReason = status.NO_SUCH_OBJECT_INSTANCE
                failed.append(item)
            else:
                ok.append(item)
        if ok:
            out.ReferencedSOPSequence = ok
        if failed:
            out.FailedSOPSequence = failed
        return (2 if failed else 1), out

    def _report_on_new_association(self, result: tuple[int, Dataset]) -> None:
        time.sleep(0.1)  # after our N-ACTION response
        ae = AE(ae_title=PACS_AET)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, SYNTAXES)
        roles = [build_role(STORAGE_COMMITMENT_PUSH_MODEL, scp_role=True, scu_role=False)]
        if not self.role_selection:
            roles = []
        assoc = ae.associate("127.0.0.1", self.agent_port, ae_title=AGENT_AET, ext_neg=roles)
        assert assoc.is_established, "the agent refused the report's association"
        try:
            self._send_report(assoc, result)
        finally:
            assoc.release()

    def _report_on_same_association(self, assoc: Any, result: tuple[int, Dataset]) -> None:
        time.sleep(0.05)  # after our N-ACTION response, while the agent keeps the association open
        self._send_report(assoc, result)

    def _send_report(self, assoc: Any, result: tuple[int, Dataset]) -> None:
        event_type, info = result
        rsp, _reply = assoc.send_n_event_report(
            info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
        )
        with self._lock:
            self.report_statuses.append(int(rsp.Status) if "Status" in rsp else -1)


# -- the rig -------------------------------------------------------------------------------------
@pytest.fixture()
def rig(make_agent: Any) -> Iterator[Callable[..., tuple[Agent, Sender, list[str]]]]:
    """An agent (its listener takes commitment reports; no model) towards ``peer`` with storage
    commitment on, ``n`` result objects in its outbox, and a sender started over them."""
    senders: list[Sender] = []

    def _make(peer: CommitmentPeer | PacsPeer, n: int = 1, **over: Any) -> tuple[Agent, Sender, list[str]]:
        sender_cfg = {"poll_s": 0.1, "keep_open_s": 0.3, "backoff_base_s": 0.2, "backoff_max_s": 0.4,
                      "timeout_s": 5, "max_attempts": 3, "connections": 1, **over.pop("sender", {})}  # fmt: skip
        dest = {"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": peer.port,
                "storage_commitment": True, "storage_commitment_timeout_s": 30, **over.pop("pacs", {})}  # fmt: skip
        agent = make_agent(
            scp={"peers": [{"ae_title": ae, "host": "127.0.0.1"} for ae in (TEST_SCU_AET, PACS_AET)]},
            sender=sender_cfg,
            pacs=[dest],
        )
        if isinstance(peer, CommitmentPeer):
            peer.agent_port = agent.scp.port
        uids = seed(agent, n)
        settings = agent.settings
        sender = Sender(agent.db, agent.results, settings.pacs, settings.sender, settings.scp.ae_title)
        senders.append(sender)
        sender.start()
        return agent, sender, uids

    yield _make
    for sender in senders:
        sender.stop(timeout_s=10)


def seed(agent: Agent, n: int) -> list[str]:
    """``n`` result objects (small DX files: the peer stores anything) in the outbox for "pacs"."""
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.1", "1.2.3.999", "1.2.3.998", "1.2.840.10008.1.2.1")
    store.record_instance(agent.db, IncomingInstance(ref, "d/1.dcm", "0" * 64, 10, TEST_SCU_AET, "127.0.0.1",
                                                     Eligibility(True, None)))  # fmt: skip
    uids = []
    with agent.db.transaction() as s:
        study_id = s.execute(select(Study.id)).scalar_one()
        for i in range(n):
            ds = knee_dx(rows=32, cols=32, seed=i)
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            obj = outbox.write_object(agent.results, "sc", buf.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            outbox.add(s, study_id, obj, ["pacs"], send=True)
            uids.append(str(ds.SOPInstanceUID))
    return uids


def states(agent: Agent) -> list[str]:
    return [i.state for i in outbox.items(agent.db)]


def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not met within {timeout_s:.0f} s")


def asked_uids(request: Dataset) -> list[str]:
    return [str(r.ReferencedSOPInstanceUID) for r in request.ReferencedSOPSequence]


# -- the tests -----------------------------------------------------------------------------------
def test_objects_of_one_association_are_asked_in_one_request_and_committed_by_a_report_on_a_new_association(
    rig: Any,
) -> None:
    with CommitmentPeer(report="new") as peer:
        agent, _sender, uids = rig(peer, n=3)
        wait_until(lambda: states(agent) == [OutboxState.COMMITTED.value] * 3, what="all committed")
        assert sorted(peer.uids()) == sorted(uids)  # each stored once
        (request,) = peer.requests  # one N-ACTION for the three objects stored over one association
        assert sorted(asked_uids(request)) == sorted(uids)
        wait_until(lambda: peer.report_statuses == [status.SUCCESS], what="our answer to the report")
        rows = outbox.items(agent.db)
        assert {r.commitment_uid for r in rows} == {str(request.TransactionUID)}
        assert str(request.TransactionUID).startswith("2.25.")
        assert all(r.delivered_at is not None and r.last_error is None and r.attempts == 1 for r in rows)
        # the result is in the audit trail (PS3.15 DICOM Instances Transferred), with counts, no PHI
        with agent.db.reading() as s:
            (event,) = s.execute(select(AuditEvent).where(AuditEvent.object_type == "storage_commitment")).scalars()
        assert (event.event_code, event.object_id, event.outcome, event.actor) == (
            "110104", str(request.TransactionUID), 0, PACS_AET
        )
        assert event.detail == {"destination": "pacs", "committed": 3, "retried": 0, "dead": 0}


def test_report_without_role_selection_is_accepted_too(rig: Any) -> None:
    with CommitmentPeer(report="new", role_selection=False) as peer:
        agent, _sender, _uids = rig(peer)
        wait_until(lambda: states(agent) == [OutboxState.COMMITTED.value], what="committed")
        wait_until(lambda: peer.report_statuses == [status.SUCCESS], what="our answer to the report")


def test_report_on_the_same_association_is_accepted(rig: Any) -> None:
    with CommitmentPeer(report="same") as peer:
        agent, _sender, _uids = rig(peer, n=2)
        wait_until(lambda: states(agent) == [OutboxState.COMMITTED.value] * 2, what="committed")
        wait_until(lambda: peer.report_statuses == [status.SUCCESS], what="our answer to the report")
        assert peer.associations == 1  # the report came on the association that asked


def test_failures_in_the_report_are_sent_again_and_asked_again(rig: Any) -> None:
    peer = CommitmentPeer(report="new")
    with peer:
        agent, _sender, uids = rig(peer, n=3)
        peer.fail_once = {uids[1]}  # the PACS lost one of the three
        wait_until(lambda: states(agent) == [OutboxState.COMMITTED.value] * 3, what="all committed")
        first, second = peer.requests
        assert sorted(asked_uids(first)) == sorted(uids)
        assert asked_uids(second) == [uids[1]] and second.TransactionUID != first.TransactionUID
        assert sorted(peer.uids()) == sorted([*uids, uids[1]])  # only the failed one was sent again
        rows = {r.sop_instance_uid: r for r in outbox.items(agent.db)}
        assert rows[uids[1]].attempts == 2 and rows[uids[0]].attempts == 1
        assert rows[uids[1]].commitment_uid == str(second.TransactionUID)
        with agent.db.reading() as s:  # one audit event per report: minor failure (4), then success
            events = list(s.execute(select(AuditEvent).where(AuditEvent.object_type == "storage_commitment")
                                    .order_by(AuditEvent.id)).scalars())  # fmt: skip
        assert [(e.object_id, e.outcome) for e in events] == [
            (str(first.TransactionUID), 4), (str(second.TransactionUID), 0)
        ]
        assert events[0].detail == {"destination": "pacs", "committed": 2, "retried": 1, "dead": 0}


def test_failures_reported_past_the_attempts_limit_are_dead(rig: Any) -> None:
    peer = CommitmentPeer(report="new")
    with peer:
        agent, _sender, uids = rig(peer, sender={"max_attempts": 1})
        peer.fail_once = {uids[0]}
        wait_until(lambda: states(agent) == [OutboxState.DEAD.value], what="dead")
        (row,) = outbox.items(agent.db)
        assert row.last_error == (
            "gave up after 1 attempts: storage commitment failed: the PACS reported no_such_object_instance"
        )
        assert row.last_status == "no_such_object_instance"


def test_no_report_within_the_timeout_sends_again_and_asks_again(rig: Any) -> None:
    peer = CommitmentPeer(report="never")
    with peer:
        agent, _sender, uids = rig(peer, pacs={"storage_commitment_timeout_s": 1.0})
        wait_until(lambda: len(peer.requests) == 1, what="asked")
        time.sleep(0.5)
        assert states(agent) == [OutboxState.SENT.value]  # waiting for the report, counted as backlog
        wait_until(lambda: states(agent) == [OutboxState.RETRY.value] or len(peer.requests) > 1, what="timed out")
        peer.report = "new"  # the PACS answers from now on
        wait_until(lambda: states(agent) == [OutboxState.COMMITTED.value], what="committed after the timeout")
        assert len(peer.requests) == 2 and peer.requests[0].TransactionUID != peer.requests[1].TransactionUID
        assert peer.uids() == [uids[0], uids[0]]  # sent again before asking again
        (row,) = outbox.items(agent.db)
        assert row.attempts == 2


def test_no_report_ever_is_dead_after_the_attempts_limit(rig: Any) -> None:
    with CommitmentPeer(report="never") as peer:
        with structlog.testing.capture_logs() as logs:
            agent, _sender, _uids = rig(peer, pacs={"storage_commitment_timeout_s": 0.8}, sender={"max_attempts": 2})
            wait_until(lambda: states(agent) == [OutboxState.DEAD.value], what="dead")
        (row,) = outbox.items(agent.db)
        assert row.last_error == "gave up after 2 attempts: storage commitment not confirmed within 0.8 s"
        assert len(peer.requests) == 2
        # the log event docs/operations.md names: a warning when sent again, an error when given up
        timed_out = [(e["log_level"], e["outbox_id"], e["state"]) for e in logs if e["event"] == "commitment_timed_out"]
        assert timed_out == [("warning", row.id, "RETRY"), ("error", row.id, "DEAD")]


def test_refused_commitment_request_is_retried_then_dead_with_the_status(rig: Any) -> None:
    with CommitmentPeer(action_status=status.PROCESSING_FAILURE) as peer:
        agent, _sender, _uids = rig(peer)
        wait_until(lambda: states(agent) == [OutboxState.DEAD.value], what="dead")
        (row,) = outbox.items(agent.db)
        assert row.attempts == 3 and row.last_status == "processing_failure"
        assert row.last_error == (
            "gave up after 3 attempts: stored, but the PACS refused storage commitment (processing_failure)"
        )
        assert len(peer.requests) == 3 and len(peer.received) == 3  # stored and asked each attempt


def test_commitment_refused_as_not_supported_is_dead_at_once(rig: Any) -> None:
    with CommitmentPeer(action_status=status.SOP_CLASS_NOT_SUPPORTED) as peer:
        agent, _sender, _uids = rig(peer)
        wait_until(lambda: states(agent) == [OutboxState.DEAD.value], what="dead")
        (row,) = outbox.items(agent.db)
        assert row.attempts == 1 and len(peer.requests) == 1
        assert row.last_error == (
            "stored, not committed: the PACS refused storage commitment (sop_class_not_supported) "
            "(storage_commitment = true for this destination)"
        )


def test_pacs_without_storage_commitment_is_dead_at_once(rig: Any) -> None:
    with CommitmentPeer(supports_commitment=False) as peer:
        agent, _sender, _uids = rig(peer)
        wait_until(lambda: states(agent) == [OutboxState.DEAD.value], what="dead")
        (row,) = outbox.items(agent.db)
        assert row.attempts == 1 and len(peer.received) == 1  # stored, never asked again
        assert row.last_error == (
            "stored, not committed: the PACS did not accept the Storage Commitment Push Model SOP class "
            "(storage_commitment = true for this destination)"
        )
