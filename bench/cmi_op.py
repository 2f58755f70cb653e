"""Op timings of ``cmi_loss``: forward, backward and forward+backward for every provider, mode and timing.

Providers (what the user would otherwise run):
    ``fused``          ``cmi_loss(..., backend="triton")``
    ``eager``          ``cmi_loss(..., backend="torch")``
    ``compile``        ``torch.compile`` (default mode, static shapes) of a function calling the torch backend
    ``fused_compiled`` ``torch.compile(fullgraph=True)`` of a function calling the triton backend
    ``noop``           ``(h.float().sum() * 0.1).backward()``: the host-overhead floor of an autograd step
Modes: ``fixed`` (given centroids: random positive rows that sum to 1) and ``batch`` (``centroids=None``).
Timings (CUDA):
    ``device`` the steps captured in one CUDA graph (after warm-up on a side stream) and replayed; median
               over replays of the CUDA-event time divided by the steps per graph. The backward pass runs
               ``torch.autograd.grad(loss, h, retain_graph=True)`` on a forward done before the capture (not
               for the compiled providers: torch.compile's donated buffers refuse retain_graph=True, and
               turning them off would measure another compile than users run; those rows are ``skipped``).
    ``wall``   the eager step as users run it (``loss.backward()``, ``h.grad`` set to None), timed from an
               idle GPU with CUDA events (host launch time included), median over reps, warm-up excluded.
On CPU only ``wall`` exists, timed with ``time.perf_counter``.

Inputs are fresh random tensors (``randn`` features, uniform labels). Small shapes rotate among several
input sets, so that the sets together are about twice the L2 cache (at most ``Budget.max_input_sets``).

Peak memory (CUDA): ``max_memory_allocated`` during one eager step minus the allocation before it,
measured once per (provider, mode, pass) and reported in both its device and wall rows. ``gpu_launches``
(fwd_bwd rows, CUDA): the kernels, memsets and copies the profiler saw in one eager step, counted by
:func:`add_launch_counts` after every timing of the run (a profiler session can leave CUPTI attached and slow the
launches timed after it, pytorch#144455).

Accuracy (every provider but ``noop``, once per shape and mode, on input set 0): the loss and the gradient of one
forward + backward against a float64 evaluation of the same inputs (the torch backend on the upcast features),
``rel_err_loss`` and ``rel_err_grad`` in the provider's ``fwd_bwd`` rows, so that no timing stands for a wrong
result. Each error is taken against the larger of the reference's norm and 0.1 x the norm of the terms it sums,
``f_ij (|log f_ij| + |log g_ij|)`` for KL_i and ``f_ij (|log f_ij| + |log g_ij| + |KL_i|) / N`` for the gradient:
cancelling terms (per-batch centroids of one-row classes give KL_i = 0 and a zero gradient row) can be exact only
to the rounding of the terms, as in tests/test_cmi_loss.py. The gradient is taken of ``scale x loss``
with ``scale`` the power of two nearest N (as a loss scaler does), so fp16 gradients of a mean stay normal.

Bytes model (achieved GB/s): a pass reads or writes the (N, d) activations ``passes`` times
(fwd 1: read h; bwd 2: read h, write dh; fwd_bwd 3), plus, with fixed centroids, the gathered fp32 centroid
rows ``min(N, C) * d * 4`` once per kernel that reads them (fwd 1, bwd 1, fwd_bwd 2: the backward gathers them
again). The (C, d) ``class_sums`` output is not counted.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import math
import statistics
import time
from collections.abc import Callable

import torch

from cmi_fused import cmi_loss
from cmi_fused.options import CMIOptions

from .report import ROW_KEY, row_key
from .timing import elapsed_ms, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("fused", "eager", "compile", "fused_compiled", "noop")
# fused_compiled only on request: its compiles cost device time and the op is the same custom op as fused.
DEFAULT_PROVIDERS = ("fused", "eager", "compile", "noop")
TRITON_PROVIDERS = ("fused", "fused_compiled")  # the providers that launch this package's kernels
COMPILED_PROVIDERS = ("compile", "fused_compiled")
MODES = ("fixed", "batch")
PASSES = ("fwd", "bwd", "fwd_bwd")
TIMINGS = ("device", "wall")
PASS_ACTIVATION_TRAFFIC = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}
PASS_CENTROID_GATHERS = {"fwd": 1, "bwd": 1, "fwd_bwd": 2}
DEFAULT_L2_BYTES = 50 * 2**20
# Untimed copies before the copy rate's timed ones: on a GPU about 70 ms of 1 GiB copies, so that a device that a
# fresh process finds at idle clocks has left them; on the CPU a few.
COPY_WARMUP_STEPS = {"cuda": 100, "cpu": 3}
# The error floors of the loss and the gradient, as a fraction of the size of the terms they sum (module docstring).
TERM_FLOOR = 0.1


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark case: ``n_rows x dim`` features of ``dtype``, ``num_classes`` classes."""

    n_rows: int
    dim: int
    num_classes: int
    dtype: str = "bf16"

    @classmethod
    def of_row(cls, row: dict) -> Shape:
        """The shape of a results row (its ``N``, ``d``, ``C``, ``dtype``)."""
        return cls(row["N"], row["d"], row["C"], row["dtype"])

    @property
    def label(self) -> str:
        return f"{self.n_rows}x{self.dim} C={self.num_classes} {self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# The shape set: GLUE batch, small and large batches, vocabulary-sized C, wide features.
