"""Receive C-STORE datasets straight into the spool, while they arrive (pynetdicom chunked mode).

pynetdicom can write an incoming dataset to a file fragment by fragment instead of collecting it
in memory (its chunked receive); ``pynetdicom_internals.install_chunked_receive`` has it open
``SpoolingFile`` for that (agent/compat/pynetdicom_internals.py, ADR 0010):

- the file lies in the spool's own ``tmp`` folder, so keeping it is a rename, not a copy;
- a writer thread does the disk writes (the network thread only queues fragments) and starts
  their writeback every MiB (``sync_file_range``): much of the durability cost overlaps the
  transfer instead of following it (measured: the fsync after the last byte still takes ~15 ms
  per 10 MB on this disk, against ~20 ms without early writeback);
- the file meta pynetdicom writes is replaced by ours (implementation UID, calling AE title),
  exactly as the in-memory path writes it.

Only associations of an SCP registered with ``receive_into`` get a ``SpoolingFile``; any other
SCP in the process keeps pynetdicom's own temporary file. If the handler finds a file elsewhere
it falls back to the in-memory path; the durability contract holds either way:
Success only after the file is fsynced, renamed, the directory fsynced and the job row
committed. Files of transfers that never reached the handler are deleted when the association
ends (``discard``), when its thread died without a close event (``discard_orphans``, at the next
connection), when pynetdicom drops them, and by the start-up and hourly sweeps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import queue
import secrets
import threading
import weakref
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread

from agent.compat import pynetdicom_internals, warn_once
from agent.logging import get_logger

log = get_logger(__name__)

PART_SUFFIX = ".part"
_WRITEBACK_EVERY = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2

#: id(AE) -> (folder, head builder) of the SCPs that receive into their spool
_targets: dict[int, tuple[Path, Any]] = {}
_lock = threading.RLock()  # guards the two registries; never held while waiting on anything
#: files being received, by name; weak: pynetdicom's message object owns them
_open_files: weakref.WeakValueDictionary[str, SpoolingFile] = weakref.WeakValueDictionary()


def _load_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux: writeback then happens at the fsync only
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class _Writer:
    """A thread that owns one file descriptor: it writes the queued chunks, starts their writeback
    every MiB, and at the end fsyncs (when asked) and closes the descriptor.

    Only this thread ever writes to or closes the descriptor. Closing it from another thread
    could race with a write still queued here, or close it twice; the second close may hit a
    number the kernel has already given to a new socket or spool file.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.error: OSError | None = None
        self.synced = False
        self._queue: queue.SimpleQueue[bytes | bytearray | memoryview | bool] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="strnet-spool-writer", daemon=True)
        self._thread.start()

    def put(self, chunk: bytes | bytearray | memoryview) -> None:
        self._queue.put(chunk)

    def finish(self, fsync: bool, wait: bool = True) -> None:
        """Write what is queued, fsync if ``fsync``, close. Idempotent: the first call decides
        whether there is an fsync. With ``wait`` (never from a finaliser: joining a thread there
        can deadlock on the interpreter's own thread lock), returns once the file is closed."""
        self._queue.put(fsync)  # the first bool ends the queue; any later one is never read
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        written = flushed = 0
        while not isinstance(chunk := self._queue.get(), bool):
            if self.error is not None:
                continue
            try:
                view = memoryview(chunk)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                    written += n
                if _sync_file_range is not None and written - flushed >= _WRITEBACK_EVERY:
                    _sync_file_range(self._fd, flushed, written - flushed, _SYNC_FILE_RANGE_WRITE)
                    flushed = written
            except OSError as exc:  # disk full, I/O error: reported by SpoolingFile.sync
                self.error = exc
        try:
            if chunk and self.error is None:
                os.fsync(self._fd)
                self.synced = True
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self._fd)


