"""CPU benchmark of the shipped STR-Net checkpoint (prints figures; no timed assertions).

Run: ``python tests/bench/bench_model.py`` (or through pytest: ``test_bench_model``).
Prints per-image latency at batch 1 and 8 (float32, and bf16 autocast for comparison), the
model's FLOPs, achieved GFLOP/s beside a float32 matmul peak measured in the same run, and
preprocessing time from decoded pixels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.checkpoint import SHIPPED


def count_flops(model: nn.Module, size: int) -> int:
    """Multiply-adds x 2 of convolutions and linear layers for one (1, 1, S, S) image."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += 2 * out.numel() * k

    def lin_hook(m: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * m.in_features

    hooks = [
        mod.register_forward_hook(conv_hook if isinstance(mod, nn.Conv2d) else lin_hook)
        for mod in model.modules()
        if isinstance(mod, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in hooks:
        h.remove()
    return total


def matmul_peak_gflops(n: int = 1024, seconds: float = 1.5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def time_ms(fn, min_s: float = 1.5, min_reps: int = 5) -> float:
    fn()
    fn()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_s:
        fn()
        reps += 1
    return 1000 * (time.perf_counter() - t0) / reps


def main(weights: Path = SHIPPED) -> dict[str, float]:
    from model.predict import Predictor

    torch.set_num_threads(2)
    if weights.exists():
        pred = Predictor(weights, device="cpu")
        model, size, name = pred.model, pred.input_size, weights.name
    else:
        from model.strnet import strnet_base

        pred, model, size, name = (
            None,
            strnet_base(channels_last=True).eval(),
            256,
            "untrained base",
        )
    flops = count_flops(model, size)
    peak = matmul_peak_gflops()
    print(f"checkpoint {name}, input {size} px, threads {torch.get_num_threads()}")
    print(f"model FLOPs per image {flops / 1e9:.3f} GFLOP; float32 matmul peak {peak:.1f} GFLOP/s")
    res: dict[str, float] = {"flops": flops, "peak_gflops": peak}
    for batch in (1, 8):
        x = torch.randn(batch, 1, size, size)
        with torch.no_grad():
            ms = time_ms(lambda x=x: model(x)) / batch
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ms_bf16 = time_ms(lambda x=x: model(x)) / batch
        gf = flops / (ms / 1000) / 1e9
        res[f"ms_b{batch}"], res[f"ms_b{batch}_bf16"] = ms, ms_bf16
        print(
            f"batch {batch}: {ms:.2f} ms/image float32 ({gf:.1f} GFLOP/s = {gf / peak:.0%} of "
            f"matmul peak); bf16 autocast {ms_bf16:.2f} ms/image (ratio {ms_bf16 / ms:.2f})"
        )
    if pred is not None:
        xb = np.random.default_rng(0).normal(size=(1, 1, size, size)).astype(np.float32)
        tb = None
        if pred.texture is not None:
            from model.texture import texture_features

            tb = texture_features(np.random.default_rng(2).random((1024, 832), dtype=np.float32))[None]
        ms_pred = time_ms(lambda: pred.predict(xb, None, tb))
        ms_cam = time_ms(lambda: pred.saliency(xb), min_s=1.0)
        ms_both = time_ms(lambda: pred.predict_with_saliency(xb, None, tb), min_s=1.0)
        res["ms_predict_b1"], res["ms_saliency"], res["ms_predict_with_saliency"] = ms_pred, ms_cam, ms_both
        print(
            f"Predictor.predict batch 1: {ms_pred:.2f} ms; saliency (Grad-CAM): {ms_cam:.2f} ms; "
            f"predict_with_saliency (the worker's call, one backbone pass): {ms_both:.2f} ms "
            f"(ratio to the two calls {ms_both / (ms_pred + ms_cam):.2f})"
        )
    try:
        from model.preprocess import PreprocessSpec, preprocess

        spec = PreprocessSpec() if pred is None else pred.spec
        for shape in ((1024, 832), (1024, 1456), (2500, 2000)):
            pixels = np.random.default_rng(1).random(shape, dtype=np.float32)
            ms_pp = time_ms(lambda p=pixels: preprocess(p, spec), min_s=1.0)
            res[f"ms_preprocess_{shape[0]}x{shape[1]}"] = ms_pp
            line = f"preprocess from decoded pixels {shape[0]}x{shape[1]}: {ms_pp:.1f} ms"
            if pred is not None and pred.texture is not None:
                from model.texture import texture_features

                ms_tex = time_ms(lambda p=pixels: texture_features(p), min_s=1.0)
                res[f"ms_texture_{shape[0]}x{shape[1]}"] = ms_tex
                line += f"; texture features {ms_tex:.1f} ms (sum {ms_pp + ms_tex:.1f} ms)"
            print(line)
    except ImportError as exc:  # the shared preprocessing module is not there yet
        print(f"preprocess: skipped ({exc})")
    print(f"goal <= 50 ms/image: batch-1 ratio to goal {res['ms_b1'] / 50:.2f}")
    return res


def test_bench_model() -> None:
    main()


if __name__ == "__main__":
    main()
