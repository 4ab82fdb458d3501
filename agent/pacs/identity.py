"""The agent's DICOM implementation identity: negotiated in every association it accepts or
requests, and written in the file meta of every file it spools (conformance statement 2.1)."""

from __future__ import annotations

from pynetdicom import AE

IMPLEMENTATION_CLASS_UID = "2.25.247913405263715651826312403537386934151"
IMPLEMENTATION_VERSION_NAME = "STRNET_010"


def identify(ae: AE) -> AE:
    """``ae`` with our Implementation Class UID and Version Name instead of pynetdicom's."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