DEFAULT_SHAPES = (
    Shape(32, 768, 2, "fp32"),
    Shape(32, 768, 2, "bf16"),
    Shape(256, 1024, 3, "bf16"),
    Shape(4096, 768, 2, "bf16"),
    Shape(16384, 768, 30522, "bf16"),
    Shape(8192, 4096, 1000, "bf16"),
    Shape(65536, 768, 10, "bf16"),
    Shape(32768, 4096, 3, "bf16"),
)
# CPU-only CI subset: odd sizes (not multiples of a block) and C larger than N.
QUICK_SHAPES = (Shape(8, 40, 3, "fp32"), Shape(6, 33, 10, "bf16"))


def parse_shape(text: str) -> Shape:
    """Parse ``NxD:C[:dtype]`` (dtype bf16 by default), e.g. ``4096x768:2:bf16``."""
    try:
        size, num_classes, *rest = text.split(":")
        n_rows, dim = size.lower().split("x")
        dtype = rest[0] if rest else "bf16"
        if len(rest) > 1 or dtype not in DTYPES:
            raise ValueError
        shape = Shape(int(n_rows), int(dim), int(num_classes), dtype)
    except ValueError:
        raise ValueError(f"--shapes entries must look like NxD:C[:{'|'.join(DTYPES)}], got {text!r}") from None
    if min(shape.n_rows, shape.dim, shape.num_classes) < 1:
        raise ValueError(f"--shapes entries need N, D and C >= 1, got {text!r}")
    return shape


def bytes_moved(shape: Shape, mode: str, pass_name: str) -> int:
    """Bytes a pass must move at least (see the module docstring)."""
    elem = torch.empty((), dtype=shape.torch_dtype).element_size()
    activations = PASS_ACTIVATION_TRAFFIC[pass_name] * shape.n_rows * shape.dim * elem
    centroid_rows = min(shape.n_rows, shape.num_classes) * shape.dim * 4 if mode == "fixed" else 0
    return activations + PASS_CENTROID_GATHERS[pass_name] * centroid_rows


def fused_unavailable_reason() -> str | None:
    """``None`` when the triton backend imports, else the error that stops it."""
    try:
        importlib.import_module("cmi_fused.fused")  # imports the triton kernels
    except Exception as error:  # any import failure (no triton, a kernel that does not build) disables it
        return f"{type(error).__name__}: {error}"
    return None


def make_loss_fn(provider: str, num_classes: int) -> Callable:
    """``fn(h, labels, centroids) -> scalar loss`` for one provider."""
    if provider == "noop":
        return lambda features, labels, centroids: features.float().sum() * 0.1

    backend = "torch" if provider in ("eager", "compile") else "triton"

    def loss_fn(features, labels, centroids):
        return cmi_loss(features, labels, num_classes, centroids, backend=backend, check_labels=False).loss

    if provider == "compile":
        return torch.compile(loss_fn, dynamic=False)
    if provider == "fused_compiled":
        return torch.compile(loss_fn, dynamic=False, fullgraph=True)
    return loss_fn


