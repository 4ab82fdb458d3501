"""The DICOM listener: Verification and X-ray storage (DESIGN.md section 7).

Handlers are plain functions bound to pynetdicom events with their dependencies passed at
binding. Calling AE titles are allowed only from the host each is bound to; everything else is
refused at association, before any data flows.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14

from agent.config import ScpSection
from agent.ingest.handlers import Ingestor, StoreRequest
from agent.logging import get_logger
from agent.pacs import status

log = get_logger(__name__)

STORAGE_SOP_CLASSES = (
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ComputedRadiographyImageStorage,
)

# Compressed first: pynetdicom picks in its own order, so instances arrive as the PACS stores them.
TRANSFER_SYNTAXES: list[UID] = [
    JPEG2000Lossless,
    JPEG2000,
    JPEGLosslessSV1,
    JPEGLosslessP14,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
]


class AssociationTracker:
    """Open associations per calling AE (the study-completion sweep waits while one is open)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self.total = 0

    def opened(self, ae: str) -> None:
        with self._lock:
            self._open[ae] += 1
            self.total += 1

    def closed(self, ae: str) -> None:
        with self._lock:
            self._open[ae] -= 1
            if self._open[ae] <= 0:
                del self._open[ae]

    def open_count(self, ae: str | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if ae is None else self._open.get(ae, 0)


def _calling_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def handle_requested(event: Event, peers: dict[str, set[str]]) -> None:
    """Refuse an association whose calling AE title is unknown or comes from another host."""
    ae = str(event.assoc.requestor.primitive.calling_ae_title).strip()
    host = event.assoc.requestor.address
    allowed = peers.get(ae)
    if allowed is None or host not in allowed:
        log.warning("association_refused", calling_ae=ae, peer_host=host, reason="calling AE not allowed from this host")
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
        event.assoc.kill()


def handle_accepted(event: Event, tracker: AssociationTracker) -> None:
    tracker.opened(_calling_ae(event))
    log.info("association_accepted", calling_ae=_calling_ae(event), peer_host=event.assoc.requestor.address)


def handle_closed(event: Event, tracker: AssociationTracker, how: str) -> None:
    tracker.closed(_calling_ae(event))
    log.info("association_closed", calling_ae=_calling_ae(event), how=how)


def handle_rejected(event: Event) -> None:
    log.warning("association_rejected", peer_host=event.assoc.requestor.address)


def handle_echo(event: Event) -> int:
    log.info("echo_received", calling_ae=_calling_ae(event))
    return status.SUCCESS


def handle_store(event: Event, ingestor: Ingestor) -> int:
    """C-STORE: hand the request's parts to the ingestor and answer its status."""
    try:
        raw = event.encoded_dataset(include_meta=False)
        ts = UID(event.context.transfer_syntax)
        try:
            ds = event.dataset
        except Exception:
            log.warning("instance_refused", status="cannot_understand", reason="dataset cannot be decoded",
                        calling_ae=_calling_ae(event))
            return status.CANNOT_UNDERSTAND
        req = StoreRequest(
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            transfer_syntax=ts,
            raw=raw,
            dataset=ds,
            calling_ae=_calling_ae(event),
            peer_host=event.assoc.requestor.address,
        )
        code, _ = ingestor.store(req)
        return code
    except Exception as exc:  # never let a bug acknowledge or kill the listener
        log.exception("store_handler_failed", error=exc.__class__.__name__)
        return status.OUT_OF_RESOURCES


def build_ae(cfg: ScpSection) -> AE:
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs cut receive CPU
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = cfg.acse_timeout_s
    ae.dimse_timeout = cfg.dimse_timeout_s
    ae.network_timeout = cfg.network_timeout_s
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def tls_context(cfg: ScpSection) -> ssl.SSLContext | None:
    tls = cfg.tls
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file:
        ctx.load_verify_locations(str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


class StorageSCP:
    """The listener; ``start()`` returns once it accepts connections."""

    def __init__(self, cfg: ScpSection, ingestor: Ingestor, tracker: AssociationTracker | None = None) -> None:
        self.cfg = cfg
        self.ingestor = ingestor
        self.tracker = tracker or AssociationTracker()
        self._server: ThreadedAssociationServer | None = None
        peers: dict[str, set[str]] = {}
        for p in cfg.peers:
            peers.setdefault(p.ae_title, set()).add(p.host)
        # the agent's own tools (strnet echo, health checks) call with its own title, locally only
        peers.setdefault(cfg.ae_title, set()).update({"127.0.0.1", "::1"})
        self._peers = peers

    def _handlers(self) -> list[Any]:
        t = self.tracker
        return [
            (evt.EVT_REQUESTED, handle_requested, [self._peers]),
            (evt.EVT_ACCEPTED, handle_accepted, [t]),
            (evt.EVT_RELEASED, handle_closed, [t, "released"]),
            (evt.EVT_ABORTED, handle_closed, [t, "aborted"]),
            (evt.EVT_REJECTED, handle_rejected),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingestor]),
        ]

    def start(self) -> None:
        ae = build_ae(self.cfg)
        self._server = ae.start_server(
            (self.cfg.bind, self.cfg.port),
            block=False,
            evt_handlers=self._handlers(),
            ssl_context=tls_context(self.cfg),
        )
        log.info("scp_listening", ae_title=self.cfg.ae_title, bind=self.cfg.bind, port=self.port,
                 tls=self.cfg.tls.enabled)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.cfg.port
        return int(self._server.server_address[1])

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let open associations finish for ``grace_s``, then abort the rest.

        A C-STORE interrupted by the abort was never answered Success, so the sender keeps it.
        """
        server = self._server
        if server is None:
            return
        server.shutdown()  # no new connections
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
        self._server = None
        log.info("scp_stopped")
