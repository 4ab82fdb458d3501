"""One typed settings tree: TOML file < environment ``STRNET_*`` (``__`` between levels) < CLI.

The keys under ``[agent]``, ``[scp]``, ``[[scp.peers]]``, ``[[pacs]]`` and ``[web]`` are a
contract (docs, tests and tooling rely on them). ``docs/configuration.md`` is generated from
this module (``strnet config docs``); a test fails when it is out of date.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("agent.toml")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default repertoire, no backslash


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(stripped):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters without backslash")
    return stripped


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
        label = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
        if len(value) > 253 or not all(label.fullmatch(x) for x in labels):
            raise ValueError(f"not an IP address or host name: {value!r}") from None
    return value


def _check_web_url(value: str | None) -> str | None:
    """An http(s) URL with a host and no user, query or fragment (credentials go in files), without
    its trailing slash."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("no user or password in the URL: use auth, username and password_file")
    if parts.query or parts.fragment:
        raise ValueError("the DICOMweb root, without query or fragment")
    _check_host(parts.hostname)
    return value.rstrip("/")


def _check_threshold(value: str) -> str:
    if value in ("served", "point", "conservative"):
        return value
    try:
        p = float(value)
    except ValueError:
        raise ValueError(f"served, point, conservative or a probability, not {value!r}") from None
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability is between 0 and 1 (exclusive), not {value!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentSection(_Section):
    data_dir: Path = Field(Path("var"), description="Database, spool and everything else the agent writes.")
    database_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the database; default: SQLite file in data_dir. postgresql://user@host/db "
            "for PostgreSQL (the postgres extra); several agents may share one database, each with its own node "
            "(docs/operations.md, several agents)."
        ),
    )
    min_free_disk_mb: int = Field(
        1024,
        ge=0,
        description="Refuse new instances (status 0xA700) when free space in data_dir would drop below this.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: JSON when stderr is not a terminal, readable text when it is."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    db_busy_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a database write waits for another writer's lock before it fails (C-STORE 0xA700).",
    )
    site_salt: str = Field(
        "strnet",
        description="Salt for the hashed study identifiers written to logs (set one per site).",
    )
    node: str = Field(
        "",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$",
        description=(
            "This agent's name among the agents sharing one database (letters, digits, . _ -); stored with "
            "every instance, job lease, SR, result file and outbox row it creates. Empty: the host name."
        ),
    )
    storage: Literal["node", "shared"] = Field(
        "node",
        description=(
            "node: each agent keeps its spool and results in its own data_dir and works only on what it "
            "received; shared: spool and results under shared_dir, which every agent mounts, and any agent "
            "works on anything (docs/operations.md, several agents)."
        ),
    )
    shared_dir: Path | None = Field(
        None, description="With storage = \"shared\": the folder every agent mounts (spool and results go there)."
    )
    node_timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "An agent that has not written its heartbeat for this long is gone: its open associations no "
            "longer hold an SR back, and (shared storage) its outbox rows being sent are sent again."
        ),
    )

    @model_validator(mode="after")
    def _shared_needs_dir(self) -> AgentSection:
        if self.storage == "shared" and self.shared_dir is None:
            raise ValueError('storage = "shared" needs shared_dir (the folder every agent mounts)')
        return self


class PeerSection(_Section):
    ae_title: str = Field(description="Calling AE title allowed to store.")
    host: str = Field(
        description="Address that AE title must connect from: an IP address, or a host name (resolved "
        "when first needed, again every minute, and at once when a caller's address matches none)."
    )

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_host)


class TlsSection(_Section):
    enabled: bool = Field(False, description="Serve DICOM over TLS (1.2 or later).")
    cert_file: Path | None = Field(None, description="PEM certificate chain of the agent.")
    key_file: Path | None = Field(None, description="PEM private key of the agent.")
    ca_file: Path | None = Field(None, description="PEM CA bundle used to verify peers' certificates.")
    require_client_cert: bool = Field(False, description="Require and verify a client certificate.")


