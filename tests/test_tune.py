"""``python -m bench.tune`` (launch-choice A/B): its overrides really reach the launchers and are undone, and the
CPU smoke run writes a row per variant, round and pass. The timings themselves are only meaningful on a GPU."""

import json
import os
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

import kernels.cmi
import kernels.cmi_forward
from bench import cmi_op, tune
from bench.report import slug
from bench.tune import VARIANTS, VARIANTS_BY_NAME, Variant, launch_grid, main, summary_markdown


def test_every_variant_overrides_existing_constants():
    """A renamed constant would turn its variant into a silent copy of main: applying it must fail instead."""
    for variant in VARIANTS:
        with variant.applied():
            for name, value in variant.constants:
                assert getattr(kernels.cmi, name) == value, (variant.name, name)
    with (
        pytest.raises(AttributeError, match="NO_SUCH_CONSTANT"),
        Variant("bad", "", constants=(("NO_SUCH_CONSTANT", 1),)).applied(),
    ):
        pass


def test_overrides_are_undone_and_warps_reach_launch_meta():
    before = {name: getattr(kernels.cmi, name) for name in ("PARTIALS_BUDGET_FRACTION", "PARTIALS_MAX_BYTES")}
    default_warps = kernels.cmi_forward.launch_meta(768)["num_warps"]
    wide_rows_warps = kernels.cmi_forward.launch_meta(8192)["num_warps"]
    with VARIANTS_BY_NAME["warps_2"].applied():
        assert kernels.cmi_forward.launch_meta(768)["num_warps"] == 2
        assert kernels.cmi_forward.launch_meta(8192)["num_warps"] == wide_rows_warps  # BLOCK_D 4096: not overridden
    with VARIANTS_BY_NAME["budget_1/16"].applied():
        assert kernels.cmi.PARTIALS_BUDGET_FRACTION == 16
    assert kernels.cmi_forward.launch_meta(768)["num_warps"] == default_warps
    assert {name: getattr(kernels.cmi, name) for name in before} == before


def test_launch_grid_reports_the_variants_choice():
    import torch

    features = torch.empty(64, 40)
    main_grid = launch_grid(VARIANTS_BY_NAME["main"], features, 3)
    atomics_grid = launch_grid(VARIANTS_BY_NAME["atomics"], features, 3)
    assert atomics_grid["slots"] == 1 and atomics_grid["atomics"]
    assert not main_grid["atomics"]
    assert main_grid["num_warps"] == 4
    assert launch_grid(VARIANTS_BY_NAME["warps_2"], features, 3)["num_warps"] == 2


def test_summary_vs_main_is_the_variants_time_over_mains():
    """The "vs main" column is variant ms / main ms (medians over rounds): 2.00x takes twice as long as main."""
    grid = {"programs": 4, "slots": 4, "atomics": False, "log_table": False, "num_warps": 4}
    row = {"N": 64, "d": 40, "C": 3, "dtype": "fp32", "mode": "fixed", "pass": "fwd", "timing": "wall", **grid}
    rows = [
        dict(row, variant=variant, round=round_index, ms=ms)
        for variant, times in (("main", (1.0, 1.2, 0.8)), ("atomics", (2.0, 2.0, 2.0)))
        for round_index, ms in enumerate(times)
    ]
    results = {"device": "GPU", "date": "2026-01-01", "torch": "x", "triton": "y", "timing": "device", "rounds": 3}
    lines = summary_markdown(dict(results, rows=rows)).splitlines()
    (main_line,) = [line for line in lines if "| main |" in line]
    (atomics_line,) = [line for line in lines if "| atomics |" in line]
    assert main_line.endswith("| 1.0000 | spread 0.8000..1.2000 |")
    # and paired per round: 2.0/1.0, 2.0/1.2, 2.0/0.8
    assert atomics_line.endswith("| 2.0000 | 2.00x (rounds 1.67..2.50x, faster in 0/3) |")


