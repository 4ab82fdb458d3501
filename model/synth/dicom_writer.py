"""Build and write synthetic DX / CR knee radiographs as DICOM Part 10 files.

Everything is derived from the generator seed (UIDs, dates): the same seed gives byte-identical
files. Compressed copies are made from a deep copy (``Dataset.copy`` is shallow and would share
``file_meta``) and keep their SOP Instance UID so the manifest stays valid.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from model.synth.acquisition import VendorProfile

_UID_NAMESPACE = uuid.UUID("6f1c1c3e-4a55-4cf4-9d0c-7b1e0d5a6e11")
COMPRESSIONS = {"j2k": JPEG2000Lossless, "jls": JPEGLSLossless, "rle": RLELossless}


def make_uid(seed: int, *parts: object) -> str:
    """Deterministic UID under the 2.25 (UUID-derived) root."""
    name = "|".join(str(p) for p in (seed, *parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class ImageHeader:
    """Header values of one image (patient, study, series, acquisition)."""

    patient_id: str
    patient_name: str
    birth_date: dt.date
    sex: str  # "" when unknown
    age: int
    height_m: float
    weight_kg: float | None
    study_uid: str
    series_uid: str
    sop_uid: str
    study_datetime: dt.datetime
    accession: str
    study_id: str
    series_number: int
    instance_number: int
    laterality: str  # "L", "R" or "B"
    view: str  # "AP" or "PA"
    kvp: float
    magnification: float
    burned_in_text: bool


def build_dataset(stored: np.ndarray, hdr: ImageHeader, profile: VendorProfile) -> Dataset:
    """Dataset for ``stored`` (uint16 stored values, already inverted for MONOCHROME1)."""
    is_dx = profile.modality == "DX"
    sop_class = DigitalXRayImageStorageForPresentation if is_dx else ComputedRadiographyImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(hdr.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "STRNET_SYNTH_1"

    ds = Dataset()
    ds.file_meta = meta
    date = hdr.study_datetime.strftime("%Y%m%d")
    time = hdr.study_datetime.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = hdr.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = hdr.accession
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = "Synthetic Knee Clinic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR KNEE"
    ds.SeriesDescription = f"KNEE {hdr.view} {hdr.laterality}"
    ds.ManufacturerModelName = profile.model
    ds.ImageComments = "SYNTHETIC IMAGE - NOT A REAL PATIENT"
    ds.PatientName = hdr.patient_name
    ds.PatientID = hdr.patient_id
    ds.PatientBirthDate = hdr.birth_date.strftime("%Y%m%d")
    ds.PatientSex = hdr.sex
    ds.PatientAge = f"{hdr.age:03d}Y"
    ds.PatientSize = f"{hdr.height_m:.2f}"
    if hdr.weight_kg is not None:
        ds.PatientWeight = f"{hdr.weight_kg:.1f}"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "KNEE"
    ds.KVP = f"{hdr.kvp:.0f}"
    ds.DistanceSourceToDetector = "1100"
    ds.ViewPosition = hdr.view
    ds.StudyInstanceUID = hdr.study_uid
    ds.SeriesInstanceUID = hdr.series_uid
    ds.StudyID = hdr.study_id
    ds.SeriesNumber = hdr.series_number
    ds.InstanceNumber = hdr.instance_number
    ds.PatientOrientation = ["L", "F"] if hdr.laterality == "R" else ["R", "F"]
    ds.DeidentificationMethod = "SYNTHETIC DATA - NO REAL PATIENT"
    region = Dataset()
    region.CodeValue = "72696002"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Knee"
    ds.AnatomicRegionSequence = [region]
    if is_dx:
        # DX puts laterality on the image; General Series Laterality must then be absent.
        ds.ImageLaterality = hdr.laterality
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.AcquisitionContextSequence = []
        ds.PositionerType = ""
        ds.EstimatedRadiographicMagnificationFactor = f"{hdr.magnification:.3f}"
        ds.PixelIntensityRelationship = "LOG"
        # MONOCHROME2 here means more attenuation -> higher value (sign -1); MONOCHROME1 +1.
        ds.PixelIntensityRelationshipSign = -1 if profile.photometric == "MONOCHROME2" else 1
        ds.PresentationLUTShape = "IDENTITY" if profile.photometric == "MONOCHROME2" else "INVERSE"
    else:
        ds.Laterality = hdr.laterality if hdr.laterality != "B" else ""
    ds.BurnedInAnnotation = "YES" if hdr.burned_in_text else "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    spacing = f"{profile.pixel_spacing_mm:.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [f"{profile.pixel_spacing_mm / hdr.magnification:.4f}"] * 2
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Corrected for the estimated magnification"
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    top = (1 << profile.bits_stored) - 1
    slope, intercept = profile.rescale_slope, profile.rescale_intercept
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "US"
    # Vendor default window: the full processed range, in modality (rescaled) units.
    ds.WindowCenter = f"{slope * top / 2 + intercept:.1f}"
    ds.WindowWidth = f"{slope * (top + 1):.1f}"
    # no VOI LUT Function: LINEAR is the default, and OHIF 3.13 refuses to show an image that names it
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return ds


def write(ds: Dataset, path: Path, compression: str | None, stored: np.ndarray) -> str:
    """Write ``ds`` to ``path``, optionally compressed; returns the transfer syntax UID."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression is None:
        ds.save_as(path, enforce_file_format=True)
        return str(ds.file_meta.TransferSyntaxUID)
    out = copy.deepcopy(ds)
    out.compress(COMPRESSIONS[compression], arr=stored, generate_instance_uid=False)
    out.save_as(path, enforce_file_format=True)
    return str(out.file_meta.TransferSyntaxUID)
