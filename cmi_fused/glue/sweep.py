"""Lambda sweeps: CE (lambda = 0) and every lambda with the same seeds, summarised per lambda.

For arm ``a`` with best-epoch metric ``m[a, s]`` on seed ``s`` and the baseline arm ``b``:
median over seeds of ``m[a, s]``, mean and std, and the paired differences ``m[a, s] - m[b, s]``
(median, min, max, number of seeds where ``a`` wins and loses, and the two-sided exact sign test over the
seeds that are not tied: ``P`` of at least that lopsided a split of wins and losses if either arm were as
likely to win a seed). The table code works on any arms (the distillation sweeps reuse it).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence

import filelock
import torch
from scipy.stats import binomtest

from ..distributed import is_main_process
from .config import TrainConfig, changed_settings
from .data import load_task
from .train import RESULTS_FILE, train


def reuse_or_run(config: TrainConfig, run: Callable[[], dict]) -> dict:
    """The ``results.json`` in ``config.output_dir`` if it holds one of the same settings (a sweep resumes where it
    stopped), else ``run()``. One of other settings (another --cmi, --temperature, ...) raises a ``ValueError``
    naming them, instead of being summarised under the new settings."""
    results_path = os.path.join(config.output_dir, RESULTS_FILE)
    if not os.path.isfile(results_path):
        results = run()
        # The finished run's model and optimizer state (on a GPU) go before the next run allocates its own, also where
        # a reference cycle holds them: under --bf16 accelerate binds the model's wrapped forward to the model itself.
        gc.collect()
        return results
    with open(results_path) as handle:
        results = json.load(handle)
    changes = changed_settings(config, results.get("config", {}))
    if changes:
        raise ValueError(
            f"{config.output_dir} holds a finished run of other settings ({changes}): "
            "give the sweep another --output-dir, or delete that run to redo it"
        )
    return results


def reuse_or_run_each(jobs: Sequence[tuple[TrainConfig, Callable[[], dict]]]) -> list:
    """:func:`reuse_or_run` for every ``(config, run)`` job; the results in job order.

    Sweeps running side by side into one output directory share its runs: each run is trained or read under a lock
    on the file ``<run dir>.lock``; a run whose lock another process holds (it is training that run) is put off
    until this process has been through the others, then waited for and read back once finished there (trained
    here if that process stopped without finishing it). Under ``torchrun`` (``WORLD_SIZE`` > 1) all processes train
    each run together, so runs are not locked.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return [reuse_or_run(config, run) for config, run in jobs]
    results, put_off = [None] * len(jobs), []
    for index, (config, run) in enumerate(jobs):
        lock = run_lock(config.output_dir)
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            print(f"{config.output_dir}: another process is training this run; coming back to it later", flush=True)
            put_off.append(index)
            continue
        try:
            results[index] = reuse_or_run(config, run)
        finally:
            lock.release()
    for index in put_off:
        config, run = jobs[index]
        with run_lock(config.output_dir):  # blocks until the other process is done with the run
            results[index] = reuse_or_run(config, run)
    return results


def run_lock(output_dir: str) -> filelock.FileLock:
    """The lock of the run in ``output_dir``: the file ``<output_dir>.lock`` beside it (kept after release)."""
    lock_path = os.path.normpath(output_dir) + ".lock"
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    return filelock.FileLock(lock_path)


def cpu_model() -> str:
    """The CPU's model name (Linux: the first ``model name`` of /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine_description() -> str:
    """One line: GPU or CPU model, cores, torch threads, torch version. On the CPU it names the instruction set of
    torch's CPU kernels (AVX2, AVX512, ...): the same run on CPUs whose kernels differ can round differently."""
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        device = (
            f"CPU only ({platform.machine()}, {cpu_model()}, "
            f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()})"
        )
    return (
        f"{device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"torch intra-op threads: {torch.get_num_threads()}, {platform.system()} {platform.release()}"
    )


