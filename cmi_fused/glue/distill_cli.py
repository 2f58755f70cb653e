"""What ``cmi-glue distill``, ``select-teacher`` and ``distill-sweep`` run (their options: :mod:`.cli`): knowledge
distillation of GLUE teachers.

``distill`` trains a student (a ``--student`` model, or a DistilBERT built from the teacher's layers,
:func:`cmi_fused.distill.build_student`) with ``(1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T)``
on the same data, metrics, ``Trainer`` settings and ``results.json`` as ``cmi-glue train``.
``select-teacher`` picks the run with the highest best-metric / training-set-CMI ratio.
``distill-sweep`` runs teachers x alpha x T x seeds and tabulates the median best-epoch metric per arm.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Optional, Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from ..distill import (
    DistillationTrainer,
    build_student,
    default_student_layers,
    teacher_logits_for,
    with_teacher_logits,
)
from ..kd import KDLoss
from .config import DistillConfig
from .data import GlueData, load_task, tokenize_split, tokenize_task
from .sweep import (
    format_sweep_markdown,
    format_training_markdown,
    machine_description,
    reuse_or_run_each,
    run_record,
    schedule_text,
    summarize_arms,
    value_label,
    write_sweep,
)
from .tasks import GlueTask, task_key
from .train import (
    REGULARIZER_FILE,
    RESULTS_FILE,
    build_results,
    build_training_arguments,
    check_head_labels,
    eval_metric_names,
    history_from_log,
    label_maps,
    load_model_and_tokenizer,
    remove_checkpoints,
    save_run,
    trained_task,
)


def load_teacher(teacher_dir: str, task: GlueTask):
    """The teacher classifier (frozen later by the trainer) and its tokenizer. A directory of a run trained on
    another task (its ``results.json`` says which) is refused."""
    if not os.path.isdir(teacher_dir):
        raise FileNotFoundError(f"--teacher {teacher_dir!r} is not a directory: pass one written by cmi-glue train")
    teacher_task = trained_task(teacher_dir)
    if teacher_task is not None and task_key(teacher_task) != task.name:
        raise ValueError(f"--teacher {teacher_dir!r} was trained on {teacher_task}, not on {task.name}")
    label_names = task.label_names
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    except OSError as error:
        raise OSError(
            f"could not load --teacher {teacher_dir!r} ({error}); pass a directory written by cmi-glue train"
        ) from error
    if teacher.config.num_labels != len(label_names):
        raise ValueError(
            f"--teacher {teacher_dir!r} has {teacher.config.num_labels} labels, the task has {len(label_names)}"
        )
    check_head_labels(teacher.config, label_names, f"--teacher {teacher_dir!r}")
    return teacher, tokenizer


def load_student(config: DistillConfig, teacher, tokenizer, label_names: tuple) -> tuple:
    """``(student, teacher layers it was built from)``: ``config.student`` (same vocabulary as the teacher,
    layers ``None``), or a DistilBERT built from the teacher's layers; either way with the task's label names."""
    set_seed(config.seed)  # the fresh classification head
    if config.student is None:
        layers = config.student_layers
        if layers is None:
            layers = default_student_layers(teacher.config.num_hidden_layers)
        return build_student(teacher, layers, **label_maps(label_names)), layers
    student, student_tokenizer = load_model_and_tokenizer(config.student, label_names)
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--student {config.student!r} has another vocabulary than --teacher {config.teacher!r}")
    return student, None


def distill_history(log_history: list, metric_names: list) -> list:
    """Per-epoch ``{"epoch", "train_ce", "train_kl", "eval"}`` from ``Trainer.state.log_history``."""
    kl_by_epoch = {int(round(e["epoch"])): e["train_kl"] for e in log_history if "train_kl" in e}
    history = history_from_log(log_history, metric_names)
    for row in history:
        del row["train_cmi"]
        row["train_kl"] = kl_by_epoch.get(row["epoch"])
    return history


def training_set_teacher_logits(config: DistillConfig, data: GlueData, teacher: tuple) -> torch.Tensor:
    """Logits of ``teacher = (model, tokenizer)`` for the tokenised training set, in row order, on the run's device."""
    model, tokenizer = teacher
    train_dataset = tokenize_split(data.train, tokenizer, config.max_seq_length)
    device = build_training_arguments(config, data.task.metric).device
    return teacher_logits_for(model, train_dataset, tokenizer, config.eval_batch_size or config.batch_size, device)


