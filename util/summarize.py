"""Gather several runs' ``results_test.json`` into one comparison table (markdown and CSV).

    python -m util.summarize runs/ --output summary          # summary.md + summary.csv
    python -m util.summarize runs/nih_1_lora runs/nih_1_full/results_test.json
    python -m util.summarize runs/ --output summary --plot   # + summary_forest.png / .svg
    python -m util.summarize runs/ --reference docs/reference_results.csv

RUNS are run folders (searched recursively for results_test.json) or results files. The
tables are described for users in docs/USING_A_MODEL.md ("Comparing runs"); in short:

- Runs: a row per run, in the order of the paper's tables (data set, label fraction,
  weights, method): mean AUROC (with its 95% bootstrap interval when the results carry
  ``intervals``), per-class AUROC (x100) and trainable parameters. Every number is labelled
  with the test set it was scored on, its split file told apart by SHA-256 (results'
  ``test_set``, else config.json's ``settings.split_sha256.test``): one data set on two test
  sets gets two tables, and the CSV names each row's test set.
- Seeds: runs whose config.json records the same ``settings`` but the seed form a group (the
  settings are what makes a run this run, never where or how it executed; the data is in
  them by its split files' SHA-256, and a lossy image cache is other pixels); a run without
  config.json is a group of its own.
- Setting x method: a line per setting (every setting but the method's recipe, the names
  config.json lists under ``recipe``), a column per method as its results name it
  (``method`` and ``method_tag``, e.g. ``lora r4``): so a new method needs nothing here.
- LoRA vs full: each LoRA seed group against each full fine-tuning group of its setting;
  the difference and the count of LoRA wins use the unrounded means.
- Evaluations: results of ``main_finetune_lora.py --eval`` (they hold ``evaluation``) test a
  trained checkpoint again, usually on other data: listed apart, a table per test set marked
  internal, external or unknown, and kept out of the run tables, seeds, LoRA vs full, the
  reference and the plot.

Reference (``--reference CSV``): the columns ``setting,method,mean_auroc`` and optionally
``source``; ``setting`` is ``<dataset>-<percent>-<weights>`` as the presets name them
(``nih-1-mrm``; the weights are the pre-trained file's stem, or its folder's name for a
generic one such as model.safetensors, lower case), ``method`` is ``lora``, ``full`` or
``linear``, ``mean_auroc`` is x100 (80.6) and a row without it is skipped. Each matching
seed group gets the reference and ours - reference.

Outputs: ``--output`` replaces an existing ``<output>.md`` / ``.csv`` (or forest plot) only
with ``--overwrite``; a training run's own files, the files read and symbolic links never.

Exit codes: 0 every run summarized; 1 some results files were left out (unreadable, AUROCs
that are not numbers in [0, 1], or a started run's config.json without results_test.json)
or an output could not be written; 2 usage (a bad flag, a RUNS path that does not exist, a
bad reference file, a refused ``--output``; nothing written).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TypeVar

from util import cli
from util.io import write_csv, write_text
from util.runfolder import CONFIG_NAME, RUN_FORMAT, RunFolderError, read_run_record
from util.reports import check_outputs, x100
from util.cli import ToolError, UsageError

logger = logging.getLogger(__name__)
T = TypeVar("T")

RESULTS_NAME = "results_test.json"
REQUIRED_KEYS = ("dataset", "data_size", "weights", "method", "mean_auroc", "auroc")
# Display order of the paper's tables; anything else sorts after, alphabetically.
DATASET_ORDER = ("nih", "chexpert", "rsna")
DATASET_LABELS = {"nih": "NIH ChestX-ray14", "chexpert": "CheXpert", "rsna": "RSNA Pneumonia"}
SIZE_ORDER = ("1%", "10%", "100%")
METHOD_ORDER = ("lora", "full", "linear")
METHOD_LABELS = {"lora": "LoRA", "full": "full", "linear": "linear"}
LEADING_COLUMNS = ("dataset", "data_size", "weights", "method", "mean_auroc")
TRAILING_COLUMNS = ("trainable_params", "trainable_pct", "lora_rank", "method_tag", "num_images",
                    "test_set", "test_sha256", "run")
CACHE_COLUMNS = ("image_cache",)
INTERVAL_COLUMNS = ("mean_auroc_ci_low", "mean_auroc_ci_high")
SEED_COLUMNS = ("seed", "seeds_n", "seeds_mean_auroc", "seeds_sd")
REFERENCE_COLUMNS = ("reference_mean_auroc", "diff_vs_reference")
# Shown for each side of a LoRA-vs-full line (other differing recipe arguments are added).
RECIPE_SHOWN = ("lora_rank", "optimizer", "lr", "blr", "epochs")
# Legend names on the forest plot, by the table's method label.
METHOD_PLOT_LABELS = {"LoRA": "LoRA", "full": "full fine-tuning", "linear": "linear probe"}


# What a run's config.json and its results' checkpoint both record and no resume changes.
RUN_IDENTITY = ("method", "model", "seed", "dataset", "data_size", "weights_sha256", "split_sha256")


class ResultsError(ToolError, ValueError):
    """A results file that cannot be read or lacks what the summary needs."""


class ReferenceFileError(UsageError, ValueError):
    """A reference CSV that cannot be read (a file the user named: exit 2)."""


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
    def settings(self) -> dict[str, Any] | None:
        """What makes the run this run (config.json's ``settings``), or None when unknown."""
        settings = (self.config or {}).get("settings")
        return settings if isinstance(settings, dict) else None

    @property
    def seed(self) -> int | None:
        """The training seed, from the results or the config; None when unknown."""
        seed = self.results.get("seed", (self.settings or {}).get("seed"))
        return None if seed is None else int(seed)

    @property
    def setting(self) -> str:
        """``<dataset>-<percent>-<weights>``, the presets' naming (e.g. ``nih-1-mrm``)."""
        r = self.results
        return f"{r['dataset']}-{str(r['data_size']).rstrip('%')}-{str(r['weights']).lower()}"

    @property
    def is_evaluation(self) -> bool:
        """A ``--eval`` result: a trained checkpoint tested again (on other data), not a run."""
        return isinstance(self.results.get("evaluation"), dict)

    def test_set(self) -> dict[str, Any]:
        """The test set scored: {name, sha256 (None when unrecorded), images}, from the results'
        ``test_set`` (or the evaluation's), else their split file and config.json's hash."""
        evaluation = self.results.get("evaluation")
        evaluation = evaluation if isinstance(evaluation, dict) else {}
        for recorded in (self.results.get("test_set"), evaluation.get("test_set")):
            if isinstance(recorded, dict):
                sha = recorded.get("sha256")
                return {"name": str(recorded.get("name") or "?"),
                        "sha256": sha if isinstance(sha, str) and sha else None,
                        "images": recorded.get("images")}
        hashes = (self.settings or {}).get("split_sha256")
        sha = hashes.get("test") if isinstance(hashes, dict) and not self.is_evaluation else None
        split_file = evaluation.get("split_file") or self.results.get("split_file")
        name = "/".join(Path(str(split_file)).parts[-2:]) if split_file else "split file not recorded"
        return {"name": name, "sha256": sha if isinstance(sha, str) and sha else None,
                "images": self.results.get("split_images")}

    def test_key(self) -> str:
        """Equal for results on the same test set: its SHA-256, else its recorded name."""
        test = self.test_set()
        return test["sha256"] or f"name:{test['name']}"

    def method_label(self) -> str:
        """The method's name and size as the results record them, e.g. 'lora r4', 'full'."""
        return _with_tag(self.results["method"], self.results.get("method_tag"))

    def setting_args(self) -> dict[str, Any] | None:
        """The settings that say what the run computes, but its seed; None when unknown."""
        return None if self.settings is None else {k: v for k, v in self.settings.items() if k != "seed"}

    def image_cache(self) -> str:
        """'' when every split read the original pixels (files or exact cache), else e.g.
        'lossy 256 px' (with the splits named when not all of them read it)."""
        caches = (self.config or {}).get("data_cache")  # {split: what its images were read from}
        if isinstance(caches, dict) and caches:
            caches = {k: v for k, v in caches.items() if isinstance(v, dict)}
        else:  # the results' own record, of the test split alone
            test = self.results.get("data_cache")
            caches = {"test": test} if isinstance(test, dict) else {}
        lossy = {split: info.get("size") for split, info in caches.items()
                 if info.get("kind") == "lossy"}
        if not lossy:
            return ""
        if len(set(lossy.values())) > 1:
            return ", ".join(f"{split} lossy {size} px" for split, size in lossy.items())
        text = f"lossy {next(iter(lossy.values()))} px"
        return text if set(lossy) == set(caches) else f"{text} ({'/'.join(lossy)})"

    def group_key(self) -> tuple:
        """Equal for runs that differ only in seed; unique without a config."""
        r = self.results
        base = (r["dataset"], r["data_size"], r["weights"], r["method"], r.get("model"),
                r.get("lora_rank"), self.image_cache())
        rest = self.setting_args()
        return (*base, "run", str(self.path)) if rest is None else (*base, "args", _canonical(rest))

    def comparison_key(self) -> tuple:
        """Equal for runs of one setting whatever their method and its recipe."""
        r = self.results
        base = (r["dataset"], r["data_size"], r["weights"], r.get("model"), self.image_cache())
        shared = self.split_args()[0]
        return (*base, "no config", None) if shared is None else (*base, "args", _canonical(shared))

    def split_args(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the setting's arguments but the method's recipe, the recipe's: config.json's
        ``recipe``), or (None, None) when unknown."""
        rest = self.setting_args()
        if rest is None:
            return None, None
        keys = (self.config or {}).get("recipe")
        keys = set(keys) if isinstance(keys, list) else set()
        return {k: v for k, v in rest.items() if k not in keys}, {k: v for k, v in rest.items() if k in keys}

    def recipe(self) -> str:
        """The method's recipe in a few words, e.g. 'r4, sgd, lr 0.05, 100 ep'."""
        args = self.settings or {}
        rank = self.results.get("lora_rank", args.get("lora_rank"))
        parts = [f"r{rank}"] if self.results["method"] == "lora" and rank is not None else []
        if self.settings is None:
            return ", ".join([*parts, "no config.json"])
        lr, blr = args.get("lr"), args.get("blr")
        parts += [str(args.get("optimizer") or ""),
                  f"lr {lr:g}" if isinstance(lr, (int, float)) else
                  f"blr {blr:g}" if isinstance(blr, (int, float)) else "",
                  "" if args.get("epochs") is None else f"{args['epochs']} ep"]
        return ", ".join(p for p in parts if p)

    def mean_interval(self) -> tuple[float | None, float | None]:
        """The mean AUROC's bootstrap interval (0-1) from ``results['intervals']``, if any."""
        mean = (self.results.get("intervals") or {}).get("mean") or {}
        return mean.get("ci_low"), mean.get("ci_high")

    def sort_key(self) -> tuple:
        """Order of the paper's tables: data set, label fraction, weights, method."""
        r = self.results
        return (_rank(r["dataset"], DATASET_ORDER), _rank(r["data_size"], SIZE_ORDER),
                str(r["weights"]), _rank(r["method"], METHOD_ORDER), self.name)


def _canonical(args: Any) -> str:
    """One string per set of arguments (for grouping keys)."""
    return json.dumps(args, sort_keys=True, default=str)


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else _canonical(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _differing(arg_sets: Sequence[dict[str, Any] | None], skip: Sequence[str] = ()) -> list[str]:
    """For each set, 'k=v, ...' of the arguments whose values are not the same in every set
    (what tells apart groups shown under one label); 'no config.json' for None."""
    known = [a for a in arg_sets if a is not None]
    names = sorted({k for a in known for k in a} - set(skip))
    varying = [k for k in names if len({_canonical({"v": a.get(k)}) for a in known}) > 1]
    return ["no config.json" if a is None and len(arg_sets) > 1 else "" if a is None else
            ", ".join(f"{k}={_short(a.get(k))}" for k in varying) for a in arg_sets]


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
    return [same[0] for same in _group_by(found, Path.resolve).values()]  # each file once


def find_incomplete(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders under the folders in ``paths`` that hold a run's config.json but no
    results_test.json: runs still training, stopped, or whose test failed."""
    found: dict[Path, Path] = {}
    continued: dict[Path, Path] = {}  # a stopped run's folder -> the run that continued it
    for item in filter(Path.is_dir, map(Path, paths)):
        for path in sorted(item.rglob(CONFIG_NAME)):
            folder = path.parent
            try:
                config = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                config = None  # a damaged run record is a run's
            resumed = config.get("resumed_from") if isinstance(config, dict) else None
            if isinstance(resumed, str) and resumed:  # the folder of the checkpoint it resumed
                source = Path(resumed).parent.resolve()
                if source != folder.resolve():
                    continued.setdefault(source, folder)
            # Another tool's file of that name is not a run's.
            is_run = config is None or (isinstance(config, dict) and config.get("format") == RUN_FORMAT
                                        and isinstance(config.get("settings"), dict))
            if is_run and not (folder / RESULTS_NAME).exists():
                found.setdefault(folder.resolve(), folder)
    for source, folder in continued.items():
        if source in found:
            logger.info("%s: stopped, and continued in %s (--resume)", found.pop(source), folder)
    return list(found.values())


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
    _check_auroc(path, "'mean_auroc'", results["mean_auroc"])
    for name, value in results["auroc"].items():
        _check_auroc(path, f"'auroc' of {name!r}", value)
    for key, kinds, what in (("intervals", dict, "an object"), ("seed", int, "a whole number"),
                             ("trainable_params", int, "a whole number"),
                             ("total_params", int, "a whole number")):
        value = results.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ResultsError(f"{path}: {key!r} is {_short(json.dumps(value, default=str))}, not {what}")
    intervals = results.get("intervals")
    mean_interval = intervals.get("mean") if isinstance(intervals, dict) else None
    if isinstance(mean_interval, dict):
        for key in ("ci_low", "ci_high"):
            _check_auroc(path, f"the mean's {key!r} in 'intervals'", mean_interval.get(key))
    config = None
    if path.name == RESULTS_NAME and (path.parent / CONFIG_NAME).is_file():
        try:
            config = read_run_record(path.parent)
        except RunFolderError as err:
            logger.warning("%s; this run is not grouped with its seeds", err)
        else:
            _check_same_run(path, results, config)
    return Run(path, results, config)


def _check_same_run(path: Path, results: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a results file whose checkpoint another run trained (a file copied between run
    folders): what no resume can change must be the run's own, as its config.json records it."""
    trained, settings = results.get("training"), config.get("settings")
    if not isinstance(trained, dict) or not isinstance(settings, dict):
        return
    differ = [k for k in RUN_IDENTITY if k in trained and k in settings and trained[k] != settings[k]]
    if differ:
        raise ResultsError(f"{path}: not the results of the run in {path.parent}: the {', '.join(differ)} "
                           f"its checkpoint was trained with differ from that folder's {CONFIG_NAME} "
                           "(a results file copied from another run?); left out")


def _check_auroc(path: Path, key: str, value: Any) -> None:
    """An AUROC as the training script stores it: a number in [0, 1], or null / NaN (undefined)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultsError(f"{path}: {key} is {value!r}, not a number (an AUROC in [0, 1], or "
                           "null when undefined)")
    if not math.isnan(value) and not 0 <= value <= 1:
        raise ResultsError(f"{path}: {key} is {value!r}, outside [0, 1] (AUROCs are stored as "
                           "fractions: 0.806, not 80.6 or 1.7)")


def read_reference(path: str | Path) -> dict[tuple[str, str], tuple[float, str]]:
    """{(setting, method): (mean AUROC x100, source)} from a reference CSV (module docstring)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("setting", "method", "mean_auroc") if c not in (reader.fieldnames or [])]
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


def _group_by(items: Iterable[T], key: Callable[[T], Any]) -> dict[Any, list[T]]:
    """``items`` grouped by ``key``, the groups and their members in first-seen order."""
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _rank(value: Any, order: Sequence[str]) -> tuple[int, str]:
    """Sorts ``value`` by its place in ``order``, anything else after, by name."""
    return (order.index(value) if value in order else len(order), str(value))


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for no value, the sd None for one)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _defined(value: Any) -> bool:
    return value is not None and not math.isnan(float(value))


def _notes(samples: dict[Any, tuple[tuple, dict[str, Any] | None, str]]) -> dict[Any, str]:
    """Per key of ``samples`` ({key: (label, arguments, image cache)}): its lossy cache, and the
    arguments that tell it apart from the other keys of its label (e.g. 'lr=0.1')."""
    notes = {}
    for keys in _group_by(samples, lambda key: samples[key][0]).values():
        for key, text in zip(keys, _differing([samples[k][1] for k in keys])):
            cache = samples[key][2]
            notes[key] = "; ".join(t for t in (f"{cache} cache" if cache else "", text) if t)
    return notes


def _setting_notes(settings: dict[tuple, Any], sample: dict[tuple, dict[str, Any]]) -> dict[tuple, str]:
    """``_notes`` of settings (``Run.comparison_key``s) shown under one label, from a row of each."""
    return _notes({key: (key[:5], sample[key]["_shared"], sample[key]["image_cache"])
                   for key in settings})


def summary_rows(runs: Sequence[Run], reference: dict[tuple[str, str], tuple[float, str]] | None = None
                 ) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the comparison table; metrics x100 with one decimal. Keys starting
    with '_' are not columns: unrounded values (``_value``, ``_seeds_mean``), the grouping
    keys and notes the markdown tables use."""
    runs = sorted(runs, key=Run.sort_key)
    # The union of the runs' classes, so the first data set's own class order comes first.
    classes = list(dict.fromkeys(c for run in runs for c in run.results.get("class_names")
                                 or run.results["auroc"]))
    groups = _group_by(runs, Run.group_key)  # seeds of one setting
    samples = {}  # what tells apart groups of one data set, fraction, weights, method and images
    for key, (first, *_) in groups.items():
        r = first.results
        label = (r["dataset"], r["data_size"], r["weights"], r["method"], first.image_cache())
        samples[key] = (label, first.setting_args(), first.image_cache())
    notes = _notes(samples)
    seeds = {}  # each group's n, mean and sample sd (x100) of its runs' defined mean AUROCs
    for key, members in groups.items():
        values = [100 * float(m.results["mean_auroc"]) for m in members
                  if _defined(m.results["mean_auroc"])]
        mean, sd = _mean_sd(values)
        seeds[key] = {"seeds_n": str(len(values)), "seeds_mean_auroc": "" if mean is None else f"{mean:.2f}",
                      "seeds_sd": "" if sd is None else f"{sd:.2f}", "_group": key, "_seeds_mean": mean}
    rows = []
    for run in runs:
        key = run.group_key()
        row = {**_run_cells(run, classes, notes[key]), **seeds[key]}
        ref = (reference or {}).get((run.setting, str(run.results["method"]).lower()))
        mean = row["_seeds_mean"]  # ours - reference: the seed group's mean against it
        row.update(reference_mean_auroc="" if ref is None else f"{ref[0]:.1f}",
                   diff_vs_reference="" if ref is None or mean is None else f"{mean - ref[0]:+.1f}",
                   _reference_source="" if ref is None else ref[1])
        rows.append(row)
    return _summary_columns(runs, classes, reference is not None), rows


def _summary_columns(runs: Sequence[Run], classes: Sequence[str], with_reference: bool) -> list[str]:
    """The table's columns: the optional ones only when some run has a value for them."""
    has_intervals = any(run.mean_interval()[0] is not None for run in runs)
    has_seeds = any(run.seed is not None for run in runs)
    has_cache = any(run.image_cache() for run in runs)
    return [*LEADING_COLUMNS, *(INTERVAL_COLUMNS if has_intervals else ()), *classes,
            *TRAILING_COLUMNS, *(CACHE_COLUMNS if has_cache else ()),
            *(SEED_COLUMNS if has_seeds else ()), *(REFERENCE_COLUMNS if with_reference else ())]


def _run_cells(run: Run, classes: Sequence[str], note: str) -> dict[str, Any]:
    """One run's own cells (and private keys): its results, recipe and seed group's note."""
    r = run.results
    trainable, total = r.get("trainable_params"), r.get("total_params")
    row = {
        "dataset": str(r["dataset"]),
        "data_size": str(r["data_size"]),
        "weights": str(r["weights"]),
        "method": METHOD_LABELS.get(r["method"], str(r["method"])),
        "mean_auroc": x100(r["mean_auroc"]),
        "trainable_params": "" if trainable is None else str(int(trainable)),
        "trainable_pct": f"{100 * trainable / total:.2f}" if trainable is not None and total else "",
        "lora_rank": "" if r.get("lora_rank") is None else str(r["lora_rank"]),
        "method_tag": str(r.get("method_tag") or ""),
        "num_images": _num_images(r),
        "test_set": run.test_set()["name"],
        "test_sha256": run.test_set()["sha256"] or "",
        "_test_key": run.test_key(),
        "_test_label": test_set_label(run.test_set()),
        "_method_label": run.method_label(),
        "run": str(run.path.parent if run.path.name == RESULTS_NAME else run.path),
        "image_cache": run.image_cache(),
        "_classes": list(r.get("class_names") or r["auroc"]),
        "_value": 100 * float(r["mean_auroc"]) if _defined(r["mean_auroc"]) else None,
        "_model": str(r.get("model") or ""),
        "_pair": run.comparison_key(),
        "_shared": run.split_args()[0],
        "_recipe_args": run.split_args()[1],
        "_recipe": run.recipe(),
        "_note": note,
    }
    row.update({name: x100(r["auroc"].get(name)) for name in classes})
    low, high = run.mean_interval()
    row.update(mean_auroc_ci_low=x100(low), mean_auroc_ci_high=x100(high),
               seed="" if run.seed is None else str(run.seed), setting=run.setting)
    return row


def test_set_label(test: dict[str, Any]) -> str:
    """'<name> (sha256 <first 8>, <N> images)' of a ``Run.test_set``."""
    parts = [f"sha256 {test['sha256'][:8]}" if test["sha256"] else "no SHA-256 recorded"]
    if test.get("images") is not None:
        parts.append(f"{int(test['images']):,} images")
    return f"{test['name']} ({', '.join(parts)})"


def _num_images(results: dict[str, Any]) -> str:
    """The images scored; with --skip_bad fewer than the split lists, and the cell says so."""
    if results.get("num_images") is None:
        return ""
    if results.get("skipped") and results.get("split_images") is not None:
        return f"{results['num_images']} of {results['split_images']}"
    return str(results["num_images"])


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]], right: range) -> list[str]:
    """A markdown table; the columns at indices in ``right`` are right-aligned."""
    align = ["---:" if i in right else "---" for i in range(len(columns))]
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def _params(row: dict[str, str]) -> str:
    if not row["trainable_params"]:
        return ""
    text = f"{int(row['trainable_params']):,}"
    return f"{text} ({row['trainable_pct']}%)" if row["trainable_pct"] else text


