"""The audit export (IHE ATNA) against a real collector: Debian's rsyslogd with rsyslog-gnutls, started
here with its own config on ports chosen at run time (tests/audit_collector.py): TLS with a client
certificate (RFC 5425), and UDP (RFC 5426). Every event arrives once, in order, byte for byte, and
each body is a PS3.15 A.5 audit message (tests/ps315_schema.py); a collector that is down keeps the
cursor, and everything goes once it is back. What rsyslog does not keep (the octet counts, which
connection carried what) and a repository that breaks off mid-batch: a TLS listener of the test's
own (``RawTls``)."""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from audit_collector import Pki, Rsyslog, make_pki
from conftest import TEST_SCU_AET, agent_settings, agent_toml, free_port
from fastapi.testclient import TestClient
from ps315_schema import problems
from sqlalchemy import select
from typer.testing import CliRunner

from agent.app import Agent
from agent.audit import export, trail
from agent.audit.export import Exporter
from agent.cli import app as cli
from agent.clock import as_utc, utcnow
from agent.config import Settings
from agent.db.engine import Database, open_database
from agent.db.models import AtnaExport, AuditEvent
from agent.db.users import add_user
from agent.domain import Eligibility, IncomingInstance, InstanceRef
from agent.queue import store
from agent.scheduler import ATNA_EXPORT_S
from agent.web.app import create_app
from agent.web.auth import hash_password

PATIENT_ID, PATIENT_NAME = "PAT-ATNA-77", "Doe^Jane"
STUDY_UID, SOP_UID = "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1001.1.1"
HEADER = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) - \xef\xbb\xbf(<\?xml .*)$", re.S)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("atna-pki"))


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Rsyslog]:
    r = Rsyslog(tmp_path_factory.mktemp("rsyslog"), pki).start()
    try:
        yield r
    finally:
        r.stop()


def _settings(tmp: Path, collector: Rsyslog, pki: Pki, **atna: Any) -> Settings:
    cfg = {"enabled": True, "host": "127.0.0.1", "port": collector.tcp_port, "transport": "tls",
           "ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key),
           "timeout_s": 5, **atna}  # fmt: skip
    return agent_settings(tmp, atna=cfg)


def _seed(db: Database) -> None:
    """One event of each kind the agent writes, as its callers write them."""
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", SOP_UID, STUDY_UID, STUDY_UID + ".1", "1.2.840.10008.1.2.1")
    store.record_instance(db, IncomingInstance(ref, "d/1.dcm", "0" * 64, 10, TEST_SCU_AET, "127.0.0.1",
                                               Eligibility(None), patient_id=PATIENT_ID,
                                               patient_name=PATIENT_NAME))  # fmt: skip
    with db.transaction() as s:
        trail.append(s, "application_activity", actor="strnet", detail={"activity": "start"})
        trail.append(s, "login", actor="alice", outcome=4, object_type="user", object_id="3",
                     detail={"client": "10.1.2.3", "reason": "bad_password"})
        trail.append(s, "security_alert", actor="admin", action="C", object_type="user", object_id="4",
                     detail={"change": "user_added", "username": "bob", "role": "viewer"})
        trail.append(s, "query", actor="alice", action="R", object_type="flagged_list", detail={"rows": 2})
        trail.append(s, "patient_record", actor="strnet-worker", action="C", object_type="flagged_patient",
                     object_id="1", detail={"change": "flagged", "study_id": 1})
        trail.append(s, "begin_transferring", actor="STRNET_T", action="R", object_type="study",
                     object_id="1.2.826.0.1.3680043.8.498.2002", detail={"pacs": "archive"})
        trail.append(s, "query", actor="STRNET_T", action="E", object_type="study_query", object_id="archive",
                     detail={"date": "20261201", "found": 3})
        trail.append(s, "export", actor="strnet-cli", action="R", object_type="database", detail={"backup": "b.db"})
        trail.append(s, "instances_transferred", actor="PACS", action="R", object_type="storage_commitment",
                     object_id="1.2.826.0.1.3680043.8.498.3003", detail={"destination": "pacs", "committed": 1})
        trail.append(s, "logout", actor="alice", object_type="user", object_id="3", detail={"reason": "user"})
        trail.append(s, "application_activity", actor="strnet", detail={"activity": "stop"})


