"""The Hinton KD loss against a float64 reference written from the formula, its gradients and its errors."""

import math

import pytest
import torch

from cmi_fused import KDLoss, kd_loss


def reference_rows(student, teacher, labels, alpha, temperature):
    """Per-row (loss, ce, kl) in float64, element by element from the definition."""
    rows = []
    for s_row, t_row, y in zip(student.double().tolist(), teacher.double().tolist(), labels.tolist(), strict=True):
        z_t = sum(math.exp(v / temperature) for v in t_row)
        z_s = sum(math.exp(v / temperature) for v in s_row)
        p_t = [math.exp(v / temperature) / z_t for v in t_row]
        p_s = [math.exp(v / temperature) / z_s for v in s_row]
        kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s, strict=True))
        ce = -(s_row[y] - math.log(sum(math.exp(v) for v in s_row)))
        rows.append(((1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl))
    return torch.tensor(rows, dtype=torch.float64)


def make_inputs(n=7, c=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(n, c, generator=generator)).to(dtype)
    teacher = (3 * torch.randn(n, c, generator=generator)).to(dtype)
    labels = torch.randint(0, c, (n,), generator=generator)
    return student, teacher, labels


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(alpha, temperature, dtype):
    student, teacher, labels = make_inputs(dtype=dtype)
    expected = reference_rows(student, teacher, labels, alpha, temperature)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    rows = kd_loss(student, teacher, labels, alpha=alpha, temperature=temperature, reduction="none")
    for got, column in zip(rows, range(3), strict=True):
        torch.testing.assert_close(got.double(), expected[:, column], **tol)
    mean = kd_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(mean.loss.double(), expected[:, 0].mean(), **tol)
    total = kd_loss(student, teacher, labels, alpha=alpha, temperature=temperature, reduction="sum")
    torch.testing.assert_close(total.loss.double(), expected[:, 0].sum(), **tol)


def test_mean_is_batchmean_kl():
    student, teacher, labels = make_inputs(n=5, c=4, seed=1, dtype=torch.float64)
    temperature = 3.0
    out = kd_loss(student, teacher, labels, alpha=1.0, temperature=temperature)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(student / temperature, -1), torch.softmax(teacher / temperature, -1), reduction="batchmean"
    )
    torch.testing.assert_close(out.kl, expected)
    torch.testing.assert_close(out.loss, temperature**2 * expected)


def test_gradient_float64_gradcheck():
    student, teacher, labels = make_inputs(n=4, c=3, seed=2, dtype=torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, teacher, labels, alpha=0.4, temperature=2.0).loss, (student,))


def test_teacher_never_receives_gradient():
    student, teacher, labels = make_inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, labels, alpha=0.7, temperature=2.0).loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_pure_distillation_without_labels_and_module_form():
    """The module is the function with its own alpha, temperature and reduction."""
    student, teacher, labels = make_inputs(seed=3)
    module = KDLoss(alpha=1.0, temperature=2.0)
    without_labels = module(student, teacher)
    with_labels = module(student, teacher, labels)
    torch.testing.assert_close(without_labels.loss, with_labels.loss)
    assert float(without_labels.ce) == 0.0
    assert "alpha=1.0" in repr(module)
    for reduction in ("none", "sum"):
        got = KDLoss(alpha=0.4, temperature=2.0, reduction=reduction)(student, teacher, labels)
        expected = kd_loss(student, teacher, labels, alpha=0.4, temperature=2.0, reduction=reduction)
        for got_term, expected_term in zip(got, expected, strict=True):
            torch.testing.assert_close(got_term, expected_term)