class ScpSection(_Section):
    ae_title: str = Field("STRNET", description="Called AE title of the agent; other titles are refused.")
    bind: str = Field("127.0.0.1", description="Address the DICOM listener binds.")
    port: int = Field(11112, ge=1, le=65535, description="DICOM listener port.")
    peers: list[PeerSection] = Field(
        default_factory=lambda: [PeerSection(ae_title="ORTHANC", host="127.0.0.1")],
        description="Calling AE titles allowed to store, each bound to a host address.",
    )
    max_associations: int = Field(16, ge=1, le=1000, description="Concurrent associations accepted.")
    acse_timeout_s: float = Field(30.0, gt=0, description="Association negotiation timeout.")
    dimse_timeout_s: float = Field(60.0, gt=0, description="DIMSE message timeout.")
    network_timeout_s: float = Field(60.0, gt=0, description="Idle network timeout of an association.")
    max_instance_mb: int = Field(512, ge=1, description="Largest instance accepted (status 0xA700 above).")
    tls: TlsSection = Field(default_factory=TlsSection, description="DICOM TLS.")

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("bind")(_check_host)


class PacsSection(_Section):
    name: str = Field(description="Name of the destination (used in logs and the database).")
    kind: Literal["dimse", "dicomweb"] = Field(
        "dimse",
        description="How results reach it: dimse (C-STORE to ae_title at host:port) or dicomweb "
        "(STOW-RS to url; docs/dicom-conformance.md, DICOMweb).",
    )
    ae_title: str = Field("", description="Called AE title of the destination (dimse: required).")
    host: str = Field("", description="Address of the destination (dimse: required).")
    port: int = Field(0, ge=1, le=65535, description="Port of the destination (dimse: required).")
    url: str | None = Field(
        None,
        description="DICOMweb root of the destination (dicomweb: required), e.g. "
        "https://pacs.example.org/dicom-web: results are posted to <url>/studies.",
    )
    auth: Literal["none", "basic", "bearer"] = Field(
        "none",
        description="dicomweb: HTTP authentication: basic (username, password_file) or bearer (token_file).",
    )
    username: str | None = Field(None, description="dicomweb, auth = basic: the user name.")
    password_file: Path | None = Field(
        None, description="dicomweb, auth = basic: a file holding the password (read for every request)."
    )
    token_file: Path | None = Field(
        None, description="dicomweb, auth = bearer: a file holding the token (read for every request)."
    )
    calling_ae_title: str | None = Field(None, description="Our AE title towards it; default scp.ae_title.")
    tls: bool = Field(False, description="Send to this destination over TLS (1.2 or later), verifying its certificate.")
    ca_file: Path | None = Field(
        None,
        description="PEM CA bundle that verifies the destination's certificate (dimse with tls, or an https "
        "url); default: the system store.",
    )
    cert_file: Path | None = Field(
        None, description="PEM client certificate chain, when the destination asks for one (dimse with tls, or https)."
    )
    key_file: Path | None = Field(None, description="PEM private key for cert_file.")
    tls_server_name: str | None = Field(
        None, description="Name the destination's certificate must carry; default: host."
    )
    query: bool = Field(
        False,
        description="The retrospective sweep may query and retrieve from this destination ([sweep], `strnet "
        "sweep`): C-FIND and C-MOVE/C-GET (sweep.retrieve) for dimse, QIDO-RS and WADO-RS at url for dicomweb.",
    )
    storage_commitment: bool = Field(
        False,
        description="Ask this destination to commit to keeping each result (Storage Commitment Push Model, "
        "N-ACTION after the C-STORE): the result is COMMITTED once its N-EVENT-REPORT says so, on the same "
        "association or on one the PACS opens to the agent's listener (scp.ae_title; the PACS's calling AE "
        "title must be in scp.peers). dimse only.",
    )
    storage_commitment_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A result whose commitment is not confirmed this long after it was asked goes back to "
        "RETRY: sent again, then asked again (DEAD after sender.max_attempts).",
    )

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_host)
    _url = field_validator("url")(_check_web_url)