@dataclasses.dataclass
class InputSet:
    features: torch.Tensor  # (N, d) leaf with requires_grad
    labels: torch.Tensor  # (N,) int64
    centroids: torch.Tensor | None  # (C, d) float32 rows summing to 1, or None (batch mode)


def num_input_sets(shape: Shape, mode: str, l2_bytes: int, max_sets: int) -> int:
    """Enough sets to cover about twice the L2 cache, at most ``max_sets``."""
    elem = torch.empty((), dtype=shape.torch_dtype).element_size()
    set_bytes = shape.n_rows * shape.dim * elem + (shape.num_classes * shape.dim * 4 if mode == "fixed" else 0)
    return max(1, min(max_sets, math.ceil(2 * l2_bytes / set_bytes)))


def make_inputs(shape: Shape, mode: str, count: int, device: torch.device, generator: torch.Generator):
    sets = []
    for _ in range(count):
        features = torch.randn(shape.n_rows, shape.dim, generator=generator, device=device) * 2.0
        labels = torch.randint(0, shape.num_classes, (shape.n_rows,), generator=generator, device=device)
        centroids = None
        if mode == "fixed":
            centroids = torch.rand(shape.num_classes, shape.dim, generator=generator, device=device) + 0.05
            centroids /= centroids.sum(dim=1, keepdim=True)
        features = features.to(shape.torch_dtype).requires_grad_(True)
        sets.append(InputSet(features, labels, centroids))
    return sets


@dataclasses.dataclass
class Reference:
    """Float64 loss and gradient of ``grad_scale x loss`` for one input set, and the norms of the terms each is
    summed from (the floors of their errors)."""

    loss: float
    loss_terms: float
    grad: torch.Tensor
    grad_terms: float
    grad_scale: float


def grad_scale_for(n_rows: int) -> float:
    """The power of two nearest ``n_rows``: undoes a mean's 1/N, exactly, in every float dtype."""
    return float(2 ** round(math.log2(n_rows)))


def float64_reference(item: InputSet, num_classes: int) -> Reference:
    """The torch backend's loss and gradient on the float64 features (T = 1, mean), and the sizes of their terms:
    ``KL_i = sum_j f_ij (log f_ij - log g_ij)`` and ``dKL_i/dh_ij = f_ij (log f_ij - log g_ij - KL_i)``."""
    h64 = item.features.detach().double().requires_grad_(True)
    result = cmi_loss(h64, item.labels, num_classes, item.centroids, backend="torch", check_labels=False)
    scale = grad_scale_for(h64.shape[0])
    (grad,) = torch.autograd.grad(result.loss * scale, h64)
    with torch.no_grad():
        log_f = torch.log_softmax(h64, dim=1)
        f = log_f.exp()
        if item.centroids is None:
            centroids = result.class_sums.double() / result.class_counts.double().clamp_min(1.0)[:, None]
        else:
            centroids = item.centroids.double()
        log_g = torch.log(centroids.clamp_min(CMIOptions.eps))[item.labels]  # the op's default eps, as timed
        row_kl = (f * (log_f - log_g)).sum(dim=1, keepdim=True)
        loss_terms = (f * (log_f.abs() + log_g.abs())).sum(dim=1).mean()
        grad_terms = torch.linalg.vector_norm(f * (log_f.abs() + log_g.abs() + row_kl.abs())) * scale / h64.shape[0]
    return Reference(result.loss.item(), loss_terms.item(), grad, grad_terms.item(), scale)


def relative(error: float, floor: float) -> float:
    """``error / floor``; with a zero floor (d = 1: f = g = 1, every term 0) only an exact result is within."""
    if floor > 0:
        return error / floor
    return 0.0 if error == 0 else math.inf


def accuracy(loss_fn: Callable, item: InputSet, reference: Reference) -> dict:
    """``{"rel_err_loss", "rel_err_grad"}`` of one forward + backward against ``reference`` (``None`` and an
    ``accuracy_error`` where a value is not finite); ``{"accuracy_error": ...}`` when the step fails."""
    try:
        loss = loss_fn(item.features, item.labels, item.centroids)
        (grad,) = torch.autograd.grad(loss * reference.grad_scale, item.features)
    except Exception as error:
        return {"accuracy_error": f"{type(error).__name__}: {error}"}
    loss_floor = max(abs(reference.loss), TERM_FLOOR * reference.loss_terms)
    grad_floor = max(torch.linalg.vector_norm(reference.grad).item(), TERM_FLOOR * reference.grad_terms)
    errors = {
        "rel_err_loss": relative(abs(loss.item() - reference.loss), loss_floor),
        "rel_err_grad": relative(torch.linalg.vector_norm(grad.double() - reference.grad).item(), grad_floor),
    }
    not_finite = [name for name, value in errors.items() if not math.isfinite(value)]
    if not_finite:
        errors = {name: (None if name in not_finite else value) for name, value in errors.items()}
        errors["accuracy_error"] = f"not finite: {', '.join(not_finite)}"
    return errors


