"""Bad and hostile input on the DICOM port: each case names its expected status or behaviour.

Together with tests/loopback/test_scp_pynetdicom.py (UIDs with traversal/shell characters or
over 64 characters, truncated pixels and streams, missing series UID, command/dataset mismatch,
unknown/wrong AE titles and hosts, unsupported SOP class, watermark, oversized, duplicates and
conflicts) these are the cases listed in docs/reliability.md. Most run against an in-process
agent on loopback; the memory and file-descriptor cases run against a `strnet serve` process.
"""

from __future__ import annotations

import copy
import re
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import AGENT_AET, TEST_SCU_AET, require_tool
from dicom_factory import DX_PRESENTATION, compressed, knee_dx, write
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from raw_dicom import (
    A_ABORT,
    A_RELEASE_RQ,
    associate_rq,
    closed_within,
    connect,
    dimse_status,
    encode_dataset,
    open_association,
    p_data,
    read_pdu,
    store_command,
    store_pdus,
)
from rel_helpers import associate, open_fds, rss_kb, serve_config, store_all, wait_until
from screening_helpers import wait_for
from serve_fork import ServeFork
from sqlalchemy import select

from agent.app import Agent
from agent.db.models import Instance, Study
from agent.domain import JobState
from agent.pacs import status
from agent.queue.store import list_jobs

SPOOL_NAME = re.compile(r"^\d{8}/[0-9a-f]{32}\.dcm$")


