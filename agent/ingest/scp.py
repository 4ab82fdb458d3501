"""The DICOM listener: Verification, X-ray storage and, when a destination asks for storage
commitment, the reports of that commitment (docs/dicom-conformance.md).

Handlers are plain functions bound to pynetdicom events with their dependencies passed at
binding. Calling AE titles are allowed only from the host each is bound to; everything else is
refused at association, before any data flows.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from agent.compat import pynetdicom_internals
from agent.config import ScpSection
from agent.db.engine import Database
from agent.errors import StorageError, StoreRefused
from agent.ingest import chunked, pdu_reader
from agent.ingest.handlers import Ingestor, StoreRequest, file_head
from agent.ingest.peers import PeerPolicy, normal_address
from agent.ingest.reconcile import split_file
from agent.logging import get_logger
from agent.pacs import commitment, status
from agent.pacs.identity import identify
from agent.queue import cluster
from agent.queue.cluster import NodeScope

log = get_logger(__name__)

STORAGE_SOP_CLASSES = (
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ComputedRadiographyImageStorage,
)

# Accepted and kept, never screened (SKIPPED with a reason): a PACS rule that forwards whole
# studies sends our own SR and overlays back, and refusing them would make it retry forever.
KEPT_NOT_SCREENED_SOP_CLASSES = (
    UID("1.2.840.10008.5.1.4.1.1.88.34"),  # Comprehensive 3D SR
    UID("1.2.840.10008.5.1.4.1.1.88.33"),  # Comprehensive SR
    UID("1.2.840.10008.5.1.4.1.1.88.22"),  # Enhanced SR
    UID("1.2.840.10008.5.1.4.1.1.88.11"),  # Basic Text SR
    UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image
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
    """Which studies each open association has carried: the study-completion sweep waits while
    an association that brought instances of a study is still open (more of it may follow).

    With ``db`` (several agents on one database) each study an association carries is also a row
    of ``open_associations``, removed at release, so an association open on another agent holds
    the SR too; the rows of an agent gone for ``node_timeout_s`` are ignored."""

    def __init__(self, db: Database | None = None, scope: NodeScope | None = None,
                 node_timeout_s: float = 60.0) -> None:  # fmt: skip
        self._lock = threading.Lock()
        self._studies: dict[int, set[str]] = {}  # open association (its id) -> study UIDs it carried
        self.db = db
        self.scope = scope or cluster.SOLO
        self.node_timeout_s = node_timeout_s

    def opened(self, key: int) -> None:
        with self._lock:
            self._studies[key] = set()

    def carried(self, key: int, study_uid: str) -> None:
        """An instance of ``study_uid`` arrived on the association ``key``."""
        with self._lock:
            if key not in self._studies or study_uid in self._studies[key]:
                return
            self._studies[key].add(study_uid)
        if self.db is not None:
            cluster.association_carried(self.db, self.scope, str(key), study_uid)

    def closed(self, key: int) -> None:
        with self._lock:
            carried = self._studies.pop(key, None)
        if self.db is not None and carried:
            try:
                cluster.association_closed(self.db, self.scope, str(key))
            except StorageError as exc:  # the row stays until this agent's next start (or it is gone)
                log.error("association_row_not_removed", error=exc.__class__.__name__)

    def receiving(self, study_uid: str) -> bool:
        """Whether an open association (here, or on another live agent) has carried an instance
        of ``study_uid``."""
        with self._lock:
            if any(study_uid in studies for studies in self._studies.values()):
                return True
        if self.db is None:
            return False
        return cluster.arriving_elsewhere(self.db, self.scope, study_uid, self.node_timeout_s)


def _calling_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def handle_requested(event: Event, peers: PeerPolicy) -> None:
    """Refuse an association whose calling AE title is unknown or comes from another host."""
    primitive = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ: always there when this event fires
    ae = str(primitive.calling_ae_title).strip() if primitive is not None else ""
    host = normal_address(str(event.assoc.requestor.address))
    try:
        allowed = peers.allows(ae, host)
    except Exception as exc:  # noqa: BLE001 - pynetdicom logs and ignores a handler's exception: the caller gets in
        log.error("peer_check_failed", calling_ae=ae, peer_host=host, error=exc.__class__.__name__)
        allowed = False
    if not allowed:
        log.warning(
            "association_refused", calling_ae=ae, peer_host=host, reason="calling AE not allowed from this host"
        )
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
        event.assoc.kill()


def handle_accepted(event: Event, tracker: AssociationTracker) -> None:
    tracker.opened(id(event.assoc))
    log.info("association_accepted", calling_ae=_calling_ae(event), peer_host=event.assoc.requestor.address)


def handle_closed(event: Event, tracker: AssociationTracker, how: str) -> None:
    tracker.closed(id(event.assoc))
    log.info("association_closed", calling_ae=_calling_ae(event), how=how)
    _discard_partials(event)


def handle_rejected(event: Event) -> None:
    """pynetdicom rejected the association itself (a called AE title not ours, the association
    limit): say which, so a wrong PACS node entry and an overloaded agent read differently."""
    rq, rj = event.assoc.requestor.primitive, event.assoc.acceptor.primitive
    log.warning(
        "association_rejected",
        peer_host=event.assoc.requestor.address,
        calling_ae=str(rq.calling_ae_title).strip() if rq is not None else None,
        called_ae=str(rq.called_ae_title).strip() if rq is not None else None,
        result=getattr(rj, "result_str", None),
        source=getattr(rj, "source_str", None),
        reason=getattr(rj, "reason_str", None),
    )


class RecvGuard:
    """Caps what one connection may make pynetdicom buffer (the PDU-length guard), and reads PDUs
    in large pieces.

    pynetdicom reads a PDU of whatever length the peer announces (its reader, and ours, call
    ``recv(pdu_length)``, which keeps appending until that many bytes arrived), and it keeps the
    P-DATA fragments of a DIMSE message in memory until the message is complete. Without a cap a
    peer announcing a 2 GB PDU, or streaming endless fragments, grows the process until it dies.
    Asking for more than ``limit_bytes`` in one read, or receiving more than that since the last
    complete message, raises OSError: pynetdicom treats it as a closed connection (Evt17).

    pynetdicom's own ``recv`` asks the socket for 4 KiB at a time and appends each piece: 2,560
    calls per 10 MB instance, a large share of the receive CPU. Reads of up to ``_DIRECT_MAX``
    bytes (every PDU of a 16 or 128 KiB sender) go straight into one buffer of the announced
    size with ``recv_into``; larger ones keep pynetdicom's growing read, so a peer that announces
    much and sends little never gets a large buffer allocated for it.
    """

    _DIRECT_MAX = 4 << 20

    def __init__(self, recv: Any, limit_bytes: int, raw: Any = None) -> None:
        self._recv = recv
        self._raw = raw  # the connected (possibly TLS) socket pynetdicom reads from
        self.limit_bytes = limit_bytes
        self.since_message = 0

    def __call__(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.limit_bytes or self.since_message + nr_bytes > self.limit_bytes:
            log.warning("connection_closed_pdu_too_large", announced_bytes=nr_bytes, limit_bytes=self.limit_bytes)
            raise OSError("PDU or message larger than the configured maximum")
        if self._raw is not None and nr_bytes <= self._DIRECT_MAX:
            data = self._read_direct(nr_bytes)
        else:
            data = self._recv(nr_bytes)
        self.since_message += len(data)
        return data

    def _read_direct(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the socket, or fewer if the peer closed (as pynetdicom's ``recv``);
        a timeout or reset raises OSError, as there."""
        buf = bytearray(nr_bytes)
        got = 0
        with memoryview(buf) as view:
            while got < nr_bytes:
                n = self._raw.recv_into(view[got:])
                if not n:
                    break
                got += n
        if got < nr_bytes:
            del buf[got:]
        return buf

    def message_done(self) -> None:
        self.since_message = 0


