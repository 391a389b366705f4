"""Evaluation reports: ROC curves (PNG), per-class AUROC tables, forest plots (PNG + SVG),
calibration and operating-point tables, reliability diagrams (PNG).

    save_roc_curves(targets, probs, class_names, out_dir / "roc_test.png")
    write_auroc_tables(results, out_dir)  # results_test_auroc.csv and results_test_auroc.md
    save_forest_plot(points, out_dir / "forest", xlabel=..., title=...)  # forest.png + .svg
    write_calibration_tables(results, out_dir)        # results_test_calibration.{csv,md}
    write_operating_point_tables(results, out_dir)    # results_test_operating_points.{csv,md}
    save_reliability_diagram(targets, probs, class_names, out_dir / "reliability_test.png",
                             calibrated=calibrated_probs)

Plots are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``: nothing global (the backend, open figures) changes in the calling process.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from util.cli import UsageError
from util.io import atomic_write, write_csv, write_text
from util.runfolder import run_owning
from util.stats import small_class_note

# The ROC figure is a fixed 8 x 8 inch canvas at 100 dpi (800 x 800 px, no tight bbox) so
# that every report has the same size, whatever the legend holds.
ROC_FIGSIZE = (8.0, 8.0)
ROC_DPI = 100


def check_outputs(flag: str, outputs: Iterable[str | Path], *, overwrite: bool = False,
                  inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before anything is written, an output file that would lose something the user has.

    Each of ``outputs`` (files the command is about to write, named by ``flag``) must not be
    a symbolic link (writing would change the file it points to, or replace the link), a
    folder, one of ``inputs`` (the same file under any spelling), a file a training run
    recorded as its own (``util.runfolder.run_owning``), nor, without ``overwrite``, an
    existing file. Raises ``UsageError`` naming the flag and the file.
    """
    given = {os.path.realpath(p): str(p) for p in inputs}
    for path in map(Path, outputs):
        if path.is_symlink():
            raise UsageError(f"{flag}: {path} is a symbolic link (to {os.readlink(path)}); "
                             "refusing to write through it or replace it: name a plain file")
        if path.is_dir():
            raise UsageError(f"{flag}: {path} is a folder, not a file")
        same = given.get(os.path.realpath(path))
        if same is not None:
            spelled = "" if same == str(path) else f" ({same})"
            raise UsageError(f"{flag}: {path} is one of this command's inputs{spelled}; "
                             "write the output elsewhere")
        owner = run_owning(path)
        if owner is not None:
            raise UsageError(f"{flag}: {path} is a file of the training run in {owner} (its own "
                             "results); write the output elsewhere")
        if not overwrite and path.exists():
            raise UsageError(f"{flag}: {path} exists; pass --overwrite to replace it, or choose "
                             "another name")


