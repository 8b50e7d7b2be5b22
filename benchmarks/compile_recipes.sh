#!/usr/bin/env bash
# Compile the three 7B recipes for TPU slices on this machine (no TPU, no weights) and write one JSON report
# per (recipe, topology) under benchmarks/results/compile/; `python benchmarks/compile_table.py` renders them.
# MODELS must hold llama2/, llama3/ and mistral/ directories with the models' config.json (nothing else is read).
set -euo pipefail
MODELS=${MODELS:?set MODELS to a directory with llama2/ llama3/ mistral/ config.json folders}
OUT=${OUT:-benchmarks/results/compile}
TOPOLOGIES=${TOPOLOGIES:-"v5e:4x4 v4:2x2x2 v5p:2x2x2"}
mkdir -p "$OUT"
for pair in llama2:llama2_7b llama3:llama3_8b mistral:mistral_7b_instruct; do
  model=${pair%%:*}; recipe=${pair##*:}
  for topology in $TOPOLOGIES; do
    # Exit code 3 (does not fit) still writes the report.
    python -m sgt_jax.train --config "configs/$recipe.yaml" --compile-only --topology "$topology" \
      model.path="$MODELS/$model" --compile-report "$OUT/${recipe}_${topology/:/_}.json" "$@" \
      > "$OUT/${recipe}_${topology/:/_}.log" 2>&1 || [ $? -eq 3 ]
  done
done
