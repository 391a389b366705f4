"""Gather several runs' ``results_test.json`` into one comparison table (markdown and CSV).

    python -m util.summarize runs/ --output summary          # summary.md + summary.csv
    python -m util.summarize runs/nih_1_lora runs/nih_1_full/results_test.json

    python -m util.summarize runs/ --output summary --plot   # + summary_forest.png / .svg
    python -m util.summarize runs/ --reference docs/reference_results.csv

RUNS are run folders (searched recursively for results_test.json) or results files. One
row per run, ordered by data set, label fraction, weights and method; columns: mean AUROC,
per-class AUROC (x100) and trainable parameters, as in the paper's comparison. The markdown
adds a LoRA-vs-full table (mean AUROC and difference) where both methods were run.

Intervals: when a run's results carry ``intervals`` (``util.stats.auroc_intervals``), its
mean AUROC's 95% bootstrap interval is shown beside it.

Seeds: runs whose ``config.json`` (beside results_test.json) holds the same arguments except
the seed and the arguments in ``RUN_ONLY_ARGS`` (where and how the run was executed, not
what it computes) form one group; the markdown lists each group of two or more runs with n,
mean +- sample standard deviation of the mean AUROC, and each run's own value and interval.
A run without config.json is a group of its own.

Reference (``--reference CSV``): a CSV with the columns ``setting,method,mean_auroc`` and
optionally ``source``. ``setting`` is ``<dataset>-<percent>-<weights>`` as the presets name
them (``nih-1-mrm``, ``chexpert-10-cxr_mae``; the weights are the checkpoint file's stem,
lower case), ``method`` is ``lora``, ``full`` or ``linear``, ``mean_auroc`` is x100 (80.6); a
row with an empty mean_auroc is skipped (a value not yet filled in). Each matching row of
the summary gets the reference and the difference ours - reference (ours: the mean over a
seed group). docs/reference_results.csv ships the paper's one stated value.
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
from util.reports import x100

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
INTERVAL_COLUMNS = ("mean_auroc_ci_low", "mean_auroc_ci_high")
SEED_COLUMNS = ("seed", "seeds_n", "seeds_mean_auroc", "seeds_sd")
REFERENCE_COLUMNS = ("reference_mean_auroc", "diff_vs_reference")
CONFIG_NAME = "config.json"
# Arguments that say where or how a run was executed, not what it computes: runs that
# differ only in these and the seed are repetitions of one setting.
RUN_ONLY_ARGS = frozenset({
    "seed", "output_dir", "run_name", "log_dir", "overwrite", "device", "resume", "start_epoch",
    "eval", "no_progress", "note", "script", "data_path", "cache", "num_workers", "pin_mem",
    "no_pin_mem", "eval_batch_size", "log_freq", "compile", "dist_eval", "world_size",
    "local_rank", "dist_on_itp", "dist_url", "ci_resamples", "explicit", "eval_name",
    "progress_freq", "compile_backend", "check_args", "cache_used", "notes",
})
# Legend names on the forest plot, by the table's method label.
METHOD_PLOT_LABELS = {"LoRA": "LoRA", "full": "full fine-tuning", "linear": "linear probe"}


class ResultsError(ValueError):
    """A results file that cannot be read or lacks what the summary needs."""


class ReferenceFileError(ValueError):
    """A reference CSV that cannot be read."""


@dataclass
class Run:
    """One results file and its content (and the run's config.json when there is one)."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        """The run folder's name (or the file's stem when it is not results_test.json)."""
        return self.path.parent.name if self.path.name == RESULTS_NAME else self.path.stem

    @property
    def args(self) -> dict[str, Any] | None:
        """The run's arguments (config.json's ``args``), or None when unknown."""
        args = (self.config or {}).get("args")
        return args if isinstance(args, dict) else None

    @property
    def seed(self) -> int | None:
        """The training seed, from the results or the config; None when unknown."""
        seed = self.results.get("seed", (self.args or {}).get("seed"))
        return None if seed is None else int(seed)

    @property
    def setting(self) -> str:
        """``<dataset>-<percent>-<weights>``, the presets' naming (e.g. ``nih-1-mrm``)."""
        r = self.results
        return f"{r['dataset']}-{str(r['data_size']).rstrip('%')}-{str(r['weights']).lower()}"

    def group_key(self) -> tuple:
        """Equal for runs that differ only in seed (and RUN_ONLY_ARGS); unique without a config."""
        r = self.results
        base = (r["dataset"], r["data_size"], r["weights"], r["method"], r.get("model"),
                r.get("lora_rank"))
        if self.args is None:
            return (*base, "run", str(self.path))
        rest = {k: v for k, v in self.args.items() if k not in RUN_ONLY_ARGS}
        return (*base, "args", json.dumps(rest, sort_keys=True, default=str))

    def mean_interval(self) -> tuple[float | None, float | None]:
        """The mean AUROC's bootstrap interval (0-1) from ``results['intervals']``, if any."""
        mean = (self.results.get("intervals") or {}).get("mean") or {}
        return mean.get("ci_low"), mean.get("ci_high")

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
    config = results.get("config") if isinstance(results.get("config"), dict) else None
    config_path = path.parent / CONFIG_NAME
    if config is None and path.name == RESULTS_NAME and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning("%s: unreadable (%s); this run is not grouped with its seeds",
                           config_path, err)
    return Run(path, results, config if isinstance(config, dict) else None)


REFERENCE_REQUIRED = ("setting", "method", "mean_auroc")


def read_reference(path: str | Path) -> dict[tuple[str, str], tuple[float, str]]:
    """{(setting, method): (mean AUROC x100, source)} from a reference CSV (module docstring)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REFERENCE_REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ReferenceFileError(f"{path}: missing column(s) {missing}; expected a header "
                                         "setting,method,mean_auroc[,source]")
            table: dict[tuple[str, str], tuple[float, str]] = {}
            lines: dict[tuple[str, str], int] = {}
            for line, row in enumerate(reader, start=2):
                value = (row.get("mean_auroc") or "").strip()
                if not value:
                    continue  # not filled in yet
                key = ((row["setting"] or "").strip().lower(), (row["method"] or "").strip().lower())
                if not all(key):
                    raise ReferenceFileError(f"{path}, line {line}: setting and method must not be empty")
                try:
                    number = float(value)
                except ValueError:
                    raise ReferenceFileError(f"{path}, line {line}: mean_auroc {value!r} is not a "
                                             "number") from None
                if not 1 < number <= 100:
                    raise ReferenceFileError(f"{path}, line {line}: mean_auroc {value} is not on the "
                                             "x100 scale (write 80.6, not 0.806)")
                if key in table:
                    raise ReferenceFileError(f"{path}, lines {lines[key]} and {line}: {key[0]} / "
                                             f"{key[1]} given twice")
                table[key], lines[key] = (number, (row.get("source") or "").strip()), line
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReferenceFileError(f"{path}: not a readable CSV ({err})") from err
    return table


def class_columns(runs: Sequence[Run]) -> list[str]:
    """Union of the runs' class names, in first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        for name in run.results.get("class_names") or run.results["auroc"]:
            names.setdefault(name, None)
    return list(names)


def seed_groups(runs: Sequence[Run]) -> dict[tuple, list[Run]]:
    """Runs grouped by ``Run.group_key`` (same setting and arguments, any seed), in order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group_key(), []).append(run)
    return groups


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _defined(value: Any) -> bool:
    return value is not None and not math.isnan(float(value))


def summary_rows(runs: Sequence[Run], reference: dict[tuple[str, str], tuple[float, str]] | None = None
                 ) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of the comparison table; metrics x100 with one decimal.

    Interval, seed and reference columns are added only when some run has them.
    """
    runs = sorted(runs, key=Run.sort_key)
    classes = class_columns(runs)  # so the first data set's own class order comes first
    groups = seed_groups(runs)
    group_of = {id(run): key for key, members in groups.items() for run in members}
    has_intervals = any(run.mean_interval()[0] is not None for run in runs)
    has_seeds = any(run.seed is not None for run in runs)
    columns = [*LEADING_COLUMNS, *(INTERVAL_COLUMNS if has_intervals else ()), *classes,
               *TRAILING_COLUMNS, *(SEED_COLUMNS if has_seeds else ()),
               *(REFERENCE_COLUMNS if reference is not None else ())]
    rows = []
    for run in runs:
        r = run.results
        trainable, total = r.get("trainable_params"), r.get("total_params")
        row = {
            "dataset": str(r["dataset"]),
            "data_size": str(r["data_size"]),
            "weights": str(r["weights"]),
            "method": METHOD_LABELS.get(r["method"], str(r["method"])),
            "mean_auroc": x100(r["mean_auroc"]),
            "trainable_params": "" if trainable is None else str(int(trainable)),
            "trainable_pct": (f"{100 * trainable / total:.2f}" if trainable is not None and total
                              else ""),
            "lora_rank": "" if r.get("lora_rank") is None else str(r["lora_rank"]),
            "num_images": "" if r.get("num_images") is None else str(r["num_images"]),
            "run": str(run.path.parent if run.path.name == RESULTS_NAME else run.path),
            "_classes": list(r.get("class_names") or r["auroc"]),
        }
        for name in classes:
            row[name] = x100(r["auroc"].get(name))
        low, high = run.mean_interval()
        row.update(mean_auroc_ci_low=x100(low), mean_auroc_ci_high=x100(high),
                   seed="" if run.seed is None else str(run.seed), setting=run.setting)
        members = [m for m in groups[group_of[id(run)]] if _defined(m.results["mean_auroc"])]
        values = [100 * float(m.results["mean_auroc"]) for m in members]
        mean, sd = _mean_sd(values) if values else (None, None)
        row.update(seeds_n=str(len(values)), seeds_mean_auroc="" if mean is None else f"{mean:.2f}",
                   seeds_sd="" if sd is None else f"{sd:.2f}", _group=group_of[id(run)])
        ref = (reference or {}).get((run.setting, str(r["method"]).lower()))
        row.update(reference_mean_auroc="" if ref is None else f"{ref[0]:.1f}",
                   diff_vs_reference="" if ref is None or mean is None else f"{mean - ref[0]:+.1f}",
                   _reference_source="" if ref is None else ref[1])
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


def _ci(row: dict[str, str]) -> str:
    """'[low, high]' of a row's mean AUROC interval, or 'n/a'."""
    low, high = row.get("mean_auroc_ci_low"), row.get("mean_auroc_ci_high")
    return f"[{low}, {high}]" if low and high else "n/a"


def seed_table(rows: Sequence[dict[str, str]]) -> list[list[str]]:
    """One line per group of two or more runs differing only in seed: n, mean +- sd, each run."""
    groups: dict[Any, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row["_group"], []).append(row)
    table = []
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        runs = "; ".join(f"seed {r['seed'] or '?'}: {r['mean_auroc'] or 'n/a'}"
                         + (f" {_ci(r)}" if _ci(r) != "n/a" else "") for r in members)
        spread = (f"{first['seeds_mean_auroc']} +- {first['seeds_sd']}" if first["seeds_sd"]
                  else first["seeds_mean_auroc"] or "n/a")
        table.append([DATASET_LABELS.get(first["dataset"], first["dataset"]), first["data_size"],
                      first["weights"], first["method"], first["seeds_n"], spread, runs])
    return table


def reference_table(rows: Sequence[dict[str, str]]) -> list[list[str]]:
    """One line per seed group with a reference value: ours (mean over seeds), reference, diff."""
    table, seen = [], set()
    for row in rows:
        if not row.get("reference_mean_auroc") or row["_group"] in seen:
            continue
        seen.add(row["_group"])
        ours = row["seeds_mean_auroc"]
        table.append([row["setting"], row["method"], row["seeds_n"],
                      f"{float(ours):.1f}" if ours else "n/a", row["reference_mean_auroc"],
                      row["diff_vs_reference"] or "n/a", row["_reference_source"]])
    return table


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> str:
    """The summary as markdown: one table per data set, LoRA vs full, seeds, the reference."""
    out = ["# Test AUROC (x100)", ""]
    datasets: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        datasets.setdefault(row["dataset"], []).append(row)
    for dataset, group in datasets.items():
        # This data set's classes in its own order (a union if its runs disagree).
        classes = list(dict.fromkeys(c for r in group for c in r["_classes"]))
        with_ci = any(r.get("mean_auroc_ci_low") for r in group)
        with_seed = any(r.get("seed") for r in group)
        out += [f"## {DATASET_LABELS.get(dataset, dataset)}", ""]
        cells = [[r["data_size"], r["weights"], r["method"], *([r["seed"]] if with_seed else []),
                  f"**{r['mean_auroc'] or 'n/a'}**", *([_ci(r)] if with_ci else []),
                  *[r[c] or "n/a" for c in classes], _params(r), r["run"]] for r in group]
        header = ["data size", "weights", "method", *(["seed"] if with_seed else []), "mean AUROC",
                  *(["95% CI"] if with_ci else []), *classes, "trainable params", "run"]
        out += _md_table(header, cells, right=range(3, len(header) - 1))
        out.append("")
    comparison = lora_vs_full(rows)
    if comparison:
        out += ["## LoRA vs full fine-tuning (mean AUROC)", ""]
        out += _md_table(["data set", "data size", "weights", "LoRA", "full", "LoRA - full"],
                         comparison, right=range(3, 6))
        wins = sum(float(c[-1]) > 0 for c in comparison)
        out += ["", f"LoRA is better in {wins} of {len(comparison)} settings.", ""]
    seeds = seed_table(rows)
    if seeds:
        out += ["## Seeds (runs that differ only in seed)", ""]
        out += _md_table(["data set", "data size", "weights", "method", "n",
                          "mean AUROC, mean +- sd", "each run (95% CI)"], seeds, right=range(4, 6))
        out += ["", "sd: sample standard deviation over the seeds; the intervals are each run's "
                "own test-set bootstrap interval.", ""]
    if any("reference_mean_auroc" in c for c in columns):
        refs = reference_table(rows)
        out += ["## Against the reference (mean AUROC)", ""]
        if refs:
            out += _md_table(["setting", "method", "runs", "ours", "reference", "ours - reference",
                              "source"], refs, right=range(2, 6))
        else:
            out.append("No run matches a setting and method of the reference file.")
        out.append("")
    return "\n".join(out)


def write_csv(path: str | Path, columns: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    """Write the summary rows as CSV (metrics x100, blank where undefined)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def summarize(paths: Sequence[str | Path], output: str | Path | None = None,
              reference: str | Path | None = None, plot: bool = False
              ) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """Read every results file under ``paths``; write ``<output>.md`` / ``.csv`` if given.

    ``reference``: a reference CSV (module docstring) whose values and differences join the
    rows. ``plot``: also write ``<output>_forest.png`` / ``.svg`` (needs ``output``).
    Returns (columns, rows, errors): unreadable results files are reported in ``errors``
    and left out of the table.
    """
    ref = read_reference(reference) if reference is not None else None
    runs, errors = [], []
    for path in find_results(paths):
        try:
            runs.append(read_results(path))
        except ResultsError as err:
            errors.append(str(err))
    columns, rows = summary_rows(runs, ref)
    if output is not None and rows:
        output = Path(output)
        if output.suffix in (".md", ".csv"):
            output = output.with_suffix("")
        write_csv(output.with_suffix(".csv"), columns, rows)
        markdown = to_markdown(columns, rows)
        atomic_write(output.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown + "\n"))
        if plot:
            save_summary_plot(rows, output.with_name(output.name + "_forest"))
    return columns, rows, errors


def save_summary_plot(rows: Sequence[dict[str, str]], path: str | Path) -> tuple[Path, Path]:
    """Forest plot of mean AUROC: one row per setting, one line per method, seeds and reference."""
    from util.reports import ForestPoint, save_forest_plot

    points, means = [], {}
    for row in rows:
        if not row["mean_auroc"]:
            continue
        label = (f"{DATASET_LABELS.get(row['dataset'], row['dataset'])}, {row['data_size']}, "
                 f"{row['weights']}")
        method = METHOD_PLOT_LABELS.get(row["method"], row["method"])
        value = float(row["mean_auroc"])
        low, high = row.get("mean_auroc_ci_low"), row.get("mean_auroc_ci_high")
        points.append(ForestPoint(label, method, value, float(low) if low else None,
                                  float(high) if high else None))
        if int(row["seeds_n"] or 0) > 1:
            means[(label, method, row["_group"])] = float(row["seeds_mean_auroc"])
        if row.get("reference_mean_auroc"):
            means[(label, method, "reference")] = float(row["reference_mean_auroc"])
    for (label, method, group), value in means.items():
        points.append(ForestPoint(label, method, value, kind="reference" if group == "reference"
                                  else "mean"))
    return save_forest_plot(points, path, xlabel="test mean AUROC x100 (95% bootstrap CI per run)",
                            title="Mean AUROC per setting")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the markdown summary, optionally write it; 1 if a file was bad."""
    parser = argparse.ArgumentParser(
        prog="python -m util.summarize",
        description="Gather results_test.json files of several runs into one table.")
    parser.add_argument("runs", nargs="+", metavar="RUNS",
                        help="run folders (searched recursively) or results_test.json files")
    parser.add_argument("--output", default=None,
                        help="write <output>.md and <output>.csv (default: print markdown only)")
    parser.add_argument("--reference", default=None, metavar="CSV",
                        help="published values to lay beside ours: columns setting,method,mean_auroc"
                             "[,source], e.g. docs/reference_results.csv")
    parser.add_argument("--plot", action="store_true",
                        help="also write <output>_forest.png / .svg (needs --output)")
    args = parser.parse_args(argv)
    if args.plot and args.output is None:
        parser.error("--plot needs --output")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        columns, rows, errors = summarize(args.runs, args.output, args.reference, args.plot)
    except (FileNotFoundError, ReferenceFileError) as err:
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
