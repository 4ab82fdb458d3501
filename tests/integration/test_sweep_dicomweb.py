"""Issue 22: the sweep over DICOMweb (QIDO-RS, WADO-RS) against a real Orthanc with its DICOMweb
plugin, the archive of tests/integration/test_sweep_orthanc.py (6 knee studies in range, 2 chest
studies, one knee study out of range, an SR and an overlay of the agent's own). The [[pacs]] is
``kind = "dicomweb"`` with ``query = true``: `strnet sweep` finds and retrieves over HTTP, and the
agent sends its results back to the same Orthanc by STOW-RS.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import dicom_factory as factory
import pytest
from conftest import free_port, require_tool
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1
from sqlalchemy import func, select
from test_sweep_orthanc import (
    audit_codes,
    build_archive,
    received_studies,
    run_sweep,
    sr_counts,
    wait_for,
    write_config,
)

from agent.app import Agent
from agent.config import load_settings
from agent.db.models import Instance, Job
from agent.demo.orthanc import LocalOrthanc
from agent.ingest.sweep import archive_for
from agent.pacs.wado import DicomwebArchive
from agent.queue.sweeps import SWEEP_PRIORITY

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def dicomweb_config(path: Path, data_dir: Path, web: LocalOrthanc, weights: Path) -> Path:
    """The sweep test's configuration with its [[pacs]] over DICOMweb instead of DIMSE."""
    write_config(path, data_dir, free_port(), web, weights)
    text = re.sub(r'\[\[pacs\]\]\nname = "archive"\n.*?query = true\n',
                  f'[[pacs]]\nname = "archive"\nkind = "dicomweb"\nurl = "{web.dicomweb_url}"\nquery = true\n',
                  path.read_text(), flags=re.S)  # fmt: skip
    assert 'kind = "dicomweb"' in text
    path.write_text(text)
    return path


def test_sweep_over_dicomweb_screens_the_knee_studies_once(tiny_weights: Path, tmp_path: Path) -> None:
    require_tool("Orthanc")
    require_tool("dcmcjpeg")
    web = LocalOrthanc("WEBARCHIVE", dicomweb=True, work_dir=tmp_path / "orthanc").start()
    try:
        knees, chests, outside, files = build_archive(tmp_path / "files")
        for f in files:
            web.upload(f)
        config = dicomweb_config(tmp_path / "agent.toml", tmp_path / "data", web, tiny_weights)
        settings = load_settings(config, search_default=False)
        assert isinstance(archive_for(settings)(settings.pacs[0]), DicomwebArchive)
        agent = Agent.build(settings)
        agent.start()
        try:
            run = run_sweep(config)
            assert run.returncode == 0, run.stdout + run.stderr
            assert "6 retrieved" in run.stdout, run.stdout
            assert factory.PHI_ID not in run.stdout + run.stderr and "Zyxwvut" not in run.stdout + run.stderr
            assert received_studies(agent.db) == set(knees)  # no chest study, nothing out of range
            assert not (set(chests) | {outside}) & received_studies(agent.db)
            with agent.db.reading() as s:
                classes = set(s.execute(select(Instance.sop_class_uid)).scalars())
                syntaxes = Counter(s.execute(select(Instance.transfer_syntax_uid)).scalars())
                priorities = set(s.execute(select(Job.priority)).scalars())
            assert classes <= {factory.DX_PRESENTATION, factory.CR}, classes  # never our own SR or overlay
            # retrieved as stored (transfer-syntax=*), each through Ingestor.store
            assert syntaxes == Counter({JPEG2000Lossless: 4, JPEGLosslessSV1: 4, ExplicitVRLittleEndian: 4}), syntaxes
            assert priorities == {SWEEP_PRIORITY}
            assert audit_codes(agent.db)["110102"] == 6  # Begin Transferring, one per study
            # screened: one SR per knee study back in the archive, by STOW-RS
            wait_for(lambda: sr_counts(web, knees) == [1] * 6, 120, "one SR per knee study in Orthanc")

            again = run_sweep(config)
            assert again.returncode == 0, again.stdout + again.stderr
            assert "0 retrieved, 6 already screened" in again.stdout, again.stdout
            assert audit_codes(agent.db)["110102"] == 6
            with agent.db.reading() as s:
                assert s.execute(select(func.count()).select_from(Instance)).scalar() == 12
        finally:
            agent.stop(grace_s=1)
    finally:
        web.stop()
