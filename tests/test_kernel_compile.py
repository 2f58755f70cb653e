"""The kernels pass Triton's real compiler for the H100 (sm_90) without spilling, checked ahead of time on any machine.

The interpreter tests prove the math; this proves that every specialisation also lowers to a cubin through ptxas,
and that the single-chunk specialisations training runs (d <= 4096, unit column strides, 16-aligned rows) keep
nothing in local memory. The others (rows of d > 4096; any strides, e.g. a column slice of a larger tensor) must
compile too and may spill a few bytes: ptxas caps some of them at 40-64 registers to fit more blocks per SM and
keeps 8-16 bytes on the stack, a trade it makes on purpose and differently per version and arch. The compiles use
the launchers' options (``compile_options``: multiply-add contraction on, whatever Triton's default; that every
launch passes them is checked in ``test_cmi_loss.py``). The compiled backward also rounds its bf16 / fp16 gradient to
nearest, which triton's interpreter does not do for bf16, and the forward adds into the shared class-statistics slot
with relaxed atomics and into a program's own slot with none, which the interpreter cannot tell apart.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
REPO = pathlib.Path(__file__).resolve().parents[1]


# ptxas may keep a loop-carried scalar or two on the (L1-resident) stack to fit more blocks per SM: seen as
# 8-16 bytes in some chunked (d > 4096) and generic-stride variants, depending on the ptxas version and arch.
# More than that means a register blow-up (a [BLOCK_D] accumulator carried across chunks spilled far more).
SMALL_SPILL_BYTES = 16


def compile_in_python(args: list, **env_changes: str) -> tuple:
    """The JSON last line of stdout and the stderr of ``python *args``, run without the interpreter (and without
    Triton's FP fusion default from the environment, unless ``env_changes`` set one)."""
    env = {
        key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")
    }
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=dict(env, **env_changes), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def kernel_resources(arch: int, **env_changes: str) -> tuple[list, str]:
    """``bench.kernel_resources --json`` rows and stderr."""
    return compile_in_python(["-m", "bench.kernel_resources", "--arch", str(arch), "--json"], **env_changes)


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


# Compiles the backward for bf16 and fp16 features (sm_90, both layouts) and prints the PTX conversions from fp32
# to that dtype, e.g. ["cvt.rn.bf16x2.f32"], one list per (dtype, layout).
DOWNCASTS_SCRIPT = """
import json, re
from bench import kernel_resources as kr
from kernels.cmi_backward import cmi_backward_kernel
use, none_args, flags = kr.BACKWARD_USES[0]
found = {}
for dtype in ("bf16", "fp16"):
    types = dict(kr.BACKWARD_TYPES, centroids_ptr="*fp32", features_ptr="*" + dtype, grad_features_ptr="*" + dtype)
    for layout in kr.LAYOUTS:
        ptx = kr._compile(cmi_backward_kernel, types, none_args, dict(flags, BLOCK_D=1024), 90, layout).asm["ptx"]
        found[dtype + " " + layout] = sorted(set(re.findall(r"cvt[.a-z]*\\.(?:bf16|f16)(?:x2)?\\.f32", ptx)))
print(json.dumps(found))
"""


def test_the_compiled_gradient_store_rounds_to_nearest():
    """The backward converts its fp32 gradient to the features' bf16 / fp16 with round-to-nearest instructions
    (``cvt.rn``), as torch's ``.to`` rounds: what the CUDA case of ``test_low_precision_gradient_is_the_fp32_gradient_
    rounded_once`` expects, where triton's interpreter rounds bf16 toward zero (README, "Known issues")."""
    found, _ = compile_in_python(["-c", DOWNCASTS_SCRIPT])
    assert set(found) == {f"{dtype} {layout}" for dtype in ("bf16", "fp16") for layout in ("aligned", "generic")}
    for key, conversions in found.items():
        width = "bf16" if key.startswith("bf16") else "f16"
        assert conversions and all(c.startswith(f"cvt.rn.{width}") for c in conversions), (key, conversions)


# Compiles the forward's class-statistics use (sm_90, both layouts) into per-program slots and into the shared slot
# (USE_ATOMICS) and prints the PTX's atomic and fence instructions, one list per (atomics, layout).
ATOMICS_SCRIPT = """
import json, re
from bench import kernel_resources as kr
from kernels.cmi_forward import cmi_forward_kernel
_, none_args, flags = {use[0]: use for use in kr.FORWARD_USES}["batch_stats"]
found = {}
for atomics in (False, True):
    specialised = dict(flags, USE_ATOMICS=atomics, BLOCK_D=1024, SINGLE_CHUNK=True)
    for layout in kr.LAYOUTS:
        ptx = kr._compile(cmi_forward_kernel, kr.FORWARD_TYPES, none_args, specialised, 90, layout).asm["ptx"]
        found[f"{atomics} {layout}"] = sorted(set(re.findall(r"\\b(?:red|atom|fence|membar)[._a-z0-9]*", ptx)))
print(json.dumps(found))
"""


def test_only_the_shared_slot_is_added_to_with_relaxed_atomics():
    """The forward adds into the one shared slot (USE_ATOMICS) with relaxed fp32 reductions and no fence (README,
    "Relaxed atomics"), and into a program's own slot with none (its only writer). The interpreter runs programs one
    after another, so plain load/add/store into the shared slot, a race on a GPU, passes every CPU test of the op."""
    found, _ = compile_in_python(["-c", ATOMICS_SCRIPT])
    for layout in ("aligned", "generic"):
        assert found[f"False {layout}"] == [], found
        atomics = found[f"True {layout}"]
        # triton 3.9 writes red (no result), 3.6 atom with an unused result: both relaxed, neither fenced
        assert atomics and all(re.match(r"(red|atom)\.global\.gpu\.relaxed\.add", name) for name in atomics), found


# ------------------------------------------------------------------------------------------------------
# Added after a mutation pass over bench/kernel_resources.py: what it hands to the compiler and how it reports, with
# the compiler replaced by a stand-in (no compile: fast, and the same under the interpreter).
class StandInCompiled:
    metadata = type("Metadata", (), {"enable_fp_fusion": True})()


@pytest.fixture
def compiles_recorded(monkeypatch):
    """``kernel_resources.report`` with ``triton.compile`` and the cuobjdump step stubbed: ``(rows, sources)``, the
    ASTSource of each row in order."""
    from bench import kernel_resources

    sources = []

    def fake_compile(source, target, options):
        sources.append(source)
        return StandInCompiled()

    monkeypatch.setattr(kernel_resources.triton, "compile", fake_compile)
    monkeypatch.setattr(kernel_resources, "_resources", lambda compiled: {"reg": 1, "stack": 0, "local": 0})
    rows = kernel_resources.report(90)
    return rows, sources


def test_generic_layout_specialises_nothing_of_the_callers_tensors(compiles_recorded):
    """The aligned layout compiles what training runs (unit column strides as constants, the caller's pointers and row
    strides 16-divisible); the generic one assumes none of it (any strides, e.g. a column slice), only of the launchers'
    own buffers. The forward rows are named by SINGLE_CHUNK: chunked rows loop over d > 4096."""
    from bench import kernel_resources as kr

    rows, sources = compiles_recorded
    assert rows and len(rows) == len(sources)
    for row, source in zip(rows, sources, strict=True):
        names = source.fn.arg_names
        constants = {names[index]: value for (index,), value in source.constants.items()}
        divisible = {names[index] for (index,) in source.attrs}
        strides = {name for name in kr.UNIT_STRIDES if name in names}
        callers = {name for name in kr.CALLER_ALIGNED if name in names and name not in constants}
        if row["layout"] == "aligned":
            assert all(constants.get(name) == 1 for name in strides), (row, constants)
            assert callers <= divisible, row
        else:
            assert not strides & set(constants) and not callers & divisible, (row, constants, divisible)
        assert divisible <= set(kr.OWN_ALIGNED) | set(kr.CALLER_ALIGNED)
        if row["kernel"].startswith("forward"):
            assert (row["kernel"] == "forward") == constants["SINGLE_CHUNK"] and row["block_d"] == constants["BLOCK_D"]


def test_table_columns_and_default_arch(monkeypatch, capsys):
    """Without --arch it reports the H100's sm_90; each resource lands in its own column of the table."""
    from bench import kernel_resources

    archs = []
    row = dict(kernel="forward", use="fixed", centroids="fp32", layout="aligned", atomics=False, block_d=1024,
               fp_fusion=True, reg=40, local=8, stack=16, shared=4)  # fmt: skip
    monkeypatch.setattr(kernel_resources, "report", lambda arch: archs.append(arch) or [row])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernel_resources.main([]) == 0
    out = capsys.readouterr().out
    assert archs == [90] and out.startswith("sm_90, triton")
    assert "| registers | local (spill) bytes | stack | shared |" in out
    assert "| forward | fixed | fp32 | aligned | False | 1024 | 40 | 8 | 16 | 4 |" in out


def test_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    from bench import kernel_resources

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernel_resources, "report", lambda arch: pytest.fail("compiled under the interpreter"))
    with pytest.raises(SystemExit) as exit_info:
        kernel_resources.main([])
    assert exit_info.value.code == 2 and "unset TRITON_INTERPRET" in capsys.readouterr().err
