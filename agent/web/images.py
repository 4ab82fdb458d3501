"""Server-rendered images: the overlay (from the stored secondary-capture object) and the
probability / T-score trend plot (matplotlib, no JavaScript)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from agent.db.worklist import TrendPoint

_plot_lock = threading.Lock()


def sc_to_png(path: Path, max_side: int = 1024) -> bytes:
    """The stored SC object's pixels as a PNG (RGB as is; grey scaled to 8 bits)."""
    ds = pydicom.dcmread(path)
    arr = np.asarray(ds.pixel_array)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        a = arr.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            a = 255 - a
        img = Image.fromarray(a.astype(np.uint8), "L")
    img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def trend_png(points: list[TrendPoint], threshold: float | None = None) -> bytes:
    """Probability (left axis) and estimated T-score (right axis) per study, oldest first."""
    from matplotlib.figure import Figure

    with _plot_lock:
        fig = Figure(figsize=(7.0, 2.8), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        x = list(range(len(points)))
        labels = [p.label for p in points]
        ax.plot(x, [p.probability for p in points], "o-", color="#b03a2e", label="probability of bone loss")
        if threshold is not None:
            ax.axhline(threshold, color="#b03a2e", linestyle=":", linewidth=1, label="flag threshold")
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        ax2 = ax.twinx()
        ax2.plot(x, [p.t_score for p in points], "s--", color="#1f4e79", label="estimated T-score")
        ax2.axhline(-1.0, color="#888888", linewidth=0.8)
        ax2.axhline(-2.5, color="#444444", linewidth=0.8)
        ax2.text(
            1.0,
            -1.0,
            " -1.0 osteopenia",
            transform=ax2.get_yaxis_transform(),
            fontsize=6,
            va="bottom",
            ha="right",
            color="#666666",
        )
        ax2.text(
            1.0,
            -2.5,
            " -2.5 osteoporosis",
            transform=ax2.get_yaxis_transform(),
            fontsize=6,
            va="bottom",
            ha="right",
            color="#444444",
        )
        ts = [p.t_score for p in points] or [0.0]
        ax2.set_ylim(min(-4.0, min(ts) - 0.5), max(2.0, max(ts) + 0.5))
        ax2.set_ylabel("T-score")
        ax.set_xticks(x, labels, fontsize=8)
        if len(x) == 1:
            ax.set_xlim(-1, 1)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png", metadata={"Software": None})
        return out.getvalue()
