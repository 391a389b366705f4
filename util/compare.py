"""Paired comparison of two runs on the same test images: AUROC differences with intervals and tests.

    python -m util.compare output_dir/nih_1_lora output_dir/nih_1_full
    python -m util.compare RUN_A RUN_B --out cmp/ --resamples 2000 --plot

RUN_A and RUN_B are run folders (their ``predictions_<split>.csv``) or prediction CSV files
as the training script writes them: ``path``, one probability column per class, then one
``label_<class>`` column per class. The two are joined on the image path; they must hold
the same images, the same classes in the same order and the same labels, or the
comparison is refused with the mismatch named.

Per class and for the mean AUROC: each run's AUROC, the difference A - B, its paired
bootstrap interval and p-value (images resampled jointly across classes, unstratified; both
runs scored on the same resamples, see ``util.stats``), and per class DeLong's paired test.
The p-values are per class and not adjusted for multiple comparisons.

``--out DIR`` writes ``comparison.{md,csv,json}`` (and ``comparison_forest.{png,svg}`` with
``--plot``); the markdown is always printed. Those files are never written over unless
``--overwrite`` is given; the predictions read, a training run's own files and symbolic
links are refused even then.

A probability cell may be empty (the project's CSV writer leaves it empty for an image
without a finite prediction): such images are left out of the comparison and counted. A
UTF-8 byte-order mark at the start of a file is ignored.

Exit codes: 0 compared; 1 an output could not be written; 2 usage (a bad flag, a run or
file that does not exist or cannot be compared with the other, a refused ``--out``;
nothing written).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from util import cli
from util.io import write_csv, write_json, write_text
from util.reports import check_outputs, x100
from util.stats import DEFAULT_RESAMPLES, paired_comparison, small_class_note
from util.cli import UsageError

LABEL_PREFIX = "label_"
SHOWN = 3  # examples named in a mismatch message


class ComparisonError(UsageError, ValueError):
    """Two prediction files that cannot be compared image by image (files the user named: exit 2)."""


@dataclass
class Predictions:
    """One run's per-image predictions."""

    source: Path
    name: str
    paths: list[str]
    class_names: list[str]
    probs: np.ndarray    # (N, K) float64
    targets: np.ndarray  # (N, K) int


def predictions_file(run: str | Path, split: str = "test") -> Path:
    """The predictions CSV of a run folder, or the file itself."""
    run = Path(run)
    if run.is_dir():
        path = run / f"predictions_{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{run}: no predictions_{split}.csv in this run folder")
        return path
    if not run.is_file():
        raise FileNotFoundError(f"run not found: {run} (a run folder or a predictions CSV)")
    return run


def read_predictions(path: str | Path, name: str | None = None) -> Predictions:
    """Read and check a predictions CSV (``path``, K probabilities, K ``label_`` columns); an
    empty probability cell reads as NaN."""
    path = Path(path)
    try:
        return _read_predictions(path, name)
    except UnicodeDecodeError as err:
        raise ComparisonError(f"{path}: not a UTF-8 text file (byte {err.start}): a predictions "
                              "CSV of this tool is") from None
    except OSError as err:
        raise ComparisonError(f"{path}: cannot read it: {err.strerror or err}") from None


def _read_predictions(path: Path, name: str | None) -> Predictions:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "path":
            raise ComparisonError(f"{path}: the header must start with 'path' (a predictions CSV "
                                  "of this tool)")
        k = (len(header) - 1) // 2
        classes, labels = header[1:1 + k], header[1 + k:]
        if len(header) != 1 + 2 * k or k == 0 or labels != [LABEL_PREFIX + c for c in classes]:
            raise ComparisonError(f"{path}: expected columns path, <class>..., label_<class>... "
                                  f"with the same classes, found {header}")
        paths, probs, targets = [], [], []
        for line, cells in enumerate(reader, start=2):
            if len(cells) != len(header):
                raise ComparisonError(f"{path}, line {line}: {len(cells)} cells, expected {len(header)}")
            try:
                probs.append([float(c) if c.strip() else math.nan for c in cells[1:1 + k]])
                targets.append([int(c) for c in cells[1 + k:]])
            except ValueError as err:
                raise ComparisonError(f"{path}, line {line}: {err}") from None
            if not set(targets[-1]) <= {0, 1}:
                bad = next(c for c, t in zip(labels, targets[-1]) if t not in (0, 1))
                raise ComparisonError(f"{path}, line {line}: {bad} is {targets[-1][labels.index(bad)]}, "
                                      "expected a 0/1 label (uncertain labels are not scored)")
            paths.append(cells[0])
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        if p in seen:
            raise ComparisonError(f"{path}: image {p} appears twice (lines {seen[p] + 2} and {i + 2})")
        seen[p] = i
    default = path.parent.name if path.name.startswith("predictions_") else path.stem
    return Predictions(path, name or default, paths, classes,
                       np.array(probs, dtype=np.float64).reshape(-1, k),
                       np.array(targets, dtype=int).reshape(-1, k))


