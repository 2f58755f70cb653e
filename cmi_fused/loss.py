"""The public entry point: :func:`cmi_loss`."""

from __future__ import annotations

from typing import Optional

import torch

from .options import TRITON_INSTALLED, CMIOutput, check_inputs
from .reference import cmi_loss_torch


def cmi_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    centroids: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    eps: float = 1e-12,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
    check_labels: Optional[bool] = None,
) -> CMIOutput:
    """Conditional mutual information I(X; Z | Y) of ``softmax(features / temperature)`` given the labels.

    ``KL_i = sum_j f_ij (log f_ij - log max(G_{y_i j}, eps))`` with ``f_i = softmax(h_i / T)`` and ``G``
    the given ``centroids`` (C, d), or, when ``None``, the per-batch class means of ``f``.

    Args:
        features: (N, d) float tensor (fp32/bf16/fp16; float64 on the torch backend); rows may be strided.
        labels: (N,) integer tensor with values in ``[0, num_classes)``.
        num_classes: C.
        centroids: optional (C, d) tensor of class distributions, held constant for the gradient.
        temperature: T > 0.
        reduction: ``"mean"`` (the empirical CMI), ``"sum"`` or ``"none"`` (per-row KL).
        eps: floor applied to the centroids before the log.
        backend: ``"triton"`` (fused kernels), ``"torch"`` (plain PyTorch) or ``"auto"`` (triton for CUDA
            features where triton is installed, torch otherwise).
        deterministic: class-sum reduction of the triton backend. ``None`` (default): per-program
            partial sums reduced in a fixed order (bit-identical across runs) whenever they fit in the
            partials budget, fp32 atomics otherwise (vocabulary-sized C); always partials under
            ``torch.use_deterministic_algorithms(True)``. ``True``: always partials. ``False``: always atomics.
            The torch backend takes no such choice: its class sums are ``index_add_``, deterministic on CUDA only
            under ``torch.use_deterministic_algorithms(True)``, as for any PyTorch op.
        check_labels: check that labels lie in ``[0, C)``. ``None`` (default): only for CPU tensors,
            where it costs no device synchronisation; ``True`` also on CUDA (one sync); ``False``: never.

    Returns:
        :class:`CMIOutput` ``(loss, class_sums, class_counts)``.
    """
    options, backend = check_inputs(
        features,
        labels,
        num_classes,
        centroids,
        temperature=temperature,
        reduction=reduction,
        eps=eps,
        backend=backend,
        deterministic=deterministic,
        check_labels=check_labels,
    )
    if backend == "torch":
        return cmi_loss_torch(features, labels, centroids, options)
    if not TRITON_INSTALLED:  # setup.py installs triton on Linux only
        raise ImportError(
            "backend='triton' needs the triton package, which is not installed; use backend='torch' or 'auto'"
        )
    from .fused import cmi_loss_triton

    return cmi_loss_triton(features, labels, centroids, options)
