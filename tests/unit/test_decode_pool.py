"""agent/pipeline/decode.py: a batch's compressed films decoded and preprocessed in decode processes.

The parallel path gives the same pixels and findings as the serial one (the shipped checkpoint,
with its texture stage, so the features are computed in the decode processes too); a corrupt
JPEG 2000 film is rejected with a reason while the rest of its batch is screened; a decode process
killed mid-batch costs no film (they are prepared again) and the pool recovers; a film that kills
its process every time fails alone, with a reason. Speed: tests/bench/bench_decode.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_factory import compressed, knee_dx, write
from pydicom.encaps import encapsulate
from test_helper import ended

from agent.domain import InstanceRef, LeasedJob
from agent.pipeline import decode
from agent.pipeline.decode import DIED_REASON, DecodePool, Prepared, PrepSpec, Refused, prepare, prepare_remote
from agent.pipeline.run import Failed, Rejected, Screened, screen_batch
from model.preprocess import PreprocessSpec

MAX_PIXELS = 50_000_000


def poisoned(path: Path, how: PrepSpec) -> decode.Preparing:
    """``prepare_remote``, except that a film named poison* kills its decode process (a codec crash)."""
    if path.name.startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_remote(path, how)


def slow(path: Path, how: PrepSpec) -> decode.Preparing:
    """``prepare_remote`` a second later: time for the test to kill a process that holds a film."""
    time.sleep(1.0)
    return prepare_remote(path, how)


@pytest.fixture(scope="module")
def screener() -> Any:
    from agent.pipeline.infer import Screener

    s = Screener(device="cpu", threads=1)  # the shipped checkpoint: texture features too
    assert s.predictor.texture is not None
    return s


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("films")
    out = {}
    for i in range(4):
        out[f"j2k{i}"] = write(compressed(knee_dx(rows=640, cols=512, seed=i), "j2k"), d / f"j2k{i}.dcm")
    out["plain"] = write(knee_dx(rows=640, cols=512, seed=9), d / "plain.dcm")
    bad = compressed(knee_dx(rows=640, cols=512, seed=7), "j2k")
    bad.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 40])  # a J2K start, then noise
    out["corrupt"] = write(bad, d / "corrupt.dcm")
    poison = compressed(knee_dx(rows=640, cols=512, seed=8), "j2k")
    out["poison"] = write(poison, d / "poison.dcm")
    return out


@pytest.fixture()
def pool() -> Any:
    made: list[DecodePool] = []

    def _make(processes: int = 2, fn: Any = prepare_remote) -> DecodePool:
        made.append(DecodePool(processes, fn))
        return made[-1]

    yield _make
    for p in made:
        p.close(wait=False)


def _jobs(paths: list[Path]) -> list[LeasedJob]:
    jobs = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ref = InstanceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                          str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID))  # fmt: skip
        jobs.append(LeasedJob(i + 1, 1, str(path), ref))
    return jobs


def _decode_children() -> list[int]:
    import psutil

    alive = []
    for child in psutil.Process().children():
        try:
            if child.name() == "strnet-decode" and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _how() -> PrepSpec:
    return PrepSpec(MAX_PIXELS, PreprocessSpec(input_size=64), texture=True)


def test_parallel_path_gives_the_same_pixels_and_findings_as_the_serial_one(
    screener: Any, films: dict[str, Path], pool: Any
) -> None:
    paths = [films["j2k0"], films["plain"], films["j2k1"], films["j2k2"]]
    jobs = _jobs(paths)
    serial = screen_batch(jobs, Path, screener, MAX_PIXELS)
    decoder = pool(2)
    parallel = screen_batch(jobs, Path, screener, MAX_PIXELS, decoder)
    assert len(decoder.pids()) == 2  # the pool was used (three compressed films)
    for a, b in zip(serial, parallel, strict=True):
        assert isinstance(a, Screened) and isinstance(b, Screened)
        assert b.pixels.dtype == np.float32 and np.array_equal(a.pixels, b.pixels)
        for name in ("probability", "t_score", "t_score_low", "t_score_high", "bone_loss", "severity", "region"):
            assert getattr(a.findings, name) == getattr(b.findings, name), name
        assert np.array_equal(a.findings.saliency, b.findings.saliency, equal_nan=True)
        assert str(a.dataset.SOPInstanceUID) == str(b.dataset.SOPInstanceUID)
        assert "PixelData" not in b.dataset or b.job.spool_path.endswith("plain.dcm")  # not sent back


def test_a_batch_of_one_or_of_uncompressed_films_is_prepared_in_place(films: dict[str, Path], pool: Any) -> None:
    decoder = pool(2)
    here: list[Path] = []

    def local(p: Path) -> decode.Preparing:
        here.append(p)
        return prepare(p, _how())

    for batch in ([films["j2k0"]], [films["plain"], films["plain"]], [films["j2k0"], films["plain"]]):
        out = decoder.prepare_all(batch, _how(), local)
        assert all(isinstance(o, Prepared) for o in out)
    assert len(here) == 5 and decoder.pids() == []  # no decode process was ever started


def test_a_corrupt_jpeg2000_film_is_rejected_with_a_reason_and_the_others_are_screened(
    screener: Any, films: dict[str, Path], pool: Any
) -> None:
    paths = [films["j2k0"], films["corrupt"], films["j2k1"]]
    out = screen_batch(_jobs(paths), Path, screener, MAX_PIXELS, pool(2))
    assert isinstance(out[0], Screened) and isinstance(out[2], Screened)
    assert isinstance(out[1], Rejected) and out[1].reason.startswith("pixel data cannot be decoded"), out[1]


def test_a_decode_process_killed_mid_batch_costs_no_film_and_the_pool_recovers(
    films: dict[str, Path], pool: Any
) -> None:
    decoder = pool(2, slow)
    paths = [films[f"j2k{i}"] for i in range(4)]
    result: list[Any] = []
    runner = threading.Thread(
        target=lambda: result.extend(decoder.prepare_all(paths, _how(), lambda p: prepare(p, _how())))
    )
    runner.start()
    deadline = time.monotonic() + 60
    while len(decoder.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # both hold a film (each takes a second)
    first = decoder.pids()
    os.kill(first[0], signal.SIGKILL)
    runner.join(120)
    assert not runner.is_alive()
    assert decoder.deaths == 1
    assert all(isinstance(o, Prepared) for o in result), result  # prepared again, alone
    expected = [prepare(p, _how()) for p in paths]
    for got, want in zip(result, expected, strict=True):
        assert isinstance(got, Prepared) and isinstance(want, Prepared)
        assert np.array_equal(got.image.pixels, want.image.pixels) and np.array_equal(got.tensor, want.tensor)
    again = decoder.prepare_all(paths[:2], _how(), lambda p: prepare(p, _how()))  # the pool works on
    assert all(isinstance(o, Prepared) for o in again)
    assert not set(first) & set(decoder.pids())
    # the killed process's sibling went with its pool (it ignores SIGTERM, which is how a broken
    # pool ends its processes: left alive, it would hold the interpreter's exit forever)
    assert all(ended(pid, 10) for pid in first)


def test_a_film_that_kills_its_decode_process_every_time_fails_alone_with_a_reason(
    screener: Any, films: dict[str, Path], pool: Any
) -> None:
    paths = [films["j2k0"], films["poison"], films["j2k1"], films["j2k2"]]
    decoder = pool(2, poisoned)
    out = screen_batch(_jobs(paths), Path, screener, MAX_PIXELS, decoder)
    assert [type(o) for o in out] == [Screened, Failed, Screened, Screened]
    assert isinstance(out[1], Failed) and out[1].error == DIED_REASON
    assert decoder.deaths == 2  # in the batch, then alone
    # no process of a broken pool is left behind (they ignore SIGTERM, which is how a broken pool
    # ends them: one left waiting on its queue would hold this interpreter's exit forever)
    deadline = time.monotonic() + 10
    while set(_decode_children()) - set(decoder.pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_decode_children()) <= set(decoder.pids())
    assert all(isinstance(o, Screened) for o in screen_batch(_jobs(paths[2:]), Path, screener, MAX_PIXELS, decoder))


def test_refused_carries_the_kind_of_failure(films: dict[str, Path], tmp_path: Path) -> None:
    missing = prepare(tmp_path / "nothing.dcm", _how())
    assert isinstance(missing, Refused) and missing.rejected and "cannot read" in missing.reason


def test_the_screening_process_uses_its_decode_processes_and_still_ends_when_closed(
    tiny_weights: Path, films: dict[str, Path]
) -> None:
    """The screening process (a multiprocessing child, whose exit joins its children) closes its
    decode pool on the way out: open, its processes would wait for work, and it for them."""
    import psutil

    from agent.config import WorkerSection
    from agent.pipeline.process import ScreeningProcess
    from agent.pipeline.run import Finished

    cfg = WorkerSection(device="cpu", saliency=False, decode_processes=2)
    engine = ScreeningProcess(tiny_weights, cfg, MAX_PIXELS, overlay=False).start()
    closer = None
    try:
        paths = [films["j2k0"], films["j2k1"], films["corrupt"]]
        out = engine.submit(_jobs(paths), {str(p): p for p in paths}).result(timeout=120)
        assert [type(o) for o in out] == [Finished, Finished, Rejected]
        (screening,) = engine.pids()
        decoders = [c.pid for c in psutil.Process(screening).children() if c.name() == "strnet-decode"]
        assert len(decoders) == 2  # the batch's compressed films went to the decode processes
        closer = threading.Thread(target=engine.close, kwargs={"wait": True})
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "the screening process did not end: its decode processes held it"
        assert all(ended(pid, 10) for pid in [screening, *decoders])
    finally:
        if closer is None or closer.is_alive():
            engine.helper.kill()
            engine.close(wait=False)


@pytest.mark.parametrize(("cores", "expected"), [(1, 0), (2, 0), (3, 0), (4, 3), (5, 4), (16, 4)])
def test_unset_decode_processes_are_none_below_4_cores_else_one_fewer_at_most_4(
    cores: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/architecture.md and the setting's description: "none below 4 cores, else one fewer than
    the cores, at most 4"; set, the setting is taken as it is (0: every film in line)."""
    from agent.config import WorkerSection
    from agent.pipeline.process import decode_processes

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert decode_processes(WorkerSection()) == expected
    assert decode_processes(WorkerSection(decode_processes=0)) == 0
    assert decode_processes(WorkerSection(decode_processes=2)) == 2
