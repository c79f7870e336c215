#!/usr/bin/env bash
# GPU session entry point, run through the device tool from the repository root:
#
#   bash scripts/h100.sh PART [extra `python -m benchmarks` arguments]
#
# Carry `.whl` (run(carry=[".whl"])) to get the Inf-CL baseline: `.whl/inf_cl-*.whl`
# (pure Python; `pip download --no-deps -d .whl inf-cl==1.2.1` here, .whl/ is git-ignored).
# Set VLMKERNELS_GIT_COMMIT=<hash> in the command to record the commit (the work tree that
# travels has no .git).
#
# PART          what                                                   rough time (estimate)
# tests         pytest tests/*_gpu.py, then the rest                   ~3-6 min
#               of tests/, on CUDA -> $OUT/pytest.log
# bench-quick   both ops, N in {8192, 32768, 65536} x d=768, bf16,     ~3-5 min
#               fwd and fwd+bwd, all providers: every target of the
#               issue is measured -> $OUT/contrastive.csv, bench.log
# bench-clip    full clip_loss sweep (16 shapes)                       ~6-9 min
# bench-siglip  full siglip_loss sweep (16 shapes)                     ~4-7 min
# bench-rope    M-RoPE suite (mrope, mrope_interleaved, vision_rope),  ~5-8 min
#               S in {1024, 4096, 16384, 65536}, B=1, bf16, fwd/bwd/
#               fwd+bwd, all providers; prints the rope targets
#               -> $OUT/rope.csv, bench.log
# bench-rope-quick  same, S in {1024, 16384, 65536}                    ~4-6 min
#               (Liger baseline: put liger_kernel-0.8.5-py3-none-any.whl in .whl/ too)
# bench-rope-index  get_rope_index, transformers vs vlmkernels, B in    ~1 min
#               {1, 8, 32} -> $OUT/rope_index.csv
# bench-dist    contrastive_dist suite (--quick): ring overhead with a     ~5-8 min
#               single-rank NCCL group, ALBEF/BLIP queue ops vs eager and
#               compile; then clip_loss per-block times and the scaling
#               model from them -> $OUT/contrastive_dist.csv, scaling.md
# cuda          the CUDA C++ backend: tests/test_cuda_backend_gpu.py    ~3-6 min
#               under compute-sanitizer memcheck -> pytest.log; rope
#               suite, Triton vs CUDA C++ providers, S in {4096, 16384,
#               65536} -> rope.csv (the "at least as fast" check)
# tune          vlmkernels tune on this GPU -> $OUT/configs/<device>/*.json  ~5-10 min
#               (commit them under vlmkernels/configs/<device>/)
# bench         full sweep of both ops in one command                  > 10 min: cut by
#               --time-budget; cases past it are recorded "skipped"    the budget
# all           tests, then bench-quick with what is left of 510 s     ~9-10 min
#
# The estimates are not measurements (no GPU run of this script yet): torch.compile
# compiles once per shape (seconds each), Triton autotunes once per shape, and Inf-CL was
# reported at ~0.4 s per call at N=32768 (it is skipped above that). Each device command
# may run 10 minutes and a session has 30 minutes of device time, so a full sweep is two
# commands: bench-clip and bench-siglip. Every benchmark part stops starting new cases
# after BENCH_BUDGET_S seconds (default 480) so that it ends inside the command limit;
# skipped shapes are listed at the end (rerun them with --shape N=... --shape d=...).
# Rows are appended to the CSV as each case ends: a command killed at its limit still
# returns what it measured.
#
# Files back in $OUT (at most 8): setup.log, pytest.log, bench.log, contrastive.csv, rope.csv,
# rope_index.csv, contrastive_dist.csv, scaling.md, scaling.csv.

set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vlmkernels-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BENCH_BUDGET_S:-480}
# the H100 only: half the extension's build time of the default sm_80 + sm_90a
export VLMKERNELS_CUDA_ARCHS=${VLMKERNELS_CUDA_ARCHS:-90a}
PART=${1:-}
shift || true

