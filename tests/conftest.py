"""Test-session set-up that must happen before torch compiles or triton is imported.

* Without a GPU, run the Triton kernels in the interpreter.
* A fresh inductor cache: its FX-graph cache key does not cover a custom op's fake kernel, so graphs cached by an
  older checkout (e.g. another statistics row length) would be replayed against the new op and fail.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="cmi-fused-inductor-"))

from glue_fixtures import glue_dir  # noqa: E402, F401  (shared fixture of the GLUE driver and distillation tests)


@pytest.fixture
def log_table_forced(monkeypatch):
    """The launchers use the log-centroid table for every shape (normally only from N >= 1024 rows, past what the
    interpreter can run), so that tests check both ways of getting log G."""
    import kernels.cmi

    monkeypatch.setattr(kernels.cmi, "LOG_TABLE_MIN_ROWS", 1)
    monkeypatch.setattr(kernels.cmi, "LOG_TABLE_ROWS_PER_CLASS", 0)
