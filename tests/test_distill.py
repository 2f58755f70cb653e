"""Distillation: student building (layer choice, name map, token-type folding), the KD trainer with a
frozen teacher, teacher selection and end-to-end ``cmi-glue distill`` / ``distill-sweep`` on a tiny BERT."""

import argparse
import dataclasses
import json
import os
import re
import shutil
import weakref

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DataCollatorWithPadding,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2Model,
)

from cmi_fused import (  # noqa: E402
    CMIRegularizer,
    KDLoss,
    cmi_loss,
    distill,  # noqa: E402
)
from cmi_fused.distill import (  # noqa: E402
    DistillationTrainer,
    build_student,
    check_layers,
    default_student_layers,
    select_teacher,
    teacher_logits_for,
    training_set_cmi,
    with_teacher_logits,
)
from cmi_fused.glue import distill_cli  # noqa: E402
from cmi_fused.glue.cli import build_parser, main, parse_layers  # noqa: E402
from cmi_fused.glue.config import DistillConfig, TrainConfig  # noqa: E402
from cmi_fused.glue.data import load_task, tokenize_split  # noqa: E402
from cmi_fused.glue.distill_cli import (  # noqa: E402
    distill_history,
    load_student,
    load_teacher,
    sweep_grid,
    teacher_candidates,
)
from cmi_fused.glue.sweep import reuse_or_run  # noqa: E402
from cmi_fused.glue.tasks import get_task  # noqa: E402
from cmi_fused.glue.train import REGULARIZER_FILE, RESULTS_FILE, build_training_arguments, train  # noqa: E402
from glue_fixtures import cycle_collector_off, never_retrained, save_tiny_bert, write_finished_run  # noqa: E402

NUM_TEACHER_LAYERS = 4


def tiny_teacher(seed=0, **config):
    torch.manual_seed(seed)
    values = dict(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=NUM_TEACHER_LAYERS,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        num_labels=3,
    )
    values.update(config)
    teacher = BertForSequenceClassification(BertConfig(**values)).eval()
    # Default LayerNorms are (1, 0) and biases small: randomise everything so a wrong copy shows.
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return teacher


def tiny_batch(seed=1, vocab=120):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def test_default_layers():
    assert default_student_layers(12) == [0, 2, 4, 7, 9, 11]
    assert default_student_layers(6) == [0, 3, 5]
    assert default_student_layers(6, 2) == [0, 5]
    assert default_student_layers(4, 4) == [0, 1, 2, 3]
    assert default_student_layers(5, 1) == [0]
    # round_half_up of exact halves: 20 * 34 / 28 = 24.29, 21 * 34 / 28 = 25.5 -> 26; 46 * 185 / 92 = 92.5 -> 93
    assert default_student_layers(35, 29)[20:22] == [24, 26]
    assert default_student_layers(186)[46] == 93
    assert default_student_layers(5) == [0, 2, 4] and default_student_layers(3) == [0, 2]  # odd depths: half, up
    assert parse_layers("0,2,4") == [0, 2, 4]
    assert default_student_layers(np.int64(6), np.int32(2)) == [0, 5]
    with pytest.raises(ValueError, match=r"num_student_layers must be an int in \[1, 6\], got 7"):
        default_student_layers(6, 7)
    with pytest.raises(ValueError, match="num_teacher_layers must be a positive int, got 6.0"):
        default_student_layers(6.0)
    with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated integers such as 0,2,4, got '0;2'"):
        parse_layers("0;2")


def test_copied_weights_equal_chosen_teacher_layers():
    teacher = tiny_teacher()
    layers = [0, 3]
    student = build_student(teacher, layers)
    assert isinstance(student, DistilBertForSequenceClassification)
    assert student.config.n_layers == 2 and student.config.dim == 32 and student.config.hidden_dim == 48
    bert, distil = teacher.bert, student.distilbert
    t_emb, s_emb = bert.embeddings, distil.embeddings
    assert torch.equal(s_emb.word_embeddings.weight, t_emb.word_embeddings.weight)
    folded = t_emb.position_embeddings.weight + t_emb.token_type_embeddings.weight[0]
    assert torch.equal(s_emb.position_embeddings.weight, folded)
    assert torch.equal(s_emb.LayerNorm.weight, t_emb.LayerNorm.weight)
    assert torch.equal(s_emb.LayerNorm.bias, t_emb.LayerNorm.bias)
    for k, i in enumerate(layers):
        t_layer, s_layer = bert.encoder.layer[i], distil.transformer.layer[k]
        pairs = [
            (s_layer.attention.q_lin, t_layer.attention.self.query),
            (s_layer.attention.k_lin, t_layer.attention.self.key),
            (s_layer.attention.v_lin, t_layer.attention.self.value),
            (s_layer.attention.out_lin, t_layer.attention.output.dense),
            (s_layer.sa_layer_norm, t_layer.attention.output.LayerNorm),
            (s_layer.ffn.lin1, t_layer.intermediate.dense),
            (s_layer.ffn.lin2, t_layer.output.dense),
            (s_layer.output_layer_norm, t_layer.output.LayerNorm),
        ]
        for s_module, t_module in pairs:
            assert torch.equal(s_module.weight, t_module.weight)
            assert torch.equal(s_module.bias, t_module.bias)
    # The copy must not alias the teacher's storage.
    with torch.no_grad():
        distil.transformer.layer[0].ffn.lin1.weight.zero_()
    assert bert.encoder.layer[0].intermediate.dense.weight.abs().sum() > 0