def test_fullgraph_compile_matches_eager():
    """kd_loss compiles without graph breaks: like cmi_loss, the default label check is skipped while tracing
    (``int(labels.max())`` would break the graph; a bad label then gets a NaN CE:
    test_unchecked_bad_labels_give_a_nan_ce)."""
    student, teacher, labels = make_inputs(n=9, c=4, seed=4)
    student.requires_grad_(True)

    def step(s, t, y):
        return kd_loss(s, t, y, alpha=0.3, temperature=2.0).loss

    eager = step(student, teacher, labels)
    (eager_grad,) = torch.autograd.grad(eager, student)
    # aot_eager: dynamo must trace the whole function (fullgraph), without the cost of inductor codegen
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")(student, teacher, labels)
    (compiled_grad,) = torch.autograd.grad(compiled, student)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_identical_logits_have_zero_kl():
    student, _, labels = make_inputs(seed=4)
    out = kd_loss(student, student.clone(), labels, alpha=0.5, temperature=4.0, reduction="none")
    torch.testing.assert_close(out.kl, torch.zeros_like(out.kl), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=True), ValueError, "alpha"),
        (dict(alpha="0.5"), ValueError, "alpha"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="2"), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        # cmi_loss's rule: 1/T a normal float32 (else NaN, or temperature**2 overflowing as an OverflowError)
        (dict(temperature=1e-40), ValueError, "temperature must lie in"),
        (dict(temperature=1e155), ValueError, "temperature must lie in"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(check_labels="yes"), ValueError, "check_labels"),
    ],
)
def test_bad_options(kwargs, error, match):
    student, teacher, labels = make_inputs()
    with pytest.raises(error, match=match):
        kd_loss(student, teacher, labels, **kwargs)


