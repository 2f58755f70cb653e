"""``python -m bench.host_overhead``: the stub really replaces every launch of a step (so what is timed is the host
path alone), is undone afterwards, runs where the interpreter could not, and the CLI writes a row per provider. The
times themselves are not checked."""

import json
import time
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

import bench.host_overhead
import kernels.cmi
from bench.host_overhead import KERNELS, launches_stubbed, main, measure, steps, table


def test_stub_counts_every_launch_of_a_step_and_is_undone():
    step_fns = steps(n_rows=1100, dim=40, num_classes=3, dtype=torch.float32)  # N >= 1024: with the log table
    programs, interpreted = kernels.cmi.INTERPRETER_PROGRAMS, kernels.cmi.KERNELS_INTERPRETED
    real_kernels = {name: getattr(kernels.cmi, name) for name in KERNELS}
    with launches_stubbed(sms=132) as launches:
        assert kernels.cmi.INTERPRETER_PROGRAMS == 132 * kernels.cmi.PROGRAMS_PER_SM
        step_fns["fused fixed"]()
        assert launches == {"cmi_forward_kernel": 1, "cmi_backward_kernel": 1, "cmi_log_centroids_kernel": 1}
        step_fns["fused batch"]()  # two forward phases, the table built from the phase-1 statistics
        assert launches == {"cmi_forward_kernel": 3, "cmi_backward_kernel": 2, "cmi_log_centroids_kernel": 2}
    assert (programs, interpreted) == (kernels.cmi.INTERPRETER_PROGRAMS, kernels.cmi.KERNELS_INTERPRETED)
    assert {name: getattr(kernels.cmi, name) for name in KERNELS} == real_kernels


def loss_fns_recording(record):
    """A stand-in for ``make_loss_fn``: each loss calls ``record(provider, features, centroids)``, then sums."""

    def make_loss_fn(provider, num_classes):
        def loss(features, labels, centroids):
            record(provider, features, centroids)
            return features.float().sum()

        return loss

    return make_loss_fn


def test_runs_where_the_interpreter_rejects_the_numpy(monkeypatch):
    """Nothing is interpreted, so triton 3.6 with numpy 2.5 (the GPU image, where gpu_session.sh runs this) must not
    stop it; the check is back once the stub is undone."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    step_fns = steps(n_rows=8, dim=40, num_classes=3, dtype=torch.float32)
    with launches_stubbed(sms=132) as launches:
        step_fns["fused fixed"]()
    assert launches["cmi_forward_kernel"] == 1
    monkeypatch.setattr(kernels.cmi, "KERNELS_INTERPRETED", True)  # as under the stub, also on a GPU machine
    with pytest.raises(RuntimeError, match="triton-lang/triton#9171"):
        step_fns["fused fixed"]()


def test_cli_writes_a_row_per_provider(tmp_path, capsys):
    out = tmp_path / "host.json"
    rows = main(["--rows", "8", "--dim", "24", "--rounds", "2", "--iters", "2", "--json", str(out)])
    assert [row["provider"] for row in rows] == ["noop", "fused fixed", "fused batch", "eager fixed"]
    assert all(row["min_us"] > 0 and row["min_us"] <= row["median_us"] for row in rows)
    assert json.loads(out.read_text())["rows"] == rows
    assert "| fused fixed |" in capsys.readouterr().out


def test_measure_is_microseconds_per_step_after_a_warm_up(monkeypatch):
    clock = [0.0]
    calls = []

    def step():  # 5 us per step on a fake clock
        calls.append(clock[0])
        clock[0] += 5e-6

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    times = measure({"noop": step, "fused fixed": step}, rounds=3, iters=4)
    assert times == {"noop": [pytest.approx(5.0)] * 3, "fused fixed": [pytest.approx(5.0)] * 3}
    assert len(calls) == 2 * 4 + 2 * 3 * 4  # one warm-up pass of iters per provider, then the rounds


def test_table_ratio_is_min_over_the_noop_min():
    """Host noise only adds: the ratio is min / min (not median), next to the median."""
    rows = table({"noop": [1.0, 3.0, 5.0], "fused fixed": [2.0, 9.0, 9.0]})
    assert rows == [
        {"provider": "noop", "min_us": 1.0, "median_us": 3.0, "ratio_to_noop": 1.0},
        {"provider": "fused fixed", "min_us": 2.0, "median_us": 9.0, "ratio_to_noop": 2.0},
    ]


def test_every_step_starts_without_a_gradient(monkeypatch):
    """As python -m bench's step: a gradient left from the step before would add an accumulating add to the time."""
    starts_clear = []

    def record(provider, features, centroids):
        starts_clear.append(features.grad is None)

    monkeypatch.setattr(bench.host_overhead, "make_loss_fn", loss_fns_recording(record))
    for step in steps(4, 8, 2, torch.float32).values():
        step()
        step()
    assert starts_clear == [True] * 8


# Added after a mutation pass over bench/host_overhead.py: each test kills a mutant the ones above let survive.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_step_runs_its_provider_in_its_mode_and_dtype(monkeypatch, dtype):
    """The fixed-centroid steps get the given centroids, "fused batch" none (per-batch centroids), all of them
    features of the asked dtype."""
    seen = {}

    def record(provider, features, centroids):
        seen.setdefault(provider, []).append((centroids is None, features.dtype, tuple(features.shape)))

    monkeypatch.setattr(bench.host_overhead, "make_loss_fn", loss_fns_recording(record))
    step_fns = steps(4, 8, 2, dtype)
    for name in ("fused fixed", "fused batch", "eager fixed"):
        step_fns[name]()
    assert seen == {"fused": [(False, dtype, (4, 8)), (True, dtype, (4, 8))], "eager": [(False, dtype, (4, 8))]}


def test_cli_defaults_are_the_issues_32x768_bf16_step_on_an_h100_grid(tmp_path, monkeypatch):
    """Without options it times issue 3's 32x768 C=2 bf16 step with the grid of an H100 SXM (132 SMs), as
    gpu_session.sh runs it; --sms reaches the stub."""
    stub = mock.Mock(wraps=bench.host_overhead.launches_stubbed)
    monkeypatch.setattr(bench.host_overhead, "launches_stubbed", stub)
    out = tmp_path / "host.json"
    main(["--rounds", "1", "--iters", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert (
        written["shape"] == "32x768 C=2 bfloat16" and written["sms"] == 132 and stub.call_args_list == [mock.call(132)]
    )
    main(["--rows", "4", "--dim", "8", "--sms", "8", "--rounds", "1", "--iters", "1"])
    assert stub.call_args_list == [mock.call(132), mock.call(8)]


def test_measure_rotates_the_order_each_round():
    """Interleaved rounds, the order rotated by one each round, so that clock drift does not always hit the same
    provider."""
    order = []
    step_fns = {name: (lambda name=name: order.append(name)) for name in ("noop", "fused fixed", "eager fixed")}
    measure(step_fns, rounds=3, iters=1)
    assert order[3:] == ["noop", "fused fixed", "eager fixed", "fused fixed", "eager fixed", "noop",
                         "eager fixed", "noop", "fused fixed"]  # fmt: skip
