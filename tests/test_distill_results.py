"""The distillation write-ups, ``bench/results/glue/distill/<name>_minilm.md``, quote the committed files beside them.

- The student table is :func:`format_sweep_markdown` of ``<name>_students.json``'s arms, and the student training
  table :func:`format_training_markdown` of its runs, row labels aside (the write-up names the arms in words).
- Each teacher row quotes its run's record: the dev metric of its best epoch (and accuracy in brackets where given),
  the last epoch's training CE / CMI, and, for the runs ``select-teacher`` ranked (``<name>_selection.json``), the
  training-set CMI and the ratio. A teacher row names its run as ``<sweep>/lambda_<l>/seed_<s>``: a run of the Max-CMI
  sweep ``<name>_teachers.json`` or of the committed lambda sweep ``../<sweep>/sweep.json``.

A rerun that changes a file fails here until the write-up says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmi_fused.glue.sweep import format_sweep_markdown, format_training_markdown
from results_tables import markdown_table_rows, percent, read_json

REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_RESULTS = REPO_ROOT / "bench/results/glue"
DISTILL_RESULTS = GLUE_RESULTS / "distill"
WRITE_UPS = sorted(path.name.removesuffix("_students.json") for path in DISTILL_RESULTS.glob("*_students.json"))
STUDENT_TABLE = "| arm | seeds | per seed |"
STUDENT_TRAINING_TABLE = "| arm | `train_ce` | `train_kl` |"
# "86.91 (80.88)": the task's metric, then accuracy where the metric is another one.
METRIC_CELL = re.compile(r"(?P<metric>\d+\.\d\d)(?: \((?P<accuracy>\d+\.\d\d)\))?")


def write_up(name: str) -> str:
    return (DISTILL_RESULTS / f"{name}_minilm.md").read_text(encoding="utf-8")


def teacher_record(name: str, run: str) -> dict:
    """The record of ``run`` (``<sweep>/lambda_<l>/seed_<s>``) in the teacher sweep or in the lambda sweep it names."""
    output_dir = f"runs/{run}"
    sweep_files = [DISTILL_RESULTS / f"{name}_teachers.json", GLUE_RESULTS / run.split("/")[0] / "sweep.json"]
    for sweep_file in sweep_files:
        if sweep_file.exists():
            for record in read_json(sweep_file)["runs"]:
                if record["output_dir"] == output_dir:
                    return record
    raise AssertionError(f"{name}: no committed sweep holds the teacher {run}")


def assert_rows_quote(name: str, written_rows: list, expected_rows: list) -> None:
    """The write-up's rows have the generated rows' cells after the label, in the same order."""
    assert len(written_rows) == len(expected_rows), f"{name}: the write-up has another number of arms"
    for written, expected in zip(written_rows, expected_rows, strict=True):
        assert written[1:] == expected[1:], f"{name}, {written[0]}"


def test_every_students_file_has_its_write_up():
    assert WRITE_UPS, "no distillation sweep is committed"
    for name in WRITE_UPS:
        assert (DISTILL_RESULTS / f"{name}_minilm.md").exists(), name


@pytest.mark.parametrize("name", WRITE_UPS)
def test_the_student_table_quotes_the_students_file(name):
    students = read_json(DISTILL_RESULTS / f"{name}_students.json")
    generated = format_sweep_markdown("", students["metric"], students["arms"], "arm", "the first arm")
    written_rows = markdown_table_rows(write_up(name), STUDENT_TABLE)
    assert_rows_quote(name, written_rows, markdown_table_rows(generated, STUDENT_TABLE))


@pytest.mark.parametrize("name", WRITE_UPS)
def test_the_student_training_table_quotes_the_students_file(name):
    written_rows = markdown_table_rows(write_up(name), STUDENT_TRAINING_TABLE)
    runs = read_json(DISTILL_RESULTS / f"{name}_students.json")["runs"]
    generated = format_training_markdown(runs, "arm", ("train_ce", "train_kl"))
    assert_rows_quote(name, written_rows, markdown_table_rows(generated, STUDENT_TRAINING_TABLE))


@pytest.mark.parametrize("name", WRITE_UPS)
def test_the_teacher_table_quotes_the_teacher_runs(name):
    metric = read_json(DISTILL_RESULTS / f"{name}_students.json")["metric"]
    ranked = {run["run"]: run for run in read_json(DISTILL_RESULTS / f"{name}_selection.json")["runs"]}
    rows = markdown_table_rows(write_up(name), "| teacher |")
    assert len(rows) == 1 + len(ranked), f"{name}: one CE teacher and every ranked Max-CMI teacher"
    for label, _cmi, _cmi_lambda, metric_cell, training_cell, train_set_cmi, ratio in rows:
        run = label.strip("`")
        record = teacher_record(name, run)
        match = METRIC_CELL.fullmatch(metric_cell)
        assert match, f"{name}, {run}: cannot read the cell {metric_cell!r}"
        assert match["metric"] == percent(record["best"][metric]), f"{name}, {run}"
        if match["accuracy"]:
            assert match["accuracy"] == percent(record["best"]["accuracy"]), f"{name}, {run}"
        if f"runs/{run}" in ranked:
            assert train_set_cmi == f"{ranked[f'runs/{run}']['train_set_cmi']:.4f}", f"{name}, {run}"
            assert ratio == f"{ranked[f'runs/{run}']['ratio']:.3f}", f"{name}, {run}"
        assert "history" in record, f"{name}, {run}: its sweep file keeps no history"
        last_epoch = record["history"][-1]
        assert training_cell == f"{last_epoch['train_ce']:.3f} / {last_epoch['train_cmi']:.3f}", f"{name}, {run}"