# -- helpers -----------------------------------------------------------------------------------
def send_one(agent: Agent, ds: Dataset, contexts: list[str] | None = None) -> int | None:
    """One C-STORE in its own association; None when not answered (or not even associated)."""
    ae = AE(ae_title=TEST_SCU_AET)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.add_requested_context(DX_PRESENTATION, contexts or [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", agent.scp.port, ae_title=AGENT_AET)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release() if assoc.is_established else assoc.abort()


def spool_files(agent: Agent) -> list[str]:
    root = agent.spool.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def still_serves(agent: Agent) -> None:
    """The agent stores the next valid instance (the property every hostile case must keep)."""
    before = len(list_jobs(agent.db))
    assert send_one(agent, knee_dx(rows=64, cols=64)) == status.SUCCESS
    assert len(list_jobs(agent.db)) == before + 1


def nothing_kept(agent: Agent) -> None:
    assert list_jobs(agent.db) == []
    # a transfer cut off mid-instance leaves its partial file until the agent has processed the
    # connection's close (just after the peer sees it): allow that moment, then insist
    deadline = time.monotonic() + 5.0
    while spool_files(agent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_files(agent) == []


@pytest.fixture()
def permissive_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Play a non-conforming peer: pynetdicom's SCU would refuse to send bad values itself."""
    import pynetdicom._config as pconf

    for vr in ("UI", "PN", "LO", "SH", "CS"):
        monkeypatch.setitem(pconf.VALIDATORS, vr, lambda value: (True, ""))


def send_raw_dataset(agent: Agent, ds: Dataset, body: bytes, ts: str = ExplicitVRLittleEndian) -> int | None:
    """C-STORE with ``ds``'s command and ``body`` as the dataset bytes (a lying encoder)."""
    import pynetdicom.association as pa

    real = pa.encode
    pa.encode = lambda *a, **k: body
    try:
        return send_one(agent, ds, [ts])
    finally:
        pa.encode = real


@pytest.fixture()
def quick(make_agent: Any) -> Agent:
    """An agent with short ACSE and network timeouts: a peer left hanging is closed within seconds."""
    return make_agent(scp={"acse_timeout_s": 1.0, "network_timeout_s": 2.0})


# -- association level ---------------------------------------------------------------------------
def test_unknown_calling_ae_is_rejected_as_calling_ae_not_recognised(agent: Agent) -> None:
    s = connect(agent.scp.port)
    try:
        s.sendall(associate_rq(calling="INTRUDER"))
        pdu = read_pdu(s)
        assert pdu is not None and pdu[0] == 0x03  # A-ASSOCIATE-RJ
        assert pdu[1][1:4] == b"\x01\x01\x03"  # permanent, service user, calling AE not recognised
    finally:
        s.close()
    nothing_kept(agent)


def test_spoofed_calling_ae_in_another_case_is_rejected(agent: Agent) -> None:
    # AE titles are case-sensitive: "testscu" is not the allowed "TESTSCU"
    assert associate(agent.scp.port, calling=TEST_SCU_AET.lower()).is_rejected
    nothing_kept(agent)


def test_wrong_called_ae_is_rejected_as_called_ae_not_recognised(agent: Agent) -> None:
    s = connect(agent.scp.port)
    try:
        s.sendall(associate_rq(called="PACS_MAIN"))
        pdu = read_pdu(s)
        assert pdu is not None and pdu[0] == 0x03 and pdu[1][1:4] == b"\x01\x01\x07"
    finally:
        s.close()


def test_association_flood_past_the_limit_is_rejected_local_limit_exceeded(make_agent: Any) -> None:
    agent = make_agent(scp={"max_associations": 2})
    held = [open_association(agent.scp.port) for _ in range(2)]
    try:
        s = connect(agent.scp.port)
        s.sendall(associate_rq())
        pdu = read_pdu(s)
        s.close()
        assert pdu is not None and pdu[0] == 0x03
        assert pdu[1][1:4] == b"\x02\x03\x02"  # transient, service provider (presentation), local limit
    finally:
        for h in held:
            h.sendall(A_RELEASE_RQ)
            read_pdu(h)
            h.close()
    wait_until(lambda: send_one(agent, knee_dx(rows=64, cols=64)) == status.SUCCESS, 10, "a slot to free up", 0.3)


def test_slow_peer_that_sends_nothing_is_closed_after_acse_timeout(make_agent: Any) -> None:
    agent = make_agent(scp={"acse_timeout_s": 1.0})
    s = connect(agent.scp.port)
    t0 = time.monotonic()
    try:
        assert closed_within(s, 10), "an idle connection was kept open"
    finally:
        s.close()
    assert time.monotonic() - t0 >= 0.9  # not closed before the timeout: the timeout closed it
    still_serves(agent)


def test_slow_peer_idle_inside_an_association_is_closed_after_network_timeout(make_agent: Any) -> None:
    agent = make_agent(scp={"network_timeout_s": 1.5})
    s = open_association(agent.scp.port)
    try:
        assert closed_within(s, 15), "an idle association was kept open"
    finally:
        s.close()
    still_serves(agent)


def test_slow_peer_stalling_inside_a_pdu_is_closed(make_agent: Any) -> None:
    # half an A-ASSOCIATE-RQ, then silence: the read of the rest must time out, not wait forever
    agent = make_agent(scp={"acse_timeout_s": 1.0, "network_timeout_s": 1.5})
    rq = associate_rq()
    s = connect(agent.scp.port)
    try:
        s.sendall(rq[: len(rq) // 2])
        assert closed_within(s, 15), "a stalled PDU held the connection"
    finally:
        s.close()
    still_serves(agent)


def _connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_idle_connection_flood_from_a_host_not_allowed_is_closed_at_once(make_agent: Any) -> None:
    agent = make_agent(scp={"acse_timeout_s": 30.0, "max_associations": 4})
    with structlog.testing.capture_logs() as logs:
        idle = [_connect_from("127.0.0.2", agent.scp.port) for _ in range(40)]  # not on the allow-list
        try:
            for s in idle:
                assert closed_within(s, 5), "a connection from a host no peer is bound to was kept open"
            # their threads end within moments, long before the 30 s ACSE timeout would have freed the slots
            wait_until(lambda: send_one(agent, knee_dx(rows=64, cols=64)) == status.SUCCESS, 5, "a free slot", 0.2)
        finally:
            for s in idle:
                s.close()
    # the log event docs/operations.md names, once per connection, with the host
    refused = [(e["log_level"], e["peer_host"]) for e in logs if e["event"] == "connection_refused"]
    assert refused == [("warning", "127.0.0.2")] * 40


def test_idle_connection_flood_from_an_allowed_host_holds_slots_only_until_acse_timeout(make_agent: Any) -> None:
    # pynetdicom counts a connection as an association from its first byte: an allowed host can
    # fill the slots, and valid peers are refused (local limit) until the ACSE timeout frees them
    agent = make_agent(scp={"acse_timeout_s": 1.5, "max_associations": 4})
    idle = [connect(agent.scp.port) for _ in range(10)]
    try:
        time.sleep(0.3)
        assert associate(agent.scp.port).is_rejected
        for s in idle:
            assert closed_within(s, 10)
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: send_one(agent, knee_dx(rows=64, cols=64)) == status.SUCCESS, 10, "slots to free up", 0.3)


def test_non_dicom_bytes_are_aborted_and_the_connection_closed(quick: Agent) -> None:
    agent = quick
    s = connect(agent.scp.port)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: strnet\r\n\r\n")
        s.settimeout(5)
        assert s.recv(10)[:1] == b"\x07"  # an A-ABORT at once
        # the trailing bytes are not a whole PDU: closed once the read times out (network_timeout_s)
        assert closed_within(s, 10)
    finally:
        s.close()
    nothing_kept(agent)
    still_serves(agent)


def test_tls_client_hello_on_the_plain_port_is_refused(quick: Agent) -> None:
    agent = quick
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = connect(agent.scp.port)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with ctx.wrap_socket(raw, server_hostname="strnet") as tls:
            tls.recv(1)
    raw.close()
    nothing_kept(agent)
    still_serves(agent)


@pytest.mark.parametrize(
    "pdu",
    [
        pytest.param(b"\x55\x00\x00\x00\x00\x04abcd", id="unknown-pdu-type"),
        pytest.param("short-outer-length", id="outer-length-too-short"),
        pytest.param("item-length-overflow", id="item-length-beyond-pdu"),
        pytest.param(b"\x01\x00\x00\x00\x00\x02\x00\x01", id="associate-rq-of-two-bytes"),
        pytest.param(b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03", id="p-data-before-association"),
    ],
)
def test_malformed_association_request_is_refused_without_harm(quick: Agent, pdu: Any) -> None:
    agent = quick
    rq = associate_rq()
    if pdu == "short-outer-length":
        pdu = rq[:2] + struct.pack(">I", len(rq) - 6 - 40) + rq[6:]
    elif pdu == "item-length-overflow":
        at = rq.index(b"\x20\x00", 74)  # first presentation context item after the fixed header
        pdu = rq[: at + 2] + b"\xff\xff" + rq[at + 4 :]
    s = connect(agent.scp.port)
    try:
        s.sendall(pdu)
        reply = read_pdu(s)
        # never accepted: rejected, aborted or simply closed
        assert reply is None or reply[0] in (0x03, 0x07), reply
        assert closed_within(s, 10)
    finally:
        s.close()
    nothing_kept(agent)
    still_serves(agent)


def test_truncated_associate_request_then_close_leaves_nothing(agent: Agent) -> None:
    s = connect(agent.scp.port)
    s.sendall(associate_rq()[:40])
    s.close()
    time.sleep(0.2)
    nothing_kept(agent)
    still_serves(agent)


# -- PDU size -------------------------------------------------------------------------------------
def test_pdu_announced_beyond_the_maximum_closes_the_connection(make_agent: Any) -> None:
    agent = make_agent(scp={"max_instance_mb": 2})
    s = open_association(agent.scp.port)
    try:
        s.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0))  # a 4 GB P-DATA-TF
        assert closed_within(s, 10)
    finally:
        s.close()
    nothing_kept(agent)
    still_serves(agent)


def test_endless_message_fragments_close_the_connection(make_agent: Any) -> None:
    # many small P-DATA-TF PDUs of one dataset that never ends: buffered only up to the cap
    agent = make_agent(scp={"max_instance_mb": 1})
    ds = knee_dx(rows=64, cols=64)
    s = open_association(agent.scp.port)
    sent = 0
    try:
        s.sendall(p_data(3, store_command(ds), True, True))
        chunk = p_data(3, b"\x00" * 256 * 1024, False, False)
        with pytest.raises(OSError):
            for _ in range(200):  # 50 MB if nobody stops us
                s.sendall(chunk)
                sent += len(chunk)
        assert sent < 20 * 1024 * 1024
    finally:
        s.close()
    nothing_kept(agent)
    still_serves(agent)


# -- transfer interrupted ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["a-abort", "socket-close"])
def test_abort_in_the_middle_of_a_c_store_keeps_nothing(agent: Agent, how: str) -> None:
    ds = knee_dx(rows=256, cols=256)
    body = encode_dataset(ds)
    with structlog.testing.capture_logs() as logs:
        s = open_association(agent.scp.port)
        try:
            s.sendall(p_data(3, store_command(ds), True, True))
            s.sendall(p_data(3, body[: len(body) // 2], False, False))
            if how == "a-abort":
                s.sendall(A_ABORT)
        finally:
            s.close()
        time.sleep(0.5)
    nothing_kept(agent)
    assert list((agent.spool.root / "tmp").iterdir()) == []
    # the log event docs/operations.md names for the half-received file deleted at the association's end
    assert [e["files"] for e in logs if e["event"] == "partial_instance_discarded"] == [1]
    still_serves(agent)


# -- tag values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keyword", "value", "in_database"),
    [
        pytest.param("PatientID", "../../../../etc/passwd", "../../../../etc/passwd", id="traversal-in-patient-id"),
        pytest.param("PatientName", "$(touch /tmp/strnet-pwned)^`id`;rm -rf /",
                     "$(touch /tmp/strnet-pwned)^`id`;rm -rf /", id="shell-in-patient-name"),  # fmt: skip
        pytest.param("AccessionNumber", "../x|&;$(id)", "../x|&;$(id)", id="traversal-and-shell-in-accession"),
        # a backslash makes several values, which an SH accession number cannot be: kept in the
        # file as received, not copied to the database (docs/dicom-values.md)
        pytest.param("AccessionNumber", "..\\..\\x|&;", None, id="several-values-in-accession"),
    ],
)
def test_hostile_tag_values_are_stored_as_data_never_used_as_paths(
    agent: Agent, permissive_uids: None, keyword: str, value: str, in_database: str | None
) -> None:
    ds = knee_dx(rows=64, cols=64)
    setattr(ds, keyword, value)
    assert send_one(agent, ds) == status.SUCCESS
    files = spool_files(agent)
    assert len(files) == 1 and SPOOL_NAME.match(files[0]), files
    assert not Path("/tmp/strnet-pwned").exists()
    column = {"PatientID": "patient_id", "PatientName": "patient_name", "AccessionNumber": "accession_number"}
    with agent.db.reading() as s:
        study = s.execute(select(Study)).scalar_one()
    assert getattr(study, column[keyword]) == in_database
    stored = dcmread(agent.spool.path(files[0]))[keyword].value
    assert ("\\".join(map(str, stored)) if isinstance(stored, MultiValue) else str(stored)) == value


def test_megabyte_strings_are_accepted_and_not_copied_to_the_database(agent: Agent, permissive_uids: None) -> None:
    ds = knee_dx(rows=64, cols=64)
    ds.PatientName = "A" * (1024 * 1024)
    ds.StudyDescription = "B" * (1024 * 1024)
    assert send_one(agent, ds) == status.SUCCESS
    with agent.db.reading() as s:
        study = s.execute(select(Study)).scalar_one()
    # too long for a PN: kept in the spooled file as received, never cut short into another name
    assert study.patient_name is None and study.study_date is not None
    still_serves(agent)


def _nest(depth: int) -> Dataset:
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = [inner]
        inner = outer
    return inner


def _raw_nest(depth: int) -> bytes:
    """(0040,A730) sequences of undefined length nested ``depth`` deep, as explicit VR LE bytes.

    Built by hand: pydicom's own writer needs gigabytes of memory for a few hundred levels.
    """
    open_ = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    leaf = b"\x08\x00\x00\x01SH\x02\x00X "  # (0008,0100) CodeValue
    return open_ * depth + leaf + close * depth


@pytest.mark.parametrize("depth", [pytest.param(20, id="20-levels"), pytest.param(5000, id="5000-levels")])
def test_deeply_nested_sequences_are_refused(agent: Agent, depth: int) -> None:
    ds = knee_dx(rows=64, cols=64)
    body = encode_dataset(ds)
    # keep tag order: ContentSequence (0040,A730) goes after the (0028,...) group, before (7FE0,0010)
    pix = body.index(b"\xe0\x7f\x10\x00")
    bad = body[:pix] + _raw_nest(depth) + body[pix:]
    assert send_raw_dataset(agent, ds, bad) == status.CANNOT_UNDERSTAND
    nothing_kept(agent)
    still_serves(agent)


def test_nesting_within_the_limit_is_accepted(agent: Agent) -> None:
    ds = knee_dx(rows=64, cols=64)
    ds.ContentSequence = _nest(10).ContentSequence
    assert send_one(agent, ds) == status.SUCCESS


def test_group_0002_inside_the_dataset_is_refused(agent: Agent) -> None:
    ds = knee_dx(rows=64, cols=64)
    body = encode_dataset(ds)
    # (0002,0010) UI "1.2.840.10008.1.2" placed in front of the dataset's own elements
    meta = b"\x02\x00\x10\x00UI\x12\x001.2.840.10008.1.2\x00"
    assert send_raw_dataset(agent, ds, meta + body) == status.CANNOT_UNDERSTAND
    nothing_kept(agent)
    still_serves(agent)


# -- required attributes and pixel bombs ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keyword", "expected"),
    [
        pytest.param("SOPInstanceUID", status.DATASET_DOES_NOT_MATCH_SOP_CLASS, id="no-sop-instance-uid"),
        pytest.param("StudyInstanceUID", status.DATASET_DOES_NOT_MATCH_SOP_CLASS, id="no-study-uid"),
        pytest.param("Rows", status.DATASET_DOES_NOT_MATCH_SOP_CLASS, id="no-rows"),
        pytest.param("PixelData", status.DATASET_DOES_NOT_MATCH_SOP_CLASS, id="no-pixel-data"),
    ],
)
def test_missing_required_attribute_is_refused(agent: Agent, keyword: str, expected: int) -> None:
    ds = knee_dx(rows=64, cols=64)
    body = encode_dataset(_without(ds, keyword))
    assert send_raw_dataset(agent, ds, body) == expected
    nothing_kept(agent)


def _without(ds: Dataset, keyword: str) -> Dataset:
    out = copy.deepcopy(ds)
    delattr(out, keyword)
    return out


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"Rows": 65535, "Columns": 65535}, id="huge-rows-x-columns"),
        pytest.param({"NumberOfFrames": 999999}, id="999999-frames"),
        pytest.param({"BitsAllocated": 12}, id="bits-allocated-12"),
        pytest.param({"Rows": 0}, id="zero-rows"),
        pytest.param({"PixelData": b"\x00" * 1001}, id="pixel-length-disagrees"),
    ],
)
def test_pixel_size_bombs_are_refused(agent: Agent, change: dict[str, Any]) -> None:
    ds = knee_dx(rows=64, cols=64)
    for k, v in change.items():
        setattr(ds, k, v)
    assert send_one(agent, ds) == status.CANNOT_UNDERSTAND
    nothing_kept(agent)
    still_serves(agent)


