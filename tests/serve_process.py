"""Run ``strnet serve`` as a real subprocess for tests that need process boundaries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from conftest import AGENT_AET, TEST_SCU_AET, database_url_for, free_port


def write_config(
    path: Path, data_dir: Path, port: int | None = None, extra: str = "", log_level: str = "info", worker: bool = False,
    database_url: str | None = None,
) -> Path:
    """``database_url``: a database several agents share; else the data directory's own (on
    PostgreSQL a fresh database of the throwaway cluster, on SQLite the file in data_dir)."""
    port = port or free_port()
    url = database_url or database_url_for(data_dir)
    path.write_text(
        f"""
[agent]
data_dir = "{data_dir}"
{f'database_url = "{url}"' if url else ""}
min_free_disk_mb = 0
log_format = "json"
log_level = "{log_level}"

[scp]
ae_title = "{AGENT_AET}"
bind = "127.0.0.1"
port = {port}
acse_timeout_s = 5
network_timeout_s = 20

[worker]
enabled = {"true" if worker else "false"}

[[scp.peers]]
ae_title = "{TEST_SCU_AET}"
host = "127.0.0.1"

[[scp.peers]]
ae_title = "ORTHANC"
host = "127.0.0.1"
{extra}
"""
    )
    return path


def config_port(config: Path) -> int:
    for line in config.read_text().splitlines():
        if line.strip().startswith("port =") and "[web]" not in line:
            return int(line.split("=")[1])
    raise ValueError("no port")


class ServeProcess:
    """``strnet serve --config FILE`` with its stderr captured to a file.

    ``cpus`` (a ``taskset -c`` list, e.g. "0"): the process runs on those cores only, set before it
    starts, so every thread and helper process it starts inherits them (the scale-out bench)."""

    def __init__(self, config: Path, log_path: Path, args: tuple[str, ...] = (), cpus: str | None = None) -> None:
        self.config = config
        self.args = args
        self.cpus = cpus
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> ServeProcess:
        self._log = self.log_path.open("ab")
        pin = ["taskset", "-c", self.cpus] if self.cpus else []  # taskset execs serve: same pid
        self.proc = subprocess.Popen(
            [*pin, sys.executable, "-m", "agent", "serve", "--config", str(self.config), *self.args],
            stdout=self._log,
            stderr=self._log,
            # the admin web on a free port unless the test chose one
            env={"STRNET_WEB__PORT": str(free_port()), **os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout_s
        port = config_port(self.config)
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"strnet serve exited: {self.log_path.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("strnet serve did not start listening")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        self.kill()
        if self._log:
            self._log.close()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
