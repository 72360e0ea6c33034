#!/usr/bin/env bash
# One command on a GPU machine (no internet needed; its python3 has torch, triton, pytest,
# pytest-benchmark and matplotlib):
#
#     bash bench/run_gpu.sh [pytest arguments for the benchmarks, e.g. -k "GaitGL"]
#
# 1. installs fastgait (editable, no dependencies; PYTHONPATH=. if that fails);
# 2. prints nvidia-smi and the versions;
# 3. runs the GPU test suite: python3 -m pytest tests -m gpu (bf16 parity at real shapes), while
#    python3 -m fastgait.compile_gate --warm compiles the kernels into Triton's cache beside it;
# 4. runs pytest bench --benchmark: bench/results/<date>-<gpu>.json, rewritten after every row;
# 5. regenerates docs/PERFORMANCE.md and docs/performance/*.png from every results file;
# 6. copies the results, the page, the plots and the logs to $OUT when it is set (at most 8 files);
# 7. prints a short summary (targets and whole steps) last.
#
# The whole run fits FASTGAIT_GPU_BUDGET_S seconds (default 570, under a 10-minute limit): the
# GPU tests get at most FASTGAIT_GPU_TESTS_S (default 180, the first priority; 0 skips them); the benchmarks run in
# priority order (the GaitMask step and its profile, the CASIA-B MLA blocks, GeM, triplet, the
# convolution forms, loaders, the other models' steps, GeM's and triplet's compiled references,
# OUMVLP shapes) and skip, with a reason, the cases that would end after the
# deadline, so the report still runs. To fill in what was skipped, put the returned results file
# into bench/results/ (it travels with the working tree) and call again the same day with the
# same code, e.g. FASTGAIT_GPU_TESTS_S=0 bash bench/run_gpu.sh -k "ReverseMaskNet or GaitGL or oumvlp":
# the file is extended, each new row replacing its earlier self.
# Where the copy of the repository has no .git, pass the commit: FASTGAIT_COMMIT=<sha> bash bench/run_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${FASTGAIT_GPU_BUDGET_S:-570}
TESTS_BUDGET=${FASTGAIT_GPU_TESTS_S:-180}
REPORT_RESERVE=40 # seconds kept for the report, the copies and the summary
LOGS=$(mktemp -d)
MARK="$LOGS/start" # results files newer than this one were written by this call
touch "$MARK"
left() { echo $((START + BUDGET - $(date +%s))); }
section() { echo; echo "==== $1 ($(($(date +%s) - START)) s)"; }

section "install" | tee -a "$LOGS/machine.log"
if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . >>"$LOGS/machine.log" 2>&1; then
    echo "pip install failed (see machine.log): using PYTHONPATH=$PWD" | tee -a "$LOGS/machine.log"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

section "machine" | tee -a "$LOGS/machine.log"
{
    nvidia-smi
    "$PY" - <<'EOF'
import platform
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}) | triton {triton_version}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
          f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("no CUDA device: the benchmarks will be a dry run at tiny shapes")
EOF
} 2>&1 | tee -a "$LOGS/machine.log"

section "warm-up: python3 -m fastgait.compile_gate --warm (in the background)"
# Compiles the trainer-layout kernel launches for this GPU, in parallel on the CPU cores, into
# Triton's cache while the GPU tests run: the tests and benchmarks then load most kernels
# instead of compiling them one at a time. Stopped before the benchmarks (it would compete
# for the CPU with their launches).
"$PY" -m fastgait.compile_gate --warm >"$LOGS/warm.log" 2>&1 &
WARM_PID=$!

section "GPU tests: python3 -m pytest tests -m gpu"
if [ "$TESTS_BUDGET" -gt 0 ]; then
    timeout -s INT -k 15 "$TESTS_BUDGET" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$LOGS/gpu-tests.log"
    TESTS_STATUS=$?
else
    echo "skipped (FASTGAIT_GPU_TESTS_S=0)" | tee "$LOGS/gpu-tests.log"
    TESTS_STATUS=0
fi

if kill -0 "$WARM_PID" 2>/dev/null; then
    echo "warm-up still running: stopped (what it compiled stays in the cache)"
    kill -- "$WARM_PID" 2>/dev/null
    pkill -f "compile_gate/worker.py" 2>/dev/null
fi
wait "$WARM_PID" 2>/dev/null
tail -n 3 "$LOGS/warm.log" | tee -a "$LOGS/machine.log"

section "benchmarks: pytest bench --benchmark"
export FASTGAIT_BENCH_DEADLINE=$((START + BUDGET - REPORT_RESERVE))
BENCH_TIME=$(($(left) - REPORT_RESERVE + 15))
if [ "$BENCH_TIME" -gt 30 ]; then
    timeout -s INT -k 20 "$BENCH_TIME" "$PY" -m pytest bench --benchmark -q -p no:cacheprovider "$@" 2>&1 | tee "$LOGS/bench.log"
    BENCH_STATUS=$?
else
    echo "no time left for the benchmarks" | tee "$LOGS/bench.log"
    BENCH_STATUS=1
fi

section "report: python3 -m bench.report"
"$PY" -m bench.report 2>&1 | tee -a "$LOGS/machine.log"
RESULTS=$(find bench/results -name '*.json' -newer "$MARK" | sort | tail -n 1)

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$LOGS/machine.log" "$LOGS/gpu-tests.log" "$LOGS/bench.log" docs/PERFORMANCE.md "$OUT"/
    if [ -n "$RESULTS" ]; then
        stem=$(basename "$RESULTS" .json)
        cp "$RESULTS" "$OUT"/
        cp docs/performance/"$stem"-*.png "$OUT"/ 2>/dev/null
    fi
    echo "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi

section "summary"
if [ -n "$RESULTS" ]; then
    "$PY" -m bench.report --summary "$RESULTS"
else
    echo "no results file was written"
fi
echo "GPU tests exit status $TESTS_STATUS; benchmarks exit status $BENCH_STATUS; results: ${RESULTS:-none}"
[ "$TESTS_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
