"""Student building from a BERT teacher: layer choice, explicit name mapping, token-type folding."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2Model,
)

from cmi_fused.distill import build_student, default_student_layers, parse_layers

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
    assert parse_layers("0,2,4") == [0, 2, 4]
    with pytest.raises(ValueError, match="num_student_layers"):
        default_student_layers(6, 7)
    with pytest.raises(ValueError, match="--student-layers"):
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
    with pytest.raises(TypeError, match="teacher must be a Hugging Face BERT model"):
        build_student(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))
    with pytest.raises(ValueError, match="absolute position embeddings"):
        build_student(tiny_teacher(position_embedding_type="relative_key"))
