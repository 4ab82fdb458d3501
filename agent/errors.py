"""The exception hierarchy of the agent (nothing else defines exceptions), and the one rule by
which an exception becomes text that may be shown or logged (``reason_of``, ``redact``)."""

from __future__ import annotations

import re

#: a UID in a message (a study UID is logged only hashed)
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
#: the longest reason kept (a job's reason column, a log field)
MAX_REASON = 400


def redact(text: str) -> str:
    """A message up to the first value it quotes (a quoted value may itself hold a quote, as in
    O'Brien, so nothing after it is kept), with the UIDs it names replaced.

    Libraries (pydicom, highdicom, codecs) quote the element value they fail on, and that value
    may be a patient's name, ID or birth date: their messages pass through here before they
    reach a job reason, a log line or a page."""
    cut = min((i for i in (text.find("'"), text.find('"')) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut] + "[value]"
    return _UID.sub("[uid]", text)


def reason_of(exc: BaseException) -> str:
    """An exception as a job reason or a log field: never an element value.

    The agent's own errors (``AgentError``) keep their wording: they are written to be shown, name
    rules and never values (``redact`` still replaces a UID). Any other exception is named by its
    class only: a library's message may hold the value it failed on, quoted or not (``Unable to
    convert 25/03/1945``), so none of it is kept; the traceback's frames, logged without the
    message (``agent.logging``), say where it happened."""
    if isinstance(exc, AgentError):
        return redact(str(exc))[:MAX_REASON]
    return exc.__class__.__name__


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is invalid: start-up stops with exit code 2 and a message naming the setting."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        self.message = message
        super().__init__(f"{setting}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # raised in a helper process, re-raised here
        return (ConfigError, (self.setting, self.message))


class InputRejected(AgentError):
    """The input is not eligible or not decodable: the job is SKIPPED with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StoreRefused(AgentError):
    """An incoming C-STORE cannot be accepted; ``status`` is the DIMSE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        return (StoreRefused, (self.status, self.reason))


class ProcessingError(AgentError):
    """A deterministic failure in preprocessing, inference or reporting: the job FAILS."""


class BuildError(ProcessingError, ValueError):
    """A result object (SR, overlay) could not be built from its inputs. The message is already a
    reason (``reason_of``): it names no element value. A ValueError too, for callers that catch
    the builders' ValueError."""


class HelperDied(ProcessingError):
    """A helper process (agent/helper.py) died with the call (killed, out of memory); it is replaced."""


class HelperClosed(ProcessingError):
    """A helper process was closed (the service is stopping) before the call ran."""


class TransientError(AgentError):
    """PACS unreachable or busy, database busy: retried with backoff, then DEAD."""


class StorageError(TransientError):
    """Disk or database trouble while keeping an instance (answered as out of resources)."""