def test_quick_run_writes_a_row_per_variant_round_and_pass(tmp_path):
    assert main(["--quick", "--rounds", "2", "--passes", "fwd", "fwd_bwd", "--output-dir", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("tune-*.json")
    results = json.loads(json_path.read_text())
    rows = [row for row in results["rows"] if not row.get("skipped")]
    variants = {row["variant"] for row in rows}
    assert variants == {"main", "budget_1/16", "atomics", "warps_2"}  # each launches differently at the quick shape
    assert len(rows) == len(variants) * 2 * 2  # rounds x passes, one shape and mode
    assert all(row.get("error") is None and row["ms"] > 0 for row in rows), rows
    markdown = json_path.with_suffix(".md").read_text()
    assert all(f"| {name} |" in markdown for name in variants)
    # named after the device it ran on (the CPU in CI, the GPU where there is one)
    assert os.path.basename(json_path).startswith("tune-" + slug(results["device"]) + "-")


@pytest.mark.parametrize("device_type, sms", [("cpu", None), ("cuda", 132), ("cuda", 108), ("cuda", 16)])
def test_every_quick_variant_launches_unlike_main_at_the_devices_quick_shape(device_type, sms, monkeypatch):
    """The quick run measures all four variants on the interpreter and on a GPU (H100/H200: 132 SMs, A100: 108), whose
    grid is emulated here: one program per row, up to PROGRAMS_PER_SM per SM (kernels.cmi._forward_programs)."""
    if sms is not None:
        monkeypatch.setattr(
            kernels.cmi, "_forward_programs", lambda f: min(f.shape[0], sms * kernels.cmi.PROGRAMS_PER_SM)
        )
    (shape,) = tune.QUICK_SHAPES[device_type]
    features = torch.empty(shape.n_rows, shape.dim)
    main_grid = launch_grid(VARIANTS_BY_NAME["main"], features, shape.num_classes)
    for name in tune.QUICK_VARIANTS[1:]:
        assert launch_grid(VARIANTS_BY_NAME[name], features, shape.num_classes) != main_grid, name


def test_a_variant_with_mains_launch_is_not_measured(tmp_path, monkeypatch):
    """At 8x40 C=3 only warps_2 launches differently from main on the interpreter: the others get one skipped row
    per pass, listed in the markdown, and no device time."""
    seen = []
    monkeypatch.setattr(tune, "measure", lambda variant, *args: seen.append(variant.name) or 1.0)
    args = ["--quick", "--shapes", "8x40:3:fp32", "--variants", "atomics", "warps_2", "--rounds", "1"]
    assert tune.main([*args, "--passes", "fwd", "--output-dir", str(tmp_path)]) == 0
    assert sorted(seen) == ["main", "warps_2"]
    (json_path,) = tmp_path.glob("tune-*.json")
    skipped = [row for row in json.loads(json_path.read_text())["rows"] if row.get("skipped")]
    assert [(row["variant"], row["skipped"], row["ms"]) for row in skipped] == [
        ("atomics", "same launch as main", None)
    ]
    assert "- 8x40 C=3 fp32 fixed: atomics" in json_path.with_suffix(".md").read_text()


def test_tune_summary_uses_the_median_over_rounds():
    grid = {"programs": 4, "slots": 4, "atomics": False, "log_table": False, "num_warps": 4}
    row = {"N": 64, "d": 40, "C": 3, "dtype": "fp32", "mode": "fixed", "pass": "fwd", "timing": "wall", **grid}
    # mean 2.0 and 4.0, median 1.0 and 2.0; warps_2 faster than main in rounds 0 and 2, slower in round 1
    times = {"main": (1.0, 1.0, 4.0), "atomics": (2.0, 2.0, 8.0), "warps_2": (0.5, 1.5, 3.0)}
    rows = [dict(row, variant=v, round=i, ms=ms) for v in times for i, ms in enumerate(times[v])]
    results = {"device": "GPU", "date": "2026-01-01", "torch": "x", "triton": "y", "timing": "device", "rounds": 3}
    lines = summary_markdown(dict(results, rows=rows)).splitlines()
    assert any(line.endswith("| 1.0000 | spread 1.0000..4.0000 |") for line in lines)
    # paired per round: 2/1, 2/1, 8/4
    assert any(line.endswith("| 2.0000 | 2.00x (rounds 2.00..2.00x, faster in 0/3) |") for line in lines)
    assert any(line.endswith("| 1.5000 | 1.50x (rounds 0.50..1.50x, faster in 2/3) |") for line in lines)


def test_tune_always_measures_main_and_rotates_the_order(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(tune, "measure", lambda variant, *args: seen.append(variant.name) or 1.0)
    assert (
        tune.main(
            ["--quick", "--variants", "atomics", "--rounds", "2", "--passes", "fwd", "--output-dir", str(tmp_path)]
        )
        == 0
    )
    assert seen == ["main", "atomics", "atomics", "main"]  # main added, and the order rotates per round


def test_tune_measures_the_fused_op_with_the_variants_deterministic(monkeypatch):
    cmi_loss = mock.Mock(wraps=tune.cmi_loss)
    monkeypatch.setattr(tune, "cmi_loss", cmi_loss)
    # the device tune runs on: the fused op takes CPU tensors only in the interpreter, which a GPU host does not set
    shape, device = cmi_op.Shape(8, 40, 3, "fp32"), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = cmi_op.make_inputs(shape, "fixed", 1, device, torch.Generator(device=device).manual_seed(0))
    budget = cmi_op.Budget.quick()
    assert tune.measure(tune.VARIANTS_BY_NAME["atomics"], shape, "fwd", "wall", inputs, device, budget) > 0
    kwargs = [call.kwargs for call in cmi_loss.call_args_list]
    assert kwargs and all(kw["deterministic"] is False and kw["backend"] == "triton" for kw in kwargs)


def test_help_lists_each_variant_with_its_question(capsys):
    """bench/README.md sends readers to --help for what each variant asks: one unwrapped line per variant."""
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for variant in VARIANTS:
        assert f"  {variant.name}: {variant.question}" in lines, variant.name
