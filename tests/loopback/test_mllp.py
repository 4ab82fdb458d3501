"""MllpTransport against a real MLLP listener: python-hl7's asyncio server (``hl7.mllp``), run in
a thread on a free port, which parses each message it receives and answers the ACK the test
scripts (made by python-hl7's own ``create_ack``). Plain TCP and TLS (throwaway certificates made
with the openssl command-line tool; the listener asks for a client certificate)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, require_tool
from ehr_sample import study
from mllp_listener import Listener

from agent.config import Hl7Section
from agent.ehr.hl7_oru import build_oru, control_id
from agent.ehr.mllp import MllpTransport, tls_context

PHI = ("MRN-0042", "Müller", "ACC-7781", "19470312")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _cert(d: Path, name: str, ca: str | None, san: str) -> None:
    if ca is None:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
                 "-days", "2", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        return
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    d = tmp_path_factory.mktemp("mllp-pki")
    _cert(d, "ca", None, "")
    _cert(d, "otherca", None, "")
    _cert(d, "listener", "ca", "IP:127.0.0.1")
    _cert(d, "agent", "ca", "DNS:strnet-agent")
    return d


@pytest.fixture(scope="module")
def plain() -> Iterator[Listener]:
    listener = Listener().start()
    yield listener
    listener.stop()


@pytest.fixture(scope="module")
def tls_listener(pki: Path) -> Iterator[Listener]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "listener.crt", pki / "listener.key")
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the agent shows its client certificate
    listener = Listener(ctx).start()
    yield listener
    listener.stop()


@pytest.fixture(scope="module")
def payload() -> bytes:
    result = study(PatientName="Müller^Zoë")
    return build_oru(
        result, Hl7Section(name="ris", host="127.0.0.1", port=1), control_id(result.report_sop_instance_uid, "ris")
    )


@pytest.fixture
def transport() -> Iterator[MllpTransport]:
    t = MllpTransport()
    yield t
    t.close()


def dest(port: int, **more: Any) -> Hl7Section:
    return Hl7Section(name="ris", host="127.0.0.1", port=port, timeout_s=more.pop("timeout_s", 5.0), **more)


def control_of(message: Any) -> str:
    return str(message.segment("MSH")(10))


def no_phi(reason: str) -> None:
    for value in PHI:
        assert value not in reason


def test_aa_is_delivered_and_the_listener_reads_the_message(
    plain: Listener, transport: MllpTransport, payload: bytes
) -> None:
    plain.reset("AA")
    delivery = transport.deliver(dest(plain.port), payload)
    assert (delivery.verdict, delivery.status, delivery.reason) == ("delivered", "AA", "")
    [message] = plain.received
    assert str(message).rstrip("\r") == payload.decode("utf-8").rstrip("\r")  # the whole message, UTF-8 name included
    assert message["PID.F5.R1.C1"] == "Müller"
    assert control_of(message) == payload.split(b"|")[9].decode()


def test_ae_is_retried_and_the_resend_carries_the_same_control_id(
    plain: Listener, transport: MllpTransport, payload: bytes
) -> None:
    plain.reset("AE", "AA")
    first = transport.deliver(dest(plain.port), payload)
    assert (first.verdict, first.status) == ("retry", "AE")
    assert "AE" in first.reason
    no_phi(first.reason)  # the ACK's MSA-3 text named the patient: never quoted
    second = transport.deliver(dest(plain.port), payload)
    assert (second.verdict, second.status) == ("delivered", "AA")
    assert len(plain.received) == 2 and control_of(plain.received[0]) == control_of(plain.received[1])
    assert plain.connections == 1 and transport.connects == 1  # kept between deliveries


def test_ar_is_a_dead_letter(plain: Listener, transport: MllpTransport, payload: bytes) -> None:
    plain.reset("AR")
    delivery = transport.deliver(dest(plain.port), payload)
    assert (delivery.verdict, delivery.status) == ("dead", "AR")
    no_phi(delivery.reason)
    plain.reset("CR")
    assert transport.deliver(dest(plain.port), payload).verdict == "dead"
    plain.reset("CE")
    assert transport.deliver(dest(plain.port), payload).verdict == "retry"
    plain.reset("CA")
    assert transport.deliver(dest(plain.port), payload).verdict == "delivered"
    plain.reset("ZZ")
    unknown = transport.deliver(dest(plain.port), payload)
    assert (unknown.verdict, unknown.status) == ("retry", "ZZ") and "MSA-1" in unknown.reason


def test_no_ack_within_the_timeout_is_retried_on_a_new_connection(
    plain: Listener, transport: MllpTransport, payload: bytes
) -> None:
    plain.reset("silent", "AA")
    started = time.monotonic()
    delivery = transport.deliver(dest(plain.port, timeout_s=0.5), payload)
    took = time.monotonic() - started
    assert (delivery.verdict, delivery.status) == ("retry", None)
    assert delivery.reason == "no ACK within 0.5 s" and 0.45 <= took < 3
    # the timed-out connection is closed: a late ACK can never answer the next message
    assert transport.deliver(dest(plain.port), payload).verdict == "delivered"
    assert plain.connections == 2 and len(plain.received) == 2


def test_bad_frame_and_wrong_control_id_are_retried(plain: Listener, transport: MllpTransport, payload: bytes) -> None:
    plain.reset("garbage", "no-msa", "wrong-id", "hangup", "AA")
    bad = transport.deliver(dest(plain.port), payload)
    assert bad.verdict == "retry" and "0x0B" in bad.reason
    no_msa = transport.deliver(dest(plain.port), payload)
    assert (no_msa.verdict, no_msa.reason) == ("retry", "bad answer: the answer has no MSA with MSA-1 and MSA-2")
    wrong = transport.deliver(dest(plain.port), payload)
    assert (wrong.verdict, wrong.status) == ("retry", "AA") and "MSA-2" in wrong.reason
    hangup = transport.deliver(dest(plain.port), payload)
    assert (hangup.verdict, hangup.reason) == ("retry", "bad answer: the listener closed the connection without an ACK")
    assert transport.deliver(dest(plain.port), payload).verdict == "delivered"
    assert plain.connections == 5  # each out-of-step connection was dropped


def test_a_connection_the_listener_closed_while_idle_is_reopened(
    plain: Listener, transport: MllpTransport, payload: bytes
) -> None:
    plain.reset("close", "AA")
    assert transport.deliver(dest(plain.port), payload).verdict == "delivered"
    assert plain.hung_up.wait(5)
    time.sleep(0.05)  # the FIN reaches the agent's socket
    delivery = transport.deliver(dest(plain.port), payload)
    assert (delivery.verdict, delivery.status, delivery.reason) == ("delivered", "AA", "")  # no failed attempt
    assert plain.connections == 2 and len(plain.received) == 2


def test_nothing_listening_is_retried(transport: MllpTransport, payload: bytes) -> None:
    delivery = transport.deliver(dest(free_port()), payload)
    assert (delivery.verdict, delivery.status) == ("retry", None)
    assert delivery.reason == "cannot connect to the MLLP listener (ConnectionRefusedError)"


def test_tls_with_a_client_certificate(tls_listener: Listener, transport: MllpTransport, payload: bytes,
                                       pki: Path) -> None:  # fmt: skip
    tls_listener.reset("AA", "AA")
    to = dest(tls_listener.port, tls=True, ca_file=pki / "ca.crt", cert_file=pki / "agent.crt",
              key_file=pki / "agent.key")  # fmt: skip
    assert transport.deliver(to, payload).verdict == "delivered"
    assert transport.deliver(to, payload).verdict == "delivered"
    assert tls_listener.tls_versions and set(tls_listener.tls_versions) <= {"TLSv1.2", "TLSv1.3"}
    assert tls_listener.connections == 1  # kept between deliveries over TLS too
    assert control_of(tls_listener.received[0]) == control_of(tls_listener.received[1])


def test_tls_listener_from_an_unknown_ca_is_not_trusted(
    tls_listener: Listener, transport: MllpTransport, payload: bytes, pki: Path
) -> None:
    tls_listener.reset()
    to = dest(tls_listener.port, tls=True, ca_file=pki / "otherca.crt", cert_file=pki / "agent.crt",
              key_file=pki / "agent.key")  # fmt: skip
    delivery = transport.deliver(to, payload)
    assert (delivery.verdict, delivery.status) == ("retry", None)
    assert delivery.reason == "TLS: the listener's certificate is not trusted (ca_file)"
    assert tls_listener.received == []


def test_tls_without_a_client_certificate_is_refused_by_the_listener(
    tls_listener: Listener, transport: MllpTransport, payload: bytes, pki: Path
) -> None:
    tls_listener.reset()
    delivery = transport.deliver(dest(tls_listener.port, tls=True, ca_file=pki / "ca.crt"), payload)
    assert delivery.verdict == "retry" and tls_listener.received == []


def test_a_payload_that_is_not_an_hl7_message_is_dead_without_connecting(transport: MllpTransport) -> None:
    port = free_port()  # nothing listens: a connection attempt would be a retry
    assert transport.deliver(dest(port), b"hello").verdict == "dead"
    framed = transport.deliver(dest(port), b"MSH|^~\\&|A||||20261201||ORU^R01|X1|P|2.5.1\rPID|1||\x1c\r")
    assert (framed.verdict, framed.reason) == ("dead", "the payload holds an MLLP frame character")
    assert transport.connects == 0


def test_tls_asks_for_1_2_or_later_and_checks_the_host_name(
    tls_listener: Listener, transport: MllpTransport, payload: bytes, pki: Path
) -> None:
    tls_listener.reset()
    to = dest(tls_listener.port, tls=True, ca_file=pki / "ca.crt", cert_file=pki / "agent.crt",
              key_file=pki / "agent.key")  # fmt: skip
    assert tls_context(to).minimum_version == ssl.TLSVersion.TLSv1_2
    # the listener's certificate names 127.0.0.1 only: "localhost" is another host
    wrong_name = transport.deliver(to.model_copy(update={"host": "localhost"}), payload)
    assert (wrong_name.verdict, wrong_name.reason) == (
        "retry",
        "TLS: the listener's certificate is not trusted (ca_file)",
    )
    # without ca_file: the system store, which does not hold the test CA
    system = transport.deliver(dest(tls_listener.port, tls=True, cert_file=pki / "agent.crt",
                                    key_file=pki / "agent.key"), payload)  # fmt: skip
    assert system.reason == "TLS: the listener's certificate is not trusted (ca_file)"
    assert tls_listener.received == []


def test_a_listener_that_never_answers_the_tls_handshake_is_retried_within_the_timeout(
    transport: MllpTransport, pki: Path, payload: bytes
) -> None:
    # a stand-in for a hung listener (no MLLP server can be made to hang mid-handshake): the
    # kernel accepts the TCP connection, nobody reads it
    with socket.create_server(("127.0.0.1", 0)) as hung:
        started = time.monotonic()
        delivery = transport.deliver(dest(hung.getsockname()[1], tls=True, ca_file=pki / "ca.crt", timeout_s=0.5),
                                     payload)  # fmt: skip
        took = time.monotonic() - started
    assert (delivery.verdict, delivery.reason) == ("retry", "cannot connect to the MLLP listener (TimeoutError)")
    assert 0.45 <= took < 3
