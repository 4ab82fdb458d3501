"""A real Orthanc (the Debian package's ``Orthanc`` binary) as a throwaway local PACS.

Used by the demo, the integration tests and the result-sender tests::

    with LocalOrthanc(aet="ORTHANC") as pacs:
        pacs.add_modality("agent", "STRNET", "127.0.0.1", agent_port)
        pacs.upload(path)
        pacs.route_study(pacs.study_id_for(study_uid), "agent")

Everything is temporary: storage, index and configuration live in a folder removed by ``stop()``;
both ports are chosen free at start (never a well-known DICOM or Orthanc port). The Orthanc
process is killed by ``stop()``, by the context manager (also when the body raised), at
interpreter exit, and, on Linux, by the kernel when the thread that started it dies (so a
SIGKILLed test run leaves no Orthanc behind; start it from a long-lived thread).
Orthanc 1.10 binds all interfaces: storage stays closed to anyone not declared as a modality
(``DicomAlwaysAllowStore`` false, host checked) and REST answers loopback only.

``LocalOrthanc(dicomweb=True)`` also loads Debian's DICOMweb plugin (package orthanc-dicomweb):
QIDO-RS/WADO-RS under ``/dicom-web/`` and WADO-URI at ``/wado``, with full study and series
metadata (what a web viewer such as OHIF v3 reads; tests/viewer).
``LocalOrthanc(webviewer=True)`` loads Debian's Orthanc Web Viewer plugin (package
orthanc-webviewer, 2.8): a series opens at ``/web-viewer/app/viewer.html?series=<Orthanc series
id>`` (``web_viewer_url``); its image cache lives in the temporary folder.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

# Ports that other programs on a shared machine may own: never use them.
RESERVED_PORTS = frozenset({104, 4242, 8042, 11112})
START_TIMEOUT_S = 15.0
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_CONFIG: dict[str, Any] = {
    "Enable": True,
    "Root": "/dicom-web/",
    "EnableWado": True,
    "WadoRoot": "/wado",
    "StudiesMetadata": "Full",
    "SeriesMetadata": "Full",
}
WEBVIEWER_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancWebViewer.so")
_PR_SET_PDEATHSIG = 1

_live: weakref.WeakSet[LocalOrthanc] = weakref.WeakSet()


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed (with what Orthanc said)."""


def free_port(exclude: set[int] | None = None) -> int:
    """A TCP port free on loopback now, outside the reserved ones and ``exclude``."""
    exclude = exclude or set()
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in RESERVED_PORTS and port not in exclude:
            return port
    raise OrthancError("no free port found")


