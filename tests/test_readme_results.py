"""The README's GLUE results tables quote the committed sweep files, ``bench/results/glue/<sweep>/sweep.json``: every
median, paired difference, win count, tie count and sign-test p of the metric tables as ``sweep.md`` rounds it (metric
x 100, two decimals), and every last-epoch training range (min .. max over the seeds, two decimals) of the training
tables. Each sweep file has its metric row and its training rows. A rerun that changes a sweep file fails here until
the README says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from results_tables import markdown_table_rows, percent, read_json

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench/results/glue"
# The subset sweeps: CE and both lambdas. README row label (before " (<metric>)") -> sweep folder.
SUBSET_HEADER = "| task (metric x 100, median of 6 seeds) | CE | Min-CMI lambda 0.05 | Min-CMI lambda 0.5 |"
SUBSET_TRAINING_HEADER = (
    "| task: last epoch, min .. max over the 6 seeds | CE | Min-CMI lambda 0.05 | Min-CMI lambda 0.5 |"
)
SUBSET_SWEEPS = {"CoLA": "cola", "MRPC": "mrpc", "SST-2": "sst2", "SST-2, epoch centroids": "sst2-epoch"}
SUBSET_LAMBDAS = (0.0, 0.05, 0.5)
# The follow-ups on more data: CE and one lambda, named in the row label ("..., lambda 0.5").
FOLLOW_UP_HEADER = "| follow-up (metric x 100, median of 6 seeds) | CE | Min-CMI |"
FOLLOW_UP_TRAINING_HEADER = "| follow-up: last epoch, min .. max over the 6 seeds | CE | Min-CMI |"
FOLLOW_UP_SWEEPS = {
    "SST-2, first 5000 rows": "sst2-5k",
    "CoLA, full training set": "cola-full",
    "MRPC, full training set": "mrpc-full",
}
TRAINING_TABLES = ((SUBSET_TRAINING_HEADER, SUBSET_SWEEPS), (FOLLOW_UP_TRAINING_HEADER, FOLLOW_UP_SWEEPS))
RESULT_FOLDERS = {*SUBSET_SWEEPS.values(), *FOLLOW_UP_SWEEPS.values()}
TRAINING_TERMS = ("train_cmi", "train_ce")
# "6.23 (paired Δ median +1.02, 4/6 seeds better, sign test p 0.69)" or its short form "80.79 (Δ +0.17, 3/6; 2 ties,
# p 0.62)"; the README writes minus signs as U+2212.
ARM_CELL = re.compile(
    r"(?P<median>−?\d+\.\d\d) \((?:paired )?Δ (?:median )?(?P<diff>[+−]\d+\.\d\d), (?P<wins>\d+)/(?P<seeds>\d+)"
    r"(?: seeds better)?(?:; (?P<ties>\d+) ties?)?, (?:sign test )?p (?P<p>\d\.\d\d)\)"
)


def readme_table_rows(header: str) -> dict:
    """``{row label: [cells after the label]}`` of the README table under ``header``."""
    rows = markdown_table_rows((REPO_ROOT / "README.md").read_text(encoding="utf-8"), header)
    assert rows, f"the README has no table under {header!r}"
    return {label: cells for label, *cells in rows}


def metric_rows(header: str) -> dict:
    """The metric table's rows keyed by their label without the metric's name: "CoLA (Matthews corr.)" -> "CoLA"."""
    return {label.rsplit(" (", 1)[0]: cells for label, cells in readme_table_rows(header).items()}


def committed_sweep(folder: str) -> dict:
    return read_json(RESULTS / folder / "sweep.json")


def follow_up_rows() -> dict:
    """The follow-up metric table as ``{label: (lambda, cells)}``: "SST-2, first 5000 rows, lambda 0.5" ->
    "SST-2, first 5000 rows" and 0.5."""
    rows = {}
    for row, cells in metric_rows(FOLLOW_UP_HEADER).items():
        match = re.fullmatch(r"(?P<label>.*), lambda (?P<cmi_lambda>\d+(?:\.\d+)?)", row)
        assert match, f"the follow-up row {row!r} names no lambda"
        rows[match["label"]] = (float(match["cmi_lambda"]), cells)
    return rows


def assert_arm_cell(cell: str, arm: dict, where: str) -> None:
    match = ARM_CELL.fullmatch(cell)
    assert match, f"{where}: cannot read the cell {cell!r}"
    ties = len(arm["paired_diffs"]) - arm["wins"] - arm["losses"]
    assert match["median"] == percent(arm["median"]), where
    assert match["diff"] == percent(arm["diff_median"], sign=True), where
    assert (int(match["wins"]), int(match["seeds"])) == (arm["wins"], len(arm["seeds"])), where
    assert int(match["ties"] or 0) == ties, where
    assert match["p"] == f"{arm['sign_test_p']:.2f}", where


def training_ranges(folder: str, term: str, lambdas) -> list:
    runs = committed_sweep(folder)["runs"]
    assert all("history" in run for run in runs), f"{folder}/sweep.json keeps no histories: rerun its command"
    ranges = []
    for cmi_lambda in lambdas:
        last_epochs = [run["history"][-1][term] for run in runs if run["lambda"] == cmi_lambda]
        assert len(last_epochs) == 6
        ranges.append(f"{min(last_epochs):.2f} .. {max(last_epochs):.2f}")
    return ranges


def test_every_committed_sweep_has_its_rows():
    folders = sorted(path.parent.name for path in RESULTS.glob("*/sweep.json"))
    assert folders == sorted(RESULT_FOLDERS)
    assert sorted(metric_rows(SUBSET_HEADER)) == sorted(SUBSET_SWEEPS)
    assert sorted(follow_up_rows()) == sorted(FOLLOW_UP_SWEEPS)
    for header, sweeps in TRAINING_TABLES:
        expected = [f"{label} `{term}`" for label in sweeps for term in TRAINING_TERMS]
        assert sorted(readme_table_rows(header)) == sorted(expected)


@pytest.mark.parametrize("label", sorted(SUBSET_SWEEPS))
def test_the_subset_table_quotes_the_sweep_file(label):
    arms = {arm["arm"]: arm for arm in committed_sweep(SUBSET_SWEEPS[label])["lambdas"]}
    assert tuple(sorted(arms)) == SUBSET_LAMBDAS
    ce_cell, *arm_cells = metric_rows(SUBSET_HEADER)[label]
    assert ce_cell == percent(arms[0.0]["median"])
    for cell, cmi_lambda in zip(arm_cells, SUBSET_LAMBDAS[1:], strict=True):
        assert_arm_cell(cell, arms[cmi_lambda], f"{label}, lambda {cmi_lambda}")


@pytest.mark.parametrize("label", sorted(FOLLOW_UP_SWEEPS))
def test_the_follow_up_table_quotes_the_sweep_file(label):
    cmi_lambda, (ce_cell, arm_cell) = follow_up_rows()[label]
    arms = {arm["arm"]: arm for arm in committed_sweep(FOLLOW_UP_SWEEPS[label])["lambdas"]}
    assert sorted(arms) == [0.0, cmi_lambda], f"{label}, lambda {cmi_lambda}: the sweep's lambdas are {sorted(arms)}"
    assert ce_cell == percent(arms[0.0]["median"])
    assert_arm_cell(arm_cell, arms[cmi_lambda], f"{label}, lambda {cmi_lambda}")


@pytest.mark.parametrize(
    ("header", "label", "folder"),
    [
        pytest.param(header, label, folder, id=folder)
        for header, sweeps in TRAINING_TABLES
        for label, folder in sweeps.items()
    ],
)
def test_the_training_tables_quote_the_sweep_file(header, label, folder):
    lambdas = sorted(arm["arm"] for arm in committed_sweep(folder)["lambdas"])
    rows = readme_table_rows(header)
    for term in TRAINING_TERMS:
        assert rows[f"{label} `{term}`"] == training_ranges(folder, term, lambdas)
