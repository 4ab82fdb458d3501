"""A real syslog collector for the ATNA export tests: Debian's rsyslogd (with rsyslog-gnutls), in the
foreground with its own config, work directory and pid file, on ports chosen at run time.

imtcp with the gtls stream driver (TLS; the client must show a certificate of the test CA: mutual TLS)
and imudp, with rsyslog's default message size limit (8,096 bytes); every message received is
written to a file as its raw bytes, JSON-escaped, one a line.
The CA, server and client certificates are made by ``openssl`` in the test's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tool

RSYSLOG_CONF = """
global(workDirectory="{work}"
       DefaultNetstreamDriverCAFile="{ca}" DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
module(load="imudp")
input(type="imtcp" port="{tcp_port}" address="127.0.0.1" listenPortFileName="{work}/tcp.port" ruleset="keep")
input(type="imudp" port="{udp_port}" address="127.0.0.1" ruleset="keep")
template(name="raw" type="string" string="%rawmsg:::json%\\n")
ruleset(name="keep") {{ action(type="omfile" file="{out}" template="raw" flushOnTXEnd="on" asyncWriting="off") }}
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA the collector does not trust
    wrong_name_cert: Path  # a server certificate of the CA for another host name
    wrong_name_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip


def _leaf(folder: Path, name: str, ca: str, ext: str) -> None:
    (folder / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


def make_pki(folder: Path) -> Pki:
    require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca")
    _ca(folder, "otherca")
    _leaf(folder, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(folder, "elsewhere", "ca", "subjectAltName=DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth\n")
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "otherca.pem", "elsewhere.pem",
             "elsewhere.key")
    return Pki(*(folder / n for n in names))


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rsyslog:
    """rsyslogd -n with its own config; ``start()`` again after ``stop()`` listens on the same ports."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        # /usr/sbin: not on every user's PATH
        self.rsyslogd = shutil.which("rsyslogd", path=os.environ.get("PATH", "") + ":/usr/sbin") or require_tool(
            "rsyslogd"
        )
        self.folder, self.pki = folder, pki
        self.work = folder / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = folder / "received.jsonl"
        self.tcp_port = 0  # rsyslog picks a free one at the first start and writes it to tcp.port
        self.udp_port = _free_udp_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        conf = self.folder / "rsyslog.conf"
        conf.write_text(RSYSLOG_CONF.format(work=self.work, ca=self.pki.ca, cert=self.pki.server_cert,
                                            key=self.pki.server_key, tcp_port=self.tcp_port,
                                            udp_port=self.udp_port, out=self.out))  # fmt: skip
        port_file = self.work / "tcp.port"
        port_file.unlink(missing_ok=True)
        with (self.folder / "rsyslogd.log").open("ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [self.rsyslogd, "-n", "-f", str(conf), "-i", str(self.folder / "rsyslogd.pid")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"rsyslogd exited: {(self.folder / 'rsyslogd.log').read_text()[-2000:]}")
            text = port_file.read_text().strip() if port_file.exists() else ""
            port = self.tcp_port or (int(text) if text.isdigit() else 0)  # the file: only for port 0
            if port and self._listening(port):
                self.tcp_port = port
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("rsyslogd did not listen within 20 s")

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def received(self) -> list[bytes]:
        """Every message received so far, its raw bytes (header, BOM, XML), in arrival order."""
        if not self.out.exists():
            return []
        lines = self.out.read_text(encoding="utf-8").splitlines()
        return [json.loads(f'"{line}"').encode("utf-8") for line in lines if line]

    def wait_for(self, n: int, timeout_s: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        return self.received()
