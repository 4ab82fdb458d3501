"""agent/compat/uvicorn_internals.py: the request deadline on uvicorn's h11 protocol (ADR 0010).

As in tests/unit/test_compat.py: ``problems()`` is empty with the installed uvicorn and names what
a new version lacks; the patch is shown to act on a real server (a half-sent request is cut off at
the deadline, a whole one is answered); the check is shown to fail on uvicorn's own protocol, so
that a passing check is not vacuous; and a patch that cannot install leaves uvicorn's protocol in
place and says so once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from conftest import free_port
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent import compat
from agent.compat import PatchMissing, uvicorn_internals
from agent.config import WebSection
from agent.web.server import WebServer


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_warned", set())


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture()
def server(request: pytest.FixtureRequest) -> Iterator[WebServer]:
    timeout_s = getattr(request, "param", 0.5)
    web = WebSection(bind="127.0.0.1", port=free_port(), request_timeout_s=timeout_s)
    srv = WebServer(_ok_app, web)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _closed_after(sock: socket.socket, limit_s: float) -> float | None:
    """Seconds until the server closed ``sock`` (None: still open after ``limit_s``)."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while True:
            if not sock.recv(4096):
                return time.monotonic() - started
    except ConnectionResetError:
        return time.monotonic() - started
    except TimeoutError:
        return None


def test_problems_are_empty_with_the_installed_uvicorn() -> None:
    assert uvicorn_internals.problems() == []


def test_checked_versions_match_the_checked_range() -> None:
    lower, upper = (".".join(map(str, v)) for v in uvicorn_internals.CHECKED_RANGE)
    assert uvicorn_internals.CHECKED_VERSIONS == f">={lower},<{upper}"


def test_problems_name_a_version_outside_the_checked_range(monkeypatch: pytest.MonkeyPatch) -> None:
    upper = uvicorn_internals.CHECKED_RANGE[1]
    monkeypatch.setattr(uvicorn_internals, "installed_version", lambda _name: (*upper, 0))
    [line] = uvicorn_internals.problems()
    assert f"uvicorn {'.'.join(map(str, upper))}.0 is outside {uvicorn_internals.CHECKED_VERSIONS}" in line


@pytest.mark.parametrize("method", ["connection_made", "data_received", "connection_lost"])
def test_problems_name_the_protocol_method_that_is_gone(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.delattr(H11Protocol, method)
    assert f"H11Protocol.{method} is missing (request_timeout)" in uvicorn_internals.problems()


def test_the_check_fails_on_uvicorns_own_protocol() -> None:
    """The probe is not vacuous: without the deadline, half a request line is never cut off."""
    assert uvicorn_internals._probe(H11Protocol) == [
        "H11Protocol with the request deadline: half a request line was not cut off (request_timeout)"
    ]


def test_a_half_sent_request_is_cut_off_at_the_deadline_a_whole_one_is_answered(server: WebServer) -> None:
    port = server.web.port
    assert "RequestTimeout" in server.server.config.http_protocol_class.__name__
    with socket.create_connection(("127.0.0.1", port)) as half, socket.create_connection(("127.0.0.1", port)) as body:
        half.sendall(b"GET / HT")
        body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        closed = [_closed_after(half, 10.0), _closed_after(body, 10.0)]
    assert all(c is not None for c in closed), closed
    # a kept-alive connection idle longer than the deadline (shorter than uvicorn's keep-alive) is
    # still there for the next request: between requests the keep-alive timeout applies
    with socket.create_connection(("127.0.0.1", port)) as kept:
        kept.settimeout(5.0)
        for _ in range(2):
            kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"\r\n\r\nok"):
                chunk = kept.recv(4096)
                assert chunk, "the kept-alive connection was closed"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(0.8)


def test_a_patch_that_cannot_install_leaves_uvicorns_protocol_and_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(H11Protocol, "data_received")
    missing = uvicorn_internals.request_timeout_protocol(1.0)
    assert isinstance(missing, PatchMissing) and missing.internals == ("H11Protocol.data_received",)
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            srv = WebServer(_ok_app, WebSection(bind="127.0.0.1", port=free_port()))
            assert srv.server.config.http == "h11"
    assert [e["patch"] for e in logs if e["event"] == "library_patch_missing"] == ["request_timeout"]
