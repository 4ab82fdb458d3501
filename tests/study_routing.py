"""Which agent a study goes to: the Python twin of deploy/orthanc/route-knees-by-study.lua.

docs/operations.md section 13 gives the same function; tests/ops/test_deploy.py proves it against
the Lua script in a real Orthanc, and the scale-out bench (tests/bench/bench_scale.py) routes its
studies with it.
"""

from __future__ import annotations


def study_agent(study_uid: str, agents: int) -> int:
    """deploy/orthanc/route-knees-by-study.lua's choice (0-based), as docs/operations.md gives it."""
    h = 0
    for byte in study_uid.encode("ascii"):
        h = (h * 31 + byte) % 2**31
    return h % agents
