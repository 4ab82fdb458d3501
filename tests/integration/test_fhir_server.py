"""Issue 21: the FHIR R4 transaction Bundle of a screened study against a real FHIR server.

The server is Medplum's FHIR router over its in-memory repository (npm @medplum/fhir-router,
tests/fhir_server/), started once for this module on a port the OS picks; each test uses its own
patient and studies, so the tests share it. What the server stored is checked by Medplum's
validateResource against the R4 StructureDefinitions (an independent validator: our bundle is
built with fhirclient's models). Answers the server cannot be made to give (503, a slow answer) come
from a small fault proxy in this file, in front of the real server: the answer it fakes is the
only mock here.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, require_tool
from ehr_sample import study
from fhir_server.medplum import MedplumServer
from pydicom.uid import generate_uid

from agent.config import FhirSection
from agent.ehr.content import StudyResult
from agent.ehr.fhir_bundle import build_bundle
from agent.ehr.fhir_client import FhirTransport

pytestmark = [pytest.mark.integration]

KINDS = ("Patient", "Device", "ImagingStudy", "Observation", "DiagnosticReport", "ServiceRequest", "Task")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedplumServer]:
    s = MedplumServer(tmp_path_factory.mktemp("medplum"))
    try:
        yield s
    finally:
        s.stop()


class FaultProxy:
    """Forwards to the real server unless told to answer 503, to be slow or to redirect to the
    real server; records the Authorization and Content-Type headers of each request."""

    def __init__(self, target: str, tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.mode = "pass"
        self.authorizations: list[str | None] = []
        self.content_types: list[str | None] = []
        self.client_ports: list[int] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a FHIR server would

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.authorizations.append(self.headers.get("Authorization"))
                proxy.content_types.append(self.headers.get("Content-Type"))
                proxy.client_ports.append(self.client_address[1])
                if proxy.mode == "503":
                    self.answer(503, {"resourceType": "OperationOutcome",
                                      "issue": [{"severity": "error", "code": "transient"}]})  # fmt: skip
                    return
                if proxy.mode == "redirect":  # a 307 keeps the method and body for a client that follows it
                    self.send_response(307)
                    self.send_header("Location", proxy.target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if proxy.mode == "slow":
                    time.sleep(1.5)
                req = urllib.request.Request(proxy.target, data=body, method="POST",
                                             headers={"Content-Type": "application/fhir+json"})  # fmt: skip
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        self.answer(r.status, json.loads(r.read()))
                except urllib.error.HTTPError as exc:
                    self.answer(exc.code, json.loads(exc.read()))

            def answer(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (the slow case)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a refused TLS handshake: the client's side is what the tests look at

        self.httpd = Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def proxy(server: MedplumServer) -> Iterator[FaultProxy]:
    p = FaultProxy(server.base_url)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def transport() -> Iterator[FhirTransport]:
    t = FhirTransport()
    try:
        yield t
    finally:
        t.close()


def dest(url: str, **kw: Any) -> FhirSection:
    return FhirSection(name="ehr", base_url=url, **kw)


def new_patient() -> dict[str, str]:
    return {"PatientID": f"MRN-{uuid.uuid4().hex[:10]}", "IssuerOfPatientID": "HOSP-A"}


def counts(server: MedplumServer, result: StudyResult) -> dict[str, int]:
    """How many resources of each kind the server holds for this result's patient and study."""
    patient = server.search(f"Patient?identifier=urn:dicom:issuer:HOSP-A|{result.patient_id}")
    uid = "identifier=urn:dicom:uid|urn:oid:"
    out = {
        "Patient": len(patient),
        "Device": len(server.search(f"Device?{uid}{result.device_uid}")),
        "ImagingStudy": len(server.search(f"ImagingStudy?{uid}{result.study_instance_uid}")),
    }
    if patient:
        ref = f"Patient/{patient[0]['id']}"
        for kind in ("Observation", "DiagnosticReport", "ServiceRequest"):
            out[kind] = len(server.search(f"{kind}?subject={ref}"))
        out["Task"] = len(server.search(f"Task?patient={ref}"))
    return out


