#!/bin/bash
# GPU runs in stages, each under its own time limit (one device call is 10 minutes: pick stages that fit).
# Logs and JSON go under $OUT; a stage cut by its limit keeps what it wrote (the benches save after each row).
#
#   bash bench/gpu_run.sh STAGE [STAGE ...]        e.g. bash bench/gpu_run.sh tests-lowered default
#
# tests-lowered  GPU tests of the lowered path and the kernels (pytest-xdist, 8 workers)
# tests-rest     every other GPU test
# sanitize       compute-sanitizer memcheck and racecheck over a tiny run of every kernel
# mlp            kernel table: dense / torch BSR / blast (bench/mlp.py --quick)
# default        default mode vs CUDA graphs, layer stacks, both shapes, every M (issue 23)
# generate       HF generate in default mode, both ways of compiling, batch 1 and 8 (issue 23; no prefill rows)
# prefill        a 2048-token prefill, default mode and CUDA graphs, last-position logits (as generate) and all
# lean           the bare static-cache decode loop under CUDA graphs and without, with its ceiling (MLPs out; issue 24)
# train          the whole 34M pretraining step, default mode and reduce-overhead, dense / blast / MLPs out interleaved
#                in one process (issue 23)
# Limits: T_<stage> seconds (dashes as underscores), e.g. T_tests_lowered=300; A_<stage>: more arguments for the
# stage's command (they come last, so they override), e.g. A_default="--shapes 8b --ms 4096".
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BLAST_CACHE_DIR=${BLAST_CACHE_DIR:-/tmp/blast_cache}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
set -o pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a $OUT/env.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/env.txt
LOWERED="tests/test_lowered_gpu.py tests/test_kernels.py"

limit() { local v="T_${1//-/_}"; echo "${!v:-$2}"; }
more() { local v="A_${1//-/_}"; echo "${!v:-}"; }

for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case $stage in
    tests-lowered) timeout $(limit $stage 280) python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider $LOWERED $(more $stage) \
                     2>&1 | grep -v Warning | tee $OUT/tests_lowered.log | tail -15 ;;
    tests-rest) timeout $(limit $stage 540) python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/ \
                  $(for f in $LOWERED; do echo --ignore=$f; done) $(more $stage) 2>&1 | grep -v Warning | tee $OUT/tests_rest.log \
                  | tail -15 ;;
    sanitize) for tool in memcheck racecheck; do
                BLAST_TUNE=0 timeout $(limit $stage 100) compute-sanitizer --tool $tool --print-limit 5 \
                  python3 bench/_sanitize.py 2>&1 | tail -6 | tee $OUT/sanitize_$tool.log
              done ;;
    mlp) timeout $(limit $stage 300) python3 bench/mlp.py --quick --out $OUT $(more $stage) 2>&1 | grep -v Warning \
           | tee $OUT/mlp.log | tail -30 ;;
    default) timeout $(limit $stage 420) python3 bench/default_mode.py --modes eager,inductor,inductor_ro,blast,blast_ro \
               --out $OUT $(more $stage) 2>&1 | grep -v -i warn | tee $OUT/default_mode.log | tail -12 ;;
    generate) timeout $(limit $stage 480) python3 bench/e2e.py --mode default --forward-compile --skip-lean \
                --skip-prefill --batches 1,8 --out $OUT --tag _generate $(more $stage) 2>&1 | grep -E "^decode" \
                | tee $OUT/generate.log ;;
    prefill) timeout $(limit $stage 300) python3 bench/e2e.py --lean-only --skip-lean --out $OUT --tag _prefill $(more $stage) \
               2>&1 | grep -E "^prefill" | tee $OUT/prefill.log ;;
    lean) timeout $(limit $stage 540) python3 bench/e2e.py --lean-only --skip-prefill --ceiling --reps 5 --out $OUT --tag _lean \
            $(more $stage) 2>&1 | grep -E "^lean" | tee $OUT/lean.log ;;
    train) timeout $(limit $stage 260) python3 bench/train_mlp.py --shapes "" --step --ceiling --sparsity 0.9 \
             --modes default,reduce-overhead --out $OUT --tag step $(more $stage) 2>&1 | grep -E "training step" | tee $OUT/train.log ;;
    *) echo "unknown stage $stage" ;;
  esac
done
cp $BLAST_CACHE_DIR/kernels/tuning.json $OUT/ 2>/dev/null
exit 0