def build_step(loss_fn: Callable, inputs: list[InputSet], pass_name: str, *, for_graph: bool):
    """``(prepare, run)`` closures over input set ``k``: ``prepare(k)`` is the untimed part (clears
    ``h.grad``; the forward of a ``bwd`` pass), ``run(k)`` the timed part (it returns the output of a ``fwd``
    pass, the gradient of a ``for_graph`` backward, else ``None``).

    ``for_graph``: backward as ``torch.autograd.grad`` so that a captured step never accumulates into ``h.grad``,
    retaining the graph in the ``bwd`` pass, whose captured backward is replayed on one forward; otherwise
    ``loss.backward()`` as users write it.
    """
    losses: list[torch.Tensor | None] = [None] * len(inputs)

    def forward(k):
        item = inputs[k]
        return loss_fn(item.features, item.labels, item.centroids)

    def backward(k, loss):
        if for_graph:
            (grad,) = torch.autograd.grad(loss, inputs[k].features, retain_graph=pass_name == "bwd")
            # The noop step's fp32 gradient is an expanded scalar (strides 0, 0): write it out, as .backward() does
            # into h.grad, so that the device row times the same work as the wall row. A no-op for the other steps.
            return grad.contiguous()
        loss.backward()
        return None

    def clear_grad(k):
        inputs[k].features.grad = None

    if pass_name == "fwd":
        return clear_grad, forward

    if pass_name == "fwd_bwd":

        def run_fwd_bwd(k):
            return backward(k, forward(k))

        return clear_grad, run_fwd_bwd

    def prepare_bwd(k):
        clear_grad(k)
        losses[k] = forward(k)

    def run_bwd(k):
        return backward(k, losses[k])

    return prepare_bwd, run_bwd


class Timer:
    """Per-step timing: CUDA events on CUDA (from an idle GPU), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        sync(self.device)

    def wall_ms(self, prepare, run, num_sets: int, reps: int) -> list[float]:
        times = []
        for rep in range(reps):
            k = rep % num_sets
            prepare(k)
            self.sync()
            times.append(elapsed_ms(lambda k=k: run(k), self.device))
        return times


def reps_for(estimate_ms: float, budget_ms: float, low: int, high: int) -> int:
    return int(min(high, max(low, math.ceil(budget_ms / max(estimate_ms, 1e-3)))))


@dataclasses.dataclass(frozen=True)
class Budget:
    """Measurement effort: ms of timed work per row, rep bounds, input sets and warm-up steps."""

    wall_ms: float = 200.0
    device_ms: float = 200.0
    graph_ms: float = 2.0
    max_graph_steps: int = 256
    min_reps: int = 20
    max_reps: int = 200
    max_input_sets: int = 16
    warmup_steps: int = 3

    @classmethod
    def quick(cls) -> Budget:
        """CI smoke run: the fused provider runs in the Triton interpreter (tens of ms per call)."""
        return cls(
            wall_ms=1.0,
            device_ms=1.0,
            graph_ms=0.5,
            max_graph_steps=16,
            min_reps=3,
            max_reps=5,
            max_input_sets=2,
            warmup_steps=1,
        )


def graph_replay_ms(prepare, run, num_sets: int, estimate_ms: float, budget: Budget) -> tuple[list[float], int]:
    """Capture ``steps`` steps (rotating over the sets) in one CUDA graph; per-step ms of each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # forward of a bwd pass must run on the capture stream
        for k in range(num_sets):
            prepare(k)
        for _ in range(budget.warmup_steps):
            for k in range(num_sets):
                run(k)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    steps = num_sets * math.ceil(max(1.0, budget.graph_ms / max(estimate_ms, 1e-3)) / num_sets)
    steps = min(steps, num_sets * math.ceil(budget.max_graph_steps / num_sets))
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, stream=side):
            for step in range(steps):
                run(step % num_sets)
    except Exception:
        # An error inside the capture makes the graph's own exit raise too ("previous error during capture"), before
        # it restores the stream: later cases would run on the side stream. (error_text keeps the first error.)
        torch.cuda.set_stream(current)
        raise
    for _ in range(budget.warmup_steps):
        graph.replay()
    torch.cuda.synchronize()
    replays = reps_for(estimate_ms * steps, budget.device_ms, budget.min_reps, budget.max_reps)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    per_step = [start.elapsed_time(end) / steps for start, end in events]
    del graph
    return per_step, steps


