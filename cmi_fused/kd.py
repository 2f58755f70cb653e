"""Hinton knowledge-distillation loss: :func:`kd_loss` and the module :class:`KDLoss`.

With student logits ``s``, teacher logits ``t``, labels ``y``, weight ``alpha`` and temperature ``T``:

    p_t    = softmax(t / T),   log p_s = log_softmax(s / T)
    CE_i   = -log softmax(s_i)[y_i]
    KL_i   = sum_c p_t,ic (log p_t,ic - log p_s,ic)
    loss_i = (1 - alpha) * CE_i + alpha * T^2 * KL_i
    loss   = mean_i loss_i | sum_i loss_i | loss_i          (reduction; "mean" is KL's "batchmean")

The ``T^2`` factor keeps the soft-target gradient on the scale of the hard-target one when ``T`` changes
(Hinton et al., 2015). The teacher logits are detached: the teacher never receives a gradient. A class the teacher
rules out (logit -inf, p_t = 0) adds 0 log 0 = 0 to KL_i, as ``F.kl_div`` counts it.
Computed in float32, or float64 when either logits are float64 (as PyTorch promotes a float32-float64 pair). At
large T both distributions near the uniform one and ``log p_t - log p_s`` cancels: in float32 the loss value drifts
(0.4% at T = 1e3, randn(16, 5) * 3 logits) while the gradient stays within 2e-5; pass float64 logits for such T
(the student's or the teacher's: cached teacher logits reach the loss as float32, so upcast the student's).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .options import (
    check_label_tensor,
    check_number,
    check_optional_bool,
    check_reduction,
    check_temperature,
    compute_dtype,
    labels_in_range,
    maybe_validate_labels,
)
from .reference import reduce_rows


class KDOutput(NamedTuple):
    """What :func:`kd_loss` returns; every field is reduced the same way (scalar, or ``(N,)`` for ``"none"``).

    ``loss``: ``(1 - alpha) * ce + alpha * T^2 * kl``, differentiable w.r.t. the student logits only.
    ``ce``: cross-entropy of the student at temperature 1 (zero when ``labels`` is ``None``).
    ``kl``: ``KL(softmax(t / T) || softmax(s / T))``, without the ``T^2`` factor.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def check_kd_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    alpha,
    temperature,
    reduction,
    check_labels,
) -> tuple[float, float]:
    """Validate every argument of :func:`kd_loss`; return ``(alpha, temperature)`` as floats."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
        if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
            raise ValueError(f"{name} must be 2-D (N, C) with N >= 1 and C >= 2, got shape {tuple(logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits are on {teacher_logits.device} but student_logits on {student_logits.device}")
    alpha = check_number("alpha", alpha, 0.0, 1.0)
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    check_optional_bool(check_labels, "check_labels")
    if labels is None:
        if alpha != 1.0:
            raise ValueError(f"labels may be None only when alpha == 1 (pure distillation), got alpha={alpha}")
        return alpha, temperature
    n_rows, num_classes = student_logits.shape
    check_label_tensor(labels, n_rows, student_logits.device, "student_logits")
    maybe_validate_labels(labels, num_classes, check_labels)
    return alpha, temperature


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    reduction: str = "mean",
    check_labels: Optional[bool] = None,
) -> KDOutput:
    """``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``.

    Args:
        student_logits: (N, C) float tensor.
        teacher_logits: (N, C) float tensor; detached here, so the teacher never receives a gradient.
        labels: (N,) integer tensor with values in ``[0, C)``; may be ``None`` only when ``alpha == 1``.
        alpha: weight of the distillation term, in ``[0, 1]``.
        temperature: T > 0, applied to both logits in the KL term only.
        reduction: ``"mean"`` (``batchmean`` KL, mean CE), ``"sum"`` or ``"none"`` (per row).
        check_labels: as in :func:`cmi_fused.cmi_loss` (``None``: only for CPU tensors).

    Returns:
        :class:`KDOutput` ``(loss, ce, kl)``.
    """
    alpha, temperature = check_kd_inputs(
        student_logits,
        teacher_logits,
        labels,
        alpha=alpha,
        temperature=temperature,
        reduction=reduction,
        check_labels=check_labels,
    )
    dtype = compute_dtype(student_logits.dtype, teacher_logits.dtype)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)

    log_p_teacher = torch.log_softmax(teacher / temperature, dim=-1)
    log_p_student = torch.log_softmax(student / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    row_kl = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0).sum(dim=-1)
    if labels is None:
        row_ce = torch.zeros_like(row_kl)
    else:
        # -log softmax(s_i)[y_i] by a gather, not F.cross_entropy, whose ignore_index would give the label -100 a CE
        # of 0 where the label check is off. A label outside [0, C) gets a NaN CE instead, as cmi_loss gives it a NaN
        # KL, and is never used as an index.
        labels, in_range = labels_in_range(labels, student.shape[-1])
        log_p = torch.log_softmax(student, dim=-1)
        row_ce = -log_p.gather(-1, torch.where(in_range, labels, 0).unsqueeze(-1)).squeeze(-1)
        row_ce = torch.where(in_range, row_ce, torch.nan)
    row_loss = (1.0 - alpha) * row_ce + (alpha * temperature**2) * row_kl
    return KDOutput(reduce_rows(row_loss, reduction), reduce_rows(row_ce, reduction), reduce_rows(row_kl, reduction))


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss` with fixed ``alpha``, ``temperature``, ``reduction`` and ``check_labels``."""

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 2.0,
        reduction: str = "mean",
        check_labels: Optional[bool] = None,
    ):
        super().__init__()
        self.alpha = check_number("alpha", alpha, 0.0, 1.0)
        self.temperature = check_temperature(temperature)
        check_reduction(reduction)
        self.reduction = reduction
        check_optional_bool(check_labels, "check_labels")
        self.check_labels = check_labels

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None
    ) -> KDOutput:
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            alpha=self.alpha,
            temperature=self.temperature,
            reduction=self.reduction,
            check_labels=self.check_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, reduction={self.reduction!r}, "
            f"check_labels={self.check_labels}"
        )
