#!/usr/bin/env bash
# One call on the lent GPU machine: every package's tests on CUDA, `hdgsa-kernels check`, then
# `hdgsa-kernels bench`, logs and JSON under $OUT. The machine has torch and Triton but none of our
# packages or peers: build our wheels first (python3 tools/build_all.py --outdir .whl/hdgsa) and
# carry .whl (with fla-core, einops, liger-kernel wheels) along:
#   STAGES=tests,check,bench BENCH_OPS="rmsnorm sinkhorn" bash tools/gpu_session.sh
# Stages: tests (each package's suite on CUDA; with pytest-xdist among the wheels, TEST_WORKERS
# processes per package so Triton compiles in parallel), check, profile (tools/host_profile.py
# with PROFILE_ARGS), bench. quack (a peer of rmsnorm) travels as .quack-part0/, .quack-part1/ (one
# carried per call): its unpacked wheels as an xz tar in parts: quack-kernels, nvidia-cutlass-dsl
# with -libs-core (the `cutlass` Python package), -libs-base and -libs-cu13, apache-tvm-ffi (with
# lib/libtvm_ffi_testing.so, which quack loads), torch-c-dlpack-ext.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
STAGES=${STAGES:-tests,check,bench}
BENCH_OPS=${BENCH_OPS:-}
BENCH_ARGS=${BENCH_ARGS:---warmup-ms 10 --rep-ms 50 --gpu-time}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
TEST_WORKERS=${TEST_WORKERS:-3}
TEST_PACKAGES=${TEST_PACKAGES:-}
TEST_ARGS=${TEST_ARGS:-}  # split on spaces: no quoted arguments (a -k expression goes in TEST_K)
TEST_K=${TEST_K:-}  # pytest -k expression, passed as one argument
PROFILE_ARGS=${PROFILE_ARGS:-sinkhorn --filter M=65536}
mkdir -p "$OUT"
start=$SECONDS
say() { printf '[%4ds] %s\n' "$((SECONDS - start))" "$*"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl .whl/pytest/*.whl .whl/hdgsa/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# quack's archive is over one call's carry limit: it travels as parts (split -b), one per call,
# gathered in /tmp/quack-parts while the machine stays warm; unpacked once they are all there.
mkdir -p /tmp/quack-parts
cp .quack-part*/quack_site.tar.xz.part* /tmp/quack-parts/ 2>/dev/null
if [[ ! -d /tmp/quack-site ]] && compgen -G "/tmp/quack-parts/*" >/dev/null && cat /tmp/quack-parts/* | xz -t 2>/dev/null; then
  # Into a scratch folder first: a half-unpacked site must not be taken for a whole one later.
  rm -rf /tmp/quack-site.part && mkdir -p /tmp/quack-site.part && cat /tmp/quack-parts/* | xz -d | tar -C /tmp/quack-site.part -xf - && mv /tmp/quack-site.part /tmp/quack-site || exit 1
fi
if [[ -d /tmp/quack-site ]]; then
  # What nvidia_cutlass_dsl's .pth file would put first on sys.path (PYTHONPATH entries do not
  # process .pth files); first, since the machine's image has another package named cutlass.
  export PYTHONPATH=/tmp/quack-site/nvidia_cutlass_dsl/dsl_packages:/tmp/quack-site:$PYTHONPATH
  echo "quack unpacked"
else
  echo "quack parts here: $(ls /tmp/quack-parts | tr '\n' ' ')"
fi
# A newer Triton than the machine's (fla 0.6 runs the gated backward on Hopper only with Triton
# >= 3.7.1; the machine has 3.6) travels the same way: .triton-part0/, .triton-part1/, an xz tar
# of the wheel's files (AMD backend, CUPTI and Blackwell ptxas left out), put first on PYTHONPATH.
mkdir -p /tmp/triton-parts
cp .triton-part*/triton*.tar.xz.part* /tmp/triton-parts/ 2>/dev/null
if [[ ! -d /tmp/triton-site ]] && compgen -G "/tmp/triton-parts/*" >/dev/null && cat /tmp/triton-parts/* | xz -t 2>/dev/null; then
  rm -rf /tmp/triton-site.part && mkdir -p /tmp/triton-site.part && cat /tmp/triton-parts/* | xz -d | tar -C /tmp/triton-site.part -xf - && mv /tmp/triton-site.part /tmp/triton-site || exit 1
fi
if [[ -d /tmp/triton-site ]]; then
  sed -i "/^amd = /d" /tmp/triton-site/triton-*.dist-info/entry_points.txt  # its backend was left out
  # Triton 3.9 looks for ptxas-blackwell on every GPU; Hopper builds need only ptxas.
  bin=/tmp/triton-site/triton/backends/nvidia/bin; [[ -e $bin/ptxas-blackwell ]] || ln -s ptxas "$bin/ptxas-blackwell"
  export PYTHONPATH=/tmp/triton-site:$PYTHONPATH
elif compgen -G "/tmp/triton-parts/*" >/dev/null; then
  echo "triton parts here: $(ls /tmp/triton-parts | tr '\n' ' ')"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [[ $STAGES == *tests* ]]; then
  say "tests on CUDA, one process per package"
  # Logs stay outside $OUT (the device tool returns 8 files at most); their ends go to one file.
  logs=/tmp/gpu-session-tests
  xdist=""
  if python3 -c "import xdist" 2>/dev/null; then xdist="-n $TEST_WORKERS"; fi
  rm -rf "$logs"
  mkdir -p "$logs"
  # TEST_PACKAGES: a space-separated subset (default: every package).
  for name in ${TEST_PACKAGES:-$(ls packages)}; do
    package=packages/$name
    workers=$xdist
    # Sinkhorn compiles a kernel per (n, iterations, dtype): twice the processes.
    [[ -n $xdist && $name == *sinkhorn* ]] && workers="-n $((2 * TEST_WORKERS))"
    (cd "$package" && timeout "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -rfE $workers ${TEST_ARGS:-} ${TEST_K:+-k "$TEST_K"} tests \
      >"$logs/$name.log" 2>&1; echo "$name exit=$?" >>"$logs/summary.txt") &
  done
  wait
  # A timed-out pytest leaves its xdist workers running (compiling, on every core): stop them
  # before anything is timed.
  pkill -9 -f "sys.stdin.readline" 2>/dev/null
  pkill -9 -f "python3 -m pytest" 2>/dev/null
  for log in "$logs"/hdgsa-*.log; do
    { printf '\n===== %s\n' "$(basename "$log" .log)"; tail -n 150 "$log"; } >>"$OUT/tests.log"
    grep -E "^(FAILED|ERROR)" "$log" | head -n 8
    printf '%-24s %s\n' "$(basename "$log" .log)" "$(tail -n 1 "$log")"
  done
  cat "$logs/summary.txt"
  tar -C "$logs" -czf "$OUT/test-logs.tar.gz" .  # the full logs, as one returned file
fi

if [[ $STAGES == *check* ]]; then
  say "hdgsa-kernels check (cpu and cuda)"
  python3 -m hdgsa_kernels check >"$OUT/check.log" 2>&1
  echo "check exit=$?"
  grep -E "FAIL|ERROR" "$OUT/check.log" | head -n 20
  tail -n 1 "$OUT/check.log"
fi

if [[ $STAGES == *profile* ]]; then
  say "host profile: $PROFILE_ARGS"
  # shellcheck disable=SC2086  # word splitting of the arguments is intended
  python3 tools/host_profile.py $PROFILE_ARGS 2>&1 | tee "$OUT/profile.log" | grep -E "do_bench|unavailable"
fi

if [[ $STAGES == *bench* ]]; then
  say "hdgsa-kernels bench $BENCH_OPS"
  # shellcheck disable=SC2086  # word splitting of the op list and options is intended
  python3 -m hdgsa_kernels bench $BENCH_OPS $BENCH_ARGS --output-dir "$OUT" 2>"$OUT/bench.err"
  echo "bench exit=$?"
  tail -n 5 "$OUT/bench.err"
fi
say "done"
