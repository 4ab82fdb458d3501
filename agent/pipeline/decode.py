"""Decode and preprocess a batch's films, in parallel across cores when that pays.

JPEG 2000 decodes at about 550 ms per 2500 x 2000 16-bit film on one core here (JPEG lossless
165 ms, RLE 83 ms, uncompressed 10 ms; tests/bench/bench_decode.py), and the screening path decoded a
batch's films one after another. ``DecodePool`` decodes and preprocesses them (``prepare``: load
with its size caps and blank check, preprocess, texture features) in ``worker.decode_processes``
helper processes (``strnet-decode``, spawned by the screening process at its first compressed
batch and kept), and hands back each film's header, float32 pixels, model input and features.

- Only a batch with two or more compressed films goes to the pool; a batch of one, and the
  uncompressed films of any batch (decoding them costs less than sending their pixels back), are
  prepared in the screening process itself, while the pool works.
- Memory is bounded: at most ``processes`` films are in the pool at once (submitted as others
  come back), each process holding one decoded film.
- A decode process that dies (a codec crash, the kernel's OOM killer) takes the films it and its
  siblings held: the pool is replaced and each of those films is prepared again alone, so the one
  that kills its process again fails with a reason (its job is retried, then DEAD) and the others
  are screened.

The pool's processes import no torch: numpy, pydicom and its codecs, and the model's preprocessing.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from multiprocessing.util import Finalize
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from agent.errors import HelperClosed, HelperDied, InputRejected, ProcessingError, reason_of
from agent.helper import HelperProcess
from agent.logging import get_logger
from agent.pipeline.load import LoadedImage, load
from model.preprocess import PreprocessSpec, preprocess
from model.texture import texture_features

log = get_logger(__name__)

#: ``worker.decode_processes`` unset: one fewer than the cores, at most this many, and none below
#: MIN_CORES_FOR_POOL cores
MAX_AUTO_PROCESSES = 4
MIN_CORES_FOR_POOL = 4
DIED_REASON = "the decode process died while decoding this image (twice)"


@dataclass(frozen=True)
class Prepared:
    """A film ready to score: its header and pixels (``image``), the model input and features."""

    image: LoadedImage
    tensor: np.ndarray
    texture: np.ndarray | None
    prep_ms: float


@dataclass(frozen=True)
class Refused:
    """Not prepared: ``rejected`` (not screenable, SKIPPED) or failed (retried); ``reason`` names
    no element value."""

    rejected: bool
    reason: str


Preparing = Prepared | Refused


@dataclass(frozen=True)
class PrepSpec:
    """What preparing a film takes (sent to the decode processes)."""

    max_pixels: int
    spec: PreprocessSpec
    texture: bool


def preprocess_pixels(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The model's input for a decoded film (float32); ProcessingError when it cannot be made."""
    try:
        return np.asarray(preprocess(pixels, spec), dtype=np.float32)
    except ValueError as exc:
        raise ProcessingError(f"preprocessing failed: {exc}") from None


def texture_of(pixels: np.ndarray) -> np.ndarray:
    """A decoded film's texture features; ProcessingError when they cannot be computed."""
    try:
        return texture_features(pixels)
    except ValueError as exc:
        raise ProcessingError(f"texture features failed: {exc}") from None


def prepare(path: Path, how: PrepSpec) -> Preparing:
    """Load, preprocess and take the texture features of one spooled film (in a decode process,
    or in the screening process itself)."""
    try:
        image = load(path, how.max_pixels)
        t0 = time.perf_counter()
        tensor = preprocess_pixels(image.pixels, how.spec)
        texture = texture_of(image.pixels) if how.texture else None
    except InputRejected as exc:
        return Refused(True, reason_of(exc))
    except ProcessingError as exc:
        return Refused(False, reason_of(exc))
    return Prepared(image, tensor, texture, (time.perf_counter() - t0) * 1000)


