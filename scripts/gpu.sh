#!/usr/bin/env bash
# Every owed GPU check in one prepared run (the H200 device: torch 2.11+cu130, triton 3.6,
# transformers 5.17, no package registry). From the repository root, through the device tool:
#
#   bash scripts/gpu.sh              # the whole run, results under $OUT (about 8 minutes)
#   bash scripts/gpu.sh bench tune   # setup, then only these steps (a second run)
#   bash scripts/gpu.sh --dry-run    # no GPU: check that every name below exists (CI)
#
# Steps, in order, each time-boxed (seconds: its cap; the whole run stops starting steps
# at GPU_SH_BUDGET_S, default 480) and run whatever the previous ones gave:
#   setup      pip install -e . --no-deps --no-build-isolation (builds the CUDA C++
#              extension once, sm_90a only); carried wheels (.whl/*.whl: peers such as
#              liger-kernel, inf-cl, siglip-kernel: bash scripts/peer_wheels.sh here,
#              then carry .whl) into /tmp/site; versions                             240
#   gpu-tests  pytest tests/*_gpu.py (in GPU_TEST_WORKERS=8 processes with pytest-xdist)   90
#   memcheck   compute-sanitizer --tool memcheck on the CUDA C++ tests                   60
#   tune       vlmkernels tune, one call per family, into $OUT/configs (the shipped
#              layout: tar -xzf configs.tar.gz in the checkout puts them in
#              vlmkernels/configs/<device>/); the benchmarks then use them
#              (TUNE_S, default 120; leaves BENCH_MIN_S, default 120, to the bench)    120
#   bench      python -m benchmarks --quick, one call per op with a target in
#              benchmarks/targets.py (its shapes and modes, every provider: the peers
#              run when importable), sharing what is left of the budget (--time-budget)
#   pack       results.tar.gz (bench CSVs, pytest junit XML), configs.tar.gz
#
# Files back in $OUT (at most 8): gpu.log (everything), status.tsv (step, status, seconds),
# results.tar.gz, configs.tar.gz. A step that fails or times out is recorded and the run
# goes on; the exit status is 1 if any step failed. Set VLMKERNELS_GIT_COMMIT=<hash> to
# record the commit (the tree that travels has no .git). GPU_TESTS and MEMCHECK_TESTS
# override the test files (space-separated); GPU_TESTS_S, MEMCHECK_S, TUNE_S the steps' caps.

