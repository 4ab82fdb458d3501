"""The GPU check: one training epoch of the shipped STR-Net variant through the real training
path, then inference timings, each printed in images/s.

Usage: ``python tests/gpu/cuda_check.py`` (``make gpu``). Exits 0 with 'skipped: no CUDA' when
CUDA is absent. ``--device cpu --images 64`` runs the same steps on the CPU (to check the script
itself on a machine without a GPU; its figures are not GPU figures).

Steps: synthesise ``--images`` images (default 2048, uncompressed, about 1.7 MB each on disk) in
``--workers`` processes (default: every core) into a temporary folder; train ONE epoch with
``model.train.train`` (the shipped checkpoint's architecture, preprocessing and recipe, texture
stage off; on CUDA the batch, learning rate and precision of ``effective_batch`` and
``amp_dtype``); print its training images/s, with and without the first step (CUDA context,
cuDNN autotuning); then ``Predictor.predict`` and the worker's ``Screener.score`` per batch size.
Planned to take under 8 minutes on one H100 with 16 cores (synthesis about 0.2 s per image and
core, decode about 20 ms per image and core, the epoch seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

SEED = 240_001  # synthetic sets of this check: seeds SEED, SEED + 1, ... (never used for a figure)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--images", type=int, default=2048, help="synthetic images for the training epoch")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="synthesis and decode processes")
    ap.add_argument("--no-train", action="store_true", help="inference timings only")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    if args.images < 64:  # 32 leave about 6 validation images: the 90 % conformal quantile is infinite
        ap.error("--images must be at least 64 (enough validation images for the operating points)")
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU (forced; not a GPU figure)"
    print(f"device {name}, torch {torch.__version__}, {os.cpu_count()} cores")
    if not args.no_train:
        train_epoch(dev, args.images, max(1, args.workers))
    inference(dev)
    return 0


def synthesize(root: Path, n: int, workers: int) -> list[Path]:
    """``n`` images in up to ``workers`` parts of at least 16 images, one process each."""
    from model.synth.generate import generate

    parts = max(1, min(workers, n // 16))
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=parts) as pool:
        futures = [
            pool.submit(generate, root / f"set{i}", n=k, seed=SEED + i, compressed_fraction=0.0)
            for i, k in enumerate(sizes)
        ]
        manifests = [Path(f.result()) for f in futures]
    s = time.perf_counter() - t0
    print(f"synthesis: {n} images in {s:.1f} s ({n / s:.1f} images/s, {parts} processes)")
    return manifests


def train_epoch(dev: torch.device, n: int, workers: int) -> None:
    """One epoch of the shipped variant through ``model.train.train``; prints images/s."""
    from model.checkpoint import SHIPPED, read_metadata
    from model.config import ModelConfig, TrainConfig
    from model.preprocess import PreprocessSpec
    from model.train import train

    shipped = read_metadata(SHIPPED)
    model_cfg = ModelConfig.from_dict(shipped["model_config"])
    spec = PreprocessSpec.from_dict(shipped["preprocess"])
    cfg = replace(TrainConfig.from_dict(shipped["train_config"]), epochs=1, texture=False, time_budget_min=0.0)
    with tempfile.TemporaryDirectory(prefix="strnet-gpu-check-") as tmp:
        manifests = synthesize(Path(tmp), n, workers)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        path = train(
            manifests,
            Path(tmp) / "run",
            model_cfg,
            cfg,
            spec,
            device=str(dev),
            model_version="gpu-check",
            synthetic=True,
            progress=False,
            workers=workers,
            command="tests/gpu/cuda_check.py",
        )
        meta = read_metadata(path)
    t = meta["training"]
    h = t["history"][0]
    rest_images = h["train_images"] - t["batch_size_used"]
    rest_s = h["train_s"] - h["first_step_s"]
    rest = f"{rest_images / rest_s:.0f} images/s" if rest_images > 0 and rest_s > 0 else "n/a (one step)"
    print(
        f"training: 1 epoch of the shipped variant ({meta['training_data']['n_train']} training images), "
        f"batch {t['batch_size_used']}, lr {t['lr_used']:g}, {t['amp_dtype']}"
        f"{' with a gradient scaler' if t['grad_scaler'] else ''}"
    )
    print(
        f"training images/s: {h['train_images'] / h['train_s']:.0f} over the epoch "
        f"({h['train_images']} images in {h['train_s']:.2f} s); after the first step {rest} "
        f"(first step {h['first_step_s']:.2f} s)"
    )
    print(f"decode+preprocess {t['decode_s']} s, whole train() {t['wall_time_s']} s, val AUROC {h['val_auroc']:.3f}")
    if dev.type == "cuda":
        print(f"peak GPU memory in training: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def inference(dev: torch.device) -> None:
    """``Predictor.predict`` (autocast on CUDA) per batch size, Grad-CAM, the worker's call."""
    from model.checkpoint import SHIPPED
    from model.predict import Predictor

    pred = Predictor(SHIPPED, device=str(dev))
    s = pred.input_size
    print(f"inference: shipped checkpoint, input {s} px")
    x32 = np.random.default_rng(0).normal(size=(32, 1, s, s)).astype(np.float32)
    t32 = textures(32)  # the texture stage's features (computed on the CPU from decoded films)
    if dev.type == "cuda":
        cpu = Predictor(SHIPPED, device="cpu")
        p_gpu = np.array([r["probability_bone_loss"] for r in pred.predict(x32[:8], None, t32[:8])])
        p_cpu = np.array([r["probability_bone_loss"] for r in cpu.predict(x32[:8], None, t32[:8])])
        print(f"max |P(bone loss)| difference autocast CUDA vs float32 CPU: {np.abs(p_gpu - p_cpu).max():.4f}")
    for batch in (1, 32):
        xb = torch.from_numpy(x32[:batch]).to(dev)
        tb = t32[:batch]
        for _ in range(5):
            pred.predict(xb, None, tb)
        _sync(dev)
        reps, t0 = 0, time.perf_counter()
        while reps < 20 or time.perf_counter() - t0 < 2.0:
            pred.predict(xb, None, tb)
            reps += 1
        _sync(dev)
        ms = 1000 * (time.perf_counter() - t0) / reps / batch
        print(f"batch {batch}: {ms:.3f} ms/image, {1000 / ms:.0f} images/s (Predictor.predict on {dev.type})")
    cam = pred.saliency(x32[:1])
    print(f"saliency shape {cam.shape}, range [{cam.min():.2f}, {cam.max():.2f}]")
    worker_path(x32, ("cuda", "cpu") if dev.type == "cuda" else ("cpu",))