def test_student_equals_hand_built_distilbert():
    teacher = tiny_teacher(seed=2)
    layers = [1, 2]
    student = build_student(teacher, layers).eval()
    config = DistilBertConfig(
        vocab_size=120, max_position_embeddings=40, dim=32, n_heads=4, hidden_dim=48, n_layers=2, num_labels=3
    )
    hand = DistilBertForSequenceClassification(config).eval()
    bert = teacher.bert
    with torch.no_grad():
        hand.distilbert.embeddings.word_embeddings.weight.copy_(bert.embeddings.word_embeddings.weight)
        hand.distilbert.embeddings.position_embeddings.weight.copy_(
            bert.embeddings.position_embeddings.weight + bert.embeddings.token_type_embeddings.weight[0]
        )
        hand.distilbert.embeddings.LayerNorm.load_state_dict(bert.embeddings.LayerNorm.state_dict())
        for k, i in enumerate(layers):
            src, dst = bert.encoder.layer[i], hand.distilbert.transformer.layer[k]
            dst.attention.q_lin.load_state_dict(src.attention.self.query.state_dict())
            dst.attention.k_lin.load_state_dict(src.attention.self.key.state_dict())
            dst.attention.v_lin.load_state_dict(src.attention.self.value.state_dict())
            dst.attention.out_lin.load_state_dict(src.attention.output.dense.state_dict())
            dst.sa_layer_norm.load_state_dict(src.attention.output.LayerNorm.state_dict())
            dst.ffn.lin1.load_state_dict(src.intermediate.dense.state_dict())
            dst.ffn.lin2.load_state_dict(src.output.dense.state_dict())
            dst.output_layer_norm.load_state_dict(src.output.LayerNorm.state_dict())
        # The head is fresh in the student (nothing to copy from BERT): give the hand-built one the same.
        hand.pre_classifier.load_state_dict(student.pre_classifier.state_dict())
        hand.classifier.load_state_dict(student.classifier.state_dict())
    input_ids, attention_mask = tiny_batch()
    with torch.no_grad():
        got = student(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = hand(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a teacher on another device than the student")
def test_student_of_a_teacher_on_the_gpu_is_the_same():
    """A distillation sweep moves its teacher to the GPU once (teacher-logit cache, DistillationTrainer), then builds
    each student on the CPU from it: the same student as from the teacher on the CPU (an add_ across devices, where
    copy_ is fine, failed there)."""
    teacher = tiny_teacher(seed=2)
    from_cpu = build_student(teacher, [1, 2])
    from_gpu = build_student(teacher.to("cuda"), [1, 2])
    expected = dict(from_cpu.distilbert.named_parameters())
    for name, param in from_gpu.distilbert.named_parameters():  # the encoder: all of it copied from the teacher
        assert torch.equal(param.cpu(), expected[name]), name


def test_all_layers_reproduce_teacher_encoder_on_single_segment():
    teacher = tiny_teacher(seed=3)
    student = build_student(teacher, list(range(NUM_TEACHER_LAYERS))).eval()
    input_ids, attention_mask = tiny_batch(seed=4)
    with torch.no_grad():
        student_hidden = student.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        teacher_hidden = teacher.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        token_types = torch.zeros_like(input_ids)
        token_types[:, 3:] = 1
        pair_hidden = teacher.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_types
        ).last_hidden_state
    keep = attention_mask.bool()
    torch.testing.assert_close(student_hidden[keep], teacher_hidden[keep], rtol=1e-5, atol=1e-5)
    # A second segment (token type 1) is what the student cannot see.
    assert not torch.allclose(student_hidden[keep], pair_hidden[keep], atol=1e-3)


def test_build_errors():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="layers must be strictly increasing"):
        build_student(teacher, [2, 1])
    with pytest.raises(ValueError, match="layers must be strictly increasing"):
        build_student(teacher, [0, NUM_TEACHER_LAYERS])
    with pytest.raises(ValueError, match="strictly increasing"):  # a layer twice
        build_student(teacher, [1, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        check_layers([1, 1], NUM_TEACHER_LAYERS)
    with pytest.raises(TypeError, match="teacher must be a Hugging Face BERT model"):
        build_student(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))
    with pytest.raises(ValueError, match="absolute position embeddings"):
        build_student(tiny_teacher(position_embedding_type="relative_key"))


def test_student_takes_the_teachers_settings():
    """README "The student": activation, dropouts and labels come from the teacher; the head's dropout is
    DistilBERT's seq_classif_dropout (0.2), not the teacher's classifier_dropout; a BertModel teacher gives the same
    student as its BertForSequenceClassification; another layer_norm_eps is warned about (DistilBERT's is 1e-12)."""
    labels = {"id2label": {0: "x", 1: "y", 2: "z"}, "label2id": {"x": 0, "y": 1, "z": 2}}
    teacher = tiny_teacher(
        hidden_act="relu", hidden_dropout_prob=0.17, attention_probs_dropout_prob=0.23, classifier_dropout=0.5, **labels
    )
    torch.manual_seed(0)
    student = build_student(teacher, [0, 2])
    config = student.config
    assert (config.activation, config.dropout, config.attention_dropout) == ("relu", 0.17, 0.23)
    assert config.id2label == {0: "x", 1: "y", 2: "z"} and config.seq_classif_dropout == 0.2
    assert student.dropout.p == 0.2
    torch.manual_seed(0)
    from_base = build_student(teacher.bert, [0, 2])
    for (name, param), (_, base_param) in zip(
        student.distilbert.named_parameters(), from_base.distilbert.named_parameters(), strict=True
    ):
        assert torch.equal(param, base_param), name
    with pytest.warns(UserWarning, match="teacher layer_norm_eps=1e-05 but DistilBERT uses 1e-12"):
        loose = build_student(tiny_teacher(layer_norm_eps=1e-5), [0])
    assert {module.eps for module in loose.modules() if isinstance(module, torch.nn.LayerNorm)} == {1e-12}


def test_ready_student_needs_the_teachers_vocabulary(tmp_path):
    """--student DIR: any sequence classifier with the teacher's vocabulary, given the task's labels; another
    vocabulary is refused by name."""
    student_dir = save_tiny_bert(tmp_path / "student")
    config = DistillConfig(task="mrpc", model=student_dir, output_dir="o", teacher="t", student=student_dir)
    same_vocabulary = AutoTokenizer.from_pretrained(student_dir)
    student, layers = load_student(config, tiny_teacher(), same_vocabulary, ("a", "b"))
    assert layers is None and student.config.id2label == {0: "a", 1: "b"}
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(list(same_vocabulary.get_vocab()) + ["extra"]) + "\n")
    other_vocabulary = BertTokenizerFast(str(vocab))
    with pytest.raises(ValueError, match="has another vocabulary than --teacher 't'"):
        load_student(config, tiny_teacher(), other_vocabulary, ("a", "b"))


