"""Real data for the admin-web tests: an in-process agent (tiny STR-Net) screens synthetic knee
studies, writes SR + overlays and sends them to a pynetdicom PACS, and fills the flagged registry.

One patient's results are refused by the PACS (status Cannot Understand) and end as dead letters
until the test lets the PACS accept them again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import AGENT_AET, TEST_SCU_AET, agent_settings
from dicom_factory import DX_PRESENTATION, knee_dx
from fastapi.testclient import TestClient
from pacs_peer import PACS_AET, PacsPeer
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from agent.app import Agent
from agent.db.engine import Database
from agent.db.models import FlaggedPatient
from agent.db.users import add_user
from agent.domain import JobState
from agent.pacs import status
from agent.queue import outbox
from agent.queue.store import list_jobs
from agent.web.auth import hash_password

SCRIPT_NAME = "<script>alert(1)</script>"
PATIENTS = {  # PatientID: (PatientName, BirthDate, [StudyDate per study])
    "WEBP-0001": ("Doe^Jane", "19500314", ["20250610", "20260105"]),
    "WEBP-0002": (SCRIPT_NAME, "19480101", ["20260105"]),
    "WEBP-0003": ("Roe^Richard", "19521111", ["20260201"]),
}
DEAD_PATIENT = "WEBP-0003"  # the PACS refuses this patient's results until told otherwise
PASSWORDS = {
    "vera": ("viewer", "viewer-pass-1"),
    "adam": ("admin", "admin-pass-1"),
    "audrey": ("auditor", "auditor-pass-1"),
    "rita": ("radiologist", "radiologist-pass-1"),
}


def phi_strings() -> list[str]:
    """Values that must never appear in a URL, a log line or an unauthenticated answer."""
    out: list[str] = []
    for pid, (name, birth, _dates) in PATIENTS.items():
        out += [pid, name, name.split("^")[0], birth]
    return out


@dataclass
class Seeded:
    agent: Agent
    pacs: PacsPeer
    refuse: dict[str, bool]
    study_uids: list[str] = field(default_factory=list)


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not met in {timeout_s} s")


def _send(agent: Agent, datasets: list[Any]) -> None:
    ae = AE(ae_title=TEST_SCU_AET)
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", agent.scp.port, ae_title=AGENT_AET)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert int(assoc.send_c_store(ds).Status) == status.SUCCESS
    finally:
        assoc.release()


@contextmanager
def screened_agent(data_dir: Path, weights: Path, **web: Any) -> Iterator[Seeded]:
    """Start a PACS peer and an agent, screen every PATIENTS study, add the three users."""
    refuse = {"on": True}

    def answer(ds: Any) -> int:
        return status.CANNOT_UNDERSTAND if refuse["on"] and str(ds.PatientID) == DEAD_PATIENT else status.SUCCESS

    pacs = PacsPeer(answer=answer).start()
    settings = agent_settings(
        data_dir,
        worker={"enabled": True, "weights": str(weights), "device": "cpu", "max_wait_ms": 0},
        reporting={"quiet_period_s": 0.3},
        sender={"backoff_base_s": 0.2, "backoff_max_s": 1.0, "poll_s": 0.2, "timeout_s": 5, "max_attempts": 4},
        pacs=[{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}],
        web={"enabled": False, **web},
    )
    agent = Agent.build(settings)
    agent.start()
    seeded = Seeded(agent, pacs, refuse)
    try:
        seed = 0
        for pid, (name, birth, dates) in PATIENTS.items():
            for study_date in dates:
                study = generate_uid()
                seeded.study_uids.append(study)
                batch = []
                for side in ("L", "R"):
                    ds = knee_dx(
                        study_uid=study,
                        laterality=side,
                        seed=seed,
                        rows=320,
                        cols=256,
                        patient_name=name,
                        patient_id=pid,
                        birth_date=birth,
                    )
                    ds.StudyDate = study_date
                    batch.append(ds)
                    seed += 1
                _send(agent, batch)
        n_images = 2 * sum(len(d) for _, _, d in PATIENTS.values())
        wait_for(
            lambda: len(list_jobs(agent.db)) == n_images and all(j.state == JobState.DONE for j in list_jobs(agent.db)),
            what="all images screened",
        )
        n_studies = len(seeded.study_uids)
        # per study: one SR and two overlays
        wait_for(
            lambda: (
                len(outbox.items(agent.db)) == 3 * n_studies
                and {i.state for i in outbox.items(agent.db)} <= {"DELIVERED", "DEAD"}
                and sum(i.state == "DEAD" for i in outbox.items(agent.db)) == 3
            ),
            what="results delivered or dead",
        )
        for name, (role, password) in PASSWORDS.items():
            add_user(agent.db, name, role, hash_password(password))
        yield seeded
    finally:
        agent.stop(grace_s=1)
        pacs.stop()


def login(app: Any, user: str, raise_server_exceptions: bool = True) -> TestClient:
    """A test client logged in as ``user`` (one of PASSWORDS); ``raise_server_exceptions=False``
    answers a server error with its 500 instead of raising it in the test."""
    client = TestClient(app, base_url="http://testserver", raise_server_exceptions=raise_server_exceptions)
    page = client.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = client.post(
        "/login",
        data={"login_token": token, "username": user, "password": PASSWORDS[user][1]},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return client


def csrf_of(text: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', text).group(1)  # type: ignore[union-attr]


def rows_of(db: Database, model: Any) -> list[Any]:
    with db.reading() as s:
        return list(s.query(model).order_by(model.id))


def patient(db: Database, patient_id: str) -> FlaggedPatient:
    return next(r for r in rows_of(db, FlaggedPatient) if r.patient_id == patient_id)
