"""agent/ehr/fhir_client.py: how an answer is classed, without a server. The same transport
against a real FHIR server (and a fault proxy in front of it) is tests/integration/test_fhir_server.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from agent.config import FhirSection
from agent.ehr.fhir_client import FhirTransport, classify, issue_codes

PHI = "Doe^Jane MRN-0042"


def outcome(*codes: str) -> dict[str, Any]:
    issues = [{"severity": "error", "code": c, "diagnostics": PHI, "details": {"text": PHI}} for c in codes]
    return {"resourceType": "OperationOutcome", "issue": issues}


def response(*statuses: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": s, "outcome": outcome("invalid") if s.startswith("4") else None}}
                      for s in statuses]}  # fmt: skip


def test_every_entry_stored_is_delivered() -> None:
    d = classify(200, response("201 Created", "200", "200 OK"))
    assert (d.verdict, d.status, d.reason) == ("delivered", "HTTP 200", "")


def test_an_entry_not_stored_or_an_answer_without_entries_is_dead_with_codes_only() -> None:
    d = classify(200, response("201", "400 Bad Request"))
    assert d.verdict == "dead" and d.reason == "FHIR transaction entries not stored (status 400) (invalid)"
    assert classify(200, response()).verdict == "dead"
    assert classify(200, {"resourceType": "OperationOutcome"}).verdict == "dead"
    assert classify(201, None).verdict == "dead"


@pytest.mark.parametrize("code", [500, 502, 503, 504, 429, 408, 401])
def test_server_trouble_and_throttling_are_retried(code: int) -> None:
    d = classify(code, outcome("transient", "throttled"))
    assert d.verdict == "retry" and d.status == f"HTTP {code}" and "(transient, throttled)" in d.reason
    assert "Doe" not in d.reason and "MRN" not in d.reason


@pytest.mark.parametrize("code", [400, 403, 404, 409, 412, 422])
def test_other_client_errors_are_dead_with_the_issue_codes_never_the_text(code: int) -> None:
    d = classify(code, outcome("invalid", "invalid", "duplicate"))
    assert d.verdict == "dead" and d.reason == f"FHIR server refused the bundle (HTTP {code}) (invalid, duplicate)"


def test_a_redirect_is_dead() -> None:
    assert classify(302, None).verdict == "dead"


def test_issue_codes_keep_only_code_tokens() -> None:
    assert issue_codes({"resourceType": "OperationOutcome", "issue": [{"code": "not-found"}, {"code": PHI}, {}]}) == [
        "not-found"
    ]
    assert issue_codes({"resourceType": "Patient"}) == [] and issue_codes(None) == []


def test_an_issue_code_outside_fhirs_list_is_not_recorded() -> None:
    """A gateway that puts the patient's name where the code goes (a word, as a code is): only the
    R4 IssueType codes are kept, so the reason holds no text of the answer."""
    answer = outcome("invalid", "Leakcheck", "LEAKCHECK-NAME", "not-found")
    assert issue_codes(answer) == ["invalid", "not-found"]
    d = classify(422, answer)
    assert d.reason == "FHIR server refused the bundle (HTTP 422) (invalid, not-found)"
    assert "leakcheck" not in d.reason.lower()


def test_an_unreadable_token_file_is_retried_before_any_request(tmp_path: Path) -> None:
    dest = FhirSection(name="ehr", base_url=f"http://127.0.0.1:{free_port()}/fhir", token_file=tmp_path / "gone")
    transport = FhirTransport()
    try:
        d = transport.deliver(dest, b"{}")
        assert (d.verdict, d.status, d.reason) == ("retry", None, "FHIR token_file unreadable (FileNotFoundError)")
        with pytest.raises(TypeError):
            transport.deliver(object(), b"{}")
    finally:
        transport.close()


def test_a_missing_client_key_file_is_retried_before_any_request(tmp_path: Path) -> None:
    cert = tmp_path / "client.crt"
    cert.write_text("not read: the missing key stops the request first\n")
    url = f"https://127.0.0.1:{free_port()}/fhir"
    dest = FhirSection(name="ehr", base_url=url, cert_file=cert, key_file=tmp_path / "gone.key")
    transport = FhirTransport()
    try:
        d = transport.deliver(dest, b"{}")
        assert (d.verdict, d.status, d.reason) == ("retry", None, "FHIR request could not be made (OSError)")
    finally:
        transport.close()
