"""Validating `edgeseg runtime check` where labels exist: do its label-free proxies see what labels see?

On the demo bundle (with its teacher), the check runs on held-out ``test`` frames and on each of
``test_shift``'s deployment conditions (low light, backlight, colour cast; each image's condition
is re-drawn from the data set's parameters). Beside each folder's proxies stand the true figures:
the served INT8 student's mIoU against the labels, its drop from ``test``, and INT8's loss against
FP32 on the same frames. The proxies' margins are fixed in ``runtime/check.py`` (set before this
ran); nothing here tunes them.

Writes ``benchmarks/results/site_check.json``: ``groups`` (per folder: proxies, verdict, true
figures), each verdict's hits, false alarms and misses against the truth it predicts
(``recalibrate_verdict``, ``adapt_verdict``: :func:`verdict_scores`), ``ranking`` (does each proxy order the conditions as the true drop does: Spearman's
rho over the three conditions; ``ranks_agree``: the teacher agreement orders them as the true drop
does) and ``check_seconds`` (per folder, at the default thread count).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two equally long lists (no ties expected among three real-valued figures)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denom) if denom else 0.0


def rank_conditions(groups: dict[str, dict], shifted: list[str], served: str) -> dict:
    """``ranking`` and ``ranks_agree`` from the groups' proxies and true figures (``groups`` gains each
    group's ``true_miou_drop_points``, its served INT8 mIoU below ``test``'s).

    ``ranks_agree``, the headline: the label-free accuracy proxy (the teacher agreement) orders the
    shifted conditions as their true drop does, worst first.
    """
    base = groups["test"]["true_int8_miou"]
    for g in groups.values():
        g["true_miou_drop_points"] = (base - g["true_int8_miou"]) * 100
    drop = [groups[n]["true_miou_drop_points"] for n in shifted]
    loss = [groups[n]["int8_loss_points"] for n in shifted]
    teacher_gap = [1 - groups[n]["teacher_agreement_miou"] for n in shifted]
    int8_gap = [1 - groups[n]["int8_agreement_miou"] for n in shifted]
    saturation = [groups[n]["saturation"][served] for n in shifted]
    worst_first = lambda values: [shifted[i] for i in np.argsort(values)[::-1]]  # noqa: E731
    ranking = {
        "conditions": shifted,
        "true_drop_order": worst_first(drop),
        "teacher_disagreement_vs_true_drop_spearman": spearman(teacher_gap, drop),
        "int8_disagreement_vs_int8_loss_spearman": spearman(int8_gap, loss),
        f"saturation_{served}_vs_int8_loss_spearman": spearman(saturation, loss),
        "same_order_as_true_drop": worst_first(teacher_gap) == worst_first(drop),
    }
    return {"ranking": ranking, "ranks_agree": bool(ranking["same_order_as_true_drop"])}


def run(cfg, bundle: str | Path | None = None) -> dict:
    from edgeseg.distill.demo_data import CONDITIONS, image_conditions
    from edgeseg.export.stage import eval_set
    from edgeseg.runtime.check import SiteCheck, verdict
    from edgeseg.runtime.errors import InputError
    from edgeseg.runtime.metrics import score_masks

    bundle = Path(bundle or Path(cfg.run_dir) / "bundle")
    check = SiteCheck(bundle, need_teacher=True)
    reference = check.bundle.manifest.get("site_check_reference")
    if reference is None:
        raise InputError(f"{bundle}: no site_check_reference in the manifest; rewrite it with `edgeseg export bundle --with-teacher`")
    test_images, test_masks = eval_set(cfg, "test")
    shift_images, shift_masks = eval_set(cfg, "test_shift")
    conditions = image_conditions(cfg.data_root, "test_shift")
    groups = {"test": (test_images, test_masks)}
    for name in CONDITIONS:
        idx = [i for i, c in enumerate(conditions) if c == name]
        groups[f"test_shift/{name}"] = ([shift_images[i] for i in idx], [shift_masks[i] for i in idx])

    out: dict = {"bundle": str(bundle), "reference": {k: v for k, v in reference.items() if k != "range_fit"}
                 | {"saturation": {r: f["saturation"] for r, f in reference["range_fit"].items()}}, "groups": {}}
    for name, (images, masks) in groups.items():
        t0 = time.perf_counter()
        result = check.measure(images, keep_masks=True)
        seconds = time.perf_counter() - t0
        per_frame = result.pop("_per_frame")
        findings = verdict(result, reference, images=name)
        int8 = score_masks(per_frame["served_masks"], masks)["miou"]
        fp32 = score_masks(per_frame["fp32_masks"], masks)["miou"]
        out["groups"][name] = {
            "frames": len(images), "check_seconds": round(seconds, 2),
            "saturation": {r: f["saturation"] for r, f in result["range_fit"].items()},
            "saturated_tensors": {r: f["saturated_tensors"] for r, f in result["range_fit"].items()},
            "int8_agreement_miou": result["int8_agreement_miou"],
            "predicted_int8_loss_points": result["predicted_int8_loss"] * 100,
            "confident_share": result["confident_share"],
            "teacher_agreement_miou": result["teacher_agreement_miou"],
            "verdict": [f["finding"] for f in findings] or ["fine"],
            "true_int8_miou": int8, "true_fp32_miou": fp32, "int8_loss_points": (fp32 - int8) * 100,
        }
        log.info("site check on %s (%d frames, %.1f s): %s; true INT8 mIoU %.4f", name, len(images), seconds,
                 out["groups"][name]["verdict"], int8)
    shifted = [f"test_shift/{c}" for c in CONDITIONS]
    out.update(rank_conditions(out["groups"], shifted, check.served_role))
    flagged = {n: g["verdict"] != ["fine"] for n, g in out["groups"].items()}
    out["test_passes"] = not flagged["test"]
    out["shift_conditions_flagged"] = sum(flagged[n] for n in shifted)
    out.update(verdict_scores(out["groups"], reference))
    return out


def verdict_scores(groups: dict[str, dict], reference: dict) -> dict:
    """Each verdict against the truth it predicts, per folder: hits, false alarms, misses.

    "recalibrate" is right where the served INT8 model truly loses more than the check's margin against
    FP32 (``int8_loss_points``, both scored on the labels); "adapt" where the student truly drops more
    than its margin below ``test``. The margins are the check's own (``runtime/check.py`` ``Margins``).
    """
    from edgeseg.runtime.check import Margins

    m = Margins()
    rules = {"recalibrate on these frames": ("int8_loss_points", m.predicted_int8_loss * 100),
             "adapt the student (distill on these frames)": ("true_miou_drop_points", m.teacher_agreement * 100)}
    out = {}
    for finding, (key, bar) in rules.items():
        name = finding.split()[0]
        said = {n: finding in g["verdict"] for n, g in groups.items()}
        true = {n: g[key] > bar for n, g in groups.items()}
        out[f"{name}_verdict"] = {
            "true_if": f"{key} > {bar:g}", "hits": sorted(n for n in groups if said[n] and true[n]),
            "false_alarms": sorted(n for n in groups if said[n] and not true[n]),
            "misses": sorted(n for n in groups if true[n] and not said[n]),
            "correct_passes": sorted(n for n in groups if not said[n] and not true[n])}
        out[f"{name}_false_alarms"] = len(out[f"{name}_verdict"]["false_alarms"])
        out[f"{name}_hits"] = len(out[f"{name}_verdict"]["hits"])
        out[f"{name}_misses"] = len(out[f"{name}_verdict"]["misses"])
    return out