def handle_conn_open(event: Event, limit_bytes: int, network_timeout_s: float, peers: PeerPolicy | None) -> None:
    """Install the RecvGuard on the new connection's socket, before any PDU is read.

    Also give the accepted socket a timeout: pynetdicom leaves it blocking, so a peer that sends
    half a PDU and then nothing would hold its thread forever inside ``recv``. With the timeout
    the read fails after ``network_timeout_s`` and pynetdicom closes the connection.
    """
    orphans = chunked.discard_orphans()  # cheap: a walk over the transfers in progress
    if orphans:
        log.warning("partial_instance_discarded", files=orphans, reason="association ended abnormally")
    sock = event.assoc.dul.socket
    if sock is None:
        return
    raw = getattr(sock, "socket", None)
    if raw is not None:
        raw.settimeout(network_timeout_s)
        address = getattr(event, "address", None)
        host = normal_address(str(address[0]) if address else "")  # an IPv4 peer on a dual-stack socket
        try:
            known = peers is None or peers.known(host)
        except Exception as exc:  # noqa: BLE001 - fail closed: pynetdicom would ignore the exception and go on
            log.error("peer_check_failed", peer_host=host, error=exc.__class__.__name__)
            known = False
        if not known:
            # a host no peer is bound to: shut the connection now, so idle connections from elsewhere
            # cannot hold association slots (pynetdicom counts them) until the ACSE timeout
            log.warning("connection_refused", peer_host=host, reason="host not on the peer allow-list")
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            # the acceptor thread would otherwise wait the whole ACSE timeout for a request that never comes
            event.assoc.acse_timeout = 0.01
    if not isinstance(getattr(sock, "recv", None), RecvGuard):
        pynetdicom_internals.replace_socket_recv(sock, RecvGuard(sock.recv, limit_bytes, raw))
    pdu_reader.install(event.assoc.dul)  # P-DATA values as views of the received buffer


