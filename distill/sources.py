"""Sources of training samples beside the labelled split, each with a share of every epoch.

Extra labelled pairs, unlabelled frames and regenerated hard examples are one idea: a stream of
samples, labelled or not, that fills a fixed share of each epoch's slots (the epoch keeps its
length, so the compute budget stays the same). A source is either fixed (:class:`FixedSource`) or
regenerated every K epochs against the current student (:class:`RegeneratedSource`, whose
``generate`` callable is handed in by the command layer: distill names no generator).

On an unlabelled source's samples only the teacher terms apply (the trainer masks the
ground-truth terms per sample, see ``DistillationLoss``).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from edgeseg.distill.config import TrainConfig
from edgeseg.distill.data import Sample, StudentData, folder_samples
from edgeseg.runtime.errors import InputError

log = logging.getLogger(__name__)

HARD_EXAMPLES = "hard"  # the hard-example source's name and folder under the run

# (student copy in eval mode, output folder, base seed) -> a summary dict; writes images/, masks/, manifest.json
Generate = Callable[[torch.nn.Module, Path, int], dict]


@dataclass
class SourceContext:
    """What a source may need from the running trainer at the start of an epoch."""

    student: torch.nn.Module  # the network being trained (copy it before use)
    out_dir: Path  # the run's folder; regenerated sets live under <out_dir>/<source name>/
    seed: int  # the run's training seed
    device: torch.device
    is_main: bool  # rank 0 generates, the others wait and read
    main_first: Callable[[Callable[[], Any]], Any]  # fn() on rank 0 first, then on the others (distributed.main_first)


class SampleSource(Protocol):
    name: str  # shown in logs and JSONL; a regenerated source's folder under the run
    share: float  # share of each epoch's slots, in [0, 1)
    labelled: bool  # False: teacher terms only

    def samples(self, epoch: int, ctx: SourceContext) -> list[Sample] | None:
        """This epoch's samples, or None while the source is not active (yet)."""


@dataclass
class FixedSource:
    """The same samples every epoch (a folder of pairs, the unlabelled pool, site frames)."""

    name: str
    share: float
    labelled: bool
    items: list[Sample]

    def samples(self, epoch: int, ctx: SourceContext) -> list[Sample]:
        return self.items


@dataclass
class RegeneratedSource:
    """A labelled set rewritten every ``every`` epochs from ``start`` by ``generate`` (ConfiG hard examples).

    The set for epoch ``e`` lives in ``<out_dir>/<name>/epoch<e>``: a resumed run reuses it. The
    training RNG streams stay untouched (generation runs under a forked RNG), so a resumed run,
    which skips generation, sees the same ones.
    """

    name: str
    share: float
    every: int
    start: int
    generate: Generate
    labelled: bool = True
    _folder: Path | None = field(default=None, repr=False)
    _items: list[Sample] = field(default_factory=list, repr=False)

    def samples(self, epoch: int, ctx: SourceContext) -> list[Sample] | None:
        if epoch < self.start:
            return None
        due = self.start + (epoch - self.start) // self.every * self.every
        folder = ctx.out_dir / self.name / f"epoch{due:03d}"
        if folder == self._folder:
            return self._items

        def generate_once() -> list[Sample]:  # rank 0 writes the set (unless a resumed run has it), all read it
            if ctx.is_main and not (folder / "manifest.json").is_file():
                self._generate(epoch, due, folder, ctx)
            return folder_samples(folder)

        self._items = ctx.main_first(generate_once)
        self._folder = folder
        return self._items

    def _generate(self, epoch: int, due: int, folder: Path, ctx: SourceContext) -> None:
        t0 = time.perf_counter()
        log.info("epoch %d: generating %s against the current student -> %s", epoch + 1, self.name, folder)
        student = copy.deepcopy(ctx.student).eval()
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            # a new seed range per regeneration (pool images take seed + index): new masks and noise each time
            info = self.generate(student, folder, (ctx.seed * 1_009 + due) * 100_003)
        log.info("%s: %s in %.0f s", self.name, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in info.items()), time.perf_counter() - t0)


def sources_for(train: TrainConfig, data: StudentData, generators: dict[str, Generate] | None = None) -> list[SampleSource]:
    """The sources a training job's config asks for, in a fixed order (the sampler's slots follow it).

    Args:
        train: the job's settings (extra data, unlabelled share, hard examples).
        data: the student's data (labelled subset and unlabelled sources).
        generators: regenerating plug-ins by name, wired by the command layer; ``hard_examples``
            is calibration's ConfiG generator.
    """
    out: list[SampleSource] = []
    if train.extra_share > 0:
        out.append(FixedSource("extra", train.extra_share, True, folder_samples(train.extra_data)))
    if train.unlabelled_share > 0:
        if not data.unlabelled:
            raise InputError("train.unlabelled_share > 0 but there are no unlabelled images; set data.unlabelled "
                             "(--images DIR) or data.labelled_count")
        each = train.unlabelled_share / len(data.unlabelled)  # split equally: a small site folder still counts
        out += [FixedSource(name, each, False, items) for name, items in data.unlabelled.items()]
    hard = train.hard_examples
    if hard.share > 0:
        make = (generators or {}).get("hard_examples")
        if make is None:
            raise InputError("train.hard_examples needs calibration's generator, which the `edgeseg` command wires "
                             "in: run `edgeseg distill train ...` with the calibration stage installed")
        out.append(RegeneratedSource(HARD_EXAMPLES, hard.share, hard.every, hard.start, make))
    return out


def describe(sources: Sequence[SampleSource]) -> dict:
    """What a report says about the sources: name -> share, labelled and (fixed sources) count."""
    return {s.name: {"share": s.share, "labelled": s.labelled,
                     **({"count": len(s.items)} if isinstance(s, FixedSource) else {})} for s in sources}

