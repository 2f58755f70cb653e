"""Tests of :func:`cmi_fused.cmi_loss` on every backend, against a float64 reference written in this file.

The reference (:func:`reference_cmi`) takes the very input values the op sees (low-precision inputs upcast
to float64) and computes, in float64,

    f_i  = softmax(h_i / T)
    G_c  = the given centroids (held constant), or the class mean of f (detached, unless asked otherwise)
    KL_i = sum_j f_ij (log f_ij - log max(G_{y_i j}, eps))
    loss = mean_i KL_i | sum_i KL_i | KL

Results are compared with ``rel = ||out - ref|| / ||ref||`` (2-norm over all elements):

| input dtype          | loss | class_sums | class_counts | gradient (returned in the input dtype) |
|----------------------|------|------------|--------------|----------------------------------------|
| float32              | 1e-5 | 1e-5       | exact        | 1e-5                                   |
| bfloat16             | 1e-5 | 1e-5       | exact        | 1e-2  (bf16 rounding of the result)    |
| float16              | 1e-5 | 1e-5       | exact        | 2e-3  (fp16 rounding, under loss scaling) |
| float64 (torch only) | 1e-10 (envelope property: gradient vs the un-detached expression)         |

Loss and gradient are cancellations: KL_i sums terms f (log f - log g), and the gradient
dKL_i/dh_ij = f_ij (log f_ij - log g_ij - KL_i) / T subtracts numbers of order |log f|. Both can nearly cancel (soft
rows, f close to g; two rows of one class with almost disjoint supports, where every log f - log g is close to
log 2 = KL). fp32 rounding of the terms (~1e-7 of them, whatever the implementation) then exceeds 1e-5 of the
result, so both are measured against the larger of the reference and TERM_FLOOR (a tenth) of their terms'
magnitude (:func:`assert_close_to_terms`).
Loss and class sums keep the fp32 bound for half inputs because the op accumulates in fp32. fp16 gradients are
compared under a power-of-two loss scale (:func:`fp16_loss_scale`, as GradScaler does): unscaled, mean-reduced
CMI gradients often fall below fp16's normal range (6.1e-5), where no 2e-3 relative bound can hold.

Each test draws fresh inputs from a generator seeded by its own test id and the session's seed: different per case
and per run; the seed is printed at the end of a run, and ``CMI_TEST_SEED=<seed>`` repeats it.
Without CUDA the triton backend runs under ``TRITON_INTERPRET=1`` (tests/conftest.py), so its CPU cases stay
small (N x d <= 40000: d up to 5000 for a few rows); larger shapes are added when CUDA is available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import warnings
import zlib
from typing import Optional
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cmi_fused import cmi_loss, validate_labels

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    loss: float
    class_sums: float
    grad: float


TOLERANCES = {
    torch.float32: Tolerance(loss=1e-5, class_sums=1e-5, grad=1e-5),
    torch.bfloat16: Tolerance(loss=1e-5, class_sums=1e-5, grad=1e-2),
    torch.float16: Tolerance(loss=1e-5, class_sums=1e-5, grad=2e-3),
}
FLOAT64_ENVELOPE_TOL = 1e-10
# Loss and gradient errors are measured against max(||ref||, TERM_FLOOR x the magnitude of their terms):
# assert_close_to_terms.
TERM_FLOOR = 0.1


# --------------------------------------------------------------------------------------------------------------
# Reference and helpers
# --------------------------------------------------------------------------------------------------------------


def reference_cmi(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    centroids: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    eps: float = 1e-12,
    detach_centroids: bool = True,
    term_scales: bool = False,
):
    """Float64 CMI of ``features`` (any float dtype, upcast). Returns ``(loss, class_sums, class_counts, h64)``
    where ``h64`` is the float64 leaf the loss was computed from (its ``.grad`` is the reference gradient).
    ``term_scales=True`` appends the rounding scales of the loss and of the gradient: the same reduction of
    ``sum_j f_ij (|log f_ij| + |log g_ij|)``, the magnitude of the terms an fp32 evaluation adds up for each KL_i,
    and the (N, d) magnitudes ``f_ij (|log f_ij| + |log g_ij| + |KL_i|) / T`` of the terms of dKL_i/dh_ij, which
    the caller weights by its d loss / d KL_i.

    Rows whose label is outside ``[0, C)`` get a NaN KL and add nothing to the class sums and counts.
    ``detach_centroids=False`` keeps the per-batch centroids in the graph (the un-detached expression).
    """
    h64 = features.detach().to(torch.float64).requires_grad_(True)
    log_f = torch.log_softmax(h64 / temperature, dim=1)
    f = log_f.exp()
    valid = (labels >= 0) & (labels < num_classes)
    # (N, C) membership matrix; rows of invalid labels are all zero.
    membership = (labels[:, None] == torch.arange(num_classes, device=labels.device)[None, :]).to(torch.float64)
    class_sums = membership.T @ f
    class_counts = membership.sum(dim=0)
    if centroids is None:
        class_means = class_sums / class_counts.clamp_min(1.0)[:, None]
        g = class_means.detach() if detach_centroids else class_means
    else:
        g = centroids.detach().to(torch.float64)
    log_g_rows = torch.log(g.clamp_min(eps))[labels.clamp(0, num_classes - 1).long()]
    row_kl = (f * (log_f - log_g_rows)).sum(dim=1)
    row_kl = torch.where(valid, row_kl, torch.full_like(row_kl, float("nan")))
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda rows: rows}[reduction]
    outputs = (reduce(row_kl), class_sums.detach(), class_counts, h64)
    if term_scales:
        loss_terms = reduce((f * (log_f.abs() + log_g_rows.abs())).sum(dim=1))
        gradient_terms = f * (log_f.abs() + log_g_rows.abs() + row_kl.abs()[:, None]) / temperature
        outputs += (loss_terms.detach(), gradient_terms.detach())
    return outputs


def generator_for(request) -> torch.Generator:
    """A CPU generator seeded by the test id and the session's seed (``CMI_TEST_SEED``, tests/conftest.py): other
    inputs in every case and every run, repeatable with that seed."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ["CMI_TEST_SEED"]))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out64 = out.detach().to(torch.float64)
    ref64 = ref.detach().to(torch.float64)
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    ref_norm = torch.linalg.vector_norm(ref64).item()
    assert ref_norm > 0, "degenerate case: the reference is exactly zero"
    return torch.linalg.vector_norm(out64 - ref64).item() / ref_norm


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert torch.isfinite(out).all(), f"{what}: non-finite values for finite input"
    rel = relative_error(out, ref)
    assert rel < tol, f"{what}: rel error {rel:.3e} >= {tol:.0e}"


def assert_sum_matches_reference(result, features, labels, num_classes, centroids=None) -> None:
    """A ``reduction="sum"`` result's loss, class sums (rel 1e-5) and class counts (exact) against float64."""
    ref_loss, ref_sums, ref_counts, _ = reference_cmi(features, labels, num_classes, centroids, reduction="sum")
    assert_rel_close(result.loss, ref_loss, 1e-5, "loss")
    assert_rel_close(result.class_sums, ref_sums, 1e-5, "class_sums")
    assert torch.equal(result.class_counts.double(), ref_counts)


def assert_close_to_terms(out: torch.Tensor, ref: torch.Tensor, term_scale: torch.Tensor, tol: float, what: str):
    """``||out - ref|| < tol * max(||ref||, TERM_FLOOR * ||term_scale||)``: ``assert_rel_close`` where the result
    is not a cancellation of larger terms (module docstring). Examples where it is: KL ~ 1e-3 from terms ~1.6 (T = 4,
    d = 5); a gradient 1e-3 of its terms (two rows of one class, f peaked on different columns: rel 5e-5 to 8e-5
    from fp32 rounding on both backends, while the rounding of h / T alone moves it by 2.4e-7)."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values for finite input"
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    error = torch.linalg.vector_norm(out64 - ref64).item()
    scale = max(torch.linalg.vector_norm(ref64).item(), TERM_FLOOR * torch.linalg.vector_norm(term_scale).item())
    assert error < tol * scale, f"{what}: error {error:.3e} >= {tol:.0e} x {scale:.3e}"


def random_labels(n: int, num_classes: int, gen: torch.Generator, per_batch: bool) -> torch.Tensor:
    """Uniform labels. With per-batch centroids every class that occurs gets at least two rows (labels are drawn
    in pairs, then shuffled): a class of one row has KL and gradient exactly 0, which fp32 rounding turns into
    noise of ~1e-7 * |log f|, and a batch of mostly such rows would measure rounding noise, not the op."""
    if not per_batch or n == 1:
        return torch.randint(0, num_classes, (n,), generator=gen)
    pairs = torch.randint(0, num_classes, ((n + 1) // 2,), generator=gen).repeat_interleave(2)
    if n % 2:
        pairs[-1] = pairs[0]
    return pairs[:n][torch.randperm(n, generator=gen)]


def strided_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as the first column of an (N, 2) tensor (label stride 2) whose second column holds -1: a kernel
    reading them with the wrong stride takes those bad labels."""
    return torch.stack([labels, torch.full_like(labels, -1)], dim=1)[:, 0]


def lse_parts(z: torch.Tensor) -> torch.Tensor:
    """(N, 2) fp32: each row's max and log sum exp(z - max), the kernels' two-part log-sum-exp."""
    row_max = z.amax(dim=1)
    return torch.stack([row_max, torch.logsumexp(z - row_max[:, None], dim=1)], dim=1).float()


def random_centroids(num_classes: int, dim: int, gen: torch.Generator, zero_entries: bool = False) -> torch.Tensor:
    """Random class distributions (rows sum to 1); ``zero_entries`` zeroes a quarter of them (the eps floor)."""
    centroids = torch.softmax(torch.randn(num_classes, dim, generator=gen), dim=1)
    if zero_entries:
        centroids = centroids * (torch.rand(num_classes, dim, generator=gen) > 0.25)
    return centroids


