"""A raw-socket DICOM peer: exact PDU bytes, for malformed and hostile input (PS3.8 section 9.3).

Built from pynetdicom's own PDU and DIMSE encoders, so the valid parts are byte-exact and the
tests mutate only what they mean to.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO

from conftest import AGENT_AET, TEST_SCU_AET
from dicom_factory import DX_PRESENTATION
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def associate_rq(calling: str = TEST_SCU_AET, called: str = AGENT_AET) -> bytes:
    """A-ASSOCIATE-RQ: context 1 Verification, context 3 DX For Presentation (explicit VR LE)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    contexts = []
    for cid, sop in ((1, VERIFICATION), (3, DX_PRESENTATION)):
        cx = build_context(sop, [ExplicitVRLittleEndian])
        cx.context_id = cid
        contexts.append(cx)
    prim.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 0
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    prim.user_information = [ml, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def p_data(context_id: int, payload: bytes, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU holding one PDV."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IB", len(payload) + 2, context_id) + bytes([header]) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def echo_pdus(message_id: int = 1) -> bytes:
    prim = C_ECHO()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = VERIFICATION
    msg = C_ECHO_RQ()
    msg.primitive_to_message(prim)
    return p_data(1, bytes(encode(msg.command_set, True, True)), True, True)


def store_command(ds: Dataset, message_id: int = 1) -> bytes:
    """The encoded C-STORE-RQ command set (implicit VR LE) for ``ds``."""
    prim = C_STORE()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 2
    prim.DataSet = BytesIO(b"\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    return bytes(encode(msg.command_set, True, True))


def encode_dataset(ds: Dataset) -> bytes:
    out = encode(ds, False, True)
    assert out is not None
    return bytes(out)


def store_pdus(ds: Dataset, dataset_bytes: bytes | None = None, message_id: int = 1) -> bytes:
    """A whole C-STORE-RQ: command PDU, then the dataset in one PDU (context 3)."""
    body = encode_dataset(ds) if dataset_bytes is None else dataset_bytes
    return p_data(3, store_command(ds, message_id), True, True) + p_data(3, body, False, True)


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """(type, body) of the next PDU, or None when the peer closed the connection."""
    head = _read_exact(sock, 6)
    if head is None:
        return None
    pdu_type, _, length = struct.unpack(">BBI", head)
    body = _read_exact(sock, length)
    if body is None:
        return None
    return pdu_type, body


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except (ConnectionResetError, TimeoutError, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def dimse_status(body: bytes) -> int | None:
    """The Status (0000,0900) in a P-DATA-TF body holding a command response, else None."""
    from pydicom.filereader import read_dataset

    # PDV: length(4) context(1) header(1) then the command set
    ds = read_dataset(BytesIO(body[6:]), True, True)
    return int(ds.Status) if "Status" in ds else None


def connect(port: int, timeout_s: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    return s


def open_association(port: int, timeout_s: float = 10.0) -> socket.socket:
    """A connected socket with an accepted association (asserts the A-ASSOCIATE-AC)."""
    s = connect(port, timeout_s)
    s.sendall(associate_rq())
    pdu = read_pdu(s)
    assert pdu is not None and pdu[0] == 0x02, f"association not accepted: {pdu and pdu[0]}"
    return s


def echo_ok(port: int) -> bool:
    """A fresh association, C-ECHO answered Success, released."""
    s = open_association(port)
    try:
        s.sendall(echo_pdus())
        pdu = read_pdu(s)
        ok = pdu is not None and pdu[0] == 0x04 and dimse_status(pdu[1]) == 0
        s.sendall(A_RELEASE_RQ)
        read_pdu(s)
        return ok
    finally:
        s.close()


def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """True when the peer closes (or aborts) the connection within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            if data[:1] == b"\x07":  # A-ABORT: the close follows
                continue
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
