"""`strnet model train / evaluate / calibrate / fit-texture / predict` end to end on a tiny
synthetic set (tiny network, 64 px, one epoch): the plumbing, not the accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from model.checkpoint import read_metadata
from model.cli import app
from model.texture import FEATURE_VERSION


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from model.synth.generate import generate

    root = tmp_path_factory.mktemp("modelcli")
    # with retakes (issue 24): the evaluation's knees put a retake with its film
    manifest = generate(root / "data", n=48, seed=4242, preset="default", compressed_fraction=0.0, repeat_fraction=0.3)
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--manifest", str(manifest),
            "--out", str(root / "run"),
            "--variant", "tiny",
            "--input-size", "64",
            "--epochs", "1",
            "--cuda-batch-size", "64",
            "--workers", "1",
            "--model-version", "tiny-cli",
            "--synthetic",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return Path(res.output.strip().splitlines()[-1]), Path(manifest)


@pytest.mark.slow
def test_train_fits_the_texture_stage_and_records_it(tiny_run: tuple[Path, Path]) -> None:
    weights, _ = tiny_run
    meta = read_metadata(weights)
    stage = meta["texture"]
    assert stage["feature_version"] == FEATURE_VERSION == 2 and len(stage["w_severity"]) == stage["n_features"] + 1
    assert meta["train_config"]["texture"] is True
    assert "conformal" in meta and "thresholds" in meta


@pytest.mark.slow
def test_train_records_the_batch_learning_rate_and_precision_it_used(tiny_run: tuple[Path, Path]) -> None:
    meta = read_metadata(tiny_run[0])
    t = meta["training"]
    # on the CPU the CUDA batch is recorded but not used: the CPU recipe's batch, lr, float32
    assert meta["train_config"]["cuda_batch_size"] == 64
    assert (t["batch_size_used"], t["lr_used"], t["amp_dtype"], t["grad_scaler"]) == (32, 2e-3, "float32", False)
    epoch = t["history"][0]
    # whole batches only (the rest wait for the next epoch's shuffle): 36 images give one of 32
    n_train = meta["training_data"]["n_train"]
    assert epoch["train_images"] == 32 * (n_train // 32) and n_train >= 32
    assert 0 < epoch["first_step_s"] <= epoch["train_s"]


@pytest.mark.slow
def test_evaluate_reports_the_network_alone_beside_the_fused_outputs(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, manifest = tiny_run
    res = CliRunner().invoke(
        app, ["evaluate", "--weights", str(weights), "--manifest", str(manifest), "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["network_only"]) == {"severity_auroc", "tscore_pearson_r"}
    assert "without the texture stage" in (tmp_path / "report.md").read_text()
    # issue 24: the knee-level figures beside the image-level ones (the manifest's study and side)
    rows = list(csv.DictReader(manifest.open()))
    assert metrics["n_knees"] == len({(r["study_instance_uid"], r["laterality"]) for r in rows})
    n_retakes = json.loads((manifest.parent / "dataset.json").read_text())["n_retakes"]
    assert n_retakes > 0 and metrics["n_knees"] == len(rows) - n_retakes == metrics["n"] - n_retakes
    assert metrics["n_knees_several_images"] == n_retakes
    assert {"severity_auroc_knee", "severity_auroc_knee_ci", "screening_auroc_knee", "tscore_mae_knee"} <= set(metrics)
    assert "## Per knee" in (tmp_path / "report.md").read_text()
    # the generator's own set: the perfect reader on the same films, in metrics and report
    reader = metrics["perfect_reader"]
    assert reader["preset"] == "default" and 0.5 < reader["screening_auroc"] <= 1.0
    assert "perfect reader (Bayes ceiling" in (tmp_path / "report.md").read_text()

    # an ablation row from another evaluation of the same films; one of other films is refused
    def evaluate_comparing(out: Path, label: str, path: Path) -> Any:
        args = ["evaluate", "--weights", str(weights), "--manifest", str(manifest), "--out", str(out)]
        return CliRunner().invoke(app, [*args, "--compare", f"{label}={path}"])

    res = evaluate_comparing(tmp_path / "again", "first run", tmp_path / "metrics.json")
    assert res.exit_code == 0, res.output
    rows_ab = json.loads((tmp_path / "again" / "metrics.json").read_text())["ablation"]
    assert [r["label"] for r in rows_ab] == ["network alone", "first run", "this checkpoint"]
    assert rows_ab[1]["tscore_mae"] == metrics["tscore_mae"]
    other = dict(metrics, manifest="elsewhere/manifest.csv")
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = evaluate_comparing(tmp_path / "x", "other", tmp_path / "other.json")
    assert res.exit_code == 2 and "computed on other films" in res.output


def test_the_perfect_reader_is_only_for_the_generators_own_sets(tmp_path: Path) -> None:
    from model.evaluate import perfect_reader

    manifest = tmp_path / "manifest.csv"
    assert perfect_reader([manifest], [("site:MRN0001", "L")]) is None
    # a set without dataset.json was written before it existed: default preset, said so
    figures = perfect_reader([manifest], [(f"s:SYN77-{i:06d}", side) for i in range(40) for side in "LR"])
    assert figures is not None and figures["preset"] == "default (assumed: no dataset.json)"


@pytest.mark.slow
def test_fit_texture_on_the_training_data_matches_it_and_calibrate_keeps_the_stage(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, manifest = tiny_run
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["fit-texture", "--weights", str(weights), "--manifest", str(manifest), "--out", str(tmp_path / "f.json")],
    )
    assert res.exit_code == 0, res.output
    assert "training data matches" in res.output
    refit = read_metadata(tmp_path / "f.json")
    assert refit["texture_fit"]["same_data_as_network_training"] is True
    assert refit["weights_sha256"] == read_metadata(weights)["weights_sha256"]  # network unchanged
    res = runner.invoke(
        app,
        ["calibrate", "--weights", str(tmp_path / "f.json"), "--manifest", str(manifest)]
        + ["--out", str(tmp_path / "c.json")],
    )
    assert res.exit_code == 0, res.output
    assert read_metadata(tmp_path / "c.json")["texture"] == refit["texture"]
    dcm = next((manifest.parent / "images").rglob("*.dcm"))
    res = runner.invoke(app, ["predict", str(dcm), "--weights", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["model_version"] == "tiny-cli"


def test_train_and_calibrate_refuse_too_few_t_scores_for_the_interval_before_decoding(tmp_path: Path) -> None:
    # 20 patients of one film each: the validation split (20 %) holds 4 T-scores, a 90 % interval
    # needs 9. The films do not exist: the refusal must come before anything is decoded.
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "label", "severity", "t_score", "age", "sex", "bmi"])
        for i in range(20):
            w.writerow([f"missing/{i}.dcm", f"P{i:03d}", i % 2, i % 2 if i % 2 else "", -1.0 - i / 10, 70, "F", 25])
    runner = CliRunner()
    res = runner.invoke(
        app, ["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--variant", "tiny"]
    )
    assert res.exit_code == 2, res.output
    assert "the validation split (20% of the patients) holds 4 films with a known T-score" in res.output
    assert "needs at least 9" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
    half = tmp_path / "half.csv"  # 8 films with a T-score: calibrate refuses the manifest
    half.write_text("".join(manifest.read_text().splitlines(keepends=True)[:9]))
    res = runner.invoke(app, ["calibrate", "--manifest", str(half), "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 2 and "the manifest holds 8 films with a known T-score" in res.output, res.output
