"""The evaluation report: ``metrics.json``, ``report.md`` and small PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from model.calibration import apply_temperature, reliability
from model.metrics import pr_curve, roc_curve

DPI = 80
PAPER = {  # arXiv 2604.20268, held-out test (n = 224); T-score from a pilot of n = 31
    "screening_auroc": 0.933,
    "sensitivity": 0.904,
    "specificity": 0.773,
    "auprc": 0.956,
    "severity_auroc": 0.898,
    "tscore_pearson_r": 0.801,
    "tscore_mae": 0.279,
    "tscore_rmse": 0.347,
}
SYNTHETIC_NOTE = (
    "**All figures of this report are measured on SYNTHETIC knee radiographs** from the "
    "project's own generator, not on patients. They show that the pipeline works and how the "
    "model behaves on data whose difficulty we chose; they say nothing about clinical accuracy. "
    "NOT FOR DIAGNOSTIC USE."
)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{nd}f}"


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f"{_fmt(m.get(key))} ({_fmt(ci[0])} to {_fmt(ci[1])})" if ci else _fmt(m.get(key))


def gradcam_picks(p: np.ndarray, y: np.ndarray, n: int) -> list[tuple[str, int]]:
    """The images the Grad-CAM figure shows: (title, index), at most ``n``."""
    order = np.argsort(p)
    pos, neg = order[y[order] == 1], order[y[order] == 0]
    picks: list[tuple[str, int]] = []
    if len(pos):
        picks += [("TP, highest score", int(pos[-1])), ("FN/lowest positive", int(pos[0]))]
    if len(neg):
        picks += [("TN, lowest score", int(neg[0])), ("FP/highest negative", int(neg[-1]))]
    return picks[:n]


def plot_all(
    out: Path,
    m: dict[str, Any],
    raw: dict[str, np.ndarray],
    tg: dict[str, np.ndarray],
    cache: np.ndarray,
    predictor: Any,
    n_gradcam: int = 4,
    served_maps: dict[int, np.ndarray] | None = None,
) -> list[tuple[str, str]]:
    """Write every plot; returns (title, file name) pairs. ``served_maps``: the served saliency
    maps (``model.saliency``) of the Grad-CAM picks (``gradcam_picks``), by image index."""
    y = tg["label"].astype(int)
    p = apply_temperature(raw["screen_logit"], m["temperature"])
    p0 = apply_temperature(raw["screen_logit"], 1.0)
    plots: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(4.2, 4))
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, lw=1.5, label=f"STR-Net AUROC {m['screening_auroc']:.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for (name, op), mk in zip(m["operating_points"].items(), "os^", strict=False):
        ax.plot(
            1 - op["specificity"],
            op["sensitivity"],
            mk,
            ms=7,
            label=f"{name} t={op['threshold']:.3f}",
        )
    ax.axhline(0.86, color="r", lw=0.6, ls="--", label="sensitivity 0.86")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (synthetic test)")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, out / "roc.png")
    plots.append(("ROC with operating points", "roc.png"))

    fig, ax = plt.subplots(figsize=(4.2, 4))
    prec, rec, _ = pr_curve(y, p)
    ax.step(rec, prec, where="post", label=f"AUPRC {m['auprc']:.3f}")
    ax.axhline(m["prevalence"], color="k", ls=":", lw=0.8, label=f"prevalence {m['prevalence']:.2f}")
    ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title="Precision-recall")
    ax.legend(fontsize=7)
    _save(fig, out / "pr.png")
    plots.append(("Precision-recall with the prevalence line", "pr.png"))

    fig, ax = plt.subplots(figsize=(4.2, 4))
    for probs, lab in (
        (p0, f"before (ECE {m['ece_before']:.3f})"),
        (p, f"after T={m['temperature']:.2f} (ECE {m['ece_after']:.3f})"),
    ):
        conf, freq, count = reliability(probs, y, 10)
        ok = count > 0
        ax.plot(conf[ok], freq[ok], "o-", ms=3, label=lab)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability")
    ax.legend(fontsize=7)
    _save(fig, out / "reliability.png")
    plots.append(("Reliability before and after temperature scaling", "reliability.png"))

    t_ok = np.isfinite(tg["tscore"])
    tp_, tt = raw["tscore"][t_ok], tg["tscore"][t_ok]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(tt, tp_, s=4, alpha=0.5)
    lim = [min(tt.min(), tp_.min()) - 0.2, max(tt.max(), tp_.max()) + 0.2]
    ax.plot(lim, lim, "k:", lw=0.8)
    q = m["conformal_quantile"]
    ax.fill_between(
        lim,
        [lim[0] - q, lim[1] - q],
        [lim[0] + q, lim[1] + q],
        alpha=0.12,
        label=f"{m['conformal_target']:.0%} conformal band (+-{q:.2f})",
    )
    ax.set(
        xlabel="true T-score",
        ylabel="estimated T-score",
        title=f"T-score r={m['tscore_pearson_r']:.3f}, MAE={m['tscore_mae']:.2f}",
    )
    ax.legend(fontsize=7)
    _save(fig, out / "tscore_scatter.png")
    plots.append(("T-score: estimate against truth", "tscore_scatter.png"))

    fig, ax = plt.subplots(figsize=(4.2, 4))
    mean_, diff = (tp_ + tt) / 2, tp_ - tt
    ax.scatter(mean_, diff, s=4, alpha=0.5)
    ax.axhline(m["tscore_bias"], color="k", lw=0.8)
    for v in m["tscore_loa"]:
        ax.axhline(v, color="r", ls="--", lw=0.8)
    ax.set(xlabel="mean of estimate and truth", ylabel="estimate - truth", title="Bland-Altman")
    _save(fig, out / "bland_altman.png")
    plots.append(("Bland-Altman (bias and 95 % limits of agreement)", "bland_altman.png"))

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    sev = tg["severity"]
    groups = (
        ("normal", y == 0),
        ("osteopenia", (y == 1) & (sev == 0)),
        ("osteoporosis", (y == 1) & (sev == 1)),
    )
    for name, sel in groups:
        if sel.any():
            ax.hist(p[sel], bins=25, range=(0, 1), alpha=0.5, label=f"{name} (n={sel.sum()})")
    for name, op in m["operating_points"].items():
        ax.axvline(op["threshold"], ls="--", lw=0.8, color="k" if name == m["served_threshold"] else "grey")
    ax.set(xlabel="calibrated P(bone loss)", ylabel="images", title="Scores by true class")
    ax.legend(fontsize=7)
    _save(fig, out / "score_hist.png")
    plots.append(("Score histograms by class (dashed: thresholds, black: served)", "score_hist.png"))

    gates = m.get("gate_weights_mean", {})
    if gates:
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        k = len(next(iter(gates.values())))
        width = 0.8 / len(gates)
        for i, (task, w) in enumerate(gates.items()):
            ax.bar(np.arange(k) + i * width, w, width, label=task)
        ax.set(
            xticks=np.arange(k) + 0.4 - width / 2,
            xticklabels=[f"expert {j}" for j in range(k)],
            ylabel="mean gate weight",
            title="Task routing gates",
        )
        ax.legend(fontsize=7)
        _save(fig, out / "gates.png")
        plots.append(("Routing gate weights per task (mean over the test set)", "gates.png"))

    if n_gradcam > 0 and predictor is not None:
        picks = gradcam_picks(p, y, n_gradcam)
        served = served_maps or {}
        n_rows = 2 if served else 1
        fig, axes = plt.subplots(n_rows, len(picks), figsize=(2.4 * len(picks), 2.7 * n_rows), squeeze=False)
        for col, (title, i) in enumerate(picks):
            img = cache[i].astype(np.float32)
            cam = predictor.saliency(img[None, None])
            maps = [("Grad-CAM", cam)] + ([(_served_title(served.get(int(i))), served.get(int(i)))] if served else [])
            for row, (what, heat) in enumerate(maps):
                ax = axes[row, col]
                ax.imshow(img, cmap="gray")
                if heat is not None:
                    ax.imshow(np.ma.masked_less(heat, 0.25), cmap="autumn_r", alpha=0.55, vmin=0, vmax=1)
                ax.set_title(f"{title}\np={p[i]:.2f}, {what}", fontsize=7)
                ax.axis("off")
        _save(fig, out / "gradcam.png")
        if served:
            plots.append(
                (
                    "Grad-CAM of the screening head (top) and the served map (bottom): the part "
                    "on the estimated bone at its own strength, none where that attention is not "
                    "on bone more than chance (the overlays draw it on positive results only); "
                    "both drawn where >= 0.25",
                    "gradcam.png",
                )
            )
        else:
            plots.append(("Grad-CAM of the screening head", "gradcam.png"))
    return plots


def _served_title(heat: np.ndarray | None) -> str:
    """What a served map of the Grad-CAM figure is (model.saliency.restrict_to_bone)."""
    if heat is None:
        return "not served"
    if not np.isfinite(heat).any():
        return "none: no bone found"
    return "served, on bone" if np.nanmax(heat) > 0 else "none: not on bone > chance"


def _verdict(lift: float, low: float) -> str:
    """A plain sentence on the raw Grad-CAM's lift over chance (point, interval's lower end)."""
    if not (math.isfinite(lift) and math.isfinite(low)) or low <= 1.0:
        return "The network's attention is not shown to be on bone more than chance."
    if lift < 1.25:
        return "The network's attention is barely more on bone than chance."
    return "The network's attention is on bone more than chance."


def _saliency_lines(m: dict[str, Any]) -> list[str]:
    """The report's saliency section (model.evaluate.saliency_in_bone)."""
    d = m["saliency_in_bone_detail"]
    lift = m.get("saliency_lift_ci") or [math.nan, math.nan]
    above = d.get("raw_above_uniform_fraction_ci") or [math.nan, math.nan]
    kept_lift = d.get("kept_share_lift_ci") or [math.nan, math.nan]
    chance = d.get("kept_share_chance", math.nan)
    kept = m.get("saliency_kept_share", math.nan)
    return [
        "",
        "## Where the saliency map lies",
        "",
        "Shares of a map's mass on the generator's bone mask, in the network's geometry, over "
        f"{d['n_images']} images; intervals: 95 % bootstrap over patients.",
        "",
        "What the network does (Grad-CAM of the screening head over the assessed square): "
        f"{_ci(m, 'saliency_in_bone_raw')} of its mass on bone, against "
        f"{_ci(m, 'saliency_in_bone_uniform')} for a flat map (chance): a lift of "
        f"{_fmt(m.get('saliency_lift'))} ({_fmt(lift[0])} to {_fmt(lift[1])}); the map turned "
        f"inside out (max - map) gets {_fmt(m.get('saliency_in_bone_inverted'))}. The raw share beats "
        f"chance on {_fmt(d['raw_above_uniform_fraction'])} of the images ({_fmt(above[0])} to "
        f"{_fmt(above[1])}); on the served positives the raw share is {_fmt(d['raw_positives'])} against "
        f"{_fmt(d['uniform_positives'])}. {_verdict(m.get('saliency_lift', math.nan), lift[0])}",
        "",
        f"The restriction (model/saliency.py) keeps {_ci(m, 'saliency_kept_share')} of Grad-CAM's mass "
        f"on the estimated bone (10th percentile {_fmt(d['kept_share_p10'])}, lowest "
        f"{_fmt(d['kept_share_min'])}); a flat map keeps {_fmt(chance)} there (lift "
        f"{_fmt(kept / chance if chance else math.nan)}, {_fmt(kept_lift[0])} to {_fmt(kept_lift[1])}). "
        "The served map is drawn only where the kept share exceeds that chance share, at the "
        f"strength it has (divided by the raw map's maximum): drawn on {d['n_drawn']} images, not "
        f"drawn on {d['n_off_bone']} (attention not on bone more than chance) and on {d['n_no_bone']} "
        f"(no bone found); drawn on {d['n_positives_drawn']} of the {d['n_positives']} served positives.",
        "",
        f"Where it is drawn, the served map puts {_ci(m, 'saliency_in_bone')} of its mass on bone "
        f"(lowest {_fmt(d['min'])}, 10th percentile {_fmt(d['p10'])}; pooled "
        f"{_fmt(m['saliency_in_bone_pooled'])}; {_fmt(m['saliency_in_bone_positives'])} on the drawn "
        f"positives). That figure is the bone estimate's, not the network's: a flat map restricted "
        f"to the estimate gets {_fmt(d['estimate_precision'])}. It says where the heat is drawn, not "
        "what the network looks at.",
    ]


