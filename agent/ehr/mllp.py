"""HL7 v2 messages over MLLP (0x0B message 0x1C 0x0D), optionally over TLS: one message, one ACK.

A transport keeps one connection per destination between deliveries (one transport per sender
lane, not shared between threads): no TCP and TLS handshake per message (on loopback, with
python-hl7's listener, 2.9 ms per message over a kept TLS connection against 4.0 ms with a new
one each time; across a network the handshake's round trips cost more). Before reusing a
connection it looks whether the listener closed it meanwhile (an interface engine drops idle
connections) and then opens a new one, so an idle close costs no failed delivery. A connection
that failed, timed out, or got a bad frame or an ACK for another message is closed: the next
delivery opens a new one and never reads a late ACK.

The verdict comes from MSA-1 of the ACK, checked to answer this message (MSA-2 = MSH-10): AA, CA
delivered; AE, CE retry; AR, CR dead; anything else, or no ACK within ``timeout_s``, retry. The
reasons name codes and causes only, never a text field of the ACK nor a value of the message.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import time
from dataclasses import dataclass

from agent.config import Hl7Section
from agent.ehr.delivery import Delivery
from agent.errors import reason_of

START, END = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20  # an ACK is a few hundred bytes; more is not an ACK
_ACCEPT, _ERROR, _REJECT = frozenset({"AA", "CA"}), frozenset({"AE", "CE"}), frozenset({"AR", "CR"})


class FrameError(Exception):
    """The listener's answer is not one MLLP frame holding an HL7 ACK (the text says what)."""


@dataclass(frozen=True)
class Ack:
    code: str | None  # MSA-1 when it is two capital letters, else None
    control_id: str  # MSA-2


def control_id_of(message: bytes) -> str | None:
    """MSH-10 of an ER7 message, None when it has none."""
    msh = message.split(b"\r", 1)[0]
    if not msh.startswith(b"MSH") or len(msh) < 4:
        return None
    fields = msh.split(msh[3:4])
    value = fields[9].decode("utf-8", "replace").strip() if len(fields) > 9 else ""
    return value or None


def parse_ack(body: bytes) -> Ack:
    """MSA-1 and MSA-2 of an ACK; FrameError when it is not an HL7 message with an MSA."""
    text = body.decode("utf-8", "replace")
    segments = [s for s in re.split(r"\r\n|\r|\n", text) if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 4:
        raise FrameError("the answer is not an HL7 message (no MSH)")
    sep = segments[0][3]
    msa = next((s.split(sep) for s in segments if s.startswith("MSA" + sep)), None)
    if msa is None or len(msa) < 3:
        raise FrameError("the answer has no MSA with MSA-1 and MSA-2")
    code = msa[1].strip()
    return Ack(code if re.fullmatch(r"[A-Z]{2}", code) else None, msa[2].split("^")[0].strip())


def verdict(ack: Ack, control_id: str) -> Delivery:
    """What an ACK means for the message whose MSH-10 is ``control_id``."""
    if ack.control_id != control_id:
        return Delivery("retry", ack.code, "the ACK answers another message (MSA-2 is not this MSH-10)")
    if ack.code in _ACCEPT:
        return Delivery("delivered", ack.code)
    if ack.code in _ERROR:
        return Delivery("retry", ack.code, f"the receiver answered {ack.code} (application error)")
    if ack.code in _REJECT:
        return Delivery("dead", ack.code, f"the receiver rejected the message ({ack.code})")
    return Delivery("retry", ack.code, "the ACK has no known acknowledgment code in MSA-1")


def tls_context(dest: Hl7Section) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.cert_file:
        ctx.load_cert_chain(str(dest.cert_file), str(dest.key_file) if dest.key_file else None)
    return ctx


def _still_open(sock: socket.socket) -> bool:
    """Whether an idle connection can take the next message: nothing to read (a close, or bytes
    nobody asked for, make it unusable). TLS 1.3 session tickets make the socket readable
    without any data for us: that is still open."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    sock.setblocking(False)
    try:
        sock.recv(1)  # b"": closed; a byte: out of step; either way not usable
        return False
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


class MllpTransport:
    """``MessageTransport`` for ``[[hl7]]`` destinations (``Hl7Section``)."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, str, int, bool], socket.socket] = {}
        self._contexts: dict[tuple[str, str, int, bool], ssl.SSLContext] = {}
        self.connects = 0  # connections opened so far

    def deliver(self, dest: object, payload: bytes) -> Delivery:
        if not isinstance(dest, Hl7Section):
            raise TypeError("MllpTransport delivers to [[hl7]] destinations only")
        control = control_id_of(payload)
        if control is None:  # never from build_oru: a broken results file
            return Delivery("dead", None, "the payload is not an HL7 v2 message with a control id (MSH-10)")
        if START in payload or END in payload:
            return Delivery("dead", None, "the payload holds an MLLP frame character")
        key = (dest.name, dest.host, dest.port, dest.tls)
        try:
            sock = self._connection(key, dest)
        except ssl.SSLCertVerificationError:
            return Delivery("retry", None, "TLS: the listener's certificate is not trusted (ca_file)")
        except (OSError, ssl.SSLError) as exc:
            return Delivery("retry", None, f"cannot connect to the MLLP listener ({reason_of(exc)})")
        try:
            sock.sendall(START + payload + END)
            ack, extra = self._read_ack(sock, time.monotonic() + dest.timeout_s)
        except TimeoutError:
            self._drop(key)
            return Delivery("retry", None, f"no ACK within {dest.timeout_s:g} s")
        except FrameError as exc:
            self._drop(key)
            return Delivery("retry", None, f"bad answer: {exc}")
        except OSError as exc:
            self._drop(key)
            return Delivery("retry", None, f"the connection failed before the ACK ({reason_of(exc)})")
        result = verdict(ack, control)
        if extra or ack.control_id != control:
            self._drop(key)  # out of step: a late ACK must never be taken for the next message's
        return result

    def close(self) -> None:
        for key in list(self._connections):
            self._drop(key)

    def _connection(self, key: tuple[str, str, int, bool], dest: Hl7Section) -> socket.socket:
        sock = self._connections.get(key)
        if sock is not None and _still_open(sock):
            sock.settimeout(dest.timeout_s)
            return sock
        self._drop(key)
        sock = socket.create_connection((dest.host, dest.port), timeout=dest.timeout_s)
        try:
            if dest.tls:
                if key not in self._contexts:
                    self._contexts[key] = tls_context(dest)
                sock = self._contexts[key].wrap_socket(sock, server_hostname=dest.host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self._connections[key] = sock
        self.connects += 1
        return sock

    def _drop(self, key: tuple[str, str, int, bool]) -> None:
        sock = self._connections.pop(key, None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @staticmethod
    def _read_ack(sock: socket.socket, deadline: float) -> tuple[Ack, bool]:
        """One MLLP frame from ``sock`` before ``deadline``, parsed as an ACK, and whether more
        bytes came after it (then the connection is out of step and is not reused)."""
        buf = bytearray()
        while True:
            end = buf.find(END)
            if end >= 0:
                break
            if len(buf) > MAX_ACK_BYTES:
                raise FrameError(f"no end of frame within {MAX_ACK_BYTES} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise FrameError(
                    "the listener closed the connection before a whole ACK"
                    if buf
                    else "the listener closed the connection without an ACK"
                )
            buf += chunk
            if buf[:1] != START:
                raise FrameError("the answer does not start with the MLLP start byte 0x0B")
        return parse_ack(bytes(buf[1:end])), len(buf) > end + len(END)