def _death_signal_setter() -> Any:
    """A function for ``preexec_fn`` that makes the child die with its parent (Linux), or None.

    libc is resolved here, in the parent: the child of a threaded process must not dlopen.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def _set() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))

    return _set


class LocalOrthanc:
    """One Orthanc process with temporary storage on free ports."""

    def __init__(
        self,
        aet: str = "ORTHANC",
        *,
        binary: str = "Orthanc",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra_config: dict[str, Any] | None = None,
        work_dir: Path | None = None,
        kill_with_parent: bool = True,
        dicomweb: bool = False,
        dicomweb_plugin: Path = DICOMWEB_PLUGIN,
        webviewer: bool = False,
        webviewer_plugin: Path = WEBVIEWER_PLUGIN,
    ) -> None:
        self.aet = aet
        self.dicomweb = dicomweb
        self.dicomweb_plugin = Path(dicomweb_plugin)
        self.webviewer = webviewer
        self.webviewer_plugin = Path(webviewer_plugin)
        self.binary = binary
        self._initial_modalities = dict(modalities or {})
        self._extra_config = dict(extra_config or {})
        self._given_dir = work_dir
        self._kill_with_parent = kill_with_parent
        self._dir: Path | None = None
        self._own_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._client: httpx.Client | None = None
        self.dicom_port = 0
        self.http_port = 0

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Root of QIDO-RS/WADO-RS (``dicomweb=True``), without a trailing slash."""
        return f"{self.url}/dicom-web"

    def web_viewer_url(self, orthanc_series_id: str) -> str:
        """The Orthanc Web Viewer's page for a series (``webviewer=True``)."""
        return f"{self.url}/web-viewer/app/viewer.html?series={orthanc_series_id}"

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise OrthancError("Orthanc is not started")
        return self._dir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The configuration written for Orthanc."""
        assert self._dir is not None
        cfg: dict[str, Any] = {
            "Name": "strnet-test-pacs",
            "StorageDirectory": str(self._dir / "storage"),
            "IndexDirectory": str(self._dir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                name: [aet, host, port]
                for name, (aet, host, port) in self._initial_modalities.items()
            },
            "Plugins": self._plugins(),
            "SaveJobs": False,
        }
        if self.dicomweb:
            cfg["DicomWeb"] = dict(DICOMWEB_CONFIG)
        if self.webviewer:  # its decoded-image cache in the temporary folder, not Debian's /tmp one
            cfg["WebViewer"] = {"CachePath": str(self._dir / "webviewer-cache"), "Threads": 2}
        cfg.update(self._extra_config)
        return cfg

    def start(self) -> LocalOrthanc:
        """Start Orthanc; return once its REST API answers.

        Raises OrthancError with the tail of Orthanc's log when it does not come up.
        """
        if self._proc is not None:
            raise OrthancError("Orthanc is already started")
        if shutil.which(self.binary) is None:
            raise OrthancError(
                f"{self.binary} not found: install the Debian package orthanc (make test does)"
            )
        if self.dicomweb and not self.dicomweb_plugin.is_file():
            raise OrthancError(
                f"DICOMweb plugin {self.dicomweb_plugin} not found: install the Debian package "
                "orthanc-dicomweb (make test does)"
            )
        if self.webviewer and not self.webviewer_plugin.is_file():
            raise OrthancError(
                f"Web Viewer plugin {self.webviewer_plugin} not found: install the Debian package "
                "orthanc-webviewer (make test does)"
            )
        if self._given_dir is not None:
            self._dir = self._given_dir
            self._dir.mkdir(parents=True, exist_ok=True)
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="strnet-orthanc-"))
            self._own_dir = True
        _live.add(self)
        last: OrthancError | None = None
        for _attempt in range(3):  # a free port can be taken between our check and Orthanc's bind
            self.dicom_port = free_port()
            self.http_port = free_port({self.dicom_port})
            try:
                self._launch()
                return self
            except OrthancError as exc:
                last = exc
                self._kill()
        self.stop()
        assert last is not None
        raise last

    def _launch(self) -> None:
        assert self._dir is not None
        cfg_path = self._dir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [self.binary, str(cfg_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            preexec_fn=_death_signal_setter() if self._kill_with_parent else None,
        )
        # Orthanc closes an idle kept-alive connection after its KeepAliveTimeout (1 s by default):
        # a connection idle longer than that may be closing as a request goes out on it ("Server
        # disconnected without sending a response", seen once in make test), so none is reused then
        self._client = httpx.Client(
            base_url=self.url, timeout=30.0, trust_env=False, limits=httpx.Limits(keepalive_expiry=0.5)
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with code {self._proc.returncode} at start:\n{self.log_tail()}"
                )
            try:
                if self._client.get("/system", timeout=1.0).status_code == 200:
                    self._check_plugins()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise OrthancError(
            f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
        )

    def _plugins(self) -> list[str]:
        plugins = [str(self.dicomweb_plugin)] if self.dicomweb else []
        return plugins + ([str(self.webviewer_plugin)] if self.webviewer else [])

    def _check_plugins(self) -> None:
        assert self._client is not None
        wanted = {"dicom-web": self.dicomweb_plugin} if self.dicomweb else {}
        if self.webviewer:
            wanted["web-viewer"] = self.webviewer_plugin
        if not wanted:
            return
        plugins = self._client.get("/plugins", timeout=5.0).json()
        for name, path in wanted.items():
            if name not in plugins:
                raise OrthancError(f"Orthanc did not load {path} (plugins: {plugins}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, OrthancError):
            return "(no Orthanc log)"
        return "\n".join(text.splitlines()[-lines:])

    def _kill(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL) and remove its temporary folder. Idempotent."""
        self._kill()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._own_dir = False
        _live.discard(self)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._client is None:
            raise OrthancError("Orthanc is not started")
        resp = self._client.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise OrthancError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:500]}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or change, at run time) a DICOM peer allowed to store and to be sent to."""
        self._call("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def remove_modality(self, name: str) -> None:
        self._call("DELETE", f"/modalities/{name}")

    def modalities(self) -> list[str]:
        return list(self.get("/modalities"))

    def upload(self, path: Path | str) -> str:
        """Store a DICOM file through REST; return its Orthanc instance id."""
        body = Path(path).read_bytes()
        answer = self._call(
            "POST", "/instances", content=body, headers={"Content-Type": "application/dicom"}
        )
        return str(answer["ID"])

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc resources whose PatientID or Study/Series/SOP Instance UID equals ``uid``."""
        return list(self._call("POST", "/tools/lookup", content=uid.encode("ascii")))

    def study_id_for(self, study_instance_uid: str) -> str:
        for item in self.lookup(study_instance_uid):
            if item.get("Type") == "Study":
                return str(item["ID"])
        raise OrthancError(f"no study {study_instance_uid} in Orthanc")

    def route_study(self, orthanc_study_id: str, modality: str, synchronous: bool = True) -> Any:
        """C-STORE a study to a declared modality (each instance in its stored syntax)."""
        return self._call(
            "POST",
            f"/modalities/{modality}/store",
            json={"Resources": [orthanc_study_id], "Synchronous": synchronous},
            timeout=120.0,
        )

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, str]]:
        """SOPClassUID, SOPInstanceUID, SeriesInstanceUID (and Orthanc ID, TransferSyntaxUID)."""
        try:
            study_id = self.study_id_for(study_instance_uid)
        except OrthancError:
            return []
        out: list[dict[str, str]] = []
        for inst in self.get(f"/studies/{study_id}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            try:
                syntax = str(self.get(f"/instances/{inst['ID']}/metadata/TransferSyntax"))
            except OrthancError:
                syntax = ""
            out.append({
                "ID": str(inst["ID"]),
                "SOPClassUID": str(tags.get("SOPClassUID", "")),
                "SOPInstanceUID": str(tags.get("SOPInstanceUID", "")),
                "SeriesInstanceUID": str(tags.get("SeriesInstanceUID", "")),
                "TransferSyntaxUID": syntax,
            })
        return out

    def instance_file(self, orthanc_instance_id: str) -> bytes:
        """The DICOM file Orthanc stores for an instance."""
        if self._client is None:
            raise OrthancError("Orthanc is not started")
        resp = self._client.get(f"/instances/{orthanc_instance_id}/file")
        if resp.status_code >= 400:
            raise OrthancError(f"GET instance file: HTTP {resp.status_code}")
        return resp.content


@atexit.register
def _stop_all() -> None:
    for orthanc in list(_live):
        orthanc.stop()
