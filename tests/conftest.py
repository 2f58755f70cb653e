"""Without a GPU, run the Triton kernels in the interpreter. Must happen before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from glue_fixtures import glue_dir  # noqa: E402, F401  (shared fixture of the GLUE driver and distillation tests)
