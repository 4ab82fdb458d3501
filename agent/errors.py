"""The exception hierarchy of the agent. Nothing else defines exceptions."""

from __future__ import annotations


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


class HelperDied(ProcessingError):
    """A helper process (agent/helper.py) died with the call (killed, out of memory); it is replaced."""


class HelperClosed(ProcessingError):
    """A helper process was closed (the service is stopping) before the call ran."""


class TransientError(AgentError):
    """PACS unreachable or busy, database busy: retried with backoff, then DEAD."""


class StorageError(TransientError):
    """Disk or database trouble while keeping an instance (answered as out of resources)."""
