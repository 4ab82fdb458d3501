"""pynetdicom's internals that the agent relies on: nothing outside this module touches them (ADR 0010).

Checked against pynetdicom ``CHECKED_VERSIONS`` (the range pyproject.toml pins); ``problems()``
names each internal below that no longer holds with the installed version. The patches, by the
name each reports in ``library_patch_missing`` when it cannot install:

``pdu_reader``
    Our SCP's connections read PDUs with agent/ingest/pdu_reader.py instead of
    ``DULServiceProvider._read_pdu_data`` (``install_pdu_reader``): the reader decodes other PDUs
    with ``_decode_pdu``, queues PDUs on ``_recv_pdu`` (``put_received_pdu``) and events by their
    state-machine names (``EVT_*``), and hands P-DATA values on as views of the received buffer
    (``pdata_primitive_from_views``, past the public setter, which insists on ``bytes``).
``chunked_receive``
    pynetdicom writes an incoming C-STORE dataset to the file that its ``dimse_messages`` module
    opens by the name ``NamedTemporaryFile``, when ``_config.STORE_RECV_CHUNKED_DATASET`` is on
    (``install_chunked_receive``); it writes the preamble, ``DICM`` and the file meta in
    ``FILE_HEAD_WRITES`` calls before the first fragment.
``chunked_send``
    ``send_c_store(path)`` streams the file's bytes when ``_config.STORE_SEND_CHUNKED_DATASET`` is on.
``idle_association``
    A held association idles with its reactor paused (``Association._reactor_checkpoint``,
    ``_is_paused``) and its DUL thread turning slower (``DULServiceProvider._run_loop_delay``);
    its DUL state (``dul_state``) tells whether it is still usable: ``DATA_TRANSFER``, or
    ``AWAITING_RELEASE_RESPONSE`` when the peer asked to release.

Also here: ``replace_socket_recv``, which puts the PDU-length guard in front of a connection's
reads (every PDU is read through ``AssociationSocket.recv``, header first, then body).
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import _config, dimse_messages, evt, fsm
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import build_context

from agent.compat import PatchMissing, installed_version, version_problem

DISTRIBUTION = "pynetdicom"
#: the versions every internal below was checked against (pyproject.toml pins the same)
CHECKED_VERSIONS = ">=3.0,<3.1"
CHECKED_RANGE: tuple[tuple[int, ...], tuple[int, ...]] = ((3, 0), (3, 1))

# the patches, by the name library_patch_missing reports
PDU_READER = "pdu_reader"
CHUNKED_RECEIVE = "chunked_receive"
CHUNKED_SEND = "chunked_send"
IDLE_ASSOCIATION = "idle_association"

#: DUL states (pynetdicom's ``fsm.STATES``), as ``dul_state`` gives them
DATA_TRANSFER = "Sta6"  # association established, ready for data transfer
AWAITING_RELEASE_RESPONSE = "Sta8"  # the peer asked to release; our A-RELEASE response is awaited
#: state-machine events (``fsm.EVENTS``) that a PDU reader queues on ``dul.event_queue``
EVT_P_DATA_TF = "Evt10"  # a P-DATA-TF PDU arrived
EVT_RELEASE_RQ = "Evt12"  # an A-RELEASE-RQ PDU arrived
EVT_CONNECTION_CLOSED = "Evt17"  # the connection closed (or a read failed)
EVT_INVALID_PDU = "Evt19"  # an unknown or malformed PDU arrived

#: pynetdicom's own delay between turns of a connection's DUL thread
DUL_LOOP_DELAY_S = 0.001
#: writes of a chunked-receive file before the dataset's first fragment: preamble, b"DICM", group 2
FILE_HEAD_WRITES = 3

_DUL_READER_INTERNALS = ("_read_pdu_data", "_decode_pdu", "_recv_pdu", "event_queue")
_PDU_READER_EFFECT = "pynetdicom's own PDU reader: correct, with four more copies of every received byte"
_CHUNKED_RECEIVE_EFFECT = "instances are received in memory and written to the spool after their last byte"
_CHUNKED_SEND_EFFECT = "send_c_store(path) decodes each result file and encodes it again before sending it"
_IDLE_EFFECT = "held associations keep pynetdicom's 1 ms polling while idle (about 100 ms of CPU a second each)"


# --- pdu_reader ---------------------------------------------------------------------------------


def install_pdu_reader(dul: Any, reader: Callable[[Any], None]) -> PatchMissing | None:
    """Make ``dul`` (one connection's ``DULServiceProvider``) read each PDU with ``reader(dul)``.

    ``reader`` does what ``_read_pdu_data`` does: read one PDU from ``dul.socket`` and queue its
    event on ``dul.event_queue`` and the PDU with ``put_received_pdu``. Returns what is missing,
    leaving pynetdicom's own reader in place, when ``dul`` lacks an internal the reader needs.
    """
    absent = tuple(f"DULServiceProvider.{name}" for name in _DUL_READER_INTERNALS if not hasattr(dul, name))
    if absent:
        return PatchMissing(PDU_READER, absent, _PDU_READER_EFFECT)
    dul._read_pdu_data = functools.partial(reader, dul)
    return None


def pdu_reader_installed(dul: Any, reader: Callable[[Any], None] | None = None) -> bool:
    """Whether ``install_pdu_reader`` put ``reader`` (any reader, if None) in place on ``dul``."""
    read = vars(dul).get("_read_pdu_data")
    return isinstance(read, functools.partial) and read.args == (dul,) and (reader is None or read.func is reader)


def decode_pdu(dul: Any, raw: bytearray) -> tuple[Any, str]:
    """pynetdicom's decoding of one whole PDU (header included): (the PDU, its state-machine event).
    Raises whatever pynetdicom's decoder raises for a PDU it cannot decode."""
    pdu, event = dul._decode_pdu(raw)
    return pdu, event


def put_received_pdu(dul: Any, pdu: Any) -> None:
    """Queue ``pdu`` for the state machine (the event queued with it says what it is)."""
    dul._recv_pdu.put(pdu)


def take_received_pdu(dul: Any) -> Any:
    """The oldest received PDU the state machine has not taken; raises ``queue.Empty`` if none."""
    return dul._recv_pdu.get_nowait()


def pdata_primitive_from_views(items: list[list[Any]]) -> P_DATA:
    """A P-DATA primitive of ``items``, ``[context ID, value]`` each, values kept as given (views)."""
    primitive = P_DATA()
    # the public setter insists on bytes; the views hold the same bytes without a copy
    primitive._presentation_data_value_list = items  # type: ignore[assignment]
    return primitive


def replace_socket_recv(sock: Any, recv: Callable[[int], Any]) -> None:
    """Make ``sock`` (one connection's ``AssociationSocket``) answer every ``recv(n)`` with ``recv``."""
    sock.recv = recv


# --- chunked_receive and chunked_send -----------------------------------------------------------


class _TemporaryFileOpener:
    """Stands in for ``dimse_messages.NamedTemporaryFile``: the file ``opener()`` gives, or
    pynetdicom's own temporary file (opened as pynetdicom asked) where it gives None."""

    def __init__(self, opener: Callable[[], Any], own: Callable[..., Any]) -> None:
        self.opener = opener
        self.own = own

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        opened = self.opener()
        return self.own(*args, **kwargs) if opened is None else opened


_OWN_TEMPORARY_FILE: Callable[..., Any] | None = getattr(dimse_messages, "NamedTemporaryFile", None)
_OWN_RECV_CHUNKED: Any = getattr(_config, "STORE_RECV_CHUNKED_DATASET", None)


def install_chunked_receive(opener: Callable[[], Any]) -> PatchMissing | None:
    """Have pynetdicom write each incoming C-STORE dataset, while it arrives, to ``opener()``'s file
    (pynetdicom's own temporary file where that is None). The switch is process-wide.

    The file gets ``FILE_HEAD_WRITES`` writes (preamble, ``DICM``, pynetdicom's file meta), then
    one ``write`` of each fragment, each followed by ``.file.flush()``; ``event.dataset_path`` is
    then ``Path(file.name)``. Returns what is missing, changing nothing, when pynetdicom lacks it.
    """
    absent = tuple(
        label
        for module, name, label in (
            (_config, "STORE_RECV_CHUNKED_DATASET", "_config.STORE_RECV_CHUNKED_DATASET"),
            (dimse_messages, "NamedTemporaryFile", "dimse_messages.NamedTemporaryFile"),
        )
        if not hasattr(module, name)
    )
    if absent or _OWN_TEMPORARY_FILE is None:
        return PatchMissing(CHUNKED_RECEIVE, absent or ("dimse_messages.NamedTemporaryFile",), _CHUNKED_RECEIVE_EFFECT)
    dimse_messages.NamedTemporaryFile = _TemporaryFileOpener(opener, _OWN_TEMPORARY_FILE)
    _config.STORE_RECV_CHUNKED_DATASET = True
    return None


def chunked_receive_installed(opener: Callable[[], Any] | None = None) -> bool:
    """Whether pynetdicom receives C-STORE datasets into ``opener``'s files (any opener, if None)."""
    current = getattr(dimse_messages, "NamedTemporaryFile", None)
    return (
        getattr(_config, "STORE_RECV_CHUNKED_DATASET", False) is True
        and isinstance(current, _TemporaryFileOpener)
        and (opener is None or current.opener is opener)
    )


def uninstall_chunked_receive() -> None:
    """Give pynetdicom back its own temporary file and its own setting of chunked receive."""
    if _OWN_TEMPORARY_FILE is not None:
        dimse_messages.NamedTemporaryFile = _OWN_TEMPORARY_FILE
    if _OWN_RECV_CHUNKED is not None:
        _config.STORE_RECV_CHUNKED_DATASET = _OWN_RECV_CHUNKED


def enable_chunked_send() -> PatchMissing | None:
    """Have ``send_c_store(path)`` send the file's bytes as stored (process-wide), or say it cannot."""
    if not hasattr(_config, "STORE_SEND_CHUNKED_DATASET"):
        return PatchMissing(CHUNKED_SEND, ("_config.STORE_SEND_CHUNKED_DATASET",), _CHUNKED_SEND_EFFECT)
    _config.STORE_SEND_CHUNKED_DATASET = True
    return None


# --- idle_association ---------------------------------------------------------------------------


def pause_reactor(assoc: Any, wait_s: float = 1.0) -> PatchMissing | None:
    """Pause ``assoc``'s reactor (its thread then waits on an event instead of polling) and wait,
    ``wait_s`` at most (a loop turn), until it is paused. ``send_c_store``, ``release`` and
    ``abort`` resume it themselves. Returns what is missing, changing nothing."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        absent = [f"Association.{n}" for n in ("_reactor_checkpoint", "_is_paused") if not hasattr(assoc, n)]
        return PatchMissing(IDLE_ASSOCIATION, tuple(absent), _IDLE_EFFECT)
    checkpoint.clear()
    deadline = time.monotonic() + wait_s
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0005)
    return None


def resume_reactor(assoc: Any) -> PatchMissing | None:
    """Resume a reactor ``pause_reactor`` paused (so that it answers the peer's release request)."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None:
        return PatchMissing(IDLE_ASSOCIATION, ("Association._reactor_checkpoint",), _IDLE_EFFECT)
    checkpoint.set()
    return None


def reactor_paused(assoc: Any) -> bool:
    """Whether ``assoc``'s reactor waits, paused."""
    return bool(getattr(assoc, "_is_paused", False))


def set_dul_loop_delay(assoc: Any, seconds: float) -> PatchMissing | None:
    """Have ``assoc``'s DUL thread sleep ``seconds`` between idle turns (``DUL_LOOP_DELAY_S``:
    pynetdicom's own). Returns what is missing, changing nothing."""
    dul = assoc.dul
    if not hasattr(dul, "_run_loop_delay"):
        return PatchMissing(IDLE_ASSOCIATION, ("DULServiceProvider._run_loop_delay",), _IDLE_EFFECT)
    dul._run_loop_delay = seconds
    return None


def dul_loop_delay(assoc: Any) -> float | None:
    """The delay between idle turns of ``assoc``'s DUL thread (None where it cannot be told)."""
    return getattr(assoc.dul, "_run_loop_delay", None)


def dul_state(assoc: Any) -> str:
    """The state of ``assoc``'s connection, by pynetdicom's name for it (``DATA_TRANSFER`` ...)."""
    return str(assoc.dul.state_machine.current_state)


# --- problems -----------------------------------------------------------------------------------

_STATE_WORDS = {DATA_TRANSFER: "data transfer", AWAITING_RELEASE_RESPONSE: "A-RELEASE response"}
_EVENT_WORDS = {
    EVT_P_DATA_TF: "P-DATA-TF",
    EVT_RELEASE_RQ: "A-RELEASE-RQ",
    EVT_CONNECTION_CLOSED: "connection closed",
    EVT_INVALID_PDU: "invalid PDU",
}


def problems() -> list[str]:
    """One line per internal of this module that does not hold with the installed pynetdicom
    (the version range included); empty when every patch can install and act as checked."""
    found: list[str] = []
    line = version_problem(DISTRIBUTION, installed_version(DISTRIBUTION), *CHECKED_RANGE)
    if line is not None:
        found.append(line)
    for module, name, label, patch in (
        (_config, "STORE_RECV_CHUNKED_DATASET", "_config.STORE_RECV_CHUNKED_DATASET", CHUNKED_RECEIVE),
        (dimse_messages, "NamedTemporaryFile", "dimse_messages.NamedTemporaryFile", CHUNKED_RECEIVE),
        (_config, "STORE_SEND_CHUNKED_DATASET", "_config.STORE_SEND_CHUNKED_DATASET", CHUNKED_SEND),
        (DULServiceProvider, "_read_pdu_data", "DULServiceProvider._read_pdu_data", PDU_READER),
        (DULServiceProvider, "_decode_pdu", "DULServiceProvider._decode_pdu", PDU_READER),
    ):
        if not hasattr(module, name):
            found.append(f"{label} is missing ({patch})")
    found += _state_machine_problems()
    try:
        assoc = Association(ApplicationEntity(), "acceptor")
    except Exception as exc:  # noqa: BLE001 - any failure is a line of the report
        return [*found, f"Association(AE(), 'acceptor') failed: {exc!r} (the checks of instances did not run)"]
    found += _instance_problems(assoc)
    found += _chunked_receive_problems(assoc)
    return found


def _state_machine_problems() -> list[str]:
    found = []
    states, events = getattr(fsm, "STATES", {}), getattr(fsm, "EVENTS", {})
    for name, words in _STATE_WORDS.items():
        if words not in states.get(name, ""):
            found.append(f"fsm.STATES[{name!r}] is not the state of '{words}' ({IDLE_ASSOCIATION})")
    for name, words in _EVENT_WORDS.items():
        if words not in events.get(name, ""):
            found.append(f"fsm.EVENTS[{name!r}] is not the event of '{words}' ({PDU_READER})")
    table, actions = getattr(fsm, "TRANSITION_TABLE", {}), getattr(fsm, "ACTIONS", {})
    after_release_rq = actions.get(table.get((EVT_RELEASE_RQ, DATA_TRANSFER)), ("", None, None))[2]
    if after_release_rq != AWAITING_RELEASE_RESPONSE:
        found.append(
            f"fsm: a release request in {DATA_TRANSFER} leads to {after_release_rq!r}, not "
            f"{AWAITING_RELEASE_RESPONSE} ({IDLE_ASSOCIATION})"
        )
    return found


def _instance_problems(assoc: Any) -> list[str]:
    found = []
    dul = assoc.dul
    for name in _DUL_READER_INTERNALS:
        if not hasattr(dul, name):
            found.append(f"DULServiceProvider.{name} is missing ({PDU_READER})")
    for owner, name, label in (
        (assoc, "_reactor_checkpoint", "Association._reactor_checkpoint"),
        (assoc, "_is_paused", "Association._is_paused"),
        (dul, "_run_loop_delay", "DULServiceProvider._run_loop_delay"),
    ):
        if not hasattr(owner, name):
            found.append(f"{label} is missing ({IDLE_ASSOCIATION})")
    if hasattr(assoc, "_reactor_checkpoint") and not callable(getattr(assoc._reactor_checkpoint, "clear", None)):
        found.append(f"Association._reactor_checkpoint is no longer an event to clear and set ({IDLE_ASSOCIATION})")
    if getattr(dul, "_run_loop_delay", DUL_LOOP_DELAY_S) != DUL_LOOP_DELAY_S:
        found.append(
            f"DULServiceProvider._run_loop_delay starts at {dul._run_loop_delay}, not {DUL_LOOP_DELAY_S} "
            f"(DUL_LOOP_DELAY_S, {IDLE_ASSOCIATION})"
        )
    if hasattr(dul, "_decode_pdu"):
        try:
            pdu, event = dul._decode_pdu(bytearray(A_RELEASE_RQ().encode()))
            if not isinstance(pdu, A_RELEASE_RQ) or event != EVT_RELEASE_RQ:
                found.append(f"DULServiceProvider._decode_pdu gives {pdu!r}, {event!r} for A-RELEASE-RQ ({PDU_READER})")
        except Exception as exc:  # noqa: BLE001 - any failure is a line of the report
            found.append(f"DULServiceProvider._decode_pdu(bytearray) failed: {exc!r} ({PDU_READER})")
    if not hasattr(P_DATA(), "_presentation_data_value_list"):
        found.append(f"P_DATA._presentation_data_value_list is missing ({PDU_READER})")
    else:
        items: list[list[Any]] = [[1, memoryview(b"\x02probe")]]
        if pdata_primitive_from_views(items).presentation_data_value_list is not items:
            found.append(
                f"P_DATA.presentation_data_value_list no longer reads _presentation_data_value_list ({PDU_READER})"
            )
    return found


class _RecordingFile:
    """What the chunked-receive probe hands pynetdicom instead of a file: it records the calls."""

    name = "strnet-probe.dcm"

    def __init__(self, calls: list[tuple[str, bytes]]) -> None:
        self.calls = calls
        self.file = self

    def write(self, data: Any) -> int:
        self.calls.append(("write", bytes(data)))
        return len(data)

    def flush(self) -> None:
        self.calls.append(("flush", b""))


def _chunked_receive_problems(assoc: Any) -> list[str]:
    """Decode a small C-STORE-RQ with pynetdicom's ``decode_msg`` as chunked receive runs it, into
    a recording file. The probe runs a copy of ``decode_msg`` over a copy of its module's globals
    (``NamedTemporaryFile`` and ``_config`` replaced there): nothing changes in the process."""
    decode_msg = getattr(getattr(dimse_messages, "DIMSEMessage", None), "decode_msg", None)
    code = getattr(decode_msg, "__code__", None)
    if decode_msg is None or code is None or not hasattr(dimse_messages, "NamedTemporaryFile"):
        return [f"dimse_messages.DIMSEMessage.decode_msg cannot be probed ({CHUNKED_RECEIVE})"]
    calls: list[tuple[str, bytes]] = []
    config = types.SimpleNamespace(**{k: v for k, v in vars(_config).items() if not k.startswith("__")})
    config.STORE_RECV_CHUNKED_DATASET = True
    names = {**vars(dimse_messages), "NamedTemporaryFile": lambda *a, **k: _RecordingFile(calls), "_config": config}
    probe = types.FunctionType(code, names, "decode_msg", decode_msg.__defaults__, decode_msg.__closure__)
    sop_class = "1.2.840.10008.5.1.4.1.1.7"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = sop_class, "2.25.1", "probe"
    encoded = encode(ds, False, True) or b""
    try:
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, "2.25.1"
        request.DataSet = BytesIO(encoded)
        outgoing = dimse_messages.C_STORE_RQ()
        outgoing.primitive_to_message(request)
        context = build_context(sop_class, ExplicitVRLittleEndian)
        context.context_id = 1
        assoc._accepted_cx[1] = context
        incoming = dimse_messages.DIMSEMessage()
        done = False
        for pdata in outgoing.encode_msg(1, 0):
            done = probe(incoming, pdata, assoc)
        received = Event(assoc, evt.EVT_C_STORE, {"request": incoming.message_to_primitive()}).dataset_path
    except Exception as exc:  # noqa: BLE001 - any failure is a line of the report
        return [f"DIMSEMessage.decode_msg of a C-STORE-RQ with chunked receive on failed: {exc!r} ({CHUNKED_RECEIVE})"]
    writes = [data for kind, data in calls if kind == "write"]
    head, body = writes[:FILE_HEAD_WRITES], writes[FILE_HEAD_WRITES:]
    found = []
    if not done:
        found.append(f"DIMSEMessage.decode_msg did not finish a chunked C-STORE-RQ ({CHUNKED_RECEIVE})")
    group_2 = b"\x02\x00\x00\x00"  # (0002,0000), the file meta's first element
    if head[:2] != [b"\x00" * 128, b"DICM"] or head[-1][:4] != group_2 or b"".join(body) != encoded:
        found.append(
            f"chunked receive no longer writes preamble, DICM and file meta in {FILE_HEAD_WRITES} writes, then the "
            f"dataset (FILE_HEAD_WRITES, {CHUNKED_RECEIVE}): writes of {[len(w) for w in writes[:6]]} bytes"
        )
    if calls[-1:] != [("flush", b"")]:
        found.append(f"chunked receive no longer flushes .file after a fragment ({CHUNKED_RECEIVE})")
    if received != Path(_RecordingFile.name):
        found.append(f"Event.dataset_path is {received!r}, not the name of the file opened ({CHUNKED_RECEIVE})")
    return found
