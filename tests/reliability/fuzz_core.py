"""Property-based fuzzing of the DICOM port (hypothesis), shared by tests/reliability/test_fuzz.py
(a slice in `make test`) and tests/bench/bench_fuzz.py (10,000 cases in `make bench`).

Two generators: dataset bytes (a valid C-STORE whose dataset is mutated: bit flips, lengths set
to extremes, truncation, insertion, deletion, duplication) and PDU bytes (a valid association,
then the P-DATA-TF PDUs of a C-STORE mutated the same way, headers favoured). The properties,
checked against one in-process agent: no crash (C-ECHO still answered), no hang beyond the
timeouts (every association ends), nothing written outside the spool, and a valid instance is
still stored right after.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dicom_factory import knee_dx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from raw_dicom import (
    A_RELEASE_RQ,
    dimse_status,
    echo_ok,
    encode_dataset,
    open_association,
    p_data,
    read_pdu,
    store_command,
    store_pdus,
)

from agent.app import Agent

BASE_DS = knee_dx(rows=24, cols=20, sop_uid="1.2.826.0.1.3680043.9.7777.1.1")
BASE_BODY = encode_dataset(BASE_DS)
BASE_COMMAND = store_command(BASE_DS)
BASE_PDUS = store_pdus(BASE_DS)
KNOWN_STATUSES = {0x0000, 0xA700, 0xA900, 0xC210, 0x0110, 0x0122, 0x0124, 0x0211, 0x0212, 0x0213}

ALLOWED = [
    re.compile(r"^spool$"),
    re.compile(r"^spool/tmp$"),
    re.compile(r"^spool/\d{8}$"),
    re.compile(r"^spool/\d{8}/[0-9a-f]{32}\.dcm$"),
    re.compile(r"^results$"),
    re.compile(r"^results/tmp$"),
    re.compile(r"^strnet\.db(-wal|-shm|-journal)?$"),
]

EXTREME_LENGTHS = [0, 1, 2, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def mutations(draw: Any, base: bytes, header_bias: int) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        hi = len(data) - 1
        pos = draw(st.one_of(st.integers(0, min(hi, header_bias)), st.integers(0, hi)))
        op = draw(st.sampled_from(["flip", "length32", "length16", "truncate", "insert", "delete", "duplicate"]))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "length32":
            value = draw(st.one_of(st.sampled_from(EXTREME_LENGTHS), st.integers(0, 2**32 - 1)))
            data[pos : pos + 4] = struct.pack("<I", value)
        elif op == "length16":
            data[pos : pos + 2] = struct.pack("<H", draw(st.integers(0, 0xFFFF)))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=48))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
    return bytes(data)


def _fuzz_settings(cases: int) -> Any:
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )


class DatasetFuzzer:
    """Mutated dataset bytes under a valid C-STORE command, on one association (reopened if lost)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.sock: socket.socket | None = None
        self.outcomes: Counter[str] = Counter()
        self.message_id = 1

    def _conn(self) -> socket.socket:
        if self.sock is None:
            self.sock = open_association(self.agent.scp.port)
        return self.sock

    def one(self, body: bytes) -> None:
        s = self._conn()
        self.message_id = self.message_id % 60000 + 1
        s.settimeout(30)  # longer than any per-instance work; a hang fails here
        try:
            s.sendall(p_data(3, store_command(BASE_DS, self.message_id), True, True) + p_data(3, body, False, True))
            reply = read_pdu(s)
        except OSError:
            reply = None
        if reply is None:
            self.outcomes["closed"] += 1
            self.close()
            return
        if reply[0] != 0x04:  # aborted: the server gave up on this association
            self.outcomes[f"pdu_{reply[0]:02x}"] += 1
            self.close()
            return
        code = dimse_status(reply[1])
        assert code in KNOWN_STATUSES, f"unexpected status {code}"
        self.outcomes[f"status_{code:04X}"] += 1

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.sendall(A_RELEASE_RQ)
                read_pdu(self.sock)
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def run(self, cases: int) -> Counter[str]:
        @_fuzz_settings(cases)
        @given(body=mutations(BASE_BODY, 700))
        def case(body: bytes) -> None:
            self.one(body)

        try:
            case()
        finally:
            self.close()
        return self.outcomes


class PduFuzzer:
    """A fresh valid association per case, then the C-STORE's PDUs mutated (headers favoured)."""

    def __init__(self, agent: Agent, read_timeout_s: float = 0.15) -> None:
        self.agent = agent
        self.read_timeout_s = read_timeout_s
        self.outcomes: Counter[str] = Counter()

    def one(self, pdus: bytes) -> None:
        s = open_association(self.agent.scp.port)
        try:
            try:
                s.sendall(pdus)
            except OSError:
                self.outcomes["closed_while_sending"] += 1
                return
            s.settimeout(self.read_timeout_s)
            try:
                reply = read_pdu(s)
            except OSError:
                reply = None
            if reply is None:
                self.outcomes["no_reply"] += 1  # closed, or still waiting for bytes that never come
            elif reply[0] == 0x04:
                code = dimse_status(reply[1])
                assert code in KNOWN_STATUSES, f"unexpected status {code}"
                self.outcomes[f"status_{code:04X}"] += 1
            else:
                self.outcomes[f"pdu_{reply[0]:02x}"] += 1
        finally:
            s.close()

    def run(self, cases: int) -> Counter[str]:
        @_fuzz_settings(cases)
        @given(pdus=mutations(BASE_PDUS, 200))
        def case(pdus: bytes) -> None:
            self.one(pdus)

        case()
        return self.outcomes


def data_tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def stray_paths(root: Path) -> list[str]:
    """Everything in the data dir that is not the database, the results folder or our spool names."""
    out = []
    for rel in data_tree(root):
        if not any(rx.match(rel) for rx in ALLOWED):
            out.append(rel)
    return out


def assert_healthy(agent: Agent, grace_s: float) -> None:
    """The properties after a fuzz run (see the module docstring)."""
    server = agent.scp._server
    assert server is not None
    deadline = time.monotonic() + grace_s
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.active_associations == [], "associations still open past the timeouts (a hang)"
    assert echo_ok(agent.scp.port), "C-ECHO no longer answered"
    stray = stray_paths(agent.settings.data_dir)
    assert stray == [], f"written outside the spool: {stray[:10]}"
    assert list((agent.spool.root / "tmp").iterdir()) == [], "temporary spool files left behind"
    ds = knee_dx(rows=24, cols=20)
    s = open_association(agent.scp.port)
    try:
        s.sendall(store_pdus(ds))
        reply = read_pdu(s)
        assert reply is not None and reply[0] == 0x04 and dimse_status(reply[1]) == 0, "valid instance refused"
    finally:
        s.close()
