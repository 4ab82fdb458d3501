"""Delivers a transaction Bundle (agent/ehr/fhir_bundle.py) to a ``[[fhir]]`` destination.

``POST <base_url>`` with ``Content-Type: application/fhir+json``, the bearer token read from
``token_file`` for every request (a renewed token is used at once), TLS verified against
``ca_file`` (else the system store), mutual TLS with ``cert_file``/``key_file``. Redirects are not
followed (a POST redirected would be replayed as a GET).

What the answer does (docs/fhir.md, Status handling):

- 2xx whose ``transaction-response`` gives every entry a 2xx status: delivered.
- 2xx with an entry that is not 2xx, or a body that is not a transaction-response: dead (a server
  that answers so is not a FHIR transaction endpoint; resending would not change it).
- 408, 429, 5xx, 401 (the token may have been renewed), timeouts, connection and TLS failures, an
  unreadable token, CA, certificate or key file: retried with backoff (the outbox gives up after
  ``sender.max_attempts``).
- Any other 4xx, a redirect: dead at once.

Reasons carry the HTTP status, the OperationOutcome's issue codes (``invalid``, ``processing``
...) and exception class names; never the answer's text, which may echo the patient's values.
"""

from __future__ import annotations

import json
import ssl
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests

from agent.config import FhirSection
from agent.ehr.delivery import Delivery

FHIR_JSON = "application/fhir+json"
_RETRIED = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.UNAUTHORIZED})
_MAX_CODES = 5
#: FHIR R4's IssueType codes (http://hl7.org/fhir/issue-type, a required binding): the only codes kept
ISSUE_TYPES = frozenset(
    {
        "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
        "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
        "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict", "transient",
        "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
    }
)  # fmt: skip


def _system_ca() -> str | bool:
    """The system's CA bundle (as ``ssl`` finds it), else requests' own (certifi)."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


def _http(code: int) -> str:
    return f"HTTP {code}"


def _json(response: requests.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def issue_codes(outcome: Any) -> list[str]:
    """The issue codes of an OperationOutcome (``invalid``, ``not-found`` ...) that are in FHIR's
    own code list (``ISSUE_TYPES``), safe to record; never its diagnostics or details text, nor a
    code outside that list (a word there may be the patient's name)."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    found: list[str] = []
    for issue in outcome.get("issue") or []:
        code = issue.get("code") if isinstance(issue, dict) else None
        if isinstance(code, str) and code in ISSUE_TYPES and code not in found:
            found.append(code)
    return found[:_MAX_CODES]


def _with_codes(text: str, codes: list[str]) -> str:
    return f"{text} ({', '.join(codes)})" if codes else text


def _entry_status(entry: Any) -> int | None:
    """The HTTP code of one transaction-response entry ("201 Created" or "201"), None if absent."""
    response = entry.get("response") if isinstance(entry, dict) else None
    status = response.get("status") if isinstance(response, dict) else None
    head = str(status or "").strip().split(" ", 1)[0]
    return int(head) if head.isdigit() and len(head) == 3 else None


def classify(code: int, answer: Any) -> Delivery:
    """What the answer ``code`` with its parsed JSON body ``answer`` makes of the delivery."""
    status = _http(code)
    if 200 <= code < 300:
        if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle":
            return Delivery("dead", status, f"FHIR server answered {status} without a transaction-response Bundle")
        failed: list[int] = []
        entries = answer.get("entry") or []
        for entry in entries:
            entry_code = _entry_status(entry)
            if entry_code is None or not 200 <= entry_code < 300:
                failed.append(entry_code or 0)
        if failed or not entries:
            codes: list[str] = []
            for entry in entries:
                response = entry.get("response") if isinstance(entry, dict) else None
                codes += issue_codes(response.get("outcome") if isinstance(response, dict) else None)
            what = ", ".join(str(c) if c else "none" for c in failed) if failed else "no entries"
            return Delivery("dead", status, _with_codes(f"FHIR transaction entries not stored (status {what})",
                                                        sorted(set(codes))))  # fmt: skip
        return Delivery("delivered", status)
    codes = issue_codes(answer)
    if code in _RETRIED or code >= 500:
        hint = " (check token_file)" if code == HTTPStatus.UNAUTHORIZED else ""
        return Delivery("retry", status, _with_codes(f"FHIR server answered {status}{hint}", codes))
    if 300 <= code < 400:
        return Delivery(
            "dead", status, f"FHIR server redirected the request ({status}; set base_url to where it points)"
        )
    return Delivery("dead", status, _with_codes(f"FHIR server refused the bundle ({status})", codes))


def _secret(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


class _Client:
    """One destination's HTTP session (connection pool), for one thread."""

    def __init__(self, dest: FhirSection) -> None:
        self.dest = dest
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc from the environment: base_url is reached as given
        self.session.max_redirects = 0
        self.session.headers.update({"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
        if dest.base_url.startswith("https://"):
            self.session.verify = str(dest.ca_file) if dest.ca_file else _system_ca()
            if dest.cert_file and dest.key_file:
                self.session.cert = (str(dest.cert_file), str(dest.key_file))

    def post(self, payload: bytes) -> Delivery:
        dest = self.dest
        headers = {}
        if dest.token_file is not None:
            try:
                headers["Authorization"] = f"Bearer {_secret(dest.token_file)}"
            except OSError as exc:
                return Delivery("retry", None, f"FHIR token_file unreadable ({exc.__class__.__name__})")
        try:
            response = self.session.post(
                dest.base_url, data=payload, headers=headers, timeout=(dest.timeout_s, dest.timeout_s),
                allow_redirects=False,
            )  # fmt: skip
        except requests.Timeout:
            return Delivery("retry", None, "FHIR request timed out")
        except requests.TooManyRedirects as exc:  # a 3xx, not followed (max_redirects 0): dead, as classify says
            code = exc.response.status_code if exc.response is not None else HTTPStatus.FOUND
            return classify(code, None)
        except requests.RequestException as exc:  # connection refused, reset, TLS failure ...
            return Delivery("retry", None, f"FHIR server unreachable ({exc.__class__.__name__})")
        except OSError as exc:  # requests raises a plain OSError for a missing ca/cert/key file
            return Delivery("retry", None, f"FHIR request could not be made ({exc.__class__.__name__})")
        return classify(response.status_code, _json(response))

    def close(self) -> None:
        self.session.close()


class FhirTransport:
    """A ``MessageTransport`` for ``[[fhir]]`` destinations: each sender lane (thread) keeps its
    own session per destination (a ``requests.Session`` is not shared between threads), kept
    alive between bundles."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[_Client] = []
        self._lock = threading.Lock()

    def _client(self, dest: FhirSection) -> _Client:
        clients: dict[str, _Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(dest.name)
        if client is None or client.dest != dest:
            if client is not None:
                client.close()
            client = clients[dest.name] = _Client(dest)
            with self._lock:
                self._all.append(client)
        return client

    def deliver(self, dest: object, payload: bytes) -> Delivery:
        if not isinstance(dest, FhirSection):
            raise TypeError("FhirTransport delivers to [[fhir]] destinations only")
        return self._client(dest).post(payload)

    def close(self) -> None:
        with self._lock:
            clients, self._all = self._all, []
        for client in clients:
            client.close()
