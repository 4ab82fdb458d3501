"""Where the worker screens: a process of its own (``worker.process = true``, the default) or
its own thread.

The screening path (decode, preprocess, texture features, STR-Net, overlay build) costs about
200 ms of CPU per 10 MB film, much of it Python that holds the interpreter lock. In the process
that also receives (C-STORE), records and sends, that lock was the limit under sustained load
(docs/benchmarks.md): the main process needed more than one core's worth of it at
15,000 images per hour. A screening process (agent/helper.py) takes the model, torch and the
overlay builds to the other core; it reads the spooled files itself, and only job descriptions
go in and findings with the encoded overlays come back. The main process never imports torch.

Both engines have the same face, ``ScreeningEngine``.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from agent.domain import LeasedJob, ServedModel
from agent.helper import HelperProcess
from agent.logging import get_logger
from agent.pipeline.decode import DecodePool, default_processes
from agent.pipeline.run import Recordable, screen_and_report, warm_up


class ScreeningEngine(Protocol):
    """What the worker screens with: ``InlineScreening`` or ``ScreeningProcess``."""

    @property
    def model(self) -> ServedModel:
        """What is served."""
        ...

    def submit(self, jobs: list[LeasedJob], paths: dict[str, Path]) -> Future[list[Recordable]]:
        """A Future of one recordable outcome per job, in order."""
        ...

    def warm_up(self) -> None: ...

    def kill(self) -> None:
        """Give up a stuck batch (its Future fails for a retry)."""
        ...

    def close(self, wait: bool = True) -> None: ...


class InlineScreening:
    """Screens in the calling thread (``worker.process = false``): ``submit`` returns done."""

    def __init__(self, screener: Any, max_pixels: int, overlay: bool, decode_processes: int = 0) -> None:
        self.screener = screener  # agent.pipeline.infer.Screener
        self.model: ServedModel = screener.describe()
        self.max_pixels = max_pixels
        self.overlay = overlay
        self.decoder = DecodePool(decode_processes) if decode_processes > 0 else None

    def warm_up(self) -> None:
        warm_up(self.screener, self.overlay)

    def submit(self, jobs: list[LeasedJob], paths: dict[str, Path]) -> Future[list[Recordable]]:
        future: Future[list[Recordable]] = Future()
        try:
            future.set_result(
                screen_and_report(jobs, paths, self.screener, self.max_pixels, self.overlay, self.decoder)
            )
        except Exception as exc:  # noqa: BLE001 - handed to the reader, as the process engine does
            future.set_exception(exc)
        return future

    def kill(self) -> None:
        pass  # nothing runs behind the worker's back: submit() returns once screened

    def close(self, wait: bool = True) -> None:
        if self.decoder is not None:
            self.decoder.close(wait)


# -- in the screening process --------------------------------------------------------------------
_screener: Any = None
_load_error: BaseException | None = None
_max_pixels = 0
_overlay = True
_decoder: DecodePool | None = None


def _setup(weights: str, device: str, threshold: str, saliency: bool, threads: int | None,
           max_pixels: int, overlay: bool, decode_processes: int = 0) -> None:  # fmt: skip
    """The screening process's start: load the model and warm the path up. An error is kept and
    raised by every call (an initializer that raises would only break the pool, wordlessly). The
    decode processes start at the first batch that needs them (they end with this process)."""
    global _screener, _load_error, _max_pixels, _overlay, _decoder
    _max_pixels, _overlay = max_pixels, overlay
    _decoder = DecodePool(decode_processes) if decode_processes > 0 else None
    try:
        from agent.pipeline.infer import Screener  # torch: here, never in the service's process

        _screener = Screener(Path(weights), device=device, threshold=threshold, saliency=saliency, threads=threads)
    except BaseException as exc:  # noqa: BLE001 - raised by the first call, in the parent
        _load_error = exc
        return
    try:
        warm_up(_screener, overlay)
    except Exception as exc:  # noqa: BLE001 - as inline: the real path reports its own errors
        get_logger(__name__).warning("worker_warm_up_failed", error=exc.__class__.__name__)


def _loaded() -> Any:
    if _load_error is not None:
        raise _load_error
    return _screener


def _describe() -> ServedModel:
    return _loaded().describe()


def _screen(jobs: list[LeasedJob], paths: dict[str, Path]) -> list[Recordable]:
    return screen_and_report(jobs, paths, _loaded(), _max_pixels, _overlay, _decoder)


def decode_processes(worker_cfg: Any) -> int:
    """``worker.decode_processes``; unset: decode.default_processes(); 0: decode in line."""
    n = getattr(worker_cfg, "decode_processes", None)
    return default_processes() if n is None else int(n)


def default_threads() -> int:
    """torch's CPU threads in the screening process: one fewer than the cores, at least one.

    The main process works on the other core; torch's default (one thread per core) made its
    threads wait for each other at every layer while that core was busy (screening bench, 10
    studies: inference 100 ms per image and 258 ms of the process's CPU per image with 2
    threads, 35 and 176 ms with 1)."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


# -- in the service --------------------------------------------------------------------------------
class ScreeningProcess:
    """Screens in a helper process; ``start()`` loads the model there and returns its description
    (raising ConfigError for a checkpoint that does not load, as the inline engine does)."""

    def __init__(self, weights: Path, worker_cfg: Any, max_pixels: int, overlay: bool) -> None:
        args = (str(weights), worker_cfg.device, worker_cfg.threshold, worker_cfg.saliency,
                worker_cfg.cpu_threads or default_threads(), max_pixels, overlay,
                decode_processes(worker_cfg))  # fmt: skip
        self.helper = HelperProcess("screening", 1, _setup, args, title="strnet-screen")
        self._model: ServedModel | None = None

    def start(self) -> ScreeningProcess:
        try:
            self._model = self.helper.call(_describe)
        except BaseException:
            self.helper.close(wait=False)
            raise
        return self

    @property
    def model(self) -> ServedModel:
        """What the process serves; known once ``start()`` has returned."""
        if self._model is None:
            raise RuntimeError("the screening process has not been started")
        return self._model

    def warm_up(self) -> None:
        pass  # the process warmed up when it started; a replacement warms up before its first batch

    def submit(self, jobs: list[LeasedJob], paths: dict[str, Path]) -> Future[list[Recordable]]:
        """The Future raises HelperDied when the process died with the batch (a new one is
        started for the next), HelperClosed when it was closed first."""
        return self.helper.submit(_screen, jobs, paths)

    def pids(self) -> list[int]:
        return self.helper.pids()

    def kill(self) -> None:
        """Kill a screening process stuck on a batch (the batch fails for a retry)."""
        self.helper.kill()

    def close(self, wait: bool = True) -> None:
        self.helper.close(wait)