def align(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, probs_a, probs_b) on A's image order, or a ComparisonError naming the mismatch."""
    if a.class_names != b.class_names:
        raise ComparisonError(f"the runs have different classes: {a.source} has {a.class_names}, "
                              f"{b.source} has {b.class_names}")
    index_b = {p: i for i, p in enumerate(b.paths)}
    only_a = [p for p in a.paths if p not in index_b]
    only_b = sorted(set(b.paths) - set(a.paths))
    if only_a or only_b:
        parts = [f"{len(only)} only in {src} (e.g. {', '.join(only[:SHOWN])})"
                 for src, only in ((a.source, only_a), (b.source, only_b)) if only]
        raise ComparisonError("the runs were tested on different images: " + "; ".join(parts))
    order = np.array([index_b[p] for p in a.paths], dtype=np.int64)
    targets_b = b.targets[order]
    differ = np.argwhere(a.targets != targets_b)
    if len(differ):
        i, k = differ[0]
        raise ComparisonError(f"the runs' labels differ on {len(np.unique(differ[:, 0]))} images, "
                              f"e.g. {a.paths[i]} {a.class_names[k]}: {a.targets[i, k]} in "
                              f"{a.source}, {targets_b[i, k]} in {b.source}")
    return a.targets, a.probs, b.probs[order]


def compare(a: Predictions, b: Predictions, resamples: int = DEFAULT_RESAMPLES,
            seed: int = 0) -> dict[str, Any]:
    """The paired comparison A - B (``util.stats.paired_comparison``) with both runs named."""
    targets, probs_a, probs_b = align(a, b)
    result = paired_comparison(targets, probs_a, probs_b, a.class_names, resamples=resamples,
                               seed=seed)
    return {"run_a": a.name, "run_b": b.name, "file_a": str(a.source), "file_b": str(b.source),
            **result}


def _p(value: Any, resamples: int | None = None) -> str:
    """A p-value with 4 decimals; a bootstrap p at its floor 2 / (B + 1) reads '<=floor'
    (``resamples``: B, the resamples where the difference is defined)."""
    if value is None:
        return ""
    if resamples and value <= 2 / (resamples + 1) + 1e-12:
        return f"<={value:.4f}"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def table_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """Per-class rows then the mean: AUROCs and difference x100, interval, p-values."""
    rows = []
    for name, r in [*result["classes"].items(), ("mean", result["mean"])]:
        rows.append({
            "class": name, "n_pos": str(r.get("n_pos", "")), "auroc_a": x100(r["auroc_a"], 2),
            "auroc_b": x100(r["auroc_b"], 2), "diff": x100(r["diff"], 2),
            "ci_low": x100(r["ci_low"], 2), "ci_high": x100(r["ci_high"], 2),
            # The floor is set by the resamples where the difference is defined (util.stats).
            "p_bootstrap": _p(r["p_bootstrap"],
                              result["n_resamples"] - (r.get("n_undefined_resamples") or 0)),
            "delong_z": "" if r.get("delong_z") is None else f"{r['delong_z']:.3f}",
            "delong_p": _p(r.get("delong_p")), "note": r["note"] or "",
        })
    return rows