class EligibilitySection(_Section):
    modalities: list[str] = Field(["DX", "CR"], description="Modality values screened.")
    body_parts: list[str] = Field(["KNEE"], description="BodyPartExamined values screened (upper case).")
    anatomic_region_codes: list[str] = Field(
        ["72696002", "T-15710"],
        description="AnatomicRegionSequence code values accepted as knee (SNOMED CT, SRT).",
    )
    min_age_years: int = Field(18, ge=0, description="Youngest patient screened; unknown age is allowed.")
    max_pixels: int = Field(
        60_000_000, ge=1, description="Largest Rows x Columns decoded (a pixel bomb guard)."
    )


class Hl7Section(_Section):
    name: str = Field(description="Name of the HL7 v2 destination (logs, the outbox, the database).")
    host: str = Field(description="Address of the interface engine's MLLP listener.")
    port: int = Field(ge=1, le=65535, description="Port of the MLLP listener.")
    tls: bool = Field(False, description="MLLP over TLS (1.2 or later), verifying the listener's certificate.")
    ca_file: Path | None = Field(None, description="PEM CA bundle for tls; default: the system store.")
    cert_file: Path | None = Field(None, description="PEM client certificate chain, when the listener asks for one.")
    key_file: Path | None = Field(None, description="PEM private key for cert_file.")
    sending_application: str = Field("STRNET", description="MSH-3 Sending Application.")
    sending_facility: str = Field("", description="MSH-4 Sending Facility.")
    receiving_application: str = Field("", description="MSH-5 Receiving Application.")
    receiving_facility: str = Field("", description="MSH-6 Receiving Facility.")
    timeout_s: float = Field(30.0, gt=0, description="Connect and ACK wait of one delivery.")
    send_swept: bool = Field(
        True, description="Also send the results of studies the archive sweep retrieved (else the live ones only)."
    )

    _host = field_validator("host")(_check_host)


class FhirSection(_Section):
    name: str = Field(description="Name of the FHIR destination (logs, the outbox, the database).")
    base_url: str = Field(description="FHIR R4 base URL; a transaction Bundle is posted to it.")
    token_file: Path | None = Field(
        None, description="A file holding a bearer token (read for every request); none: no Authorization."
    )
    ca_file: Path | None = Field(None, description="PEM CA bundle for an https base_url; default: the system store.")
    cert_file: Path | None = Field(None, description="PEM client certificate chain (mTLS).")
    key_file: Path | None = Field(None, description="PEM private key for cert_file.")
    identifier_system: str = Field(
        "urn:strnet-agent",
        description="Prefix of the identifier systems of the resources the agent creates (conditional creates "
        "are keyed on them).",
    )
    patient_identifier_system: str = Field(
        "urn:oid:1.2.840.10008.2.16.4",
        description="System of the Patient identifier (DICOM PatientID); IssuerOfPatientID, when present, is "
        "appended as urn:dicom:issuer:<issuer>; set your MPI's system here.",
    )
    referral: Literal["service-request", "task", "none"] = Field(
        "service-request",
        description="What a newly flagged patient gets: a ServiceRequest proposing a DXA scan, a Task for the "
        "fracture liaison service, or nothing.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Connect and read timeout of one request.")
    send_swept: bool = Field(
        True, description="Also send the results of studies the archive sweep retrieved (else the live ones only)."
    )
    send_assessments: bool = Field(
        False,
        description="Send a radiologist's verdict onward: the study's DiagnosticReport and Observations "
        "updated to final (finding confirmed) or amended (rejected, with the reasons), no referral after a "
        "rejection.",
    )

    _url = field_validator("base_url")(_check_web_url)


