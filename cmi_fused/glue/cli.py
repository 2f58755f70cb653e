"""``cmi-glue``: fine-tune on GLUE with Min-CMI / Max-CMI (``train``), sweep lambda (``sweep``), and distil a teacher
into a smaller student (``select-teacher``, ``distill``, ``distill-sweep``).

Each subcommand is a ``register_<name>(subparsers)`` on top of ``add_common_args`` and the ``run_...`` function it
sets as ``func``; further subcommands plug in the same way in :func:`build_parser`. This module loads no
transformers, datasets or scikit-learn: a command imports the driver that runs it (:mod:`.train`, :mod:`.sweep`,
:mod:`.distill_cli`) once its settings have passed their checks, so that ``--help`` and usage errors come at once
(2.2 s against 7 s on a 2-core CPU host, most of it torch's import).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence

import torch

from ..cli_help import DefaultsHelpFormatter
from ..distributed import is_main_process, process_group_initialized
from ..options import check_int, check_number, check_temperature
from ..regularizer import CENTROID_MODES, NORMALIZATIONS
from .config import CMI_SIGNS, FEATURES, MAX_SEED, DistillConfig, TrainConfig
from .tasks import TASKS


def parse_list(kind, check=None):
    """An argparse type for comma-separated lists (``0,0.1,0.5``); ``check(value)``, if given, raises a ValueError for
    a value out of range, which argparse then reports as a usage error naming the option."""

    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from error
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {kind.__name__}, got {text!r}")
        for value in values if check is not None else ():
            try:
                check(value)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from error
        return values

    return parse


parse_seeds = parse_list(int, functools.partial(check_int, "seed", low=0, high=MAX_SEED))


def positive_int(text: str) -> int:
    """An argparse type for a count that has no config to check it (``select-teacher --batch-size``)."""
    try:
        return check_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None


def parse_layers(text: str) -> list[int]:
    """``"0,2,4"`` -> ``[0, 2, 4]`` (the ``--student-layers`` option; argparse reports a malformed one)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,2,4, got {text!r}") from None


def whole_epochs(text: str) -> float:
    """``--epochs``: a positive whole number (evaluation, checkpoints and the history are per epoch), as a float."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of epochs, got {text!r}")
    return value


def add_common_args(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    """Task, model, data and training options shared by every subcommand (``with_model=False``: no ``--model``)."""
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="GLUE classification task")
    if with_model:
        parser.add_argument("--model", required=True, help="hub name or local directory of the model and tokenizer")
    parser.add_argument("--output-dir", required=True, help="where checkpoints and results are written")
    parser.add_argument("--data-dir", help="GLUE TSV root (<dir>/<TASK>/train.tsv, dev.tsv); default: datasets hub")
    # "5", not 5.0: argparse parses a string default with the type (a float for TrainingArguments), --help shows "5"
    parser.add_argument("--epochs", type=whole_epochs, default="5", help="a positive whole number")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the steps with linear warmup")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 mixed precision (autocast; on a machine without an accelerator, CPU autocast)",
    )
    parser.add_argument(
        "--full-determinism",
        action="store_true",
        help="bit-identical reruns on a GPU: torch.use_deterministic_algorithms (the CMI kernels' fixed-order class "
        "sums included), as run_glue.py's --full_determinism; slower",
    )
    parser.add_argument("--max-train-samples", type=int, help="keep the first N training rows")
    parser.add_argument("--max-eval-samples", type=int, help="keep the first N rows of each evaluation split")
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the best and the last checkpoint-* (with optimizer state; train --resume continues the last)",
    )
    parser.add_argument("--disable-tqdm", action="store_true")


def add_cmi_args(parser: argparse.ArgumentParser, default_cmi: str = "none") -> None:
    """The CMI regulariser options."""
    parser.add_argument(
        "--cmi",
        choices=tuple(CMI_SIGNS),
        default=default_cmi,
        help="min: CE + lambda*CMI, max: CE - lambda*CMI, none: CE (CMI only logged)",
    )
    parser.add_argument("--centroids", choices=CENTROID_MODES, default="batch")
    parser.add_argument(
        "--feature",
        choices=FEATURES,
        default="pooled",
        help="pooled: the classifier input; cls: last hidden state of the first token",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="T of f = softmax(feature / T); pick it for the features' scale: at T 1 small features (a pretrained "
        "pooler's) leave f nearly uniform and the CMI term near 0 (README: 0.1 in its runs)",
    )
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="none")
    parser.add_argument("--momentum", type=float, default=0.9, help="EMA momentum of --centroids ema")


def report(*lines: str) -> None:
    """Print a command's summary lines, once under ``torchrun`` (rank 0)."""
    if is_main_process():
        print("\n".join(lines))


