"""Forward kernel of the CMI loss: row softmax, KL to the class centroid, per-class statistics.

Math (per row i, z_i = h_i / T, all in fp32):

    m_i    = max_j z_ij,   l_i = log sum_j exp(z_ij - m_i)       (online over chunks of BLOCK_D columns)
    log f_ij = (z_ij - m_i) - l_i,     f_ij = exp(log f_ij)
    KL_i   = sum_j f_ij (log f_ij - log max(G_{y_i j}, eps))
    S_c    = sum_{i: y_i = c} f_i,   n_c = |{i: y_i = c}|

Nothing of size N x d is written: softmax, log-softmax and the gathered centroid rows live in registers. The
log-sum-exp is kept in its two parts ``lse = (m_i, l_i)``, (N, 2), and never added up: m_i + l_i rounds to the ulp
of m_i, which for |z| of 1e4 (h / T with a small T) is 1e-3, and z - (m + l) would carry that error into every log f
(ties of 1e30 would lose l = log 2 entirely). z - m is exact near the maximum, where f is large.

One kernel, three uses, selected by which pointers the launcher passes (``None`` for the others) and the matching
constexpr flags (HAS_LSE, HAS_CENTROIDS, COMPUTE_KL, ACCUMULATE), which the launcher sets from the same pointers:

* fixed centroids (one launch): lse = (m, l), KL (``centroids_ptr`` given) and the class statistics;
* per-batch centroids, phase 1: lse = (m, l) and the class statistics;
* per-batch centroids, phase 2 (``lse_in_ptr`` given): KL against ``G_c = S_c / n_c`` read on the fly from the
  reduced statistics of phase 1 (``stats_ptr``), so the centroid matrix is never materialised.

In the fixed-centroid forward and phase 2, ``log max(G, eps)`` is either computed per element (``tl.log`` is a
~20-instruction polynomial) or, with LOG_CENTROIDS, read from a (C, R) fp32 table made once per step by
``cmi_log_centroids.py`` when enough rows share each class row to pay for it.

Class statistics go to an accumulator of shape (slots, C, R): columns [0, d) hold S_c, column d holds n_c, and the
row length R = ``stride_accum_row`` is d + 1 rounded up to a multiple of 16 so that every class row starts 64-byte
aligned: Triton then knows the divisibility and uses 128-bit loads and stores for the slot updates (with R = d + 1
they were scalar: four times the memory instructions on the L2-bound small-C path).
With ``USE_ATOMICS`` every program adds into slot 0 with fp32 atomics (vocabulary-sized C: rows spread over many
classes, so atomics rarely collide). Otherwise each program owns slot ``pid`` and accumulates there with plain
load/add/store (it is the only writer, and the same thread touches the same column on every row, so no barrier is
needed); the caller then sums the slots in a fixed order, which is bit-identical from run to run and never
serialises on a handful of hot class rows when C is 2 or 3.

The grid is persistent: ``num_programs`` programs walk the rows ``pid, pid + P, ...`` so that a program's slot
collects many rows. Row offsets are int64: ``row * stride`` overflows int32 beyond 2**31 elements.

Labels outside [0, C) are never used as an index (class 0 is addressed with every access masked off): such a
row adds nothing to the statistics and gets KL = NaN, so a bad label shows in the loss instead of corrupting memory.
"""

import triton
import triton.language as tl

# Columns per chunk. 4096 fp32 values over 8 warps is 16 registers per thread per live tensor: larger rows loop.
MAX_BLOCK_D = 4096


def block_d(dim: int) -> int:
    # Plain Python, not triton.next_power_of_2: in triton 3.6 and 3.9 it is a ConstexprFunction whose wrapper costs
    # 3-4 us per call (twice per step) on the 2-core CPU dev host.
    return min(1 << (dim - 1).bit_length(), MAX_BLOCK_D)


def num_warps_for(block: int) -> int:
    # 4 warps up to 2048 columns, 8 at the 4096 cap (16 values per thread). Fewer warps per row mean fewer
    # instructions per row (block reductions, per-row scalars): at BLOCK_D 4096, 8 warps issue 20-30% fewer
    # SASS instructions per row than 16 in every variant (bench/NOTES.md item 7).
    return 8 if block >= 4096 else 4