def peak_extra_mb(prepare, run) -> float:
    """``max_memory_allocated`` during one eager step minus the allocation before it (inputs, and the
    forward of a ``bwd`` pass, already resident)."""
    prepare(0)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def count_gpu_activities(prepare, run) -> int | None:
    """GPU kernels, memsets and copies of one eager step, from the profiler; ``None`` if it cannot trace."""
    from torch.profiler import ProfilerActivity, profile

    prepare(0)
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            run(0)
            torch.cuda.synchronize()
        # GPU-timeline events, less the user annotations (inductor marks each compiled graph call with one).
        count = sum(
            1
            for event in trace.events()
            if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
        )
    except Exception:  # no CUPTI on this host, or a trace it cannot parse: the rows simply carry no count
        return None
    return count or None  # a CUDA step launches something: 0 means the profiler could not see the GPU


def add_launch_counts(rows: list[dict], device: torch.device, seed: int = 0, time_left: Callable = lambda: 1.0):
    """``gpu_launches`` of every fwd_bwd case in ``rows`` that has a timing and no count yet, set on its rows.

    Called once every timing is done (the profiler must not run before a timed row); each case is built again from
    the same seed, warmed up (compiles, autotuning) and traced for one step. Stops when ``time_left()`` is <= 0;
    a case that cannot be traced gets ``None``.
    """
    cases = {}
    for row in rows:
        if row["pass"] == "fwd_bwd" and "gpu_launches" not in row:
            key = (Shape.of_row(row), row["mode"], row["provider"])
            cases.setdefault(key, []).append(row)
    timed = {key: case_rows for key, case_rows in cases.items() if any(r.get("ms") is not None for r in case_rows)}
    for (shape, mode, provider), case_rows in timed.items():
        if time_left() <= 0:
            break
        if provider in COMPILED_PROVIDERS:
            torch._dynamo.reset()
        generator = torch.Generator(device=device).manual_seed(seed)
        inputs = make_inputs(shape, mode, 1, device, generator)
        try:
            prepare, run = build_step(make_loss_fn(provider, shape.num_classes), inputs, "fwd_bwd", for_graph=False)
            for _ in range(2):  # compile and autotune outside the trace
                prepare(0)
                run(0)
            launches = count_gpu_activities(prepare, run)
        except Exception:  # a count is extra information: never lose the run for it
            launches = None
        for row in case_rows:
            row["gpu_launches"] = launches
        del inputs


def measure_copy_tbps(device: torch.device) -> float:
    """Device-to-device (or host memory) copy rate in TB/s, counting bytes read + written."""
    numel = 2**28 if device.type == "cuda" else 2**24  # 1 GiB / 64 MiB of float32
    source = torch.rand(numel, device=device)
    target = torch.empty_like(source)
    timer = Timer(device)
    for _ in range(COPY_WARMUP_STEPS[device.type]):
        target.copy_(source)
    times = timer.wall_ms(lambda k: None, lambda k: target.copy_(source), 1, 20 if device.type == "cuda" else 5)
    return 2 * source.numel() * source.element_size() / (statistics.median(times) * 1e-3) / 1e12


def estimate_step_ms(prepare, run, num_sets: int, timer: Timer, warmup_steps: int) -> float:
    """Warm-up (compiles, autotunes, fills caches) and a host-clock estimate of one step."""
    for k in range(num_sets):
        prepare(k)
        run(k)
    timer.sync()
    start_s = time.perf_counter()
    for step in range(warmup_steps):
        prepare(step % num_sets)
        run(step % num_sets)
    timer.sync()
    return (time.perf_counter() - start_s) * 1e3 / warmup_steps


