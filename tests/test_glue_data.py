"""GLUE loaders on small fixture TSVs in each task's official format, errors, and the scikit-learn metrics."""

import os
import re
import warnings

import datasets
import numpy as np
import pytest

from cmi_fused.glue import data as glue_data
from cmi_fused.glue.data import GlueDataError, load_task, tokenize_split
from cmi_fused.glue.metrics import build_compute_metrics, glue_metrics, task_metric_names
from cmi_fused.glue.tasks import TASKS, get_task, task_key

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
)


def mnli_row(index, premise, hypothesis, gold, dev):
    labels = [gold] * (5 if dev else 1)
    return "\t".join(
        [
            str(index),
            "31193",
            f"{index}n",
            "government",
            "( ( x ) )",
            "( y )",
            "(ROOT x)",
            "(ROOT y)",
            premise,
            hypothesis,
            *labels,
            gold,
        ]
    )


# task -> (directory, {file: lines}, expected train rows as (text_a, text_b or None, label))
FIXTURES = {
    "cola": (
        "CoLA",
        {
            "train.tsv": ["gj04\t1\t\tOur friends won't buy this analysis.", 'gj04\t0\t*\tThe more he "reads , the.'],
            "dev.tsv": ["cj99\t1\t\tThe sailors rode the breeze clear of the rocks."],
        },
        [("Our friends won't buy this analysis.", None, 1), ('The more he "reads , the.', None, 0)],
    ),
    "sst2": (
        "SST-2",
        {
            "train.tsv": ["sentence\tlabel", 'hide new " secretions \t0', "a gorgeous film \t1"],
            "dev.tsv": ["sentence\tlabel", "it 's a charming journey . \t1"],
        },
        [('hide new " secretions ', None, 0), ("a gorgeous film ", None, 1)],
    ),
    "mrpc": (
        "MRPC",
        {
            "train.tsv": [
                "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                '1\t702876\t702977\tAmrozi called " the witness " .\tReferring to him as " the witness " .',
                "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .",
            ],
            "dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tHe said .\tHe stated ."],
        },
        [
            ('Amrozi called " the witness " .', 'Referring to him as " the witness " .', 1),
            ("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .", 0),
        ],
    ),
    "qqp": (
        "QQP",
        {
            "train.tsv": [
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of math is needed?\t0",
                '402555\t536040\t536041\tHow do I control my "horny" emotions?\tHow do you control it?\t1',
            ],
            "dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t2\t3\tWhy?\tWhy not?\t0"],
        },
        [
            ("How is the life of a math student?", "Which level of math is needed?", 0),
            ('How do I control my "horny" emotions?', "How do you control it?", 1),
        ],
    ),
    "qnli": (
        "QNLI",
        {
            "train.tsv": [
                "index\tquestion\tsentence\tlabel",
                "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it .\tnot_entailment",
                "1\tWhich missile batteries often have?\tThe missile batteries have a range .\tentailment",
            ],
            "dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWhat?\tThis .\tentailment"],
        },
        [
            ("When did the third Digimon series begin?", "Unlike the two seasons before it .", 1),
            ("Which missile batteries often have?", "The missile batteries have a range .", 0),
        ],
    ),
    "rte": (
        "RTE",
        {
            "train.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment",
                "1\tA place of sorrow, after Pope John Paul II died.\tPope died.\tentailment",
            ],
            "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tDana went.\tDana left.\tentailment"],
        },
        [
            ("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons Found in Iraq.", 1),
            ("A place of sorrow, after Pope John Paul II died.", "Pope died.", 0),
        ],
    ),
    "wnli": (
        "WNLI",
        {
            "train.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1",
                "1\tJohn couldn't see the stage.\tJohn is so tall.\t0",
            ],
            "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tThe drain is clogged.\tThe hair is clogged.\t0"],
        },
        [
            ("I stuck a pin through a carrot.", "The carrot had a hole.", 1),
            ("John couldn't see the stage.", "John is so tall.", 0),
        ],
    ),
    "mnli": (
        "MNLI",
        {
            "train.tsv": [
                MNLI_TRAIN_HEADER,
                mnli_row(
                    0, "Conceptually cream skimming has two dimensions.", "Product and geography.", "neutral", False
                ),
                mnli_row(1, "you know during the season", "You lose the things.", "entailment", False),
                mnli_row(2, 'One of our number will carry out "your" instructions.', "No one.", "contradiction", False),
            ],
            "dev_matched.tsv": [
                MNLI_DEV_HEADER,
                mnli_row(0, "The new rights are nice.", "Everyone likes.", "neutral", True),
            ],
            "dev_mismatched.tsv": [
                MNLI_DEV_HEADER,
                mnli_row(0, "Your gift is appreciated.", "Hi.", "contradiction", True),
                mnli_row(1, "a", "b", "entailment", True),
            ],
        },
        [
            ("Conceptually cream skimming has two dimensions.", "Product and geography.", 1),
            ("you know during the season", "You lose the things.", 0),
            ('One of our number will carry out "your" instructions.', "No one.", 2),
        ],
    ),
}


