"""Plain-PyTorch implementation of the ``cmi_loss`` contract (``backend="torch"``).

It runs everywhere, is the eager baseline of the benchmarks and the readable statement of the math:

    f_i    = softmax(h_i / T)                                   (N, d), computed in float32 (float64 for float64 input)
    S_c    = sum_{i: y_i = c} f_i,   n_c = |{i: y_i = c}|       class_sums (C, d), class_counts (C,)
    G_c    = given centroids, or S_c / n_c (per-batch centroids, held constant for the gradient)
    KL_i   = sum_j f_ij (log f_ij - log max(G_{y_i j}, eps))
    loss   = mean_i KL_i | sum_i KL_i | KL (reduction)

Autograd differentiates it; with detached per-batch centroids that is also the exact gradient of the un-detached mean
and sum (and of any upstream gradient constant within each class), because sum_j G_cj = 1 makes the centroid's own
contribution vanish (where every G_cj > eps: an entry floored at eps leaves that sum). Only to first order: a second
derivative holds the per-batch centroids constant too, so it lacks the Hessian's term through dG/dh (keeping G in the
graph would make it exact, at 2-3x the fwd+bwd time: 4096x768 and 16384x768 on the dev CPU). A refusal would need grad
mode in the backward to mean create_graph=True, which torch.func's first derivatives break, so the README says it
instead.
Rows whose label is outside [0, C) (possible wherever the label check is off: ``check_labels=False``, CUDA tensors or
torch.compile by default) are never used as an index: they get a NaN KL and add nothing to the class sums and counts.
"""

from __future__ import annotations

from typing import Optional

import torch

from .options import CMIOptions, CMIOutput, compute_dtype, labels_in_range


def reduce_rows(row_losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return row_losses.mean()
    if reduction == "sum":
        return row_losses.sum()
    return row_losses


def cmi_loss_torch(
    features: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor], options: CMIOptions
) -> CMIOutput:
    dtype = compute_dtype(features.dtype)
    num_classes = options.num_classes
    n_rows, dim = features.shape
    scaled = features.to(dtype)
    if options.temperature != 1.0:  # a Python float: the division's full pass is skipped at T = 1, no device sync
        scaled = scaled / options.temperature
    log_f = torch.log_softmax(scaled, dim=-1)
    f = log_f.exp()

    labels, valid = labels_in_range(labels, num_classes)
    # Rows with a bad label add into an overflow bin (row C), cut off after: no masking pass over (N, d).
    bins = torch.where(valid, labels, num_classes)
    sums_and_overflow = torch.zeros(num_classes + 1, dim, dtype=dtype, device=f.device)
    sums_and_overflow.index_add_(0, bins, f.detach())
    counts_and_overflow = torch.zeros(num_classes + 1, dtype=dtype, device=f.device)
    counts_and_overflow.index_add_(0, bins, torch.ones(n_rows, dtype=dtype, device=f.device))
    class_sums, class_counts = sums_and_overflow[:num_classes], counts_and_overflow[:num_classes]

    if centroids is None:
        centroids = class_sums / class_counts.clamp_min(1.0)[:, None]
    centroids = centroids.detach().to(dtype)
    safe_labels = torch.where(valid, labels, 0)
    # log max(G, eps) of the rows' centroids: over the (C, d) table then gathered, or over the N gathered rows when
    # the classes outnumber them (vocabulary-sized C); the same values either way.
    if num_classes <= n_rows:
        log_g = centroids.clamp_min(options.eps).log()[safe_labels]
    else:
        log_g = centroids[safe_labels].clamp_min(options.eps).log()
    row_kl = (f * (log_f - log_g)).sum(dim=-1)
    row_kl = torch.where(valid, row_kl, torch.full_like(row_kl, float("nan")))
    return CMIOutput(reduce_rows(row_kl, options.reduction), class_sums.float(), class_counts.float())
