"""DistilBERT-style students built from a BERT teacher, and teacher logits for distillation.

Student (:func:`build_student`): a ``DistilBertForSequenceClassification`` with the teacher's hidden size,
heads, intermediate size, activation, vocabulary and positions, and ``len(layers)`` encoder layers copied
from the chosen teacher layers under the explicit name map :func:`bert_to_distilbert_names`
(Sanh et al. 2019; Hugging Face ``extract_distilbert.py``). The classification head
(``pre_classifier``, ``classifier``) is freshly initialised: BERT's pooler uses tanh where DistilBERT's
``pre_classifier`` uses ReLU, so there is no head to copy exactly.

Token types: DistilBERT has no token-type embeddings, while BERT adds ``token_type_embeddings[type]``
to every position. We fold row 0 into the position embeddings,

    P_student[p] = P_teacher[p] + TT_teacher[0],

so for single-segment input (all token types 0) the student's embeddings, and with all teacher layers
chosen its encoder output, equal the teacher's. For sentence pairs the second segment loses the
``TT[1] - TT[0]`` offset: the student sees a pair as one segment, as DistilBERT does.

Teacher logits (:func:`teacher_logits_for`, :class:`DistillationTrainer`) always come from the teacher in
eval mode under ``no_grad``, either per batch or cached once for the training set as a dataset column.
Teacher selection (:func:`select_teacher`): the highest best-metric / training-set-CMI ratio.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DataCollatorWithPadding,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedModel,
    Trainer,
)

from .distributed import all_reduce_sum
from .glue.data import load_task, tokenize_split
from .glue.tasks import task_key
from .glue.train import REGULARIZER_FILE, RESULTS_FILE, EpochEndCallback, FeatureCapture, trained_task
from .kd import KDLoss
from .loss import cmi_loss
from .options import check_int, is_integer
from .regularizer import CMIRegularizer

# DistilBERT hard-codes its LayerNorm eps (transformers' modeling_distilbert.py).
DISTILBERT_LAYER_NORM_EPS = 1e-12

# Per encoder layer: DistilBERT ``transformer.layer.{k}.<student>`` <- BERT ``encoder.layer.{i}.<teacher>``.
LAYER_NAME_MAP = (
    ("attention.q_lin", "attention.self.query"),
    ("attention.k_lin", "attention.self.key"),
    ("attention.v_lin", "attention.self.value"),
    ("attention.out_lin", "attention.output.dense"),
    ("sa_layer_norm", "attention.output.LayerNorm"),
    ("ffn.lin1", "intermediate.dense"),
    ("ffn.lin2", "output.dense"),
    ("output_layer_norm", "output.LayerNorm"),
)
EMBEDDING_NAME_MAP = (
    ("embeddings.word_embeddings", "embeddings.word_embeddings"),
    ("embeddings.position_embeddings", "embeddings.position_embeddings"),
    ("embeddings.LayerNorm", "embeddings.LayerNorm"),
)
TOKEN_TYPE_EMBEDDINGS = "embeddings.token_type_embeddings.weight"


def default_student_layers(num_teacher_layers: int, num_student_layers: Optional[int] = None) -> list[int]:
    """Evenly spread teacher layers, first and last included: ``round_half_up(k * (L - 1) / (n - 1))``.

    ``n`` defaults to ``ceil(L / 2)`` ("every other layer"). 12 -> 6 gives 0,2,4,7,9,11 (the Hugging Face
    DistilBERT recipe); 6 -> 3 gives 0,3,5; ``n = 1`` gives layer 0.
    """
    num_teacher_layers = check_int("num_teacher_layers", num_teacher_layers)
    if num_student_layers is None:
        num_student_layers = (num_teacher_layers + 1) // 2
    num_student_layers = check_int("num_student_layers", num_student_layers, 1, num_teacher_layers)
    if num_student_layers == 1:
        return [0]
    # round_half_up(k * (L - 1) / (n - 1)) in integers: a float step rounds some exact halves down (L = 186).
    span, steps = num_teacher_layers - 1, num_student_layers - 1
    return [(2 * k * span + steps) // (2 * steps) for k in range(num_student_layers)]


def check_layers(layers: Sequence[int], num_teacher_layers: int) -> list[int]:
    """``layers`` as a list of ints (Python's or numpy's integers, e.g. ``np.arange(0, 12, 2)``); a ``ValueError``
    unless they are distinct, increasing teacher layer indices."""
    layers = list(layers)
    if (
        not layers
        or not all(is_integer(i) for i in layers)
        or any(i < 0 or i >= num_teacher_layers for i in layers)
        or any(a >= b for a, b in zip(layers, layers[1:], strict=False))
    ):
        raise ValueError(
            f"layers must be strictly increasing teacher layer indices in [0, {num_teacher_layers}), got {layers}"
        )
    return [int(i) for i in layers]


def bert_to_distilbert_names(layers: Sequence[int]) -> dict[str, str]:
    """Student parameter name (under ``distilbert.``) -> teacher parameter name (under the BERT base model).

    ``distilbert.embeddings.position_embeddings.weight`` also receives the folded token-type row 0
    (see the module docstring); the teacher name given for it is the position table.
    """
    names = {}
    for student_prefix, teacher_prefix in EMBEDDING_NAME_MAP:
        for suffix in ("weight", "bias") if student_prefix.endswith("LayerNorm") else ("weight",):
            names[f"{student_prefix}.{suffix}"] = f"{teacher_prefix}.{suffix}"
    for student_index, teacher_index in enumerate(layers):
        for student_name, teacher_name in LAYER_NAME_MAP:
            for suffix in ("weight", "bias"):
                names[f"transformer.layer.{student_index}.{student_name}.{suffix}"] = (
                    f"encoder.layer.{teacher_index}.{teacher_name}.{suffix}"
                )
    return names


def bert_base_model(teacher: PreTrainedModel) -> torch.nn.Module:
    """The ``BertModel`` inside ``teacher`` (a ``BertModel`` or any ``BertFor*`` head model)."""
    if not isinstance(teacher, PreTrainedModel) or not isinstance(teacher.config, BertConfig):
        raise TypeError(f"teacher must be a Hugging Face BERT model (BertConfig), got {type(teacher).__name__}")
    return getattr(teacher, "bert", teacher)


def student_config(teacher_config: BertConfig, num_layers: int, **overrides) -> DistilBertConfig:
    """A ``DistilBertConfig`` with the teacher's sizes, activation, dropouts and label names."""
    if getattr(teacher_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            "teacher must use absolute position embeddings to build a DistilBERT student, "
            f"got position_embedding_type={teacher_config.position_embedding_type!r}"
        )
    if teacher_config.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
        warnings.warn(
            f"teacher layer_norm_eps={teacher_config.layer_norm_eps} but DistilBERT uses "
            f"{DISTILBERT_LAYER_NORM_EPS}: the student's copied layers will not reproduce the teacher's exactly",
            stacklevel=2,
        )
    values = dict(
        vocab_size=teacher_config.vocab_size,
        max_position_embeddings=teacher_config.max_position_embeddings,
        dim=teacher_config.hidden_size,
        n_heads=teacher_config.num_attention_heads,
        hidden_dim=teacher_config.intermediate_size,
        n_layers=num_layers,
        activation=teacher_config.hidden_act,
        dropout=teacher_config.hidden_dropout_prob,
        attention_dropout=teacher_config.attention_probs_dropout_prob,
        pad_token_id=teacher_config.pad_token_id,
        initializer_range=teacher_config.initializer_range,
        num_labels=teacher_config.num_labels,
        id2label=dict(teacher_config.id2label),
        label2id=dict(teacher_config.label2id),
        problem_type=teacher_config.problem_type,
    )
    values.update(overrides)
    return DistilBertConfig(**values)


