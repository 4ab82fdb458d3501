"""Medplum's FHIR R4 router and in-memory repository as a real FHIR server for the tests
(``medplum_server.js`` beside this file; ``make test`` installs the npm packages into
``.venv/medplum-<version>``), and Medplum's ``validateResource`` as an independent validator of
what the server stored: neither knows our bundle builder (fhirclient's models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MEDPLUM_VERSION = "4.5.2"  # the Makefile's MEDPLUM_VERSION
MEDPLUM_DIR = Path(__file__).resolve().parents[2] / ".venv" / f"medplum-{MEDPLUM_VERSION}"
SCRIPT = Path(__file__).with_name("medplum_server.js")


class MedplumServer:
    """``node medplum_server.js``: listens on a port the OS picks; ``base_url`` is its FHIR base."""

    def __init__(self, work_dir: Path) -> None:
        modules = MEDPLUM_DIR / "node_modules"
        node = shutil.which("node")
        if node is None or not (modules / "@medplum" / "fhir-router").is_dir():
            raise RuntimeError(f"Medplum is not installed under {MEDPLUM_DIR} (run `make medplum`)")
        self.port_file = work_dir / "medplum.port"
        self.port_file.unlink(missing_ok=True)
        self.log = (work_dir / "medplum.log").open("wb")
        env = {**os.environ, "NODE_PATH": str(modules)}
        self.proc = subprocess.Popen([node, str(SCRIPT), str(self.port_file)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Medplum server did not start (see {work_dir / 'medplum.log'})")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.origin}/fhir"

    def request(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/fhir+json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def search(self, query: str) -> list[dict[str, Any]]:
        """The resources a search (``Observation?subject=...``) finds, all pages."""
        status, bundle = self.request("GET", f"{self.base_url}/{query}")
        assert status == 200, (status, bundle)
        return [e["resource"] for e in bundle.get("entry", [])]

    def validate(self, resource: dict[str, Any]) -> list[dict[str, Any]]:
        """Medplum's validateResource over the R4 StructureDefinitions, and the required bindings of
        the ``code`` elements: the issues (none: valid)."""
        status, outcome = self.request("POST", f"{self.origin}/$validate", resource)
        assert status in (200, 422), (status, outcome)
        return list(outcome.get("issue", []))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
