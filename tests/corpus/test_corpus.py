"""The DICOM variant corpus (tests/corpus/cases.py) against one agent, each case its own test.

One in-process agent with its real SCP screens inline (a tiny STR-Net) and builds the SRs in the
sweep's thread; every case is sent over its own real association (a few at a time), the run waits
for every job to settle and runs the study-completion sweep. Then each case checks its C-STORE
answers, its jobs' states and reasons, and for a screened study its SR (values, laterality,
dciodvfy); one more test checks that no planted PHI reached any log line, and controls show
that these checks can fail.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_AET, TEST_SCU_AET, agent_settings, free_port, require_tool
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select

from agent.app import Agent
from agent.db.models import Instance, OutboxItem, Result, Study, StudyReport
from agent.domain import JobState, JobView
from agent.logging import configure_logging, hash_uid
from agent.queue.screening import ready_studies
from agent.queue.store import list_jobs
from corpus.cases import BY_NAME, CASES, PHI_DATE, PHI_TOKENS, SKIPPED, Expectation

pytestmark = pytest.mark.timeout(900)  # the first test's set-up sends and screens the whole corpus

SEND_THREADS = 3  # associations at a time
SETTLE_S = 300.0  # longest wait for every job to leave QUEUED/RUNNING
UNSETTLED = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)
LATERALITY_CODES = {"7771000", "24028007", "51440002"}  # SCT left, right, bilateral


@dataclass
class Outcome:
    """What became of one case: the answers, its jobs (in creation order), its study's SR."""

    datasets: list[Dataset]
    statuses: list[int | None] = field(default_factory=list)
    error: str | None = None
    jobs: list[JobView] = field(default_factory=list)
    study_uids: list[str] = field(default_factory=list)
    sr_path: Path | None = None
    overlay_paths: list[Path] = field(default_factory=list)
    stored_syntaxes: set[str] = field(default_factory=set)  # transfer syntaxes of its stored instances

    def __repr__(self) -> str:  # pytest shows the fixture's value on a failure: not every dataset
        return f"Outcome(statuses={self.statuses}, jobs={[(j.state.value, j.reason) for j in self.jobs]})"


@dataclass
class Run:
    outcomes: dict[str, Outcome]
    log_lines: list[str]
    seconds: float

    def __repr__(self) -> str:
        return f"Run({len(self.outcomes)} cases, {len(self.log_lines)} log lines, {self.seconds:.1f} s)"


class _Lines(logging.Handler):
    """Every log record as the agent's JSON pipeline renders it (after its PHI scrubber)."""

    def __init__(self, formatter: logging.Formatter | None) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception as exc:  # noqa: BLE001 - a record the pipeline cannot render is kept raw, to be searched too
            self.lines.append(f"[unrenderable {type(exc).__name__}] {record.getMessage()}")


def _send(port: int, out: Outcome) -> None:
    """The case's datasets in order over one association, each in its own transfer syntax."""
    ae = AE(ae_title=TEST_SCU_AET)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 180, 180
    for sop_class, syntax in sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in out.datasets}
    ):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=AGENT_AET)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted (no presentation context accepted?)"
        out.error = f"association {how}"
        return
    try:
        for ds in out.datasets:
            rsp = assoc.send_c_store(ds)
            out.statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
    except Exception as exc:  # noqa: BLE001 - whatever stops the send is this case's outcome, reported by its test
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


def _settle(agent: Agent) -> None:
    deadline = time.monotonic() + SETTLE_S
    while any(j.state in UNSETTLED for j in list_jobs(agent.db, limit=100_000)) and time.monotonic() < deadline:
        time.sleep(0.25)


def _report_all(agent: Agent) -> None:
    """Run the study-completion sweep until no study is left to report. One pass is not enough: the
    scheduler's sweep may hold a study's claim (building its SR) when this one comes to it, and
    this one then passes it by; the scheduler records it a moment later (seen on a loaded machine)."""
    assert agent.reporter is not None
    reporting = agent.settings.reporting
    deadline = time.monotonic() + SETTLE_S
    while True:
        agent.reporter.report_ready_studies()
        if not ready_studies(agent.db, reporting.quiet_period_s, agent.reporter.scope) or time.monotonic() > deadline:
            return
        time.sleep(0.25)