def to_markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table with a line on the method and the notes."""
    a, b = result["run_a"], result["run_b"]
    level = round(100 * result["level"])
    out = [f"# {a} vs {b}: test AUROC (x100), paired over {result['n_images']} images", "",
           f"| class | A | B | A - B | {level}% CI (bootstrap) | p (bootstrap) | p (DeLong) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for row in table_rows(result):
        ci = f"[{row['ci_low']}, {row['ci_high']}]" if row["ci_low"] else "n/a"
        cells = [row["auroc_a"] or "n/a", row["auroc_b"] or "n/a", row["diff"] or "n/a", ci,
                 row["p_bootstrap"] or "n/a",
                 "" if row["class"] == "mean" else row["delong_p"] or "n/a"]
        if row["class"] == "mean":
            out.append("| **mean** | " + " | ".join(f"**{c}**" if c else "" for c in cells) + " |")
        else:
            out.append(f"| {row['class']} | " + " | ".join(cells) + " |")
    out += ["", f"A = {a} ({result['file_a']}), B = {b} ({result['file_b']}).",
            f"{result['bootstrap']}; {result['n_resamples']} resamples, seed {result['seed']}. "
            f"{result['delong']}. p-values are not adjusted for multiple comparisons.", ""]
    small = small_class_note(result["classes"])
    if small:
        out.append(f"- {small}.")
    for name, r in [*result["classes"].items(), ("mean", result["mean"])]:
        if r["note"]:
            out.append(f"- {name}: {r['note']}.")
    if result["n_dropped"]:
        out.append(f"- {result['n_dropped']} images without a finite prediction in either run "
                   "were left out.")
    return "\n".join(out).rstrip() + "\n"


def output_paths(out_dir: str | Path, plot: bool = False) -> list[Path]:
    """The files ``write_outputs`` writes: comparison.{md,csv,json} (+ the forest plot)."""
    out_dir = Path(out_dir)
    files = [out_dir / f"comparison.{ext}" for ext in ("md", "csv", "json")]
    return files + ([out_dir / f"comparison_forest.{ext}" for ext in ("png", "svg")] if plot else [])


def write_outputs(result: dict[str, Any], out_dir: str | Path, plot: bool = False) -> list[Path]:
    """Write comparison.{md,csv,json} (and the forest plot) into ``out_dir``; returns the paths."""
    rows = table_rows(result)
    written = output_paths(out_dir)
    md, csv_path, js = written
    write_text(md, to_markdown(result))

    header = list(rows[0])
    write_csv(csv_path, header, ([row[k] for k in header] for row in rows))
    write_json(js, result)
    if plot:
        written += save_difference_plot(result, Path(out_dir) / "comparison_forest")
    return written


def save_difference_plot(result: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Forest plot of A - B per class and for the mean, with its interval and a zero line."""
    from util.reports import ForestPoint, save_forest_plot

    series = f"{result['run_a']} - {result['run_b']}"
    points = []
    for name, r in [*result["classes"].items(), ("mean AUROC", result["mean"])]:
        if r["diff"] is None:
            continue
        if r["ci_low"] is None:
            points.append(ForestPoint(row=f"{name} (no CI)", series=series, value=100 * r["diff"]))
        else:
            points.append(ForestPoint(row=name, series=series, value=100 * r["diff"],
                                      low=100 * r["ci_low"], high=100 * r["ci_high"]))
    level = round(100 * result["level"])
    return save_forest_plot(points, path, xlabel=f"difference in test AUROC x100 (A - B), "
                            f"{level}% paired bootstrap CI",
                            title=f"{result['run_a']} vs {result['run_b']}", zero_line=True)


PROG = "python -m util.compare"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (whole names only)."""
    parser = cli.Parser(
        prog=PROG,
        description="Paired comparison of two runs' test predictions (bootstrap and DeLong).",
        epilog="Exit codes: 0 compared; 1 an output could not be written; 2 usage error, "
               "nothing written.")
    parser.add_argument("run_a", metavar="RUN_A", help="run folder or predictions CSV")
    parser.add_argument("run_b", metavar="RUN_B", help="run folder or predictions CSV")
    parser.add_argument("--out", default=None, type=cli.folder_path,
                        help="write comparison.{md,csv,json} into this folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace comparison files already in --out")
    parser.add_argument("--resamples", type=cli.NON_NEGATIVE_INT, default=DEFAULT_RESAMPLES,
                        help="bootstrap resamples (0: DeLong only)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--split", default="test", help="which predictions_<split>.csv of a run folder")
    parser.add_argument("--plot", action="store_true",
                        help="also write comparison_forest.{png,svg} (needs --out)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the markdown comparison, optionally write it; errors are raised (one line each)."""
    try:
        files = [predictions_file(args.run_a, args.split), predictions_file(args.run_b, args.split)]
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    if args.out is not None:
        check_outputs("--out", output_paths(args.out, args.plot), overwrite=args.overwrite,
                      inputs=files)
    a, b = (read_predictions(f) for f in files)
    if a.name == b.name:  # two runs from folders of the same name: keep them apart
        a.name, b.name = str(a.source.parent), str(b.source.parent)
    result = compare(a, b, resamples=args.resamples, seed=args.seed)
    print(to_markdown(result), end="")
    if args.out is not None:
        written = write_outputs(result, args.out, plot=args.plot)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the flags cannot say alone (a bad combination exits 2 with one line)."""
    if args.plot and args.out is None:
        parser.error("--plot needs --out DIR")


def main(argv: Sequence[str] | None = None) -> int:
    """The command inside its error boundary (``util.cli.main``): returns the exit code."""
    return cli.main(build_parser, run, argv, prog=PROG, check=check_args, logs=False)


if __name__ == "__main__":
    sys.exit(main())
