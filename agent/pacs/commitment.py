"""Storage Commitment Push Model (PS3.4 Annex J), the agent as SCU, for the results it sends.

After results are stored (C-STORE Success) to a destination with ``storage_commitment = true``,
the sender asks that PACS to commit to keeping them: one N-ACTION (action type 1, Request Storage
Commitment) on the well-known instance 1.2.840.10008.1.20.1.1, with a new Transaction UID and the
Referenced SOP Sequence of the objects stored over that association. The PACS answers later with
an N-EVENT-REPORT carrying the same Transaction UID: event type 1 (all committed) or 2 (failures
exist: Failed SOP Sequence, each with its Failure Reason). It may send it on the same association,
while still open, or on a new association it opens to the agent's listener, proposing the agent
in the SCU role of this SOP class (SCP/SCU role selection; Orthanc does this). Either way
``CommitmentRecorder.handle`` answers it and records it through ``outbox.record_commitment``.

Datasets here carry UIDs only, never patient data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from agent.db.engine import Database
from agent.errors import StorageError
from agent.logging import get_logger
from agent.pacs import status
from agent.queue import outbox

log = get_logger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = UID("1.2.840.10008.1.20.1")
#: the well-known SOP Instance of the Push Model that every request and report names
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
REQUEST_STORAGE_COMMITMENT = 1  # N-ACTION Action Type ID
EVENT_ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type ID: Storage Commitment Request Successful
EVENT_FAILURES_EXIST = 2  # Storage Commitment Request Complete - Failures Exist
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

#: N-ACTION statuses after which asking again cannot help: the PACS does not do storage commitment
REFUSED_FOR_GOOD = frozenset({
    status.SOP_CLASS_NOT_SUPPORTED,
    status.NO_SUCH_SOP_CLASS,
    status.NO_SUCH_ACTION,
    status.UNRECOGNIZED_OPERATION,
})


def new_transaction_uid() -> str:
    """A fresh Transaction UID: 2.25 and a random UUID (PS3.5 B.2), unguessable by a third party."""
    return str(generate_uid(prefix=None))


def request(transaction_uid: str, objects: Iterable[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information: the Transaction UID and the Referenced SOP Sequence of
    ``objects`` ((SOP Class UID, SOP Instance UID) pairs)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    refs = []
    for sop_class_uid, sop_instance_uid in objects:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        refs.append(item)
    ds.ReferencedSOPSequence = refs
    return ds


def parse_report(event_type: int | None, info: Dataset, reporter: str) -> outbox.CommitmentReport:
    """The N-EVENT-REPORT's Event Information as a ``CommitmentReport``; ValueError when it is not
    a storage commitment result (an unknown event type, no Transaction UID)."""
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST):
        raise ValueError(f"event type {event_type} is not a storage commitment result")
    transaction_uid = str(info.get("TransactionUID", "") or "").strip()
    if not transaction_uid:
        raise ValueError("no Transaction UID")
    committed = tuple(
        str(item.ReferencedSOPInstanceUID).strip()
        for item in info.get("ReferencedSOPSequence", None) or []
        if item.get("ReferencedSOPInstanceUID")
    )
    failed = tuple(
        (str(item.ReferencedSOPInstanceUID).strip(), failure_reason(item.get("FailureReason")))
        for item in info.get("FailedSOPSequence", None) or []
        if item.get("ReferencedSOPInstanceUID")
    )
    return outbox.CommitmentReport(transaction_uid, committed, failed, reporter)


def failure_reason(code: Any) -> str:
    """A Failure Reason (0008,1197) by name, e.g. no_such_object_instance (0112H)."""
    try:
        return status.name(int(code))
    except (TypeError, ValueError):
        return "no failure reason given"


class CommitmentRecorder:
    """Answers storage commitment reports (``EVT_N_EVENT_REPORT``) and records them.

    Bound by the agent's listener (reports on a new association) and by the sender (reports on
    the association that asked). ``on_outbox`` is called when a report sent objects back to be
    delivered again (the sender's wake)."""

    def __init__(
        self,
        db: Database,
        policy: outbox.RetryPolicy,
        on_outbox: Callable[[], Any] | None = None,
        reporters: Mapping[str, str] | None = None,
    ) -> None:
        self.db = db
        self.policy = policy
        self.on_outbox = on_outbox
        self.reporters = reporters  # destination -> its AE title: the only one whose reports count

    def handle(self, event: Any) -> tuple[int, Dataset | None]:
        """The handler of ``evt.EVT_N_EVENT_REPORT``: (status of the N-EVENT-REPORT response, no reply)."""
        reporter = str(event.assoc.requestor.ae_title if event.assoc.is_acceptor else event.assoc.acceptor.ae_title)
        reporter = reporter.strip()
        request_ = event.request
        sop_class = str(getattr(request_, "AffectedSOPClassUID", "") or "")
        if sop_class != STORAGE_COMMITMENT_PUSH_MODEL:
            log.warning("event_report_refused", reporter=reporter, reason="not a storage commitment report")
            return status.NO_SUCH_SOP_CLASS, None
        try:
            report = parse_report(event.event_type, event.event_information, reporter)
        except ValueError as exc:
            log.warning("commitment_report_refused", reporter=reporter, reason=str(exc))
            return status.INVALID_ARGUMENT_VALUE, None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a dataset it cannot decode
            log.warning("commitment_report_refused", reporter=reporter, reason=f"undecodable: {exc.__class__.__name__}")
            return status.PROCESSING_FAILURE, None
        try:
            out = outbox.record_commitment(self.db, report, self.policy, self.reporters)
        except StorageError as exc:  # the PACS may report again; else the timeout sends the objects again
            log.error("commitment_report_not_recorded", transaction_uid=report.transaction_uid, error=str(exc))
            return status.PROCESSING_FAILURE, None
        if out.destination is None:
            # timed out and asked again meanwhile, or never ours: nothing to do, and nothing the
            # PACS could do better by being told
            log.warning(
                "commitment_report_unknown", reporter=reporter, transaction_uid=report.transaction_uid,
                objects=len(report.committed) + len(report.failed),
            )  # fmt: skip
            return status.SUCCESS, None
        (log.info if not (out.retried or out.dead) else log.warning)(
            "commitment_reported", destination=out.destination, reporter=reporter,
            transaction_uid=report.transaction_uid, committed=out.committed, retried=out.retried, dead=out.dead,
            unknown=out.unknown, same_association=not event.assoc.is_acceptor,
        )  # fmt: skip
        if out.retried and self.on_outbox is not None:
            self.on_outbox()
        return status.SUCCESS, None
