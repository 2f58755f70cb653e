#!/usr/bin/env bash
# The GPU benchmark run of issue 3: `python -m bench` over the default shape set (fused / eager / compile /
# noop; fixed and per-batch centroids; fwd, bwd, fwd_bwd; device and wall timing) and the
# BERT-base training step. Needs no network and no package install: run it from a checkout on the GPU host.
#
#   bench/run_gpu.sh [extra python -m bench options]
#
# Writes $BENCH_OUTPUT_DIR (default bench/results)/<gpu-slug>-<yyyy-mm-dd>.{json,md,png} (no PNG, with a warning, if matplotlib is
# missing: regenerate it elsewhere with `python -m bench.report <json>`), and copies them to $OUT when set.
# It starts no new shape or mode after BENCH_TIME_LIMIT seconds (default 420), so that it ends inside a 10-minute
# command; the markdown then lists the shapes and modes not measured. Running it again (with the files put back in
# the output folder) measures only what is missing: --resume skips the shapes and modes whose requested rows are
# all in the device's newest file, and the e2e section once it is there. BENCH_RESUME=0 measures everything again (e.g. after
# a kernel change: give it another BENCH_OUTPUT_DIR so that the earlier rows are kept for the comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
output_dir=${BENCH_OUTPUT_DIR:-bench/results}
started_marker=$(mktemp)

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
python3 -c "import matplotlib" 2>/dev/null || echo "matplotlib missing: JSON and markdown only"

# The time limit only stops new shapes and modes from starting; one already running (a torch.compile run among
# its cases) could still pass a 10-minute command limit. SIGINT after BENCH_HARD_LIMIT seconds (default 540)
# stops it so that the copy below still runs: the finished ones are in the results file, the interrupted and
# later ones listed as not measured. Should Python not exit within 15 s of the SIGINT, a SIGKILL follows. 540 + 15
# leaves room for a command prefix (NOTES: bench.host_overhead, about 20 s) inside a 600 s device call.
resume=--resume
[ "${BENCH_RESUME:-1}" = 0 ] && resume=
hard_limit=${BENCH_HARD_LIMIT:-540}
time_limit=${BENCH_TIME_LIMIT:-420}
status=0
timeout --signal=INT --kill-after=15 "$hard_limit" \
    python3 -m bench $resume --time-limit "$time_limit" --output-dir "$output_dir" "$@" || status=$?
# Status 3: a CUDA fault left that process unable to run anything (bench/__main__.py) after saving what it had
# measured. One new process goes on in the time left (SECONDS counts from this script's start), resuming the file:
# the shapes and modes not measured first, the failed ones last (in those, the fused providers after the torch ones).
if [ "$status" = 3 ] && [ $(( hard_limit - SECONDS )) -gt 60 ]; then
    echo "run_gpu.sh: CUDA fault; the rest in a new process"
    status=0
    timeout --signal=INT --kill-after=15 $(( hard_limit - SECONDS )) \
        python3 -m bench --resume --time-limit $(( time_limit > SECONDS ? time_limit - SECONDS : 0 )) \
        --output-dir "$output_dir" "$@" || status=$?
fi

# Copied to $OUT unless the output folder is already in it (e.g. $OUT/before and $OUT/after of an A/B: copies
# would come back twice, under one name, and count against the tool's 8 files).
if [ -n "${OUT:-}" ] && [[ "$(realpath -m "$output_dir")/" != "$(realpath -m "$OUT")"/* ]]; then
    find "$output_dir" -maxdepth 1 -type f ! -name '*.partial' -newer "$started_marker" -exec cp {} "$OUT"/ \;
fi
rm -f "$started_marker"
exit "$status"