def write_task(root, task):
    directory, files, _ = FIXTURES[task]
    (root / directory).mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (root / directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("task", sorted(FIXTURES))
def test_tsv_loader_reads_official_format(task, tmp_path):
    data = load_task(task, str(write_task(tmp_path, task)))
    expected = FIXTURES[task][2]
    assert list(data.train["text_a"]) == [row[0] for row in expected]
    if expected[0][1] is None:
        assert "text_b" not in data.train.column_names
    else:
        assert list(data.train["text_b"]) == [row[1] for row in expected]
    assert list(data.train["label"]) == [row[2] for row in expected]
    assert data.num_labels == (3 if task == "mnli" else 2)
    eval_splits = ("matched", "mismatched") if task == "mnli" else ("validation",)
    assert tuple(data.eval) == eval_splits
    dev_files = [lines for name, lines in FIXTURES[task][1].items() if name != "train.tsv"]
    header_rows = 0 if task == "cola" else 1
    assert [len(split) for split in data.eval.values()] == [len(lines) - header_rows for lines in dev_files]


def test_label_names_are_hugging_faces_in_id_order():
    """id2label of every model cmi-glue trains, and the TSV label names read as those ids."""
    expected = {
        "cola": ("unacceptable", "acceptable"),
        "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"),
        "qqp": ("not_duplicate", "duplicate"),
        "qnli": ("entailment", "not_entailment"),
        "rte": ("entailment", "not_entailment"),
        "wnli": ("not_entailment", "entailment"),
        "mnli": ("entailment", "neutral", "contradiction"),
    }
    assert {name: task.label_names for name, task in TASKS.items()} == expected
    assert [name for name, task in TASKS.items() if task.tsv_labels_are_names] == ["qnli", "rte", "mnli"]


def test_mnli_dev_labels(tmp_path):
    data = load_task("mnli", str(write_task(tmp_path, "mnli")))
    assert list(data.eval["mismatched"]["label"]) == [2, 0]
    assert list(data.eval["matched"]["text_a"]) == ["The new rights are nice."]


def test_max_samples_keep_the_first_rows(tmp_path):
    data = load_task("mnli", str(write_task(tmp_path, "mnli")), max_train_samples=2, max_eval_samples=1)
    assert list(data.train["label"]) == [1, 0]
    assert [len(split) for split in data.eval.values()] == [1, 1]
    with pytest.raises(ValueError, match="max_train_samples"):
        load_task("mnli", str(tmp_path), max_train_samples=0)


def test_missing_file_says_what_to_pass(tmp_path):
    write_task(tmp_path, "rte")
    (tmp_path / "RTE" / "dev.tsv").unlink()
    with pytest.raises(GlueDataError, match="missing GLUE file .*RTE/dev.tsv.*--data-dir"):
        load_task("rte", str(tmp_path))


