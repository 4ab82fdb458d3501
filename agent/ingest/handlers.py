"""The C-STORE path: validate, spool durably, record the job, then (and only then) answer Success.

``Ingestor.store`` is a plain function of the request's parts so it can be driven by the SCP
handler and by start-up reconciliation alike. Failures map to DIMSE statuses by name.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from agent import dicom_values, failpoints, metrics
from agent.db.engine import Database
from agent.domain import IncomingInstance, InstanceRef, JobState, StoreOutcome
from agent.errors import StorageError, StoreRefused
from agent.ingest import validate
from agent.ingest.chunked import in_folder, receiving
from agent.ingest.eligibility import Rules, evaluate
from agent.logging import get_logger
from agent.pacs import status
from agent.pacs.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from agent.queue import store
from agent.spool import Spool

log = get_logger(__name__)

@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE as received: command identifiers, the raw dataset bytes, who sent it."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    raw: bytes
    dataset: Dataset
    calling_ae: str
    peer_host: str | None
    #: the file the dataset was received into (chunked receive, our file meta in front), if any
    received: Path | None = None


def file_meta_bytes(req: StoreRequest) -> bytes:
    """Our own file meta (zeroed preamble, DICM, group 0002) for the spool file."""
    return file_head(req.sop_class_uid, req.sop_instance_uid, req.transfer_syntax, req.calling_ae)


def file_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """Preamble, DICM and group 0002 as the agent writes them in front of every spooled dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae[:16]
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Ingestor:
    """Keeps the durability contract (docs/architecture.md) for each incoming instance."""

    def __init__(
        self, db: Database, spool: Spool, rules: Rules, max_instance_bytes: int, node: str | None = None
    ) -> None:
        self.db = db
        self.node = node  # agent.node: recorded with every instance it keeps
        self.spool = spool
        self.rules = rules
        self.max_instance_bytes = max_instance_bytes
        # hashlib releases the GIL on large buffers: hash while the spool write and fsync run
        self._hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="strnet-sha")

    def store(self, req: StoreRequest) -> tuple[int, StoreOutcome | None]:
        """Return (DIMSE status, outcome); Success only once the job row is committed."""
        t0 = time.perf_counter()
        try:
            outcome = self._store(req)
        except StoreRefused as exc:
            log.warning(
                "instance_refused",
                status=status.name(exc.status),
                reason=exc.reason,
                calling_ae=req.calling_ae,
                bytes=len(req.raw),
                sop_instance_uid=req.sop_instance_uid if validate.valid_uid(req.sop_instance_uid) else None,
            )
            return exc.status, None
        except StorageError as exc:
            log.error("instance_not_kept", reason=str(exc), calling_ae=req.calling_ae)
            return status.OUT_OF_RESOURCES, None
        log.info(
            "instance_received",
            job_id=outcome.job_id,
            sop_instance_uid=req.sop_instance_uid,
            study_instance_uid=str(req.dataset.get("StudyInstanceUID", "")),
            calling_ae=req.calling_ae,
            bytes=len(req.raw),
            state=outcome.state.value,
            duplicate=outcome.duplicate,
            conflict=outcome.conflict,
            ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        metrics.INSTANCES_RECEIVED.labels("duplicate" if outcome.duplicate else outcome.state.value.lower()).inc()
        return status.SUCCESS, outcome

    def _store(self, req: StoreRequest) -> StoreOutcome:
        if len(req.raw) > self.max_instance_bytes:
            raise StoreRefused(status.OUT_OF_RESOURCES, "instance larger than the configured maximum")
        received = req.received if req.received is not None and in_folder(req.received, self.spool.tmp_dir) else None
        # the file's fsync (most of the durability cost) runs while the dataset is checked
        syncing = None
        if received is not None:
            spooling = receiving(received)  # its sync drains the writer thread, then fsyncs
            if spooling is not None:
                syncing = self._hasher.submit(spooling.sync)
            else:
                syncing = self._hasher.submit(self.spool.sync_part, received)
        try:
            return self._check_and_keep(req, received, syncing)
        finally:
            if syncing is not None:
                syncing.exception()  # never leave the fsync running past the answer

    def _check_and_keep(self, req: StoreRequest, received: Path | None, syncing: Future[None] | None) -> StoreOutcome:
        ds = req.dataset
        validate.parse_fully(ds)
        validate.check_no_file_meta(ds)
        validate.check_identifiers(ds, req.sop_class_uid, req.sop_instance_uid)
        if req.sop_class_uid in self.rules.sop_classes:  # results and documents carry no image to check
            validate.check_pixel_data(ds, req.transfer_syntax)
        prior = store.existing_contents(self.db, req.sop_instance_uid)
        hashing = None
        # A resend: an identical copy (same dataset bytes) is recognised before writing anything.
        # The same image re-encoded (another transfer syntax, even lossless) has other bytes and is
        # recorded as a conflict, on purpose: telling a lossless re-encoding from altered pixels
        # needs both decoded and compared, which the receive path does not do; the first copy is
        # screened, the newcomer is kept and SKIPPED (docs/dicom-values.md, "Resends").
        if prior:
            sha = _sha256(req.raw)
            if sha in prior:
                return StoreOutcome(prior[sha], duplicate=True, conflict=False, state=JobState.QUEUED)
        else:
            hashing = self._hasher.submit(_sha256, req.raw)
        head = b"" if received is not None else file_meta_bytes(req)
        # a received file already takes its space: only the watermark itself is checked for it
        if not self.spool.has_room_for(0 if received is not None else len(head) + len(req.raw)):
            raise StoreRefused(status.OUT_OF_RESOURCES, "free disk space below the watermark")
        failpoints.hit("before_fsync")
        if hashing is not None:
            sha = hashing.result()
        if received is None:
            rel = self.spool.write([head, req.raw])
            failpoints.hit("after_fsync")
            return self._record(req, rel, sha, None)

        # A received file: its rows are written while its fsync finishes (~15 ms on this disk,
        # ~8 ms of row work); the commit waits for the fsync, the rename into place and the
        # directory fsync. So a committed row still always has a durable file.
        rel = self.spool.new_name()

        def durable() -> None:
            if syncing is not None:
                try:
                    syncing.result()
                except OSError as exc:
                    raise StorageError(f"spool write failed: {exc.strerror}") from exc
            self.spool.keep(received, rel)
            failpoints.hit("after_fsync")

        # a file not kept (refused, or a duplicate) is still in tmp: pynetdicom deletes it after us
        return self._record(req, rel, sha, durable)

    def _record(self, req: StoreRequest, rel: str, sha: str, durable: Callable[[], None] | None) -> StoreOutcome:
        try:
            inc = self.incoming(req, rel, sha)
            outcome = store.record_instance(self.db, inc, before_commit=durable, node=self.node)
        except BaseException:
            self.spool.remove(rel)  # not acknowledged: nothing to keep
            raise
        if outcome.duplicate:
            self.spool.remove(rel)
        failpoints.hit("after_commit")
        return outcome

    def incoming(self, req: StoreRequest, rel: str, sha: str) -> IncomingInstance:
        ds = req.dataset
        ref = InstanceRef(
            sop_class_uid=req.sop_class_uid,
            sop_instance_uid=req.sop_instance_uid,
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid=str(req.transfer_syntax),
        )
        return IncomingInstance(
            ref=ref,
            spool_path=rel,
            sha256=sha,
            size_bytes=len(req.raw),
            calling_ae=req.calling_ae,
            peer_host=req.peer_host,
            eligibility=evaluate(ds, self.rules),
            # coded values and dates as agent/dicom_values.py reads them (docs/dicom-values.md):
            # normalised, or None, never a raw value that a page would show as a date
            modality=dicom_values.read_cs(ds, "Modality"),
            body_part=dicom_values.read_cs(ds, "BodyPartExamined"),
            laterality=dicom_values.read_laterality(ds)[0],
            view_position=dicom_values.read_cs(ds, "ViewPosition"),
            # never cut short: a shortened ID could be another patient's (the registry keys on it)
            patient_id=dicom_values.read_string(ds, "PatientID", "LO"),
            patient_name=dicom_values.read_pn(ds, "PatientName"),
            patient_birth_date=dicom_values.read_da(dicom_values.value_of(ds, "PatientBirthDate")),
            patient_sex=dicom_values.read_sex(dicom_values.value_of(ds, "PatientSex")) or None,
            study_date=dicom_values.read_da(dicom_values.value_of(ds, "StudyDate")),
            accession_number=dicom_values.read_string(ds, "AccessionNumber", "SH"),
        )