def _collect(agent: Agent, outcomes: dict[str, Outcome]) -> None:
    by_uid: dict[str, list[JobView]] = {}
    for job in sorted(list_jobs(agent.db, limit=100_000), key=lambda j: j.job_id):
        by_uid.setdefault(job.sop_instance_uid, []).append(job)
    with agent.db.reading() as s:
        paths = {
            (k, u): p for k, u, p in s.execute(select(OutboxItem.kind, OutboxItem.sop_instance_uid, OutboxItem.path))
        }
        latest_sr: dict[str, str] = {}
        for study_uid, sop_uid in s.execute(
            select(Study.study_instance_uid, StudyReport.sop_instance_uid)
            .join(Study, Study.id == StudyReport.study_id)
            .order_by(StudyReport.revision)
        ):
            latest_sr[study_uid] = sop_uid
        overlays = dict(s.execute(select(Result.job_id, Result.overlay_sop_instance_uid)).tuples().all())
        syntaxes: dict[str, set[str]] = {}
        for sop_uid, syntax in s.execute(select(Instance.sop_instance_uid, Instance.transfer_syntax_uid)):
            syntaxes.setdefault(sop_uid, set()).add(syntax)
    for out in outcomes.values():
        uids = dict.fromkeys(str(ds.SOPInstanceUID) for ds in out.datasets)
        out.jobs = sorted((j for u in uids for j in by_uid.get(u, [])), key=lambda j: j.job_id)
        out.study_uids = list(dict.fromkeys(str(ds.StudyInstanceUID) for ds in out.datasets))
        out.stored_syntaxes = set().union(*(syntaxes.get(u, set()) for u in uids))
        srs = [latest_sr[u] for u in out.study_uids if u in latest_sr]
        if srs and ("sr", srs[0]) in paths:
            out.sr_path = agent.results.path(paths[("sr", srs[0])])
        for job in out.jobs:
            overlay = overlays.get(job.job_id)
            if overlay and ("sc", overlay) in paths:
                out.overlay_paths.append(agent.results.path(paths[("sc", overlay)]))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[Run]:
    t0 = time.monotonic()
    configure_logging("info", "json")  # the production pipeline, whatever an earlier test left behind
    root = logging.getLogger()
    lines = _Lines(root.handlers[0].formatter)
    root.addHandler(lines)
    outcomes = {c.name: Outcome(c.datasets()) for c in CASES}
    settings = agent_settings(
        tmp_path_factory.mktemp("corpus"),
        worker={
            "enabled": True,
            "process": False,
            "weights": str(tiny_weights),
            "device": "cpu",
            "max_wait_ms": 0,
            "max_batch": 4,
        },
        reporting={"build_processes": 0, "quiet_period_s": 0.0},
        sender={"send": False},  # shadow: the SRs and overlays are built and recorded, not sent
        pacs=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        backup={"enabled": False},
        scp={"dimse_timeout_s": 180, "network_timeout_s": 180},
    )
    agent = Agent.build(settings)
    agent.start()
    try:
        # the large images first: they are screened while the rest arrive
        order = sorted(CASES, key=lambda c: -sum(len(ds.get("PixelData") or b"") for ds in outcomes[c.name].datasets))
        with ThreadPoolExecutor(SEND_THREADS) as pool:
            list(pool.map(lambda c: _send(agent.scp.port, outcomes[c.name]), order))
        _settle(agent)
        _report_all(agent)
        _collect(agent, outcomes)
        yield Run(outcomes, lines.lines, time.monotonic() - t0)
    finally:
        agent.stop(grace_s=2)
        root.removeHandler(lines)
        configure_logging("info", "console")  # as tests/conftest.py set it for the session


# ---- helpers -----------------------------------------------------------------------------------------
def _phi_in(text: str) -> list[str]:
    folded = text.casefold()
    found = [t for t in PHI_TOKENS if t.casefold() in folded]
    return found + [m.group(0) for m in PHI_DATE.finditer(text)]


def _readable(line: str) -> str:
    """A JSON log line with its non-ASCII text unescaped (the renderer writes \\uXXXX)."""
    try:
        return line + "\n" + json.dumps(json.loads(line), ensure_ascii=False)
    except ValueError:
        return line


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _codes(ds: Dataset) -> set[str]:
    """Every code value in an SR content tree (concept names and values)."""
    out: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            out |= {str(c.get("CodeValue", "")) for c in item.get(keyword, [])}
        out |= _codes(item)
    return out


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's Error and Abort lines (its exit code is not reliable)."""
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )
    return re.findall(r"^(?:Error|Abort).*$", proc.stdout + proc.stderr, flags=re.MULTILINE)


def _hex(statuses: list[int | None]) -> list[str]:
    return ["none" if s is None else f"0x{s:04X}" for s in statuses]


def _study_log(run: Run, out: Outcome) -> str:
    """The warning and error lines about the case's study (they name it by its hashed UID)."""
    hashes = [h for h in (hash_uid(u) for u in out.study_uids) if h]
    hits = [ln for ln in run.log_lines if any(h in ln for h in hashes) and ('"error"' in ln or '"warning"' in ln)]
    return ("; log: " + " | ".join(hits[-3:])) if hits else ""


