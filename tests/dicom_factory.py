"""Small real DICOM instances for the ingest tests (the model's generator makes the realistic ones).

Each function returns a pydicom Dataset with file meta, ready to write or send.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# PHI values the log tests grep for: none of them may reach a log line.
PHI_NAME = "Zyxwvut^Qwertyuiop"
PHI_ID = "PID-98765-PHI"
PHI_BIRTH = "19411223"


def pixels(rows: int = 256, cols: int = 200, seed: int = 0, bits: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    img = 0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0) + 0.05 * rng.standard_normal((rows, cols))
    return np.clip(img * (2**bits - 1), 0, 2**bits - 1).astype(np.uint16)


def knee_dx(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "DX",
    body_part: str = "KNEE",
    laterality: str = "L",
    rows: int = 256,
    cols: int = 200,
    seed: int = 0,
    patient_name: str = PHI_NAME,
    patient_id: str = PHI_ID,
    birth_date: str = PHI_BIRTH,
    monochrome1: bool = False,
    implicit: bool = False,
) -> Dataset:
    """A DX (or CR) knee radiograph with 12-bit pixels in explicit (or implicit) VR little endian."""
    sop_class = CR if modality == "CR" else DX_PRESENTATION
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "F"
    ds.StudyDate = "20260105"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    ds.ViewPosition = "AP"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "TESTCO"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    arr = pixels(rows, cols, seed)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.15, 0.15]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = arr.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def compressed(ds: Dataset, syntax: str) -> Dataset:
    """A compressed copy (JPEG 2000 lossless, JPEG-LS lossless or RLE) via pydicom's encoders."""
    out = copy.deepcopy(ds)  # ds.copy() shares file_meta
    out.compress({"j2k": JPEG2000Lossless, "jls": JPEGLSLossless, "rle": RLELossless}[syntax])
    return out


def jpeg_lossless_file(src: Path, dst: Path) -> Path:
    """JPEG lossless SV1 through DCMTK's dcmcjpeg (pydicom cannot encode it). Keeps the UIDs."""
    subprocess.run(["dcmcjpeg", "--encode-lossless-sv1", str(src), str(dst)], check=True)
    return dst


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True, implicit_vr=None)
    return path


# ---- for the DICOM variant corpus (tests/corpus) ------------------------------------------------------
def set_pixels(ds: Dataset, arr: np.ndarray, *, bits_stored: int, signed: bool = False) -> Dataset:
    """Replace a single-sample image's pixels by ``arr`` (rows x cols, or frames x rows x cols):
    BitsAllocated 8 up to 8 bits stored, else 16; NumberOfFrames set for more than one frame."""
    alloc = 8 if bits_stored <= 8 else 16
    dtype = {(8, False): "u1", (8, True): "i1", (16, False): "<u2", (16, True): "<i2"}[(alloc, signed)]
    frames = arr.shape[0] if arr.ndim == 3 else 1
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = alloc, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = 100.0
    data = np.ascontiguousarray(arr).astype(dtype).tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    return ds


def dcmtk_jpeg(ds: Dataset, option: str) -> Dataset:
    """A copy compressed by DCMTK's dcmcjpeg, UIDs kept: ``+eb`` baseline (8-bit images),
    ``+ee`` extended, ``+el`` lossless (process 14), ``+e1`` lossless first-order prediction (SV1)."""
    import tempfile

    from pydicom import dcmread

    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
        write(copy.deepcopy(ds), src)
        subprocess.run(["dcmcjpeg", option, "+un", str(src), str(dst)], check=True, capture_output=True, timeout=120)
        return dcmread(dst)


def raw_value(ds: Dataset, keyword: str, data: bytes) -> Dataset:
    """Give an element exactly these bytes (padded to even length with a space), written as they
    are whatever the dataset's Specific Character Set says: how a non-conforming sender's text looks."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    number = tag_for_keyword(keyword)
    assert number is not None, keyword
    tag = Tag(number)
    if len(data) % 2:
        data += b" "
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(data), data, 0, False, True)
    return ds


# ---- the values real hospitals send (docs/dicom-values.md) ------------------------------------------

#: (attribute, value) pairs seen from real senders that DICOM does not allow or that are ambiguous;
#: each made a result's build fail before the values were read leniently
BAD_VALUES: list[tuple[str, object]] = [
    ("PatientBirthDate", "25/03/1945"),
    ("PatientBirthDate", "1945-03-25"),
    ("PatientBirthDate", "00000000"),
    ("StudyDate", "=1+1"),
    ("StudyDate", "11.02.2023"),
    ("StudyTime", "12:30 PM"),
    ("PatientSex", "male"),
    ("PatientSex", "f"),
    ("PatientSex", "U"),
    ("SpecificCharacterSet", ["", "ISO 2022 IR 87"]),
    ("SpecificCharacterSet", "ISO_IR 6"),
    ("SpecificCharacterSet", "ISO-8859-1"),
]

#: Type 2 attributes of the results whose absence from a source made the SR fail (AttributeError)
RESULT_TYPE2 = (
    "StudyDate", "StudyTime", "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "StudyID",
    "PatientSex",
)  # fmt: skip


def set_raw(ds: Dataset, keyword: str, value: object) -> Dataset:
    """Set ``keyword`` to ``value`` as a sender would put it on the wire (``raw_value``): not
    validated or converted (pydicom refuses an InstanceNumber of "abc" from a test, not from a
    file). A list is several values; text is ASCII here (assign non-ASCII names normally)."""
    text = "\\".join(value) if isinstance(value, list) else str(value)
    return raw_value(ds, keyword, text.encode("ascii"))


def as_received(ds: Dataset, **raw: object) -> Dataset:
    """``ds`` (with ``raw`` values set as on the wire; None deletes the attribute) encoded and read
    back as the agent reads a spooled instance: values raw until used, text decoded by pydicom
    under the dataset's SpecificCharacterSet."""
    import warnings
    from io import BytesIO

    import pydicom

    out = copy.deepcopy(ds)
    for keyword, value in raw.items():
        if value is None:
            if keyword in out:
                delattr(out, keyword)
        else:
            set_raw(out, keyword, value)
    buf = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's word on a value it is asked to write as is
        out.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()))