def pdu_limit_bytes(max_instance_mb: int) -> int:
    """What one connection may make pynetdicom buffer for one message (``RecvGuard``)."""
    return (2 * max_instance_mb + 1) * 1024 * 1024


def guard_requested_connection(event: Event, limit_bytes: int, network_timeout_s: float) -> None:
    """The same PDU-length guard (``RecvGuard``) on a connection the agent opens to receive on it:
    the sweep's C-GET association, on which the archive sends the instances (agent/pacs/qr.py).
    pynetdicom leaves such a socket without a timeout once connected: it gets ``network_timeout_s``.
    The C-STORE handler of that association calls ``message_received`` after each instance."""
    sock = event.assoc.dul.socket
    if sock is None:
        return
    raw = getattr(sock, "socket", None)
    if raw is not None:
        raw.settimeout(network_timeout_s)
    if not isinstance(getattr(sock, "recv", None), RecvGuard):
        pynetdicom_internals.replace_socket_recv(sock, RecvGuard(sock.recv, limit_bytes, raw))


def message_received(event: Event) -> None:
    """A whole DIMSE message arrived on a guarded connection: its count starts again."""
    _message_done(event)


def handle_conn_close(event: Event) -> None:
    _discard_partials(event)


def _discard_partials(event: Event) -> None:
    """A transfer cut off mid-instance was never acknowledged: delete what it left in spool/tmp
    (on release, abort or connection close: whichever pynetdicom reports for this association)."""
    removed = chunked.discard(event.assoc)
    if removed:
        log.warning("partial_instance_discarded", files=removed, calling_ae=_calling_ae(event))


def _message_done(event: Event) -> None:
    sock = getattr(event.assoc.dul, "socket", None)
    guard = getattr(sock, "recv", None)
    if isinstance(guard, RecvGuard):
        guard.message_done()


def handle_echo(event: Event) -> int:
    _message_done(event)
    log.info("echo_received", calling_ae=_calling_ae(event))
    return status.SUCCESS


