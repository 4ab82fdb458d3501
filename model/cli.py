"""``strnet model ...`` commands: synth, train, evaluate, calibrate, predict.

Mounted by ``agent/cli.py``; runnable alone as ``python -m model.cli``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from model.checkpoint import SHIPPED

app = typer.Typer(
    name="model",
    help="STR-Net: synthetic data, training, evaluation, calibration, prediction "
    "(research software, NOT FOR DIAGNOSTIC USE).",
    no_args_is_help=True,
    add_completion=False,
)

WeightsOpt = Annotated[Path, typer.Option("--weights", help="checkpoint metadata JSON (its .safetensors beside it)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
TextureManifestOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--texture-manifest",
        help="more labelled images for the texture stage's own models only (repeatable; never "
        "used by the network nor for the stacks and operating points)",
    ),
]


def _command() -> str:
    """The command line as typed (``strnet model ...`` or ``python -m model.cli ...``)."""
    args = sys.argv[1:]
    if args[:1] == ["model"]:  # through the ``strnet`` entry point
        args = args[1:]
    return "strnet model " + " ".join(shlex.quote(a) for a in args)


@contextmanager
def _exit_2_on(*errors: type[Exception]) -> Iterator[None]:
    """A refused input (one of ``errors``) ends the command with its one-line message, exit 2."""
    try:
        yield
    except errors as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    n: Annotated[int, typer.Option("--n", help="number of images")],
    seed: Annotated[int, typer.Option("--seed")],
    preset: Annotated[str, typer.Option("--preset")] = "default",
    compressed_fraction: Annotated[float, typer.Option("--compressed-fraction")] = 0.25,
    repeat_fraction: Annotated[
        float,
        typer.Option(
            "--repeat-fraction",
            help="share of single-knee films retaken in the same study (same knee, a fresh acquisition)",
        ),
    ] = 0.0,
) -> None:
    """Write synthetic DICOM knee radiographs, manifest.csv and dataset.json."""
    from model.synth.generate import generate

    t0 = time.time()
    try:
        manifest = generate(
            out,
            n=n,
            seed=seed,
            preset=preset,
            compressed_fraction=compressed_fraction,
            repeat_fraction=repeat_fraction,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    card = json.loads((manifest.parent / "dataset.json").read_text(encoding="utf-8"))
    typer.echo(f"{manifest} ({n} images, {card['n_retakes']} retakes, {time.time() - t0:.1f} s)")


@app.command()
def train(
    manifest: Annotated[list[Path], typer.Option("--manifest", help="manifest CSV (repeat to combine several)")],
    out: Annotated[Path, typer.Option("--out", help="output folder (or .json path)")],
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    device: DeviceOpt = "auto",
    variant: Annotated[str, typer.Option("--variant", help="base | small | tiny")] = "base",
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="batch on the CPU")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="peak learning rate at --batch-size")] = None,
    cuda_batch_size: Annotated[
        int | None,
        typer.Option("--cuda-batch-size", help="batch on CUDA (0: --batch-size); lr scaled by sqrt of the ratio"),
    ] = None,
    patience: Annotated[int | None, typer.Option("--patience")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads of torch (default 2)")] = None,
    time_budget_min: Annotated[float | None, typer.Option("--time-budget-min")] = None,
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last")] = True,
    model_version: Annotated[str, typer.Option("--model-version")] = "strnet-custom",
    synthetic: Annotated[bool, typer.Option("--synthetic/--real")] = False,
    data_command: Annotated[str, typer.Option("--data-command", help="how the training data was made (recorded)")] = "",
    workers: Annotated[int, typer.Option("--workers", help="decode processes")] = 2,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="keep preprocessed tensors here for reruns")
    ] = None,
    texture_manifest: TextureManifestOpt = None,
) -> None:
    """Train STR-Net on a manifest (patient-level split, early stopping on validation AUROC)."""
    from dataclasses import replace

    from model.config import TrainConfig
    from model.conformal import TooFewCases
    from model.preprocess import PreprocessSpec
    from model.strnet import strnet_base, strnet_small, strnet_tiny
    from model.train import train as run_train

    factories = {"base": strnet_base, "small": strnet_small, "tiny": strnet_tiny}
    if variant not in factories:
        raise typer.BadParameter(f"unknown variant {variant!r}")
    model_cfg = factories[variant](channels_last=channels_last).cfg
    changes: dict[str, Any] = {
        k: v
        for k, v in dict(
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            cuda_batch_size=cuda_batch_size,
            patience=patience,
            num_threads=threads,
            time_budget_min=time_budget_min,
        ).items()
        if v is not None
    }
    cfg = replace(TrainConfig(), **changes)
    spec = PreprocessSpec() if input_size is None else PreprocessSpec(input_size=input_size)
    prov: dict[str, Any] = {"train_command": _command(), "seed": cfg.seed, "variant": variant}
    if data_command:
        prov["data_command"] = data_command
    with _exit_2_on(TooFewCases):
        path = run_train(
            manifest,
            out,
            model_cfg,
            cfg,
            spec,
            device=device,
            model_version=model_version,
            synthetic=synthetic,
            workers=workers,
            command=_command(),
            provenance=prov,
            cache_dir=cache_dir,
            texture_manifests=texture_manifest,
        )
    typer.echo(str(path))


def _print_metrics(m: dict[str, Any]) -> None:
    def f(key: str) -> str:
        v = m.get(key)
        ci = m.get(f"{key}_ci")
        s = "n/a" if v is None else f"{v:.3f}"
        return f"{s} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else s

    lines = [
        f"n = {m['n']} images, {m['n_patients']} patients, prevalence {m['prevalence']:.3f}",
        f"screening AUROC        {f('screening_auroc')}",
        f"AUPRC                  {f('auprc')}",
        f"served threshold       {m.get('served_threshold')} = {m.get('threshold', 0.0):.4f}",
        f"sensitivity            {f('sensitivity')}",
        f"specificity            {f('specificity')}",
    ]
    for name, op in m["operating_points"].items():
        lines.append(
            f"  {name:<12} t={op['threshold']:.4f} sens {op['sensitivity']:.3f} "
            f"spec {op['specificity']:.3f} PPV {op['ppv']:.3f} NPV {op['npv']:.3f}"
        )
    lines += [
        f"severity AUROC         {f('severity_auroc')} (n = {m['n_severity']})",
        f"T-score Pearson r      {f('tscore_pearson_r')}",
        f"T-score MAE / RMSE     {m['tscore_mae']:.3f} / {m['tscore_rmse']:.3f} "
        f"(SD of true T-scores {m['tscore_true_sd']:.3f})",
        f"conformal coverage     {f('conformal_coverage')} target {m['conformal_target']:.2f}, "
        f"width {m['conformal_width']:.3f}",
        f"ECE before / after     {m['ece_before']:.4f} / {m['ece_after']:.4f} "
        f"(Brier {m['brier_before']:.4f} / {m['brier_after']:.4f})",
        f"baseline clinical      {f('baseline_clinical_auroc')}",
        f"baseline intensity     {m['baseline_intensity_auroc']:.3f} "
        + str({k: round(v["auroc_best_orientation"], 3) for k, v in m["baseline_intensity"].items()}),
        f"time                   {m['timing_s']}",
        "(synthetic data: these figures are not clinical performance)",
    ]
    typer.echo("\n".join(lines))


@app.command()
def evaluate(
    manifest: Annotated[list[Path], typer.Option("--manifest", help="labelled manifest CSV (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="report folder")],
    weights: WeightsOpt = SHIPPED,
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option("--workers")] = 2,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="LABEL=PATH: another checkpoint's metrics.json on the same manifests, for the "
            "ablation table (repeatable)",
        ),
    ] = None,
) -> None:
    """Evaluate a checkpoint: metrics.json, report.md and plots in --out."""
    from model.evaluate import OtherFilms
    from model.evaluate import evaluate as run_eval

    pairs: dict[str, str | Path] = {}
    for item in compare or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            raise typer.BadParameter(f"--compare wants LABEL=PATH of a metrics.json, not {item!r}")
        pairs[label] = path
    with _exit_2_on(OtherFilms):
        m = run_eval(weights, manifest, out, device=device, workers=workers, compare=pairs)
    _print_metrics(m)
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def calibrate(
    manifest: Annotated[Path, typer.Option("--manifest", help="the site's labelled manifest")],
    out: Annotated[Path, typer.Option("--out", help="new checkpoint (.json path or folder)")],
    weights: WeightsOpt = SHIPPED,
    device: DeviceOpt = "auto",
    target_sensitivity: Annotated[float | None, typer.Option("--target-sensitivity")] = None,
    served: Annotated[str | None, typer.Option("--served", help="conservative | point")] = None,
    workers: Annotated[int, typer.Option("--workers")] = 2,
) -> None:
    """Recompute operating points, temperature and conformal quantile on labelled local data
    (no retraining; the weights are copied unchanged)."""
    from dataclasses import replace

    import numpy as np

    from model.checkpoint import update_metadata
    from model.config import TrainConfig
    from model.conformal import TooFewCases
    from model.data import build_cache, clinical_features, read_manifest, targets
    from model.predict import Predictor, score_arrays
    from model.train import check_calibration_set, fit_operating_point

    pred = Predictor(weights, device=device)
    cfg = TrainConfig.from_dict(pred.meta.train_config)
    changes: dict[str, Any] = {
        k: v for k, v in dict(target_sensitivity=target_sensitivity, served_threshold=served).items() if v is not None
    }
    cfg = replace(cfg, **changes)
    rows = [r for r in read_manifest(manifest) if np.isfinite(r.label)]
    truth = targets(rows)
    with _exit_2_on(TooFewCases):
        check_calibration_set(truth["tscore"], cfg, "the manifest")
    cache = build_cache(rows, pred.spec, workers=workers)
    raw = score_arrays(pred, cache, clinical_features(rows), [r.path for r in rows], workers)
    op = fit_operating_point(raw, truth, cfg)
    if op["conformal"] is None:
        op["conformal"] = pred.meta.conformal
        typer.echo("no T-scores in the manifest: conformal quantile kept from the checkpoint")
    metrics = dict(pred.meta.metrics)
    metrics["recalibration"] = op.pop("calibration_set")
    op.update(
        metrics=metrics,
        train_config=cfg.to_dict(),
        recalibrated_on={"manifest": str(manifest), "n": len(rows), "command": _command()},
    )
    path = update_metadata(
        weights,
        op,
        out if Path(out).suffix == ".json" else Path(out) / (Path(weights).stem + "-recalibrated.json"),
    )
    th = op["thresholds"]
    typer.echo(
        f"{path}\ntemperature {op['temperature']:.3f}; point threshold "
        f"{th['point']['threshold']:.4f}; conservative {th['conservative']['threshold']:.4f}; "
        f"served {op['served_threshold']}"
    )


@app.command("fit-texture")
def fit_texture_cmd(
    manifest: Annotated[list[Path], typer.Option("--manifest", help="labelled manifest CSV (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="new checkpoint (.json path or folder)")],
    weights: WeightsOpt = SHIPPED,
    device: DeviceOpt = "auto",
    l2: Annotated[float | None, typer.Option("--l2", help="L2 penalty of the texture models")] = None,
    texture_manifest: TextureManifestOpt = None,
    workers: Annotated[int, typer.Option("--workers")] = 2,
) -> None:
    """Fit (or refit) the texture stage of a trained checkpoint, without retraining the network.

    The manifests are split by patient with the checkpoint's own seed and validation fraction:
    the texture models learn on the training part, the stacks and then the operating points,
    temperature and conformal quantile are refitted on the validation part. Given the
    checkpoint's training manifests this is the stage ``strnet model train`` fits at its end
    (the metadata records whether the data hash matched). ``--texture-manifest`` adds images the
    network never saw to the texture models' training part only."""
    from dataclasses import replace

    import numpy as np

    from model.checkpoint import update_metadata
    from model.config import TrainConfig
    from model.conformal import TooFewCases
    from model.data import build_cache, clinical_features, data_hash, patient_split, read_manifests, targets
    from model.predict import Predictor, infer_arrays
    from model.train import check_calibration_set, fit_operating_point, fit_texture, severity_auroc

    pred = Predictor(weights, device=device)
    cfg = TrainConfig.from_dict(pred.meta.train_config)
    cfg = replace(cfg, texture=True, texture_l2=cfg.texture_l2 if l2 is None else l2)
    rows = [r for r in read_manifests(tuple(manifest)) if np.isfinite(r.label)]
    tg, clin = targets(rows), clinical_features(rows)
    train_idx, val_idx = patient_split(rows, cfg.val_fraction, cfg.seed)
    with _exit_2_on(TooFewCases):
        check_calibration_set(tg["tscore"][val_idx], cfg)
    cache = build_cache(rows, pred.spec, workers=workers, dtype=cfg.cache_dtype)
    same_data = data_hash(rows, cache) == pred.meta.training_data_sha256
    val_tg = {k: v[val_idx] for k, v in tg.items()}
    raw = infer_arrays(pred.model, cache[val_idx], clin[val_idx], 128, pred.device)
    network_sev = severity_auroc(raw, val_tg)
    extra = [r for r in read_manifests(tuple(texture_manifest or ())) if np.isfinite(r.label)]
    fused, stage = fit_texture(raw, rows, tg, train_idx, val_idx, cfg, workers, True, extra)
    stage["extra_manifests"] = [str(m) for m in texture_manifest or []]
    op = fit_operating_point(fused, val_tg, cfg)
    metrics = dict(pred.meta.metrics)
    metrics["validation"] = op.pop("calibration_set")
    metrics["validation"]["network_severity_auroc"] = network_sev
    changes = {
        **op,
        "texture": stage,
        "train_config": cfg.to_dict(),
        "metrics": metrics,
        "texture_fit": {
            "command": _command(),
            "manifests": [str(m) for m in manifest],
            "n_train": int(len(train_idx)),
            "n_val": int(len(val_idx)),
            "same_data_as_network_training": bool(same_data),
        },
    }
    path = update_metadata(
        weights, changes, out if Path(out).suffix == ".json" else Path(out) / (Path(weights).stem + ".json")
    )
    typer.echo(
        f"{path}\nvalidation severity AUROC {metrics['validation']['severity_auroc']:.3f} "
        f"(network alone {network_sev:.3f}); training data "
        f"{'matches' if same_data else 'DIFFERS from'} the network's"
    )


@app.command()
def predict(
    file: Annotated[Path, typer.Argument(help="a DICOM (or PNG) knee radiograph")],
    weights: WeightsOpt = SHIPPED,
    device: DeviceOpt = "auto",
    age: Annotated[float | None, typer.Option("--age")] = None,
    sex: Annotated[str | None, typer.Option("--sex", help="M or F")] = None,
    bmi: Annotated[float | None, typer.Option("--bmi")] = None,
) -> None:
    """Print one JSON result for a file, through the agent's decode and preprocessing path."""
    from model.predict import Predictor

    pred = Predictor(weights, device=device)
    result = pred.predict_file(file, {"age": age, "sex": sex, "bmi": bmi})
    typer.echo(json.dumps({"file": str(file), **result}, indent=2))


if __name__ == "__main__":
    app()
