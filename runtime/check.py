"""A label-free check of a deploy bundle on frames from a new site (``edgeseg runtime check``).

Torch-free, in seconds on a folder of unlabelled frames. Three proxies, none needs a label:

- **range fit**: for every activation tensor a bundle's INT8 model quantizes, the share of the
  frames' FP32 values that fall outside the range it was calibrated with (its QuantizeLinear
  scale and zero point): saturation, worst tensors first; for the TensorRT model (``int8``) and
  the ONNX Runtime CPU model (``int8-cpu``) each;
- **INT8 agreement**: mIoU of the served INT8 model's masks against the bundle's FP32 model's;
- **teacher agreement**: where the bundle carries the teacher (``export bundle --with-teacher``),
  mIoU of the served student's masks against the teacher's: an accuracy proxy (the teacher is
  the best model the project has; where the student leaves it, the student is wrong more often).
- **predicted INT8 loss**: the mIoU the served INT8 model loses against the FP32 model's *confident*
  pixels (FP32 logit at least ``CONFIDENT_LOGIT`` from the cut), taken as labels. Where both models
  are unsure (a dark frame) they may disagree without INT8 being wrong; where FP32 is sure and INT8
  flips the pixel, INT8 is wrong. "Recalibrate" follows from this prediction alone: saturation and
  the plain INT8 agreement are reported beside it as the reasons, never as the trigger.

Each proxy is judged against the same proxy measured on held-out source images when the bundle
was written (manifest ``site_check_reference``), so "fine" means "as on the images the bundle
was validated on". The verdict is one line per finding, with the command that acts on it.
The margins are fixed here, before any validation ran (docs/site.md).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeseg.runtime.bundle import Bundle
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.metrics import SegmentationMeter
from edgeseg.runtime.pipeline import BatchBuffers, finish, prepare, score_cut
from edgeseg.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

QUANTIZED_ROLES = ("int8", "int8-cpu")  # TensorRT's symmetric Q/DQ model; ONNX Runtime CPU's u8s8 one
REPORT = "site_check.json"
FIGURE = "site_check.png"


@dataclass(frozen=True)
class Margins:
    """How far from the reference a proxy may move before it is a finding (fixed before validation)."""

    saturation: float = 0.005  # share of a model's quantized activation values out of range: + 0.5 percentage points
    int8_agreement: float = 0.01  # INT8-vs-FP32 mIoU: 1 point lower
    teacher_agreement: float = 0.03  # student-vs-teacher mIoU: 3 points lower
    # predicted INT8 loss (mIoU on FP32's confident pixels) above the reference's by half a point: recalibrate
    # (the site issue's bar for a site-calibrated INT8 model; fixed before the validation in site_check.json ran)
    predicted_int8_loss: float = 0.005
    # without a reference (a bundle written before the check existed): absolute limits
    saturation_abs: float = 0.01
    int8_agreement_abs: float = 0.97
    teacher_agreement_abs: float = 0.85
    predicted_int8_loss_abs: float = 0.01


CONFIDENT_LOGIT = 2.0  # |FP32 logit - cut| at least this (p outside 0.12..0.88 at a 0.5 threshold): a confident pixel


class _ConfidentAgreement:
    """The served INT8 model's masks against the FP32 model's confident pixels, accumulated over frames."""

    def __init__(self):
        self.counts = np.zeros((2, 2), np.int64)  # [FP32 class, INT8 class] over confident pixels

    def update(self, fp32: np.ndarray, int8: np.ndarray, placements, cut: float) -> None:
        """(B, 1, H, W) logits of both models at the letterbox size; only each image's own area counts."""
        for i, p in enumerate(placements):
            f = fp32[i, 0, p.top:p.top + p.height, p.left:p.left + p.width]
            q = int8[i, 0, p.top:p.top + p.height, p.left:p.left + p.width]
            sure = np.abs(f - cut) >= CONFIDENT_LOGIT
            a, b = (f[sure] > cut).astype(np.int64), (q[sure] > cut).astype(np.int64)
            self.counts += np.bincount(a * 2 + b, minlength=4).reshape(2, 2)

    @property
    def loss(self) -> float:
        """1 - mIoU of INT8 against FP32's confident labels: the mIoU INT8 loses where FP32 is sure."""
        c = self.counts
        # over the classes FP32's confident pixels hold: on an empty scene one flipped pixel is no lost class
        ious = [c[k, k] / (c[k, :].sum() + c[:, k].sum() - c[k, k]) for k in (0, 1) if c[k, :].sum()]
        return float(1 - np.mean(ious)) if ious else 0.0

    @property
    def pixels(self) -> int:
        return int(self.counts.sum())


