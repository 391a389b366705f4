"""Test AUROC per patient subgroup (sex, age band, view), and the largest gap of each attribute.

    from util.subgroups import subgroup_report
    report = subgroup_report(targets, probs, paths, class_names, metadata)   # JSON-ready

Subgroups, from each image's metadata record (``datasets.metadata``):

- ``sex``: M, F (and O where a record says other);
- ``age``: ``<40``, ``40-59``, ``60-79``, ``80+`` years: each band holds its lower edge and
  not its upper one (40 is in 40-59, 60 in 60-79, 80 in 80+), on whole years;
- ``view``: each projection present (PA, AP, LAT, FRONTAL, ...).

Every image is counted: those without a metadata record (``n_without_metadata``, with
examples) and, per attribute, those whose record leaves it unknown (``unknown``) are said
in the report and left out of that attribute's subgroups only.

Per subgroup: ``util.stats.auroc_intervals`` on its images, the same bootstrap and DeLong
intervals as the whole test set's table. The resamples of different subgroups are drawn
independently (subgroup i of the report uses seed ``seed + 1 + i``).

The largest gap of an attribute: the subgroups are disjoint sets of images, so a gap is a
difference between two independent estimates.

- Mean AUROC: over the classes defined (positives and negatives) in every subgroup of the
  attribute, so that the subgroups' means average the same classes; the highest minus the
  lowest subgroup. Its interval and p-value come from the two subgroups' own bootstraps
  taken independently (resample b of one minus resample b of the other: the distribution of
  a difference of independent estimates), the percentile interval and the interval inverted
  for p, as in ``util.compare``.
- Per class: the highest minus the lowest subgroup AUROC among the subgroups with a DeLong
  standard error; DeLong's test for two independent AUROCs,
  z = (A1 - A2) / sqrt(SE1^2 + SE2^2).

The pair is chosen as the extremes after seeing the data, so each p-value is also given
Bonferroni-adjusted for the number of pairs of the attribute's subgroups (``p_adjusted``):
with two subgroups they are equal.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from util.misc import say
from util.stats import (DEFAULT_RESAMPLES, _bootstrap_interval, _bootstrap_p, _z_test,
                        auroc_intervals, bootstrap_aurocs)


class Record(Protocol):
    """One image's metadata (``datasets.metadata.ImageMeta``): None where unknown."""

    sex: str | None
    age: int | None
    view: str | None


class MetadataLike(Protocol):
    """Records by image path (``datasets.metadata.Metadata``), where they came from, notes."""

    source: str
    notes: list[str]

    def lookup(self, paths: Sequence[str]) -> list[Any]: ...


SUBGROUPS_FORMAT = "cxr-lora-subgroups/1"
ATTRIBUTES = ("sex", "age", "view")
# (label, lowest age in the band, lowest age of the next band); None: open.
AGE_BANDS: tuple[tuple[str, int | None, int | None], ...] = (
    ("<40", None, 40), ("40-59", 40, 60), ("60-79", 60, 80), ("80+", 80, None))
AGE_RULE = ("age bands in whole years: <40, 40-59, 60-79, 80+; a band holds its lower edge "
            "(40 is in 40-59, 80 in 80+)")
MEAN_GAP_TEST = ("mean AUROC over the classes defined in every subgroup of the attribute; "
                 "highest minus lowest subgroup; interval and p from the two subgroups' "
                 "independent bootstraps (percentile interval, p the interval inverted)")
CLASS_GAP_TEST = "DeLong test for two independent AUROCs: z = (A1 - A2) / sqrt(SE1^2 + SE2^2)"
ADJUSTMENT = "p_adjusted: Bonferroni over the attribute's pairs of subgroups (the pair is the extremes)"


def age_band(age: int | None) -> str | None:
    """The band label of an age in years (module docstring), None for an unknown age."""
    if age is None:
        return None
    for label, low, high in AGE_BANDS:
        if (low is None or age >= low) and (high is None or age < high):
            return label
    raise AssertionError(f"age {age} outside every band")  # the bands cover every integer