def summarize_arms(values: dict, baseline) -> list:
    """Per arm: ``values[arm][seed]`` (metric of the best epoch) summarised against ``values[baseline]``.

    Returns one dict per arm (baseline first): ``arm``, ``seeds``, ``values``, ``median``, ``mean``,
    ``std``, and, for the seeds the baseline also has, ``paired_diffs``, ``diff_median``, ``diff_min``,
    ``diff_max``, ``wins``, ``losses`` (ties are neither) and ``sign_test_p`` (two-sided exact sign test of
    wins against losses; 1.0 when every seed ties).
    """
    if baseline not in values:
        raise ValueError(f"the baseline arm {baseline!r} has no runs")
    arms = [baseline] + [arm for arm in values if arm != baseline]
    rows = []
    for arm in arms:
        per_seed = values[arm]
        seeds = sorted(per_seed)
        scores = [per_seed[seed] for seed in seeds]
        row = {
            "arm": arm,
            "seeds": seeds,
            "values": scores,
            "median": statistics.median(scores),
            "mean": statistics.fmean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        }
        paired = [seed for seed in seeds if seed in values[baseline]]
        diffs = [per_seed[seed] - values[baseline][seed] for seed in paired]
        row["paired_diffs"] = diffs
        if diffs:
            wins, losses = sum(diff > 0 for diff in diffs), sum(diff < 0 for diff in diffs)
            row.update(
                diff_median=statistics.median(diffs),
                diff_min=min(diffs),
                diff_max=max(diffs),
                wins=wins,
                losses=losses,
                sign_test_p=binomtest(wins, wins + losses).pvalue if wins + losses else 1.0,
            )
        rows.append(row)
    return rows


def format_sweep_markdown(
    title: str, metric: str, rows: list, arm_header: str, baseline_name: str, notes: Sequence[str] = ()
) -> str:
    """A markdown table of :func:`summarize_arms` rows (metric values x 100)."""
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += [
        f"- metric: `{metric}` of the best epoch, x 100; paired difference = arm - {baseline_name} on the same seed",
        "",
        f"| {arm_header} | seeds | per seed | median | mean ± std | Δ median vs {baseline_name} | Δ min .. max "
        "| wins | sign test p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_seed = ", ".join(f"{100 * value:.2f}" for value in row["values"])
        if row["arm"] == rows[0]["arm"]:
            diff_cells = ["—", "—", "—", "—"]
        elif row["paired_diffs"]:
            diff_cells = [
                f"{100 * row['diff_median']:+.2f}",
                f"{100 * row['diff_min']:+.2f} .. {100 * row['diff_max']:+.2f}",
                f"{row['wins']}/{len(row['paired_diffs'])}",
                f"{row['sign_test_p']:.2f}",
            ]
        else:
            diff_cells = ["n/a", "n/a", "0/0", "n/a"]
        lines.append(
            f"| {row['arm']} | {len(row['seeds'])} | {per_seed} | {100 * row['median']:.2f} | "
            f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} | " + " | ".join(diff_cells) + " |"
        )
    return "\n".join(lines) + "\n"


def run_record(results: dict, output_dir: str) -> dict:
    """What ``sweep.json`` keeps of a run's ``results.json`` (after the keys that place the run in the sweep)."""
    return {
        "best_epoch": results["best_epoch"],
        "best": results["best"],
        "output_dir": output_dir,
        "history": results["history"],
        "train_runtime": results.get("train_runtime"),  # absent from results.json written before it
    }


