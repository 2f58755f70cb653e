"""The README's GLUE results tables quote the committed sweep files, ``bench/results/glue/<task>/sweep.json``: every
median, paired difference, win count, tie count and sign-test p of the metric table as ``sweep.md`` rounds it (metric
x 100, two decimals), and every last-epoch training range (min .. max over the seeds, two decimals) of the training
table. A rerun that changes a sweep file fails here until the README says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| task (metric x 100, median of 6 seeds) | CE | Min-CMI lambda 0.05 | Min-CMI lambda 0.5 |"
TRAINING_HEADER = "| task: last epoch, min .. max over the 6 seeds | CE | Min-CMI lambda 0.05 | Min-CMI lambda 0.5 |"
SWEEP_OF_ROW = {"CoLA": "cola", "MRPC": "mrpc", "SST-2": "sst2"}
TRAINING_TERMS = ("train_cmi", "train_ce")
# "6.23 (paired Δ median +1.02, 4/6 seeds better, sign test p 0.69)" or its short form "80.79 (Δ +0.17, 3/6; 2 ties,
# p 0.62)"; the README writes minus signs as U+2212.
ARM_CELL = re.compile(
    r"(?P<median>−?\d+\.\d\d) \((?:paired )?Δ (?:median )?(?P<diff>[+−]\d+\.\d\d), (?P<wins>\d+)/(?P<seeds>\d+)"
    r"(?: seeds better)?(?:; (?P<ties>\d+) ties?)?, (?:sign test )?p (?P<p>\d\.\d\d)\)"
)


def readme_table_rows(header: str) -> dict:
    """``{row label: [cells after the label]}`` of the README table under ``header``."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(header) + 2  # past the header and its |---| line
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        label, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[label] = cells
    return rows


def committed_sweep(label: str) -> dict:
    return json.loads((REPO_ROOT / "bench/results/glue" / SWEEP_OF_ROW[label] / "sweep.json").read_text())


def percent(value: float, sign: bool = False) -> str:
    return f"{100 * value:{'+' if sign else ''}.2f}".replace("-", "−")


def test_the_tables_have_a_row_per_committed_sweep():
    metric_rows = readme_table_rows(TABLE_HEADER)
    assert sorted(label.split(" ")[0] for label in metric_rows) == sorted(SWEEP_OF_ROW)
    training_rows = readme_table_rows(TRAINING_HEADER)
    assert sorted(training_rows) == sorted(f"{label} `{term}`" for label in SWEEP_OF_ROW for term in TRAINING_TERMS)


@pytest.mark.parametrize("label", sorted(SWEEP_OF_ROW))
def test_the_readme_table_quotes_the_sweep_file(label):
    arms = {arm["arm"]: arm for arm in committed_sweep(label)["lambdas"]}
    assert sorted(arms) == [0.0, 0.05, 0.5]
    (ce_cell, *arm_cells) = next(
        cells for row, cells in readme_table_rows(TABLE_HEADER).items() if row.startswith(label)
    )
    assert ce_cell == percent(arms[0.0]["median"])
    for cell, arm in zip(arm_cells, (arms[0.05], arms[0.5]), strict=True):
        match = ARM_CELL.fullmatch(cell)
        assert match, f"{label}: cannot read the cell {cell!r}"
        ties = len(arm["paired_diffs"]) - arm["wins"] - arm["losses"]
        assert match["median"] == percent(arm["median"])
        assert match["diff"] == percent(arm["diff_median"], sign=True)
        assert (int(match["wins"]), int(match["seeds"])) == (arm["wins"], len(arm["seeds"]))
        assert int(match["ties"] or 0) == ties
        assert match["p"] == f"{arm['sign_test_p']:.2f}"


@pytest.mark.parametrize("label", sorted(SWEEP_OF_ROW))
def test_the_readme_training_table_quotes_the_sweep_file(label):
    rows = readme_table_rows(TRAINING_HEADER)
    runs = committed_sweep(label)["runs"]
    for term in TRAINING_TERMS:
        quoted = []
        for cmi_lambda in (0.0, 0.05, 0.5):
            last_epochs = [run["history"][-1][term] for run in runs if run["lambda"] == cmi_lambda]
            assert len(last_epochs) == 6
            quoted.append(f"{min(last_epochs):.2f} .. {max(last_epochs):.2f}")
        assert rows[f"{label} `{term}`"] == quoted
