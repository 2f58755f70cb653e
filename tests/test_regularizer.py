"""CMIRegularizer: the four centroid modes against centroids computed by hand, normalisation, state."""

import copy
import math
import pickle

import pytest
import torch

from cmi_fused import CMIRegularizer
from cmi_fused.options import TRITON_INSTALLED

C, D, T = 3, 5, 0.7


def softmax(h, temperature=T):
    return torch.softmax(h.double() / temperature, dim=-1)


def hand_cmi(h, y, centroids, temperature=T):
    """mean_i KL(softmax(h_i / T) || centroids[y_i]) in float64."""
    f = softmax(h, temperature)
    return (f * (f.log() - centroids.double()[y].log())).sum(-1).mean()


def class_means(f, y):
    return torch.stack([f[y == c].mean(0) for c in range(C)])


def centred(h, mean):
    """center_l2 by hand, in float64: (h_i - mean) / ||h_i - mean||."""
    return torch.nn.functional.normalize(h.double() - mean.double(), dim=-1)


def batch_cmi(x, y, temperature):
    """hand_cmi of x against its own per-batch class means."""
    return hand_cmi(x, y, class_means(softmax(x, temperature), y), temperature)


def make_batches(count=3, rows=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        h = torch.randn(rows, D, generator=generator) * 2
        y = torch.arange(rows) % C  # every class in every batch
        batches.append((h, y[torch.randperm(rows, generator=generator)]))
    return batches


def test_batch_mode_is_per_batch_cmi_with_exact_gradient():
    reg = CMIRegularizer(C, D, "batch", temperature=T)
    h, y = make_batches(1)[0]
    h.requires_grad_(True)
    loss = reg(h, y)
    assert torch.allclose(loss.double(), hand_cmi(h.detach(), y, class_means(softmax(h.detach()), y)), atol=1e-6)
    loss.backward()
    h_ref = h.detach().double().requires_grad_(True)
    f = softmax(h_ref)
    centroids = torch.stack([f[y == c].mean(0) for c in range(C)])  # not detached: the exact gradient
    (f * (f.log() - centroids[y].log())).sum(-1).mean().backward()
    assert torch.allclose(h.grad.double(), h_ref.grad, atol=1e-6)


def test_eps_is_passed_on_as_the_floor_of_the_centroids():
    """eps = 0.05 lies above some class-mean entries of these peaked softmaxes: the loss is the KL to the floored
    means, so a regulariser that dropped its eps (the op's default 1e-12) would give another value."""
    eps = 0.05
    h, y = make_batches(1)[0]
    means = class_means(softmax(h), y)
    assert (means < eps).any(), "the floor must bite for this test to mean anything"
    loss = CMIRegularizer(C, D, "batch", temperature=T, eps=eps)(h, y)
    assert torch.allclose(loss.double(), hand_cmi(h, y, means.clamp_min(eps)), atol=1e-6)


def test_a_large_eps_takes_the_cmi_below_0_by_at_most_d_eps_over_e():
    """README: one row per class makes g = f, so only the eps floor moves the KL, below 0 (each floored entry adds
    f log(f / eps) >= -eps / e): negative, and no lower than -d * eps / e."""
    eps, dim = 0.05, 16
    h = 2 * torch.randn(4, dim, generator=torch.Generator().manual_seed(0))
    cmi = CMIRegularizer(4, dim, "batch", temperature=0.3, eps=eps)(h, torch.arange(4)).item()
    assert -dim * eps / math.e <= cmi < -1e-3


@pytest.mark.parametrize("mode", ["batch", "epoch", "ema", "frozen"])
def test_end_epoch_counts_epochs_in_every_mode(mode):
    """The ``epoch`` buffer counts finished epochs whatever the centroid mode (a resumed run reads it back)."""
    reg = CMIRegularizer(C, D, mode, temperature=T)
    if mode == "frozen":
        reg.freeze(make_batches(2, seed=0))
    for epoch in range(1, 3):
        for h, y in make_batches(2, seed=epoch):
            reg(h, y)
        reg.end_epoch()
        assert int(reg.epoch) == epoch


def test_epoch_mode_uses_previous_epoch_means():
    reg = CMIRegularizer(C, D, "epoch", temperature=T)
    batches = make_batches(3)
    for h, y in batches:  # epoch 1: per-batch centroids
        assert torch.allclose(reg(h, y).double(), hand_cmi(h, y, class_means(softmax(h), y)), atol=1e-6)
    reg.end_epoch()
    f_all = softmax(torch.cat([h for h, _ in batches]))
    y_all = torch.cat([y for _, y in batches])
    epoch1_means = class_means(f_all, y_all)
    assert torch.allclose(reg.centroids.double(), epoch1_means, atol=1e-6)
    assert int(reg.epoch) == 1
    new_batches = make_batches(2, seed=1)
    for h, y in new_batches:  # epoch 2: epoch-1 means, fixed during the epoch
        assert torch.allclose(reg(h, y).double(), hand_cmi(h, y, epoch1_means), atol=1e-6)
    reg.end_epoch()
    f_new = softmax(torch.cat([h for h, _ in new_batches]))
    y_new = torch.cat([y for _, y in new_batches])
    assert torch.allclose(reg.centroids.double(), class_means(f_new, y_new), atol=1e-6)
    epoch2_means = reg.centroids.clone()
    h, y = make_batches(1, seed=2)[0]
    h, y = h[y != 2], y[y != 2]  # epoch 3 without class 2: it keeps epoch 2's centroid
    reg(h, y)
    reg.end_epoch()
    assert torch.allclose(reg.centroids[:2].double(), class_means(softmax(h), y)[:2], atol=1e-6)
    assert torch.equal(reg.centroids[2], epoch2_means[2])
    assert reg.centroid_valid.all()  # and its validity


def test_epoch_mode_uses_stored_centroids_where_every_class_of_the_batch_has_one():
    """After an epoch without class 2, epoch mode still uses the stored centroids for batches of classes 0 and 1; a
    batch with class 2 (no centroid yet) takes per-batch centroids."""
    reg = CMIRegularizer(C, D, "epoch", temperature=T)
    h, y = make_batches(1)[0]
    reg(h[y < 2], y[y < 2])
    reg.end_epoch()
    assert reg.centroid_valid.tolist() == [True, True, False]
    stored = reg.centroids.double().clone()
    h, y = make_batches(1, seed=3)[0]
    known = y < 2
    assert torch.allclose(reg(h[known], y[known]).double(), hand_cmi(h[known], y[known], stored), atol=1e-6)
    assert torch.allclose(reg(h, y).double(), batch_cmi(h, y, T), atol=1e-6)


def test_ema_class_missing_from_a_batch_keeps_its_centroid_and_validity():
    """ema: a class absent from a batch keeps its centroid (not blended towards zero) and stays valid, so that it is
    blended, not restarted, when it comes back."""
    momentum = 0.8
    reg = CMIRegularizer(C, D, "ema", temperature=T, momentum=momentum)
    (h1, y1), (h2, y2), (h3, y3) = make_batches(3)
    reg(h1, y1)
    ema = class_means(softmax(h1), y1)
    known = y2 != 2
    reg(h2[known], y2[known])
    ema[:2] = momentum * ema[:2] + (1 - momentum) * class_means(softmax(h2[known]), y2[known])[:2]
    assert torch.allclose(reg.centroids.double(), ema, atol=1e-6)
    assert reg.centroid_valid.all()
    reg(h3, y3)
    ema = momentum * ema + (1 - momentum) * class_means(softmax(h3), y3)
    assert torch.allclose(reg.centroids.double(), ema, atol=1e-6)


def test_ema_mode_blends_batch_means():
    momentum = 0.8
    reg = CMIRegularizer(C, D, "ema", temperature=T, momentum=momentum)
    (h1, y1), (h2, y2), (h3, y3) = make_batches(3)
    assert torch.allclose(reg(h1, y1).double(), hand_cmi(h1, y1, class_means(softmax(h1), y1)), atol=1e-6)
    ema = class_means(softmax(h1), y1)
    assert torch.allclose(reg.centroids.double(), ema, atol=1e-6)
    assert torch.allclose(reg(h2, y2).double(), hand_cmi(h2, y2, ema), atol=1e-6)
    ema = momentum * ema + (1 - momentum) * class_means(softmax(h2), y2)
    assert torch.allclose(reg.centroids.double(), ema, atol=1e-6)
    assert torch.allclose(reg(h3, y3).double(), hand_cmi(h3, y3, ema), atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ema_gradient_uses_the_centroids_of_the_forward(backend, compiled):
    """The ema update rewrites the centroid buffer between the forward and the backward; the gradient must still
    be the one against the centroids the loss used (the triton backend saves them for its backward). Compiled too
    (fullgraph, inductor), where the partitioner must not recompute the copy of the centroids in the backward, after
    the update (pytorch/pytorch#197039). Step 0 runs eagerly: per-batch centroids, and a host sync until every class
    has a centroid."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reg = CMIRegularizer(C, D, "ema", temperature=T, momentum=0.8, backend=backend).to(device)
    torch._dynamo.reset()
    step_module = torch.compile(reg, fullgraph=True) if compiled else reg
    for step, (h, y) in enumerate(make_batches(3)):
        used = reg.centroids.double().clone()  # before this step's update (unused at step 0: per-batch centroids)
        h, y = h.to(device).requires_grad_(True), y.to(device)
        (step_module if step else reg)(h, y).backward()
        h_ref = h.detach().double().requires_grad_(True)
        hand_cmi(h_ref, y, used if step else class_means(softmax(h_ref), y)).backward()
        assert torch.allclose(h.grad.double(), h_ref.grad, atol=1e-6), step


@pytest.mark.parametrize("normalization", ["none", "center_l2"])
@pytest.mark.parametrize("mode", ["batch", "epoch", "ema", "frozen"])
def test_fullgraph_compile_matches_eager(mode, normalization):
    """torch.compile(fullgraph=True) of a training step gives the eager loss, gradient and state: batch and frozen
    at once, epoch and ema once every class has a centroid (until then a call asks the host which classes have one).
    aot_eager: the graph capture, not inductor's code, is what differs by mode."""
    batches = make_batches(4, seed=5)
    eager = CMIRegularizer(C, D, mode, temperature=T, normalization=normalization)
    if mode == "frozen":
        eager.freeze(batches[:1])
    elif mode != "batch":
        eager(*batches[0])
        eager.end_epoch()  # epoch mode: stored centroids from here on
    compiled_reg = copy.deepcopy(eager)
    torch._dynamo.reset()
    step = torch.compile(compiled_reg, fullgraph=True, backend="aot_eager")
    for h, y in batches[1:]:
        results = []
        for module in (eager, step):
            features = h.clone().requires_grad_(True)
            loss = module(features, y)
            results.append((loss, torch.autograd.grad(loss, features)[0]))
        for got, want in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        eager.end_epoch()
        compiled_reg.end_epoch()
    compiled_state = compiled_reg.state_dict()
    for name, value in eager.state_dict().items():
        if isinstance(value, torch.Tensor):  # the settings are extra state
            torch.testing.assert_close(compiled_state[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_first_epoch_of_epoch_mode_reads_nothing_on_the_host():
    """Before any class has a centroid (epoch mode's whole first epoch) the per-batch centroids are chosen from a host
    flag, not by asking the device which classes have one (a sync per step on a GPU): torch.compile(fullgraph=True)
    traces such steps, where a read of a tensor's value would be a graph break, an error under fullgraph."""
    reg = CMIRegularizer(C, D, "epoch", temperature=T)
    torch._dynamo.reset()
    step = torch.compile(reg, fullgraph=True, backend="aot_eager")
    batches = make_batches(2, seed=9)
    for h, y in batches:
        assert torch.allclose(step(h, y).double(), hand_cmi(h, y, class_means(softmax(h), y)), atol=1e-6)
    reg.end_epoch()  # the compiled steps accumulated the epoch's sums: its class means are the centroids now
    epoch_h, epoch_y = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert reg.centroid_valid.all()
    assert torch.allclose(reg.centroids.double(), class_means(softmax(epoch_h), epoch_y), atol=1e-6)


def test_module_pickled_before_the_host_flag_still_finds_its_centroids():
    """A CMIRegularizer pickled whole before the "any class valid" host flag existed unpickles without it: the class
    default asks the device, as before (a missing attribute would raise on the first call)."""
    reg = CMIRegularizer(C, D, "ema", temperature=T)
    h, y = make_batches(1)[0]
    reg(h[y < 2], y[y < 2])  # classes 0 and 1 have centroids, class 2 not yet
    old = pickle.loads(pickle.dumps(reg))
    del old.__dict__["_any_class_valid"]
    stored = reg.centroids.double().clone()
    h2, y2 = make_batches(1, seed=4)[0]
    only_01 = y2 < 2
    assert torch.allclose(old(h2[only_01], y2[only_01]).double(), hand_cmi(h2[only_01], y2[only_01], stored), atol=1e-6)


def test_class_without_centroid_falls_back_to_batch_centroids():
    reg = CMIRegularizer(C, D, "ema", temperature=T)
    h, y = make_batches(1)[0]
    only_01 = y < 2
    reg(h[only_01], y[only_01])  # class 2 not seen yet
    assert reg.centroid_valid.tolist() == [True, True, False]
    h2, y2 = make_batches(1, seed=3)[0]
    assert torch.allclose(reg(h2, y2).double(), hand_cmi(h2, y2, class_means(softmax(h2), y2)), atol=1e-6)
    assert reg.centroid_valid.all()


def test_frozen_mode_fixes_centroids_from_one_pass():
    reg = CMIRegularizer(C, D, "frozen", temperature=T)
    h, y = make_batches(1)[0]
    with pytest.raises(RuntimeError, match="freeze"):
        reg(h, y)
    passes = make_batches(3, seed=5)
    reg.freeze(passes)
    frozen = class_means(softmax(torch.cat([p[0] for p in passes])), torch.cat([p[1] for p in passes]))
    assert torch.allclose(reg.centroids.double(), frozen, atol=1e-6)
    for h, y in make_batches(2, seed=6):
        assert torch.allclose(reg(h, y).double(), hand_cmi(h, y, frozen), atol=1e-6)
    reg.end_epoch()
    assert torch.allclose(reg.centroids.double(), frozen, atol=1e-6)
    with pytest.raises(ValueError, match="classes \\[2\\]"):
        CMIRegularizer(C, D, "frozen").freeze([(h[y < 2], y[y < 2])])


def test_center_l2_uses_running_feature_mean():
    momentum = 0.9  # not 0.5: the old mean and the batch mean get different weights
    reg = CMIRegularizer(C, D, "batch", temperature=0.1, normalization="center_l2", feature_momentum=momentum)
    (h1, y1), (h2, y2) = make_batches(2)
    mean = h1.double().mean(0)
    x1 = centred(h1, mean)
    assert torch.allclose(reg(h1, y1).double(), batch_cmi(x1, y1, 0.1), atol=1e-5)
    mean = momentum * mean + (1 - momentum) * h2.double().mean(0)
    x2 = centred(h2, mean)
    assert torch.allclose(reg(h2, y2).double(), batch_cmi(x2, y2, 0.1), atol=1e-5)
    assert torch.allclose(reg.feature_mean.double(), mean, atol=1e-6)


def test_frozen_center_l2_computes_the_feature_mean_first_and_keeps_it():
    """freeze() takes the feature mean before the centroids; training steps then leave both as they are."""
    reg = CMIRegularizer(C, D, "frozen", temperature=0.2, normalization="center_l2")
    passes = make_batches(2, seed=8)
    with pytest.raises(TypeError, match="re-iterable"):
        reg.freeze(iter(passes))
    reg.freeze(passes)
    h_all, y_all = torch.cat([p[0] for p in passes]), torch.cat([p[1] for p in passes])
    mean = h_all.double().mean(0)
    x_all = centred(h_all, mean)
    frozen = class_means(softmax(x_all, 0.2), y_all)
    assert torch.allclose(reg.centroids.double(), frozen, atol=1e-6)
    assert reg.training
    h, y = make_batches(1, seed=9)[0]
    h = h + 5.0  # far from the frozen mean: an update would move it visibly
    x = centred(h, mean)
    assert torch.allclose(reg(h, y).double(), hand_cmi(x, y, frozen, 0.2), atol=1e-5)
    assert torch.allclose(reg.feature_mean.double(), mean, atol=1e-6)
    assert torch.allclose(reg.centroids.double(), frozen, atol=1e-6)
    # Frozen again (e.g. after loading a state): the running feature mean stays, one pass, so an iterator will do.
    kept = reg.feature_mean.clone()
    shifted = [(h + 3.0, y) for h, y in make_batches(2, seed=10)]
    reg.freeze(iter(shifted))
    assert torch.equal(reg.feature_mean, kept)
    h_all, y_all = torch.cat([p[0] for p in shifted]), torch.cat([p[1] for p in shifted])
    assert torch.allclose(reg.centroids.double(), class_means(softmax(centred(h_all, kept), 0.2), y_all), atol=1e-6)


def test_eval_mode_keeps_state():
    reg = CMIRegularizer(C, D, "ema", temperature=T)
    (h1, y1), (h2, y2) = make_batches(2)
    reg(h1, y1)
    before = {name: buffer.clone() for name, buffer in reg.named_buffers()}
    reg.eval()
    reg(h2, y2)
    for name, buffer in reg.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize("mode", ["epoch", "ema"])
def test_state_dict_round_trip(mode, tmp_path):
    """A checkpoint taken mid-epoch carries everything, the epoch's class sums so far included."""
    reg = CMIRegularizer(C, D, mode, temperature=T, normalization="center_l2")
    batches = make_batches(3)
    for h, y in batches:
        reg(h, y)
    reg.end_epoch()
    reg(*make_batches(1, seed=4)[0])  # the checkpoint falls in the middle of epoch 2
    torch.save(reg.state_dict(), tmp_path / "reg.pt")
    restored = CMIRegularizer(C, D, mode, temperature=T, normalization="center_l2")
    restored.load_state_dict(torch.load(tmp_path / "reg.pt"))
    for name, buffer in reg.named_buffers():
        assert torch.equal(buffer, dict(restored.named_buffers())[name]), name
    h, y = make_batches(1, seed=9)[0]
    assert torch.equal(reg(h, y), restored(h, y))


def test_frozen_state_dict_round_trip(tmp_path):
    """A frozen regulariser restored from a checkpoint uses the saved centroids (no second freeze() needed)."""
    reg = CMIRegularizer(C, D, "frozen", temperature=T)
    reg.freeze(make_batches(3, seed=5))
    torch.save(reg.state_dict(), tmp_path / "reg.pt")
    restored = CMIRegularizer(C, D, "frozen", temperature=T)
    restored.load_state_dict(torch.load(tmp_path / "reg.pt"))
    h, y = make_batches(1, seed=9)[0]
    assert torch.equal(reg(h, y), restored(h, y))


@pytest.mark.parametrize(
    "other, named",
    [
        (dict(centroids="epoch"), "centroids: 'ema' there, 'epoch' here"),
        (dict(temperature=0.5), "temperature: 0.7 there, 0.5 here"),
        (dict(normalization="none"), "normalization: 'center_l2' there, 'none' here"),
        (dict(momentum=0.5), "momentum: 0.9 there, 0.5 here"),
        (dict(feature_momentum=0.5), "feature_momentum: 0.99 there, 0.5 here"),
    ],
)
def test_state_of_other_settings_is_refused(other, named):
    """Centroids mean something only under the settings they were made with: loading them into a regulariser of
    other settings raises, naming each one, and overwrites nothing."""
    reg = CMIRegularizer(C, D, "ema", temperature=T, normalization="center_l2")
    for h, y in make_batches(2):
        reg(h, y)
    settings = dict(centroids="ema", temperature=T, normalization="center_l2") | other
    target = CMIRegularizer(C, D, settings.pop("centroids"), **settings)
    before = {name: buffer.clone() for name, buffer in target.named_buffers()}
    with pytest.raises(ValueError, match=f"state saved under other settings \\({named}\\)"):
        target.load_state_dict(reg.state_dict())
    for name, buffer in target.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_settings_the_state_does_not_use_do_not_block_loading():
    """momentum only shapes ema centroids and feature_momentum only the center_l2 mean: an epoch-mode state without
    normalisation loads into a regulariser with other values of both."""
    reg = CMIRegularizer(C, D, "epoch", temperature=T)
    for h, y in make_batches(2):
        reg(h, y)
    reg.end_epoch()
    restored = CMIRegularizer(C, D, "epoch", temperature=T, momentum=0.5, feature_momentum=0.5)
    restored.load_state_dict(reg.state_dict())
    assert torch.equal(restored.centroids, reg.centroids)


def test_state_saved_without_settings_still_loads():
    """A state dict from before the settings were saved (no _extra_state) loads, strict."""
    reg = CMIRegularizer(C, D, "epoch", temperature=T)
    for h, y in make_batches(2):
        reg(h, y)
    reg.end_epoch()
    state = {name: value for name, value in reg.state_dict().items() if not name.endswith("_extra_state")}
    restored = CMIRegularizer(C, D, "epoch", temperature=T)
    restored.load_state_dict(state)
    assert torch.equal(restored.centroids, reg.centroids) and int(restored.epoch) == 1


def test_state_loaded_with_assign_stays_float32():
    """load_state_dict(assign=True) takes the saved tensors themselves: a state converted to bfloat16 must not
    make the counts bfloat16, where they stop growing at 256."""
    reg = CMIRegularizer(2, D, "epoch", temperature=T)
    state = {
        name: value.bfloat16() if torch.is_tensor(value) and value.is_floating_point() else value
        for name, value in reg.state_dict().items()
    }
    reg.load_state_dict(state, assign=True)
    assert all(buffer.dtype == torch.float32 for buffer in reg.buffers() if buffer.is_floating_point())
    h = torch.randn(300, D)
    reg(h, torch.arange(300) % 2)
    assert reg.epoch_class_counts.tolist() == [150.0, 150.0]
    reg(h, torch.arange(300) % 2)
    assert reg.epoch_class_counts.tolist() == [300.0, 300.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(centroids="mean"), "centroids must be one of"),
        (dict(normalization="l2"), "normalization must be one of"),
        (dict(temperature=0), "temperature must be"),
        (dict(momentum=1.0), "momentum must be"),
        (dict(temperature=float("inf")), "temperature must be"),
        (dict(eps=-1.0), "eps must be"),
        (dict(eps="x"), "eps must be"),
        (dict(eps=1e-50), "eps must lie"),
        (dict(backend="bogus"), "backend must be one of"),
    ],
)
def test_bad_options_name_the_argument(kwargs, message):
    """Checked in the constructor, not at the first forward."""
    with pytest.raises(ValueError, match=message):
        CMIRegularizer(C, D, **kwargs)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((0, D), "num_classes must be a positive int, got 0"),
        ((2.0, D), "num_classes must be a positive int, got 2.0"),
        ((True, D), "num_classes must be a positive int, got True"),
        ((C, 8.0), "dim must be a positive int, got 8.0"),
        ((C, -1), "dim must be a positive int, got -1"),
    ],
)
def test_bad_sizes_name_the_argument(sizes, message):
    with pytest.raises(ValueError, match=message):
        CMIRegularizer(*sizes)