usage() {
    sed -n '2,/^# Files back/p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

setup() {
    (
        echo "== $(date -u +%FT%TZ) setup"
        # not -q: setup.py says whether it builds vlmkernels._C, and why not
        $PY -m pip install -v -e . --no-deps --no-build-isolation 2>&1 \
            | grep -E "^vlmkernels:|error|Error|Successfully" || true
        $PY -c "import vlmkernels" || exit 1
        if compgen -G ".whl/*.whl" >/dev/null; then
            $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
                && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        fi
        nvidia-smi || true
        $PY - <<'EOF'
import importlib.util, sys, torch, triton, vlmkernels
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "vlmkernels", vlmkernels.__version__)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for mod in ("inf_cl", "pynvml", "liger_kernel", "transformers"):
    print(mod, "importable" if importlib.util.find_spec(mod) else "NOT importable")
from vlmkernels.core import cuda as _cuda
print("CUDA C++ extension:", _cuda.status())
EOF
    ) 2>&1 | tee -a "$OUT/setup.log" || return 1
    # The export above ran in the subshell of the pipe: repeat it for this shell.
    if compgen -G ".whl/*.whl" >/dev/null; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
}

run_tests() {
    (
        rc=0
        echo "== $(date -u +%FT%TZ) GPU modules: tests/*_gpu.py"
        $PY -m pytest -q -rs -p no:cacheprovider tests/*_gpu.py || rc=$?
        echo "== $(date -u +%FT%TZ) the rest of tests/ (rc so far $rc)"
        $PY -m pytest -q -rs -p no:cacheprovider tests/ \
            --ignore-glob='tests/*_gpu.py' \
            || rc=$?
        echo "== $(date -u +%FT%TZ) tests done, rc $rc"
        exit $rc
    ) 2>&1 | tee -a "$OUT/pytest.log"
}

bench() {
    echo "== $(date -u +%FT%TZ) python -m benchmarks $*" | tee -a "$OUT/bench.log"
    $PY -m benchmarks --out "$OUT" --time-budget "$BUDGET" "$@" 2>&1 | tee -a "$OUT/bench.log"
}

[ -n "$PART" ] || usage
setup || { echo "setup failed"; exit 1; }
case "$PART" in
    tests) run_tests ;;
    bench-quick) bench contrastive --quick --shape N=8192,32768,65536 "$@" ;;
    bench-clip) bench clip_loss --full "$@" ;;
    bench-siglip) bench siglip_loss --full "$@" ;;
    bench) bench contrastive --full "$@" ;;
    bench-dist)
        BUDGET=${BENCH_BUDGET_S:-300}
        bench contrastive_dist --quick "$@"
        b=$?
        # the per-block kernel times the scaling model reads, with what is left of 540 s
        BUDGET=$((540 - SECONDS))
        [ "$BUDGET" -ge 60 ] || BUDGET=60
        bench clip_loss --providers vlmkernels --shape N=512,1024,2048,4096,8192,16384,32768 \
            --shape d=768
        c=$?
        $PY -m benchmarks.scaling_model --csv "$OUT/contrastive.csv" \
            --out-csv "$OUT/scaling.csv" 2>&1 | tee "$OUT/scaling.md"
        m=$?
        [ $b -eq 0 ] && [ $c -eq 0 ] && [ $m -eq 0 ]
        ;;
    bench-rope) bench rope --full "$@" ;;
    cuda)
        # the CUDA C++ backend: its tests under compute-sanitizer memcheck, then its time
        # against the Triton kernels at the issue's size
        (
            echo "== $(date -u +%FT%TZ) compute-sanitizer memcheck: tests/test_cuda_backend_gpu.py"
            compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
                $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend_gpu.py
        ) 2>&1 | tee -a "$OUT/pytest.log"
        t=$?
        bench rope --shape S=4096,16384,65536 \
            --providers vlmkernels,vlmkernels_positions,vlmkernels_cuda,vlmkernels_cuda_positions \
            "$@"
        b=$?
        [ $t -eq 0 ] && [ $b -eq 0 ]
        ;;
    tune)
        $PY -c "from vlmkernels.core.tuner import tune; tune(out_dir='$OUT/configs')" 2>&1 \
            | tee -a "$OUT/bench.log"
        ;;
    bench-rope-quick) bench rope --quick "$@" ;;
    bench-rope-index) bench rope_index "$@" ;;
    all)
        run_tests
        t=$?
        # what is left of a 10-minute command, less a margin for the case in flight
        BUDGET=$((510 - SECONDS))
        [ "$BUDGET" -ge 60 ] || BUDGET=60
        bench contrastive --quick --shape N=8192,32768,65536 "$@"
        b=$?
        [ $t -eq 0 ] && [ $b -eq 0 ]
        ;;
    *) usage ;;
esac
rc=$?
echo "== $(date -u +%FT%TZ) $PART finished, rc $rc; files in $OUT:"
ls -la "$OUT"
exit $rc