def distill(
    config: DistillConfig,
    data: Optional[GlueData] = None,
    teacher=None,
    teacher_logits: Optional[torch.Tensor] = None,
) -> dict:
    """Run one distillation; return the ``results.json`` document (also written to ``config.output_dir``).

    ``teacher`` (with its tokenizer, as ``(model, tokenizer)``) and ``teacher_logits`` (training set, in
    row order) let a sweep load and run the teacher once.
    """
    if data is None:
        data = load_task(config.task, config.data_dir, config.max_train_samples, config.max_eval_samples)
    teacher, tokenizer = teacher or load_teacher(config.teacher, data.task)
    student, layers = load_student(config, teacher, tokenizer, data.task.label_names)
    train_dataset, eval_datasets = tokenize_task(data, tokenizer, config.max_seq_length)
    eval_dataset = next(iter(eval_datasets.values())) if len(eval_datasets) == 1 else eval_datasets
    kd = KDLoss(config.alpha, config.kd_temperature)
    args = build_training_arguments(config, data.task.metric)
    if config.cache_teacher_logits and config.alpha > 0:
        if teacher_logits is None:
            teacher_logits = training_set_teacher_logits(config, data, (teacher, tokenizer))
        train_dataset = with_teacher_logits(train_dataset, teacher_logits)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=data.compute_metrics,
        teacher=None if config.cache_teacher_logits or config.alpha == 0 else teacher,
        kd=kd,
    )
    remove_checkpoints(trainer, config.output_dir)  # a distillation replaces the run there (resume is refused)
    stale_state = os.path.join(config.output_dir, REGULARIZER_FILE)
    if trainer.is_world_process_zero() and os.path.isfile(stale_state):
        # a train run's, left there: with it the student's directory would pass for a training run (select-teacher)
        os.remove(stale_state)
    train_output = trainer.train()

    history = distill_history(trainer.state.log_history, eval_metric_names(data))
    results = build_results(config, data.task.metric, history, train_output.metrics["train_runtime"])
    results["student_layers"] = layers
    save_run(trainer, config.output_dir, results, config.keep_checkpoints)
    return results


# ------------------------------------------------------------------------------------------------------
# distill-sweep
def arm_name(teacher_label: str, alpha: float, kd_temperature: float) -> str:
    knobs = "alpha 0 (CE)" if alpha == 0 else f"alpha {alpha:g}, T {kd_temperature:g}"
    return f"{teacher_label}: {knobs}" if teacher_label else knobs


def sweep_grid(alphas: Sequence[float], kd_temperatures: Sequence[float]) -> list:
    """``(alpha, T)`` pairs in the given order; ``alpha = 0`` (no KD term) once, whatever T."""
    grid = []
    for alpha in alphas:
        for kd_temperature in kd_temperatures[:1] if alpha == 0 else kd_temperatures:
            grid.append((float(alpha), float(kd_temperature)))
    return grid


