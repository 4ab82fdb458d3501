"""Fail points: crash the process at a named step, for the crash-consistency tests.

Off unless the environment variable ``STRNET_FAILPOINT`` names a point, optionally with the hit
on which to fire: ``STRNET_FAILPOINT=mid_send:2`` kills the process (SIGKILL, no clean-up) the
second time the sender reaches ``mid_send``. Never set in production.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = (
    "before_fsync",  # received, spool write not yet durable
    "after_fsync",  # spool file durable, job row not committed
    "after_commit",  # job row committed, C-STORE response not sent
    "mid_inference",  # batch scored, nothing recorded
    "results_built",  # SR/SC written to disk, rows not committed
    "mid_send",  # association open, object not yet sent
    "after_ack",  # PACS acknowledged, outbox row not updated
    "mid_sweep",  # a swept study retrieved, not yet marked done
)

_spec = os.environ.get("STRNET_FAILPOINT", "")
_name, _, _nth = _spec.partition(":")
_target = int(_nth) if _nth.isdigit() else 1
_hits = 0
_lock = threading.Lock()


def hit(name: str) -> None:
    """Kill the process here if this point is armed and its hit count is reached."""
    global _hits
    if name != _name:
        return
    with _lock:
        _hits += 1
        if _hits >= _target:
            os.kill(os.getpid(), signal.SIGKILL)
