"""agent/helper.py: real spawned helper processes: results and errors come back, a death is a
HelperDied and the helper is replaced, a closed helper refuses, a helper outlives the thread that
started it, and ends when its parent is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.errors import ConfigError, HelperClosed, HelperDied
from agent.helper import HelperProcess

ROOT = Path(__file__).resolve().parents[2]


def ended(pid: int, timeout_s: float) -> bool:
    """Whether process ``pid`` stops running within ``timeout_s``: gone, or a zombie waiting for
    its parent (or this container's init) to reap it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


def _raise_config_error() -> None:
    raise ConfigError("worker.weights", "checkpoint not found")


def test_results_and_errors_come_back_from_the_helper() -> None:
    helper = HelperProcess("test")
    try:
        assert helper.call(os.getpid) != os.getpid()
        with pytest.raises(ConfigError) as err:  # our exceptions survive the trip, fields and all
            helper.call(_raise_config_error)
        assert err.value.setting == "worker.weights" and str(err.value) == "worker.weights: checkpoint not found"
    finally:
        helper.close()


def test_a_killed_helper_fails_its_call_and_is_replaced() -> None:
    helper = HelperProcess("test")
    try:
        first = helper.call(os.getpid)
        running = helper.submit(time.sleep, 30)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(HelperDied, match="the test helper process died"):
            running.result(30)
        assert helper.call(os.getpid) not in (first, os.getpid())
    finally:
        helper.close()


def test_a_closed_helper_refuses_calls() -> None:
    helper = HelperProcess("test")
    helper.call(os.getpid)
    helper.close()
    with pytest.raises(HelperClosed):
        helper.call(os.getpid)
    assert helper.pids() == []


def test_a_helper_outlives_the_thread_that_started_it() -> None:
    """PR_SET_PDEATHSIG would have ended it with that thread (the bug this module avoids)."""
    helper = HelperProcess("test")
    try:
        pids: list[int] = []
        starter = threading.Thread(target=lambda: pids.append(helper.call(os.getpid)))
        starter.start()
        starter.join()
        time.sleep(1.5)  # longer than the parent watch's poll
        assert helper.call(os.getpid) == pids[0]
    finally:
        helper.close()


_PARENT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from agent.helper import HelperProcess
helper = HelperProcess("orphan-test")
print(helper.call(os.getpid), flush=True)
time.sleep(600)
"""


def test_a_helper_ends_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert ended(pid, 10), f"helper {pid} still runs after its parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_close_without_waiting_kills_a_busy_helper() -> None:
    """A stuck call must not hold up the service's exit (the pool would wait for it at exit)."""
    helper = HelperProcess("test")
    pid = helper.call(os.getpid)
    busy = helper.submit(time.sleep, 60)
    helper.close(wait=False)
    with pytest.raises((HelperDied, HelperClosed)):
        busy.result(10)
    assert ended(pid, 5)  # killed, not left sleeping for the 60 s


def test_a_helper_that_died_while_idle_does_not_fail_the_next_call() -> None:
    helper = HelperProcess("test")
    try:
        first = helper.call(os.getpid)
        os.kill(first, signal.SIGKILL)
        time.sleep(1.0)  # the pool notices while idle
        assert helper.call(os.getpid) not in (first, os.getpid())  # run by a new helper, no HelperDied
    finally:
        helper.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_helpers_ignore_sigterm_and_sigint_sent_to_the_whole_group(sig: signal.Signals) -> None:
    """systemd's default stop (SIGTERM) and Ctrl-C (SIGINT) reach every process of the unit or
    process group: the service stops its helpers."""
    helper = HelperProcess("test")
    try:
        pid = helper.call(os.getpid)
        os.kill(pid, sig)
        time.sleep(0.5)
        assert helper.call(os.getpid) == pid
    finally:
        helper.close()


def test_helpers_are_named_strnet_and_their_name_in_ps() -> None:
    """docs/architecture.md: `strnet-screen` and `strnet-sr` in ps and top (ADR 0008)."""
    helper = HelperProcess("SR")
    try:
        pid = helper.call(os.getpid)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "strnet-sr"
    finally:
        helper.close()
