"""Start-up reconciliation of spool and database (docs/architecture.md, the durability contract).

- temporary files of writes that never completed are deleted (they were never acknowledged);
- complete spool files without an instance row (a crash between rename and commit) are adopted:
  recorded as if just received, with the calling AE title kept in their file meta;
- RUNNING jobs this node leased go back to QUEUED (their worker is gone); another node's stay.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.uid import UID

from agent.db.engine import Database
from agent.errors import StorageError
from agent.ingest.handlers import Ingestor, StoreRequest
from agent.logging import get_logger
from agent.queue import cluster, store
from agent.queue.cluster import SOLO, NodeScope
from agent.spool import Spool

log = get_logger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    partials_removed: int
    adopted: int
    quarantined: int
    requeued: int


def split_file(data: bytes) -> tuple[bytes, bytes]:
    """Split a spool file into (preamble + file meta, dataset bytes) using the group length."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a spool file written by the agent")
    (group_len,) = struct.unpack("<I", data[140:144])
    end = 144 + group_len
    return data[:end], data[end:]


def adopt(ingestor: Ingestor, spool: Spool, rel: str) -> bool:
    """Record an orphan spool file; True when adopted, False when quarantined."""
    path = spool.path(rel)
    data = path.read_bytes()
    try:
        _head, raw = split_file(data)
        ds = dcmread(BytesIO(data))
        meta = ds.file_meta
        calling_ae = str(meta.get("SourceApplicationEntityTitle", "") or "UNKNOWN").strip()
        req = StoreRequest(
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax=UID(meta.TransferSyntaxUID),
            raw=raw,
            dataset=ds,
            calling_ae=calling_ae,
            peer_host=None,
        )
        outcome = store.record_instance(
            ingestor.db, ingestor.incoming(req, rel, hashlib.sha256(raw).hexdigest()), node=ingestor.node
        )
    except StorageError:
        raise  # the database, not the file: it stays where it is for the next start to adopt
    except Exception as exc:  # noqa: BLE001 - whatever makes a spool file unreadable, it is quarantined, never lost
        spool.quarantine(rel)
        log.error("spool_file_quarantined", file=path.name, error=exc.__class__.__name__)
        return False
    if outcome.duplicate:  # its twin was committed; this copy is redundant
        spool.remove(rel)
    log.info("spool_file_adopted", job_id=outcome.job_id, sop_instance_uid=req.sop_instance_uid)
    return True


def _holds(folder: Spool, rel: str) -> bool:
    try:
        return folder.path(rel).is_file()
    except ValueError:  # a path that would leave the folder: not ours
        return False


def reconcile(
    db: Database, spool: Spool, ingestor: Ingestor, requeue: bool = True, scope: NodeScope = SOLO,
    results: Spool | None = None,
) -> ReconcileReport:
    """This node's own start-up recovery: its ``.part`` files and spool files (shared storage: its
    own folder of the shared spool, ``Spool.node_dir``), and the jobs it leased; never another
    node's. Node storage: rows of the single node of old whose file is in this node's spool or
    ``results`` folder become this node's (``cluster.claim_legacy``)."""
    partials = spool.clear_partials()
    known = store.known_spool_paths(db)
    adopted = quarantined = 0
    for rel in spool.entries():
        if rel in known:
            continue
        if adopt(ingestor, spool, rel):
            adopted += 1
        else:
            quarantined += 1
    if scope.name and not scope.shared:
        claimed = cluster.claim_legacy(db, scope, lambda rel: _holds(spool, rel),
                                       lambda rel: results is not None and _holds(results, rel))  # fmt: skip
        if claimed:
            log.info("legacy_rows_claimed", rows=claimed)
    requeued = store.requeue_running(db, scope) if requeue else 0
    report = ReconcileReport(partials, adopted, quarantined, requeued)
    log.info("startup_reconciled", **report.__dict__)
    return report