def test_bad_tensors():
    student, teacher, labels = make_inputs()
    with pytest.raises(TypeError, match="student_logits"):
        kd_loss(student.tolist(), teacher, labels)
    with pytest.raises(TypeError, match="teacher_logits"):
        kd_loss(student, teacher.long(), labels)
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(student, teacher[:, :2], labels)
    with pytest.raises(ValueError, match="student_logits"):
        kd_loss(student[0], teacher[0], labels)
    with pytest.raises(ValueError, match=r"student_logits must be 2-D \(N, C\) with N >= 1 and C >= 2"):
        kd_loss(student[:, :1], teacher[:, :1], labels)  # one class: nothing to distil
    with pytest.raises(ValueError, match="teacher_logits are on meta but student_logits on cpu"):
        kd_loss(student, teacher.to("meta"), labels)
    with pytest.raises(TypeError, match="labels"):
        kd_loss(student, teacher, labels.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        kd_loss(student, teacher, labels[:-1])
    with pytest.raises(ValueError, match="num_classes=3"):
        kd_loss(student, teacher, torch.full_like(labels, 3))
    with pytest.raises(ValueError, match="labels may be None only when alpha == 1"):
        kd_loss(student, teacher, None, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        KDLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="temperature must lie in"):
        KDLoss(temperature=1e-40)
    with pytest.raises(ValueError, match="check_labels"):
        KDLoss(check_labels="yes")


def test_module_passes_check_labels_on():
    """KDLoss(check_labels=...) is kd_loss's check_labels: the default checks CPU labels, False lets a bad label
    through as a NaN CE (as on CUDA by default)."""
    student, teacher, labels = make_inputs(n=4, c=3, seed=5)
    bad_labels = labels.clone()
    bad_labels[1] = 3
    with pytest.raises(ValueError, match="num_classes=3"):
        KDLoss()(student, teacher, bad_labels)
    unchecked = KDLoss(alpha=0.3, reduction="none", check_labels=False)
    rows = unchecked(student, teacher, bad_labels)
    assert rows.ce[1].isnan() and not rows.ce[[0, 2, 3]].isnan().any()
    assert "check_labels=False" in repr(unchecked)


@pytest.mark.parametrize("float64_side", ["student", "teacher"])
def test_float64_logits_on_either_side_compute_in_float64(float64_side):
    """At T = 1e3 float32 math is 0.4% off (module docstring); float64 logits on either side, as PyTorch promotes
    a float32-float64 pair, give the float64 result, and the student's gradient keeps its dtype."""
    student, teacher, labels = make_inputs(n=16, c=5, seed=0)
    if float64_side == "student":
        student = student.double()
    else:
        teacher = teacher.double()
    student.requires_grad_(True)
    result = kd_loss(student, teacher, labels, alpha=0.5, temperature=1e3)
    expected = reference_rows(student.detach(), teacher, labels, 0.5, 1e3)[:, 0].mean()
    assert result.loss.dtype == torch.float64
    torch.testing.assert_close(result.loss, expected, rtol=1e-9, atol=0)
    result.loss.backward()
    assert student.grad.dtype == student.dtype


@pytest.mark.parametrize("compiled", [False, True])
def test_unchecked_bad_labels_give_a_nan_ce(compiled):
    """With the label check off (CUDA's default, and under torch.compile), a label outside [0, C) gets a NaN CE, as
    cmi_loss gives it a NaN KL: -100 too, which F.cross_entropy would ignore (CE 0). The other rows, their gradient
    and every row's KL are unaffected."""
    student, teacher, labels = make_inputs(n=6, c=3, seed=4)
    bad_labels = labels.clone()
    bad_rows = torch.tensor([1, 3, 4])
    bad_labels[bad_rows] = torch.tensor([-100, 3, -1])
    good_rows = torch.tensor([0, 2, 5])

    def rows(student, labels):
        return kd_loss(student, teacher, labels, alpha=0.3, temperature=2.0, reduction="none", check_labels=False)

    torch._dynamo.reset()
    step = torch.compile(rows, fullgraph=True, dynamic=False) if compiled else rows
    student.requires_grad_(True)
    got = step(student, bad_labels)
    want = rows(student, labels)
    assert got.ce[bad_rows].isnan().all() and got.loss[bad_rows].isnan().all()
    torch.testing.assert_close(got.ce[good_rows], want.ce[good_rows])
    torch.testing.assert_close(got.kl, want.kl)
    (grad,) = torch.autograd.grad(got.loss[good_rows].sum(), student)
    (want_grad,) = torch.autograd.grad(want.loss[good_rows].sum(), student)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("student_inf", [False, True], ids=["finite-student", "student-inf-too"])
def test_a_class_the_teacher_rules_out_adds_nothing(student_inf):
    """Teacher logit -inf: p_t = 0 there, and 0 log 0 counts as 0 (F.kl_div's convention), not NaN; also where the
    student rules the class out too. The gradient stays finite."""
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], requires_grad=True)
    teacher = torch.tensor([[2.0, float("-inf"), 0.0], [1.0, 0.0, -1.0]])
    if student_inf:
        with torch.no_grad():
            student[0, 1] = float("-inf")
    labels = torch.tensor([0, 1])
    out = kd_loss(student, teacher, labels, alpha=0.5, temperature=2.0, reduction="none")
    kept = [0, 2]  # the classes the teacher allows in row 0
    p_t = torch.softmax(teacher[0].double() / 2.0, 0)
    log_p_s = torch.log_softmax(student[0].detach().double() / 2.0, 0)
    expected_row0 = float((p_t[kept] * (p_t[kept].log() - log_p_s[kept])).sum())
    assert out.kl[0].item() == pytest.approx(expected_row0, rel=1e-6)
    assert out.kl[1].item() == pytest.approx(
        reference_rows(student[1:], teacher[1:], labels[1:], 0.5, 2.0)[0, 2].item()
    )
    assert torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert torch.isfinite(student.grad[:, [0, 2]]).all() and torch.isfinite(student.grad[1]).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_field_is_reduced_like_the_loss(reduction):
    """KDOutput's ce and kl are reduced the same way as loss (the docstring's contract), not only loss."""
    student, teacher, labels = make_inputs(seed=4, dtype=torch.float64)
    expected = reference_rows(student, teacher, labels, 0.3, 2.5)
    expected = expected.mean(0) if reduction == "mean" else expected.sum(0)
    out = kd_loss(student, teacher, labels, alpha=0.3, temperature=2.5, reduction=reduction)
    for got, column in zip(out, range(3), strict=True):
        torch.testing.assert_close(got, expected[column], rtol=1e-12, atol=1e-12)
