"""Packaging: the wheel ships exactly the library (``cmi_fused`` and ``kernels``), its version floors admit no
release that transformers refuses and are the ones CI's second run pins, CI runs the README's test command, the
library works where triton is not installed, and our ``kernels`` package is not taken for Hugging Face's
hub-kernels package of the same import name.

transformers accepts ``kernels`` only in its supported version range; our distribution (``cmi-fused`` 0.1.0, or no
distribution at all for a bare source checkout) is outside it, so ``is_kernels_available()`` must stay False.
Each check runs in a fresh interpreter, because transformers caches that answer.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = {"cmi_fused", "kernels"}
# Build outputs and local caches that must not travel into the copy the wheel is built from.
NOT_SOURCE = (
    ".git",
    ".venv",
    ".venv-floors",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".hypothesis",
    ".benchmarks",
    ".whl",
    ".data",
    ".models",
    "outputs",
    "runs",
    "shared",
)


def run_python(code: str, pythonpath: Path, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter with ``pythonpath`` first on sys.path; return its last output line."""
    search_path = [str(pythonpath)] + [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(search_path))
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (so that no build/ or *.egg-info lands in the repository)."""
    source = tmp_path_factory.mktemp("source") / "cmi-fused"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    wheel_dir = tmp_path_factory.mktemp("wheel")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    (wheel,) = wheel_dir.glob("cmi_fused-*.whl")
    return wheel


def test_wheel_holds_exactly_the_library(wheel_path: Path):
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == LIBRARY_PACKAGES, f"wheel top-level entries: {sorted(top_level)}"

    # Every module of the two packages (subpackages included) is in the wheel: none was left out of setup.py.
    source_modules = {
        path.relative_to(REPO_ROOT).as_posix()
        for package in LIBRARY_PACKAGES
        for path in (REPO_ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    wheel_modules = {name for name in names if name.endswith(".py")}
    assert "kernels/cmi.py" in source_modules and "cmi_fused/loss.py" in source_modules
    assert source_modules == wheel_modules, f"missing from the wheel: {sorted(source_modules - wheel_modules)}"


KERNELS_CHECK = """
    import importlib.metadata, json
    import transformers.utils
    available = transformers.utils.is_kernels_available()
    import kernels
    try:
        version = importlib.metadata.version("cmi-fused")
    except importlib.metadata.PackageNotFoundError:
        version = None
    print(json.dumps({"available": available, "kernels_file": kernels.__file__, "cmi_fused_version": version}))
"""


def test_source_kernels_is_not_hub_kernels(tmp_path: Path):
    """With this checkout's ``kernels`` first on the path, transformers must not take it for hub-kernels."""
    report = run_python(KERNELS_CHECK, pythonpath=REPO_ROOT, cwd=tmp_path)
    assert Path(report["kernels_file"]).resolve() == (REPO_ROOT / "kernels" / "__init__.py").resolve()
    assert report["available"] is False


def test_installed_wheel_kernels_is_not_hub_kernels(wheel_path: Path, tmp_path: Path):
    """Installed from the wheel, the import name ``kernels`` belongs to distribution cmi-fused 0.1.0, which
    transformers' version range for hub-kernels excludes."""
    target = tmp_path / "site"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = run_python(KERNELS_CHECK, pythonpath=target, cwd=tmp_path)
    assert Path(report["kernels_file"]).resolve() == (target / "kernels" / "__init__.py").resolve()
    assert report["cmi_fused_version"] == "0.1.0"
    assert report["available"] is False


