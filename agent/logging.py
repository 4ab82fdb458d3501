"""structlog set-up: one pipeline for our events and library logs, with a PHI scrubber.

Events are snake_case facts (``instance_received``). Fields carry job ids, SOP Instance UIDs,
hashed study UIDs, AE titles and timings, never a patient name, ID or birth date. The scrubber is
the last line of defence: it drops any field whose name denotes PHI, whatever the caller passed.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import traceback
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from agent.errors import reason_of, redact

# Field names that denote PHI; values under these keys never reach a log line.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "birth_date",
        "patient_address",
        "accession_number",
        "accessionnumber",
        "other_patient_ids",
        "referring_physician_name",
        "institution_name",
        "patient",
        "dataset",
        "ds",
    }
)

_salt = b"strnet"
_config: tuple[str, str, str] | None = None  # what configure_logging was given: helper processes repeat it


def hash_uid(uid: str | None) -> str | None:
    """A short salted hash of a study UID: correlates log lines without revealing the UID."""
    if not uid:
        return None
    return hashlib.sha256(_salt + uid.encode("ascii", "replace")).hexdigest()[:16]


def scrub_phi(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop PHI fields; replace a raw study UID by its hash."""
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = "[redacted]"
    study = event_dict.pop("study_instance_uid", None)
    if study is not None:
        event_dict["study"] = hash_uid(str(study))
    return event_dict


def redact_exception(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A logged exception as its traceback's frames and ``reason_of``: the last line of a plain
    traceback is the exception's message, which may hold the element value it failed on."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and exc_info[1] is not None:
        frames = "".join(traceback.format_tb(exc_info[2]))
        event_dict["exception"] = f"Traceback (most recent call last):\n{frames}{reason_of(exc_info[1])}"
    return event_dict


def redact_warning(text: str) -> str:
    """A library warning's text up to the first value it quotes, with the UIDs it names replaced:
    the rule job reasons follow too (``agent.errors.redact``)."""
    return redact(text)


def _warning_to_log(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """``warnings.showwarning``: a library's warning becomes a ``library_warning`` event of the
    log's own format (it was a raw line on stderr, quoting element values, in a JSON log)."""
    where = Path(filename)
    get_logger("py.warnings").warning(
        "library_warning",
        category=category.__name__,
        source=f"{where.parent.name}/{where.name}:{lineno}",
        message=redact_warning(str(message)),
    )


def current_config() -> tuple[str, str, str] | None:
    """(level, format, salt) as last configured in this process; None before."""
    return _config


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a record is written, not as it was when
    logging was configured: a process that replaces the stream (a test runner's capture, a daemon
    redirecting it) keeps its log instead of writing to a closed file ("--- Logging error ---")."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str = "info", fmt: str = "auto", salt: str = "strnet") -> None:
    """Configure structlog and route the standard library's loggers and Python's warnings through it."""
    global _salt, _config
    _salt = salt.encode()
    _config = (level, fmt, salt)
    warnings.showwarning = _warning_to_log
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_phi,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_exception,  # before format_exc_info, which would print the message
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom's debug output dumps datasets (PHI): keep it at WARNING whatever the level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").propagate = True
    for h in list(logging.getLogger("pynetdicom").handlers):
        logging.getLogger("pynetdicom").removeHandler(h)
    # pydicom's warnings quote element values (a PN value is PHI): errors only
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    sched_log = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _SkippedTick) for f in sched_log.filters):
        sched_log.addFilter(_SkippedTick())
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # a line per object sent at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations run on every command
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)


class _SkippedTick(logging.Filter):
    """Drops apscheduler's "skipped: maximum number of running instances reached": every periodic
    job runs one at a time and does all that is due when it runs, so a tick that comes while the
    last one still works (the study-completion sweep polls every 0.5 s) is skipped by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