def _write_tables(out_dir: str | Path, name: str, fields: Sequence[str],
                  rows: Iterable[dict[str, Any]], lines: Sequence[str]) -> tuple[Path, Path]:
    """Write ``<name>.csv`` (the ``fields`` columns of the rows) and ``<name>.md`` (the
    lines) in ``out_dir``; returns both paths."""
    csv_path, md_path = Path(out_dir) / f"{name}.csv", Path(out_dir) / f"{name}.md"
    write_csv(csv_path, fields, ([row[f] for f in fields] for row in rows))
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def _figure(width: float, height: float) -> Any:
    """A bare Figure on the Agg canvas at ROC_DPI (module docstring: no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=ROC_DPI)
    FigureCanvasAgg(fig)
    return fig


def save_roc_curves(targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    path: str | Path, title: str | None = None) -> Path:
    """Write one PNG with a ROC curve per class and its AUROC in the legend; returns the path.

    Classes whose targets hold a single value have no ROC curve; the legend says so.
    Rows with a NaN probability (e.g. images that failed to load) are left out.
    """
    from matplotlib.lines import Line2D
    from sklearn.metrics import roc_curve

    from util.metrics import binary_auroc  # scipy: imported only when a figure is drawn

    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if targets.ndim == 1:
        targets, probs = targets[:, None], probs.reshape(-1, 1)
    if targets.shape != probs.shape or targets.shape[1] != len(class_names):
        raise ValueError(f"save_roc_curves: targets {targets.shape}, probs {probs.shape} and "
                         f"{len(class_names)} class names do not agree")

    fig = _figure(*ROC_FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    # Enough distinct colours for NIH's 14 classes.
    colours = _palette(len(class_names))
    aurocs: list[float] = []
    handles, labels = [], []
    for k, name in enumerate(class_names):
        keep = ~np.isnan(probs[:, k])
        target, prob = targets[keep, k].astype(int), probs[keep, k]
        auc = binary_auroc(target, prob)
        if math.isnan(auc):  # a single label value (or no image): no ROC curve
            why = ("no images" if target.size == 0 else
                   f"only {'positives' if target.flat[0] else 'negatives'}")
            handles.append(Line2D([], [], color=colours[k], linestyle=":"))
            labels.append(f"{name}: n/a ({why})")
            continue
        fpr, tpr, _ = roc_curve(target, prob)
        (line,) = ax.plot(fpr, tpr, color=colours[k], linewidth=1.4)
        handles.append(line)
        labels.append(f"{name}: {100 * auc:.1f}")
        aurocs.append(auc)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), aspect="equal", xlabel="False positive rate",
           ylabel="True positive rate")
    mean = f"mean AUROC {100 * float(np.mean(aurocs)):.1f}" if aurocs else "no AUROC defined"
    ax.set_title(f"{title} ({mean})" if title else f"ROC curves ({mean})")
    ax.grid(True, linewidth=0.3, alpha=0.6)
    ax.legend(handles, labels, loc="lower right", fontsize="small",
              title="AUROC x100", title_fontsize="small", framealpha=0.9)

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=ROC_DPI))
    return path


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours: tab10, then tab20's lighter shades."""
    from matplotlib import colormaps

    base = [colormaps["tab10"](i) for i in range(10)]
    extra = [colormaps["tab20"](i) for i in range(1, 20, 2)]
    colours = base + extra
    return [colours[i % len(colours)] for i in range(n)]


def write_predictions_csv(path: str | Path, names: Sequence[str], probs: np.ndarray,
                          class_names: Sequence[str], labels: np.ndarray | None = None,
                          thresholds: np.ndarray | None = None, replace: bool = True) -> Path:
    """Per-image CSV: path, a probability per class ('' for NaN; all the digits of the
    float32 or float64 value, which reads back equal), then ``pred_<class>`` 0/1
    columns with ``thresholds`` ('' for a NaN threshold) and ``label_<class>`` columns with
    ``labels``."""
    header = ["path", *class_names]
    if thresholds is not None:
        header += [f"pred_{c}" for c in class_names]
    if labels is not None:
        header += [f"label_{c}" for c in class_names]

    # Every digit the scores have (shortest round trip), so that the CSV ranks the images as
    # the run did: fixed decimals would tie the scores of confident predictions.
    number = (lambda p: f"{p:.9g}") if probs.dtype == np.float32 else repr

    def cells(i: int, name: str, row: np.ndarray) -> list[Any]:
        line = [name, *("" if math.isnan(p) else number(p) for p in map(float, row))]
        if thresholds is not None:  # a NaN threshold (a class without one): empty
            line += ["" if math.isnan(t) else str(int(p >= t)) for p, t in zip(row, thresholds)]
        if labels is not None:
            line += [int(v) for v in labels[i]]
        return line

    return write_csv(path, header, (cells(i, n, row) for i, (n, row) in enumerate(zip(names, probs))),
                     replace)


def x100(value: Any, digits: int = 1) -> str:
    """A 0-1 metric as x100 with ``digits`` decimals; '' when missing or NaN."""
    if value is None:
        return ""
    value = float(value)
    return "" if math.isnan(value) else f"{100 * value:.{digits}f}"


def _md_row(*cells: str) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def _interval(low: str, high: str) -> str:
    """'[low, high]' from two formatted bounds, or '' when either is undefined."""
    return f"[{low}, {high}]" if low and high else ""


