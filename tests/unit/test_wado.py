"""The WADO-RS answer as the sweep reads it (agent/pacs/wado.py): multipart parts as they arrive,
over any chunking, each capped; Part 10 file meta cut off. Orthanc's real answers:
tests/integration/test_sweep_dicomweb.py."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import dicom_factory as factory
import pytest
from pydicom import dcmread

from agent.pacs.wado import boundary_of, iter_parts, split_part10


def part10(tmp_path: Path, name: str) -> bytes:
    return factory.write(factory.knee_dx(rows=16, cols=16), tmp_path / name).read_bytes()


def message(bodies: list[bytes], boundary: bytes = b"b0und") -> bytes:
    out = b"preamble to ignore"
    for body in bodies:
        out += b"\r\n--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + body
    return out + b"\r\n--" + boundary + b"--\r\n"


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
def test_parts_come_out_whole_whatever_the_chunking(tmp_path: Path, size: int) -> None:
    bodies = [part10(tmp_path, "a.dcm"), part10(tmp_path, "b.dcm"), b"\r\n--b0un not a delimiter\r\n"]
    assert list(iter_parts(chunks(message(bodies), size), b"b0und", 1 << 20)) == bodies


def test_an_answer_cut_short_or_an_instance_over_the_cap_is_an_error(tmp_path: Path) -> None:
    data = message([part10(tmp_path, "a.dcm")])
    with pytest.raises(ValueError, match="cut short"):
        list(iter_parts(chunks(data[:-30], 100), b"b0und", 1 << 20))
    with pytest.raises(ValueError, match="larger than"):
        list(iter_parts(chunks(data, 100), b"b0und", 1000))


def test_the_boundary_is_read_from_the_content_type() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary="x y"') == b"x y"
    with pytest.raises(ValueError):
        boundary_of("application/dicom")


def test_the_file_meta_is_cut_off_and_its_uids_kept(tmp_path: Path) -> None:
    data = part10(tmp_path, "a.dcm")
    ds = dcmread(BytesIO(data))
    sop_class, sop_instance, syntax, raw = split_part10(data)
    assert (sop_class, sop_instance, syntax) == (ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID)
    assert data.endswith(raw) and raw[:2] == b"\x08\x00"  # the dataset, from its first element
    with pytest.raises(ValueError):
        split_part10(b"\0" * 200)
