"""DICOM TLS: the SCP ([scp.tls]) and the SCU towards PACS ([[pacs]] tls, ca_file, cert_file, key_file).

Throwaway CA, server and client certificates are made with the openssl command-line tool (the
`cryptography` package is not installed here). Peers: pynetdicom with an ssl context, and DCMTK's
echoscu/storescu built with OpenSSL.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_AET, TEST_SCU_AET, require_tool
from dicom_factory import knee_dx, write
from pacs_peer import PACS_AET, PacsPeer
from pynetdicom import evt
from rel_helpers import associate, wait_until
from screening_helpers import send_study

from agent.domain import OutboxState
from agent.queue import outbox
from agent.queue.store import list_jobs


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "otherca")
    _leaf(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    _leaf(d, "client", "ca", "DNS:testscu")
    return d


def _tls_scp(pki: Path, require_client_cert: bool) -> dict[str, Any]:
    return {
        "tls": {
            "enabled": True,
            "cert_file": str(pki / "server.crt"),
            "key_file": str(pki / "server.key"),
            "ca_file": str(pki / "ca.crt"),
            "require_client_cert": require_client_cert,
        }
    }


def _client_ctx(pki: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return ctx


def test_scp_over_tls_stores_an_instance_with_tls_1_2_or_later(make_agent: Any, pki: Path) -> None:
    agent = make_agent(scp=_tls_scp(pki, require_client_cert=False))
    assoc = associate(agent.scp.port, tls_args=(_client_ctx(pki, False), "localhost"))
    assert assoc.is_established
    try:
        version = assoc.dul.socket.socket.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        rsp = assoc.send_c_store(knee_dx(rows=64, cols=64))
        assert int(rsp.Status) == 0
    finally:
        assoc.release()
    assert len(list_jobs(agent.db)) == 1


def test_client_certificate_required_refuses_a_client_without_one(make_agent: Any, pki: Path) -> None:
    agent = make_agent(scp=_tls_scp(pki, require_client_cert=True))
    without = associate(agent.scp.port, tls_args=(_client_ctx(pki, False), "localhost"))
    assert not without.is_established
    with_cert = associate(agent.scp.port, tls_args=(_client_ctx(pki, True), "localhost"))
    assert with_cert.is_established
    try:
        assert int(with_cert.send_c_store(knee_dx(rows=64, cols=64)).Status) == 0
    finally:
        with_cert.release()
    assert len(list_jobs(agent.db)) == 1


def test_plain_connection_to_the_tls_port_is_refused(make_agent: Any, pki: Path) -> None:
    agent = make_agent(scp={**_tls_scp(pki, require_client_cert=False), "acse_timeout_s": 2, "network_timeout_s": 2})
    plain = associate(agent.scp.port)
    assert not plain.is_established
    assert list_jobs(agent.db) == []
    # a slow TLS client does not stall the others (the handshake runs in its own thread)
    import socket

    idle = socket.create_connection(("127.0.0.1", agent.scp.port))
    try:
        ok = associate(agent.scp.port, tls_args=(_client_ctx(pki, False), "localhost"))
        assert ok.is_established
        ok.release()
    finally:
        idle.close()


def test_dcmtk_echoscu_and_storescu_over_tls(make_agent: Any, pki: Path, tmp_path: Path) -> None:
    echoscu, storescu = require_tool("echoscu"), require_tool("storescu")
    agent = make_agent(scp=_tls_scp(pki, require_client_cert=True))
    port = str(agent.scp.port)
    echo = subprocess.run(
        [echoscu, "+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"),
         "-aet", TEST_SCU_AET, "-aec", AGENT_AET, "127.0.0.1", port],
        capture_output=True, text=True, timeout=60,
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr
    anonymous = subprocess.run(  # +tla: no client certificate, which this agent requires
        [echoscu, "+tla", "+cf", str(pki / "ca.crt"), "-aet", TEST_SCU_AET, "-aec", AGENT_AET, "127.0.0.1", port],
        capture_output=True, text=True, timeout=60,
    )
    assert anonymous.returncode != 0
    f = write(knee_dx(rows=64, cols=64), tmp_path / "k.dcm")
    store = subprocess.run(
        [storescu, "+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"),
         "-aet", TEST_SCU_AET, "-aec", AGENT_AET, "127.0.0.1", port, str(f)],
        capture_output=True, text=True, timeout=60,
    )
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(list_jobs(agent.db)) == 1


class TlsPacsPeer(PacsPeer):
    """The pynetdicom PACS peer, serving DICOM over TLS and requiring our client certificate."""

    def __init__(self, pki: Path) -> None:
        super().__init__()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
        ctx.load_verify_locations(str(pki / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.ssl_context = ctx

    def start(self) -> TlsPacsPeer:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )
        return self


def _tls_sender_agent(make_agent: Any, weights: Path, port: int, pki: Path, ca: str) -> Any:
    return make_agent(
        worker={"enabled": True, "weights": str(weights), "device": "cpu", "max_wait_ms": 0, "saliency": False},
        reporting={"quiet_period_s": 0.3, "overlay": False},
        sender={"backoff_base_s": 0.2, "backoff_max_s": 0.5, "poll_s": 0.2, "timeout_s": 5, "max_attempts": 50},
        pacs=[{
            "name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": port, "tls": True,
            "ca_file": str(pki / ca), "cert_file": str(pki / "client.crt"), "key_file": str(pki / "client.key"),
            "tls_server_name": "localhost",
        }],
    )


def test_results_are_sent_to_pacs_over_tls(make_agent: Any, tiny_weights: Path, pki: Path) -> None:
    with TlsPacsPeer(pki) as pacs:
        agent = _tls_sender_agent(make_agent, tiny_weights, pacs.port, pki, "ca.crt")
        send_study(agent, [knee_dx(rows=96, cols=80)])
        wait_until(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value], 60, "delivery")
        assert len(pacs.received) == 1


def test_pacs_certificate_from_an_unknown_ca_is_not_trusted(make_agent: Any, tiny_weights: Path, pki: Path) -> None:
    with TlsPacsPeer(pki) as pacs:
        agent = _tls_sender_agent(make_agent, tiny_weights, pacs.port, pki, "otherca.crt")
        send_study(agent, [knee_dx(rows=96, cols=80)])
        wait_until(lambda: any(i.attempts >= 2 for i in outbox.items(agent.db)), 60, "failed attempts")
        assert pacs.received == []
        assert all(i.state != OutboxState.DELIVERED.value for i in outbox.items(agent.db))


def test_config_checks_pacs_tls_settings() -> None:
    from agent.config import load_settings
    from agent.errors import ConfigError

    base = {"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": 4243}
    with pytest.raises(ConfigError, match=r"pacs\[0\]\.cert_file"):
        load_settings(None, search_default=False, pacs=[{**base, "tls": True, "cert_file": "/x.crt"}])
    with pytest.raises(ConfigError, match=r"pacs\[0\]\.tls"):
        load_settings(None, search_default=False, pacs=[{**base, "ca_file": "/ca.crt"}])
    assert shutil.which("openssl")


@pytest.mark.parametrize("callers_ca", ["ca.crt", None, "otherca.crt"], ids=["ca_file", "no-ca", "callers-own-ca"])
def test_strnet_echo_reaches_its_own_tls_listener(
    make_agent: Any, pki: Path, tmp_path: Path, callers_ca: str | None
) -> None:
    """The container's health check (`strnet echo`) when [scp.tls] is on: the agent's own
    certificate is the anchor, whatever CA signs the callers' (``ca_file``); presented as the
    client certificate where the SCP requires one (it is signed by ca.crt)."""
    from typer.testing import CliRunner

    from agent.cli import app

    with_ca = callers_ca == "ca.crt"
    scp = _tls_scp(pki, require_client_cert=with_ca)
    scp["tls"]["ca_file"] = str(pki / callers_ca) if callers_ca else None
    agent = make_agent(scp=scp)
    tls = scp["tls"]
    cfg = tmp_path / "echo.toml"
    cfg.write_text(
        f'[scp]\nae_title = "{AGENT_AET}"\nport = {agent.scp.port}\n[scp.tls]\nenabled = true\n'
        f'cert_file = "{tls["cert_file"]}"\nkey_file = "{tls["key_file"]}"\n'
        + (f'ca_file = "{tls["ca_file"]}"\n' if tls["ca_file"] else "")
        + ("require_client_cert = true\n" if with_ca else ""),
        encoding="utf-8",
    )
    res = CliRunner().invoke(app, ["echo", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "status success" in res.output.lower()


def test_doctor_pings_a_tls_pacs_over_tls(make_agent: Any, tiny_weights: Path, pki: Path) -> None:
    from agent.ops.doctor import run_checks

    with TlsPacsPeer(pki) as pacs:
        agent = _tls_sender_agent(make_agent, tiny_weights, pacs.port, pki, "ca.crt")
        (ping,) = [c for c in run_checks(agent.settings, "test") if c.name == "pacs pacs"]
        assert ping.ok, ping.detail
