"""``strnet serve`` in a separate process that a fail point may kill (SIGKILL).

Two ways to start it:

- fork (default): the test process forks and the child runs ``agent.cli.main(["serve", ...])``,
  the very code ``strnet serve`` runs, with the fail point armed in the child. Forking skips the
  7-10 s of interpreter start and imports (torch included) that each ``strnet serve`` costs on
  the shared 2-core machine, which is what lets 35 crash runs fit in ``make test``. The child is
  a real process with its own sockets, database connections and spool writes; it dies by
  SIGKILL exactly like the exec'd command would.
- exec (``STRNET_FAILPOINT_EXEC=1``, used by ``make bench``): ``python -m agent serve`` with
  ``STRNET_FAILPOINT`` in its environment, as an operator would start it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

EXEC_MODE = os.environ.get("STRNET_FAILPOINT_EXEC", "") == "1"


def _child(config: Path, log_path: Path, failpoint: str | None) -> None:
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # pytest's capture replaced sys.stdout/err with its own files: write to the log instead
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        os.setpgid(0, 0)  # its own group: the parent's signals (Ctrl-C in pytest) are not its own
        from agent import failpoints

        name, _, nth = (failpoint or "").partition(":")
        failpoints._name = name
        failpoints._target = int(nth) if nth.isdigit() else 1
        failpoints._hits = 0
        if failpoint:
            os.environ["STRNET_FAILPOINT"] = failpoint
        else:
            os.environ.pop("STRNET_FAILPOINT", None)
        if "torch" in sys.modules:  # as DataLoader workers do after a fork
            sys.modules["torch"].set_num_threads(1)
        sys.argv = ["strnet", "serve", "--config", str(config), "--no-web"]
        from agent.cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the forked child must reach os._exit whatever happened
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def preload(worker: bool) -> None:
    """Import in the parent what the child would import on its first job, so each fork starts warm."""

    if worker:

        _warm_reporting()


_warmed = False


def _warm_reporting() -> None:
    """Build one overlay and one SR: their first build costs about 2 s of one-time set-up (highdicom)."""
    global _warmed
    if _warmed:
        return
    import numpy as np
    from dicom_factory import knee_dx

    from agent.domain import AlgorithmInfo, Findings
    from agent.reporting.builder import encode as _encode
    from agent.reporting.overlay import build_overlay
    from agent.reporting.sr import build_sr

    finding = Findings(0.5, 0.45, True, 0.3, "osteopenia", -1.5, -2.0, -1.0, 0.9,
                       AlgorithmInfo("STR-Net", "warm-0", "0" * 64))
    source = knee_dx(rows=64, cols=64)
    _encode(build_overlay(source, np.zeros((64, 64)), finding))
    _encode(build_sr([source], [finding], revision=1, predecessor=None))
    _warmed = True


class ServeFork:
    """One ``strnet serve`` process; ``start()`` returns once its DICOM port accepts."""

    def __init__(
        self, config: Path, port: int, log_path: Path, failpoint: str | None = None, exec_: bool = EXEC_MODE
    ) -> None:
        self.exec_ = exec_
        self.config = config
        self.port = port
        self.log_path = log_path
        self.failpoint = failpoint
        self.pid: int | None = None
        self.status: int | None = None  # raw wait status once reaped
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> ServeFork:
        if self.exec_:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("STRNET_FAILPOINT", None)
            if self.failpoint:
                env["STRNET_FAILPOINT"] = self.failpoint
            log = self.log_path.open("ab")
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "serve", "--config", str(self.config), "--no-web"],
                stdout=log, stderr=log, env=env,
            )
            log.close()
            self.pid = self._proc.pid
        else:
            preload(worker=True)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(self.config, self.log_path, self.failpoint)
            self.pid = pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"strnet serve exited early: {self.log_path.read_text(errors='replace')[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    # an A-ABORT PDU, so the probe does not hold a half-open association until acse_timeout
                    s.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                    return self
            time.sleep(0.05)
        raise RuntimeError("strnet serve did not start listening")

    def alive(self) -> bool:
        if self.status is not None or self.pid is None:
            return False
        if self._proc is not None:
            rc = self._proc.poll()
            if rc is None:
                return True
            self.status = (-rc) if rc < 0 else rc << 8  # as a wait status
            return False
        pid, st = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.status = st
        return False

    @property
    def killed(self) -> bool:
        """True when the process died of SIGKILL (its fail point fired)."""
        return self.status is not None and os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL

    def wait_dead(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (clean stop), SIGKILL if it does not go."""
        if not self.alive():
            return
        assert self.pid is not None
        os.kill(self.pid, signal.SIGTERM)
        if not self.wait_dead(timeout_s):
            self.kill()

    def kill(self) -> None:
        if self.alive() and self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait_dead(10)

    def __enter__(self) -> ServeFork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