def inflate_capped(raw: bytes, max_bytes: int) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset, refusing output beyond ``max_bytes``.

    pynetdicom's ``event.dataset`` calls ``zlib.decompress`` without a limit: a few kilobytes can
    expand to gigabytes (a deflate bomb). Refused with out of resources, like an oversized instance.
    """
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(raw, max_bytes + 1)
    except zlib.error:
        raise StoreRefused(status.CANNOT_UNDERSTAND, "deflated dataset cannot be inflated") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise StoreRefused(status.OUT_OF_RESOURCES, "inflated dataset larger than the configured maximum")
    return out


def _decode(raw: bytes, ts: UID, max_bytes: int) -> Any:
    if ts == DeflatedExplicitVRLittleEndian:
        # decode the capped inflation ourselves (pynetdicom's event.dataset inflates without limit)
        return decode_dataset(BytesIO(inflate_capped(raw, max_bytes)), False, True)
    return decode_dataset(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian)


def _received(event: Event) -> tuple[Path | None, bytes]:
    """(file the dataset was received into, the dataset's bytes): chunked receive or in memory."""
    path = getattr(event, "dataset_path", None)  # a Path with chunked receive (None, or absent, without)
    if isinstance(path, Path):
        spooling = chunked.receiving(path)
        if spooling is not None:  # the bytes are still in memory: no read-back
            return path, spooling.data()
        _head, raw = split_file(path.read_bytes())  # a file pynetdicom wrote itself
        return path, raw
    return None, event.encoded_dataset(include_meta=False)


def spool_head(meta: Any, thread: Any) -> bytes:
    """Our file meta for a dataset pynetdicom is receiving into a file (see ``chunked``)."""
    requestor = getattr(chunked.association_of(thread), "requestor", None)
    calling = str(getattr(requestor, "ae_title", "") or "").strip()
    return file_head(
        str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID), calling
    )


def handle_store(event: Event, ingestor: Ingestor, tracker: AssociationTracker | None = None) -> int:
    """C-STORE: hand the request's parts to the ingestor and answer its status."""
    _message_done(event)
    try:
        try:
            received, raw = _received(event)
        except OSError as exc:  # the spool could not take the fragments (disk full, I/O error)
            log.error("instance_not_kept", reason=f"spool write failed: {exc.strerror}", calling_ae=_calling_ae(event))
            return status.OUT_OF_RESOURCES
        ts = UID(event.context.transfer_syntax)
        try:
            ds = _decode(raw, ts, ingestor.max_instance_bytes)
        except StoreRefused as exc:
            log.warning(
                "instance_refused", status=status.name(exc.status), reason=exc.reason, calling_ae=_calling_ae(event)
            )
            return exc.status
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for a dataset it cannot decode
            log.warning(
                "instance_refused",
                status="cannot_understand",
                reason="dataset cannot be decoded",
                calling_ae=_calling_ae(event),
            )
            return status.CANNOT_UNDERSTAND
        request = cast(C_STORE, event.request)  # EVT_C_STORE carries a C-STORE request
        req = StoreRequest(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax=ts,
            raw=raw,
            dataset=ds,
            calling_ae=_calling_ae(event),
            peer_host=event.assoc.requestor.address,
            received=received,
        )
        if tracker is not None:  # before the job row: the sweep must not see the study as quiet
            tracker.carried(id(event.assoc), str(ds.get("StudyInstanceUID", "")))
        code, _ = ingestor.store(req)
        return code
    except Exception as exc:  # never let a bug acknowledge or kill the listener
        log.exception("store_handler_failed", error=exc.__class__.__name__)
        return status.OUT_OF_RESOURCES


def handle_commitment_report(event: Event, recorder: commitment.CommitmentRecorder) -> tuple[int, Any]:
    """N-EVENT-REPORT of the Storage Commitment Push Model on an association the PACS opened to us:
    recorded by its Transaction UID (``CommitmentRecorder``), answered Success once recorded."""
    _message_done(event)
    return recorder.handle(event)


