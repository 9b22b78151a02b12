"""``synth``: generate a pool, score it with the teacher, filter, keep the best, write the set.

The set is written into a temporary folder and renamed into place at the end, so an
interrupted run leaves either the old set or the new one, never a half of each. Layout::

    <out>/images/00000.png ...   kept images at the model's input size
    <out>/masks/00000.png ...    labels: the conditioning masks (mask-conditioned generator), or the
                                 teacher's masks with --teacher-masks (either way a training split)
    <out>/manifest.json          generator, checkpoint hashes, seeds, guidance, scores, counts
    <out>/pool/{images,masks}/   labelled by conditioning masks only: every other generated pair (dropped
                                 by a filter, or surplus), named by pool index, so the report can judge
                                 the unfiltered pool as well as the set (manifest ``dropped`` / ``surplus``)

``counts`` are measured: ``generated`` (every pool image, extra rounds included), ``kept`` (those
that passed every filter), ``written`` (the set: the count asked for) and ``surplus`` (kept, not
written); ``pass_rate`` is kept / generated.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.calibration.filters import SetFilter, dhash, teacher_confidence
from edgeseg.calibration.guidance import (ConfidenceGuide, MaskGuide, MixedGuide, ModeGuide, TaskGuide, TeacherView, kmeans,
                                          medoids)
from edgeseg.calibration.pixels import signed_to_uint8, uint8_to_signed
from edgeseg.calibration.screen import Candidate, Screen, pool_file
from edgeseg.calibration.config import CalibratedConfig
from edgeseg.distill.config import config_to_dict
from edgeseg.distill.data import split_samples
from edgeseg.distill.device import peak_device_mb, use_device
from edgeseg.distill.models import load_model, load_teacher
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.profiler import peak_rss_mb
from edgeseg.runtime.files import recover_dir, replace_dir, sha256_file, staging_dir
from edgeseg.runtime.images import list_images, read_rgb

log = logging.getLogger(__name__)

# The embedded generators learn from the labelled corpus of the world (the teacher's: data.teacher_split,
# else train), as a generator pretrained on a large corpus would; never the student's unlabelled frames,
# whose masks a user does not have. Near-copies are looked for among these same images.
GENERATOR_SPLIT = "teacher"

MANIFEST = "manifest.json"
FORMAT = "edgeseg-calibration/1"
GUIDANCE_MODES = ("none", "task", "confidence", "mode", "mask")


def check_request(out_dir: Path, count: int, guidance: str, overwrite: bool, student: Path | None) -> None:
    """Refuse bad requests before any work: one clear error each."""
    if count <= 0:
        raise InputError(f"--count must be >= 1, got {count}")
    if guidance not in GUIDANCE_MODES:
        raise InputError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got {guidance!r}")
    if guidance == "confidence" and student is not None and not Path(student).is_file():  # None: an in-memory student
        raise InputError(f"guidance 'confidence' needs a student checkpoint (got {student}); "
                         "train one with `make distill` or pass --student PATH")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it, or choose another --out")


def images_to_model(x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, 3, h, w) in [-1, 1] -> (B, H, W, 3) uint8 at the model's input size (bicubic)."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return signed_to_uint8(x)


@torch.no_grad()
def teacher_probabilities(view: TeacherView, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """(N, H, W) teacher probabilities for (N, H, W, 3) uint8 images."""
    out = []
    for i in range(0, len(images), batch):
        x = uint8_to_signed(images[i:i + batch])
        logits, _ = view(x)
        out.append(torch.sigmoid(logits[:, 0]).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def embed_real_images(view: TeacherView, paths: list[Path], limit: int = 256) -> tuple[np.ndarray, list[Path]]:
    """Teacher-encoder embeddings (N, C) of up to ``limit`` real images (evenly spaced)."""
    step = max(1, len(paths) // limit)
    chosen = paths[::step][:limit]
    embs = []
    for i in range(0, len(chosen), 32):
        imgs = np.stack([_fit(read_rgb(p), view.image_hw) for p in chosen[i:i + 32]])
        x = uint8_to_signed(imgs)
        embs.append(view(x)[1].float().cpu().numpy())
    return np.concatenate(embs), chosen


def _fit(img: np.ndarray, hw) -> np.ndarray:
    from edgeseg.runtime.preprocess import fit_image

    return fit_image(img, hw, "letterbox")[0]


class Synthesizer:
    """Generates a calibration set for one config (``edgeseg calibration synth``)."""

    def __init__(self, cfg: CalibratedConfig, guidance: str | None = None, student: str | Path | None = None,
                 target_images: str | Path | None = None, student_model=None, sample_seed: int | None = None):
        """``target_images`` overrides calibration.target.images; ``student_model`` (an in-memory
        student, for hard examples during training) replaces the checkpoint for confidence guidance;
        ``sample_seed`` replaces calibration.seed for sampling only (the cached generator stays)."""
        self.cfg = cfg
        self.cal = cfg.calibration
        self.guidance_mode = guidance or self.cal.guidance.mode
        self.student_path = Path(student) if student else cfg.stage_dir("distill") / "best.pt"
        self.student_model = student_model
        self.sample_seed = self.cal.seed if sample_seed is None else int(sample_seed)
        self.target_folder = str(target_images) if target_images else self.cal.target.images
        self.conditional = self.cal.generator == "conditional"
        self.device = use_device(cfg.device, cfg.threads)
        self.size = tuple(cfg.data.image_size)

    # --- the generator -----------------------------------------------------------------------

    def _load_generator(self):
        if self.cal.generator == "pipeline":
            from edgeseg.calibration.pipeline import check_pipeline_folder, load_pipeline

            check_pipeline_folder(self.cal.model)
            self.pipe = load_pipeline(self.cal.model, self.device, img2img=self.cal.img2img_strength > 0)
            self.generator_info = {"kind": "pipeline", "path": str(self.cal.model),
                                   "class": type(self.pipe).__name__, "prompts": list(self.cal.prompts)}
            return
        from edgeseg.calibration.ddpm import load_training_images, load_training_masks, train_or_load
        from edgeseg.calibration.generator import is_pretrained, load_pretrained, resolve

        default = "cddpm" if self.conditional else "ddpm"
        folder = resolve(self.cal.model) if self.cal.model else self.cfg.stage_dir("calibration") / default
        if self.cal.model and not (folder / "ddpm.json").is_file():
            raise InputError(f"{folder}: not an edgeseg DDPM folder (no ddpm.json); set calibration.generator: pipeline "
                             "for a diffusers pipeline, rebuild the shipped one with `make generator`, or leave "
                             "calibration.model empty to train the embedded DDPM")
        train = split_samples(self.cfg, GENERATOR_SPLIT)
        strength = self.cal.img2img_strength
        if self.cal.model and is_pretrained(folder):  # shipped: loaded as it is, never retrained here
            self.unet, self.scheduler_config = load_pretrained(folder)
            if self.unet.config.sample_size != self.cal.ddpm.image_size:
                raise InputError(f"{folder}: the pretrained generator draws {self.unet.config.sample_size} px images "
                                 f"but calibration.ddpm.image_size is {self.cal.ddpm.image_size}; set it to match")
        else:
            self.unet, self.scheduler_config = train_or_load(self.cal.ddpm, train, folder, seed=self.cal.seed,
                                                             conditional=self.conditional)
        if self.conditional != (self.unet.config.in_channels == 4):
            raise InputError(f"{folder}: holds a{'n un' if self.conditional else ' mask-'}conditional DDPM but "
                             f"calibration.generator is {self.cal.generator}; point calibration.model elsewhere")
        if self.conditional:
            from edgeseg.calibration.masks import MaskSource

            self.mask_source = MaskSource(load_training_masks(train, self.cal.ddpm.image_size), self.cal.masks)
        if strength > 0:  # img2img sources: the training images at the generator's resolution
            self.sources = load_training_images(train, self.cal.ddpm.image_size)
        weights = next((folder / "unet").glob("*.safetensors"), None) or next((folder / "unet").glob("*.bin"))
        self.generator_info = {"kind": "conditional" if self.conditional else "ddpm", "path": str(folder),
                               "checkpoint_sha256": sha256_file(weights), "resolution": self.cal.ddpm.image_size}
        if self.conditional:
            self.generator_info["masks"] = config_to_dict(self.cal.masks)

    def _guide_model(self, teacher) -> tuple[torch.nn.Module, str]:
        """The torch model whose gradient guides sampling (calibration.guidance.model) and what to call it."""
        from edgeseg.distill.models import UnetSegmenter

        choice = self.cal.guidance.model
        if choice == "auto":
            choice = "teacher" if isinstance(teacher, UnetSegmenter) else "student"
        if choice == "teacher":
            if not isinstance(teacher, UnetSegmenter):
                raise InputError("guided sampling needs the guide's gradient and the ONNX teacher "
                                 f"({self.cfg.teacher.onnx.path}) has none; set calibration.guidance.model: student "
                                 "(or a UNet checkpoint), or calibration.guidance.mode: none")
            return teacher, "teacher"
        if choice == "student":
            path = self.student_path
            if self.student_model is not None:
                return self.student_model, "student (in memory)"
            if not Path(path).is_file():
                raise InputError(f"{path}: calibration.guidance.model is student but there is no trained student; "
                                 "run `make distill` first (or set calibration.guidance.model)")
            return load_model(self.cfg.student, path, keys=("student",)).to(self.device), f"student ({path})"
        return load_model(self.cfg.teacher, choice).to(self.device), f"checkpoint {choice}"

    def _make_guide(self, pool_size: int):
        mode = self.guidance_mode
        g = self.cal.guidance
        res = (g.resolution, g.resolution) if g.resolution else self.size
        teacher = TeacherView(self.guide_model, res, self.cfg.data.mean, self.cfg.data.std)
        # img2img sources, one per pool image: a seeded shuffle of the training set ...
        n_src = len(getattr(self, "sources", ()))
        self.source_of = np.random.default_rng(self.cal.seed).permutation(max(n_src, 1))[np.arange(pool_size) % max(n_src, 1)]
        if mode == "none":
            return None, {}
        if mode == "task":
            return TaskGuide(teacher), {}
        if mode == "mask":
            if not self.conditional:
                raise InputError("--guidance mask needs the mask-conditioned generator (calibration.generator: conditional)")
            return MaskGuide(teacher, {}), {}
        if mode == "confidence":
            student = self.student_model if self.student_model is not None else load_model(
                self.cfg.student, self.student_path, keys=("student",)).to(self.device)
            view = TeacherView(student, res, self.cfg.data.mean, self.cfg.data.std)
            # every k-th pool image is hard, k = 1 / hard_fraction: an exact, reproducible share
            every = max(1, round(1 / g.hard_fraction)) if g.hard_fraction > 0 else pool_size + 1
            is_hard = torch.arange(pool_size) % every == 0
            guide = MixedGuide(TaskGuide(teacher), ConfidenceGuide(teacher, view, g.gamma), is_hard)
            origin = ({"student": "in memory (training)"} if self.student_model is not None
                      else {"student_sha256": sha256_file(self.student_path)})
            return guide, {**origin, "hard_images": int(is_hard.sum())}
        # mode guidance: k-means over teacher embeddings of real images, an equal share per mode
        paths = [s.image for s in split_samples(self.cfg, GENERATOR_SPLIT)]
        emb, chosen = embed_real_images(TeacherView(self.guide_model, self.size, self.cfg.data.mean, self.cfg.data.std),
                                        paths, limit=len(paths))
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-8)
        centres, labels = kmeans(emb, g.modes, seed=self.cal.seed)
        self.medoid_paths = [chosen[i] for i in medoids(emb, centres, labels)]
        protos = torch.from_numpy(centres / np.linalg.norm(centres, axis=1, keepdims=True).clip(1e-8))
        self.assignment = torch.arange(pool_size) % len(centres)
        # ... or, under mode guidance, a member of the image's assigned mode
        rng = np.random.default_rng(self.cal.seed)
        members = [np.flatnonzero(labels == k) for k in range(len(centres))]
        self.source_of = np.array([rng.choice(members[int(k)]) for k in self.assignment])
        info = {"modes": len(centres), "mode_sizes": np.bincount(labels, minlength=len(centres)).tolist(),
                "medoids": [p.name for p in self.medoid_paths]}
        return ModeGuide(teacher, protos, self.assignment), info

    def _generate(self, seeds: list[int], index: torch.Tensor, guide) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, H, W, 3) uint8 images at the model's size, and their conditioning masks (or None)."""
        if self.cal.generator == "pipeline":
            from edgeseg.calibration.pipeline import generate

            prompts = [self.cal.prompts[int(i) % len(self.cal.prompts)] for i in index]
            init = None
            if self.cal.img2img_strength > 0:
                sources = getattr(self, "medoid_paths", None) or [s.image for s in split_samples(self.cfg, GENERATOR_SPLIT)]
                init = [read_rgb(sources[int(i) % len(sources)]) for i in index]
            return generate(self.pipe, prompts, seeds, self.size, self.cal.sampler.steps, 0.0, init,
                            self.cal.img2img_strength, guide, self.cal.guidance, index=index), None
        from edgeseg.calibration.sampler import sample

        init, unet, masks = None, self.unet, None
        if self.cal.img2img_strength > 0:
            init = self.sources[torch.from_numpy(self.source_of[index.numpy()])]
        if self.conditional:
            from edgeseg.calibration.ddpm import ConditionedUNet
            from edgeseg.calibration.masks import masks_to_model

            cond = self.mask_source(seeds)
            unet, masks = ConditionedUNet(self.unet, cond), masks_to_model(cond, self.size)
            if isinstance(guide, MaskGuide):  # this batch's conditioning masks, by pool index
                guide.masks.clear()
                guide.masks.update({int(i): cond[j] for j, i in enumerate(index)})
        target, w = self.target, self.cal.target.weight
        steer = (lambda x0, i: target.steer(x0, i, w)) if target is not None and w > 0 else None
        x = sample(unet, self.scheduler_config, seeds, self.cal.sampler, self.cal.guidance, guide, index,
                   init=init, strength=self.cal.img2img_strength, steer=steer, steer_t_stop=self.cal.target.t_stop)
        images = images_to_model(x, self.size)
        if target is not None and self.cal.target.noise:
            images = target.add_noise(images, index, seeds)
        return images, masks

    # --- the run -----------------------------------------------------------------------------

    def generate_pool(self, pool_size: int, progress: bool = True, start: int = 0) -> list[Candidate]:
        """Generate and score pool images ``start .. start + pool_size - 1`` (no filtering)."""
        from edgeseg.runtime.progress import LoggedProgress

        if not hasattr(self, "teacher"):
            # on the generator's device: guidance differentiates its model on the generator's images
            teacher = load_teacher(self.cfg, self.device)
            self.teacher = TeacherView(teacher, self.size, self.cfg.data.mean, self.cfg.data.std)
            self.guide_model, self.guided_by = self._guide_model(teacher)
            self._load_generator()
            self.target = None
            if self.target_folder:
                if self.cal.generator == "pipeline":
                    raise InputError("target-domain steering (calibration.target.images) needs the embedded generator "
                                     "(calibration.generator: conditional or ddpm)")
                from edgeseg.calibration.target import TargetDomain

                self.target = TargetDomain.from_folder(self.target_folder, self.size, self.cal.ddpm.image_size)
                log.info("steering towards %d target images in %s", len(self.target), self.target_folder)
        guide, self.guide_info = self._make_guide(start + pool_size)
        if guide is not None and start == 0:
            log.info("sampling guided (%s) by the %s", self.guidance_mode, self.guided_by)
        bs = self.cal.sampler.batch_size
        out: list[Candidate] = []
        bar = LoggedProgress(total=pool_size, desc=f"sampling ({self.guidance_mode})", logger=log,
                             **({} if progress else {"disable": True, "every_s": float("inf")}))
        end = start + pool_size
        for b, first in enumerate(range(start, end, bs)):
            index = torch.arange(first, min(first + bs, end))
            seeds = [self.sample_seed + int(i) for i in index]
            images, conditions = self._generate(seeds, index, guide)
            probs = teacher_probabilities(self.teacher, images)
            for j, (img, p, c) in enumerate(zip(images, probs, teacher_confidence(probs))):
                i = int(index[j])
                mode = int(self.assignment[i]) if self.guidance_mode == "mode" else (
                    self.cal.prompts[i % len(self.cal.prompts)] if self.cal.generator == "pipeline" else None)
                cand = Candidate(i, seeds[j], b, img, (p > 0.5).astype(np.uint8), c, mode,
                                 source=int(self.source_of[i]) if hasattr(self, "sources") else None)
                if conditions is not None:
                    from edgeseg.calibration.masks import mask_iou

                    cand.condition = conditions[j]
                    cand.condition_iou = mask_iou(cand.mask, cand.condition)
                if self.target is not None:
                    cand.target = int(self.target.of(torch.tensor(i)))
                out.append(cand)
            bar.update(len(index))
        bar.close()
        return out

    def run(self, out_dir: str | Path, count: int | None = None, overwrite: bool = False,
            teacher_masks: bool = False) -> dict:
        """Generate, filter and write the set; returns the manifest.

        1. check the request (before minutes of generator training); 2. generate the pool; 3. screen
        it, best first, through the filters; 4. more rounds until ``count`` pass; 5. keep ``count``
        (the rest is surplus) and write the set with its manifest.
        """
        out_dir = Path(out_dir)
        count = self.cal.count if count is None else count
        self._check_request(out_dir, count, overwrite)  # 1
        t0 = time.perf_counter()
        pool_size = math.ceil(self.cal.pool_factor * count)
        pool = self.generate_pool(pool_size)  # 2
        screen = self._screen()  # 3
        screen.add(pool)
        rounds = self._extra_rounds(pool, screen, count, pool_size)  # 4
        t_gen = time.perf_counter() - t0
        kept, surplus = screen.passing[:count], screen.passing[count:]  # 5
        kept.sort(key=lambda c: c.pool_index)
        # the pool beside the set (conditioning-mask labels only): what the report's judge scores unfiltered
        pool_pairs = screen.rejected + surplus if self.conditional and not teacher_masks else []
        if pool_pairs:
            for entry, c in zip(screen.dropped, screen.rejected):
                entry["file"] = pool_file(c)
        manifest = self._manifest(pool, screen, kept, surplus, rounds, teacher_masks, bool(pool_pairs))
        manifest["seconds"] = {"generate": t_gen, "total": time.perf_counter() - t0}
        manifest["peak_rss_mb"] = peak_rss_mb()  # generator training (if it ran here), sampling and the filters
        if (device_peak := peak_device_mb(self.device)) is not None:
            manifest["peak_cuda_mb"] = device_peak
        self._write(out_dir, kept, manifest, teacher_masks, {pool_file(c): c for c in pool_pairs})
        manifest["seconds"]["total"] = time.perf_counter() - t0
        log.info("%d of %d generated images passed the filters (%s); wrote %d in %.0f s -> %s", len(screen.passing),
                 len(pool), screen.dropped_summary(), len(kept), manifest["seconds"]["total"], out_dir)
        return manifest

    def _check_request(self, out_dir: Path, count: int, overwrite: bool) -> None:
        """A bad request (output folder, count, student, target folder, pipeline folder) fails before any work."""
        check_request(out_dir, count, self.guidance_mode, overwrite,
                      self.student_path if self.guidance_mode == "confidence" and self.student_model is None else None)
        if self.target_folder:  # a bad folder fails now, not after minutes of generator training
            from edgeseg.calibration.target import check_target_folder

            check_target_folder(self.target_folder)
        if self.cal.generator == "pipeline":
            from edgeseg.calibration.pipeline import check_pipeline_folder

            check_pipeline_folder(self.cal.model)

    def _screen(self) -> Screen:
        """The filters, with what they compare against: every evaluation split's hashes and the generator's corpus."""
        from edgeseg.calibration.similarity import TrainIndex
        from edgeseg.distill.data import has_split

        # every evaluation split: a synthetic image must not copy one the figures are measured on
        held_out = [s for split in ("val", "test", "test_shift") if has_split(self.cfg, split)
                    for s in split_samples(self.cfg, split)]
        val_hashes = [dhash(_fit(read_rgb(s.image), self.size)) for s in held_out]
        flt = SetFilter(self.cal.filter, val_hashes)
        train_paths = [s.image for s in split_samples(self.cfg, GENERATOR_SPLIT)]  # what a copy would copy
        index = TrainIndex(np.stack([_fit(read_rgb(p), self.size) for p in train_paths]))
        target_index = TrainIndex(self.target.images) if self.target is not None else None
        return Screen(flt, index, train_paths, self.target, target_index)

    def _extra_rounds(self, pool: list[Candidate], screen: Screen, count: int, pool_size: int) -> int:
        """Generate and screen more until ``count`` pass (at most ``max_extra_rounds``); the rounds it took."""
        rounds = 0
        # The count asked for is the count delivered: more rounds, sized by the pass rate so far,
        # continue the pool's indices (and seeds), so the same config still gives the same set.
        while len(screen.passing) < count and rounds < self.cal.max_extra_rounds:
            rounds += 1
            rate = max(len(screen.passing) / len(pool), 0.05)
            extra = min(pool_size, math.ceil(1.25 * (count - len(screen.passing)) / rate))
            log.info("%d of %d passed the filters (%s); round %d generates %d more", len(screen.passing), count,
                     screen.dropped_summary(), rounds, extra)
            more = self.generate_pool(extra, start=len(pool))
            pool.extend(more)
            screen.add(more)
        if len(screen.passing) < count:
            raise InputError(f"asked for {count} calibration images but only {len(screen.passing)} of {len(pool)} "
                             f"generated passed the filters after {rounds} extra round(s) (dropped: "
                             + screen.dropped_summary()
                             + "); relax calibration.filter, raise calibration.pool_factor or max_extra_rounds, "
                             "or ask for fewer with --count")
        return rounds

    def _manifest(self, pool: list[Candidate], screen: Screen, kept: list[Candidate], surplus: list[Candidate],
                  rounds: int, teacher_masks: bool, with_pool: bool) -> dict:
        """The set's manifest (``seconds`` is filled in by the caller)."""
        return {
            "format": FORMAT,
            "generator": self.generator_info,
            "teacher_sha256": sha256_file(self.cfg.teacher.onnx.path if self.cfg.teacher.is_onnx else self.cfg.teacher_checkpoint),
            "guidance": {"mode": self.guidance_mode, **config_to_dict(self.cal.guidance), **self.guide_info,
                         "guided_by": self.guided_by if self.guidance_mode != "none" else None},
            "sampler": config_to_dict(self.cal.sampler),
            "image_size": list(self.size),
            "seed": self.sample_seed,
            "labels": "teacher" if teacher_masks else ("condition" if self.conditional else None),
            "target": self.target.info() if self.target is not None else None,
            "counts": {"generated": len(pool), "kept": len(screen.passing), "written": len(kept),
                       "dropped": dict(screen.flt.dropped), "surplus": len(surplus), "extra_rounds": rounds},
            "pass_rate": len(screen.passing) / len(pool),
            "seconds": None,
            "images": [{"file": f"images/{k:05d}.png", "pool_index": c.pool_index, "seed": c.seed, "batch": c.batch,
                        "mode": c.mode, "source": c.source, "target": c.target, **c.scores, "dhash": c.dhash}
                       for k, c in enumerate(kept)],
            "dropped": screen.dropped,
            "surplus": [{"pool_index": c.pool_index, "seed": c.seed, **c.scores,
                         **({"file": pool_file(c)} if with_pool else {})} for c in surplus],
            "config": config_to_dict(self.cfg),
        }

    def _write(self, out_dir: Path, kept: list[Candidate], manifest: dict, teacher_masks: bool,
               pool_pairs: dict[str, Candidate]) -> None:
        """The set (images/, masks/), the rest of a condition-labelled pool (pool/) and manifest.json."""
        from PIL import Image

        tmp = staging_dir(out_dir)
        (tmp / "images").mkdir()
        labelled = teacher_masks or self.conditional
        if labelled:
            (tmp / "masks").mkdir()
        for k, c in enumerate(kept):
            Image.fromarray(c.image).save(tmp / "images" / f"{k:05d}.png")
            if labelled:
                label = c.mask if teacher_masks else c.condition
                Image.fromarray(label * 255).save(tmp / "masks" / f"{k:05d}.png")
        if pool_pairs:
            (tmp / "pool" / "images").mkdir(parents=True)
            (tmp / "pool" / "masks").mkdir()
        for file, c in pool_pairs.items():
            Image.fromarray(c.image).save(tmp / file)
            Image.fromarray(c.condition * 255).save(tmp / label_file(file))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, out_dir)


