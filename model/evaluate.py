"""Evaluation of a checkpoint on a labelled manifest: every figure of the report, plus the
baselines computed in the same run (clinical-variables-only logistic, global intensity only),
and, where the manifest has the generator's label masks, where the served saliency map lies
(``saliency_in_bone``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from model.calibration import apply_linear, apply_temperature, brier, ece
from model.checkpoint import CheckpointMeta
from model.conformal import interval_coverage
from model.fitting import add_intercept, fit_logistic
from model.knee import knee_groups
from model.metrics import (
    auroc,
    average_precision,
    binary_rates,
    bootstrap_ci,
    delong_ci,
    mae,
    pearson_r,
    rmse,
    wilson_interval,
)


def grouped_cv_scores(x: np.ndarray, y: np.ndarray, groups: list[str], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold logistic scores with folds by patient (no patient in train and test)."""
    uniq = np.array(sorted(set(groups)))
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(uniq, rng.permutation(len(uniq)) % folds, strict=True))
    f = np.array([fold_of[g] for g in groups])
    scores = np.zeros(len(y))
    for k in range(folds):
        te = f == k
        tr = ~te
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        w = fit_logistic((x[tr] - mu) / sd, y[tr])
        scores[te] = add_intercept((x[te] - mu) / sd) @ w
    return scores


