"""Launchers, custom ops and the autograd Function of the fused CMI loss.

Forward (see ``cmi_forward.py`` for the math):

* fixed centroids: one kernel launch computes lse_i = (m_i, l_i), KL_i and the class statistics;
* per-batch centroids: phase 1 (lse_i, class statistics), a fixed-order sum of the per-program slots, phase 2
  (KL_i against S_c / n_c read on the fly).

When N >= 4 C and N >= 1024, a log-centroid table (``cmi_log_centroids.py``, one more launch) replaces the
per-element log in the KL and in the backward; it is saved for the backward in place of the centroids.

The kernels return per-row KL; the autograd Function reduces it (mean/sum/none) inside its own forward and the
backward kernel applies the reduction's factor itself, so a step has no separate mean/sum node in the autograd
graph and no broadcast-gradient launch in the backward.

The launchers are also registered as ``torch.library`` custom ops with fake (meta) implementations, so a model
that calls ``cmi_loss`` compiles with ``torch.compile(fullgraph=True)``: the autograd Function calls the ops while
torch.compile traces and the plain launchers in eager mode.
Nothing here reads tensor values on the host: no ``.item()``, no synchronisation.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from .cmi_backward import cmi_backward_kernel
from .cmi_forward import cmi_forward_kernel, launch_meta
from .cmi_log_centroids import cmi_log_centroids_kernel

# Whether triton's interpreter runs the kernels: TRITON_INTERPRET decided it when triton.jit made them (at import),
# so the variable's value at a call may differ from this.
KERNELS_INTERPRETED = isinstance(cmi_forward_kernel, InterpretedFunction)
# Programs per SM of the persistent forward grid. The row loop is not software-pipelined (one row's loads in flight
# per program), so bytes in flight scale with resident programs: 8 x 4 warps = 32 warps per SM (4 gave 16, about
# 8 KB in flight per SM where ~23 KB are needed to stream at 3 TB/s; bench/NOTES.md item 9). With slots the
# budget may cap the grid lower.
PROGRAMS_PER_SM = 8
# Programs of the forward grid under TRITON_INTERPRET=1 (CPU): each one is a Python loop, keep it small.
INTERPRETER_PROGRAMS = 4
# The per-program slots may take half of the features' bytes: the accumulator lives only inside the forward (the
# slots are summed into the (C, R) statistics and freed before it returns), while the backward allocates dh, the
# features' full size, so the op's peak extra memory stays the backward's. Larger slots buy programs: the grid has
# one program per slot (bench/NOTES.md item 9).
PARTIALS_BUDGET_FRACTION = 2
# ... and at most this many bytes, so that the zero-fill, the slot updates and the fixed-order slot sum stay in L2
# (50 MB on an H100, 40 MB on an A100) instead of adding DRAM traffic to a memory-bound op.
PARTIALS_MAX_BYTES = 16 * 2**20
# With deterministic=None, slots are used when at least this many programs (or all of them) get one; fewer
# would serialise the rows on too few programs, so atomics are used instead (tiny batches, vocabulary-sized C).
MIN_PARTIAL_PROGRAMS = 32
# Rows of the class-statistics accumulator are padded to this many fp32 values (64 bytes): aligned class rows let
# the forward use 128-bit accesses (see cmi_forward.py).
STATS_ROW_ALIGN = 16


# The log-centroid table pays for its launch and its C x d logs when each class row serves several rows
# (LOG_TABLE_ROWS_PER_CLASS) and the batch is past the launch-bound sizes (LOG_TABLE_MIN_ROWS).
LOG_TABLE_ROWS_PER_CLASS = 4
LOG_TABLE_MIN_ROWS = 1024


def use_log_table(n_rows: int, num_classes: int) -> bool:
    return n_rows >= max(LOG_TABLE_MIN_ROWS, LOG_TABLE_ROWS_PER_CLASS * num_classes)


def stats_row_len(dim: int) -> int:
    """Row length of the class statistics: d sums, one count, padding to a multiple of STATS_ROW_ALIGN."""
    return -(-(dim + 1) // STATS_ROW_ALIGN) * STATS_ROW_ALIGN


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)  # checked on every CPU launch: a dict lookup instead of two version parses
def interpreter_rejects_numpy(triton_version: str, numpy_version: str) -> bool:
    """triton-lang/triton#9171: before triton 3.7 the interpreter turns a program id (a one-element array) into a
    Python int with ``int()``, which numpy 2.4 refuses, so every interpreted launch fails deep inside triton."""
    return _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4)


def interpreter_numpy_problem() -> Optional[str]:
    """What stops the installed triton's interpreter from running with the installed numpy, or None."""
    import numpy  # the interpreter's own dependency: only the CPU path needs it

    if not interpreter_rejects_numpy(triton.__version__, numpy.__version__):
        return None
    return (
        f"the interpreter of triton {triton.__version__} fails with numpy {numpy.__version__} "
        "(triton-lang/triton#9171): install numpy<2.4 or triton>=3.7"
    )


