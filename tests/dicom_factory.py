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
