"""What became of one message sent to an HL7 or FHIR destination: the sender lanes record it in
the outbox as they record a C-STORE's status (delivered, retried with backoff, or dead)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Verdict = Literal["delivered", "retry", "dead"]


@dataclass(frozen=True)
class Delivery:
    verdict: Verdict
    status: str | None  # what the peer answered, e.g. "AA", "AE", "HTTP 201"; None: no answer
    reason: str = ""  # why it was not delivered; never an element value or a PHI-bearing text


class MessageTransport(Protocol):
    """Delivers a built message (bytes from the results folder) to one kind of destination.
    ``dest`` is that kind's settings section; a transport keeps its connections between calls."""

    def deliver(self, dest: object, payload: bytes) -> Delivery: ...

    def close(self) -> None: ...