def _events(db: Database) -> list[AuditEvent]:
    with db.reading() as s:
        return list(s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().all())


def _expected(db: Database, settings: Settings) -> list[bytes]:
    """What the exporter sends for every row, built again here (same bytes)."""
    exporter = Exporter(db, settings)
    with db.reading() as s:
        return exporter.messages(list(s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()), s)


def _body(msg: bytes) -> ET.Element:
    m = HEADER.match(msg)
    assert m is not None, msg[:120]
    return ET.fromstring(m.group(7))


def _next_attempt(db: Database) -> datetime:
    with db.reading() as s:
        row = s.get(AtnaExport, 1)
        assert row is not None and row.next_attempt_at is not None
        return row.next_attempt_at


def _backoff_passed(db: Database) -> None:
    with db.transaction() as s:
        s.get(AtnaExport, 1).next_attempt_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]


def _codes(root: ET.Element) -> tuple[str | None, list[str | None]]:
    """EventID and EventTypeCode codes of a message."""
    event = root.find("EventIdentification/EventID")
    assert event is not None
    return event.get("csd-code"), [t.get("csd-code") for t in root.findall("EventIdentification/EventTypeCode")]


def _only_new(collector: Rsyslog, base: int, n: int) -> list[bytes]:
    got = collector.wait_for(base + n)[base:]
    return got


def test_tls_every_event_once_in_order_as_ps315_messages(tmp_path: Path, collector: Rsyslog, pki: Pki) -> None:
    settings = _settings(tmp_path, collector, pki)
    db = open_database(settings)
    _seed(db)
    rows = _events(db)
    base = len(collector.received())

    result = Exporter(db, settings).run()

    assert (result.sent, result.backlog, result.error) == (len(rows), 0, None)
    got = _only_new(collector, base, len(rows))
    assert got == _expected(db, settings)  # every event once, in order, byte for byte
    assert export.state(db).last_event_id == rows[-1].id
    for msg, ev in zip(got, rows, strict=True):
        m = HEADER.match(msg)
        assert m is not None
        pri = int(m.group(1))
        assert pri // 8 == 10  # authpriv
        assert pri % 8 == {0: 5, 4: 4}[ev.outcome]
        assert (m.group(4), m.group(6)) == (b"strnet", b"IHE+RFC-3881")
        at = as_utc(ev.at).replace(tzinfo=None)
        assert m.group(2) == at.isoformat(timespec="microseconds").encode() + b"Z"  # the event's time
        root = _body(msg)
        assert problems(root) == [], (ev.event_name, problems(root))
        ident = root.find("EventIdentification")
        assert ident is not None
        assert ident.get("EventDateTime") == at.isoformat(timespec="milliseconds") + "Z"
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "strnet-agent"  # type: ignore[union-attr]

    by_code = [_codes(_body(m)) for m in got]
    assert by_code == [
        ("110104", []), ("110100", ["110120"]), ("110114", ["110122"]), ("110113", ["110137"]), ("110112", []),
        ("110110", []), ("110102", []), ("110112", []), ("110106", []), ("110104", []), ("110114", ["110123"]),
        ("110100", ["110121"]),
    ]
    # the instance received: the peer as source with its address, the study (its instance) and the patient
    received = _body(got[0])
    src = received.find("ActiveParticipant")
    assert src is not None and src.get("UserID") == TEST_SCU_AET and src.get("NetworkAccessPointID") == "127.0.0.1"
    assert src.find("RoleIDCode").get("csd-code") == "110153"  # type: ignore[union-attr]
    objects = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o  # type: ignore[union-attr]
               for o in received.findall("ParticipantObjectIdentification")}  # fmt: skip
    assert objects["110180"].get("ParticipantObjectID") == STUDY_UID
    assert objects["110180"].get("ParticipantObjectDataLifeCycle") == "1"  # origination: received here
    assert objects["110180"].find("ParticipantObjectDescription/SOPClass/Instance").get("UID") == SOP_UID  # type: ignore[union-attr]
    assert objects["2"].get("ParticipantObjectID") == PATIENT_ID
    assert objects["2"].findtext("ParticipantObjectName") == PATIENT_NAME

    again = Exporter(db, settings).run()  # nothing new: nothing sent twice
    assert (again.sent, again.backlog) == (0, 0)
    assert len(collector.received()) == base + len(rows)


