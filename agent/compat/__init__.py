"""Every use of a library's internals lives here, one module per library.

``pynetdicom_internals``, ``highdicom_internals``, ``uvicorn_internals`` and ``futures_internals``
(the standard library's process pool) hold every private attribute, module-global swap,
state-machine name and assumption about a library's call sequence that the agent relies on
(ADR 0010); the rest of the agent uses the libraries' public API and the small functions of
these modules. Each module names the version range it was checked against (``CHECKED_VERSIONS``,
the range pyproject.toml pins) and offers ``problems()``: one readable line per internal that no
longer holds with the installed version, empty when all is well (tests/unit/test_compat.py).

A patch that cannot install at run time leaves the library's public path in place (correct,
slower) and says so: the function that installs it returns a ``PatchMissing`` and the caller
reports it with ``warn_once``, a ``library_patch_missing`` warning once per patch and process.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["PatchMissing", "installed_version", "version_problem", "warn_once"]


@dataclass(frozen=True)
class PatchMissing:
    """A patch that did not install: its name, the internals it lacked, and what that costs."""

    patch: str
    internals: tuple[str, ...]
    effect: str


_warned: set[str] = set()  # patches reported missing in this process
_warned_lock = threading.Lock()


def warn_once(log: Any, missing: PatchMissing) -> bool:
    """Log ``library_patch_missing`` on ``log`` for ``missing.patch``, the first time only in this
    process; returns whether it logged."""
    with _warned_lock:
        if missing.patch in _warned:
            return False
        _warned.add(missing.patch)
    log.warning("library_patch_missing", patch=missing.patch, missing=list(missing.internals), effect=missing.effect)
    return True


def installed_version(distribution: str) -> tuple[int, ...] | None:
    """The installed version of ``distribution`` as numbers (``3.0.4`` -> (3, 0, 4)); None if absent."""
    try:
        text = version(distribution)
    except PackageNotFoundError:
        return None
    found = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in found.group(0).split(".")) if found else None


def version_problem(
    distribution: str, installed: tuple[int, ...] | None, lower: tuple[int, ...], upper: tuple[int, ...]
) -> str | None:
    """A line saying that ``installed`` lies outside ``[lower, upper)``, or None when inside."""
    checked = f">={'.'.join(map(str, lower))},<{'.'.join(map(str, upper))}"
    if installed is None:
        return f"{distribution}: installed version unknown; the internals used were checked against {checked}"
    if not lower <= installed < upper:
        return (
            f"{distribution} {'.'.join(map(str, installed))} is outside {checked}, the range its internals "
            "were checked against: check each internal of this module and widen the range"
        )
    return None
