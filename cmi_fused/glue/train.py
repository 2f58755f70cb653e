"""Fine-tune a sequence classifier on one GLUE task with ``loss = CE + sign * lambda * CMI`` (``transformers.Trainer``).

Min-CMI (``cmi="min"``) adds ``+lambda * CMI``, Max-CMI (``cmi="max"``) adds ``-lambda * CMI``; with
``cmi="none"`` the CMI of the features is still measured (and logged as ``train_cmi``) but not trained on.
The features are the classifier's input (``feature="pooled"``: BERT's pooled output, DistilBERT's
pre-classifier output, captured by a forward pre-hook) or the last hidden state of the first token
(``feature="cls"``). Each epoch is evaluated; the best epoch's model, tokenizer and regulariser state are
saved to the output directory with ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from ..distributed import all_reduce_sum
from ..regularizer import CMIRegularizer
from .config import CHECKPOINT_NAME, TrainConfig, changed_settings
from .data import GlueData, load_task, tokenize_task
from .metrics import task_metric_names

REGULARIZER_FILE = "cmi_regularizer.pt"
RESULTS_FILE = "results.json"
# In each checkpoint: the settings of the run that wrote it (TrainConfig, as results.json stores it).
RUN_CONFIG_FILE = "cmi_glue_config.json"


def eval_metric_names(data: GlueData) -> list:
    """Metric names of ``results.json`` (MNLI: ``matched_accuracy``, ``mismatched_accuracy``)."""
    names = task_metric_names(data.task.name)
    if len(data.eval) == 1:
        return list(names)
    return [f"{split}_{name}" for split in data.eval for name in names]


def classifier_input_module(model: nn.Module) -> nn.Module:
    """The linear layer whose input is the classification feature (BERT/DistilBERT ``classifier``,
    RoBERTa-style heads' ``out_proj``)."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return head
    if isinstance(getattr(head, "out_proj", None), nn.Linear):
        return head.out_proj
    raise ValueError(
        f"--feature pooled: cannot find the classifier layer of {type(model).__name__} "
        "(expected a `classifier` nn.Linear or `classifier.out_proj`); use --feature cls"
    )


class FeatureCapture:
    """Hooks that record the features of the last forward: the classifier input or the first-token state."""

    def __init__(self, model: nn.Module, feature: str):
        self.value = None
        if feature == "pooled":
            module = classifier_input_module(model)
            self.dim = module.in_features
            self.handle = module.register_forward_pre_hook(self._record_input)
        else:
            self.dim = model.config.hidden_size
            self.handle = model.base_model.register_forward_hook(self._record_first_token)

    def _record_input(self, module, args):
        self.value = args[0]

    def _record_first_token(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self.value = hidden[:, 0]

    def pop(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the feature hook did not fire during the forward pass")
        return value


class CMITrainer(Trainer):
    """``Trainer`` whose training loss is ``CE + config.cmi_weight * CMI(features, labels)``.

    Logs ``train_ce`` and ``train_cmi`` (means over the epoch's batches) at every epoch end, calls
    ``regularizer.end_epoch()`` and stores the regulariser state and the run's settings (``config``) in every
    checkpoint.
    """

    def __init__(self, *args, regularizer: CMIRegularizer, capture: FeatureCapture, config: TrainConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            # The Trainer would wrap the model in nn.DataParallel: the feature hook would then fire once per replica
            # and keep the last replica's slice of the batch, no longer aligned with the labels.
            raise ValueError(
                f"CMITrainer sees {self.args.n_gpu} GPUs in one process: run one process per GPU "
                "(torchrun --nproc-per-node N ...) or pick one with CUDA_VISIBLE_DEVICES"
            )
        self.regularizer = regularizer.to(self.args.device)
        self.capture = capture
        self.config = config
        self.model_accepts_loss_kwargs = False  # the loss below is a per-batch mean
        self._reset_epoch_sums()
        self.add_callback(EpochEndCallback(self))

    def _reset_epoch_sums(self):
        self._epoch_ce = torch.zeros((), device=self.args.device)
        self._epoch_cmi = torch.zeros((), device=self.args.device)
        self._epoch_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        ce = F.cross_entropy(outputs.logits.float(), labels)
        features = self.capture.pop()
        loss = ce
        if model.training:
            if self.config.cmi_weight != 0:
                cmi = self.regularizer(features, labels)
                loss = ce + self.config.cmi_weight * cmi
            else:
                with torch.no_grad():
                    cmi = self.regularizer(features, labels)
            self._epoch_ce += ce.detach()
            self._epoch_cmi += cmi.detach()
            self._epoch_steps += 1
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Also writes the regulariser state and the run's settings into a checkpoint, next to the weights (for
        ``--resume`` to load and to check): before the Trainer writes
        ``trainer_state.json`` and rotates the older checkpoints away, so that a run cut short while saving never
        leaves a last checkpoint without it (``on_save`` comes only after the rotation). A checkpoint is an
        ``_internal_call`` with a folder; the Trainer's other internal calls (``push_to_hub``) pass none."""
        super().save_model(output_dir, _internal_call)
        if _internal_call and output_dir is not None and self.is_world_process_zero():
            torch.save(self.regularizer.state_dict(), os.path.join(output_dir, REGULARIZER_FILE))
            with open(os.path.join(output_dir, RUN_CONFIG_FILE), "w") as handle:
                json.dump(dataclasses.asdict(self.config), handle, indent=2)

    def end_epoch(self):
        """Log the epoch means of CE and CMI (averaged over ranks) and advance the regulariser's epoch."""
        steps = torch.tensor(float(self._epoch_steps), device=self._epoch_ce.device)
        totals = torch.stack([self._epoch_ce, self._epoch_cmi, steps])
        (totals,) = all_reduce_sum(totals)
        steps = max(float(totals[2]), 1.0)
        self.log({"train_ce": float(totals[0]) / steps, "train_cmi": float(totals[1]) / steps})
        self._reset_epoch_sums()
        self.regularizer.end_epoch()

    @torch.no_grad()
    def freeze_centroids(self, train_dataset):
        """``frozen`` centroids: one eval-mode pass of the starting model over ``train_dataset``.

        The pass leaves the torch RNGs as it found them (its DataLoader draws a seed), so the training run that
        follows, shuffling and dropout included, is the one any other centroid mode gets from the same ``--seed``.
        Under torchrun each process reads its own contiguous shard, so that every row counts once in the
        all-reduced sums: the Trainer's eval loader would fill the last batches of a short shard with rows from the
        start of the data (accelerate's ``even_batches``), which a sum over the pass counts twice.
        """
        trainer = self
        dataset = self._remove_unused_columns(train_dataset, description="frozen centroids")
        if self.args.world_size > 1:
            dataset = dataset.shard(self.args.world_size, self.args.process_index, contiguous=True)
        loader = DataLoader(dataset, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator)

        class TrainFeatures:
            def __iter__(self):
                model = trainer.model.to(trainer.args.device).eval()
                for batch in loader:
                    batch = trainer._prepare_inputs(batch)
                    # --bf16: the features of this pass in the precision the Trainer's forwards give them (accelerate
                    # wraps the model's forward in autocast once training starts), not fp32 ones
                    with trainer.accelerator.autocast():
                        model(**{key: value for key, value in batch.items() if key != "labels"})
                    yield trainer.capture.pop().float(), batch["labels"]

        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.regularizer.freeze(TrainFeatures())


class EpochEndCallback(TrainerCallback):
    """Calls ``trainer.end_epoch()`` at every epoch end. It holds the trainer weakly: the trainer holds its callbacks,
    and a reference back would make a cycle that keeps a finished run's model and optimizer state (on the GPU) alive
    until Python's cycle collector happens to run, while a sweep's next run allocates its own."""

    def __init__(self, trainer: Trainer):
        self.end_epoch = weakref.WeakMethod(trainer.end_epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.end_epoch()()


def trainer_must_be_told_cpu(bf16: bool) -> bool:
    """Whether the Trainer needs ``use_cpu`` to run as asked, where it would otherwise refuse or run wrongly:

    - under torchrun without CUDA, where it enters DDP over gloo only when told (otherwise every process would train
      on all the data and write the same checkpoints);
    - ``--bf16`` with no accelerator that transformers could run bf16 on (it refuses bf16 there unless told, and
      told, runs CPU autocast). An accelerator without bf16 (a pre-Ampere GPU) keeps transformers' refusal rather
      than moving to the CPU.

    Runs that worked before are left as they were: a CPU run without --bf16 is not told (accelerate would then also
    enter its multi-CPU mode under MPI launchers or ``torchrun --nproc-per-node 1``).
    """
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return (
        bf16
        and not torch.accelerator.is_available()
        and not is_torch_bf16_gpu_available()  # transformers' own test: HPU, NPU, TPU and the like
        and not is_torch_xla_available()
    )


def build_training_arguments(config: TrainConfig, metric_for_best_model: str, **overrides) -> TrainingArguments:
    """``TrainingArguments`` of the ``run_glue.py`` kind: eval and save every epoch, keep the best epoch."""
    kwargs = dict(
        output_dir=config.output_dir,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        seed=config.seed,
        bf16=config.bf16,
        full_determinism=config.full_determinism,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=metric_for_best_model,
        greater_is_better=True,
        save_total_limit=2 if config.keep_checkpoints else 1,  # the best and the last (for --resume)
        save_only_model=not config.keep_checkpoints,
        report_to="none",
        disable_tqdm=config.disable_tqdm,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=trainer_must_be_told_cpu(config.bf16),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def history_from_log(log_history: list, metric_names: list) -> list:
    """Per-epoch ``{"epoch", "train_ce", "train_cmi", "eval": {metric: value}}`` from ``Trainer.state.log_history``."""
    by_epoch = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = round(entry["epoch"])
        row = by_epoch.setdefault(epoch, {"epoch": epoch, "train_ce": None, "train_cmi": None, "eval": {}})
        for key in ("train_ce", "train_cmi"):
            if key in entry:
                row[key] = entry[key]
        for name in metric_names:
            if f"eval_{name}" in entry:
                row["eval"][name] = entry[f"eval_{name}"]
    return [by_epoch[epoch] for epoch in sorted(by_epoch) if by_epoch[epoch]["eval"]]


def best_epoch_of(history: list, metric: str) -> dict:
    """The first epoch with the highest ``metric`` (the one ``load_best_model_at_end`` keeps)."""
    if not history:
        raise ValueError("no evaluated epoch in the history")
    best = history[0]
    for row in history[1:]:
        if row["eval"][metric] > best["eval"][metric]:
            best = row
    return best


def build_results(config: TrainConfig, metric: str, history: list, train_runtime: float) -> dict:
    """The ``results.json`` document. ``train_runtime``: the Trainer's, seconds of the ``train()`` call that ended the
    run (training and the per-epoch evaluations; a resumed run counts from its resume)."""
    best = best_epoch_of(history, metric)
    return {
        "task": config.task,
        "config": dataclasses.asdict(config),
        "metric": metric,
        "best_epoch": best["epoch"],
        "best": dict(best["eval"]),
        "history": history,
        "train_runtime": train_runtime,
    }


def check_head_labels(config, label_names: tuple, argument: str) -> None:
    """A classification head kept from a checkpoint must order its labels as the task does.

    ``config``: the checkpoint's. Heads of another size are re-initialised, and default names (``LABEL_0``...) say
    nothing, so only a head of the task's size with named labels is checked: the task's names in another order
    raise (cmi-glue does not reorder heads; run_glue.py would remap the data instead); other names warn.
    """
    names = [str(config.id2label[i]).lower() for i in sorted(config.id2label)]
    if len(names) != len(label_names) or names == [f"label_{i}" for i in range(len(names))]:
        return
    if names != list(label_names):
        if sorted(names) == sorted(label_names):
            raise ValueError(
                f"{argument}: its head orders the labels {names}, the task {list(label_names)}: reorder the head's "
                "rows to the task's order, or start from a checkpoint without this head"
            )
        warnings.warn(f"{argument}: its head's labels {names} are not the task's {list(label_names)}", stacklevel=2)


def label_maps(label_names: tuple) -> dict:
    """``id2label`` and ``label2id`` of a model config from a task's label names (id order)."""
    return {
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: index for index, name in enumerate(label_names)},
    }


def trained_task(run_dir: str) -> str | None:
    """The task a run directory's ``results.json`` names, as written (``mrpc``, ``MRPC``: compare with
    :func:`~cmi_fused.glue.tasks.task_key`), or None where there is no such file or it names none."""
    try:
        with open(os.path.join(run_dir, RESULTS_FILE)) as handle:
            results = json.load(handle)
    except (OSError, ValueError):  # no file, or not JSON (json.JSONDecodeError is a ValueError)
        return None
    task = results.get("task") if isinstance(results, dict) else None
    return task if isinstance(task, str) else None


def load_model_and_tokenizer(model_name: str, label_names: tuple):
    """``AutoModelForSequenceClassification`` + ``AutoTokenizer`` from a hub name or a local directory.

    A classification head of another size (a checkpoint fine-tuned on another task) is re-initialised; a head of the
    task's size is kept if its labels are the task's, in the task's order (:func:`check_head_labels`). The config
    takes the task's label names (``id2label`` / ``label2id``), as run_glue.py sets them.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model_config = AutoConfig.from_pretrained(model_name)
        check_head_labels(model_config, label_names, f"--model {model_name!r}")
        model_config.update(label_maps(label_names))  # num_labels follows id2label
        model = AutoModelForSequenceClassification.from_pretrained(
            model_name, config=model_config, ignore_mismatched_sizes=True
        )
    except OSError as error:
        raise OSError(
            f"could not load --model {model_name!r} ({error}); pass a local directory with config.json, "
            "the weights and the tokenizer files (offline runs cannot download from the hub)"
        ) from error
    return model, tokenizer


def train(config: TrainConfig, data: GlueData | None = None) -> dict:
    """Run one fine-tuning; return the ``results.json`` document (also written to ``config.output_dir``)."""
    if data is None:
        data = load_task(config.task, config.data_dir, config.max_train_samples, config.max_eval_samples)
    metric_names = eval_metric_names(data)
    metric = data.task.metric
    set_seed(config.seed)  # before the model: a freshly initialised classification head depends on it
    model, tokenizer = load_model_and_tokenizer(config.model, data.task.label_names)
    train_dataset, eval_datasets = tokenize_task(data, tokenizer, config.max_seq_length)
    eval_dataset = next(iter(eval_datasets.values())) if len(eval_datasets) == 1 else eval_datasets

    capture = FeatureCapture(model, config.feature)
    regularizer = CMIRegularizer(
        data.num_labels,
        capture.dim,
        config.centroids,
        temperature=config.temperature,
        normalization=config.normalization,
        momentum=config.momentum,
    )
    trainer = CMITrainer(
        model=model,
        args=build_training_arguments(config, metric),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=data.compute_metrics,
        regularizer=regularizer,
        capture=capture,
        config=config,
    )
    checkpoint = checkpoint_to_resume(trainer, config)
    if checkpoint is not None:
        checkpoint_file(checkpoint, TRAINER_STATE_NAME)  # the Trainer's own, written last: else its bare error
        check_resumed_settings(checkpoint, config)
        state_file = checkpoint_file(checkpoint, REGULARIZER_FILE)
        # map_location: rank 0 saved it from its device; load_state_dict copies it into this rank's buffers
        trainer.regularizer.load_state_dict(torch.load(state_file, map_location="cpu"))
    elif config.centroids == "frozen":
        trainer.freeze_centroids(train_dataset)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)

    history = history_from_log(trainer.state.log_history, metric_names)
    results = build_results(config, metric, history, train_output.metrics["train_runtime"])
    if trainer.is_world_process_zero():
        best_checkpoint = trainer.state.best_model_checkpoint
        shutil.copyfile(
            os.path.join(best_checkpoint, REGULARIZER_FILE), os.path.join(config.output_dir, REGULARIZER_FILE)
        )
    save_run(trainer, config.output_dir, results, config.keep_checkpoints)
    capture.handle.remove()
    return results


def run_checkpoints(output_dir: str) -> list[str]:
    """The Trainer's ``checkpoint-<step>`` folders in ``output_dir`` (listed, not globbed: the directory's own name
    may hold glob characters); none where it does not exist yet."""
    if not os.path.isdir(output_dir):
        return []
    paths = [os.path.join(output_dir, name) for name in os.listdir(output_dir) if CHECKPOINT_NAME.fullmatch(name)]
    return [path for path in paths if os.path.isdir(path)]


def remove_checkpoints(trainer: Trainer, output_dir: str) -> None:
    """Remove the ``checkpoint-*`` folders of ``output_dir`` (main process)."""
    if trainer.is_world_process_zero():
        for path in run_checkpoints(output_dir):
            shutil.rmtree(path)


def checkpoint_to_resume(trainer: Trainer, config: TrainConfig) -> str | None:
    """With ``resume``: the last ``checkpoint-*`` in ``output_dir``, or ``None`` with a warning where there is none
    (the first start of a job that always passes --resume). Without: ``None``, the old run's checkpoints removed."""
    if not config.resume:
        # This run replaces the one in output_dir: the Trainer's rotation would otherwise keep the old run's later
        # checkpoints, and a --resume after this run would continue the old one.
        remove_checkpoints(trainer, config.output_dir)
        return None
    checkpoint = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
    if checkpoint is None and trainer.is_world_process_zero():  # once under torchrun
        warnings.warn(f"--resume: no checkpoint in {config.output_dir!r}, training from the start", stacklevel=2)
    return checkpoint


def checkpoint_file(checkpoint: str, name: str) -> str:
    """The path of ``name`` in ``checkpoint``, which ``--resume`` needs: a checkpoint without it (a save cut short)
    is refused rather than resumed in part."""
    path = os.path.join(checkpoint, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--resume: {checkpoint} has no {name} (a save cut short?): remove that checkpoint to resume from the one "
            "before, or start over without --resume"
        )
    return path


def check_resumed_settings(checkpoint: str, config: TrainConfig) -> None:
    """Refuse to resume ``checkpoint`` under settings that change what the run computes (another --feature, --cmi,
    --cmi-lambda, --epochs, ...): ``results.json`` would record the new ones for a run partly trained under the old."""
    with open(checkpoint_file(checkpoint, RUN_CONFIG_FILE)) as handle:
        changes = changed_settings(config, json.load(handle))
    if changes:
        raise ValueError(
            f"--resume: {checkpoint} was saved by a run of other settings ({changes}): resume with that run's "
            "settings, or start over without --resume"
        )


def save_run(trainer: Trainer, output_dir: str, results: dict, keep_checkpoints: bool) -> None:
    """The best model and tokenizer and ``results.json`` in ``output_dir``; ``checkpoint-*`` removed unless kept."""
    trainer.save_model(output_dir)  # every rank calls it; only the main process writes
    if not keep_checkpoints:
        remove_checkpoints(trainer, output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, RESULTS_FILE), "w") as handle:
            json.dump(results, handle, indent=2)
