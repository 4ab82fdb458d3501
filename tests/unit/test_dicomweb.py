"""Destinations of kind dicomweb: their settings, and what the sender does with each STOW-RS answer.

The answers come from a tiny HTTP server in this file, because a real one (Orthanc, in
tests/integration/test_dicomweb_orthanc.py) cannot be made to answer 202, 409 with a failure
reason, 401, 429, 5xx or a redirect on demand. It checks what a STOW-RS server sees too: the
media type, the part's bytes, the credentials, and the TLS handshake with a client certificate.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import database_url_for, free_port, require_tool
from dicom_factory import knee_dx

from agent.config import PacsSection, SenderSection, load_settings
from agent.db.engine import Database, upgrade
from agent.domain import Eligibility, IncomingInstance, InstanceRef, OutboxState
from agent.errors import ConfigError
from agent.pacs import dicomweb
from agent.pacs.sender import Sender
from agent.queue import outbox, store
from agent.reporting.builder import encode
from agent.spool import Spool

PHI_MARK = "Doe^Jane-secret"  # put in every answer's body: must never reach a reason or a log line

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeStow:
    """Answers each POST with ``answer(n)`` (n counts from 0) and keeps what it was sent."""

    answer: Callable[[int], Answer]
    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self, tls: ssl.SSLContext | None = None) -> FakeStow:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                fake.seen.append(Seen(self.path, dict(self.headers.items()), body))
                code, headers, payload = fake.answer(len(fake.seen) - 1)
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST  # the doctor's check

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps({**body, "00100010": {"vr": "PN", "Value": [{"Alphabetic": PHI_MARK}]}}).encode()


def answer_json(code: int, body: dict[str, Any] | None = None) -> Answer:
    return code, {"Content-Type": "application/dicom+json"}, _json(body or {})


def sop_item(uid: str, **codes: int) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.3"]}, "00081155": {"vr": "UI", "Value": [uid]}}
    tags = {"FailureReason": "00081197", "WarningReason": "00081196"}
    for keyword, value in codes.items():
        item[tags[keyword]] = {"vr": "US", "Value": [value]}
    return item


@dataclass
class Rig:
    db: Database
    sender: Sender
    uid: str
    file_bytes: bytes

    def item(self) -> Any:
        (row,) = outbox.items(self.db)
        return row

    def send(self) -> Any:
        self.sender.run_once()
        return self.item()


@pytest.fixture()
def rig_for(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Sender] = []

    def _make(dest: dict[str, Any], **sender: Any) -> Rig:
        db = Database(database_url_for(tmp_path / f"q{len(made)}") or f"sqlite:///{tmp_path / f'q{len(made)}.db'}")
        upgrade(db)
        results = Spool(tmp_path / f"results{len(made)}")
        ds = knee_dx(rows=64, cols=48)
        data = encode(ds)
        uid = str(ds.SOPInstanceUID)
        obj = outbox.write_object(results, "sc", data, str(ds.SOPClassUID), uid)
        ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.1", "1.2.3.999", "1.2.3.998", "1.2.840.10008.1.2.1")
        job = store.record_instance(db, IncomingInstance(ref, "d/1.dcm", "0" * 64, 10, "TESTSCU", "127.0.0.1",
                                                         Eligibility(True, None), "Doe^Jane", "P1"))  # fmt: skip
        from sqlalchemy import select

        from agent.db.models import Study

        with db.transaction() as s:
            study_id = s.execute(select(Study.id)).scalar_one()
            outbox.add(s, study_id, obj, ["web"], send=True)
        assert job is not None
        cfg = SenderSection(**{"backoff_base_s": 0.01, "backoff_max_s": 0.01, "timeout_s": 5, **sender})
        snd = Sender(db, results, [PacsSection(name="web", kind="dicomweb", **dest)], cfg, "STRNET")
        made.append(snd)
        return Rig(db, snd, uid, data)

    yield _make
    for snd in made:
        snd.stop(timeout_s=1)


@pytest.fixture()
def fake() -> Iterator[Callable[[Callable[[int], Answer]], FakeStow]]:
    started: list[FakeStow] = []

    def _start(answer: Callable[[int], Answer]) -> FakeStow:
        started.append(FakeStow(answer).start())
        return started[-1]

    yield _start
    for f in started:
        f.stop()


# -- settings --------------------------------------------------------------------------------------
def _load(dest: dict[str, Any]) -> PacsSection:
    return load_settings(None, search_default=False, pacs=[{"name": "web", **dest}]).pacs[0]


def test_dicomweb_destination_settings_and_their_mistakes(tmp_path: Path) -> None:
    dest = _load({"kind": "dicomweb", "url": "https://pacs.example.org/dicom-web/", "auth": "bearer",
                  "token_file": str(tmp_path / "t"), "ca_file": str(tmp_path / "ca.pem")})  # fmt: skip
    assert dest.url == "https://pacs.example.org/dicom-web" and dest.auth == "bearer"
    assert _load({"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}).kind == "dimse"  # the default kind
    mistakes = [
        ({"kind": "dicomweb"}, "pacs[0].url"),
        ({"kind": "dicomweb", "url": "ftp://x/dicom-web"}, "pacs[0].url"),
        ({"kind": "dicomweb", "url": "http://user:pw@x/dicom-web"}, "pacs[0].url"),
        ({"kind": "dicomweb", "url": "http://x/dicom-web", "host": "x"}, "pacs[0].host"),
        ({"kind": "dicomweb", "url": "http://x/dicom-web", "tls": True}, "pacs[0].tls"),
        ({"kind": "dicomweb", "url": "http://x/dicom-web", "ca_file": "ca.pem"}, "pacs[0].ca_file"),
        ({"kind": "dicomweb", "url": "http://x/dicom-web", "auth": "basic", "username": "u"}, "pacs[0].password_file"),
        ({"kind": "dicomweb", "url": "http://x/dicom-web", "auth": "bearer"}, "pacs[0].token_file"),
        ({"kind": "dicomweb", "url": "http://x/dicom-web", "token_file": "t"}, "pacs[0].token_file"),
        ({"ae_title": "PACS", "host": "127.0.0.1"}, "pacs[0].port"),
        ({"ae_title": "PACS", "host": "h", "port": free_port(), "url": "http://x/dicom-web"}, "pacs[0].url"),
    ]
    for given, named in mistakes:
        with pytest.raises(ConfigError) as err:
            _load(given)
        assert str(err.value).startswith(named), (given, str(err.value))


# -- what each answer does -------------------------------------------------------------------------
def test_200_is_delivered_and_the_server_gets_one_application_dicom_part_with_the_stored_bytes(
    rig_for: Callable[..., Rig], fake: Callable[..., FakeStow]
) -> None:
    server = fake(lambda n: answer_json(200))
    rig = rig_for({"url": f"http://127.0.0.1:{server.port}/dicom-web"})
    row = rig.send()
    assert (row.state, row.last_status, row.last_error) == (OutboxState.DELIVERED.value, "HTTP 200 OK", None)
    (seen,) = server.seen
    assert seen.path == "/dicom-web/studies"
    media, *params = [p.strip() for p in seen.headers["Content-Type"].split(";")]
    assert media == "multipart/related" and 'type="application/dicom"' in params
    boundary = next(p.split("=", 1)[1].strip('"') for p in params if p.startswith("boundary="))
    parts = seen.body.split(f"--{boundary}".encode())
    assert len(parts) == 3 and parts[2].startswith(b"--")  # one part, then the closing delimiter
    head, _, payload = parts[1].partition(b"\r\n\r\n")
    assert b"Content-Type: application/dicom" in head
    assert payload.removesuffix(b"\r\n") == rig.file_bytes  # the stored Part 10 file, byte for byte
    assert "Authorization" not in seen.headers


def test_failed_instance_in_202_or_409_is_dead_with_the_code_and_no_answer_text(
    rig_for: Callable[..., Rig], fake: Callable[..., FakeStow], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for answer, status, code in [
        (lambda uid: answer_json(202, {"00081198": {"vr": "SQ", "Value": [sop_item(uid, FailureReason=0xC122)]}}),
         "HTTP 202 Accepted", "0xC122"),
        (lambda uid: answer_json(409, {"00081198": {"vr": "SQ", "Value": [sop_item(uid, FailureReason=0x0110)]}}),
         "HTTP 409 Conflict", "0x0110"),
        (lambda uid: answer_json(400), "HTTP 400 Bad Request", None),
        (lambda uid: answer_json(415), "HTTP 415 Unsupported Media Type", None),
        (lambda uid: (202, {}, b""), "HTTP 202 Accepted", None),  # accepted, but which? not said
    ]:  # fmt: skip
        uid_box: list[str] = []
        server = fake(lambda n, a=answer, box=uid_box: a(box[0]))
        rig = rig_for({"url": f"http://127.0.0.1:{server.port}/dicom-web"})
        uid_box.append(rig.uid)
        row = rig.send()
        assert row.state == OutboxState.DEAD.value and row.last_status == status, (status, row.last_error)
        assert (code or status) in row.last_error
        assert PHI_MARK not in row.last_error
        assert len(server.seen) == 1  # at once, no retry storm
    assert PHI_MARK not in caplog.text


def test_warning_in_202_is_delivered(rig_for: Callable[..., Rig], fake: Callable[..., FakeStow]) -> None:
    uid_box: list[str] = []
    server = fake(lambda n: answer_json(202, {"00081199": {"vr": "SQ", "Value": [
        sop_item(uid_box[0], WarningReason=0xB000)]}}))  # fmt: skip
    rig = rig_for({"url": f"http://127.0.0.1:{server.port}/dicom-web"})
    uid_box.append(rig.uid)
    row = rig.send()
    assert (row.state, row.last_status) == (OutboxState.DELIVERED.value, "HTTP 202 Accepted")


def test_5xx_429_401_and_out_of_resources_are_retried_with_backoff_then_delivered(
    rig_for: Callable[..., Rig], fake: Callable[..., FakeStow], tmp_path: Path
) -> None:
    uid_box: list[str] = []
    script: list[Callable[[], Answer]] = [
        lambda: answer_json(503),
        lambda: answer_json(500),
        lambda: (429, {"Retry-After": "1"}, b""),
        lambda: answer_json(401),
        # out of resources, as a C-STORE status would say it
        lambda: answer_json(202, {"00081198": {"vr": "SQ", "Value": [sop_item(uid_box[0], FailureReason=0xA700)]}}),
        lambda: answer_json(200),
    ]
    server = fake(lambda n: script[n]())
    (tmp_path / "token").write_text("tok-1\n")
    rig = rig_for({"url": f"http://127.0.0.1:{server.port}/dicom-web", "auth": "bearer",
                   "token_file": str(tmp_path / "token")}, max_attempts=10)  # fmt: skip
    uid_box.append(rig.uid)
    expected = ["HTTP 503 Service Unavailable", "HTTP 500 Internal Server Error", "HTTP 429 Too Many Requests",
                "HTTP 401 Unauthorized", "HTTP 202 Accepted"]  # fmt: skip
    for attempt, status in enumerate(expected, start=1):
        row = rig.send()
        assert (row.state, row.last_status, row.attempts) == (OutboxState.RETRY.value, status, attempt)
        assert row.next_attempt_at is not None and PHI_MARK not in row.last_error
        if status.startswith("HTTP 401"):
            assert "token_file" in row.last_error
            (tmp_path / "token").write_text("tok-2\n")  # renewed: the next request uses it
        time.sleep(0.05)  # the backoff (10 ms)
    row = rig.send()
    assert (row.state, row.attempts) == (OutboxState.DELIVERED.value, 6)
    assert [s.headers["Authorization"] for s in server.seen] == ["Bearer tok-1"] * 4 + ["Bearer tok-2"] * 2


def test_unreachable_destination_and_unreadable_token_are_retried_and_give_up_after_max_attempts(
    rig_for: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = rig_for({"url": f"http://127.0.0.1:{free_port()}/dicom-web"}, max_attempts=2)
    row = rig.send()
    assert row.state == OutboxState.RETRY.value and "unreachable (ConnectionError)" in row.last_error
    time.sleep(0.05)
    row = rig.send()
    assert row.state == OutboxState.DEAD.value and row.last_error.startswith("gave up after 2 attempts")
    rig = rig_for({"url": f"http://127.0.0.1:{free_port()}/dicom-web", "auth": "bearer",
                   "token_file": str(tmp_path / "missing")})  # fmt: skip
    row = rig.send()
    assert row.state == OutboxState.RETRY.value
    assert row.last_error == "DICOMweb credentials unreadable (FileNotFoundError)"


def test_a_redirect_is_not_followed_and_is_dead(rig_for: Callable[..., Rig], fake: Callable[..., FakeStow]) -> None:
    # a POST redirected by 302 would come back as a GET, whose 200 would read as stored
    server = fake(lambda n: (302, {"Location": "/elsewhere"}, b"") if n == 0 else answer_json(200))
    rig = rig_for({"url": f"http://127.0.0.1:{server.port}/dicom-web"})
    row = rig.send()
    assert row.state == OutboxState.DEAD.value and "redirected" in row.last_error
    assert [s.path for s in server.seen] == ["/dicom-web/studies"]


def test_basic_auth_reads_the_password_file(
    rig_for: Callable[..., Rig], fake: Callable[..., FakeStow], tmp_path: Path
) -> None:
    import base64

    server = fake(lambda n: answer_json(200))
    (tmp_path / "pw").write_text("s3cret\n")
    rig = rig_for({"url": f"http://127.0.0.1:{server.port}/dicom-web", "auth": "basic", "username": "agent",
                   "password_file": str(tmp_path / "pw")})  # fmt: skip
    assert rig.send().state == OutboxState.DELIVERED.value
    assert server.seen[0].headers["Authorization"] == "Basic " + base64.b64encode(b"agent:s3cret").decode()


# -- https ------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _pki(d: Path) -> Path:
    require_tool("openssl")
    for ca in ("ca", "otherca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN={ca}", cwd=d)  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:strnet")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def test_https_verifies_the_destination_with_ca_file_and_presents_the_client_certificate(
    rig_for: Callable[..., Rig], tmp_path: Path
) -> None:
    pki = _pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a client without a certificate is refused
    server = FakeStow(lambda n: answer_json(200)).start(tls=ctx)
    try:
        url = f"https://127.0.0.1:{server.port}/dicom-web"
        client = {"cert_file": str(pki / "client.crt"), "key_file": str(pki / "client.key")}
        assert rig_for({"url": url, "ca_file": str(pki / "ca.crt"), **client}).send().state == "DELIVERED"
        untrusted = rig_for({"url": url, "ca_file": str(pki / "otherca.crt"), **client}).send()
        assert untrusted.state == OutboxState.RETRY.value and "SSLError" in untrusted.last_error
        no_cert = rig_for({"url": url, "ca_file": str(pki / "ca.crt")}).send()
        assert no_cert.state == OutboxState.RETRY.value and len(server.seen) == 1
        dest = _load({"kind": "dicomweb", "url": url, "ca_file": str(pki / "ca.crt"), **client})
        ok, detail = dicomweb.check(dest, 5)
        assert ok and detail == "HTTP 200 OK"
    finally:
        server.stop()


def test_doctor_check_of_a_dicomweb_destination(fake: Callable[..., FakeStow]) -> None:
    codes = iter([200, 405, 401, 503])
    server = fake(lambda n: (next(codes), {}, b""))
    dest = _load({"kind": "dicomweb", "url": f"http://127.0.0.1:{server.port}/dicom-web"})
    assert [dicomweb.check(dest, 5) for _ in range(4)] == [
        (True, "HTTP 200 OK"), (True, "HTTP 405 Method Not Allowed"),
        (False, "HTTP 401 Unauthorized"), (False, "HTTP 503 Service Unavailable"),
    ]  # fmt: skip
    assert server.seen[0].path == "/dicom-web/studies?limit=1"
    ok, detail = dicomweb.check(_load({"kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/x"}), 5)
    assert not ok and detail == "unreachable (ConnectionError)"


def test_a_200_without_a_dicom_answer_is_not_taken_for_stored() -> None:
    """A web page from a proxy or a wrong url answers 200 too: only a DICOM answer (or one that
    lists the object as stored) is proof of storage."""
    from pydicom import Dataset

    from agent.pacs.dicomweb import classify

    assert classify(200, None, "1.2.3").verdict == "dead"
    stored = Dataset.from_json({"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]}})
    assert classify(200, stored, "1.2.3").verdict == "delivered"
    assert classify(202, stored, "1.2.3").verdict == "delivered"


def test_a_missing_ca_file_is_a_retry_not_a_crash_of_the_sender(tmp_path: Path) -> None:
    """requests raises a plain OSError for a ca/cert file that is gone: it must come back as an
    outcome (the sender lane would otherwise leave its leased rows SENDING until a restart)."""
    from pydicom import Dataset

    from agent.config import PacsSection
    from agent.pacs.dicomweb import _Client

    dest = PacsSection(name="web", kind="dicomweb", url="https://127.0.0.1:9/dicom-web", ca_file=tmp_path / "gone.pem")
    client = _Client(dest, 2.0)
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    outcome = client.store(ds, "1.2.3")
    assert outcome.verdict == "retry", outcome
    client.close()
