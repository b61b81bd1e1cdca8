export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nproc
for T in 16 1; do
  s=$(date +%s.%N)
  BLAST_CACHE_DIR=/tmp/bt$T BLAST_COMPILE_THREADS=$T timeout 250 python3 bench/tiles.py --shapes 8b --m 8192 --block 64 --keep 2 --tag h200_round17_threads$T --out $OUT 2>&1 | grep -E "^ +8b|wrote" 
  e=$(date +%s.%N); echo "THREADS=$T tiles wall $(python3 -c "print(round($e-$s,1))") s"
done
BLAST_CACHE_DIR=/tmp/bt16 timeout 150 python3 bench/train_mlp.py --shapes 8b --sparsity 0.9 --block 64 --modes reduce-overhead --save auto --tag h200_round17_b64_3 --out $OUT 2>&1 | grep -E "^\[|wrote"
