"""agent/compat: the one door to pynetdicom's and highdicom's internals (ADR 0010).

Three kinds of test. ``problems()`` is empty with the installed libraries: a new library version
that breaks a patch fails here, naming the internal. Each patch is shown to be installed and to
act on the real thing (an association with our SCP, an SR build), through a check helper; and each
check is shown to fail when its patch is skipped, so that a passing check is not vacuous. A patch
that cannot install keeps the service on the library's public path and says so once
(``library_patch_missing``).
"""

from __future__ import annotations

import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import highdicom.sr.sop as highdicom_sop
import pytest
import structlog
from conftest import AGENT_AET, TEST_SCU_AET
from dicom_factory import DX_PRESENTATION, knee_dx
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, dimse_messages, fsm
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from agent import compat
from agent.app import Agent
from agent.compat import highdicom_internals, pynetdicom_internals, uvicorn_internals
from agent.domain import AlgorithmInfo, Findings
from agent.ingest import chunked, pdu_reader
from agent.ingest.scp import RecvGuard
from agent.pacs import sender, status
from agent.queue.store import list_jobs
from agent.reporting.sr import build_sr

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"pynetdicom": pynetdicom_internals, "highdicom": highdicom_internals}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no patch reported missing yet."""
    monkeypatch.setattr(compat, "_warned", set())


def patch_warnings(logs: list[dict[str, Any]]) -> list[str]:
    return [e["patch"] for e in logs if e["event"] == "library_patch_missing"]


# --- problems() -----------------------------------------------------------------------------------


@pytest.mark.parametrize("library", sorted(MODULES))
def test_problems_are_empty_with_the_installed_library(library: str) -> None:
    assert MODULES[library].problems() == []


@pytest.mark.parametrize("library", sorted(MODULES))
def test_checked_versions_are_the_range_pyproject_pins(library: str) -> None:
    module = MODULES[library]
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"{library}{module.CHECKED_VERSIONS}" in pins
    lower, upper = (".".join(map(str, v)) for v in module.CHECKED_RANGE)
    assert module.CHECKED_VERSIONS == f">={lower},<{upper}"


@pytest.mark.parametrize("library", sorted(MODULES))
def test_problems_name_a_version_outside_the_checked_range(library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = MODULES[library]
    upper = module.CHECKED_RANGE[1]
    monkeypatch.setattr(module, "installed_version", lambda _name: (*upper, 0))
    [line] = module.problems()
    assert f"{library} {'.'.join(map(str, upper))}.0 is outside {module.CHECKED_VERSIONS}" in line


def _drop_after_init(cls: type, name: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Simulate a version whose instances of ``cls`` no longer have the attribute ``name``."""

    def apply(monkeypatch: pytest.MonkeyPatch) -> None:
        real = cls.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            real(self, *args, **kwargs)
            delattr(self, name)

        monkeypatch.setattr(cls, "__init__", init)

    return apply