def config_from_args(args: argparse.Namespace, config_class=TrainConfig, **overrides):
    """A ``config_class`` (:class:`TrainConfig` or :class:`DistillConfig`) from parsed arguments and ``overrides``
    (fields the parser lacks keep their defaults). With ``disable_tqdm`` it also turns the libraries' progress bars off,
    once the settings have passed."""
    fields = {name: getattr(args, name) for name in config_class.__dataclass_fields__ if hasattr(args, name)}
    fields.update(overrides)
    config = build_config(config_class, fields, args)
    if config.disable_tqdm:  # after the checks: turning the bars off imports datasets and transformers
        disable_progress_bars()
    return config


def disable_progress_bars() -> None:
    """``--disable-tqdm`` beyond the Trainer's bars: tokenising, weight loading and saving."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def build_config(config_class, fields: dict, args: argparse.Namespace):
    """``config_class(**fields)``. A value it refuses is a usage error of the command, reported as argparse reports a
    malformed one (``cmi-glue train: error: --cmi-lambda must be >= 0 ...``, exit status 2, no traceback), with the
    fields the message names as options: its first word, and every word with an underscore (``keep_checkpoints``),
    where they are fields. Arguments from another parser than :func:`build_parser`'s (no ``usage_error``) get the
    config's own ``ValueError``."""
    try:
        return config_class(**fields)
    except ValueError as error:
        usage_error = getattr(args, "usage_error", None)
        if usage_error is None:
            raise

        def as_option(name: str) -> str:
            return "--" + name.replace("_", "-") if name in config_class.__dataclass_fields__ else name

        first, _, rest = str(error).partition(" ")
        rest = re.sub(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b", lambda match: as_option(match.group(0)), rest)
        usage_error(f"{as_option(first)} {rest}")


def run_train(args: argparse.Namespace) -> None:
    config = config_from_args(args)  # a usage error before the slow imports
    from .train import RESULTS_FILE, train

    results = train(config)
    best = ", ".join(f"{name} {value:.4f}" for name, value in results["best"].items())
    where = os.path.join(args.output_dir, RESULTS_FILE)
    report(f"{args.task}: best epoch {results['best_epoch']}: {best}; results in {where}")


def run_sweep_command(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    from .sweep import run_sweep

    command = "cmi-glue " + " ".join(shlex.quote(arg) for arg in args.argv)
    summary = run_sweep(config, args.lambdas, args.seeds, command=command)
    lines = []
    for row in summary["lambdas"]:
        diff = f", paired diff median {row['diff_median']:+.4f}" if row["arm"] != 0 and row["paired_diffs"] else ""
        lines.append(f"lambda {row['arm']:g}: median {summary['metric']} {row['median']:.4f}{diff}")
    report(*lines, f"table in {args.output_dir}/sweep.md")


def register_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune one model on one task")
    add_common_args(parser)
    add_cmi_args(parser)
    parser.add_argument("--cmi-lambda", type=float, default=0.1, help="lambda >= 0; the sign comes from --cmi")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.set_defaults(func=run_train)


def register_sweep(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="CE and every lambda with the same seeds; sweep.json/sweep.md")
    add_common_args(parser)
    add_cmi_args(parser, default_cmi="min")
    # list defaults as strings: argparse parses them with the type, and --help shows them as they are typed
    parser.add_argument(
        "--lambdas",
        type=parse_list(float, functools.partial(check_number, "lambda", low=0.0)),
        default="0,0.05,0.1,0.2,0.5,1",
        help="comma-separated, each >= 0 (the sign comes from --cmi)",
    )
    parser.add_argument("--seeds", type=parse_seeds, default="0,1,2", help="comma-separated")
    parser.set_defaults(func=run_sweep_command)


def distill_config_from_args(args: argparse.Namespace, **overrides) -> DistillConfig:
    """A :class:`DistillConfig` from parsed arguments; ``model`` is the student's weight source."""
    student, teacher = overrides.get("student", args.student), overrides.get("teacher", args.teacher)
    return config_from_args(args, DistillConfig, model=student or teacher, **overrides)


def run_distill_command(args: argparse.Namespace) -> None:
    config = distill_config_from_args(args)
    from . import distill_cli
    from .train import RESULTS_FILE

    results = distill_cli.distill(config)
    best = ", ".join(f"{name} {value:.4f}" for name, value in results["best"].items())
    where = os.path.join(args.output_dir, RESULTS_FILE)
    report(f"{args.task}: student best epoch {results['best_epoch']}: {best}; results in {where}")


def run_select_teacher_command(args: argparse.Namespace) -> None:
    from ..distill import select_teacher
    from .distill_cli import teacher_candidates

    run_dirs, left_out = teacher_candidates(args.runs)
    selection = select_teacher(run_dirs, args.data_dir, args.batch_size)
    metric = selection["metric"]
    print(f"| run | cmi | lambda | best {metric} | training-set CMI | ratio |")
    print("|---|---|---|---|---|---|")
    for row in selection["runs"]:
        cmi_lambda = "-" if row["cmi"] == "none" else f"{row['cmi_lambda']:g}"  # a CE run's lambda is unused
        print(
            f"| {row['run']} | {row['cmi']} | {cmi_lambda} | {row['best_metric']:.4f} | "
            f"{row['train_set_cmi']:.4g} | {row['ratio']:.4f} |"
        )
    if left_out:
        print(f"left out (CE baselines of the directories given; name a run to include it): {', '.join(left_out)}")
    print(f"selected: {selection['selected']}\nwhy: {selection['reason']}")
    selected_cmi = next(row["cmi"] for row in selection["runs"] if row["run"] == selection["selected"])
    if selected_cmi != "max":
        print(f"note: the selected run was trained with --cmi {selected_cmi}; the paper distils Max-CMI teachers")
    selection["left_out"] = left_out
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(selection, handle, indent=2)


def run_distill_sweep_command(args: argparse.Namespace) -> None:
    command = "cmi-glue " + " ".join(shlex.quote(arg) for arg in args.argv)
    base = distill_config_from_args(args, teacher=args.teacher[0])
    from .distill_cli import run_distill_sweep

    summary = run_distill_sweep(base, args.teacher, args.alphas, args.kd_temperatures, args.seeds, command=command)
    lines = [f"{row['arm']}: median {summary['metric']} {row['median']:.4f}" for row in summary["arms"]]
    report(*lines, f"table in {args.output_dir}/sweep.md")


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """The common ``train`` options, with ``--student`` (alias ``--model``) in place of the required ``--model``."""
    add_common_args(parser, with_model=False)
    parser.set_defaults(epochs="10")  # parsed by --epochs' type, as its own default
    parser.add_argument(
        "--student",
        "--model",
        dest="student",
        help="student model dir or hub name (same vocabulary as the teacher); "
        "default: a DistilBERT built from the teacher's layers",
    )
    parser.add_argument(
        "--student-layers",
        type=parse_layers,
        help="teacher layers copied into the built student, e.g. 0,2,4,7,9,11 (default: evenly spread)",
    )
    parser.add_argument(
        "--cache-teacher-logits",
        action="store_true",
        help="compute the teacher's training-set logits once instead of once per batch",
    )


def register_distill(subparsers) -> None:
    parser = subparsers.add_parser("distill", help="distil a cmi-glue train teacher into a student")
    add_distill_args(parser)
    parser.add_argument("--seed", type=int, default=0)  # distill-sweep takes --seeds instead
    parser.add_argument("--teacher", required=True, help="teacher directory written by cmi-glue train")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term, in [0, 1]")
    parser.add_argument("--kd-temperature", type=float, default=2.0, help="softmax temperature T > 0 of the KD term")
    parser.set_defaults(func=run_distill_command)


def register_select_teacher(subparsers) -> None:
    parser = subparsers.add_parser("select-teacher", help="the run with the highest best-metric / training-set CMI")
    parser.add_argument(
        "--runs",
        nargs="+",
        required=True,
        help="cmi-glue train output directories, or directories of runs (a sweep): the runs inside trained with a "
        "CMI term (their CE baselines, --cmi none, are left out)",
    )
    parser.add_argument("--data-dir", help="GLUE TSV root; default: the one each run was trained with")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--json", help="also write the selection to this JSON file")
    parser.set_defaults(func=run_select_teacher_command)


def register_distill_sweep(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill-sweep",
        help="teachers x alpha x T x seeds; sweep.json/sweep.md (first arm = baseline)",
    )
    add_distill_args(parser)
    parser.add_argument("--teacher", nargs="+", required=True, help="one or more teacher directories")
    # list defaults as strings: argparse parses them with the type, and --help shows them as they are typed
    parser.add_argument(
        "--alphas",
        type=parse_list(float, functools.partial(check_number, "alpha", low=0.0, high=1.0)),
        default="0,0.5",
        help="comma-separated, each in [0, 1]",
    )
    parser.add_argument(
        "--kd-temperatures",
        type=parse_list(float, functools.partial(check_temperature, name="KD temperature")),
        default="2",
        help="comma-separated, each > 0",
    )
    parser.add_argument("--seeds", type=parse_seeds, default="0,1,2", help="comma-separated")
    parser.set_defaults(func=run_distill_sweep_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmi-glue",
        description="Fine-tune on GLUE with Min-CMI / Max-CMI (train), sweep lambda (sweep), and distil a teacher "
        "into a smaller student (select-teacher, distill, distill-sweep).",
    )
    # every subcommand's --help shows its defaults
    subparsers = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=DefaultsHelpFormatter),
    )
    register_train(subparsers)
    register_sweep(subparsers)
    register_distill(subparsers)
    register_select_teacher(subparsers)
    register_distill_sweep(subparsers)
    for command_parser in subparsers.choices.values():  # build_config reports a refused setting with it
        command_parser.set_defaults(usage_error=command_parser.error)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    grouped_before = process_group_initialized()
    args.func(args)
    if not grouped_before and process_group_initialized():
        # Under torchrun the Trainer joined a process group: leave it while the interpreter is whole, not to a caller
        # that goes on. This made a rank's abort at exit rarer (the CPU torchrun test: 3 of 18 whole-suite runs
        # before, 0 of 19 after), not impossible: console_main says why and ends it. Only after a command
        # succeeded: a failed rank would wait here for the others.
        torch.distributed.destroy_process_group()