def timed_steps(loss_fn, inputs, pass_name: str, timing: str, estimate_ms: float, timer: Timer, budget: Budget):
    """``(per-step ms, steps per graph)`` of one timing: ``device`` replays a CUDA graph of the step (steps per
    graph given), ``wall`` times eager steps (``None``)."""
    if timing == "device":
        graph_prepare, graph_run = build_step(loss_fn, inputs, pass_name, for_graph=True)
        return graph_replay_ms(graph_prepare, graph_run, len(inputs), estimate_ms, budget)
    prepare, run = build_step(loss_fn, inputs, pass_name, for_graph=False)
    reps = reps_for(estimate_ms, budget.wall_ms, budget.min_reps, budget.max_reps)
    return timer.wall_ms(prepare, run, len(inputs), reps), None


def l2_cache_bytes(device: torch.device) -> int:
    """The GPU's L2 size (what the small shapes' input sets must exceed), or ``DEFAULT_L2_BYTES`` on the CPU."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", DEFAULT_L2_BYTES)
    return DEFAULT_L2_BYTES


def case_fields(shape: Shape, mode: str, provider: str, pass_name: str) -> dict:
    """The fields of one case's rows (a row adds its ``timing``): ``report.ROW_KEY``."""
    return {
        "N": shape.n_rows,
        "d": shape.dim,
        "C": shape.num_classes,
        "dtype": shape.dtype,
        "mode": mode,
        "provider": provider,
        "pass": pass_name,
    }


def bench_case(
    shape: Shape,
    mode: str,
    provider: str,
    pass_name: str,
    timings: tuple[str, ...],
    inputs: list[InputSet],
    loss_fn: Callable,
    device: torch.device,
    budget: Budget,
    copy_tbps: float | None,
) -> list[dict]:
    """All timing rows of one (shape, mode, provider, pass); a failure becomes an ``error`` row."""
    base = dict(case_fields(shape, mode, provider, pass_name), input_sets=len(inputs))
    timer = Timer(device)
    rows = []
    try:
        prepare, run = build_step(loss_fn, inputs, pass_name, for_graph=False)
        estimate_ms = estimate_step_ms(prepare, run, len(inputs), timer, budget.warmup_steps)
        peak_mb = peak_extra_mb(prepare, run) if device.type == "cuda" else None
    except Exception as error:  # the provider cannot run this case at all
        return [dict(base, timing=t, ms=None, peak_mb=None, error=error_text(error)) for t in timings]

    for timing in timings:
        row = dict(base, timing=timing, ms=None, peak_mb=peak_mb)
        if timing == "device" and pass_name == "bwd" and provider in COMPILED_PROVIDERS:
            row["skipped"] = "a replayed backward needs retain_graph=True, which torch.compile's donated buffers refuse"
            rows.append(row)
            continue
        try:
            times, steps = timed_steps(loss_fn, inputs, pass_name, timing, estimate_ms, timer, budget)
            if steps is not None:
                row["steps_per_graph"] = steps
            row["ms"] = statistics.median(times)
            row["reps"] = len(times)
            if provider != "noop":
                gbps = bytes_moved(shape, mode, pass_name) / (row["ms"] * 1e-3) / 1e9
                row["gbps"] = gbps
                if copy_tbps:
                    row["frac_copy"] = gbps / (copy_tbps * 1e3)
        except Exception as error:  # e.g. CUDA-graph capture unsupported by this provider
            row["error"] = error_text(error)
        rows.append(row)
    return rows


def error_text(error: BaseException) -> str:
    """``Type: message`` of an error, and of the one it was raised while handling (a failed CUDA-graph capture
    raises again on leaving the capture, hiding the cause)."""
    text = f"{type(error).__name__}: {error}"
    if error.__context__ is not None and not error.__suppress_context__:
        text += f" (while handling {type(error.__context__).__name__}: {error.__context__})"
    return text


def provider_passes(provider: str, passes) -> tuple:
    """The passes a provider runs: ``noop`` (the host-overhead floor of a whole step) only ``fwd_bwd``."""
    if provider == "noop":
        return ("fwd_bwd",) if "fwd_bwd" in passes else ()
    return tuple(passes)