def _check_device(features: torch.Tensor) -> None:
    if features.is_cuda:
        return
    if not KERNELS_INTERPRETED:
        how = (
            "TRITON_INTERPRET=1 was set after the kernels were imported: set it before importing cmi_fused"
            if os.environ.get("TRITON_INTERPRET") == "1"
            else "on the CPU set TRITON_INTERPRET=1 before importing triton"
        )
        raise ValueError(
            f"backend='triton' needs CUDA tensors (features are on {features.device}); {how}, or use backend='torch'"
        )
    problem = interpreter_numpy_problem()
    if problem:
        raise RuntimeError(f"{problem}, or use backend='torch'")


def interpreter_errstate():
    """numpy's floating-point warnings off while the interpreter runs the kernels in numpy, as a GPU has none: lanes
    that no result reads make infs and NaNs on ordinary input (0 * -inf in a row's padding lanes, 0 / 0 in the
    log-centroid row of a class absent from the batch), and numpy would warn about each."""
    import numpy  # the interpreter's own dependency: only the CPU path needs it

    return numpy.errstate(all="ignore")


def on_the_tensors_device(launcher):
    """Triton launches on torch's *current* CUDA device and its stream, not on the device of the tensors it is given:
    with tensors on cuda:1 while cuda:0 is current, the kernels would run in cuda:0's context with cuda:1's pointers
    (an illegal address, or with peer access a race with cuda:1's stream). The launcher runs with its first
    argument's device current; in the usual case, that device already is, it costs one device query. CPU tensors
    (the interpreter) run under :func:`interpreter_errstate`."""

    @functools.wraps(launcher)
    def on_device(tensor: torch.Tensor, *args, **kwargs):
        if not tensor.is_cuda:
            with interpreter_errstate():
                return launcher(tensor, *args, **kwargs)
        if tensor.device.index != torch.cuda.current_device():
            with torch.cuda.device(tensor.device):
                return launcher(tensor, *args, **kwargs)
        return launcher(tensor, *args, **kwargs)

    return on_device


def _forward_programs(features: torch.Tensor) -> int:
    n_rows = features.shape[0]
    if features.is_cuda:
        return min(n_rows, _num_sms(features.device.index or 0) * PROGRAMS_PER_SM)
    return min(n_rows, INTERPRETER_PROGRAMS)


