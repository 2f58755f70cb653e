"""Argument checking for :func:`cmi_fused.cmi_loss`, shared by every backend.

All checks read shapes, dtypes and devices only, so none of them synchronises with the GPU. The one
value check (labels inside ``[0, num_classes)``) needs the label values on the host: it runs for CPU
tensors (free; skipped while torch.compile traces) and, on CUDA, only when asked (``check_labels=True``);
without it the kernels still never touch memory out of bounds and give such rows a NaN loss (see the README).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
from typing import NamedTuple, Optional

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # feature dtypes of the triton backend
# setup.py installs triton on Linux only (no wheels elsewhere): without it "auto" takes the torch backend on CUDA too.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Integer label dtypes that every backend can compare and index with (torch has no CPU kernels for min/max/ge on
# uint16/32/64).
LABEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
FLOAT32 = torch.finfo(torch.float32)


class CMIOutput(NamedTuple):
    """What :func:`cmi_fused.cmi_loss` returns.

    ``loss``: scalar (``mean``/``sum``) or ``(N,)`` (``none``), float32 (float64 for float64 features
    on the torch backend), differentiable w.r.t. the features only.
    ``class_sums``: ``(C, d)`` float32, the sum of ``softmax(h_i / T)`` over the rows of each class.
    ``class_counts``: ``(C,)`` float32, the number of rows of each class.
    """

    loss: torch.Tensor
    class_sums: torch.Tensor
    class_counts: torch.Tensor


@dataclasses.dataclass(frozen=True)
class CMIOptions:
    """The scalar options of one ``cmi_loss`` call, validated."""

    num_classes: int
    temperature: float = 1.0
    reduction: str = "mean"
    eps: float = 1e-12
    deterministic: Optional[bool] = None


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the torch paths compute in: float64 where an input is float64, float32 otherwise (bf16/fp16/fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def is_integer(value) -> bool:
    """Python's or numpy's integers, not bools (an int subclass that no one means as a count or an index)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, low: int = 1, high: Optional[int] = None) -> int:
    """``value`` as an int: an integer (:func:`is_integer`) in [low, high]; else a ``ValueError`` naming it. The int()
    keeps numpy integers out of kernel arguments and buffer shapes."""
    if is_integer(value):
        number = int(value)
        if low <= number and (high is None or number <= high):
            return number
    if high is None:
        wanted = "a positive int" if low == 1 else f"an int >= {low}"
    else:
        wanted = f"an int in [{low}, {high}]"
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open=False, high_open=False):
    """``value`` as a float: a finite real number (not a bool) in the interval; else a ``ValueError`` naming it."""
    number = math.nan
    # int and float first: isinstance stops at the first match, before numbers.Real's slower ABC check.
    if isinstance(value, (float, int, numbers.Real)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
    above = low < number if low_open else low <= number
    below = number < high if high_open else number <= high
    # -inf < x < inf rather than math.isfinite: also false for NaN, and traceable when torch.compile passes a
    # changing temperature or eps in as a symbolic float (math.isfinite breaks the graph there).
    if not (-math.inf < number < math.inf and above and below):
        if high == math.inf:
            interval = f"{'>' if low_open else '>='} {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number {interval}, got {value!r}")
    return number


def check_temperature(temperature, name: str = "temperature") -> float:
    """T as a float: finite, > 0, and with 1/T a normal float32 (the kernels scale by 1/T in float32; a 1/T that
    overflowed or flushed to zero would turn the padding lanes' -inf into NaN). Errors name it ``name``."""
    value = check_number(name, temperature, 0.0, low_open=True)
    if not FLOAT32.tiny <= 1.0 / value <= FLOAT32.max:
        raise ValueError(
            f"{name} must lie in [{1.0 / FLOAT32.max:.3g}, {1.0 / FLOAT32.tiny:.3g}] (1/T a normal float32), "
            f"got {temperature!r}"
        )
    return value


