"""Testing a trained checkpoint: its scores with intervals, and the reports a run keeps.

    results = test_checkpoint("output_dir/<run>/checkpoint-best", test_set, RunFolder(out),
                              device=torch.device("cpu"))

The final test of a training run and ``--eval`` both call ``test_checkpoint``; it writes
``results_<split>.json``, the AUROC tables, per-image predictions and ROC curves into the
folder, each recorded as the folder's own file; and the calibration (ECE, Brier before /
after, ``reliability_<split>.png``) and operating-point tables. The final test passes the
validation split as ``calibration_set``: the temperature and the thresholds are fitted on
it and stored in the checkpoint's JSON, which ``--eval`` and ``predict.py`` then apply.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import checkpoints as ckpt
import datasets
import lora
import methods
from engine_finetune import evaluate
from util.cli import UsageError
from util.io import json_safe
from util.misc import DistInfo, say
from util.precision import precision_name
from util.runfolder import RunFolder


def undefined_classes(targets: np.ndarray, class_names: list[str]) -> list[str]:
    """Classes with a single label value in ``targets``: they have no AUROC."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return list(class_names)
    return [n for k, n in enumerate(class_names) if targets[:, k].min() == targets[:, k].max()]


def default_eval_name(data_path: str | Path, split_file: str | Path) -> str:
    """An evaluation folder's name: the data folder, the split folder if elsewhere, the split file."""
    data, split = Path(data_path).resolve(), Path(split_file).resolve()
    parts = [data.name] + ([split.parent.name] if split.parent != data else []) + [split.stem]
    return "-".join(parts)