def make_features(n: int, dim: int, dtype: torch.dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A leaf (n, dim) feature tensor on DEVICE: contiguous, ``x[:, 0]`` of an (n, 3, dim) tensor (row stride 3*dim),
    a column slice ``x[:, 3:3+dim]`` of an (n, dim+7) tensor (row stride dim+7, odd storage offset), or the
    transpose of a (dim, n) tensor (row stride 1, column stride n)."""
    if layout == "contiguous":
        features = (1.5 * torch.randn(n, dim, generator=gen)).to(DEVICE, dtype)
    elif layout == "row_slice":
        features = (1.5 * torch.randn(n, 3, dim, generator=gen)).to(DEVICE, dtype)[:, 0]
    elif layout == "column_slice":
        features = (1.5 * torch.randn(n, dim + 7, generator=gen)).to(DEVICE, dtype)[:, 3 : 3 + dim]
    elif layout == "transposed":
        features = (1.5 * torch.randn(dim, n, generator=gen)).to(DEVICE, dtype).t()
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert features.is_contiguous() == (layout == "contiguous" or n == 1)
    return features.detach().requires_grad_(True)


# --------------------------------------------------------------------------------------------------------------
# Reference comparison over a table of cases
# --------------------------------------------------------------------------------------------------------------


def fp16_loss_scale(ref_grad: torch.Tensor) -> float:
    """Power of two bringing the largest reference gradient into (0.5, 1], as a GradScaler does in fp16 training:
    fp16 has 2e-3 relative precision only above 6.1e-5 (below, subnormals), and mean-reduced CMI gradients are
    often smaller than that."""
    return 2.0 ** -math.ceil(math.log2(ref_grad.abs().max().item()))


def compare_with_reference(features, labels, num_classes, centroids, temperature, reduction, grad_output, backend):
    """Run the op and its backward, and check loss, class sums, counts and gradient against :func:`reference_cmi`
    with the tolerances of the table above (fp16 gradients under :func:`fp16_loss_scale`). Returns the result."""
    ref_loss, ref_sums, ref_counts, h64, loss_terms, gradient_terms = reference_cmi(
        features, labels, num_classes, centroids, temperature=temperature, reduction=reduction, term_scales=True
    )
    ref_loss.backward(grad_output.to(torch.float64))
    ref_grad = h64.grad
    if features.dtype == torch.float16:
        scale = fp16_loss_scale(ref_grad)
        grad_output, ref_grad = grad_output * scale, ref_grad * scale

    result = cmi_loss(
        features, labels, num_classes, centroids, temperature=temperature, reduction=reduction, backend=backend
    )
    result.loss.backward(grad_output)

    tol = TOLERANCES[features.dtype]
    assert result.loss.dtype == torch.float32
    # For "none" this compares every row: a row the kernel never wrote cannot match.
    assert_close_to_terms(result.loss, ref_loss, loss_terms, tol.loss, "loss")
    assert_rel_close(result.class_sums, ref_sums, tol.class_sums, "class_sums")
    assert torch.equal(result.class_counts.double(), ref_counts), "class_counts"
    assert features.grad.dtype == features.dtype
    # Each row's gradient terms weighted by |d loss / d KL_i|, as its gradient is.
    row_weights = grad_output.detach().abs().to(torch.float64)
    if reduction == "none":
        row_weights = row_weights[:, None]
    elif reduction == "mean":
        row_weights = row_weights / len(labels)
    assert_close_to_terms(features.grad, ref_grad, row_weights * gradient_terms, tol.grad, "gradient")
    return result


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    d: int
    c: int
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    reduction: str = "mean"
    centroids: str = "batch"  # "batch" (None), "fixed", "fixed_zeros" (fixed with zero entries)
    layout: str = "contiguous"
    centroid_layout: str = "contiguous"  # or "transposed": (d, C) storage, column stride C
    grad: str = "ones"  # "ones", "scalar" (random scalar), "vector" (random per row, reduction "none")
    absent_class: bool = False
    strided_labels: bool = False  # labels a column of an (N, 2) tensor: strided_labels()

    @property
    def interpreter_sized(self) -> bool:
        """Small enough for the triton interpreter on CPU."""
        return self.n * self.d <= 40 * 1000


CASES = [
    Case("n1_fixed_d5", n=1, d=5, c=3, centroids="fixed"),
    Case("n1_fixed_none_d383", n=1, d=383, c=2, centroids="fixed", reduction="none", grad="vector"),
    Case("c1_batch_d5_sum", n=7, d=5, c=1, reduction="sum", grad="scalar"),
    Case("c1_fixed_d383_t2", n=9, d=383, c=1, centroids="fixed", temperature=2.0),
    Case("c_gt_n_batch_none", n=4, d=33, c=10, reduction="none", grad="vector"),
    Case("c_gt_n_fixed_sum", n=5, d=64, c=12, centroids="fixed", reduction="sum", grad="scalar"),
    Case("absent_class_batch", n=20, d=100, c=6, absent_class=True, grad="scalar"),
    Case("t05_d383_mean", n=24, d=383, c=4, temperature=0.5, grad="scalar"),
    Case("t2_d383_none", n=16, d=383, c=3, temperature=2.0, reduction="none", grad="vector"),
    Case("fixed_zero_entries_none", n=12, d=50, c=3, centroids="fixed_zeros", reduction="none", grad="vector"),
    Case(
        "row_slice_batch_none",
        n=10,
        d=77,
        c=3,
        layout="row_slice",
        reduction="none",
        grad="vector",
        strided_labels=True,
    ),
    Case(
        "column_slice_fixed_mean",
        n=10,
        d=77,
        c=3,
        layout="column_slice",
        centroids="fixed",
        grad="scalar",
        strided_labels=True,
    ),
    # Column strides other than 1: transposed features (e.g. a (d, N) activation read as N x d) and centroids.
    Case(
        "transposed_fixed_none",
        n=10,
        d=77,
        c=3,
        layout="transposed",
        centroids="fixed",
        reduction="none",
        grad="vector",
    ),
    Case("transposed_centroids_mean", n=12, d=50, c=4, centroids="fixed", centroid_layout="transposed", grad="scalar"),
    Case("bf16_batch_mean", n=32, d=128, c=4, dtype=torch.bfloat16, grad="scalar"),
    Case(
        "bf16_fixed_none_row_slice",
        n=16,
        d=383,
        c=3,
        dtype=torch.bfloat16,
        centroids="fixed",
        reduction="none",
        grad="vector",
        layout="row_slice",
    ),
    Case("fp16_batch_sum_t05", n=32, d=200, c=4, dtype=torch.float16, reduction="sum", grad="scalar", temperature=0.5),
    Case("fp16_batch_mean", n=24, d=100, c=3, dtype=torch.float16),
    Case(
        "fp16_fixed_none_column_slice",
        n=8,
        d=5,
        c=2,
        dtype=torch.float16,
        centroids="fixed",
        reduction="none",
        grad="vector",
        layout="column_slice",
    ),
    Case("d1000_batch_mean", n=40, d=1000, c=5, grad="scalar"),
    # 1024 < d <= 4096: single-chunk rows of BLOCK_D 4096 (8 warps on the GPU).
    Case(
        "d3000_one_row_per_iteration_fixed_none", n=9, d=3000, c=3, centroids="fixed", reduction="none", grad="vector"
    ),
    Case("d2100_one_row_per_iteration_batch", n=10, d=2100, c=2, dtype=torch.bfloat16, grad="scalar"),
    # d > 4096: rows span two column chunks (online log-sum-exp, second sweep), the path of d = 16384 and 30522.
    Case("d4500_two_chunks_fixed_none", n=5, d=4500, c=3, centroids="fixed", reduction="none", grad="vector"),
    Case("d5000_two_chunks_bf16_batch", n=6, d=5000, c=2, dtype=torch.bfloat16, grad="scalar"),
    Case("d4500_two_chunks_transposed_batch", n=5, d=4500, c=2, layout="transposed", grad="scalar"),
    # Vocabulary-sized C (the contract's 50000): most classes absent, atomics by default.
    Case("c50000_fixed_none", n=24, d=12, c=50000, centroids="fixed", reduction="none", grad="vector"),
    Case("c50000_batch_sum", n=30, d=20, c=50000, reduction="sum", grad="scalar"),
    Case(
        "d1000_bf16_fixed_none",
        n=33,
        d=1000,
        c=4,
        dtype=torch.bfloat16,
        centroids="fixed",
        reduction="none",
        grad="vector",
    ),
]
if ON_CUDA:
    CASES += [
        Case("cuda_n4096_d768_c2", n=4096, d=768, c=2, grad="scalar"),
        Case("cuda_bf16_n2048_d4096_c8", n=2048, d=4096, c=8, dtype=torch.bfloat16, reduction="sum", grad="scalar"),
        Case("cuda_fp16_n1024_d3000_t2", n=1024, d=3000, c=16, dtype=torch.float16, temperature=2.0, reduction="sum"),
        Case("cuda_vocab_c5000_none", n=1024, d=512, c=5000, reduction="none", grad="vector"),
        Case("cuda_fixed_n300_d30522", n=300, d=30522, c=3, centroids="fixed", reduction="none", grad="vector"),
        Case("cuda_bf16_d16384_batch", n=512, d=16384, c=4, dtype=torch.bfloat16, grad="scalar"),
        Case("cuda_bf16_c50000_fixed", n=4096, d=768, c=50000, dtype=torch.bfloat16, centroids="fixed", grad="scalar"),
    ]

# "triton_table": the triton backend with the log-centroid table forced on (the launchers use it only from
# N >= 1024 rows, past what the interpreter can run), so that both ways of getting log G are checked everywhere
# (on the CPU not at C = 50000: one interpreted program per class).
CASE_PARAMS = [
    pytest.param(case, backend, id=f"{case.name}-{backend}")
    for case in CASES
    for backend in (*BACKENDS, "triton_table")
    if backend == "torch" or ON_CUDA or (case.interpreter_sized and (backend == "triton" or case.c <= 64))
]


# error::RuntimeWarning: the interpreter runs the kernels in numpy, which would warn about the infs and NaNs made in
# lanes that no result reads (kernels.cmi.interpreter_errstate turns those warnings off, as a GPU has none).
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("case, backend", CASE_PARAMS)
def test_matches_float64_reference(case: Case, backend: str, request):
    if backend == "triton_table":
        request.getfixturevalue("log_table_forced")
        backend = "triton"
    gen = generator_for(request)
    per_batch = case.centroids == "batch"
    features = make_features(case.n, case.d, case.dtype, case.layout, gen)
    if case.absent_class:
        # Class 2 never occurs; labels drawn from the others.
        present = torch.tensor([cls for cls in range(case.c) if cls != 2])
        labels = present[random_labels(case.n, len(present), gen, per_batch)]
    else:
        labels = random_labels(case.n, case.c, gen, per_batch)
    labels = labels.to(DEVICE)
    if case.strided_labels:
        labels = strided_labels(labels)
    centroids = None
    if not per_batch:
        centroids = random_centroids(case.c, case.d, gen, zero_entries=case.centroids == "fixed_zeros")
        centroids = centroids.to(DEVICE, case.dtype)
        if case.centroid_layout == "transposed":
            centroids = centroids.t().contiguous().t()
    if case.grad == "ones":
        grad_output = torch.ones(case.n if case.reduction == "none" else ())
    elif case.grad == "scalar":
        grad_output = torch.randn((), generator=gen)
    else:
        grad_output = torch.randn(case.n, generator=gen)
    grad_output = grad_output.to(DEVICE)

    result = compare_with_reference(
        features, labels, case.c, centroids, case.temperature, case.reduction, grad_output, backend
    )
    if case.absent_class:
        assert result.class_counts[2].item() == 0
        assert torch.count_nonzero(result.class_sums[2]).item() == 0


# --------------------------------------------------------------------------------------------------------------
# Randomised shapes (hypothesis)
# --------------------------------------------------------------------------------------------------------------


@st.composite
def cmi_problems(draw, max_n: int, max_d: int, max_c: int):
    """A random problem: shape, dtype, temperature, reduction, centroid mode, layout and a seed for the values.

    d >= 5 and T >= 0.5 keep the softmax from saturating: with d = 2, T = 0.25 a row holds probabilities ~1 and
    ~1e-4, and the fp32 softmax-backward cancellation (~eps32 * |h / T|, PyTorch's own backward included) alone
    exceeds 1e-5 of such a tiny gradient's norm, and of a tenth of its terms (d = 2, T = 0.25: rel 1.5e-5 of that)."""
    return dict(
        n=draw(st.integers(2, max_n)),
        d=draw(st.integers(5, max_d)),
        c=draw(st.integers(1, max_c)),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        temperature=draw(st.floats(0.5, 4.0)),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        per_batch=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "row_slice", "column_slice", "transposed"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Two rows of one class whose softmaxes peak on different columns (0.98 and 0.59 + 0.35): both gradients are 1e-3 of
# their terms, rel 8.1e-5 (torch) and 5.2e-5 (triton) from fp32 rounding. Found by test_random_shapes_torch.
DISJOINT_PAIR = dict(
    n=2, d=15, c=1, dtype=torch.float32, temperature=0.5002178966178799, reduction="sum", per_batch=True,
    layout="contiguous", seed=2090234547,
)  # fmt: skip


def check_problem(problem: dict, backend: str) -> None:
    gen = torch.Generator().manual_seed(problem["seed"])
    n, d, c, dtype = problem["n"], problem["d"], problem["c"], problem["dtype"]
    features = make_features(n, d, dtype, problem["layout"], gen)
    labels = random_labels(n, c, gen, problem["per_batch"]).to(DEVICE)
    centroids = None if problem["per_batch"] else random_centroids(c, d, gen).to(DEVICE)
    reduction = problem["reduction"]
    grad_output = torch.randn(n if reduction == "none" else (), generator=gen).to(DEVICE)
    compare_with_reference(features, labels, c, centroids, problem["temperature"], reduction, grad_output, backend)


@settings(max_examples=40, deadline=None)
@given(problem=cmi_problems(max_n=48, max_d=300, max_c=12))
@example(problem=DISJOINT_PAIR)
def test_random_shapes_torch(problem):
    check_problem(problem, "torch")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # as test_matches_float64_reference
@settings(max_examples=30 if ON_CUDA else 4, deadline=None)
@given(problem=cmi_problems(max_n=24, max_d=160, max_c=6))
@example(problem=DISJOINT_PAIR)
def test_random_shapes_triton(problem):
    check_problem(problem, "triton")


# --------------------------------------------------------------------------------------------------------------
# Gradients: gradcheck and the per-batch envelope property
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "centroid_mode, reduction",
    [("fixed", "mean"), ("fixed", "sum"), ("fixed", "none"), ("batch", "mean"), ("batch", "sum")],
)
def test_gradcheck_torch_float64(centroid_mode: str, reduction: str, request):
    """Finite differences of the whole op. With per-batch centroids the finite differences move the centroids
    too, so this also checks that the detached-centroid gradient is exact for mean/sum (per row it is not, so
    "none" is checked against the detached reference only, in test_matches_float64_reference)."""
    gen = generator_for(request)
    n, d, c = 7, 5, 3
    features = torch.randn(n, d, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2, 1, 0, 2], device=DEVICE)
    centroids = None
    if centroid_mode == "fixed":
        centroids = random_centroids(c, d, gen).to(DEVICE, torch.float64)

    def loss_of(h):
        return cmi_loss(h, labels, c, centroids, temperature=0.7, reduction=reduction, backend="torch").loss

    assert torch.autograd.gradcheck(loss_of, (features,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_is_exact_or_refused(backend: str, request):
    """A gradient penalty differentiates the gradient again. With given centroids the torch backend's double
    backward matches finite differences (gradgradcheck); the triton backend's gradient has no graph of its own, so
    create_graph=True raises instead of returning a gradient that silently misses the op's second-order term."""
    gen = generator_for(request)
    n, d, c = 6, 5, 3
    labels = torch.tensor([0, 1, 0, 1, 2, 2], device=DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE, torch.float64)
    features = torch.randn(n, d, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    if backend == "torch":

        def loss_of(h):
            return cmi_loss(h, labels, c, centroids, temperature=0.7, backend="torch").loss

        assert torch.autograd.gradgradcheck(loss_of, (features,), eps=1e-6, atol=1e-8, rtol=1e-6)
        return
    loss = cmi_loss(features.float(), labels, c, centroids.float(), backend="triton").loss
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, features, create_graph=True)
    (gradient,) = torch.autograd.grad(loss, features)  # the first derivative alone still works
    assert torch.isfinite(gradient).all()


def test_per_batch_second_derivative_holds_the_centroids_constant(request):
    """The documented limit (README "One derivative"): with per-batch centroids the torch backend's first
    derivative is exact, its second holds the centroids constant. It equals the Hessian with G fixed at its
    value and differs from the un-detached expression's, which has a term through dG/dh."""
    gen = generator_for(request)
    labels = torch.tensor([0, 1, 0, 1, 2, 2], device=DEVICE)
    features = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(DEVICE)

    def op_loss(h):
        return cmi_loss(h, labels, 3, temperature=0.7, backend="torch").loss

    def reference_loss(h, detach_centroids):  # float64, differentiable in h (reference_cmi makes its own leaf)
        log_f = torch.log_softmax(h / 0.7, dim=1)
        membership = torch.nn.functional.one_hot(labels, 3).double()
        centroids = (membership.T @ log_f.exp()) / membership.sum(0)[:, None]
        if detach_centroids:
            centroids = centroids.detach()
        return (log_f.exp() * (log_f - centroids.log()[labels])).sum(dim=1).mean()

    # A random direction: softmax ignores a shift of a row, so along ones (as here before) every product is 0 up to
    # rounding, and the test compared rounding noise.
    direction = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    hvp = torch.autograd.functional.hvp(op_loss, features, direction)[1]
    held = torch.autograd.functional.hvp(lambda h: reference_loss(h, True), features, direction)[1]
    exact = torch.autograd.functional.hvp(lambda h: reference_loss(h, False), features, direction)[1]
    assert_rel_close(hvp, held, 1e-12, "second derivative, centroids held constant")
    assert (hvp - exact).norm() > 0.1 * exact.norm()


def test_torch_func_differentiates_the_torch_backend(request):
    """torch.func.grad (per-sample gradients, meta-learning) of the torch backend, per-batch centroids: the exact
    first derivative, as autograd gives it."""
    gen = generator_for(request)
    labels = torch.tensor([0, 1, 0, 1, 2, 2], device=DEVICE)
    features = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    by_func = torch.func.grad(lambda h: cmi_loss(h, labels, 3, backend="torch").loss)(features)
    (by_autograd,) = torch.autograd.grad(cmi_loss(features, labels, 3, backend="torch").loss, features)
    torch.testing.assert_close(by_func, by_autograd, rtol=1e-12, atol=0)


def test_torch_func_is_refused_by_the_triton_backend():
    """README "torch.func": the triton backend's autograd.Function keeps the ctx form, so torch.func refuses it with
    an error instead of differentiating it wrongly."""
    labels = torch.tensor([0, 1, 0, 1, 2, 2], device=DEVICE)
    features = torch.randn(6, 5, device=DEVICE)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda h: cmi_loss(h, labels, 3, backend="triton").loss)(features)


# What callers do with reduction="none" rows. sum/mean hand the backward an expanded gradient (row stride 0), which
# the kernel must read with that stride; weighting in place (per-example weights) needs the returned tensor to be
# the caller's own, not the one the backward saved.
ROW_REDUCERS = {
    "sum": lambda rows, weights: rows.sum(),
    "mean": lambda rows, weights: rows.mean(),
    "weighted_in_place": lambda rows, weights: rows.mul_(weights).sum(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
@pytest.mark.parametrize("reducer", list(ROW_REDUCERS))
def test_per_row_losses_reduced_by_the_caller(backend: str, centroid_mode: str, reducer: str, request):
    """The gradient of a reduction of the "none" rows equals the same reduction's on the float64 reference."""
    gen = generator_for(request)
    n, d, c = 9, 13, 4
    features = make_features(n, d, torch.float32, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None
    weights = torch.rand(n, generator=gen).to(DEVICE)
    rows = cmi_loss(features, labels, c, centroids, temperature=0.8, reduction="none", backend=backend).loss
    ROW_REDUCERS[reducer](rows, weights).backward()
    ref_rows, _, _, h64 = reference_cmi(features, labels, c, centroids, temperature=0.8, reduction="none")
    ROW_REDUCERS[reducer](ref_rows, weights.double()).backward()
    assert_rel_close(features.grad, h64.grad, 1e-5, f"gradient of the rows reduced by {reducer}")


@pytest.mark.parametrize("backend", [*BACKENDS, "triton_table"])
@pytest.mark.parametrize("dim", [16, 4500])
def test_per_batch_centroid_column_of_zeros_takes_the_eps_floor(backend: str, dim: int, request):
    """A feature column far below the rest underflows to f = 0 in every row of a class, so the per-batch centroid
    is exactly 0 there: log max(G, eps), not log 0 (which would make the KL 0 * inf = NaN). d = 4500: chunked rows."""
    if backend == "triton_table":
        request.getfixturevalue("log_table_forced")
        backend = "triton"
    gen = generator_for(request)
    features = torch.randn(8, dim, generator=gen)
    features[:, 3] = -200.0
    features = features.to(DEVICE).requires_grad_(True)
    labels = torch.tensor([0, 1] * 4, device=DEVICE)
    result = cmi_loss(features, labels, 2, reduction="none", backend=backend)
    grad_output = torch.randn(8, generator=gen).to(DEVICE)
    result.loss.backward(grad_output)
    ref_rows, _, _, h64 = reference_cmi(features, labels, 2, None, reduction="none")
    ref_rows.backward(grad_output.double())
    assert_rel_close(result.loss, ref_rows, 1e-5, "rows")
    assert_rel_close(features.grad, h64.grad, 1e-5, "gradient")


@pytest.mark.parametrize("single_chunk", [True, False], ids=["single-chunk", "chunked"])
def test_each_forward_program_accumulates_into_its_own_slot(single_chunk):
    """White-box: with slots (no atomics), program k adds exactly its rows k, k + P, ... into slot k. The CPU
    interpreter runs programs one after the other, so only this check can tell a slot race (every program adding
    into one slot without atomics) from correct code; the summed statistics would be right either way. Chunked:
    BLOCK_D 16 gives the 40 columns three chunks, the path of rows wider than 4096 columns."""
    pytest.importorskip("triton")
    from kernels.cmi import stats_row_len
    from kernels.cmi_forward import cmi_forward_kernel, compile_options, launch_meta

    n, d, c, programs = 20, 40, 3, 4
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=gen).to(DEVICE)
    labels = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    row_len = stats_row_len(d)
    accum = torch.zeros(programs, c, row_len, device=DEVICE)
    lse = torch.full((n, 2), float("nan"), device=DEVICE)
    chunked_meta = {"BLOCK_D": 16, **compile_options(16)}
    cmi_forward_kernel[(programs,)](
        features_ptr=features, stride_feat_row=features.stride(0), stride_feat_col=features.stride(1),
        labels_ptr=labels, stride_label=labels.stride(0),
        centroids_ptr=None, stride_cent_row=0, stride_cent_col=0, stats_ptr=None, stride_stats_row=0,
        accum_ptr=accum, stride_accum_row=row_len, lse_in_ptr=None, lse_out_ptr=lse, row_kl_ptr=None,
        n_rows=n, dim=d, num_classes=c, inv_temperature=1.0, eps=1e-12,
        USE_ATOMICS=False, HAS_LSE=False, HAS_CENTROIDS=False, LOG_CENTROIDS=False, COMPUTE_KL=False,
        ACCUMULATE=True, SINGLE_CHUNK=single_chunk, **(launch_meta(d) if single_chunk else chunked_meta),
    )  # fmt: skip
    f = torch.softmax(features.double(), dim=1)
    for k in range(programs):
        rows = torch.arange(k, n, programs, device=DEVICE)
        sums = torch.zeros(c, d, dtype=torch.float64, device=DEVICE).index_add_(0, labels[rows], f[rows])
        assert_rel_close(accum[k, :, :d], sums, 1e-5, f"slot {k} class sums")
        assert torch.equal(accum[k, :, d].double(), torch.bincount(labels[rows], minlength=c).double()), k
    row_max = features.double().amax(dim=1)
    torch.testing.assert_close(lse[:, 0].double(), row_max)  # the log-sum-exp in two parts, never added up
    torch.testing.assert_close(lse[:, 1].double(), torch.logsumexp(features.double() - row_max[:, None], dim=1))


def test_backward_kernel_writes_its_rows_and_nothing_past_them():
    """White-box: dh for rows 0..N-1 and not one element more, into a NaN-poisoned buffer of N+1 rows (d = 37:
    BLOCK_D 64 leaves masked lanes in every row). The interpreter runs programs one after the other, so a store
    past a row's end would be overwritten by the next row's program and show only after the last row: here."""
    pytest.importorskip("triton")
    from kernels.cmi_backward import cmi_backward_kernel
    from kernels.cmi_forward import launch_meta

    n, d, c, temperature = 9, 37, 3, 0.7
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=gen).to(DEVICE)
    labels = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE)
    ref_rows, _, _, ref_h = reference_cmi(features, labels, c, centroids, temperature=temperature, reduction="none")
    ref_rows.sum().backward()
    grad_out = torch.full((n + 1, d), float("nan"), device=DEVICE)
    cmi_backward_kernel[(n,)](
        features_ptr=features, stride_feat_row=features.stride(0), stride_feat_col=features.stride(1),
        labels_ptr=labels, stride_label=labels.stride(0),
        centroids_ptr=centroids, stride_cent_row=centroids.stride(0), stride_cent_col=centroids.stride(1),
        stats_ptr=None, stride_stats_row=0,
        lse_ptr=lse_parts(features / temperature), row_kl_ptr=ref_rows.detach().float(),
        grad_loss_ptr=torch.ones(n, device=DEVICE), stride_grad=1, grad_scale=1.0, grad_features_ptr=grad_out,
        dim=d, num_classes=c, inv_temperature=1.0 / temperature, eps=1e-12,
        HAS_CENTROIDS=True, LOG_CENTROIDS=False, **launch_meta(d),
    )  # fmt: skip
    assert torch.isnan(grad_out[n]).all(), "the backward stored past the last row"
    assert_rel_close(grad_out[:n], ref_h.grad, 1e-5, "gradient rows")


def test_log_table_kernel_writes_columns_below_d_and_nothing_else():
    """White-box: the log-centroid table kernel writes log max(G, eps) into columns [0, d) of each class row and not
    one element more, here into a NaN-poisoned table of C + 1 rows (d = 40: BLOCK_D 64 passes the row length 48, into
    the next class's row). The interpreter runs programs one after the other, so a store past a row's end would be
    overwritten by the next class's program (on a GPU it races with it) and shows only in the padding and the last
    row."""
    pytest.importorskip("triton")
    from kernels.cmi import stats_row_len
    from kernels.cmi_forward import launch_meta
    from kernels.cmi_log_centroids import cmi_log_centroids_kernel

    c, d = 3, 40
    centroids = random_centroids(c, d, torch.Generator().manual_seed(0), zero_entries=True).to(DEVICE)
    table = torch.full((c + 1, stats_row_len(d)), float("nan"), device=DEVICE)
    cmi_log_centroids_kernel[(c,)](
        centroids, *centroids.stride(), None, 0, table, table.stride(0), d, 1e-12, HAS_CENTROIDS=True, **launch_meta(d)
    )
    torch.testing.assert_close(table[:c, :d], centroids.clamp_min(1e-12).log())
    assert torch.isnan(table[:, d:]).all() and torch.isnan(table[c]).all(), "the table kernel stored past column d"


@pytest.mark.parametrize("backend", [*BACKENDS, "triton_table"])
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
def test_eps_other_than_the_default_is_the_floor(backend: str, centroid_mode: str, request):
    """eps = 0.01 floors G where it bites (zero centroid entries; per-batch means of a peaked softmax): rows and
    gradient against the float64 reference with the same eps, on every path that takes log G."""
    if backend == "triton_table":
        request.getfixturevalue("log_table_forced")
        backend = "triton"
    gen = generator_for(request)
    n, d, c, eps = 12, 40, 3, 1e-2
    features = make_features(n, d, torch.float32, "contiguous", gen).requires_grad_(True)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    centroids = random_centroids(c, d, gen, zero_entries=True).to(DEVICE) if centroid_mode == "fixed" else None
    result = cmi_loss(features, labels, c, centroids, eps=eps, reduction="none", backend=backend)
    ref_rows, ref_sums, ref_counts, ref_h = reference_cmi(features, labels, c, centroids, eps=eps, reduction="none")
    floored = centroids if centroids is not None else ref_sums / ref_counts.clamp_min(1.0)[:, None]
    assert (floored < eps).any(), "the inputs must reach the floor for this test to mean anything"
    grad_rows = torch.randn(n, generator=gen).to(DEVICE)
    result.loss.backward(grad_rows)
    ref_rows.backward(grad_rows.double())
    assert_rel_close(result.loss, ref_rows, 1e-5, "rows")
    assert_rel_close(features.grad, ref_h.grad, 1e-5, "gradient")


def rows_past_2_31_elements(layout: str, device: str, gen: torch.Generator) -> torch.Tensor:
    """bf16 features whose last rows start past element 2**31: rows 2**23 elements apart in a 4 GiB buffer (the
    reads' row offsets), or a contiguous (2**21 + 64, 1024) tensor, whose gradient rows lie past 2**31 too (4 GiB
    each way). Only the rows are filled."""
    if layout == "row_stride":
        storage = torch.empty(2**31 + 2**20, dtype=torch.bfloat16, device=device)
        features = storage.as_strided((257, 16), (2**23, 1))
        features.copy_(torch.randn(257, 16, generator=gen).to(device))
    else:
        features = torch.randn(2**21 + 64, 1024, device=device, dtype=torch.bfloat16)
    return features.requires_grad_(True)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA and 4-9 GiB: the interpreter addresses in int64 whatever the code")
@pytest.mark.parametrize("layout", ["row_stride", "contiguous"])
def test_rows_past_2_31_elements_are_addressed_in_int64(layout: str, request):
    """The kernels' row offsets (row * stride in the forward and backward reads, row * d for dh) are int64: the
    last rows, past element 2**31, give the KL and gradient of the same rows computed alone (rows are independent
    with fixed centroids). With int32 offsets they would wrap to other memory."""
    gen = generator_for(request)
    features = rows_past_2_31_elements(layout, DEVICE, gen)
    n, d, c = *features.shape, 3
    labels = (torch.arange(n) % c).to(DEVICE)
    centroids = torch.softmax(torch.randn(c, d, generator=gen), -1).to(DEVICE)
    result = cmi_loss(features, labels, c, centroids, reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(result.loss, features, torch.ones(n, device=DEVICE))
    tail = slice(n - 2, n)
    ref_rows, _, _, ref_h = reference_cmi(features[tail].detach(), labels[tail], c, centroids, reduction="none")
    ref_rows.sum().backward()
    assert_rel_close(result.loss[tail], ref_rows, 1e-5, "KL of the rows past 2**31")
    assert_rel_close(grad[tail], ref_h.grad, 1e-2, "gradient of the rows past 2**31")


def envelope_problem(request, dtype: torch.dtype):
    gen = generator_for(request)
    n, d, c = 30, 67, 4
    features = torch.randn(n, d, generator=gen).to(DEVICE, dtype).mul(1.5).requires_grad_(True)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    class_weights = torch.randn(c, generator=gen).to(DEVICE)
    return features, labels, c, class_weights


def undetached_gradient(features, labels, num_classes, reduction, grad_output, temperature):
    loss, _, _, h64 = reference_cmi(
        features, labels, num_classes, None, temperature=temperature, reduction=reduction, detach_centroids=False
    )
    loss.backward(grad_output.double())
    return h64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_batch_gradient_equals_undetached_gradient(backend: str, reduction: str, request):
    """Envelope property: sum_i KL(f_i || g_c) is stationary at g_c = mean of the class, so holding the per-batch
    centroids constant gives the gradient of the full expression. For "none" this holds for any upstream gradient
    that is constant within each class (here: a random weight per class)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    features, labels, c, class_weights = envelope_problem(request, dtype)
    if reduction == "none":
        grad_output = class_weights[labels]
    else:
        grad_output = class_weights[0]
    result = cmi_loss(features, labels, c, temperature=1.3, reduction=reduction, backend=backend)
    result.loss.backward(grad_output.to(result.loss.dtype))
    expected = undetached_gradient(features, labels, c, reduction, grad_output, 1.3)
    tol = FLOAT64_ENVELOPE_TOL if dtype == torch.float64 else TOLERANCES[torch.float32].grad
    assert_rel_close(features.grad, expected, tol, "gradient vs un-detached expression")


def test_envelope_check_can_fail(request):
    """The envelope comparison above is not vacuous: a per-row upstream gradient that varies inside a class breaks
    the property, and the detached gradient then differs from the un-detached one."""
    features, labels, c, _ = envelope_problem(request, torch.float64)
    grad_output = torch.randn(len(labels), generator=generator_for(request), dtype=torch.float64).to(DEVICE)
    result = cmi_loss(features, labels, c, temperature=1.3, reduction="none", backend="torch")
    result.loss.backward(grad_output)
    expected = undetached_gradient(features, labels, c, "none", grad_output, 1.3)
    assert relative_error(features.grad, expected) > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_output_dtypes_shapes_and_grad_paths(backend: str, dtype: torch.dtype, reduction: str, request):
    gen = generator_for(request)
    n, d, c = 6, 9, 4
    features = make_features(n, d, dtype, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=False).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE, dtype).requires_grad_(True)
    result = cmi_loss(features, labels, c, centroids, reduction=reduction, backend=backend)

    assert result.loss.dtype == torch.float32
    assert result.loss.shape == ((n,) if reduction == "none" else ())
    assert result.loss.requires_grad
    assert result.class_sums.dtype == torch.float32 and result.class_sums.shape == (c, d)
    assert result.class_counts.dtype == torch.float32 and result.class_counts.shape == (c,)
    assert not result.class_sums.requires_grad
    assert not result.class_counts.requires_grad
    # README: on triton, views of one (C, R) statistics buffer, so class_sums is strided for C > 1 (C = 1 is one row).
    assert result.class_sums.is_contiguous() == (backend == "torch")
    assert result.class_sums.reshape(-1).shape == (c * d,)
    if backend == "triton":
        assert result.class_sums.untyped_storage().data_ptr() == result.class_counts.untyped_storage().data_ptr()
        one_class = cmi_loss(features, torch.zeros_like(labels), 1, centroids[:1], backend=backend).class_sums
        assert one_class.is_contiguous() and one_class.view(-1).shape == (d,)
    result.loss.sum().backward()
    assert features.grad is not None and features.grad.dtype == dtype and features.grad.shape == (n, d)
    assert centroids.grad is None, "the loss must not differentiate into the given centroids"


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_per_batch_loss_is_zero(backend: str, request):
    """N = 1 with per-batch centroids: the centroid is f itself, so KL, loss and gradient are 0."""
    features = make_features(1, 383, torch.float32, "contiguous", generator_for(request))
    labels = torch.tensor([2], device=DEVICE)
    result = cmi_loss(features, labels, 3, reduction="none", backend=backend)
    result.loss.sum().backward()
    assert result.loss.abs().max().item() < 1e-6
    assert features.grad.abs().max().item() < 1e-6
    assert result.class_counts.tolist() == [0.0, 0.0, 1.0]
    assert abs(result.class_sums[2].sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
def test_absent_class_has_no_effect(backend: str, centroid_mode: str, request):
    """A class absent from the batch: count 0, zero class_sums row, and the loss equals that of the same problem
    with the class removed (labels above it shifted down) whatever its centroid holds."""
    gen = generator_for(request)
    n, d, c, absent = 14, 40, 5, 3
    features = make_features(n, d, torch.float32, "contiguous", gen)
    present = torch.tensor([cls for cls in range(c) if cls != absent])
    labels = present[random_labels(n, c - 1, gen, per_batch=centroid_mode == "batch")]
    labels_without = labels - (labels > absent).long()
    centroids = centroids_without = None
    if centroid_mode == "fixed":
        centroids = random_centroids(c, d, gen)
        centroids_without = torch.cat([centroids[:absent], centroids[absent + 1 :]]).to(DEVICE)
        centroids[absent] = 0.0  # would give a huge KL if any row used it
        centroids = centroids.to(DEVICE)

    result = cmi_loss(features, labels.to(DEVICE), c, centroids, reduction="none", backend=backend)
    smaller = cmi_loss(features, labels_without.to(DEVICE), c - 1, centroids_without, reduction="none", backend=backend)

    assert result.class_counts[absent].item() == 0
    assert torch.count_nonzero(result.class_sums[absent]).item() == 0
    assert_rel_close(result.loss, smaller.loss, TOLERANCES[torch.float32].loss, "loss with vs without the absent class")
    keep = [cls for cls in range(c) if cls != absent]
    assert torch.equal(result.class_counts[keep], smaller.class_counts)


# --------------------------------------------------------------------------------------------------------------
# Poisoned memory, non-finite input, determinism
# --------------------------------------------------------------------------------------------------------------


def poison_allocator(sizes) -> None:
    """Fill and free buffers of the given element counts with NaN, so that outputs the op allocates without
    writing every element would likely show NaN (reliable with the CUDA caching allocator, best effort on CPU)."""
    buffers = [torch.full((size,), float("nan"), device=DEVICE) for size in sizes for _ in range(4)]
    del buffers


@pytest.mark.parametrize(
    "backend, centroid_mode",
    [(backend, mode) for backend in BACKENDS for mode in ("fixed", "batch")]
    + [("triton", "fixed, log table"), ("triton", "batch, log table")],
)
def test_outputs_fully_written_over_poisoned_memory(backend: str, centroid_mode: str, request, monkeypatch):
    """Every buffer the launchers take from torch.empty (row KL, the log-sum-exp parts, the log table, dh) starts as
    NaN, and freed NaN buffers wait in the allocator for the others: an element a kernel does not write shows."""
    if "log table" in centroid_mode:
        request.getfixturevalue("log_table_forced")
    gen = generator_for(request)
    n, d, c = 37, 129, 6
    features = make_features(n, d, torch.float32, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=centroid_mode.startswith("batch")).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode.startswith("fixed") else None
    empty = torch.empty

    def nan_filled_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_filled_empty)
    poison_allocator([n, c * d, c, n * d])
    result = cmi_loss(features, labels, c, centroids, reduction="none", backend=backend)
    poison_allocator([n, c * d, c, n * d])
    result.loss.backward(torch.ones(n, device=DEVICE))
    ref_loss, ref_sums, ref_counts, h64 = reference_cmi(features, labels, c, centroids, reduction="none")
    ref_loss.backward(torch.ones_like(ref_loss))

    for name, tensor in [("loss", result.loss), ("class_sums", result.class_sums), ("grad", features.grad)]:
        assert torch.isfinite(tensor).all(), f"{name} has NaN/inf for finite input"
    assert_rel_close(result.loss, ref_loss, 1e-5, "every row of the 'none' loss")
    assert_rel_close(result.class_sums, ref_sums, 1e-5, "class_sums")
    assert torch.equal(result.class_counts.double(), ref_counts)
    assert_rel_close(features.grad, h64.grad, 1e-5, "gradient")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_feature_row_gives_nan(backend: str, bad_value: float, request):
    """As in PyTorch's softmax, a NaN or +inf in a row makes that row's KL NaN, and hence the mean, and its class's
    sums; with per-batch centroids (made from those sums) every row of its class, and no other (README)."""
    gen = generator_for(request)
    n, d, c, bad_row = 8, 21, 3, 5
    features = torch.randn(n, d, generator=gen)
    features[bad_row, 4] = bad_value
    features = features.to(DEVICE)
    labels = random_labels(n, c, gen, per_batch=False).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE)

    result = cmi_loss(features, labels, c, centroids, reduction="none", backend=backend)
    rows = result.loss
    assert torch.isnan(rows[bad_row])
    good = [row for row in range(n) if row != bad_row]
    ref_rows = reference_cmi(features[good], labels[good], c, centroids, reduction="none")[0]
    assert_rel_close(rows[good], ref_rows, 1e-5, "rows with finite features (fixed centroids)")
    assert torch.isnan(cmi_loss(features, labels, c, centroids, backend=backend).loss)
    of_its_class = labels == labels[bad_row]
    assert torch.isnan(result.class_sums[labels[bad_row]]).any()
    assert torch.isfinite(result.class_sums[labels[labels != labels[bad_row]]]).all()
    batch_rows = cmi_loss(features, labels, c, reduction="none", backend=backend).loss
    assert torch.isnan(batch_rows[of_its_class]).all() and torch.isfinite(batch_rows[~of_its_class]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
@pytest.mark.parametrize("d", [21, 4100], ids=["single-chunk", "two-chunk"])
def test_masked_columns_leave_the_class_sums_finite(backend: str, centroid_mode: str, d: int, request):
    """A row whose first d - 4 columns are -inf (masked logits; at d = 4100 the whole first chunk) has f = 0 there:
    only its own KL is NaN (0 * -inf). The online log-sum-exp must not form exp(-inf - -inf) = NaN, which would
    spread through the class sums to the centroid of every row of that class."""
    gen = generator_for(request)
    n, c, masked_row = 6, 2, 0
    features = torch.randn(n, d, generator=gen)
    features[masked_row, : d - 4] = float("-inf")
    features = features.to(DEVICE)
    labels = torch.tensor([0, 0, 1, 0, 1, 1], device=DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None

    result = cmi_loss(features, labels, c, centroids, reduction="none", backend=backend)
    ref_rows, ref_sums, _, _ = reference_cmi(features, labels, c, centroids, reduction="none")
    assert torch.isnan(result.loss[masked_row])
    assert_rel_close(result.class_sums, ref_sums, 1e-5, "class_sums")
    assert_rel_close(result.loss[1:], ref_rows[1:], 1e-5, "the other rows, the masked row's class included")
    # The README's way to mask: a large finite negative value gives f = 0 there and a finite KL.
    features[masked_row, : d - 4] = -1e4
    result = cmi_loss(features, labels, c, centroids, reduction="none", backend=backend)
    ref_rows, ref_sums, _, _ = reference_cmi(features, labels, c, centroids, reduction="none")
    assert_rel_close(result.loss, ref_rows, 1e-5, "rows, masked with -1e4")
    assert_rel_close(result.class_sums, ref_sums, 1e-5, "class_sums, masked with -1e4")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_quotient_past_float32_is_an_inf(backend: str):
    """h / T is taken in float32: 1e30 / 1e-9 overflows to inf, and the row and its class turn NaN (README)."""
    features = torch.zeros(2, 8, device=DEVICE)
    features[0, 0] = 1e30
    labels = torch.tensor([0, 1], device=DEVICE)
    centroids = torch.full((2, 8), 1 / 8, device=DEVICE)
    result = cmi_loss(features, labels, 2, centroids, temperature=1e-9, reduction="none", backend=backend)
    assert torch.isnan(result.loss[0]) and torch.isnan(result.class_sums[0]).any()
    assert result.loss[1] == 0 and torch.isfinite(result.class_sums[1]).all()
    if backend == "torch":  # float64 features are divided in float64 there: the quotient 1e39 is finite
        result = cmi_loss(features.double(), labels, 2, centroids, temperature=1e-9, reduction="none", backend=backend)
        assert torch.isfinite(result.loss).all() and torch.isfinite(result.class_sums).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_centroid_entry_gives_nan_rows(backend: str, request):
    """A NaN in a centroid row propagates to the rows of that class, as torch's clamp_min(eps).log() does: the
    kernels' max(G, eps) must not return eps for NaN, which a plain maximum does on the GPU."""
    gen = generator_for(request)
    n, d, c = 8, 11, 3
    features = torch.randn(n, d, generator=gen).to(DEVICE)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], device=DEVICE)
    centroids = random_centroids(c, d, gen)
    centroids[1, 4] = float("nan")
    centroids = centroids.to(DEVICE)
    rows = cmi_loss(features, labels, c, centroids, reduction="none", backend=backend).loss
    of_class_1 = labels == 1
    assert torch.isnan(rows[of_class_1]).all()
    ref_rows = reference_cmi(features, labels, c, centroids.nan_to_num(0.5), reduction="none")[0]
    assert_rel_close(rows[~of_class_1], ref_rows[~of_class_1], 1e-5, "rows of the other classes")


class RecordingKernel:
    """Stands in for a kernel where the launchers look it up (``kernels.cmi``), not by its ``run`` method, which the
    interpreters of triton 3.3-3.5 do not go through: ``record(grid, args, kwargs)`` of every launch, which still
    runs."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record(grid, args, kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def recorded_forward_launches():
    """Yields the list of ``(grid, USE_ATOMICS, (features pointer, row stride, column stride))`` of every forward
    launch inside the block; each still runs."""
    import kernels.cmi

    launches = []

    def record(grid, args, kwargs):
        launches.append((tuple(grid), kwargs["USE_ATOMICS"], (args[0].data_ptr(), args[1], args[2])))

    with mock.patch.object(kernels.cmi, "cmi_forward_kernel", RecordingKernel(kernels.cmi.cmi_forward_kernel, record)):
        yield launches


def test_every_launch_passes_the_compile_options_of_the_ahead_of_time_report(monkeypatch, log_table_forced):
    """The launchers pass ``compile_options`` (with which ``bench.kernel_resources`` compiles) to each kernel."""
    import kernels.cmi
    from kernels.cmi_forward import compile_options

    launches = []
    names = ("cmi_forward_kernel", "cmi_backward_kernel", "cmi_log_centroids_kernel")
    for name in names:

        def record(grid, args, kwargs, name=name):
            launches.append((name, kwargs))

        monkeypatch.setattr(kernels.cmi, name, RecordingKernel(getattr(kernels.cmi, name), record))
    features = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    centroids = torch.softmax(torch.randn(3, 24, device=DEVICE), dim=-1)
    for given_centroids in (centroids, None):
        cmi_loss(features, labels, 3, given_centroids, backend="triton").loss.backward()
    assert {name for name, _ in launches} == set(names)
    for name, kwargs in launches:
        expected = compile_options(kwargs["BLOCK_D"])
        assert {key: kwargs.get(key) for key in expected} == expected, name


@pytest.mark.parametrize("d", [300, 4500], ids=["single-chunk", "two-chunk"])
def test_triton_deterministic_runs_are_bit_identical(d, request):
    """Several programs add into the same class, each into its own slot (no atomics): the fixed-order reduction
    must not depend on scheduling. The interpreter runs programs one after the other, so on the CPU the two runs
    agree whatever the kernels do: there the launch check is what can fail."""
    gen = generator_for(request)
    n, c = 40, 3
    features = make_features(n, d, torch.float32, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    runs = []
    with recorded_forward_launches() as launches:
        for _ in range(2):
            result = cmi_loss(features, labels, c, reduction="sum", backend="triton", deterministic=True)
            (grad,) = torch.autograd.grad(result.loss, features)
            runs.append((result.loss, result.class_sums, grad))
    assert launches and all(grid[0] > 1 and not atomics for grid, atomics, _ in launches), launches
    assert_sum_matches_reference(result, features, labels, c)
    for name, first, second in zip(("loss", "class_sums", "grad"), runs[0], runs[1], strict=True):
        assert torch.equal(first, second), f"{name} differs between two deterministic runs"


@pytest.mark.parametrize(
    "shape, num_classes, dtype, default_slots",
    [
        ((32, 768), 2, torch.bfloat16, 1),  # GLUE batch: the slots would outweigh the features, atomics
        ((256, 1024), 3, torch.bfloat16, 1),
        ((256, 1024), 3, torch.float32, 42),  # twice the bytes, twice the budget
        ((4096, 768), 2, torch.bfloat16, 501),
        ((4096, 768), 2, torch.float32, 1003),
        ((65536, 768), 10, torch.bfloat16, 534),
        ((32768, 4096), 3, torch.bfloat16, 340),
        ((16384, 768), 30522, torch.bfloat16, 1),  # vocabulary-sized centroids
    ],
)
def test_default_reduction_policy(shape, num_classes, dtype, default_slots):
    """deterministic=None takes the fixed-order slots where enough fit in half of the features' bytes (and in
    PARTIALS_MAX_BYTES), atomics (1) elsewhere: the counts the README gives for an H100's 132 SMs."""
    pytest.importorskip("triton")
    from kernels.cmi import (
        PARTIALS_BUDGET_FRACTION,
        PARTIALS_MAX_BYTES,
        PROGRAMS_PER_SM,
        accumulator_slots,
        stats_row_len,
    )

    features = torch.empty(shape, dtype=dtype, device="meta")
    programs = min(shape[0], 132 * PROGRAMS_PER_SM)  # an H100's persistent grid
    slots = accumulator_slots(features, num_classes, programs, "auto")
    assert slots == default_slots
    slot_bytes = num_classes * stats_row_len(shape[1]) * 4
    budget = min(features.numel() * features.element_size() // PARTIALS_BUDGET_FRACTION, PARTIALS_MAX_BYTES)
    if slots > 1:
        assert slots * slot_bytes <= budget
    assert accumulator_slots(features, num_classes, programs, "atomics") == 1
    # deterministic=True: as many slots as fit in the budget (one program per slot), at least one
    partials = accumulator_slots(features, num_classes, programs, "partials")
    assert 1 <= partials <= programs
    assert partials == 1 or partials * slot_bytes <= budget
    assert partials == programs or (partials + 1) * slot_bytes > budget, "partials leaves slots that fit unused"


@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
def test_slot_accumulator_does_not_outlive_the_forward(centroid_mode, request):
    """The slots may take half of the features' bytes only because they are freed inside the forward: nothing the
    forward returns (and so nothing saved for the backward) may keep the (slots, C, R) buffer alive."""
    from kernels.cmi import cmi_forward

    gen = generator_for(request)
    n, d, c = 64, 40, 3
    features = make_features(n, d, torch.float32, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None
    outputs = cmi_forward(features, labels, centroids, c, 1.0, 1e-12, "partials")
    for name, tensor in zip(("row_kl", "lse", "stats", "log_table"), outputs, strict=True):
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


@pytest.mark.parametrize(
    "n_rows, num_classes, with_table",
    [(32, 2, False), (256, 3, False), (1024, 2, True), (4096, 2, True), (8192, 1000, True), (16384, 30522, False)]
    + [(4096, 1024, True), (4095, 1024, False)],  # N >= 4 C at its edge
)
def test_log_table_policy(n_rows, num_classes, with_table):
    """The log-centroid table (one more launch) only where each class row serves >= 4 rows of a large batch."""
    pytest.importorskip("triton")
    from kernels.cmi import use_log_table

    assert use_log_table(n_rows, num_classes) == with_table


@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
def test_forward_returns_the_log_table_it_used(centroid_mode, log_table_forced, request):
    """With the table forced on, the forward returns (C, R) log max(G, eps) (saved for the backward); per-batch
    centroids: the rows of the classes in the batch (no row reads another class's)."""
    from kernels.cmi import cmi_forward, stats_row_len

    gen = generator_for(request)
    n, d, c = 12, 40, 3
    features = make_features(n, d, torch.float32, "contiguous", gen).detach()
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None
    _, _, stats, table = cmi_forward(features, labels, centroids, c, 1.0, 1e-12, "auto")
    assert table.shape == (c, stats_row_len(d))
    present = labels.unique()
    if centroids is None:
        centroids = stats[:, :d] / stats[:, d : d + 1]
    log_g = centroids.double().clamp_min(1e-12).log()
    assert_rel_close(table[present, :d], log_g[present], 1e-6, "log table")


# Logits h / T whose row max is large: the log-sum-exp m + l rounds to the ulp of m (1e-3 at 1e4), so log f must be
# taken as (z - m) - l. Offset: a shift that changes nothing mathematically, single-chunk and chunked (d 4097, the
# online log-sum-exp; a negative one too, where a running max started at 0 instead of -inf underflows every
# exp(z - m) to 0); small_t: ordinary features at T 2^-10, whose nearly one-hot rows leave the gradient to
# cancellation (about 1e-1 off in float32 on either backend), so only the rows and sums are compared there. T is a
# power of two so that h / T is exact in fp32: at T 1e-3 (as here before) rounding z = h / T moves f by ~1e-4 where two
# entries of a row are close, the conditioning of the input, not the op (class sums 1.8e-5 off for one draw of inputs).
# Ties of 1e30, where m + log 2 == m: test_tied_maxima_of_1e30.
LARGE_LOGIT_CASES = {
    "offset": dict(shift=1e4, temperature=1.0, d=64, compare_grad=True),
    "chunked_offset": dict(shift=1e4, temperature=1.0, d=4097, compare_grad=True),
    "chunked_negative_offset": dict(shift=-1e4, temperature=1.0, d=4097, compare_grad=True),
    "small_t": dict(shift=0.0, temperature=2.0**-10, d=384, compare_grad=False),
}


@pytest.mark.parametrize("backend", [*BACKENDS, "triton_table"])
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
@pytest.mark.parametrize("case", LARGE_LOGIT_CASES)
def test_large_logits_keep_fp32_accuracy(case, centroid_mode, backend, request):
    if backend == "triton_table":
        request.getfixturevalue("log_table_forced")
        backend = "triton"
    setting = LARGE_LOGIT_CASES[case]
    gen = generator_for(request)
    n, c, d = 8, 3, setting["d"]
    features = setting["shift"] + torch.randn(n, d, generator=gen)
    features = features.to(DEVICE).requires_grad_(True)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None
    temperature = setting["temperature"]
    grad_output = torch.randn(n, generator=gen).to(DEVICE)
    result = cmi_loss(features, labels, c, centroids, temperature=temperature, reduction="none", backend=backend)
    result.loss.backward(grad_output)
    ref_rows, ref_sums, _, h64 = reference_cmi(
        features, labels, c, centroids, temperature=temperature, reduction="none"
    )
    ref_rows.backward(grad_output.double())
    tol = TOLERANCES[torch.float32]
    assert_rel_close(result.loss, ref_rows, tol.loss, "rows")
    assert_rel_close(result.class_sums, ref_sums, tol.class_sums, "class_sums")
    if setting["compare_grad"]:
        assert_rel_close(features.grad, h64.grad, tol.grad, "gradient")


def half_ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` around each of the float32 ``values`` (subnormals included)."""
    finfo = torch.finfo(dtype)
    _, exponent = torch.frexp(values)  # |x| in [2^(e-1), 2^e)
    spacing = finfo.eps * torch.ldexp(torch.ones_like(values), exponent - 1)
    return 0.5 * spacing.clamp_min(finfo.smallest_normal * finfo.eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [300, 4500], ids=["single-chunk", "chunked"])
def test_low_precision_gradient_is_the_fp32_gradient_rounded_once(d, dtype, backend, request):
    """Softmax, KL and the gradient run in fp32 whatever the features' dtype, which only the gradient's store rounds
    to. So, given centroids (per-row math alone: the grid, which depends on the element size, only orders the class
    sums), the bf16 / fp16 gradient is the gradient of the same features in fp32, rounded once: bit for bit on the
    CPU; on a GPU within half an ulp of it plus fp32 noise, as the element size may change the compiled kernels'
    layout and so the order of a row's sums. To nearest, as torch's ``.to`` and the compiled store round
    (test_kernel_compile.py); except for bf16 in triton's interpreter, whose fp32 -> bf16 cast passes no rounding mode
    and so rounds toward zero (triton/runtime/interpreter.py, ``cast_impl``; its fp16 cast is numpy's, to nearest):
    there CPU runs of the kernels are up to one bf16 ulp off, where rounding to nearest is half an ulp off."""
    gen = generator_for(request)
    n, c = 12, 4
    features = make_features(n, d, dtype, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=False).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE)
    grad_output = torch.randn(n, generator=gen).to(DEVICE)

    def gradient(h: torch.Tensor) -> torch.Tensor:
        h = h.detach().requires_grad_(True)
        loss = cmi_loss(h, labels, c, centroids, temperature=0.7, reduction="none", backend=backend).loss
        return torch.autograd.grad(loss, h, grad_output)[0]

    low, full = gradient(features), gradient(features.float())
    assert low.dtype == dtype and full.dtype == torch.float32
    nearest = full.to(dtype)
    assert not torch.equal(nearest.float(), full)  # the rounding is there to see
    if backend == "triton" and ON_CUDA:
        assert ((low.float() - full).abs() <= half_ulp(full, dtype) + 1e-5 * full.abs()).all()
    elif backend == "triton" and dtype == torch.bfloat16:
        toward_zero = (full.view(torch.int32) & -(1 << 16)).view(torch.float32).to(dtype)  # low 16 bits cut: exact
        assert not torch.equal(toward_zero, nearest)
        assert torch.equal(low, toward_zero)
    else:
        assert torch.equal(low, nearest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [4, 4097], ids=["single-chunk", "chunked"])
def test_tied_maxima_of_1e30(d, backend):
    """bf16 rows [1e30, 1e30, -1e30, ...]: f = [1/2, 1/2, 0, ...] exactly, KL = sum_j f_j log(f_j / G_j)."""
    features = torch.full((1, d), -1e30)
    features[0, :2] = 1e30
    features = features.to(DEVICE, torch.bfloat16).requires_grad_(True)
    centroids = torch.full((1, d), 1e-6)
    centroids[0, :2] = torch.tensor([0.25, 0.75])
    centroids = centroids.to(DEVICE)
    result = cmi_loss(features, torch.zeros(1, dtype=torch.long, device=DEVICE), 1, centroids, backend=backend)
    result.loss.backward()
    expected_kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert result.loss.item() == pytest.approx(expected_kl, rel=1e-6)
    assert result.class_sums[0, :2].tolist() == [0.5, 0.5] and result.class_sums[0, 2:].abs().max() == 0
    # dKL/dh_k = f_k (log f_k - log G_k - KL): +-0.2747, in bf16
    expected_grad = 0.5 * (math.log(0.5 / 0.25) - expected_kl)
    assert features.grad[0, :2].float().tolist() == pytest.approx([expected_grad, -expected_grad], rel=1e-2)


@pytest.mark.parametrize("deterministic", [True, False, None])
def test_triton_class_sum_modes_match_reference(deterministic, request):
    gen = generator_for(request)
    n, d, c = 40, 96, 7
    features = make_features(n, d, torch.float32, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    result = cmi_loss(features, labels, c, reduction="sum", backend="triton", deterministic=deterministic)
    assert_sum_matches_reference(result, features, labels, c)


@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
def test_deterministic_keeps_one_slot_instead_of_atomics(centroid_mode, request):
    """deterministic=True where a single slot fits (many classes, few rows): one program owns it, never the atomics
    grid (whose summation order varies between runs on a GPU)."""
    gen = generator_for(request)
    n, d, c = 8, 40, 50  # one (C, R) slot is 9.6 KB, over half of the features' 1.3 KB
    features = make_features(n, d, torch.float32, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None
    with recorded_forward_launches() as launches:
        result = cmi_loss(features, labels, c, centroids, reduction="sum", backend="triton", deterministic=True)
    assert launches and all(grid == (1,) and not atomics for grid, atomics, _ in launches), launches
    assert_sum_matches_reference(result, features, labels, c, centroids)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) inside the block, the setting as it was after it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("compiled", [False, True])
def test_deterministic_algorithms_make_the_default_deterministic(compiled, request):
    """deterministic=None follows torch.use_deterministic_algorithms, as PyTorch's own ops do: atomics at a shape
    where one slot fits, and with the flag on the slots (one program owning the one slot), also in a compiled graph
    (dynamo guards on the flag). An explicit deterministic=False keeps the atomics under the flag."""
    gen = generator_for(request)
    n, d, c = 8, 40, 50  # one (C, R) slot is 9.6 KB, over half of the features' 1.3 KB: "auto" takes atomics
    features = make_features(n, d, torch.float32, "contiguous", gen)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)

    def loss(deterministic):
        return cmi_loss(features, labels, c, reduction="sum", backend="triton", deterministic=deterministic)

    if compiled:
        torch._dynamo.reset()
        loss = torch.compile(loss, fullgraph=True, dynamic=False)
    atomics_used = {}
    for flag, deterministic in [(False, None), (True, None), (True, False), (False, None)]:
        with deterministic_algorithms(flag), recorded_forward_launches() as launches:
            result = loss(deterministic)
        assert_sum_matches_reference(result, features, labels, c)
        atomics_used[flag, deterministic] = {atomics for _, atomics, _ in launches}  # of both phases
    assert atomics_used == {(False, None): {True}, (True, None): {False}, (True, False): {True}}


@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
def test_row_slice_features_are_read_in_place(centroid_mode: str, request):
    """``last_hidden_state[:, 0]`` (row stride L x d) reaches every forward launch as it is: its own storage and
    strides, no contiguous copy (README)."""
    pytest.importorskip("triton")
    gen = generator_for(request)
    hidden = torch.randn(6, 4, 7, generator=gen).to(DEVICE)
    features = hidden[:, 0]
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    centroids = random_centroids(3, 7, gen).to(DEVICE) if centroid_mode == "fixed" else None
    with recorded_forward_launches() as launches:
        cmi_loss(features, labels, 3, centroids, backend="triton")
    assert len(launches) == (1 if centroid_mode == "fixed" else 2)
    assert all(read == (hidden.data_ptr(), 28, 1) for _, _, read in launches), launches


def test_column_offsets_that_overflow_int32_get_contiguous_rows():
    """(d - 1) * column stride must fit int32 (the kernels' column offsets); else the op reads a contiguous copy."""
    pytest.importorskip("triton")
    from kernels.cmi import int32_addressable

    training_layout = torch.empty(4096, 768, device="meta")
    assert int32_addressable(training_layout) is training_layout
    transposed_small = torch.empty(768, 4096, device="meta").t()  # column stride 4096: (d - 1) * 4096 fits
    assert int32_addressable(transposed_small) is transposed_small
    transposed_huge = torch.empty(4096, 2**20, device="meta").t()  # column stride 2**20: 4095 * 2**20 > 2**31
    copied = int32_addressable(transposed_huge)
    assert copied.shape == transposed_huge.shape and copied.stride() == (4096, 1)
    assert int32_addressable(None) is None


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


def valid_arguments():
    features = torch.randn(6, 5, device=DEVICE)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    return dict(features=features, labels=labels, num_classes=3, centroids=None)


BAD_INPUTS = [
    ("labels_too_large", dict(labels=[0, 1, 3, 0, 1, 2]), ValueError, "labels"),
    ("labels_negative", dict(labels=[0, 1, -1, 0, 1, 2]), ValueError, "labels"),
    ("float_labels", dict(labels=torch.tensor([0.0, 1, 2, 0, 1, 2])), TypeError, "labels"),
    ("features_1d", dict(features=torch.randn(30)), ValueError, "features"),
    ("features_3d", dict(features=torch.randn(6, 1, 5)), ValueError, "features"),
    ("integer_features", dict(features=torch.ones(6, 5, dtype=torch.int64)), TypeError, "features"),
    ("labels_length_mismatch", dict(labels=[0, 1, 2, 0, 1]), ValueError, "labels"),
    ("labels_2d", dict(labels=[[0, 1, 2, 0, 1, 2]]), ValueError, "labels"),
    ("labels_column", dict(labels=[[0], [1], [2], [0], [1], [2]]), ValueError, "labels must have shape"),  # N long
    ("no_rows", dict(features=torch.ones(0, 5), labels=torch.zeros(0, dtype=torch.long)), ValueError, "at least one"),
    ("no_columns", dict(features=torch.ones(6, 0)), ValueError, "features must have at least one row and one column"),
    ("centroids_wrong_classes", dict(centroids=torch.full((4, 5), 0.2)), ValueError, "centroids"),
    ("centroids_wrong_dim", dict(centroids=torch.full((3, 4), 0.25)), ValueError, "centroids"),
    ("centroids_integer", dict(centroids=torch.ones(3, 5, dtype=torch.int64)), TypeError, "centroids"),
    ("temperature_zero", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature_negative", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature_inf", dict(temperature=float("inf")), ValueError, "temperature"),
    # 1/T flushes to zero in float32 (the kernels' scale): -inf * 0 would make the padding lanes NaN.
    ("temperature_reciprocal_underflows", dict(temperature=1e50), ValueError, "temperature"),
    ("temperature_beyond_float", dict(temperature=10**400), ValueError, "temperature"),
    ("eps_inf", dict(eps=float("inf")), ValueError, "eps"),
    ("eps_nan", dict(eps=float("nan")), ValueError, "eps"),
    ("eps_below_float32", dict(eps=1e-50), ValueError, "eps"),  # would round to 0: no floor under log G
    ("eps_beyond_float32", dict(eps=1e39), ValueError, "eps"),
    ("eps_string", dict(eps="1e-12"), ValueError, "eps"),
    # Just past the README's ranges, T in about [2.9e-39, 8.5e37] and eps in about [1.2e-38, 3.4e38].
    ("temperature_just_too_small", dict(temperature=2.9e-39), ValueError, "temperature"),
    ("temperature_just_too_large", dict(temperature=8.6e37), ValueError, "temperature"),
    ("eps_just_too_small", dict(eps=1.1e-38), ValueError, "eps"),
    ("eps_just_too_large", dict(eps=3.5e38), ValueError, "eps"),
    # uint16/32/64 pass an is-integer test but torch has no CPU min/max/compare kernels for them.
    ("uint16_labels", dict(labels=torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.uint16)), TypeError, "labels"),
    ("uint32_labels", dict(labels=torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.uint32)), TypeError, "labels"),
    ("uint64_labels", dict(labels=torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.uint64)), TypeError, "labels"),
    ("bool_labels", dict(labels=torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)), TypeError, "labels"),
    ("unknown_reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("unknown_backend", dict(backend="cuda"), ValueError, "backend"),
    # check_labels off: with it on, the label check would raise first, and its message names num_classes too
    ("num_classes_zero", dict(num_classes=0, check_labels=False), ValueError, "num_classes must be a positive int"),
    # all labels 0, so that a bool taken for 1 would pass the label check too (whose message names num_classes)
    ("num_classes_bool", dict(num_classes=True, labels=[0, 0, 0, 0, 0, 0]), ValueError, "num_classes"),
    ("num_classes_float", dict(num_classes=3.0), ValueError, "num_classes must be a positive int, got 3.0"),
    ("deterministic_not_bool", dict(deterministic="yes"), ValueError, "deterministic"),
    ("check_labels_not_bool", dict(check_labels="yes"), ValueError, "check_labels"),
    # equal to True and False, so `in (None, True, False)` would take them
    ("deterministic_one", dict(deterministic=1), ValueError, "deterministic"),
    ("check_labels_zero_float", dict(check_labels=0.0), ValueError, "check_labels"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, error, argument", [pytest.param(*bad[1:], id=bad[0]) for bad in BAD_INPUTS])
def test_bad_input_error_names_argument(change: dict, error: type, argument: str, backend: str):
    arguments = valid_arguments()
    options = dict(backend=backend, check_labels=True)
    for key, value in change.items():
        if isinstance(value, list):
            value = torch.tensor(value)
        if isinstance(value, torch.Tensor):
            value = value.to(DEVICE)
        if key in arguments:
            arguments[key] = value
        else:
            options[key] = value
    with pytest.raises(error, match=argument):
        cmi_loss(*arguments.values(), **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_ranges_reach_their_edges(backend: str):
    """T and eps just inside the README's ranges are accepted and give finite results (1/T and eps normal
    float32). Features of the size of T keep h / T near h: the same class sums and loss as h at T = 1, to fp32
    rounding (1e-6 measured; at T = 3e-39 the features are subnormal floats). |h| <= 3 keeps h x 8.4e37 finite."""
    arguments = valid_arguments()
    features, labels = arguments["features"].clamp(-3, 3), arguments["labels"]
    at_one = cmi_loss(features, labels, 3, backend=backend)
    for temperature in (3e-39, 8.4e37):
        result = cmi_loss(features * temperature, labels, 3, temperature=temperature, backend=backend)
        assert_rel_close(result.class_sums, at_one.class_sums, 1e-5, f"class_sums at T = {temperature}")
        assert_rel_close(result.loss, at_one.loss, 1e-5, f"loss at T = {temperature}")
    for eps in (1.2e-38, 3.4e38):
        result = cmi_loss(features, labels, 3, eps=eps, backend=backend)
        assert torch.isfinite(result.loss) and torch.isfinite(result.class_sums).all(), eps


def test_temperature_and_the_rest_are_keyword_only():
    """cmi_loss(features, labels, num_classes, centroids, *, temperature, ...): a fifth positional is refused."""
    arguments = valid_arguments()
    with pytest.raises(TypeError, match="positional"):
        cmi_loss(*arguments.values(), 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_narrow_label_dtypes_match_int64(backend: str, dtype: torch.dtype, request):
    """Labels of every accepted integer dtype give what int64 labels give, up to the dtype's largest label
    (uint8: 255 with C = 256, int8: 127 with C = 128)."""
    gen = generator_for(request)
    num_classes = 256 if dtype == torch.uint8 else 128
    features = torch.randn(6, 9, generator=gen).to(DEVICE)
    labels = torch.tensor([num_classes - 1, 0, 3, num_classes - 1, 0, 3], device=DEVICE)
    expected = cmi_loss(features, labels, num_classes, reduction="none", backend=backend)
    result = cmi_loss(features, labels.to(dtype), num_classes, reduction="none", backend=backend)
    for name in ("loss", "class_sums", "class_counts"):
        assert torch.equal(getattr(result, name), getattr(expected, name)), name


def test_validate_labels_checks_once_what_cmi_loss_checks():
    """validate_labels(labels, C): a ValueError naming the first bad label found, nothing for valid or empty."""
    from cmi_fused import validate_labels

    for bad, shown in (([0, 3, 1], "3"), ([0, -1, 1], "-1")):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, num_classes=3\); found label {shown}"):
            validate_labels(torch.tensor(bad, device=DEVICE), 3)
    assert validate_labels(torch.tensor([0, 2, 1], dtype=torch.uint8, device=DEVICE), 3) is None
    assert validate_labels(torch.tensor([], dtype=torch.int64, device=DEVICE), 3) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_integer_num_classes_is_taken_as_int(backend: str):
    """numpy's integers are ints to the contract (``len(np.unique(y))`` is one): the same result as a Python int."""
    np = pytest.importorskip("numpy")
    arguments = valid_arguments()
    expected = cmi_loss(*arguments.values(), backend=backend)
    arguments["num_classes"] = np.int64(3)
    result = cmi_loss(*arguments.values(), backend=backend)
    for got, want in zip(result, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_centroids_or_labels_on_another_device_are_refused(backend: str):
    """A kernel given a pointer of another device would read the wrong memory: the check names centroids or labels
    (a meta tensor stands in for another device on a CPU-only machine)."""
    features = torch.randn(6, 5, device=DEVICE)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="centroids are on meta"):
        cmi_loss(features, labels, 3, torch.full((3, 5), 0.2, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="labels are on meta"):
        cmi_loss(features, labels.to("meta"), 3, backend=backend)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch"])
@pytest.mark.parametrize("n", [37, 1500], ids=["per-element-log", "log-table"])
def test_tensors_on_a_device_that_is_not_the_current_one(centroid_mode: str, n: int, request):
    """Triton launches on the current device: features on cuda:1 while cuda:0 is current must still run on cuda:1
    (forward and backward) and match the float64 reference."""
    gen = generator_for(request)
    d, c = 129, 3
    features = torch.randn(n, d, generator=gen).to("cuda:1").requires_grad_(True)
    labels = random_labels(n, c, gen, per_batch=centroid_mode == "batch").to("cuda:1")
    centroids = random_centroids(c, d, gen).to("cuda:1") if centroid_mode == "fixed" else None
    with torch.cuda.device(0):
        result = cmi_loss(features, labels, c, centroids, backend="triton")
        result.loss.backward()
    ref_loss, ref_sums, _, h64 = reference_cmi(features, labels, c, centroids)
    ref_loss.backward()
    assert_rel_close(result.loss, ref_loss, 1e-5, "loss")
    assert_rel_close(result.class_sums, ref_sums, 1e-5, "class_sums")
    assert_rel_close(features.grad, h64.grad, 1e-5, "gradient")


def test_launchers_make_the_tensors_device_current(monkeypatch):
    """The wrapper the test above runs for real on two GPUs, with the CUDA device calls mocked, so that every machine
    checks it: a launcher runs with its first tensor's device current, switching only when that is not the current
    one, and the caller's device is current again afterwards."""
    from kernels.cmi import on_the_tensors_device

    current, switches = [0], []

    @contextlib.contextmanager
    def device_context(device):
        switches.append(device.index)
        before, current[0] = current[0], device.index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device_context)

    @dataclasses.dataclass
    class CudaTensorStandIn:  # what the wrapper reads of a tensor
        device: torch.device
        is_cuda: bool = True

    launcher = on_the_tensors_device(lambda tensor, extra: (current[0], extra))
    assert launcher(CudaTensorStandIn(torch.device("cuda", 1)), "x") == (1, "x")
    assert current[0] == 0 and switches == [1]
    assert launcher(CudaTensorStandIn(torch.device("cuda", 0)), "y") == (0, "y")
    assert switches == [1]  # already current: no switch


def test_auto_backend_takes_the_kernels_only_where_they_apply():
    """auto: triton for CUDA features of a kernel dtype; the torch reference on the CPU and for float64 (which the
    kernels do not take: a TypeError on backend="triton")."""
    from types import SimpleNamespace

    from cmi_fused.options import resolve_backend

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", SimpleNamespace(is_cuda=True, dtype=dtype)) == "triton"
        assert resolve_backend("auto", SimpleNamespace(is_cuda=False, dtype=dtype)) == "torch"
    assert resolve_backend("auto", SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "torch"
    assert resolve_backend("triton", SimpleNamespace(is_cuda=False, dtype=torch.float64)) == "triton"
    features = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    labels = torch.tensor([0, 1, 2, 0], device=DEVICE)
    assert cmi_loss(features, labels, 3).loss.dtype == torch.float64  # auto ran the torch backend
    with pytest.raises(TypeError, match="backend='torch'"):
        cmi_loss(features, labels, 3, backend="triton")


@pytest.mark.parametrize(
    "triton_version, numpy_version, rejects",
    [
        ("3.6.0", "2.4.0", True),
        ("3.3.1", "2.5.5", True),
        ("3.6.0+git1f2e3d", "2.4.0rc1", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.4.6", False),
        ("3.9.0", "2.4.6", False),
    ],
)
def test_interpreters_that_reject_the_numpy(triton_version, numpy_version, rejects):
    """triton 3.3-3.6's interpreters fail with numpy 2.4 (measured: 3.3.1, 3.4.0, 3.5.1 and 3.6.0 fail, 3.7.0, 3.8.0
    and 3.9.0 run, all with numpy 2.4.6)."""
    from kernels.cmi import interpreter_rejects_numpy

    assert interpreter_rejects_numpy(triton_version, numpy_version) == rejects


def test_triton_backend_on_cpu_tensors_names_what_it_needs(monkeypatch):
    """CPU tensors on the triton backend need the interpreter, and an interpreter that runs with the installed numpy:
    each gap is an error naming the way out instead of a failure inside triton."""
    import numpy
    import triton

    features, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    with pytest.raises(RuntimeError, match=r"triton 3\.6\.0 fails with numpy 2\.4\.0 .*numpy<2\.4 or triton>=3\.7"):
        cmi_loss(features, labels, 3, backend="triton")
    # Compiled kernels (TRITON_INTERPRET unset when triton.jit made them): the variable's value now says which advice.
    import kernels.cmi

    monkeypatch.setattr(kernels.cmi, "KERNELS_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors .*on the CPU set TRITON_INTERPRET=1 before importing"):
        cmi_loss(features, labels, 3, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 was set after the kernels were imported"):
        cmi_loss(features, labels, 3, backend="triton")


def test_interpreter_asked_for_after_import_is_named():
    """The kernels are interpreted or compiled from their import on: TRITON_INTERPRET=1 set later is named as the
    cause (instead of triton's "0 active drivers" from the launch), in a process that imported without it."""
    script = (
        "import os, torch\n"
        "from cmi_fused import cmi_loss\n"
        "import kernels.cmi\n"
        "assert not kernels.cmi.KERNELS_INTERPRETED\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    cmi_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 3, backend='triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TRITON_INTERPRET=1 was set after the kernels were imported" in done.stdout, done.stdout


@pytest.mark.skipif(not ON_CUDA, reason="counts CUDA synchronisations")
def test_label_check_synchronises_once():
    """``check_labels=True`` on CUDA costs one device synchronisation (README): both bounds in one copy."""
    labels = torch.randint(0, 3, (4096,), device=DEVICE)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            validate_labels(labels, 3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in caught]


def test_out_of_range_labels_checked_by_default_on_cpu():
    features = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        cmi_loss(features, torch.tensor([0, 1, 2, 3]), 3, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch", "batch, log table"])
def test_class_statistics_may_change_in_place_unless_the_gradient_reads_them(backend, centroid_mode, request):
    """class_sums / class_counts changed in place before the backward (say, turned into means, or all-reduced):
    the gradient is unchanged where it does not depend on them; with per-batch centroids read back from the
    triton statistics buffer autograd refuses the backward rather than use the changed values (README)."""
    gen = generator_for(request)
    n, d, c = 9, 21, 3
    features = make_features(n, d, torch.float32, "contiguous", gen).requires_grad_(True)
    labels = random_labels(n, c, gen, per_batch=True).to(DEVICE)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None
    if centroid_mode == "batch, log table":
        request.getfixturevalue("log_table_forced")
    result = cmi_loss(features, labels, c, centroids, backend=backend)
    result.class_sums.div_(result.class_counts.clamp_min(1.0)[:, None])
    result.class_counts.zero_()
    if backend == "triton" and centroid_mode == "batch":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            result.loss.backward()
        return
    result.loss.backward()
    ref_loss, _, _, ref_h = reference_cmi(features, labels, c, centroids)
    ref_loss.backward()
    assert_rel_close(features.grad, ref_h.grad, 1e-5, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_centroids_changed_in_place_before_the_backward(backend: str, request):
    """The triton backend saves the given centroids (below the log-table sizes): an in-place update between the
    forward and the backward raises autograd's in-place error. The torch backend's backward reads only what its
    forward computed from them, so its gradient stays the one of the forward's centroids (README)."""
    gen = generator_for(request)
    features = torch.randn(6, 7, generator=gen).to(DEVICE).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    centroids = random_centroids(3, 7, gen).to(DEVICE)
    ref_loss, _, _, ref_h = reference_cmi(features, labels, 3, centroids)
    ref_loss.backward()
    result = cmi_loss(features, labels, 3, centroids, backend=backend)
    centroids.mul_(2)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            result.loss.backward()
        return
    result.loss.backward()
    assert_rel_close(features.grad, ref_h.grad, 1e-5, "gradient against the forward's centroids")


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_classes_than_rows_floor_zero_centroids_and_never_index_with_a_bad_label(backend: str, request):
    """C > N (vocabulary-sized centroids) takes its own path (the rows' centroids gathered, then floored at eps):
    zero centroid entries are floored, not log 0, and labels -1 and C (check_labels=False) are never an index: their
    rows are NaN and pass no gradient back."""
    gen = generator_for(request)
    n, d, c = 5, 8, 10
    features = make_features(n, d, torch.float32, "contiguous", gen).requires_grad_(True)
    labels = torch.tensor([0, -1, 3, c, 3], device=DEVICE)
    centroids = random_centroids(c, d, gen)
    centroids[:, 2] = 0.0  # below eps in every class
    centroids = centroids.to(DEVICE)
    result = cmi_loss(features, labels, c, centroids, eps=1e-3, reduction="none", backend=backend, check_labels=False)
    ref_rows, ref_sums, ref_counts, ref_h = reference_cmi(features, labels, c, centroids, eps=1e-3, reduction="none")
    good, bad = [0, 2, 4], [1, 3]
    assert torch.isnan(result.loss[bad]).all()
    assert_rel_close(result.loss[good], ref_rows[good], 1e-5, "rows with valid labels")
    assert_rel_close(result.class_sums, ref_sums, 1e-5, "class_sums")
    weights = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0], device=DEVICE)  # the bad rows dropped, as for an ignore label
    result.loss.backward(weights)
    ref_rows.backward(weights.double())
    assert torch.equal(features.grad[bad], torch.zeros(2, d, device=DEVICE))
    assert_rel_close(features.grad[good], ref_h.grad[good], 1e-5, "gradient of the valid rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_label_rows_pass_a_zero_gradient_also_without_class_0(backend: str):
    """Per-batch centroids with class 0 absent from the batch (count 0): the rows of bad labels still pass back a
    zero gradient, not NaN, and the others a finite one."""
    features = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    labels = torch.tensor([1, 2, -1, 1, 2, 3], device=DEVICE)
    result = cmi_loss(features, labels, 3, reduction="none", backend=backend, check_labels=False)
    good = torch.tensor([True, True, False, True, True, False], device=DEVICE)
    assert result.class_counts[0].item() == 0
    result.loss[good].sum().backward()
    assert torch.isfinite(features.grad).all()
    assert torch.equal(features.grad[~good], torch.zeros(2, 5, device=DEVICE))


def test_float64_features_give_a_float64_loss_and_float32_statistics():
    """CMIOutput's class sums and counts are float32 whatever the features (what a caller all-reduces or keeps)."""
    features = torch.randn(6, 5, dtype=torch.float64, device=DEVICE)
    result = cmi_loss(features, torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE), 3, backend="torch")
    assert result.loss.dtype == torch.float64
    assert result.class_sums.dtype == torch.float32 and result.class_counts.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centroid_mode", ["fixed", "batch", "batch, log table"])
@pytest.mark.parametrize("d", [30, 4500])  # one chunk per row, and two (the chunked forward, d > 4096)
# deterministic: atomics into one slot (contiguous labels), and per-program slots (labels a column of an (N, 2) tensor)
@pytest.mark.parametrize("deterministic", [False, True])
def test_unchecked_out_of_range_labels_give_nan_rows(
    backend: str, centroid_mode: str, d: int, deterministic: bool, request
):
    """check_labels=False: rows labelled -1 or C never index memory; their KL is NaN, every other row and the
    class sums/counts equal those of the valid rows alone. Those rows pass no gradient back, whatever their
    grad_output (zero, not NaN: dropping them from the loss, as for an ignore label, leaves a clean step)."""
    gen = generator_for(request)
    n, c = 40, 3
    features = make_features(n, d, torch.float32, "contiguous", gen).requires_grad_(True)
    labels = random_labels(n, c, gen, per_batch=True)
    bad_rows = [3, 7, 11]
    labels[3], labels[7], labels[11] = -1, c, c + 1000
    labels = labels.to(DEVICE)
    if deterministic:
        labels = strided_labels(labels)
    centroids = random_centroids(c, d, gen).to(DEVICE) if centroid_mode == "fixed" else None
    if centroid_mode == "batch, log table":
        request.getfixturevalue("log_table_forced")

    with recorded_forward_launches() if backend == "triton" else contextlib.nullcontext() as launches:
        result = cmi_loss(
            features,
            labels,
            c,
            centroids,
            reduction="none",
            backend=backend,
            check_labels=False,
            deterministic=deterministic,
        )
    if backend == "triton":  # each accumulator was used: slots on several programs, or atomics
        assert launches and all(atomics != deterministic for _, atomics, _ in launches), launches
        assert all(grid[0] > 1 for grid, _, _ in launches), launches
    ref_rows, ref_sums, ref_counts, ref_h = reference_cmi(features, labels, c, centroids, reduction="none")
    good = [row for row in range(n) if row not in bad_rows]
    assert torch.isnan(result.loss[bad_rows]).all()
    assert_rel_close(result.loss[good], ref_rows[good], 1e-5, "rows with valid labels")
    assert_rel_close(result.class_sums, ref_sums, 1e-5, "class_sums")
    assert torch.equal(result.class_counts.double(), ref_counts)
    assert result.class_counts.sum().item() == n - len(bad_rows)

    grad_rows = torch.randn(n, generator=gen)
    grad_rows[3], grad_rows[7] = float("nan"), float("inf")  # "whatever their grad_output"
    grad_rows = grad_rows.to(DEVICE)
    result.loss.backward(grad_rows)
    ref_rows[good].mul(grad_rows[good].double()).sum().backward()
    assert torch.equal(features.grad[bad_rows], torch.zeros(len(bad_rows), d, device=DEVICE))
    assert_rel_close(features.grad[good], ref_h.grad[good], 1e-5, "gradient of the rows with valid labels")


def test_documented_defaults_and_given_options_reach_the_checks(monkeypatch):
    """cmi_loss hands check_inputs the defaults its docstring gives (check_labels=None: no label check, so no
    device sync, on CUDA unless asked) and every option given, unchanged. Added after a mutation pass over loss.py."""
    import importlib

    loss_module = importlib.import_module("cmi_fused.loss")
    check_inputs = mock.Mock(wraps=loss_module.check_inputs)
    monkeypatch.setattr(loss_module, "check_inputs", check_inputs)
    features, labels = torch.randn(6, 5, device=DEVICE), torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    cmi_loss(features, labels, 3, backend="torch")
    assert check_inputs.call_args.kwargs == dict(
        temperature=1.0, reduction="mean", eps=1e-12, backend="torch", deterministic=None, check_labels=None
    )
    given = dict(temperature=2.0, reduction="none", eps=1e-6, backend="torch", deterministic=False, check_labels=True)
    cmi_loss(features, labels, 3, **given)
    assert check_inputs.call_args.kwargs == given