def auroc_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """Per-class rows (class, AUROC x100, AUPRC x100), then the mean row.

    When ``results["intervals"]`` holds ``util.stats.auroc_intervals`` output, the rows also
    carry the bootstrap interval, the DeLong standard error and interval (x100).
    """
    auroc: dict[str, Any] = results.get("auroc") or {}
    auprc: dict[str, Any] = results.get("auprc") or {}
    names = list(results.get("class_names") or auroc)
    if not names:
        raise ValueError("write_auroc_tables: results hold neither 'class_names' nor 'auroc'")
    rows = [{"class": n, "auroc": x100(auroc.get(n)), "auprc": x100(auprc.get(n))}
            for n in names]
    mean_auroc = results.get("mean_auroc")
    if mean_auroc is None:
        defined = [float(v) for v in auroc.values() if v is not None and not math.isnan(float(v))]
        mean_auroc = float(np.mean(defined)) if defined else None
    rows.append({"class": "mean", "auroc": x100(mean_auroc),
                 "auprc": x100(results.get("mean_auprc"))})
    intervals = results.get("intervals")
    if intervals:
        per_class = intervals.get("classes") or {}
        for row in rows:
            iv = (intervals.get("mean") if row["class"] == "mean" else per_class.get(row["class"])) or {}
            se = iv.get("delong_se")
            row.update(auroc_ci_low=x100(iv.get("ci_low")), auroc_ci_high=x100(iv.get("ci_high")),
                       delong_se="" if se is None else f"{100 * float(se):.2f}",
                       delong_low=x100(iv.get("delong_low")),
                       delong_high=x100(iv.get("delong_high")))
    return rows


INTERVAL_COLUMNS = ("auroc_ci_low", "auroc_ci_high", "delong_se", "delong_low", "delong_high")


def interval_notes(intervals: dict[str, Any]) -> list[str]:
    """Markdown lines under the table: how the intervals were made, and why any is missing."""
    level = round(100 * float(intervals.get("level", 0.95)))
    lines = [f"{level}% CI: {intervals.get('bootstrap', 'bootstrap')}; "
             f"{intervals.get('n_resamples')} resamples, seed {intervals.get('seed')}"
             + ". DeLong: " + str(intervals.get("delong", "")) + ".", ""]
    small = small_class_note(intervals.get("classes") or {})
    if small:
        lines.append(f"- {small}.")
    if intervals.get("n_dropped"):
        lines.append(f"- {intervals['n_dropped']} images without a finite prediction were left out.")
    for name, iv in (intervals.get("classes") or {}).items():
        if iv.get("note"):
            lines.append(f"- {name}: {iv['note']}.")
    if (intervals.get("mean") or {}).get("note"):
        lines.append(f"- mean: {intervals['mean']['note']}.")
    return lines


def write_auroc_tables(results: dict[str, Any], out_dir: str | Path,
                       stem: str = "results_test") -> tuple[Path, Path]:
    """Write ``<stem>_auroc.csv`` and ``<stem>_auroc.md``: per-class AUROC / AUPRC x100 and the mean.

    A class whose AUROC is undefined (a single label value) has an empty cell in the CSV
    and 'n/a' in the markdown. With ``results["intervals"]`` (``util.stats.auroc_intervals``)
    both tables add the bootstrap interval and the DeLong standard error and interval.
    """
    rows = auroc_rows(results)
    intervals = results.get("intervals")
    fields = ["class", "auroc", *(INTERVAL_COLUMNS if intervals else ()), "auprc"]
    header = " / ".join(str(results[k]) for k in ("dataset", "data_size", "weights", "method")
                        if results.get(k) is not None)
    lines = []
    if header:
        lines += [f"**{header}**" + (f" ({results['split']} split, {results['num_images']} images)"
                                      if results.get("split") and results.get("num_images") else ""),
                  ""]
    if results.get("skipped"):
        skipped = results["skipped"]
        lines += [f"Scored on {results['num_images']} of the {results.get('split_images', '?')} images "
                  f"of {results.get('split_file', 'the split')}: {len(skipped)} could not be read and "
                  f"were skipped (--skip_bad), e.g. line {skipped[0]['line']} {skipped[0]['path']!r}. "
                  "The score is not comparable with one on the whole split.", ""]
    if intervals:
        level = round(100 * float(intervals.get("level", 0.95)))
        lines += [f"| class | AUROC | {level}% CI (bootstrap) | {level}% CI (DeLong) | AUPRC |",
                  "|---|---:|---:|---:|---:|"]
    else:
        lines += ["| class | AUROC | AUPRC |", "|---|---:|---:|"]
    for row in rows:
        cells = [row["auroc"] or "n/a"]
        if intervals:
            # DeLong is per class: the mean has no DeLong interval here.
            cells += [_interval(row["auroc_ci_low"], row["auroc_ci_high"]) or "n/a",
                      "" if row["class"] == "mean" else
                      _interval(row["delong_low"], row["delong_high"]) or "n/a"]
        cells.append(row["auprc"] or "n/a")
        label = row["class"]
        if label == "mean":
            label, cells = "**mean**", [f"**{c}**" if c else "" for c in cells]
        lines.append(_md_row(label, *cells))
    if intervals:
        lines += [""] + interval_notes(intervals)
    return _write_tables(out_dir, f"{stem}_auroc", fields, rows, lines)