def run_distill_sweep(
    base: DistillConfig,
    teachers: Sequence[str],
    alphas: Sequence[float],
    kd_temperatures: Sequence[float],
    seeds: Sequence[int],
    command: Optional[str] = None,
) -> dict:
    """Distil from every teacher at every ``(alpha, T)`` and seed; the first arm is the baseline.

    Runs live in ``base.output_dir/teacher_<k>/alpha_<a>_T_<t>/seed_<s>``; a run whose ``results.json``
    exists is read, not retrained, and one that another sweep is training is left to it (``reuse_or_run_each``).
    Each teacher is loaded once, and with ``cache_teacher_logits`` its training-set logits are computed once for
    all its runs. Returns the ``sweep.json`` document.
    """
    if not teachers or not alphas or not kd_temperatures or not seeds:
        raise ValueError("distill-sweep needs at least one --teacher, --alphas, --kd-temperatures and --seeds value")
    grid = sweep_grid(alphas, kd_temperatures)
    data = load_task(base.task, base.data_dir, base.max_train_samples, base.max_eval_samples)
    values, runs, arm_order = {}, [], []
    for index, teacher_dir in enumerate(teachers):
        label = teacher_dir if len(teachers) > 1 else ""
        teacher = load_teacher(teacher_dir, data.task)
        cached = None

        def run_distill(config, teacher=teacher):
            nonlocal cached  # the teacher's training-set logits, computed by the first run that needs them
            if config.cache_teacher_logits and config.alpha > 0 and cached is None:
                cached = training_set_teacher_logits(config, data, teacher)
            return distill(config, data, teacher, cached)

        arms, configs = [], []
        for alpha, kd_temperature in grid:
            arm = arm_name(label, alpha, kd_temperature)
            arm_order.append(arm)
            for seed in seeds:
                arms.append(arm)
                configs.append(
                    dataclasses.replace(
                        base,
                        teacher=teacher_dir,
                        model=base.student or teacher_dir,
                        alpha=alpha,
                        kd_temperature=kd_temperature,
                        seed=seed,
                        output_dir=os.path.join(
                            base.output_dir,
                            f"teacher_{index}",
                            f"alpha_{value_label(alpha)}_T_{value_label(kd_temperature)}",
                            f"seed_{seed}",
                        ),
                    )
                )
        jobs = [(config, functools.partial(run_distill, config)) for config in configs]
        for arm, config, results in zip(arms, configs, reuse_or_run_each(jobs), strict=True):
            values.setdefault(arm, {})[config.seed] = results["best"][data.task.metric]
            runs.append(
                {
                    "arm": arm,
                    "teacher": teacher_dir,
                    "alpha": config.alpha,
                    "kd_temperature": config.kd_temperature,
                    "seed": config.seed,
                    **run_record(results, config.output_dir),
                }
            )
    rows = summarize_arms({arm: values[arm] for arm in arm_order}, arm_order[0])
    machine = machine_description()
    summary = {
        "task": base.task,
        "metric": data.task.metric,
        "command": command,
        "machine": machine,
        "config": dataclasses.asdict(base),
        "teachers": list(teachers),
        "arms": rows,
        "runs": runs,
    }
    student = (
        f"`{base.student}`"
        if base.student
        else f"DistilBERT from teacher layers {base.student_layers or 'evenly spread'}"
    )
    notes = [
        f"command: `{command}`" if command else "command: (library call)",
        f"machine: {machine}",
        f"teachers: {', '.join(f'`{t}`' for t in teachers)}; student: {student}",
        f"{schedule_text(base)}, max_train_samples {base.max_train_samples}, max_eval_samples {base.max_eval_samples}",
    ]
    title = f"{base.task}: knowledge distillation sweep"
    markdown = format_sweep_markdown(title, data.task.metric, rows, "arm", arm_order[0], notes)
    markdown += format_training_markdown(runs, "arm", ("train_ce", "train_kl"))
    write_sweep(base.output_dir, summary, markdown)
    return summary


def teacher_candidates(paths: Sequence[str]) -> tuple[list, list]:
    """The run directories ``--runs`` names, and the CE runs left out of the directories it names.

    A run directory stands for itself. A directory of runs (a sweep) stands for the training runs inside it that
    were trained with a CMI term: a ``cmi-glue sweep`` always trains CE baselines (lambda 0, ``--cmi none``), whose
    features have the lowest CMI, so the metric / CMI rule would pick one of them over every Max-CMI teacher it is
    meant to choose among. Those are returned second; a CE run named on its own is kept. Distillation runs inside
    (a ``results.json`` and no regulariser state) are not training runs and are skipped.
    """
    run_dirs, left_out = [], []
    for path in paths:
        found = []
        if not os.path.isfile(os.path.join(path, RESULTS_FILE)):
            found = sorted(
                os.path.dirname(p)
                # escaped: a directory named like "sweep[1]" is a name, not a pattern
                for p in glob.glob(os.path.join(glob.escape(path), "**", RESULTS_FILE), recursive=True)
                if os.path.isfile(os.path.join(os.path.dirname(p), REGULARIZER_FILE))
            )
        if not found:
            run_dirs.append(path)  # a run (select_teacher says what is wrong with it if it is not a training run)
            continue
        ce_runs = []
        for run in found:
            with open(os.path.join(run, RESULTS_FILE)) as handle:
                if json.load(handle)["config"]["cmi"] == "none":
                    ce_runs.append(run)
        if len(ce_runs) == len(found):
            raise ValueError(
                f"--runs: {path} holds only CE runs (--cmi none), which a directory does not stand for: name a run "
                "directory to include it"
            )
        run_dirs += [run for run in found if run not in ce_runs]
        left_out += ce_runs
    # A run named twice (on its own and inside a directory named too) is one candidate, under its first name; a CE
    # run named on its own is not left out by its directory.
    kept = {}
    for run in run_dirs:
        kept.setdefault(os.path.realpath(run), run)
    left_out = [run for run in dict.fromkeys(left_out) if os.path.realpath(run) not in kept]
    return list(kept.values()), left_out
