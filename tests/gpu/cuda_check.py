"""Run the shipped STR-Net checkpoint on CUDA with autocast and print ms per image.

Exits 0 with 'skipped: no CUDA' when CUDA is absent. Usage: ``python tests/gpu/cuda_check.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    from model.checkpoint import SHIPPED
    from model.predict import Predictor

    gpu = Predictor(SHIPPED, device="cuda")
    cpu = Predictor(SHIPPED, device="cpu")
    s = gpu.input_size
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, input {s} px")
    x32 = np.random.default_rng(0).normal(size=(32, 1, s, s)).astype(np.float32)
    t32 = textures(32)  # the texture stage's features (computed on the CPU from decoded films)
    p_gpu = np.array([r["probability_bone_loss"] for r in gpu.predict(x32[:8], None, t32[:8])])
    p_cpu = np.array([r["probability_bone_loss"] for r in cpu.predict(x32[:8], None, t32[:8])])
    print(f"max |P(bone loss)| difference autocast CUDA vs float32 CPU: {np.abs(p_gpu - p_cpu).max():.4f}")
    for batch in (1, 32):
        xb = torch.from_numpy(x32[:batch]).cuda()
        tb = t32[:batch]
        for _ in range(5):
            gpu.predict(xb, None, tb)
        torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while reps < 20 or time.perf_counter() - t0 < 2.0:
            gpu.predict(xb, None, tb)
            reps += 1
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - t0) / reps / batch
        print(f"batch {batch}: {ms:.3f} ms/image (Predictor.predict, autocast)")
    cam = gpu.saliency(x32[:1])
    print(f"saliency shape {cam.shape}, range [{cam.min():.2f}, {cam.max():.2f}]")
    worker_path(x32)
    return 0


def textures(n: int) -> np.ndarray:
    """Texture features of ``n`` random 1024 x 832 films, and their CPU time per film."""
    from model.texture import texture_features

    films = np.random.default_rng(1).random((n, 1024, 832), dtype=np.float32)
    t0 = time.perf_counter()
    out = np.stack([texture_features(f) for f in films])
    print(f"texture features (CPU): {1000 * (time.perf_counter() - t0) / n:.1f} ms/film")
    return out


def worker_path(x32: np.ndarray) -> None:
    """Time the worker's own inference call (agent.pipeline.infer.Screener.score: scores + Grad-CAM)."""
    from agent.pipeline.infer import Screener

    clinical = [{"age": 67.0, "sex": "F", "bmi": 24.0}] * len(x32)
    t32 = textures(len(x32))
    for device in ("cuda", "cpu"):
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
            print(
                f"worker Screener.score on {device}, batch {batch}: {total / reps / batch:.2f} ms/image "
                "(scores + Grad-CAM, host arrays in and out)"
            )


if __name__ == "__main__":
    sys.exit(main())
