"""Testing a trained checkpoint: its scores with intervals, and the reports a run keeps.

    results = test_checkpoint("output_dir/<run>/checkpoint-best", test_set, RunFolder(out),
                              device=torch.device("cpu"))

The final test of a training run and ``--eval`` both call ``test_checkpoint``; it writes
``results_<split>.json``, the AUROC tables, per-image predictions and ROC curves into the
folder, each recorded as the folder's own file; and the calibration (ECE, Brier before /
after, ``reliability_<split>.png``) and operating-point tables. The final test passes the
validation split as ``calibration_set``: the temperature and the thresholds are fitted on
it and stored in the checkpoint's JSON, which ``--eval`` and ``predict.py`` then apply.

A data set whose classes differ from the checkpoint's (external validation) is scored on
the classes the two share (``datasets.class_map``); with patient metadata (``--metadata``,
or found beside the split files: ``datasets.metadata``) the test adds AUROC per subgroup
(``util.subgroups``) in ``subgroups_<split>.{md,csv,png,svg}``.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

import checkpoints as ckpt
import datasets
import lora
import methods
import weights
from datasets.metadata import resolve_metadata
from engine_finetune import evaluate
from util.cli import UsageError
from util.io import json_safe, remove_empty
from util.misc import DistInfo, say
from util.precision import precision_name
from util.runfolder import RunFolder, checkpoint_folder, probe_writable, report_names
from util.subgroups import write_subgroup_report

logger = logging.getLogger("main")

# The run settings (flags of main_finetune_lora.py) that --eval reads: the data, the precision
# and the batch. The model and its recipe are the checkpoint's; the bootstrap's seed is fixed
# (runs of different training seeds share the resamples), so --seed changes nothing either.
EVAL_SETTINGS = ("amp", "batch_size", "dataset", "demo", "dicom_scaling", "skip_bad")


def unused_settings(given: Sequence[str]) -> list[str]:
    """A note naming the run settings ``given`` to --eval that the checkpoint decides."""
    fixed = [k for k in given if k not in EVAL_SETTINGS]
    return [f"--eval tests the checkpoint as it was trained: {', '.join('--' + k for k in fixed)} "
            f"ha{'ve' if len(fixed) > 1 else 's'} no effect"] if fixed else []


def default_eval_name(data_path: str | Path, split_file: str | Path) -> str:
    """An evaluation folder's name: the data folder, the split folder if elsewhere, the split file."""
    data, split = Path(data_path).resolve(), Path(split_file).resolve()
    parts = [data.name] + ([split.parent.name] if split.parent != data else []) + [split.stem]
    return "-".join(parts)


class _SharedOutputs(nn.Module):
    """A model whose outputs are the checkpoint's columns of the classes a data set shares."""

    def __init__(self, model: nn.Module, columns: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.columns.to(x.device))


def shared_classes(model: nn.Module, config, dataset: datasets.ChestXrayDataset,
                   class_map: Any = None) -> tuple[nn.Module, datasets.ChestXrayDataset, Any]:
    """The model and data set scored on the classes they share (``datasets.class_map``), and
    the match: unchanged when the classes are the checkpoint's. ``class_map``: a table file
    or ``ClassMap`` (default: the shipped one). Raises ClassMapError when none is shared."""
    from datasets.class_map import ClassMap, match_classes, read_class_map

    same = list(dataset.class_names) == list(config.class_names)
    # The table is read only when needed: a run's own test never depends on it.
    table = class_map if isinstance(class_map, ClassMap) or same else read_class_map(class_map)
    match = match_classes(config.class_names, config.dataset, list(dataset.class_names),
                          dataset.kind, table)
    if not match.mapped:
        return model, dataset, match
    say(f"external test: scoring the {len(match.pairs)} classes {dataset.split_file} shares with "
        f"the checkpoint ({match.rule}: " + ", ".join(d if d == c else f"{d} = {c}" for d, c in match.pairs)
        + "); left out: checkpoint " + (", ".join(match.left_out_checkpoint) or "none")
        + "; data set " + (", ".join(match.left_out_dataset) or "none"))
    columns = [list(dataset.class_names).index(d) for d, _ in match.pairs]
    view = copy.copy(dataset)  # the same images and transform, the shared label columns
    view.targets = dataset.targets[:, columns]
    view.class_names = [d for d, _ in match.pairs]
    outputs = [config.class_names.index(c) for _, c in match.pairs]
    return _SharedOutputs(model, outputs), view, match