def _knee_lines(m: dict[str, Any]) -> list[str]:
    """The knee-level section: the films of one knee in one study combined (model/knee.py)."""
    return [
        "",
        "## Per knee",
        "",
        f"{m['n_knees']} knees (study and laterality; {m['n_knees_several_images']} with two or more "
        "films), each the mean of its films' calibrated screening logits, severity logits and "
        "T-scores (model/knee.py), decided at the served threshold.",
        "",
        "| metric | per knee | per image |",
        "|---|---|---|",
        f"| screening AUROC | {_ci(m, 'screening_auroc_knee')} | {_ci(m, 'screening_auroc')} |",
        f"| sensitivity (served threshold) | {_ci(m, 'sensitivity_knee')} | {_ci(m, 'sensitivity')} |",
        f"| specificity (served threshold) | {_ci(m, 'specificity_knee')} | {_ci(m, 'specificity')} |",
        f"| severity AUROC (n {m['n_severity_knee']} / {m['n_severity']}) | {_ci(m, 'severity_auroc_knee')} | "
        f"{_ci(m, 'severity_auroc')} |",
        f"| T-score MAE | {_fmt(m['tscore_mae_knee'])} | {_fmt(m['tscore_mae'])} |",
        f"| T-score Pearson r | {_ci(m, 'tscore_pearson_r_knee')} | {_ci(m, 'tscore_pearson_r')} |",
    ]


