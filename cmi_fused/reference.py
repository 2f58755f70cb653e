"""Plain-PyTorch implementation of the ``cmi_loss`` contract (``backend="torch"``).

It runs everywhere, is the eager baseline of the benchmarks and the readable statement of the math:

    f_i    = softmax(h_i / T)                                   (N, d), computed in float32 (float64 for float64 input)
    S_c    = sum_{i: y_i = c} f_i,   n_c = |{i: y_i = c}|       class_sums (C, d), class_counts (C,)
    G_c    = given centroids, or S_c / n_c (per-batch centroids, held constant for the gradient)
    KL_i   = sum_j f_ij (log f_ij - log max(G_{y_i j}, eps))
    loss   = mean_i KL_i | sum_i KL_i | KL (reduction)

Autograd differentiates it; with detached per-batch centroids that is also the exact gradient of the
un-detached expression, because sum_j G_cj = 1 makes the centroid's own contribution vanish. Only to first
order: a second derivative holds the per-batch centroids constant too, so it lacks the Hessian's term through
dG/dh (keeping G in the graph would make it exact, at 2-3x the fwd+bwd time: 4096x768 and 16384x768 on the dev
CPU). A refusal would need grad mode in the backward to mean create_graph=True, which torch.func's first
derivatives break, so the README says it instead.
Rows whose label is outside [0, C) (possible on CUDA without ``check_labels``) are never used as an
index: they get a NaN KL and add nothing to the class sums and counts.
"""

from __future__ import annotations

from typing import Optional

import torch

from .options import CMIOptions, CMIOutput


def reduce_rows(row_losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return row_losses.mean()
    if reduction == "sum":
        return row_losses.sum()
    return row_losses


def cmi_loss_torch(
    features: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor], options: CMIOptions
) -> CMIOutput:
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    num_classes = options.num_classes
    log_f = torch.log_softmax(features.to(compute_dtype) / options.temperature, dim=-1)
    f = log_f.exp()

    valid = (labels >= 0) & (labels < num_classes)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    weights = valid.to(compute_dtype)
    f_detached = f.detach()
    class_sums = torch.zeros(num_classes, f.shape[1], dtype=compute_dtype, device=f.device)
    class_sums.index_add_(0, safe_labels, f_detached * weights[:, None])
    class_counts = torch.zeros(num_classes, dtype=compute_dtype, device=f.device)
    class_counts.index_add_(0, safe_labels, weights)

    if centroids is None:
        centroids = class_sums / class_counts.clamp_min(1.0)[:, None]
    log_g = torch.log(centroids.detach().to(compute_dtype).clamp_min(options.eps))
    row_kl = (f * (log_f - log_g[safe_labels])).sum(dim=-1)
    row_kl = torch.where(valid, row_kl, torch.full_like(row_kl, float("nan")))
    return CMIOutput(reduce_rows(row_kl, options.reduction), class_sums.float(), class_counts.float())