def compile_options(block: int) -> dict:
    """Triton's compile options for every launch of the CMI kernels in blocks of ``block`` columns."""
    # Multiply-add contraction (FFMA) asked for, not left to Triton's default: it is what triton 3.3 to 3.9 do by
    # default and what bench/NOTES.md's instruction counts assume. Triton 3.9 warns at the first compile that its
    # default turns to off in 3.10, which adds 8 instructions to the sm_90 SASS of the fixed-centroid forward and of
    # the backward at BLOCK_D 1024 (648 -> 656, 448 -> 456, triton 3.6) and changes their rounding.
    return {"num_warps": num_warps_for(block), "enable_fp_fusion": True}


def launch_meta(dim: int) -> dict:
    """BLOCK_D and the compile options for rows of ``dim`` columns (forward, backward and log table).

    Passed by the launchers instead of ``triton.heuristics``: the heuristics wrapper merges all arguments into a
    new dict for every flag on every launch, measured at 31 us per forward launch (6 flags, 26 arguments) on the
    2-core CPU dev host, a fifth of the whole host cost of a GLUE-sized fwd+bwd step.
    """
    block = block_d(dim)
    return {"BLOCK_D": block, **compile_options(block)}


@triton.jit
def load_class(labels_ptr, row, stride_label, num_classes):
    """The row's class index, safe to address with (0 for a bad label), and whether its label is in [0, C)."""
    label = tl.load(labels_ptr + row * stride_label).to(tl.int64)
    label_ok = (label >= 0) & (label < num_classes)
    return tl.where(label_ok, label, 0), label_ok


@triton.jit
def class_columns(offs, dim, label_ok):
    """Mask of the columns that address the row's class row (centroid, log table, sums): offs < d, or none for a
    bad label. One comparison against a bound of d or 0: under TRITON_INTERPRET a scalar-and-vector `&` gives int32
    (rejected as a mask) on triton 3.9, and `tl.where(label_ok, in_row, False)` fails on 3.2 (no int1 constant)."""
    return offs < tl.where(label_ok, dim, 0)


