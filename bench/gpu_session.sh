#!/usr/bin/env bash
# A whole GPU session's checks in one device call: the device tool lends 15 minutes of device time per session,
# machine start included, and gives a machine back after 30 s idle, so the work is one prepared command:
#
#   1. facts: GPU, driver, runtime (the kernel ends in -gpu on Firecracker, where ncu reads counters), versions;
#   2. issue 2: the test suite on CUDA tensors (bench/run_gpu_tests.sh; pytest-xdist workers when installed, since
#      Triton and inductor compiles dominate a first CUDA run; the tests that need no GPU left to CI), for at most
#      TEST_TIME_LIMIT s (default 200; 0 skips it, e.g. in a second call that only resumes the benchmark);
#   3. issue 3: bench/run_gpu.sh, the issue's target shapes first (fixed centroids, then the e2e benchmark, then
#      per-batch centroids), in the time left (it resumes: a second call with this call's results put back in
#      bench/results measures only what is missing);
#   4. bench.host_overhead (CPU only, about 10 s), if at least 30 s are left: the GPU host's Python speed, to split
#      the wall rows into host path and launches (bench/NOTES.md item 4).
#
#   bench/gpu_session.sh            # inside `run` with timeout_s 600; carry .whl (datasets for the GLUE tests)
#
# A dry run on a CPU host (tests/test_bench.py runs it with one test of tests/test_host_overhead.py as TEST_PATHS):
# CUDA_VISIBLE_DEVICES= TEST_PATHS=tests/test_kd.py BENCH_SHAPES=6x33:10:bf16 \
#     BENCH_ARGS="--no-e2e --providers eager noop" bench/gpu_session.sh
#
# Everything ends by SESSION_LIMIT s (default 570, inside a 600 s call). What comes back in $OUT (the tool returns
# at most 8 files): session.log (all output), pytest-gpu.log, pytest-gpu.xml, host-overhead.json and the bench's
# <gpu>-<date>.{json,md,png}.
set -uo pipefail
cd "$(dirname "$0")/.."
session_limit=${SESSION_LIMIT:-570}
out_dir=${OUT:-/tmp/gpu-session}
mkdir -p "$out_dir"
exec > >(tee -a "$out_dir/session.log") 2>&1
tee_pid=$!
export OUT=$out_dir PYTHONUNBUFFERED=1

left() { echo $((session_limit - SECONDS)); }
stage() { echo; echo "=== $1 (at ${SECONDS} s, $(left) s left)"; }

stage "facts"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total --format=csv,noheader || true
echo "kernel $(uname -r), $(nproc) CPUs"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

stage "issue 2: the test suite on CUDA"
# Left out: test_cmi_loss_speed (its pytest-benchmark timings measure what python -m bench measures below) and the
# tests that use no GPU and run in CI on every commit (sm_90/sm_80 ahead-of-time compiles, wheel builds and the
# floors checks that read a built wheel, CPU torchrun and gloo processes, this script's own dry run), which would
# take cores from the CUDA tests' compiles.
cpu_only="test_every_specialisation_compiles_without_spills or multiply_add_contraction or gradient_store_rounds"
cpu_only+=" or wheel or floors or torchrun or two_ranks or gpu_session"
test_args=(-k "not test_cmi_loss_speed and not ($cpu_only)")
if python3 -c "import xdist" 2>/dev/null; then
    test_args+=(-n "${TEST_WORKERS:-8}")
fi
if [ "${TEST_TIME_LIMIT:-200}" -gt 0 ]; then
    # 8 workers of 2 CPU threads each on the 16 cores, instead of 16 threads each (OpenMP and inductor's compile
    # pool, which would otherwise start min(32, cores) = 16 compile processes per worker)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2} \
        TEST_TIME_LIMIT=${TEST_TIME_LIMIT:-200} bench/run_gpu_tests.sh "${test_args[@]}"
    echo "run_gpu_tests.sh exit status $?"
else
    echo "skipped: TEST_TIME_LIMIT=0"
fi

stage "issue 3: python -m bench"
# Target shapes of the issue first, so that a cut-off run has measured them; then the two others of the default set.
shapes=(32x768:2:bf16 4096x768:2:bf16 16384x768:30522:bf16 8192x4096:1000:bf16 65536x768:10:bf16
        32768x4096:3:bf16 32x768:2:fp32 256x1024:3:bf16)
[ -n "${BENCH_SHAPES:-}" ] && read -ra shapes <<<"$BENCH_SHAPES"
# run_gpu.sh spends about 5 s before its hard limit starts (version prints), may take 15 s more to stop after the
# SIGINT, then copies its files to $OUT: keep 55 s for that and host_overhead's 30. No new shape or mode starts in
# the last 60 s of its time (one mode of a large shape: a compile and about ten timed cases).
bench_hard=$(( $(left) - 55 ))
if [ "$bench_hard" -gt 60 ]; then
    BENCH_HARD_LIMIT=$bench_hard BENCH_TIME_LIMIT=$(( bench_hard - 60 )) bench/run_gpu.sh --shapes "${shapes[@]}" ${BENCH_ARGS:-}
    echo "run_gpu.sh exit status $?"
else
    echo "skipped: only $(left) s left"
fi

stage "host path (CPU only)"
if [ "$(left)" -ge 30 ]; then
    timeout "$(( $(left) - 5 ))" python3 -m bench.host_overhead --rounds 5 --json "$out_dir/host-overhead.json"
else
    echo "skipped: only $(left) s left"
fi
stage "summary"
grep -E "^(=+ )?[0-9]+ (passed|failed)|^FAILED|^ERROR" "$out_dir/pytest-gpu.log" 2>/dev/null | tail -15
for results in "$out_dir"/*-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9].json; do
    [ -f "$results" ] || continue
    python3 - "$results" <<'PY'
import sys

from bench import report

results = report.read_json(sys.argv[1])
rows = results["rows"]
# The BERT step benchmark: "ok", or what kept it (or some of its configs) from a result; a call 2 without
# --no-e2e measures it again.
e2e = results["e2e"] or {"error": "not run"}
e2e_status = e2e.get("error") or "; ".join(f"{name}: {error}" for name, error in e2e.get("errors", {}).items()) or "ok"
print(f"{sys.argv[1]}: {len(rows)} rows, copy {results['copy_tbps']:.2f} TB/s, e2e {e2e_status}")
# One check per (shape, mode, provider), copied onto its device and wall rows: count the checks, not the rows.
outside = {(r["N"], r["d"], r["C"], r["dtype"], r["mode"], r["provider"]) for r in rows if report.within_tolerance(r) is False}
print(f"accuracy vs float64 outside the bounds: {len(outside)} of the (shape, mode, provider) checks")
errors = [r for r in rows if r.get("error")]
print(f"error rows: {len(errors)}")
# Not measured: skipped units and units with error rows (a --resume measures both again).
units = [tuple(s[:4]) for s in results["skipped"]] + [(r["N"], r["d"], r["C"], r["dtype"]) for r in errors]
missing = " ".join(dict.fromkeys(f"{n}x{d}:{c}:{dtype}" for n, d, c, dtype in units))
print(f"not measured: BENCH_SHAPES=\"{missing}\"" if missing else "every requested shape measured")
for check in report.target_checks(results) if report.measured_on_gpu(results) else []:
    print(f"  {check['criterion']} | {check['shape']} | {check['verdict']}")
PY
done
stage "done"
exec >&- 2>&-
wait "$tee_pid"  # session.log complete before the tool collects $OUT