def test_checkpoint(checkpoint: str | Path, dataset: datasets.ChestXrayDataset, folder: RunFolder, *,
                    device: torch.device, dist_info: DistInfo = DistInfo(),
                    amp_dtype: torch.dtype | None = None, split: str = "test",
                    batch_size: int = 256, num_workers: int = 0, pin_memory: bool = False,
                    seed: int = 0, ci_resamples: int = 1000, pretrained: str | None = None,
                    allow_unsafe_pickle: bool = False, progress: bool = True,
                    eval_info: dict | None = None,
                    calibration_set: datasets.ChestXrayDataset | None = None,
                    calibration_method: str = "temperature") -> dict:
    """Evaluate a saved checkpoint on ``dataset`` (merged adapters: the cost of a plain ViT)
    and write every report into ``folder``. The results carry the training run's settings
    from the checkpoint's JSON; other processes than the main one return {}.

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
    if list(dataset.class_names) != config.class_names:
        raise UsageError(f"{checkpoint} was trained on classes {config.class_names}, "
                         f"but {dataset.split_file} has {dataset.class_names}")
    loader_args = {"batch_size": batch_size, "seed": seed, "num_workers": num_workers,
                   "pin_memory": pin_memory}
    calibration_stats = None
    if calibration_set is not None:
        if list(calibration_set.class_names) != config.class_names:
            raise UsageError(f"{checkpoint} was trained on classes {config.class_names}, but the "
                             f"calibration split {calibration_set.split_file} has "
                             f"{calibration_set.class_names}")
        calibration_stats = evaluate(
            model, datasets.build_loader(calibration_set, dist_info, train=False, **loader_args),
            device, calibration_set.class_names, amp_dtype,
            progress=progress and dist_info.is_main, warn_undefined=False)
    loader = datasets.build_loader(dataset, dist_info, train=False, **loader_args)
    stats = evaluate(model, loader, device, dataset.class_names, amp_dtype,
                     progress=progress and dist_info.is_main)
    if not dist_info.is_main:
        return {}
    trainable, total = lora.count_parameters(model)  # load_trained restores the trained set
    results = test_results(checkpoint, config, dataset, stats, split=split,
                           precision=precision_name(amp_dtype), params=(trainable, total))
    if ci_resamples > 0:
        from util.stats import auroc_intervals

        # A fixed seed, not the run's: runs of different training seeds share the resamples.
        results["intervals"] = auroc_intervals(stats["targets"], stats["probs"],
                                               list(dataset.class_names),
                                               resamples=ci_resamples, seed=0)
    if eval_info:
        results["evaluation"] = eval_info
    if calibration_stats is not None:
        calibration = fit_calibration(calibration_stats, calibration_set, calibration_method)
        ckpt.store_calibration(checkpoint, calibration, folder)
        source = f"fitted by this test and stored in {checkpoint}"
    else:
        calibration = ckpt.read_calibration(config, checkpoint)
        source = f"stored in {checkpoint}" if calibration else None
    add_calibration_results(results, stats, calibration, source,
                            resamples=ci_resamples)
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
    if calibration is None:
        section["note"] = ("the checkpoint carries no calibration (the final test of its run "
                           "fits one on the validation split)")
        results["calibration"] = section
        results["operating_points"] = {"note": "no thresholds: the checkpoint carries no "
                                               "calibration"}
        return
    temperatures = calibration.temperatures(names)
    stats["calibrated_probs"] = cal.apply_temperatures(logits, temperatures)
    section.update(method=calibration.method, temperature=calibration.temperature,
                   fitted_on=calibration.fitted_on,
                   after=cal.calibration_errors(stats["calibrated_probs"], stats["targets"], names))
    results["calibration"] = section
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
        "weights": Path(config.pretrained).stem if config.pretrained else "none",
        "method": config.method, "model": config.model,
        "lora_rank": config.lora.rank if config.lora else None,
        "trainable_params": int(params[0]), "total_params": int(params[1]),
        "num_images": stats["num_images"], "loss": stats["loss"],
        "mean_auroc": stats["mean_auroc"], "mean_auprc": stats["mean_auprc"],
        "auroc": json_safe(stats["auroc"]), "auprc": json_safe(stats["auprc"]),
        "undefined_classes": undefined_classes(stats["targets"], list(dataset.class_names)),
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
    """The results JSON, AUROC tables, per-image predictions and ROC curves, recorded as the
    folder's own files, and the test table printed."""
    from util import reports  # matplotlib is imported only when reports are written

    out, stem = folder.folder, f"results_{split}"
    ckpt.write_json(folder.writable(f"{stem}.json"), results)
    reports.write_predictions_csv(folder.writable(f"predictions_{split}.csv"),
                                  [dataset.paths[i] for i in stats["indices"]], stats["probs"],
                                  list(dataset.class_names), labels=stats["targets"])
    reports.write_auroc_tables(results, out, stem=stem)
    reports.save_roc_curves(stats["targets"], stats["probs"], dataset.class_names,
                            folder.writable(f"roc_{split}.png"))
    write_calibration_reports(results, stats, folder, split)
    folder.record(*(p for p in out.iterdir() if p.is_file() and p.name.startswith(
        (stem, f"predictions_{split}", f"roc_{split}"))))
    if results["undefined_classes"]:
        say(f"{split}: no AUROC for {', '.join(results['undefined_classes'])} (a single label "
            "value in the evaluated images); the mean is over the other classes")
    say(f"{split} mean AUROC {100 * results['mean_auroc']:.2f} over {results['num_images']} "
        f"images ({results['checkpoint']})")
    table = out / f"{stem}_auroc.md"
    if table.exists():
        say(table.read_text())


def write_calibration_reports(results: dict, stats: dict, folder: RunFolder, split: str) -> None:
    """The calibration and operating-point tables and the reliability diagram, recorded as
    the folder's own files, and the calibration summary line printed."""
    from util import reports
    from util.calibration import temperature_text

    stem = f"results_{split}"
    written = [*reports.write_calibration_tables(results, folder.folder, stem=stem),
               *reports.write_operating_point_tables(results, folder.folder, stem=stem)]
    written.append(reports.save_reliability_diagram(
        stats["targets"], stats["probs"], list(results["class_names"]),
        folder.writable(f"reliability_{split}.png"), calibrated=stats.get("calibrated_probs")))
    folder.record(*(p for p in written if p is not None))
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