def test_numpy_integer_sizes_are_taken_as_ints():
    """The buffers get the shapes, and the state the ints, that Python ints give."""
    np = pytest.importorskip("numpy")
    reg = CMIRegularizer(np.int64(C), np.int32(D), "ema")
    assert (type(reg.num_classes), type(reg.dim)) == (int, int)
    assert reg.centroids.shape == (C, D)
    reference = CMIRegularizer(C, D, "ema")
    h, y = make_batches(1)[0]
    torch.testing.assert_close(reg(h, y), reference(h, y), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["epoch", "ema"])
def test_rejected_call_changes_no_state(mode, monkeypatch):
    """A call that raises updates nothing: the running feature mean, the epoch sums and the centroids are those of
    the calls that succeeded. Bad labels are refused first; an empty batch and the triton backend on CPU tensors
    without the interpreter only by cmi_loss, after the new feature mean was computed (it used to be stored by then:
    NaN from the empty batch, which every later call returned)."""
    reg = CMIRegularizer(C, D, mode, temperature=T, normalization="center_l2")
    h, y = make_batches(1)[0]
    reg(h, y)
    before = {name: buffer.clone() for name, buffer in reg.named_buffers()}
    bad_labels = y.clone()
    bad_labels[2] = C
    for labels in (bad_labels, y[:, None]):
        with pytest.raises(ValueError, match="labels"):
            reg(h * 3 + 1, labels)
    with pytest.raises(ValueError, match="at least one row"):
        reg(h[:0], y[:0])
    monkeypatch.setattr(reg, "backend", "triton")
    if TRITON_INSTALLED:  # the kernels as if imported without TRITON_INTERPRET (without triton: an ImportError)
        monkeypatch.setattr("kernels.cmi.KERNELS_INTERPRETED", False)
    with pytest.raises((ValueError, ImportError), match="CUDA|triton"):
        reg(h * 3 + 1, y)
    for name, buffer in reg.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_a_freeze_that_raises_keeps_no_feature_mean():
    """freeze() with center_l2 stores the feature mean only with the centroids: after a pass that lacked a class
    was refused, freezing on the full pass gives what it gives on a fresh regulariser (the refused pass's mean
    was kept before, and the retry then skipped its own)."""
    passes = make_batches(2, seed=8)
    lacking = [(h[y == 0] + 10.0, y[y == 0]) for h, y in passes]
    retried = CMIRegularizer(C, D, "frozen", temperature=0.2, normalization="center_l2")
    with pytest.raises(ValueError, match="classes \\[1, 2\\]"):
        retried.freeze(lacking)
    assert not bool(retried.feature_mean_valid)
    retried.freeze(passes)
    fresh = CMIRegularizer(C, D, "frozen", temperature=0.2, normalization="center_l2")
    fresh.freeze(passes)
    for name, buffer in fresh.named_buffers():
        assert torch.equal(retried.get_buffer(name), buffer), name


