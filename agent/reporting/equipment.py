"""Who made a result and when: the IHE AI Results (AIR) identity of the model on SR and overlay.

IHE AIR (AI Results, general result encoding requirements) asks every result object to name the
algorithm: Contributing Equipment Sequence (0018,A001) with manufacturer, model name and software
version, Purpose of Reference (109102, DCM, "Processing Equipment"); the SR's observer context
names the same device. The Device UID (0018,1002) is in the object's General Equipment module
(``identify``): dciodvfy's dictionary (dicom3tools 2022) does not know it inside Contributing
Equipment Sequence and calls the object "Standard Extended" there. It is derived from the
algorithm name, version AND checkpoint hash: whenever the served weights change, so does the
device a reader sees. Series Date/Time is when the result was made (AIR: present on every result
series, so that a PACS files it under a date, not "?").
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

from agent.domain import AlgorithmInfo
from agent.reporting.uids import result_uid

PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")


def device_uid(algorithm: AlgorithmInfo) -> str:
    """The model's Device UID: a new one whenever name, version or checkpoint bytes change."""
    return result_uid(f"{algorithm.name}#{algorithm.checkpoint_sha256}", algorithm.version, "device")


def model_name(algorithm: AlgorithmInfo) -> str:
    """Manufacturer's Model Name of the algorithm, e.g. "STR-Net strnet-synth-v2"."""
    return f"{algorithm.name} {algorithm.version}"[:64]


def contributing_equipment(algorithm: AlgorithmInfo, manufacturer: str, when: datetime) -> hd.ContributingEquipment:
    """The Contributing Equipment item naming the model that made this result."""
    item = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=model_name(algorithm),
        software_versions=algorithm.version[:64],
        contribution_datetime=when.replace(microsecond=0),
        contribution_description=f"{algorithm.name} bone-loss screening (NOT FOR DIAGNOSTIC USE)",
    )
    return item


def identify(ds: Dataset, algorithm: AlgorithmInfo) -> None:
    """General Equipment of a result object: the model made it, so its model name, software
    version (as in the Contributing Equipment item) and its Device UID."""
    ds.ManufacturerModelName = model_name(algorithm)
    ds.SoftwareVersions = algorithm.version[:64]
    ds.DeviceUID = device_uid(algorithm)