def test_wrong_columns_are_reported(tmp_path):
    (tmp_path / "MRPC").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "MRPC" / name).write_text("sentence\tlabel\nhello\t1\n")
    with pytest.raises(GlueDataError, match="expected a column named '#1 String'"):
        load_task("mrpc", str(tmp_path))


def test_short_row_and_bad_label_name_the_line(tmp_path):
    write_task(tmp_path, "rte")
    path = tmp_path / "RTE" / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(GlueDataError, match="train.tsv:3: expected at least 4"):
        load_task("rte", str(tmp_path))
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(GlueDataError, match="train.tsv:2: label 'maybe'"):
        load_task("rte", str(tmp_path))
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t2\t\tA sentence.\n")
    with pytest.raises(GlueDataError, match="train.tsv:1: label '2'"):
        load_task("cola", str(tmp_path))


@pytest.mark.parametrize("task", ["mrpc", "cola", "qqp"])
def test_a_row_with_an_extra_tab_names_the_line(task, tmp_path):
    """A tab inside the last text column (MRPC, CoLA) used to cut the sentence without a word; QQP skips short rows
    only, never long ones."""
    write_task(tmp_path, task)
    path = tmp_path / FIXTURES[task][0] / "train.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    first_row = 0 if task == "cola" else 1
    lines[first_row] += "\tthat ."
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(
        GlueDataError, match=f"train.tsv:{first_row + 1}: expected [0-9]+ tab-separated columns .* a tab"
    ):
        load_task(task, str(tmp_path))


@pytest.mark.parametrize(
    "content, message", [("", "is empty"), ("index\tsentence1\tsentence2\tlabel\n\n", "holds no examples")]
)
def test_a_file_without_examples_is_refused(content, message, tmp_path):
    write_task(tmp_path, "rte")
    (tmp_path / "RTE" / "dev.tsv").write_text(content)
    with pytest.raises(GlueDataError, match=f"RTE/dev.tsv {message}"):
        load_task("rte", str(tmp_path))


def test_byte_order_mark_before_the_header_is_ignored(tmp_path):
    write_task(tmp_path, "mrpc")
    for name in ("train.tsv", "dev.tsv"):
        path = tmp_path / "MRPC" / name
        path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")
    data = load_task("mrpc", str(tmp_path))
    assert list(data.train["label"]) == [row[2] for row in FIXTURES["mrpc"][2]]


def test_qqp_skips_short_rows_with_a_warning(tmp_path):
    (tmp_path / "QQP").mkdir()
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    lines = [header, "0\t1\t2\tHow?\tWhy?\t0", "1\t3\t4\tcut off", "2\t5\t6\tWho?\tWhom?\t1"]
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "QQP" / name).write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as warned:
        data = load_task("qqp", str(tmp_path))
    assert sorted(str(warning.message).split(os.sep)[-1] for warning in warned) == [
        f"{name}: skipped 1 rows with fewer than 6 tab-separated columns" for name in ("dev.tsv", "train.tsv")
    ]
    assert list(data.train["text_a"]) == ["How?", "Who?"] and list(data.train["label"]) == [0, 1]
    assert list(data.eval["validation"]["text_a"]) == ["How?", "Who?"]


def test_hub_failure_gives_one_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(glue_data.datasets, "load_dataset", offline)
    with pytest.raises(GlueDataError, match="without network access pass --data-dir DIR .*DIR/SST-2/"):
        load_task("sst2")


