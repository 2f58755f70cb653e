"""``python -m bench.host_overhead``: the host time of one fused fwd+bwd step, measurable without a GPU.

At GLUE batch sizes a step of the fused op is launch-bound: the GPU work is a few microseconds, the Python and
PyTorch calls around it are hundreds. Issue 3's wall target (fused within 2x of a no-op autograd step at 32x768)
therefore depends on the host path, and that path can be measured on any machine: this runs ``cmi_loss`` on CPU
tensors with the Triton launches replaced by no-ops (each ``kernel[grid](...)``), next to the no-op autograd step of
``python -m bench`` (``(h.float().sum() * 0.1).backward()``) and the eager torch backend, in interleaved rounds.

What it counts: everything above Triton's launcher (argument checks, the autograd Function, allocations, the mean,
the slicing of the statistics, the backward engine). What it misses: Triton's own launcher (``kernel[grid]``,
argument binding, cache lookup, the driver call; twice per step) and the CUDA launch cost of the torch ops
(memset, mean) and of the no-op step's ops; ``python -m bench`` (``wall`` rows) measures those on a GPU. The grid
is sized for ``--sms`` SMs, so the op takes the slots-or-atomics path it takes on that GPU.

Host-time noise only ever adds, so the table gives the minimum over rounds (and the median beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Callable
from unittest import mock

import torch

import kernels.cmi
from cmi_fused.cli_help import DefaultsHelpFormatter

from .cmi_op import make_loss_fn
from .timing import device_name, rotated

KERNELS = ("cmi_forward_kernel", "cmi_backward_kernel", "cmi_log_centroids_kernel")


@contextlib.contextmanager
def launches_stubbed(sms: int):
    """Every Triton launch of the op becomes a call counter; the grid is that of a GPU with ``sms`` SMs.

    Yields the dict of launches per kernel name.
    """
    launches = dict.fromkeys(KERNELS, 0)

    class StubKernel:
        """``kernel[grid](...)`` counts the launch and runs nothing."""

        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return self.launch

        def launch(self, *args, **kwargs):
            launches[self.name] += 1

    with contextlib.ExitStack() as stack:
        # CPU tensors pass the launchers' device check only with interpreted kernels; nothing is interpreted, the
        # launches are stubbed.
        stack.enter_context(mock.patch.object(kernels.cmi, "KERNELS_INTERPRETED", True))
        # Nor does the interpreter's numpy limit apply (the GPU image pairs triton 3.6 with numpy 2.5).
        stack.enter_context(mock.patch.object(kernels.cmi, "interpreter_numpy_problem", lambda: None))
        # Nor its numpy error state (host time that a GPU launch does not spend).
        stack.enter_context(mock.patch.object(kernels.cmi, "interpreter_errstate", contextlib.nullcontext))
        for name in KERNELS:
            # Where the launchers look the kernels up: `kernel[grid]` reaches JITFunction.run only on some
            # Triton versions (not in the interpreters of 3.3-3.5).
            stack.enter_context(mock.patch.object(kernels.cmi, name, StubKernel(name)))
        stack.enter_context(mock.patch.object(kernels.cmi, "INTERPRETER_PROGRAMS", sms * kernels.cmi.PROGRAMS_PER_SM))
        yield launches


def steps(n_rows: int, dim: int, num_classes: int, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One fwd+bwd step per provider, on fresh random CPU inputs."""
    features = torch.randn(n_rows, dim, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, num_classes, (n_rows,))
    centroids = torch.softmax(torch.randn(num_classes, dim), -1)

    def step(provider, centroids_or_none):
        # python -m bench's loss of that provider (check_labels=False: the default on CUDA tensors)
        loss_fn = make_loss_fn(provider, num_classes)

        def run():
            # cleared as python -m bench's step clears it: no gradient-accumulating add in the time (it added the
            # same ~10 us to every provider, pulling fused / no-op towards 1)
            features.grad = None
            loss_fn(features, labels, centroids_or_none).backward()

        return run

    return {
        "noop": step("noop", centroids),
        "fused fixed": step("fused", centroids),
        "fused batch": step("fused", None),
        "eager fixed": step("eager", centroids),
    }


def measure(step_fns: dict[str, Callable[[], None]], rounds: int, iters: int) -> dict[str, list[float]]:
    """Microseconds per step, one value per round; the order rotates each round."""
    for fn in step_fns.values():
        for _ in range(iters):
            fn()
    names = list(step_fns)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            start = time.perf_counter()
            for _ in range(iters):
                step_fns[name]()
            times[name].append((time.perf_counter() - start) / iters * 1e6)
    return times


def table(times: dict[str, list[float]]) -> list[dict]:
    floor = min(times["noop"])
    return [
        {"provider": name, "min_us": min(values), "median_us": statistics.median(values),
         "ratio_to_noop": min(values) / floor}
        for name, values in times.items()
    ]  # fmt: skip


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.host_overhead",
        description="The host time of one fused fwd+bwd step, measurable without a GPU.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--sms", type=int, default=132, help="SMs of the GPU whose grid to use (H100 SXM: 132)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--iters", type=int, default=200, help="steps per round and provider")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    step_fns = steps(args.rows, args.dim, args.classes, getattr(torch, args.dtype))
    with launches_stubbed(args.sms) as launches:
        step_fns["fused fixed"]()
        fixed_launches = sum(launches.values())
        rows = table(measure(step_fns, args.rounds, args.iters))
    shape = f"{args.rows}x{args.dim} C={args.classes} {args.dtype}"
    print(f"host time per fwd+bwd step, {shape}, Triton launches stubbed ({fixed_launches} per fixed step), "
          f"{device_name(torch.device('cpu'))}, min over {args.rounds} rounds of {args.iters}")  # fmt: skip
    print("| provider | min us | median us | min / noop |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['provider']} | {row['min_us']:.1f} | {row['median_us']:.1f} | {row['ratio_to_noop']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": shape, "sms": args.sms, "torch": torch.__version__, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: intra-op threads add only noise
    main()