def build_student(
    teacher: PreTrainedModel, layers: Optional[Sequence[int]] = None, **config_overrides
) -> DistilBertForSequenceClassification:
    """``DistilBertForSequenceClassification`` initialised from ``teacher``'s embeddings and chosen layers.

    Args:
        teacher: a ``BertModel`` or ``BertForSequenceClassification`` (its weights are only read).
        layers: teacher encoder layers to copy, strictly increasing; default :func:`default_student_layers`.
        config_overrides: ``DistilBertConfig`` fields to set (e.g. ``seq_classif_dropout``).

    The head is initialised by ``post_init`` from the global torch RNG: seed it for a reproducible student.
    """
    base = bert_base_model(teacher)
    num_teacher_layers = base.config.num_hidden_layers
    layers = default_student_layers(num_teacher_layers) if layers is None else check_layers(layers, num_teacher_layers)
    student = DistilBertForSequenceClassification(student_config(teacher.config, len(layers), **config_overrides))

    teacher_params = dict(base.named_parameters())
    student_params = dict(student.distilbert.named_parameters())
    names = bert_to_distilbert_names(layers)
    uncovered = sorted(set(student_params) - set(names))
    if uncovered:
        raise RuntimeError(f"DistilBERT parameters without a BERT source (transformers changed?): {uncovered}")
    with torch.no_grad():
        for student_name, teacher_name in names.items():
            student_params[student_name].copy_(teacher_params[teacher_name])
        position = student_params["embeddings.position_embeddings.weight"]
        # copy_ crosses devices, add_ does not: the teacher may already be on the GPU (a sweep moves it there once)
        position.add_(teacher_params[TOKEN_TYPE_EMBEDDINGS][0].to(position.device))
    return student


