"""Helper processes: work that would hold the interpreter lock of `strnet serve` runs in another
process, on the machine's other core.

`strnet serve` receives, records and sends in threads of one Python process; whatever runs Python
there (highdicom's pure-Python builds, the screening path's glue) stops every other thread. A
``HelperProcess`` is a ``ProcessPoolExecutor`` started with ``spawn`` (never ``fork``: the parent
runs threads) whose processes ignore Ctrl-C (the parent stops them), end when their parent is
gone (even killed with SIGKILL), and run a set-up function once. A
helper that died is forgotten and the next call starts a new one; every Future it returns raises
``HelperDied`` for the calls it took down with it. Inputs and outputs are pickled: send headers,
paths and findings, never a source's pixel data.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

from agent.compat.futures_internals import pool_processes
from agent.errors import HelperClosed, HelperDied
from agent.logging import configure_logging, current_config, get_logger

log = get_logger(__name__)

_PR_SET_NAME = 15


def _watch_parent(parent: int) -> None:
    """End this helper when its parent is gone (even killed with SIGKILL): the parent's pid is no
    longer ours. Linux's PR_SET_PDEATHSIG is no use here: it fires when the parent *thread* that
    started the helper ends, and helpers are started from whichever thread first needs one."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _name_process(title: str) -> None:
    """``title`` in ps, top and /proc/PID/comm (Linux; 15 characters at most)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(title[:15].encode()), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the name is cosmetic


def _init(
    title: str,
    parent: int,
    setup: Callable[..., Any] | None,
    args: tuple[Any, ...],
    log_config: tuple[str, str, str] | None = None,
) -> None:
    # Ctrl-C and systemd's SIGTERM reach the whole process group or cgroup: the parent stops its
    # helpers itself (close()), after recording what they finish, and they end when it is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _name_process(title)
    if log_config is not None:  # the parent's log format, PHI scrubber and salt, here too
        configure_logging(*log_config)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if setup is not None:
        setup(*args)


def _kill(processes: list[Any]) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.kill()


class HelperProcess:
    """``processes`` helper processes named ``name`` in logs and errors and ``title`` in ps and top
    (default ``strnet-<name>``), each set up once by ``setup(*setup_args)`` (a module-level
    function: it is pickled). Thread-safe."""

    def __init__(
        self,
        name: str,
        processes: int = 1,
        setup: Callable[..., Any] | None = None,
        setup_args: tuple[Any, ...] = (),
        title: str | None = None,
    ) -> None:
        self.name = name
        self.title = title or f"strnet-{name.lower()}"
        self.processes = processes
        self._setup = setup
        self._setup_args = setup_args
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:  # never start a helper that nobody would stop
                raise HelperClosed(f"{self.name} helper closed")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init,
                    initargs=(self.title, os.getpid(), self._setup, self._setup_args, current_config()),
                )
            return self._pool

    def pids(self) -> list[int]:
        """The helper processes running now (none before the first call)."""
        with self._lock:
            return list(pool_processes(self._pool)) if self._pool is not None else []

    def _discard(self, pool: ProcessPoolExecutor, exc: BaseException) -> None:
        """Forget a pool whose helper died (once, whoever notices first); the next call starts one."""
        with self._lock:
            if self._pool is not pool:
                return
            self._pool = None
        log.error("helper_process_died", helper=self.name, error=exc.__class__.__name__)
        # A broken pool ends its other processes with SIGTERM, which helpers ignore (_init), and then
        # waits for them: its thread, and the interpreter's exit, would wait forever. Kill them.
        survivors = list(pool_processes(pool).values())
        pool.shutdown(wait=False, cancel_futures=True)
        _kill(survivors)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in the helper; returns at once. The Future raises what ``fn`` raised,
        ``HelperDied`` when the helper died with the call (it is replaced for the next one), or
        ``HelperClosed`` when the helper was closed before it ran."""
        out: Future[Any] = Future()
        for attempt in (1, 2):
            try:
                pool = self._executor()
                inner = pool.submit(fn, *args)
                break
            except BrokenProcessPool as exc:  # died while idle: this call never ran; a new helper takes it
                self._discard(pool, exc)
                if attempt == 2:
                    out.set_exception(self._died(exc))
                    return out
            except (RuntimeError, HelperClosed) as exc:  # closed meanwhile (shutting down)
                out.set_exception(HelperClosed(f"{self.name} helper unavailable: {exc}"))
                return out
        inner.add_done_callback(partial(self._relay, pool, out))
        return out

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``submit(fn, *args)`` and wait for its result."""
        return self.submit(fn, *args).result()

    def _died(self, exc: BaseException) -> HelperDied:
        err = HelperDied(f"the {self.name} helper process died")
        err.__cause__ = exc
        return err

    def _relay(self, pool: ProcessPoolExecutor, out: Future[Any], inner: Future[Any]) -> None:
        # Runs in the pool's management thread: hand the outcome on, nothing slow here.
        if inner.cancelled():
            out.set_exception(HelperClosed(f"{self.name} helper closed before the call ran"))
            return
        exc = inner.exception()
        if isinstance(exc, BrokenProcessPool):
            self._discard(pool, exc)
            out.set_exception(self._died(exc))
        elif exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(inner.result())

    def kill(self) -> None:
        """Kill the helpers now (a call that never returns): their calls raise HelperDied and the
        next call starts a new helper."""
        with self._lock:
            pool = self._pool
        if pool is not None:
            _kill(list(pool_processes(pool).values()))

    def close(self, wait: bool = True) -> None:
        """Stop the helpers; calls not started are cancelled (HelperClosed). ``wait=False``: kill
        a helper still running a call (it may be stuck: the interpreter's exit would otherwise
        wait for it, and it would wait for this process to end); the call raises HelperDied."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(pool_processes(pool).values())  # to kill them, below
        pool.shutdown(wait=wait, cancel_futures=True)
        if not wait:
            _kill(processes)
