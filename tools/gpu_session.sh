#!/usr/bin/env bash
# One call on the lent GPU machine: every package's tests on CUDA, `hdgsa-kernels check`, then
# `hdgsa-kernels bench`, logs and JSON under $OUT. The machine has torch and Triton but none of our
# packages or peers: build our wheels first (python3 tools/build_all.py --outdir .whl/hdgsa) and
# carry .whl (with fla-core, einops, liger-kernel wheels) along:
#   STAGES=tests,check,bench BENCH_OPS="rmsnorm sinkhorn" bash tools/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
STAGES=${STAGES:-tests,check,bench}
BENCH_OPS=${BENCH_OPS:-}
BENCH_ARGS=${BENCH_ARGS:---warmup-ms 10 --rep-ms 50}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
mkdir -p "$OUT"
start=$SECONDS
say() { printf '[%4ds] %s\n' "$((SECONDS - start))" "$*"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl .whl/pytest/*.whl .whl/hdgsa/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [[ $STAGES == *tests* ]]; then
  say "tests on CUDA, one process per package"
  # Logs stay outside $OUT (the device tool returns 8 files at most); their ends go to one file.
  logs=/tmp/gpu-session-tests
  mkdir -p "$logs"
  for package in packages/*/; do
    name=$(basename "$package")
    (cd "$package" && timeout "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -rfE tests \
      >"$logs/$name.log" 2>&1; echo "$name exit=$?" >>"$logs/summary.txt") &
  done
  wait
  for log in "$logs"/hdgsa-*.log; do
    { printf '\n===== %s\n' "$(basename "$log" .log)"; tail -n 150 "$log"; } >>"$OUT/tests.log"
    grep -E "^(FAILED|ERROR)" "$log" | head -n 8
    printf '%-24s %s\n' "$(basename "$log" .log)" "$(tail -n 1 "$log")"
  done
  cat "$logs/summary.txt"
fi

if [[ $STAGES == *check* ]]; then
  say "hdgsa-kernels check (cpu and cuda)"
  python3 -m hdgsa_kernels check >"$OUT/check.log" 2>&1
  echo "check exit=$?"
  grep -E "FAIL|ERROR" "$OUT/check.log" | head -n 20
  tail -n 1 "$OUT/check.log"
fi

if [[ $STAGES == *bench* ]]; then
  say "hdgsa-kernels bench $BENCH_OPS"
  # shellcheck disable=SC2086  # word splitting of the op list and options is intended
  python3 -m hdgsa_kernels bench $BENCH_OPS $BENCH_ARGS --output-dir "$OUT" 2>"$OUT/bench.err"
  echo "bench exit=$?"
  tail -n 5 "$OUT/bench.err"
fi
say "done"
