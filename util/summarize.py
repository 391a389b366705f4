"""Gather several runs' ``results_test.json`` into one comparison table (markdown and CSV).

    python -m util.summarize runs/ --output summary          # summary.md + summary.csv
    python -m util.summarize runs/nih_1_lora runs/nih_1_full/results_test.json

RUNS are run folders (searched recursively for results_test.json) or results files. One
row per run, ordered by data set, label fraction, weights and method; columns: mean AUROC,
per-class AUROC (x100) and trainable parameters, as in the paper's comparison. The markdown
adds a LoRA-vs-full table (mean AUROC and difference) where both methods were run.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from util.io import atomic_write

logger = logging.getLogger(__name__)

RESULTS_NAME = "results_test.json"
REQUIRED_KEYS = ("dataset", "data_size", "weights", "method", "mean_auroc", "auroc")
# Display order of the paper's tables; anything else sorts after, alphabetically.
DATASET_ORDER = ("nih", "chexpert", "rsna")
DATASET_LABELS = {"nih": "NIH ChestX-ray14", "chexpert": "CheXpert", "rsna": "RSNA Pneumonia"}
SIZE_ORDER = ("1%", "10%", "100%")
METHOD_ORDER = ("lora", "full", "linear")
METHOD_LABELS = {"lora": "LoRA", "full": "full", "linear": "linear"}
LEADING_COLUMNS = ("dataset", "data_size", "weights", "method", "mean_auroc")
TRAILING_COLUMNS = ("trainable_params", "trainable_pct", "lora_rank", "num_images", "run")


class ResultsError(ValueError):
    """A results file that cannot be read or lacks what the summary needs."""


@dataclass
class Run:
    """One results file and its content."""

    path: Path
    results: dict[str, Any]

    @property
    def name(self) -> str:
        """The run folder's name (or the file's stem when it is not results_test.json)."""
        return self.path.parent.name if self.path.name == RESULTS_NAME else self.path.stem

    def sort_key(self) -> tuple:
        """Order of the paper's tables: data set, label fraction, weights, method."""
        r = self.results

        def rank(value: Any, order: Sequence[str]) -> tuple[int, str]:
            return (order.index(value) if value in order else len(order), str(value))

        return (rank(r["dataset"], DATASET_ORDER), rank(r["data_size"], SIZE_ORDER),
                str(r["weights"]), rank(r["method"], METHOD_ORDER), self.name)