def _recipes(groups: Sequence[list[dict[str, Any]]]) -> list[str]:
    """'<recipe> (n=<runs>)' per seed group of one method, with any other recipe argument
    that tells the groups apart."""
    extra = _differing([g[0]["_recipe_args"] for g in groups], skip=RECIPE_SHOWN)
    return [f"{g[0]['_recipe']}{f', {more}' if more and g[0]['_recipe_args'] else ''} (n={len(g)})"
            for g, more in zip(groups, extra)]


def lora_vs_full(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """LoRA against full fine-tuning, a line per pair of seed groups of one setting
    (``Run.comparison_key``), so different ranks, lrs or epochs are never averaged together.
    Values are x100 and unrounded: the mean over a group's runs; ``diff`` is LoRA - full."""
    settings: dict[tuple, dict[str, dict[Any, list[dict[str, Any]]]]] = {}
    for row in rows:
        if row["_value"] is None or row["method"] not in ("LoRA", "full"):
            continue
        by_method = settings.setdefault(row["_pair"], {})
        by_method.setdefault(row["method"], {}).setdefault(row["_group"], []).append(row)
    settings = {k: v for k, v in settings.items() if "LoRA" in v and "full" in v}
    # What tells apart settings shown under one label (e.g. another --input_size).
    notes = _setting_notes(settings, {k: next(iter(v["LoRA"].values()))[0] for k, v in settings.items()})
    table = []
    for key, by_method in settings.items():
        lora_groups, full_groups = list(by_method["LoRA"].values()), list(by_method["full"].values())
        for lora_group, lora_label in zip(lora_groups, _recipes(lora_groups)):
            for full_group, full_label in zip(full_groups, _recipes(full_groups)):
                lo = sum(r["_value"] for r in lora_group) / len(lora_group)
                fu = sum(r["_value"] for r in full_group) / len(full_group)
                first = lora_group[0]
                table.append({"dataset": first["dataset"], "data_size": first["data_size"],
                              "weights": first["weights"], "model": first["_model"],
                              "lora": lora_label, "full": full_label, "lora_auroc": lo,
                              "full_auroc": fu, "diff": lo - fu, "note": notes[key]})
    return table


def _ci(row: dict[str, str]) -> str:
    """'[low, high]' of a row's mean AUROC interval, or 'n/a'."""
    low, high = row.get("mean_auroc_ci_low"), row.get("mean_auroc_ci_high")
    return f"[{low}, {high}]" if low and high else "n/a"


def _seeds_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The seeds table: a line per group of two or more runs differing only in seed (n, mean
    +- sd, each run and the group's note); nothing when there is none."""
    table = []
    for members in _group_by(rows, itemgetter("_group")).values():
        if len(members) < 2:
            continue
        first = members[0]
        runs = "; ".join(f"seed {r['seed'] or '?'}: {r['mean_auroc'] or 'n/a'}"
                         + (f" {_ci(r)}" if _ci(r) != "n/a" else "") for r in members)
        spread = (f"{first['seeds_mean_auroc']} +- {first['seeds_sd']}" if first["seeds_sd"]
                  else first["seeds_mean_auroc"] or "n/a")
        table.append([DATASET_LABELS.get(first["dataset"], first["dataset"]), first["data_size"],
                      first["weights"], first["method"], first["seeds_n"], spread, runs,
                      first["_note"]])
    if not table:
        return []
    header, cells = _with_note(["data set", "data size", "weights", "method", "n",
                                "mean AUROC, mean +- sd", "each run (95% CI)"], table)
    return ["## Seeds (runs that differ only in seed)", "",
            *_md_table(header, cells, right=range(4, 6)), "",
            ("sd: sample standard deviation over the seeds; the intervals are each run's "
             "own test-set bootstrap interval."), ""]


def _reference_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Our seed groups against the reference: a line per group with a reference value (ours:
    the mean over seeds, the reference, the difference), or a line saying none matched."""
    table, seen = [], set()
    for row in rows:
        if not row.get("reference_mean_auroc") or row["_group"] in seen:
            continue
        seen.add(row["_group"])
        ours = row["_seeds_mean"]  # unrounded: rounding the 2-decimal column again could differ
        table.append([row["setting"], row["method"], row["seeds_n"],
                      "n/a" if ours is None else f"{ours:.1f}", row["reference_mean_auroc"],
                      row["diff_vs_reference"] or "n/a", row["_reference_source"], row["_note"]])
    out = ["## Against the reference (mean AUROC)", ""]
    if table:
        header, cells = _with_note(["setting", "method", "runs", "ours", "reference",
                                    "ours - reference", "source"], table)
        out += _md_table(header, cells, right=range(2, 6))
    else:
        out.append("No run matches a setting and method of the reference file.")
    return [*out, ""]


def evaluation_rows(evaluations: Sequence[Run]) -> list[dict[str, str]]:
    """One row per ``--eval`` result: the checkpoint tested, on which data, its mean AUROC."""
    rows = []
    for run in sorted(evaluations, key=lambda e: (str(e.results.get("checkpoint")), str(e.path))):
        r, info = run.results, run.results["evaluation"]
        low, high = run.mean_interval()
        data = str(info.get("name") or "?")
        if info.get("data_path"):
            data += f" ({info['data_path']})"
        trained = (f"{r['dataset']} {r['data_size']} {r['weights']} "
                   f"{_with_tag(METHOD_LABELS.get(r['method'], r['method']), r.get('method_tag'))}"
                   + ("" if run.seed is None else f", seed {run.seed}"))
        scope = {True: "external", False: "internal"}.get(info.get("external"), "unknown")
        class_map = info.get("class_map") if isinstance(info.get("class_map"), dict) else {}
        pairs = class_map.get("pairs") if isinstance(class_map.get("pairs"), dict) else {}
        classes = ", ".join(d if d == c else f"{d} = {c}" for d, c in pairs.items()) \
            if class_map.get("rule") not in (None, "same classes") else "all"
        rows.append({"checkpoint": str(r.get("checkpoint") or "?"), "data": data,
                     "split": str(r.get("split") or "test"), "trained_as": trained,
                     "scope": scope, "classes": classes,
                     "test_set": test_set_label(run.test_set()), "_test_key": run.test_key(),
                     "mean_auroc": x100(r["mean_auroc"]), "mean_auroc_ci_low": x100(low),
                     "mean_auroc_ci_high": x100(high),
                     "num_images": "" if r.get("num_images") is None else str(r["num_images"]),
                     "folder": str(run.path.parent if run.path.name == RESULTS_NAME else run.path)})
    return rows


def _with_tag(method: str, tag: Any) -> str:
    """A method's label with its size tag: 'LoRA r4-plus16', 'AdaptFormer d64', 'full'."""
    return f"{method} {tag}" if tag else str(method)


def _with_note(header: list[str], cells: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The table with its last cell as a 'note' column, or without it when every note is empty."""
    if any(c[-1] for c in cells):
        return header + ["note"], cells
    return header, [c[:-1] for c in cells]


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]],
                evaluations: Sequence[dict[str, str]] = ()) -> str:
    """The summary as markdown: one table per data set, LoRA vs full, seeds, the reference,
    and the evaluations (``evaluation_rows``) apart."""
    out = ["# Test AUROC (x100)", ""]
    for (dataset, _), group in _group_by(rows, itemgetter("dataset", "_test_key")).items():
        out += _dataset_section(dataset, group)
    out += _setting_method_section(setting_method_table(rows))
    out += _lora_vs_full_section(lora_vs_full(rows))
    out += _seeds_section(rows)
    if any("reference_mean_auroc" in c for c in columns):
        out += _reference_section(rows)
    if evaluations:
        out += _evaluations_section(evaluations)
    return "\n".join(out)


def _dataset_section(dataset: str, group: Sequence[dict[str, Any]]) -> list[str]:
    """One data set's table: a line per run, and the seed, interval and image columns only
    when some run has them."""
    # This data set's classes in its own order (a union if its runs disagree).
    classes = list(dict.fromkeys(c for r in group for c in r["_classes"]))
    with_ci = any(r.get("mean_auroc_ci_low") for r in group)
    with_seed = any(r.get("seed") for r in group)
    with_cache = any(r.get("image_cache") for r in group)
    cells = [[r["data_size"], r["weights"], _with_tag(r["method"], r["method_tag"]),
              *([r["seed"]] if with_seed else []),
              f"**{r['mean_auroc'] or 'n/a'}**", *([_ci(r)] if with_ci else []),
              *[r[c] or "n/a" for c in classes], _params(r),
              *([r["image_cache"] or "original"] if with_cache else []), r["run"]]
             for r in group]
    header = ["data size", "weights", "method", *(["seed"] if with_seed else []), "mean AUROC",
              *(["95% CI"] if with_ci else []), *classes, "trainable params",
              *(["images"] if with_cache else []), "run"]
    return [f"## {DATASET_LABELS.get(dataset, dataset)}, test set {group[0]['_test_label']}", "",
            *_md_table(header, cells, right=range(3, len(header) - 1 - with_cache)), ""]


def setting_method_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(method columns, lines) of the setting x method table: a line per ``Run.comparison_key``,
    a column per ``Run.method_label`` (in METHOD_ORDER, then by name), a cell the list of the
    method's seed groups there: {mean, sd (x100, unrounded), n, trainable_pct, variant: the
    recipe arguments that tell apart two groups of one cell}."""
    settings: dict[tuple, dict[Any, list[dict[str, Any]]]] = {}
    for row in rows:
        settings.setdefault(row["_pair"], {}).setdefault(row["_group"], []).append(row)
    notes = _setting_notes(settings, {k: next(iter(v.values()))[0] for k, v in settings.items()})
    lines = []
    for key, groups in settings.items():
        cells: dict[str, list[dict[str, Any]]] = {}
        by_label = _group_by(groups.values(), lambda members: members[0]["_method_label"])
        for label, same in by_label.items():
            variants = _differing([m[0]["_recipe_args"] for m in same]) if len(same) > 1 else [""]
            for members, variant in zip(same, variants):
                values = [r["_value"] for r in members if r["_value"] is not None]
                mean, sd = _mean_sd(values)
                pcts = sorted({r["trainable_pct"] for r in members if r["trainable_pct"]})
                cells.setdefault(label, []).append({"mean": mean, "sd": sd, "n": len(values),
                                                    "trainable_pct": "/".join(pcts),
                                                    "variant": variant})
        first = next(iter(groups.values()))[0]
        lines.append({"dataset": first["dataset"], "data_size": first["data_size"],
                      "weights": first["weights"], "test_set": first["_test_label"],
                      "cells": cells, "note": notes[key]})
    # Columns by method (the label's first word) in METHOD_ORDER, then by label.
    columns = {label for line in lines for label in line["cells"]}
    return sorted(columns, key=lambda c: (_rank(c.split(" ")[0], METHOD_ORDER)[0], c)), lines


def _method_cell(groups: Sequence[dict[str, Any]] | None) -> str:
    """'mean +- sd (n=N, P%)' x100 of each seed group of one cell, '; ' between them (each
    with what tells it apart); '' for a method not run there."""
    texts = []
    for cell in groups or ():
        if cell["mean"] is None:
            texts.append("n/a")
            continue
        spread = f"{cell['mean']:.1f}" + (f" +- {cell['sd']:.1f}" if cell["sd"] is not None else "")
        extra = ([cell["variant"]] if cell["variant"] else []) + [f"n={cell['n']}"] \
            + ([f"{cell['trainable_pct']}%"] if cell["trainable_pct"] else [])
        texts.append(f"{spread} ({', '.join(extra)})")
    return "; ".join(texts)


def _setting_method_section(table: tuple[list[str], list[dict[str, Any]]]) -> list[str]:
    """The setting x method table; nothing when no setting has two methods or seeds."""
    columns, lines = table
    if not lines or (len(columns) < 2 and all(g["n"] < 2 for ln in lines
                                              for cell in ln["cells"].values() for g in cell)):
        return []
    header, cells = _with_note(
        ["data set", "data size", "weights", *columns, "test set"],
        [[DATASET_LABELS.get(ln["dataset"], ln["dataset"]), ln["data_size"], ln["weights"],
          *[_method_cell(ln["cells"].get(c)) for c in columns], ln["test_set"], ln["note"]]
         for ln in lines])
    return ["## Setting x method (mean AUROC over seeds)", "",
            *_md_table(header, cells, right=range(3, 3 + len(columns))), "",
            ("Each cell: mean +- sample sd over the seeds of one method's runs (n: runs), and "
             "the share of trainable parameters the results record. A line is one setting: "
             "the same data, test set, weights, model and arguments but the method's recipe."), ""]


def _lora_vs_full_section(comparison: Sequence[dict[str, Any]]) -> list[str]:
    """The LoRA-vs-full table (``lora_vs_full``) and the count of LoRA wins; nothing without pairs."""
    if not comparison:
        return []
    header, cells = _with_note(
        ["data set", "data size", "weights", "model", "LoRA runs", "full runs", "LoRA", "full",
         "LoRA - full"],
        [[c["dataset"], c["data_size"], c["weights"], c["model"] or "n/a", c["lora"], c["full"],
          f"{c['lora_auroc']:.1f}", f"{c['full_auroc']:.1f}", f"{c['diff']:+.1f}", c["note"]]
         for c in comparison])
    wins = sum(c["diff"] > 0 for c in comparison)
    return ["## LoRA vs full fine-tuning (mean AUROC)", "",
            *_md_table(header, cells, right=range(6, 9)), "",
            (f"LoRA is better in {wins} of {len(comparison)} comparisons. Each line "
             "sets a group of LoRA runs against a group of full fine-tuning runs with the "
             "same data, weights, model and other arguments; only the method's recipe "
             "differs (its rank, optimizer, lr and epochs are in the runs columns; n: runs "
             "averaged, e.g. seeds). Differences and the count use the unrounded means."), ""]


def _evaluations_section(evaluations: Sequence[dict[str, str]]) -> list[str]:
    """The ``--eval`` results (``evaluation_rows``), kept apart from the runs: a table per
    test set, each headed by its name and SHA-256."""
    out = ["## Evaluations of trained runs (--eval; not in the tables above; test: internal "
           "for the run's own data set, external for another)", ""]
    for group in _group_by(evaluations, itemgetter("_test_key")).values():
        with_ci = any(e["mean_auroc_ci_low"] for e in group)
        cells = [[e["checkpoint"], e["data"], e["split"], e["trained_as"], e["scope"],
                  e["classes"], e["mean_auroc"] or "n/a", *([_ci(e)] if with_ci else []),
                  e["num_images"], e["folder"]] for e in group]
        header = ["checkpoint", "tested on", "split", "trained as", "test", "classes scored",
                  "mean AUROC", *(["95% CI"] if with_ci else []), "images", "folder"]
        out += [f"### Test set {group[0]['test_set']}", "",
                *_md_table(header, cells, right=range(6, 8 + with_ci)), ""]
    return out


class Summary(NamedTuple):
    """What ``summarize`` gathered: the run table, what was left out, the evaluations."""

    columns: list[str]
    rows: list[dict[str, Any]]       # one per run (``summary_rows``)
    errors: list[str]                # unreadable results files, incomplete runs
    evaluations: list[dict[str, str]]  # --eval results (``evaluation_rows``), not runs


def output_paths(output: str | Path, plot: bool = False) -> list[Path]:
    """The files ``summarize`` writes for ``--output``: ``<output>.csv``, ``.md`` and, with
    ``plot``, ``<output>_forest.png`` / ``.svg`` (a ``.md`` / ``.csv`` suffix is dropped)."""
    output = Path(output)
    if output.suffix in (".md", ".csv"):
        output = output.with_suffix("")
    files = [output.with_suffix(".csv"), output.with_suffix(".md")]
    if plot:
        forest = output.with_name(output.name + "_forest")
        files += [forest.with_suffix(".png"), forest.with_suffix(".svg")]
    return files


def summarize(paths: Sequence[str | Path], output: str | Path | None = None,
              reference: str | Path | None = None, plot: bool = False,
              overwrite: bool = False) -> Summary:
    """Read every results file under ``paths``; write ``output_paths(output, plot)`` if given.
    Unreadable results files and started runs without results are reported in ``errors``; a
    refused output (module docstring) raises ``UsageError`` before anything is written."""
    ref = read_reference(reference) if reference is not None else None
    found = find_results(paths)
    if output is not None:
        read = [*found, *(p.parent / CONFIG_NAME for p in found),
                *([Path(reference)] if reference is not None else [])]
        check_outputs("--output", output_paths(output, plot), overwrite=overwrite, inputs=read)
    runs, evaluations, errors = [], [], []
    for path in found:
        try:
            run = read_results(path)
        except ResultsError as err:
            errors.append(str(err))
            continue
        (evaluations if run.is_evaluation else runs).append(run)
    for folder in find_incomplete(paths):
        errors.append(f"{folder}: a started run ({CONFIG_NAME}) without {RESULTS_NAME}: still "
                      "training, stopped, or its test failed; left out")
    for run in runs:
        if run.results.get("skipped"):
            logger.warning("%s: scored on %s of the %s images of its test split (%d unreadable, "
                           "skipped with --skip_bad): not comparable with runs on the whole split",
                           run.path.parent, run.results.get("num_images"),
                           run.results.get("split_images", "?"), len(run.results["skipped"]))
    if evaluations:
        logger.info("%d evaluations (--eval results of trained runs, e.g. %s) are listed apart, "
                    "not as runs or seeds", len(evaluations), evaluations[0].path.parent)
    for members in _group_by(runs, Run.group_key).values():
        seeded = [run for run in members if run.seed is not None]
        for seed, same in _group_by(seeded, attrgetter("seed")).items():
            if len(same) > 1:  # a copied run folder, or one run tested twice: counted twice
                logger.warning("seed %s appears %d times among the seeds of one setting (%s): the "
                               "mean and sd count each; remove the copies if they are one run",
                               seed, len(same), ", ".join(str(r.path.parent) for r in same))
    columns, rows = summary_rows(runs, ref)
    listed = evaluation_rows(evaluations)
    if output is not None and (rows or listed):
        csv_path, md_path, *forest = output_paths(output, plot)
        write_csv(csv_path, columns, ([row.get(c, "") for c in columns] for row in rows))
        write_text(md_path, to_markdown(columns, rows, listed) + "\n")
        if plot:
            save_summary_plot(rows, forest[0].with_suffix(""))
    return Summary(columns, rows, errors, listed)


def save_summary_plot(rows: Sequence[dict[str, str]], path: str | Path) -> tuple[Path, Path]:
    """Forest plot of mean AUROC: one row per setting, one line per method, seeds and reference."""
    from util.reports import ForestPoint, save_forest_plot

    points, means = [], {}
    for row in rows:
        if not row["mean_auroc"]:
            continue
        label = (f"{DATASET_LABELS.get(row['dataset'], row['dataset'])}, {row['data_size']}, "
                 f"{row['weights']}" + (f", {row['image_cache']}" if row["image_cache"] else ""))
        method = METHOD_PLOT_LABELS.get(row["method"], row["method"])
        low, high = row.get("mean_auroc_ci_low"), row.get("mean_auroc_ci_high")
        points.append(ForestPoint(label, method, float(row["mean_auroc"]), float(low) if low else None,
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


PROG = "python -m util.summarize"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (whole names only)."""
    parser = cli.Parser(
        prog=PROG,
        description="Gather results_test.json files of several runs into one table.",
        epilog="Exit codes: 0 every run summarized; 1 some results files were left out or an "
               "output could not be written; 2 usage error, nothing written.")
    parser.add_argument("runs", nargs="+", metavar="RUNS",
                        help="run folders (searched recursively) or results_test.json files")
    parser.add_argument("--output", default=None,
                        help="write <output>.md and <output>.csv (default: print markdown only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing <output>.md / .csv (and forest plots)")
    parser.add_argument("--reference", default=None, metavar="CSV",
                        help="published values to lay beside ours: columns setting,method,mean_auroc"
                             "[,source], e.g. docs/reference_results.csv")
    parser.add_argument("--plot", action="store_true",
                        help="also write <output>_forest.png / .svg (needs --output)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the markdown summary, or write it; 1 if a results file was bad or a started run
    has no results. Usage errors and write failures are raised."""
    try:
        summary = summarize(args.runs, args.output, args.reference, args.plot, args.overwrite)
    except FileNotFoundError as err:  # a RUNS path that does not exist
        raise UsageError(str(err)) from None
    for err in summary.errors:
        logger.error("%s", err)
    if not summary.rows and not summary.evaluations:
        logger.error("no usable %s among %s", RESULTS_NAME, " ".join(args.runs))
        return 1
    if args.output is None:
        print(to_markdown(summary.columns, summary.rows, summary.evaluations))
    else:
        evaluations = f" and {len(summary.evaluations)} evaluations" if summary.evaluations else ""
        csv_path, md_path, *_ = output_paths(args.output)
        print(f"summarized {len(summary.rows)} runs{evaluations} ({len(summary.errors)} left out: "
              f"unreadable or incomplete) -> {md_path} / {csv_path.name}")
    return 1 if summary.errors else 0


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the flags cannot say alone (a bad combination exits 2 with one line)."""
    if args.plot and args.output is None:
        parser.error("--plot needs --output")


def main(argv: Sequence[str] | None = None) -> int:
    """The command inside its error boundary (``util.cli.main``): returns the exit code."""
    return cli.main(build_parser, run, argv, prog=PROG, check=check_args)


if __name__ == "__main__":
    sys.exit(main())