def console_main() -> None:
    """The ``cmi-glue`` program (and ``python -m cmi_fused.glue``): :func:`main`, then, in a rank of a multi-process
    launch (torchrun's ``WORLD_SIZE`` > 1) whose command succeeded, an exit that skips interpreter finalisation.

    Leaving the process group does not stop gloo's worker threads, and one of them can still hold the last reference
    to a finished collective (an all-gather) when the interpreter starts finalising. Freeing that work's tensors
    takes the GIL; a thread that asks for the GIL during finalisation is ended by pthread_exit, whose unwinding
    through the work's noexcept destructor calls std::terminate: the rank aborts (SIGABRT, "terminate called without
    an active exception") after all its work is written, and torchrun reports the whole run as failed. The core of
    such a rank shows exactly that (``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` -> ``decref_pyobject``
    -> ``take_gil`` -> ``pthread_exit`` -> ``std::terminate``, main thread in ``Py_FinalizeEx``); it happened in 1
    of 40 launches of ``main`` alone with setup.py's floors (torch's decref checks ``Py_IsInitialized``, still true
    while finalising: pytorch/pytorch#190489, open). Nothing of ours needs finalisation (the Trainer reports to
    nothing and has saved everything), so the rank flushes its output and exits with 0 at once.
    """
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    console_main()