#: the figures of an ablation row, with their column titles (model.evaluate.ablation copies these keys)
ABLATION_COLUMNS = (
    ("screening_auroc", "screening AUROC"),
    ("severity_auroc", "severity AUROC"),
    ("severity_auroc_knee", "severity AUROC per knee"),
    ("tscore_pearson_r", "T-score r"),
    ("tscore_mae", "T-score MAE"),
    ("conformal_coverage", "coverage"),
    ("conformal_width", "interval width"),
)


def _ablation_lines(m: dict[str, Any]) -> list[str]:
    """The ablation table (network alone, compared checkpoints, this one) and, for a set this
    project's generator wrote, the perfect reader's figures on the same films."""
    rows = list(m.get("ablation") or [])
    reader = m.get("perfect_reader")
    if reader is not None:
        rows.append({"label": f"perfect reader (Bayes ceiling, preset {reader['preset']})", **reader})
    head = "| | " + " | ".join(title for _, title in ABLATION_COLUMNS) + " |"
    lines = [
        "",
        "## Ablation and ceiling (same films)",
        "",
        "Each row scored on exactly these films. A compared checkpoint's figures come from its own "
        "evaluation of the same manifests; the perfect reader knows each knee's bone cues, the "
        "clinical variables and the generator's equations (`model/synth/ceiling.py`), so no model "
        "can expect to pass it. n/a: not defined for that row.",
        "",
        head,
        "|---" * (len(ABLATION_COLUMNS) + 1) + "|",
    ]
    for row in rows:
        name = row["label"] + (f" (`{row['model_version']}`)" if row.get("model_version") else "")
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k, _ in ABLATION_COLUMNS) + " |")
    return lines