def textures(n: int) -> np.ndarray:
    """Texture features of ``n`` random 1024 x 832 films, and their CPU time per film."""
    from model.texture import texture_features

    films = np.random.default_rng(1).random((n, 1024, 832), dtype=np.float32)
    t0 = time.perf_counter()
    out = np.stack([texture_features(f) for f in films])
    print(f"texture features (CPU): {1000 * (time.perf_counter() - t0) / n:.1f} ms/film")
    return out


def worker_path(x32: np.ndarray, devices: tuple[str, ...]) -> None:
    """Time the worker's own inference call (agent.pipeline.infer.Screener.score: scores + Grad-CAM)."""
    from agent.pipeline.infer import Screener

    clinical = [{"age": 67.0, "sex": "F", "bmi": 24.0}] * len(x32)
    t32 = textures(len(x32))
    for device in devices:
        screener = Screener(device=device)
        for batch in (1, 8, 32):
            if device == "cpu" and batch == 32:
                continue
            xb, cb, tb = x32[:batch], clinical[:batch], t32[:batch]
            for _ in range(3):
                screener.score(xb, cb, tb)
            reps, total = 0, 0.0
            while reps < 10 or total < 1000.0:
                _, ms = screener.score(xb, cb, tb)
                total += ms
                reps += 1
            per = total / reps / batch
            print(
                f"worker Screener.score on {device}, batch {batch}: {per:.2f} ms/image, {1000 / per:.0f} images/s "
                "(scores + Grad-CAM, host arrays in and out)"
            )


if __name__ == "__main__":
    sys.exit(main())
