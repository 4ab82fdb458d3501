"""Helpers shared by the reliability tests: a config for `strnet serve`, a plain SCU, RSS/fd probes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import AGENT_AET, TEST_SCU_AET, database_url_for, free_port
from dicom_factory import CR, DX_PRESENTATION
from pacs_peer import PACS_AET
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association


def serve_config(
    path: Path,
    data_dir: Path,
    *,
    worker_weights: Path | None = None,
    pacs_port: int | None = None,
    scp_extra: str = "",
    extra: str = "",
) -> tuple[Path, int]:
    """A config for a short-lived `strnet serve`: no web, no backups, fast sweeps and retries."""
    port = free_port()
    url = database_url_for(data_dir)  # on PostgreSQL: this data directory's own database
    # process = false: these serves start again and again, each fork warm; a screening process
    # would import torch afresh every time. tests/integration kills the shipped mode mid-inference.
    worker = (
        f'enabled = true\nprocess = false\nweights = "{worker_weights}"\n'
        'device = "cpu"\nmax_wait_ms = 0\nsaliency = false'
        if worker_weights
        else "enabled = false"
    )
    pacs = (
        f'[[pacs]]\nname = "pacs"\nae_title = "{PACS_AET}"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
        if pacs_port
        else ""
    )
    path.write_text(
        f"""
[agent]
data_dir = "{data_dir}"
{f'database_url = "{url}"' if url else ""}
min_free_disk_mb = 0
log_format = "json"

[scp]
ae_title = "{AGENT_AET}"
bind = "127.0.0.1"
port = {port}
acse_timeout_s = 5
dimse_timeout_s = 20
network_timeout_s = 20
{scp_extra}

[[scp.peers]]
ae_title = "{TEST_SCU_AET}"
host = "127.0.0.1"

[worker]
{worker}

[reporting]
quiet_period_s = 0.3

[sender]
poll_s = 0.2
backoff_base_s = 0.2
backoff_max_s = 1.0
timeout_s = 5
max_attempts = 20

[backup]
enabled = false

[web]
enabled = false
{pacs}
{extra}
"""
    )
    return path, port


def associate(
    port: int, calling: str = TEST_SCU_AET, called: str = AGENT_AET, dimse_timeout_s: float = 20, **tls: Any
) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.dimse_timeout = dimse_timeout_s
    ae.network_timeout = 20
    for sop in (DX_PRESENTATION, CR):
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called, **tls)


def store_all(
    port: int, datasets: list[Dataset], dimse_timeout_s: float = 20
) -> tuple[list[str], list[int | None]]:
    """C-STORE each dataset in one association; (UIDs answered Success, every status or None).

    A peer that dies mid-send is noticed by pynetdicom's SCU only after its DIMSE timeout: crash
    tests pass a short one.
    """
    acked: list[str] = []
    statuses: list[int | None] = []
    assoc = associate(port, dimse_timeout_s=dimse_timeout_s)
    try:
        for ds in datasets:
            if not assoc.is_established:
                statuses.append(None)
                continue
            rsp = assoc.send_c_store(ds)
            code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            statuses.append(code)
            if code == 0:
                acked.append(str(ds.SOPInstanceUID))
    finally:
        # after a lost connection pynetdicom may still say established for a moment: never wait on a release
        if assoc.is_established and None not in statuses:
            assoc.release()
        else:
            assoc.abort()
    return acked, statuses


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step_s)
    raise AssertionError(f"timed out waiting for {what}")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def store_raw(port: int, datasets: list[Dataset], timeout_s: float = 30) -> tuple[list[str], list[int | None]]:
    """Like store_all, over a raw socket: a peer that dies is noticed at once (no DIMSE timeout)."""
    from raw_dicom import A_RELEASE_RQ, dimse_status, open_association, read_pdu, store_pdus

    acked: list[str] = []
    statuses: list[int | None] = []
    s = open_association(port, timeout_s)
    try:
        for n, ds in enumerate(datasets, start=1):
            try:
                s.sendall(store_pdus(ds, message_id=n))
                reply = read_pdu(s)
            except OSError:
                reply = None
            code = dimse_status(reply[1]) if reply is not None and reply[0] == 0x04 else None
            statuses.append(code)
            if code is None:
                statuses.extend([None] * (len(datasets) - n))
                break
            if code == 0:
                acked.append(str(ds.SOPInstanceUID))
        else:
            s.sendall(A_RELEASE_RQ)
            read_pdu(s)
    except OSError:
        pass
    finally:
        s.close()
    return acked, statuses