@pytest.mark.parametrize("mode", ["epoch", "ema"])
@pytest.mark.parametrize("dtype, num_classes", [(torch.int8, 128), (torch.uint8, 256)])
def test_narrow_label_dtypes_with_as_many_classes_as_they_hold(mode, dtype, num_classes):
    """Labels of every accepted dtype work up to the most classes the dtype can name (choosing the centroids bins
    labels with an overflow bin C, which int8 cannot hold for C = 128)."""
    h = torch.randn(6, D)
    labels = torch.tensor([0, 1, num_classes - 1] * 2)
    losses = []
    for label_dtype in (dtype, torch.int64):
        reg = CMIRegularizer(num_classes, D, mode, temperature=T)
        reg(h, labels.to(label_dtype))
        reg.end_epoch()
        losses.append(reg(h, labels.to(label_dtype)))
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_bfloat16", "double"])
def test_state_stays_float32_when_the_model_is_cast(cast):
    """``model.half()`` / ``model.to(torch.bfloat16)`` cast a model's float buffers; the regulariser's class sums,
    counts and centroids must stay float32 (a bfloat16 count stops at 256) and keep their values exactly."""
    model = torch.nn.Module()
    model.reg = CMIRegularizer(C, D, "epoch", temperature=T)
    for h, y in make_batches(2):
        model.reg(h, y)
    before = {name: buffer.clone() for name, buffer in model.reg.named_buffers()}
    if cast == "to_bfloat16":
        model.to(torch.bfloat16)
    else:
        getattr(model, cast)()
    for name, buffer in model.reg.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    model.reg.to("meta")  # device moves still apply
    assert all(buffer.device.type == "meta" for buffer in model.reg.buffers())