@dataclass
class ForestPoint:
    """One estimate on a forest plot: a run's value with its interval, a mean, or a reference."""

    row: str                  # the y-axis label (one setting, or one class)
    series: str               # legend entry and colour (e.g. "LoRA", "full fine-tuning")
    value: float
    low: float | None = None
    high: float | None = None
    kind: str = "run"         # "run": dot + interval bar; "mean": diamond; "reference": cross


FOREST_MARKERS = {"run": "o", "mean": "D", "reference": "X"}
FOREST_KIND_LABELS = {"run": "one run, 95% CI", "mean": "mean over seeds", "reference": "reference"}


def save_forest_plot(points: Sequence[ForestPoint], path: str | Path, *, xlabel: str, title: str,
                     zero_line: bool = False) -> tuple[Path, Path]:
    """Write a forest plot as ``<path>.png`` and ``<path>.svg``; returns both paths.

    One block per distinct ``row`` (top to bottom in first-seen order); inside it each
    series present, in legend order, and each of its runs (e.g. seeds) on a line of its
    own. A series' mean and reference sit on the middle of that series' lines.
    """
    if not points:
        raise ValueError("save_forest_plot: nothing to plot")
    rows = list(dict.fromkeys(p.row for p in points))
    series = list(dict.fromkeys(p.series for p in points))
    colours = dict(zip(series, _palette(len(series))))
    placed, row_spans, bottom = _forest_layout(points, rows, series)

    height = 1.9 + 0.2 * (-bottom / FOREST_LINE_GAP)
    fig = _figure(7.0 + 0.075 * max(len(r) for r in rows), height)
    ax = fig.add_subplot(1, 1, 1)
    for i, (_, top, row_bottom) in enumerate(row_spans):
        if i % 2 == 0:  # light banding keeps a row's lines together for the eye
            ax.axhspan(row_bottom - FOREST_ROW_GAP / 2, top + FOREST_ROW_GAP / 2, color="0.94",
                       zorder=0)
    for point, y in placed:
        _draw_forest_point(ax, point, y, colours[point.series])
    if zero_line:
        ax.axvline(0.0, color="black", linewidth=0.9, linestyle="--", zorder=1)
    ax.set_yticks([(top + row_bottom) / 2 for _, top, row_bottom in row_spans])
    ax.set_yticklabels(rows)
    ax.set_ylim(bottom + FOREST_ROW_GAP / 2 + FOREST_LINE_GAP / 2,
                FOREST_ROW_GAP / 2 + FOREST_LINE_GAP / 2)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", linewidth=0.3, alpha=0.6)
    handles, labels = _forest_legend(series, colours, {p.kind for p in points})
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize="small",
               frameon=False)
    legend_rows = math.ceil(len(labels) / min(len(labels), 3))
    fig.tight_layout(rect=(0, (0.25 + 0.2 * legend_rows) / height, 1, 1))

    path = Path(path)
    png, svg = path.with_suffix(".png"), path.with_suffix(".svg")
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=ROC_DPI))
    atomic_write(svg, lambda tmp: fig.savefig(tmp, format="svg"))
    return png, svg


# Vertical spacing of a forest plot, in units of one line: runs of one series adjacent, a
# small gap between series, a larger one between rows.
FOREST_LINE_GAP, FOREST_SERIES_GAP, FOREST_ROW_GAP = 1.0, 0.5, 1.2


def _forest_layout(points: Sequence[ForestPoint], rows: Sequence[str], series: Sequence[str]
                   ) -> tuple[list[tuple[ForestPoint, float]], list[tuple[str, float, float]], float]:
    """Each point with its y, each row with the y of its first and last line, and the y
    below the last row; lines are laid out from the top (y decreasing from 0)."""
    y = 0.0
    placed: list[tuple[ForestPoint, float]] = []
    row_spans: list[tuple[str, float, float]] = []
    for row in rows:
        top = y
        present = [s for s in series if any(p.row == row and p.series == s for p in points)]
        for k, name in enumerate(present):
            mine, y = _place_series([p for p in points if p.row == row and p.series == name], y)
            placed += mine
            if k < len(present) - 1:
                y -= FOREST_SERIES_GAP + FOREST_LINE_GAP
        row_spans.append((row, top, y))
        y -= FOREST_ROW_GAP + FOREST_LINE_GAP
    return placed, row_spans, y