def test_the_bundle_is_stored_and_every_stored_resource_validates(
    server: MedplumServer, transport: FhirTransport
) -> None:
    result = study(**new_patient())
    d = transport.deliver(dest(server.base_url), build_bundle(result, dest(server.base_url)))
    assert (d.verdict, d.status) == ("delivered", "HTTP 200")
    assert counts(server, result) == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 3,
                                      "DiagnosticReport": 1, "ServiceRequest": 1, "Task": 0}  # fmt: skip
    patient = server.search(f"Patient?identifier=urn:dicom:issuer:HOSP-A|{result.patient_id}")[0]
    reports = server.search(f"DiagnosticReport?subject=Patient/{patient['id']}")
    report = reports[0]
    assert report["status"] == "preliminary" and report["conclusion"] == result.impression
    for ref in [*report["result"], *report["imagingStudy"]]:  # references resolved to what was stored
        kind, rid = ref["reference"].split("/")
        assert server.search(f"{kind}?_id={rid}")
    task_dest = dest(server.base_url, referral="task")  # the other referral, stored and validated too
    other = study(**new_patient())
    assert transport.deliver(task_dest, build_bundle(other, task_dest)).verdict == "delivered"
    stored = [r for kind in KINDS for r in server.search(f"{kind}?_count=1000")]
    assert {r["resourceType"] for r in stored} == set(KINDS)
    for resource in stored:
        assert server.validate(resource) == [], resource["resourceType"]
    # the validator does find faults: a required element missing, a code outside its required binding
    missing = server.validate({k: v for k, v in report.items() if k != "code"})
    assert [i["expression"] for i in missing] == [["DiagnosticReport.code"]]
    task = next(r for r in stored if r["resourceType"] == "Task")
    unbound = server.validate({**task, "intent": "suggestion", "identifier": [{"use": "main", "value": "x"}]})
    assert sorted(i["expression"][0] for i in unbound) == ["Task.identifier[0].use", "Task.intent"]


def test_a_resend_creates_no_duplicate(server: MedplumServer, transport: FhirTransport) -> None:
    result = study(**new_patient())
    payload = build_bundle(result, dest(server.base_url))
    for _ in range(3):
        assert transport.deliver(dest(server.base_url), payload).verdict == "delivered"
    assert counts(server, result) == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 3,
                                      "DiagnosticReport": 1, "ServiceRequest": 1, "Task": 0}  # fmt: skip


def test_a_patient_id_with_search_separators_is_still_found_on_a_resend(
    server: MedplumServer, transport: FhirTransport
) -> None:
    """The conditional create's search escapes FHIR's separators and the URL's (R4 search 3.1.1.5.7)."""
    odd = {"PatientID": f"MRN,{uuid.uuid4().hex[:6]} &+%$", "IssuerOfPatientID": "Hosp A/&"}
    result = study(**odd)
    payload = build_bundle(result, dest(server.base_url))
    for _ in range(2):
        assert transport.deliver(dest(server.base_url), payload).verdict == "delivered"
    found = [p for p in server.search("Patient?_count=1000") if p["identifier"][0]["value"] == odd["PatientID"]]
    assert len(found) == 1 and found[0]["identifier"][0]["system"] == "urn:dicom:issuer:Hosp%20A%2F%26"


def test_a_later_revision_updates_the_report(server: MedplumServer, transport: FhirTransport) -> None:
    first = study(**new_patient())
    second = dataclasses.replace(first, revision=2, report_sop_instance_uid=generate_uid(),
                                 impression=first.impression + "\nRevision 2.")  # fmt: skip
    for r in (first, second):
        assert transport.deliver(dest(server.base_url), build_bundle(r, dest(server.base_url))).verdict == "delivered"
    assert counts(server, first)["DiagnosticReport"] == 1 and counts(server, first)["Observation"] == 3
    report = server.search(f"DiagnosticReport?identifier=urn:strnet-agent:diagnostic-report|{first.study_instance_uid}")
    assert len(report) == 1 and report[0]["conclusion"].endswith("Revision 2.")
    assert report[0]["extension"] == [{"url": "urn:strnet-agent:99STRNET:revision", "valueInteger": 2}]
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{second.report_sop_instance_uid}", "use": "secondary"} in (
        report[0]["identifier"]
    )


