"""``python -m bench.tune``: A/B the fused op's launch choices on one GPU, in one process.

The kernels' launch choices (programs per SM, the slot budget, warps per row, when to build the log-centroid
table, slots or atomics) were set from compiled-code reading, not from GPU timings (``bench/NOTES.md``). Each
variant below overrides those module-level constants of ``kernels`` for the duration of its measurement, so one
GPU call compares them all without editing the code; the winner is then made the default in the code.

For each shape and mode the variants are measured in interleaved rounds (the order rotating each round), so that
drift of clocks and temperature spreads over all of them: ``device`` time of the fused fwd and fwd+bwd, captured
in a CUDA graph and replayed (``bench.cmi_op.graph_replay_ms``). On the CPU (``--quick``, the CI smoke run) the
fused op runs in the Triton interpreter and only ``wall`` time exists: a code-path check, not a measurement.

Each row records the grid the variant launched (``programs``, ``slots``, ``atomics``, ``log_table``), so a
difference can be traced to what changed. Output: ``<output-dir>/tune-<device-slug>-<yyyy-mm-dd>.{json,md}``; the
markdown gives per variant the median over rounds, its ratio to ``main`` and the spread (min..max over rounds) of
``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import statistics
import sys
from unittest import mock

import torch

if not torch.cuda.is_available():
    # The fused op then runs in the Triton interpreter; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton

from cmi_fused import cmi_loss
from cmi_fused.cli_help import DefaultsHelpFormatter

from . import cmi_op, report
from .timing import device_name, rotated

UNBOUNDED = 2**62


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named set of overrides: ``constants`` of ``kernels.cmi`` and ``warps`` (BLOCK_D -> num_warps of the
    forward and backward kernels), plus the op's ``deterministic`` argument."""

    name: str
    question: str
    constants: tuple[tuple[str, int], ...] = ()
    warps: tuple[tuple[int, int], ...] = ()
    deterministic: bool | None = None

    @contextlib.contextmanager
    def applied(self):
        import kernels.cmi
        import kernels.cmi_forward

        with contextlib.ExitStack() as stack:
            for name, value in self.constants:
                if not hasattr(kernels.cmi, name):
                    raise AttributeError(f"variant {self.name!r}: kernels.cmi has no constant {name!r}")
                stack.enter_context(mock.patch.object(kernels.cmi, name, value))
            if self.warps:
                default_warps = kernels.cmi_forward.num_warps_for
                warps = dict(self.warps)
                stack.enter_context(
                    mock.patch.object(
                        kernels.cmi_forward, "num_warps_for", lambda block: warps.get(block, default_warps(block))
                    )
                )
            yield


# What bench/NOTES.md items 7 and 9 leave open, one question per variant.
VARIANTS = (
    Variant("main", "the code as it is"),
    Variant(
        "budget_1/16",
        "did the larger slot budget (more programs) help? (the budget before commit a28a92d)",
        constants=(("PARTIALS_BUDGET_FRACTION", 16), ("PARTIALS_MAX_BYTES", UNBOUNDED)),
    ),
    Variant("atomics", "slots or fp32 atomics with the full grid (deterministic=False)", deterministic=False),
    Variant("programs_per_sm_4", "persistent grid: 4 programs per SM", constants=(("PROGRAMS_PER_SM", 4),)),
    Variant("programs_per_sm_16", "persistent grid: 16 programs per SM", constants=(("PROGRAMS_PER_SM", 16),)),
    Variant(
        "warps_2",
        "2 warps per row instead of 4 at d <= 1024 (fewer instructions per row)",
        warps=tuple((2**k, 2) for k in range(11)),
    ),
    Variant("warps_16_at_4096", "16 warps instead of 8 at BLOCK_D 4096 (d > 2048)", warps=((4096, 16),)),
    Variant("no_log_table", "the log-centroid table's worth", constants=(("LOG_TABLE_MIN_ROWS", UNBOUNDED),)),
)
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}
# The shapes where the launch choices decide most (bench/NOTES.md: "The two numbers"), and last a mid-sized C
# whose slot budget caps the grid at 53 programs, fewer than the SMs (NOTES item 9; against the atomics variant).
DEFAULT_SHAPES = (
    cmi_op.Shape(4096, 768, 2),
    cmi_op.Shape(65536, 768, 10),
    cmi_op.Shape(32768, 4096, 3),
    cmi_op.Shape(16384, 768, 30522),
    cmi_op.Shape(8192, 4096, 1000),
    cmi_op.Shape(65536, 768, 100),
)
# One tiny shape per device at which budget_1/16 and atomics launch differently from main: 32 rows give main 4 slots
# on the interpreter's 4 programs (24 rows fit only 3: atomics), at half the interpreter time of 64 rows; a GPU's
# grid (a program per row up to 8 per SM) puts 64 rows on atomics, while 256 rows give main 35 slots and the two
# variants atomics.
QUICK_SHAPES = {"cpu": (cmi_op.Shape(32, 40, 3, "fp32"),), "cuda": (cmi_op.Shape(256, 40, 3, "fp32"),)}
QUICK_VARIANTS = ("main", "budget_1/16", "atomics", "warps_2")