def call(reg: CMIRegularizer, how: str, features, labels):
    """``reg(features, labels)`` or ``reg.freeze([(features, labels)])``: both must check the batch."""
    return reg(features, labels) if how == "forward" else reg.freeze([(features, labels)])


@pytest.mark.parametrize("normalization", ["none", "center_l2"])
@pytest.mark.parametrize("how", ["forward", "freeze"])
@pytest.mark.parametrize("width", [1, 6])
def test_wrong_feature_width_is_reported(how, normalization, width):
    """Width 1 used to broadcast into freeze()'s (C, dim) sums and centroids without a word."""
    reg = CMIRegularizer(C, D, "frozen" if how == "freeze" else "batch", normalization=normalization)
    with pytest.raises(ValueError, match="dim=5"):
        call(reg, how, torch.randn(6, width), torch.arange(6) % C)
    assert not reg.centroid_valid.any() and not bool(reg.feature_mean_valid)


@pytest.mark.parametrize("normalization", ["none", "center_l2"])
@pytest.mark.parametrize("how", ["forward", "freeze"])
def test_integer_features_are_refused_with_every_normalisation(how, normalization):
    reg = CMIRegularizer(C, D, "frozen" if how == "freeze" else "batch", normalization=normalization)
    with pytest.raises(TypeError, match="floating-point"):
        call(reg, how, torch.ones(6, D, dtype=torch.long), torch.arange(6) % C)
    with pytest.raises(TypeError, match="features must be a torch.Tensor, got list"):
        call(reg, how, torch.ones(6, D).tolist(), torch.arange(6) % C)


