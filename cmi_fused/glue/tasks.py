"""The eight GLUE classification tasks: how each is stored (TSV and Hugging Face) and scored.

Plain data, no ``datasets`` or ``transformers``: the command line builds its choices from it without loading them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored (TSV and Hugging Face) and scored.

    ``tsv_text_columns`` / ``tsv_label_column``: header names, or column indices for header-less files.
    ``tsv_labels_are_names``: the TSV holds each label by name (one of ``label_names``, whose index is the id).
    ``eval_files``: evaluation split name -> TSV file name; the split names are the Hugging Face splits, or their
    short forms (MNLI's ``matched`` for ``validation_matched``: ``data.HF_EVAL_SPLITS``).
    ``skip_short_rows``: rows with too few columns are skipped with a warning instead of an error (QQP, whose
    official files have a few such rows; Hugging Face's ``QqpProcessor`` skipped them too).
    ``label_names``: the label of each id, as Hugging Face's GLUE datasets name them (the models' ``id2label``).
    """

    name: str
    dir_name: str
    label_names: tuple
    metric: str
    tsv_text_columns: tuple
    tsv_label_column: object
    hf_text_columns: tuple
    tsv_labels_are_names: bool = False
    has_header: bool = True
    eval_files: tuple = (("validation", "dev.tsv"),)
    skip_short_rows: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def eval_split_names(self) -> tuple:
        return tuple(name for name, _ in self.eval_files)


TASKS = {
    "cola": GlueTask(
        "cola", "CoLA", ("unacceptable", "acceptable"), "matthews_correlation", (3,), 1, ("sentence",),
        has_header=False,
    ),
    "sst2": GlueTask("sst2", "SST-2", ("negative", "positive"), "accuracy", ("sentence",), "label", ("sentence",)),
    "mrpc": GlueTask(
        "mrpc", "MRPC", ("not_equivalent", "equivalent"), "f1", ("#1 String", "#2 String"), "Quality",
        ("sentence1", "sentence2"),
    ),
    "qqp": GlueTask(
        "qqp", "QQP", ("not_duplicate", "duplicate"), "f1", ("question1", "question2"), "is_duplicate",
        ("question1", "question2"), skip_short_rows=True,
    ),
    "qnli": GlueTask(
        "qnli", "QNLI", ("entailment", "not_entailment"), "accuracy", ("question", "sentence"), "label",
        ("question", "sentence"), tsv_labels_are_names=True,
    ),
    "rte": GlueTask(
        "rte", "RTE", ("entailment", "not_entailment"), "accuracy", ("sentence1", "sentence2"), "label",
        ("sentence1", "sentence2"), tsv_labels_are_names=True,
    ),
    "wnli": GlueTask(
        "wnli", "WNLI", ("not_entailment", "entailment"), "accuracy", ("sentence1", "sentence2"), "label",
        ("sentence1", "sentence2"),
    ),
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        ("entailment", "neutral", "contradiction"),
        "matched_accuracy",
        ("sentence1", "sentence2"),
        "gold_label",
        ("premise", "hypothesis"),
        tsv_labels_are_names=True,
        eval_files=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
    ),
}  # fmt: skip


def task_key(task: str) -> str:
    """The :data:`TASKS` key of a task name as written (``MRPC``, ``SST-2``, ``sst2``)."""
    return task.lower().replace("-", "")


def get_task(task: str) -> GlueTask:
    key = task_key(task)
    if key not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[key]