def prepare_remote(path: Path, how: PrepSpec) -> Preparing:
    """``prepare`` in a decode process: what comes back leaves out the compressed pixel data (the
    decoded pixels are what is used; nothing downstream reads the source's Pixel Data)."""
    out = prepare(path, how)
    if isinstance(out, Prepared) and "PixelData" in out.image.dataset:
        del out.image.dataset.PixelData
    return out


def costly(path: Path) -> bool:
    """The film's pixel data is compressed (encapsulated): decoding it is worth another process.
    False when its file meta cannot be read (preparing it in place gives the reason)."""
    try:
        syntax = read_file_meta_info(path).get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - a missing or corrupt file raises many types; prepare() names it
        return False
    return syntax is not None and UID(str(syntax)).is_compressed


def default_processes() -> int:
    """``worker.decode_processes`` unset: none below 4 cores (on the 2-core bench machine the pool
    gave 0.77x to 1.12x the serial rate: the main and screening processes already hold both
    cores), else one fewer than the cores, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return 0 if cores < MIN_CORES_FOR_POOL else min(cores - 1, MAX_AUTO_PROCESSES)


class DecodePool:
    """``processes`` decode processes (``fn``: what each film goes through there, ``prepare_remote``
    unless a test gives another module-level function). Thread-safe as ``HelperProcess`` is."""

    def __init__(self, processes: int, fn: Callable[[Path, PrepSpec], Preparing] = prepare_remote) -> None:
        self.processes = processes
        self.fn = fn
        self.helper = HelperProcess("decode", processes, title="strnet-decode")
        self.deaths = 0  # decode process deaths seen (a batch's films retried alone after each)
        # Closed when this process ends, before multiprocessing waits for its children: the
        # screening process is a multiprocessing child, whose exit joins every child process first
        # (and never runs the interpreter's own exit, where a pool would tell its processes to
        # stop): open, the decode processes would wait for work forever, and it for them.
        Finalize(self, self.helper.close, kwargs={"wait": False}, exitpriority=10)

    def prepare_all(self, paths: list[Path], how: PrepSpec, here: Callable[[Path], Preparing]) -> list[Preparing]:
        """Each film of ``paths`` prepared, in order: the compressed ones in the pool when there
        are two or more of them, the rest by ``here`` in this process meanwhile."""
        out: dict[int, Preparing] = {}
        remote = [i for i, p in enumerate(paths) if costly(p)]
        if len(remote) < 2:
            return [here(p) for p in paths]
        pending = deque(remote)
        flying: dict[Future[Any], int] = {}

        def top_up() -> None:
            while pending and len(flying) < self.processes:
                i = pending.popleft()
                flying[self.helper.submit(self.fn, paths[i], how)] = i

        top_up()
        for i in sorted(set(range(len(paths))) - set(remote)):
            out[i] = here(paths[i])
        orphans: list[int] = []
        while flying:
            done, _ = wait(list(flying), return_when=FIRST_COMPLETED)
            for future in done:
                i = flying.pop(future)
                try:
                    out[i] = future.result()
                except HelperDied:
                    orphans.append(i)
                except Exception as exc:  # noqa: BLE001 - the pool closed, or fn failed unexpectedly: this film fails
                    out[i] = Refused(False, f"decode process: {reason_of(exc)}")
            top_up()
        if orphans:
            self.deaths += 1
            log.warning("decode_process_died", films=len(orphans))
        for i in sorted(orphans):  # alone now: a film that kills its process again fails by itself
            out[i] = self._alone(paths[i], how)
        return [out[i] for i in range(len(paths))]

    def _alone(self, path: Path, how: PrepSpec) -> Preparing:
        try:
            return self.helper.submit(self.fn, path, how).result()
        except HelperDied:
            self.deaths += 1
            log.error("decode_process_died_again")
            return Refused(False, DIED_REASON)
        except HelperClosed as exc:
            return Refused(False, f"decode process: {reason_of(exc)}")

    def pids(self) -> list[int]:
        return self.helper.pids()

    def close(self, wait: bool = True) -> None:
        self.helper.close(wait)
