"""agent/ingest/pdu_reader.py: pynetdicom's PDU reader without the copies, same events.

The end-to-end proof (DCMTK and pynetdicom peers, every transfer syntax, spool file equal to the
sent dataset) is in tests/loopback; malformed PDUs are fuzzed in tests/reliability/test_fuzz.py.
These tests pin the reader's own contract with a real socket pair and pynetdicom's own DUL provider
(of an association never started); what they see of its internals, they see through
agent/compat/pynetdicom_internals.py.
"""

from __future__ import annotations

import queue
import socket
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu import A_RELEASE_RQ

from agent.compat.pynetdicom_internals import (
    EVT_CONNECTION_CLOSED,
    EVT_INVALID_PDU,
    EVT_P_DATA_TF,
    EVT_RELEASE_RQ,
    take_received_pdu,
)
from agent.ingest.pdu_reader import MalformedPdu, read_pdu, split_pdvs
from agent.ingest.scp import RecvGuard


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def fake_dul(sock: socket.socket) -> Any:
    """pynetdicom's DUL provider of an association that is never started, reading from ``sock``."""
    dul = Association(AE(), "acceptor").dul
    dul.socket = SimpleNamespace(recv=RecvGuard(None, limit_bytes=1 << 20, raw=sock))
    return dul


def no_pdu_queued(dul: Any) -> bool:
    try:
        take_received_pdu(dul)
    except queue.Empty:
        return True
    return False


def test_split_pdvs_gives_views_of_each_value() -> None:
    body = memoryview(bytearray(pdv(1, 0x03, b"command") + pdv(3, 0x00, b"x" * 1000)))
    items = split_pdvs(body)
    assert [(cid, bytes(v)) for cid, v in items] == [(1, b"\x03command"), (3, b"\x00" + b"x" * 1000)]
    assert all(isinstance(v, memoryview) and v.obj is body.obj for _, v in items)  # no copies


@pytest.mark.parametrize(
    "body",
    [
        pdv(1, 0, b"abc")[:-1],  # item runs past the PDU
        struct.pack(">LB", 1, 1),  # too short for a context ID and a control byte
        pdv(1, 0, b"abc") + b"\x00\x00\x00",  # a trailing fragment of a header
    ],
)
def test_split_pdvs_refuses_items_that_do_not_add_up(body: bytes) -> None:
    with pytest.raises(MalformedPdu):
        split_pdvs(memoryview(body))


def test_p_data_becomes_evt10_and_a_primitive_of_views() -> None:
    a, b = socket.socketpair()
    dul = fake_dul(b)
    a.sendall(pdu(0x04, pdv(1, 0x02, b"fragment")))
    read_pdu(dul)
    assert dul.event_queue.get_nowait() == EVT_P_DATA_TF
    primitive = take_received_pdu(dul).to_primitive()
    [(cid, value)] = primitive.presentation_data_value_list
    assert cid == 1 and bytes(value) == b"\x02fragment" and value[0] == 0x02
    a.close(), b.close()


def test_other_pdus_go_through_pynetdicoms_decoder() -> None:
    a, b = socket.socketpair()
    dul = fake_dul(b)
    a.sendall(A_RELEASE_RQ().encode())
    read_pdu(dul)
    assert dul.event_queue.get_nowait() == EVT_RELEASE_RQ
    assert isinstance(take_received_pdu(dul), A_RELEASE_RQ)
    a.close(), b.close()


@pytest.mark.parametrize(
    ("wire", "event"),
    [
        (pdu(0x09, b"zz"), EVT_INVALID_PDU),  # unknown PDU type
        (pdu(0x04, pdv(1, 0, b"abc")[:-1]), EVT_INVALID_PDU),  # malformed P-DATA-TF
        (pdu(0x04, pdv(1, 0, b"abcdef"))[:-3], EVT_CONNECTION_CLOSED),  # the peer closes mid-PDU
        (b"\x04\x00", EVT_CONNECTION_CLOSED),  # ... or mid-header
    ],
)
def test_broken_input_gives_pynetdicoms_events(wire: bytes, event: str) -> None:
    a, b = socket.socketpair()
    dul = fake_dul(b)
    a.sendall(wire)
    a.close()
    read_pdu(dul)
    assert dul.event_queue.get_nowait() == event and no_pdu_queued(dul)
    b.close()


def test_p_data_already_waiting_is_merged_up_to_the_end_of_the_message() -> None:
    """Fragments waiting on the socket join the first P-DATA-TF as one primitive; the PDU with
    the data set's last fragment (control bit 1) ends the run, and the next message stays unread."""
    a, b = socket.socketpair()
    dul = fake_dul(b)
    a.sendall(
        pdu(0x04, pdv(1, 0x00, b"one"))
        + pdu(0x04, pdv(1, 0x00, b"two") + pdv(1, 0x00, b"three"))
        + pdu(0x04, pdv(1, 0x02, b"last"))
        + pdu(0x04, pdv(1, 0x03, b"next command"))
    )
    read_pdu(dul)
    assert dul.event_queue.get_nowait() == EVT_P_DATA_TF and dul.event_queue.empty()
    values = [bytes(v) for _, v in take_received_pdu(dul).to_primitive().presentation_data_value_list]
    assert values == [b"\x00one", b"\x00two", b"\x00three", b"\x02last"]
    read_pdu(dul)  # the next message, on its own
    assert dul.event_queue.get_nowait() == EVT_P_DATA_TF
    [(_, value)] = take_received_pdu(dul).to_primitive().presentation_data_value_list
    assert bytes(value) == b"\x03next command"
    a.close(), b.close()


@pytest.mark.parametrize(
    ("after", "event"),
    [
        (A_RELEASE_RQ().encode(), EVT_RELEASE_RQ),  # another PDU type: decoded and queued after it
        (pdu(0x04, pdv(1, 0, b"abc")[:-1]), EVT_INVALID_PDU),  # a malformed P-DATA-TF
        (pdu(0x04, pdv(1, 0, b"abcdef"))[:-3], EVT_CONNECTION_CLOSED),  # the peer closes mid-PDU
    ],
)
def test_what_follows_a_merged_run_is_queued_after_it_in_order(after: bytes, event: str) -> None:
    a, b = socket.socketpair()
    dul = fake_dul(b)
    a.sendall(pdu(0x04, pdv(1, 0x00, b"one")) + pdu(0x04, pdv(1, 0x00, b"two")) + after)
    if event == EVT_CONNECTION_CLOSED:
        a.close()
    read_pdu(dul)
    assert [dul.event_queue.get_nowait(), dul.event_queue.get_nowait()] == [EVT_P_DATA_TF, event]
    values = [bytes(v) for _, v in take_received_pdu(dul).to_primitive().presentation_data_value_list]
    assert values == [b"\x00one", b"\x00two"]
    assert no_pdu_queued(dul) == (event != EVT_RELEASE_RQ)
    b.close()
