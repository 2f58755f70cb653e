"""Test-session set-up that must happen before torch compiles or triton is imported.

* Without a GPU, run the Triton kernels in the interpreter.
* A fresh inductor cache, removed at exit: its FX-graph cache key does not cover a custom op's fake kernel, so
  graphs cached by an older checkout (e.g. another statistics row length) would be replayed against the new op and
  fail.
* A clear stop when another distribution also provides the import name ``kernels`` (Hugging Face's hub-kernels,
  which transformers >= 5.25 requires): the two shadow each other, and a transformers whose supported range admits
  that distribution's version takes our ``kernels`` for it and fails on import, deep inside the fixtures below.
* A clear stop when the Triton interpreter cannot run with the installed numpy (triton < 3.7 with numpy >= 2.4),
  instead of every kernel test failing with the same TypeError from inside triton.
* The session's seed of the op suite's random inputs (``CMI_TEST_SEED``): new in every session, so each run draws
  fresh inputs; printed at the end, and ``CMI_TEST_SEED=<seed>`` repeats a run. Set in the environment here, before
  pytest-xdist starts its workers, so they all use it.
"""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

import pytest
import torch
from packaging.utils import canonicalize_name

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CMI_TEST_SEED", str(int.from_bytes(os.urandom(4), "little")))
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    inductor_cache = tempfile.mkdtemp(prefix="cmi-fused-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    atexit.register(shutil.rmtree, inductor_cache, ignore_errors=True)  # not left behind in /tmp by every run

other_kernels = sorted(
    {canonicalize_name(name) for name in importlib.metadata.packages_distributions().get("kernels", [])} - {"cmi-fused"}
)
if other_kernels:
    pytest.exit(
        f"distribution(s) {other_kernels} also provide the import name `kernels` (Hugging Face's hub-kernels?), "
        "which shadows ours: use a fresh environment with transformers<5.25, as setup.py pins",
        returncode=4,
    )

if os.environ.get("TRITON_INTERPRET") == "1":
    from kernels.cmi import interpreter_numpy_problem

    interpreter_problem = interpreter_numpy_problem()
    if interpreter_problem:
        pytest.exit(f"the kernels run in triton's interpreter on the CPU: {interpreter_problem}", returncode=4)

from glue_fixtures import glue_dir  # noqa: E402, F401  (shared fixture of the GLUE driver and distillation tests)


@pytest.fixture
def log_table_forced(monkeypatch):
    """The launchers use the log-centroid table for every shape (normally only from N >= 1024 rows, past what the
    interpreter can run), so that tests check both ways of getting log G."""
    import kernels.cmi

    monkeypatch.setattr(kernels.cmi, "LOG_TABLE_MIN_ROWS", 1)
    monkeypatch.setattr(kernels.cmi, "LOG_TABLE_ROWS_PER_CLASS", 0)


def pytest_terminal_summary(terminalreporter):
    """The seed last, where a failure report ends (``-q`` shows it too)."""
    terminalreporter.write_line(f"random inputs of the op suite: CMI_TEST_SEED={os.environ['CMI_TEST_SEED']}")
