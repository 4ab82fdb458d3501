"""DIMSE status codes by name (PS3.4 Annex B and PS3.7 Annex C), and their classes.

Code elsewhere uses these names, never bare hex.
"""

from __future__ import annotations

import enum

SUCCESS = 0x0000
# C-STORE warnings (PS3.4 B.2.3)
WARNING_COERCION = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006
WARNING_DATASET_MISMATCH = 0xB007
# C-STORE failures
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
# general DIMSE failures (PS3.7 C.4)
REFUSED_NOT_AUTHORIZED = 0x0124
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
# DIMSE-N statuses and storage commitment failure reasons (PS3.7 C.4, PS3.4 J.3.2.1.1.2)
NO_SUCH_OBJECT_INSTANCE = 0x0112
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_CLASS = 0x0118
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
DUPLICATE_TRANSACTION_UID = 0x0131
UNRECOGNIZED_OPERATION = 0x0211
RESOURCE_LIMITATION = 0x0213


class StatusClass(enum.Enum):
    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT = "transient"  # worth retrying later (out of resources, busy)
    PERMANENT = "permanent"  # retrying the same object will not help


def classify(status: int) -> StatusClass:
    """Class of a C-STORE response status, as the sender acts on it."""
    if status == SUCCESS:
        return StatusClass.SUCCESS
    if status in (WARNING_COERCION, WARNING_ELEMENTS_DISCARDED, WARNING_DATASET_MISMATCH) or (
        0xB000 <= status <= 0xBFFF
    ):
        return StatusClass.WARNING
    if 0xA700 <= status <= 0xA7FF or status == 0x0213:  # out of resources, resource limitation
        return StatusClass.TRANSIENT
    return StatusClass.PERMANENT


def name(status: int) -> str:
    """A readable name for logs."""
    for key, value in globals().items():
        if key.isupper() and value == status:
            return key.lower()
    return f"status_{status:04X}"