def test_numpy_layer_indices_become_plain_ints():
    """Layer lists of numpy integers (np.arange, an array's items) are taken as their ints, so the built student
    and results.json see plain ints; floats and bools are refused, and so is an empty list (not taken for the
    default layers)."""
    assert check_layers(np.arange(0, 4, 2), NUM_TEACHER_LAYERS) == [0, 2]
    layers = check_layers([np.int64(1), 3], NUM_TEACHER_LAYERS)
    assert layers == [1, 3] and all(type(layer) is int for layer in layers)
    for bad in ([1.0, 2], [True, 2]):
        with pytest.raises(ValueError, match="strictly increasing"):
            check_layers(bad, NUM_TEACHER_LAYERS)

    config = DistillConfig(task="mrpc", model="t", output_dir="o", teacher="t", student_layers=np.array([1, 3]))
    assert config.student_layers == [1, 3] and all(type(layer) is int for layer in config.student_layers)
    assert json.loads(json.dumps(dataclasses.asdict(config)))["student_layers"] == [1, 3]
    for bad, shown in ((np.array([0.5]), re.escape(repr(np.float64(0.5)))), ([True], "True"), ([-1], "-1")):
        with pytest.raises(ValueError, match=f"student_layers must be an int >= 0, got {shown}"):
            DistillConfig(task="mrpc", model="t", output_dir="o", teacher="t", student_layers=bad)
    with pytest.raises(ValueError, match=r"student_layers must name at least one teacher layer, got \[\]"):
        DistillConfig(task="mrpc", model="t", output_dir="o", teacher="t", student_layers=[])