def accumulator_slots(features: torch.Tensor, num_classes: int, programs: int, accumulate: str) -> int:
    """Per-program slots of the class-statistics accumulator; for "auto" and "atomics", 1 means fp32 atomics into
    one slot (for "partials", one program owning the single slot).

    ``accumulate``: "partials" (always slots: deterministic), "atomics", or "auto" (slots when enough fit in the
    budget: classification-sized C on batches of a few hundred rows and more; atomics for tiny batches and
    vocabulary-sized C).
    """
    if accumulate == "atomics":
        return 1
    slot_bytes = num_classes * stats_row_len(features.shape[1]) * 4
    budget = min(features.numel() * features.element_size() // PARTIALS_BUDGET_FRACTION, PARTIALS_MAX_BYTES)
    fitting = max(1, min(programs, budget // slot_bytes))
    if accumulate == "partials":
        return fitting
    return fitting if fitting >= min(programs, MIN_PARTIAL_PROGRAMS) and fitting > 1 else 1


def forward_grid(features: torch.Tensor, num_classes: int, accumulate: str) -> tuple[int, int, bool]:
    """``(programs, slots, atomics)`` of the forward: one program per slot (deterministic, even when only one slot
    fits), or the full persistent grid adding into one slot with fp32 atomics."""
    programs = _forward_programs(features)
    slots = accumulator_slots(features, num_classes, programs, accumulate)
    if slots == 1 and accumulate != "partials":
        return programs, 1, True
    return slots, slots, False


# Column offsets are int32 in the kernels (offs * column stride): exact for the unit or small column strides of
# training. A column stride so large that (d - 1) * stride passes int32 (a transposed view of a tensor of more
# than 2**31 elements) would address the wrong memory, so such a tensor is copied to contiguous rows first.
INT32_MAX = 2**31 - 1


def int32_addressable(matrix: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``matrix`` itself, or a contiguous copy when its column offsets would overflow int32."""
    if matrix is None or (matrix.shape[1] - 1) * matrix.stride(1) <= INT32_MAX:
        return matrix
    return matrix.contiguous()


def log_centroid_table(
    centroids: Optional[torch.Tensor],
    stats: Optional[torch.Tensor],
    num_classes: int,
    dim: int,
    eps: float,
    device: torch.device,
) -> torch.Tensor:
    """(C, R) fp32, columns [0, d): log max(G, eps) of the given centroids, or of S_c / n_c from ``stats``."""
    table = torch.empty(num_classes, stats_row_len(dim), dtype=torch.float32, device=device)
    cmi_log_centroids_kernel[(num_classes,)](
        centroids, *(centroids.stride() if centroids is not None else (0, 0)),
        stats, stats.stride(0) if stats is not None else 0,
        table, table.stride(0),
        dim, eps,
        HAS_CENTROIDS=centroids is not None, **launch_meta(dim),
    )  # fmt: skip
    return table


@on_the_tensors_device
def cmi_forward(
    features: torch.Tensor,
    labels: torch.Tensor,
    centroids: Optional[torch.Tensor],
    num_classes: int,
    temperature: float,
    eps: float,
    accumulate: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(row_kl (N,), lse (N, 2), stats (C, R), log_table)``, all fp32.

    lse holds each row's log-sum-exp in two parts, the row max and log sum exp(z - max) (``cmi_forward.py``).

    stats = [class_sums | class_counts | padding]; ``log_table`` is the (C, R) log-centroid table, or an empty
    (0, R) tensor when the per-element log is used (see ``use_log_table``).
    """
    _check_device(features)
    n_rows, dim = features.shape
    programs, slots, use_atomics = forward_grid(features, num_classes, accumulate)
    row_len = stats_row_len(dim)
    # With atomics (one slot) the accumulator is the (C, R) statistics themselves: returning a view of a 3-D
    # buffer would make the autograd Function's output a view, which costs host time per call.
    accum_shape = (slots, num_classes, row_len) if slots > 1 else (num_classes, row_len)
    accum = torch.zeros(accum_shape, dtype=torch.float32, device=features.device)
    lse = torch.empty(n_rows, 2, dtype=torch.float32, device=features.device)
    row_kl = torch.empty(n_rows, dtype=torch.float32, device=features.device)
    meta = launch_meta(dim)
    with_table = use_log_table(n_rows, num_classes)

    def launch(centroids=None, stats=None, accum=None, lse_in=None, lse_out=None, row_kl=None, log_table=False):
        # Which pointers are given selects the kernel's use; the flags say the same to the compiler.
        cmi_forward_kernel[(programs,)](
            features, features.stride(0), features.stride(1),
            labels, labels.stride(0),
            centroids, *(centroids.stride() if centroids is not None else (0, 0)),
            stats, stats.stride(0) if stats is not None else 0,
            accum, row_len, lse_in, lse_out, row_kl,
            n_rows, dim, num_classes, 1.0 / temperature, eps,
            USE_ATOMICS=use_atomics, HAS_LSE=lse_in is not None, HAS_CENTROIDS=centroids is not None,
            LOG_CENTROIDS=log_table, COMPUTE_KL=row_kl is not None, ACCUMULATE=accum is not None,
            SINGLE_CHUNK=dim <= meta["BLOCK_D"], **meta,
        )  # fmt: skip

    table = None
    if centroids is not None:
        if with_table:
            table = log_centroid_table(centroids, None, num_classes, dim, eps, features.device)
            launch(centroids=table, accum=accum, lse_out=lse, row_kl=row_kl, log_table=True)
        else:
            launch(centroids=centroids, accum=accum, lse_out=lse, row_kl=row_kl)
    else:
        launch(accum=accum, lse_out=lse)
    # Fixed-order sum of the per-program slots (deterministic); a single slot needs none (filled by atomics, or by
    # the one program of deterministic=True).
    stats = accum.sum(0) if slots > 1 else accum
    if centroids is None:
        if with_table:
            table = log_centroid_table(None, stats, num_classes, dim, eps, features.device)
            launch(centroids=table, lse_in=lse, row_kl=row_kl, log_table=True)
        else:
            launch(stats=stats, lse_in=lse, row_kl=row_kl)
    if table is None:  # custom ops return tensors only: "no table" is an empty one
        table = torch.empty(0, row_len, dtype=torch.float32, device=features.device)
    return row_kl, lse, stats, table


# Under torch.compile the launchers are opaque custom ops with fake (meta) kernels. Eager calls skip the op
# dispatcher: its Python wrappers cost tens of microseconds per call, more than the GPU work at GLUE batch sizes.
cmi_forward_op = torch.library.custom_op("cmi_fused::cmi_forward", cmi_forward, mutates_args=())


@cmi_forward_op.register_fake
def _(features, labels, centroids, num_classes, temperature, eps, accumulate):
    n_rows, dim = features.shape
    row_len = stats_row_len(dim)
    row_kl = features.new_empty(n_rows, dtype=torch.float32)
    lse = features.new_empty(n_rows, 2, dtype=torch.float32)
    stats = features.new_empty(num_classes, row_len, dtype=torch.float32)
    table_rows = num_classes if use_log_table(n_rows, num_classes) else 0
    log_table = features.new_empty(table_rows, row_len, dtype=torch.float32)
    return row_kl, lse, stats, log_table


@on_the_tensors_device
def cmi_backward(
    grad_loss: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    centroids: Optional[torch.Tensor],
    stats: Optional[torch.Tensor],
    lse: torch.Tensor,
    row_kl: torch.Tensor,
    num_classes: int,
    temperature: float,
    eps: float,
    grad_scale: float,
    log_centroids: bool,
) -> torch.Tensor:
    """Gradient w.r.t. the features (contiguous, features' dtype).

    ``centroids``: the given centroids, the log-centroid table (``log_centroids``), or None (from ``stats``, which
    is None otherwise).

    ``grad_loss``: the (N,) gradient w.r.t. each KL_i, or the 0-d gradient of the reduced loss, which the kernel
    broadcasts (stride 0) and multiplies by ``grad_scale`` (1/N for a mean, 1 for a sum).
    """
    n_rows, dim = features.shape
    grad_features = torch.empty((n_rows, dim), dtype=features.dtype, device=features.device)
    cmi_backward_kernel[(n_rows,)](
        features_ptr=features,
        stride_feat_row=features.stride(0),
        stride_feat_col=features.stride(1),
        labels_ptr=labels,
        stride_label=labels.stride(0),
        centroids_ptr=centroids,
        stride_cent_row=0 if centroids is None else centroids.stride(0),
        stride_cent_col=0 if centroids is None else centroids.stride(1),
        stats_ptr=stats,
        stride_stats_row=0 if stats is None else stats.stride(0),
        lse_ptr=lse,
        row_kl_ptr=row_kl,
        grad_loss_ptr=grad_loss,
        stride_grad=grad_loss.stride(0) if grad_loss.dim() else 0,
        grad_scale=grad_scale,
        grad_features_ptr=grad_features,
        dim=dim,
        num_classes=num_classes,
        inv_temperature=1.0 / temperature,
        eps=eps,
        HAS_CENTROIDS=centroids is not None,
        LOG_CENTROIDS=log_centroids,
        **launch_meta(dim),
    )
    return grad_features


cmi_backward_op = torch.library.custom_op("cmi_fused::cmi_backward", cmi_backward, mutates_args=())


@cmi_backward_op.register_fake
def _(grad_loss, features, labels, centroids, stats, lse, row_kl, num_classes, temperature, eps, grad_scale,
      log_centroids):  # fmt: skip
    return torch.empty(features.shape, dtype=features.dtype, device=features.device)


class CMIFunction(torch.autograd.Function):
    """The reduced KL loss (mean, sum, or per row for "none") with the class statistics as a non-differentiable
    side output."""

    @staticmethod
    def forward(ctx, features, labels, centroids, num_classes, temperature, eps, accumulate, reduction):
        features, centroids = int32_addressable(features), int32_addressable(centroids)
        forward = cmi_forward_op if torch.compiler.is_compiling() else cmi_forward
        row_kl, lse, stats, log_table = forward(features, labels, centroids, num_classes, temperature, eps, accumulate)
        ctx.log_centroids = log_table.shape[0] > 0
        # The backward needs log G: the table when there is one, else the centroids (or stats) it came from. stats
        # is saved only when it is that source: class_sums / class_counts are views of it, and autograd refuses a
        # backward after an in-place change to a saved tensor, so the caller may change them (or all-reduce them)
        # in place except where the gradient depends on them.
        from_stats = centroids is None and not ctx.log_centroids
        log_g_source = log_table if ctx.log_centroids else centroids
        ctx.save_for_backward(features, labels, log_g_source, stats if from_stats else None, lse, row_kl)
        ctx.num_classes = num_classes
        ctx.temperature = temperature
        ctx.eps = eps
        ctx.grad_scale = 1.0 / features.shape[0] if reduction == "mean" else 1.0
        ctx.mark_non_differentiable(stats)
        if reduction == "mean":
            return row_kl.mean(), stats
        if reduction == "sum":
            return row_kl.sum(), stats
        # A copy: the caller may weight the per-row losses in place (loss.mul_(w)), and the backward needs row_kl.
        return row_kl.clone(), stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        # Grad mode is on in a backward only under create_graph=True. The kernel's gradient has no graph of its own,
        # so a second derivative (e.g. a gradient penalty) would silently miss this term: refuse it instead.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "cmi_loss(backend='triton') has no second derivative (create_graph=True); backend='torch' with "
                "given centroids has one"
            )
        features, labels, centroids, stats, lse, row_kl = ctx.saved_tensors
        backward = cmi_backward_op if torch.compiler.is_compiling() else cmi_backward
        grad_features = backward(
            grad_loss, features, labels, centroids, stats, lse, row_kl,
            ctx.num_classes, ctx.temperature, ctx.eps, ctx.grad_scale, ctx.log_centroids,
        )  # fmt: skip
        return grad_features, None, None, None, None, None, None, None
