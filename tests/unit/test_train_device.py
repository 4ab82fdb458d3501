"""What training does on CUDA, decided on the CPU: the batch and learning rate
(``model.train.effective_batch``), the autocast dtype (``model.predict.amp_dtype``), the fp16
gradient scaler's step (``model.train._backward_step``) and the GPU check's skip. A device
object ``torch.device("cuda")`` needs no GPU; the scaler runs on the CPU (``GradScaler("cpu")``)
through the same code as on CUDA."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.config import TrainConfig
from model.predict import amp_dtype
from model.train import _backward_step, effective_batch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cpu_keeps_the_configured_batch_and_learning_rate_exactly() -> None:
    assert effective_batch(TrainConfig(), CPU) == (32, 2e-3)
    cfg = TrainConfig(batch_size=24, lr=1e-3, cuda_batch_size=256)
    assert effective_batch(cfg, CPU) == (24, 1e-3)
    assert effective_batch(cfg, torch.device("meta")) == (24, 1e-3)


def test_cuda_takes_the_larger_batch_with_the_square_root_learning_rate_rule() -> None:
    batch, lr = effective_batch(TrainConfig(), CUDA)
    assert batch == 128 and lr == pytest.approx(4e-3)  # 2e-3 * sqrt(128 / 32)
    batch, lr = effective_batch(TrainConfig(batch_size=16, lr=1e-3, cuda_batch_size=64), torch.device("cuda:1"))
    assert batch == 64 and lr == pytest.approx(2e-3)
    batch, lr = effective_batch(TrainConfig(batch_size=64, cuda_batch_size=32), CUDA)
    assert batch == 32 and lr == pytest.approx(2e-3 / math.sqrt(2))


def test_cuda_batch_zero_keeps_the_cpu_batch() -> None:
    assert effective_batch(TrainConfig(cuda_batch_size=0), CUDA) == (32, 2e-3)


def test_batch_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="cuda_batch_size"):
        TrainConfig(cuda_batch_size=-1)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert TrainConfig.from_dict(TrainConfig(cuda_batch_size=96).to_dict()).cuda_batch_size == 96
    # a checkpoint written before the setting existed reads back with the default
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "cuda_batch_size"}
    assert TrainConfig.from_dict(old).cuda_batch_size == 128


def test_precision_is_bf16_where_supported_else_fp16_and_float32_off_cuda() -> None:
    assert amp_dtype(CUDA, bf16_supported=True) is torch.bfloat16
    assert amp_dtype(CUDA, bf16_supported=False) is torch.float16
    assert amp_dtype(CPU) is None
    assert amp_dtype(CPU, bf16_supported=True) is None


def _net_and_batch() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return net, torch.randn(16, 8), torch.randn(16, 1)


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def test_scaled_step_equals_the_plain_step_and_clips_the_unscaled_gradients() -> None:
    plain, x, y = _net_and_batch()
    scaled, _, _ = _net_and_batch()
    opt_a = torch.optim.SGD(plain.parameters(), lr=1e-3)
    opt_b = torch.optim.SGD(scaled.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for _ in range(3):
        # a large loss: its gradient norm is far above the clip of 5, so a clip applied to the
        # scaled gradients (65536 times larger) would give different steps
        _backward_step(1e3 * ((plain(x) - y) ** 2).mean(), plain, opt_a, None)
        _backward_step(1e3 * ((scaled(x) - y) ** 2).mean(), scaled, opt_b, scaler)
    for a, b in zip(_params(plain), _params(scaled), strict=True):
        torch.testing.assert_close(a, b)
    assert scaler.get_scale() == 2.0**16


def test_an_overflowing_step_is_skipped_and_the_scale_lowered() -> None:
    net, x, y = _net_and_batch()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = _params(net)
    loss = ((net(x) - y) ** 2).mean() * torch.tensor(float("inf"))
    _backward_step(loss, net, opt, scaler)
    for a, b in zip(before, _params(net), strict=True):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**15


def test_gpu_check_says_skipped_without_cuda() -> None:
    script = Path(__file__).resolve().parents[1] / "gpu" / "cuda_check.py"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "skipped: no CUDA"


def test_gpu_check_refuses_a_set_too_small_for_the_operating_points() -> None:
    script = Path(__file__).resolve().parents[1] / "gpu" / "cuda_check.py"
    res = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--images", "32"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "at least 64" in res.stderr


def test_replace_keeps_the_rule() -> None:
    cfg = replace(TrainConfig(), batch_size=8)
    assert effective_batch(cfg, CUDA) == (128, pytest.approx(2e-3 * 4))


def test_augmentation_stays_on_the_batch_device_with_the_cpu_generators_draws() -> None:
    """The "meta" device stands in for CUDA (no GPU here): a tensor of the CPU mixed into the
    batch's arithmetic would raise, and the generator must be left where the CPU batch leaves it."""
    from model.data import augment_batch

    cfg = TrainConfig(aug_noise=0.1)
    on_meta, on_cpu = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    y = augment_batch(torch.zeros(4, 1, 16, 16, device="meta"), cfg, on_meta)
    augment_batch(torch.zeros(4, 1, 16, 16), cfg, on_cpu)
    assert y.device.type == "meta" and y.shape == (4, 1, 16, 16)
    assert torch.equal(on_meta.get_state(), on_cpu.get_state())
