"""DICOM SCU towards peers: C-ECHO now; the result sender's C-STORE joins here.

Every association is released or aborted in a ``finally``: a peer that vanishes must not hold
one open until the network timeout.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent.pacs import status
from agent.pacs.identity import identify

if TYPE_CHECKING:
    from agent.config import PacsSection, TlsSection


def tls_args(dest: PacsSection) -> tuple[ssl.SSLContext, str] | None:
    """(client context, expected server name) for ``ae.associate(tls_args=...)``; None without TLS.

    TLS 1.2 or later, the destination's certificate verified against ``ca_file`` (or the system
    store) and its name checked; a client certificate is presented when configured.
    """
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dest.ca_file) if dest.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.cert_file and dest.key_file:
        ctx.load_cert_chain(str(dest.cert_file), str(dest.key_file))
    return ctx, dest.tls_server_name or dest.host


def self_tls_args(tls: TlsSection, host: str) -> tuple[ssl.SSLContext, str] | None:
    """(client context, host) for a C-ECHO to the agent itself when ``[scp.tls]`` is on; else None.

    The agent's own certificate is the trust anchor (we dial ourselves; ``scp.tls.ca_file`` is
    the CA of the *callers*, which may not have signed the agent's certificate, so it is trusted
    beside it, not instead); the name is not checked, since a health check dials 127.0.0.1, which
    the certificate need not name. The agent's certificate is presented when its SCP requires
    one from callers.
    """
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.cert_file) if tls.cert_file else None)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a leaf among the anchors is enough
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.require_client_cert and tls.cert_file and tls.key_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx, host


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    timeout_s: float = 10.0,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> tuple[bool, str]:
    """Send one C-ECHO (over TLS with ``tls``: ``tls_args``' pair); return (ok, what happened in words)."""
    ae = identify(AE(ae_title=calling_aet))
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls)
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