def _place_series(points: Sequence[ForestPoint], top: float
                  ) -> tuple[list[tuple[ForestPoint, float]], float]:
    """One series of one row: each run on a line of its own from ``top`` down (one line
    when it has none), its mean and reference on the middle of them; and its last line's y."""
    runs = [p for p in points if p.kind == "run"]
    ys = [top - i * FOREST_LINE_GAP for i in range(max(len(runs), 1))]
    middle = (ys[0] + ys[-1]) / 2
    return [*zip(runs, ys), *((p, middle) for p in points if p.kind != "run")], ys[-1]


def _draw_forest_point(ax: Any, point: ForestPoint, y: float, colour: Any) -> None:
    """A run as a dot with its interval bar, a mean as an open diamond, a reference as a cross."""
    marker = FOREST_MARKERS[point.kind]
    if point.kind == "run":
        if point.low is not None and point.high is not None:
            ax.plot([point.low, point.high], [y, y], color=colour, linewidth=1.8, zorder=2)
        ax.plot([point.value], [y], marker=marker, color=colour, markersize=5, zorder=3)
    elif point.kind == "mean":
        ax.plot([point.value], [y], marker=marker, markerfacecolor="white", markeredgecolor=colour,
                markeredgewidth=1.6, markersize=7, zorder=4)
    else:
        ax.plot([point.value], [y], marker=marker, markerfacecolor=colour, markeredgecolor="black",
                markersize=9, zorder=5)


def _forest_legend(series: Sequence[str], colours: dict[str, Any], kinds: set[str]
                   ) -> tuple[list[Any], list[str]]:
    """Legend handles and labels: one per series, then a key to the markers of the kinds
    present (only when markers mean different things)."""
    from matplotlib.lines import Line2D

    keys: dict[str, dict[str, Any]] = {
        "run": {"color": "grey", "linewidth": 1.8},
        "mean": {"linestyle": "", "markerfacecolor": "white", "markeredgecolor": "grey",
                 "markeredgewidth": 1.6},
        "reference": {"linestyle": "", "markerfacecolor": "grey", "markeredgecolor": "black",
                      "markersize": 9}}
    handles = [Line2D([], [], color=colours[s], marker="o", linewidth=1.8) for s in series]
    labels = list(series)
    if kinds != {"run"}:
        shown = [k for k in FOREST_KIND_LABELS if k == "run" or k in kinds]
        handles += [Line2D([], [], marker=FOREST_MARKERS[k], **keys[k]) for k in shown]
        labels += [FOREST_KIND_LABELS[k] for k in shown]
    return handles, labels


# -- Subgroups (util.subgroups) -----------------------------------------------------------

def _p(value: Any) -> str:
    """A p-value in three decimals ('<0.001' below), 'n/a' when undefined."""
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _gap(diff: Any) -> str:
    """An AUROC difference x100 with its sign, 'n/a' when undefined."""
    return "n/a" if diff is None else f"{100 * diff:+.1f}"


def subgroup_rows(report: dict[str, Any], class_names: Sequence[str]) -> list[dict[str, str]]:
    """One row per subgroup: attribute, subgroup, images, mean AUROC with its interval and
    each class's AUROC (x100; '' where undefined)."""
    rows = []
    for attribute, entry in report["attributes"].items():
        for name, group in entry["groups"].items():
            mean = group["mean"]
            rows.append({"attribute": attribute, "subgroup": name, "images": str(group["n_images"]),
                         "mean_auroc": x100(mean["auroc"]), "mean_ci_low": x100(mean["ci_low"]),
                         "mean_ci_high": x100(mean["ci_high"]), "mean_classes": str(mean["n_classes"]),
                         **{c: x100(group["classes"][c]["auroc"]) for c in class_names}})
    return rows


