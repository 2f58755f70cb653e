"""torch.compile(fullgraph=True) and autocast around cmi_loss give the eager loss and gradients."""

import pytest
import torch

from cmi_fused import cmi_loss

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _step(layer, inputs, labels, centroids, backend):
    features = layer(inputs)
    result = cmi_loss(features, labels, 3, centroids, temperature=0.5, backend=backend)
    return result.loss, result.class_sums, result.class_counts


@pytest.mark.parametrize("backend", ["triton", "torch", "triton_table"])
@pytest.mark.parametrize("fixed_centroids", [True, False])
def test_fullgraph_compile_matches_eager(backend, fixed_centroids, request):
    """Compiled == eager. With "triton_table" the log-centroid table (an extra op output) is forced on: the fake
    kernel must agree with the real one."""
    if backend == "triton_table":
        request.getfixturevalue("log_table_forced")
        backend = "triton"
    # Every case compiles the same code object, and the table's switch is read only inside the fake kernel, which
    # dynamo does not guard on: without a reset, "triton_table" reran the graph planned without the table.
    torch._dynamo.reset()
    torch.manual_seed(11 + fixed_centroids)
    layer = torch.nn.Linear(16, 12).to(DEVICE)
    inputs = torch.randn(10, 16, device=DEVICE)
    labels = torch.randint(0, 3, (10,), device=DEVICE)
    centroids = torch.softmax(torch.randn(3, 12, device=DEVICE), -1) if fixed_centroids else None

    eager = _step(layer, inputs, labels, centroids, backend)
    eager[0].backward()
    eager_grad = layer.weight.grad.clone()
    layer.zero_grad()

    compiled = torch.compile(_step, fullgraph=True, dynamic=False)(layer, inputs, labels, centroids, backend)
    compiled[0].backward()
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("log_table", [False, True])
@pytest.mark.parametrize("fixed_centroids", [True, False])
def test_fake_kernels_agree_with_the_real_ones(log_table, fixed_centroids, request):
    """torch.library.opcheck's fake-tensor check: the compiled graph plans with the fake kernels' shapes (the
    log table's rows decide the backward's path), so they must be the real kernels' shapes, table or none."""
    from kernels.cmi import cmi_backward_op, cmi_forward_op

    if log_table:
        request.getfixturevalue("log_table_forced")
    torch.manual_seed(7)
    features = torch.randn(10, 12, device=DEVICE)
    labels = torch.randint(0, 3, (10,), device=DEVICE)
    centroids = torch.softmax(torch.randn(3, 12, device=DEVICE), -1) if fixed_centroids else None
    forward_args = (features, labels, centroids, 3, 0.5, 1e-12, "auto")
    torch.library.opcheck(cmi_forward_op, forward_args, test_utils=("test_faketensor",))
    row_kl, lse, stats, table = cmi_forward_op(*forward_args)
    log_centroids = table.shape[0] > 0
    assert log_centroids == log_table
    source = table if log_centroids else centroids
    backward_args = (torch.ones((), device=DEVICE), features, labels, source, None if log_centroids or fixed_centroids
                     else stats, lse, row_kl, 3, 0.5, 1e-12, 0.1, log_centroids)  # fmt: skip
    torch.library.opcheck(cmi_backward_op, backward_args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_fullgraph_compile_with_a_changing_temperature_and_eps(backend, dynamic):
    """A temperature schedule: T and eps reach the compiled step as symbolic floats (on the second value, or at
    once with dynamic=True), which the argument checks must trace without breaking the graph."""

    def step(features, labels, temperature, eps):
        return cmi_loss(features, labels, 3, temperature=temperature, eps=eps, backend=backend).loss

    torch._dynamo.reset()  # every case compiles the same code object: start below dynamo's recompile limit
    torch.manual_seed(3)
    features = torch.randn(10, 12, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 3, (10,), device=DEVICE)
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for temperature, eps in ((1.0, 1e-12), (0.5, 1e-10), (0.25, 1e-8)):
        loss = compiled(features, labels, temperature, eps)
        eager = step(features, labels, temperature, eps)
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
        grads = [torch.autograd.grad(value, features)[0] for value in (loss, eager)]
        torch.testing.assert_close(*grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_step_skips_the_default_label_check(backend):
    """check_labels=None checks CPU labels in eager mode, and is skipped while tracing (reading values would break
    the graph): compiled, a label outside [0, C) gives its row a NaN KL instead of a ValueError (README)."""

    def rows(features, labels):
        return cmi_loss(features, labels, 3, reduction="none", backend=backend).loss

    features = torch.randn(4, 6, device=DEVICE)
    bad_labels = torch.tensor([0, 1, 3, 2], device=DEVICE)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="labels"):
            rows(features, bad_labels)
    torch._dynamo.reset()
    compiled = torch.compile(rows, fullgraph=True, dynamic=False, backend="aot_eager")(features, bad_labels)
    assert compiled.isnan().tolist() == [False, False, True, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_accumulates_in_fp32(dtype):
    torch.manual_seed(5)
    layer = torch.nn.Linear(16, 40).to(DEVICE)
    inputs = torch.randn(12, 16, device=DEVICE)
    labels = torch.randint(0, 3, (12,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        features = layer(inputs)
        fused = cmi_loss(features, labels, 3, backend="triton")
    assert features.dtype == dtype
    assert fused.loss.dtype == torch.float32 and fused.class_sums.dtype == torch.float32
    reference = cmi_loss(features.detach().double(), labels, 3, backend="torch")
    torch.testing.assert_close(fused.loss.double(), reference.loss, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(fused.loss, features)
    assert grad.dtype == dtype