def test_freeze_refuses_bad_labels():
    reg = CMIRegularizer(C, D, "frozen")
    with pytest.raises(ValueError, match="labels"):
        reg.freeze([(torch.randn(6, D), torch.tensor([0, 1, 2, 0, 1, C]))])
    with pytest.raises(ValueError, match="labels must have shape \\(6,\\)"):
        reg.freeze([(torch.randn(6, D), torch.arange(5) % C)])
    assert not reg.centroid_valid.any()


def test_out_of_range_labels_do_not_count_as_a_class_when_choosing_centroids():
    """Stored centroids are used when every class in the batch has one; a bad label (reported by cmi_loss) must not
    be taken for class 0 or C - 1 while deciding that."""
    reg = CMIRegularizer(C, D, "ema", temperature=T)
    h = torch.randn(8, D)
    reg(h, torch.tensor([1, 2] * 4))  # classes 1 and 2 get a centroid, class 0 none
    assert reg.centroid_valid.tolist() == [False, True, True]
    assert reg._centroids_for(torch.tensor([1, 2, 2])) is reg.centroids
    assert reg._centroids_for(torch.tensor([1, -1, 2, C])) is reg.centroids
    assert reg._centroids_for(torch.tensor([0, 1])) is None
    reg = CMIRegularizer(C, D, "ema", temperature=T)
    reg(h, torch.tensor([0, 1] * 4))  # now class C - 1 has none
    assert reg._centroids_for(torch.tensor([0, 1, C])) is reg.centroids


