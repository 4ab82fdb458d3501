"""Read incoming PDUs for pynetdicom's DUL thread without copying the data four more times.

pynetdicom's ``DULServiceProvider._read_pdu_data`` appends the PDU body to a bytearray (copy),
turns it into ``bytes`` to decode it (copy), slices each PDV item out of it (copy) and its value
out of the item (copy), and ``decode_msg`` slices the control byte off (copy): five passes over
every byte of a 10 MB instance on the receiving thread. ``read_pdu`` stands in for it on our
SCP's connections (``install``): the body is read once into a buffer of the announced length
(``RecvGuard``) and the P-DATA-TF values handed on as views of that buffer, down to the spool
file's writer. Every other PDU type goes through pynetdicom's own decoder.

The state machine sees what it saw before: the same events (``EVT_P_DATA_TF`` for P-DATA-TF,
``EVT_CONNECTION_CLOSED`` when the connection breaks, ``EVT_INVALID_PDU`` for an unknown or
malformed PDU) and a PDU object whose ``to_primitive`` gives the P-DATA primitive. Two things
differ, both stricter or quieter: a PDV item whose length runs past its PDU, or that is too short
to hold a context ID and a control byte, is a malformed PDU (``EVT_INVALID_PDU``, the association
is aborted) where pynetdicom would truncate it or fail later in another thread; and P-DATA-TF PDUs
do not fire ``EVT_DATA_RECV`` / ``EVT_PDU_RECV`` (our SCP binds neither; they exist for debug
logging).

What this takes of pynetdicom's internals (the DUL's PDU queue and decoder, the state machine's
event names, a P-DATA primitive holding views) goes through agent/compat/pynetdicom_internals.py.
"""

from __future__ import annotations

import select
import struct
from typing import Any

from pynetdicom.pdu_primitives import P_DATA

from agent.compat import pynetdicom_internals, warn_once
from agent.compat.pynetdicom_internals import EVT_CONNECTION_CLOSED, EVT_INVALID_PDU, EVT_P_DATA_TF
from agent.logging import get_logger

log = get_logger(__name__)

_HEADER = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
_P_DATA_TF = 0x04
_KNOWN_TYPES = frozenset(range(0x01, 0x08))


class MalformedPdu(ValueError):
    """A P-DATA-TF body whose items do not add up."""


class ReceivedPData:
    """A received P-DATA-TF PDU as the state machine uses it (``to_primitive``)."""

    __slots__ = ("items",)

    def __init__(self, items: list[list[Any]]) -> None:
        self.items = items  # [context ID, value view (control byte first)] per PDV

    def to_primitive(self) -> P_DATA:
        return pynetdicom_internals.pdata_primitive_from_views(self.items)


