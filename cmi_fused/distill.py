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
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from transformers import BertConfig, DistilBertConfig, DistilBertForSequenceClassification, PreTrainedModel

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
    if isinstance(num_teacher_layers, bool) or not isinstance(num_teacher_layers, int) or num_teacher_layers < 1:
        raise ValueError(f"num_teacher_layers must be a positive int, got {num_teacher_layers!r}")
    if num_student_layers is None:
        num_student_layers = (num_teacher_layers + 1) // 2
    if (
        isinstance(num_student_layers, bool)
        or not isinstance(num_student_layers, int)
        or not 1 <= num_student_layers <= num_teacher_layers
    ):
        raise ValueError(
            f"num_student_layers must be an int in [1, {num_teacher_layers}], got {num_student_layers!r}"
        )
    if num_student_layers == 1:
        return [0]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [int(k * step + 0.5) for k in range(num_student_layers)]


def parse_layers(text: str) -> list[int]:
    """``"0,2,4"`` -> ``[0, 2, 4]`` (the ``--student-layers`` option)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--student-layers must be comma-separated integers such as 0,2,4, got {text!r}") from None


def check_layers(layers: Sequence[int], num_teacher_layers: int) -> list[int]:
    """Raise ``ValueError`` unless ``layers`` are distinct, increasing teacher layer indices."""
    layers = list(layers)
    if (
        not layers
        or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
        or any(i < 0 or i >= num_teacher_layers for i in layers)
        or any(a >= b for a, b in zip(layers, layers[1:]))
    ):
        raise ValueError(
            f"layers must be strictly increasing teacher layer indices in [0, {num_teacher_layers}), got {layers}"
        )
    return layers


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
            f"{DISTILBERT_LAYER_NORM_EPS}: the student's copied layers will not reproduce the teacher's exactly"
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
        student_params["embeddings.position_embeddings.weight"].add_(teacher_params[TOKEN_TYPE_EMBEDDINGS][0])
    return student
