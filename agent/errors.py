"""The exception hierarchy of the agent (DESIGN.md section 5). Nothing else defines exceptions."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is invalid: start-up stops with exit code 2 and a message naming the setting."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")


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


class ProcessingError(AgentError):
    """A deterministic failure in preprocessing, inference or reporting: the job FAILS."""


class TransientError(AgentError):
    """PACS unreachable or busy, database busy: retried with backoff, then DEAD."""


class StorageError(TransientError):
    """Disk or database trouble while keeping an instance (answered as out of resources)."""
