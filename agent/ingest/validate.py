"""Checks an incoming C-STORE must pass before it is acknowledged (docs/architecture.md, the durability contract).

Each failing check raises StoreRefused with the DIMSE status to answer and a reason free of PHI.
"""

from __future__ import annotations

import re
import struct

from pydicom.dataset import Dataset
from pydicom.uid import UID

from agent.dicom_values import read_positive_int, value_of
from agent.errors import StoreRefused
from agent.pacs import status

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LEN = 64
MAX_DEPTH = 16


def valid_uid(value: object) -> bool:
    s = str(value or "")
    return 0 < len(s) <= MAX_UID_LEN and bool(UID_RE.match(s))


def check_uid(value: object, what: str) -> str:
    if not valid_uid(value):
        raise StoreRefused(status.CANNOT_UNDERSTAND, f"{what} is not a valid UID")
    return str(value)


def _walk(ds: Dataset, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise StoreRefused(status.CANNOT_UNDERSTAND, "sequences nested too deeply")
    for elem in ds:  # iterating converts raw elements: a truncated stream fails here
        if elem.VR == "SQ":
            for item in elem.value:
                _walk(item, depth + 1)


def parse_fully(ds: Dataset) -> None:
    """Force pydicom's lazy parser through every element."""
    try:
        _walk(ds, 0)
    except StoreRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt streams
        raise StoreRefused(status.CANNOT_UNDERSTAND, f"dataset cannot be parsed ({exc.__class__.__name__})") from None


def check_no_file_meta(ds: Dataset) -> None:
    """Refuse group 0002 elements inside the dataset.

    The spool file carries our own file meta in front of the dataset bytes as received; a second
    group 0002 after it would give readers two conflicting transfer syntaxes or UIDs.
    """
    if any(tag.group == 0x0002 for tag in ds.keys()):
        raise StoreRefused(status.CANNOT_UNDERSTAND, "file meta (group 0002) elements inside the dataset")


def check_identifiers(ds: Dataset, command_class_uid: str, command_instance_uid: str) -> None:
    """UIDs well formed, and the command's Affected SOP Class/Instance agree with the dataset."""
    check_uid(command_instance_uid, "Affected SOP Instance UID")
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            raise StoreRefused(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing")
        check_uid(ds[keyword].value, keyword)
    if str(ds.SOPInstanceUID) != str(command_instance_uid):
        raise StoreRefused(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPInstanceUID differs from the command's Affected SOP Instance UID",
        )
    if str(ds.SOPClassUID) != str(command_class_uid):
        raise StoreRefused(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPClassUID differs from the command's Affected SOP Class UID",
        )


_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD


def _fragment_count(pixel: bytes) -> int | None:
    """The fragments of encapsulated pixel data (PS3.5 A.4: items of defined length, the Basic
    Offset Table first and not counted); None when an item is not one, has an undefined length,
    or runs past the end of the data (a library reader would hand back the fragment cut short)."""
    pos, items = 0, 0
    while pos < len(pixel):
        if pos + 8 > len(pixel):
            return None
        group, element, length = struct.unpack_from("<HHL", pixel, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM or length == 0xFFFFFFFF or pos + 8 + length > len(pixel):
            return None
        pos, items = pos + 8 + length, items + 1
    return items - 1 if items else None


def check_pixel_data(ds: Dataset, transfer_syntax: UID) -> None:
    """The pixel data is there and its length agrees with the image attributes.

    Full decoding is left to the worker; this catches truncation and size lies cheaply.
    """
    for keyword in ("Rows", "Columns", "BitsAllocated", "PixelData"):
        if keyword not in ds or ds[keyword].value in (None, b""):
            raise StoreRefused(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing")
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = int(ds.BitsAllocated)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    raw_frames = value_of(ds, "NumberOfFrames")
    frames = 1 if raw_frames in (None, "") else read_positive_int(raw_frames) or 0  # IS: text from the wire
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32) or samples not in (1, 3) or frames < 1:
        raise StoreRefused(status.CANNOT_UNDERSTAND, "image attributes out of range")
    pixel = ds["PixelData"].value
    if transfer_syntax.is_encapsulated:
        n = _fragment_count(bytes(pixel))
        if n is None:
            raise StoreRefused(status.CANNOT_UNDERSTAND, "encapsulated pixel data is malformed")
        if n < frames:
            raise StoreRefused(status.CANNOT_UNDERSTAND, "fewer pixel data fragments than frames")
        return
    expected_bits = rows * cols * samples * bits * frames
    expected = (expected_bits + 7) // 8
    if len(pixel) < expected:
        raise StoreRefused(
            status.CANNOT_UNDERSTAND,
            f"pixel data holds {len(pixel)} bytes, the image attributes need {expected}",
        )