def wheel_requirements(wheel_path: Path) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` lines: runtime requirements and, with an ``extra`` marker, the extras'."""
    with zipfile.ZipFile(wheel_path) as wheel:
        (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
        return [Requirement(line) for line in email.message_from_bytes(wheel.read(metadata)).get_all("Requires-Dist")]


def version_floor(specifier) -> Version | None:
    """The lowest version a ``SpecifierSet`` admits through ``>=``, ``==`` or ``~=`` (None: no floor)."""
    floors = [Version(spec.version) for spec in specifier if spec.operator in (">=", "==", "~=")]
    return max(floors, default=None)


def test_floors_are_at_least_those_transformers_needs(wheel_path: Path):
    """Every runtime requirement of ours that transformers also names admits no release below transformers' own
    floor: under it the installed transformers refuses to run (it turns PyTorch off below 2.6 and its Trainer needs
    accelerate 1.1), so a lower floor would promise an install that cannot train. A transformers release that raises
    a floor fails this until setup.py follows."""
    from transformers.dependency_versions_table import deps

    runtime = [req for req in wheel_requirements(wheel_path) if req.marker is None or "extra" not in str(req.marker)]
    compared = {}
    for ours in runtime:
        theirs = version_floor(Requirement(deps[ours.name]).specifier) if ours.name in deps else None
        if theirs is not None:
            compared[ours.name] = (version_floor(ours.specifier), theirs)
    assert {"torch", "accelerate"} <= set(compared), compared
    too_low = {name: floors for name, floors in compared.items() if floors[0] is None or floors[0] < floors[1]}
    assert not too_low, f"(ours, transformers') floors: {too_low}"


def test_ci_floors_pin_every_floor_of_setup_py(wheel_path: Path):
    """CI's second run installs ``.ci/floors.txt``: it must pin each requirement of the wheel, test extras included,
    at exactly setup.py's floor, so that a floor moved in one place and not the other fails here instead of CI
    testing releases setup.py no longer names. torch and setuptools are the file's stated exceptions."""
    requires = wheel_requirements(wheel_path)
    floors = {req.name: version_floor(req.specifier) for req in requires if req.name not in ("torch", "setuptools")}
    pinned = {}
    for line in (REPO_ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            (spec,) = pin.specifier
            assert spec.operator == "==", line
            pinned[pin.name] = Version(spec.version)
    assert {"transformers", "datasets", "pytest"} <= set(floors), floors
    assert {name: pinned.get(name) for name in floors} == floors


def test_ci_runs_exactly_the_readme_test_command():
    """``.ci/run`` calls the README's test command as it is written there, and no other pytest command."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    tests_section = readme.split("\nTests (exactly what CI runs", 1)[1]
    (readme_command,) = tests_section.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()
    ci_lines = [line.split("#", 1)[0].strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    runs = [line for line in ci_lines if "-m pytest" in line or line.startswith("pytest")]
    assert runs == [readme_command]


def test_the_library_works_without_triton(tmp_path: Path):
    """setup.py installs triton on Linux only. Without it the torch backend, "auto" (CUDA features included), the
    regulariser and the GLUE and distillation drivers still work, and backend="triton" says what is missing."""
    code = """
        import json, sys
        sys.modules["triton"] = None  # `import triton` fails, as where it is not installed
        from types import SimpleNamespace
        import torch
        import cmi_fused.distill, cmi_fused.glue.cli
        from cmi_fused import CMIRegularizer, cmi_loss
        from cmi_fused.options import resolve_backend
        features, labels = torch.randn(6, 5, requires_grad=True), torch.tensor([0, 1, 2, 0, 1, 2])
        (cmi_loss(features, labels, 3).loss + CMIRegularizer(3, 5, centroids="ema")(features, labels)).backward()
        try:
            cmi_loss(features, labels, 3, backend="triton")
            error = None
        except ImportError as raised:
            error = str(raised)
        cuda_features = SimpleNamespace(is_cuda=True, dtype=torch.float32)
        print(json.dumps({"auto": resolve_backend("auto", cuda_features), "grad": features.grad is not None,
                          "error": error}))
    """
    result = run_python(code, REPO_ROOT, tmp_path)
    assert result["auto"] == "torch" and result["grad"], result
    assert "backend='triton' needs the triton package" in (result["error"] or ""), result