def test_collector_down_keeps_the_cursor_and_everything_goes_once_it_is_back(
    tmp_path: Path, collector: Rsyslog, pki: Pki
) -> None:
    settings = _settings(tmp_path, collector, pki)
    db = open_database(settings)
    exporter = Exporter(db, settings)
    with db.transaction() as s:
        trail.append(s, "application_activity", actor="strnet", detail={"activity": "start"})
    assert exporter.run().sent == 1
    delivered = export.state(db).last_event_id
    collector.stop()
    try:
        _seed(db)
        total = len(_events(db))
        with structlog.testing.capture_logs() as logs:
            down = exporter.run()
        assert logs and all(PATIENT_ID not in str(e) and STUDY_UID not in str(e) for e in logs)
        assert down.sent == 0 and down.error is not None and "ConnectionRefusedError" in down.error
        st = export.state(db)
        assert (st.last_event_id, st.backlog, st.attempts) == (delivered, total - 1, 1)
        assert PATIENT_ID not in (st.last_error or "") and STUDY_UID not in (st.last_error or "")
        wait = (s_next := _next_attempt(db)) - utcnow()
        assert timedelta(seconds=4) < wait <= timedelta(seconds=5), s_next  # BACKOFF_BASE_S
        assert exporter.run().waiting  # within the backoff: not tried
        _backoff_passed(db)
        assert exporter.run().error is not None  # still down: the wait doubles
        assert export.state(db).attempts == 2
        assert timedelta(seconds=9) < _next_attempt(db) - utcnow() <= timedelta(seconds=10)
        base = len(collector.received())
    finally:
        collector.start()
    assert exporter.run().waiting  # still within the backoff though the collector is back
    _backoff_passed(db)
    back = exporter.run()
    assert (back.sent, back.backlog, back.error) == (total - 1, 0, None)
    got = _only_new(collector, base, total - 1)
    assert got == _expected(db, settings)[1:]
    assert export.state(db).attempts == 0


def test_udp_every_event_once_in_order(tmp_path: Path, collector: Rsyslog, pki: Pki) -> None:
    """Also: atna.audit_source_id, set here, is every message's AuditSourceID (docs/configuration.md)."""
    settings = _settings(tmp_path, collector, pki, transport="udp", port=collector.udp_port,
                         audit_source_id="ward-7-agent")  # fmt: skip
    db = open_database(settings)
    _seed(db)
    base = len(collector.received())
    result = Exporter(db, settings).run()
    assert result.backlog == 0
    got = _only_new(collector, base, result.sent)
    assert got == _expected(db, settings)
    assert all(problems(_body(m)) == [] for m in got)
    sources = {_body(m).find("AuditSourceIdentification").get("AuditSourceID") for m in got}  # type: ignore[union-attr]
    assert sources == {"ward-7-agent"}


def test_a_refused_client_certificate_an_untrusted_server_or_another_host_name_delivers_nothing(
    tmp_path: Path, collector: Rsyslog, pki: Pki
) -> None:
    no_cert = _settings(tmp_path / "a", collector, pki, cert_file=None, key_file=None)
    db = open_database(no_cert)
    _seed(db)
    base = len(collector.received())
    refused = Exporter(db, no_cert).run()
    assert refused.sent == 0 and "client certificate refused" in (refused.error or "")
    untrusted = _settings(tmp_path / "a", collector, pki, ca_file=str(pki.other_ca))
    bad = Exporter(db, untrusted).run(ignore_backoff=True)
    assert bad.sent == 0 and "certificate not accepted" in (bad.error or "")
    wrong = Rsyslog(tmp_path / "wrong-name", replace(pki, server_cert=pki.wrong_name_cert,
                                                     server_key=pki.wrong_name_key)).start()  # fmt: skip
    try:
        other_host = _settings(tmp_path / "a", wrong, pki)
        mismatch = Exporter(db, other_host).run(ignore_backoff=True)
    finally:
        wrong.stop()
    assert mismatch.sent == 0 and "certificate not accepted" in (mismatch.error or "")
    assert wrong.received() == []
    assert export.state(db).last_event_id == 0
    assert len(collector.received()) == base