set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU_TESTS=${GPU_TESTS:-$(ls tests/*_gpu.py 2>/dev/null | tr '\n' ' ')}
MEMCHECK_TESTS=${MEMCHECK_TESTS:-tests/test_cuda_backend_gpu.py}
BUDGET=${GPU_SH_BUDGET_S:-480}
export VLMKERNELS_CUDA_ARCHS=${VLMKERNELS_CUDA_ARCHS:-90a}

# The benchmark plan: one line per op with a target (host-time targets and those judged in
# another dtype than the run's bf16 excluded: they are CPU measurements), "op<TAB>arguments",
# from benchmarks/targets.py (a CPU-shape target's values joined to the GPU shape's made a
# product of two values per shape key: 2^23 cases for the connectors, 148 s to list), and
# the ops timed without a target of their own (UNTARGETED: fused paths owed a first GPU
# timing). With --check, each command is parsed by the benchmarks CLI with --list (unknown
# op, shape key or mode: exit 2), and each target's provider and baseline must be a
# provider the op declares.
plan() {
    $PY - "$@" <<'EOF'
import contextlib, io, sys
from benchmarks import suites, targets
from benchmarks.__main__ import main

groups = {}
for t in targets.TARGETS:
    if t.metric == "host_us" or t.dtype not in (None, targets.BF16):
        continue
    g = groups.setdefault((t.suite, t.op), {"modes": [], "shape": {}, "providers": set()})
    if t.mode not in g["modes"]:
        g["modes"].append(t.mode)
    for key, value in t.shape:
        g["shape"].setdefault(key, [])
        if value not in g["shape"][key]:
            g["shape"][key].append(value)
    g["providers"] |= {p for p in (t.provider, t.baseline, t.beside) if p}
# (suite, op, modes, shape): Aya Vision's SwiGLU projector, fused against eager and compile
UNTARGETED = [("connectors", "swiglu_projector", ("fwd", "fwd+bwd"), targets.CONNECTOR_SHAPE)]
for suite, op, modes, shape in UNTARGETED:
    groups[(suite, op)] = {"modes": list(modes), "shape": {k: [v] for k, v in shape},
                           "providers": set()}
declared = {(s.name, op.name): {p.name for p in op.providers}
            for s in suites().values() for op in s.ops}
failed = 0
for (suite, op), g in groups.items():
    args = [op, "--quick", "--modes", ",".join(g["modes"])]
    for key, values in g["shape"].items():
        args += ["--shape", f"{key}={','.join(map(str, values))}"]
    if "--check" not in sys.argv[1:]:
        print(op, " ".join(args[1:]), sep="\t")
        continue
    missing = sorted(g["providers"] - declared.get((suite, op), set()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(args + ["--list", "--no-progress"])
    ok = rc == 0 and not missing
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} bench {suite}/{op}: {' '.join(args)}"
          + (f" (rc {rc}: {out.getvalue().strip()[-300:]})" if rc else "")
          + (f" (providers not declared: {missing})" if missing else ""))
sys.exit(1 if failed else 0)
EOF
}

kernels() {
    $PY -c "import vlmkernels; from vlmkernels.core.tuning import all_kernels; \
print(' '.join(sorted(all_kernels())))"
}

dry_run() {
    local rc=0 f
    export TRITON_INTERPRET=1
    for f in $GPU_TESTS $MEMCHECK_TESTS; do
        if [ -f "$f" ]; then echo "ok   test file $f"; else echo "FAIL test file $f missing"; rc=1; fi
    done
    [ -n "$GPU_TESTS" ] || { echo "FAIL no tests/*_gpu.py"; rc=1; }
    # every named test module must import and collect (0: items, 5: none collected here)
    $PY -m pytest --collect-only -q -p no:cacheprovider $GPU_TESTS $MEMCHECK_TESTS >/tmp/gpu_sh_collect.log 2>&1
    local c=$?
    if [ $c -eq 0 ] || [ $c -eq 5 ]; then
        echo "ok   pytest collects $(grep -c '::' /tmp/gpu_sh_collect.log) tests"
    else
        echo "FAIL pytest --collect-only (rc $c):"; tail -20 /tmp/gpu_sh_collect.log; rc=1
    fi
    plan --check || rc=1
    local names
    names=$(kernels) || rc=1
    if $PY -c "import sys; from vlmkernels.cli import build_parser; \
build_parser().parse_args(['tune', *sys.argv[1:], '--out', '/tmp/x'])" $names; then
        echo "ok   vlmkernels tune, kernels: $names"
    else
        echo "FAIL vlmkernels tune $names"; rc=1
    fi
    for tool in timeout tar; do
        command -v $tool >/dev/null || { echo "FAIL $tool not found"; rc=1; }
    done
    echo "dry run: $([ $rc -eq 0 ] && echo ok || echo FAILED)"
    return $rc
}

if [ "${1:-}" = "--dry-run" ]; then
    dry_run
    exit $?
fi
STEPS=${*:-gpu-tests memcheck tune bench}
for s in $STEPS; do
    case $s in
        gpu-tests | memcheck | tune | bench) ;;
        *) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
    esac
done

OUT=${OUT:-/tmp/vlmkernels-out}
DEADLINE=$(($(date +%s) + BUDGET))
TUNE_S=${TUNE_S:-120}
BENCH_MIN_S=${BENCH_MIN_S:-120}
export PY OUT DEADLINE TUNE_S BENCH_MIN_S
left() { echo $((DEADLINE - $(date +%s))); }
mkdir -p "$OUT/bench" "$OUT/configs"
LOG=$OUT/gpu.log
printf 'step\tstatus\tseconds\n' >"$OUT/status.tsv"
FAILED=0

# step NAME CAP COMMAND...: run COMMAND with at most min(CAP, what is left) seconds.
step() {
    local name=$1 cap=$2
    shift 2
    local left
    left=$(left)
    if [ $left -lt 20 ]; then
        printf '%s\tskipped (budget spent)\t0\n' "$name" >>"$OUT/status.tsv"
        echo "== $name skipped: the budget is spent" | tee -a "$LOG"
        FAILED=1
        return
    fi
    local t=$((cap < left ? cap : left)) start=$SECONDS
    echo "== $(date -u +%FT%TZ) $name (at most ${t}s): $*" | tee -a "$LOG"
    if [ "$(type -t "$1")" = function ]; then  # a function runs in a child bash
        timeout -k 10 "$t" bash -c "$1" >>"$LOG" 2>&1
    else
        timeout -k 10 "$t" "$@" >>"$LOG" 2>&1
    fi
    local rc=$? status=ok
    [ $rc -eq 0 ] || status="failed (rc $rc)"
    [ $rc -ne 124 ] && [ $rc -ne 137 ] || status="timed out after ${t}s"
    [ $rc -eq 0 ] || FAILED=1
    printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) >>"$OUT/status.tsv"
    echo "== $name: $status in $((SECONDS - start))s" | tee -a "$LOG"
}

setup() {
    # torch finds the toolkit from CUDA_HOME, else from the nvcc on PATH: where that nvcc
    # is a wrapper script outside the toolkit, the headers are not found and the package
    # installs without the extension
    if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
        export CUDA_HOME=/usr/local/cuda
    fi
    $PY -m pip install -v -e . --no-deps --no-build-isolation 2>&1 \
        | grep -E "^\s*vlmkernels:|error|Error|Successfully" || true  # pip -v indents
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
    fi
    nvidia-smi || true
    $PY - <<'EOF'
import importlib.util, os, sys, torch, triton, vlmkernels
from vlmkernels.core import cuda
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "vlmkernels", vlmkernels.__version__, "commit", os.environ.get("VLMKERNELS_GIT_COMMIT"))
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for mod in ("liger_kernel", "inf_cl", "siglip_kernel", "transformers", "pynvml"):
    print(mod, "importable" if importlib.util.find_spec(mod) else "NOT importable")
print("CUDA C++ extension:", cuda.status())
# a failed build installs the package without the extension and the CUDA C++ tests then
# skip: the run must not read as passed (VLMKERNELS_BUILD_CUDA=0 skips it on purpose)
built = cuda.status()[0] or os.environ.get("VLMKERNELS_BUILD_CUDA", "").strip() == "0"
sys.exit(0 if torch.cuda.is_available() and built else 1)
EOF
}

tune_all() {  # one call per family: a call cut by its time box loses only that family
    local f rc=0 names n each
    names=$($PY -c "import vlmkernels; from vlmkernels.core.family import families; \
print(' '.join(f for f, d in families().items() if d.kernels))") || return 1
    n=$(echo $names | wc -w)
    for f in $names; do
        each=$((($(left) - BENCH_MIN_S) / n))
        [ $each -le $((TUNE_S / n + 30)) ] || each=$((TUNE_S / n + 30))
        [ $each -ge 10 ] || each=10
        echo "-- vlmkernels tune $f (at most ${each}s)"
        timeout -k 5 $each $PY -m vlmkernels tune "$f" --out "$OUT/configs" || rc=1
        n=$((n - 1))
    done
    return $rc
}

bench_all() {
    local rc=0 n op args
    local lines
    lines=$(plan) || return 1
    n=$(printf '%s\n' "$lines" | wc -l)
    while IFS=$'\t' read -r op args; do
        local each=$((($(left) - 30) / n))
        [ $each -ge 15 ] || each=15
        echo "-- python -m benchmarks $op $args (time budget ${each}s)"
        # shellcheck disable=SC2086
        timeout -k 10 $((each + 60)) $PY -m benchmarks "$op" $args --dtype bf16 \
            --out "$OUT/bench" --time-budget "$each" --no-progress || rc=1
        n=$((n - 1))
    done <<<"$lines"
    return $rc
}

export -f left setup tune_all bench_all plan kernels
[ -d /tmp/site ] || mkdir -p /tmp/site
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
want() { [[ " $STEPS " == *" $1 "* ]]; }
step setup 240 setup
# 256 tests whose first calls compile Triton kernels on a cold cache: spread over
# GPU_TEST_WORKERS processes (one GPU) where pytest-xdist is importable (carried in .whl)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${GPU_TEST_WORKERS:-8}")
want gpu-tests && step gpu-tests ${GPU_TESTS_S:-90} $PY -m pytest -q -rs -p no:cacheprovider \
    $XDIST --junitxml="$OUT/bench/gpu-tests.xml" $GPU_TESTS
# PYTORCH_NO_CUDA_MEMORY_CACHING: one cudaMalloc per tensor, so an access past a tensor is
# caught (the caching allocator's blocks would hide it inside a larger segment)
want memcheck && step memcheck ${MEMCHECK_S:-60} env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 3 \
    --print-limit 20 $PY -m pytest -q -rs -p no:cacheprovider $MEMCHECK_TESTS
want tune && step tune $TUNE_S tune_all
compgen -G "$OUT/configs/*/*.json" >/dev/null && export VLMKERNELS_CONFIG_DIR=$OUT/configs
want bench && step bench $(($(left) - 15)) bench_all
(cd "$OUT/bench" && tar -czf "$OUT/results.tar.gz" .) && rm -rf "$OUT/bench"
mkdir -p "$OUT/pack/vlmkernels" && mv "$OUT/configs" "$OUT/pack/vlmkernels/configs"
(cd "$OUT/pack" && tar -czf "$OUT/configs.tar.gz" vlmkernels) && rm -rf "$OUT/pack"
column -t -s $'\t' "$OUT/status.tsv" 2>/dev/null || cat "$OUT/status.tsv"
echo "total ${SECONDS}s; files in $OUT:" && ls -la "$OUT"
exit $FAILED