class SpoolingFile:
    """The file object pynetdicom writes one incoming dataset to (see the module docstring).

    ``write`` only queues the fragment (no copy) for a writer thread, so the disk writes run on
    the other core while this association keeps reading the network; ``data`` returns the
    dataset's bytes (kept in memory for hashing and checks) and ``sync`` has the writer thread
    write what is queued, fsync and close the file, and waits for it.
    """

    def __init__(self, folder: Path, head: Any) -> None:
        self.name = str(folder / (secrets.token_hex(8) + PART_SUFFIX))
        self._head = head  # builds our file meta from pynetdicom's (see _make_head)
        self._pending: list[bytes] | None = []  # preamble and "DICM", held until the meta arrives
        self._fragments: list[bytes | bytearray | memoryview] = []  # the dataset, as received
        # the writer thread holds only this state, never the file object: a file pynetdicom drops
        # (a transfer that broke off) is then freed, which stops the thread and removes the file
        self._writer = _Writer(os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        self.file = self  # pynetdicom calls ``.file.flush()`` after each fragment
        self.owner = association_of(threading.current_thread())  # whose transfer this is
        self.handed_over = False  # set when the C-STORE handler takes the data
        with _lock:
            _open_files[self.name] = self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._pending is not None:
            self._pending.append(bytes(data))
            if len(self._pending) == pynetdicom_internals.FILE_HEAD_WRITES:  # preamble, b"DICM", group 2
                self._writer.put(self._make_head(self._pending))
                self._pending = None
            return len(data)
        # kept as given: a view of the received PDU (pdu_reader) is never written to again
        self._fragments.append(data)
        self._writer.put(data)
        return len(data)

    def _make_head(self, parts: list[bytes]) -> bytes:
        head = b"".join(parts)
        try:
            meta = dcmread(BytesIO(head)).file_meta  # the meta alone: nothing else is there yet
            return bytes(self._head(meta, threading.current_thread()))
        except Exception as exc:  # noqa: BLE001 - keep pynetdicom's own meta: still a valid Part 10 file
            log.warning("file_meta_kept_as_received", error=exc.__class__.__name__)
            return head

    def data(self) -> bytes:
        """The dataset's bytes as received (all fragments are in once pynetdicom calls the handler;
        the writer thread may still be writing them to the file)."""
        self.handed_over = True
        return b"".join(self._fragments)

    def sync(self) -> None:
        """Wait until every fragment is written, fsynced and the file closed. Raises OSError."""
        self._writer.finish(fsync=True)
        if self._writer.error is not None:
            raise self._writer.error
        if not self._writer.synced:  # closed (discarded) before the handler asked
            raise OSError(errno.EBADF, "spool file closed before it was synced")

    def flush(self) -> None:
        """Nothing to do: fragments are queued for the writer thread."""

    def close(self) -> None:
        self._writer.finish(fsync=False)
        self._fragments = []  # pynetdicom keeps this object a while after the handler: drop 10 MB now
        with _lock:
            _open_files.pop(self.name, None)

    def __del__(self) -> None:
        # pynetdicom dropped the object without a handler (a transfer that broke off): the file
        # was never acknowledged. No waiting and no module lock here: a finaliser runs inside
        # whatever the collecting thread holds (the weak registry forgets this object itself).
        try:
            self._writer.finish(fsync=False, wait=False)
            if not self.handed_over:
                Path(self.name).unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def association_of(thread: Any) -> Any:
    """pynetdicom decodes P-DATA in the association's DUL thread (``.assoc``) or the association."""
    return thread if hasattr(thread, "requestor") else getattr(thread, "assoc", None)


def discard(assoc: Any) -> int:
    """Delete the files of ``assoc``'s transfers that never reached the handler (the connection
    closed or aborted mid-instance: never acknowledged). Returns how many."""
    return _delete(_claim(lambda f: f.owner is assoc and not f.handed_over))


def discard_orphans() -> int:
    """Delete the files of transfers whose association thread has ended without a handler (a
    pynetdicom state-machine error ends it without any close event). Returns how many."""
    return _delete(
        _claim(lambda f: not f.handed_over and f.owner is not None and hasattr(f.owner, "is_alive")
               and not f.owner.is_alive())
    )  # fmt: skip


def _claim(broken: Callable[[SpoolingFile], bool]) -> list[SpoolingFile]:
    """Take the transfers ``broken`` picks out of the registry in one step under the lock: the
    abort and the connection's close are reported on two threads, and both look (each file is
    deleted and counted once)."""
    with _lock:
        files = [f for f in _open_files.values() if broken(f)]
        for f in files:
            _open_files.pop(f.name, None)
    return files


def _delete(files: list[SpoolingFile]) -> int:
    for f in files:
        f.close()
        Path(f.name).unlink(missing_ok=True)
    return len(files)


def receiving(path: Path) -> SpoolingFile | None:
    """The ``SpoolingFile`` that is receiving into ``path`` (None: pynetdicom's own file)."""
    with _lock:
        return _open_files.get(str(path))


def _open() -> SpoolingFile | None:
    """The file pynetdicom receives a dataset into: a ``SpoolingFile`` for an association of an SCP
    registered with ``receive_into``; None, for pynetdicom's own temporary file, for any other SCP
    in the process."""
    assoc = association_of(threading.current_thread())
    with _lock:
        target = _targets.get(id(getattr(assoc, "ae", None)))
    if target is None:
        return None
    folder, head = target
    return SpoolingFile(folder, head)


def receive_into(ae: Any, folder: Path, head: Any) -> bool:
    """Make pynetdicom write datasets that ``ae`` receives into ``folder`` via ``SpoolingFile``.

    ``head(pynetdicom_meta, association_thread) -> bytes`` builds the preamble and file meta to
    write instead of pynetdicom's. pynetdicom's switch is process-wide; other SCPs in the process
    keep pynetdicom's own temporary files (written in full before their handlers run).
    Returns False, leaving pynetdicom as it was, when its chunked receive is not available; the
    first time, ``library_patch_missing`` says so (the in-memory path then keeps every instance).
    """
    with _lock:
        missing = pynetdicom_internals.install_chunked_receive(_open)
        if missing is None:
            _targets[id(ae)] = (Path(folder), head)
    if missing is not None:
        warn_once(log, missing)
        return False
    return True


def stop_receiving(ae: Any) -> None:
    """Forget ``ae`` (its SCP stopped); its id may be reused by a later object."""
    with _lock:
        _targets.pop(id(ae), None)


def in_folder(path: Path, folder: Path) -> bool:
    """True when ``path`` is a part file directly inside ``folder`` (so a rename keeps it)."""
    try:
        return path.parent.resolve() == folder.resolve() and path.name.endswith(PART_SUFFIX)
    except OSError:
        return False