class AtnaSection(_Section):
    enabled: bool = Field(
        False, description="Also send every audit event to the hospital's audit repository (IHE ATNA, syslog)."
    )
    host: str = Field("127.0.0.1", description="Address of the audit repository's syslog listener.")
    port: int = Field(6514, ge=1, le=65535, description="Its port (6514: syslog over TLS, RFC 5425).")
    transport: Literal["tls", "udp"] = Field("tls", description="tls (RFC 5425) or udp (RFC 5426).")
    ca_file: Path | None = Field(None, description="PEM CA bundle for tls; default: the system store.")
    cert_file: Path | None = Field(None, description="PEM client certificate chain (mutual TLS, as ATNA asks).")
    key_file: Path | None = Field(None, description="PEM private key for cert_file.")
    app_name: str = Field("strnet", description="RFC 5424 APP-NAME.")
    audit_source_id: str = Field("strnet-agent", description="AuditSourceIdentification AuditSourceID.")
    timeout_s: float = Field(10.0, gt=0, description="Connect and send timeout.")

    _host = field_validator("host")(_check_host)


_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class SweepSection(_Section):
    enabled: bool = Field(
        False,
        description="Sweep the archive on a schedule while serving: query every [[pacs]] with query = true "
        "for knee studies since `since` and retrieve the unscreened ones (docs/operations.md, Sweep).",
    )
    since: str | None = Field(
        None,
        description="Oldest study date (YYYY-MM-DD) the scheduled sweep screens; it walks day by day up to "
        "yesterday. Required when enabled.",
    )
    window: str = Field(
        "20:00-06:00",
        description="Local time window (HH:MM-HH:MM, may cross midnight) in which the scheduled sweep "
        "retrieves; `strnet sweep` runs when started.",
    )
    max_studies_per_hour: int = Field(
        60, ge=1, description="Most studies the sweep retrieves in any hour (scheduled and `strnet sweep`)."
    )
    modalities: list[str] = Field(
        ["CR", "DX"],
        description="Modalities queried (ModalitiesInStudy, one C-FIND each); series are then kept by "
        "the [eligibility] body-part rules.",
    )
    retrieve: Literal["move", "get"] = Field(
        "move",
        description="move: C-MOVE to move_ae_title, the instances arrive at the agent's listener; get: "
        "C-GET, the instances arrive on the query association. A kind = \"dicomweb\" [[pacs]] always "
        "retrieves by WADO-RS.",
    )
    move_ae_title: str | None = Field(
        None, description="Move destination (the PACS must know it); default scp.ae_title."
    )
    send_results: bool = Field(
        True,
        description="Send SRs and overlays of swept studies to PACS; false: only the flagged-patient "
        "registry (results recorded as shadow).",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Association and DIMSE timeout (DICOMweb: connect and read) of queries and retrieves."
    )

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        if not _WINDOW_RE.match(value.strip()):
            raise ValueError("a time window as HH:MM-HH:MM (24 h, local time)")
        return value.strip()

    @field_validator("since")
    @classmethod
    def _since(cls, value: str | None) -> str | None:
        if value is not None and not _DATE_RE.match(value):
            raise ValueError("a date as YYYY-MM-DD")
        return value

    @field_validator("move_ae_title")
    @classmethod
    def _move_ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        out = [m.strip().upper() for m in value]
        if not out or not all(re.fullmatch(r"[A-Z0-9 _]{1,16}", m) for m in out):
            raise ValueError("one or more modality values (CS, e.g. CR, DX)")
        return out


class WorkerSection(_Section):
    enabled: bool = Field(True, description="Screen queued jobs in this process.")
    process: bool = Field(
        True,
        description="Screen (decode, STR-Net, overlay build) in a process of its own beside the one "
        "that receives, records and sends, so both cores work; false = in a thread of this process.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    weights: Path | None = Field(None, description="STR-Net checkpoint metadata JSON; default: the shipped one.")
    threshold: str = Field(
        "served",
        description="Operating point: served (the checkpoint's), point, conservative, or a probability "
        "between 0 and 1.",
    )
    max_batch: int = Field(
        0, ge=0, le=256,
        description="Images scored together (micro-batch); 0 = auto: 2 on the CPU (measured faster "
        "than 8 end to end), 16 on CUDA.",
    )
    max_wait_ms: int = Field(50, ge=0, description="How long a partial batch waits for more images.")
    lease_s: float = Field(300.0, gt=0, description="A job not acknowledged within this is handed out again.")
    max_attempts: int = Field(3, ge=1, description="Attempts before a repeatedly failing job is DEAD.")
    saliency: bool = Field(True, description="Compute the Grad-CAM heat map for the overlay.")
    cpu_threads: int = Field(
        0, ge=0, le=256,
        description="Threads torch may use for CPU inference; 0 = automatic: one fewer than the cores in "
        "the screening process (the main process uses the other), torch's default (one per core) inline.",
    )
    decode_processes: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Processes that decode and preprocess a batch's compressed films in parallel (JPEG 2000: "
        "about 550 ms a 2500 x 2000 film on one core), started at the first batch with two or more of them; "
        "unset = none on fewer than 4 cores (no gain measured on 2), else one fewer than the cores, at most 4; "
        "0 = decode in the screening process, one film after another.",
    )

    _threshold = field_validator("threshold")(_check_threshold)


