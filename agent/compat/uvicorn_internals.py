"""uvicorn's internals that the agent relies on: nothing outside this module touches them (ADR 0010).

Checked against uvicorn ``CHECKED_VERSIONS``; ``problems()`` names each internal below that no
longer holds with the installed version. One patch, reported in ``library_patch_missing`` by its
name when it cannot install:

``request_timeout``
    uvicorn bounds the time a kept-alive connection may idle between requests
    (``timeout_keep_alive``) but not the time a request takes to arrive: a client that sends half
    a request line, or headers without their end, or a body slower than a byte a minute, holds
    its connection for ever. ``request_timeout_protocol(timeout_s)`` gives a subclass of uvicorn's
    h11 protocol (``uvicorn.protocols.http.h11_impl.H11Protocol``, passed as uvicorn's documented
    ``http=`` option) that closes a connection whose request is not complete (headers and body)
    ``timeout_s`` after the connection opened, or after the first byte of a further request on a
    kept-alive connection (between requests, uvicorn's keep-alive timeout applies, which the
    first byte cancels). The subclass extends the protocol's ``connection_made``,
    ``data_received`` and ``connection_lost``, and reads its ``conn`` (the ``h11`` connection,
    whose ``their_state`` says whether the client's request is complete: ``IDLE`` or
    ``SEND_BODY`` while it is not), ``transport`` and ``loop``. A request that arrived whole is
    never cut off while the application answers it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11

from agent.compat import PatchMissing, installed_version, version_problem

DISTRIBUTION = "uvicorn"
#: the versions every internal below was checked against
CHECKED_VERSIONS = ">=0.55,<0.56"
CHECKED_RANGE: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 55), (0, 56))

REQUEST_TIMEOUT = "request_timeout"
_EFFECT = "a request whose headers or body never complete holds its connection until the client goes"
_METHODS = ("connection_made", "data_received", "connection_lost")
_INSTANCE_ATTRIBUTES = ("conn", "transport", "loop")


def _h11_protocol() -> type[Any] | None:
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        return None
    return H11Protocol


def _own(cls: type[Any], name: str) -> bool:
    """Whether uvicorn's ``cls`` defines ``name`` (not only asyncio.Protocol's empty default)."""
    return any(name in vars(klass) for klass in cls.__mro__ if klass.__module__.startswith("uvicorn."))


def request_timeout_protocol(
    timeout_s: float, on_timeout: Callable[[tuple[str, int] | None], None] | None = None
) -> type[asyncio.Protocol] | PatchMissing:
    """uvicorn's h11 protocol, closing a connection whose request is not complete within
    ``timeout_s`` (``on_timeout(client address)`` is called for each). What is missing instead,
    when the installed uvicorn lacks an internal it needs (then keep uvicorn's own protocol)."""
    base = _h11_protocol()
    absent = tuple(f"H11Protocol.{name}" for name in _METHODS if base is not None and not _own(base, name))
    if base is None or absent:
        return PatchMissing(REQUEST_TIMEOUT, absent or ("uvicorn.protocols.http.h11_impl.H11Protocol",), _EFFECT)

    class RequestTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        """h11 with a deadline on each request's arrival (module docstring)."""

        request_timeout_s = timeout_s

        def connection_made(self, transport: Any) -> None:
            self._request_deadline: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm_request_deadline()

        def data_received(self, data: bytes) -> None:
            if self._request_deadline is None and self.conn.their_state is h11.IDLE:
                self._arm_request_deadline()  # the first byte of a request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
                self._disarm_request_deadline()  # the request is complete (or the connection is over)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_request_deadline()
            super().connection_lost(exc)

        def _arm_request_deadline(self) -> None:
            self._disarm_request_deadline()
            self._request_deadline = self.loop.call_later(self.request_timeout_s, self._request_timed_out)

        def _disarm_request_deadline(self) -> None:
            if self._request_deadline is not None:
                self._request_deadline.cancel()
                self._request_deadline = None

        def _request_timed_out(self) -> None:
            self._request_deadline = None
            state = self.conn.their_state
            if self.transport.is_closing() or (state is not h11.IDLE and state is not h11.SEND_BODY):
                return  # complete: the application is answering it
            if on_timeout is not None:
                on_timeout(getattr(self, "client", None))
            self.transport.close()

    RequestTimeoutProtocol.__qualname__ = RequestTimeoutProtocol.__name__ = "RequestTimeoutProtocol"
    return RequestTimeoutProtocol


# --- problems -----------------------------------------------------------------------------------


class _ProbeTransport(asyncio.Transport):
    """What the probe hands the protocol instead of a socket: it records writes and closing."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.written = bytearray()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def problems() -> list[str]:
    """One line per internal of this module that does not hold with the installed uvicorn (the
    version range included); empty when the patch can install and acts as checked."""
    found: list[str] = []
    line = version_problem(DISTRIBUTION, installed_version(DISTRIBUTION), *CHECKED_RANGE)
    if line is not None:
        found.append(line)
    protocol = request_timeout_protocol(0.05)
    if isinstance(protocol, PatchMissing):
        return [*found, *(f"{name} is missing ({REQUEST_TIMEOUT})" for name in protocol.internals)]
    try:
        found += _probe(protocol)
    except Exception as exc:  # noqa: BLE001 - any failure is a line of the report
        found.append(f"the request-timeout probe failed: {exc!r} ({REQUEST_TIMEOUT})")
    return found


def _probe(protocol: type[Any]) -> list[str]:
    """Run the protocol on a loop of its own over a recording transport (deadline 50 ms): half a
    request line must be cut off at the deadline; a whole request must not be, while its
    application takes longer than the deadline to answer."""
    import uvicorn
    from uvicorn.server import ServerState

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.15)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    found: list[str] = []
    loop = asyncio.new_event_loop()
    try:
        config = uvicorn.Config(slow_app, http=protocol, log_config=None, lifespan="off", proxy_headers=False)
        config.load()
        state = ServerState()
        for data, cut in ((b"GET /healthz HT", True), (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", False)):
            proto = protocol(config=config, server_state=state, app_state={}, _loop=loop)
            missing = [name for name in _INSTANCE_ATTRIBUTES if not hasattr(proto, name)]
            if missing:
                return [f"H11Protocol instances lack {', '.join(missing)} ({REQUEST_TIMEOUT})"]
            if not isinstance(proto.conn, h11.Connection):
                return [f"H11Protocol.conn is not an h11.Connection ({REQUEST_TIMEOUT})"]
            transport = _ProbeTransport()
            proto.connection_made(transport)
            proto.data_received(data)
            loop.run_until_complete(asyncio.sleep(0.1))  # past the deadline, before the answer
            if transport.closed is not cut:
                what = "half a request line was not cut off" if cut else "a whole request was cut off"
                found.append(f"H11Protocol with the request deadline: {what} ({REQUEST_TIMEOUT})")
            if state.tasks:
                loop.run_until_complete(asyncio.gather(*state.tasks))
            proto.connection_lost(None)
    finally:
        loop.close()
    return found
