"""Run ``strnet serve`` as a real subprocess for tests that need process boundaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from conftest import AGENT_AET, TEST_SCU_AET, database_url_for, free_port


def toml_text(doc: dict[str, Any]) -> str:
    """A config file's text from nested dicts: a dict is a table, a list of dicts an array of
    tables; values are strings, paths, numbers, booleans or lists of them."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str | Path):
            return json.dumps(v.as_posix() if isinstance(v, Path) else v)  # a TOML basic string
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML value for {type(v).__name__}")

    def table(name: str, body: dict[str, Any], header: str) -> None:
        if name:
            lines.extend(["", header])
        subtables: list[tuple[str, dict[str, Any], str]] = []
        for key, v in body.items():
            full = f"{name}.{key}" if name else key
            if isinstance(v, dict):
                subtables.append((full, v, f"[{full}]"))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                subtables.extend((full, x, f"[[{full}]]") for x in v)
            else:
                lines.append(f"{key} = {value(v)}")
        for full, sub, sub_header in subtables:  # after the table's own keys, as TOML wants
            table(full, sub, sub_header)

    table("", doc, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def serve_doc(
    data_dir: Path, port: int, *, database_url: str | None = None, log_level: str = "info",
    peers: tuple[str, ...] = (TEST_SCU_AET, "ORTHANC"), weights: Path | None = None, device: str = "auto",
    pacs_port: int | None = None, pacs_aet: str = "ORTHANC",
) -> dict[str, Any]:  # fmt: skip
    """The settings of a `strnet serve` of the tests and benches, as a dict for :func:`toml_text`:
    its data directory and database (``database_url``, else the data directory's own on the engine
    under test), the SCP on loopback accepting ``peers``; with ``weights`` the worker screens;
    with ``pacs_port`` the results go to ``pacs_aet`` there (the sender polling every 0.2 s).
    Callers add or change what their run needs."""
    url = database_url or database_url_for(data_dir)
    doc: dict[str, Any] = {
        "agent": {"data_dir": data_dir, **({"database_url": url} if url else {}), "min_free_disk_mb": 0,
                  "log_format": "json", "log_level": log_level},
        "scp": {"ae_title": AGENT_AET, "bind": "127.0.0.1", "port": port, "acse_timeout_s": 5, "network_timeout_s": 20,
                "peers": [{"ae_title": aet, "host": "127.0.0.1"} for aet in peers]},
        "worker": {"enabled": weights is not None, **({"weights": weights, "device": device} if weights else {})},
    }  # fmt: skip
    if pacs_port is not None:
        doc["sender"] = {"poll_s": 0.2, "backoff_base_s": 0.5}
        doc["pacs"] = [{"name": "orthanc", "ae_title": pacs_aet, "host": "127.0.0.1", "port": pacs_port}]
    return doc


def write_doc(path: Path, doc: dict[str, Any], extra: str = "") -> Path:
    """Write ``doc`` (and ``extra``, TOML text of tables of its own) as the config file ``path``."""
    path.write_text(toml_text(doc) + extra, encoding="utf-8")
    return path


def write_config(
    path: Path, data_dir: Path, port: int | None = None, extra: str = "", log_level: str = "info", worker: bool = False,
    database_url: str | None = None,
) -> Path:
    """``database_url``: a database several agents share; else the data directory's own (on
    PostgreSQL a fresh database of the throwaway cluster, on SQLite the file in data_dir).
    ``worker``: on, with the configured default weights."""
    doc = serve_doc(data_dir, port or free_port(), database_url=database_url, log_level=log_level)
    doc["worker"]["enabled"] = worker
    return write_doc(path, doc, extra)


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