# -- deflate -------------------------------------------------------------------------------------------------
def _deflate(chunks: Iterator[bytes]) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"".join(c.compress(ch) for ch in chunks) + c.flush()


def test_deflate_bomb_is_refused_out_of_resources(make_agent: Any) -> None:
    agent = make_agent(scp={"max_instance_mb": 4})
    ds = knee_dx(rows=64, cols=64)
    head = encode_dataset(_without(ds, "PixelData"))
    size = 512 * 1024 * 1024  # inflates to half a gigabyte; about 500 kB on the wire
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size)
    zeros = b"\x00" * (4 * 1024 * 1024)
    bomb = _deflate(iter([head, pixel_header, *([zeros] * (size // len(zeros)))]))
    assert len(bomb) < 1024 * 1024
    assert send_raw_dataset(agent, ds, bomb, DeflatedExplicitVRLittleEndian) == status.OUT_OF_RESOURCES
    nothing_kept(agent)
    still_serves(agent)


def test_valid_deflated_instance_is_stored(agent: Agent) -> None:
    ds = knee_dx(rows=64, cols=64)
    body = _deflate(iter([encode_dataset(ds)]))
    assert send_raw_dataset(agent, ds, body, DeflatedExplicitVRLittleEndian) == status.SUCCESS
    (inst,) = _instances(agent)
    stored = dcmread(agent.spool.path(inst.spool_path))
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored.PixelData == ds.PixelData


def test_corrupt_deflate_stream_is_refused_cannot_understand(agent: Agent) -> None:
    ds = knee_dx(rows=64, cols=64)
    assert send_raw_dataset(agent, ds, b"\xff" * 4000, DeflatedExplicitVRLittleEndian) == status.CANNOT_UNDERSTAND
    nothing_kept(agent)


def _instances(agent: Agent) -> list[Instance]:
    with agent.db.reading() as s:
        return list(s.execute(select(Instance)).scalars())


# -- preamble --------------------------------------------------------------------------------------------------
def test_preamble_carrying_an_executable_is_zeroed_in_the_spool(agent: Agent, tmp_path: Path) -> None:
    dcmsend = require_tool("dcmsend")
    ds = knee_dx(rows=64, cols=64)
    ds.preamble = b"MZ\x90\x00" + b"\xcc" * 60 + b"This program cannot be run in DOS mode.".ljust(64, b"\x00")
    path = write(ds, tmp_path / "mz.dcm")
    assert path.read_bytes()[:2] == b"MZ"
    import subprocess

    subprocess.run(
        [dcmsend, "-aet", TEST_SCU_AET, "-aec", AGENT_AET, "127.0.0.1", str(agent.scp.port), str(path)],
        check=True, timeout=60, capture_output=True,
    )
    (inst,) = _instances(agent)
    data = agent.spool.path(inst.spool_path).read_bytes()
    assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"
    assert b"This program cannot be run" not in data


# -- compressed pixels that do not decode: accepted, then SKIPPED by the worker ----------------------------
def _corrupt_j2k(ds: Dataset) -> Dataset:
    out = compressed(ds, "j2k")
    out.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    return out


def _huge_j2k(ds: Dataset) -> Dataset:
    out = compressed(ds, "j2k")
    out.Rows, out.Columns = 60000, 60000  # the codestream is small; the header promises 3.6 gigapixels
    return out


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(_corrupt_j2k, "cannot be decoded", id="corrupt-jpeg2000-codestream"),
        pytest.param(_huge_j2k, "exceeds the decoding limit", id="jpeg2000-huge-rows-x-columns"),
    ],
)
def test_undecodable_compressed_pixels_are_acknowledged_then_skipped_with_a_reason(
    make_agent: Any, tiny_weights: Path, make: Any, reason: str
) -> None:
    from pydicom.uid import JPEG2000Lossless

    agent = make_agent(
        worker={"enabled": True, "weights": str(tiny_weights), "device": "cpu", "max_wait_ms": 0},
        sender={"send": False},
    )
    ds = make(knee_dx(rows=64, cols=64))
    assert send_one(agent, ds, [JPEG2000Lossless]) == status.SUCCESS  # ingest checks fragments only
    wait_for(lambda: list_jobs(agent.db)[0].state != JobState.QUEUED, timeout_s=60)
    wait_for(lambda: list_jobs(agent.db)[0].state == JobState.SKIPPED, timeout_s=30)
    assert reason in (list_jobs(agent.db)[0].reason or "")


def test_unsupported_transfer_syntax_only_gets_no_context(agent: Agent) -> None:
    ae = AE(ae_title=TEST_SCU_AET)
    ae.add_requested_context(DX_PRESENTATION, ["1.2.840.10008.1.2.4.110"])  # JPEG XL lossless
    assoc = ae.associate("127.0.0.1", agent.scp.port, ae_title=AGENT_AET)
    try:
        # pynetdicom's acceptor refuses an association in which no context can be accepted
        assert not assoc.is_established or assoc.accepted_contexts == []
    finally:
        if assoc.is_established:
            assoc.release()
    nothing_kept(agent)


# -- against a `strnet serve` process: memory and file descriptors ------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeFork]:
    d = tmp_path_factory.mktemp("served")
    config, port = serve_config(d / "agent.toml", d / "var", scp_extra="max_instance_mb = 8\nmax_associations = 16")
    proc = ServeFork(config, port, d / "serve.log", exec_=True)
    try:
        proc.start(timeout_s=120)
        yield proc
    finally:
        proc.kill()


def _cycle(port: int, rq: bytes) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(rq)
        assert (read_pdu(s) or (0,))[0] == 0x02
        s.sendall(A_RELEASE_RQ)
        assert (read_pdu(s) or (0,))[0] == 0x06
    finally:
        s.close()


@pytest.mark.slow
def test_2000_associate_release_cycles_leave_fds_and_rss_at_baseline(served: ServeFork) -> None:
    assert served.pid is not None
    rq = associate_rq()
    for _ in range(100):  # warm up: thread stacks, arenas, caches
        _cycle(served.port, rq)
    time.sleep(0.5)
    fds0, rss0 = open_fds(served.pid), rss_kb(served.pid)
    t0 = time.monotonic()
    for _ in range(2000):
        _cycle(served.port, rq)
    elapsed = time.monotonic() - t0
    wait_until(lambda: open_fds(served.pid or 0) <= fds0 + 2, 10, "descriptors to be closed")
    fds1, rss1 = open_fds(served.pid), rss_kb(served.pid)
    print(f"2000 cycles in {elapsed:.1f} s; fds {fds0} -> {fds1}; RSS {rss0} -> {rss1} kB")
    assert fds1 <= fds0 + 2
    assert rss1 - rss0 < 30 * 1024, f"RSS grew by {(rss1 - rss0) // 1024} MB over 2000 cycles"
    acked, _ = store_all(served.port, [knee_dx(rows=64, cols=64)])
    assert len(acked) == 1


@pytest.mark.slow
def test_pdu_of_2gb_announced_and_streamed_keeps_memory_bounded(served: ServeFork) -> None:
    assert served.pid is not None
    rss0 = rss_kb(served.pid)
    peak = rss0
    s = open_association(served.port)
    sent = 0
    chunk = b"\x00" * (1024 * 1024)
    try:
        s.sendall(struct.pack(">BBI", 0x04, 0, 2 * 1024 * 1024 * 1024))
        try:
            for _ in range(64):  # stream 64 MB of the 2 GB announced
                s.sendall(chunk)
                sent += len(chunk)
                peak = max(peak, rss_kb(served.pid))
        except OSError:
            pass
    finally:
        s.close()
    peak = max(peak, rss_kb(served.pid))
    print(f"announced 2 GB, streamed {sent // (1024 * 1024)} MB before the close; RSS {rss0} -> peak {peak} kB")
    assert sent < 64 * 1024 * 1024, "the server kept reading a PDU far beyond its maximum"
    assert peak - rss0 < 40 * 1024, f"RSS grew by {(peak - rss0) // 1024} MB"
    acked, _ = store_all(served.port, [knee_dx(rows=64, cols=64)])
    assert len(acked) == 1


def test_echo_answers_after_a_dimse_command_without_a_dataset(agent: Agent) -> None:
    # a C-STORE command that announces a dataset, followed by a release instead: no job, still serving
    ds = knee_dx(rows=64, cols=64)
    s = open_association(agent.scp.port)
    try:
        s.sendall(p_data(3, store_command(ds), True, True))
        s.sendall(A_RELEASE_RQ)
        reply = read_pdu(s)
        assert reply is None or reply[0] in (0x06, 0x07)
    finally:
        s.close()
    nothing_kept(agent)
    still_serves(agent)


def test_raw_valid_store_is_answered_success(agent: Agent) -> None:
    """The raw peer itself is sound: a well-formed C-STORE through it succeeds (guards the other cases)."""
    ds = knee_dx(rows=64, cols=64)
    s = open_association(agent.scp.port)
    try:
        s.sendall(store_pdus(ds))
        reply = read_pdu(s)
        assert reply is not None and reply[0] == 0x04 and dimse_status(reply[1]) == status.SUCCESS
    finally:
        s.close()
    assert len(list_jobs(agent.db)) == 1
