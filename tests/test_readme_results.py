"""The README's GLUE results table quotes the committed sweep files: every median, paired difference, win count,
tie count and sign-test p in it is the one of ``bench/results/glue/<task>/sweep.json``, rounded as ``sweep.md``
rounds it (metric x 100, two decimals). A rerun that changes a sweep file fails here until the README says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| task (metric x 100, median of 6 seeds) | CE | Min-CMI lambda 0.05 | Min-CMI lambda 0.5 |"
SWEEP_OF_ROW = {"CoLA": "cola", "MRPC": "mrpc", "SST-2": "sst2"}
# "6.23 (paired Δ median +1.02, 4/6 seeds better, sign test p 0.69)" or its short form "80.79 (Δ +0.17, 3/6; 2 ties,
# p 0.62)"; the README writes minus signs as U+2212.
ARM_CELL = re.compile(
    r"(?P<median>−?\d+\.\d\d) \((?:paired )?Δ (?:median )?(?P<diff>[+−]\d+\.\d\d), (?P<wins>\d+)/(?P<seeds>\d+)"
    r"(?: seeds better)?(?:; (?P<ties>\d+) ties?)?, (?:sign test )?p (?P<p>\d\.\d\d)\)"
)


def readme_table_rows() -> dict:
    """``{task label: [cells after the label]}`` of the README's results table."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(TABLE_HEADER) + 2  # past the header and its |---| line
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        label, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[label.split(" ")[0]] = cells
    return rows


def percent(value: float, sign: bool = False) -> str:
    return f"{100 * value:{'+' if sign else ''}.2f}".replace("-", "−")


def test_the_table_has_a_row_per_committed_sweep():
    assert sorted(readme_table_rows()) == sorted(SWEEP_OF_ROW)


@pytest.mark.parametrize("label", sorted(SWEEP_OF_ROW))
def test_the_readme_table_quotes_the_sweep_file(label):
    sweep = json.loads((REPO_ROOT / "bench/results/glue" / SWEEP_OF_ROW[label] / "sweep.json").read_text())
    arms = {arm["arm"]: arm for arm in sweep["lambdas"]}
    assert sorted(arms) == [0.0, 0.05, 0.5]
    ce_cell, *arm_cells = readme_table_rows()[label]
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