def launch_grid(variant: Variant, features: torch.Tensor, num_classes: int) -> dict:
    """The forward grid the op launches for ``features`` under ``variant``: programs, slots, table, warps."""
    import kernels.cmi
    import kernels.cmi_forward
    from cmi_fused.fused import accumulate_mode

    n_rows, dim = features.shape
    with variant.applied():
        programs, slots, atomics = kernels.cmi.forward_grid(
            features, num_classes, accumulate_mode(variant.deterministic)
        )
        return {
            "programs": programs,
            "slots": slots,
            "atomics": atomics,
            "log_table": kernels.cmi.use_log_table(n_rows, num_classes),
            "num_warps": kernels.cmi_forward.launch_meta(dim)["num_warps"],
        }


def measure(variant, shape, pass_name, timing, inputs, device, budget) -> float:
    """Median ms of one pass of the fused op under ``variant``."""

    def loss_fn(features, labels, centroids):
        return cmi_loss(
            features, labels, shape.num_classes, centroids, backend="triton", check_labels=False,
            deterministic=variant.deterministic,
        ).loss  # fmt: skip

    with variant.applied():
        timer = cmi_op.Timer(device)
        prepare, run = cmi_op.build_step(loss_fn, inputs, pass_name, for_graph=False)
        estimate_ms = cmi_op.estimate_step_ms(prepare, run, len(inputs), timer, budget.warmup_steps)
        times, _ = cmi_op.timed_steps(loss_fn, inputs, pass_name, timing, estimate_ms, timer, budget)
    return statistics.median(times)


