"""The settings of ``cmi-glue train`` and ``cmi-glue distill`` runs, checked when they are made.

Plain dataclasses, no ``transformers``, ``datasets`` or scikit-learn: the command line turns a refused setting into
a usage error without loading them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Optional

from ..options import check_int, check_number, check_temperature
from ..regularizer import CENTROID_MODES, NORMALIZATIONS

CMI_SIGNS = {"none": 0.0, "min": 1.0, "max": -1.0}
FEATURES = ("pooled", "cls")
# Seeds numpy takes (transformers.set_seed seeds numpy with it too).
MAX_SEED = 2**32 - 1
# The Trainer's checkpoint folders in an output directory (a run replaces those of the run before it).
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")


def check_not_in_a_checkpoint(name: str, path: Optional[str], output_dir: str) -> None:
    """Refuse a local model ``path`` inside a ``checkpoint-*`` of ``output_dir``: the run removes those folders,
    possibly while another torchrun rank still loads from it."""
    if not path or not os.path.exists(path):
        return  # a hub name, or a path the loader will report
    inside = os.path.relpath(os.path.realpath(path), os.path.realpath(output_dir)).split(os.sep)[0]
    if CHECKPOINT_NAME.fullmatch(inside):
        raise ValueError(
            f"{name} {path!r} lies in {inside} of output_dir {output_dir!r}, which this run replaces: "
            "copy it out of output_dir first"
        )


# Settings that locate a run or say how it is executed, not what it computes: a finished run is reused (sweeps), and
# a checkpoint resumed, whatever they are now.
WHERE_AND_HOW = frozenset(
    {
        "output_dir",
        "data_dir",
        "eval_batch_size",
        "keep_checkpoints",
        "resume",
        "disable_tqdm",
        "cache_teacher_logits",
        "full_determinism",
    }
)


def changed_settings(config: TrainConfig, stored: dict) -> str:
    """``"name: stored there, config's now; ..."`` for each setting outside :data:`WHERE_AND_HOW` in which ``config``
    differs from ``stored`` (a config as ``results.json`` stores it), or ``""``.

    A setting ``stored`` lacks was added after that run was made, which then ran as the setting's default does: it
    differs when ``config`` sets another value (a setting without a default always does)."""
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))  # as results.json stores it (tuples as lists)
    defaults = {field.name: field.default for field in dataclasses.fields(config)}  # plain values, as stored
    changes = []
    for key in sorted(wanted.keys() - WHERE_AND_HOW):
        if key in stored:
            if wanted[key] != stored[key]:
                changes.append(f"{key}: {stored[key]!r} there, {wanted[key]!r} now")
        elif defaults[key] is dataclasses.MISSING:
            changes.append(f"{key}: not recorded there, {wanted[key]!r} now")
        elif wanted[key] != defaults[key]:
            changes.append(f"{key}: not recorded there (so the default {defaults[key]!r}), {wanted[key]!r} now")
    return "; ".join(changes)


@dataclasses.dataclass
class TrainConfig:
    """Everything one ``cmi-glue train`` run depends on (written to ``results.json`` as ``config``)."""

    task: str
    model: str
    output_dir: str
    data_dir: str | None = None
    cmi: str = "none"
    cmi_lambda: float = 0.1
    centroids: str = "batch"
    feature: str = "pooled"
    temperature: float = 1.0
    normalization: str = "none"
    momentum: float = 0.9
    epochs: float = 5.0
    batch_size: int = 32
    eval_batch_size: int | None = None
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_seq_length: int = 128
    seed: int = 0
    bf16: bool = False
    full_determinism: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    keep_checkpoints: bool = False
    resume: bool = False
    disable_tqdm: bool = False

    def __post_init__(self):
        if self.cmi not in CMI_SIGNS:
            raise ValueError(f"cmi must be one of {tuple(CMI_SIGNS)}, got {self.cmi!r}")
        if self.centroids not in CENTROID_MODES:
            raise ValueError(f"centroids must be one of {CENTROID_MODES}, got {self.centroids!r}")
        if self.feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {self.feature!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        check_temperature(self.temperature)  # as CMIRegularizer checks them, before anything loads
        check_number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        if not 0 <= self.cmi_lambda < math.inf:
            raise ValueError(
                f"cmi_lambda must be a finite number >= 0 (the sign comes from cmi=min/max), got {self.cmi_lambda!r}"
            )
        if not (self.epochs > 0 and float(self.epochs).is_integer()):
            raise ValueError(
                f"epochs must be a positive whole number (evaluation, checkpoints and the history are per epoch), "
                f"got {self.epochs!r}"
            )
        # Plain ints (numpy's are taken too), as results.json stores them.
        self.max_seq_length = check_int("max_seq_length", self.max_seq_length)
        self.batch_size = check_int("batch_size", self.batch_size)
        for name in ("eval_batch_size", "max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name)))
        self.seed = check_int("seed", self.seed, 0, MAX_SEED)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1) (a fraction of the steps), got {self.warmup_ratio!r}")
        if self.resume and not self.keep_checkpoints:
            raise ValueError("resume needs keep_checkpoints (checkpoints with optimizer state) in output_dir")
        for name, path in self.weight_sources():
            check_not_in_a_checkpoint(name, path, self.output_dir)

    def weight_sources(self) -> list:
        """``(option, path)`` of the weights the run loads."""
        return [("model", self.model)]

    @property
    def cmi_weight(self) -> float:
        """``sign * lambda``: the factor of the CMI term in the training loss."""
        return CMI_SIGNS[self.cmi] * self.cmi_lambda


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    """A :class:`TrainConfig` (``model``: where the student's weights come from) plus the distillation options.

    ``student``: a model directory or hub name for the student; ``None`` builds a DistilBERT from the
    teacher's ``student_layers`` (default: evenly spread). ``cache_teacher_logits``: compute the
    teacher's training-set logits once before training instead of once per batch. ``epochs`` defaults to the
    paper's 10, as ``cmi-glue distill`` does; ``resume`` is refused (distillation starts over).
    """

    epochs: float = 10.0
    teacher: str = ""
    student: Optional[str] = None
    student_layers: Optional[list] = None
    alpha: float = 0.5
    kd_temperature: float = 2.0
    cache_teacher_logits: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher:
            raise ValueError("teacher must name a directory written by cmi-glue train")
        if self.student is not None and self.student_layers is not None:
            raise ValueError(
                "student and student_layers exclude each other: give a ready student model, or the teacher layers "
                "to build one from"
            )
        if self.student_layers is not None:
            # Plain ints (numpy's too, e.g. np.arange(0, 12, 2)), as results.json stores them; their order and the
            # teacher's depth are checked when the student is built (check_layers).
            self.student_layers = [check_int("student_layers", layer, low=0) for layer in self.student_layers]
            if not self.student_layers:
                raise ValueError("student_layers must name at least one teacher layer, got []")
        if self.cmi != "none":
            raise ValueError(f"cmi must be 'none' for distillation (the KD loss replaces it), got {self.cmi!r}")
        if self.resume:  # distill() would silently start over
            raise ValueError("resume is not supported for distillation: start the run over")
        if os.path.isdir(self.teacher) and os.path.realpath(self.teacher) == os.path.realpath(self.output_dir):
            # (a student or --model there is a run continued in place, as train allows)
            raise ValueError(
                f"teacher {self.teacher!r} is output_dir, where the student would replace it: give another output_dir"
            )
        check_number("alpha", self.alpha, 0.0, 1.0)  # as KDLoss checks them, under this config's names
        check_temperature(self.kd_temperature, "kd_temperature")

    def weight_sources(self) -> list:
        return [("teacher", self.teacher), ("student", self.student)]
