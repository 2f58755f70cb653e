"""``python -m bench``: time ``cmi_loss`` (fused / eager / torch.compile) and a BERT training step.

Writes ``<output-dir>/<device-slug>-<yyyy-mm-dd>.{json,md}`` after every shape and mode, so a run stopped
early keeps what it measured, and the ``.png`` plot at the end. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.metadata
import os
import sys
import time

import torch

from cmi_fused.cli_help import DefaultsHelpFormatter

if not torch.cuda.is_available():
    # The fused provider then runs in the Triton interpreter; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import cmi_op, e2e, report
from .timing import device_name

DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CUDA_FAULT_STATUS = 3  # exit status of a run stopped by a lost CUDA context (the rows so far are saved)
E2E_UNIT = ("e2e", None)  # the BERT training step's place in the list of (shape, mode) units
E2E_INTERRUPTED = "interrupted by the time limit before it finished"
QUICK_PROVIDERS = ("eager", "fused", "noop")  # compile left out: inductor's first CPU compile takes ~25 s


def shape_argument(text: str) -> cmi_op.Shape:
    try:
        return cmi_op.parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        formatter_class=DefaultsHelpFormatter,
        description="Benchmark cmi_loss (fused triton vs eager torch vs torch.compile) and a BERT training step.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke subset for CI: tiny shapes, wall timing, providers eager/fused/noop, tiny BERT",
    )
    parser.add_argument(
        "--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the JSON/markdown/PNG go (default: %(default)s)"
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=shape_argument,
        metavar="NxD:C[:DTYPE]",
        help="shapes to time instead of the default set, e.g. 4096x768:2:bf16 32x768:2:fp32",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=cmi_op.PROVIDERS,
        help="default: fused eager compile noop (quick: eager fused noop)",
    )
    parser.add_argument("--modes", nargs="+", choices=cmi_op.MODES, default=list(cmi_op.MODES))
    parser.add_argument("--passes", nargs="+", choices=cmi_op.PASSES, default=list(cmi_op.PASSES))
    parser.add_argument(
        "--timings",
        nargs="+",
        choices=cmi_op.TIMINGS,
        default=list(cmi_op.TIMINGS),
        help="device timing needs CUDA and is dropped on CPU",
    )
    parser.add_argument("--no-op-bench", action="store_true", help="skip the cmi_loss timings")
    parser.add_argument("--no-e2e", action="store_true", help="skip the BERT training-step benchmark")
    parser.add_argument("--e2e-rounds", type=int, help="interleaved rounds of the e2e benchmark")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge into an existing results file of the same device and day instead of replacing it",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="like --merge, but skip the shapes and modes (and the e2e benchmark) that file already has",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no new shape or mode after this many seconds; the rest is listed as skipped",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def package_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.quick or args.shapes):
        parser.error("without CUDA the fused kernels run in the Triton interpreter: use --quick or small --shapes")
    if args.e2e_rounds is not None and args.e2e_rounds < 1:
        parser.error(f"--e2e-rounds must be >= 1, got {args.e2e_rounds}")
    shapes = args.shapes or (cmi_op.QUICK_SHAPES if args.quick else cmi_op.DEFAULT_SHAPES)
    providers = args.providers or (QUICK_PROVIDERS if args.quick else cmi_op.DEFAULT_PROVIDERS)
    budget = cmi_op.Budget.quick() if args.quick else cmi_op.Budget()
    if args.quick:
        torch.set_num_threads(1)  # a smoke run on a shared CI host: spinning OpenMP threads can stall it 100x
    started = time.monotonic()

    def log(message: str) -> None:
        print(message, flush=True)

    copy_tbps = cmi_op.measure_copy_tbps(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    results = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "copy_tbps": copy_tbps,
        "date": date,
        "quick": args.quick,
        "runs": [
            {
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv[1:] if argv is None else list(argv),
                "copy_tbps": copy_tbps,
            }
        ],
        "rows": [],
        "e2e": None,
        "skipped": [],
    }
    log(f"{results['device']}: torch {results['torch']}, triton {results['triton']}, copy {copy_tbps:.3f} TB/s")

    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, report.results_stem(results["device"], date))
    if args.resume and not os.path.exists(stem + ".json"):
        # A resumed run that starts after midnight (UTC) continues the device's newest file, not a new day's.
        pattern = report.results_stem(results["device"], "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]") + ".json"
        earlier = sorted(glob.glob(os.path.join(args.output_dir, pattern)))
        if earlier:
            stem = earlier[-1][: -len(".json")]
    previous = None
    if (args.merge or args.resume) and os.path.exists(stem + ".json"):
        previous = report.read_json(stem + ".json")
        results["date"] = previous["date"]  # the file's day; each run keeps its own start time
    present, failed, e2e_done, e2e_failed = set(), set(), False, False
    if args.resume and previous:
        # Rows that failed (a compile error, an OOM, a CUDA fault) count as missing: a resume measures them again,
        # their units last (a unit that faulted the CUDA context would otherwise end this process before the rest).
        present = {report.row_key(row) for row in previous["rows"] if not row.get("error")}
        failed = {(cmi_op.Shape.of_row(row), row["mode"]) for row in previous["rows"] if row.get("error")}
        previous_e2e = previous.get("e2e") or {}
        e2e_done = bool(previous_e2e.get("configs")) and not previous_e2e.get("errors")
        # failed: an exception or a config's error (where a CUDA fault lands), not the time limit's interruption
        e2e_failed = bool(previous_e2e.get("errors")) or previous_e2e.get("error", E2E_INTERRUPTED) != E2E_INTERRUPTED
        log(f"resuming {stem}.json: {len(present)} rows and {'the' if e2e_done else 'no'} e2e section done")

    # The unit of work is one shape in one mode, saved as it finishes: a run cut off by the time limit (or by
    # run_gpu.sh's SIGINT) loses at most the unit it was in. A unit is measured unless every row this invocation
    # would write for it is already in the resumed file. Mode-major order: the fixed-centroid units of every shape
    # (the device-ms targets) come before the per-batch ones, so a run cut off early has measured them.
    passes, timings = tuple(args.passes), tuple(args.timings)
    pending = [] if args.no_op_bench else [
        (shape, mode)
        for mode in args.modes
        for shape in shapes
        if not cmi_op.grid_row_keys(shape, providers, (mode,), passes, timings, device) <= present
    ]  # fmt: skip
    pending.sort(key=lambda unit: unit in failed)  # stable: the failed units last, each group in its order
    # The BERT step comes after the first mode's units (tens of seconds on an H100): a fault of the fused op inside
    # it, which ends the process, then costs no target row. After a failed attempt it goes last, like a failed unit:
    # run first again, the same fault would end the resumed process before any unit too.
    if not (args.no_e2e or e2e_done):
        first_mode_units = sum(unit[1] == args.modes[0] and unit not in failed for unit in pending)
        pending.insert(len(pending) if e2e_failed else first_mode_units, E2E_UNIT)

    def save(plot: bool = False) -> None:
        # Every unit not finished yet is listed as skipped at every save, so that a run killed outright (SIGKILL,
        # a crash in the driver) leaves a file that still says what it did not measure. The PNG only at the last
        # save (about 0.5 s a drawing, some 20 saves a GPU run): after a kill, `python -m bench.report` draws it.
        results["skipped"] = [[*dataclasses.astuple(unit[0]), unit[1]] for unit in pending if unit != E2E_UNIT]
        report.write_json(report.merge_results(previous, results) if previous else results, stem + ".json")
        report.write_report(stem + ".json", plot=plot)

    status = 0
    save()
    try:
        fused_error = cmi_op.fused_unavailable_reason()
        if fused_error:
            log(f"fused provider unavailable: {fused_error}")
        while pending:
            unit = pending[0]
            if args.time_limit is not None and time.monotonic() - started > args.time_limit:
                break
            fault = cmi_op.cuda_fault(device)
            if fault:  # every later unit would fail the same way: stop, and let a new process (--resume) go on
                log(f"the CUDA context is lost ({fault[:300]}): no further shape or mode in this process")
                status = CUDA_FAULT_STATUS
                break
            if unit == E2E_UNIT:
                settings = e2e.E2ESettings.quick() if args.quick else e2e.E2ESettings()
                if args.e2e_rounds:
                    settings = dataclasses.replace(settings, rounds=args.e2e_rounds)
                try:
                    results["e2e"] = e2e.run_e2e(settings, device, fused_error, seed=args.seed, log=log)
                except KeyboardInterrupt:
                    results["e2e"] = {"error": E2E_INTERRUPTED}
                    raise
                except Exception as error:  # e.g. transformers missing on the device: keep the op benchmark going
                    results["e2e"] = {"error": f"{type(error).__name__}: {error}"}
            else:
                shape, mode = unit
                # A unit that failed before may have faulted the CUDA context in one of our kernels, which fails every
                # case after it in that process: the torch providers go first, so that the same fault again costs
                # only the unit's fused rows, not its baselines too.
                unit_providers = providers
                if unit in failed:
                    unit_providers = sorted(providers, key=lambda provider: provider in cmi_op.TRITON_PROVIDERS)
                rows = cmi_op.run_op_bench(
                    [shape], unit_providers, (mode,), passes, timings, device, budget, copy_tbps,
                    seed=args.seed, log=log,
                )  # fmt: skip
                results["rows"] += [dict(row, run=0) for row in rows]
            pending.pop(0)
            save()
        if device.type == "cuda" and not pending:  # after every timing: the profiler may slow what follows it
            deadline = None if args.time_limit is None else started + args.time_limit
            # The rows of earlier calls too (first: a resumed file's are the fixed-centroid targets), where counted
            # in place; this call's rows replace theirs of the same key when the file is merged.
            cmi_op.add_launch_counts(
                (previous["rows"] if previous else []) + results["rows"], device, seed=args.seed,
                time_left=lambda: 1.0 if deadline is None else deadline - time.monotonic(),
            )  # fmt: skip
            save()
    except KeyboardInterrupt:  # run_gpu.sh's hard limit (SIGINT): keep what finished, say what did not, then stop
        log("interrupted: saving what finished")
        raise
    finally:
        save(plot=True)
    log(f"wrote {stem}.json / .md ({time.monotonic() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
