"""A real MLLP listener for the tests: python-hl7's asyncio server (``hl7.mllp``) in a thread on a
free port, answering each message with the ACK a test scripts (python-hl7's own ``create_ack``)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any

import hl7.mllp


class Listener:
    """An MLLP listener answering each message as ``script`` says (then AA): an ACK code, "silent"
    (no answer), "garbage" (bytes without MLLP framing), "no-msa" (a frame with an MSH only),
    "wrong-id" (AA for another control id), "close" (AA, then it closes the connection), "hangup"
    (it closes the connection without an answer)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.script: list[str] = []
        self.received: list[Any] = []
        self.connections = 0
        self.hung_up = threading.Event()  # a "close" was done
        self.tls_versions: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mllp-listener", daemon=True)

    def start(self) -> Listener:
        self.thread.start()
        serve = hl7.mllp.start_hl7_server(self._client, "127.0.0.1", 0, ssl=self.tls, encoding="utf-8")
        self.server = asyncio.run_coroutine_threadsafe(serve, self.loop).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        async def _close() -> None:
            self.server.close()
            await self.server.wait_closed()
            clients = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in clients:  # connections a test left open
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def reset(self, *script: str) -> None:
        self.script, self.received, self.connections = list(script), [], 0
        self.hung_up.clear()

    async def _client(self, reader: Any, writer: Any) -> None:
        self.connections += 1
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            self.tls_versions.append(tls.version())
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(message)
                action = self.script.pop(0) if self.script else "AA"
                if action == "silent":
                    continue
                if action == "hangup":
                    break
                if action == "no-msa":
                    writer.writeblock(b"MSH|^~\\&|EHR||STRNET||20261201||ACK|X|P|2.5.1\r")
                elif action == "garbage":
                    writer.write(b"MSA|AA|nonsense\r")
                elif action == "wrong-id":
                    ack = message.create_ack("AA")
                    ack.segment("MSA").assign_field("SOMEOTHERMESSAGE", 2)
                    writer.writemessage(ack)
                else:
                    ack = message.create_ack("AA" if action == "close" else action)
                    ack.segment("MSA").assign_field("Patient MRN-0042 Müller ACC-7781 19470312", 3)  # never quoted
                    writer.writemessage(ack)
                await writer.drain()
                if action == "close":
                    writer.close()
                    await writer.wait_closed()
                    self.hung_up.set()
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
