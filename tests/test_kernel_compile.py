"""The kernels pass Triton's real compiler for the H100 (sm_90) without spilling, checked ahead of time on any machine.

The interpreter tests prove the math; this proves that every specialisation also lowers to a cubin through ptxas,
and that the single-chunk specialisations training runs (d <= 4096, unit column strides, 16-aligned rows) keep
nothing in local memory. The others (rows of d > 4096; any strides, e.g. a column slice of a larger tensor) must
compile too and may spill a few bytes: ptxas caps some of them at 40-64 registers to fit more blocks per SM and
keeps 8-16 bytes on the stack, a trade it makes on purpose and differently per version and arch. The launchers
pass the compile options these compiles use (``compile_options``: multiply-add contraction on, whatever Triton's
default).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
REPO = pathlib.Path(__file__).resolve().parents[1]


# ptxas may keep a loop-carried scalar or two on the (L1-resident) stack to fit more blocks per SM: seen as
# 8-16 bytes in some chunked (d > 4096) and generic-stride variants, depending on the ptxas version and arch.
# More than that means a register blow-up (a [BLOCK_D] accumulator carried across chunks spilled far more).
SMALL_SPILL_BYTES = 16


def kernel_resources(arch: int, **env_changes: str) -> tuple[list, str]:
    """``bench.kernel_resources --json`` rows and stderr, compiled without the interpreter (and without Triton's FP
    fusion default from the environment, unless ``env_changes`` set one)."""
    env = {
        key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")
    }
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernel_resources", "--arch", str(arch), "--json"],
        cwd=REPO,
        env=dict(env, **env_changes),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize("arch", [90, 80])
def test_every_specialisation_compiles_without_spills(arch):
    rows, stderr = kernel_resources(arch)
    # triton 3.9 warns when a kernel leaves multiply-add contraction to its default, which 3.10 turns off
    assert "TRITON_DEFAULT_FP_FUSION" not in stderr
    # (16 single-chunk + 8 chunked forward + 6 backward + 4 log-table) x (aligned, generic) layouts, the 10 of them
    # that read given centroids (fixed forwards, backward and log table) once for fp32 and once for bf16 centroids
    assert len(rows) == 88
    assert {row["centroids"] for row in rows if row["use"] == "fixed"} == {"fp32", "bf16"}
    for row in rows:
        assert row["reg"] > 0, row
        if row["layout"] == "aligned" and row["kernel"] != "forward_chunked":
            assert row["local"] == 0 and row["stack"] == 0, f"spill in {row}"
        else:
            assert row["local"] == 0 and row["stack"] <= SMALL_SPILL_BYTES, f"spill in {row}"


def test_multiply_add_contraction_does_not_follow_tritons_default():
    rows, _ = kernel_resources(90, TRITON_DEFAULT_FP_FUSION="0")
    assert rows and all(row["fp_fusion"] for row in rows)


def test_every_launch_passes_the_compile_options_the_report_compiles_with(monkeypatch, log_table_forced):
    """The launchers pass ``compile_options`` (as ``bench.kernel_resources`` compiles), to each of the kernels."""
    import kernels.cmi
    from cmi_fused import cmi_loss
    from kernels.cmi_forward import compile_options

    launches = []

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, kwargs))
                return self.kernel[grid](*args, **kwargs)

            return launch

    names = ("cmi_forward_kernel", "cmi_backward_kernel", "cmi_log_centroids_kernel")
    for name in names:
        monkeypatch.setattr(kernels.cmi, name, Recorded(name, getattr(kernels.cmi, name)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features = torch.randn(6, 24, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    centroids = torch.softmax(torch.randn(3, 24, device=device), dim=-1)
    for given in (centroids, None):
        cmi_loss(features, labels, 3, given, backend="triton").loss.backward()
    assert {name for name, _ in launches} == set(names)
    for name, kwargs in launches:
        expected = compile_options(kwargs["BLOCK_D"])
        assert {key: kwargs.get(key) for key in expected} == expected, name
