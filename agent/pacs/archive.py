"""What the retrospective sweep asks of an archive: find studies, find series, retrieve.

``ArchiveSource`` is the interface; ``agent/pacs/qr.py`` implements it with DIMSE query/retrieve
(C-FIND, C-MOVE or C-GET). Another source (QIDO-RS and WADO-RS) implements the same three calls.
A source that brings the instances itself (C-GET, WADO-RS) hands each one to the ``store``
callback it is given, which answers a DIMSE status; a C-MOVE source ignores it (the instances
arrive at the agent's listener).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol


@dataclass(frozen=True)
class StudyMatch:
    study_instance_uid: str
    study_date: str | None  # YYYYMMDD
    modalities: tuple[str, ...] = ()
    study_description: str = ""  # only to find "knee" in it (eligibility); never logged nor printed


@dataclass(frozen=True)
class SeriesMatch:
    study_instance_uid: str
    series_instance_uid: str
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    protocol_name: str = ""
    series_number: int | None = None
    instances: int | None = None
    sop_classes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Received:
    """One instance a source brought itself (C-GET, WADO-RS): the dataset's bytes as encoded."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    raw: bytes
    calling_ae: str
    peer_host: str | None


@dataclass(frozen=True)
class RetrieveOutcome:
    ok: bool
    completed: int = 0
    failed: int = 0
    warning: int = 0
    detail: str = ""  # a status name or what went wrong, in words (no PHI)


StoreCallback = Callable[[Received], int]


class ArchiveError(Exception):
    """The archive could not be asked (association refused, network, a failure status)."""


class ArchiveSource(Protocol):
    """An archive the sweep queries and retrieves from."""

    name: str  # the [[pacs]] name: in the database and the audit trail
    method: str  # how it retrieves ("move", "get", ...): the audit trail records it

    def find_studies(self, date_from: date, date_to: date, modality: str) -> list[StudyMatch]:
        """Studies with a series of ``modality`` whose Study Date is in the range (inclusive)."""
        ...

    def find_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        """Every series of the study."""
        ...

    def retrieve(
        self, study_instance_uid: str, series_instance_uids: list[str], store: StoreCallback
    ) -> RetrieveOutcome:
        """Bring these series of the study to the agent."""
        ...