def write_subgroup_tables(report: dict[str, Any], class_names: Sequence[str], out_dir: str | Path,
                          stem: str = "subgroups_test") -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (a row per subgroup) and ``<stem>.md`` (per attribute: its
    subgroups, the largest gap of the mean and of each class with their tests, and every
    image without metadata or with the attribute unknown counted)."""
    rows = subgroup_rows(report, class_names)
    fields = ["attribute", "subgroup", "images", "mean_auroc", "mean_ci_low", "mean_ci_high",
              "mean_classes", *class_names]
    level = round(100 * float(report.get("level", 0.95)))
    lines = ["# Test AUROC (x100) by subgroup", "",
             f"{report['n_images']} images; metadata: {report['source']}.", ""]
    lines += [f"- {note}." for note in report["notes"]]
    lines += [f"- {report['age_bands']}.", ""]
    for attribute, entry in report["attributes"].items():
        lines += [f"## {attribute}", ""]
        if entry["unknown"]:
            lines += [f"{entry['unknown']} images with metadata have no {attribute}: in no "
                      f"subgroup below.", ""]
        if not entry["groups"]:
            lines += ["No image has this attribute.", ""]
            continue
        lines += [f"| subgroup | images | mean AUROC | {level}% CI | classes in the mean | "
                  + " | ".join(class_names) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(class_names)]
        for row in (r for r in rows if r["attribute"] == attribute):
            lines.append(_md_row(row["subgroup"], row["images"], row["mean_auroc"] or "n/a",
                                 _interval(row["mean_ci_low"], row["mean_ci_high"]) or "n/a",
                                 row["mean_classes"], *(row[c] or "n/a" for c in class_names)))
        gap = entry["gap"]["mean"]
        lines.append("")
        if gap["diff"] is None:
            lines.append(f"Largest gap of the mean AUROC: none ({gap['note']}).")
        else:
            ci = _interval(x100(gap["ci_low"]), x100(gap["ci_high"]))
            lines.append(f"Largest gap of the mean AUROC (over the {len(gap['classes'])} classes "
                         f"defined in every subgroup, not each subgroup's own mean above): "
                         f"{gap['high']} - {gap['low']} = "
                         f"{_gap(gap['diff'])}" + (f" {ci}" if ci else "")
                         + f", p {_p(gap['p_bootstrap'])} (adjusted {_p(gap['p_adjusted'])})"
                         + (f"; {gap['note']}" if gap["note"] else "") + ".")
        lines += ["", "| class | highest | lowest | gap | DeLong p | adjusted p |",
                  "|---|---|---|---:|---:|---:|"]
        for name, g in entry["gap"]["classes"].items():
            lines.append(f"| {name} | {g['high'] or 'n/a'} | {g['low'] or 'n/a'} | {_gap(g['diff'])} | "
                         f"{_p(g['delong_p'])} | {_p(g['p_adjusted'])} |")
        lines.append("")
    lines += [f"Intervals: {level}% bootstrap ({report['n_resamples']} resamples) per subgroup, "
              f"as in the test table. Mean gap: {report['mean_gap_test']}. Per-class gap: "
              f"{report['class_gap_test']}. {report['adjustment']}."]
    return _write_tables(out_dir, stem, fields, rows, lines)


def save_subgroup_plot(report: dict[str, Any], path: str | Path) -> tuple[Path, Path] | None:
    """Forest plot of each subgroup's mean AUROC x100 with its bootstrap interval, a block of
    lines per attribute (``<path>.png`` / ``.svg``); None when no subgroup has a mean."""
    points = []
    for attribute, entry in report["attributes"].items():
        for name, group in entry["groups"].items():
            mean = group["mean"]
            if mean["auroc"] is None:
                continue
            low, high = mean["ci_low"], mean["ci_high"]
            points.append(ForestPoint(f"{attribute}: {name} (n={group['n_images']})", attribute,
                                      100 * mean["auroc"], None if low is None else 100 * low,
                                      None if high is None else 100 * high))
    if not points:
        return None
    lacking = report["n_without_metadata"]
    title = "Mean AUROC by subgroup" + (f" ({lacking} of {report['n_images']} images without "
                                        "metadata)" if lacking else "")
    return save_forest_plot(points, path, xlabel="test mean AUROC x100 (95% bootstrap CI)",
                            title=title)


# -- Calibration and operating points (results["calibration"], results["operating_points"]) ----

def _brier(value: Any) -> str:
    """A Brier score with 4 decimals; '' when missing."""
    return "" if value is None or math.isnan(float(value)) else f"{float(value):.4f}"


def calibration_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """Per-class rows (ECE x100 and Brier, before and after calibration), then the mean over
    classes and the pooled row (every image x class pair: its ECE; Brier equals the mean)."""
    section = results["calibration"]
    before, after = section["before"], section.get("after") or {}
    rows = []
    for name in results["class_names"]:
        rows.append({"class": name, "ece_before": x100(before["ece"][name], 2),
                     "ece_after": x100((after.get("ece") or {}).get(name), 2),
                     "brier_before": _brier(before["brier"][name]),
                     "brier_after": _brier((after.get("brier") or {}).get(name))})
    for label, ece_key in (("mean", "mean_ece"), ("pooled", "pooled_ece")):
        rows.append({"class": label, "ece_before": x100(before[ece_key], 2),
                     "ece_after": x100(after.get(ece_key), 2),
                     "brier_before": _brier(before["mean_brier"]),
                     "brier_after": _brier(after.get("mean_brier"))})
    return rows


def write_calibration_tables(results: dict[str, Any], out_dir: str | Path,
                             stem: str = "results_test") -> tuple[Path, Path]:
    """Write ``<stem>_calibration.csv`` and ``.md``: ECE x100 and Brier per class, their
    mean and the pooled ECE, before and (when the checkpoint carries one) after calibration."""
    from util.calibration import temperature_text

    section = results["calibration"]
    rows = calibration_rows(results)
    calibrated = bool(section.get("after"))
    fields = ["class", "ece_before", *(["ece_after"] if calibrated else []),
              "brier_before", *(["brier_after"] if calibrated else [])]
    split = results.get("split", "test")
    lines = [f"**Calibration** ({split} split, {results.get('num_images', '?')} images)", ""]
    if calibrated:
        lines += ["| class | ECE x100 | ECE x100, calibrated | Brier | Brier, calibrated |",
                  "|---|---:|---:|---:|---:|"]
    else:
        lines += ["| class | ECE x100 | Brier |", "|---|---:|---:|"]
    for row in rows:
        cells = [row[f] or "n/a" for f in fields[1:]]
        label = row["class"] if row["class"] not in ("mean", "pooled") else f"**{row['class']}**"
        lines.append(_md_row(label, *cells))
    lines += ["", (f"- ECE: {section['binning']}; mean: over classes; pooled: every image x "
                   "class pair binned together. Brier: mean of (probability - label)^2."),
              f"- Reliability diagram: reliability_{split}.png."]
    if calibrated:
        fitted = section.get("fitted_on") or {}
        lines.append(f"- Calibrated: sigmoid(logit / T), "
                     f"{temperature_text(section['temperature'].values())} "
                     f"({section.get('method')}), fitted on {fitted.get('split_file', '?')} "
                     f"({fitted.get('num_images', '?')} images); {section.get('source')}.")
        if fitted.get("note"):
            lines.append(f"- Note: {fitted['note']}.")
    else:
        lines.append(f"- Not calibrated: {section.get('note')}.")
    return _write_tables(out_dir, f"{stem}_calibration", fields, rows, lines)


OPERATING_POINT_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")
OPERATING_POINT_FIELDS = ("class", "kind", "threshold", "threshold_model", "threshold_logit",
                          "val_sensitivity", "val_specificity", "tp", "fp", "tn", "fn",
                          *(f"{m}{end}" for m in OPERATING_POINT_METRICS for end in ("", "_low", "_high")))


def operating_point_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per class x threshold kind (class-major): thresholds, counts, and the five
    rates x100 with their interval bounds; empty cells where undefined."""
    points = (results.get("operating_points") or {}).get("points") or {}
    rows = []
    for name in results["class_names"]:
        for kind, per_class in points.items():
            p = per_class.get(name) or {}
            rows.append({
                "class": name, "kind": kind,
                **{k: "" if p.get(k) is None else f"{p[k]:.6g}"
                   for k in ("threshold", "threshold_model", "threshold_logit")},
                **{k: x100(p.get(k)) for k in ("val_sensitivity", "val_specificity")},
                **{k: "" if p.get(k) is None else str(p[k]) for k in ("tp", "fp", "tn", "fn")},
                **{m + end: x100(p.get(m + end))
                   for m in OPERATING_POINT_METRICS for end in ("", "_low", "_high")},
                "note": p.get("note") or ""})
    return rows