@triton.jit
def log_centroid(
    centroids_ptr,
    stride_cent_row,
    stride_cent_col,
    stats_ptr,
    stride_stats_row,
    class_idx,
    label_ok,
    offs,
    class_mask,
    dim,
    eps,
    HAS_CENTROIDS: tl.constexpr,
    LOG_CENTROIDS: tl.constexpr,
):
    """log max(G_{y, offs}, eps): read from a log-centroid table (LOG_CENTROIDS: ``centroids_ptr`` holds it), or
    the log of the given centroid row, or of S_y / n_y read from the class statistics."""
    if HAS_CENTROIDS:
        g = tl.load(
            centroids_ptr + class_idx * stride_cent_row + offs * stride_cent_col, mask=class_mask, other=1.0
        ).to(tl.float32)
        if LOG_CENTROIDS:
            return g
    else:
        stats_row = stats_ptr + class_idx * stride_stats_row
        g = tl.load(stats_row + offs, mask=class_mask, other=1.0) / tl.load(stats_row + dim, mask=label_ok, other=1.0)
    # PropagateNan.ALL: a NaN centroid entry gives NaN as torch's clamp_min does (CUDA's plain max would return eps).
    return tl.log(tl.maximum(g, eps, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def load_scaled(row_ptr, offs, in_row, stride_feat_col, inv_temperature):
    """z = h / T for one chunk of a row, in fp32; -inf outside the row (so exp(z - .) is 0 there)."""
    z = tl.load(row_ptr + offs * stride_feat_col, mask=in_row, other=-float("inf"))
    return z.to(tl.float32) * inv_temperature


@triton.jit
def load_lse(lse_ptr, row):
    """The row's log-sum-exp parts (m, l) from an (N, 2) fp32 tensor."""
    return tl.load(lse_ptr + 2 * row), tl.load(lse_ptr + 2 * row + 1)


@triton.jit
def store_lse(lse_ptr, row, row_max, log_sum):
    """The row's log-sum-exp parts (m, l) into an (N, 2) fp32 tensor (read back by :func:`load_lse`)."""
    tl.store(lse_ptr + 2 * row, row_max)
    tl.store(lse_ptr + 2 * row + 1, log_sum)


@triton.jit
def softmax_in_registers(z, row, lse_in_ptr, HAS_LSE: tl.constexpr):
    """(m, l, log f, f) of a row held in registers: m and l read from phase 1 (HAS_LSE) or computed; f = 0 and
    log f = -inf outside the row. Computing f from the log-sum-exp's own exp(z - m) saves a second exp per
    element."""
    if HAS_LSE:
        row_max, log_sum = load_lse(lse_in_ptr, row)
        log_f = (z - row_max) - log_sum
        f = tl.exp(log_f)
    else:
        row_max = tl.max(z, axis=0)
        shifted = z - row_max
        shifted_exp = tl.exp(shifted)  # 0 outside the row (z = -inf there)
        sum_exp = tl.sum(shifted_exp, axis=0)
        log_sum = tl.log(sum_exp)
        log_f = shifted - log_sum
        f = shifted_exp * (1.0 / sum_exp)
    return row_max, log_sum, log_f, f


@triton.jit
def chunk_kl(
    log_f,
    f,
    offs,
    in_row,
    class_mask,
    class_idx,
    label_ok,
    centroids_ptr,
    stride_cent_row,
    stride_cent_col,
    stats_ptr,
    stride_stats_row,
    dim,
    eps,
    HAS_CENTROIDS: tl.constexpr,
    LOG_CENTROIDS: tl.constexpr,
):
    """One chunk's part of KL_i, summed to a scalar (a [BLOCK_D] accumulator carried across chunks cost up to 50
    more registers and an 8-byte spill on triton 3.6). ``class_mask``: :func:`class_columns` of the chunk."""
    log_g = log_centroid(
        centroids_ptr, stride_cent_row, stride_cent_col, stats_ptr, stride_stats_row,
        class_idx, label_ok, offs, class_mask, dim, eps, HAS_CENTROIDS, LOG_CENTROIDS,
    )  # fmt: skip
    return tl.sum(tl.where(in_row, f * (log_f - log_g), 0.0), axis=0)


@triton.jit
def add_to_class_row(values, cols, mask, class_idx, slot, accum_ptr, stride_accum_row, num_classes,
                     USE_ATOMICS: tl.constexpr):  # fmt: skip
    """accum[slot, y, cols] += values: a chunk of the class sums (cols < d) or the count (column d), in the
    program's slot (plain load/add/store) or in slot 0 (atomics)."""
    ptrs = accum_ptr + (slot * num_classes + class_idx) * stride_accum_row + cols
    if USE_ATOMICS:
        # relaxed: nothing reads the sums before the kernel ends. The default acq_rel adds a MEMBAR.ALL.GPU and an
        # L1 invalidation after every atomic on sm_90.
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + values, mask=mask)


# n_rows is only the row loop's bound: specialising it (== 1, divisible by 16) would only compile more variants,
# e.g. one more for the last, partial batch of an epoch.
@triton.jit(do_not_specialize=["n_rows"])
def cmi_forward_kernel(
    features_ptr,
    stride_feat_row,
    stride_feat_col,
    labels_ptr,
    stride_label,
    centroids_ptr,  # (C, d) centroids (any float dtype) or their log table (LOG_CENTROIDS), or None: from stats
    stride_cent_row,
    stride_cent_col,
    stats_ptr,  # (C, R) reduced class statistics of phase 1, or None
    stride_stats_row,
    accum_ptr,  # (slots, C, R) fp32 accumulator, zero-initialised, or None
    stride_accum_row,  # R, a multiple of 16
    lse_in_ptr,  # (N, 2) lse parts (m, l) from phase 1, or None
    lse_out_ptr,  # (N, 2) or None
    row_kl_ptr,  # (N,) or None
    n_rows,
    dim,
    num_classes,
    inv_temperature,
    eps,
    USE_ATOMICS: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_CENTROIDS: tl.constexpr,
    LOG_CENTROIDS: tl.constexpr,  # centroids_ptr holds log max(G, eps) (kernels/cmi_log_centroids.py)
    COMPUTE_KL: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # dim <= BLOCK_D: the row is read once and kept in registers
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    if USE_ATOMICS:
        slot = 0
    else:
        slot = pid

    for row in tl.range(pid, n_rows, num_programs):
        class_idx, label_ok = load_class(labels_ptr, row, stride_label, num_classes)
        row_ptr = features_ptr + row * stride_feat_row
        row_kl = 0.0
        if SINGLE_CHUNK:
            # Rows of d <= 4096 (all BERT-sized features): read once and kept in registers for the log-sum-exp,
            # the KL and the class sums. (Two rows per iteration did not overlap their loads in SASS: NOTES item 9.)
            in_row = cols < dim
            z = load_scaled(row_ptr, cols, in_row, stride_feat_col, inv_temperature)
            row_max, log_sum, log_f, f = softmax_in_registers(z, row, lse_in_ptr, HAS_LSE)
            if not HAS_LSE:
                store_lse(lse_out_ptr, row, row_max, log_sum)
            class_mask = class_columns(cols, dim, label_ok)
            if COMPUTE_KL:
                row_kl = chunk_kl(
                    log_f, f, cols, in_row, class_mask, class_idx, label_ok,
                    centroids_ptr, stride_cent_row, stride_cent_col, stats_ptr, stride_stats_row, dim, eps,
                    HAS_CENTROIDS, LOG_CENTROIDS,
                )  # fmt: skip
            if ACCUMULATE:
                add_to_class_row(f, cols, class_mask, class_idx, slot, accum_ptr,
                                 stride_accum_row, num_classes, USE_ATOMICS)  # fmt: skip
        else:
            # Longer rows: an online log-sum-exp over the chunks, then a second sweep (the row was just read, so
            # its loads hit L1/L2) for the KL and the class sums.
            if HAS_LSE:
                row_max, log_sum = load_lse(lse_in_ptr, row)
            else:
                run_max = -float("inf")
                run_sum = 0.0
                for start in tl.range(0, dim, BLOCK_D):
                    offs = start + cols
                    z = load_scaled(row_ptr, offs, offs < dim, stride_feat_col, inv_temperature)
                    new_max = tl.maximum(run_max, tl.max(z, axis=0))
                    # While every chunk so far is -inf (masked logits), shift by 0: exp(-inf - -inf) would be NaN
                    # and poison the row's f, and with it the class sums, though f is 0 in those columns.
                    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
                    run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
                    run_max = new_max
                row_max = run_max
                log_sum = tl.log(run_sum)
                store_lse(lse_out_ptr, row, row_max, log_sum)
            if COMPUTE_KL or ACCUMULATE:
                for start in tl.range(0, dim, BLOCK_D):
                    offs = start + cols
                    in_row = offs < dim
                    z = load_scaled(row_ptr, offs, in_row, stride_feat_col, inv_temperature)
                    log_f = (z - row_max) - log_sum
                    f = tl.exp(log_f)
                    class_mask = class_columns(offs, dim, label_ok)
                    if COMPUTE_KL:
                        row_kl += chunk_kl(
                            log_f, f, offs, in_row, class_mask, class_idx, label_ok,
                            centroids_ptr, stride_cent_row, stride_cent_col, stats_ptr, stride_stats_row, dim, eps,
                            HAS_CENTROIDS, LOG_CENTROIDS,
                        )  # fmt: skip
                    if ACCUMULATE:
                        add_to_class_row(f, offs, class_mask, class_idx, slot, accum_ptr,
                                         stride_accum_row, num_classes, USE_ATOMICS)  # fmt: skip
        if COMPUTE_KL:
            tl.store(row_kl_ptr + row, tl.where(label_ok, row_kl, float("nan")))
        if ACCUMULATE:
            # n_y += 1, in column d of the class row
            add_to_class_row(1.0, dim, label_ok, class_idx, slot, accum_ptr, stride_accum_row, num_classes,
                             USE_ATOMICS)  # fmt: skip
