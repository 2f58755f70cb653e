"""``backend="triton"``: the fused kernels of ``kernels/`` behind the ``cmi_loss`` contract."""

from __future__ import annotations

from typing import Optional

import torch

from kernels.cmi import CMIFunction

from .options import CMIOptions, CMIOutput
from .reference import reduce_rows

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACCUMULATE_MODES = {None: "auto", True: "partials", False: "atomics"}


def cmi_loss_triton(
    features: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor], options: CMIOptions
) -> CMIOutput:
    if features.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"features dtype {features.dtype} is not supported by backend='triton' (float32, bfloat16, float16); "
            "use backend='torch'"
        )
    if centroids is not None:
        centroids = centroids.detach()
    row_kl, stats = CMIFunction.apply(
        features,
        labels,
        centroids,
        options.num_classes,
        options.temperature,
        options.eps,
        ACCUMULATE_MODES[options.deterministic],
    )
    dim = features.shape[1]
    return CMIOutput(reduce_rows(row_kl, options.reduction), stats[:, :dim], stats[:, dim])