def device_timings(timings, device: torch.device) -> tuple:
    """``device`` timing needs CUDA graphs: dropped elsewhere."""
    return tuple(t for t in timings if device.type == "cuda" or t != "device")


def grid_row_keys(shape: Shape, providers, modes, passes, timings, device: torch.device) -> set:
    """The ``(N, d, C, dtype, mode, provider, pass, timing)`` of every row ``run_op_bench`` writes for ``shape``."""
    return {
        (*dataclasses.astuple(shape), mode, provider, pass_name, timing)
        for mode in modes
        for provider in providers
        for pass_name in provider_passes(provider, passes)
        for timing in device_timings(timings, device)
    }


def run_op_bench(
    shapes,
    providers,
    modes,
    passes,
    timings,
    device: torch.device,
    budget: Budget,
    copy_tbps: float | None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every row for the requested grid. ``noop`` runs only as ``fwd_bwd``; ``device`` only on CUDA.

    A case that fails gets error rows (``bench_case`` and ``accuracy`` catch it); so does what fails outside them in a
    unit (one shape in one mode: its inputs, the float64 reference, the cleanup, where a CUDA fault of an earlier case
    surfaces): the unit's rows written so far are kept, and each row still missing gets the error.
    """
    timings = device_timings(timings, device)
    unavailable = {}
    if any(p in TRITON_PROVIDERS for p in providers):
        reason = fused_unavailable_reason()
        if reason:
            unavailable = dict.fromkeys(TRITON_PROVIDERS, reason)
    l2_bytes = l2_cache_bytes(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def measure_unit(shape: Shape, mode: str, unit_rows: list) -> None:
        input_sets = num_input_sets(shape, mode, l2_bytes, budget.max_input_sets)
        inputs = make_inputs(shape, mode, input_sets, device, generator)
        checked = [p for p in providers if p != "noop" and p not in unavailable and "fwd_bwd" in passes]
        reference = float64_reference(inputs[0], shape.num_classes) if checked else None
        for provider in providers:
            case_passes = provider_passes(provider, passes)
            if not case_passes:
                continue
            if provider in unavailable:
                unit_rows += [
                    dict(
                        case_fields(shape, mode, provider, pass_name),
                        timing=timing,
                        ms=None,
                        peak_mb=None,
                        error=unavailable[provider],
                    )
                    for pass_name in case_passes
                    for timing in timings
                ]
                continue
            if provider in COMPILED_PROVIDERS:
                torch._dynamo.reset()  # a fresh static-shape compile per case: no recompile limit to hit
            loss_fn = make_loss_fn(provider, shape.num_classes)
            checks = accuracy(loss_fn, inputs[0], reference) if provider in checked else {}
            if checks:
                log(f"{shape.label:>26} {mode:5} {provider:14} accuracy vs float64: {checks}")
            for pass_name in case_passes:
                case_rows = bench_case(
                    shape, mode, provider, pass_name, timings, inputs, loss_fn, device, budget, copy_tbps
                )
                if pass_name == "fwd_bwd":
                    case_rows = [dict(row, **checks) for row in case_rows]
                for row in case_rows:
                    if row["ms"] is not None:
                        shown = f"{row['ms']:.4f} ms"
                    else:
                        shown = f"error: {row['error'][:120]}" if "error" in row else f"skipped: {row['skipped']}"
                    log(f"{shape.label:>26} {mode:5} {provider:14} {pass_name:7} {row['timing']:6} {shown}")
                unit_rows += case_rows
        del inputs, reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = []
    for shape in shapes:
        for mode in modes:
            unit_rows = []
            try:
                measure_unit(shape, mode, unit_rows)
            except Exception as error:
                message = error_text(error)
                log(f"{shape.label:>26} {mode:5} failed outside a case: {message[:200]}")
                written = {row_key(row) for row in unit_rows}
                missing = grid_row_keys(shape, providers, (mode,), passes, timings, device) - written
                unit_rows += [
                    dict(zip(ROW_KEY, key, strict=True), ms=None, peak_mb=None, error=message)
                    for key in sorted(missing, key=str)
                ]
            rows += unit_rows
    return rows


def cuda_fault(device: torch.device) -> str | None:
    """The error a CUDA context that can no longer run anything raises (an illegal address sticks to the process
    that hit it), or ``None``."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as error:
        return error_text(error)
    return None
