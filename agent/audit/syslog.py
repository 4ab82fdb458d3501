"""Syslog to the hospital's audit repository: RFC 5424 messages over TLS (RFC 5425) or UDP (RFC 5426).

Written here rather than with rfc5424-logging-handler: that package is a ``logging.Handler``, which
swallows send errors (``handleError``) and cannot tell the caller that a batch reached the collector;
the exporter must know both to keep its cursor. The framing is a few lines.

TLS: 1.2 or later, the server's certificate checked against ``ca_file`` (else the system store) and
the host name, a client certificate when one is set (mutual TLS, as IHE ATNA asks). A batch goes over
one connection, octet-counted (``LEN SP MSG``); then the agent closes its side and waits for the
collector to close its own, so a batch counts as delivered only once the collector has read it all.
UDP: one message per datagram; nothing comes back, so it is best effort (RFC 5426).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from agent.config import AtnaSection
from agent.errors import ConfigError, TransientError

FACILITY_AUTHPRIV = 10  # security/authorization messages (RFC 5424 table 1)
#: EventOutcomeIndicator -> RFC 5424 severity: success notice, minor failure warning, serious error,
#: major critical
SEVERITY = {0: 5, 4: 4, 8: 3, 12: 2}
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
#: RFC 5426: the largest UDP payload over IPv4
MAX_UDP = 65507
#: how long after the TLS handshake a refusal of our certificate is waited for
PROBE_S = 0.5


def _printable(text: str, limit: int) -> str:
    """RFC 5424 header field: PRINTUSASCII, at most ``limit`` characters, "-" when empty."""
    kept = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return kept or "-"


def timestamp(at: datetime) -> str:
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(timespec="microseconds") + "Z"


def rfc5424(xml: bytes, *, at: datetime, outcome: int, app_name: str, hostname: str | None = None,
            procid: str | None = None, msgid: str = MSGID) -> bytes:  # fmt: skip
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM XML``."""
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY.get(outcome, 3)
    header = " ".join((
        f"<{pri}>1",
        timestamp(at),
        _printable(hostname or socket.getfqdn(), 255),
        _printable(app_name, 48),
        _printable(procid or str(os.getpid()), 128),
        _printable(msgid, 32),
        "-",  # no structured data
    ))  # fmt: skip
    return header.encode("ascii") + b" " + BOM + xml


class Transport(Protocol):
    def deliver(self, messages: Sequence[bytes]) -> None:
        """Send every message, in order; raise TransientError when that is not sure."""


def tls_context(cfg: AtnaSection) -> ssl.SSLContext:
    """The client side of RFC 5425; a CA bundle or key pair that cannot be loaded is a ConfigError."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file) if cfg.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("atna.ca_file", f"cannot load the CA bundle ({exc.__class__.__name__})") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            reason = f"cannot load the client certificate ({exc.__class__.__name__})"
            raise ConfigError("atna.cert_file", reason) from exc
    return ctx


class TlsSyslog:
    """RFC 5425: octet-counted frames over TLS; one connection per batch, closed in both directions."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, timeout_s: float) -> None:
        self.host, self.port, self.ctx, self.timeout_s = host, port, ctx, timeout_s

    def deliver(self, messages: Sequence[bytes]) -> None:
        if not messages:
            return
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            try:
                tls = self.ctx.wrap_socket(raw, server_hostname=self.host)  # takes over raw's descriptor
            except BaseException:
                raw.close()
                raise
            with tls:
                self._accepted(tls)
                for m in messages:
                    tls.sendall(str(len(m)).encode("ascii") + b" " + m)
                self._close(tls)
        except ssl.SSLCertVerificationError as exc:
            raise TransientError(f"audit repository certificate not accepted ({exc.verify_message})") from exc
        except (OSError, ssl.SSLError) as exc:
            raise TransientError(f"audit repository not reached over TLS ({exc.__class__.__name__})") from exc

    def _accepted(self, tls: ssl.SSLSocket) -> None:
        """A collector that refuses our client certificate does so just after the handshake, by closing
        the connection without a TLS alert (rsyslog's gtls driver): wait ``PROBE_S`` for that before
        sending, else refused messages would look delivered."""
        tls.settimeout(min(PROBE_S, self.timeout_s))
        try:
            tls.recv(1)  # the collector never writes: anything but a timeout is a refusal
        except TimeoutError:
            tls.settimeout(self.timeout_s)
            return
        except (ssl.SSLEOFError, ConnectionResetError):
            pass
        raise TransientError("the audit repository closed the connection after the TLS handshake "
                             "(our client certificate refused?)")

    @staticmethod
    def _close(tls: ssl.SSLSocket) -> None:
        """Close our side (TLS close_notify, then TCP FIN) and wait for the collector's end: it
        closes only after it has read everything before our close. A reset means it had not."""
        try:
            raw = tls.unwrap()  # sends close_notify; returns once the collector answers with its own
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return  # the collector closed the connection on our close_notify: read to the end
        raw.shutdown(socket.SHUT_WR)
        while raw.recv(4096):
            pass


class UdpSyslog:
    """RFC 5426: one message per datagram, nothing confirmed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def deliver(self, messages: Sequence[bytes]) -> None:
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0][0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                for m in messages:
                    if len(m) > MAX_UDP:
                        raise TransientError(f"audit message of {len(m)} bytes is too large for UDP")
                    s.sendto(m, (self.host, self.port))
        except OSError as exc:
            raise TransientError(f"audit repository not reached over UDP ({exc.__class__.__name__})") from exc


def transport_for(cfg: AtnaSection) -> Transport:
    if cfg.transport == "udp":
        return UdpSyslog(cfg.host, cfg.port)
    return TlsSyslog(cfg.host, cfg.port, tls_context(cfg), cfg.timeout_s)
