"""Bench: what keeping the heat map on bone costs beside the model's own inference.

Run: ``make bench BENCH=tests/bench/bench_saliency.py``. Prints figures only (no timed
assertions): model.saliency.restrict_to_bone on a synthetic film as decoded (about 1 Mpx) and the
same film enlarged to 5 Mpx (a detector's full size), next to the reference measured in the same
run, the shipped model's inference with Grad-CAM for one image (agent.pipeline.infer.Screener.score).
The goal: the restriction is a small fraction of inference and does not grow with the film
(it works at the map's resolution).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image


def _ms(fn: Callable[[], object], repeat: int = 15) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def test_bench_saliency_restriction() -> None:
    from agent.pipeline.infer import Screener
    from model.io import read_pixels
    from model.saliency import restrict_to_bone
    from model.synth.acquisition import VENDOR_PROFILES
    from model.synth.dicom_writer import build_dataset
    from model.synth.generate import patient_images

    _, records = patient_images(990001, 0)
    rec = records[0]
    film = read_pixels(build_dataset(rec.image.stored, rec.header, VENDOR_PROFILES[rec.image.profile]))
    big = np.asarray(Image.fromarray(film, mode="F").resize((2048, 2560), Image.Resampling.BILINEAR))
    screener = Screener(device="cpu", threads=1)
    x = screener.preprocess(film)[None]
    texture = screener.texture(film)
    features = None if texture is None else texture[None]
    clinical = [{"age": None, "sex": None, "bmi": None}]
    [finding], _ = screener.score(x, clinical, features)
    cam = np.asarray(finding.saliency, dtype=np.float32)

    infer_ms = _ms(lambda: screener.score(x, clinical, features), repeat=7)
    print(f"\nreference: inference with Grad-CAM, 1 image, 1 thread: {infer_ms:.1f} ms")
    for name, f in (("film as decoded", film), ("enlarged to 5 Mpx", big)):
        region = screener.region(f.shape)
        ms = _ms(lambda f=f, region=region: restrict_to_bone(f, region, cam))
        print(f"restrict_to_bone, {name} {f.shape[0]}x{f.shape[1]}: {ms:.2f} ms = {ms / infer_ms:.3f} x inference")