def _check_sr(run: Run, out: Outcome, expect: Expectation) -> None:
    assert out.sr_path is not None, "no SR was built for the screened study" + _study_log(run, out)
    sr = dcmread(out.sr_path)
    for keyword, pattern in expect.sr.items():
        assert keyword in sr, f"{keyword} is missing from the SR (type 2: present, empty when unknown)"
        value = _text(sr[keyword].value)
        assert re.fullmatch(pattern, value), f"SR {keyword} is {value!r}, expected /{pattern}/"
    if expect.no_laterality:
        stated = _codes(sr) & LATERALITY_CODES
        assert not stated, f"the SR states a laterality (SCT {sorted(stated)})"
        for path in out.overlay_paths:
            overlay = dcmread(path, stop_before_pixels=True)
            for keyword in ("Laterality", "ImageLaterality"):
                assert not _text(overlay.get(keyword)), f"the overlay states {keyword} {overlay.get(keyword)!r}"
    if expect.validate:
        errors = _dciodvfy(out.sr_path)
        assert not errors, f"dciodvfy finds {len(errors)} errors in the SR: " + " | ".join(errors[:5])


# ---- the tests ---------------------------------------------------------------------------------------
def test_the_corpus_has_at_least_60_cases() -> None:
    assert len(CASES) >= 60, len(CASES)


def test_the_checks_can_fail(run: Run, tmp_path: Path) -> None:
    """Controls: the baseline's SR states its laterality (the laterality check sees codes), dciodvfy
    reports an SR stripped of a Type 1 attribute, and planted PHI is found however it is written."""
    baseline = run.outcomes["baseline-dx-knee-explicit-little-endian"]
    assert baseline.sr_path is not None
    sr = dcmread(baseline.sr_path)
    assert "7771000" in _codes(sr)  # SCT left: knee_dx images are left knees
    del sr.ValueType
    sr.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    assert _dciodvfy(tmp_path / "broken.dcm")
    for text in ('{"name": "M\\u00fcller"}', "born 25.3.1945", "1945-03-25", "id canary-id-1234"):
        assert _phi_in(_readable(text)), text
    assert not _phi_in('{"event": "report_built", "ms": 19.45, "revision": 1}')


def test_no_planted_phi_in_any_log_line(run: Run) -> None:
    # the capture saw the SCP's threads, the worker and the sweep (else it proves nothing)
    for event in ("association_accepted", "job_leased", "report_built"):
        assert any(f'"{event}"' in line for line in run.log_lines), f"no {event} event captured"
    leaks = [(found, line) for line in run.log_lines if (found := _phi_in(_readable(line)))]
    assert not leaks, f"{len(leaks)} log lines carry planted PHI: " + "\n".join(f"{f}: {ln}" for f, ln in leaks[:5])


def test_the_corpus_runs_in_a_few_minutes(run: Run) -> None:
    print(f"corpus of {len(CASES)} cases sent, screened and reported in {run.seconds:.1f} s")
    assert run.seconds < 480, f"the corpus took {run.seconds:.0f} s (aim: under 3 minutes)"


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_case(run: Run, name: str) -> None:
    expect, out = BY_NAME[name].expect, run.outcomes[name]
    if expect.negotiation_refused:
        assert out.error is not None and out.error.startswith("association"), f"not refused: {out.error}"
        assert out.statuses == [] and out.jobs == [], out
        return
    assert out.error is None, f"sending failed: {out.error}"
    wanted = [expect.status] * len(out.datasets)
    assert out.statuses == wanted, f"C-STORE answered {_hex(out.statuses)}, expected {_hex(wanted)}"
    if out.jobs:  # arrived (and kept) in the syntax the case was built in: each is proposed alone
        sent = {str(ds.file_meta.TransferSyntaxUID) for ds in out.datasets}
        assert out.stored_syntaxes == sent, f"stored as {out.stored_syntaxes}, sent as {sent}"
    states = [j.state for j in out.jobs]
    assert states == list(expect.states), (
        f"jobs ended {[(j.state.value, j.reason) for j in out.jobs]}, expected {[s.value for s in expect.states]}"
        + _study_log(run, out)
    )
    for job in out.jobs:
        if job.state == SKIPPED and expect.reason is not None:
            assert re.search(expect.reason, job.reason or "", flags=re.IGNORECASE), (
                f"reason {job.reason!r} does not match /{expect.reason}/"
            )
        assert not _phi_in(job.reason or ""), f"planted PHI {_phi_in(job.reason or '')} in the reason {job.reason!r}"
    if expect.screened:
        done = sum(j.state == JobState.DONE for j in out.jobs)
        assert len(out.overlay_paths) == done, f"{len(out.overlay_paths)} overlays recorded for {done} screened images"
        _check_sr(run, out, expect)