def test_cli_export_audit_sends_now(tmp_path: Path, collector: Rsyslog, pki: Pki) -> None:
    settings = _settings(tmp_path, collector, pki)
    db = open_database(settings)
    _seed(db)
    n = len(_events(db))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        agent_toml(tmp_path) + '[scp]\nae_title = "STRNET_T"\n'
        f'[atna]\nenabled = true\nhost = "127.0.0.1"\nport = {collector.tcp_port}\nca_file = "{pki.ca}"\n'
        f'cert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
    )
    base = len(collector.received())
    res = CliRunner().invoke(cli, ["db", "export-audit", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert f"sent {n} audit event(s); 0 not yet delivered" in res.output
    assert len(_only_new(collector, base, n)) == n
    collector.stop()
    try:
        with db.transaction() as s:
            trail.append(s, "application_activity", actor="strnet", detail={"activity": "stop"})
        res = CliRunner().invoke(cli, ["db", "export-audit", "--config", str(cfg)])
        assert res.exit_code == 1 and "1 not yet delivered" in res.output and "delivery failed" in res.output
    finally:
        collector.start()


def _status(client: TestClient) -> str:
    page = client.get("/status")
    assert page.status_code == 200
    return page.text


def test_backlog_on_the_status_page_and_in_metrics(tmp_path: Path, collector: Rsyslog, pki: Pki) -> None:
    settings = _settings(tmp_path, collector, pki)
    db = open_database(settings)
    _seed(db)
    add_user(db, "audrey", "auditor", hash_password("a long test password 1"))
    app = create_app(settings, db)
    client = TestClient(app, base_url="http://testserver")
    token = re.search(r'name="login_token" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
    r = client.post("/login", data={"login_token": token, "username": "audrey", "password": "a long test password 1"},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    n = len(_events(db))
    assert f'id="atna-backlog">{n}<' in _status(client)
    assert f"strnet_atna_backlog {float(n)}" in client.get("/metrics").text
    collector.stop()
    try:
        Exporter(db, settings).run()
        page = _status(client)
        assert "1 failed attempt(s), last: audit repository not reached over TLS (ConnectionRefusedError)" in page
        assert PATIENT_ID not in page and PATIENT_NAME not in page
    finally:
        collector.start()
    _backoff_passed(db)
    assert Exporter(db, settings).run().error is None
    assert 'id="atna-backlog">0<' in _status(client) and "failed attempt" not in _status(client)
    assert "strnet_atna_backlog 0.0" in client.get("/metrics").text

    off = create_app(agent_settings(tmp_path / "off"), db)
    assert "strnet_atna_backlog" not in TestClient(off).get("/metrics").text


def test_serve_exports_every_few_seconds_only_when_enabled(tmp_path: Path, collector: Rsyslog, pki: Pki) -> None:
    on = Agent.build(_settings(tmp_path / "on", collector, pki), worker=False)
    off = Agent.build(agent_settings(tmp_path / "off"), worker=False)
    assert on.scheduler is not None and off.scheduler is not None
    job = on.scheduler.get_job("atna_export")
    assert job is not None and job.trigger.interval == timedelta(seconds=ATNA_EXPORT_S)
    assert ATNA_EXPORT_S == 5  # "every 5 seconds" (docs/atna.md)
    assert off.scheduler.get_job("atna_export") is None
    off.db.dispose()
    base = len(collector.received())
    on.start()  # its start event reaches the repository at the scheduler's first tick
    try:
        got = collector.wait_for(base + 1, timeout_s=ATNA_EXPORT_S + 15)[base:]
    finally:
        on.stop()
    assert [_codes(_body(m)) for m in got] == [("110100", ["110120"])]


def test_the_backoff_doubles_up_to_five_minutes(tmp_path: Path, collector: Rsyslog, pki: Pki) -> None:
    settings = _settings(tmp_path, collector, pki, port=free_port())  # nothing listens there
    db = open_database(settings)
    _seed(db)
    exporter = Exporter(db, settings)
    waits = []
    for _ in range(8):
        if export.state(db).attempts:
            _backoff_passed(db)
        assert exporter.run().error is not None
        waits.append(round((_next_attempt(db) - utcnow()).total_seconds()))
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300]
    assert export.state(db).last_event_id == 0


class RawTls:
    """A TLS listener that keeps each connection's bytes as they came (rsyslog takes LF-framed and
    octet-counted messages alike and keeps neither the framing nor the connection): the client
    certificate of the test CA required, as the collector does. ``break_after``: the first
    connection is reset once that many bytes are read, as a repository that fails mid-batch."""

    def __init__(self, pki: Pki, break_after: int | None = None) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.break_after = break_after
        self.connections: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            raw.settimeout(10)
            got = b""
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as tls:  # takes over raw's descriptor
                    limit = self.break_after if not self.connections else None
                    while chunk := tls.recv(65536):
                        got += chunk
                        if limit is not None and len(got) >= limit:
                            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            break  # closed with a reset, the rest unread
                    else:
                        tls.unwrap()  # our close_notify: everything was read
            except (OSError, ssl.SSLError):
                raw.close()
            self.connections.append(got)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


def _wait(done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def _frames(stream: bytes) -> list[bytes]:
    """RFC 5425 octet-counted frames (``MSG-LEN SP SYSLOG-MSG``); a trailing partial frame is left out."""
    out = []
    while stream:
        length, sep, rest = stream.partition(b" ")
        assert sep and length.isdigit(), stream[:40]
        if len(rest) < int(length):
            break
        out.append(rest[: int(length)])
        stream = rest[int(length) :]
    return out


def test_tls_messages_are_octet_counted_a_batch_over_one_connection(
    tmp_path: Path, collector: Rsyslog, pki: Pki
) -> None:
    """docs/atna.md, TLS: ``LENGTH SP MESSAGE``, one after the other, a batch over one connection."""
    repo = RawTls(pki)
    try:
        settings = _settings(tmp_path, collector, pki, port=repo.port)
        db = open_database(settings)
        _seed(db)
        result = Exporter(db, settings).run()
        expected = _expected(db, settings)
        _wait(lambda: len(repo.connections) == 1)
    finally:
        repo.close()
    assert (result.sent, result.error) == (len(expected), None)
    assert repo.connections == [b"".join(str(len(m)).encode() + b" " + m for m in expected)]


def test_a_batch_broken_midway_is_sent_again_whole_and_nothing_is_missing(
    tmp_path: Path, collector: Rsyslog, pki: Pki
) -> None:
    """docs/atna.md, The guarantee: a connection that breaks in the middle of a batch keeps the
    cursor, and the whole batch goes again: the repository may see an event twice, never a gap."""
    db_settings = _settings(tmp_path, collector, pki)
    db = open_database(db_settings)
    _seed(db)
    expected = _expected(db, db_settings)
    half = sum(len(m) + 5 for m in expected) // 2
    broken = RawTls(pki, break_after=half)
    try:
        settings = _settings(tmp_path, collector, pki, port=broken.port)
        first = Exporter(db, settings).run()
        _wait(lambda: len(broken.connections) == 1)
    finally:
        broken.close()
    assert first.sent == 0 and "not reached over TLS" in (first.error or ""), first
    partly = _frames(broken.connections[0])
    assert 0 < len(partly) < len(expected) and partly == expected[: len(partly)]  # some events read, not all
    assert (export.state(db).last_event_id, export.state(db).backlog) == (0, len(expected))
    _backoff_passed(db)
    base = len(collector.received())
    again = Exporter(db, db_settings).run()  # the real collector, after the backoff
    assert (again.sent, again.backlog, again.error) == (len(expected), 0, None)
    assert _only_new(collector, base, len(expected)) == expected  # the whole batch, from its first event
