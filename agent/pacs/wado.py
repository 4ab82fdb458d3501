"""The sweep's ``ArchiveSource`` over DICOMweb: QIDO-RS to find, WADO-RS to retrieve (PS3.18 10.6,
10.4; docs/dicom-conformance.md, DICOMweb user agent). Selected for a ``[[pacs]]`` with
``query = true`` and ``kind = "dicomweb"``.

- Studies: ``GET <url>/studies?StudyDate=<from>-<to>&ModalitiesInStudy=<modality>`` with the
  sweep's keys only (no patient attribute is asked for).
- Series: ``GET <url>/studies/<study>/series``; the sweep keeps them by the same rules as DIMSE.
  A key the answer leaves out (Body Part Examined is not a required QIDO-RS return key, and
  Orthanc omits it) is read from the series' first instance's metadata
  (``GET .../series/<series>/metadata``).
- Retrieve: ``GET <url>/studies/<study>/series/<series>`` for each kept series, asking for the
  instances as stored (``transfer-syntax=*``); each part of the multipart answer is a Part 10 file
  whose dataset, bytes as received, goes to the ``store`` callback (``Ingestor.store``: the
  durability contract), with the destination's name as calling AE. An instance larger than
  ``max_bytes`` (the listener's ``scp.max_instance_mb``) is not read on: the retrieve fails.

The session (TLS, credentials read for every request, no proxies, no redirects) is the one the
STOW-RS sender uses (``agent/pacs/dicomweb.py``). Errors carry the HTTP status and exception class
names, never the answer's text.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from datetime import date
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import requests
from pydicom.uid import UID

from agent.config import PacsSection
from agent.pacs import status
from agent.pacs.archive import ArchiveError, Received, RetrieveOutcome, SeriesMatch, StoreCallback, StudyMatch
from agent.pacs.dicomweb import open_client

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "StudyDescription")
SERIES_FIELDS = (
    "SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription", "ProtocolName", "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)  # fmt: skip
#: keyword -> DICOM JSON tag
_TAGS = {
    "StudyInstanceUID": "0020000D", "StudyDate": "00080020", "ModalitiesInStudy": "00080061",
    "StudyDescription": "00081030", "SeriesInstanceUID": "0020000E", "Modality": "00080060",
    "BodyPartExamined": "00180015", "SeriesDescription": "0008103E", "ProtocolName": "00181030",
    "SeriesNumber": "00200011", "NumberOfSeriesRelatedInstances": "00201209",
}  # fmt: skip
#: what the eligibility rules read of a series; asked of the series' metadata when QIDO-RS omits them
_SERIES_RULE_KEYS = ("Modality", "BodyPartExamined", "SeriesDescription", "ProtocolName", "SeriesNumber")
ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_PAGE = 1000  # QIDO-RS results asked for per request (offset paging until a short page)


def _values(item: dict[str, Any], keyword: str) -> list[Any]:
    element = item.get(_TAGS[keyword]) or {}
    values = element.get("Value") if isinstance(element, dict) else None
    return list(values) if isinstance(values, list) else []


def _text(item: dict[str, Any], keyword: str) -> str:
    return "\\".join(str(v).strip() for v in _values(item, keyword) if v is not None and not isinstance(v, dict))


def _int(item: dict[str, Any], keyword: str) -> int | None:
    try:
        return int(_text(item, keyword))
    except ValueError:
        return None


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def split_part10(data: bytes) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, dataset bytes) of a Part 10 file: its file meta
    (group 0002, explicit VR little endian) is read element by element and cut off. Raises
    ValueError if it is not one."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    at, found = 132, {}
    while at + 8 <= len(data):
        group, element = struct.unpack("<HH", data[at : at + 4])
        if group != 2:
            break
        vr = data[at + 4 : at + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, head = struct.unpack("<I", data[at + 8 : at + 12])[0], 12
        else:
            length, head = struct.unpack("<H", data[at + 6 : at + 8])[0], 8
        if element in (0x0002, 0x0003, 0x0010):
            found[element] = data[at + head : at + head + length].rstrip(b"\x00 ").decode("ascii", "replace")
        at += head + length
    if at > len(data) or not all(found.get(e) for e in (0x0002, 0x0003, 0x0010)):
        raise ValueError("a DICOM file meta without its SOP class, instance or transfer syntax")
    return found[0x0002], found[0x0003], found[0x0010], data[at:]


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/related Content-Type. Raises ValueError when there is none."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n")
    boundary = message.get_boundary() if message.get_content_maintype() == "multipart" else None
    if not boundary:
        raise ValueError("not a multipart answer")
    return boundary.encode("latin-1")


def iter_parts(chunks: Iterable[bytes], boundary: bytes, max_part: int) -> Iterator[bytes]:
    """The bodies of a multipart answer, each as soon as it has arrived (at most ``max_part``
    bytes each: ValueError beyond; also for an answer cut short)."""
    delimiter = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")  # the first delimiter may open the body
    source = iter(chunks)
    body_at: int | None = None  # where the current part's body starts in buf
    searched = 0

    def more() -> bool:
        chunk = next(source, None)
        if chunk is None:
            return False
        buf.extend(chunk)
        return True

    while True:
        if body_at is None:  # after a delimiter: "--" ends the message, else headers then body
            at = buf.find(delimiter)
            if at < 0 or len(buf) < at + len(delimiter) + 2:
                if not more():
                    raise ValueError("multipart answer cut short")
                continue
            after = at + len(delimiter)
            if buf[after : after + 2] == b"--":
                return
            end = buf.find(b"\r\n\r\n", after)
            if end < 0:
                if len(buf) - after > 65536 or not more():
                    raise ValueError("multipart part headers unreadable")
                continue
            del buf[: end + 4]
            body_at, searched = 0, 0
            continue
        at = buf.find(delimiter, searched)
        if at < 0:
            searched = max(0, len(buf) - len(delimiter))
            if len(buf) > max_part + len(delimiter):
                raise ValueError(f"an instance larger than {max_part >> 20} MiB")
            if not more():
                raise ValueError("multipart answer cut short")
            continue
        yield bytes(buf[:at])
        del buf[:at]
        body_at = None


class DicomwebArchive:
    """QIDO-RS at study and series level, WADO-RS per series."""

    method = "wado"

    def __init__(self, dest: PacsSection, *, timeout_s: float = 60.0, max_bytes: int = 1 << 30) -> None:
        assert dest.url is not None  # a dicomweb destination has one (agent/config.py)
        self.dest = dest
        self.name = dest.name
        self.url = dest.url
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._client = open_client(dest, timeout_s)  # one session (connection pool), one thread, one sweep

    def close(self) -> None:
        """End the HTTP session (the sweep calls it when done with this source)."""
        self._client.close()

    def _get(self, path: str, accept: str, params: dict[str, str] | None = None, *, stream: bool = False
             ) -> requests.Response:  # fmt: skip
        try:
            self._client.authenticate()
            return self._client.session.get(f"{self.url}{path}", params=params, headers={"Accept": accept},
                                            timeout=(self.timeout_s, self.timeout_s), allow_redirects=False,
                                            stream=stream)  # fmt: skip
        except OSError as exc:  # requests' errors, an unreadable credentials file
            raise ArchiveError(f"DICOMweb archive unreachable ({exc.__class__.__name__})") from None

    def _search(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            response = self._get(path, "application/dicom+json", {**params, "limit": str(_PAGE), "offset": str(offset)})
            if response.status_code == 204:
                return out
            if response.status_code != 200:
                raise ArchiveError(f"QIDO-RS answered HTTP {response.status_code}")
            try:
                page = response.json()
            except ValueError:
                raise ArchiveError("QIDO-RS answer is not DICOM JSON") from None
            if not isinstance(page, list):
                raise ArchiveError("QIDO-RS answer is not a list")
            out += [item for item in page if isinstance(item, dict)]
            if len(page) < _PAGE:
                return out
            offset += len(page)

    def find_studies(self, date_from: date, date_to: date, modality: str) -> list[StudyMatch]:
        when = _da(date_from) if date_from == date_to else f"{_da(date_from)}-{_da(date_to)}"
        params = {"StudyDate": when, "ModalitiesInStudy": modality, "includefield": ",".join(STUDY_FIELDS)}
        out = []
        for item in self._search("/studies", params):
            uid = _text(item, "StudyInstanceUID")
            if uid:
                mods = tuple(m for m in _text(item, "ModalitiesInStudy").split("\\") if m)
                out.append(StudyMatch(uid, _text(item, "StudyDate") or None, mods, _text(item, "StudyDescription")))
        return out

    def _first_metadata(self, study_uid: str, series_uid: str) -> dict[str, Any]:
        """The first instance's metadata of a series (WADO-RS ``/metadata``)."""
        try:
            response = self._get(f"/studies/{study_uid}/series/{series_uid}/metadata", "application/dicom+json")
            items = response.json() if response.status_code == 200 else None
        except ValueError:
            items = None
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            raise ArchiveError("WADO-RS series metadata unreadable")
        return items[0]

    def find_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        out = []
        for item in self._search(f"/studies/{study_instance_uid}/series", {"includefield": ",".join(SERIES_FIELDS)}):
            uid = _text(item, "SeriesInstanceUID")
            if uid and any(_TAGS[k] not in item for k in _SERIES_RULE_KEYS):
                # not a required QIDO-RS return key (Orthanc leaves Body Part Examined out): the
                # series' own instance metadata says it
                item = {**self._first_metadata(study_instance_uid, uid), **item}
            if uid:
                out.append(SeriesMatch(
                    study_instance_uid, uid, _text(item, "Modality").upper(), _text(item, "BodyPartExamined").upper(),
                    _text(item, "SeriesDescription"), _text(item, "ProtocolName"), _int(item, "SeriesNumber"),
                    _int(item, "NumberOfSeriesRelatedInstances"),
                ))  # fmt: skip
        return out

    def retrieve(
        self, study_instance_uid: str, series_instance_uids: list[str], store: StoreCallback
    ) -> RetrieveOutcome:
        completed = failed = 0
        for series_uid in series_instance_uids:
            try:
                response = self._get(f"/studies/{study_instance_uid}/series/{series_uid}", ACCEPT_STORED, stream=True)
            except ArchiveError as exc:
                return RetrieveOutcome(False, completed, failed, 0, str(exc))
            try:
                if response.status_code != 200:
                    return RetrieveOutcome(False, completed, failed, 0, f"WADO-RS answered HTTP {response.status_code}")
                boundary = boundary_of(response.headers.get("Content-Type", ""))
                for data in iter_parts(response.iter_content(1 << 20), boundary, self.max_bytes):
                    code = _store_one(data, store, self.name)
                    if status.classify(code) in (status.StatusClass.SUCCESS, status.StatusClass.WARNING):
                        completed += 1
                    else:
                        failed += 1
            except ValueError as exc:
                return RetrieveOutcome(False, completed, failed, 0, f"WADO-RS answer unreadable ({exc})")
            except requests.RequestException as exc:
                why = f"WADO-RS answer cut short ({exc.__class__.__name__})"
                return RetrieveOutcome(False, completed, failed, 0, why)
            finally:
                response.close()
            if failed:
                return RetrieveOutcome(False, completed, failed, 0, f"WADO-RS: {failed} not stored")
        return RetrieveOutcome(True, completed, 0, 0, "WADO-RS")


def _store_one(data: bytes, store: StoreCallback, calling: str) -> int:
    try:
        sop_class, sop_instance, syntax, raw = split_part10(data)
    except ValueError:
        return status.CANNOT_UNDERSTAND
    return store(Received(sop_class, sop_instance, str(UID(syntax)), raw, calling, None))