def add_test_set(results: dict, config, dataset: datasets.ChestXrayDataset, match: Any,
                 eval_info: dict | None) -> None:
    """results' test_set (split file, name, SHA-256, size) and method_tag, and for an
    evaluation (``eval_info``, or classes mapped to another data set's) its ``evaluation``
    entry: external or not, test set, class map.

    External: another data set's classes or kind, or a split file other than the training
    run's test split (by SHA-256); None when the checkpoint records no test split to compare.
    """
    split_file = Path(dataset.split_file)
    test_set = {"name": f"{split_file.parent.name}/{split_file.name}", "split_file": str(split_file),
                "sha256": ckpt.file_sha256(split_file), "images": len(dataset) + len(dataset.skipped),
                "kind": dataset.kind}
    results["test_set"] = test_set
    results["method_tag"] = methods.get(config.method).tag(config.method_settings)
    if not eval_info and not match.mapped:
        return
    own = ((config.extras.get("run") or {}).get("split_sha256") or {}).get("test")
    if match.mapped or (config.dataset is not None and config.dataset != dataset.kind):
        external = True
    else:
        external = None if own is None else own != test_set["sha256"]
    results["evaluation"] = {**(eval_info or {}), "external": external, "test_set": test_set,
                             "class_map": match.record()}


def test_checkpoint(checkpoint: str | Path, dataset: datasets.ChestXrayDataset, folder: RunFolder, *,
                    device: torch.device, dist_info: DistInfo = DistInfo(),
                    amp_dtype: torch.dtype | None = None, split: str = "test",
                    batch_size: int = 256, num_workers: int = 0, pin_memory: bool = False,
                    seed: int = 0, ci_resamples: int = 1000, pretrained: str | None = None,
                    allow_unsafe_pickle: bool = False, progress: bool = True,
                    eval_info: dict | None = None, metadata: Any = None, class_map: Any = None,
                    calibration_set: datasets.ChestXrayDataset | None = None,
                    calibration_method: str = "temperature") -> dict:
    """Evaluate a saved checkpoint on ``dataset`` (merged adapters: the cost of a plain ViT)
    and write every report into ``folder``. The results carry the training run's settings
    from the checkpoint's JSON; other processes than the main one return {}.

    A data set of other classes is scored on the classes it shares with the checkpoint
    (``class_map``: a table file, default the shipped ``datasets/class_map.csv``).
    ``metadata`` (a CSV, several, 'dicom', 'none', or records; None: the documented files
    beside the data when there) adds the subgroup report.
    With ``calibration_set`` (the run's validation split, in its final test) the same model
    predicts it first; the temperature and the operating-point thresholds are fitted on it
    (``calibration_method``: ``util.calibration.METHODS``) and stored in the checkpoint's
    JSON (``checkpoints.store_calibration``: ``folder`` is then the checkpoint's run
    folder). Without it, the calibration stored with the checkpoint, if any, is applied.
    Either way the test report gives ECE and Brier before and after calibration and the
    test scores at each stored threshold; never is anything fitted on ``dataset``.
    """
    model, config = ckpt.load_trained(checkpoint, pretrained=pretrained, device=device,
                                      allow_unsafe_pickle=allow_unsafe_pickle)
    methods.get(config.method).merge(model)
    trained = model
    model, dataset, match = shared_classes(model, config, dataset, class_map)
    # Before the forward pass: a bad metadata file fails now, not after the test.
    meta = resolve_metadata(metadata, split_file=dataset.split_file, paths=dataset.paths,
                            files=dataset.files, kind=dataset.kind)
    loader_args = {"batch_size": batch_size, "seed": seed, "num_workers": num_workers,
                   "pin_memory": pin_memory}
    calibration_stats = None
    if calibration_set is not None:
        if list(calibration_set.class_names) != config.class_names:
            raise UsageError(f"{checkpoint} was trained on classes {config.class_names}, but the "
                             f"calibration split {calibration_set.split_file} has "
                             f"{calibration_set.class_names}")
        calibration_stats = evaluate(
            trained, datasets.build_loader(calibration_set, dist_info, train=False, **loader_args),
            device, calibration_set.class_names, amp_dtype,
            progress=progress and dist_info.is_main, warn_undefined=False)
    loader = datasets.build_loader(dataset, dist_info, train=False, **loader_args)
    stats = evaluate(model, loader, device, dataset.class_names, amp_dtype,
                     progress=progress and dist_info.is_main)
    if not dist_info.is_main:
        return {}
    # load_trained restores the trained set: the counts are the run's
    results = test_results(checkpoint, config, dataset, stats, split=split,
                           precision=precision_name(amp_dtype), params=lora.count_parameters(trained))
    if ci_resamples > 0:
        from util.stats import auroc_intervals

        # A fixed seed, not the run's: runs of different training seeds share the resamples.
        results["intervals"] = auroc_intervals(stats["targets"], stats["probs"],
                                               list(dataset.class_names),
                                               resamples=ci_resamples, seed=0)
    add_test_set(results, config, dataset, match, eval_info)
    if meta is not None:
        write_subgroup_report(results, stats, dataset.paths, list(dataset.class_names), folder,
                              split, meta, ci_resamples)
    if calibration_stats is not None:
        calibration = fit_calibration(calibration_stats, calibration_set, calibration_method)
        ckpt.store_calibration(checkpoint, calibration, folder)
        source = f"fitted by this test and stored in {checkpoint}"
    elif match.mapped:  # stored per checkpoint class: not applied to another data set's columns
        calibration, source = None, None
    else:
        calibration = ckpt.read_calibration(config, checkpoint)
        source = f"stored in {checkpoint}" if calibration else None
    add_calibration_results(results, stats, calibration, source, resamples=ci_resamples)
    write_reports(results, stats, dataset, folder, split)
    return results