@pytest.mark.parametrize("kind", ["service-request", "task"])
def test_a_second_positive_study_of_the_patient_makes_no_second_referral(
    server: MedplumServer, transport: FhirTransport, kind: str
) -> None:
    patient = new_patient()
    one, two = study(**patient), study(**patient)
    target = dest(server.base_url, referral=kind)
    assert transport.deliver(target, build_bundle(one, target)).verdict == "delivered"
    kind_name = "ServiceRequest" if kind == "service-request" else "Task"
    patient_ref = "Patient/" + server.search(f"Patient?identifier=urn:dicom:issuer:HOSP-A|{one.patient_id}")[0]["id"]
    first = server.search(f"{kind_name}?{'subject' if kind == 'service-request' else 'patient'}={patient_ref}")[0]
    status, _ = server.request("PUT", f"{server.base_url}/{kind_name}/{first['id']}", {**first, "status": "completed"})
    assert status == 200  # done already: a referral with any status still counts
    assert transport.deliver(target, build_bundle(two, target)).verdict == "delivered"
    c = counts(server, one)
    assert c["DiagnosticReport"] == 2 and c["Patient"] == 1
    assert (c["ServiceRequest"], c["Task"]) == ((1, 0) if kind == "service-request" else (0, 1))


def test_a_5xx_is_retried_and_the_token_is_read_for_every_request(
    server: MedplumServer, proxy: FaultProxy, transport: FhirTransport, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    target = dest(proxy.url, token_file=token)
    result = study(**new_patient())
    payload = build_bundle(result, target)
    proxy.mode, proxy.authorizations[:], proxy.client_ports[:], proxy.content_types[:] = "503", [], [], []
    d = transport.deliver(target, payload)
    assert (d.verdict, d.status, d.reason) == ("retry", "HTTP 503", "FHIR server answered HTTP 503 (transient)")
    assert counts(server, result)["Patient"] == 0
    token.write_text("renewed-token\n")
    proxy.mode = "pass"
    assert transport.deliver(target, payload).verdict == "delivered"
    assert proxy.authorizations == ["Bearer first-token", "Bearer renewed-token"]
    assert proxy.content_types == ["application/fhir+json"] * 2
    assert len(set(proxy.client_ports)) == 1  # one session per destination: the connection was kept
    assert counts(server, result)["DiagnosticReport"] == 1


def test_a_timeout_and_a_refused_connection_are_retried(proxy: FaultProxy, transport: FhirTransport) -> None:
    payload = build_bundle(study(**new_patient()), dest(proxy.url))
    proxy.mode = "slow"
    try:
        d = transport.deliver(dest(proxy.url, timeout_s=0.3), payload)
    finally:
        proxy.mode = "pass"
    assert (d.verdict, d.status, d.reason) == ("retry", None, "FHIR request timed out")
    d = transport.deliver(dest(f"http://127.0.0.1:{free_port()}/fhir"), payload)
    assert (d.verdict, d.status) == ("retry", None) and d.reason.startswith("FHIR server unreachable (")


def test_a_redirect_is_not_followed_and_is_dead(
    server: MedplumServer, proxy: FaultProxy, transport: FhirTransport
) -> None:
    result = study(**new_patient())
    payload = build_bundle(result, dest(proxy.url))
    proxy.mode, proxy.authorizations[:] = "redirect", []
    try:
        d = transport.deliver(dest(proxy.url), payload)
    finally:
        proxy.mode = "pass"
    assert (d.verdict, d.status) == ("dead", "HTTP 307") and "redirected" in d.reason
    assert len(proxy.authorizations) == 1 and counts(server, result)["Patient"] == 0  # never sent on


def test_a_bundle_the_server_refuses_is_dead_with_codes_only(server: MedplumServer, transport: FhirTransport) -> None:
    target = dest(server.base_url)
    not_a_bundle = json.dumps({"resourceType": "Patient", "identifier": [{"value": "MRN-SECRET"}]}).encode()
    d = transport.deliver(target, not_a_bundle)  # Medplum answers 400 "Not a bundle"
    assert (d.verdict, d.status, d.reason) == (
        "dead",
        "HTTP 400",
        "FHIR server refused the bundle (HTTP 400) (invalid)",
    )
    patient = {"resourceType": "Patient", "identifier": [{"value": "MRN-SECRET"}]}
    no_request = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient}]}
    d = transport.deliver(target, json.dumps(no_request).encode())  # 200, its entry 400
    assert (d.verdict, d.status) == ("dead", "HTTP 200")
    assert d.reason == "FHIR transaction entries not stored (status 400) (invalid)"