def find_results(paths: Sequence[str | Path]) -> list[Path]:
    """Results files named by ``paths``: files as given, folders searched recursively."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_file():
            found.append(item)
        elif item.is_dir():
            hits = sorted(item.rglob(RESULTS_NAME))
            if not hits:
                logger.warning("%s: no %s found in this folder", item, RESULTS_NAME)
            found.extend(hits)
        else:
            raise FileNotFoundError(f"run not found: {item} (RUNS are run folders or {RESULTS_NAME} files)")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def read_results(path: str | Path) -> Run:
    """Read and check one results file."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: not a readable results JSON ({err})") from err
    if not isinstance(results, dict):
        raise ResultsError(f"{path}: expected a JSON object, found {type(results).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise ResultsError(f"{path}: missing {missing} (is this a results_test.json of this tool?)")
    if not isinstance(results["auroc"], dict):
        raise ResultsError(f"{path}: 'auroc' must map class names to values")
    return Run(path, results)


def _x100(value: Any) -> str:
    """A 0-1 metric as x100 with one decimal; '' when missing or NaN."""
    if value is None:
        return ""
    value = float(value)
    return "" if math.isnan(value) else f"{100 * value:.1f}"


def class_columns(runs: Sequence[Run]) -> list[str]:
    """Union of the runs' class names, in first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        for name in run.results.get("class_names") or run.results["auroc"]:
            names.setdefault(name, None)
    return list(names)


def summary_rows(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of the comparison table; metrics x100 with one decimal."""
    runs = sorted(runs, key=Run.sort_key)
    classes = class_columns(runs)  # so the first data set's own class order comes first
    columns = [*LEADING_COLUMNS, *classes, *TRAILING_COLUMNS]
    rows = []
    for run in runs:
        r = run.results
        trainable, total = r.get("trainable_params"), r.get("total_params")
        row = {
            "dataset": str(r["dataset"]),
            "data_size": str(r["data_size"]),
            "weights": str(r["weights"]),
            "method": METHOD_LABELS.get(r["method"], str(r["method"])),
            "mean_auroc": _x100(r["mean_auroc"]),
            "trainable_params": "" if trainable is None else str(int(trainable)),
            "trainable_pct": (f"{100 * trainable / total:.2f}" if trainable is not None and total
                              else ""),
            "lora_rank": "" if r.get("lora_rank") is None else str(r["lora_rank"]),
            "num_images": "" if r.get("num_images") is None else str(r["num_images"]),
            "run": str(run.path.parent if run.path.name == RESULTS_NAME else run.path),
            "_classes": list(r.get("class_names") or r["auroc"]),
        }
        for name in classes:
            row[name] = _x100(r["auroc"].get(name))
        rows.append(row)
    return columns, rows


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]], right: range) -> list[str]:
    """A markdown table; the columns at indices in ``right`` are right-aligned."""
    align = ["---:" if i in right else "---" for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _params(row: dict[str, str]) -> str:
    if not row["trainable_params"]:
        return ""
    text = f"{int(row['trainable_params']):,}"
    return f"{text} ({row['trainable_pct']}%)" if row["trainable_pct"] else text


def lora_vs_full(rows: Sequence[dict[str, str]]) -> list[list[str]]:
    """Rows (dataset, fraction, weights, LoRA, full, difference) where both methods were run.

    With several runs of one setting (e.g. seeds) the mean of their mean AUROCs is used.
    """
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for row in rows:
        if row["mean_auroc"] == "" or row["method"] not in ("LoRA", "full"):
            continue
        key = (row["dataset"], row["data_size"], row["weights"])
        groups.setdefault(key, {}).setdefault(row["method"], []).append(float(row["mean_auroc"]))
    table = []
    for key, by_method in groups.items():
        if "LoRA" in by_method and "full" in by_method:
            lo = sum(by_method["LoRA"]) / len(by_method["LoRA"])
            fu = sum(by_method["full"]) / len(by_method["full"])
            table.append([*key, f"{lo:.1f}", f"{fu:.1f}", f"{lo - fu:+.1f}"])
    return table


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    """The summary as markdown: one table per data set, then LoRA vs full."""
    fixed = ["data size", "weights", "method", "mean AUROC"]
    out = ["# Test AUROC (x100)", ""]
    datasets: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        datasets.setdefault(row["dataset"], []).append(row)
    for dataset, group in datasets.items():
        # This data set's classes in its own order (a union if its runs disagree).
        classes = list(dict.fromkeys(c for r in group for c in r["_classes"]))
        out += [f"## {DATASET_LABELS.get(dataset, dataset)}", ""]
        cells = [[r["data_size"], r["weights"], r["method"], f"**{r['mean_auroc'] or 'n/a'}**",
                  *[r[c] or "n/a" for c in classes], _params(r), r["run"]] for r in group]
        header = [*fixed, *classes, "trainable params", "run"]
        out += _md_table(header, cells, right=range(3, len(header) - 1))
        out.append("")
    comparison = lora_vs_full(rows)
    if comparison:
        out += ["## LoRA vs full fine-tuning (mean AUROC)", ""]
        out += _md_table(["data set", "data size", "weights", "LoRA", "full", "LoRA - full"],
                         comparison, right=range(3, 6))
        wins = sum(float(c[-1]) > 0 for c in comparison)
        out += ["", f"LoRA is better in {wins} of {len(comparison)} settings.", ""]
    return "\n".join(out)


def write_csv(path: str | Path, columns: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    """Write the summary rows as CSV (metrics x100, blank where undefined)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def summarize(paths: Sequence[str | Path], output: str | Path | None = None
              ) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """Read every results file under ``paths``; write ``<output>.md`` / ``.csv`` if given.

    Returns (columns, rows, errors): unreadable results files are reported in ``errors``
    and left out of the table.
    """
    runs, errors = [], []
    for path in find_results(paths):
        try:
            runs.append(read_results(path))
        except ResultsError as err:
            errors.append(str(err))
    columns, rows = summary_rows(runs)
    if output is not None and rows:
        output = Path(output)
        if output.suffix in (".md", ".csv"):
            output = output.with_suffix("")
        write_csv(output.with_suffix(".csv"), columns, rows)
        markdown = to_markdown(columns, rows)
        atomic_write(output.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown + "\n"))
    return columns, rows, errors


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the markdown summary, optionally write it; 1 if a file was bad."""
    parser = argparse.ArgumentParser(
        prog="python -m util.summarize",
        description="Gather results_test.json files of several runs into one table.")
    parser.add_argument("runs", nargs="+", metavar="RUNS",
                        help="run folders (searched recursively) or results_test.json files")
    parser.add_argument("--output", default=None,
                        help="write <output>.md and <output>.csv (default: print markdown only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        columns, rows, errors = summarize(args.runs, args.output)
    except FileNotFoundError as err:
        parser.error(str(err))
    for err in errors:
        logger.error("%s", err)
    if not rows:
        logger.error("no usable %s among %s", RESULTS_NAME, " ".join(args.runs))
        return 1
    if args.output is None:
        print(to_markdown(columns, rows))
    else:
        print(f"summarized {len(rows)} runs ({len(errors)} unreadable) -> "
              f"{Path(args.output).with_suffix('')}.md / .csv")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