def fit_calibration(stats: dict, dataset: datasets.ChestXrayDataset,
                    method: str = "temperature") -> ckpt.StoredCalibration:
    """The temperature(s) and operating-point thresholds of a model's predictions
    (``evaluate``'s ``stats``) on the calibration split ``dataset``."""
    from util.calibration import (
        TEMPERATURE_BOUNDS,
        apply_temperatures,
        at_bound,
        binary_cross_entropy,
        expected_calibration_error,
        fit_temperatures,
        logits_from_probs,
    )
    from util.io import file_sha256
    from util.operating_points import choose_thresholds

    names = list(dataset.class_names)
    logits, targets = logits_from_probs(stats["probs"]), stats["targets"]
    temperatures = fit_temperatures(logits, targets, method)
    chosen = choose_thresholds(logits, targets, names)
    thresholds = {kind: {n: ({"logit": t["threshold"], "sensitivity": t["sensitivity"],
                              "specificity": t["specificity"]} if t["threshold"] is not None
                             else {"logit": None, "note": t["note"]})
                         for n, t in per_class.items()} for kind, per_class in chosen.items()}
    fitted_on = {"split_file": str(dataset.split_file),
                 "split_sha256": file_sha256(dataset.split_file),
                 "num_images": int(stats["num_images"]),
                 "bce_before": binary_cross_entropy(logits, targets),
                 "bce_after": binary_cross_entropy(logits, targets, temperatures),
                 "ece_before": expected_calibration_error(stats["probs"], targets),
                 "ece_after": expected_calibration_error(apply_temperatures(logits, temperatures),
                                                         targets)}
    bounded = [n for n, t in zip(names, temperatures) if at_bound(t)]
    if bounded:
        whose = "the temperature" if method == "temperature" else \
            f"the temperature of {', '.join(bounded)}"
        fitted_on["note"] = (f"{whose} is at a bound of the search {TEMPERATURE_BOUNDS}: the "
                             "validation loss still falls beyond it (predictions that carry "
                             "little information, or a tiny validation split)")
    return ckpt.StoredCalibration(method=method, temperature=dict(zip(names, map(float, temperatures))),
                                  thresholds=thresholds, fitted_on=fitted_on)


