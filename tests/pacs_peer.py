"""A pynetdicom Storage SCP playing the PACS that receives results, with scripted answers.

Used by loopback tests for the sender's status handling; the integration tests use Orthanc.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from conftest import free_port
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

PACS_AET = "TESTPACS"


class PacsPeer:
    """Receives C-STOREs; ``answer`` decides each status (default Success)."""

    def __init__(
        self,
        answer: Callable[[Dataset], int] | None = None,
        allowed_calling: list[str] | None = None,
        max_associations: int | None = None,
        sop_classes: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.received: list[Dataset] = []
        self.statuses: list[int] = []
        self.associations = 0  # accepted so far
        # each accepted association's requestor: (Implementation Class UID, Version Name, the
        # transfer syntaxes proposed in all its storage contexts)
        self.requestors: list[tuple[str, str, frozenset[str]]] = []
        self.open = 0  # open now
        self.released = 0  # ended by a release (either side's request)
        self.aborted = 0  # ended by an abort
        # refused while none was open: pynetdicom's limit counts associations still being negotiated,
        # so two requests at the same moment may both be refused
        self.refused_none_open = 0
        self.storing = 0  # C-STOREs being answered now
        self.most_storing = 0  # the most at once so far
        self.answer = answer or (lambda ds: 0x0000)
        self._lock = threading.Lock()
        self.ae = AE(ae_title=PACS_AET)
        self.ae.supported_contexts = [  # sop_classes: accept only these storage SOP classes
            cx for cx in AllStoragePresentationContexts if sop_classes is None or cx.abstract_syntax in sop_classes
        ]
        self.ae.add_supported_context(Verification)
        self.ae.require_called_aet = True
        if max_associations is not None:  # more are rejected: rejected-transient, local limit exceeded
            self.ae.maximum_associations = max_associations
        if allowed_calling is not None:
            self.ae.require_calling_aet = allowed_calling
        self.server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.storing += 1
            self.most_storing = max(self.most_storing, self.storing)
        try:
            code = self.answer(ds)
        finally:
            with self._lock:
                self.storing -= 1
        with self._lock:
            self.statuses.append(code)
            if code == 0 or code >= 0xB000 and code <= 0xBFFF:
                self.received.append(ds)
        return code

    def _on_accepted(self, event: Any) -> None:
        requestor = event.assoc.requestor
        syntaxes = frozenset(str(ts) for cx in requestor.requested_contexts for ts in cx.transfer_syntax)
        with self._lock:
            self.requestors.append(
                (str(requestor.implementation_class_uid), str(requestor.implementation_version_name), syntaxes)
            )
            self.associations += 1
            self.open += 1

    def _on_released(self, event: Any) -> None:
        with self._lock:
            self.open -= 1
            self.released += 1

    def _on_rejected(self, event: Any) -> None:
        with self._lock:
            if self.open == 0:
                self.refused_none_open += 1

    def _on_aborted(self, event: Any) -> None:
        with self._lock:
            self.open -= 1
            self.aborted += 1

    def start(self) -> PacsPeer:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def uids(self) -> list[str]:
        with self._lock:
            return [str(d.SOPInstanceUID) for d in self.received]

    def __enter__(self) -> PacsPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