def format_training_markdown(runs: list, arm_key: str, terms: Sequence[str]) -> str:
    """A markdown table of ``runs`` (records of :func:`run_record`), one row per arm (``run[arm_key]``, first-seen
    order): every training term of the last epoch, min .. max over the arm's seeds, and the median ``train_runtime``
    in seconds (``n/a`` if a run's ``results.json`` predates that key)."""
    by_arm = {}
    for run in runs:
        by_arm.setdefault(run[arm_key], []).append(run)
    lines = [
        "",
        "Training, last epoch: each term's min .. max over the seeds (epoch means); `train_runtime`: median seconds of "
        "a run (training and its evaluations).",
        "",
        f"| {arm_key} | " + " | ".join(f"`{term}`" for term in terms) + " | `train_runtime` (s) |",
        "|---" * (len(terms) + 2) + "|",
    ]
    for arm, arm_runs in by_arm.items():
        last_epochs = [run["history"][-1] for run in arm_runs]
        cells = []
        for term in terms:
            values = [epoch[term] for epoch in last_epochs]
            cells.append(f"{min(values):.3f} .. {max(values):.3f}")
        runtimes = [run["train_runtime"] for run in arm_runs]
        cells.append("n/a" if None in runtimes else f"{statistics.median(runtimes):.0f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_sweep(output_dir: str, summary: dict, markdown: str) -> None:
    """Write ``sweep.json`` and ``sweep.md`` into ``output_dir`` (once under ``torchrun``: rank 0)."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "sweep.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(output_dir, "sweep.md"), "w") as handle:
        handle.write(markdown)


def schedule_text(config: TrainConfig) -> str:
    """A sweep note's training schedule: ``5 epochs, batch 32, lr 2e-05, max_seq_length 128``."""
    epochs = f"{config.epochs:g} epoch{'' if config.epochs == 1 else 's'}"
    return f"{epochs}, batch {config.batch_size}, lr {config.lr:g}, max_seq_length {config.max_seq_length}"


def value_label(value: float) -> str:
    """A run-directory label for a swept value: its short ``:g`` form (``0.1``, ``0``) where that reads back as the
    same float, else its exact ``repr``, so that two different values never share a run directory."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def run_dir(output_dir: str, cmi_lambda: float, seed: int) -> str:
    return os.path.join(output_dir, f"lambda_{value_label(cmi_lambda)}", f"seed_{seed}")


def run_sweep(
    base: TrainConfig,
    lambdas: Sequence[float],
    seeds: Sequence[int],
    command: str | None = None,
    train_fn: Callable = train,
) -> dict:
    """Train CE (lambda 0, ``cmi="none"``) and ``base.cmi`` at every lambda for every seed; summarise.

    Runs live in ``base.output_dir/lambda_<l>/seed_<s>``; a run whose ``results.json`` exists is read,
    not retrained (delete it to re-run), and one that another sweep is training is left to it
    (:func:`reuse_or_run_each`). Returns the ``sweep.json`` document.
    """
    if base.cmi == "none" and any(value != 0 for value in lambdas):
        raise ValueError("sweep: --cmi must be min or max (lambda 0 is the CE baseline)")
    if any(value < 0 for value in lambdas):
        raise ValueError(f"--lambdas must be >= 0 (the sign comes from --cmi), got {list(lambdas)}")
    if not seeds:
        raise ValueError("--seeds must name at least one seed")
    lambdas = [0.0] + sorted({float(value) for value in lambdas if value != 0})
    data = load_task(base.task, base.data_dir, base.max_train_samples, base.max_eval_samples)
    configs = [
        dataclasses.replace(
            base,
            output_dir=run_dir(base.output_dir, cmi_lambda, seed),
            cmi="none" if cmi_lambda == 0 else base.cmi,
            cmi_lambda=cmi_lambda,
            seed=seed,
        )
        for cmi_lambda in lambdas
        for seed in seeds
    ]
    jobs = [(config, functools.partial(train_fn, config, data)) for config in configs]
    values, runs, metric = {}, [], data.task.metric
    for config, results in zip(configs, reuse_or_run_each(jobs), strict=True):
        values.setdefault(config.cmi_lambda, {})[config.seed] = results["best"][metric]
        runs.append({"lambda": config.cmi_lambda, "seed": config.seed, **run_record(results, config.output_dir)})
    rows = summarize_arms(values, 0.0)
    summary = {
        "task": base.task,
        "metric": metric,
        "cmi": base.cmi,
        "command": command,
        "machine": machine_description(),
        "config": dataclasses.asdict(base),
        "lambdas": rows,
        "runs": runs,
    }
    notes = [f"command: `{command}`" if command else "command: (library call)", f"machine: {machine_description()}"]
    notes.append(
        f"model `{base.model}`, {schedule_text(base)}, centroids `{base.centroids}`, feature `{base.feature}`, "
        f"T {base.temperature:g}, max_train_samples {base.max_train_samples}, max_eval_samples {base.max_eval_samples}"
    )
    title = f"{base.task}: CE vs {base.cmi.capitalize()}-CMI sweep"
    markdown = format_sweep_markdown(title, metric, rows, "lambda", "CE", notes)
    markdown += format_training_markdown(runs, "lambda", ("train_ce", "train_cmi"))
    write_sweep(base.output_dir, summary, markdown)
    return summary
