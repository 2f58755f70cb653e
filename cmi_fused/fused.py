"""``backend="triton"``: the fused kernels of ``kernels/`` behind the ``cmi_loss`` contract."""

from __future__ import annotations

from typing import Optional

import torch

from kernels.cmi import CMIFunction

from .options import KERNEL_DTYPES, CMIOptions, CMIOutput


def accumulate_mode(deterministic: Optional[bool]) -> str:
    """The forward's class-sum accumulation for ``cmi_loss(deterministic=...)``: ``True`` the fixed-order slots
    ("partials"), ``False`` fp32 atomics, ``None`` the slots under ``torch.use_deterministic_algorithms(True)`` (as
    PyTorch's own ops then take their deterministic algorithm; torch.compile guards on the flag) and otherwise
    slots or atomics by shape ("auto")."""
    if deterministic is None:
        return "partials" if torch.are_deterministic_algorithms_enabled() else "auto"
    return "partials" if deterministic else "atomics"


def cmi_loss_triton(
    features: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor], options: CMIOptions
) -> CMIOutput:
    if features.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"features dtype {features.dtype} is not supported by backend='triton' (float32, bfloat16, float16); "
            "use backend='torch'"
        )
    if centroids is not None:
        centroids = centroids.detach()
    loss, stats = CMIFunction.apply(
        features,
        labels,
        centroids,
        options.num_classes,
        options.temperature,
        options.eps,
        accumulate_mode(options.deterministic),
        options.reduction,
    )
    dim = features.shape[1]
    # narrow/select: the same views as stats[:, :dim] and stats[:, dim], without __getitem__'s index parsing (~2 us).
    return CMIOutput(loss, stats.narrow(1, 0, dim), stats.select(1, dim))
