"""DICOM SCU towards peers: C-ECHO now; the result sender's C-STORE joins here.

Every association is released or aborted in a ``finally``: a peer that vanishes must not hold
one open until the network timeout.
"""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent.pacs import status


def echo(
    host: str, port: int, called_aet: str, calling_aet: str, timeout_s: float = 10.0
) -> tuple[bool, str]:
    """Send one C-ECHO; return (ok, what happened in words)."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        if assoc.is_rejected:
            return False, "association rejected"
        return False, "association failed (peer unreachable or aborted)"
    try:
        rsp = assoc.send_c_echo()
        code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release() if assoc.is_established else assoc.abort()
    if code is None:
        return False, "no response"
    return code == status.SUCCESS, f"status {status.name(code)}"
