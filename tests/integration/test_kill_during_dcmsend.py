"""``strnet serve`` killed with SIGKILL while DCMTK ``dcmsend`` streams 100 instances.

After a restart (which reconciles spool and database) every instance the sender saw
acknowledged has exactly one job, every spool file has its row (and every row its file, with the
recorded content), no temporary ``.part`` file is left, the retrying sender's full resend is
absorbed without duplicates, and the audit chain verifies.
"""

from __future__ import annotations

import hashlib
import random
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dicom_factory as factory
import pydicom
import pytest
from conftest import AGENT_AET, TEST_SCU_AET, database_of, database_url_for, require_tool
from serve_process import ServeProcess, config_port, write_config
from sqlalchemy import func, select

from agent.db.engine import Database
from agent.db.models import Instance, Job
from agent.ingest.reconcile import split_file
from agent.spool import QUARANTINE_DIR, Spool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_INSTANCES = 100
KILL_AFTER_JOBS = 30
START_TIMEOUT_S = 90.0  # `strnet` imports a lot; the machine is shared and may be busy


def dcmsend(port: int, files: list[Path], report: Path) -> subprocess.Popen[bytes]:
    """dcmsend in debug mode: every C-STORE response is dumped with its SOP Instance UID."""
    with open(report, "wb") as sink:
        return subprocess.Popen(
            ["dcmsend", "-d", "-nh", "-aet", TEST_SCU_AET, "-aec", AGENT_AET,
             "127.0.0.1", str(port), *map(str, files)],
            stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
        )


_FIELD_RE = re.compile(r"^D: ([A-Za-z -]+?)\s*: (.*)$", re.M)


def acknowledged(report: Path) -> list[str]:
    """SOP Instance UIDs whose C-STORE response dcmsend received with status Success (0x0000).

    dcmsend -d dumps each incoming DIMSE message between INCOMING and END markers.
    """
    text = report.read_text(errors="replace")
    out: list[str] = []
    for block in text.split("INCOMING DIMSE MESSAGE")[1:]:
        fields = dict(_FIELD_RE.findall(block.split("END DIMSE MESSAGE", 1)[0]))
        if fields.get("Message Type") != "C-STORE RSP":
            continue
        if fields.get("DIMSE Status", "").startswith("0x0000"):
            out.append(fields["Affected SOP Instance UID"].strip())
    return out


class JobCount:
    """How many jobs the data directory's database holds now (0 before the agent created it)."""

    def __init__(self, data_dir: Path) -> None:
        url = database_url_for(data_dir)  # PostgreSQL: the database exists already, at the newest schema
        self.db = Database(url) if url else None
        self.db_file = data_dir / "strnet.db"  # SQLite: read only, never created before the agent does

    def __call__(self) -> int:
        if self.db is None:
            return job_count(self.db_file)
        with self.db.reading() as s:
            return int(s.execute(select(func.count()).select_from(Job)).scalar_one())

    def close(self) -> None:
        if self.db is not None:
            self.db.dispose()


def job_count(db_file: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=1, isolation_level=None)
    except sqlite3.Error:
        return 0
    try:
        return int(con.execute("SELECT count(*) FROM jobs").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def jobs_per_uid(db: Database) -> Counter[str]:
    with db.reading() as s:
        uids = s.execute(
            select(Instance.sop_instance_uid).join(Job, Job.instance_id == Instance.id)
        ).scalars().all()
    return Counter(uids)


def check_spool_matches_database(data_dir: Path, db: Database) -> None:
    spool_root = data_dir / "spool"
    spool = Spool(spool_root)
    assert not list(spool_root.rglob("*.part")), "temporary spool files left behind"
    quarantine = spool_root / QUARANTINE_DIR
    assert not quarantine.exists() or not any(quarantine.iterdir()), "spool files quarantined"
    with db.reading() as s:
        pairs = s.execute(select(Instance.spool_path, Instance.sha256)).all()
    rows = {path: sha for path, sha in pairs}
    on_disk = set(spool.entries())
    assert on_disk - rows.keys() == set(), "spool files without an instance row"
    assert rows.keys() - on_disk == set(), "instance rows whose spool file is missing"
    for rel, sha in rows.items():
        _head, raw = split_file(spool.path(rel).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == sha, rel


def test_sigkill_while_dcmsend_streams(tmp_path: Path) -> None:
    require_tool("dcmsend")
    files_dir = tmp_path / "send"
    files_dir.mkdir()
    study = pydicom.uid.generate_uid()
    files: list[Path] = []
    uids: list[str] = []
    for i in range(N_INSTANCES):
        ds = factory.knee_dx(study_uid=study, seed=i, rows=128, cols=128)
        ds.InstanceNumber = i + 1
        files.append(factory.write(ds, files_dir / f"i{i:03d}.dcm"))
        uids.append(str(ds.SOPInstanceUID))

    data_dir = tmp_path / "var"
    config = write_config(tmp_path / "agent.toml", data_dir)
    port = config_port(config)
    jobs_now = JobCount(data_dir)
    first = ServeProcess(config, tmp_path / "serve1.log")
    second = ServeProcess(config, tmp_path / "serve2.log")
    sender: subprocess.Popen[bytes] | None = None
    try:
        first.start(timeout_s=START_TIMEOUT_S)
        sender = dcmsend(port, files, tmp_path / "dcmsend1.txt")
        deadline = time.monotonic() + 60
        while jobs_now() < KILL_AFTER_JOBS:
            assert sender.poll() is None, "dcmsend ended before the kill: the test proves nothing"
            assert time.monotonic() < deadline, "the agent did not receive 30 instances in 60 s"
            time.sleep(0.005)
        # a random extra delay lands the kill anywhere in the next instance's receive, spool
        # write or commit (each takes tens of milliseconds), not always just after a commit
        time.sleep(random.uniform(0.0, 0.05))
        first.kill()  # SIGKILL: no clean-up of any kind
        sender.wait(timeout=60)  # dcmsend -nh exits 0 even with failed files: read its dump
        acked = acknowledged(tmp_path / "dcmsend1.txt")
        assert len(acked) < N_INSTANCES, "every instance was acknowledged: the kill came too late"
        assert len(acked) >= KILL_AFTER_JOBS - 5, f"only {len(acked)} acknowledgements parsed"
        assert set(acked) <= set(uids)

        second.start(timeout_s=START_TIMEOUT_S)  # reconciles spool and database at start
        db = Database(database_of(data_dir))
        try:
            per_uid = jobs_per_uid(db)
            lost = [u for u in acked if per_uid[u] != 1]
            assert not lost, f"acknowledged instances without exactly one job: {lost}"
            assert all(n == 1 for n in per_uid.values()), "an instance has more than one job"
            check_spool_matches_database(data_dir, db)

            # the sender retries everything it holds: duplicates are absorbed, nothing is missing
            sender = dcmsend(port, files, tmp_path / "dcmsend2.txt")
            assert sender.wait(timeout=120) == 0
            assert sorted(acknowledged(tmp_path / "dcmsend2.txt")) == sorted(uids)
            per_uid = jobs_per_uid(db)
            assert per_uid == Counter({u: 1 for u in uids})
            check_spool_matches_database(data_dir, db)
        finally:
            db.engine.dispose()

        assert second.terminate() == 0, second.log_path.read_text(errors="replace")[-3000:]
        verify = subprocess.run(
            [sys.executable, "-m", "agent", "db", "verify-audit", "--config", str(config)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr[-2000:]
        assert "audit chain OK" in verify.stdout
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait(timeout=10)
        first.close()
        second.close()
        jobs_now.close()
