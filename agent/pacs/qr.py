"""DIMSE query/retrieve SCU: the sweep's ``ArchiveSource`` over C-FIND, C-MOVE and C-GET
(Study Root; docs/dicom-conformance.md, Query/Retrieve SCU).

Only the keys the sweep needs are asked for: no patient attributes. Every association is released
or aborted in a ``finally``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from agent.config import PacsSection
from agent.pacs import status
from agent.pacs.archive import ArchiveError, Received, RetrieveOutcome, SeriesMatch, StoreCallback, StudyMatch
from agent.pacs.identity import identify
from agent.pacs.scu import tls_args

#: what a C-GET may bring: the screened X-ray classes only (never an SR nor a secondary capture)
GET_SOP_CLASSES = (
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ComputedRadiographyImageStorage,
)
#: one presentation context per class and transfer syntax: the archive picks the context of the
#: syntax an instance is stored in, so it need not transcode (Orthanc cannot transcode JPEG 2000)
GET_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEG2000Lossless,
    JPEG2000,
    JPEGLosslessSV1,
    JPEGLosslessP14,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "StudyDescription")
SERIES_KEYS = (
    "SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription", "ProtocolName", "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)  # fmt: skip


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or getattr(value, "is_multival", False) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(str(ds.get(keyword, "")).strip())
    except ValueError:
        return None


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


class DimseArchive:
    """C-FIND at STUDY and SERIES level, then C-MOVE (to ``move_ae_title``) or C-GET per series."""

    def __init__(self, dest: PacsSection, calling_ae_title: str, *, method: str = "move",
                 move_ae_title: str | None = None, timeout_s: float = 60.0,
                 on_connect: Callable[[Event], object] | None = None,
                 on_message: Callable[[Event], object] | None = None) -> None:  # fmt: skip
        """``on_connect``: called when the C-GET connection is open, before any PDU is read (the
        listener's PDU-length guard goes on it); ``on_message``: after each instance it brings."""
        self.dest = dest
        self.name = dest.name
        self.method = method
        self.calling_ae_title = dest.calling_ae_title or calling_ae_title
        self.move_ae_title = move_ae_title or calling_ae_title
        self.timeout_s = timeout_s
        self.on_connect = on_connect
        self.on_message = on_message

    def _ae(self) -> AE:
        ae = identify(AE(ae_title=self.calling_ae_title))
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        ae.maximum_pdu_size = 0
        return ae

    @contextmanager
    def _association(self, ae: AE, **kwargs: Any) -> Iterator[Association]:
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title,
                             tls_args=tls_args(self.dest), **kwargs)  # fmt: skip
        if not assoc.is_established:
            raise ArchiveError("association rejected" if assoc.is_rejected else "association failed")
        try:
            yield assoc
        finally:
            assoc.release() if assoc.is_established else assoc.abort()

    def _find(self, query: Dataset) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        out: list[Dataset] = []
        with self._association(ae) as assoc:
            for rsp, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if rsp is None or "Status" not in rsp:
                    raise ArchiveError("C-FIND: no response (timeout or aborted)")
                code = int(rsp.Status)
                if code in (0xFF00, 0xFF01):
                    if identifier is not None:
                        out.append(identifier)
                elif code != status.SUCCESS:
                    raise ArchiveError(f"C-FIND failed with status 0x{code:04X}")
        return out

    def find_studies(self, date_from: date, date_to: date, modality: str) -> list[StudyMatch]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        for key in STUDY_KEYS:
            setattr(q, key, "")
        q.StudyDate = _da(date_from) if date_from == date_to else f"{_da(date_from)}-{_da(date_to)}"
        q.ModalitiesInStudy = modality
        out = []
        for ds in self._find(q):
            uid = _text(ds, "StudyInstanceUID")
            if uid:
                mods = tuple(m for m in _text(ds, "ModalitiesInStudy").split("\\") if m)
                out.append(StudyMatch(uid, _text(ds, "StudyDate") or None, mods, _text(ds, "StudyDescription")))
        return out

    def find_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_instance_uid
        for key in SERIES_KEYS:
            setattr(q, key, "")
        out = []
        for ds in self._find(q):
            uid = _text(ds, "SeriesInstanceUID")
            if uid:
                out.append(SeriesMatch(
                    study_instance_uid, uid, _text(ds, "Modality").upper(), _text(ds, "BodyPartExamined").upper(),
                    _text(ds, "SeriesDescription"), _text(ds, "ProtocolName"), _int(ds, "SeriesNumber"),
                    _int(ds, "NumberOfSeriesRelatedInstances"),
                ))  # fmt: skip
        return out

    def retrieve(
        self, study_instance_uid: str, series_instance_uids: list[str], store: StoreCallback
    ) -> RetrieveOutcome:
        if self.method == "get":
            return self._get(study_instance_uid, series_instance_uids, store)
        return self._move(study_instance_uid, series_instance_uids)

    @staticmethod
    def _series_query(study_uid: str, series_uid: str) -> Dataset:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        return q

    @staticmethod
    def _collect(responses: Any, what: str) -> RetrieveOutcome:
        final: Dataset | None = None
        for rsp, _identifier in responses:
            if rsp is None or "Status" not in rsp:
                return RetrieveOutcome(False, detail=f"{what}: no response (timeout or aborted)")
            if int(rsp.Status) not in (0xFF00, 0xFF01):
                final = rsp
        if final is None:
            return RetrieveOutcome(False, detail=f"{what}: no final response")
        code = int(final.Status)
        done = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        warning = int(final.get("NumberOfWarningSuboperations", 0) or 0)
        ok = code == status.SUCCESS and failed == 0
        return RetrieveOutcome(ok, done, failed, warning, f"{what} status 0x{code:04X}")

    def _move(self, study_uid: str, series_uids: list[str]) -> RetrieveOutcome:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        total = RetrieveOutcome(True)
        try:
            with self._association(ae) as assoc:
                for series_uid in series_uids:
                    one = self._collect(
                        assoc.send_c_move(self._series_query(study_uid, series_uid), self.move_ae_title,
                                          StudyRootQueryRetrieveInformationModelMove),
                        "C-MOVE",
                    )  # fmt: skip
                    total = _add(total, one)
                    if not one.ok:
                        break
        except ArchiveError as exc:
            return RetrieveOutcome(False, total.completed, total.failed, total.warning, f"C-MOVE: {exc}")
        return total

    def _get(self, study_uid: str, series_uids: list[str], store: StoreCallback) -> RetrieveOutcome:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in GET_SOP_CLASSES:
            for ts in GET_TRANSFER_SYNTAXES:
                ae.add_requested_context(sop_class, [ts])
        roles = [build_role(c, scp_role=True) for c in GET_SOP_CLASSES]
        peer_ae, peer_host = self.dest.ae_title, self.dest.host

        def on_store(event: Event) -> int:
            if self.on_message is not None:
                self.on_message(event)
            request: Any = event.request
            try:
                raw = _dataset_bytes(event)
            except Exception:  # noqa: BLE001 - a dataset pynetdicom cannot hand over is refused, not fatal
                return status.CANNOT_UNDERSTAND
            return store(Received(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                                  str(event.context.transfer_syntax), raw, peer_ae, peer_host))  # fmt: skip

        total = RetrieveOutcome(True)
        try:
            handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
            if self.on_connect is not None:
                handlers.append((evt.EVT_CONN_OPEN, self.on_connect))
            with self._association(ae, ext_neg=roles, evt_handlers=handlers) as assoc:
                for series_uid in series_uids:
                    one = self._collect(
                        assoc.send_c_get(self._series_query(study_uid, series_uid),
                                         StudyRootQueryRetrieveInformationModelGet),
                        "C-GET",
                    )  # fmt: skip
                    total = _add(total, one)
                    if not one.ok:
                        break
        except ArchiveError as exc:
            return RetrieveOutcome(False, total.completed, total.failed, total.warning, f"C-GET: {exc}")
        return total


def _dataset_bytes(event: Event) -> bytes:
    """The dataset as received, without file meta. In a process whose listener receives into files
    (pynetdicom's chunked receive is process-wide: agent/ingest/chunked.py) pynetdicom hands a
    C-GET's instance over as a file too: preamble, DICM, group 0002, then the dataset."""
    path = getattr(event, "dataset_path", None)
    if not isinstance(path, Path):
        return bytes(event.encoded_dataset(include_meta=False))
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[132:134] != b"\x02\x00" or data[134:136] != b"\x00\x00":
        raise ValueError("not a DICOM file with a group length")
    # (0002,0000) UL, explicit VR little endian: tag, VR, 2-byte length, 4-byte value
    group_length = struct.unpack("<I", data[140:144])[0]
    return data[144 + group_length :]


def _add(a: RetrieveOutcome, b: RetrieveOutcome) -> RetrieveOutcome:
    return RetrieveOutcome(a.ok and b.ok, a.completed + b.completed, a.failed + b.failed, a.warning + b.warning,
                           b.detail or a.detail)  # fmt: skip