def write_operating_point_tables(results: dict[str, Any], out_dir: str | Path,
                                 stem: str = "results_test") -> tuple[Path, ...]:
    """Write ``<stem>_operating_points.csv`` and ``.md``: per class and threshold kind, the
    validation-chosen threshold and the test sensitivity, specificity, PPV, NPV and F1 x100
    with their intervals; nothing (an empty tuple) when the checkpoint has no thresholds."""
    section = results.get("operating_points") or {}
    if not section.get("points"):
        return ()
    rows = operating_point_rows(results)
    level = round(100 * float(section.get("level", 0.95)))
    split = results.get("split", "test")
    lines = [(f"**Operating points** ({split} split, {results.get('num_images', '?')} images; "
              f"thresholds chosen on {section.get('thresholds_from')})"), "",
             "| class | kind | threshold (p >=) | sensitivity | specificity | PPV | NPV | F1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if not row["threshold"]:
            lines.append(f"| {row['class']} | {row['kind']} | n/a | {row['note']} | | | | |")
            continue
        cells = [f"{row[m] or 'n/a'} {_interval(row[m + '_low'], row[m + '_high'])}".strip()
                 for m in OPERATING_POINT_METRICS]
        lines.append(_md_row(row["class"], row["kind"], row["threshold"], *cells))
    intervals = section.get("intervals") or {}
    lines += ["", (f"- x100, with {level}% intervals: sensitivity, specificity, PPV, NPV: "
                   f"{intervals.get('proportions')}; F1: {intervals.get('f1')}."),
              "- " + "; ".join(f"{k}: {v}" for k, v in (section.get("kinds") or {}).items()) + ".",
              f"- {section.get('rule')}; never chosen on the {split} split."]
    return _write_tables(out_dir, f"{stem}_operating_points", [*OPERATING_POINT_FIELDS, "note"],
                         rows, lines)


# A reliability diagram's panel: 2.4 inches square at ROC_DPI.
RELIABILITY_PANEL = 2.4


def save_reliability_diagram(targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                             path: str | Path, calibrated: np.ndarray | None = None,
                             bins: int | None = None) -> Path:
    """Write one PNG of reliability diagrams as small multiples: a panel per class and one of
    every image x class pair pooled, each the fraction positive against the mean probability
    per equal-width bin (``util.calibration.BINNING``), before and (with ``calibrated``)
    after calibration, the ECE x100 of each in the panel's title."""
    from util.calibration import ECE_BINS, expected_calibration_error, reliability_bins

    bins = bins or ECE_BINS
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    targets, probs = (targets[:, None], probs[:, None]) if targets.ndim == 1 else (targets, probs)
    series = [("model", probs, "tab:blue", "o")]
    if calibrated is not None:
        calibrated = np.asarray(calibrated, dtype=np.float64).reshape(probs.shape)
        series.append(("calibrated", calibrated, "tab:orange", "s"))
    panels = [*((n, k) for k, n in enumerate(class_names)), ("all pairs", None)]
    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    width, height = cols * RELIABILITY_PANEL + 0.6, rows * RELIABILITY_PANEL + 1.1
    fig = _figure(width, height)
    # A fixed layout (tight_layout costs seconds for a grid of 15 panels): panels share
    # their axes, tick labels on the outer ones only.
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.1 / width, bottom=0.5 / height,
                        top=1 - 0.6 / height, wspace=0.12, hspace=0.32)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for i, (name, k) in enumerate(panels):
        ax = axes[i]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        eces = []
        for label, p, colour, marker in series:
            p_k, y_k = (p, targets) if k is None else (p[:, k], targets[:, k])
            table = reliability_bins(p_k, y_k, bins)
            used = table["count"] > 0
            ax.plot(table["mean_prob"][used], table["frequency"][used], color=colour,
                    marker=marker, markersize=3, linewidth=1.1, label=label)
            eces.append(f"{100 * expected_calibration_error(p_k, y_k, bins):.1f}")
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=6)
        ax.set_title(f"{name}\nECE x100 {' -> '.join(eces)}", fontsize=7)
        ax.grid(True, linewidth=0.3, alpha=0.6)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(series), fontsize="small",
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.supxlabel("mean predicted probability (per bin)", fontsize=8, y=0.1 / height,
                  va="bottom")
    fig.supylabel("fraction positive", fontsize=8, x=0.1 / width, ha="left")

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=ROC_DPI))
    return path
