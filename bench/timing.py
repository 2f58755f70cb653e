"""Timing one host call on either device: CUDA events on CUDA, ``perf_counter`` on the CPU."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds from the start to the end of ``fn()``'s work (call ``sync`` first for an idle GPU). What ``fn``
    returns (a forward's loss and its autograd graph) is freed after the clock stops, not inside the timing."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        del result
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    result = fn()
    elapsed_s = time.perf_counter() - start_s
    del result
    return elapsed_s * 1e3


def rotated(items: Sequence, round_index: int) -> list:
    """``items`` in the order of an interleaved round: rotated by one more place each round, so that clock and
    temperature drift spread over all of them instead of always hitting the same one."""
    shift = round_index % max(1, len(items))
    return list(items[shift:]) + list(items[:shift])


def device_name(device: torch.device) -> str:
    """What the results files name the device by: the GPU's name, or ``CPU <machine>``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}"