def split_pdvs(body: memoryview) -> list[list[Any]]:
    """The ``[context ID, value]`` of each PDV item of a P-DATA-TF body; values are views.

    Raises MalformedPdu when an item is cut short or runs past the body.
    """
    items: list[list[Any]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise MalformedPdu("PDV item shorter than its header")
        (length,) = _ITEM_LENGTH.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise MalformedPdu(f"PDV item length {length} does not fit the PDU")
        items.append([body[offset + 4], body[offset + 5 : offset + 4 + length]])
        offset += 4 + length
    return items


#: P-DATA-TF PDUs handed on as one primitive, at most (1 MiB of a 16 KiB sender's), and their
#: bytes: a peer sending large PDUs has no more than this held before the spool writer gets it
MAX_MERGED = 64
MAX_MERGED_BYTES = 1 << 20


def _read_one(sock: Any) -> tuple[int, bytes, bytes] | str:
    """One PDU from ``sock`` as (type, header, body), or the event its failure raises."""
    try:
        head = sock.recv(6)
    except OSError:  # timeouts included
        return EVT_CONNECTION_CLOSED
    if len(head) != 6:
        return EVT_CONNECTION_CLOSED
    pdu_type, _, length = _HEADER.unpack(head)
    if pdu_type not in _KNOWN_TYPES:
        return EVT_INVALID_PDU
    try:
        body = sock.recv(length)
    except OSError:
        return EVT_CONNECTION_CLOSED
    if len(body) != length:  # the peer closed mid-PDU
        return EVT_CONNECTION_CLOSED
    return pdu_type, head, body


def _more_waiting(sock: Any) -> bool:
    """Bytes of a next PDU already received (never blocks; False where it cannot tell)."""
    raw = getattr(getattr(sock, "recv", None), "_raw", None)  # RecvGuard's connected socket
    if raw is None:
        return False
    try:
        pending = getattr(raw, "pending", None)  # TLS: decrypted bytes select() cannot see
        return bool((pending is not None and pending()) or select.select([raw], [], [], 0)[0])
    except (OSError, ValueError):  # closed meanwhile: the next read reports it
        return False


def _ends_message(items: list[list[Any]]) -> bool:
    # control byte bit 1: the last fragment of a command or data set
    return any(value[0] & 0x02 for _, value in items)


def _queue_other(dul: Any, head: bytes, body: bytes) -> None:
    try:
        pdu, event = pynetdicom_internals.decode_pdu(dul, bytearray(head) + body)
    except Exception:  # noqa: BLE001 - pynetdicom's reader treats any decode failure so
        dul.event_queue.put(EVT_INVALID_PDU)
        return
    dul.event_queue.put(event)
    pynetdicom_internals.put_received_pdu(dul, pdu)


def read_pdu(dul: Any) -> None:
    """Read one PDU from ``dul.socket`` and queue its event and PDU, as pynetdicom's reader does.

    A P-DATA-TF whose message goes on is joined by the P-DATA-TF PDUs already waiting on the
    socket (up to ``MAX_MERGED`` PDUs or ``MAX_MERGED_BYTES``), handed on as one primitive of all
    their PDV items: the state machine, the DIMSE decoder and the DUL loop then run once per batch
    instead of once per PDU (640 PDUs per 10 MB instance from a 16 KiB sender such as Orthanc).
    Merging stops after the
    PDU that ends a command or data set, so no primitive carries PDVs past the end of a message
    (pynetdicom's decoder returns at that end and would drop them). What follows a merged run (a
    PDU of another type, a malformed one, a closed connection) is queued after it, in order.
    """
    sock = dul.socket
    got = _read_one(sock)
    if isinstance(got, str):
        dul.event_queue.put(got)
        return
    pdu_type, head, body = got
    if pdu_type != _P_DATA_TF:
        _queue_other(dul, head, body)
        return
    try:
        items = split_pdvs(memoryview(body))
    except MalformedPdu:
        dul.event_queue.put(EVT_INVALID_PDU)
        return
    after: str | tuple[bytes, bytes] | None = None
    last, merged, size = items, 1, len(body)
    while merged < MAX_MERGED and size < MAX_MERGED_BYTES and not _ends_message(last) and _more_waiting(sock):
        got = _read_one(sock)
        if isinstance(got, str):
            after = got
            break
        pdu_type, head, body = got
        if pdu_type != _P_DATA_TF:
            after = (head, body)
            break
        try:
            last = split_pdvs(memoryview(body))
        except MalformedPdu:
            after = EVT_INVALID_PDU
            break
        items += last
        merged += 1
        size += len(body)
    dul.event_queue.put(EVT_P_DATA_TF)
    pynetdicom_internals.put_received_pdu(dul, ReceivedPData(items))
    if isinstance(after, str):
        dul.event_queue.put(after)
    elif after is not None:
        _queue_other(dul, *after)


def install(dul: Any) -> bool:
    """Make ``dul`` (one connection's DUL provider) read its PDUs with ``read_pdu``; returns whether
    it does. Where pynetdicom's provider lacks what the reader relies on, the connection keeps
    pynetdicom's own reader (correct, slower) and the first such connection logs
    ``library_patch_missing``."""
    missing = pynetdicom_internals.install_pdu_reader(dul, read_pdu)
    if missing is None:
        return True
    warn_once(log, missing)
    return False