def test_hub_splits_are_renamed_to_the_common_columns(monkeypatch):
    """Columns renamed; ``matched`` is the hub's validation_matched split and ``mismatched`` validation_mismatched."""

    def fake_hub(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        return {
            key: datasets.Dataset.from_dict(
                {"premise": [f"{key} p1", f"{key} p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]}
            )
            for key in ("train", "validation_matched", "validation_mismatched", "test_matched")
        }

    monkeypatch.setattr(glue_data.datasets, "load_dataset", fake_hub)
    data = load_task("mnli", max_eval_samples=1)
    assert data.train.column_names == ["text_a", "text_b", "label"]
    assert list(data.train["text_b"]) == ["h1", "h2"] and list(data.train["label"]) == [2, 0]
    assert tuple(data.eval) == ("matched", "mismatched") and len(data.eval["mismatched"]) == 1
    assert list(data.eval["matched"]["text_a"]) == ["validation_matched p1"]
    assert list(data.eval["mismatched"]["text_a"]) == ["validation_mismatched p1"]


def test_unknown_task():
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("stsb", "/nonexistent")


def test_tokenize_split_pairs_and_truncation(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "he", "said", "stated", "."]) + "\n")
    tokenizer = BertTokenizerFast(str(vocab), do_lower_case=True)  # transformers 5.0 defaults to False
    data = load_task("mrpc", str(write_task(tmp_path, "mrpc")))
    encoded = tokenize_split(data.eval["validation"], tokenizer, max_seq_length=16)
    assert set(encoded.column_names) == {"label", "input_ids", "token_type_ids", "attention_mask"}
    assert encoded[0]["input_ids"] == [2, 4, 5, 7, 3, 4, 6, 7, 3]
    assert encoded[0]["token_type_ids"] == [0] * 5 + [1] * 4
    assert len(tokenize_split(data.eval["validation"], tokenizer, max_seq_length=6)[0]["input_ids"]) == 6
    # A pair needs [CLS] a [SEP] b [SEP]: below 4 the tokenizer would give up truncating and return whole rows.
    assert len(tokenize_split(data.eval["validation"], tokenizer, max_seq_length=4)[0]["input_ids"]) == 4
    for too_short in (3, 0, -5):
        with pytest.raises(ValueError, match="max_seq_length must exceed the 3 special tokens of a pair"):
            tokenize_split(data.eval["validation"], tokenizer, max_seq_length=too_short)
    # Above the model's maximum: lowered to it with a warning, as run_glue.py does; the maximum itself, as it is.
    tokenizer.model_max_length = 7
    with pytest.warns(UserWarning, match="model_max_length 7: using 7"):
        encoded = tokenize_split(data.eval["validation"], tokenizer, max_seq_length=16)
    assert max(len(ids) for ids in encoded["input_ids"]) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoded = tokenize_split(data.eval["validation"], tokenizer, max_seq_length=7)
    assert max(len(ids) for ids in encoded["input_ids"]) == 7


def test_metrics_match_hand_computed_values():
    """MRPC/QQP F1 is the positive class's F1 (as GLUE reports it): the classes' F1s (0.75, 0.5) differ here."""
    labels = np.array([1, 1, 1, 1, 0, 0])
    predictions = np.array([1, 1, 1, 0, 0, 1])
    tp, tn, fp, fn = 3, 1, 1, 1
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue_metrics("cola", predictions, labels) == pytest.approx({"matthews_correlation": mcc})
    for task in ("mrpc", "qqp"):
        assert glue_metrics(task, predictions, labels) == pytest.approx(
            {"f1": 2 * tp / (2 * tp + fp + fn), "accuracy": 4 / 6}
        )
    assert glue_metrics("rte", predictions, labels) == pytest.approx({"accuracy": 4 / 6})


def test_compute_metrics_takes_the_argmax():
    """Of the logits, or of the first of a tuple of outputs (a model that also returns hidden states or attentions
    gives the Trainer a tuple)."""

    class Prediction:
        predictions = np.array([[0.1, 0.7, 0.2], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        label_ids = np.array([1, 0, 0])

    class NotSquare:  # an argmax over rows instead of classes could not even give 4 predictions here
        predictions = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
        label_ids = np.array([1, 0, 1, 1])

    class WithHiddenStates:
        predictions = (np.array([[0.0, 1.0], [2.0, 0.0]]), np.zeros((2, 3, 4)))
        label_ids = np.array([1, 1])

    assert build_compute_metrics("mnli")(Prediction()) == pytest.approx({"accuracy": 2 / 3})
    assert build_compute_metrics("rte")(NotSquare()) == pytest.approx({"accuracy": 0.75})
    assert build_compute_metrics("rte")(WithHiddenStates()) == pytest.approx({"accuracy": 0.5})


def test_label_names_are_read_without_surrounding_whitespace(tmp_path):
    """RTE/QNLI/MNLI name their labels; a trailing space (seen in hand-edited TSVs) still reads as the name."""
    (tmp_path / "RTE").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "RTE" / name).write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment \n")
    assert list(load_task("rte", str(tmp_path)).train["label"]) == [1]


def test_task_names_as_glue_writes_them():
    """get_task takes a task as GLUE writes it (SST-2, MRPC, CoLA) or as the command line does (sst2)."""
    assert task_key("SST-2") == "sst2" and get_task("SST-2") is TASKS["sst2"]
    assert get_task("MRPC") is TASKS["mrpc"] and get_task("CoLA") is TASKS["cola"] and get_task("sst2") is TASKS["sst2"]


@pytest.mark.parametrize("raw_label", ["-1", "positive", "1.0", ""])
def test_a_label_that_is_not_a_class_id_names_the_line(raw_label, tmp_path):
    """SST-2, CoLA, MRPC, QQP and WNLI store class ids: anything else (a negative id, a name, a float, an empty
    field) is refused with its line, not read as some class."""
    (tmp_path / "SST-2").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "SST-2" / name).write_text(f"sentence\tlabel\na fine film \t1\na dull film \t{raw_label}\n")
    message = f"train.tsv:3: label '{raw_label}' is not an integer in [0, 2) (sst2)"
    with pytest.raises(GlueDataError, match=re.escape(message)):
        load_task("sst2", str(tmp_path))


def test_mnli_labels_are_the_gold_label_not_the_first_annotators(tmp_path):
    """MNLI dev rows carry five annotators' labels (label1..label5) and the consensus gold_label; where the first
    annotator disagreed with the consensus, the row's label is gold_label's."""
    write_task(tmp_path, "mnli")
    row = mnli_row(0, "The new rights are nice.", "Everyone likes.", "neutral", True).split("\t")
    row[MNLI_DEV_HEADER.split("\t").index("label1")] = "contradiction"
    (tmp_path / "MNLI" / "dev_matched.tsv").write_text(MNLI_DEV_HEADER + "\n" + "\t".join(row) + "\n")
    assert list(load_task("mnli", str(tmp_path)).eval["matched"]["label"]) == [1]


def test_each_task_selects_by_its_glue_metric():
    """The metric a run's best epoch is chosen by and a sweep summarises (results.json's ``metric``): GLUE's main
    metric of each task, and one its evaluation reports."""
    expected = {
        "cola": "matthews_correlation",
        "sst2": "accuracy",
        "mrpc": "f1",
        "qqp": "f1",
        "qnli": "accuracy",
        "rte": "accuracy",
        "wnli": "accuracy",
        "mnli": "matched_accuracy",
    }
    assert {name: task.metric for name, task in TASKS.items()} == expected
    for name, task in TASKS.items():
        splits = task.eval_split_names
        reported = [f"{s}_{m}" if len(splits) > 1 else m for s in splits for m in task_metric_names(name)]
        assert task.metric in reported, name


def test_metrics_follow_the_task_as_glue_writes_it(tmp_path):
    """load_task("MRPC") scores as load_task("mrpc") does: F1 and accuracy, not the accuracy of an unknown task."""
    data = load_task("MRPC", str(write_task(tmp_path, "mrpc")))

    class Prediction:
        predictions = np.array([[0.0, 1.0], [1.0, 0.0]])
        label_ids = np.array([1, 1])

    assert data.compute_metrics(Prediction()) == pytest.approx({"f1": 2 / 3, "accuracy": 0.5})


def test_f1_without_any_positive_is_zero():
    """A split with no positive label, all predicted negative (a small --max-eval-samples slice): F1 is 0 (sklearn's
    default for an undefined F1, as GLUE reports), not 1."""
    assert glue_metrics("mrpc", np.array([0, 0, 0]), np.array([0, 0, 0])) == {"f1": 0.0, "accuracy": 1.0}