def test_a_patient_the_server_knows_is_referenced_not_overwritten(
    server: MedplumServer, transport: FhirTransport
) -> None:
    patient = new_patient()
    known = {"resourceType": "Patient", "name": [{"family": "Mpi-Name"}],
             "identifier": [{"system": "urn:dicom:issuer:HOSP-A", "value": patient["PatientID"]}]}  # fmt: skip
    status, stored = server.request("POST", f"{server.base_url}/Patient", known)
    assert status == 201
    result = study(**patient)
    uid = {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_instance_uid}"}
    registered = {"resourceType": "ImagingStudy", "status": "available", "description": "from the PACS",
                  "subject": {"reference": f"Patient/{stored['id']}"}, "identifier": [uid]}  # fmt: skip
    assert server.request("POST", f"{server.base_url}/ImagingStudy", registered)[0] == 201
    assert transport.deliver(dest(server.base_url), build_bundle(result, dest(server.base_url))).verdict == "delivered"
    found = server.search(f"Patient?identifier=urn:dicom:issuer:HOSP-A|{result.patient_id}")
    assert len(found) == 1 and found[0]["name"] == [{"family": "Mpi-Name"}] and found[0]["id"] == stored["id"]
    report = server.search(f"DiagnosticReport?subject=Patient/{stored['id']}")
    assert len(report) == 1
    studies = server.search(f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{result.study_instance_uid}")
    assert len(studies) == 1 and studies[0]["description"] == "from the PACS"
    assert report[0]["imagingStudy"] == [{"reference": f"ImagingStudy/{studies[0]['id']}"}]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _pki(d: Path) -> Path:
    """A CA, another CA, a server certificate for 127.0.0.1 and a client certificate."""
    require_tool("openssl")
    for ca in ("ca", "otherca"):
        _openssl("req", "-x509", *_EC_KEY, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN={ca}", cwd=d)  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:strnet")):
        _openssl("req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def test_https_verifies_the_server_with_ca_file_and_presents_the_client_certificate(
    server: MedplumServer, transport: FhirTransport, tmp_path: Path
) -> None:
    pki = _pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a client without a certificate is refused
    tls = FaultProxy(server.base_url, tls=ctx)
    try:
        client = {"cert_file": pki / "client.crt", "key_file": pki / "client.key"}
        result = study(**new_patient())
        payload = build_bundle(result, dest(tls.url))
        d = transport.deliver(dest(tls.url, ca_file=pki / "ca.crt", **client), payload)
        assert d.verdict == "delivered" and counts(server, result)["DiagnosticReport"] == 1
        untrusted = transport.deliver(dest(tls.url, ca_file=pki / "otherca.crt", **client), payload)
        assert untrusted.verdict == "retry" and untrusted.reason == "FHIR server unreachable (SSLError)"
        no_cert = transport.deliver(dest(tls.url, ca_file=pki / "ca.crt"), payload)
        assert no_cert.verdict == "retry" and len(tls.authorizations) == 1
        no_ca = transport.deliver(dest(tls.url, ca_file=tmp_path / "gone.crt", **client), payload)
        assert (no_ca.verdict, no_ca.reason) == ("retry", "FHIR request could not be made (OSError)")
        gone = {"cert_file": tmp_path / "gone.crt", "key_file": pki / "client.key"}
        no_cert_file = transport.deliver(dest(tls.url, ca_file=pki / "ca.crt", **gone), payload)
        assert no_cert_file.verdict == "retry" and len(tls.authorizations) == 1
    finally:
        tls.close()
