"""Evaluation outputs: ``results.json``, a Markdown table laid out like the paper's Table 1, IoU charts.

    OUT/results.json                      every benchmark of the run
    OUT/table.md                          mIoU per benchmark (paper column order) + details
    OUT/<benchmark>/results.json          one benchmark: metrics, per-class IoU, counts, skipped, sweep
    OUT/<benchmark>/per_class_iou.png     bar chart of the per-class IoU
    OUT/<benchmark>/confusion.npz         summed confusion matrices (settings, N, N), rows ground truth
"""

from __future__ import annotations

import io
import json

import numpy as np

from ..data import storage
from ..data.readers import BENCHMARKS, SHORT_NAMES

# mIoU (%) reported for OVSeg in the paper's Table 1, for reference next to a run's own numbers.
PAPER_ROWS = {
    "OVSeg R-101c + ViT-B/16 (paper)": {"ade20k_847": 7.1, "pascal_context_459": 11.0, "ade20k_150": 24.8,
                                        "pascal_context_59": 53.3, "pascal_voc_20": 92.6},
    "OVSeg Swin-B + ViT-L/14 (paper)": {"ade20k_847": 9.0, "pascal_context_459": 12.4, "ade20k_150": 29.6,
                                        "pascal_context_59": 55.7, "pascal_voc_20": 94.5},
}
MAX_BARS = 60


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def short_name(benchmark: str) -> str:
    """A-847, PC-459, ... for the shipped benchmarks; a custom benchmark's own name."""
    return SHORT_NAMES.get(benchmark, benchmark)


def markdown_table(results: dict, paper_rows: bool = True) -> str:
    """Table 1 layout (A-847, PC-459, A-150, PC-59, PAS-20; mIoU %; custom benchmarks after them) plus
    a detail table per benchmark."""
    ours = results["benchmarks"]
    columns = [*BENCHMARKS, *(b for b in ours if b not in BENCHMARKS)]
    header = "| Model | " + " | ".join(short_name(b) for b in columns) + " |"
    lines = ["# Zero-shot semantic segmentation, mIoU (%)", "", header, "|" + "---|" * (len(columns) + 1)]
    if paper_rows:
        for name, row in PAPER_ROWS.items():
            lines.append(f"| {name} | " + " | ".join(_cell(row.get(b)) for b in columns) + " |")
    lines.append(f"| **{results['name']}** | "
                 + " | ".join(_cell(ours[b]["metrics"]["mIoU"]) if b in ours else "-" for b in columns) + " |")
    lines += ["", "## Details", "",
              "| Benchmark | mIoU | pAcc | mAcc | seen / unseen mIoU | lambda | mask threshold | images "
              "| skipped | best of sweep (mIoU @ lambda, threshold) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for benchmark in columns:
        if benchmark not in ours:
            continue
        result, m = ours[benchmark], ours[benchmark]["metrics"]
        split = f"{_cell(m['mIoU_seen'])} / {_cell(m['mIoU_unseen'])}" if "mIoU_seen" in m else "-"
        best = result["best"]
        best_text = f"{_cell(best['mIoU'])} @ {best['lambda']}, {best['mask_threshold']}" if best else "-"
        counts = result["counts"]
        lines.append(f"| {short_name(benchmark)} | {_cell(m['mIoU'])} | {_cell(m['pAcc'])} | {_cell(m['mAcc'])} "
                     f"| {split} | {result['lambda']} | {result['mask_threshold']} | {counts['evaluated']} "
                     f"| {counts['skipped']} | {best_text} |")
    lines += ["", "Classes absent from both ground truth and prediction are excluded from the means "
                  "(see `convention` in results.json)."]
    return "\n".join(lines) + "\n"


def iou_chart_png(result: dict, title: str) -> bytes:
    """Horizontal bars of the per-class IoU, best first; with many classes only the top and bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = sorted(((c["iou"], c["name"].split(",")[0].strip()) for c in result["per_class_iou"]
                     if c["iou"] is not None), reverse=True)
    shown = scored
    note = f"{len(scored)} of {result['num_classes']} classes have an IoU"
    if len(scored) > MAX_BARS:
        half = MAX_BARS // 2
        shown = scored[:half] + [(0.0, "...")] + scored[-half:]
        note += f"; top and bottom {half} shown"
    height = 1.2 + 0.22 * max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(7.5, height))
    try:
        names = [name for _, name in shown]
        values = [value for value, _ in shown]
        bars = ax.barh(range(len(shown)), values, color="#3b7dd8")
        ax.bar_label(bars, labels=["" if name == "..." else f"{v:.1f}" for v, name in shown], fontsize=6,
                     padding=2)
        ax.set_yticks(range(len(shown)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 108)
        ax.set_xlabel("IoU (%)")
        miou = result["metrics"]["mIoU"]
        if miou is not None:
            ax.axvline(miou, color="#d8503b", linestyle="--", linewidth=1, label=f"mIoU {miou:.1f}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{title}\n{note}", fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def write_confusion(out: str, result: dict, matrices: np.ndarray) -> None:
    """``confusion.npz``: ``confusion`` (settings, N, N) int64, ``settings`` (lambda, threshold) rows
    (the first is the reported one), ``class_names``. Recompute any metric from it without the model."""
    settings = ([(s["lambda"], s["mask_threshold"]) for s in result["sweep"]]
                or [(result["lambda"], result["mask_threshold"])])
    names = [c["name"] for c in result["per_class_iou"]]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, confusion=matrices, settings=np.array(settings, dtype=np.float64),
                        class_names=np.array(names))
    storage.write_bytes(storage.join(out, result["benchmark"], "confusion.npz"), buffer.getvalue())


def write_benchmark_report(out: str, name: str, result: dict) -> None:
    """A finished benchmark's own ``results.json`` and per-class IoU chart under ``out/BENCHMARK/``."""
    benchmark = result["benchmark"]
    storage.write_text(storage.join(out, benchmark, "results.json"), json.dumps(result, indent=1))
    title = f"{short_name(benchmark)}: {name} (lambda {result['lambda']}, threshold {result['mask_threshold']})"
    storage.write_bytes(storage.join(out, benchmark, "per_class_iou.png"), iou_chart_png(result, title))


def write_reports(config, results: dict) -> None:
    """The run's ``results.json`` and ``table.md`` over the benchmarks finished so far."""
    out = config.out
    storage.write_text(storage.join(out, "results.json"), json.dumps(results, indent=1))
    storage.write_text(storage.join(out, "table.md"), markdown_table(results, config.paper_rows))
