"""Log-centroid table of the CMI loss: L_c = log max(G_c, eps) for every class, once per step.

G_c is a given centroid row (C, d), or the per-batch mean S_c / n_c read from the reduced class statistics
(columns [0, d) sums, column d count). The forward and backward kernels then load L_{y_i} instead of evaluating
log max(G_{y_i j}, eps) for every element of every row.

Why: ``tl.log`` lowers to an inline ~20-instruction polynomial (libdevice's logf; the stable ``triton.language``
API has no ``lg2.approx``). At d = 768 (BLOCK_D 1024, 4 warps) the per-element log was ~160 of ~600 SASS
instructions per warp and row in the forward and ~160 of ~440 in the backward (triton 3.6, sm_90), and at those
counts both kernels issue more instructions than the memory system needs cycles. The table costs one launch,
C x d logs and a (C, R) fp32 write, so the launcher uses it only when enough rows share each class row
(``kernels/cmi.py``: N >= 4 C and N >= 1024); vocabulary-sized C and GLUE-sized batches keep the per-element log.

One program per class; rows of any length loop over BLOCK_D columns. The table holds exactly what the per-element
path computes (the same fp32 operations on the same g), so results do not depend on which path the launcher picks.
"""

import triton
import triton.language as tl

from .cmi_forward import log_centroid


@triton.jit
def cmi_log_centroids_kernel(
    centroids_ptr,  # (C, d) given centroids, any float dtype, or None: G from the class statistics
    stride_cent_row,
    stride_cent_col,
    stats_ptr,  # (C, R) class sums and counts (used when centroids_ptr is None)
    stride_stats_row,
    table_ptr,  # (C, R) fp32 output: log max(G, eps) in columns [0, d)
    stride_table_row,
    dim,
    eps,
    HAS_CENTROIDS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    class_idx = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    always = class_idx >= 0  # every class index is valid here (a tensor, as log_centroid's label mask expects)
    for start in tl.range(0, dim, BLOCK_D):
        offs = start + cols
        in_row = offs < dim
        log_g = log_centroid(
            centroids_ptr, stride_cent_row, stride_cent_col, stats_ptr, stride_stats_row,
            class_idx, always, offs, in_row, dim, eps, HAS_CENTROIDS, False,
        )  # fmt: skip
        tl.store(table_ptr + class_idx * stride_table_row + offs, log_g, mask=in_row)