def add_calibration_results(results: dict, stats: dict, calibration: ckpt.StoredCalibration | None,
                            source: str | None, *, resamples: int) -> None:
    """results["calibration"] (ECE and Brier of the test predictions before and, with a
    calibration, after it) and results["operating_points"] (the test scores at each stored
    threshold); ``stats["calibrated_probs"]`` for the reliability diagram."""
    from util import calibration as cal
    from util import operating_points as op

    names = list(results["class_names"])
    logits = cal.logits_from_probs(stats["probs"])
    section: dict = {"binning": cal.BINNING, "bins": cal.ECE_BINS, "source": source,
                     "before": cal.calibration_errors(stats["probs"], stats["targets"], names)}
    stats["calibrated_probs"] = None
    results["calibration"] = section
    if calibration is None:
        section["note"] = ("the checkpoint carries no calibration (the final test of its run "
                           "fits one on the validation split)")
        results["operating_points"] = {"note": "no thresholds: the checkpoint carries no "
                                               "calibration"}
        return
    temperatures = calibration.temperatures(names)
    stats["calibrated_probs"] = cal.apply_temperatures(logits, temperatures)
    section.update(method=calibration.method, temperature=calibration.temperature,
                   fitted_on=calibration.fitted_on,
                   after=cal.calibration_errors(stats["calibrated_probs"], stats["targets"], names))
    thresholds = {kind: dict(zip(names, (None if math.isnan(t) else float(t) for t in
                                         calibration.threshold_logits(kind, names))))
                  for kind in op.THRESHOLD_KINDS}
    points = op.operating_point_metrics(logits, stats["targets"], thresholds, names,
                                        resamples=resamples, seed=op.DEFAULT_SEED)
    for kind, per_class in points.items():
        for k, (name, row) in enumerate(per_class.items()):
            stored = calibration.thresholds[kind][name]
            t = row.pop("threshold")
            row.update(threshold_logit=t,
                       threshold=None if t is None else float(cal.apply_temperatures(t, temperatures[k])),
                       threshold_model=None if t is None else float(cal.apply_temperatures(t, 1.0)),
                       val_sensitivity=stored.get("sensitivity"),
                       val_specificity=stored.get("specificity"), note=stored.get("note"))
    results["operating_points"] = {
        "thresholds_from": calibration.fitted_on.get("split_file"),
        "rule": "positive when the probability >= the threshold (calibrated probability; "
                "threshold_model: the same on the model's own probabilities)",
        "kinds": dict(op.KIND_RULES), "level": 0.95,
        "intervals": {"proportions": op.PROPORTION_INTERVAL,
                      "f1": (f"{op.F1_INTERVAL}; {resamples} resamples, seed {op.DEFAULT_SEED}"
                             if resamples > 0 else "none (--ci_resamples 0)")},
        "points": points}


def test_results(checkpoint: str | Path, config, dataset: datasets.ChestXrayDataset, stats: dict, *,
                 split: str, precision: str, params: tuple[int, int]) -> dict:
    """results_<split>.json: the scores, and what was evaluated with what."""
    trained = config.extras.get("run") or {}
    results = {
        "split": split, "dataset": trained.get("dataset") or config.dataset or dataset.kind,
        "data_size": trained.get("data_size"), "seed": trained.get("seed"),
        "weights": weights.weights_label(config.pretrained) if config.pretrained else "none",
        "method": config.method, "model": config.model,
        "lora_rank": getattr(config.method_settings, "rank", None),
        "method_settings": config.to_json()["method_settings"],
        "trainable_params": int(params[0]), "total_params": int(params[1]),
        "num_images": stats["num_images"], "loss": stats["loss"],
        "mean_auroc": stats["mean_auroc"], "mean_auprc": stats["mean_auprc"],
        "auroc": json_safe(stats["auroc"]), "auprc": json_safe(stats["auprc"]),
        "undefined_classes": datasets.undefined_classes(stats["targets"], list(dataset.class_names)),
        "class_names": list(dataset.class_names), "checkpoint": str(checkpoint),
        "epoch": config.extras.get("epoch"), "training": trained, "precision": precision,
        "split_file": str(dataset.split_file), "data_cache": dataset.cache_info,
        "dicom_scaling": dataset.dicom_scaling,
        # The split's own size: with --skip_bad the score covers fewer images than it lists.
        "split_images": len(dataset) + len(dataset.skipped),
    }
    if dataset.skipped:
        results["skipped"] = [{"line": b.line, "path": b.path, "reason": b.reason}
                              for b in dataset.skipped]
    return results


