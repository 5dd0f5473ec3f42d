#!/usr/bin/env bash
# On a CUDA machine, from the repository root: the CUDA cases of the op, backend and extension tests, then the
# end-to-end sweep (benchmarks/test_sweep.py); copies the results to $OUT and prints a table last.
# STAGE=tests or STAGE=sweep runs one of the two (each then fits a 10-minute call with room: raise TEST_SECONDS or
# SWEEP_SECONDS); the sweep writes each row as it is measured, so a cut-off run keeps what it has.
# Exits non-zero when a stage fails or runs out of time (and says which).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/adaptive-kernels-gpu}
mkdir -p "$out"
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# the tests compile hundreds of Triton specialisations: spread them over 8 processes where pytest-xdist is there
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
stage=${STAGE:-all}
status=0
verdict() {  # stage name, its exit status (timeout's 124 when it ran out of time)
  case $2 in
    0) ;;
    124) echo "$1: TIMED OUT"; status=1 ;;
    *) echo "$1: FAILED (exit $2)"; status=1 ;;
  esac
}
if [ "$stage" != sweep ]; then
  ADAPTIVE_KERNELS_AUTOTUNE=0 timeout "${TEST_SECONDS:-240}" python3 -m pytest ${TESTS:-tests/test_cuda_ext.py tests/test_backends.py tests/ops} $workers -q -rf --tb=short -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -30
  verdict tests $?
fi
if [ "$stage" = tests ]; then
  exit $status
fi
timeout "${SWEEP_SECONDS:-330}" python3 -m pytest benchmarks/test_sweep.py --benchmark-only -q -p no:cacheprovider 2>&1 | tee "$out/sweep.log" | tail -8
verdict sweep $?
cp benchmarks/results/sweep-* "$out/" 2>/dev/null
python3 - <<'PY'
import csv, glob, json
for path in sorted(glob.glob("benchmarks/results/sweep-*.csv")):
    print(path)
    print(f"{'system':22} {'var':3} {'backend':12} {'budget':>6} {'cost':>5} {'prefill':>8} {'kernels':>8} {'decode/tok':>10} {'setup':>7} {'sched':>6}")
    for r in csv.DictReader(open(path)):
        print(f"{r['system']:22} {r['variant']:3} {r['backend']:12} {float(r['budget']):6.2f} {float(r['cost']):5.2f} "
              f"{float(r['prefill_ms']):8.2f} {float(r['prefill_kernel_ms']):8.2f} {float(r['decode_ms_per_token']):10.2f} {float(r.get('decode_setup_ms') or 'nan'):7.2f} "
              f"{float(r['schedule_ms']):6.2f}")
for path in sorted(glob.glob("benchmarks/results/sweep-*-adherence.json")):
    for a in json.load(open(path)):
        print(f"adherence {a['variant']} {a['backend']:7} {a['phase']:15} largest excess {a['largest_excess']:+.3f} at {a['at_budget']}")
PY
exit $status
