"""End-to-end cost of the regulariser: one training step of a randomly initialised BERT classifier.

Configs: ``plain`` (cross-entropy), ``cmi_eager`` (CE + weight * CMI, torch backend) and ``cmi_fused``
(CE + weight * CMI, triton backend), the CMI taken on the pooled output with per-batch centroids.
A step is zero_grad + forward under bf16 autocast + backward + AdamW. Each round times a block of
``steps_per_round`` back-to-back steps per config (the order rotating between rounds), so configs are
interleaved and slow drifts of the machine hit all of them alike. The overhead of a config is paired per
round, ``step_ms / plain_step_ms - 1``; it is reported as significant only when every round agrees on its
sign, i.e. when the difference is larger than the run-to-run spread, and only from ``MIN_ROUNDS_FOR_VERDICT``
rounds on (all of 6 rounds agreeing by chance: p = 2 / 2**6 = 0.03); with fewer, ``significant`` is ``None``.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cmi_fused import cmi_loss

from .timing import elapsed_ms, rotated, sync

CONFIGS = ("plain", "cmi_eager", "cmi_fused")
CMI_BACKENDS = {"cmi_eager": "torch", "cmi_fused": "triton"}


@dataclasses.dataclass(frozen=True)
class E2ESettings:
    """Model size and measurement effort. ``model_overrides`` change ``BertConfig()`` (BERT-base) fields."""

    batch_size: int = 32
    seq_len: int = 128
    num_labels: int = 2
    cmi_weight: float = 0.1
    rounds: int = 12
    steps_per_round: int = 10
    warmup_steps: int = 5
    num_batches: int = 4
    model_overrides: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def quick(cls) -> E2ESettings:
        tiny = {
            "vocab_size": 128,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        }
        return cls(batch_size=4, seq_len=16, rounds=2, steps_per_round=2, warmup_steps=1, model_overrides=tiny)


class BertClassifier(nn.Module):
    """``BertModel`` (random init) and a linear head on the pooled output."""

    def __init__(self, config, num_labels: int):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config)
        self.head = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return pooled, self.head(pooled)


def make_train_step(model: BertClassifier, config_name: str, settings: E2ESettings, device: torch.device) -> Callable:
    """``step(batch)``: zero_grad, bf16-autocast forward, ``CE (+ weight * CMI)``, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=device.type == "cuda")
    backend = CMI_BACKENDS.get(config_name)

    def step(batch):
        input_ids, attention_mask, labels = batch
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pooled, logits = model(input_ids, attention_mask)
            loss = F.cross_entropy(logits.float(), labels)
            if backend is not None:
                loss = loss + settings.cmi_weight * cmi_loss(pooled, labels, settings.num_labels, backend=backend).loss
        loss.backward()
        optimizer.step()

    return step


def time_block_ms(step: Callable, batches: list, count: int, device: torch.device) -> float:
    """Mean ms per step of ``count`` back-to-back steps (CUDA events on CUDA)."""

    def block():
        for index in range(count):
            step(batches[index % len(batches)])

    sync(device)
    return elapsed_ms(block, device) / count


MIN_ROUNDS_FOR_VERDICT = 6


def summarise(round_ms: dict[str, list[float]]) -> list[dict]:
    """Median step ms per config and the paired per-round overhead vs ``plain`` (see module docstring)."""
    summary = []
    plain = round_ms.get("plain")
    for config_name, times in round_ms.items():
        entry = {"config": config_name, "step_ms": statistics.median(times), "round_ms": times}
        if plain is not None and config_name != "plain":
            overheads = [100.0 * (mine / base - 1.0) for mine, base in zip(times, plain, strict=True)]
            entry.update(
                overhead_pct=statistics.median(overheads),
                overhead_pct_min=min(overheads),
                overhead_pct_max=max(overheads),
                significant=(min(overheads) > 0 or max(overheads) < 0)
                if len(overheads) >= MIN_ROUNDS_FOR_VERDICT
                else None,
            )
        summary.append(entry)
    return summary


def run_e2e(
    settings: E2ESettings,
    device: torch.device,
    fused_error: str | None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every config; returns the ``e2e`` section of the results JSON."""
    from transformers import BertConfig

    torch.manual_seed(seed)
    config = BertConfig(**settings.model_overrides)
    reference = BertClassifier(config, settings.num_labels).to(device).train()
    batches = [
        (
            torch.randint(0, config.vocab_size, (settings.batch_size, settings.seq_len), device=device),
            torch.ones(settings.batch_size, settings.seq_len, dtype=torch.long, device=device),
            torch.randint(0, settings.num_labels, (settings.batch_size,), device=device),
        )
        for _ in range(settings.num_batches)
    ]
    section = {
        "model": f"BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}), random init",
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "autocast": "bf16",
        "optimizer": "AdamW" + (" (fused)" if device.type == "cuda" else ""),
        "cmi_weight": settings.cmi_weight,
        "cmi_input": "pooled output, per-batch centroids",
        "rounds": settings.rounds,
        "steps_per_round": settings.steps_per_round,
        "errors": {},
    }
    steps = {}
    for config_name in CONFIGS:
        if config_name == "cmi_fused" and fused_error:
            section["errors"][config_name] = fused_error
            continue
        try:
            step = make_train_step(copy.deepcopy(reference), config_name, settings, device)
            for index in range(settings.warmup_steps):
                step(batches[index % len(batches)])
            steps[config_name] = step
        except Exception as error:  # e.g. the fused backend failing under autocast
            section["errors"][config_name] = f"{type(error).__name__}: {error}"

    # A config that fails while timed (e.g. out of memory) is dropped with its error; the others keep their rounds,
    # each of them timed in every round so far, so the per-round pairing with plain stays aligned.
    round_ms = {name: [] for name in steps}
    for round_index in range(settings.rounds):
        for name in rotated(list(round_ms), round_index):
            try:
                round_ms[name].append(time_block_ms(steps[name], batches, settings.steps_per_round, device))
            except Exception as error:
                section["errors"][name] = f"{type(error).__name__} in round {round_index + 1}: {error}"
                del round_ms[name], steps[name]  # its model copy and optimizer state freed for the others
        if not round_ms:
            break
        log(
            f"e2e round {round_index + 1}/{settings.rounds}: "
            + ", ".join(f"{name} {times[-1]:.2f} ms" for name, times in round_ms.items())
        )
    section["configs"] = summarise(round_ms)
    return section