class ReportingSection(_Section):
    quiet_period_s: float = Field(
        10.0,
        ge=0,
        description="A study's SR is written this long after its last instance (extended while an "
        "association that brought instances of the study is still open).",
    )
    overlay: bool = Field(True, description="Send a secondary-capture overlay per screened image.")
    build_processes: int = Field(
        1,
        ge=0,
        le=4,
        description=(
            "Helper processes that build the study SRs (highdicom, pure Python), so the builds do not "
            "hold up receive and recording; 0 = build in the study-completion sweep's thread."
        ),
    )
    build_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "A study's SR build in a helper process that takes longer is stopped (the helper is "
            "replaced) and counted as a failure of that study, so one stuck build cannot hold up "
            "every later SR. Builds in the sweep's thread (build_processes = 0) are not timed."
        ),
    )


class SenderSection(_Section):
    send: bool = Field(True, description="false = shadow mode: compute and record everything, send nothing.")
    max_attempts: int = Field(8, ge=1, description="Delivery attempts before an object is DEAD.")
    backoff_base_s: float = Field(5.0, gt=0, description="First retry delay; doubles each attempt, with jitter.")
    backoff_max_s: float = Field(600.0, gt=0, description="Longest retry delay.")
    timeout_s: float = Field(30.0, gt=0, description="Connection, association and DIMSE timeout towards PACS.")
    poll_s: float = Field(1.0, gt=0, description="How often the sender looks for due objects.")
    keep_open_s: float = Field(
        5.0,
        ge=0,
        description="Keep an association to a destination open this long after its last send, so a "
        "stream of results does not wait for an association set-up per batch (a held association "
        "idles with pynetdicom's polling slowed: about 13 ms of CPU per second); 0 = release after "
        "each batch. Keep it below the PACS's own idle timeout (Orthanc: 30 s).",
    )
    connections: int = Field(
        2,
        ge=1,
        le=8,
        description="Associations to each destination that send at the same time, each in a thread "
        "of its own: a PACS spends most of a C-STORE's time writing, not on the wire (Orthanc: "
        "115 ms per 2 MB overlay, 22 ms of it CPU), so a second association nearly halves the "
        "outbox wait under load. 1 = one object at a time.",
    )


class RetentionSection(_Section):
    spool_days: float = Field(
        7.0,
        ge=0,
        description="Days a spool file is kept, counted from its receipt; it goes only once its job is done or "
        "skipped and every result of its study is delivered. A job given up (DEAD) keeps its file until a replay "
        "(`strnet jobs retry`) finishes it.",
    )


class BackupSection(_Section):
    enabled: bool = Field(True, description="Back up the database on a schedule while serving.")
    folder: Path | None = Field(None, description="Where backups go; default data_dir/backups.")
    every_hours: float = Field(24.0, gt=0, description="Time between scheduled backups.")
    keep_days: float = Field(14.0, gt=0, description="Scheduled backups older than this are deleted.")


class DigestSection(_Section):
    folder: Path | None = Field(
        None, description="Write a daily CSV of newly flagged patients here (PHI: a protected share); unset = off."
    )
    hour_utc: int = Field(6, ge=0, le=23, description="Hour (UTC) at which the daily digest is written.")