def subgroup_of(record: Record | None, attribute: str) -> str | None:
    """The subgroup of one image for an attribute, None when its record leaves it unknown."""
    if record is None:
        return None
    if attribute == "age":
        return age_band(record.age)
    return getattr(record, attribute)


def _adjusted(p: float | None, n_groups: int) -> float | None:
    """Bonferroni over the n (n - 1) / 2 pairs of n subgroups."""
    return None if p is None else min(1.0, p * max(1, n_groups * (n_groups - 1) // 2))


def _class_gaps(groups: dict[str, dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Per class: the highest and lowest subgroup with a DeLong SE, their gap and its DeLong test."""
    out: dict[str, Any] = {}
    for name in class_names:
        rows = [(g, v["classes"][name]) for g, v in groups.items()
                if v["classes"][name].get("delong_se") is not None]
        if len(rows) < 2:
            out[name] = {"high": None, "low": None, "diff": None, "delong_z": None,
                         "delong_p": None, "p_adjusted": None,
                         "note": "fewer than two subgroups with at least 2 positives and 2 negatives"}
            continue
        rows.sort(key=lambda r: r[1]["auroc"])  # stable: tied subgroups are still two
        (low, b), (high, a) = rows[0], rows[-1]
        diff = a["auroc"] - b["auroc"]
        z, p = _z_test(diff, a["delong_se"] ** 2 + b["delong_se"] ** 2)
        out[name] = {"high": high, "low": low, "diff": diff, "delong_z": z, "delong_p": p,
                     "p_adjusted": _adjusted(p, len(rows)), "n_subgroups": len(rows), "note": None}
    return out


def _mean_gap(groups: dict[str, dict[str, Any]], boots: dict[str, np.ndarray],
              class_names: Sequence[str], level: float) -> dict[str, Any]:
    """The largest gap of the mean AUROC over the classes every subgroup defines, with its
    independent-bootstrap interval and p (module docstring)."""
    common = [k for k, name in enumerate(class_names)
              if all(v["classes"][name]["auroc"] is not None for v in groups.values())]
    gap: dict[str, Any] = {"classes": [class_names[k] for k in common], "high": None, "low": None,
                           "auroc_high": None, "auroc_low": None, "diff": None, "ci_low": None,
                           "ci_high": None, "p_bootstrap": None, "p_adjusted": None, "note": None}
    if len(groups) < 2:
        gap["note"] = "fewer than two subgroups"
        return gap
    if not common:
        gap["note"] = "no class has positives and negatives in every subgroup"
        return gap
    means = {g: float(np.mean([v["classes"][class_names[k]]["auroc"] for k in common]))
             for g, v in groups.items()}
    ranked = sorted(means, key=means.get)  # stable: tied subgroups are still two
    low, high = ranked[0], ranked[-1]
    gap.update(high=high, low=low, auroc_high=means[high], auroc_low=means[low],
               diff=means[high] - means[low])
    if high in boots and low in boots:
        d = boots[high][:, common].mean(axis=1) - boots[low][:, common].mean(axis=1)
        iv = _bootstrap_interval(d, level, "some class in either subgroup")
        gap.update(ci_low=iv.low, ci_high=iv.high, note=iv.note)
        if iv.low is not None:
            gap["p_bootstrap"] = _bootstrap_p(d)
            gap["p_adjusted"] = _adjusted(gap["p_bootstrap"], len(groups))
    else:
        gap["note"] = "no interval: bootstrap turned off (0 resamples)"
    return gap


def subgroup_report(targets: np.ndarray, probs: np.ndarray, paths: Sequence[str],
                    class_names: Sequence[str], metadata: MetadataLike,
                    resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """Per-subgroup AUROC with intervals and the largest gap of each attribute (module
    docstring); JSON-ready. ``paths`` are the images' split-file paths, in the rows' order."""
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    if not len(paths) == len(targets) == len(probs):
        raise ValueError(f"{len(paths)} paths for {len(targets)} targets and {len(probs)} scores")
    records = metadata.lookup(paths)
    missing = [p for p, r in zip(paths, records) if r is None]
    report: dict[str, Any] = {
        "format": SUBGROUPS_FORMAT, "source": metadata.source, "n_images": len(paths),
        "n_without_metadata": len(missing), "without_metadata_examples": missing[:5],
        "notes": list(metadata.notes), "age_bands": AGE_RULE, "level": level,
        "n_resamples": int(resamples), "seed": int(seed), "mean_gap_test": MEAN_GAP_TEST,
        "class_gap_test": CLASS_GAP_TEST, "adjustment": ADJUSTMENT, "attributes": {}}
    if missing:
        report["notes"].insert(0, f"{len(missing)} of {len(paths)} images have no metadata "
                               "record, e.g. " + ", ".join(f"'{p}'" for p in missing[:3])
                               + "; they are in no subgroup")
    index = 0
    for attribute in ATTRIBUTES:
        labels = [subgroup_of(r, attribute) for r in records]
        unknown = sum(1 for r, g in zip(records, labels) if r is not None and g is None)
        groups: dict[str, dict[str, Any]] = {}
        boots: dict[str, np.ndarray] = {}
        present = {g for g in labels if g is not None}
        # Reading order: age bands by age, other subgroups alphabetically.
        ordered = ([band for band, _, _ in AGE_BANDS if band in present] if attribute == "age"
                   else sorted(present))
        for name in ordered:
            rows = np.array([g == name for g in labels])
            index += 1
            sub_t, sub_p = targets[rows], probs[rows]
            intervals = auroc_intervals(sub_t, sub_p, list(class_names), resamples=resamples,
                                        seed=seed + index, level=level)
            # The settings the report gives once are left out.
            groups[name] = {"n_images": int(rows.sum()), "classes": intervals["classes"],
                            "mean": intervals["mean"]}
            if resamples:
                # The same draws as the interval's (same rows, same seed).
                boots[name] = bootstrap_aurocs(sub_t.astype(np.int8), [sub_p], resamples,
                                               seed + index)[0]
        report["attributes"][attribute] = {
            "unknown": unknown, "groups": groups,
            "gap": {"mean": _mean_gap(groups, boots, class_names, level),
                    "classes": _class_gaps(groups, class_names)}}
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One line for the console: images without metadata and each attribute's mean gap."""
    parts = []
    for attribute, entry in report["attributes"].items():
        gap = entry["gap"]["mean"]
        if gap["diff"] is None:
            parts.append(f"{attribute}: no gap ({gap['note']})")
            continue
        p = gap["p_bootstrap"]
        parts.append(f"{attribute} {gap['high']} - {gap['low']} {100 * gap['diff']:+.1f}"
                     + ("" if p is None else f" (p {p:.3f}, adjusted {gap['p_adjusted']:.3f})"))
    lacking = report["n_without_metadata"]
    head = (f"subgroups of {report['n_images']} images ({report['source']}"
            + (f"; {lacking} without metadata" if lacking else "") + ")")
    return f"{head}: largest mean-AUROC gaps: " + "; ".join(parts)


def write_subgroup_report(results: dict[str, Any], stats: dict[str, Any], paths: Sequence[str],
                          class_names: Sequence[str], folder: Any, split: str,
                          metadata: MetadataLike, resamples: int) -> dict[str, Any]:
    """A test's subgroup report: into ``results["subgroups"]`` and, in the run folder
    (``util.runfolder.RunFolder``), ``subgroups_<split>.{md,csv,png,svg}`` recorded as its own.

    ``stats`` is ``engine_finetune.evaluate``'s (targets, probs, and the data set ``indices``
    of its rows into ``paths``). Returns the report.
    """
    from util import reports  # matplotlib is imported only when reports are written

    report = subgroup_report(stats["targets"], stats["probs"], [paths[i] for i in stats["indices"]],
                             list(class_names), metadata, resamples=resamples, seed=0)
    results["subgroups"] = report
    stem = f"subgroups_{split}"
    for suffix in (".csv", ".md", ".png", ".svg"):
        folder.writable(stem + suffix)  # never through a symbolic link
    written = reports.write_subgroup_tables(report, list(class_names), folder.folder, stem=stem)
    plot = reports.save_subgroup_plot(report, folder.folder / stem)
    folder.record(*written, *(plot or ()))
    say(summary_line(report) + f" ({folder.folder / stem}.md)")
    return report
