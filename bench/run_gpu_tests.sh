#!/usr/bin/env bash
# Issue 2's GPU check: the README test command (`python -m pytest -q tests`) on a GPU host, where every CUDA-only
# case runs against CUDA tensors. Needs no network: run it from a checkout (nothing is installed into the
# environment; the checkout's packages are imported from the working directory).
#
#   [TEST_PATHS="tests/test_cmi_loss.py ..."] bench/run_gpu_tests.sh [extra pytest options]
#
# Python packages the host lacks (on the lent H100 and H200 alike: `datasets` and its `dill`,
# `multiprocess`) come as wheels in ./.whl, installed into /tmp/site for this run only; bench/NOTES.md has the
# download command. The log, a JUnit XML file and the skip reasons go to $OUT (when set) or /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
out_dir=${OUT:-/tmp}

# Only where datasets is missing: a run inside the suite (tests/test_bench.py's dry run of gpu_session.sh) finds it
# in /tmp/site and must not rewrite the files that the other test workers are importing.
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import datasets" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import datasets, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" ||
    echo "datasets does not import: the GLUE driver's tests will fail"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "kernel $(uname -r)"  # ends in -gpu on the Firecracker runtime, where ncu reads hardware counters
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

read -ra paths <<<"${TEST_PATHS:-tests}"  # the whole suite, or the files and node ids given
# SIGINT after TEST_TIME_LIMIT seconds (default 540, inside a 10-minute device command): pytest then stops like on
# Ctrl-C, still printing its summary and writing the JUnit XML of the tests that ran; the script then exits 124
# (SIGKILL 15 s later if it has not stopped). -rfEs: failures, errors and skips named in the summary (a bare -rs
# would drop pytest's default fE). --durations: what is slow, for planning the next call.
timeout --signal=INT --kill-after=15 "${TEST_TIME_LIMIT:-540}" \
    python3 -m pytest -q "${paths[@]}" -rfEs --durations=25 --junitxml "$out_dir/pytest-gpu.xml" "$@" 2>&1 | tee "$out_dir/pytest-gpu.log"
exit "${PIPESTATUS[0]}"
