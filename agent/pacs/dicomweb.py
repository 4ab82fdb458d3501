"""DICOMweb towards a destination of ``kind = "dicomweb"``: STOW-RS (PS3.18 10.5) as its user agent.

One result object per request: ``POST <url>/studies`` with ``Content-Type: multipart/related;
type="application/dicom"``, one part holding the stored Part 10 file (dicomweb-client encodes the
message; its own retries are off, the sender's backoff applies). Redirects are not followed (a
POST redirected would be replayed as a GET, whose 200 would read as stored).

What the answer does, in the classes of a C-STORE status (``agent/pacs/status.py``):

- 200: delivered (every instance of the request stored). With a Warning Reason for our instance,
  delivered and logged as a warning.
- 202 (stored with warnings or failures): delivered when the answer lists our instance among the
  stored ones; dead when it does not say.
- 200 or 202 that lists our instance in the Failed SOP Sequence: its Failure Reason is a C-STORE
  status and is classed as one: out of resources (A7xx, 0213) retried, anything else dead.
- 408, 429, 5xx, connection failures, timeouts, an unreadable credentials file: retried with
  backoff (then dead after ``sender.max_attempts``); 401 too, since a token may have been renewed
  (the credentials file is read again for every request).
- 409 and any other 4xx, a redirect: dead at once, with the status and the Failure Reason codes.

Reasons carry the HTTP status, the DICOM Failure/Warning Reason codes and exception class names:
never the answer's text, which may quote the object.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread

from agent.pacs import status as dimse

if TYPE_CHECKING:
    from agent.config import PacsSection

MEDIA_TYPE = 'multipart/related; type="application/dicom"'
#: dicomweb-client sends a body larger than its chunk size with chunked transfer encoding, which
#: some servers and proxies refuse: our objects (an SR, a 2.5 MB overlay) go with a length
_ONE_BODY = 1 << 30
_RETRIED = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.UNAUTHORIZED})
_FAILED_SOP_SEQUENCE = "FailedSOPSequence"
_REFERENCED_SOP_SEQUENCE = "ReferencedSOPSequence"

Verdict = Literal["delivered", "warning", "retry", "dead"]


@dataclass(frozen=True)
class StowOutcome:
    """What became of one object: ``status`` for ``last_status`` (``HTTP 200``), ``reason`` for
    ``last_error`` (no value from the object or the answer's text)."""

    verdict: Verdict
    status: str | None
    reason: str


def _http(code: int) -> str:
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def _answer(response: requests.Response | None) -> Dataset | None:
    """The STOW-RS answer (application/dicom+json) as a dataset; None when absent or unreadable."""
    if response is None or not response.content:
        return None
    try:
        body = response.json()
        return Dataset.from_json(body[0] if isinstance(body, list) and body else body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _items_for(answer: Dataset | None, keyword: str, sop_instance_uid: str) -> list[Dataset]:
    if answer is None:
        return []
    try:
        seq = answer.get(keyword) or []
        return [i for i in seq if str(i.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid]
    except (ValueError, TypeError, AttributeError):  # a malformed answer: as if it said nothing
        return []


def _codes(items: list[Dataset], keyword: str) -> str:
    codes = []
    for item in items:
        value = item.get(keyword)
        if isinstance(value, int):
            codes.append(f"0x{value:04X}")
    return ", ".join(codes)


def _failure_codes(answer: Dataset | None) -> str:
    """Every Failure Reason of the answer's Failed SOP Sequence (codes only)."""
    if answer is None:
        return ""
    try:
        return _codes(list(answer.get(_FAILED_SOP_SEQUENCE) or []), "FailureReason")
    except (ValueError, TypeError, AttributeError):
        return ""


def classify(code: int, answer: Dataset | None, sop_instance_uid: str) -> StowOutcome:
    """The outcome of a STOW-RS answer with HTTP status ``code`` for the instance sent."""
    status = _http(code)
    failed = _items_for(answer, _FAILED_SOP_SEQUENCE, sop_instance_uid)
    if code in (HTTPStatus.OK, HTTPStatus.ACCEPTED):
        if failed:
            reasons = [i.get("FailureReason") for i in failed]
            text = f"failure reason {_codes(failed, 'FailureReason') or 'not given'}"
            if all(isinstance(r, int) and dimse.classify(r) is dimse.StatusClass.TRANSIENT for r in reasons):
                return StowOutcome("retry", status, f"DICOMweb destination could not store the object now ({text})")
            return StowOutcome("dead", status, f"DICOMweb destination refused the object ({status}, {text})")
        stored = _items_for(answer, _REFERENCED_SOP_SEQUENCE, sop_instance_uid)
        warnings = _codes(stored, "WarningReason")
        if warnings:
            return StowOutcome("warning", status, f"stored with warning reason {warnings}")
        if stored:
            return StowOutcome("delivered", status, "")
        if code == HTTPStatus.OK and answer is not None:  # a STOW-RS answer that lists nothing failed
            return StowOutcome("delivered", status, "")
        # no readable DICOM answer (a web page from a proxy at a wrong url, an empty body): not
        # proof that anything was stored
        return StowOutcome("dead", status, f"{status}: the answer does not say the object was stored")
    if code in _RETRIED or code >= 500:
        hint = " (check username/password_file or token_file)" if code == HTTPStatus.UNAUTHORIZED else ""
        return StowOutcome("retry", status, f"DICOMweb destination answered {status}{hint}")
    codes = _failure_codes(answer)
    detail = f", failure reason {codes}" if codes else ""
    return StowOutcome("dead", status, f"DICOMweb destination refused the object ({status}{detail})")


def _secret(path: Path | None, what: str) -> str:
    if path is None:
        raise OSError(f"{what} is not set")
    return path.read_text(encoding="utf-8").strip()


def _system_ca() -> str | bool:
    """The system's CA bundle (as ``ssl`` finds it), else requests' own (certifi)."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


class _Capture:
    """The last response of a session (a requests hook): dicomweb-client returns the answer's
    body, not its status, and 200 and 202 mean different things."""

    def __init__(self) -> None:
        self.response: requests.Response | None = None

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self.response = response
        return response


class _Client:
    """One destination's HTTP session (connection pool) and STOW-RS client, for one thread."""

    def __init__(self, dest: PacsSection, timeout_s: float) -> None:
        assert dest.url is not None  # a dicomweb destination has one (agent/config.py)
        self.dest = dest
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc from the environment: the url is reached as given
        self.session.max_redirects = 0
        if dest.url.startswith("https://"):
            self.session.verify = str(dest.ca_file) if dest.ca_file else _system_ca()
            if dest.cert_file and dest.key_file:
                self.session.cert = (str(dest.cert_file), str(dest.key_file))
        self.capture = _Capture()
        self.session.hooks["response"].append(self.capture)
        self.client = DICOMwebClient(dest.url, session=self.session, chunk_size=_ONE_BODY,
                                     timeout=(timeout_s, timeout_s))  # fmt: skip
        self.client.set_http_retry_params(retry=False)

    def authenticate(self) -> None:
        """Set the credentials from their files (read for every request: a renewed token is used
        at once). Raises OSError when a file cannot be read."""
        dest = self.dest
        self.session.auth = None
        self.session.headers.pop("Authorization", None)
        if dest.auth == "basic":
            self.session.auth = (dest.username or "", _secret(dest.password_file, "password_file"))
        elif dest.auth == "bearer":
            self.session.headers["Authorization"] = f"Bearer {_secret(dest.token_file, 'token_file')}"

    def store(self, dataset: Dataset, sop_instance_uid: str) -> StowOutcome:
        self.capture.response = None
        try:
            self.authenticate()
        except OSError as exc:
            return StowOutcome("retry", None, f"DICOMweb credentials unreadable ({exc.__class__.__name__})")
        try:
            self.client.store_instances([dataset])
        except requests.TooManyRedirects:
            return StowOutcome("dead", None, "DICOMweb destination redirected the request (set url to where it points)")
        except requests.HTTPError as exc:
            response = exc.response if exc.response is not None else self.capture.response
            if response is None:
                return StowOutcome("retry", None, "DICOMweb request failed (no answer)")
            return classify(response.status_code, _answer(response), sop_instance_uid)
        except requests.Timeout:
            return StowOutcome("retry", None, "DICOMweb request timed out")
        except requests.RequestException as exc:  # connection refused, reset, TLS failure ...
            return StowOutcome("retry", None, f"DICOMweb destination unreachable ({exc.__class__.__name__})")
        except OSError as exc:  # requests raises a plain OSError for a missing ca/cert/key file
            return StowOutcome("retry", None, f"DICOMweb request could not be made ({exc.__class__.__name__})")
        except (ValueError, KeyError):  # the client could not read a successful answer: judged below
            pass
        response = self.capture.response
        if response is None:
            return StowOutcome("retry", None, "DICOMweb request failed (no answer)")
        return classify(response.status_code, _answer(response), sop_instance_uid)

    def close(self) -> None:
        self.session.close()


def open_client(dest: PacsSection, timeout_s: float) -> _Client:
    """A session to ``dest`` set up as the sender's (TLS, no proxies, no redirects; ``authenticate``
    reads the credentials files): the sweep's QIDO-RS/WADO-RS source uses it (agent/pacs/wado.py)."""
    return _Client(dest, timeout_s)


class StowSender:
    """STOW-RS for the sender's lanes: each thread has its own session per destination (a
    ``requests.Session`` is not shared between threads), kept alive between objects."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[_Client] = []
        self._lock = threading.Lock()

    def _client(self, dest: PacsSection) -> _Client:
        clients: dict[str, _Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(dest.name)
        if client is None:
            client = clients[dest.name] = _Client(dest, self.timeout_s)
            with self._lock:
                self._all.append(client)
        return client

    def store(self, dest: PacsSection, path: Path, sop_instance_uid: str) -> StowOutcome:
        """Send the Part 10 file at ``path`` (SOP Instance ``sop_instance_uid``) to ``dest``."""
        try:
            dataset = dcmread(path)
        except Exception as exc:  # noqa: BLE001 - a missing or corrupt file raises many types; the row says which
            return StowOutcome("dead", None, f"result file unreadable: {exc.__class__.__name__}")
        return self._client(dest).store(dataset, sop_instance_uid)

    def close(self) -> None:
        with self._lock:
            clients, self._all = self._all, []
        for client in clients:
            client.close()


def check(dest: PacsSection, timeout_s: float) -> tuple[bool, str]:
    """Reach the destination as the sender does (TLS, credentials): ``GET <url>/studies?limit=1``
    (QIDO-RS). (ok, what happened in words): ok unless unreachable, refused credentials or a
    server error; a destination that offers STOW-RS alone answers 404 or 405, which is fine."""
    client = _Client(dest, timeout_s)
    try:
        client.authenticate()
        response = client.session.get(
            f"{dest.url}/studies", params={"limit": "1"}, headers={"Accept": "application/dicom+json"},
            timeout=(timeout_s, timeout_s), allow_redirects=False,
        )  # fmt: skip
    except OSError as exc:  # requests' errors are OSErrors too, as is an unreadable credentials file
        return False, f"unreachable ({exc.__class__.__name__})"
    finally:
        client.close()
    code = response.status_code
    ok = code < 500 and code not in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN) and not 300 <= code < 400
    return ok, _http(code)