class FlsSection(_Section):
    overdue_days: int = Field(
        42,
        ge=1,
        le=3650,
        description="A patient referred for DXA with no DXA result after this many days is overdue "
        "(worklist marker and filter, the daily digest's overdue list).",
    )


class WebSection(_Section):
    enabled: bool = Field(True, description="Serve the admin web from `strnet serve` (`--no-web` turns it off).")
    bind: str = Field("127.0.0.1", description="Address of the admin web.")
    port: int = Field(8080, ge=1, le=65535, description="Port of the admin web.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve the admin web over HTTPS.")
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file.")
    behind_tls_proxy: bool = Field(
        False,
        description=(
            "A reverse proxy terminates TLS in front of the web: cookies are marked Secure; with trusted_proxies "
            "empty, X-Forwarded-For from 127.0.0.1 is believed."
        ),
    )
    session_secret: str | None = Field(
        None, description="Key that signs the login-form token; default: a random key kept in data_dir/web_secret."
    )
    idle_timeout_s: float = Field(900.0, gt=0, description="Idle time after which a web session is logged off.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses (or networks) of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto headers are "
            "believed: the audit trail and the login throttle then see the browser's address. Empty: "
            "127.0.0.1 when behind_tls_proxy is set (a TLS proxy on the same machine), else nobody: the "
            "headers are ignored, whoever sends them. A local proxy lets any local process claim an address."
        ),
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "A request whose headers and body have not all arrived this long after its first byte (or after "
            "the connection opened) is cut off, its connection closed."
        ),
    )
    max_form_bytes: int = Field(
        32768, ge=1024, description="Largest request body (a form) the web accepts; larger ones get 413 unread."
    )
    max_login_bytes: int = Field(
        8192, ge=1024, description="Largest body of a login attempt (POST /login); larger ones get 413 unread."
    )
    max_form_fields: int = Field(16, ge=4, le=1000, description="Most fields a submitted form may have (else 400).")
    login_concurrency: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Password checks (argon2, about 0.4 s of CPU each) that may run at the same time, in threads of "
            "their own, never on the web's event loop."
        ),
    )
    login_queue: int = Field(
        8,
        ge=0,
        le=1000,
        description="Login attempts that may wait for a password check; more are answered 503 at once.",
    )
    login_free_failures: int = Field(
        5,
        ge=1,
        description=(
            "Failed logins for one user name from one client address before that pair is throttled (attempts "
            "are refused unchecked until a back-off ends; other addresses are not affected)."
        ),
    )
    login_free_failures_per_client: int = Field(
        20, ge=1, description="Failed logins from one client address, any user names, before that address is throttled."
    )
    login_backoff_s: float = Field(
        1.0, gt=0, description="First back-off of a throttled pair or address; it doubles with each further failure."
    )
    login_backoff_max_s: float = Field(
        900.0,
        gt=0,
        description="Longest back-off; a pair or address quiet this long after its back-off is forgotten.",
    )

    _host = field_validator("bind")(_check_host)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or network: {item!r}") from None
        return value