def run_tune(shapes, variants, modes, passes, rounds, device, budget, log=print) -> list[dict]:
    timing = "device" if device.type == "cuda" else "wall"
    l2_bytes = cmi_op.l2_cache_bytes(device)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in shapes:
        for mode in modes:
            count = cmi_op.num_input_sets(shape, mode, l2_bytes, budget.max_input_sets)
            inputs = cmi_op.make_inputs(shape, mode, count, device, generator)
            grids = {v.name: launch_grid(v, inputs[0].features, shape.num_classes) for v in variants}
            # A variant that launches main's grid, warps and table runs main's kernels: its time would be main's
            # again (a noise check at best), so the device time goes to the variants that differ.
            same = [v.name for v in variants if v.name != "main" and grids[v.name] == grids.get("main")]
            rows += [
                dict(
                    cmi_op.case_fields(shape, mode, "fused", pass_name), variant=name, round=None, timing=timing,
                    ms=None, skipped="same launch as main", **grids[name],
                )
                for name in same
                for pass_name in passes
            ]  # fmt: skip
            if same:
                log(f"{shape.label:>26} {mode:5} same launch as main, not measured: {', '.join(same)}")
            measured = [v for v in variants if v.name not in same]
            for round_index in range(rounds):
                for variant in rotated(measured, round_index):
                    for pass_name in passes:
                        row = dict(
                            cmi_op.case_fields(shape, mode, "fused", pass_name), variant=variant.name,
                            round=round_index, timing=timing, **grids[variant.name],
                        )  # fmt: skip
                        try:
                            row["ms"] = measure(variant, shape, pass_name, timing, inputs, device, budget)
                        except Exception as error:  # a variant that fails to compile or launch: keep the rest
                            row["ms"], row["error"] = None, f"{type(error).__name__}: {error}"
                        shown = f"{row['ms']:.4f} ms" if row["ms"] is not None else row["error"][:120]
                        log(f"{shape.label:>26} {mode:5} {pass_name:7} {variant.name:20} r{round_index} {shown}")
                        rows.append(row)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def summary_markdown(results: dict) -> str:
    """Per (shape, mode, pass): each variant's median over rounds, its ratio to main, and main's spread.

    The ratio is also paired per round (variant / main of the same round, whose order rotates): its min..max and in
    how many rounds the variant was faster, so that a 0.97x can be told from noise.
    """
    groups: dict[tuple, dict[str, dict[int, float]]] = {}  # (shape, mode, pass) -> variant -> round -> ms
    grids: dict[tuple, dict] = {}
    for row in results["rows"]:
        key = report.shape_key(row, "mode", "pass")
        if row["ms"] is not None:
            groups.setdefault(key, {}).setdefault(row["variant"], {})[row["round"]] = row["ms"]
        grids[key + (row["variant"],)] = row
    lines = [
        f"# Launch-choice A/B: {results['device']}, {results['date']}",
        "",
        f"torch {results['torch']}, triton {results['triton']}; {results['timing']} time, median over "
        f"{results['rounds']} interleaved rounds. `python -m bench.tune` (bench/tune.py).",
        "",
        "| shape | mode | pass | variant | programs | slots | table | warps | ms | vs main |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, by_variant in groups.items():
        *shape, mode, pass_name = key
        mains = by_variant.get("main", {})
        main_ms = statistics.median(mains.values()) if mains else None
        for name, mine in by_variant.items():
            grid = grids[key + (name,)]
            times = list(mine.values())
            ms = statistics.median(times)
            if name == "main":
                versus = f"spread {min(times):.4f}..{max(times):.4f}"
            elif main_ms:
                paired = [mine[r] / mains[r] for r in mine if r in mains]
                versus = f"{ms / main_ms:.2f}x"
                if paired:
                    faster = sum(ratio < 1 for ratio in paired)
                    versus += f" (rounds {min(paired):.2f}..{max(paired):.2f}x, faster in {faster}/{len(paired)})"
            else:
                versus = "n/a"
            lines.append(
                f"| {report.shape_label(shape)} | {mode} | {pass_name} | {name} | {grid['programs']} | "
                f"{'atomics' if grid['atomics'] else grid['slots']} | {grid['log_table']} | {grid['num_warps']} | "
                f"{ms:.4f} | {versus} |"
            )
    same = {}
    for row in results["rows"]:
        if row.get("skipped"):
            label = report.shape_label(report.shape_key(row))
            same.setdefault(f"{label} {row['mode']}", set()).add(row["variant"])
    if same:
        lines += ["", "Not measured, the same launch as main (grid, slots, table, warps):", ""]
        lines += [f"- {label}: {', '.join(sorted(names))}" for label, names in same.items()]
    errors = [row for row in results["rows"] if row.get("error")]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {row['variant']} {row['N']}x{row['d']} C={row['C']}: {row['error'][:200]}" for row in errors]
    lines += ["", "Variants:", ""] + [f"- `{v.name}`: {v.question}" for v in VARIANTS]
    return "\n".join(lines) + "\n"


class TuneHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults as in cmi-glue; the epilog's variant list keeps its lines."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tune",
        description="A/B the fused op's launch choices on one GPU, in one process.",
        epilog="variants (--variants), each the question it answers:\n"
        + "\n".join(f"  {variant.name}: {variant.question}" for variant in VARIANTS),
        formatter_class=TuneHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one tiny shape (in CI: on the CPU, wall time)")
    parser.add_argument("--output-dir", default=os.environ.get("OUT") or "bench/results")
    parser.add_argument("--shapes", nargs="+", type=cmi_op.parse_shape, metavar="NxD:C[:DTYPE]")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS_BY_NAME), help="default: all")
    parser.add_argument("--modes", nargs="+", choices=cmi_op.MODES, default=["fixed"])
    parser.add_argument("--passes", nargs="+", choices=cmi_op.PASSES, default=["fwd", "fwd_bwd"])
    parser.add_argument("--rounds", type=int, default=3)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        build_parser().error("without CUDA the fused kernels run in the Triton interpreter: use --quick")
    if args.rounds < 1:
        build_parser().error(f"--rounds must be >= 1, got {args.rounds}")
    names = args.variants or (QUICK_VARIANTS if args.quick else [v.name for v in VARIANTS])
    variants = [VARIANTS_BY_NAME[name] for name in names]
    if "main" not in names:
        variants.insert(0, VARIANTS_BY_NAME["main"])
    shapes = args.shapes or (QUICK_SHAPES[device.type] if args.quick else DEFAULT_SHAPES)
    budget = cmi_op.Budget.quick() if args.quick else cmi_op.Budget(device_ms=100.0)
    if args.quick:
        torch.set_num_threads(1)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    results = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": date,
        "timing": "device" if device.type == "cuda" else "wall",
        "rounds": args.rounds,
        "rows": [],
    }
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, "tune-" + report.results_stem(results["device"], date))
    for shape in shapes:  # the files are rewritten after every shape: a run cut short keeps what it measured
        results["rows"] += run_tune([shape], variants, tuple(args.modes), tuple(args.passes), args.rounds, device,
                                    budget)  # fmt: skip
        report.write_json(results, stem + ".json")  # via .partial and a rename: a kill leaves the last whole file
        with open(stem + ".md", "w", encoding="utf-8") as handle:
            handle.write(summary_markdown(results))
    print(f"wrote {stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
