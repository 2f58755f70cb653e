"""pytest-benchmark timings of ``cmi_loss`` (fused / eager / compile, fwd and fwd+bwd) and checks of the
benchmark's CUDA paths (CUDA-graph device timing, peak memory). Skipped without CUDA.

Run on a GPU (tests are grouped per shape, mode and pass)::

    python -m pytest tests/test_benchmark_cuda.py --benchmark-columns=median,iqr,rounds
"""

import pytest
import torch

from bench import cmi_op, report

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = [cmi_op.Shape(32, 768, 2, "bf16"), cmi_op.Shape(4096, 768, 2, "bf16"), cmi_op.Shape(16384, 768, 30522, "bf16")]
PROVIDERS = ["fused", "eager", "compile"]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` over all elements (the measure of tests/test_cmi_loss.py)."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def losses_and_grads(loss_fn, inputs):
    item = inputs[0]
    item.features.grad = None
    loss = loss_fn(item.features, item.labels, item.centroids)
    (grad,) = torch.autograd.grad(loss, item.features)
    return loss.detach(), grad


@pytest.mark.parametrize("pass_name", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", cmi_op.MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.label.replace(" ", "-"))
def test_cmi_loss_speed(benchmark, shape, mode, provider, pass_name):
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = cmi_op.make_inputs(shape, mode, 1, device, generator)
    torch._dynamo.reset()
    loss_fn = cmi_op.make_loss_fn(provider, shape.num_classes)

    # Only a correct provider is worth timing: loss and gradient against the eager backend.
    loss, grad = losses_and_grads(loss_fn, inputs)
    ref_loss, ref_grad = losses_and_grads(cmi_op.make_loss_fn("eager", shape.num_classes), inputs)
    assert relative_error(loss, ref_loss) < 1e-4
    assert relative_error(grad, ref_grad) < 1e-2  # the gradient is returned in bf16

    prepare, run = cmi_op.build_step(loss_fn, inputs, pass_name, for_graph=False)

    def step():
        prepare(0)
        run(0)
        torch.cuda.synchronize()

    benchmark.group = f"{shape.label} {mode} {pass_name}"
    benchmark.extra_info.update(bytes=cmi_op.bytes_moved(shape, mode, pass_name))
    benchmark.pedantic(step, warmup_rounds=5, rounds=100, iterations=1)


def test_device_and_wall_rows_without_errors():
    """Every provider of the default run gives device (CUDA-graph) and wall rows (but compile's device bwd, which
    torch.compile's donated buffers refuse to replay), and the fused peak
    memory of fwd+bwd stays within issue 3's budget 1.1 x (N*d*elem + 2*C*d*4)."""
    shape = cmi_op.Shape(4096, 768, 2, "bf16")
    device = torch.device("cuda")
    rows = cmi_op.run_op_bench(
        [shape],
        ("fused", "eager", "compile", "noop"),
        cmi_op.MODES,
        cmi_op.PASSES,
        cmi_op.TIMINGS,
        device,
        cmi_op.Budget.quick(),
        copy_tbps=cmi_op.measure_copy_tbps(device),
        log=lambda message: None,
    )
    assert len(rows) == 2 * (3 * 3 + 1) * 2
    skipped = [(r["provider"], r["mode"], r["pass"], r["timing"]) for r in rows if r.get("skipped")]
    assert sorted(skipped) == [("compile", mode, "bwd", "device") for mode in sorted(cmi_op.MODES)]
    for row in rows:
        assert "error" not in row, row
        # fwd_bwd rows of every provider but noop carry their float64 check, within the test suite's bounds
        checked = row["pass"] == "fwd_bwd" and row["provider"] != "noop"
        assert report.within_tolerance(row) is (True if checked else None), row
        if row.get("skipped"):
            continue
        assert row["ms"] > 0 and row["peak_mb"] >= 0, row
        assert ("steps_per_graph" in row) == (row["timing"] == "device")
    budget = report.memory_budget_mb((shape.n_rows, shape.dim, shape.num_classes, shape.dtype))
    for row in rows:
        if row["provider"] == "fused" and row["pass"] == "fwd_bwd":
            assert row["peak_mb"] <= budget, row
    cmi_op.add_launch_counts(rows, device)
    launches = {(r["provider"], r["mode"]): r["gpu_launches"] for r in rows if r["pass"] == "fwd_bwd"}
    for mode in cmi_op.MODES:
        if launches[("fused", mode)] is not None:  # None: the profiler cannot trace on this host
            assert 0 < launches[("fused", mode)] < launches[("eager", mode)], launches


@pytest.mark.parametrize("mode", cmi_op.MODES)
def test_fused_step_never_synchronises(mode):
    """Issue 3: no host syncs (``.item()``, ``torch.equal``) in the fused forward or backward."""
    shape = cmi_op.Shape(4096, 768, 2, "bf16")
    device = torch.device("cuda")
    inputs = cmi_op.make_inputs(shape, mode, 1, device, torch.Generator(device=device).manual_seed(0))
    prepare, run = cmi_op.build_step(
        cmi_op.make_loss_fn("fused", shape.num_classes), inputs, "fwd_bwd", for_graph=False
    )
    prepare(0)
    run(0)  # compiles the kernels
    torch.cuda.synchronize()
    prepare(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