def activation_ranges(path: Path) -> dict[str, tuple[float, float]]:
    """Activation tensor -> (lowest, highest) real value its QuantizeLinear can represent."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue  # weights are quantized from initializers: only activations depend on the frames
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if len(node.input) > 2 and node.input[2] in inits:
            zp = numpy_helper.to_array(inits[node.input[2]])
            info = np.iinfo(zp.dtype)
            zp = zp.astype(np.float64)
        else:
            info, zp = np.iinfo(np.uint8), np.zeros(())
        if scale.size != 1:  # per-channel activations do not occur in our models; the widest channel is the bound
            scale, zp = scale.max(), zp.max()
        out[node.input[0]] = (float((info.min - zp) * scale), float((info.max - zp) * scale))
    return out


def _augmented(fp32: Path, tensors: Sequence[str]) -> tuple[bytes, list[str]]:
    """The FP32 model with those of ``tensors`` it has added as graph outputs (as ORT's calibrators do),
    serialised, and the tensors found (a Q/DQ model may quantize a tensor its pre-processing made)."""
    import onnx

    model = onnx.load(str(fp32))
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    found = [t for t in tensors if t in produced]
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in found if t not in present)
    return model.SerializeToString(), found


class _Saturation:
    """Running out-of-range counts per tensor and model."""

    def __init__(self, ranges: dict[str, dict[str, tuple[float, float]]]):
        self.ranges = ranges
        self.outside = {role: dict.fromkeys(r, 0) for role, r in ranges.items()}
        self.peak = {role: dict.fromkeys(r, 0.0) for role, r in ranges.items()}
        self.total = {}

    def update(self, name: str, values: np.ndarray) -> None:
        lo_v, hi_v = float(values.min()), float(values.max())
        self.total[name] = self.total.get(name, 0) + values.size
        for role, ranges in self.ranges.items():
            if name not in ranges:
                continue
            lo, hi = ranges[name]
            if lo_v < lo or hi_v > hi:
                self.outside[role][name] += int(np.count_nonzero((values < lo) | (values > hi)))
            bound = max(abs(lo), abs(hi)) or 1.0
            self.peak[role][name] = max(self.peak[role][name], max(abs(lo_v), abs(hi_v)) / bound)

    def summary(self, worst: int = 10) -> dict:
        out = {}
        for role, counts in self.outside.items():
            shares = {t: counts[t] / self.total[t] for t in counts if self.total.get(t)}
            ranked = sorted(shares, key=lambda t: (-shares[t], -self.peak[role][t]))
            out[role] = {
                "tensors": len(shares),
                "saturation": float(np.mean(list(shares.values()))) if shares else 0.0,  # mean over tensors
                "saturated_tensors": sum(v > 0.001 for v in shares.values()),  # more than 0.1% of values out
                "worst": [{"tensor": t, "saturation": shares[t], "peak_over_range": self.peak[role][t]}
                          for t in ranked[:worst]],
            }
        return out


class SiteCheck:
    """The bundle's models opened once; :meth:`measure` takes a list of HxWx3 uint8 frames."""

    def __init__(self, bundle: str | Path, threads: int = 0, need_teacher: bool = False):
        from edgeseg.runtime.sessions import cpu_session

        self.bundle = Bundle(bundle)
        fp32 = self.bundle.file("fp32")
        if fp32 is None:
            raise InputError(f"{self.bundle.path}: the bundle has no FP32 model (role fp32); the check compares "
                             "against it: rebuild the bundle with `make deploy`")
        self.spec = self.bundle.spec
        self.quantized = {role: f for role in QUANTIZED_ROLES if (f := self.bundle.file(role)) is not None}
        if not self.quantized:
            raise InputError(f"{self.bundle.path}: the bundle has no INT8 model; the check is about INT8 deployment: "
                             "set export.precision: int8 and run `make export deploy`")
        self.ranges = {role: activation_ranges(f) for role, f in self.quantized.items()}
        model, self.tensors = _augmented(fp32, sorted(set().union(*self.ranges.values())))
        self.fp32 = cpu_session(model, threads)
        self.served_role = "int8-cpu" if "int8-cpu" in self.quantized else "int8"
        self.int8 = cpu_session(self.quantized[self.served_role], threads)
        teacher = self.bundle.file("teacher")
        if need_teacher and teacher is None:
            raise InputError(f"{self.bundle.path}: the bundle carries no teacher; write it with "
                             "`edgeseg export bundle --with-teacher` (the teacher agreement needs it)")
        self.teacher = self.zoo_teacher = self.teacher_spec = None
        if teacher is not None and self.bundle.manifest.get("teacher_io"):  # a zoo ONNX teacher, its I/O recorded
            from edgeseg.runtime.teacher_io import SegmenterIO, ZooSegmenter

            self.zoo_teacher = ZooSegmenter(teacher, SegmenterIO.from_dict(self.bundle.manifest["teacher_io"]),
                                            self.spec.image_size, self.spec.pad_value, threads)
        elif teacher is not None:  # edgeseg's own export of the teacher: the student's I/O contract
            self.teacher = cpu_session(teacher, threads)
            self.teacher_spec = ModelSpec.from_session(self.teacher, teacher)

    def measure(self, frames: Sequence[np.ndarray], keep_masks: bool = False) -> dict:
        """Proxies over ``frames`` (and per-frame agreements, for the picture; with ``keep_masks`` the
        served INT8 and the FP32 masks too, for a validation that has labels)."""
        if not frames:
            raise InputError("no frames to check")
        t0 = time.perf_counter()
        sat = _Saturation(self.ranges)
        int8_meter, teacher_meter, confident = SegmentationMeter(), SegmentationMeter(), _ConfidentAgreement()
        pixels = 0
        per_frame = {"int8": [], "teacher": [], "served_masks": [], "fp32_masks": []}
        person = []  # share of person pixels in each served mask
        buffers = BatchBuffers(self.spec)
        teacher_buffers = BatchBuffers(self.teacher_spec) if self.teacher_spec else None
        wanted = [self.spec.output_name, *[t for t in self.tensors if t != self.spec.input_name]]
        for start in range(0, len(frames), self.spec.max_batch):
            batch = list(frames[start:start + self.spec.max_batch])
            x, placements = prepare(batch, self.spec, buffers)
            outputs = dict(zip(wanted, self.fp32.run(wanted, {self.spec.input_name: x})))
            sat.update(self.spec.input_name, x)
            for name in wanted[1:]:
                sat.update(name, outputs[name])
            fp32_out = outputs[self.spec.output_name]
            int8_out = self.int8.run([self.spec.output_name], {self.spec.input_name: x})[0]
            fp32_masks = finish(fp32_out, placements, self.spec)
            served = finish(int8_out, placements, self.spec)
            if self.spec.output != "mask":
                cut = score_cut(self.spec)
                to_logit = (lambda v: v) if self.spec.output == "logits" else (
                    lambda v: np.log(np.clip(v, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(v, 1e-6, 1 - 1e-6)))
                confident.update(to_logit(fp32_out), to_logit(int8_out), placements,
                                 cut if self.spec.output == "logits" else float(np.log(cut / (1 - cut))))
                pixels += sum(p.height * p.width for p in placements)
            for a, b in zip(served, fp32_masks):
                int8_meter.update(a, b)
                per_frame["int8"].append(_miou(a, b))
                person.append(float(a.mean()))
            if keep_masks:
                per_frame["served_masks"] += served
                per_frame["fp32_masks"] += fp32_masks
            if self.has_teacher:
                for a, b in zip(served, self._teacher_masks(batch, teacher_buffers)):
                    teacher_meter.update(a, b)
                    per_frame["teacher"].append(_miou(a, b))
        out = {"frames": len(frames), "served_model": self.served_role, "range_fit": sat.summary(),
               "int8_agreement_miou": int8_meter.miou,
               # mIoU INT8 loses against FP32's confident pixels; None for a 0/1-mask model (no confidence to read)
               "predicted_int8_loss": confident.loss if self.spec.output != "mask" else None,
               "confident_share": confident.pixels / max(pixels, 1),  # the share of pixels the prediction rests on
               "teacher_agreement_miou": teacher_meter.miou if self.has_teacher else None,
               "person_fraction": float(np.mean(person)),
               "seconds": round(time.perf_counter() - t0, 2)}
        out["_per_frame"] = per_frame
        return out

    def masks(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The served student's mask of one frame, and the teacher's (None without a teacher)."""
        x, p = prepare([frame], self.spec, BatchBuffers(self.spec))
        served = finish(self.int8.run([self.spec.output_name], {self.spec.input_name: x})[0], p, self.spec)[0]
        if not self.has_teacher:
            return served, None
        return served, self._teacher_masks([frame], BatchBuffers(self.teacher_spec) if self.teacher_spec else None)[0]

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.zoo_teacher is not None

    def _teacher_masks(self, frames: Sequence[np.ndarray], buffers: BatchBuffers | None) -> list[np.ndarray]:
        """The teacher's masks of ``frames`` at their sizes: a zoo teacher by its recorded I/O, else the student's contract."""
        if self.zoo_teacher is not None:
            return self.zoo_teacher.masks(frames)
        tx, tp = prepare(frames, self.teacher_spec, buffers)
        return finish(self.teacher.run([self.teacher_spec.output_name], {self.teacher_spec.input_name: tx})[0], tp,
                      self.teacher_spec)


def _miou(a: np.ndarray, b: np.ndarray) -> float:
    m = SegmentationMeter()
    m.update(a, b)
    return m.miou


def verdict(result: dict, reference: dict | None, margins: Margins = Margins(), images: str = "DIR") -> list[dict]:
    """One finding per problem (none: the frames look like the images the bundle was validated on).

    "Recalibrate" follows from the predicted INT8 loss (above the reference's by ``margins.predicted_int8_loss``);
    saturation and the INT8 agreement, measured beside it, are given as the reasons. "Adapt the student" follows
    from the teacher agreement.
    """
    findings = []
    sat = {role: r["saturation"] for role, r in result["range_fit"].items()}
    worst_role = max(sat, key=sat.get)
    predicted = result.get("predicted_int8_loss")
    if reference:
        ref_sat = reference["range_fit"].get(worst_role, {}).get("saturation", 0.0)
        saturates = sat[worst_role] > ref_sat + margins.saturation
        int8_low = result["int8_agreement_miou"] < reference["int8_agreement_miou"] - margins.int8_agreement
        ref_int8 = reference["int8_agreement_miou"]
        ref_loss = reference.get("predicted_int8_loss")
        ref_teacher = reference.get("teacher_agreement_miou")
        teacher_low = (result["teacher_agreement_miou"] is not None and ref_teacher is not None
                       and result["teacher_agreement_miou"] < ref_teacher - margins.teacher_agreement)
        basis = "the bundle's validation images"
    else:
        ref_sat, ref_int8, ref_loss, ref_teacher = None, margins.int8_agreement_abs, None, None
        saturates = sat[worst_role] > margins.saturation_abs
        int8_low = result["int8_agreement_miou"] < margins.int8_agreement_abs
        teacher_low = (result["teacher_agreement_miou"] is not None
                       and result["teacher_agreement_miou"] < margins.teacher_agreement_abs)
        basis = "fixed limits (the bundle has no site_check_reference)"
    if predicted is None:  # a 0/1-mask model has no confidence to predict a loss from: the proxies decide
        loses = saturates or int8_low
    else:
        loses = predicted > (ref_loss + margins.predicted_int8_loss if ref_loss is not None
                             else margins.predicted_int8_loss_abs)
    recalibrate = (f"edgeseg export all --calibration {images} && edgeseg export bundle "
                   "(make export deploy SET=export.calibration=<the folder>)")
    adapt = (f"edgeseg distill train --images {images} --unlabelled-share 0.5, then make export deploy")
    if loses:
        why = [] if predicted is None else [
            f"INT8 is predicted to lose {predicted * 100:.2f} mIoU points where FP32 is confident"
            + (f" (vs {ref_loss * 100:.2f} on {basis})" if ref_loss is not None else "")]
        if saturates:
            why.append(f"{sat[worst_role] * 100:.2f}% of {worst_role} activations fall outside their INT8 ranges"
                       + (f" (vs {ref_sat * 100:.2f}%)" if ref_sat is not None else ""))
        if int8_low:
            why.append(f"INT8 agrees with FP32 at mIoU {result['int8_agreement_miou']:.4f} (vs {ref_int8:.4f})")
        findings.append({"finding": "recalibrate on these frames", "why": "; ".join(why), "command": recalibrate})
    if teacher_low:
        ref = ref_teacher if ref_teacher is not None else margins.teacher_agreement_abs
        findings.append({"finding": "adapt the student (distill on these frames)",
                         "why": f"the student agrees with the teacher at mIoU {result['teacher_agreement_miou']:.4f} "
                                f"(vs {ref:.4f} on {basis})", "command": adapt})
    return findings


def read_frames(folder: str | Path, limit: int = 0) -> tuple[list[Path], list[np.ndarray]]:
    """The frames of ``folder`` (every image, or the first ``limit`` by name); bad input is one clear error."""
    from edgeseg.runtime.images import read_rgb, require_images

    folder = Path(folder)
    paths = require_images(folder, f"{folder}: frames folder does not exist; pass --images DIR of site frames",
                           f"{folder}: no images (png, jpg, ...) in the frames folder; put a few site frames there")
    if limit:
        paths = paths[:limit]
    return paths, [read_rgb(p) for p in paths]


def run_check(bundle: str | Path, images: str | Path, out_dir: str | Path | None = None, threads: int = 0,
              limit: int = 0, need_teacher: bool = False) -> dict:
    """Check ``bundle`` on the frames in ``images``; writes site_check.json and site_check.png to ``out_dir``."""
    from edgeseg.runtime.files import write_json_atomic

    paths, frames = read_frames(images, limit)
    check = SiteCheck(bundle, threads, need_teacher)
    result = check.measure(frames)
    per_frame = result.pop("_per_frame")
    reference = check.bundle.manifest.get("site_check_reference")
    result.update({"bundle": str(check.bundle.path), "images": str(images),
                   "reference": {k: v for k, v in reference.items() if k != "_per_frame"} if reference else None,
                   "findings": verdict(result, reference, images=str(images))})
    result["verdict"] = [f["finding"] for f in result["findings"]] or ["fine: the frames look like the bundle's validation images"]
    out_dir = Path(out_dir) if out_dir else Path(images).resolve().parent / "site_check"
    write_json_atomic(out_dir / REPORT, result)
    plot(result, paths, frames, per_frame, check, out_dir / FIGURE)
    result["report"], result["figure"] = str(out_dir / REPORT), str(out_dir / FIGURE)
    return result


def plot(result: dict, paths: list[Path], frames: list[np.ndarray], per_frame: dict, check: SiteCheck,
         path: Path) -> None:
    """Worst tensors' saturation, the agreements against their references, and the least-agreeing frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeseg.runtime.files import atomic_path

    key = "teacher" if per_frame["teacher"] else "int8"
    order = np.argsort(per_frame[key])[:4]
    fig = plt.figure(figsize=(12, 6.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[0, :2])
    role = max(result["range_fit"], key=lambda r: result["range_fit"][r]["saturation"])
    worst = [w for w in result["range_fit"][role]["worst"][:8] if w["saturation"] > 0]
    ax.barh([w["tensor"][-32:] for w in worst][::-1], [w["saturation"] * 100 for w in worst][::-1], color="tab:red")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("% of values outside the INT8 range")
    ref_fit = ((result.get("reference") or {}).get("range_fit") or {}).get(role)
    ax.set_title(f"range fit ({role}): {result['range_fit'][role]['saturation'] * 100:.2f}% of values out"
                 + (f" (reference {ref_fit['saturation'] * 100:.2f}%)" if ref_fit else ""), fontsize=9)
    ax = fig.add_subplot(grid[0, 2:])
    ref = result.get("reference") or {}
    names = ["INT8 vs FP32"] + (["student vs teacher"] if result["teacher_agreement_miou"] is not None else [])
    here = [result["int8_agreement_miou"]] + ([result["teacher_agreement_miou"]] if len(names) > 1 else [])
    there = [ref.get("int8_agreement_miou", np.nan)] + ([ref.get("teacher_agreement_miou", np.nan)] if len(names) > 1 else [])
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, there, 0.4, label="validation images (reference)", color="tab:gray")
    ax.bar(xs + 0.2, here, 0.4, label="these frames", color="tab:blue")
    ax.set_xticks(xs, names)
    ax.set_ylim(min([v for v in here + there if v == v] + [0.9]) - 0.05, 1.0)
    ax.set_ylabel("mask agreement (mIoU)")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("; ".join(result["verdict"]), fontsize=9)
    for k, i in enumerate(order):
        ax = fig.add_subplot(grid[1, k])
        served, teacher = check.masks(frames[i])
        shown = frames[i].copy()
        shown[served.astype(bool)] = (shown[served.astype(bool)] * 0.5 + np.array([255, 40, 40]) * 0.5).astype(np.uint8)
        ax.imshow(shown)
        if teacher is not None:
            ax.contour(teacher, levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(f"{paths[i].name}: {key} mIoU {per_frame[key][i]:.3f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"edgeseg runtime check: {result['frames']} frames of {result['images']} (least-agreeing frames below: "
                 "student in red" + (", teacher outlined in yellow)" if per_frame["teacher"] else ")"), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
