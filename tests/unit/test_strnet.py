"""The tiny STR-Net variant on CPU: shapes, eval determinism, gradient flow, routing, data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig, TrainConfig
from model.data import ManifestRow, augment_batch, clinical_vector, patient_split
from model.losses import strnet_loss
from model.strnet import STRNet, build_model, count_params, strnet_base, strnet_tiny

S = 64


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    return {
        "label": torch.tensor([1.0, 0.0, 1.0, 1.0])[:b],
        "severity": torch.tensor([1.0, float("nan"), 0.0, 1.0])[:b],
        "tscore": torch.tensor([-3.0, 0.2, -1.8, float("nan")])[:b],
    }


def test_shapes_and_gates() -> None:
    torch.manual_seed(0)
    m = strnet_tiny().eval()
    out = m(torch.randn(3, 1, S, S))
    assert out["screen_logit"].shape == (3,)
    assert out["severity_logit"].shape == (3,)
    assert out["tscore"].shape == (3,)
    for task, g in m.gate_weights.items():
        assert g.shape == (3, m.cfg.n_experts), task
        assert torch.allclose(g.sum(-1), torch.ones(3))
    # clinical inputs change the T-score and severity heads, never the screening logit
    clin = torch.tensor([clinical_vector(70, "F", 24.0)] * 3)
    out2 = m(torch.zeros(3, 1, S, S), clin)
    out3 = m(torch.zeros(3, 1, S, S))
    assert torch.equal(out2["screen_logit"], out3["screen_logit"])
    assert not torch.equal(out2["tscore"], out3["tscore"])
    assert not torch.equal(out2["severity_logit"], out3["severity_logit"])


def test_odd_input_size_and_channels_last_agree() -> None:
    torch.manual_seed(0)
    a = strnet_tiny().eval()
    b = strnet_tiny(channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 75, 75)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert torch.allclose(oa["screen_logit"], ob["screen_logit"], atol=1e-5)


def test_eval_determinism() -> None:
    torch.manual_seed(1)
    m = strnet_tiny(dropout=0.3).eval()
    x = torch.randn(2, 1, S, S)
    with torch.no_grad():
        a, b = m(x), m(x)
    for k in ("screen_logit", "severity_logit", "tscore"):
        assert torch.equal(a[k], b[k])


def test_gradient_reaches_every_head_and_trunk() -> None:
    torch.manual_seed(2)
    m = strnet_tiny().train()
    out = m(torch.randn(4, 1, S, S), torch.tensor([clinical_vector(60, "M", 30)] * 4))
    loss, parts = strnet_loss(out, _batch(), TrainConfig())
    loss.backward()
    assert set(parts) == {"screen", "severity", "tscore"}
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    for module in (m.screen_head, m.severity_head, m.tscore_head, m.backbone.stem, m.neck):
        assert any(p.grad.abs().sum() > 0 for p in module.parameters())


def test_tscore_gradient_into_trunk_is_scaled() -> None:
    x = torch.randn(4, 1, S, S)
    grads = []
    for scale in (1.0, 0.25):
        torch.manual_seed(3)
        m = strnet_tiny(tscore_trunk_grad_scale=scale).train()
        m(x)["tscore"].sum().backward()
        grads.append(m.backbone.stem[0][0].weight.grad.clone())
        head = m.tscore_head.mlp[1].weight.grad.clone()
        grads.append(head)
    assert torch.allclose(grads[2], 0.25 * grads[0], rtol=1e-4, atol=1e-7)  # trunk scaled
    assert torch.allclose(grads[3], grads[1], rtol=1e-5)  # the head itself is not


def test_severity_loss_only_on_bone_loss_cases() -> None:
    torch.manual_seed(4)
    m = strnet_tiny()
    out = m(torch.randn(4, 1, S, S))
    b = _batch()
    b["label"] = torch.zeros(4)  # no bone loss: the severity term must vanish
    _, parts = strnet_loss(out, b, TrainConfig())
    assert parts["severity"] == 0.0


def test_factories_and_config_round_trip() -> None:
    assert 0.8e6 < count_params(strnet_base()) < 3e6
    assert count_params(strnet_tiny()) < 20_000
    cfg = ModelConfig(stage_channels=(8, 16), stage_depths=(1, 2))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(build_model(cfg.to_dict()), STRNet)
    with pytest.raises(ValueError):
        ModelConfig(stage_channels=(8,), stage_depths=(1, 1))
    t = TrainConfig(epochs=3)
    assert TrainConfig.from_dict(t.to_dict()) == t


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = torch.rand(5, 1, S, S)
    a = augment_batch(x, TrainConfig(), torch.Generator().manual_seed(0))
    b = augment_batch(x, TrainConfig(), torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and torch.isfinite(a).all()


def test_patient_split_keeps_patients_together() -> None:
    rows = [
        ManifestRow(
            path=f"{i}.dcm",
            patient_id=f"P{i // 3}",
            label=float(i % 2),
            severity=0.0,
            t_score=-1.0,
            age=60.0,
            sex="F",
            bmi=25.0,
        )  # type: ignore[arg-type]
        for i in range(90)
    ]
    tr, va = patient_split(rows, 0.2, seed=1)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 90
    assert not {rows[i].patient_id for i in tr} & {rows[i].patient_id for i in va}
    assert 12 <= len(va) <= 24
    again = patient_split(rows, 0.2, seed=1)
    assert np.array_equal(again[1], va)


def test_clinical_vector_missingness() -> None:
    assert clinical_vector(None, "", None) == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    v = clinical_vector(77.0, "m", float("nan"))
    assert v[1] == 0.0 and v[2] == 1.0 and v[3] == 0.0 and v[5] == 1.0


def test_infer_arrays_takes_tensors_without_numpy_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA path hands device tensors to infer_arrays, and numpy cannot take those. No GPU here,
    # so tensors are made to refuse numpy conversion the way CUDA tensors do.
    from model.predict import infer_arrays

    torch.manual_seed(0)
    m = strnet_tiny().eval()
    x = torch.randn(3, 1, S, S)
    clin = torch.tensor([clinical_vector(70, "F", 24.0)] * 3)
    ref = infer_arrays(m, x.numpy(), clin.numpy(), batch_size=2)

    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    monkeypatch.setattr(torch.Tensor, "__array__", refuse)
    got = infer_arrays(m, x, clin, batch_size=2)
    monkeypatch.undo()
    for key in ("screen_logit", "severity_logit", "tscore"):
        np.testing.assert_array_equal(ref[key], got[key])