class Settings(BaseSettings):
    """The whole settings tree."""

    model_config = SettingsConfigDict(
        env_prefix="STRNET_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    # load_settings() makes a subclass carrying the file: pydantic-settings builds sources per class
    toml_path: ClassVar[Path | None] = None

    agent: AgentSection = Field(default_factory=AgentSection)
    scp: ScpSection = Field(default_factory=ScpSection)
    pacs: list[PacsSection] = Field(
        default_factory=lambda: [PacsSection(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)]
    )
    eligibility: EligibilitySection = Field(default_factory=EligibilitySection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    reporting: ReportingSection = Field(default_factory=ReportingSection)
    sender: SenderSection = Field(default_factory=SenderSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    backup: BackupSection = Field(default_factory=BackupSection)
    digest: DigestSection = Field(default_factory=DigestSection)
    fls: FlsSection = Field(default_factory=FlsSection)
    web: WebSection = Field(default_factory=WebSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    hl7: list[Hl7Section] = Field(default_factory=list, description="HL7 v2 ORU^R01 destinations (MLLP).")
    fhir: list[FhirSection] = Field(default_factory=list, description="FHIR R4 destinations.")
    atna: AtnaSection = Field(default_factory=AtnaSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = cls.toml_path
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # Derived paths -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.agent.data_dir

    @property
    def spool_dir(self) -> Path:
        return self._storage_root / "spool"

    @property
    def _storage_root(self) -> Path:
        """data_dir, or with shared storage the folder every agent mounts."""
        if self.agent.storage == "shared" and self.agent.shared_dir is not None:
            return self.agent.shared_dir
        return self.agent.data_dir

    @property
    def node(self) -> str:
        """This agent's node name: ``agent.node``, else the host name (cut to a safe name)."""
        return self.agent.node or (re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.")[:64] or "node")

    @property
    def shared_storage(self) -> bool:
        return self.agent.storage == "shared"

    @property
    def backup_dir(self) -> Path:
        return self.backup.folder or self.agent.data_dir / "backups"

    @property
    def results_dir(self) -> Path:
        return self._storage_root / "results"

    @property
    def database_url(self) -> str:
        if self.agent.database_url:
            return self.agent.database_url
        return f"sqlite:///{(self.agent.data_dir / 'strnet.db').as_posix()}"


def _setting_name(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def load_settings(
    config_file: Path | None = None, *, search_default: bool = True, **overrides: Any
) -> Settings:
    """Read the settings: TOML file, then ``STRNET_*`` variables, then ``overrides`` (from the CLI).

    ``config_file`` None means ``./agent.toml`` when present, else the built-in defaults.
    Raises ConfigError naming the first bad setting.
    """
    if config_file is None and search_default and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError("--config", f"no such file: {config_file}")
        try:
            tomllib.loads(config_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(config_file), f"not valid TOML: {exc}") from None
    cls = type("_LoadedSettings", (Settings,), {"toml_path": config_file})
    try:
        settings = cls(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(_setting_name(tuple(err["loc"])), err["msg"]) from None
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    tls = settings.scp.tls
    if tls.enabled and (tls.cert_file is None or tls.key_file is None):
        raise ConfigError("scp.tls.cert_file", "TLS is enabled but cert_file or key_file is missing")
    if tls.require_client_cert and tls.ca_file is None:
        raise ConfigError("scp.tls.ca_file", "client certificates are required but no ca_file is set")
    web = settings.web
    if (web.tls_cert_file is None) != (web.tls_key_file is None):
        raise ConfigError("web.tls_cert_file", "set both tls_cert_file and tls_key_file, or neither")
    for i, dest in enumerate(settings.pacs):
        if (dest.cert_file is None) != (dest.key_file is None):
            raise ConfigError(f"pacs[{i}].cert_file", "set both cert_file and key_file, or neither")
        _check_destination_kind(i, dest)
        if dest.kind == "dimse" and not dest.tls and (dest.ca_file or dest.cert_file):
            raise ConfigError(f"pacs[{i}].tls", "ca_file/cert_file are set but tls is false")
    names = [p.name for p in settings.pacs] + [h.name for h in settings.hl7] + [f.name for f in settings.fhir]
    if len(names) != len(set(names)):
        raise ConfigError("pacs.name", "destination names must be unique across [[pacs]], [[hl7]] and [[fhir]]")
    pairs = [(f"hl7[{i}]", d.cert_file, d.key_file) for i, d in enumerate(settings.hl7)]
    pairs += [(f"fhir[{i}]", d.cert_file, d.key_file) for i, d in enumerate(settings.fhir)]
    for at, cert, key in pairs:
        if (cert is None) != (key is None):
            raise ConfigError(f"{at}.cert_file", "set both cert_file and key_file, or neither")
    atna = settings.atna
    if (atna.cert_file is None) != (atna.key_file is None):
        raise ConfigError("atna.cert_file", "set both cert_file and key_file, or neither")
    for i, dest in enumerate(settings.pacs):
        _check_storage_commitment(i, dest, settings)
    if settings.sweep.enabled and settings.sweep.since is None:
        raise ConfigError("sweep.since", "the scheduled sweep is enabled but has no oldest date")
    if settings.sweep.enabled and not any(p.query for p in settings.pacs):
        raise ConfigError("sweep.enabled", "the scheduled sweep is enabled but no [[pacs]] has query = true")
    queried = [p for p in settings.pacs if p.query]
    if queried and all(p.kind == "dicomweb" for p in queried):
        sweep = settings.sweep
        dimse_only = {"retrieve": sweep.retrieve != "move", "move_ae_title": bool(sweep.move_ae_title)}
        for setting, given in dimse_only.items():
            if given:
                raise ConfigError(f"sweep.{setting}", "only for a dimse [[pacs]]: a dicomweb one retrieves by WADO-RS")


def _check_destination_kind(i: int, dest: PacsSection) -> None:
    """A dimse destination has an AE title, host and port; a dicomweb one a url and its
    authentication, and none of the other kind's settings (a mix is a mistake worth naming)."""
    at = f"pacs[{i}]"
    web_only: dict[str, object] = {
        "url": dest.url,
        "username": dest.username,
        "password_file": dest.password_file,
        "token_file": dest.token_file,
        "auth": dest.auth != "none" or None,
    }
    dimse_only: dict[str, object] = {
        "ae_title": dest.ae_title,
        "host": dest.host,
        "port": dest.port,
        "tls": dest.tls or None,
        "calling_ae_title": dest.calling_ae_title,
        "tls_server_name": dest.tls_server_name,
        "storage_commitment": getattr(dest, "storage_commitment", False) or None,  # DIMSE's alone
    }
    if dest.kind == "dimse":
        for key in ("ae_title", "host", "port"):
            if not dimse_only[key]:
                raise ConfigError(f"{at}.{key}", "required for a dimse destination")
        for key, value in web_only.items():
            if value:
                raise ConfigError(f"{at}.{key}", "only for kind = \"dicomweb\"")
        return
    for key, other in dimse_only.items():
        if other:
            raise ConfigError(f"{at}.{key}", "not for kind = \"dicomweb\" (it is reached at url)")
    if not dest.url:
        raise ConfigError(f"{at}.url", "required for a dicomweb destination")
    if (dest.ca_file or dest.cert_file) and not dest.url.startswith("https://"):
        raise ConfigError(f"{at}.ca_file", "ca_file/cert_file are set but url is not https")
    needed = {"basic": ("username", "password_file"), "bearer": ("token_file",), "none": ()}[dest.auth]
    for key in needed:
        if not web_only[key]:
            raise ConfigError(f"{at}.{key}", f"required with auth = \"{dest.auth}\"")
    for key in ("username", "password_file", "token_file"):
        if key not in needed and web_only[key]:
            raise ConfigError(f"{at}.{key}", f"not used with auth = \"{dest.auth}\"")


def _check_storage_commitment(i: int, dest: PacsSection, settings: Settings) -> None:
    """A PACS reports storage commitment to the AE title that asked, at the agent's listener, which
    answers only scp.ae_title; and a commitment is asked up to sender.keep_open_s after the C-STORE."""
    if not dest.storage_commitment:
        return
    if dest.kind != "dimse":
        raise ConfigError(f"pacs[{i}].storage_commitment", "only for kind = \"dimse\" (DICOMweb has none)")
    if dest.calling_ae_title and dest.calling_ae_title != settings.scp.ae_title:
        raise ConfigError(
            f"pacs[{i}].calling_ae_title",
            "with storage_commitment the PACS reports to the AE title that asked, and the agent's "
            "listener answers only scp.ae_title: leave calling_ae_title unset or equal to it",
        )
    if dest.storage_commitment_timeout_s <= settings.sender.keep_open_s:
        raise ConfigError(
            f"pacs[{i}].storage_commitment_timeout_s",
            "must be longer than sender.keep_open_s (a commitment is asked up to that long after the C-STORE)",
        )
