#!/usr/bin/env bash
# Compile every recipe for the targets it is sized for, on this machine (no TPU or GPU, no weights), with the
# largest micro-batch per chip that fits (--max-tokens), and write one JSON report and log per (recipe, target)
# under benchmarks/results/compile/; `python benchmarks/compile_table.py` renders them. A finished report is not
# redone (delete it to redo). JOBS compiles run side by side (default 1).
#
#   benchmarks/compile_recipes.sh                 # every recipe x target below
#   TARGETS="v5e:4x4" RECIPES="llama2_7b" benchmarks/compile_recipes.sh
set -euo pipefail
OUT=${OUT:-benchmarks/results/compile}
MODELS=${MODELS:-$(mktemp -d)}
JOBS=${JOBS:-1}
RECIPES=${RECIPES:-"llama2_7b llama3_8b mistral_7b_instruct llama3_70b qwen2_7b"}
TARGETS=${TARGETS:-"v5e:4x4 v4:2x2x2 v5p:2x2x2 v6e:4x4 h100:8 a100-80g:8"}
python benchmarks/recipe_models.py "$MODELS"
mkdir -p "$OUT"
jobs_list=()
for model in $RECIPES; do
  for target in $TARGETS; do
    recipe=$model extra=()
    case $model in
      qwen2_7b) recipe=llama2_7b; extra=(cloak.transformer_type=qwen2) ;;  # a shape no recipe names
      llama3_70b) [[ $target == v5p:2x2x2 || $target == h100:8 ]] || continue ;;  # what the 70B recipe is sized for
    esac
    [[ $model == qwen2_7b && $target != v5e:4x4 ]] && continue
    name="${model}_${target/:/_}"
    [[ -s "$OUT/$name.json" ]] && continue
    # one proposal to check on TPU (a 7B TPU compile takes minutes), four on GPU (seconds)
    checks=1; [[ $target == *:8 || $target == *x8 ]] && checks=4
    jobs_list+=("python -m sgt_jax.train --config configs/$recipe.yaml --compile-only --topology $target --max-tokens \
--max-tokens-checks $checks --compile-report $OUT/$name.json model.path=$MODELS/$model ${extra[*]:-} \
> $OUT/$name.log 2>&1 || [ \$? -eq 3 ]")
  done
done
printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -I{} bash -c "nice -n 10 {}"
