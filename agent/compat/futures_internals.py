"""The standard library's process pool internals that the helper processes rely on (ADR 0010).

``concurrent.futures.ProcessPoolExecutor`` offers no public way to name or kill its worker
processes; agent/helper.py needs both (to kill a helper stuck in a call, and to report the
helpers' pids). Its ``_processes`` mapping (pid -> ``multiprocessing.Process``) holds them. Checked
against Python 3.11 to 3.13 (``CHECKED_PYTHON``); ``problems()`` says when it no longer holds.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

#: the Python versions whose ProcessPoolExecutor was checked to keep its workers in ``_processes``
CHECKED_PYTHON: tuple[tuple[int, int], tuple[int, int]] = ((3, 11), (3, 14))


def pool_processes(pool: ProcessPoolExecutor) -> dict[int, Any]:
    """The pool's worker processes by pid (empty before the first call started one)."""
    return dict(pool._processes or {})


def problems() -> list[str]:
    """One line per internal that no longer holds with this Python; empty when all is well."""
    found = []
    lower, upper = CHECKED_PYTHON
    if not lower <= sys.version_info[:2] < upper:
        found.append(f"Python {sys.version_info[0]}.{sys.version_info[1]} is outside the versions checked "
                     f"({lower[0]}.{lower[1]} to before {upper[0]}.{upper[1]}): check ProcessPoolExecutor._processes")
    pool = ProcessPoolExecutor(max_workers=1)
    try:
        if not hasattr(pool, "_processes"):
            found.append("ProcessPoolExecutor has no _processes (the helpers' pids and kill)")
    finally:
        pool.shutdown(wait=False)
    return found
