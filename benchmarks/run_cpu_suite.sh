#!/usr/bin/env bash
# The CPU measurements recorded in benchmarks/README.md (2-core CPU; results/*.json, one per run).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}  # CPU numbers: do not probe for a TPU when libtpu is installed
R=benchmarks/results
SMALL="--shape small --batch 4 --seq 128 --base-layers 13 --estimator-layers 1 --dtype float32 --steps 3"
b() { name=$1; shift; echo "== $name: $*"; $PY -m sgt_jax.bench "$@" --out $R/$name.json > /dev/null 2>&1 || echo "FAILED $name"; }
b tiny_default --shape tiny --batch 2 --seq 64 --base-layers 2 --steps 5
for r in none full dots_saveable; do b remat_$r $SMALL --remat $r; done
b donate_on $SMALL
b donate_off $SMALL --no-donate
for s in 64 128 192 256; do b bucket_seq$s --shape small --batch 4 --seq $s --base-layers 13 --dtype float32 --steps 3; done
b vocab_chunk_0 --shape small --vocab 32000 --batch 4 --seq 256 --base-layers 2 --objective lm --dtype bfloat16 --memory-only
b vocab_chunk_4096 --shape small --vocab 32000 --batch 4 --seq 256 --base-layers 2 --objective lm --dtype bfloat16 --vocab-chunk 4096 --memory-only
b distill_chunk_0 --shape small --vocab 32000 --batch 4 --seq 256 --base-layers 2 --objective distill --dtype bfloat16 --memory-only
b distill_chunk_4096 --shape small --vocab 32000 --batch 4 --seq 256 --base-layers 2 --objective distill --dtype bfloat16 --vocab-chunk 4096 --memory-only
for p in 0 2; do for d in 0 200; do b prefetch${p}_delay$d $SMALL --prefetch $p --host-delay-ms $d --steps 4; done; done
T="--shape small --batch 4 --seq 512 --estimator-layers 1 --dtype bfloat16 --memory-only"
b trunc_k12_of32 $T --base-layers 13 --model-layers 32
b untrunc_lm_32 $T --base-layers 32 --objective lm
b untrunc_lm_32_chunked $T --base-layers 32 --objective lm --vocab-chunk 512
# prefetch when the loop reads the loss every step (no async-dispatch overlap of the host work otherwise)
for p in 0 2; do b prefetch${p}_delay200_sync $SMALL --prefetch $p --host-delay-ms 200 --steps 4 --sync-every-step; done
# ours vs PyTorch (same shape; torch at 1 and 2 threads: OpenMP spinning collapses under load)
for th in 1 2; do for dt in float32 bfloat16; do
  echo "== torch_vs_ours_${dt}_t${th}"
  $PY benchmarks/torch_reference.py --shape small --batch 4 --seq 128 --base-layers 13 --dtype $dt --steps 3 \
      --torch-threads $th --compare --out $R/torch_vs_ours_${dt}_t${th}.json 2>&1 | grep "pytorch:\|sgt_jax:"
done; done
# the grid: batch 4 / 8 / 16 x 4 and 13 kept layers, float32, PyTorch at 2 threads (both use both cores)
for layers in 4 13; do for batch in 4 8 16; do
  echo "== torch_grid_b${batch}_l${layers}"
  $PY benchmarks/torch_reference.py --shape small --batch $batch --seq 128 --base-layers $layers --dtype float32 \
      --steps 5 --torch-threads 2 --compare --out $R/torch_grid_b${batch}_l${layers}.json 2>&1 | grep "pytorch:\|sgt_jax:"
done; done
# the GEMMs of one layer at those rows (batch x 128): XLA:CPU against PyTorch's (oneDNN / MKL) matmul
$PY benchmarks/gemm_cpu.py --shape small --rows 512 1024 2048 --torch-threads 2 --out $R/gemm_cpu_small.json
# the same at the tiny default shape (the target's "tiny shapes")
for th in 1 2; do for dt in float32 bfloat16; do
  echo "== torch_vs_ours_tiny_${dt}_t${th}"
  $PY benchmarks/torch_reference.py --shape tiny --batch 2 --seq 64 --base-layers 2 --dtype $dt --steps 20 \
      --torch-threads $th --compare --out $R/torch_vs_ours_tiny_${dt}_t${th}.json 2>&1 | grep "pytorch:\|sgt_jax:"
done; done
# truncation memory with the estimators rematerialised too (cloak.remat_policy), on both sides
b trunc_k12_of32_cloak_remat $T --base-layers 13 --model-layers 32 --cloak-remat full
b untrunc_lm_32_cloak_remat $T --base-layers 32 --objective lm --cloak-remat full
# where the memory goes: step memory against the number of kept layers (slope = one layer, intercept = fixed),
# and the ratio with a float32 base (no bf16->f32 converts, which XLA:CPU inserts around bf16 dots)
for k in 1 2 4 8; do b trunc_k$((k-1))_of32 $T --base-layers $k --model-layers 32; done
b trunc_k12_of32_f32 ${T/bfloat16/float32} --base-layers 13 --model-layers 32
b untrunc_lm_32_f32 ${T/bfloat16/float32} --base-layers 32 --objective lm
# truncation memory with the other remat policies
for r in full:full dots_nb:dots_with_no_batch_dims_saveable; do
  b trunc_k12_of32_remat_${r%%:*} $T --base-layers 13 --model-layers 32 --remat ${r#*:}
  b untrunc_lm_32_remat_${r%%:*} $T --base-layers 32 --objective lm --remat ${r#*:}
done
