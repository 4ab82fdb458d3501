"""RecvGuard's direct read (agent/ingest/scp.py) against a real socket pair: the same contract
as pynetdicom's ``AssociationSocket.recv``, which it replaces for PDUs up to 4 MiB."""

from __future__ import annotations

import socket
import threading

import pytest

from agent.ingest.scp import RecvGuard


def _never(n: int) -> bytearray:
    raise AssertionError("pynetdicom's own recv must not be used for this read")


def test_reads_exactly_the_announced_bytes_across_many_segments() -> None:
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 2048  # 512 KiB, written in small pieces while the guard reads
    sender = threading.Thread(target=lambda: [a.sendall(payload[i : i + 1000]) for i in range(0, len(payload), 1000)])
    sender.start()
    guard = RecvGuard(_never, limit_bytes=1 << 20, raw=b)
    got = guard(len(payload) - 10) + guard(10)
    sender.join()
    assert bytes(got) == payload and guard.since_message == len(payload)
    a.close(), b.close()


def test_a_closed_peer_gives_the_bytes_that_arrived() -> None:
    a, b = socket.socketpair()
    a.sendall(b"abc")
    a.close()
    assert RecvGuard(_never, limit_bytes=100, raw=b)(10) == bytearray(b"abc")
    b.close()


def test_a_silent_peer_times_out_as_an_os_error() -> None:
    a, b = socket.socketpair()
    b.settimeout(0.05)
    with pytest.raises(OSError):
        RecvGuard(_never, limit_bytes=100, raw=b)(10)
    a.close(), b.close()


def test_large_reads_keep_pynetdicoms_growing_recv_and_the_cap_still_holds() -> None:
    asked: list[int] = []

    def growing(n: int) -> bytearray:
        asked.append(n)
        return bytearray(n)

    guard = RecvGuard(growing, limit_bytes=64 << 20, raw=object())  # the raw socket is not touched
    assert len(guard(RecvGuard._DIRECT_MAX + 1)) == RecvGuard._DIRECT_MAX + 1 and asked == [RecvGuard._DIRECT_MAX + 1]
    with pytest.raises(OSError):
        guard(65 << 20)