def check_eps(eps) -> float:
    """eps as a float: finite, > 0, and a normal float32 (the kernels and the float32 path floor G at eps in
    float32, where a smaller eps would round to 0 or a subnormal and a larger one overflow to inf)."""
    value = check_number("eps", eps, 0.0, low_open=True)
    if not FLOAT32.tiny <= value <= FLOAT32.max:
        raise ValueError(f"eps must lie in [{FLOAT32.tiny:.3g}, {FLOAT32.max:.3g}] (a normal float32), got {eps!r}")
    return value


def labels_in_range(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` as int64, and the mask of those in [0, num_classes): what the torch paths use, without a host sync,
    to keep a bad label from ever being an index. int64 first, so that a stand-in such as the overflow bin
    ``num_classes`` fits (int8 labels with C = 128 could not hold it)."""
    labels = labels.long()
    return labels, (labels >= 0) & (labels < num_classes)


def validate_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` if any label is outside ``[0, num_classes)``. Synchronises once on CUDA: both bounds
    come to the host in one copy (``int(labels.min()), int(labels.max())`` would be two)."""
    if labels.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(labels)).tolist()
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); found label {bad}")


def check_float_tensor(features) -> None:
    """``features`` is a floating-point tensor."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")


def check_label_tensor(labels, n_rows: int, device: torch.device, reference: str) -> None:
    """``labels`` is an integer (n_rows,) tensor on ``device`` (that of the tensor named ``reference``)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int8/16/32/64 or uint8), got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must have shape ({n_rows},) to match {reference}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {reference} on {device}")


def resolve_backend(backend: str, features: torch.Tensor) -> str:
    """``auto``: the kernels for CUDA features of a dtype they take, the PyTorch reference otherwise (CPU, float64,
    or no triton installed)."""
    if backend != "auto":
        return backend
    return "triton" if TRITON_INSTALLED and features.is_cuda and features.dtype in KERNEL_DTYPES else "torch"


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_optional_bool(value, name: str) -> None:
    """``value`` is None, True or False: ``isinstance``, since ``in (None, True, False)`` would take 1 or 0.0."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be None, True or False, got {value!r}")


def maybe_validate_labels(labels: torch.Tensor, num_classes: int, check_labels: Optional[bool]) -> None:
    """The label-range check where it is asked for or free (CPU tensors, outside torch.compile tracing)."""
    if check_labels is None:
        # Under torch.compile the default skips the check: reading values would break the graph.
        check_labels = labels.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_labels:
        validate_labels(labels, num_classes)


def check_inputs(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes,
    centroids: Optional[torch.Tensor],
    *,
    temperature,
    reduction,
    eps,
    backend,
    deterministic,
    check_labels,
) -> tuple[CMIOptions, str]:
    """Validate every argument; return the options and the resolved backend name."""
    check_float_tensor(features)
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {tuple(features.shape)}")
    n_rows, dim = features.shape
    if n_rows == 0 or dim == 0:
        raise ValueError(f"features must have at least one row and one column, got shape {tuple(features.shape)}")
    check_label_tensor(labels, n_rows, features.device, "features")
    num_classes = check_int("num_classes", num_classes)
    if centroids is not None:
        if not isinstance(centroids, torch.Tensor) or not centroids.is_floating_point():
            raise TypeError("centroids must be a floating-point tensor of shape (num_classes, d) or None")
        if tuple(centroids.shape) != (num_classes, dim):
            raise ValueError(
                f"centroids must have shape (num_classes, d) = ({num_classes}, {dim}), got {tuple(centroids.shape)}"
            )
        if centroids.device != features.device:
            raise ValueError(f"centroids are on {centroids.device} but features on {features.device}")
    temperature = check_temperature(temperature)
    eps = check_eps(eps)
    check_reduction(reduction)
    check_backend(backend)
    check_optional_bool(deterministic, "deterministic")
    check_optional_bool(check_labels, "check_labels")
    maybe_validate_labels(labels, num_classes, check_labels)

    backend = resolve_backend(backend, features)
    options = CMIOptions(
        num_classes=num_classes,
        temperature=temperature,
        reduction=reduction,
        eps=eps,
        deterministic=deterministic,
    )
    return options, backend
