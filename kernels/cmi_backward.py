"""Backward kernel of the CMI loss: one streaming pass that recomputes f from the saved row log-sum-exp parts
(m_i, l_i): log f_ij = (z_ij - m_i) - l_i, never z_ij - (m_i + l_i), whose rounding grows with |z| (cmi_forward.py).

Gradient of KL_i = sum_j f_ij (log f_ij - a_j) with a_j = log max(G_{y_i j}, eps) held constant and
f_i = softmax(z_i), z_i = h_i / T. Since d f_j / d z_k = f_j (delta_jk - f_k):

    d KL_i / d z_ik = sum_j f_j (delta_jk - f_k) (log f_j - a_j + 1)
                    = f_k (log f_k - a_k + 1) - f_k sum_j f_j (log f_j - a_j + 1)
                    = f_k (log f_k - a_k - KL_i)                      (sum_j f_j = 1)
    d KL_i / d h_ik = f_ik (log f_ik - log max(G_{y_i k}, eps) - KL_i) / T

For per-batch centroids G_c = S_c / n_c this is also the gradient of the un-detached mean or sum (any upstream
gradient that is the same for every row of a class): the centroid's own term is
-sum_{i in c} sum_j f_ij d(log G_cj) = -n_c sum_j dG_cj = -n_c d(sum_j G_cj) = 0. That needs every G_cj > eps: an
entry floored at eps has no derivative and leaves the sum (a difference of the order of eps).

The reduction is folded in: the caller's gradient enters as ``grad_scale * grad_loss[i * stride_grad]`` with
``grad_loss`` the per-row gradient (reduction "none") or the scalar gradient of the reduced loss (stride 0;
``grad_scale`` = 1/N for "mean", 1 for "sum"). Every reduction and any grad_output are honoured without a
host-side check for "grad_output == 1", and autograd runs no separate mean/sum node (one launch and one graph
node less per step, which is most of the cost at GLUE batch sizes).

Recomputing here instead of storing dKL/dh in the forward moves fewer bytes: forward reads h once, backward
reads h and writes dh (three passes over N x d); storing the gradient in the forward and scaling it by
grad_output in the backward would take four (write in forward, read + write in backward) and keep an extra
N x d buffer alive between the passes.

A row with a label outside [0, C) has KL_i = NaN from the forward but passes no gradient back (zero, as
``torch.where`` gives the reference): a caller that drops such rows from the loss (an ignore label) then gets the
other rows' step intact instead of NaN from 0 * NaN. Its centroid loads are masked off and never address memory
outside the centroid matrix.
"""

import triton
import triton.language as tl

from .cmi_forward import class_columns, load_class, load_lse, log_centroid


@triton.jit
def cmi_backward_kernel(
    features_ptr,
    stride_feat_row,
    stride_feat_col,
    labels_ptr,
    stride_label,
    centroids_ptr,  # (C, d) given centroids or their log table (LOG_CENTROIDS), or None: centroids from stats
    stride_cent_row,
    stride_cent_col,
    stats_ptr,  # (C, R) class sums and counts (used when centroids_ptr is None)
    stride_stats_row,
    lse_ptr,  # (N, 2) fp32: m_i, l_i
    row_kl_ptr,  # (N,) fp32
    grad_loss_ptr,  # (N,) gradient w.r.t. each KL_i, or the scalar gradient of the reduced loss (stride 0)
    stride_grad,
    grad_scale,  # d loss / d KL_i of the reduction: 1/N (mean) or 1
    grad_features_ptr,  # (N, d) contiguous, the features' dtype
    dim,
    num_classes,
    inv_temperature,
    eps,
    HAS_CENTROIDS: tl.constexpr,
    LOG_CENTROIDS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    class_idx, label_ok = load_class(labels_ptr, row, stride_label, num_classes)

    row_max, log_sum = load_lse(lse_ptr, row)
    # A bad label's row: scale 0 and row_kl 0 (its log_g is finite too: the masked centroid loads give 1), so
    # grad = 0 for finite features, and the per-element loop needs no extra select.
    row_kl = tl.where(label_ok, tl.load(row_kl_ptr + row), 0.0)
    grad_row = tl.load(grad_loss_ptr + row * stride_grad).to(tl.float32)
    scale = tl.where(label_ok, grad_row * (grad_scale * inv_temperature), 0.0)

    row_ptr = features_ptr + row * stride_feat_row
    out_ptr = grad_features_ptr + row * dim
    for start in tl.range(0, dim, BLOCK_D):
        offs = start + cols
        in_row = offs < dim
        class_mask = class_columns(offs, dim, label_ok)
        z = tl.load(row_ptr + offs * stride_feat_col, mask=in_row, other=0.0).to(tl.float32)
        log_f = (z * inv_temperature - row_max) - log_sum
        f = tl.exp(log_f)
        log_g = log_centroid(
            centroids_ptr, stride_cent_row, stride_cent_col, stats_ptr, stride_stats_row,
            class_idx, label_ok, offs, class_mask, dim, eps, HAS_CENTROIDS, LOG_CENTROIDS,
        )  # fmt: skip
        grad = scale * f * (log_f - log_g - row_kl)
        tl.store(out_ptr + offs, grad.to(grad_features_ptr.dtype.element_ty), mask=in_row)