def _oriented_auroc(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """AUROC of a single feature with the better of its two orientations (the leak measure),
    and the raw (higher = bone loss) AUROC."""
    a = auroc(y, s)
    return max(a, 1.0 - a), a


def compute_metrics(
    raw: dict[str, np.ndarray],
    tg: dict[str, np.ndarray],
    meta: CheckpointMeta,
    clinical: np.ndarray,
    patient_ids: list[str],
    intensity: dict[str, np.ndarray],
    profiles: list[str] | None = None,
    studies: Sequence[str] | None = None,
    lateralities: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """All metrics of the report from raw model outputs and the targets; with ``studies`` and
    ``lateralities`` (the manifest's study_instance_uid and laterality) the knee-level ones too
    (``knee_metrics``)."""
    y = tg["label"].astype(int)
    temp = meta.temperature
    p0 = apply_temperature(raw["screen_logit"], 1.0)
    p = apply_temperature(raw["screen_logit"], temp)
    auc, lo, hi, _ = delong_ci(y, p)
    ap = average_precision(y, p)
    ap_ci = bootstrap_ci(average_precision, y, p, n_boot=1000, seed=0)
    m: dict[str, Any] = {
        "n": int(len(y)),
        "n_patients": len(set(patient_ids)),
        "prevalence": float(y.mean()),
        "screening_auroc": auc,
        "screening_auroc_ci": [lo, hi],
        "auprc": ap,
        "auprc_ci": list(ap_ci),
        "temperature": temp,
    }
    served = meta.served_threshold
    m["served_threshold"] = served
    m["operating_points"] = {}
    for name, th in meta.thresholds.items():
        rates = binary_rates(y, p >= th)
        rates["threshold"] = th
        m["operating_points"][name] = rates
    if served in m["operating_points"]:
        op = m["operating_points"][served]
        m.update(
            threshold=op["threshold"],
            sensitivity=op["sensitivity"],
            sensitivity_ci=op["sensitivity_ci"],
            specificity=op["specificity"],
            specificity_ci=op["specificity_ci"],
            ppv=op["ppv"],
            npv=op["npv"],
        )
    # severity among true bone-loss cases
    sev_ok = (y == 1) & np.isfinite(tg["severity"])
    s_auc, s_lo, s_hi, _ = delong_ci(tg["severity"][sev_ok], raw["severity_logit"][sev_ok])
    m.update(severity_auroc=s_auc, severity_auroc_ci=[s_lo, s_hi], n_severity=int(sev_ok.sum()))
    if "network_severity_logit" in raw:  # ablation: the network without the texture stage
        m["network_only"] = {
            "severity_auroc": auroc(tg["severity"][sev_ok], raw["network_severity_logit"][sev_ok]),
            "tscore_pearson_r": pearson_r(
                raw["network_tscore"][np.isfinite(tg["tscore"])], tg["tscore"][np.isfinite(tg["tscore"])]
            )[0],
        }
    # 3-class confusion: rows true (normal, osteopenia, osteoporosis), columns predicted
    true3 = np.where(y == 0, 0, np.where(tg["severity"] == 1, 2, 1))
    q = apply_temperature(raw["severity_logit"], 1.0)
    thr = m.get("threshold", 0.5)
    pred3 = np.where(p < thr, 0, np.where(q >= 0.5, 2, 1))
    conf = np.zeros((3, 3), dtype=int)
    for t_, p_ in zip(true3, pred3, strict=True):
        conf[t_, p_] += 1
    m["confusion_3class"] = {
        "labels": ["normal", "osteopenia", "osteoporosis"],
        "rows_true_cols_pred": conf.tolist(),
    }
    # T-score
    t_ok = np.isfinite(tg["tscore"])
    tp_, tt = raw["tscore"][t_ok], tg["tscore"][t_ok]
    r, r_lo, r_hi = pearson_r(tp_, tt)
    diff = tp_ - tt
    qconf = meta.conformal_quantile
    cov, width = interval_coverage(tp_, tt, qconf)
    k = int(round(cov * len(tt)))
    m.update(
        n_tscore=int(t_ok.sum()),
        tscore_pearson_r=r,
        tscore_pearson_r_ci=[r_lo, r_hi],
        tscore_mae=mae(tp_, tt),
        tscore_rmse=rmse(tp_, tt),
        tscore_true_sd=float(np.std(tt, ddof=1)),
        tscore_bias=float(diff.mean()),
        tscore_loa=[
            float(diff.mean() - 1.96 * diff.std(ddof=1)),
            float(diff.mean() + 1.96 * diff.std(ddof=1)),
        ],
        conformal_target=meta.conformal_coverage,
        conformal_quantile=qconf,
        conformal_coverage=cov,
        conformal_coverage_ci=list(wilson_interval(k, len(tt))),
        conformal_width=width,
    )
    # calibration
    m.update(
        ece_before=ece(p0, y),
        ece_after=ece(p, y),
        brier_before=brier(p0, y),
        brier_after=brier(p, y),
    )
    # baselines
    clin_scores = grouped_cv_scores(clinical, y.astype(float), patient_ids)
    c_auc, c_lo, c_hi, _ = delong_ci(y, clin_scores)
    m.update(baseline_clinical_auroc=c_auc, baseline_clinical_auroc_ci=[c_lo, c_hi])
    m["baseline_clinical_method"] = (
        "L2 logistic on age, sex, BMI and missingness flags; 5-fold out-of-fold scores, folds "
        "by patient, on this evaluation set"
    )
    intens: dict[str, Any] = {}
    for name, values in intensity.items():
        best, raw_auc = _oriented_auroc(y, values)
        intens[name] = {"auroc_best_orientation": best, "auroc_raw": raw_auc}
    m["baseline_intensity"] = intens
    m["baseline_intensity_auroc"] = max(v["auroc_best_orientation"] for v in intens.values())
    if profiles:
        sub: dict[str, Any] = {}
        arr = np.array(profiles)
        for prof in sorted(set(profiles)):
            sel = arr == prof
            if 0 < y[sel].sum() < sel.sum():
                sub[prof] = {"n": int(sel.sum()), "auroc": auroc(y[sel], p[sel])}
        m["by_profile"] = sub
    gates = {k[5:]: raw[k].mean(0).tolist() for k in raw if k.startswith("gate_")}
    m["gate_weights_mean"] = gates
    if studies is not None and lateralities is not None:
        m.update(knee_metrics(raw, tg, meta, studies, lateralities))
    return m


def knee_metrics(
    raw: dict[str, np.ndarray],
    tg: dict[str, np.ndarray],
    meta: CheckpointMeta,
    studies: Sequence[str],
    lateralities: Sequence[str | None],
) -> dict[str, Any]:
    """Knee-level figures (``model.knee``): the films of one knee in one study (same study
    instance UID and laterality L or R; any other film a knee of its own) combined as the agent
    combines them: the mean of the calibrated screening logits, of the severity logits and of
    the (recalibrated) T-scores. The knee's truth: bone loss when a film of it is labelled so,
    its severity the highest labelled, its T-score the mean of its films' (one bone: they agree
    in the generator). Intervals as the image-level ones: DeLong, Wilson, Fisher z."""
    groups = knee_groups(list(studies), list(lateralities))
    z = np.asarray(raw["screen_logit"], dtype=np.float64) / meta.temperature
    sev = np.asarray(raw["severity_logit"], dtype=np.float64)
    t_hat = np.asarray(raw["tscore"], dtype=np.float64)

    def finite_mean(values: np.ndarray) -> float:
        v = values[np.isfinite(values)]
        return float(v.mean()) if v.size else float("nan")

    def finite_max(values: np.ndarray) -> float:
        v = values[np.isfinite(values)]
        return float(v.max()) if v.size else float("nan")

    p_k = np.array([1.0 / (1.0 + np.exp(-z[g].mean())) for g in groups])
    s_k = np.array([sev[g].mean() for g in groups])
    t_k = np.array([t_hat[g].mean() for g in groups])
    y_k = np.array([finite_max(tg["label"][g]) for g in groups])
    sev_true = np.array([finite_max(tg["severity"][g]) for g in groups])
    t_true = np.array([finite_mean(tg["tscore"][g]) for g in groups])
    ok = np.isfinite(y_k)
    y_k, p_k, s_k, t_k, sev_true, t_true = y_k[ok].astype(int), p_k[ok], s_k[ok], t_k[ok], sev_true[ok], t_true[ok]
    auc, lo, hi, _ = delong_ci(y_k, p_k)
    th = meta.thresholds.get(meta.served_threshold, float("nan"))
    rates = binary_rates(y_k, p_k >= th)
    sev_ok = (y_k == 1) & np.isfinite(sev_true)
    s_auc, s_lo, s_hi, _ = delong_ci(sev_true[sev_ok], s_k[sev_ok])
    t_ok = np.isfinite(t_true)
    r, r_lo, r_hi = pearson_r(t_k[t_ok], t_true[t_ok])
    return {
        "n_knees": int(len(y_k)),
        "n_knees_several_images": int(sum(len(g) > 1 for g, keep in zip(groups, ok, strict=True) if keep)),
        "screening_auroc_knee": auc,
        "screening_auroc_knee_ci": [lo, hi],
        "sensitivity_knee": rates["sensitivity"],
        "sensitivity_knee_ci": rates["sensitivity_ci"],
        "specificity_knee": rates["specificity"],
        "specificity_knee_ci": rates["specificity_ci"],
        "severity_auroc_knee": s_auc,
        "severity_auroc_knee_ci": [s_lo, s_hi],
        "n_severity_knee": int(sev_ok.sum()),
        "tscore_mae_knee": mae(t_k[t_ok], t_true[t_ok]),
        "tscore_pearson_r_knee": r,
        "tscore_pearson_r_knee_ci": [r_lo, r_hi],
    }


_STATES = ("drawn", "off_bone", "no_bone")  # what the overlay shows for an image's served map


def _bone_shares(job: tuple[str, str, np.ndarray, dict[str, Any]]) -> dict[str, float]:
    """One image, in network-input geometry, against the generator's bone mask (labels 1 and 2):
    the share on it of the served map (``model.saliency.on_bone``, as the agent serves it; NaN
    when nothing is drawn), of the raw Grad-CAM, of a flat map over the square (chance), of the
    inverted map (max - map) and of a flat map restricted to the bone estimate (the estimate's
    precision); the share of the raw map's mass kept on the estimate and the share a flat map
    keeps there (chance); the served map's mass; what the overlay shows (index in ``_STATES``)."""
    from PIL import Image

    from model.io import read_pixels
    from model.preprocess import PreprocessSpec, crop_box, resize_mask
    from model.saliency import bone_share, on_bone

    path, mask_path, cam, spec_dict = job
    spec = PreprocessSpec.from_dict(spec_dict)
    film = read_pixels(Path(path))
    with Image.open(mask_path) as im:
        mask = np.asarray(im)
    if mask.shape != film.shape:
        raise ValueError(f"{mask_path}: mask shape {mask.shape} is not the image's {film.shape}")
    bone = resize_mask(mask, spec)  # fraction of each cell that is cortex or trabecular bone
    served = on_bone(film, crop_box(film.shape, spec), cam)
    raw = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, None)
    state = 0 if served.drawn else (1 if served.bone_found else 2)
    return {
        "served": bone_share(served.heat, bone) if served.drawn else float("nan"),
        "served_mass": float(np.nansum(served.heat, dtype=np.float64)),
        "raw": bone_share(raw, bone),
        "uniform": float(bone.mean(dtype=np.float64)),  # a flat map's share: chance on the mask
        "inverted": bone_share(raw.max() - raw, bone),
        "estimate_precision": bone_share(served.bone, bone) if served.bone_found else float("nan"),
        "kept": served.kept_share,
        "chance": served.chance_share,
        "state": float(state),
    }


def _cluster_weights(groups: Sequence[str], n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, n_images) bootstrap weights that resample whole patients (``groups``) with
    replacement: each image weighs as often as its patient was drawn (images of one patient are
    not independent; 620 test images come from 283 patients)."""
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    k = int(g.max()) + 1
    draws = np.random.default_rng(seed).integers(0, k, (n_boot, k))
    counts = np.bincount((draws + k * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * k)
    return counts.reshape(n_boot, k)[:, g].astype(np.float64)


def _interval(stats: np.ndarray) -> list[float]:
    """95 % percentile interval of bootstrap statistics (NaN draws left out)."""
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return [float("nan")] * 2
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def _ratio_ci(w: np.ndarray, num: np.ndarray, den: np.ndarray, sel: np.ndarray) -> list[float]:
    """Interval of sum(num) / sum(den) over ``sel`` under the bootstrap weights ``w``
    (den = 1: a mean)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return _interval((w[:, sel] @ num[sel]) / (w[:, sel] @ den[sel]))


def _nan_stat(fn: Any, values: np.ndarray) -> float:
    return float(fn(values)) if values.size else float("nan")


def saliency_in_bone(
    pred: Any, rows: Sequence[Any], cache: np.ndarray, positive: np.ndarray, workers: int = 2, batch: int = 32
) -> dict[str, Any]:
    """Where the served saliency map lies, and whether that depends on the network, on the images
    of ``rows`` that have a ``mask_path``; empty dict when no row has a mask file (a mask_path
    whose file is missing is counted, not measured). ``positive``: the served decision per row
    (the overlay shows the map only there).

    ``saliency_in_bone``: the mean over the images whose served map is drawn of that map's share
    on the generator's bone mask (issue 20); it says where the heat is drawn, and the restriction
    alone keeps it high. The network-dependent figures: ``saliency_in_bone_raw`` (the raw
    Grad-CAM's share), ``saliency_in_bone_uniform`` (a flat map's: chance), their ratio
    ``saliency_lift``, ``saliency_in_bone_inverted`` (the map turned inside out: the null twin of
    the test gate) and ``saliency_kept_share`` (the share of the raw mass the restriction keeps).
    Intervals: 95 % percentile bootstrap over patients."""
    with_mask = [i for i, r in enumerate(rows) if getattr(r, "mask_path", None)]
    idx = [i for i in with_mask if Path(rows[i].mask_path).is_file()]
    if not idx:
        return {}
    spec = pred.spec.to_dict()
    jobs = []
    for start in range(0, len(idx), batch):
        part = idx[start : start + batch]
        cams = np.asarray(pred.saliency(cache[part].astype(np.float32)[:, None]), dtype=np.float32)
        cams = cams.reshape(len(part), *cams.shape[-2:])
        jobs += [(str(rows[i].path), str(rows[i].mask_path), cams[k], spec) for k, i in enumerate(part)]
    if workers <= 1:
        per = [_bone_shares(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            per = list(pool.map(_bone_shares, jobs, chunksize=8))
    v = {key: np.asarray([p[key] for p in per], dtype=np.float64) for key in per[0]}
    state = v["state"].astype(int)
    drawn, found = state == 0, state != 2
    pos_all = np.asarray(positive, bool)[idx]
    pos = pos_all & drawn
    s, mass = v["served"][drawn], v["served_mass"][drawn]
    has_raw = np.isfinite(v["raw"])  # a map with mass
    has_inv = has_raw & np.isfinite(v["inverted"])  # and not flat (a flat map's inverse has no mass)
    w = _cluster_weights([str(getattr(rows[i], "patient_id", None) or i) for i in idx])
    ones = np.ones(len(idx))
    raw_mean, uni_mean = _nan_stat(np.mean, v["raw"][has_raw]), _nan_stat(np.mean, v["uniform"][has_raw])
    kept_ok = found & np.isfinite(v["kept"])
    above = (v["raw"] > v["uniform"]).astype(np.float64)
    return {
        "saliency_in_bone": _nan_stat(np.mean, s),
        "saliency_in_bone_ci": _ratio_ci(w, v["served"], ones, drawn),
        "saliency_in_bone_pooled": float((s * mass).sum() / mass.sum()) if s.size else float("nan"),
        "saliency_in_bone_positives": _nan_stat(np.mean, v["served"][pos]),
        "saliency_in_bone_raw": raw_mean,
        "saliency_in_bone_raw_ci": _ratio_ci(w, v["raw"], ones, has_raw),
        "saliency_in_bone_uniform": uni_mean,
        "saliency_in_bone_uniform_ci": _ratio_ci(w, v["uniform"], ones, has_raw),
        "saliency_in_bone_inverted": _nan_stat(np.mean, v["inverted"][has_inv]),
        "saliency_lift": raw_mean / uni_mean if uni_mean > 0 else float("nan"),
        "saliency_lift_ci": _ratio_ci(w, v["raw"], v["uniform"], has_raw),
        "saliency_kept_share": _nan_stat(np.mean, v["kept"][kept_ok]),
        "saliency_kept_share_ci": _ratio_ci(w, np.nan_to_num(v["kept"]), ones, kept_ok),
        "saliency_in_bone_detail": {
            "n_images": len(idx),
            "n_mask_missing": len(with_mask) - len(idx),  # a mask_path whose file is not there
            "n_drawn": int(drawn.sum()),
            "n_off_bone": int((state == 1).sum()),  # attention on the estimate at or below chance: no heat
            "n_no_bone": int((state == 2).sum()),  # no bone found in the square: no heat
            "n_positives": int(pos_all.sum()),
            "n_positives_drawn": int(pos.sum()),
            "min": _nan_stat(np.min, s),
            "p10": _nan_stat(lambda x: np.percentile(x, 10), s),
            "raw_positives": _nan_stat(np.mean, v["raw"][has_raw & pos_all]),
            "uniform_positives": _nan_stat(np.mean, v["uniform"][has_raw & pos_all]),
            "raw_above_uniform_fraction": _nan_stat(np.mean, above[has_raw]),
            "raw_above_uniform_fraction_ci": _ratio_ci(w, above, ones, has_raw),
            "kept_share_chance": _nan_stat(np.mean, v["chance"][kept_ok]),
            "kept_share_lift_ci": _ratio_ci(w, np.nan_to_num(v["kept"]), v["chance"], kept_ok),
            "kept_share_p10": _nan_stat(lambda x: np.percentile(x, 10), v["kept"][kept_ok]),
            "kept_share_min": _nan_stat(np.min, v["kept"][kept_ok]),
            "estimate_precision": _nan_stat(np.mean, v["estimate_precision"][found]),
            "method": (
                "per image, in the network's (S, S) geometry, shares of a map's mass on the "
                "generator's bone mask (labels 1 and 2, model.preprocess.resize_mask). "
                "saliency_in_bone: the served map (model.saliency.on_bone: Grad-CAM of the screening "
                "head kept on the estimated bone of the assessed square, divided by the raw map's "
                "maximum, drawn only when the share of the raw mass it keeps exceeds chance, the "
                "estimate's area share), mean over the images where it is drawn (n_drawn); _pooled "
                "all those maps' mass together; _positives over the drawn served positives (the "
                "overlays that show it). saliency_in_bone_raw: the raw Grad-CAM over the square, "
                "mean over all images; _uniform: a flat map over the square (chance); "
                "saliency_lift: raw / uniform (ratio of the means); _inverted: max - map (NaN for "
                "flat maps); "
                "raw_above_uniform_fraction: images whose raw share exceeds chance. "
                "saliency_kept_share: share of the raw map's mass on the bone estimate, mean over "
                "images with bone found; kept_share_chance: the same for a flat map (the estimate's "
                "area share); estimate_precision: a flat map restricted to the estimate, no floor "
                "(what the restriction alone gives whatever the map). Intervals: 95 % percentile "
                "bootstrap over patients (2000 draws, seed 0)"
            ),
        },
    }


def _served_maps(
    pred: Any, rows: Sequence[Any], cache: np.ndarray, picks: list[tuple[str, int]]
) -> dict[int, np.ndarray]:
    """The served saliency maps (``model.saliency.restrict_to_bone``: zero where not drawn, NaN
    where no bone was found) of the report's Grad-CAM picks, by image index."""
    from model.io import read_pixels
    from model.preprocess import crop_box
    from model.saliency import restrict_to_bone

    out = {}
    for _, i in picks:
        film = read_pixels(Path(rows[i].path))
        cam = np.asarray(pred.saliency(cache[i].astype(np.float32)[None, None]), dtype=np.float32)
        out[i] = restrict_to_bone(film, crop_box(film.shape, pred.spec), cam.reshape(cam.shape[-2:]))
    return out


def perfect_reader(manifests: Sequence[str | Path], films: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The Bayes ceiling (``model.synth.ceiling``) on exactly these films, when every film is one
    this project's generator wrote and the sets name one preset (``dataset.json`` beside each
    manifest; a set without one was written before it existed, with the default preset unless
    its maker said otherwise: recorded as assumed). ``None`` for any other data."""
    import json

    from model.synth.ceiling import of_films, posterior, score

    presets = set()
    assumed = False
    for manifest in manifests:
        card = Path(manifest).parent / "dataset.json"
        if card.is_file():
            presets.add(str(json.loads(card.read_text(encoding="utf-8")).get("preset", "")))
        else:
            presets.add("default")
            assumed = True
    if len(presets) != 1:
        return None
    preset = presets.pop()
    try:
        knees = of_films(films, preset)
    except ValueError:
        return None
    figures: dict[str, Any] = {k: float(v) for k, v in score(knees, posterior(knees, preset)).items()}
    figures["tscore_pearson_r"] = figures.pop("tscore_r")  # this report's name of the figure
    figures["preset"] = preset + (" (assumed: no dataset.json)" if assumed else "")
    return figures


class OtherFilms(ValueError):
    """A ``--compare`` evaluation was computed on other films than this one."""


def ablation(metrics: dict[str, Any], compare: dict[str, str | Path]) -> list[dict[str, Any]]:
    """Rows of the ablation table: the network alone (this run), each compared checkpoint's
    figures from its own ``metrics.json`` and this checkpoint's. A compared file must have been
    computed on the same manifests and number of films, or ``OtherFilms``."""
    import json

    from model.report import ABLATION_COLUMNS

    keys = [k for k, _ in ABLATION_COLUMNS]

    rows: list[dict[str, Any]] = []
    if "network_only" in metrics:
        rows.append({"label": "network alone", **metrics["network_only"]})
    for label, path in compare.items():
        other = json.loads(Path(path).read_text(encoding="utf-8"))
        if other.get("manifest") != metrics["manifest"] or other.get("n") != metrics["n"]:
            raise OtherFilms(f"--compare {label}: its metrics.json was computed on other films")
        row = {"label": label, "model_version": other.get("checkpoint", {}).get("model_version")}
        row.update({k: other[k] for k in keys if k in other})
        rows.append(row)
    row = {"label": "this checkpoint", "model_version": metrics["checkpoint"]["model_version"]}
    row.update({k: metrics[k] for k in keys if k in metrics})
    rows.append(row)
    return rows


def evaluate(
    weights: str | Path,
    manifest: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    n_gradcam: int = 4,
    compare: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Score ``manifest`` with the checkpoint, write ``metrics.json``, ``report.md`` and plots
    to ``out_dir``; return the metrics. ``compare`` names other checkpoints' ``metrics.json``
    on the same manifests (label -> path) for the report's ablation table."""
    import torch

    from model.data import build_cache, clinical_features, read_manifests, targets
    from model.predict import Predictor, score_arrays
    from model.report import gradcam_picks, write_report

    t0 = time.time()
    torch.set_num_threads(max(1, workers))
    pred = Predictor(weights, device=device)
    manifests: list[str | Path] = [manifest] if isinstance(manifest, str | Path) else list(manifest)
    rows = [r for r in read_manifests(manifests) if np.isfinite(r.label)]
    cache, stats = build_cache(rows, pred.spec, workers=workers, progress=progress, with_stats=True)
    t_dec = time.time()
    tg, clin = targets(rows), clinical_features(rows)
    raw = score_arrays(pred, cache, clin, [r.path for r in rows], workers, progress)
    raw["tscore"] = apply_linear(raw["tscore"], pred.meta.tscore_calibration)
    t_inf = time.time()
    intensity = {"preprocessed_mean": cache.astype(np.float32).mean(axis=(1, 2))}
    intensity.update(stats)
    metrics = compute_metrics(
        raw,
        tg,
        pred.meta,
        clin,
        [r.patient_id for r in rows],
        intensity,
        [r.profile for r in rows],
        [r.study_instance_uid for r in rows],
        [r.laterality for r in rows],
    )
    served_p = apply_temperature(raw["screen_logit"], pred.meta.temperature)
    t_met = time.time()
    metrics.update(saliency_in_bone(pred, rows, cache, served_p >= pred.threshold, workers))
    t_sal = time.time()
    shown = Path(weights).resolve()
    if shown.is_relative_to(Path.cwd().resolve()):  # a report names the repository's files relatively
        shown = shown.relative_to(Path.cwd().resolve())
    metrics["checkpoint"] = {
        "weights": str(shown),
        "model_version": pred.meta.model_version,
        "weights_sha256": pred.meta.weights_sha256,
        "trained_on_synthetic_data": pred.meta.synthetic,
    }
    metrics["manifest"] = ", ".join(str(m) for m in manifests)
    reader = perfect_reader(manifests, [(r.patient_id, r.laterality) for r in rows])
    if reader is not None:
        metrics["perfect_reader"] = reader
    if compare:
        metrics["ablation"] = ablation(metrics, compare)
    metrics["timing_s"] = {
        "decode_preprocess": round(t_dec - t0, 1),
        "inference": round(t_inf - t_dec, 1),
    }
    if "saliency_in_bone" in metrics:
        metrics["timing_s"]["saliency_in_bone"] = round(t_sal - t_met, 1)
    served_maps = _served_maps(pred, rows, cache, gradcam_picks(served_p, tg["label"].astype(int), n_gradcam))
    write_report(Path(out_dir), metrics, raw, tg, cache, pred, n_gradcam=n_gradcam, served_maps=served_maps)
    metrics["timing_s"]["total"] = round(time.time() - t0, 1)
    return metrics
