"""Compile every specialisation of the CMI kernels for a GPU target ahead of time and report their resources.

Runs without a GPU (Triton's own ptxas and cuobjdump do the work), so a CPU machine can check that the kernels
pass the real compiler, not just the interpreter, and that no specialisation spills to local memory:

    python -m bench.kernel_resources [--arch 90] [--json]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions this compiles).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cmi_fused.cli_help import DefaultsHelpFormatter
from kernels.cmi_backward import cmi_backward_kernel
from kernels.cmi_forward import cmi_forward_kernel, compile_options
from kernels.cmi_log_centroids import cmi_log_centroids_kernel

FORWARD_TYPES = dict(
    features_ptr="*bf16", stride_feat_row="i32", stride_feat_col="i32", labels_ptr="*i64", stride_label="i32",
    stride_cent_row="i32", stride_cent_col="i32", stats_ptr="*fp32", stride_stats_row="i32",
    accum_ptr="*fp32", stride_accum_row="i32", lse_in_ptr="*fp32", lse_out_ptr="*fp32", row_kl_ptr="*fp32", n_rows="i32", dim="i32",
    num_classes="i32", inv_temperature="fp32", eps="fp32",
)  # fmt: skip
BACKWARD_TYPES = dict(
    features_ptr="*bf16", stride_feat_row="i32", stride_feat_col="i32", labels_ptr="*i64", stride_label="i32",
    stride_cent_row="i32", stride_cent_col="i32", stats_ptr="*fp32", stride_stats_row="i32",
    lse_ptr="*fp32", row_kl_ptr="*fp32", grad_loss_ptr="*fp32", stride_grad="i32", grad_scale="fp32", grad_features_ptr="*bf16",
    dim="i32", num_classes="i32", inv_temperature="fp32", eps="fp32",
)  # fmt: skip
LOG_TABLE_TYPES = dict(
    stride_cent_row="i32", stride_cent_col="i32", stats_ptr="*fp32", stride_stats_row="i32",
    table_ptr="*fp32", stride_table_row="i32", dim="i32", eps="fp32",
)  # fmt: skip
# The centroid pointer's type is not in the tables above: centroid_variants gives it per specialisation. With
# LOG_CENTROIDS it is the fp32 log-centroid table. Given centroids are read in the dtype the caller passes (the
# launchers convert nothing): fp32 from CMIRegularizer's buffers and the benchmark, or the features' bf16.
TABLE_POINTER = {"centroids_ptr": "*fp32"}
CENTROID_DTYPES = ("fp32", "bf16")


def centroid_variants(types: dict, flags: dict) -> list:
    """``(centroids, types)`` per specialisation of the centroid pointer: the table, the statistics (no pointer), or
    each dtype of given centroids."""
    if flags.get("LOG_CENTROIDS"):
        return [("table", dict(types, **TABLE_POINTER))]
    if not flags["HAS_CENTROIDS"]:
        return [("stats", types)]
    return [(dtype, dict(types, centroids_ptr=f"*{dtype}")) for dtype in CENTROID_DTYPES]


# The forward's uses (see kernels/cmi_forward.py), as (name, pointers passed as None, constexpr flags).
FIXED = dict(HAS_LSE=False, HAS_CENTROIDS=True, COMPUTE_KL=True, ACCUMULATE=True)
BATCH_STATS = dict(HAS_LSE=False, HAS_CENTROIDS=False, COMPUTE_KL=False, ACCUMULATE=True)
BATCH_KL = dict(HAS_LSE=True, HAS_CENTROIDS=False, COMPUTE_KL=True, ACCUMULATE=False)
FORWARD_USES = [
    ("fixed", ("stats_ptr", "lse_in_ptr"), dict(FIXED, LOG_CENTROIDS=False)),
    ("fixed_table", ("stats_ptr", "lse_in_ptr"), dict(FIXED, LOG_CENTROIDS=True)),
    ("batch_stats", ("centroids_ptr", "stats_ptr", "lse_in_ptr", "row_kl_ptr"), dict(BATCH_STATS, LOG_CENTROIDS=False)),
    ("batch_kl", ("centroids_ptr", "accum_ptr", "lse_out_ptr"), dict(BATCH_KL, LOG_CENTROIDS=False)),
    ("batch_kl_table", ("stats_ptr", "accum_ptr", "lse_out_ptr"), dict(BATCH_KL, HAS_CENTROIDS=True, LOG_CENTROIDS=True)),
]  # fmt: skip
# The backward's: given centroids, centroids from the statistics, the log-centroid table.
BACKWARD_USES = [
    ("fixed", (), dict(HAS_CENTROIDS=True, LOG_CENTROIDS=False)),
    ("batch", ("centroids_ptr",), dict(HAS_CENTROIDS=False, LOG_CENTROIDS=False)),
    ("table", (), dict(HAS_CENTROIDS=True, LOG_CENTROIDS=True)),
]
BLOCKS = (1024, 4096)
# Forward (BLOCK_D, SINGLE_CHUNK): below the 4096 cap BLOCK_D covers the row; only d > 4096 loops over chunks.
FORWARD_BLOCKS = ((1024, True), (4096, True), (4096, False))
# Integer arguments Triton's launcher specialises to the constant 1 when they are 1 (contiguous rows and labels).
UNIT_STRIDES = ("stride_feat_col", "stride_cent_col", "stride_label")
# Buffers the launchers allocate (16-byte aligned, statistics rows padded to 16 values): divisible by 16 always.
OWN_ALIGNED = (
    "stride_accum_row", "stride_stats_row", "accum_ptr", "stats_ptr", "lse_in_ptr", "lse_out_ptr", "row_kl_ptr",
    "lse_ptr", "grad_features_ptr", "table_ptr", "stride_table_row",
)  # fmt: skip
# The caller's tensors, divisible by 16 on BERT-like rows (d = 768 or 4096, 16-byte aligned tensors).
CALLER_ALIGNED = (
    "features_ptr", "labels_ptr", "centroids_ptr", "grad_loss_ptr", "stride_feat_row", "stride_cent_row", "dim",
)  # fmt: skip
# "aligned": the specialisation real training runs (contiguous bf16 rows, d a multiple of 16, vectorised loads);
# "generic": any strides and offsets of the caller's tensors, e.g. a column slice of a larger tensor.
LAYOUTS = ("aligned", "generic")


def _compile(kernel, types, none_args, flags, arch, layout):
    constexprs = {name: None for name in none_args}
    constexprs.update(flags)
    aligned = OWN_ALIGNED
    if layout == "aligned":
        constexprs.update({name: 1 for name in UNIT_STRIDES if name in kernel.arg_names and name not in constexprs})
        aligned += CALLER_ALIGNED
    attrs = {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name in aligned
        if name in kernel.arg_names and name not in constexprs
    }
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=compile_options(flags["BLOCK_D"]))


def _resources(compiled) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def report(arch: int) -> list[dict]:
    rows = []
    for layout in LAYOUTS:
        for (use, none_args, flags), (block, single), atomics in itertools.product(
            FORWARD_USES, FORWARD_BLOCKS, (False, True)
        ):
            if atomics and not flags["ACCUMULATE"]:
                continue
            flags = dict(flags, USE_ATOMICS=atomics, BLOCK_D=block, SINGLE_CHUNK=single)
            kernel = "forward" if single else "forward_chunked"
            for centroids, types in centroid_variants(FORWARD_TYPES, flags):
                compiled = _compile(cmi_forward_kernel, types, none_args, flags, arch, layout)
                rows.append(_row(kernel, use, centroids, layout, atomics, block, compiled))
        for (use, none_args, flags), block in itertools.product(BACKWARD_USES, BLOCKS):
            for centroids, types in centroid_variants(BACKWARD_TYPES, flags):
                compiled = _compile(cmi_backward_kernel, types, none_args, dict(flags, BLOCK_D=block), arch, layout)
                rows.append(_row("backward", use, centroids, layout, False, block, compiled))
        for block, has_centroids in itertools.product(BLOCKS, (True, False)):
            none_args = () if has_centroids else ("centroids_ptr",)
            flags = dict(HAS_CENTROIDS=has_centroids, BLOCK_D=block)
            for centroids, types in centroid_variants(LOG_TABLE_TYPES, flags):
                compiled = _compile(cmi_log_centroids_kernel, types, none_args, flags, arch, layout)
                use = "fixed" if has_centroids else "batch"
                rows.append(_row("log_table", use, centroids, layout, False, block, compiled))
    return rows


def _row(kernel, use, centroids, layout, atomics, block, compiled) -> dict:
    return dict(
        kernel=kernel, use=use, centroids=centroids, layout=layout, atomics=atomics, block_d=block,
        fp_fusion=compiled.metadata.enable_fp_fusion, **_resources(compiled),
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    rows = report(args.arch)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"sm_{args.arch}, triton {triton.__version__}")
    print(
        "| kernel | use | centroids | layout | atomics | BLOCK_D | registers | local (spill) bytes | stack | shared |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['kernel']} | {row['use']} | {row['centroids']} | {row['layout']} | {row['atomics']} "
            f"| {row['block_d']} "
            f"| {row.get('reg')} | {row.get('local')} | {row.get('stack')} | {row.get('shared')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
