"""The training loop: teacher training, distillation, and the ground-truth-only baseline.

Read it top to bottom: set-up (devices, DDP, data, models, optimizer), resume, then the loop
(one optimizer step per batch; a validation, JSONL record, visualisation and checkpoint per
epoch). The frozen teacher and the ONNX feature teacher run under ``no_grad``; the projection
head belongs to the feature loss, trains beside the student and is saved under its own checkpoint
key (``projection``).

Exact resume: the data order is a function of (seed, epoch), augmentation a function of
(seed, epoch, index), and every RNG stream is saved in the checkpoint, so a run resumed from
``last.pt`` (at an epoch boundary or after ``--max-steps``) equals an uninterrupted run.

What is not the loop lives beside it: the job (``job.py``), the device (``device.py``), process
groups and rank-0-first (``distributed.py``), the epoch sampler (``sampler.py``), checkpoint
identity, resume checks and ``best.pt`` repair (``resume.py``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn

from edgeseg.distill.checkpoint import capture_rng, load_checkpoint, restore_rng, save_atomic
from edgeseg.distill.config import DistillConfig, TrainConfig, config_to_dict
from edgeseg.distill.data import SegmentationDataset, StudentData, split_samples, student_data
from edgeseg.distill.device import peak_device_mb, use_device
from edgeseg.distill.distributed import all_finite, barrier, init_distributed, main_first
from edgeseg.distill.evaluation import load_eval_set, logits_to_masks, make_loader, predict_logits, score
from edgeseg.distill.job import TrainJob
from edgeseg.distill.losses import DistillationLoss, DistillationModel, ProjectionHead, temperature_at
from edgeseg.distill.models import build_model, count_parameters
from edgeseg.distill.resume import CHECKPOINT_FORMAT, check_resumable, copy_best, repair_best, run_identity, teacher_identity
from edgeseg.distill.sampler import EpochSampler, steps_per_epoch
from edgeseg.distill.sources import HARD_EXAMPLES, FixedSource, Generate, SampleSource, SourceContext, describe, sources_for
from edgeseg.distill.targets import TeacherTargets, cache_bytes
from edgeseg.distill.visualize import comparison_grid, save_png
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.profiler import peak_rss_mb

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # a log line at least this often inside an epoch (logs, not only the terminal bar)


class _Flagged(torch.utils.data.Dataset):
    """A training dataset's items with what the step needs beside them: (image, mask, labelled, theta, row).

    ``labelled``: whether the item carries a ground-truth mask; ``theta``: its augmentation's affine
    (the dataset is built with ``geometry=True``); ``row``: its cached teacher targets' row (-1: none).
    """

    def __init__(self, dataset: SegmentationDataset, labelled: bool, rows: torch.Tensor | None = None):
        self.dataset, self.labelled = dataset, torch.tensor(labelled)
        self.rows = rows if rows is not None else torch.full((len(dataset),), -1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, mask, _, theta = self.dataset[index]
        return image, mask, self.labelled, theta, self.rows[index]


def _lr_lambda(train: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
        floor = train.min_lr / train.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class Trainer:
    """Trains one :class:`TrainJob`; ``run()`` returns the final validation metrics."""

    def __init__(self, cfg: DistillConfig, job: TrainJob, max_steps: int | None = None, fresh: bool = False,
                 generators: dict[str, Generate] | None = None):
        """``generators``: regenerating sample sources by name (``hard_examples``), wired by the command layer."""
        self.cfg, self.job, self.max_steps, self.fresh = cfg, job, max_steps, fresh
        self.generators = generators or {}
        self.device = use_device(cfg.device, cfg.threads, int(os.environ.get("LOCAL_RANK", "0")))
        self.rank, self.world = init_distributed(self.device)
        self.is_main = self.rank == 0
        self.amp = job.train.amp and self.device.type == "cuda"

    # --- set-up ------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, job = self.cfg, self.job
        # rank 0 generates the demo set (if needed) while the others wait
        self.data = main_first(lambda: self._training_data(), self.is_main, self.world)
        val_samples = split_samples(cfg, "val")
        self.train_set = SegmentationDataset(self.data.labelled, cfg.data, train=True, seed=cfg.seed, geometry=True)
        self.sources: list[SampleSource] = sources_for(job.train, self.data, self.generators)
        self.grouped = any(not s.labelled for s in self.sources)  # unlabelled sources: loss terms per group too
        self._source_sets: dict[str, tuple[list, SegmentationDataset]] = {}
        for src in self.sources:
            log.info("%s: %.1f%% of each epoch's samples from %s (%s)", job.role, 100 * src.share, src.name,
                     "labelled" if src.labelled else "unlabelled: teacher terms only")
        self.val_set = SegmentationDataset(val_samples, cfg.data, train=False)
        self.steps_per_epoch = steps_per_epoch(self.data.epoch_length, job.train.batch_size, self.world)
        if self.steps_per_epoch == 0:
            raise InputError(f"{self.data.epoch_length} training images are fewer than one batch of "
                             f"{job.train.batch_size} x {self.world} processes; lower train.batch_size")
        self.total_steps = self.steps_per_epoch * job.train.epochs

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        student = build_model(job.model, job.feature_stride)
        if job.freeze_encoder:
            student.encoder.requires_grad_(False)

        self.memory_format = torch.channels_last if job.train.channels_last else torch.contiguous_format
        from edgeseg.distill.teachers import feature_teacher_model, open_teachers

        features = job.loss.feature > 0
        if features:  # rank 0 exports the shipped detector (and exposes the tensor) before the others read it
            main_first(lambda: feature_teacher_model(cfg), self.is_main, self.world)
        with torch.random.fork_rng(devices=[]):  # building a torch teacher draws random weights first: not from ours
            self.teacher, self.feature_teacher = main_first(
                lambda: open_teachers(cfg, self.device, job.loss.uses_teacher, features), self.is_main, self.world)
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
            self.teacher.to(memory_format=self.memory_format)
        self.teacher_identity = teacher_identity(cfg) if self.teacher is not None else None
        projection = None
        if self.feature_teacher is not None:
            c_t, h_t, w_t = self.feature_teacher.feature_shape(cfg.data.image_size)
            log.info("feature teacher: %s -> (%d, %d, %d)", cfg.feature_teacher.tensor, c_t, h_t, w_t)
            projection = ProjectionHead(student.feature_channels, cfg.feature_teacher.hidden_channels, c_t)
        # The loss owns the projection head; the training module holds the same object for the optimizer and DDP.
        self.loss_fn = DistillationLoss(job.loss, channel_norm=cfg.feature_teacher.channel_norm, projection=projection)
        self.targets: TeacherTargets | None = None  # filled by run() once resume has found work to do
        self.targets_mode = self._targets_mode()

        self.net = DistillationModel(student, self.loss_fn.projection).to(self.device, memory_format=self.memory_format)
        self.model = self.net  # the unwrapped module (checkpoints, validation)
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=job.train.lr, weight_decay=job.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(job.train, self.total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch, self.batch_in_epoch, self.step, self.best_miou, self.best_epoch = 0, 0, 0, -1.0, 0
        # early stopping (train.patience): the val mIoU the next validation must beat by min_delta, and when it was set
        self.plateau_miou, self.plateau_epoch, self.stopped_early = -1.0, 0, False
        self.epoch_sums: dict[str, float] = {}  # this epoch's running loss sums (saved: a resumed epoch continues them)
        self.last_metrics: dict = {}
        log.info("%s: %d trainable / %d parameters, %d steps/epoch x %d epochs, device %s%s", job.role,
                 sum(p.numel() for p in params), count_parameters(self.model), self.steps_per_epoch,
                 job.train.epochs, self.device, f", {self.world} processes" if self.world > 1 else "")

    def _fixed_samples(self) -> list:
        """The labelled images and every fixed source's: what the target cache holds from the start."""
        return [*self.data.labelled, *(s for src in self.sources if isinstance(src, FixedSource) for s in src.items)]

    def _targets_mode(self) -> str | None:
        """How the frozen teachers' outputs reach the step: ``cached`` or ``live`` (``train.teacher_targets``,
        ``auto`` resolved by the cache's size); None without teachers. Part of the run's identity."""
        if self.teacher is None and self.feature_teacher is None:
            return None
        mode = self.job.train.teacher_targets
        if mode != "auto":
            return mode
        hw = tuple(self.cfg.data.image_size)
        feature = self.feature_teacher.feature_shape(hw) if self.feature_teacher is not None else None
        need = cache_bytes(len(self._fixed_samples()), hw if self.teacher is not None else (0, 0), feature)
        if need > self.job.train.cache_limit_mb * 2**20:
            log.info("%s: the teachers run on every batch (train.teacher_targets: auto): caching %d images' outputs would "
                     "take %.0f MB, over train.cache_limit_mb %d", self.job.role, len(self._fixed_samples()),
                     need / 2**20, self.job.train.cache_limit_mb)
            return "live"
        return "cached"

    def _teacher_targets(self) -> TeacherTargets | None:
        """The cache of the frozen teachers' outputs, filled for every fixed sample (None when they run live)."""
        if self.targets_mode != "cached":
            return None
        targets = TeacherTargets(self.teacher, self.feature_teacher, self.cfg.data, self.device)
        targets.ensure(self._fixed_samples())
        return targets

    def _identity(self) -> dict:
        """The settings a checkpoint must share with this run to be resumed by it (``resume.run_identity``)."""
        return run_identity(self.cfg, self.job, self.world, targets=self.targets_mode, teacher=self.teacher_identity)

    def _training_data(self) -> StudentData:
        """The teacher's corpus (all labelled), or the student's labelled subset and unlabelled sources."""
        if self.job.role == "teacher":
            samples = split_samples(self.cfg, "teacher")
            return StudentData(samples, {}, len(samples))
        data = student_data(self.cfg)
        if self.job.role == "baseline":  # the labelled subset alone, over the same epoch length
            data = StudentData(data.labelled, {}, data.epoch_length)
        return data

    def data_summary(self) -> dict:
        """The label budget and every source, for reports."""
        return {"labelled": len(self.data.labelled), "epoch_length": self.data.epoch_length,
                "unlabelled": {k: len(v) for k, v in self.data.unlabelled.items()},
                "sources": describe(self.sources)}

    def _resume(self) -> bool:
        """Load ``last.pt`` if there is one; True if training already finished."""
        last = self.job.out_dir / "last.pt"
        if self.fresh or not last.is_file():
            stale = self.job.out_dir / HARD_EXAMPLES  # generated against another run's student
            if self.is_main and stale.is_dir():
                shutil.rmtree(stale)
            return False
        ckpt = load_checkpoint(last)
        check_resumable(ckpt, last, self._identity())
        self.model.student.load_state_dict(ckpt[self.job.state_key])
        if self.loss_fn.projection is not None:
            self.loss_fn.projection.load_state_dict(ckpt["projection"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        elif self.scaler.is_enabled():
            # A disabled scaler (CPU, or AMP off) saves an empty state, which load_state_dict rejects:
            # a CPU checkpoint resumed on CUDA with AMP starts a fresh scale instead.
            log.info("%s has no AMP scaler state (saved without AMP); starting a fresh gradient scale", last)
        self.epoch, self.batch_in_epoch, self.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        self.best_miou, self.last_metrics = ckpt["best_miou"], ckpt.get("metrics", {})
        self.best_epoch = ckpt.get("best_epoch", 0)
        self.plateau_miou, self.plateau_epoch = ckpt.get("plateau", (-1.0, 0))
        self.stopped_early = ckpt.get("stopped_early", False)
        self.epoch_sums = dict(ckpt.get("epoch_sums", {}))
        restore_rng(ckpt["rng"])
        if self.is_main:
            repair_best(ckpt, self.job.out_dir)
        if ckpt.get("complete"):
            log.info("%s is complete (%d epochs); nothing to do (pass --fresh to retrain)", last, self.epoch)
            return True
        log.info("resuming from %s at epoch %d, batch %d (step %d)", last, self.epoch, self.batch_in_epoch, self.step)
        return False

    def _save(self, complete: bool) -> None:
        if not self.is_main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "role": self.job.role,
            self.job.state_key: self.model.student.state_dict(),
            "projection": self.loss_fn.projection.state_dict() if self.loss_fn.projection is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "best_miou": self.best_miou, "best_epoch": self.best_epoch, "epoch_sums": self.epoch_sums,
            "plateau": (self.plateau_miou, self.plateau_epoch), "stopped_early": self.stopped_early,
            "metrics": self.last_metrics, "complete": complete,
            "rng": capture_rng(), "identity": self._identity(), "config": config_to_dict(self.cfg),
        }
        save_atomic(ckpt, self.job.out_dir / "last.pt")

    # --- validation --------------------------------------------------------------------------

    def _prepare_validation(self) -> None:
        bs = max(self.job.train.batch_size, 8)
        self.val_loader = make_loader(self.val_set, bs, self.cfg.data.workers)
        self.val = load_eval_set(self.val_set)
        self.val_teacher = self.val_teacher_fitted = None
        if self.teacher is not None:  # frozen: its predictions are computed once
            logits = predict_logits(self.teacher, self.val_loader, self.device)
            self.val_teacher = logits_to_masks(logits, self.val.placements)
            self.val_teacher_fitted = (logits > 0).astype(np.uint8)
            s = score(self.val_teacher, self.val.gt)
            log.info("teacher on validation: mIoU %.4f, person IoU %.4f", s["miou"], s["person_iou"])

    def _validate(self) -> dict:
        logits = predict_logits(self.model.student, self.val_loader, self.device)
        pred = logits_to_masks(logits, self.val.placements)
        metrics = {f"val_{k}": v for k, v in score(pred, self.val.gt, self.val_teacher).items()}
        n = min(self.job.train.vis_images, len(pred))
        if n:  # the picture shows the model's input view (letterboxed)
            name = "student" if self.job.role != "teacher" else "model"
            preds = {"teacher": self.val_teacher_fitted[:n]} if self.val_teacher is not None else {}
            preds[name] = (logits[:n] > 0).astype(np.uint8)
            pair = ("teacher", name) if self.val_teacher is not None else None
            grid = comparison_grid(self.val.images[:n], self.val.gt_fitted[:n], preds, pair)
            save_png(grid, self.job.out_dir / "vis" / f"epoch_{self.epoch:03d}.png")
        return metrics

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to the last epoch (or ``--max-steps``); the last validation record.

        1. set up; 2. resume ``last.pt`` (done if it is complete); 3. each epoch: train its batches,
        then record, validate and checkpoint it.
        """
        self._setup()
        if self._resume():
            return self.last_metrics
        self.targets = self._teacher_targets()
        if self.is_main:
            self.job.out_dir.mkdir(parents=True, exist_ok=True)
            (self.job.out_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=1))
            self._prepare_validation()
        while self.epoch < self.job.train.epochs and not self.stopped_early:
            trained = self._train_epoch()
            if trained is None:  # stopped at --max-steps, checkpoint saved
                return self.last_metrics
            self._end_epoch(*trained)
        return self.last_metrics

    def _plateaued(self, val_miou: float | None) -> bool:
        """Whether training stops here: ``train.patience`` validations without a gain of ``min_delta`` (same on every rank)."""
        train = self.job.train
        if val_miou is not None and val_miou > self.plateau_miou + train.min_delta:
            self.plateau_miou, self.plateau_epoch = val_miou, self.epoch
        if train.patience == 0:
            return False
        stop = torch.tensor([int(val_miou is not None
                                 and (self.epoch - self.plateau_epoch) // train.eval_every >= train.patience)],
                            device=self.device)  # NCCL broadcasts device tensors only
        if self.world > 1:
            torch.distributed.broadcast(stop, src=0)
        return bool(stop.item())

    def _train_epoch(self) -> tuple[dict[str, float], int, float] | None:
        """The rest of this epoch's batches: (loss sums, batches seen, start time), or None at ``--max-steps``."""
        from tqdm import tqdm

        train = self.job.train
        dataset, mix = self._epoch_data()
        sampler = EpochSampler(len(self.train_set), self.cfg.seed, self.epoch, self.rank, self.world,
                               skip=self.batch_in_epoch * train.batch_size, batch_size=train.batch_size, mix=mix,
                               length=self.data.epoch_length)
        loader = torch.utils.data.DataLoader(dataset, batch_size=train.batch_size, sampler=sampler,
                                             num_workers=self.cfg.data.workers, drop_last=True,
                                             pin_memory=self.device.type == "cuda")
        self.net.train()
        if self.job.freeze_encoder:  # frozen BN statistics too, not only frozen weights
            self.model.student.encoder.eval()
        sums = self.epoch_sums
        t_epoch = t_logged = time.perf_counter()
        start_batch = self.batch_in_epoch
        bar = tqdm(loader, desc=f"{self.job.role} epoch {self.epoch + 1}/{train.epochs}",
                   initial=self.batch_in_epoch, total=self.steps_per_epoch, disable=None if self.is_main else True,
                   leave=False)
        for images, masks, labelled, theta, rows in bar:
            terms = self._step(images, masks, labelled, theta, rows)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            self.batch_in_epoch += 1
            self.step += 1
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            now = time.perf_counter()
            if self.is_main and now - t_logged >= PROGRESS_EVERY_S:
                t_logged = now
                per_step = (now - t_epoch) / (self.batch_in_epoch - start_batch)
                log.info("%s epoch %d/%d: batch %d/%d, loss %.4f, %.2f s/step, epoch ends in about %.0f s",
                         self.job.role, self.epoch + 1, train.epochs, self.batch_in_epoch, self.steps_per_epoch,
                         sums["loss"] / max(self.batch_in_epoch, 1), per_step,
                         per_step * (self.steps_per_epoch - self.batch_in_epoch))
            if self.max_steps is not None and self.step >= self.max_steps:
                self._save(complete=False)
                log.info("stopped after --max-steps %d; resume by running the same command", self.max_steps)
                return None
        bar.close()
        return sums, self.batch_in_epoch, t_epoch

    def _end_epoch(self, sums: dict[str, float], seen: int, t_epoch: float) -> None:
        """Close the epoch: its JSONL record (validated every ``eval_every``), ``last.pt``, and ``best.pt``."""
        train = self.job.train
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums = {}
        record = {"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0]}
        if self.job.loss.kl > 0:
            record["temperature"] = temperature_at(self.job.loss.temperature, self.step / self.total_steps)
        record.update(self._epoch_terms(sums, seen))
        record["epoch_time_s"] = time.perf_counter() - t_epoch
        record["peak_rss_mb"] = peak_rss_mb()  # this process's peak so far (machine-dependent, like the time)
        if (device_peak := peak_device_mb(self.device)) is not None:
            record["peak_cuda_mb"] = device_peak
        if self.is_main and (self.epoch % train.eval_every == 0 or self.epoch == train.epochs):
            record.update(self._validate())
            self.last_metrics = record
            if record["val_miou"] > self.best_miou:
                self.best_miou, self.best_epoch = record["val_miou"], self.epoch
                record["best"] = True
        self.stopped_early = self._plateaued(record.get("val_miou")) and self.epoch < train.epochs
        if self.stopped_early:
            record["stopped_early"] = True
            log.info("%s: val mIoU has not improved by %.4g for %d validations (best %.4f at epoch %d): stopping at "
                     "epoch %d of %d", self.job.role, train.min_delta, train.patience, self.best_miou, self.best_epoch,
                     self.epoch, train.epochs)
        if self.is_main:
            with open(self.job.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", self.epoch, ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                           if isinstance(v, float)))
        self._save(complete=self.epoch == train.epochs or self.stopped_early)
        if self.is_main and record.get("best"):
            copy_best(self.job.out_dir)  # a byte copy of the checkpoint just written
        barrier(self.world)

    # --- the epoch's data: the labelled images and every sample source -------------------------

    def _epoch_data(self) -> tuple[torch.utils.data.Dataset, tuple[tuple[int, float], ...]]:
        """This epoch's dataset (labelled images, then each active source) and the sources' (size, share)."""
        ctx = SourceContext(self.model.student, self.job.out_dir, self.cfg.seed, self.device, self.is_main,
                            lambda fn: main_first(fn, self.is_main, self.world))
        parts: list[tuple[SegmentationDataset, bool, float]] = [(self.train_set, True, 0.0)]
        for src in self.sources:
            samples = src.samples(self.epoch, ctx)
            if samples is None:
                continue
            cached = self._source_sets.get(src.name)
            if cached is None or cached[0] is not samples:  # a new set (first use, or regenerated)
                if self.targets is not None:
                    self.targets.ensure(samples)
                cached = (samples, SegmentationDataset(samples, self.cfg.data, train=True, seed=self.cfg.seed,
                                                       geometry=True))
                self._source_sets[src.name] = cached
            parts.append((cached[1], src.labelled, src.share))
        for d, _, _ in parts:
            d.set_epoch(self.epoch)
        rows = (lambda d: self.targets.rows_of(d.samples)) if self.targets is not None else (lambda d: None)
        data = torch.utils.data.ConcatDataset([_Flagged(d, labelled, rows(d)) for d, labelled, _ in parts])
        return data, tuple((len(d), share) for d, _, share in parts[1:])

    def _epoch_terms(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        """The epoch's JSONL loss terms: per-step means; a group's term (``kl_unlabelled``) per sample of it."""
        out = {}
        for k, v in sums.items():
            if k.startswith("n_"):
                continue
            group = k.rsplit("_", 1)[-1]
            if group in ("labelled", "unlabelled"):
                out[f"loss_{k}"] = v / max(sums.get(f"n_{group}", 0.0), 1.0)
            elif k in ("bce", "dice") and "n_gt_steps" in sums:  # over the steps that had a labelled sample
                out[f"loss_{k}"] = v / max(sums["n_gt_steps"], 1.0)
            else:
                out[f"loss_{k}" if k != "loss" else k] = v / max(steps, 1)
        if "n_unlabelled" in sums:
            out["unlabelled_fraction"] = sums["n_unlabelled"] / max(sums["n_unlabelled"] + sums.get("n_labelled", 0.0), 1.0)
        return out

    def _teachers(self, images: torch.Tensor, theta: torch.Tensor, rows: torch.Tensor):
        """The batch's teacher logits and features: from the cache, moved like the batch, or the teachers run on it."""
        if self.targets is not None:
            return self.targets.targets(rows, theta)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            teacher_logits = self.teacher(images) if self.teacher is not None else None
        # The feature teacher reads the batch's memory directly (IOBinding): no copy, no numpy.
        teacher_feature = self.feature_teacher(images) if self.feature_teacher is not None else None
        return teacher_logits, teacher_feature

    def _step(self, images: torch.Tensor, masks: torch.Tensor, labelled: torch.Tensor, theta: torch.Tensor,
              rows: torch.Tensor) -> dict[str, float]:
        """One optimizer step; the loss terms (a group's term as a sum over its samples, with ``n_<group>``)."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        masks = masks.to(self.device, non_blocking=True)
        grouped = self.grouped
        # group sizes from the loader's host tensor: no device round trip per step
        n = {"labelled": int(labelled.sum()), "unlabelled": int((~labelled).sum())} if grouped else {}
        labelled = labelled.to(self.device, non_blocking=True)
        temperature = temperature_at(self.job.loss.temperature, self.step / self.total_steps)
        teacher_logits, teacher_feature = self._teachers(images, theta, rows)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits, projected = self.net(images)
        loss, terms = self.loss_fn(logits, masks, temperature, teacher_logits, projected, teacher_feature,
                                   labelled if grouped else None)
        if not all_finite(loss, self.world):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step} (on this rank or another); "
                                     "lower train.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.job.train.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.job.train.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        out = {"loss": loss.item()}
        if grouped:  # groups apart, summed per sample (the epoch divides by each group's count)
            out.update({f"n_{g}": float(c) for g, c in n.items()})
            out["n_gt_steps"] = float("bce" in terms or "dice" in terms)
            for k, v in terms.items():
                group = k.rsplit("_", 1)[-1]
                out[k] = v.item() * n[group] if group in n else v.item()
        else:
            out.update({k: v.item() for k, v in terms.items()})
        return out