def test_center_l2_in_eval_before_training_centres_on_the_batch_mean():
    """Evaluation before any training step has no running feature mean yet: normalize() centres on the batch's own
    mean (not the all-zero feature_mean buffer, and detached), and the call stores no mean. The offset makes a zero
    mean visible."""
    reg = CMIRegularizer(C, D, "batch", temperature=0.1, normalization="center_l2")
    reg.eval()
    h, y = make_batches(1, seed=4)[0]
    h = (h + 5.0).requires_grad_(True)
    x = centred(h.detach(), h.detach().double().mean(0))
    cmi = reg(h, y)
    assert torch.allclose(cmi.double(), batch_cmi(x, y, 0.1), atol=1e-5)
    assert not reg.feature_mean_valid
    assert torch.equal(reg.feature_mean, torch.zeros(D))
    # The batch mean is held constant in the gradient, as the running mean (a buffer) is.
    cmi.backward()
    h_ref = h.detach().double().requires_grad_(True)
    batch_cmi(centred(h_ref, h_ref.detach().mean(0)), y, 0.1).backward()
    assert torch.allclose(h.grad.double(), h_ref.grad, atol=1e-5)


def test_eval_mode_keeps_the_center_l2_feature_mean():
    """An eval-mode call neither moves the running feature mean nor normalises with a mean moved by its own batch."""
    momentum = 0.5
    reg = CMIRegularizer(C, D, "batch", temperature=0.1, normalization="center_l2", feature_momentum=momentum)
    (h1, y1), (h2, y2) = make_batches(2, seed=6)
    reg(h1, y1)
    mean = reg.feature_mean.clone()
    reg.eval()
    h2 = h2 + 5.0  # far from the stored mean: an update would move it visibly
    x2 = centred(h2, mean)
    assert torch.allclose(reg(h2, y2).double(), batch_cmi(x2, y2, 0.1), atol=1e-5)
    assert torch.equal(reg.feature_mean, mean)


@pytest.mark.parametrize("normalization", ["none", "center_l2"])
def test_float64_features_stay_float64_on_the_torch_backend(normalization):
    """forward's contract: float64 features give a float64 CMI on the torch backend, whichever normalisation (the
    running feature mean is float32 state; the centring and the CMI are not rounded to float32). Evaluation before
    training centres on the batch's own mean, so every input of the result is float64 here."""
    reg = CMIRegularizer(C, D, "batch", temperature=0.1, normalization=normalization, backend="torch")
    h, y = make_batches(1, seed=8)[0]
    h = h.double() + 5.0
    reg.eval()
    x = centred(h, h.mean(0)) if normalization == "center_l2" else h
    cmi = reg(h, y)
    assert cmi.dtype == torch.float64
    assert torch.allclose(cmi, batch_cmi(x, y, 0.1), rtol=1e-12, atol=0)
    reg.train()
    assert reg(h, y).dtype == torch.float64
