"""``python -m bench.host_overhead``: the stub really replaces every launch of a step (so what is timed is the host
path alone), is undone afterwards, and the CLI writes a row per provider. The times themselves are not checked."""

import json
import os

import pytest
import torch

pytest.importorskip("triton")

import kernels.cmi
from bench.host_overhead import KERNELS, launches_stubbed, main, steps


def test_stub_counts_every_launch_of_a_step_and_is_undone():
    step_fns = steps(n_rows=1100, dim=40, num_classes=3, dtype=torch.float32)  # N >= 1024: with the log table
    programs, interpret = kernels.cmi.INTERPRETER_PROGRAMS, os.environ.get("TRITON_INTERPRET")
    real_kernels = {name: getattr(kernels.cmi, name) for name in KERNELS}
    with launches_stubbed(sms=132) as launches:
        assert kernels.cmi.INTERPRETER_PROGRAMS == 132 * kernels.cmi.PROGRAMS_PER_SM
        step_fns["fused fixed"]()
        assert launches == {"cmi_forward_kernel": 1, "cmi_backward_kernel": 1, "cmi_log_centroids_kernel": 1}
        step_fns["fused batch"]()  # two forward phases, the table built from the phase-1 statistics
        assert launches == {"cmi_forward_kernel": 3, "cmi_backward_kernel": 2, "cmi_log_centroids_kernel": 2}
    assert (kernels.cmi.INTERPRETER_PROGRAMS, os.environ.get("TRITON_INTERPRET")) == (programs, interpret)
    assert {name: getattr(kernels.cmi, name) for name in KERNELS} == real_kernels


def test_cli_writes_a_row_per_provider(tmp_path, capsys):
    out = tmp_path / "host.json"
    rows = main(["--rows", "8", "--dim", "24", "--rounds", "2", "--iters", "2", "--json", str(out)])
    assert [row["provider"] for row in rows] == ["noop", "fused fixed", "fused batch", "eager fixed"]
    assert all(row["min_us"] > 0 and row["min_us"] <= row["median_us"] for row in rows)
    assert json.loads(out.read_text())["rows"] == rows
    assert "| fused fixed |" in capsys.readouterr().out