def write_reports(results: dict, stats: dict, dataset: datasets.ChestXrayDataset,
                  folder: RunFolder, split: str) -> None:
    """The results JSON, the AUROC, calibration and operating-point tables, per-image
    predictions, ROC curves and the reliability diagram, recorded as the folder's own files;
    the calibration line and the test table printed."""
    from util import reports  # matplotlib is imported only when reports are written
    from util.calibration import temperature_text

    out, stem = folder.folder, f"results_{split}"
    # The results JSON is what marks a finished test (util.summarize reads it): an earlier one
    # goes first, the new one is written last, so a test cut short leaves none.
    results_json = folder.writable(f"{stem}.json")
    results_json.unlink(missing_ok=True)
    reports.write_predictions_csv(folder.writable(f"predictions_{split}.csv"),
                                  [dataset.paths[i] for i in stats["indices"]], stats["probs"],
                                  list(dataset.class_names), labels=stats["targets"])
    _, table = reports.write_auroc_tables(results, out, stem=stem)
    reports.save_roc_curves(stats["targets"], stats["probs"], dataset.class_names,
                            folder.writable(f"roc_{split}.png"))
    folder.record(*reports.write_calibration_tables(results, out, stem=stem),
                  *reports.write_operating_point_tables(results, out, stem=stem),
                  reports.save_reliability_diagram(
                      stats["targets"], stats["probs"], list(results["class_names"]),
                      folder.writable(f"reliability_{split}.png"),
                      calibrated=stats.get("calibrated_probs")))
    section = results["calibration"]
    before, after = section["before"], section.get("after")
    line = (f"{split} calibration: pooled ECE x100 {100 * before['pooled_ece']:.2f}, mean Brier "
            f"{before['mean_brier']:.4f}")
    if after:
        line += (f" -> {100 * after['pooled_ece']:.2f}, {after['mean_brier']:.4f} with "
                 f"{temperature_text(section['temperature'].values())} ({section['source']})")
    else:
        line += f" ({section['note']})"
    say(line)
    ckpt.write_json(results_json, results)
    folder.record(*(name for name in report_names(split) if (out / name).is_file()))
    if results["undefined_classes"]:
        say(f"{split}: no AUROC for {', '.join(results['undefined_classes'])} (a single label "
            "value in the evaluated images); the mean is over the other classes")
    say(f"{split} mean AUROC {100 * results['mean_auroc']:.2f} over {results['num_images']} "
        f"images ({results['checkpoint']})")
    say(table.read_text())


def evaluate_checkpoint(checkpoint: str | Path, data_path: str | Path, *, dataset: str,
                        split: str = "test", split_dir: str | None = None, cache: str = "auto",
                        cache_size: int | None = None, skip_bad: bool = False,
                        dicom_scaling: str | None = None, output_dir: str | Path | None = None,
                        name: str | None = None, overwrite: bool = False, command: str = "",
                        dist_info: DistInfo = DistInfo(), **options) -> dict:
    """Test a checkpoint on ``split`` of ``data_path`` into the evaluation's own folder, never
    over a training run's files: ``<checkpoint folder>/eval/<name>`` (``name`` by default from
    the data folder and split file), or ``output_dir`` (``/<name>`` inside it when given).
    The images are read with the checkpoint's evaluation transform and DICOM rule
    (``dicom_scaling`` overrides that rule, with a warning when it differs).
    A folder already holding this split's results is refused unless ``overwrite``, which
    removes only that evaluation's own files. ``options`` go to ``test_checkpoint``."""
    checkpoint = Path(checkpoint)
    config = ckpt.read_config(checkpoint)
    transform = datasets.build_transform(is_train=False, recipe=config.eval_recipe,
                                         input_size=config.img_size, norm=config.norm)
    if dicom_scaling is not None and config.dicom_scaling not in (None, dicom_scaling):
        logger.warning("--dicom_scaling %s differs from the rule %s was trained with (%s): its "
                       "DICOM inputs look different now", dicom_scaling, checkpoint,
                       config.dicom_scaling)
    scaling = dicom_scaling or config.dicom_scaling or datasets.imageio.dicom_scaling_for(dataset)
    data = datasets.build_dataset(split, data_path, dataset=dataset, transform=transform,
                                  split_dir=split_dir, cache=cache, skip_bad=skip_bad,
                                  cache_size=cache_size, verify_images="header",
                                  dicom_scaling=scaling)
    out = Path(output_dir) / (name or "") if output_dir is not None else None
    name = name or default_eval_name(data_path, data.split_file)
    if out is None:
        out = checkpoint_folder(checkpoint) / "eval" / name
    folder = RunFolder.for_evaluation(out, checkpoint)
    made = []  # the folders made for it: removed again if the evaluation is refused
    if dist_info.is_main:
        made = probe_writable(folder.folder)
        folder.lock.acquire(command)
    try:
        stem = f"results_{split}.json"
        if (folder.folder / stem).exists() and not overwrite:
            raise UsageError(f"{folder.folder} already holds an evaluation ({stem}): pass "
                             "--eval_name <name> to keep both, or --overwrite to replace it")
        foreign = folder.foreign(report_names(split))
        if foreign and not overwrite:
            raise UsageError(f"{folder.folder} holds files no evaluation of this tool wrote "
                             f"({', '.join(foreign[:4])}): the evaluation would write over them; "
                             "choose another --output_dir / --eval_name, or --overwrite to replace them")
        if overwrite and dist_info.is_main:
            folder.remove_own_files()
        info = {"data_path": str(Path(data_path).resolve()), "split_file": str(data.split_file),
                "name": name, "command": command}
        return test_checkpoint(checkpoint, data, folder, dist_info=dist_info, split=split,
                               eval_info=info, **options)
    finally:
        folder.lock.release()
        remove_empty(made)
