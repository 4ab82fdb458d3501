"""Which messages a screened study's result makes, and for which destinations.

One route per ``[[hl7]]`` and ``[[fhir]]`` destination: how to build its message from a
``StudyResult`` and how the outbox files it. The reporter builds every route's message after the
SR (in its thread: a few milliseconds each) and records them with the SR in one commit; the
sender lanes deliver them with the transport of their kind (``transports``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import FhirSection, Hl7Section, Settings
from agent.ehr.content import StudyResult
from agent.ehr.delivery import MessageTransport

HL7 = "hl7"
FHIR = "fhir"


@dataclass(frozen=True)
class MessageRoute:
    name: str  # the destination's name (unique across [[pacs]], [[hl7]], [[fhir]])
    kind: str  # HL7 | FHIR: the outbox row's kind
    label: str  # what the outbox row's sop_class_uid column says of the message
    suffix: str  # file name suffix in the results folder
    send_swept: bool  # also for studies the archive sweep retrieved
    section: Any  # Hl7Section | FhirSection
    build: Callable[[StudyResult], bytes]

    def file_name(self, key: str) -> str:
        """The message file (relative to the results folder) for the result ``key`` (the SR's
        SOP Instance UID, ours): destination names are settings, so they enter only as a hash."""
        tag = hashlib.sha256(self.name.encode("utf-8")).hexdigest()[:12]
        return f"messages/{key}.{self.kind}.{tag}{self.suffix}"


def _hl7(dest: Hl7Section) -> MessageRoute:
    from agent.ehr import hl7_oru

    def build(result: StudyResult) -> bytes:
        return hl7_oru.build_oru(result, dest, hl7_oru.control_id(result.report_sop_instance_uid, dest.name))

    return MessageRoute(dest.name, HL7, "ORU^R01", ".hl7", dest.send_swept, dest, build)


def _fhir(dest: FhirSection) -> MessageRoute:
    from agent.ehr import fhir_bundle

    return MessageRoute(
        dest.name, FHIR, "Bundle", ".json", dest.send_swept, dest, lambda r: fhir_bundle.build_bundle(r, dest)
    )


def routes(settings: Settings) -> list[MessageRoute]:
    """Every message destination configured, in the order of the settings."""
    return [_hl7(d) for d in settings.hl7] + [_fhir(d) for d in settings.fhir]


def _mllp() -> MessageTransport:
    from agent.ehr.mllp import MllpTransport

    return MllpTransport()


def _fhir_transport() -> MessageTransport:
    from agent.ehr.fhir_client import FhirTransport

    return FhirTransport()


def transports() -> dict[str, Callable[[], MessageTransport]]:
    """A transport factory per message kind (each sender lane makes its own; a kind's library is
    imported when a lane first needs it)."""
    return {HL7: _mllp, FHIR: _fhir_transport}