def build_ae(cfg: ScpSection, commitment_reports: bool = False) -> AE:
    ae = identify(AE(ae_title=cfg.ae_title))
    ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs cut receive CPU
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = cfg.acse_timeout_s
    ae.dimse_timeout = cfg.dimse_timeout_s
    ae.network_timeout = cfg.network_timeout_s
    ae.require_called_aet = True
    ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    for sop_class in (*STORAGE_SOP_CLASSES, *KEPT_NOT_SCREENED_SOP_CLASSES):
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if commitment_reports:
        # the PACS proposes itself as SCP (role selection): accepted, the agent being the SCU; a
        # proposal without role selection is accepted with the default roles
        ae.add_supported_context(
            commitment.STORAGE_COMMITMENT_PUSH_MODEL, commitment.TRANSFER_SYNTAXES, scu_role=False, scp_role=True
        )
    return ae


class DeferredHandshakeContext:
    """Hands pynetdicom's server an SSL context whose handshake runs in the connection's thread.

    pynetdicom wraps each accepted socket with ``ssl_context.wrap_socket(sock, server_side=True)``
    inside the accept loop, so the TLS handshake ran there: one client that connects and sends
    nothing would stall every other connection. Here the socket gets the network timeout and the
    handshake is deferred to the first read, in the association's own thread (a failed or slow
    handshake then only closes that connection).
    """

    def __init__(self, ctx: ssl.SSLContext, timeout_s: float) -> None:
        self.ctx = ctx
        self.timeout_s = timeout_s

    def wrap_socket(self, sock: Any, server_side: bool = True, **_: Any) -> ssl.SSLSocket:
        sock.settimeout(self.timeout_s)
        return self.ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)


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

    def __init__(
        self,
        cfg: ScpSection,
        ingestor: Ingestor,
        tracker: AssociationTracker | None = None,
        commitment_reports: commitment.CommitmentRecorder | None = None,
    ) -> None:
        """``commitment_reports``: accept storage commitment reports and record them (a destination
        asks for storage commitment)."""
        self.cfg = cfg
        self.ingestor = ingestor
        self.tracker = tracker or AssociationTracker()
        self.commitment_reports = commitment_reports
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        peers: dict[str, set[str]] = {}
        for p in cfg.peers:
            peers.setdefault(p.ae_title, set()).add(p.host)
        # the agent's own tools (strnet echo, health checks) call with its own title, locally only
        peers.setdefault(cfg.ae_title, set()).update({"127.0.0.1", "::1"})
        self._peers = PeerPolicy(peers)

    def _handlers(self) -> list[Any]:
        t = self.tracker
        # the most one PDU or message may make us buffer: an instance up to twice the size cap still gets
        # its clear 0xA700 answer from the ingestor; anything beyond is cut off at the socket
        limit = pdu_limit_bytes(self.cfg.max_instance_mb)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, handle_conn_open, [limit, self.cfg.network_timeout_s, self._peers]),
            (evt.EVT_CONN_CLOSE, handle_conn_close),
            (evt.EVT_REQUESTED, handle_requested, [self._peers]),
            (evt.EVT_ACCEPTED, handle_accepted, [t]),
            (evt.EVT_RELEASED, handle_closed, [t, "released"]),
            (evt.EVT_ABORTED, handle_closed, [t, "aborted"]),
            (evt.EVT_REJECTED, handle_rejected),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingestor, t]),
        ]
        if self.commitment_reports is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, handle_commitment_report, [self.commitment_reports]))
        return handlers

    def _ssl_context(self) -> Any:
        ctx = tls_context(self.cfg)
        return None if ctx is None else DeferredHandshakeContext(ctx, self.cfg.network_timeout_s)

    def start(self) -> None:
        ae = build_ae(self.cfg, commitment_reports=self.commitment_reports is not None)
        # datasets arrive straight into the spool's tmp folder, written back to disk as they come
        chunked.receive_into(ae, self.ingestor.spool.tmp_dir, spool_head)
        self._ae = ae
        self._server = ae.start_server(
            (self.cfg.bind, self.cfg.port),
            block=False,
            evt_handlers=self._handlers(),
            ssl_context=self._ssl_context(),
        )
        log.info(
            "scp_listening", ae_title=self.cfg.ae_title, bind=self.cfg.bind, port=self.port, tls=self.cfg.tls.enabled
        )

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
        if self._ae is not None:
            chunked.stop_receiving(self._ae)
            self._ae = None
        log.info("scp_stopped")
