#!/usr/bin/env bash
# Every GPU check the project owes, in one device call of at most 10 minutes, from the repository root. Stages, in
# this order by default, each under its time limit in seconds (the variable named sets it):
#   tests  the CUDA cases of tests/ops, tests/test_backends.py, tests/test_generation.py, tests/test_graph_safe.py,
#          tests/test_plan.py and tests/test_cuda_ext.py, each test's verdict logged as it ends (TEST_SECONDS, 190)
#   sweep  adaptive-kernels sweep of the 7B-shaped model: triton rows at budget 1.0, then compiled stock, then
#          both variants at 0.5, 0.7, 0.9, 0.6 and 0.8 (the curve's range first), then the torch backend's rows
#          (SWEEP_SECONDS, 200)
#   ops    the Triton op rows not measured on a GPU yet: benchmarks/gpu_kernels.py --skip-tests -k OPS_FILTER
#          (OPS_SECONDS, 60)
#   ext    the CUDA extension's GEMV next to Triton: benchmarks/gpu_cuda_ext.py --skip-tests (its kernels are
#          unchanged since their H100 rows of 2026-11-24; EXT_SECONDS, 30)
#   sanitize  not in the default stages (a second call's work, on a machine whose runtime runs compute-sanitizer):
#          memcheck, then racecheck, over the GPU tests of tests/test_cuda_ext.py: the extension's kernels have
#          only been compiled, never run, before a GPU session (SANITIZE_SECONDS, 240)
# Each stage may run until the sum of its own and the earlier stages' limits, counted from the start: time a stage
# leaves unused goes to the next, and the default stages end by 480 s (a device session's 15 minutes include the
# machine's start, and this leaves room for one short rerun). A stage out of time gets SIGINT (pytest then prints
# its summary), and SIGKILL 10 s later.
# STAGES="tests sweep" runs some of them, in the order given. The sweep and the benchmarks write each row as it is
# measured, so a stage cut off keeps what it measured. Results land in benchmarks/results/; the new ones, with the
# whole log, are packed into $OUT/results.tar.gz. Tables are printed last (ops, extension, the sweep's adherence
# and target ratios, then each stage's verdict); exits non-zero when a stage failed or ran out of time.
if (( $# )); then  # configured by the variables above only: print this text, and refuse anything but --help
  sed -n '2,/^set -uo/s/^# \{0,1\}//p' "$0"
  [[ $* == -h || $* == --help ]] && exit 0
  echo "gpu_end_to_end.sh takes no arguments (the variables above set it up), got: $*" >&2
  exit 2
fi
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/adaptive-kernels-torch-extensions}  # the csrc/ builds
out=${OUT:-/tmp/adaptive-kernels-gpu}
mkdir -p "$out"
log=$out/gpu.log
start=$(date +%s)
stamp=$(mktemp)  # results newer than this are this run's
scheduled=0  # seconds from the start by which the stages so far are to end
verdicts=()
status=0

run_stage() {  # name, seconds, command...: runs it under its time limit, output to the log, and notes the verdict
  local name=$1 seconds=$2
  shift 2
  local began
  began=$(date +%s)
  printf '\n== %s (%s s at most, from %s s)\n' "$name" "$seconds" $(( began - start )) | tee -a "$log"
  local before
  before=$(wc -l <"$log")
  timeout -s INT -k 10 "$seconds" "$@" >>"$log" 2>&1  # killed 10 s after its limit if it ignores the signal
  local code=$?
  tail -n +$(( before + 1 )) "$log" | tail -3
  case $code in
    0) verdicts+=("$name: ok in $(( $(date +%s) - began )) s") ;;
    124|137) verdicts+=("$name: TIMED OUT after $seconds s"); status=1
      rm -f "$TORCH_EXTENSIONS_DIR"/*/lock ;;  # a build cut off keeps its lock, on which later builds would wait
    *) verdicts+=("$name: FAILED (exit $code; see gpu.log)"); status=1 ;;
  esac
}

python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
  'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$log"
stages=(${STAGES:-tests sweep ops ext})
for stage in "${stages[@]}"; do  # every name checked before any stage runs
  case $stage in
    tests|sweep|ops|ext|sanitize) ;;
    *) echo "STAGES: unknown stage $stage (tests, sweep, ops, ext, sanitize)" | tee -a "$log"; exit 2 ;;
  esac
done
for stage in "${stages[@]}"; do
  case $stage in
    tests) seconds=${TEST_SECONDS:-190} ;;
    sweep) seconds=${SWEEP_SECONDS:-200} ;;
    ops) seconds=${OPS_SECONDS:-60} ;;
    ext) seconds=${EXT_SECONDS:-30} ;;
    sanitize) seconds=${SANITIZE_SECONDS:-240} ;;
  esac
  scheduled=$(( scheduled + seconds ))
  left=$(( scheduled - ($(date +%s) - start) ))
  seconds=$(( left > 1 ? left : 1 ))
  case $stage in
    tests)  # fixed tile configs: the tests check the kernels' code; spread over the cores where pytest-xdist is there
      workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n $(nproc)")
      ADAPTIVE_KERNELS_AUTOTUNE=0 run_stage tests "$seconds" python3 -m pytest tests/test_cuda_ext.py \
        tests/test_backends.py tests/test_generation.py tests/test_graph_safe.py tests/test_plan.py tests/ops \
        $workers -v -rf --tb=short -p no:cacheprovider ;;
    sweep) run_stage sweep "$seconds" python3 -m adaptive_kernels sweep --new-tokens 16 --repeats 3 \
             --budgets 1.0 0.5 0.7 0.9 0.6 0.8 ;;
    ops) run_stage ops "$seconds" python3 benchmarks/gpu_kernels.py --skip-tests \
           -k "${OPS_FILTER:-add_rms_norm or rotary or cols-major}" ;;
    ext) run_stage ext "$seconds" python3 benchmarks/gpu_cuda_ext.py --skip-tests ;;
    sanitize) PATH=$PATH:/usr/local/cuda/bin run_stage sanitize "$seconds" bash -c 'for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 1 python3 -m pytest tests/test_cuda_ext.py -m gpu -q \
          -p no:cacheprovider || exit 1; done' ;;
  esac
done

python3 - "$stamp" <<'PY' 2>&1 | tee -a "$log"
"""This run's tables (ops, extension, then the sweep's prefill and decode times, adherence and target ratios);
the sweep's plot drawn again from its rows (a sweep cut off by its time limit drew none)."""
import glob, json, os, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from adaptive_kernels.sweep import Row, adherence_table, plot_rows, read_records, targets_table


def new(pattern):
    return sorted(Path(p) for p in glob.glob(f"benchmarks/results/{pattern}")
                  if os.path.getmtime(p) > os.path.getmtime(sys.argv[1]))


for pattern, script in (("ops-*.json", "gpu_kernels"), ("cuda_ext-*.json", "gpu_cuda_ext")):
    if new(pattern):
        print(__import__(script).table(new(pattern)[-1]), "\n")
for path in new("sweep-*.json"):
    if path.stem.endswith(("-adherence", "-targets")):
        continue
    rows = [Row(**r) for r in read_records(path)]
    plot_rows(rows, path.with_suffix(".png"))
    print("                              prefill ms                         decode ms per token")
    print("                           wall  kernels    graph    floor       wall  kernels    floor")
    for r in rows:
        if r.system in ("stock", "ideal", "adaptive"):
            print(f"{r.system:8} {r.variant} {r.backend:12} {r.budget:4.2f} {r.prefill_ms:8.2f} {r.prefill_kernel_ms:8.2f} "
                  f"{r.prefill_graph_ms:8.2f} {r.prefill_floor_ms:8.2f}   {r.decode_ms_per_token:8.2f} "
                  f"{r.decode_kernel_ms:8.2f} {r.decode_floor_ms:8.2f}")
    print(adherence_table(read_records(path.with_name(f"{path.stem}-adherence.json"))))
    print(targets_table(read_records(path.with_name(f"{path.stem}-targets.json"))))
PY
printf '%s\n' "${verdicts[@]}" >>"$log"
tar czf "$out/results.tar.gz" $(find benchmarks/results -newer "$stamp" -type f) -C "$out" gpu.log
echo
printf '%s\n' "${verdicts[@]}"
exit $status