def render_markdown(m: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    ops = m["operating_points"]
    lines = [
        "# STR-Net evaluation report",
        "",
        SYNTHETIC_NOTE,
        "",
        f"Checkpoint `{m['checkpoint']['model_version']}` (weights sha256 "
        f"`{str(m['checkpoint']['weights_sha256'])[:16]}...`), manifest `{m['manifest']}`: "
        f"{m['n']} images of {m['n_patients']} patients, bone-loss prevalence "
        f"{m['prevalence']:.3f}. Intervals are 95 %: DeLong (AUROC), bootstrap (AUPRC), Wilson "
        "(proportions), Fisher z (Pearson r).",
        "",
        "## Ours beside the paper",
        "",
        "| metric | ours (synthetic test) | paper (real, n = 224) |",
        "|---|---|---|",
        f"| screening AUROC | {_ci(m, 'screening_auroc')} | {PAPER['screening_auroc']} |",
        f"| sensitivity (served threshold) | {_ci(m, 'sensitivity')} | {PAPER['sensitivity']} |",
        f"| specificity (served threshold) | {_ci(m, 'specificity')} | {PAPER['specificity']} |",
        f"| AUPRC | {_ci(m, 'auprc')} | {PAPER['auprc']} |",
        f"| severity AUROC | {_ci(m, 'severity_auroc')} | {PAPER['severity_auroc']} |",
        f"| T-score Pearson r | {_ci(m, 'tscore_pearson_r')} | {PAPER['tscore_pearson_r']} (pilot n = 31) |",
        f"| T-score MAE / RMSE | {_fmt(m['tscore_mae'])} / {_fmt(m['tscore_rmse'])} "
        f"(SD of true T {_fmt(m['tscore_true_sd'])}) | "
        f"{PAPER['tscore_mae']} / {PAPER['tscore_rmse']} |",
        "",
        "## Screening operating points (thresholds chosen on validation, frozen)",
        "",
        "| threshold | value | sensitivity | specificity | PPV | NPV |",
        "|---|---|---|---|---|---|",
    ]
    for name, op in ops.items():
        served = " (served)" if name == m["served_threshold"] else ""
        lines.append(
            f"| {name}{served} | {op['threshold']:.4f} | {_ci(op, 'sensitivity')} | "
            f"{_ci(op, 'specificity')} | {_ci(op, 'ppv')} | {_ci(op, 'npv')} |"
        )
    conf = m["confusion_3class"]["rows_true_cols_pred"]
    lines += [
        "",
        "## Severity and 3-class confusion (rows true, columns predicted)",
        "",
        f"Severity AUROC on {m['n_severity']} true bone-loss images: {_ci(m, 'severity_auroc')}.",
        "",
    ]
    if "network_only" in m:
        lines += [
            "Ablation, the network without the texture stage: severity AUROC "
            f"{m['network_only']['severity_auroc']:.3f}, T-score r {m['network_only']['tscore_pearson_r']:.3f}.",
            "",
        ]
    lines += [
        "| true \\ predicted | normal | osteopenia | osteoporosis |",
        "|---|---|---|---|",
    ]
    for name, row in zip(m["confusion_3class"]["labels"], conf, strict=True):
        lines.append(f"| {name} | {row[0]} | {row[1]} | {row[2]} |")
    lines += [
        "",
        "## T-score",
        "",
        f"n = {m['n_tscore']}: Pearson r {_ci(m, 'tscore_pearson_r')}, MAE {_fmt(m['tscore_mae'])},"
        f" RMSE {_fmt(m['tscore_rmse'])}, beside the SD of the true T-scores "
        f"{_fmt(m['tscore_true_sd'])}. Bias {_fmt(m['tscore_bias'])}, limits of agreement "
        f"{_fmt(m['tscore_loa'][0])} to {_fmt(m['tscore_loa'][1])}.",
        f"Split conformal {m['conformal_target']:.0%} interval (half-width "
        f"{_fmt(m['conformal_quantile'])}): coverage {_ci(m, 'conformal_coverage')}.",
        "",
        "## Calibration",
        "",
        f"Temperature {m['temperature']:.3f}. ECE {_fmt(m['ece_before'])} before, "
        f"{_fmt(m['ece_after'])} after; Brier {_fmt(m['brier_before'])} before, "
        f"{_fmt(m['brier_after'])} after.",
        "",
        "## Baselines (same run, same images)",
        "",
        f"- Clinical variables only: AUROC {_ci(m, 'baseline_clinical_auroc')} ({m['baseline_clinical_method']}).",
    ]
    for name, v in m["baseline_intensity"].items():
        lines.append(
            f"- Global intensity only ({name}): AUROC {_fmt(v['auroc_best_orientation'])}"
            f" in its better orientation (raw {_fmt(v['auroc_raw'])})."
        )
    if m.get("by_profile"):
        lines += [
            "",
            "## By vendor processing profile",
            "",
            "| profile | n | AUROC |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['n']} | {_fmt(v['auroc'])} |" for k, v in m["by_profile"].items()]
    if "n_knees" in m:
        lines += _knee_lines(m)
    if "ablation" in m or "perfect_reader" in m:
        lines += _ablation_lines(m)
    if "saliency_in_bone" in m:
        lines += _saliency_lines(m)
    lines += ["", "## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in plots]
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(
    out: Path,
    metrics: dict[str, Any],
    raw: dict[str, np.ndarray],
    tg: dict[str, np.ndarray],
    cache: np.ndarray,
    predictor: Any,
    n_gradcam: int = 4,
    served_maps: dict[int, np.ndarray] | None = None,
) -> None:
    """Write ``metrics.json``, the plots and ``report.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(out, metrics, raw, tg, cache, predictor, n_gradcam, served_maps)
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(metrics, plots))
