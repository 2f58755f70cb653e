"""Shared fixtures of the GLUE driver and distillation tests: a tiny random BERT and GLUE TSVs of random words."""

import contextlib
import gc
import json
import os
import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = "the a cat dog sat on mat good bad movie is was not very it he said stated".split()  # noqa: SIM905
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def save_tiny_bert(directory, *, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0) -> str:
    """A randomly initialised BertForSequenceClassification and its word-level tokenizer, saved to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + WORDS) + "\n")
    BertTokenizerFast(str(vocab), do_lower_case=True).save_pretrained(directory)  # uncased, whatever the default
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + len(SPECIAL_TOKENS),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """MRPC and MNLI in the official TSV layout: a few dozen random rows (MRPC strings contain a bare quote)."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    (root / "MRPC").mkdir()
    for name, rows in (("train.tsv", 32), ("dev.tsv", 16)):
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        lines += [f'{i % 2}\t{i}\t{i + 1}\t{sentence(rng, 6)} "\t{sentence(rng, 5)}' for i in range(rows)]
        (root / "MRPC" / name).write_text("\n".join(lines) + "\n")
    (root / "MNLI").mkdir()
    header = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2", "label1"]
    gold = ["entailment", "neutral", "contradiction"]
    for name, rows in (("train.tsv", 24), ("dev_matched.tsv", 9), ("dev_mismatched.tsv", 6)):
        lines = ["\t".join(header + ["gold_label"])]
        for i in range(rows):
            fields = [str(i), "1", "2", "fiction", "x", "y", "x", "y", sentence(rng, 5), sentence(rng, 4)]
            lines.append("\t".join(fields + [gold[i % 3], gold[i % 3]]))
        (root / "MNLI" / name).write_text("\n".join(lines) + "\n")
    return str(root)


@contextlib.contextmanager
def cycle_collector_off():
    """Python's cycle collector off inside the block (after one collection of what came before), so that what the
    block frees it frees by reference counting alone: an object kept by a reference cycle stays alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def write_finished_run(output_dir: str, config: dict) -> dict:
    """A finished run's ``results.json`` in ``output_dir`` (made if missing), its settings ``config``; what it holds."""
    from cmi_fused.glue.train import RESULTS_FILE  # here, not at conftest's import of this module: Trainer is slow

    os.makedirs(output_dir, exist_ok=True)
    finished = {"config": config, "best": {"f1": 0.5}, "best_epoch": 1, "history": []}
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as handle:
        json.dump(finished, handle)
    return finished


def never_retrained():
    """The ``run`` of a ``reuse_or_run`` call that must read the finished run back, not train it."""
    raise AssertionError("a finished run was retrained")
