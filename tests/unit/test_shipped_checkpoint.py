"""The shipped checkpoint meets every acceptance threshold of issue 3 on a FRESH synthetic test
set (default preset, seeds never used in training), generated here into tmp_path.

Slow (about 2 to 3 minutes on the 2-core CPU): two halves are generated in parallel with two
unseen seeds and merged with patient ids kept apart.
"""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from model.checkpoint import SHIPPED, load_checkpoint, read_metadata

# seeds never used to train the shipped checkpoint (see its metadata: provenance)
TEST_SEEDS = (990001, 990002)
N_PER_SEED = 310


def _gen(args: tuple[str, int, int]) -> str:
    from model.synth.generate import generate

    out, n, seed = args
    return str(generate(Path(out), n=n, seed=seed, preset="default"))


def _fresh_test_set(root: Path) -> Path:
    jobs = [(str(root / f"s{seed}"), N_PER_SEED, seed) for seed in TEST_SEEDS]
    with ProcessPoolExecutor(max_workers=2) as pool:
        manifests = list(pool.map(_gen, jobs))
    merged = root / "manifest.csv"
    with merged.open("w", newline="") as out:
        writer = None
        for seed, m in zip(TEST_SEEDS, manifests, strict=True):
            with open(m, newline="") as fh:
                for row in csv.DictReader(fh):
                    row["path"] = f"s{seed}/{row['path']}"
                    row["mask_path"] = f"s{seed}/{row['mask_path']}"
                    row["patient_id"] = f"{seed}-{row['patient_id']}"
                    if writer is None:
                        writer = csv.DictWriter(out, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)
    return merged


@pytest.fixture(scope="module")
def fresh_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Generate the fresh test set and evaluate the shipped checkpoint once for this module."""
    from model.evaluate import evaluate

    root = tmp_path_factory.mktemp("shipped")
    t0 = time.time()
    manifest = _fresh_test_set(root / "data")
    t_gen = time.time() - t0
    m = evaluate(SHIPPED, manifest, root / "eval", device="cpu", progress=False, n_gradcam=2)
    print(f"\ngenerated in {t_gen:.0f} s; evaluated in {m['timing_s']['total']:.0f} s")
    for key in (
        "n",
        "screening_auroc",
        "sensitivity",
        "specificity",
        "severity_auroc",
        "tscore_pearson_r",
        "tscore_mae",
        "tscore_true_sd",
        "conformal_coverage",
        "baseline_clinical_auroc",
        "baseline_intensity_auroc",
        "saliency_in_bone",
        "saliency_in_bone_raw",
        "saliency_in_bone_uniform",
        "saliency_in_bone_inverted",
        "saliency_lift",
        "saliency_kept_share",
    ):
        print(f"{key}: {m[key]}")
    return m, root / "eval"


@pytest.mark.slow
def test_shipped_checkpoint_provenance() -> None:
    assert SHIPPED.is_file(), "the shipped checkpoint is missing"
    meta = read_metadata(SHIPPED)
    weights = SHIPPED.parent / meta["weights_file"]
    assert weights.stat().st_size <= 25 * 1024 * 1024
    assert meta["synthetic"] is True
    prov = meta.get("provenance", {})
    used = json.dumps([prov.get("data_command", ""), prov.get("train_command", "")])
    assert all(str(s) not in used for s in TEST_SEEDS), "test seed used in training"
    assert meta["training"]["wall_time_s"] < 3600
    load_checkpoint(SHIPPED)  # hash verified


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shipped_checkpoint_meets_acceptance(fresh_eval: tuple[dict, Path]) -> None:
    m, out = fresh_eval
    assert m["n"] >= 600
    assert m["screening_auroc"] >= 0.90
    assert m["sensitivity"] >= 0.86
    assert m["specificity"] >= 0.70
    assert m["tscore_pearson_r"] >= 0.80
    assert m["tscore_mae"] <= 0.7
    assert 0.85 <= m["conformal_coverage"] <= 0.95
    assert m["baseline_clinical_auroc"] <= 0.78
    assert m["baseline_intensity_auroc"] <= 0.62
    # issue 20: where the served saliency map is drawn it lies on bone (the generator's masks) ...
    d = m["saliency_in_bone_detail"]
    assert d["n_images"] == m["n"] and d["n_drawn"] > 0 and m["saliency_in_bone"] >= 0.80
    # ... which the bone estimate alone gives; what depends on the network: the raw Grad-CAM puts
    # more of its mass on bone than a flat map (chance) and than its own inverse (max - map).
    # Null twins cannot pass: a flat map's raw share is chance (and it is never drawn, so its
    # served figure is NaN); the inverse's inverse is the map, so only one of the two beats it.
    raw, flat, inverse = m["saliency_in_bone_raw"], m["saliency_in_bone_uniform"], m["saliency_in_bone_inverted"]
    assert raw > flat and raw > inverse, (raw, flat, inverse)
    assert m["saliency_lift_ci"][0] > 1.0, m["saliency_lift_ci"]
    # issue 24: the knee-level figures are reported; this set has one film per knee and study, so
    # they are the image-level ones (docs/model-card.md, Per-knee decisions)
    assert m["n_knees"] == m["n"] and m["n_knees_several_images"] == 0
    assert m["severity_auroc_knee"] == pytest.approx(m["severity_auroc"])
    for name in ("metrics.json", "report.md", "roc.png"):
        assert (out / name).is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shipped_checkpoint_severity_auroc_meets_target(fresh_eval: tuple[dict, Path]) -> None:
    m, _ = fresh_eval
    assert m["severity_auroc"] >= 0.85


@pytest.mark.slow
def test_shipped_checkpoint_has_a_texture_stage_fitted_without_the_test_seeds() -> None:
    meta = read_metadata(SHIPPED)
    stage = meta["texture"]
    assert stage["feature_version"] == 2
    fit = meta.get("texture_fit", {})
    used = json.dumps([stage.get("extra_manifests", []), fit.get("command", ""), fit.get("data_commands", [])])
    assert "data/s201/manifest.csv" in used  # the fields checked are the ones that name the data
    assert all(str(s) not in used for s in TEST_SEEDS), "test seed used to fit the texture stage"


def test_model_info_describes_the_shipped_checkpoint() -> None:
    """`strnet model info` on what ships (its thresholds block mixes named points and numbers)."""
    import json

    from typer.testing import CliRunner

    from agent.cli import _mount_model_commands, app

    _mount_model_commands()
    res = CliRunner().invoke(app, ["model", "info"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert set(info["thresholds"]) == {"point", "conservative"}
    assert 0 < info["thresholds"]["conservative"] < info["thresholds"]["point"] < 1
    assert info["target_sensitivity"] == 0.86


def test_the_served_model_lists_its_named_operating_points_only() -> None:
    """What the web status page shows (the shipped checkpoint stores n_pos, target_sensitivity ...
    beside the points)."""
    from agent.pipeline.infer import Screener

    served = Screener(device="cpu", threads=1).describe()
    assert set(served.thresholds) == {"point", "conservative"}
    assert served.threshold == served.thresholds["conservative"]