def _drop(owner: type | ModuleType, name: str) -> Callable[[pytest.MonkeyPatch], None]:
    return lambda monkeypatch: monkeypatch.delattr(owner, name)


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        pytest.param(_drop(DULServiceProvider, "_read_pdu_data"), "DULServiceProvider._read_pdu_data", id="read"),
        pytest.param(_drop(DULServiceProvider, "_decode_pdu"), "DULServiceProvider._decode_pdu", id="decode"),
        pytest.param(_drop_after_init(DULServiceProvider, "_recv_pdu"), "DULServiceProvider._recv_pdu", id="queue"),
        pytest.param(_drop(dimse_messages, "NamedTemporaryFile"), "dimse_messages.NamedTemporaryFile", id="open"),
        pytest.param(_drop(_config, "STORE_RECV_CHUNKED_DATASET"), "_config.STORE_RECV_CHUNKED_DATASET", id="recv"),
        pytest.param(_drop(_config, "STORE_SEND_CHUNKED_DATASET"), "_config.STORE_SEND_CHUNKED_DATASET", id="send"),
        pytest.param(
            _drop_after_init(Association, "_reactor_checkpoint"), "Association._reactor_checkpoint", id="pause"
        ),
        pytest.param(_drop_after_init(Association, "_is_paused"), "Association._is_paused", id="paused"),
        pytest.param(
            _drop_after_init(DULServiceProvider, "_run_loop_delay"), "DULServiceProvider._run_loop_delay", id="delay"
        ),
        pytest.param(lambda mp: mp.delitem(fsm.STATES, "Sta8"), "fsm.STATES['Sta8']", id="state"),
        pytest.param(lambda mp: mp.setitem(fsm.EVENTS, "Evt10", "renumbered"), "fsm.EVENTS['Evt10']", id="event"),
        pytest.param(
            lambda mp: mp.setattr(pynetdicom_internals, "FILE_HEAD_WRITES", 4), "FILE_HEAD_WRITES", id="head-writes"
        ),
    ],
)
def test_pynetdicom_problems_name_the_internal_that_is_gone(
    remove: Callable[[pytest.MonkeyPatch], None], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    remove(monkeypatch)
    found = pynetdicom_internals.problems()
    assert any(named in line for line in found), found


def test_highdicom_problems_name_a_content_copy_that_no_longer_goes_through_deepcopy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(highdicom_sop, "deepcopy", lambda obj, memo=None: obj)  # a version that copies otherwise
    [line] = highdicom_internals.problems()
    assert "no longer deep-copies its content" in line and highdicom_internals.SR_CONTENT_IN_PLACE in line


# --- a real association with our SCP --------------------------------------------------------------


def associate(agent: Agent) -> Association:
    ae = AE(ae_title=TEST_SCU_AET)
    ae.acse_timeout, ae.dimse_timeout = 5, 10
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", agent.scp.port, ae_title=AGENT_AET)
    assert assoc.is_established
    return assoc


def scp_side(agent: Agent) -> Any:
    """The SCP's end of the one association open with it."""
    server = agent.scp._server
    assert server is not None
    deadline = time.monotonic() + 5
    while len(server.active_associations) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    [assoc] = server.active_associations
    return assoc


def store_one(assoc: Association) -> None:
    rsp = assoc.send_c_store(knee_dx(rows=64, cols=64))
    assert rsp is not None and int(rsp.Status) == status.SUCCESS


@pytest.fixture
def handed_over(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the ``SpoolingFile``s whose data the C-STORE handler took (chunked receive used)."""
    names: list[str] = []
    real = chunked.SpoolingFile.data

    def data(self: chunked.SpoolingFile) -> bytes:
        names.append(self.name)
        return real(self)

    monkeypatch.setattr(chunked.SpoolingFile, "data", data)
    return names


def check_pdu_reader_installed(agent: Agent) -> None:
    """Our PDU reader reads the SCP's connection, behind the PDU-length guard."""
    theirs = scp_side(agent)
    assert isinstance(theirs.dul.socket.recv, RecvGuard)
    assert pynetdicom_internals.pdu_reader_installed(theirs.dul, pdu_reader.read_pdu), "pynetdicom's own PDU reader"


def check_received_into_the_spool(handed_over: list[str], instances: int) -> None:
    """pynetdicom received each instance into a ``SpoolingFile`` (not in memory, not its own file)."""
    assert pynetdicom_internals.chunked_receive_installed(chunked._open)
    assert len(handed_over) == instances


def test_the_scp_reads_with_our_pdu_reader_and_receives_into_the_spool(make_agent: Any, handed_over: list[str]) -> None:
    agent = make_agent()
    assoc = associate(agent)
    try:
        store_one(assoc)
        check_pdu_reader_installed(agent)
        check_received_into_the_spool(handed_over, 1)
    finally:
        assoc.release()


def test_a_skipped_pdu_reader_fails_its_check(make_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_internals, "install_pdu_reader", lambda dul, reader: None)
    agent = make_agent()
    assoc = associate(agent)
    try:
        store_one(assoc)  # pynetdicom's own reader: slower, still correct
        with pytest.raises(AssertionError, match="pynetdicom's own PDU reader"):
            check_pdu_reader_installed(agent)
    finally:
        assoc.release()


@pytest.fixture
def pynetdicom_receives_as_shipped() -> Iterator[None]:
    """pynetdicom's own receive (as before any SCP of ours started); put back as it was after."""
    was = pynetdicom_internals.chunked_receive_installed(chunked._open)
    pynetdicom_internals.uninstall_chunked_receive()
    yield
    if was:
        pynetdicom_internals.install_chunked_receive(chunked._open)


@pytest.mark.usefixtures("pynetdicom_receives_as_shipped")
def test_a_skipped_chunked_receive_fails_its_check(
    make_agent: Any, handed_over: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pynetdicom_internals, "install_chunked_receive", lambda opener: None)
    agent = make_agent()
    assoc = associate(agent)
    try:
        store_one(assoc)  # received in memory, then written: slower, still durable
        with pytest.raises(AssertionError):
            check_received_into_the_spool(handed_over, 1)
    finally:
        assoc.release()
    assert len(list_jobs(agent.db)) == 1  # kept all the same


def test_a_pdu_reader_that_cannot_install_leaves_pynetdicoms_and_says_so_once(
    make_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later pynetdicom whose DUL lacks an internal the reader relies on: instances still arrive,
    and the log says once which patch is missing and why."""
    renamed = (*pynetdicom_internals._DUL_READER_INTERNALS, "_renamed_in_a_later_version")
    monkeypatch.setattr(pynetdicom_internals, "_DUL_READER_INTERNALS", renamed)
    agent = make_agent()
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            assoc = associate(agent)
            store_one(assoc)
            assoc.release()
    assert patch_warnings(logs) == [pynetdicom_internals.PDU_READER]
    [event] = [e for e in logs if e["event"] == "library_patch_missing"]
    assert event["missing"] == ["DULServiceProvider._renamed_in_a_later_version"] and event["log_level"] == "warning"


def test_install_pdu_reader_names_what_the_provider_lacks() -> None:
    dul = Association(AE(), "acceptor").dul
    del dul._recv_pdu
    missing = pynetdicom_internals.install_pdu_reader(dul, pdu_reader.read_pdu)
    assert missing is not None and missing.internals == ("DULServiceProvider._recv_pdu",)
    assert not pynetdicom_internals.pdu_reader_installed(dul)


def test_chunked_receive_that_cannot_install_says_so_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(dimse_messages, "NamedTemporaryFile")
    monkeypatch.setattr(chunked, "_targets", {})
    with structlog.testing.capture_logs() as logs:
        assert chunked.receive_into(object(), tmp_path, lambda meta, thread: b"") is False
        assert chunked.receive_into(object(), tmp_path, lambda meta, thread: b"") is False
    assert patch_warnings(logs) == [pynetdicom_internals.CHUNKED_RECEIVE]
    assert chunked._targets == {}


# --- the sender's idle association ----------------------------------------------------------------


def check_idles_cheaply(assoc: Association) -> None:
    """Between sends the association's reactor waits, paused, and its DUL thread turns slowly."""
    assert pynetdicom_internals.reactor_paused(assoc), "the reactor still polls"
    assert pynetdicom_internals.dul_loop_delay(assoc) == sender.IDLE_LOOP_S
    assert sender.usable(assoc)


def test_quiet_pauses_a_real_association_which_still_sends_and_answers_a_release(make_agent: Any) -> None:
    agent = make_agent()
    assoc = associate(agent)
    sender.quiet(assoc)
    check_idles_cheaply(assoc)
    sender.busy(assoc)
    assert pynetdicom_internals.dul_loop_delay(assoc) == pynetdicom_internals.DUL_LOOP_DELAY_S
    store_one(assoc)  # send_c_store resumes the reactor and pauses it again itself
    sender.quiet(assoc)
    check_idles_cheaply(assoc)
    # the SCP asks to release while our reactor is paused: seen in the DUL's state, answered on resume
    theirs = scp_side(agent)
    releasing = threading.Thread(target=theirs.release)
    releasing.start()
    deadline = time.monotonic() + 5
    while not sender.release_requested(assoc) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.release_requested(assoc) and not sender.usable(assoc)
    assert pynetdicom_internals.resume_reactor(assoc) is None
    releasing.join(5)
    deadline = time.monotonic() + 5
    while not assoc.is_released and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.is_released and not assoc.is_aborted


def test_a_skipped_pause_fails_its_check(make_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_internals, "pause_reactor", lambda assoc, wait_s=1.0: None)
    agent = make_agent()
    assoc = associate(agent)
    try:
        sender.quiet(assoc)
        with pytest.raises(AssertionError, match="the reactor still polls"):
            check_idles_cheaply(assoc)
    finally:
        assoc.release()


def test_an_association_without_the_internals_idles_at_full_cost_and_says_so_once() -> None:
    bare = SimpleNamespace(is_established=True, dul=SimpleNamespace())
    with structlog.testing.capture_logs() as logs:
        sender.quiet(bare)
        sender.busy(bare)
        sender.quiet(bare)
    assert patch_warnings(logs) == [pynetdicom_internals.IDLE_ASSOCIATION]
    assert vars(bare.dul) == {}  # nothing set that pynetdicom would not read


# --- the SR built without a deep copy of its content ----------------------------------------------

ALGO = AlgorithmInfo(name="STR-Net", version="0.0-compat-test", checkpoint_sha256="0" * 64)


def small_sr() -> Any:
    study = generate_uid()
    sources = [knee_dx(study_uid=study, laterality=side, seed=i, rows=64, cols=64) for i, side in enumerate("LR")]
    findings = [
        Findings(0.8, 0.5, True, 0.6, "osteoporosis", -2.7, -3.4, -1.9, 0.9, ALGO),
        Findings(0.2, 0.5, False, 0.1, None, -0.4, -1.1, 0.3, 0.9, ALGO),
    ]
    return build_sr(sources, findings)


@pytest.fixture
def skipped_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many deep copies of the content each SR build skipped."""
    counts: list[int] = []
    real = highdicom_internals.keep_content_uncopied

    def counting(root: Any) -> Iterator[highdicom_internals.ContentCopy | None]:
        with real(root) as kept:
            yield kept
        counts.append(kept.skipped if kept is not None else 0)

    monkeypatch.setattr(highdicom_internals, "keep_content_uncopied", contextmanager(counting))
    return counts


def check_parsed_in_place(sr: Any) -> None:
    assert highdicom_internals.content_parsed_in_place(sr), "highdicom parsed a deep copy of the content"


def test_the_sr_content_is_parsed_in_place_not_copied(skipped_copies: list[int]) -> None:
    sr = small_sr()
    check_parsed_in_place(sr)
    assert skipped_copies == [1]
    assert "__deepcopy__" not in vars(sr.content[0])  # copies normally again


def test_a_skipped_in_place_parse_fails_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(highdicom_internals, "keep_content_uncopied", lambda root: nullcontext(None))
    with pytest.raises(AssertionError, match="parsed a deep copy"):
        check_parsed_in_place(small_sr())


def test_an_sr_build_whose_copy_the_patch_misses_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(highdicom_sop, "deepcopy", lambda obj, memo=None: obj)  # a version that copies otherwise
    with structlog.testing.capture_logs() as logs:
        small_sr()
        small_sr()
    assert patch_warnings(logs) == [highdicom_internals.SR_CONTENT_IN_PLACE]


def test_each_compat_module_was_checked_against_the_range_pyproject_pins() -> None:
    """A pin widened in pyproject.toml without a new check of the internals fails here."""
    pins = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    specs = {d.split(">")[0].split("<")[0].split("=")[0].strip(): d for d in pins["dependencies"]}
    for module in (pynetdicom_internals, highdicom_internals, uvicorn_internals):
        assert specs[module.DISTRIBUTION] == module.DISTRIBUTION + module.CHECKED_VERSIONS, module.__name__


def test_the_process_pool_internal_the_helpers_use_holds() -> None:
    """agent/helper.py names and kills its helpers through ProcessPoolExecutor._processes."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from agent.compat import futures_internals

    assert futures_internals.problems() == []
    pool = ProcessPoolExecutor(max_workers=1)
    try:
        child = pool.submit(os.getpid).result(timeout=60)
        assert child in futures_internals.pool_processes(pool)
    finally:
        pool.shutdown()
