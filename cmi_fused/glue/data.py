"""GLUE classification tasks: official TSV files or the Hugging Face ``glue`` dataset, and tokenisation.

Every task is returned in one shape: a ``datasets.Dataset`` with the columns ``text_a``, ``text_b``
(single-sentence tasks: ``text_a`` only) and ``label`` (int in ``[0, num_labels)``, the label order of
the Hugging Face ``glue`` dataset), so that the same tokenisation and metrics serve all eight tasks.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable

import datasets

from .metrics import build_compute_metrics
from .tasks import GlueTask, get_task

HF_EVAL_SPLITS = {"matched": "validation_matched", "mismatched": "validation_mismatched"}


class GlueDataError(RuntimeError):
    """A GLUE task could not be loaded; the message says what to pass instead."""


@dataclasses.dataclass
class GlueData:
    """One loaded task: ``train`` and ``eval`` (split name -> dataset), ready for :func:`tokenize_task`."""

    task: GlueTask
    train: datasets.Dataset
    eval: dict
    num_labels: int
    compute_metrics: Callable


def _column_index(header: list | None, column, path: str) -> int:
    if isinstance(column, int):
        return column
    if column not in header:
        raise GlueDataError(
            f"{path}: expected a column named {column!r} in the header {header}; "
            "pass --data-dir pointing at the official GLUE TSV layout (<dir>/<TASK>/train.tsv, dev.tsv)"
        )
    return header.index(column)


def read_glue_tsv(path: str, task: GlueTask) -> datasets.Dataset:
    """Parse one official GLUE TSV file (``csv.QUOTE_NONE``: the sentences contain bare quotes)."""
    if not os.path.isfile(path):
        raise GlueDataError(
            f"missing GLUE file {path}; --data-dir must hold <dir>/{task.dir_name}/train.tsv and "
            f"{', '.join(name for _, name in task.eval_files)} (or omit --data-dir to use datasets.load_dataset)"
        )
    csv.field_size_limit(sys.maxsize)
    # utf-8-sig: a leading byte-order mark (the MRPC files of some GLUE downloads) is not part of the first header.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise GlueDataError(f"{path} is empty; is this the {task.dir_name} file of the official GLUE TSV layout?")
    header = rows.pop(0) if task.has_header else None
    text_indices = [_column_index(header, column, path) for column in task.tsv_text_columns]
    label_index = _column_index(header, task.tsv_label_column, path)
    needed = max(text_indices + [label_index]) + 1
    most = len(header) if header is not None else needed  # a header names every column a row may have
    columns = {"text_a": [], "label": []}
    if len(text_indices) == 2:
        columns["text_b"] = []
    first_line = 2 if header is not None else 1
    skipped = 0
    for line_number, row in enumerate(rows, start=first_line):
        if not row:
            continue
        if len(row) < needed:
            if task.skip_short_rows:
                skipped += 1
                continue
            raise GlueDataError(
                f"{path}:{line_number}: expected at least {needed} tab-separated columns for {task.name}, "
                f"got {len(row)}; is this the {task.dir_name} file of the official GLUE TSV layout?"
            )
        if len(row) > most:  # a tab inside a sentence: its text would be cut, or the next column's taken
            raise GlueDataError(
                f"{path}:{line_number}: expected {most} tab-separated columns for {task.name}, got {len(row)}; "
                "a field holds a tab, which the GLUE TSV layout cannot carry"
            )
        raw_label = row[label_index].strip()
        columns["label"].append(_parse_label(raw_label, task, path, line_number))
        columns["text_a"].append(row[text_indices[0]])
        if len(text_indices) == 2:
            columns["text_b"].append(row[text_indices[1]])
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} rows with fewer than {needed} tab-separated columns", stacklevel=2)
    if not columns["label"]:
        raise GlueDataError(f"{path} holds no examples (only a header or blank lines)")
    return datasets.Dataset.from_dict(columns)


def _parse_label(raw_label: str, task: GlueTask, path: str, line_number: int) -> int:
    if task.tsv_labels_are_names:
        if raw_label not in task.label_names:
            raise GlueDataError(
                f"{path}:{line_number}: label {raw_label!r} is not one of {sorted(task.label_names)} ({task.name})"
            )
        return task.label_names.index(raw_label)
    try:
        label = int(raw_label)
    except ValueError:
        label = -1
    if not 0 <= label < task.num_labels:
        raise GlueDataError(
            f"{path}:{line_number}: label {raw_label!r} is not an integer in [0, {task.num_labels}) ({task.name})"
        )
    return label


def _load_hub(task: GlueTask) -> tuple:
    try:
        raw = datasets.load_dataset("nyu-mll/glue", task.name)
    except Exception as error:  # offline, no cache, renamed dataset: one message with the way out
        raise GlueDataError(
            f"could not load the {task.name!r} GLUE dataset with datasets.load_dataset('nyu-mll/glue', "
            f"{task.name!r}) ({type(error).__name__}: {error}); without network access pass --data-dir DIR "
            f"with the official GLUE TSV files in DIR/{task.dir_name}/"
        ) from error

    def standardise(split: datasets.Dataset) -> datasets.Dataset:
        renames = {column: new for column, new in zip(task.hf_text_columns, ("text_a", "text_b"), strict=False)}
        keep = list(renames) + ["label"]
        split = split.remove_columns([c for c in split.column_names if c not in keep])
        return split.rename_columns(renames)

    train = standardise(raw["train"])
    evals = {name: standardise(raw[HF_EVAL_SPLITS.get(name, name)]) for name in task.eval_split_names}
    return train, evals


def _take(split: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    if limit is None or limit >= len(split):
        return split
    return split.select(range(limit))


def load_task(
    task: str,
    data_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> GlueData:
    """Load a GLUE task from ``data_dir/<TASK>/*.tsv`` or, without ``data_dir``, from the Hugging Face hub.

    ``max_*_samples`` keep the first N rows (as ``run_glue.py`` does), the same rows for every seed.
    """
    spec = get_task(task)
    for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if data_dir is not None:
        task_dir = os.path.join(data_dir, spec.dir_name)
        train = read_glue_tsv(os.path.join(task_dir, "train.tsv"), spec)
        evals = {name: read_glue_tsv(os.path.join(task_dir, file), spec) for name, file in spec.eval_files}
    else:
        train, evals = _load_hub(spec)
    train = _take(train, max_train_samples)
    evals = {name: _take(split, max_eval_samples) for name, split in evals.items()}
    return GlueData(spec, train, evals, spec.num_labels, build_compute_metrics(spec.name))


def tokenize_split(split: datasets.Dataset, tokenizer, max_seq_length: int) -> datasets.Dataset:
    """Tokenise ``text_a`` (and ``text_b``) with truncation and no padding (padding is per batch).

    As in ``run_glue.py``, a ``max_seq_length`` above the tokenizer's ``model_max_length`` is lowered to it with a
    warning. One that leaves no room for text after the special tokens is an error: the tokenizer would silently
    stop truncating.
    """
    has_text_b = "text_b" in split.column_names
    special = tokenizer.num_special_tokens_to_add(pair=has_text_b)
    if not max_seq_length > special:
        raise ValueError(
            f"max_seq_length must exceed the {special} special tokens of a {'pair' if has_text_b else 'sentence'} "
            f"input, got {max_seq_length}"
        )
    if max_seq_length > tokenizer.model_max_length:
        warnings.warn(
            f"max_seq_length {max_seq_length} is above the tokenizer's model_max_length "
            f"{tokenizer.model_max_length}: using {tokenizer.model_max_length}",
            stacklevel=2,
        )
        max_seq_length = tokenizer.model_max_length

    def encode(batch):
        pair = (batch["text_a"], batch["text_b"]) if has_text_b else (batch["text_a"],)
        return tokenizer(*pair, truncation=True, max_length=max_seq_length)

    text_columns = [c for c in ("text_a", "text_b") if c in split.column_names]
    return split.map(encode, batched=True, remove_columns=text_columns, desc="tokenising")


def tokenize_task(data: GlueData, tokenizer, max_seq_length: int) -> tuple:
    """``(train, {split name: eval})`` tokenised for the Trainer."""
    train = tokenize_split(data.train, tokenizer, max_seq_length)
    evals = {name: tokenize_split(split, tokenizer, max_seq_length) for name, split in data.eval.items()}
    return train, evals
