"""Timing one host call on either device: CUDA events on CUDA, ``perf_counter`` on the CPU."""

from __future__ import annotations

import platform
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


def device_name(device: torch.device) -> str:
    """What the results files name the device by: the GPU's name, or ``CPU <machine>``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}"
