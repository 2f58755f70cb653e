"""Timing one host call on either device: CUDA events on CUDA, ``perf_counter`` on the CPU."""

from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds from the start to the end of ``fn()``'s work (call ``sync`` first for an idle GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3