def label_file(image_file: str | Path) -> Path:
    """The label of a pair's image file: ``images/NNNNN.png`` -> ``masks/NNNNN.png`` (also under ``pool/``)."""
    image_file = Path(image_file)
    return image_file.parent.parent / "masks" / image_file.name


def load_calibration_images(folder: str | Path, image_hw: tuple[int, int] | None = None, limit: int | None = None,
                            fit: bool = False) -> np.ndarray:
    """(N, H, W, 3) uint8 images of a calibration folder (``<folder>/images`` or the folder itself).

    ``fit``: letterbox images of another size to ``image_hw`` (real frames); otherwise such an image is an
    InputError (a generated set is made at the model's size). A missing or empty folder is an InputError.
    """
    folder = recover_dir(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: calibration folder does not exist; create one with `edgeseg calibration synth`")
    src = folder / "images" if (folder / "images").is_dir() else folder
    paths = list_images(src)
    if not paths:
        raise InputError(f"{src}: calibration folder has no images (.png/.jpg); run `edgeseg calibration synth --out {folder}`")
    if limit:
        paths = paths[:limit]
    images = []
    for p in paths:
        img = read_rgb(p)
        if image_hw is not None and img.shape[:2] != tuple(image_hw) and fit:
            from edgeseg.runtime.preprocess import fit_image

            img = fit_image(img, tuple(image_hw), "letterbox")[0]
        elif image_hw is not None and img.shape[:2] != tuple(image_hw):
            raise InputError(f"{p}: calibration image is {img.shape[1]}x{img.shape[0]} but the model takes "
                             f"{image_hw[1]}x{image_hw[0]}; regenerate the set for this model (edgeseg calibration synth)")
        images.append(img)
    return np.stack(images)
