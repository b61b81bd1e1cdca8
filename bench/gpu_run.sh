#!/bin/bash
# One device call: GPU tests, compute-sanitizer, kernel benchmark. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BLAST_CACHE_DIR=${BLAST_CACHE_DIR:-/tmp/blast_cache}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee $OUT/env.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/env.txt
if [ "${SKIP_TESTS:-0}" != 1 ]; then
BLAST_TUNE=0 timeout ${TEST_T:-240} python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tail -25 | tee $OUT/gpu_tests.log
for tool in memcheck racecheck; do
  BLAST_TUNE=0 timeout ${SAN_T:-100} compute-sanitizer --tool $tool --print-limit 5 python3 bench/_sanitize.py 2>&1 | tail -6 | tee $OUT/sanitize_$tool.log
done
fi
timeout ${BENCH_T:-300} python3 bench/mlp.py --out $OUT $BENCH_ARGS 2>&1 | grep -v Warning | tee $OUT/bench.log | tail -30
cp $BLAST_CACHE_DIR/kernels/tuning.json $OUT/ 2>/dev/null