def test_seed_fixes_the_built_students_fresh_head():
    """--seed, not the process's RNG state before the run, decides the student's new head: seeds stay paired."""
    teacher = tiny_teacher()
    heads = []
    for rng_state, seed in ((1, 7), (2, 7), (1, 8)):
        torch.manual_seed(rng_state)  # whatever ran before in this process
        config = DistillConfig(task="mrpc", model="teacher", output_dir="out", teacher="teacher", seed=seed)
        student, _ = load_student(config, teacher, None, ("a", "b", "c"))
        heads.append(student.classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_distill_config_defaults_are_the_commands():
    """The library's DistillConfig trains as long as cmi-glue distill does (the paper's 10 epochs), and refuses
    resume, which distill() does not do, instead of silently starting over."""
    parsed = build_parser().parse_args(["distill", "--task", "mrpc", "--teacher", "t", "--output-dir", "o"])
    assert DistillConfig(task="mrpc", model="t", output_dir="o", teacher="t").epochs == parsed.epochs == 10
    with pytest.raises(ValueError, match="resume"):
        DistillConfig(task="mrpc", model="t", output_dir="o", teacher="t", keep_checkpoints=True, resume=True)


def test_student_layers_option_is_used():
    """--student-layers 1,3: a 2-layer student whose layer k is teacher layer [1, 3][k]."""
    config = DistillConfig(task="mrpc", model="t", output_dir="o", teacher="t", student_layers=[1, 3])
    teacher = tiny_teacher()
    student, layers = load_student(config, teacher, None, ("a", "b", "c"))
    assert layers == [1, 3] and student.config.n_layers == 2
    assert student.config.id2label == {0: "a", 1: "b", 2: "c"}  # the task's names, whatever the teacher's
    for student_layer, teacher_layer in enumerate(layers):
        torch.testing.assert_close(
            student.distilbert.transformer.layer[student_layer].ffn.lin2.weight,
            teacher.bert.encoder.layer[teacher_layer].output.dense.weight,
            rtol=0,
            atol=0,
        )


def test_distillation_settings_block_reuse(tmp_path):
    """A finished distillation run is reused only if teacher, student and KD settings are the same; caching the
    teacher's logits changes only how it runs."""
    base = DistillConfig("mrpc", "t", str(tmp_path / "run"), teacher="t")
    finished = write_finished_run(base.output_dir, dataclasses.asdict(base))
    changed = {"teacher": "u", "student": "s", "student_layers": [0, 2], "alpha": 0.9, "kd_temperature": 4.0}
    for name, value in changed.items():
        with pytest.raises(ValueError, match=rf"\b{name}: "):
            reuse_or_run(dataclasses.replace(base, **{name: value}), never_retrained)
    assert reuse_or_run(dataclasses.replace(base, cache_teacher_logits=True), never_retrained) == finished


def test_distill_sweep_defaults_start_with_the_ce_baseline():
    args = build_parser().parse_args(["distill-sweep", "--task", "mrpc", "--teacher", "t", "--output-dir", "o"])
    assert args.alphas == [0.0, 0.5] and args.kd_temperatures == [2.0] and args.seeds == [0, 1, 2]


def test_a_directory_of_runs_keeps_min_and_max_cmi_runs(tmp_path):
    """Only --cmi none runs are CE baselines: Min-CMI runs are candidates too."""
    for cmi in ("none", "min", "max"):
        run = tmp_path / "sweep" / cmi
        run.mkdir(parents=True)
        (run / RESULTS_FILE).write_text(json.dumps({"config": {"cmi": cmi}}))
        (run / REGULARIZER_FILE).write_bytes(b"")
    run_dirs, left_out = teacher_candidates([str(tmp_path / "sweep")])
    assert run_dirs == [str(tmp_path / "sweep" / "max"), str(tmp_path / "sweep" / "min")]
    assert left_out == [str(tmp_path / "sweep" / "none")]


# ------------------------------------------------------------------------------------------------------
# End to end on a tiny random BERT teacher trained by cmi-glue train
@pytest.fixture(scope="module")
def teachers(tmp_path_factory, glue_dir):
    """Two teachers trained for 1 epoch: ``none`` (batch centroids) and ``max`` (epoch centroids)."""
    base = tmp_path_factory.mktemp("teachers")
    model_dir = save_tiny_bert(base / "init", num_layers=NUM_TEACHER_LAYERS, num_heads=4, intermediate_size=48)
    runs = {}
    for cmi, centroids in (("none", "batch"), ("max", "epoch")):
        runs[cmi] = str(base / cmi)
        train(
            TrainConfig(
                task="mrpc",
                model=str(model_dir),
                output_dir=runs[cmi],
                data_dir=glue_dir,
                cmi=cmi,
                cmi_lambda=0.5,
                centroids=centroids,
                temperature=0.5,
                epochs=1,
                batch_size=8,
                lr=1e-3,
                disable_tqdm=True,
            )
        )
    return runs


def distill_args(teacher, glue_dir, output_dir):
    return [
        "--task",
        "mrpc",
        "--teacher",
        teacher,
        "--data-dir",
        glue_dir,
        "--output-dir",
        str(output_dir),
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--epochs",
        "2",
        "--disable-tqdm",
    ]


def test_distill_end_to_end(teachers, glue_dir, tmp_path):
    """A distillation with --keep-checkpoints replaces an old run's checkpoints (checkpoint-99 here) and regulariser
    state."""
    out = tmp_path / "student"
    (out / "checkpoint-99").mkdir(parents=True)
    (out / REGULARIZER_FILE).write_bytes(b"")  # an old training run's: the student's directory would pass for one
    main(
        [
            "distill",
            *distill_args(teachers["max"], glue_dir, out),
            "--alpha",
            "0.7",
            "--kd-temperature",
            "3",
            "--cache-teacher-logits",
            "--keep-checkpoints",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "f1" and results["student_layers"] == [0, 3]
    assert results["config"]["alpha"] == 0.7 and results["config"]["kd_temperature"] == 3.0
    assert results["config"]["teacher"] == teachers["max"]
    assert [row["epoch"] for row in results["history"]] == [1, 2] and results["train_runtime"] > 0
    for row in results["history"]:
        assert set(row) == {"epoch", "train_ce", "train_kl", "eval"}
        assert row["train_ce"] > 0 and row["train_kl"] >= 0
    assert results["best"] == results["history"][results["best_epoch"] - 1]["eval"]
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(student, DistilBertForSequenceClassification) and student.config.n_layers == 2
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert not (out / REGULARIZER_FILE).exists()


@pytest.mark.parametrize("cache", [False, True], ids=["per-batch", "cached"])
def test_alpha_0_never_runs_the_teacher(teachers, glue_dir, tmp_path, monkeypatch, cache):
    """--alpha 0 is CE alone: no teacher forward at all (per batch or for the cache), and a KL of 0."""
    teacher_forwards = []
    forward = BertForSequenceClassification.forward

    def counting_forward(self, *args, **kwargs):
        teacher_forwards.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", counting_forward)
    out = tmp_path / "student"
    main(["distill", *distill_args(teachers["max"], glue_dir, out), "--alpha", "0", "--epochs", "1",
          *(["--cache-teacher-logits"] if cache else [])])  # fmt: skip
    assert teacher_forwards == []
    assert [row["train_kl"] for row in json.loads((out / "results.json").read_text())["history"]] == [0.0]


def kd_trainer(teacher_dir, glue_dir, tmp_path, cache):
    data = load_task("mrpc", glue_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    student = build_student(teacher, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    train_dataset = tokenize_split(data.train, tokenizer, 64)
    if cache:
        train_dataset = with_teacher_logits(train_dataset, teacher_logits_for(teacher, train_dataset, tokenizer, 5))
    config = TrainConfig(
        task="mrpc", model=teacher_dir, output_dir=str(tmp_path), epochs=1, batch_size=8, disable_tqdm=True
    )
    trainer = DistillationTrainer(
        model=student,
        args=build_training_arguments(
            config, "f1", eval_strategy="no", save_strategy="no", load_best_model_at_end=False
        ),
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        teacher=None if cache else teacher,
        kd=KDLoss(alpha=0.6, temperature=2.5),
    )
    return trainer, teacher


def test_a_finished_distillation_trainer_is_freed_without_the_cycle_collector(teachers, glue_dir, tmp_path):
    """As for CMITrainer (tests/test_glue_cli.py): a distill-sweep's finished student, its optimizer state and the
    trainer go with the last reference, also after training (its epoch-end callback held the trainer)."""
    trainer, _ = kd_trainer(teachers["none"], glue_dir, tmp_path, cache=False)
    trainer.train()
    assert {"train_ce", "train_kl"} <= set(trainer.state.log_history[0])  # the epoch-end callback ran
    student_ref = weakref.ref(trainer.model)
    with cycle_collector_off():
        del trainer
        assert student_ref() is None


def test_cached_teacher_logits_equal_per_batch_and_teacher_gets_no_gradient(teachers, glue_dir, tmp_path):
    trainer, teacher = kd_trainer(teachers["none"], glue_dir, tmp_path / "a", cache=False)
    cached_trainer, _ = kd_trainer(teachers["none"], glue_dir, tmp_path / "b", cache=True)
    before = {name: param.clone() for name, param in teacher.named_parameters()}
    batch = next(iter(trainer.get_train_dataloader()))
    cached_batch = next(iter(cached_trainer.get_train_dataloader()))
    assert torch.equal(batch["input_ids"], cached_batch["input_ids"])  # same seed: same shuffled rows
    assert "token_type_ids" in batch and "teacher_logits" in cached_batch
    for model in (trainer.model, cached_trainer.model):
        model.train()
    teacher_inputs = []
    hook = teacher.register_forward_pre_hook(
        lambda module, args, kwargs: teacher_inputs.append(kwargs), with_kwargs=True
    )
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    hook.remove()
    # The teacher sees the second segment (token types) although the DistilBERT student takes none.
    assert set(teacher_inputs[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert torch.equal(teacher_inputs[0]["token_type_ids"].cpu(), batch["token_type_ids"].cpu())  # CUDA on a GPU host
    assert batch["token_type_ids"].sum() > 0
    cached_loss = cached_trainer.compute_loss(cached_trainer.model, cached_trainer._prepare_inputs(cached_batch))
    torch.testing.assert_close(loss, cached_loss, rtol=1e-5, atol=1e-6)
    # A full training epoch: the student moves, the teacher gets no gradient and no update.
    trainer.train()
    assert not teacher.training
    for name, param in teacher.named_parameters():
        assert param.grad is None and not param.requires_grad
        assert torch.equal(param, before[name]), name


def test_logged_epoch_means_are_the_ce_and_kl_terms(teachers, glue_dir, tmp_path):
    """train_kl is the mean of the KL term alone (no T^2 factor, no CE mixed in), train_ce that of the CE."""
    trainer, _ = kd_trainer(teachers["none"], glue_dir, tmp_path, cache=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # Confident teacher logits (the trained teacher's are near uniform): a KL of order 1, well above rounding.
    shape, generator = batch["teacher_logits"].shape, torch.Generator().manual_seed(0)
    batch["teacher_logits"] = (3 * torch.randn(shape, generator=generator)).to(trainer.args.device)
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
        student_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = trainer.kd(student_logits, batch["teacher_logits"], batch["labels"])
    logged = []
    trainer.log = lambda values, *args, **kwargs: logged.append(values)
    trainer.callback_handler.on_epoch_end(trainer.args, trainer.state, trainer.control)
    assert logged == [pytest.approx({"train_ce": float(expected.ce), "train_kl": float(expected.kl)}, rel=1e-5)]


def test_select_teacher_uses_metric_over_training_set_cmi(teachers, glue_dir):
    """The CMI of each run's final model on its training set against the class means of those features, the CE run
    (batch centroids) and the Max-CMI run (saved epoch centroids, which select-teacher leaves aside) alike."""
    # Independent: BERT's classifier input in eval mode is the pooler output; CMI at the run's temperature.
    data = load_task("mrpc", glue_dir)
    labels = torch.tensor(list(data.train["label"]))
    for run in ("none", "max"):
        tokenizer = AutoTokenizer.from_pretrained(teachers[run])
        model = AutoModelForSequenceClassification.from_pretrained(teachers[run]).eval()
        encoded = tokenizer(list(data.train["text_a"]), list(data.train["text_b"]), padding=True, return_tensors="pt")
        with torch.no_grad():
            pooled = model.bert(**encoded).pooler_output
        expected = cmi_loss(pooled, labels, 2, temperature=0.5, backend="torch").loss
        assert training_set_cmi(teachers[run])["train_set_cmi"] == pytest.approx(float(expected), rel=1e-4), run

    selection = select_teacher([teachers["none"], teachers["max"]])
    ratios = {row["run"]: row["best_metric"] / row["train_set_cmi"] for row in selection["runs"]}
    assert selection["selected"] == max(ratios, key=ratios.get)
    assert selection["selected"] in selection["reason"] and "ratio" in selection["reason"]
    with pytest.raises(FileNotFoundError, match="--runs"):
        select_teacher([glue_dir])


@pytest.mark.parametrize(
    "runs, selected",
    [
        ({"positive": (0.1, 10.0), "negative": (-0.02, 0.01)}, "positive"),  # ratios 0.01 and -2
        ({"near_chance": (-0.02, 0.01), "worse": (-0.2, 5.0)}, "near_chance"),  # ratios -2 and -0.04
        ({"high_cmi": (0.0, 1.0), "low_cmi": (0.0, 0.5)}, "low_cmi"),  # ratios 0 and 0
    ],
)
def test_select_teacher_ranks_a_metric_at_or_below_zero_after_the_ratio(runs, selected, monkeypatch):
    """The ratio rule ranks teachers with a positive metric. CoLA's Matthews correlation can be <= 0, where a higher
    CMI would raise the ratio (-0.2 / 5 > -0.02 / 0.01): such runs come after every positive one, by metric, then by
    lower CMI (training_set_cmi stubbed: only the ranking is under test)."""

    def stub(run, data_dir=None, batch_size=64):
        value, cmi = runs[run]
        return {
            "metric": "matthews_correlation", "best": {"matthews_correlation": value}, "train_set_cmi": cmi,
            "config": {"cmi": "max", "cmi_lambda": 0.1},
        }  # fmt: skip

    monkeypatch.setattr(distill, "training_set_cmi", stub)
    selection = select_teacher(list(runs))
    assert selection["selected"] == selected
    assert selection["selected"] in selection["reason"]
    assert selection["reason"].startswith("no run has") == (runs[selected][0] <= 0)


@pytest.fixture(scope="module")
def normalised_teacher(tmp_path_factory, glue_dir):
    """A Max-CMI teacher with epoch centroids, center_l2 features and the first 20 training rows."""
    base = tmp_path_factory.mktemp("normalised-teacher")
    model_dir = save_tiny_bert(base / "init")
    train(
        TrainConfig(
            "mrpc", model_dir, str(base / "run"), data_dir=glue_dir, cmi="max", cmi_lambda=0.5, centroids="epoch",
            normalization="center_l2", temperature=0.5, epochs=1, batch_size=8, lr=1e-3, max_train_samples=20,
            disable_tqdm=True,
        )
    )  # fmt: skip
    return str(base / "run")


def test_training_set_cmi_uses_the_runs_normalisation_and_rows(normalised_teacher, glue_dir):
    """The run's center_l2 normalisation (its saved feature mean) and its first 20 rows, against their class means
    (not the saved epoch centroids), each recomputed by hand; the selection ratio is metric / that CMI."""
    run = training_set_cmi(normalised_teacher)
    saved = CMIRegularizer(2, 32, "epoch", temperature=0.5, normalization="center_l2")
    saved.load_state_dict(torch.load(os.path.join(normalised_teacher, REGULARIZER_FILE)))
    rows = load_task("mrpc", glue_dir).train.select(range(20))
    tokenizer = AutoTokenizer.from_pretrained(normalised_teacher)
    model = AutoModelForSequenceClassification.from_pretrained(normalised_teacher).eval()
    encoded = tokenizer(list(rows["text_a"]), list(rows["text_b"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        centred = model.bert(**encoded).pooler_output - saved.feature_mean
    features = centred / centred.norm(dim=-1, keepdim=True)
    labels = torch.tensor(list(rows["label"]))
    expected = cmi_loss(features, labels, 2, temperature=0.5, backend="torch").loss
    assert run["train_set_cmi"] == pytest.approx(float(expected), rel=1e-4)
    (row,) = select_teacher([normalised_teacher])["runs"]
    assert row["ratio"] == pytest.approx(row["best_metric"] / row["train_set_cmi"])


def test_distill_takes_seed_and_distill_sweep_seeds():
    """distill-sweep sets each run's seed from --seeds, so it offers no --seed of its own that --seeds would silently
    override: there --seed is argparse's abbreviation of --seeds."""
    common = ["--task", "mrpc", "--teacher", "t", "--output-dir", "o"]
    assert build_parser().parse_args(["distill", *common, "--seed", "3"]).seed == 3
    sweep_args = build_parser().parse_args(["distill-sweep", *common, "--seed", "3"])
    assert sweep_args.seeds == [3] and not hasattr(sweep_args, "seed")


def run_of_task(run_dir: str, copy_dir, task: str) -> str:
    """A copy of a run whose results.json names ``task``, as a run trained on it would."""
    shutil.copytree(run_dir, copy_dir)
    results = json.loads((copy_dir / "results.json").read_text())
    results["task"] = results["config"]["task"] = task
    (copy_dir / "results.json").write_text(json.dumps(results))
    return str(copy_dir)


def test_select_teacher_refuses_runs_of_different_tasks(teachers, tmp_path):
    """Runs of two tasks are refused before any pass over a training set, also where the tasks share a metric
    (SST-2, QNLI, RTE and WNLI report accuracy; MRPC and QQP F1). A task written otherwise (``MRPC``, as
    ``TrainConfig("MRPC", ...)`` records it) is the same task."""
    other = run_of_task(teachers["max"], tmp_path / "qqp-run", "qqp")
    with pytest.raises(ValueError, match=r"one task, got .*\(mrpc\), .*qqp-run \(qqp\)"):
        select_teacher([teachers["max"], other])
    upper = run_of_task(teachers["none"], tmp_path / "upper", "MRPC")
    assert [row["run"] for row in select_teacher([teachers["max"], upper])["runs"]] == [teachers["max"], upper]


def test_select_teacher_command(teachers, tmp_path, capsys):
    out = tmp_path / "selection.json"
    # A CE run named on its own is a candidate (with or without a trailing separator).
    main(["select-teacher", "--runs", teachers["none"] + os.sep, teachers["max"], "--json", str(out)])
    printed = capsys.readouterr().out
    selection = json.loads(out.read_text())
    assert f"selected: {selection['selected']}" in printed and "why:" in printed
    assert [row["cmi"] for row in selection["runs"]] == ["none", "max"]
    for row in selection["runs"]:  # a CE run's lambda is unused; the CMI with 4 significant digits, however small
        cmi_lambda = "-" if row["cmi"] == "none" else f"{row['cmi_lambda']:g}"
        assert f"| {row['cmi']} | {cmi_lambda} | {row['best_metric']:.4f} | {row['train_set_cmi']:.4g} |" in printed
    assert selection["left_out"] == [] and "left out" not in printed
    noted = "note: the selected run was trained with --cmi none" in printed
    assert noted == (selection["selected"] == teachers["none"] + os.sep)
    for cmi in ("none", "max"):  # the note says when the selection is not a Max-CMI run
        main(["select-teacher", "--runs", teachers[cmi]])
        note = "note: the selected run was trained with --cmi none; the paper distils Max-CMI teachers"
        assert (note in capsys.readouterr().out) == (cmi == "none")
    # A parent directory stands for the runs inside it trained with a CMI term: its CE run (--cmi none, a sweep's
    # lambda 0 baseline, the lowest CMI) is left out and reported, and named on its own it is kept (above). A
    # distillation run there (results.json, no regulariser state) is skipped, and named on its own it gets an
    # error that says what to pass.
    parent = tmp_path / "runs[1]"  # a name, not a glob pattern: it used to find no runs and stand for one
    for name in ("none", "max"):
        shutil.copytree(teachers[name], parent / name)
    distilled = parent / "distill" / "seed_0"
    distilled.mkdir(parents=True)
    shutil.copyfile(parent / "none" / "results.json", distilled / "results.json")
    main(["select-teacher", "--runs", str(parent), "--json", str(out)])
    selection = json.loads(out.read_text())
    assert [row["run"] for row in selection["runs"]] == [str(parent / "max")]
    assert selection["selected"] == str(parent / "max") and selection["left_out"] == [str(parent / "none")]
    assert f"left out (CE baselines of the directories given; name a run to include it): {parent / 'none'}" in (
        capsys.readouterr().out
    )
    # A run named on its own and inside a directory named too is one candidate, and a CE run named so is not
    # reported as left out.
    named = [str(parent / "none"), str(parent / "max") + os.sep]
    main(["select-teacher", "--runs", *named, str(parent), "--json", str(out)])
    selection = json.loads(out.read_text())
    assert [row["run"] for row in selection["runs"]] == named
    assert selection["left_out"] == [] and "left out" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="a distillation run has none"):
        select_teacher([str(distilled)])
    shutil.rmtree(parent / "max")
    with pytest.raises(ValueError, match=re.escape(f"--runs: {parent} holds only CE runs")):
        main(["select-teacher", "--runs", str(parent)])


def test_sweep_grid_runs_alpha_zero_once():
    assert sweep_grid([0, 0.5], [1, 4]) == [(0.0, 1.0), (0.5, 1.0), (0.5, 4.0)]


def test_distill_history_gives_each_epoch_its_own_train_kl():
    """Each epoch's row carries the train_kl and train_ce logged at that epoch's end."""
    log_history = []
    for epoch, (ce, kl, f1) in enumerate(((0.7, 0.3, 0.5), (0.6, 0.2, 0.6), (0.5, 0.1, 0.55)), start=1):
        log_history += [
            {"epoch": float(epoch), "train_ce": ce, "train_kl": kl, "step": 4 * epoch},
            {"epoch": float(epoch), "eval_f1": f1, "eval_accuracy": 0.5, "eval_loss": 0.69, "step": 4 * epoch},
        ]
    log_history.append({"epoch": 3.0, "train_runtime": 1.0, "train_loss": 0.6, "step": 12})
    assert distill_history(log_history, ["f1", "accuracy"]) == [
        {"epoch": 1, "train_ce": 0.7, "train_kl": 0.3, "eval": {"f1": 0.5, "accuracy": 0.5}},
        {"epoch": 2, "train_ce": 0.6, "train_kl": 0.2, "eval": {"f1": 0.6, "accuracy": 0.5}},
        {"epoch": 3, "train_ce": 0.5, "train_kl": 0.1, "eval": {"f1": 0.55, "accuracy": 0.5}},
    ]


def test_distill_sweep_table(teachers, glue_dir, tmp_path, monkeypatch):
    """Two teachers x two seeds summarised per arm; with --cache-teacher-logits each teacher's runs get that
    teacher's own training-set logits."""
    distill, cached_logits = distill_cli.distill, []

    def recording_distill(config, data, teacher, teacher_logits):
        cached_logits.append((config, teacher_logits.clone()))
        return distill(config, data, teacher, teacher_logits)

    monkeypatch.setattr(distill_cli, "distill", recording_distill)
    out = tmp_path / "sweep"
    args = distill_args(teachers["none"], glue_dir, out)
    args[args.index("--teacher") + 1 : args.index("--teacher") + 2] = [teachers["none"], teachers["max"]]
    args += [
        "--epochs",
        "1",
        "--alphas",
        "0.5",
        "--kd-temperatures",
        "4",
        "--seeds",
        "0,1",
        "--student-layers",
        "1",
        "--cache-teacher-logits",
    ]
    main(["distill-sweep", *args])
    summary = json.loads((out / "sweep.json").read_text())
    assert [row["arm"] for row in summary["arms"]] == [f"{teachers[t]}: alpha 0.5, T 4" for t in ("none", "max")]
    assert len(summary["runs"]) == 4
    for row in summary["arms"]:
        runs = sorted((run for run in summary["runs"] if run["arm"] == row["arm"]), key=lambda run: run["seed"])
        assert [run["seed"] for run in runs] == row["seeds"] == [0, 1]
        values = [run["best"]["f1"] for run in runs]
        assert row["values"] == values and row["median"] == pytest.approx(sum(values) / 2)
    assert summary["arms"][1]["paired_diffs"] == pytest.approx(
        [a - b for a, b in zip(summary["arms"][1]["values"], summary["arms"][0]["values"], strict=True)]
    )
    train = load_task("mrpc", glue_dir).train
    assert [config.teacher for config, _ in cached_logits] == [teachers["none"]] * 2 + [teachers["max"]] * 2
    for config, logits in cached_logits:
        tokenizer = AutoTokenizer.from_pretrained(config.teacher)
        model = AutoModelForSequenceClassification.from_pretrained(config.teacher)
        expected = teacher_logits_for(model, tokenize_split(train, tokenizer, config.max_seq_length), tokenizer, 8)
        torch.testing.assert_close(logits.cpu(), expected, rtol=1e-5, atol=1e-5)
    for run in summary["runs"]:
        results = json.loads((tmp_path / run["output_dir"] / "results.json").read_text())
        assert run["history"] == results["history"] and run["train_runtime"] == results["train_runtime"]
    table = (out / "sweep.md").read_text()
    assert "| arm |" in table and "machine:" in table and summary["arms"][1]["arm"] in table
    assert "| arm | `train_ce` | `train_kl` | `train_runtime` (s) |" in table
    # A second call reads the finished runs instead of training again.
    finished = out / "teacher_1" / "alpha_0.5_T_4" / "seed_0" / "results.json"
    mtime = os.path.getmtime(finished)
    main(["distill-sweep", *args])
    assert os.path.getmtime(finished) == mtime
    with pytest.raises(ValueError, match=r"lr: 0\.001 there, 0\.002 now"):
        main(["distill-sweep", *[("2e-3" if arg == "1e-3" else arg) for arg in args]])


def test_distill_argument_errors(teachers, glue_dir, tmp_path, capsys):
    base = distill_args(teachers["none"], glue_dir, tmp_path / "x")
    with pytest.raises(SystemExit):
        main(["distill", *base, "--alpha", "1.5"])
    assert "cmi-glue distill: error: --alpha must be a finite number in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", *base, "--student", teachers["max"], "--student-layers", "0"])
    assert "error: --student and --student-layers exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", *base, "--student-layers", "a,b"])
    error = "argument --student-layers: expected comma-separated integers such as 0,2,4, got 'a,b'"
    assert error in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--teacher .* is not a directory"):
        main(["distill", *distill_args(str(tmp_path / "missing"), glue_dir, tmp_path / "y")])
    # An MRPC teacher for SST-2 (two labels too, other names): refused, not only warned about.
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "glue" / "SST-2" / name).write_text("sentence\tlabel\n" + "a good film\t1\na bad one\t0\n" * 4)
    sst2 = distill_args(teachers["none"], str(tmp_path / "glue"), tmp_path / "z")
    sst2[sst2.index("mrpc")] = "sst2"
    with pytest.raises(ValueError, match="--teacher .* was trained on mrpc, not on sst2"):
        main(["distill", *sst2])
    # The task as written ("MRPC") is the same task; a results.json that names none does not stop the teacher.
    upper = run_of_task(teachers["none"], tmp_path / "upper", "MRPC")
    assert load_teacher(upper, get_task("mrpc"))[0].config.num_labels == 2
    (tmp_path / "upper" / "results.json").write_text("[1]")
    assert load_teacher(upper, get_task("mrpc"))[0].config.num_labels == 2


@pytest.mark.parametrize("cmi", ["min", "max"])
def test_distill_config_refuses_a_cmi_term(cmi):
    """The KD loss replaces the CMI term: a DistillConfig asking for one is refused, not run without it and recorded
    as a Min- or Max-CMI run in results.json."""
    with pytest.raises(ValueError, match="cmi must be 'none' for distillation"):
        DistillConfig(task="mrpc", model="t", output_dir="o", teacher="t", cmi=cmi)


def test_distill_logged_epoch_means_are_over_every_process(teachers, glue_dir, tmp_path, monkeypatch):
    """Under torchrun train_ce and train_kl are means over every process's steps (all-reduced sums)."""
    trainer, _ = kd_trainer(teachers["none"], glue_dir, tmp_path, cache=True)
    trainer._epoch_sums = torch.tensor([1.0, 0.5, 2.0], device=trainer.args.device)  # this process: 2 steps
    other = torch.tensor([3.0, 1.5, 2.0])  # another process's CE sum, KL sum, steps
    monkeypatch.setattr(distill, "all_reduce_sum", lambda sums: (sums + other.to(sums.device),))
    logged = []
    trainer.log = lambda values, *args, **kwargs: logged.append(values)
    trainer.callback_handler.on_epoch_end(trainer.args, trainer.state, trainer.control)
    assert logged == [pytest.approx({"train_ce": 1.0, "train_kl": 0.5})]


def test_a_teacher_with_another_number_of_labels_is_refused(tmp_path):
    """A 3-label teacher for MRPC (2 labels) is refused when loaded: the student built from it would otherwise take
    its 3 labels and train to the end as a 3-way classifier with made-up label names."""
    model_dir = save_tiny_bert(tmp_path / "teacher")
    AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3, ignore_mismatched_sizes=True
    ).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="has 3 labels, the task has 2"):
        load_teacher(model_dir, get_task("mrpc"))


def test_a_teacher_whose_head_orders_the_labels_otherwise_is_refused(tmp_path):
    """As for --model (check_head_labels): a teacher head with the task's two label names in the other order would
    teach the student swapped soft targets, so it is refused by name."""
    model_dir = save_tiny_bert(tmp_path / "teacher")
    names = list(reversed(get_task("mrpc").label_names))
    AutoModelForSequenceClassification.from_pretrained(
        model_dir, id2label=dict(enumerate(names)), label2id={name: k for k, name in enumerate(names)}
    ).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="--teacher .*: its head orders the labels"):
        load_teacher(model_dir, get_task("mrpc"))


# ------------------------------------------------------------------------------------------------------
# Added after a mutation pass over the distillation loop and teacher handling: each test kills a mutant the ones above
# let survive.
def test_teacher_logits_come_from_the_teacher_in_eval_mode(glue_dir, tmp_path):
    """A teacher handed over in training mode (dropout on) gives its eval-mode logits, the same on every call, with
    no graph; it is left frozen."""
    teacher_dir = save_tiny_bert(tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir, hidden_dropout_prob=0.5)
    dataset = tokenize_split(load_task("mrpc", glue_dir).train, tokenizer, 64)
    expected = teacher_logits_for(teacher.eval(), dataset, tokenizer, 8)
    got = teacher_logits_for(teacher.train(), dataset, tokenizer, 8)
    assert got.shape == (len(dataset), 2) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not teacher.training and not any(param.requires_grad for param in teacher.parameters())


def test_each_epochs_logged_means_are_of_that_epoch_alone(teachers, glue_dir, tmp_path):
    """train_ce and train_kl of epoch 2 are the means over epoch 2's steps: the sums start again at each epoch end."""
    trainer, _ = kd_trainer(teachers["none"], glue_dir, tmp_path, cache=True)
    logged = []
    trainer.log = lambda values, *args, **kwargs: logged.append(values)
    for ce, kl, steps in ((1.0, 0.5, 2.0), (0.6, 0.2, 4.0)):  # epoch 1: 2 steps, epoch 2: 4 steps
        trainer._epoch_sums += torch.tensor([ce, kl, steps], device=trainer.args.device)
        trainer.callback_handler.on_epoch_end(trainer.args, trainer.state, trainer.control)
    assert logged == [
        pytest.approx({"train_ce": 0.5, "train_kl": 0.25}),
        pytest.approx({"train_ce": 0.15, "train_kl": 0.05}),
    ]


@pytest.mark.parametrize("cmi", [0.0, float("nan")])
def test_select_teacher_refuses_a_training_set_cmi_that_is_not_positive(cmi, monkeypatch):
    """The metric / CMI ratio needs CMI > 0: a CMI of 0 (or NaN, from a diverged run) is refused by name, not turned
    into a ZeroDivisionError or a NaN ratio that max() would rank arbitrarily."""

    def stub(run, data_dir=None, batch_size=64):
        return {
            "metric": "f1", "best": {"f1": 0.8}, "train_set_cmi": cmi if run == "bad" else 0.5,
            "config": {"cmi": "max", "cmi_lambda": 0.1},
        }  # fmt: skip

    monkeypatch.setattr(distill, "training_set_cmi", stub)
    with pytest.raises(ValueError, match=r"--runs: bad has training-set CMI .*needs CMI > 0"):
        select_teacher(["good", "bad"])