# ------------------------------------------------------------------------------------------------------
# Teacher logits
TEACHER_LOGITS = "teacher_logits"
TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def freeze_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and ``requires_grad=False`` on every parameter."""
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def teacher_logits_for(
    teacher: torch.nn.Module, dataset, tokenizer, batch_size: int = 64, device: Optional[torch.device] = None
) -> torch.Tensor:
    """(N, C) float32 logits of ``teacher`` (eval mode, no grad) for every row of a tokenised dataset, in order."""
    batch_size = check_int("batch_size", batch_size)
    device = device or next(teacher.parameters()).device
    freeze_teacher(teacher).to(device)
    columns = [name for name in dataset.column_names if name in TEACHER_INPUTS]
    loader = DataLoader(
        dataset.select_columns(columns), batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer)
    )
    chunks = [teacher(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu() for batch in loader]
    return torch.cat(chunks)


def with_teacher_logits(dataset, logits: torch.Tensor):
    """``dataset`` with a ``teacher_logits`` column (row ``i`` holds ``logits[i]``)."""
    if logits.dim() != 2 or logits.shape[0] != len(dataset):
        raise ValueError(f"logits must have shape ({len(dataset)}, C) to match the dataset, got {tuple(logits.shape)}")
    return dataset.add_column(TEACHER_LOGITS, logits.tolist())


class DistillationTrainer(Trainer):
    """``Trainer`` whose training loss is :class:`~cmi_fused.kd.KDLoss` of the student against a frozen teacher.

    Teacher logits come from the batch's ``teacher_logits`` column when the training set carries one
    (:func:`with_teacher_logits`), else from ``teacher`` under ``no_grad``. ``token_type_ids`` reach
    the teacher even when the student (DistilBERT) takes none. Evaluation loss is the student's CE.
    With ``alpha == 0`` no teacher is needed: the loss is the student's CE.
    Logs the epoch means ``train_ce`` and ``train_kl`` (KL without the ``T^2`` factor).
    """

    def __init__(self, *args, teacher: Optional[torch.nn.Module], kd: KDLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = None if teacher is None else freeze_teacher(teacher).to(self.args.device)
        self.kd = kd
        self.model_accepts_loss_kwargs = False  # the KD loss is a per-batch mean
        self._one = torch.ones((), device=self.args.device)
        self.student_inputs = set(inspect.signature(self.model.forward).parameters) - {"labels"}
        self._epoch_sums = torch.zeros(3, device=self.args.device)  # ce, kl, steps (no host sync per step)
        self.add_callback(EpochEndCallback(self))

    def end_epoch(self):
        """Log the epoch means of CE and KL (averaged over ranks)."""
        (sums,) = all_reduce_sum(self._epoch_sums)
        ce, kl, steps = sums.tolist()
        self.log({"train_ce": ce / max(steps, 1.0), "train_kl": kl / max(steps, 1.0)})
        self._epoch_sums.zero_()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in (TEACHER_LOGITS, "token_type_ids") if c not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(**{key: value for key, value in inputs.items() if key in self.student_inputs})
        if not model.training:
            loss = F.cross_entropy(outputs.logits.float(), labels)
            return (loss, outputs) if return_outputs else loss
        teacher_logits = inputs.get(TEACHER_LOGITS)
        if self.kd.alpha == 0:  # plain fine-tuning: the KL term has weight 0, no teacher needed (KL logged as 0)
            teacher_logits = outputs.logits.detach()
        elif teacher_logits is None:
            if self.teacher is None:
                raise RuntimeError("no teacher_logits column in the batch and no teacher to compute them")
            with torch.no_grad():
                teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k in TEACHER_INPUTS}).logits
        result = self.kd(outputs.logits, teacher_logits, labels)
        self._epoch_sums += torch.stack([result.ce.detach().float(), result.kl.detach().float(), self._one])
        return (result.loss, outputs) if return_outputs else result.loss


# ------------------------------------------------------------------------------------------------------
# Teacher selection
@torch.no_grad()
def training_set_cmi(teacher_dir: str, data_dir: Optional[str] = None, batch_size: int = 64) -> dict:
    """The empirical CMI of a ``cmi-glue train`` run's final model on its training set.

    ``CMI = mean_i KL(softmax(x_i / T) || g_{y_i})`` over the training rows (the run's task, data and
    ``max_train_samples``), ``x_i`` the run's feature in eval mode (normalised as in training: a ``center_l2``
    run's saved feature mean), ``g_c`` the class means of ``softmax(x / T)`` over those rows, whatever the run's
    centroid mode. Those means minimise each class's mean KL: the centroids a run saved (from training-mode
    features of earlier weights) would add ``sum_c (n_c / N) KL(mean_c || g_c)``, so that two runs of the same
    weights would score differently by their ``--centroids``. Returns the run's ``results.json`` with
    ``train_set_cmi`` added.
    """
    results_path = os.path.join(teacher_dir, RESULTS_FILE)
    if not os.path.isfile(results_path):
        raise FileNotFoundError(
            f"--runs: {teacher_dir} has no {RESULTS_FILE}; pass directories written by cmi-glue train"
        )
    if not os.path.isfile(os.path.join(teacher_dir, REGULARIZER_FILE)):
        raise FileNotFoundError(
            f"--runs: {teacher_dir} has no {REGULARIZER_FILE}; pass directories written by cmi-glue train "
            "(a distillation run has none)"
        )
    with open(results_path) as handle:
        results = json.load(handle)
    config = results["config"]
    data = load_task(config["task"], data_dir or config["data_dir"], config["max_train_samples"], 1)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    # The teacher's forwards on the GPU where there is one (on the CPU, MNLI's 393k rows take hours per run); the
    # features come back batch by batch, so the GPU holds the model and one batch, not the training set's features.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = freeze_teacher(AutoModelForSequenceClassification.from_pretrained(teacher_dir)).to(device)
    capture = FeatureCapture(model, config["feature"])
    regularizer = CMIRegularizer(
        data.num_labels,
        capture.dim,
        config["centroids"],
        temperature=config["temperature"],
        normalization=config["normalization"],
        momentum=config["momentum"],
    ).eval()
    regularizer.load_state_dict(torch.load(os.path.join(teacher_dir, REGULARIZER_FILE), map_location="cpu"))

    dataset = tokenize_split(data.train, tokenizer, config["max_seq_length"])
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    features, labels = [], []
    for batch in loader:
        model(**{k: v.to(device) for k, v in batch.items() if k in TEACHER_INPUTS})
        features.append(capture.pop().float().cpu())
        labels.append(batch["labels"])
    capture.handle.remove()
    features = regularizer.normalize(torch.cat(features))
    result = cmi_loss(
        features,
        torch.cat(labels),
        data.num_labels,
        temperature=regularizer.temperature,
        eps=regularizer.eps,
        backend="torch",
    )  # centroids=None: the class means over all the rows given
    results["train_set_cmi"] = float(result.loss)
    return results


def teacher_rank(row: dict) -> tuple:
    """Sort key of a :func:`select_teacher` row, highest first: the ratio for a positive metric; after those, the
    metric, then the lower CMI."""
    if row["best_metric"] > 0:
        return (1, row["ratio"], 0.0)
    return (0, row["best_metric"], -row["train_set_cmi"])


def select_teacher(run_dirs: Sequence[str], data_dir: Optional[str] = None, batch_size: int = 64) -> dict:
    """Pick the run with the highest ``best metric / training-set CMI`` (Sivakaran & Yang's teacher rule).

    A high metric says the teacher is accurate; a low CMI that its class-conditional feature
    distributions are concentrated. The ratio ranks runs with a positive metric only: for a metric <= 0 (CoLA's
    Matthews correlation of a run no better than chance) a higher CMI would raise it. Such runs rank after every
    run with a positive metric, by metric, then by lower CMI. Returns ``{"metric", "selected", "reason", "runs":
    [...]}``; every run row has ``run``, ``cmi``, ``cmi_lambda``, ``best_metric``, ``train_set_cmi``, ``ratio``.
    """
    if not run_dirs:
        raise ValueError("--runs must name at least one run directory")
    tasks = {}  # checked before the passes over the training sets (SST-2 and RTE share a metric, not a task)
    for run in run_dirs:
        task = trained_task(run)
        if task is not None:  # (training_set_cmi says what is wrong with the others)
            tasks[run] = task
    if len({task_key(task) for task in tasks.values()}) > 1:
        runs_and_tasks = ", ".join(f"{run} ({task})" for run, task in tasks.items())
        raise ValueError(f"--runs must all be runs of one task, got {runs_and_tasks}")
    rows = []
    for run in run_dirs:
        results = training_set_cmi(run, data_dir, batch_size)
        metric = results["metric"]
        cmi = results["train_set_cmi"]
        if not cmi > 0:
            raise ValueError(f"--runs: {run} has training-set CMI {cmi}; the metric/CMI ratio needs CMI > 0")
        rows.append(
            {
                "run": run,
                "cmi": results["config"]["cmi"],
                "cmi_lambda": results["config"]["cmi_lambda"],
                "best_metric": results["best"][metric],
                "train_set_cmi": cmi,
                "ratio": results["best"][metric] / cmi,
            }
        )
    best = max(rows, key=teacher_rank)
    among = f"among {len(rows)} run{'' if len(rows) == 1 else 's'}"
    if best["best_metric"] > 0:
        reason = (
            f"{best['run']} has the highest {metric} / training-set CMI ratio, {best['ratio']:.4f} "
            f"({metric} {best['best_metric']:.4f} / CMI {best['train_set_cmi']:.4g}) {among}"
        )
    else:
        reason = (
            f"no run has a {metric} above 0, where the {metric} / training-set CMI ratio ranks teachers; by "
            f"{metric}, then the lower CMI, {best['run']} ranks first ({metric} {best['best_metric']:.4f}, "
            f"CMI {best['train_set_cmi']:.4g}) {among}"
        )
    return {"metric": metric, "selected": best["run"], "reason": reason, "runs": rows}
